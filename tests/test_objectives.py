import pytest
import torch

from training import NetworkConfig, TrainConfig, build_networks, objectives
from training.loop import (
    Optimizers,
    draw_pairs,
    ebm_update,
    encoder_generator_losses,
    encoder_generator_update,
)


def test_ebm_loss_sign_lowers_data_energy():
    data, model = torch.tensor([1.0, 2.0]), torch.tensor([5.0, 7.0])
    assert objectives.ebm_loss(data, model) == pytest.approx(1.5 - 6.0)


def test_inference_loss_variants_differ_by_energy_and_entropy():
    x, x_rec = torch.zeros(2, 3), torch.ones(2, 3)
    z, logvar = torch.ones(2, 4), torch.full((2, 4), -1.0)
    energy = torch.tensor([0.5, 1.5])
    sigma = 0.5
    recon = 0.5 * 3 / sigma**2             # 0.5 * ||1||^2 / sigma^2 per sample
    prior = 0.5 * 4
    minus = objectives.inference_loss(x, x_rec, z, logvar, energy, sigma, "kl_minus")
    plus = objectives.inference_loss(x, x_rec, z, logvar, energy, sigma, "kl_plus")
    assert minus == pytest.approx(recon + prior - 1.0)
    entropy = 0.5 * (-1.0 * 4)
    assert plus == pytest.approx(recon + prior + 1.0 - 2 * entropy)
    with pytest.raises(ValueError, match="variant"):
        objectives.inference_loss(x, x_rec, z, logvar, energy, sigma, "bogus")


def test_vae_loss_is_recon_plus_kl():
    x, x_rec = torch.zeros(1, 2), torch.full((1, 2), 2.0)
    mu, logvar = torch.ones(1, 3), torch.zeros(1, 3)
    assert objectives.vae_loss(x, x_rec, mu, logvar, 1.0) == pytest.approx(0.5 * 8 + 0.5 * 3)


def _setup(inference_loss="kl_plus"):
    torch.manual_seed(0)
    nets = build_networks(NetworkConfig(input_shape=(6,), latent_dim=3, width=8, depth=1))
    config = TrainConfig(inference_loss=inference_loss, grad_clip=None)
    return nets, Optimizers.create(nets, config), config, torch.randn(16, 6)


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _changed(module, before):
    return any(not torch.equal(p, b) for p, b in zip(module.parameters(), before, strict=True))


def test_ebm_step_moves_only_the_energy():
    nets, opts, config, x = _setup()
    before = {name: _params(m) for name, m in nets.named()}
    ebm_update(nets, opts, x, draw_pairs(nets, x), config)
    assert _changed(nets.energy, before["energy"])
    assert not _changed(nets.encoder, before["encoder"])
    assert not _changed(nets.generator, before["generator"])


@pytest.mark.parametrize("variant", ["kl_plus", "kl_minus"])
def test_encoder_generator_step_leaves_energy_alone(variant):
    nets, opts, config, x = _setup(variant)
    before = {name: _params(m) for name, m in nets.named()}
    encoder_generator_update(nets, opts, x, draw_pairs(nets, x), config)
    assert not _changed(nets.energy, before["energy"])
    assert _changed(nets.encoder, before["encoder"])
    assert _changed(nets.generator, before["generator"])
    assert all(p.grad is None for p in nets.energy.parameters())


@pytest.mark.parametrize("variant", ["kl_plus", "kl_minus"])
def test_fused_backward_equals_separate_encoder_and_generator_losses(variant):
    """The shared backward gives each network exactly the gradient of its own loss."""
    nets, _, config, x = _setup(variant)
    pairs = draw_pairs(nets, x)
    enc, gen = list(nets.encoder.parameters()), list(nets.generator.parameters())
    fused = encoder_generator_losses(nets, x, pairs, config)["fused"]
    fused_enc = torch.autograd.grad(fused, enc, retain_graph=True)
    fused_gen = torch.autograd.grad(fused, gen, retain_graph=True)

    # Encoder: its own inference loss, through z_q.
    e_data = nets.energy(x, pairs.z_q)
    inf = objectives.inference_loss(x, pairs.x_rec, pairs.z_q, pairs.logvar, e_data,
                                    config.decoder_sigma, variant)
    own_enc = torch.autograd.grad(inf, enc, retain_graph=True)
    # Generator: recon at g(z_q.detach()) plus E(g(z_p), z_p).
    z_q = pairs.z_q.detach()
    gen_loss = objectives.generator_loss(x, nets.generator(z_q),
                                         nets.energy(nets.generator(pairs.z_p), pairs.z_p),
                                         config.decoder_sigma)
    own_gen = torch.autograd.grad(gen_loss, gen)
    for a, b in zip(fused_enc + fused_gen, own_enc + own_gen, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
