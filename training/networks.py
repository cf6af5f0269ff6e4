"""Encoder q(z|x), generator g(z) and joint energy E(x, z), in MLP and conv variants.

All networks take preprocessed inputs: flat vectors ``(n, d)`` for the MLP variant and
images ``(n, C, H, W)`` for the conv variant. Each conv stage halves H and W.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm
from torch.nn.utils.parametrize import is_parametrized, remove_parametrizations

from training.config import NetworkConfig

_SLOPE = 0.2
# Upper bound of the encoder's log-variance, approached smoothly. A posterior variance of
# e^10 is far wider than the prior's 1, so no fit that trains wants it; without a bound one
# extreme training row can drive the linear head to logvar ~ 94, where exp(logvar) in the
# VAE's KL term overflows float32 and training diverges (ADBench smtp, 2 of 6 seeds).
LOGVAR_MAX = 10.0


def _act() -> nn.Module:
    return nn.LeakyReLU(_SLOPE)


def _mlp(sizes: list[int]) -> list[nn.Module]:
    """Linear layers with activations between them and after the last one."""
    layers: list[nn.Module] = []
    for n_in, n_out in itertools.pairwise(sizes):
        layers += [nn.Linear(n_in, n_out), _act()]
    return layers


def _conv_down(channels: list[int]) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for c_in, c_out in itertools.pairwise(channels):
        layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), _act()]
    return layers


def _stage_channels(config: NetworkConfig, width: int) -> list[int]:
    return [config.input_shape[0]] + [width * 2**i for i in range(config.depth)]


def _feature_map(config: NetworkConfig, width: int) -> tuple[int, int, int]:
    _channels, height, width_px = config.input_shape
    step = 2**config.depth
    return width * 2 ** (config.depth - 1), height // step, width_px // step


class Encoder(nn.Module):
    """x -> (mu, logvar), each ``(n, latent_dim)``."""

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        if config.is_image:
            c, h, w = _feature_map(config, config.width)
            self.body = nn.Sequential(*_conv_down(_stage_channels(config, config.width)),
                                      nn.Flatten())
            n_hidden = c * h * w
        else:
            sizes = [config.input_shape[0]] + [config.width] * config.depth
            self.body = nn.Sequential(*_mlp(sizes))
            n_hidden = sizes[-1]
        self.mu = nn.Linear(n_hidden, config.latent_dim)
        self.logvar = nn.Linear(n_hidden, config.latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        # A soft ceiling keeps a gradient that brings logvar back; below about 0 it moves
        # logvar by less than e^-10.
        logvar = LOGVAR_MAX - nn.functional.softplus(LOGVAR_MAX - self.logvar(h))
        return self.mu(h), logvar


class Generator(nn.Module):
    """z ``(n, latent_dim)`` -> x; images end in tanh because they are scaled to [-1, 1]."""

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        if config.is_image:
            c, h, w = _feature_map(config, config.width)
            channels = _stage_channels(config, config.width)[::-1]
            layers: list[nn.Module] = [nn.Linear(config.latent_dim, c * h * w), _act(),
                                       nn.Unflatten(1, (c, h, w))]
            for c_in, c_out in itertools.pairwise(channels):
                layers += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), _act()]
            layers[-1] = nn.Tanh()
        else:
            sizes = [config.latent_dim] + [config.width] * config.depth
            layers = [*_mlp(sizes), nn.Linear(sizes[-1], config.input_shape[0])]
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(z)


class JointEnergy(nn.Module):
    """E(x, z) = scale * softplus(head([h_x(x), h_z(z)])), shape ``(n,)``; low = likely pair."""

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        width = config.resolved_energy_width
        if config.is_image:
            c, h, w = _feature_map(config, width)
            self.x_branch = nn.Sequential(*_conv_down(_stage_channels(config, width)),
                                          nn.Flatten(), nn.Linear(c * h * w, width), _act())
        else:
            sizes = [config.input_shape[0]] + [width] * config.depth
            self.x_branch = nn.Sequential(*_mlp(sizes))
        self.z_branch = nn.Sequential(*_mlp([config.latent_dim, width, width]))
        self.head = nn.Sequential(*_mlp([2 * width, width]), nn.Linear(width, 1))
        self.scale = float(config.energy_scale)
        if config.spectral_norm:
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Conv2d)):
                    _spectral_norm(module)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.from_x_features(self.x_branch(x), z)

    def from_x_features(self, h_x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The energy from ``h_x = x_branch(x)`` ``(n, width)``, so callers can run the
        x-branch of different rows under different autograd modes."""
        h = torch.cat([h_x, self.z_branch(z)], dim=1)
        return self.scale * nn.functional.softplus(self.head(h)).squeeze(1)


class Networks(nn.Module):
    """The three networks of one model; ``energy`` is None for the plain VAE.

    A module, so that moving, mode switches and state dicts (keys ``encoder.*``,
    ``generator.*``, ``energy.*``) cover all three at once.
    """

    def __init__(self, encoder: Encoder, generator: Generator,
                 energy: JointEnergy | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.generator = generator
        self.energy = energy

    def freeze_spectral_norm(self) -> None:
        """Replace spectral-norm parametrisations by the normalised weights they produce.

        Done once after training, in eval mode (no power iteration), so that the fitted model
        is made of plain layers: deterministic, exportable and loadable without the
        parametrisation's buffers.
        """
        if self.energy is None:
            return
        self.energy.eval()
        with torch.no_grad():
            for module in self.energy.modules():
                if is_parametrized(module, "weight"):
                    remove_parametrizations(module, "weight", leave_parametrized=True)


def build_networks(config: NetworkConfig, with_energy: bool = True) -> Networks:
    """Fresh, randomly initialised networks (initialisation draws from torch's global RNG)."""
    return Networks(
        encoder=Encoder(config),
        generator=Generator(config),
        energy=JointEnergy(config) if with_energy else None,
    )
