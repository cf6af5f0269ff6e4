"""Divergence-triangle and VAE losses as pure functions of tensors.

Per-sample terms return shape ``(n,)``; the step losses return scalars (batch means).
Notation follows DESIGN.md section 1: Q = q_data(x) q(z|x), P = p(z) p(x|z),
Pi ∝ exp(-E(x, z)). Constants (log 2π, log Z) are dropped: they cancel in every gradient.
"""

from __future__ import annotations

import torch


def reconstruction_nll(x: torch.Tensor, x_hat: torch.Tensor, sigma: float) -> torch.Tensor:
    """-log p(x|z) for p(x|z) = N(x_hat, sigma^2 I), per sample: ``(n,)``."""
    return 0.5 * (x - x_hat).pow(2).flatten(1).sum(1) / sigma**2


def prior_nll(z: torch.Tensor) -> torch.Tensor:
    """-log p(z) for p(z) = N(0, I), per sample: ``(n,)``."""
    return 0.5 * z.pow(2).sum(1)


def gaussian_entropy(logvar: torch.Tensor) -> torch.Tensor:
    """Entropy of N(mu, diag exp(logvar)), per sample: ``(n,)``."""
    return 0.5 * logvar.sum(1)


def kl_to_prior(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)), per sample: ``(n,)``."""
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0).sum(1)


def ebm_loss(energy_data: torch.Tensor, energy_model: torch.Tensor) -> torch.Tensor:
    """Critic step: lower the energy of data pairs (x, z_q), raise that of model pairs
    (g(z_p), z_p). Both inputs must be detached from the encoder and the generator."""
    return energy_data.mean() - energy_model.mean()


def inference_loss(
    x: torch.Tensor,
    x_rec: torch.Tensor,
    z_q: torch.Tensor,
    logvar: torch.Tensor,
    energy_data: torch.Tensor,
    sigma: float,
    variant: str = "kl_plus",
) -> torch.Tensor:
    """Encoder step.

    ``"kl_minus"`` (the authors' code): KL(Q||P) - KL(Q||Pi) = recon + ||z||^2/2 - E(x, z);
    the entropies of q cancel.
    ``"kl_plus"``: KL(Q||P) + KL(Q||Pi) = recon + ||z||^2/2 + E(x, z) - 2 H(q(z|x)).
    """
    base = reconstruction_nll(x, x_rec, sigma) + prior_nll(z_q)
    if variant == "kl_minus":
        return (base - energy_data).mean()
    if variant == "kl_plus":
        return (base + energy_data - 2.0 * gaussian_entropy(logvar)).mean()
    raise ValueError(f"unknown inference loss variant {variant!r}")


def generator_loss(
    x: torch.Tensor, x_rec: torch.Tensor, energy_model: torch.Tensor, sigma: float
) -> torch.Tensor:
    """Generator step: KL(Q||P) + KL(P||Pi) = recon(x, g(z_q)) + E(g(z_p), z_p).

    ``x_rec`` must be g(z_q) with z_q detached from the encoder.
    """
    return reconstruction_nll(x, x_rec, sigma).mean() + energy_model.mean()


def vae_loss(
    x: torch.Tensor, x_rec: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, sigma: float
) -> torch.Tensor:
    """Negative ELBO, KL(Q||P) up to a constant."""
    return (reconstruction_nll(x, x_rec, sigma) + kl_to_prior(mu, logvar)).mean()
