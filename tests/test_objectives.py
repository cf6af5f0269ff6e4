import copy

import pytest
import torch

from training import NetworkConfig, TrainConfig, build_networks, objectives
from training.loop import (
    Optimizers,
    draw_pairs,
    ebm_update,
    encoder_generator_losses,
    encoder_generator_update,
    extra_negatives,
    select_step,
    simultaneous_triangle_step,
    triangle_step,
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


def test_rows_with_missing_entries_train_the_encoder_on_the_elbo_alone():
    x, x_rec = torch.zeros(2, 3), torch.ones(2, 3)
    z, logvar = torch.ones(2, 4), torch.full((2, 4), -1.0)
    energy = torch.tensor([0.5, 1.5], requires_grad=True)
    sigma = 0.5
    observed = torch.tensor([[True, True, True], [True, False, True]])
    prior, entropy = 0.5 * 4, 0.5 * (-1.0 * 4)
    complete_row = 0.5 * 3 / sigma**2 + prior + 0.5 - 2 * entropy   # kl_plus
    incomplete_row = 0.5 * 2 / sigma**2 + prior - entropy            # observed recon + KL(Q||P)
    for variant in ("kl_plus", "kl_minus"):
        loss = objectives.inference_loss(x, x_rec, z, logvar, energy, sigma, variant,
                                         observed=observed)
        if variant == "kl_plus":
            assert loss.item() == pytest.approx((complete_row + incomplete_row) / 2)
        (grad,) = torch.autograd.grad(loss, energy)
        # the critic reaches the encoder through complete rows only
        assert grad[1] == 0 and grad[0] != 0


def test_vae_loss_is_recon_plus_kl():
    x, x_rec = torch.zeros(1, 2), torch.full((1, 2), 2.0)
    mu, logvar = torch.ones(1, 3), torch.zeros(1, 3)
    assert objectives.vae_loss(x, x_rec, mu, logvar, 1.0) == pytest.approx(0.5 * 8 + 0.5 * 3)


def _setup(inference_loss="kl_plus", critic_negatives=(), trim_fraction=0.0):
    torch.manual_seed(0)
    nets = build_networks(NetworkConfig(input_shape=(6,), latent_dim=3, width=8, depth=1))
    config = TrainConfig(inference_loss=inference_loss, grad_clip=None,
                         critic_negatives=critic_negatives, trim_fraction=trim_fraction)
    return nets, Optimizers.create(nets, config), config, torch.randn(16, 6)


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _changed(module, before):
    return any(not torch.equal(p, b) for p, b in zip(module.parameters(), before, strict=True))


def test_ebm_step_moves_only_the_energy():
    nets, opts, config, x = _setup()
    before = {name: _params(m) for name, m in nets.named_children()}
    ebm_update(nets, opts, x, draw_pairs(nets, x), config)
    assert _changed(nets.energy, before["energy"])
    assert not _changed(nets.encoder, before["encoder"])
    assert not _changed(nets.generator, before["generator"])


@pytest.mark.parametrize("variant", ["kl_plus", "kl_minus"])
def test_encoder_generator_step_leaves_energy_alone(variant):
    nets, opts, config, x = _setup(variant)
    before = {name: _params(m) for name, m in nets.named_children()}
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


def test_extra_critic_negatives_are_mismatched_and_wide_pairs():
    nets, _, _, x = _setup()
    pairs = draw_pairs(nets, x)
    assert extra_negatives(nets, x, pairs, ()) is None
    x_neg, z_neg = extra_negatives(nets, x, pairs, ("mismatch", "wide"))
    n = len(x)
    torch.testing.assert_close(x_neg[:n], x)
    torch.testing.assert_close(z_neg[:n], torch.roll(pairs.z_q.detach(), 1, dims=0))
    torch.testing.assert_close(z_neg[n:], 2.5 * pairs.z_p)
    torch.testing.assert_close(x_neg[n:], nets.generator(2.5 * pairs.z_p))
    assert not x_neg.requires_grad and not z_neg.requires_grad


def test_suspect_critic_negatives_are_the_rows_the_trimmed_loss_leaves_out():
    nets, _, _, x = _setup()
    x[[3, 11]] += 50.0  # the two rows reconstructed worst
    config = TrainConfig(trim_fraction=2 / 16)
    pairs = draw_pairs(nets, x, config=config)
    left_out = pairs.weights == 0
    assert left_out.nonzero().flatten().tolist() == [3, 11]
    x_neg, z_neg = extra_negatives(nets, x, pairs, ("suspect",))
    torch.testing.assert_close(x_neg, x[[3, 11]])
    torch.testing.assert_close(z_neg, pairs.z_q.detach()[[3, 11]])
    assert not x_neg.requires_grad and not z_neg.requires_grad
    # without trimming there is nothing to suspect
    assert extra_negatives(nets, x, draw_pairs(nets, x), ("suspect",)) is None


@pytest.mark.parametrize("kinds, trim_fraction",
                         [(("mismatch",), 0.0), (("wide",), 0.0), (("mismatch", "wide"), 0.0),
                          (("wide", "suspect"), 2 / 16)])
def test_critic_step_with_extra_negatives_moves_only_the_energy(kinds, trim_fraction):
    nets, opts, config, x = _setup(critic_negatives=kinds, trim_fraction=trim_fraction)
    nets.energy.eval()  # no power iteration: every call below sees the same normalised weights
    before = {name: _params(m) for name, m in nets.named_children()}
    pairs = draw_pairs(nets, x, config=config)
    with torch.no_grad():
        x_neg, z_neg = extra_negatives(nets, x, pairs, kinds)
        if "suspect" in kinds:  # the two trimmed rows join the wide pairs
            assert len(x_neg) == len(x) + 2
        want = (objectives.weighted_mean(nets.energy(x, pairs.z_q), pairs.weights)
                - torch.cat([nets.energy(pairs.x_p, pairs.z_p), nets.energy(x_neg, z_neg)]
                            ).mean())
    loss = ebm_update(nets, opts, x, pairs, config)
    torch.testing.assert_close(loss, want)
    assert _changed(nets.energy, before["energy"])
    assert not _changed(nets.encoder, before["encoder"])
    assert not _changed(nets.generator, before["generator"])


def test_unknown_critic_negatives_are_refused():
    with pytest.raises(ValueError, match="critic_negatives"):
        TrainConfig(critic_negatives=("noise",))


def test_trimming_weights_leave_out_the_worst_reconstructed_rows():
    x = torch.zeros(10, 3)
    x_rec = torch.arange(10.0).repeat(3, 1).T  # row i has error 3 i^2 / (2 sigma^2)
    assert objectives.trimming_weights(x, x_rec, 1.0, 0.0) is None
    weights = objectives.trimming_weights(x, x_rec, 1.0, 0.2)
    torch.testing.assert_close(weights, torch.tensor([1.25] * 8 + [0.0] * 2))  # mean 1
    values = torch.arange(10.0)
    assert objectives.weighted_mean(values, weights) == pytest.approx(3.5)


class _HalfOfABatch:
    """Rank 0's view of a 2-rank global minibatch whose other half is ``others``."""

    def __init__(self, others):
        self.others = others

    def gather(self, values):
        return torch.cat([values, self.others])

    def local(self, values):
        return values[:len(values) - len(self.others)]


def test_trimming_a_ranks_rows_leaves_out_the_worst_of_the_global_minibatch():
    x = torch.zeros(4, 1)
    x_rec = torch.tensor([[1.0], [2.0], [3.0], [4.0]])  # errors 0.5, 2, 4.5, 8
    # the other rank holds the four worst rows: none of this rank's is left out
    weights = objectives.trimming_weights(x, x_rec, 1.0, 0.5,
                                          minibatch=_HalfOfABatch(torch.full((4,), 100.0)))
    torch.testing.assert_close(weights, torch.full((4,), 2.0))
    # the other rank holds the four best: this rank's are all left out
    weights = objectives.trimming_weights(x, x_rec, 1.0, 0.5,
                                          minibatch=_HalfOfABatch(torch.zeros(4)))
    torch.testing.assert_close(weights, torch.zeros(4))


def test_trimmed_loss_ignores_the_trimmed_rows():
    """A row left out by the trimmed loss does not change the encoder/generator objective."""
    nets, _, _, x = _setup()
    nets.train(False)  # no spectral-norm power iteration between the two evaluations
    config = TrainConfig(grad_clip=None, trim_fraction=0.25)
    x = x.clone()
    x[0] = 50.0  # by far the worst reconstructed row
    x_moved = x.clone()
    x_moved[0] = 80.0
    losses = []
    for data in (x, x_moved):
        pairs = draw_pairs(nets, data, torch.Generator().manual_seed(0), config)
        assert pairs.weights[0] == 0 and (pairs.weights > 0).sum() == 12
        assert pairs.weights.mean().item() == pytest.approx(1.0)
        losses.append(encoder_generator_losses(nets, data, pairs, config)["fused"].item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    untrimmed = TrainConfig(grad_clip=None)
    pairs = draw_pairs(nets, x, torch.Generator().manual_seed(0), untrimmed)
    assert pairs.weights is None
    assert encoder_generator_losses(nets, x, pairs, untrimmed)["fused"].item() != losses[0]


def test_simultaneous_step_gives_each_network_its_own_loss_gradient_at_the_old_critic():
    nets, opts, config, x = _setup()
    nets.train(False)  # no spectral-norm power iteration: every critic call sees one weight
    reference = copy.deepcopy(nets)
    pairs = draw_pairs(reference, x, torch.Generator().manual_seed(3), config)
    critic = list(reference.energy.parameters())
    energy_data = reference.energy(x, pairs.z_q.detach())
    energy_model = reference.energy(pairs.x_p.detach(), pairs.z_p)
    want_critic = torch.autograd.grad(
        objectives.ebm_loss(energy_data, energy_model, pairs.weights), critic)
    fused = encoder_generator_losses(reference, x, pairs, config)["fused"]
    want_rest = torch.autograd.grad(fused, list(reference.encoder.parameters())
                                    + list(reference.generator.parameters()))

    simultaneous_triangle_step(nets, opts, x, config, torch.Generator().manual_seed(3))
    got_critic = [p.grad for p in nets.energy.parameters()]
    got_rest = [p.grad for p in (*nets.encoder.parameters(), *nets.generator.parameters())]
    for got, want in zip(got_critic + got_rest, list(want_critic) + list(want_rest),
                         strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for name, module in nets.named_children():
        assert _changed(module, _params(getattr(reference, name)))


def test_critic_every_k_moves_the_critic_on_every_kth_minibatch_only():
    nets, _, _, x = _setup()
    config = TrainConfig(grad_clip=None, critic_every=3)
    opts = Optimizers.create(nets, config)
    moved = []
    for _ in range(6):
        before = _params(nets.energy)
        metrics = triangle_step(nets, opts, x, config)
        moved.append(_changed(nets.energy, before))
        assert ("loss_ebm" in metrics) == moved[-1]
    assert moved == [True, False, False, True, False, False]


@pytest.mark.parametrize("options, message", [
    ({"update_order": "sideways"}, "update_order"), ({"critic_every": 0}, "critic_every"),
    ({"critic_every": 2, "update_order": "simultaneous"}, "alternating"),
    ({"training_precision": "float16"}, "training_precision")])
def test_bad_update_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**options)


def test_bfloat16_training_keeps_float32_parameters_and_finite_losses():
    nets, _, _, x = _setup()
    config = TrainConfig(training_precision="bfloat16")
    metrics = select_step(config)(nets, Optimizers.create(nets, config), x, config)
    assert all(torch.isfinite(v) for v in metrics.values())
    assert all(p.dtype == torch.float32 for _, m in nets.named_children() for p in m.parameters())
