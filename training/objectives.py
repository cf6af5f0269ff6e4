"""Divergence-triangle and VAE losses as pure functions of tensors.

Per-sample terms return shape ``(n,)``; the step losses return scalars (batch means).
Notation follows docs/design.md section 1: Q = q_data(x) q(z|x), P = p(z) p(x|z),
Pi ∝ exp(-E(x, z)). Constants (log 2π, log Z) are dropped: they cancel in every gradient.
"""

from __future__ import annotations

import torch


def reconstruction_nll(x: torch.Tensor, x_hat: torch.Tensor, sigma: float,
                       observed: torch.Tensor | None = None) -> torch.Tensor:
    """-log p(x|z) for p(x|z) = N(x_hat, sigma^2 I), per sample: ``(n,)``.

    ``observed`` (bool, shape of ``x``) restricts the sum to the observed entries: the
    likelihood of what was seen, whatever ``x`` holds where nothing was."""
    residual = x - x_hat
    if observed is not None:
        residual = torch.where(observed, residual, torch.zeros_like(residual))
    return 0.5 * residual.pow(2).flatten(1).sum(1) / sigma**2


def prior_nll(z: torch.Tensor) -> torch.Tensor:
    """-log p(z) for p(z) = N(0, I), per sample: ``(n,)``."""
    return 0.5 * z.pow(2).sum(1)


def gaussian_entropy(logvar: torch.Tensor) -> torch.Tensor:
    """Entropy of N(mu, diag exp(logvar)), per sample: ``(n,)``."""
    return 0.5 * logvar.sum(1)


def kl_to_prior(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)), per sample: ``(n,)``."""
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0).sum(1)


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-sample ``values`` ``(n,)``, each multiplied by its weight ``(n,)`` when
    given. Weights of mean 1 make it a weighted average; they are not renormalised here, so
    that parts of one minibatch (data-parallel ranks) averaged together give the whole
    minibatch's value."""
    if weights is None:
        return values.mean()
    return (values * weights).mean()


def ebm_loss(energy_data: torch.Tensor, energy_model: torch.Tensor,
             weights: torch.Tensor | None = None) -> torch.Tensor:
    """Critic step: lower the energy of data pairs (x, z_q), raise that of model pairs
    (g(z_p), z_p). Both inputs must be detached from the encoder and the generator.
    ``weights`` ``(n,)`` weight the data pairs (see :func:`trimming_weights`)."""
    return weighted_mean(energy_data, weights) - energy_model.mean()


def inference_loss(
    x: torch.Tensor,
    x_rec: torch.Tensor,
    z_q: torch.Tensor,
    logvar: torch.Tensor,
    energy_data: torch.Tensor,
    sigma: float,
    variant: str = "kl_plus",
    weights: torch.Tensor | None = None,
    observed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Encoder step.

    ``"kl_minus"`` (the authors' code): KL(Q||P) - KL(Q||Pi) = recon + ||z||^2/2 - E(x, z);
    the entropies of q cancel.
    ``"kl_plus"``: KL(Q||P) + KL(Q||Pi) = recon + ||z||^2/2 + E(x, z) - 2 H(q(z|x)).

    With ``observed``, a row that misses any entry takes KL(Q||P) alone (the negative ELBO
    of its observed entries, recon + ||z||^2/2 - H(q(z|x))): its missing entries hold the
    model's own completion, so the critic's energy of the row judges the model's fill as
    much as the data, and its pull on the code is circular. Measured: on tables with 30% of
    cells missing the encoder's KL(Q||Pi) term cost 0.014 AUROC, the generator's energy term
    nothing (README, missing values).
    """
    base = reconstruction_nll(x, x_rec, sigma, observed) + prior_nll(z_q)
    if variant == "kl_minus":
        per_row = base - energy_data
    elif variant == "kl_plus":
        per_row = base + energy_data - 2.0 * gaussian_entropy(logvar)
    else:
        raise ValueError(f"unknown inference loss variant {variant!r}")
    if observed is not None:
        incomplete = ~observed.flatten(1).all(1)
        per_row = torch.where(incomplete, base - gaussian_entropy(logvar), per_row)
    return weighted_mean(per_row, weights)


def generator_loss(
    x: torch.Tensor, x_rec: torch.Tensor, energy_model: torch.Tensor, sigma: float
) -> torch.Tensor:
    """Generator step: KL(Q||P) + KL(P||Pi) = recon(x, g(z_q)) + E(g(z_p), z_p).

    ``x_rec`` must be g(z_q) with z_q detached from the encoder.
    """
    return reconstruction_nll(x, x_rec, sigma).mean() + energy_model.mean()


def vae_loss(
    x: torch.Tensor, x_rec: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, sigma: float,
    weights: torch.Tensor | None = None, observed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Negative ELBO, KL(Q||P) up to a constant (of the observed entries, with
    ``observed``)."""
    return weighted_mean(reconstruction_nll(x, x_rec, sigma, observed) + kl_to_prior(mu, logvar),
                         weights)


def trimming_weights(x: torch.Tensor, x_rec: torch.Tensor, sigma: float, fraction: float,
                     observed: torch.Tensor | None = None, minibatch=None
                     ) -> torch.Tensor | None:
    """Weights ``(n,)`` that leave out the ``fraction`` of rows reconstructed worst (weight
    0) and give the others ``n / kept`` (so the weights average 1), or None for
    ``fraction == 0``. With ``observed``, rows are ranked by their error per observed entry,
    so that a row is not kept for having few entries. With ``minibatch`` (a
    :class:`training.distributed.GlobalMinibatch`: these rows are one rank's part of a global
    minibatch) the rows left out are the worst of the whole global minibatch.

    Unsupervised training data hold some anomalies; a trimmed loss (the least-trimmed-squares
    idea) keeps the model from learning to reconstruct them, so they keep their high scores.
    """
    if fraction <= 0:
        return None
    with torch.no_grad():
        errors = reconstruction_nll(x, x_rec, sigma, observed)
        if observed is not None:
            errors = errors / observed.flatten(1).sum(1).clamp_min(1)
        if minibatch is not None:
            errors = minibatch.gather(errors)
        n_kept = max(1, round((1.0 - fraction) * errors.shape[0]))
        kept = torch.topk(errors, n_kept, largest=False).indices
        weights = torch.zeros_like(errors)
        weights[kept] = errors.shape[0] / n_kept
    return weights if minibatch is None else minibatch.local(weights)
