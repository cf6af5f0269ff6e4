"""Drawing from a fitted model and filling in missing entries with it.

Both work on an :class:`~training.scorer.AnomalyScorer` (float64 networks, raw-unit rows)
and may refine latent codes by short-run Langevin dynamics on a potential U(z).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from training.scorer import AnomalyScorer

Potential = Callable[[torch.Tensor], torch.Tensor]  # (n, k) codes -> (n,) potential


def langevin(z: torch.Tensor, potential: Potential, steps: int, step_size: float,
             generator: torch.Generator, temperature: float = 1.0) -> torch.Tensor:
    """Short-run Langevin dynamics z <- z - s^2/2 grad U(z) + s sqrt(T) eps, ``steps``
    times; ``temperature`` T below 1 samples exp(-U / T), colder: towards U's minima."""
    noise_scale = step_size * math.sqrt(temperature)
    for _ in range(steps):
        z = z.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(potential(z).sum(), z)
        noise = torch.randn(z.shape, generator=generator, dtype=z.dtype)
        z = z - 0.5 * step_size**2 * grad + noise_scale * noise
    return z.detach()


def sample_rows(scorer: AnomalyScorer, n_samples: int, *, langevin_steps: int,
                step_size: float, generator: torch.Generator) -> torch.Tensor:
    """``(n_samples, n_features)`` raw rows g(z), z ~ N(0, I); with ``langevin_steps``, z
    first moves on E(g(z), z) + ||z||^2 / 2 (the triangle's joint energy and the prior)."""
    decoder, energy = scorer.generator, scorer.energy
    z = torch.randn((n_samples, scorer.encoder.mu.out_features), generator=generator,
                    dtype=scorer.shift.dtype)
    if langevin_steps:
        z = langevin(z, lambda v: energy(decoder(v), v) + 0.5 * v.pow(2).sum(1),
                     langevin_steps, step_size, generator)
    with torch.no_grad():
        return scorer.postprocess(decoder(z))


def inpaint_rows(scorer: AnomalyScorer, start: torch.Tensor, missing: torch.Tensor, *,
                 n_iter: int, langevin_steps: int, step_size: float,
                 generator: torch.Generator) -> torch.Tensor:
    """Fill the ``missing`` (bool) entries of the raw rows ``start`` ``(n, n_features)``,
    whose missing entries hold a finite first guess: ``n_iter`` rounds of encode, decode and
    replace the missing entries only. With ``langevin_steps``, each code first moves on the
    observed entries' reconstruction error + ||z||^2 / 2 + E(x, z)."""
    x = start.clone()
    for _ in range(n_iter):
        x_model = scorer.preprocess(x)
        with torch.no_grad():
            z, _ = scorer.encoder(x_model)
        if langevin_steps:
            seen = (~missing).reshape(x_model.shape).to(x_model.dtype)

            def potential(v, x_model=x_model, seen=seen):
                err = (seen * (x_model - scorer.generator(v))).pow(2).flatten(1).sum(1)
                return (0.5 * err / scorer.decoder_sigma**2 + 0.5 * v.pow(2).sum(1)
                        + scorer.energy(x_model, v))

            z = langevin(z, potential, langevin_steps, step_size, generator)
        with torch.no_grad():
            filled = scorer.postprocess(scorer.generator(z))
        x = torch.where(missing, filled, start)
    return x
