"""The scoring graph: raw rows -> learned preprocessing -> mu(x) -> anomaly score.

One module serves the estimator and the ONNX export, so both compute the same thing.
Scoring is deterministic: it uses mu(x), never a sampled z.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from training import objectives
from training.networks import Networks

SCORE_RULES = ("fused", "energy", "joint", "reconstruction", "elbo", "latent_knn", "latent_lof",
               "latent_fused", "latent_mahalanobis", "global_fused")
# Rules whose median and interquartile range on the bank's training rows calibrate() keeps,
# in the order of the buffers fusion_center and fusion_spread, so that the fused rules can
# add them up in comparable units.
STANDARDISED_RULES = ("reconstruction", "latent_knn", "energy", "latent_lof", "latent_mahalanobis")
# The rules that "fused" adds up; "energy" only where the model has a critic.
FUSED_RULES = ("reconstruction", "latent_knn", "energy")
# The rules that "latent_fused" adds up: how far a code is from the bank's (latent_knn) and
# how much sparser its neighbourhood is than its neighbours' own (latent_lof). Neither
# alone wins on both a small bank (load_digits, ~1,400 codes, where the distance is ahead)
# and a large one (MNIST, 50,000 codes, where the ratio is far ahead; docs/what-we-tried.md,
# ninth round).
LATENT_FUSED_RULES = ("latent_knn", "latent_lof")
# The rules that "global_fused" adds up: "fused" with the code's robust distance to the
# bulk of the bank's codes in place of its distance to its nearest codes. Anomalies in
# unlabelled training rows are each other's nearest codes, but they stay outside the bulk
# that a robust covariance keeps (docs/what-we-tried.md, eleventh round).
GLOBAL_FUSED_RULES = ("reconstruction", "latent_mahalanobis", "energy")
# Each summed rule and the standardised rules it adds up.
SUMMED_RULES = {"fused": FUSED_RULES, "latent_fused": LATENT_FUSED_RULES,
                "global_fused": GLOBAL_FUSED_RULES}
# Rules that need the bank of training codes, and through it a call of calibrate().
BANK_RULES = ("fused", "latent_knn", "latent_lof", "latent_fused", "latent_mahalanobis",
              "global_fused")
# The bank rules that search the bank for each row's nearest codes, whose (rows x bank codes)
# distance block bounds how many rows one pass may score; latent_mahalanobis needs none.
NEIGHBOUR_RULES = tuple(rule for rule in BANK_RULES
                        if {rule, *SUMMED_RULES.get(rule, ())} & {"latent_knn", "latent_lof"})

# Rows per pass in scores_in_chunks: bounds the float64 activations of the conv nets.
CHUNK_ROWS = 4096
# Most entries of one (rows x bank codes) float64 distance block (256 MiB): scoring against a
# large bank runs in fewer rows at a time.
DISTANCE_BLOCK = 2**25
# Buffers that keep float64 when the networks go to float32 (save, ONNX export): the
# preprocessing and the score's calibration, statistics computed by the float64 scorer.
# The calibration of scores by missing rate (see calibrate_missing_rates).
MISSING_BUFFERS = ("missing_rates", "missing_quantiles")
# The bank's own neighbourhoods, which latent_lof compares a code's with (see calibrate).
BANK_NEIGHBOURHOOD_BUFFERS = ("bank_k_distance", "bank_density")
# The robust location and inverse covariance of the bank's codes (latent_mahalanobis).
CODE_DISTRIBUTION_BUFFERS = ("code_location", "code_precision")
FLOAT64_BUFFERS = ("shift", "scale", "code_bank", *BANK_NEIGHBOURHOOD_BUFFERS,
                   *CODE_DISTRIBUTION_BUFFERS,
                   "fusion_center", "fusion_spread",
                   "calibration_scores", *MISSING_BUFFERS)
# Most calibration scores a model keeps for conformal p-values (a seeded random subset
# beyond): any exchangeable subset keeps the guarantee; this bounds the graph's comparisons.
CALIBRATION_ROWS = 10_000
# Neighbours of the latent_knn rule (the usual k of kNN detectors, PyOD's default).
N_NEIGHBORS = 5
# Neighbours of the latent_lof rule: the MNIST screen found 5 and 10 level, and 3, 20
# (scikit-learn's default) and 50 worse (docs/what-we-tried.md, seventh round); of the two
# level choices, 10 averages each density over more codes.
LOF_NEIGHBORS = 10
# Share of the bank's codes whose covariance the minimum covariance determinant estimates
# (latent_mahalanobis): the rest may be anomalies of unlabelled training rows. The first
# value screened; 0.5 (scikit-learn's default for these sizes) and 0.9 ranked worse (README,
# eleventh round).
MCD_SUPPORT_FRACTION = 0.75
# Most bank codes the covariance is estimated from (a seeded random subset beyond): the
# estimate's cost grows with the rows, its accuracy barely beyond a few thousand.
MCD_ROWS = 10_000
# Added to a mean reachability distance before it is inverted, as scikit-learn does, so that
# duplicated codes give a large but finite density.
DENSITY_EPS = 1e-10
# Attribution: the share of features treated as suspect and replaced by the model's own
# reconstruction before re-encoding, and how many such rounds (see feature_scores).
SUSPECT_FRACTION = 0.1
ATTRIBUTION_ROUNDS = 2
# Encode-decode rounds that fill the missing entries of a row before it is scored (from the
# training mean, 0 in model space): the scoring-time form of training's alternating
# inpainting (a few rounds, like the attribution's re-encoding; not tuned).
MISSING_ROUNDS = 3
# Missing rates at which calibrate_missing_rates measures each rule's score quantiles on
# normal rows with entries removed at random, and the most rows it uses per rate.
CALIBRATION_MISSING_RATES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# Quantile levels of each rule's scores at each missing rate: the map from a rate's scores
# onto complete rows' is piecewise linear between them (tails included, where thresholds
# sit; a median-and-IQR map left normal rows with half their entries missing flagged a
# quarter less often than complete ones at alpha = 0.05 on load_digits).
MISSING_QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
# Rows per rate: more are subsampled; fewer are repeated, each copy with its own entries
# removed, so that the map's tail quantiles do not rest on a single draw per row.
MISSING_CALIBRATION_ROWS = 2000
# Least share of those rows that must reach a rate (not missing more already) for the rate
# to be calibrated: fewer would leave its tail quantiles on a handful of rows.
MIN_SHARE_REACHING_A_RATE = 0.2
# Fractional parts of the golden and plastic ratios: multiples of them spread evenly over
# [0, 1) (a low-discrepancy sequence), so no two entries share a weight or an offset.
GOLDEN_RATIO_FRACTION = 0.6180339887498949
PLASTIC_RATIO_FRACTION = 0.3247179572447460


def conformal_p_values(calibration_scores: torch.Tensor, anomaly: torch.Tensor) -> torch.Tensor:
    """Split-conformal p-value of each anomaly score ``(n,)`` against the calibration scores
    ``(n_calibration,)``: (1 + the number at least as large) / (n_calibration + 1); NaN
    without calibration scores."""
    n_calibration = calibration_scores.shape[0]
    if n_calibration == 0:
        return torch.full_like(anomaly, torch.nan)
    # (n, n_calibration) comparisons and a sum: ONNX has no searchsorted.
    at_least = (calibration_scores >= anomaly[:, None]).sum(1).to(anomaly.dtype)
    return (1.0 + at_least) / (n_calibration + 1)


def _median_and_spread(scores: torch.Tensor) -> tuple[float, float]:
    """Median and interquartile range of ``scores`` ``(n,)``; a rule that is constant on the
    training rows gets unit spread rather than an infinite weight."""
    q1, median, q3 = torch.quantile(scores, torch.tensor([0.25, 0.5, 0.75], dtype=scores.dtype))
    iqr = float(q3 - q1)
    return float(median), (iqr if iqr > 1e-12 * max(1.0, abs(float(median))) else 1.0)


def _row_priorities(x_raw: torch.Tensor) -> torch.Tensor:
    """A number in [0, 1) per entry of each raw row ``(n, n_features)``, uniform-looking and
    unrelated across entries and rows, but a function of the row's observed values only (a
    hash: no random state, so scores are reproducible and the ONNX graph draws the same).
    The values are rounded to float32 first, the precision the ONNX graph takes them in,
    and squashed so that any magnitude gives a moderate argument to ``sin``."""
    values = torch.nan_to_num(x_raw.to(torch.float32).to(torch.float64), nan=0.0)
    # constants built in Python, so that the graph holds them in float64 (an exported
    # arange would be float32 arithmetic, and this hash magnifies any difference)
    index = range(1, values.shape[1] + 1)
    weight = torch.tensor([1.0 + j * GOLDEN_RATIO_FRACTION % 1.0 for j in index],
                          dtype=torch.float64)                               # (d,) in [1, 2)
    offset = torch.tensor([2.0 * math.pi * (j * PLASTIC_RATIO_FRACTION % 1.0) for j in index],
                          dtype=torch.float64)                               # (d,)
    seed = torch.tanh(values) @ weight + (values / (1.0 + values.abs())).sum(1)  # (n,)
    # a multiplier exact in float32: the exporter writes Python scalars as float32 constants
    return torch.frac(torch.sin(seed[:, None] * weight + offset).abs() * 43758.5)


def _hide_in_priority_order(rows: torch.Tensor, missing: torch.Tensor, priority: torch.Tensor,
                            count: torch.Tensor) -> torch.Tensor:
    """``rows`` ``(n, d)`` with ``count`` ``(n,)`` more entries set to NaN: the observed ones
    (``~missing``) of lowest ``priority`` (values in [0, 1))."""
    rank = priority.masked_fill(missing, 2.0).argsort(1).argsort(1).to(count.dtype)
    hidden = (rank < count[:, None]) & ~missing
    return torch.where(hidden, torch.full_like(rows, torch.nan), rows)


def _quantile_map(value: torch.Tensor, quantiles: torch.Tensor, reference: torch.Tensor
                  ) -> torch.Tensor:
    """Each ``value`` ``(n,)`` moved from its row's quantiles ``(n, Q)`` to the same levels of
    ``reference`` ``(Q,)``: piecewise linear, the end segments extended beyond the extremes
    (so the order of values far out is kept); a segment of zero width maps with slope 1."""
    segment = (quantiles[:, 1:-1] <= value[:, None]).sum(1)                # (n,) in [0, Q-2]
    low = quantiles.gather(1, segment[:, None]).squeeze(1)
    high = quantiles.gather(1, (segment + 1)[:, None]).squeeze(1)
    reference_low, reference_high = reference[segment], reference[segment + 1]
    width = high - low
    slope = torch.where(width > 0, (reference_high - reference_low)
                        / width.clamp_min(torch.finfo(value.dtype).tiny),
                        torch.ones_like(width))
    return reference_low + (value - low) * slope


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
    rule : {"fused", "energy", "joint", "reconstruction", "elbo", "latent_knn", "latent_lof", \
            "latent_fused", "latent_mahalanobis", "global_fused"}
        ``energy`` = E(x, mu); ``reconstruction`` = -log p(x | mu);
        ``joint`` = E(x, mu) - log p(x | mu) - log p(mu) (the energy term is dropped for the VAE);
        ``elbo`` = -log p(x | mu) + KL(q(z|x) || p(z));
        ``latent_knn`` = mean distance from mu(x) to its ``N_NEIGHBORS`` nearest codes in
        ``code_bank`` (the aggregate posterior's density, which the prior N(0, I) of ``joint``
        does not describe);
        ``latent_lof`` = the local outlier factor of mu(x) among the bank's codes
        (Breunig et al., 2000): its mean reachability distance to its ``LOF_NEIGHBORS``
        nearest codes times their mean local density, so that a code counts as far only
        relative to how spread its neighbours' own neighbourhoods are (a held-out class that
        sits between dense and loose classes is then found where a plain distance is not);
        ``fused`` = the sum over ``FUSED_RULES`` of max(0, (score - fusion_center) /
        fusion_spread): each rule in the units of its own spread on training data, so that
        none drowns the others by scale alone, and counted only where it says "more anomalous
        than the typical training row". A rule that finds a sample unusually *normal* (the
        reconstruction of a simple digit, an energy inverted on some data) then cannot cancel
        another rule's evidence against it;
        ``latent_fused`` = the same sum over ``LATENT_FUSED_RULES`` (latent_knn and
        latent_lof): a code counts as anomalous when it is far from the training codes or
        in a neighbourhood sparser than its neighbours' own;
        ``latent_mahalanobis`` = the squared Mahalanobis distance of mu(x) from the robust
        location of the bank's codes, under their robust covariance (the minimum covariance
        determinant of ``MCD_SUPPORT_FRACTION`` of them): a global density of the codes that
        the anomalies among unlabelled training rows do not shape, unlike a neighbour
        distance, for which they are each other's neighbours;
        ``global_fused`` = the sum over ``GLOBAL_FUSED_RULES`` (reconstruction,
        latent_mahalanobis, energy), standardised and cut as ``fused``.
    decoder_sigma : float
        Standard deviation of p(x|z) used in training.
    code_bank : Tensor of shape (n_bank, latent_dim) or None
        Posterior means of training rows, set by :meth:`calibrate`, which also sets the
        buffers ``bank_k_distance`` and ``bank_density`` ``(n_bank,)``: each bank code's
        distance to its ``LOF_NEIGHBORS``-th nearest other code and its local reachability
        density (computed from ``code_bank`` by :meth:`set_bank_neighbourhoods`), and the
        buffers ``code_location`` ``(latent_dim,)`` and ``code_precision``
        ``(latent_dim, latent_dim)`` of latent_mahalanobis (:meth:`set_code_distribution`).
    fusion_center, fusion_spread : Tensor of shape (len(STANDARDISED_RULES),) or None
        Median and interquartile range of each of ``STANDARDISED_RULES`` on the bank's
        training rows, set by :meth:`calibrate` (an absent energy gets center 0 and spread 1
        and is left out). Models saved before ``latent_lof`` was standardised hold fewer;
        :meth:`standardise_added_rules` completes them from the bank.
    calibration_scores : Tensor of shape (n_calibration,) or None
        Sorted anomaly scores of normal rows the networks were not trained on, for
        :meth:`p_values` (set by the estimator's ``calibrate``).
    allows_missing : bool
        Whether rows may hold NaN (missing entries): they are completed by the model
        (:meth:`complete`) and scored on what was observed (see :meth:`scores`). A scorer
        that does not allow them gives such rows NaN scores; its callers refuse them.

    The buffers ``missing_rates`` ``(n_rates,)`` and ``missing_quantiles``
    ``(n_rates, len(MISSING_QUANTILES), len(SCORE_RULES))`` (empty until
    :meth:`calibrate_missing_rates`) hold each rule's score quantiles on normal rows at each
    missing rate.
    """

    def __init__(self, networks: Networks, shift: torch.Tensor, scale: torch.Tensor,
                 input_shape: tuple[int, ...], rule: str, decoder_sigma: float,
                 code_bank: torch.Tensor | None = None,
                 fusion_center: torch.Tensor | None = None,
                 fusion_spread: torch.Tensor | None = None,
                 calibration_scores: torch.Tensor | None = None,
                 allows_missing: bool = False) -> None:
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
        self.allows_missing = bool(allows_missing)
        k = networks.encoder.mu.out_features
        n_fused = len(STANDARDISED_RULES)
        # Empty until calibrate(); buffers, so that they are saved and exported with the weights.
        self.register_buffer("code_bank", torch.zeros(0, k, dtype=shift.dtype)
                             if code_bank is None else code_bank.clone())
        self.register_buffer("bank_k_distance", torch.zeros(0, dtype=shift.dtype))
        self.register_buffer("bank_density", torch.zeros(0, dtype=shift.dtype))
        self.register_buffer("code_location", torch.zeros(k, dtype=shift.dtype))
        self.register_buffer("code_precision", torch.zeros(k, k, dtype=shift.dtype))
        self.register_buffer("fusion_center", torch.zeros(n_fused, dtype=shift.dtype)
                             if fusion_center is None else fusion_center.clone())
        self.register_buffer("fusion_spread", torch.ones(n_fused, dtype=shift.dtype)
                             if fusion_spread is None else fusion_spread.clone())
        self.register_buffer("calibration_scores", torch.zeros(0, dtype=shift.dtype)
                             if calibration_scores is None else calibration_scores.clone())
        self.register_buffer("missing_rates", torch.zeros(0, dtype=shift.dtype))
        self.register_buffer("missing_quantiles", torch.zeros(
            0, len(MISSING_QUANTILES), len(SCORE_RULES), dtype=shift.dtype))

    @property
    def is_calibrated(self) -> bool:
        return self.code_bank.shape[0] > 0

    def calibrate(self, x_bank_raw: torch.Tensor) -> None:
        """Store the codes of ``x_bank_raw`` (raw training rows ``(n_bank, n_features)``) as
        the bank of the ``latent_knn`` rule, and the median and interquartile range of each
        fused rule on those rows, each bank row scored without itself as a neighbour."""
        with torch.no_grad():
            self.code_bank = torch.cat([
                self.encode(self.preprocess(x_bank_raw[start:start + CHUNK_ROWS]))[0]
                for start in range(0, x_bank_raw.shape[0], CHUNK_ROWS)])
            self.set_bank_neighbourhoods()
            self.set_code_distribution()
            rules = tuple(r for r in STANDARDISED_RULES
                          if r != "energy" or self.energy is not None)
            by_rule = self.scores_in_chunks(x_bank_raw, rules, leave_one_out=True)
        center = torch.zeros(len(STANDARDISED_RULES), dtype=self.fusion_center.dtype)
        spread = torch.ones_like(center)
        for i, rule in enumerate(STANDARDISED_RULES):
            if rule in by_rule:
                center[i], spread[i] = _median_and_spread(by_rule[rule])
        self.fusion_center, self.fusion_spread = center, spread

    def standardise_added_rules(self) -> None:
        """Extend ``fusion_center`` and ``fusion_spread`` of a model saved with fewer
        ``STANDARDISED_RULES`` by the median and interquartile range of the rules it lacks.
        Those are code-space rules (latent_lof, latent_mahalanobis), whose bank-row scores
        follow from the saved bank alone: each code scored without itself as a neighbour, as
        calibrate() does."""
        known = self.fusion_center.shape[0]
        center, spread = self.fusion_center.tolist(), self.fusion_spread.tolist()
        for rule in STANDARDISED_RULES[known:]:
            median, iqr = 0.0, 1.0  # an uncalibrated model: no bank rule can score anyway
            if self.code_bank.shape[0] > 0:
                with torch.no_grad():
                    scores = torch.cat([self.code_scores(block, (rule,), leave_one_out=True)[rule]
                                        for block in self._bank_blocks()])
                median, iqr = _median_and_spread(scores)
            center.append(median)
            spread.append(iqr)
        self.fusion_center = torch.tensor(center, dtype=self.fusion_center.dtype)
        self.fusion_spread = torch.tensor(spread, dtype=self.fusion_spread.dtype)

    def _distance_block_rows(self) -> int:
        """Rows whose distances to every bank code fit in one ``DISTANCE_BLOCK``."""
        return max(1, DISTANCE_BLOCK // max(self.code_bank.shape[0], 1))

    def _bank_blocks(self) -> tuple[torch.Tensor, ...]:
        """The bank's codes in consecutive blocks of ``_distance_block_rows`` rows, for
        scoring the bank against itself without one (n_bank, n_bank) distance matrix."""
        return torch.split(self.code_bank, self._distance_block_rows())

    def _lof_neighbors(self) -> int:
        return max(1, min(LOF_NEIGHBORS, self.code_bank.shape[0] - 1))

    def set_bank_neighbourhoods(self) -> None:
        """Set ``bank_k_distance`` and ``bank_density`` from ``code_bank``: each code's
        neighbours are the bank's other codes (a duplicate counts, at distance 0)."""
        n_bank, k = self.code_bank.shape[0], self._lof_neighbors()
        if n_bank < 2:
            self.bank_k_distance = torch.zeros(n_bank, dtype=self.code_bank.dtype)
            self.bank_density = torch.ones(n_bank, dtype=self.code_bank.dtype)
            return
        with torch.no_grad():
            found = [self._nearest_codes(block, k + 1) for block in self._bank_blocks()]
        # the nearest of each code is itself (or a duplicate, at the same distance 0)
        distances = torch.cat([d for d, _ in found])[:, 1:]                 # (n_bank, k)
        index = torch.cat([i for _, i in found])[:, 1:]
        self.bank_k_distance = distances[:, -1].clone()
        reach = torch.maximum(distances, self.bank_k_distance[index])
        self.bank_density = 1.0 / (reach.mean(1) + DENSITY_EPS)

    def set_code_distribution(self) -> None:
        """Set ``code_location`` and ``code_precision`` from ``code_bank``: the minimum
        covariance determinant estimate (scikit-learn's ``MinCovDet``, support
        ``MCD_SUPPORT_FRACTION``) of at most ``MCD_ROWS`` bank codes, so that the codes of
        anomalies among the training rows move neither the location nor the covariance. A
        bank too small for it (no more codes than dimensions) gets the plain mean and the
        pseudo-inverse of the plain covariance."""
        from sklearn.covariance import EmpiricalCovariance, MinCovDet

        codes = self.code_bank
        if codes.shape[0] > MCD_ROWS:
            generator = torch.Generator().manual_seed(0)
            codes = codes[torch.randperm(codes.shape[0], generator=generator)[:MCD_ROWS]]
        codes = codes.numpy()
        n_codes, k = codes.shape
        if n_codes == 0:
            return
        if n_codes > k + 1:
            estimate = MinCovDet(support_fraction=MCD_SUPPORT_FRACTION, random_state=0)
        else:
            estimate = EmpiricalCovariance()
        with warnings.catch_warnings():
            # singular covariances (collapsed code dimensions) are handled by the
            # pseudo-inverse; scikit-learn warns about them
            warnings.simplefilter("ignore", RuntimeWarning)
            warnings.simplefilter("ignore", UserWarning)
            estimate.fit(codes)
        dtype = self.code_bank.dtype
        self.code_location = torch.as_tensor(estimate.location_, dtype=dtype).clone()
        self.code_precision = torch.as_tensor(estimate.get_precision(), dtype=dtype).clone()

    def calibrate_missing_rates(self, x_bank_raw: torch.Tensor, seed: int = 0,
                                in_bank: bool = True) -> None:
        """Measure how each rule's scores of normal rows ``x_bank_raw`` move when entries
        are missing: at each of ``CALIBRATION_MISSING_RATES``, bring every row (of at most
        ``MISSING_CALIBRATION_ROWS``; fewer are repeated, with fresh removals) to exactly
        that share of missing entries by removing observed ones at random, and store the
        ``MISSING_QUANTILES`` of every rule's scores. :meth:`scores` then maps the score of a
        row with missing entries from its rate's quantiles onto those of the lowest rate,
        so that a normal row is as likely to pass a threshold whatever its missing rate.
        Rows that already miss more than a rate's share are left out of that rate, and a
        rate that fewer than ``MIN_SHARE_REACHING_A_RATE`` of the rows reach is skipped: on
        rows that arrive incomplete the lowest rate kept is then the reference.
        Without missing entries a score is unchanged. ``in_bank``: the rows are the code
        bank's (training rows, each scored without its own code as a neighbour); False for
        rows the networks did not see (calibration rows)."""
        if not self.allows_missing:
            raise ValueError("calibrate_missing_rates needs a scorer that allows missing "
                             "entries")
        generator = torch.Generator().manual_seed(seed)
        n_rows, n_features = x_bank_raw.shape
        if n_rows > MISSING_CALIBRATION_ROWS:
            keep = torch.randperm(n_rows, generator=generator)
            x_bank_raw = x_bank_raw[keep[:MISSING_CALIBRATION_ROWS]]
        elif n_rows > 0:
            x_bank_raw = x_bank_raw.repeat(max(MISSING_CALIBRATION_ROWS // n_rows, 1), 1)
        rules = tuple(r for r in SCORE_RULES if r != "energy" or self.energy is not None)
        self.missing_rates = torch.zeros(0, dtype=self.shift.dtype)  # raw scores below
        levels = torch.tensor(MISSING_QUANTILES, dtype=self.shift.dtype)
        already_missing = torch.isnan(x_bank_raw)                           # (n, d)
        n_missing = already_missing.sum(1)                                  # (n,)
        # every row keeps at least one entry, as scoring requires
        targets = sorted({min(round(rate * n_features), n_features - 1)
                          for rate in CALIBRATION_MISSING_RATES})
        rates, quantiles = [], []
        for target in targets:
            # An exact count per row, not a coin per entry: a test row's map is chosen by its
            # own rate, and a rate's quantiles mixing rows of other rates would be wider than
            # its rows' (normal rows of a model trained with 30% missing and scored at 50%
            # were flagged a fifth less often than complete ones).
            eligible = n_missing <= target
            if eligible.sum() < MIN_SHARE_REACHING_A_RATE * x_bank_raw.shape[0]:
                continue
            rows, missing = x_bank_raw[eligible], already_missing[eligible]
            # the observed entries in random order; remove the first few
            priority = torch.rand(rows.shape, generator=generator, dtype=rows.dtype)
            x_masked = _hide_in_priority_order(rows, missing, priority,
                                               target - n_missing[eligible])
            by_rule = self.scores_in_chunks(x_masked, rules, leave_one_out=in_bank)
            # a rule the model does not have keeps the identity map (equal quantiles)
            at_rate = levels[:, None].repeat(1, len(SCORE_RULES))
            for i, rule in enumerate(SCORE_RULES):
                if rule in by_rule:
                    at_rate[:, i] = torch.quantile(by_rule[rule], levels)
            rates.append(torch.tensor(target / n_features, dtype=self.shift.dtype))
            quantiles.append(at_rate)
        if len(rates) == 1:  # one feature, or rows all missing nearly everything: identity
            rates, quantiles = rates * 2, quantiles * 2
        self.missing_quantiles = torch.stack(quantiles)
        self.missing_rates = torch.stack(rates)

    def _hidden_to_lowest_rate(self, x_raw: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Model-space rows ``x`` with entries hidden (set to NaN) until each misses at least
        the lowest calibrated rate's share: when every training row arrived incomplete, no
        score of a more complete row was ever measured, and such a row would be scored on a
        scale its calibration does not share (models trained with 30% of the cells missing
        flagged 0.133 of complete normal rows at alpha = 0.1). Which entries are hidden is
        drawn from the row's own values (:func:`_row_priorities`), so that a row always
        gets the same score, in this process and in the ONNX graph, and the hidden entries
        are a uniform random choice, like those removed in :meth:`calibrate_missing_rates`.
        Unchanged where the lowest calibrated rate is 0 (some training rows complete)."""
        if (not self.allows_missing or self.missing_rates.shape[0] < 2
                or (not torch.compiler.is_exporting() and float(self.missing_rates[0]) <= 0.0)):
            return x
        flat = x.flatten(1)                                                  # (n, d)
        n_features = flat.shape[1]
        missing = torch.isnan(flat)
        target = torch.round(self.missing_rates[0] * n_features)
        to_hide = (target - missing.sum(1).to(target.dtype)).clamp_min(0.0)   # (n,)
        return _hide_in_priority_order(flat, missing, _row_priorities(x_raw),
                                       to_hide).reshape(x.shape)

    def _rate_adjusted(self, rule: str, score: torch.Tensor, observed: torch.Tensor
                       ) -> torch.Tensor:
        """``score`` of rows with ``observed`` entries, mapped from the score quantiles of
        normal rows at their missing rate onto those of complete rows (piecewise linear,
        extended beyond the extreme quantiles by the end segments, and interpolated between
        the two calibrated rates around the row's); complete rows keep their score exactly."""
        rule_index = SCORE_RULES.index(rule)
        if rule_index >= self.missing_quantiles.shape[2]:
            raise ValueError(f"this model was saved before score rule {rule!r} existed and "
                             "has no calibration of it for missing entries; refit it")
        rates = self.missing_rates
        rate = 1.0 - observed.flatten(1).to(score.dtype).mean(1)             # (n,)
        # the segment [rates[lo], rates[lo + 1]] each rate falls in (no searchsorted in ONNX)
        lo = (rate[:, None] >= rates[None, 1:-1]).sum(1)                      # (n,)
        r_lo, r_hi = rates[lo], rates[lo + 1]
        t = torch.clamp((rate - r_lo) / (r_hi - r_lo).clamp_min(1e-12), 0.0, 1.0)
        quantiles = self.missing_quantiles[:, :, rule_index]                 # (n_rates, Q)
        reference = quantiles[0]
        adjusted = ((1.0 - t) * _quantile_map(score, quantiles[lo], reference)
                    + t * _quantile_map(score, quantiles[lo + 1], reference))
        return torch.where(rate > 0, adjusted, score)

    def p_values(self, anomaly: torch.Tensor) -> torch.Tensor:
        """Split-conformal p-value of each anomaly score ``(n,)``: (1 + the number of
        calibration scores at least as large) / (n_calibration + 1); NaN without calibration.
        On normal data exchangeable with the calibration rows, P(p <= alpha) <= alpha."""
        return conformal_p_values(self.calibration_scores, anomaly)

    def preprocess(self, x_raw: torch.Tensor) -> torch.Tensor:
        """``(n, n_features)`` raw -> ``(n, *input_shape)`` model space."""
        return ((x_raw - self.shift) / self.scale).reshape(-1, *self.input_shape)

    def postprocess(self, x_model: torch.Tensor) -> torch.Tensor:
        """``(n, *input_shape)`` model space -> ``(n, n_features)`` raw units."""
        return x_model.flatten(1) * self.scale + self.shift

    def complete(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Model-space rows ``x`` ``(n, *input_shape)`` with their NaN entries filled by the
        model, and the mask of observed entries (None when the scorer does not allow missing
        entries: ``x`` is returned as it is). The fill starts at the training mean and is
        the reconstruction g(mu(x)) of the current completion, ``MISSING_ROUNDS`` times;
        observed entries never change."""
        if not self.allows_missing:
            return x, None
        observed = ~torch.isnan(x)
        if not torch.compiler.is_exporting() and bool(observed.all()):
            return x, observed  # what the rounds would return, without their passes
        filled = torch.where(observed, x, torch.zeros_like(x))
        dtype = self.encoder.mu.weight.dtype
        for _ in range(MISSING_ROUNDS):
            x_hat = self.generator(self.encoder(filled.to(dtype))[0]).to(x.dtype)
            filled = torch.where(observed, x, x_hat)
        return filled, observed

    def completed_rows(self, x_raw: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw rows ``(n, n_features)`` as the score sees them: preprocessed, brought to the
        lowest calibrated missing rate (:meth:`_hidden_to_lowest_rate`) and completed
        (:meth:`complete`); with the mask of the entries that count as observed."""
        return self.complete(self._hidden_to_lowest_rate(x_raw, self.preprocess(x_raw)))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) ``(n, k)`` each, in the dtype of ``x``, of model-space rows ``x``
        (completed first where entries are missing)."""
        x, _ = self.complete(x)
        mu, logvar = self.encoder(x.to(self.encoder.mu.weight.dtype))
        return mu.to(x.dtype), logvar.to(x.dtype)

    def forward(self, x_raw: torch.Tensor) -> torch.Tensor:
        return self.scores(x_raw, (self.rule,))[self.rule]

    def scores_in_chunks(self, x_raw: torch.Tensor, rules: tuple[str, ...] = SCORE_RULES,
                         chunk_rows: int = CHUNK_ROWS, leave_one_out: bool = False
                         ) -> dict[str, torch.Tensor]:
        """:meth:`scores` of many rows, ``chunk_rows`` at a time, without autograd, so that
        memory stays bounded whatever the number of rows (and of bank codes)."""
        if set(NEIGHBOUR_RULES) & set(rules):
            chunk_rows = max(1, min(chunk_rows, self._distance_block_rows()))
        with torch.no_grad():
            chunks = [self.scores(x_raw[start:start + chunk_rows], rules, leave_one_out)
                      # at least one chunk, so that no rows give empty scores, not an error
                      for start in range(0, max(x_raw.shape[0], 1), chunk_rows)]
        return {rule: torch.cat([c[rule] for c in chunks]) for rule in chunks[0]}

    def _nearest_codes(self, mu: torch.Tensor, n_nearest: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Euclidean distances ``(n, n_nearest)``, ascending, from each code ``(n, k)`` to its
        nearest codes in the bank, and their bank indices."""
        # |a - b|^2 = |a|^2 - 2 a.b + |b|^2: one matmul, which ONNX and BLAS run well. |a|^2
        # is the same for every neighbour of a row, so the nearest are found on
        # |b|^2 - 2 a.b alone and |a|^2 is added to those found only: the (n, n_bank) block
        # is written once instead of four times (4-5x the rows per second on CPU).
        bank_norms = self.code_bank.pow(2).sum(1)                              # (n_bank,)
        partial = torch.addmm(bank_norms, mu, self.code_bank.T, alpha=-2.0)    # (n, n_bank)
        nearest, index = torch.topk(partial, n_nearest, dim=1, largest=False)  # (n, n_nearest)
        code_norms = mu.pow(2).sum(1, keepdim=True)
        squared = nearest + code_norms
        # The expansion cancels to rounding noise (~1e-16 |a|^2), not 0, for a row's own
        # code, and the square root would blow that up into a batch-dependent 1e-8: distances
        # below 1e-5 of the norms count as 0.
        norms = code_norms + bank_norms[index]
        squared = torch.where(squared < 1e-10 * norms, torch.zeros_like(squared), squared)
        return squared.sqrt(), index

    def code_scores(self, mu: torch.Tensor, rules: tuple[str, ...],
                    leave_one_out: bool = False) -> dict[str, torch.Tensor]:
        """Scores ``(n,)`` of the codes ``mu`` ``(n, k)`` under the bank rules among
        ``rules`` (``latent_knn``, ``latent_lof``, ``latent_mahalanobis``), from one search of
        the bank: its nearest codes come sorted, so the ``N_NEIGHBORS`` nearest are the first
        of the ``LOF_NEIGHBORS`` nearest and one search serves both (the search is most of
        the cost of scoring against a large bank). ``leave_one_out`` skips the nearest code,
        for rows that are in the bank.

        ``latent_knn`` = mean Euclidean distance to the nearest codes. ``latent_lof`` = the
        local outlier factor among the bank's codes, as scikit-learn's
        ``LocalOutlierFactor(novelty=True)`` fitted on the bank scores it (negated: higher =
        more anomalous)."""
        out = {}
        if "latent_mahalanobis" in rules:  # global: no neighbours, nothing to leave out
            centred = mu - self.code_location                                    # (n, k)
            out["latent_mahalanobis"] = (centred @ self.code_precision * centred).sum(1)
        n_bank = self.code_bank.shape[0]
        skip = int(leave_one_out and n_bank > 1)
        n_knn = min(N_NEIGHBORS, n_bank - skip) if "latent_knn" in rules else 0
        n_lof = self._lof_neighbors() if "latent_lof" in rules else 0
        if n_knn == n_lof == 0:
            return out
        distances, index = self._nearest_codes(mu, max(n_knn, n_lof) + skip)
        distances, index = distances[:, skip:], index[:, skip:]   # (n, max(n_knn, n_lof))
        if n_knn:
            out["latent_knn"] = distances[:, :n_knn].mean(1)
        if n_lof:
            distances, index = distances[:, :n_lof], index[:, :n_lof]
            reach = torch.maximum(distances, self.bank_k_distance[index])
            out["latent_lof"] = self.bank_density[index].mean(1) * (reach.mean(1) + DENSITY_EPS)
        return out

    def latent_knn(self, mu: torch.Tensor, leave_one_out: bool = False) -> torch.Tensor:
        """The ``latent_knn`` score ``(n,)`` of codes ``(n, k)`` (see :meth:`code_scores`)."""
        return self.code_scores(mu, ("latent_knn",), leave_one_out)["latent_knn"]

    def latent_lof(self, mu: torch.Tensor, leave_one_out: bool = False) -> torch.Tensor:
        """The ``latent_lof`` score ``(n,)`` of codes ``(n, k)`` (see :meth:`code_scores`)."""
        return self.code_scores(mu, ("latent_lof",), leave_one_out)["latent_lof"]

    def _above_typical(self, rule: str, score: torch.Tensor) -> torch.Tensor:
        """``score`` ``(n,)`` of a standardised rule in units of its training spread above
        its training median, 0 below it."""
        i = STANDARDISED_RULES.index(rule)
        return torch.clamp((score - self.fusion_center[i]) / self.fusion_spread[i], min=0.0)

    def normal_counterpart(self, x: torch.Tensor) -> torch.Tensor:
        """What the model would draw in place of ``x`` ``(n, *input_shape)`` (model space) if
        it were normal, same shape: the reconstruction, re-encoded ``ATTRIBUTION_ROUNDS``
        times with the ``SUSPECT_FRACTION`` worst-reconstructed features of each row replaced
        by the current reconstruction. A plain reconstruction pulls the code towards the
        anomalous part of a row (an implanted patch, one shifted feature) and smears the
        residual over the rest; filling in the suspect features, as the triangle's inpainting
        does for missing ones, keeps the code on the normal part."""
        flat = x.flatten(1)
        n_suspect = max(1, round(SUSPECT_FRACTION * flat.shape[1]))
        x_hat = self.generator(self.encoder(x)[0]).flatten(1)
        for _ in range(ATTRIBUTION_ROUNDS):
            residual = (flat - x_hat).pow(2)
            cutoff = torch.topk(residual, n_suspect, dim=1).values[:, -1:]
            filled = torch.where(residual >= cutoff, x_hat, flat).reshape(x.shape)
            x_hat = self.generator(self.encoder(filled)[0]).flatten(1)
        return x_hat.reshape(x.shape)

    def feature_scores(self, x_raw: torch.Tensor, anomaly: torch.Tensor) -> torch.Tensor:
        """Each feature's part of the anomaly score ``anomaly`` ``(n,)`` of the raw rows
        ``x_raw`` ``(n, n_features)``: shape ``(n, n_features)``, rows summing to ``anomaly``.

        The score is shared out in proportion to each feature's squared standardised residual
        against :meth:`normal_counterpart`, so a feature's value says how much of this row's
        anomaly score sits there, in the score's own units, comparable across rows (a normal
        row's features all get little). A row whose preprocessed values overflow float32 (an
        infinite score) puts it all on those values."""
        x, observed = self.completed_rows(x_raw)
        x_net = x.to(self.encoder.mu.weight.dtype)
        counterpart = self.normal_counterpart(x_net).to(x.dtype)
        residual = (x - counterpart).flatten(1).pow(2)
        if observed is not None:  # a missing entry holds no evidence
            residual = torch.where(observed.flatten(1), residual, torch.zeros_like(residual))
        share = residual / residual.sum(1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
        huge = (x.flatten(1).abs() > torch.finfo(torch.float32).max).to(x.dtype)
        beyond = huge.sum(1, keepdim=True) > 0
        share = torch.where(beyond, huge / huge.sum(1, keepdim=True).clamp_min(1.0), share)
        return torch.where(share > 0, anomaly[:, None] * share, torch.zeros_like(share))

    def scores(self, x_raw: torch.Tensor, rules: tuple[str, ...] = SCORE_RULES,
               leave_one_out: bool = False) -> dict[str, torch.Tensor]:
        """Anomaly scores of ``(n, n_features)`` raw rows under several rules from one pass
        through the networks; each network runs only if a requested rule needs it.
        ``leave_one_out`` is for rows of the code bank: their own code is not a neighbour."""
        unknown = set(rules) - set(SCORE_RULES)
        if unknown:
            raise ValueError(f"unknown score rules {sorted(unknown)}; expected {SCORE_RULES}")
        if self.energy is None:
            rules = tuple(r for r in rules if r != "energy")
        if not self.is_calibrated:
            if self.rule in BANK_RULES and set(BANK_RULES) & set(rules):
                raise RuntimeError(f"score rule {self.rule!r} needs calibrate() first")
            rules = tuple(r for r in rules if r not in BANK_RULES)
        needed = set(rules).union(*(SUMMED_RULES.get(rule, ()) for rule in rules))
        # Preprocessing and the score's sums run in the dtype of the input and of shift/scale;
        # the networks in their own. A float32 network (the ONNX export) under float64 input
        # then loses precision only inside the networks, not in the large sums.
        x, observed = self.completed_rows(x_raw)
        x_net = x.to(self.encoder.mu.weight.dtype)
        mu_net, logvar = self.encoder(x_net)                           # (n, k) each
        mu = mu_net.to(x.dtype)
        energy = recon = None
        if self.energy is not None and {"energy", "joint"} & needed:
            energy = self.energy(x_net, mu_net).to(x.dtype)            # (n,)
        if {"joint", "reconstruction", "elbo"} & needed:
            x_hat = self.generator(mu_net).to(x.dtype)
            recon = objectives.reconstruction_nll(x, x_hat, self.decoder_sigma, observed)
            if observed is not None:
                # per observed entry, in the units of a complete row: a normal row neither
                # gains nor loses reconstruction error by having fewer entries
                n_entries = observed[0].numel()
                recon = recon * (n_entries / observed.flatten(1).sum(1).to(x.dtype))
        components = {"energy": energy, "reconstruction": recon,
                      **self.code_scores(mu, tuple(needed), leave_one_out)}
        out = {}
        for rule in rules:
            if rule in components:
                out[rule] = components[rule]
            elif rule in SUMMED_RULES:
                out[rule] = sum(self._above_typical(name, components[name])
                                for name in SUMMED_RULES[rule]
                                if components.get(name) is not None)
            elif rule == "elbo":
                out[rule] = recon + objectives.kl_to_prior(mu, logvar.to(x.dtype))
            else:
                joint = recon + objectives.prior_nll(mu)
                out[rule] = joint if energy is None else joint + energy
        if observed is not None and self.missing_rates.shape[0] > 1:
            out = {rule: self._rate_adjusted(rule, score, observed)
                   for rule, score in out.items()}
        # A preprocessed value beyond float32's range overflows the exported float32 networks
        # (NaN); the float64 networks here would give a finite, huge score. Both paths give
        # such a row the most anomalous score there is, so that they agree.
        beyond = x.flatten(1).abs().amax(1) > torch.finfo(torch.float32).max
        return {rule: torch.where(beyond, torch.full_like(score, torch.inf), score)
                for rule, score in out.items()}
