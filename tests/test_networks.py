import pytest
import torch
from torch import nn
from torch.nn.utils.parametrize import is_parametrized

from training import NetworkConfig, build_networks
from training.networks import LOGVAR_MAX
from training.objectives import kl_to_prior


@pytest.mark.parametrize("shape", [(7,), (1, 28, 28), (3, 32, 32), (2, 12, 20)])
def test_shapes(shape):
    config = NetworkConfig(input_shape=shape, latent_dim=3, width=4, depth=2)
    nets = build_networks(config)
    x = torch.randn(5, *shape)
    mu, logvar = nets.encoder(x)
    assert mu.shape == logvar.shape == (5, 3)
    assert nets.generator(mu).shape == x.shape
    energy = nets.energy(x, mu)
    assert energy.shape == (5,)
    assert (energy >= 0).all()  # softplus


def test_image_side_must_divide():
    with pytest.raises(ValueError, match="divisible"):
        NetworkConfig(input_shape=(1, 30, 30), depth=2)


def test_spectral_norm_on_every_energy_layer_and_freeze():
    config = NetworkConfig(input_shape=(1, 8, 8), width=4, depth=2)
    nets = build_networks(config)
    layers = [m for m in nets.energy.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert layers and all(is_parametrized(m, "weight") for m in layers)
    x, z = torch.randn(4, 1, 8, 8), torch.randn(4, config.latent_dim)
    nets.energy.eval()
    before = nets.energy(x, z)
    nets.freeze_spectral_norm()
    assert not any(is_parametrized(m) for m in layers)
    torch.testing.assert_close(nets.energy(x, z), before)
    # the frozen weights are the normalised ones: largest singular value 1
    linear = next(m for m in layers if isinstance(m, nn.Linear))
    sigma_max = torch.linalg.matrix_norm(linear.weight.detach(), ord=2).item()
    assert sigma_max == pytest.approx(1.0, rel=0.05)


def test_energy_scale_multiplies_the_energy():
    torch.manual_seed(0)
    base = build_networks(NetworkConfig(input_shape=(5,), width=4, depth=1, energy_scale=1.0))
    torch.manual_seed(0)
    scaled = build_networks(NetworkConfig(input_shape=(5,), width=4, depth=1, energy_scale=7.0))
    base.energy.eval()
    scaled.energy.eval()
    x, z = torch.randn(3, 5), torch.randn(3, base.encoder.mu.out_features)
    torch.testing.assert_close(scaled.energy(x, z), 7.0 * base.energy(x, z))
    with pytest.raises(ValueError, match="energy_scale"):
        NetworkConfig(input_shape=(5,), energy_scale=0.0)


@pytest.mark.parametrize("with_energy", [True, False])
def test_networks_is_one_module_over_its_three_parts(with_energy):
    nets = build_networks(NetworkConfig(input_shape=(6,), latent_dim=2, width=8),
                          with_energy=with_energy)
    parts = ["encoder", "generator"] + (["energy"] if with_energy else [])
    assert [name for name, _ in nets.named_children()] == parts
    # saved weights and checkpoints rely on these keys
    assert {key.split(".", 1)[0] for key in nets.state_dict()} == set(parts)
    nets.to(torch.float64).eval()
    modules = [getattr(nets, name) for name in parts]
    assert all(p.dtype == torch.float64 for m in modules for p in m.parameters())
    assert not any(m.training for m in modules)
    moved = sum(p.numel() for m in modules for p in m.parameters())
    assert sum(p.numel() for p in nets.parameters()) == moved


def test_encoder_log_variance_has_a_soft_ceiling():
    """An extreme row must not give a log-variance whose exp overflows the VAE's KL (smtp
    diverged so); ordinary rows keep the head's value, and the ceiling keeps a gradient."""
    torch.manual_seed(0)
    nets = build_networks(NetworkConfig(input_shape=(3,), latent_dim=2, width=8, depth=2))
    x = torch.randn(4, 3)
    raw = nets.encoder.logvar(nets.encoder.body(x))
    torch.testing.assert_close(nets.encoder(x)[1], raw, atol=1e-3, rtol=0)
    extreme = 1e4 * torch.ones(1, 3)
    raw_extreme = nets.encoder.logvar(nets.encoder.body(extreme))
    assert raw_extreme.max() > 100  # exp() of this overflows float32
    mu, logvar = nets.encoder(extreme)
    assert logvar.max() <= LOGVAR_MAX
    assert torch.isfinite(kl_to_prior(mu, logvar)).all()
    logvar.sum().backward()
    assert nets.encoder.logvar.weight.grad.abs().sum() > 0
