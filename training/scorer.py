"""The scoring graph: raw rows -> learned preprocessing -> mu(x) -> anomaly score.

One module serves the estimator and the ONNX export, so both compute the same thing.
Scoring is deterministic: it uses mu(x), never a sampled z.
"""

from __future__ import annotations

import torch
from torch import nn

from training import objectives
from training.networks import Networks

SCORE_RULES = ("energy", "joint", "reconstruction", "elbo")

# Rows per pass in scores_in_chunks: bounds the float64 activations of the conv nets.
CHUNK_ROWS = 4096


class AnomalyScorer(nn.Module):
    """Anomaly score of raw flat rows; higher = more anomalous.

    Parameters
    ----------
    networks : Networks
        Fitted networks (``energy`` may be None for the VAE ablation).
    shift, scale : Tensor of shape (n_features,)
        Preprocessing learned in fit: ``x_model = (x_raw - shift) / scale``.
    input_shape : tuple of int
        Shape of one preprocessed sample, ``(d,)`` or ``(C, H, W)``.
    rule : {"energy", "joint", "reconstruction", "elbo"}
        ``energy`` = E(x, mu); ``reconstruction`` = -log p(x | mu);
        ``joint`` = E(x, mu) - log p(x | mu) - log p(mu) (the energy term is dropped for the VAE);
        ``elbo`` = -log p(x | mu) + KL(q(z|x) || p(z)).
    decoder_sigma : float
        Standard deviation of p(x|z) used in training.
    """

    def __init__(self, networks: Networks, shift: torch.Tensor, scale: torch.Tensor,
                 input_shape: tuple[int, ...], rule: str, decoder_sigma: float) -> None:
        super().__init__()
        if rule not in SCORE_RULES:
            raise ValueError(f"score_rule must be one of {SCORE_RULES}, got {rule!r}")
        if rule == "energy" and networks.energy is None:
            raise ValueError("score_rule='energy' needs the triangle objective "
                             "(the VAE has no energy)")
        self.encoder = networks.encoder
        self.generator = networks.generator
        self.energy = networks.energy
        self.register_buffer("shift", shift.reshape(-1).clone())
        self.register_buffer("scale", scale.reshape(-1).clone())
        self.input_shape = tuple(input_shape)
        self.rule = rule
        self.decoder_sigma = float(decoder_sigma)

    @property
    def networks(self) -> Networks:
        return Networks(self.encoder, self.generator, self.energy)

    def preprocess(self, x_raw: torch.Tensor) -> torch.Tensor:
        """``(n, n_features)`` raw -> ``(n, *input_shape)`` model space."""
        return ((x_raw - self.shift) / self.scale).reshape(-1, *self.input_shape)

    def postprocess(self, x_model: torch.Tensor) -> torch.Tensor:
        """``(n, *input_shape)`` model space -> ``(n, n_features)`` raw units."""
        return x_model.flatten(1) * self.scale + self.shift

    def forward(self, x_raw: torch.Tensor) -> torch.Tensor:
        return self.scores(x_raw, (self.rule,))[self.rule]

    def scores_in_chunks(self, x_raw: torch.Tensor, rules: tuple[str, ...] = SCORE_RULES,
                         chunk_rows: int = CHUNK_ROWS) -> dict[str, torch.Tensor]:
        """:meth:`scores` of many rows, ``chunk_rows`` at a time, without autograd, so that
        memory stays bounded whatever the number of rows."""
        with torch.no_grad():
            chunks = [self.scores(x_raw[start:start + chunk_rows], rules)
                      # at least one chunk, so that no rows give empty scores, not an error
                      for start in range(0, max(x_raw.shape[0], 1), chunk_rows)]
        return {rule: torch.cat([c[rule] for c in chunks]) for rule in chunks[0]}

    def scores(self, x_raw: torch.Tensor, rules: tuple[str, ...] = SCORE_RULES
               ) -> dict[str, torch.Tensor]:
        """Anomaly scores of ``(n, n_features)`` raw rows under several rules from one pass
        through the networks; each network runs only if a requested rule needs it."""
        unknown = set(rules) - set(SCORE_RULES)
        if unknown:
            raise ValueError(f"unknown score rules {sorted(unknown)}; expected {SCORE_RULES}")
        if self.energy is None:
            rules = tuple(r for r in rules if r != "energy")
        # Preprocessing and the score's sums run in the dtype of the input and of shift/scale;
        # the networks in their own. A float32 network (the ONNX export) under float64 input
        # then loses precision only inside the networks, not in the large sums.
        x = self.preprocess(x_raw)
        x_net = x.to(self.encoder.mu.weight.dtype)
        mu_net, logvar = self.encoder(x_net)                           # (n, k) each
        mu = mu_net.to(x.dtype)
        energy = recon = None
        if self.energy is not None and {"energy", "joint"} & set(rules):
            energy = self.energy(x_net, mu_net).to(x.dtype)            # (n,)
        if {"joint", "reconstruction", "elbo"} & set(rules):
            x_hat = self.generator(mu_net).to(x.dtype)
            recon = objectives.reconstruction_nll(x, x_hat, self.decoder_sigma)
        out = {}
        for rule in rules:
            if rule == "energy":
                out[rule] = energy
            elif rule == "reconstruction":
                out[rule] = recon
            elif rule == "elbo":
                out[rule] = recon + objectives.kl_to_prior(mu, logvar.to(x.dtype))
            else:
                joint = recon + objectives.prior_nll(mu)
                out[rule] = joint if energy is None else joint + energy
        return out
