"""Typed, JSON-serialisable configuration of the networks and of training."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# Widths that measured well for each kind of input on this project's benchmarks: MLP hidden
# units for rows, first-stage channels for 28x28 conv nets.
DEFAULT_WIDTH = {"rows": 128, "image": 32}


@dataclass(frozen=True)
class NetworkConfig:
    """Shape of the encoder, generator and joint energy network.

    Parameters
    ----------
    input_shape : tuple of int
        Shape of one sample: ``(n_features,)`` selects the MLP variant, ``(C, H, W)`` the
        convolutional one (H and W divisible by ``2 ** depth``).
    latent_dim : int
        Dimension of z.
    width : int or None
        Hidden units of the MLPs; channels of the first conv stage (doubling per stage).
        None = ``DEFAULT_WIDTH`` for the input's kind (128 for rows, 32 for images).
    depth : int
        Hidden layers of the MLPs; stride-2 stages of the conv nets.
    energy_width : int or None
        Width of the energy network; None uses ``width // 2``: the critic costs as much as
        the encoder and generator together at full width, and half width measured no worse.
    energy_scale : float
        E = energy_scale * softplus(network output). Spectral normalisation bounds the
        network's slope by 1, so this scale is the largest slope the energy can have; it puts
        the critic's terms on the scale of the reconstruction term.
    spectral_norm : bool
        Spectral normalisation on every energy layer. Fitted models store the normalised
        weights as plain tensors and are rebuilt with ``spectral_norm=False``.
    """

    input_shape: tuple[int, ...]
    latent_dim: int = 32
    width: int | None = None
    depth: int = 2
    energy_width: int | None = None
    energy_scale: float = 10.0
    spectral_norm: bool = True

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.input_shape)
        object.__setattr__(self, "input_shape", shape)
        if len(shape) not in (1, 3) or min(shape) < 1:
            raise ValueError(f"input_shape must be (n_features,) or (C, H, W), got {shape}")
        if self.width is None:
            object.__setattr__(self, "width", DEFAULT_WIDTH["image" if self.is_image
                                                            else "rows"])
        for name in ("latent_dim", "width", "depth"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not self.energy_scale > 0:
            raise ValueError(f"energy_scale must be positive, got {self.energy_scale}")
        if self.is_image:
            step = 2**self.depth
            if shape[1] % step or shape[2] % step:
                raise ValueError(
                    f"image height and width must be divisible by 2**depth = {step}, "
                    f"got {shape[1]}x{shape[2]}"
                )

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3

    @property
    def resolved_energy_width(self) -> int:
        return max(self.width // 2, 1) if self.energy_width is None else self.energy_width

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NetworkConfig:
        return cls(**{**data, "input_shape": tuple(data["input_shape"])})


# Pairs the critic pushes up besides the generator's (see training.loop.extra_negatives).
CRITIC_NEGATIVES = ("mismatch", "wide", "suspect")
UPDATE_ORDERS = ("alternating", "simultaneous")
PRECISIONS = ("float32", "bfloat16")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; defaults follow the authors' released code where it is known.

    ``objective`` is ``"triangle"`` (divergence triangle) or ``"vae"`` (the plain VAE ablation).
    ``inference_loss`` is ``"kl_plus"`` (phi minimises KL(Q||P) + KL(Q||Pi)) or ``"kl_minus"``
    (the authors' KL(Q||P) - KL(Q||Pi)). ``decoder_sigma`` is the standard deviation of
    p(x|z) in preprocessed units; it weights reconstruction against the latent terms.
    ``max_training_seconds`` ends training after the first minibatch that finishes past this
    wall time (the last epoch is then partial). ``critic_negatives`` names extra pairs the critic
    pushes up besides the generator's: any of ``CRITIC_NEGATIVES``. ``trim_fraction`` of each
    minibatch's rows, those reconstructed worst, are left out of every loss's data terms.
    ``update_order`` is ``"alternating"`` (the authors' order: the critic, then the encoder and
    generator against the updated critic) or ``"simultaneous"`` (one critic pass, all three
    stepped together); ``critic_every`` = k updates the critic on every k-th minibatch only
    (alternating order). ``training_precision`` ``"bfloat16"`` runs the forward passes under
    bfloat16 autocast (parameters and optimiser state stay float32).
    ``model_pairs_fraction`` sets how many model pairs (g(z_p), z_p) each minibatch draws, as
    a fraction of its rows (at least one): the generator's second pass and the critic's
    passes over those pairs are most of what the triangle adds to a VAE step.
    """

    objective: str = "triangle"
    inference_loss: str = "kl_plus"
    epochs: int = 100
    batch_size: int = 64
    ebm_learning_rate: float = 1e-4
    learning_rate: float = 3e-4
    weight_decay: float = 1e-4
    lr_decay: float = 0.998
    betas: tuple[float, float] = (0.0, 0.9)
    grad_clip: float | None = 100.0
    decoder_sigma: float = 0.1
    max_rollbacks: int = 3
    max_training_seconds: float | None = None
    critic_negatives: tuple[str, ...] = ()
    trim_fraction: float = 0.0
    update_order: str = "alternating"
    critic_every: int = 1
    training_precision: str = "float32"
    model_pairs_fraction: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        negatives = self.critic_negatives
        object.__setattr__(self, "critic_negatives",
                           (negatives,) if isinstance(negatives, str) else tuple(negatives))
        unknown = set(self.critic_negatives) - set(CRITIC_NEGATIVES)
        if unknown:
            raise ValueError(f"critic_negatives must be drawn from {CRITIC_NEGATIVES}, "
                             f"got {sorted(unknown)}")
        if self.objective not in ("triangle", "vae"):
            raise ValueError(f"objective must be 'triangle' or 'vae', got {self.objective!r}")
        if self.inference_loss not in ("kl_plus", "kl_minus"):
            raise ValueError(
                f"inference_loss must be 'kl_plus' or 'kl_minus', got {self.inference_loss!r}"
            )
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be positive")
        if self.max_training_seconds is not None and self.max_training_seconds <= 0:
            raise ValueError(f"max_training_seconds must be positive, got "
                             f"{self.max_training_seconds}")
        if not 0.0 <= self.trim_fraction < 1.0:
            raise ValueError(f"trim_fraction must be in [0, 1), got {self.trim_fraction}")
        if self.update_order not in UPDATE_ORDERS:
            raise ValueError(f"update_order must be one of {UPDATE_ORDERS}, got "
                             f"{self.update_order!r}")
        if isinstance(self.critic_every, bool) or int(self.critic_every) != self.critic_every \
                or self.critic_every < 1:
            raise ValueError(f"critic_every must be a positive integer, got {self.critic_every!r}")
        if self.critic_every > 1 and self.update_order != "alternating":
            raise ValueError("critic_every > 1 needs update_order='alternating'")
        if not 0.0 < self.model_pairs_fraction <= 1.0:
            raise ValueError(f"model_pairs_fraction must be in (0, 1], got "
                             f"{self.model_pairs_fraction!r}")
        if self.training_precision not in PRECISIONS:
            raise ValueError(f"training_precision must be one of {PRECISIONS}, got "
                             f"{self.training_precision!r}")
        if self.decoder_sigma <= 0:
            raise ValueError(f"decoder_sigma must be positive, got {self.decoder_sigma}")
