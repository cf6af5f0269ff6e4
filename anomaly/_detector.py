"""LatentEBMDetector: the scikit-learn estimator around the divergence-triangle model."""

from __future__ import annotations

import hashlib
import numbers
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from numbers import Integral, Real
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from sklearn.base import BaseEstimator, OutlierMixin, _fit_context
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from anomaly._moments import ColumnMoments
from anomaly._rules import outlier_labels
from anomaly._validation import image_shape_tuple, validate_samples
from training import (
    SCORE_RULES,
    AnomalyScorer,
    NetworkConfig,
    TrainConfig,
    build_networks,
    train_networks,
)
from training.checkpoint import Checkpointer
from training.config import PRECISIONS, UPDATE_ORDERS
from training.distributed import current_shard
from training.loop import EpochCallback
from training.sampling import inpaint_rows, sample_rows
from training.scorer import CALIBRATION_ROWS, CHUNK_ROWS
from training.scorer_ensemble import ScorerEnsemble
from training.streaming import SpilledRows

MISSING_OPTIONS = ("error", "mask")
# Beyond this many training rows, fit_stream sets offset_ from a seeded sample of their scores.
OFFSET_ROWS = 1_000_000
# The least training time an ensemble member gets when the members before it used up the
# time budget (it still ends after its first minibatch past its share).
MIN_MEMBER_SECONDS = 1.0


class _Interval(Interval):
    """scikit-learn's Interval without booleans: ``width=True`` is a mistake, not 1."""

    def is_satisfied_by(self, val) -> bool:
        return not isinstance(val, (bool, np.bool_)) and super().is_satisfied_by(val)


def _positive(kind=Real, *, upper=np.inf, closed="neither") -> _Interval:
    """A number above 0 (finite unless ``upper`` says otherwise)."""
    return _Interval(kind, 0 if kind is Real else 1, upper if kind is Real else None,
                     closed=closed if kind is Real else "left")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for, but CUDA is not available")
    return resolved


class _MemberCallback:
    """An epoch callback of one ensemble member: ``callback(first_epoch + epoch, metrics
    with "member")``."""

    def __init__(self, callback: EpochCallback, member: int, first_epoch: int) -> None:
        self.callback, self.member, self.first_epoch = callback, member, first_epoch

    def __call__(self, epoch: int, metrics: dict) -> None:
        self.callback(self.first_epoch + epoch, {**metrics, "member": self.member})


def _member_seed(seed: int, member: int) -> int:
    """The torch seed of ensemble member ``member``: the fit's own for the first, so that one
    member is the single model of the same ``random_state``."""
    return seed if member == 0 else (seed + member * 1_000_003) % np.iinfo(np.int32).max


def _torch_seed(random_state) -> int:
    """A torch seed drawn from a scikit-learn ``random_state`` (None, int or RandomState)."""
    return int(check_random_state(random_state).randint(np.iinfo(np.int32).max))


def _column_std(X: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Standard deviation per column over its observed (non-NaN) entries, finite even where
    squares overflow float64 (|x| above about 1e154), with a warning: one such value makes
    the rest of its column look constant."""
    # NaN (missing) entries are left out; the nan-functions are slower, so only where needed
    has_nan = bool(np.isnan(X).any())
    with np.errstate(over="ignore", invalid="ignore"):
        std = np.nanstd(X, axis=0) if has_nan else X.std(axis=0)
    huge = ~np.isfinite(std)
    if huge.any():
        centered = X[:, huge] - mean[huge]
        peak = np.nanmax(np.abs(centered), axis=0)
        std[huge] = peak * np.sqrt(np.nanmean((centered / peak) ** 2, axis=0))
        warnings.warn(f"columns {np.flatnonzero(huge).tolist()} hold values up to "
                      f"{float(peak.max()):.3g} from their mean, so large that the other "
                      "values of these columns standardise to about 0; check them for unit "
                      "errors or sentinel values", UserWarning, stacklevel=4)
    return std


def _image_scaling(low: float, high: float, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """One range for all pixels keeps images images: (shift, scale) mapping [low, high] to
    [-1, 1]."""
    shift = np.full(n_features, (high + low) / 2)
    scale = np.full(n_features, max((high - low) / 2, 1e-12))
    return shift, scale


def _column_scaling(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Each column's scale: its standard deviation, or 1 for a constant column."""
    return np.where(std > 1e-12 * np.maximum(1.0, np.abs(mean)), std, 1.0)


def _checkpoint_settings(checkpoint_dir, resume, checkpoint_every
                         ) -> tuple[Path, bool, int] | None:
    """``fit``'s checkpoint arguments checked, as (directory, resume, every) or None."""
    if checkpoint_dir is None and resume:
        raise ValueError("resume=True needs the checkpoint_dir to resume from")
    if (not isinstance(checkpoint_every, numbers.Integral)
            or isinstance(checkpoint_every, bool) or checkpoint_every < 1):
        raise ValueError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}")
    return (None if checkpoint_dir is None
            else (Path(checkpoint_dir), bool(resume), int(checkpoint_every)))


def _spill(batches: Iterable[np.ndarray], shift: np.ndarray, scale: np.ndarray, path: Path,
           bank_index: np.ndarray | None):
    """Write the preprocessed rows to ``path`` as float32 and return (the raw rows at the
    sorted ``bank_index``, or all rows when it is None; a sha256 of what was written)."""
    digest = hashlib.sha256()
    bank, done = [], 0
    with open(path, "wb") as file:
        for batch in batches:
            preprocessed = ((batch - shift) / scale).astype(np.float32)
            preprocessed.tofile(file)
            digest.update(preprocessed.tobytes())
            if bank_index is None:
                bank.append(batch)
            else:
                lo, hi = np.searchsorted(bank_index, [done, done + len(batch)])
                bank.append(batch[bank_index[lo:hi] - done])
            done += len(batch)
    return np.concatenate(bank), digest


def _bank_rows(n_rows: int, bank_size: int, seed: int) -> np.ndarray:
    """The sorted indices of the ``bank_size`` training rows kept for the score rules
    (drawn without a permutation of all rows, so that memory does not grow with them)."""
    return np.sort(np.random.default_rng(seed).choice(n_rows, bank_size, replace=False))


class LatentEBMDetector(OutlierMixin, BaseEstimator):
    """Unsupervised anomaly detector: a VAE and a latent energy-based critic on (x, z),
    trained jointly by the divergence triangle (Han et al., CVPR 2019 / 2020).

    Read more in the README. Training runs on CUDA when ``device="auto"`` finds it; scoring
    runs on the CPU in float64, so that scores do not depend on the batch they come in (use the
    ONNX export for GPU inference).

    Parameters
    ----------
    objective : {"triangle", "vae"}, default="triangle"
        ``"vae"`` trains the same encoder and generator as a plain VAE (the ablation).
    score_rule : {"auto", "global_fused", "fused", "latent_fused", "latent_lof", "latent_knn", \
"latent_mahalanobis", "joint", "reconstruction", "energy", "elbo"}, default="auto"
        Anomaly score (named ``score_rule`` because scikit-learn reserves ``score`` for a
        method). ``"auto"`` is ``"latent_fused"`` for images (conv networks) and
        ``"global_fused"`` for tabular rows: per-pixel reconstruction error mostly measures
        how much ink an image has (simple held-out digits are redrawn well and rank as
        normal), and the classes of an image set crowd the code space unevenly, which a local
        density ratio allows for, while on a small bank that ratio is noisy and the plain
        distance to the codes ranks better; on tables an extreme value in one feature is what
        most anomalies show and reconstruction sees it, while anomalies in unlabelled training
        rows are each other's neighbours in the bank but lie outside the bulk of its codes.
        ``"joint"`` = E(x, mu) + reconstruction error + ||mu||^2 / 2 (the negative
        log of the tilted joint density); ``"reconstruction"`` = -log p(x | mu(x));
        ``"energy"`` = E(x, mu(x)) as in the paper; ``"elbo"`` = negative ELBO at mu;
        ``"latent_knn"`` = mean distance from mu(x) to the 5 nearest codes of training rows
        (a bank of at most ``bank_size`` codes kept in the model); ``"latent_lof"`` = the
        local outlier factor of mu(x) among the bank's codes, 10 neighbours (its mean
        reachability distance relative to its neighbours' own, as scikit-learn's
        ``LocalOutlierFactor`` computes it); ``"fused"`` = the sum of the
        reconstruction, latent_knn and energy scores, each centred by its median, divided
        by its interquartile range on the training rows and cut at 0 from below (a rule
        counts only where it finds the sample more anomalous than the median);
        ``"latent_fused"`` = the same sum of latent_knn and latent_lof;
        ``"latent_mahalanobis"`` = the squared Mahalanobis distance of mu(x) from the bank's
        codes under their robust (minimum covariance determinant, 75% support) location and
        covariance; ``"global_fused"`` = the sum of reconstruction, latent_mahalanobis and
        energy, standardised and cut as ``"fused"``. README: which rule ranks best where.
    inference_loss : {"kl_plus", "kl_minus"}, default="kl_plus"
        Encoder objective: ``"kl_plus"`` minimises KL(Q||P) + KL(Q||Pi); ``"kl_minus"``
        (the authors' code) KL(Q||P) - KL(Q||Pi), which collapses the encoder variance.
    latent_dim : int, default=32
        Room for the codes to keep neighbourhoods apart, which the latent_knn part of the
        default score needs (16 against 4: MNIST +0.2 AUPRC; 32 with ``decoder_sigma=0.1``
        against 16 with 0.3: digits and tables better; docs/what-we-tried.md).
    width : int or None, default=None
        Hidden units (MLP) or first-stage channels (conv); None = 128 / 32.
    depth : int, default=2
        Hidden layers (MLP) or stride-2 stages (conv).
    energy_width : int or None, default=None
        Width of the energy network; None = ``width // 2``, which halves the cost of the
        critic at no measured loss of accuracy.
    energy_scale : float, default=10.0
        E = energy_scale * softplus(critic output). Spectral normalisation caps the critic's
        slope at 1, so this is the steepest the energy can be. At 1 (the authors' setting) the
        critic's terms are two orders of magnitude below the reconstruction term and the
        triangle behaves like a VAE; 10 measured best of 1/10/20/30 on digits (README).
    epochs : int, default=100
        Passes over the training rows. With ``missing="mask"`` it counts passes of observed
        entries: rows with a share s of their entries observed get ``ceil(epochs / s)``
        passes, so that the networks see as many observed values as on complete rows
        (README, missing values).
    max_training_seconds : float or None, default=None
        Stop after the first minibatch that ends past this wall time, even inside an epoch (a
        time budget; results then depend on the machine's speed).
    batch_size : int, default=64
    learning_rate : float, default=3e-4
        Encoder and generator.
    ebm_learning_rate : float, default=1e-4
    weight_decay : float, default=1e-4
        Encoder and generator.
    lr_decay : float, default=0.998
        Multiplies every learning rate after each epoch.
    decoder_sigma : float, default=0.1
        Standard deviation of p(x|z) in preprocessed units. Smaller weighs reconstruction
        more against the prior, so the codes keep more of each sample (0.1 with latent 32
        against 0.3 with latent 16: reconstruction rule on 8 ADBench sets 0.70 to 0.77
        AUROC; docs/what-we-tried.md).
    image_shape : tuple or None, default=None
        ``(H, W)`` or ``(C, H, W)``: 2-D rows are images of this shape (conv networks).
        Image batches ``(n, H, W)`` / ``(n, C, H, W)`` need no ``image_shape``.
    contamination : "auto" or float in (0, 0.5], default="auto"
        Sets ``offset_``: a float is the expected fraction of outliers in the training data;
        "auto" puts the threshold at Tukey's lower fence (Q1 - 1.5 IQR) of the training scores.
    alpha : float in (0, 1) or None, default=None
        Significance level of ``predict`` once the model is calibrated (``calibration`` or
        :meth:`calibrate`): a sample is flagged when its conformal p-value is at most
        ``alpha``, so that on normal data like the calibration rows at most a fraction
        ``alpha`` is flagged (split-conformal guarantee). None, or an uncalibrated model,
        keeps the ``contamination`` threshold.
    calibration : float in (0, 1) or None, default=None
        Fraction of the rows given to ``fit`` held out from training (seeded random choice)
        to calibrate p-values; they should be normal. None trains on every row; call
        :meth:`calibrate` with normal rows later to get p-values.
    critic_negatives : "auto" or sequence of {"mismatch", "wide", "suspect"}, default="auto"
        Pairs the critic pushes up besides the generator's (g(z), z): ``"mismatch"`` =
        (x, code of another row), ``"wide"`` = (g(2.5 z), 2.5 z), beyond the prior's bulk,
        ``"suspect"`` = (x, z) of the training rows that ``trim_fraction`` leaves out of each
        minibatch (the worst reconstructed, the likeliest anomalies; none without trimming).
        ``"auto"`` is ``("wide", "suspect")`` on tabular rows and none on images: on the 27
        ADBench sets x 3 seeds the wide pairs turn the energy alone from below chance (0.48
        mean AUROC) into a ranker (0.62), and the suspect pairs lift it to 0.74, above 0.5
        on 21 of 27 sets, while on digits images the wide pairs lowered it and the suspect
        pairs changed nothing (docs/what-we-tried.md). Images given as flat rows without
        ``image_shape`` count as rows; the wide pairs cost them accuracy (README), so set
        ``image_shape``.
    trim_fraction : float in [0, 1), default=0.05
        Fraction of each minibatch, the rows reconstructed worst, left out of the losses'
        data terms, so that anomalies in unlabelled training data are not learnt as normal
        (ADBench's training splits hold 1-30% anomalies); 0 trains on every row.
    update_order : {"alternating", "simultaneous"}, default="simultaneous"
        ``"simultaneous"`` computes all three losses from one critic pass and steps the three
        networks together. ``"alternating"`` is the authors' order: the critic's step, then
        the encoder and generator against the updated critic (slower per step, no more
        accurate in the README's paired tables).
    critic_every : int, default=1
        Update the critic on every k-th minibatch only; needs
        ``update_order="alternating"``. The encoder and generator move on every minibatch.
    training_precision : {"float32", "bfloat16"}, default="float32"
        ``"bfloat16"`` runs training's forward passes under bfloat16 autocast (fast on CPUs
        with AMX or AVX-512 BF16 and on recent GPUs); parameters, optimiser state and scoring
        stay in full precision.
    model_pairs_fraction : float in (0, 1], default=0.25
        Model pairs (g(z_p), z_p) drawn per minibatch, as a fraction of its rows: fewer
        make a triangle step cheaper (the generator's second pass and the critic's passes
        over those pairs are most of its extra cost over a VAE step). 1.0 with
        ``update_order="alternating"`` is the authors' training step.
    missing : {"error", "mask"}, default="error"
        What NaN entries (missing values) mean. ``"error"`` refuses them in ``fit`` and in
        scoring. ``"mask"`` learns and scores with them left out, as the divergence triangle
        learns from incomplete images: the preprocessing statistics and the reconstruction
        terms count observed entries only, and after every minibatch the missing entries are
        filled by the model's own reconstruction, which the encoder and the critic then see
        (so "missing" is never a feature of the data); a row with missing entries trains
        the encoder on the negative ELBO of its observed entries instead of the triangle's
        inference loss, because the critic's energy of a row the model completed itself
        judges the model's own fill (README, missing values). A row scored with missing entries is
        completed the same way (three encode-decode rounds) and its reconstruction error is
        taken per observed entry; its score is then mapped from the score quantiles of
        normal rows at its missing rate onto those of complete rows (measured in ``fit``,
        and on the calibration rows when there are), so that missingness alone does not make
        a normal row look more or less anomalous. A row with every entry missing is refused.
        The default keeps NaN an error, because an unexpected NaN is more often a bug
        upstream than data.
    bank_size : int, default=50_000
        Most training rows whose codes the model keeps for the rules that compare a code with
        the training rows' (``latent_fused``, ``latent_lof``, ``latent_knn``, ``fused``;
        ``latent_mahalanobis`` and ``global_fused`` estimate their covariance from it); a
        seeded random subset beyond. More codes resolve the training density more finely (MNIST,
        ``latent_lof``: 50,000 codes against 10,000, +0.07 mean AUPRC; README) at a cost in
        the saved model and per scored row that grows with it: 50,000 codes of latent 32 are
        12.8 MB (float64), and the neighbour search runs at about 3,000 rows/s on 2 cores.
    n_members : int or "auto", default="auto"
        Networks trained independently (each from its own seed, on the same rows) whose
        scores are averaged: fits from other seeds rank anomalies differently, and their mean
        ranks better than one fit (three members with 30 s each: +0.010 mean AUROC on
        ADBench, 54 runs, and +0.025 on scikit-learn's bundled sets; sharing the table's 30 s:
        +0.008, mean rank 4.63 to 4.17; README, ADBench) at ``n_members`` times the cost of
        training, scoring and the saved model. ``"auto"`` is 3 on tabular rows and 1 on
        images, where fits are long and a member trained for a share of a time budget loses
        more than averaging gains.
        ``max_training_seconds`` is shared among the members. Codes, reconstructions,
        samples and inpainting come from the first member.
    device : str, default="auto"
        Training device: "auto", "cpu", "cuda" or "cuda:N".
    random_state : int, RandomState instance or None, default=None
        Seeds initialisation and training; an int makes fit and scores reproducible on CPU.
    verbose : int, default=0
        0 is silent; 1 shows a progress bar over epochs.

    Attributes
    ----------
    offset_ : float
        ``decision_function = score_samples - offset_``; set by ``contamination``, or by
        ``alpha`` once calibrated.
    score_rule_ : str
        The score rule in use (``score_rule`` with ``"auto"`` resolved).
    input_shape_ : tuple of int
        Shape of one sample seen by the networks: ``(n_features,)`` or ``(C, H, W)``.
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Only when X has string column names.
    training_history_ : list of dict
        Per-epoch metrics: each loss term, energy gap, mean encoder variance, seconds; with
        several members, every member's epochs in turn, each record with its ``"member"``.
    n_members_ : int
        The number of members (``n_members`` with ``"auto"`` resolved).
    scorer_ : AnomalyScorer or ScorerEnsemble
        The fitted scoring module (float64, CPU): a ``ScorerEnsemble`` of ``n_members_``
        scorers when there are several.

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> X = load_digits().data
    >>> det = LatentEBMDetector(epochs=5, random_state=0).fit(X)
    >>> det.predict(X[:3]).shape
    (3,)
    """

    # Each parameter's accepted values, checked by scikit-learn at the start of fit (bad
    # values raise InvalidParameterError, a ValueError naming the parameter and the values).
    _parameter_constraints: ClassVar[dict] = {
        "objective": [StrOptions({"triangle", "vae"})],
        "score_rule": [StrOptions({"auto", *SCORE_RULES})],
        "inference_loss": [StrOptions({"kl_plus", "kl_minus"})],
        "latent_dim": [_positive(Integral)],
        "width": [_positive(Integral), None],
        "depth": [_positive(Integral)],
        "energy_width": [_positive(Integral), None],
        "energy_scale": [_positive()],
        "epochs": [_positive(Integral)],
        "max_training_seconds": [_positive(), None],
        "batch_size": [_positive(Integral)],
        "learning_rate": [_positive()],
        "ebm_learning_rate": [_positive()],
        "weight_decay": [_Interval(Real, 0, np.inf, closed="left")],
        "lr_decay": [_positive(upper=1.0, closed="right")],
        "decoder_sigma": [_positive()],
        "image_shape": ["array-like", None],
        "contamination": [StrOptions({"auto"}), _positive(upper=0.5, closed="right")],
        "alpha": [_positive(upper=1.0), None],
        "calibration": [_positive(upper=1.0), None],
        "critic_negatives": [StrOptions({"auto"}), "array-like"],
        "trim_fraction": [_Interval(Real, 0, 1, closed="left")],
        "update_order": [StrOptions(set(UPDATE_ORDERS))],
        "critic_every": [_positive(Integral)],
        "training_precision": [StrOptions(set(PRECISIONS))],
        "model_pairs_fraction": [_positive(upper=1.0, closed="right")],
        "missing": [StrOptions(set(MISSING_OPTIONS))],
        "bank_size": [_positive(Integral)],
        "n_members": [StrOptions({"auto"}), _positive(Integral)],
        "device": [str],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        *,
        objective: str = "triangle",
        score_rule: str = "auto",
        inference_loss: str = "kl_plus",
        latent_dim: int = 32,
        width: int | None = None,
        depth: int = 2,
        energy_width: int | None = None,
        energy_scale: float = 10.0,
        epochs: int = 100,
        max_training_seconds: float | None = None,
        batch_size: int = 64,
        learning_rate: float = 3e-4,
        ebm_learning_rate: float = 1e-4,
        weight_decay: float = 1e-4,
        lr_decay: float = 0.998,
        decoder_sigma: float = 0.1,
        image_shape: Sequence[int] | None = None,
        contamination: str | float = "auto",
        alpha: float | None = None,
        calibration: float | None = None,
        critic_negatives: str | Sequence[str] = "auto",
        trim_fraction: float = 0.05,
        update_order: str = "simultaneous",
        critic_every: int = 1,
        training_precision: str = "float32",
        model_pairs_fraction: float = 0.25,
        missing: str = "error",
        bank_size: int = 50_000,
        n_members: int | str = "auto",
        device: str = "auto",
        random_state=None,
        verbose: int = 0,
    ) -> None:
        self.objective = objective
        self.score_rule = score_rule
        self.inference_loss = inference_loss
        self.latent_dim = latent_dim
        self.width = width
        self.depth = depth
        self.energy_width = energy_width
        self.energy_scale = energy_scale
        self.epochs = epochs
        self.max_training_seconds = max_training_seconds
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.ebm_learning_rate = ebm_learning_rate
        self.weight_decay = weight_decay
        self.lr_decay = lr_decay
        self.decoder_sigma = decoder_sigma
        self.image_shape = image_shape
        self.contamination = contamination
        self.alpha = alpha
        self.calibration = calibration
        self.critic_negatives = critic_negatives
        self.trim_fraction = trim_fraction
        self.update_order = update_order
        self.critic_every = critic_every
        self.training_precision = training_precision
        self.model_pairs_fraction = model_pairs_fraction
        self.missing = missing
        self.bank_size = bank_size
        self.n_members = n_members
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    # ------------------------------------------------------------------ fitting
    def _check_params(self) -> None:
        """What ``_parameter_constraints`` cannot say: settings that exclude each other."""
        if self.objective == "vae" and self.score_rule == "energy":
            raise ValueError("score_rule='energy' needs objective='triangle': "
                             "the VAE has no energy")

    def _check_group(self) -> None:
        """In a torch.distributed group every process must draw the same rows and noise."""
        shard = current_shard()
        if shard is not None and not isinstance(self.random_state, numbers.Integral):
            raise ValueError("fitting in a torch.distributed group of "
                             f"{shard.world_size} processes needs random_state set to the "
                             "same int in every process, so that all draw the same rows and "
                             f"noise; got random_state={self.random_state!r}")

    def _fingerprint(self, digest) -> str:
        """sha256 of the preprocessed training data (``digest``, a sha256 object fed with
        them) and of the parameters that shape training: a checkpoint is only resumed by the
        fit that wrote it."""
        digest = digest.copy()
        params = {k: v for k, v in self.get_params().items() if k not in ("verbose", "device")}
        digest.update(repr(sorted((k, v if isinstance(v, (str, int, float, tuple, type(None)))
                                   else type(v).__name__) for k, v in params.items())).encode())
        return digest.hexdigest()

    def _resolve_score_rule(self, is_image: bool) -> str:
        """The score rule ``score_rule`` stands for on images or on tabular rows."""
        if self.score_rule != "auto":
            return self.score_rule
        return "latent_fused" if is_image else "global_fused"

    def _resolve_n_members(self, is_image: bool) -> int:
        """The number of members ``n_members`` stands for on images or on tabular rows."""
        if isinstance(self.n_members, str):
            return 1 if is_image else 3
        return int(self.n_members)

    def _network_config(self, input_shape: tuple[int, ...]) -> NetworkConfig:
        return NetworkConfig(input_shape=input_shape, latent_dim=int(self.latent_dim),
                             width=None if self.width is None else int(self.width),
                             depth=int(self.depth), energy_width=self.energy_width,
                             energy_scale=float(self.energy_scale))

    def _resolve_critic_negatives(self, is_image: bool) -> tuple[str, ...]:
        """The extra critic negatives ``critic_negatives`` stands for on images or rows."""
        if isinstance(self.critic_negatives, str) and self.critic_negatives == "auto":
            return () if is_image else ("wide", "suspect")
        return self.critic_negatives

    def _train_config(self, is_image: bool = False) -> TrainConfig:
        """The training settings; ``is_image`` resolves the ``"auto"`` settings (validation
        before the data are read may leave it at its default)."""
        return TrainConfig(
            objective=self.objective, inference_loss=self.inference_loss,
            epochs=int(self.epochs), batch_size=int(self.batch_size),
            ebm_learning_rate=float(self.ebm_learning_rate),
            learning_rate=float(self.learning_rate),
            weight_decay=float(self.weight_decay), lr_decay=float(self.lr_decay),
            decoder_sigma=float(self.decoder_sigma),
            critic_negatives=self._resolve_critic_negatives(is_image),
            trim_fraction=float(self.trim_fraction),
            update_order=self.update_order,
            critic_every=self.critic_every,
            training_precision=self.training_precision,
            model_pairs_fraction=float(self.model_pairs_fraction),
            max_training_seconds=(None if self.max_training_seconds is None
                                  else float(self.max_training_seconds)),
        )

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None, *, callbacks: Sequence[EpochCallback] = (),
            checkpoint_dir: str | Path | None = None, resume: bool = False,
            checkpoint_every: int = 1):
        """Learn the preprocessing and train the networks on ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features), (n, H, W) or (n, C, H, W)
            Training data, assumed mostly normal.
        y : Ignored
        callbacks : sequence of callables, optional
            Each is called as ``callback(epoch, metrics)`` after every epoch (for example to
            log to MLflow). With several members (``n_members``) the epochs count on from
            one member to the next and the metrics hold the ``"member"`` trained.
        checkpoint_dir : path-like, optional
            Write the whole training state (networks, optimizers, learning rates, random
            generator, metrics) to ``checkpoint_dir/checkpoint.pt`` every
            ``checkpoint_every`` epochs, atomically, so that a killed fit can be resumed.
        resume : bool, default=False
            Continue from the checkpoint in ``checkpoint_dir`` when there is one (otherwise
            start afresh, so the same call can simply be rerun after a kill). A resumed fit
            ends with the same model as an uninterrupted one on the same device and number
            of torch threads (other thread counts round differently, to about 1e-8). A checkpoint
            of other data or other parameters is refused.
        checkpoint_every : int, default=1
            Epochs between checkpoints.

        Returns
        -------
        self : LatentEBMDetector
        """
        checkpoint = _checkpoint_settings(checkpoint_dir, resume, checkpoint_every)
        return self._keeping_state_on_failure(lambda: self._fit(X, callbacks, checkpoint))

    @_fit_context(prefer_skip_nested_validation=True)
    def fit_stream(self, batches: Callable[[], Iterable], *,
                   callbacks: Sequence[EpochCallback] = (),
                   checkpoint_dir: str | Path | None = None, resume: bool = False,
                   checkpoint_every: int = 1, spill_dir: str | Path | None = None):
        """Fit on rows read in batches, for data larger than memory.

        Three passes over ``batches``: the preprocessing statistics (one streaming pass,
        equal to :meth:`fit`'s up to float64 rounding), a preprocessed float32 copy of the
        rows written to disk and read back a window at a time to train (memory does not grow
        with the rows), and the training rows' scores for ``offset_`` (a seeded sample of
        ``OFFSET_ROWS`` of them beyond that many). The bank of training codes is the same
        seeded subset :meth:`fit` keeps. When all rows fit in one read window (64 MiB of
        float32), the epochs visit them in :meth:`fit`'s order, and the fitted model is
        :meth:`fit`'s on the stacked batches; beyond, minibatches mix rows within shuffled
        windows of shuffled blocks.

        Parameters
        ----------
        batches : callable
            Called with no argument, returns an iterable of 2-D batches of rows (arrays or
            DataFrames with the same columns), the same rows in the same order at each call,
            e.g. ``lambda: serving.data_files.iter_row_batches(path, 65536)``. Images come
            as flat rows, with ``image_shape`` set. Missing values (``missing="mask"``) and
            ``calibration`` need :meth:`fit`; calibrate afterwards with :meth:`calibrate`.
        callbacks, checkpoint_dir, resume, checkpoint_every
            As in :meth:`fit`.
        spill_dir : path-like, optional
            Directory for the float32 copy of the rows (4 bytes per value, deleted at the
            end); a temporary directory by default.

        Returns
        -------
        self : LatentEBMDetector
        """
        checkpoint = _checkpoint_settings(checkpoint_dir, resume, checkpoint_every)
        if not callable(batches):
            raise TypeError("batches must be a callable that returns an iterable of batches "
                            f"of rows (it is read three times), got {type(batches).__name__}")
        return self._keeping_state_on_failure(
            lambda: self._fit_stream(batches, callbacks, checkpoint, spill_dir))

    def _keeping_state_on_failure(self, fit: Callable[[], LatentEBMDetector]):
        """Run ``fit``; if it fails, leave the estimator as it was: the previous model, or
        unfitted."""
        fitted_state = {k: v for k, v in vars(self).items()
                        if k.endswith("_") or k.startswith("_")}
        try:
            return fit()
        except BaseException:
            for name in [k for k in vars(self) if k.endswith("_") or k.startswith("_")]:
                delattr(self, name)
            vars(self).update(fitted_state)
            raise

    def _fit_stream(self, batches: Callable[[], Iterable], callbacks: Sequence[EpochCallback],
                    checkpoint: tuple[Path, bool, int] | None, spill_dir) -> LatentEBMDetector:
        self._check_params()
        self._check_group()
        resolve_device(self.device)
        self._train_config()
        if self.missing == "mask":
            raise ValueError("fit_stream does not learn with missing entries; use fit with "
                             "missing='mask' on data that fits in memory")
        if self.calibration is not None:
            raise ValueError("fit_stream holds out no calibration rows; fit with "
                             "calibration=None and call calibrate(X_normal) after")

        def validated_batches() -> Iterator[np.ndarray]:
            for batch in batches():
                if np.ndim(batch) != 2:
                    raise ValueError("fit_stream takes 2-D batches of rows; pass images as "
                                     "flat rows with image_shape set")
                if len(batch):
                    yield validate_samples(self, batch, reset=False)[0]

        moments = ColumnMoments()
        first = True
        for batch in batches():
            if first and len(batch):
                # the first batch sets n_features_in_ (and feature_names_in_ for a frame)
                moments.update(validate_samples(self, batch, reset=True)[0])
                first = False
            elif not first:
                moments.update(validate_samples(self, batch, reset=False)[0])
        if moments.n_rows == 0:
            raise ValueError("batches gave no rows to fit on")
        if moments.n_rows < 2:
            raise ValueError("fit_stream needs at least 2 rows")
        n_features = self.n_features_in_
        input_shape = self._stream_input_shape(n_features)
        network_config = self._network_config(input_shape)
        self.score_rule_ = self._resolve_score_rule(network_config.is_image)
        self._sample_shape = (n_features,)
        self.input_shape_ = input_shape
        if network_config.is_image:
            shift, scale = _image_scaling(float(moments.low.min()), float(moments.high.max()),
                                          n_features)
        else:
            if not np.all(np.isfinite(moments.std)):
                raise ValueError("a column's values are too large to standardise in a "
                                 "streaming pass (squares overflow float64); rescale it")
            scale = _column_scaling(moments.mean, moments.std)
            shift = moments.mean
        self.training_mean_ = moments.mean

        seed = _torch_seed(self.random_state)
        n_rows = moments.n_rows
        bank_size = int(self.bank_size)
        bank_index = None if n_rows <= bank_size else _bank_rows(n_rows, bank_size, seed)
        with tempfile.TemporaryDirectory(dir=spill_dir, prefix="divtri-spill-") as directory:
            path = Path(directory) / "rows.f32"
            bank, digest = _spill(validated_batches(), shift, scale, path, bank_index)
            rows = SpilledRows(path, n_rows, input_shape)
            fingerprint = None if checkpoint is None else self._fingerprint(digest)
            self._train(network_config, rows, shift, scale, seed, callbacks, checkpoint,
                        fingerprint)
        self.scorer_.calibrate(torch.from_numpy(bank))
        self._set_offset(self._sampled_training_scores(validated_batches(), n_rows, seed))
        return self

    def _stream_input_shape(self, n_features: int) -> tuple[int, ...]:
        if self.image_shape is None:
            return (n_features,)
        input_shape = image_shape_tuple(self.image_shape)
        if int(np.prod(input_shape)) != n_features:
            raise ValueError(f"image_shape {tuple(self.image_shape)} holds "
                             f"{int(np.prod(input_shape))} values, but the rows have "
                             f"{n_features} features")
        return input_shape

    def _sampled_training_scores(self, batches: Iterable[np.ndarray], n_rows: int,
                                 seed: int) -> np.ndarray:
        """score_samples of every training row, or of a seeded Bernoulli sample of about
        ``OFFSET_ROWS`` of them when there are more, so that memory stays bounded."""
        keep = min(1.0, OFFSET_ROWS / n_rows)
        rng = np.random.RandomState(seed)
        scores = []
        for batch in batches:
            if keep < 1.0:
                batch = batch[rng.random_sample(len(batch)) < keep]
            scores.append(self._score_rows(batch))
        return np.concatenate(scores)

    def _fit(self, X, callbacks: Sequence[EpochCallback],
             checkpoint: tuple[Path, bool, int] | None):
        self._check_params()
        self._check_group()
        # an absent device and settings that exclude each other fail before any work
        resolve_device(self.device)
        self._train_config()
        X, sample_shape = validate_samples(self, X, reset=True,
                                           allow_nan=self.missing == "mask")
        X_calibration = None
        if self.calibration is not None:
            n_calibration = round(self.calibration * len(X))
            if n_calibration < 1 or len(X) - n_calibration < 2:
                raise ValueError(f"calibration={self.calibration} of {len(X)} rows leaves "
                                 f"{n_calibration} calibration and {len(X) - n_calibration} "
                                 "training rows; need at least 1 and 2")
            held_out = np.zeros(len(X), dtype=bool)
            held_out[check_random_state(self.random_state).permutation(len(X))[
                :n_calibration]] = True
            X, X_calibration = X[~held_out], X[held_out]
        if self.image_shape is not None:
            input_shape = image_shape_tuple(self.image_shape)
            if sample_shape is not None and (1, *sample_shape)[-3:] != input_shape:
                raise ValueError(f"image_shape {tuple(self.image_shape)} does not match the "
                                 f"images in X, of shape {sample_shape}; leave image_shape "
                                 "unset for image input, or pass flat rows")
            if int(np.prod(input_shape)) != X.shape[1]:
                raise ValueError(f"image_shape {tuple(self.image_shape)} holds "
                                 f"{int(np.prod(input_shape))} values, but X has {X.shape[1]} "
                                 "features per sample")
        elif sample_shape is not None:
            input_shape = sample_shape if len(sample_shape) == 3 else (1, *sample_shape)
        else:
            input_shape = (X.shape[1],)
        network_config = self._network_config(input_shape)
        self.score_rule_ = self._resolve_score_rule(network_config.is_image)
        self._sample_shape = sample_shape if sample_shape is not None else (X.shape[1],)
        self.input_shape_ = input_shape

        missing = np.isnan(X)
        has_missing = bool(missing.any())
        if network_config.is_image:
            with warnings.catch_warnings():  # a pixel never observed: "mean of empty slice"
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(X, axis=0) if has_missing else X.mean(axis=0)
            shift, scale = _image_scaling(float(np.nanmin(X)), float(np.nanmax(X)), X.shape[1])
            # a pixel never observed starts at the middle of the range, 0 in model space
            self.training_mean_ = np.where(np.isnan(mean), shift, mean)
        else:
            never_seen = np.flatnonzero(missing.all(axis=0))
            if never_seen.size:
                raise ValueError(f"columns {never_seen[:10].tolist()} of X hold no observed "
                                 "value (all NaN): nothing can be learnt about them; drop "
                                 "them")
            shift = np.nanmean(X, axis=0) if has_missing else X.mean(axis=0)
            scale = _column_scaling(shift, _column_std(X, shift))
            self.training_mean_ = shift

        seed = _torch_seed(self.random_state)
        data = torch.as_tensor((X - shift) / scale, dtype=torch.float32,
                               device=resolve_device(self.device))
        data = data.reshape(-1, *input_shape)
        # Missing entries start at the training mean (0 here); training refills them.
        observed = ~torch.isnan(data) if has_missing else None
        fingerprint = None if checkpoint is None else self._fingerprint(
            hashlib.sha256(data.detach().cpu().contiguous().numpy().tobytes()))
        if observed is not None:
            data = torch.nan_to_num(data, nan=0.0)
        self._train(network_config, data, shift, scale, seed, callbacks, checkpoint,
                    fingerprint, observed)

        bank_size = int(self.bank_size)
        bank = X if len(X) <= bank_size else X[_bank_rows(len(X), bank_size, seed)]
        self.scorer_.calibrate(torch.tensor(bank))  # a copy: X may be a read-only view
        if self.scorer_.allows_missing:
            self.scorer_.calibrate_missing_rates(torch.tensor(bank), seed)
        # Training rows are scored as predict() will score them (a row in the bank is its own
        # nearest code), so that predict(X) flags the `contamination` fraction of them, as
        # scikit-learn's contract says (of a seeded sample of OFFSET_ROWS of them beyond that
        # many, which bounds the cost of a large fit); unseen rows score a little more
        # anomalous.
        self._set_offset(self._sampled_training_scores([X], len(X), seed))
        if X_calibration is not None:
            self._calibrate_rows(X_calibration)
        return self

    def _train(self, network_config: NetworkConfig, data, shift: np.ndarray,
               scale: np.ndarray, seed: int, callbacks: Sequence[EpochCallback],
               checkpoint: tuple[Path, bool, int] | None, fingerprint: str | None,
               observed: torch.Tensor | None = None) -> None:
        """Build and train the networks on preprocessed ``data`` (a tensor on the device or
        :class:`training.streaming.SpilledRows`), then set ``scorer_`` (not yet calibrated)
        and the training history."""
        device = resolve_device(self.device)
        train_config = self._train_config(network_config.is_image)
        n_members = self._resolve_n_members(network_config.is_image)
        started = time.perf_counter()
        members, epochs, rollbacks = [], [], 0
        for member in range(n_members):
            member_callbacks = callbacks
            if n_members > 1:
                # the epochs count on across the members, so that a logger's steps never
                # repeat; the metrics say which member each epoch trained
                member_callbacks = [_MemberCallback(callback, member, len(epochs))
                                    for callback in callbacks]
            budget = train_config.max_training_seconds
            if budget is not None:  # what is left, shared among the members still to train
                left = budget - (time.perf_counter() - started)
                budget = max(left, MIN_MEMBER_SECONDS) / (n_members - member)
            networks, history = self._train_member(
                network_config, replace(train_config, max_training_seconds=budget), data,
                _member_seed(seed, member), device, member_callbacks, checkpoint,
                fingerprint if member == 0 or fingerprint is None
                else f"{fingerprint}:member{member}",
                observed, member)
            members.append(AnomalyScorer(
                networks, torch.from_numpy(shift), torch.from_numpy(scale), self.input_shape_,
                self.score_rule_, train_config.decoder_sigma,
                allows_missing=self.missing == "mask").eval())
            epochs += ([{**record, "member": member} for record in history.epochs]
                       if n_members > 1 else history.epochs)
            rollbacks += history.rollbacks
        self.scorer_ = members[0] if n_members == 1 else ScorerEnsemble(members).eval()
        self.n_members_ = n_members
        self.training_history_ = epochs
        self.n_rollbacks_ = rollbacks

    def _train_member(self, network_config: NetworkConfig, train_config: TrainConfig, data,
                      seed: int, device, callbacks: Sequence[EpochCallback],
                      checkpoint: tuple[Path, bool, int] | None, fingerprint: str | None,
                      observed: torch.Tensor | None, member: int):
        """Build and train one member's networks from ``seed``; its checkpoints go to
        ``checkpoint``'s directory (the first member) or a ``member<i>`` folder in it."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            networks = build_networks(network_config, with_energy=self.objective == "triangle")
        networks.to(device)
        generator = torch.Generator(device=device).manual_seed(seed)
        checkpointer = None
        if checkpoint is not None:
            directory, resume, every = checkpoint
            if member:
                directory = Path(directory) / f"member{member}"
            checkpointer = Checkpointer(directory, fingerprint, every, resume)
        history = train_networks(networks, data, train_config, generator=generator,
                                 callbacks=callbacks, verbose=int(self.verbose),
                                 checkpointer=checkpointer, observed=observed,
                                 shard=current_shard())
        networks.freeze_spectral_norm()
        networks.to("cpu", torch.float64)
        return networks, history

    def _set_offset(self, train_scores: np.ndarray) -> None:
        """``offset_`` from the training rows' scores (see ``contamination``)."""
        if self.contamination == "auto":
            q1, q3 = np.percentile(train_scores, [25.0, 75.0])
            self.offset_ = float(q1 - 1.5 * (q3 - q1))
        else:
            self.offset_ = float(np.percentile(train_scores, 100.0 * self.contamination))

    # ------------------------------------------------------------------ calibration
    def calibrate(self, X):
        """Store the anomaly scores of normal rows ``X`` that the networks were not trained
        on, for :meth:`p_values`; with ``alpha`` set, also move ``offset_`` so that
        ``predict`` flags a sample exactly when its p-value is at most ``alpha``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features), (n, H, W) or (n, C, H, W)
            Normal data, exchangeable with the normal data to be scored. Beyond 10,000 rows
            a seeded random subset is kept.

        Returns
        -------
        self : LatentEBMDetector
        """
        self._calibrate_rows(self._rows(X))
        return self

    def _calibrate_rows(self, rows: np.ndarray) -> None:
        if self.scorer_.allows_missing:
            # Rows the networks were not trained on show how an unseen normal row's score
            # moves with its missing rate; training rows, fitted, move more.
            self.scorer_.calibrate_missing_rates(torch.from_numpy(rows), in_bank=False)
        anomaly = -self._score_rows(rows)
        if len(anomaly) > CALIBRATION_ROWS:
            keep = np.random.RandomState(0).choice(len(anomaly), CALIBRATION_ROWS,
                                                   replace=False)
            anomaly = anomaly[keep]
        self.scorer_.calibration_scores = torch.sort(torch.from_numpy(anomaly)).values
        if self.alpha is not None:
            self.offset_ = self._alpha_offset(float(self.alpha))

    def _alpha_offset(self, alpha: float) -> float:
        """The offset at which ``predict`` flags exactly the samples with p <= alpha: minus
        the k-th largest calibration score, k = floor(alpha (n + 1)); none if k = 0."""
        descending = self.scorer_.calibration_scores.flip(0).numpy()
        k = int(np.floor(alpha * (len(descending) + 1)))
        return -np.inf if k < 1 else float(-descending[k - 1])

    def p_values(self, X) -> np.ndarray:
        """Conformal p-value of each sample: (1 + number of calibration scores at least as
        anomalous) / (n_calibration + 1). Small = anomalous; on normal data exchangeable
        with the calibration rows, P(p <= alpha) <= alpha for every alpha.

        Parameters
        ----------
        X : array-like, same layouts as ``fit``

        Returns
        -------
        p : ndarray of shape (n_samples,), in (0, 1]
        """
        rows = self._rows(X)
        if self.scorer_.calibration_scores.shape[0] == 0:
            raise ValueError("p-values need calibration: fit with calibration=0.2 (a held-out "
                             "fraction) or call calibrate(X_normal) first")
        anomaly = torch.from_numpy(-self._score_rows(rows))
        return self.scorer_.p_values(anomaly).numpy()

    # ------------------------------------------------------------------ scoring
    def _validated(self, X) -> tuple[np.ndarray, tuple[int, ...] | None]:
        """validate_samples for a fitted model: NaN only where it was fitted to take them."""
        check_is_fitted(self)
        return validate_samples(self, X, reset=False, allow_nan=self.scorer_.allows_missing)

    def _rows(self, X) -> np.ndarray:
        return self._validated(X)[0]

    def _score_rows(self, rows: np.ndarray) -> np.ndarray:
        """score_samples of validated float64 rows, in chunks to bound memory."""
        rule = self.scorer_.rule
        return -self._anomaly_by_rule(rows, (rule,))[rule]

    def _anomaly_by_rule(self, rows: np.ndarray, rules: tuple[str, ...]
                         ) -> dict[str, np.ndarray]:
        """Anomaly scores of validated float64 rows under ``rules``, in chunks."""
        by_rule = self.scorer_.scores_in_chunks(torch.tensor(rows, dtype=torch.float64), rules)
        # Overflow inside the networks (inputs near float64's limit) is the most anomalous
        # score there is, as in the exported graph; NaN would compare as an inlier.
        return {rule: np.where(np.isnan(s.numpy()), np.inf, s.numpy())
                for rule, s in by_rule.items()}

    def score_samples(self, X) -> np.ndarray:
        """Normality score, higher = more normal (the negative anomaly score).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features), (n, H, W) or (n, C, H, W)

        Returns
        -------
        scores : ndarray of shape (n_samples,), float64
        """
        return self._score_rows(self._rows(X))

    def anomaly_score(self, X) -> np.ndarray:
        """Anomaly score, higher = more anomalous (``-score_samples``, as in PyOD)."""
        return -self.score_samples(X)

    def anomaly_scores_by_rule(self, X, rules: Sequence[str] | None = None
                               ) -> dict[str, np.ndarray]:
        """Anomaly scores (higher = more anomalous) of ``X`` under several score rules from
        one pass through the networks, to compare rules on one fitted model; the rule of
        ``score_rule`` is ``anomaly_score``'s.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features), (n, H, W) or (n, C, H, W)
        rules : sequence of str, default None
            Names from ``SCORE_RULES``; None = every rule this model has (no ``"energy"``
            for ``objective="vae"``).

        Returns
        -------
        scores : dict of rule name -> ndarray of shape (n_samples,), float64
        """
        rows = self._rows(X)
        if rules is None:
            rules = tuple(r for r in SCORE_RULES
                          if r != "energy" or self.scorer_.energy is not None)
        elif isinstance(rules, str) or not all(isinstance(r, str) for r in rules):
            raise TypeError(f"rules must be a sequence of rule names, got {rules!r}")
        if "energy" in rules and self.scorer_.energy is None:
            raise ValueError("the energy rule needs objective='triangle'; this model has no "
                             "critic")
        return self._anomaly_by_rule(rows, tuple(rules))

    def decision_function(self, X) -> np.ndarray:
        """``score_samples(X) - offset_``; negative values are outliers. Shape (n_samples,)."""
        return self.score_samples(X) - self.offset_

    def predict(self, X) -> np.ndarray:
        """+1 for inliers, -1 for outliers. Shape (n_samples,)."""
        return outlier_labels(self.decision_function(X))

    def feature_scores(self, X) -> np.ndarray:
        """Each feature's (pixel's) part of the anomaly score: where in a sample its anomaly
        sits, for images an anomaly map.

        The anomaly score ``-score_samples(X)`` of each sample is shared out over its features
        in proportion to their squared standardised residuals against the model's normal
        counterpart of the sample (its reconstruction, re-encoded with the worst-fitting 10% of
        features filled in by the model, so that an anomalous region does not drag the
        reconstruction along). Values are in the score's units and each sample's sum to its
        anomaly score, so they compare across samples: a normal sample's map is faint
        everywhere. (For the likelihood rules a normal sample's score, and so its map, can be
        negative.)

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features), (n, H, W) or (n, C, H, W)

        Returns
        -------
        feature_scores : ndarray of the shape of ``X``, float64
        """
        rows, sample_shape = self._validated(X)
        anomaly = -self._score_rows(rows)
        with torch.no_grad():
            out = torch.cat([
                self.scorer_.feature_scores(torch.from_numpy(rows[i:i + CHUNK_ROWS]),
                                            torch.from_numpy(anomaly[i:i + CHUNK_ROWS]))
                for i in range(0, len(rows), CHUNK_ROWS)]).numpy()
        return self._as_output(out, sample_shape)

    # ------------------------------------------------------------------ generative use
    def _as_output(self, rows: np.ndarray, like_shape: tuple[int, ...] | None) -> np.ndarray:
        return rows if like_shape is None else rows.reshape(-1, *like_shape)

    def encode(self, X) -> np.ndarray:
        """Posterior means mu(x), shape (n_samples, latent_dim) (of the rows completed by the
        model where entries are missing)."""
        rows = self._rows(X)
        with torch.no_grad():
            mu, _ = self.scorer_.encode(self.scorer_.preprocess(torch.from_numpy(rows)))
        return mu.numpy()

    def reconstruct(self, X) -> np.ndarray:
        """g(mu(x)) in the units and shape of ``X`` (missing entries of ``X`` come back
        filled)."""
        rows, sample_shape = self._validated(X)
        with torch.no_grad():
            x = torch.from_numpy(rows)
            mu, _ = self.scorer_.encode(self.scorer_.preprocess(x))
            out = self.scorer_.postprocess(self.scorer_.generator(mu)).numpy()
        return self._as_output(out, sample_shape)

    def _check_langevin(self, langevin_steps, step_size) -> None:
        if (not isinstance(langevin_steps, numbers.Integral) or isinstance(langevin_steps, bool)
                or langevin_steps < 0):
            raise ValueError(f"langevin_steps must be a non-negative int, got "
                             f"{langevin_steps!r}")
        if (not isinstance(step_size, numbers.Real) or isinstance(step_size, bool)
                or not 0 < step_size < np.inf):
            raise ValueError(f"step_size must be a positive finite float, got {step_size!r}")
        if langevin_steps and self.scorer_.energy is None:
            raise ValueError("Langevin refinement needs the energy of objective='triangle'")

    def sample(self, n_samples: int = 1, *, langevin_steps: int = 0, step_size: float = 0.1,
               random_state=None) -> np.ndarray:
        """Draw g(z), z ~ N(0, I); with ``langevin_steps`` > 0, z first follows short-run
        Langevin dynamics on E(g(z), z) + ||z||^2 / 2 (needs the triangle objective).

        Returns
        -------
        X : ndarray of shape (n_samples, *sample shape seen in fit), in data units
        """
        check_is_fitted(self)
        if not isinstance(n_samples, numbers.Integral) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
        self._check_langevin(langevin_steps, step_size)
        rows = sample_rows(self.scorer_, int(n_samples), langevin_steps=int(langevin_steps),
                           step_size=step_size,
                           generator=torch.Generator().manual_seed(_torch_seed(random_state)))
        return rows.numpy().reshape(-1, *self._sample_shape)

    def inpaint(self, X, mask, *, n_iter: int = 20, langevin_steps: int = 0,
                step_size: float = 0.05, random_state=None) -> np.ndarray:
        """Fill the entries of ``X`` where ``mask`` is True.

        Missing entries start at the training mean; then ``n_iter`` times: encode, decode and
        replace only the missing entries. With ``langevin_steps`` > 0 each latent code is
        refined by Langevin dynamics on the observed-entry reconstruction error plus
        ||z||^2 / 2 plus E(x, z) before decoding.

        Parameters
        ----------
        X : array-like, same layouts as ``fit``; missing entries may hold NaN
        mask : array-like of bool, same shape as X; True = missing

        Returns
        -------
        X_filled : ndarray of the shape of X, observed entries unchanged
        """
        check_is_fitted(self)
        X_arr = np.asarray(X, dtype=np.float64) if not hasattr(X, "iloc") else X.to_numpy(
            dtype=np.float64)
        mask_arr = np.asarray(mask)
        if mask_arr.dtype != bool:
            raise TypeError(f"mask must be a boolean array, got dtype {mask_arr.dtype}")
        if mask_arr.shape != X_arr.shape:
            raise ValueError(f"mask has shape {mask_arr.shape}, but X has shape {X_arr.shape}")
        if not isinstance(n_iter, numbers.Integral) or isinstance(n_iter, bool) or n_iter < 1:
            raise ValueError(f"n_iter must be a positive int, got {n_iter!r}")
        self._check_langevin(langevin_steps, step_size)
        if X_arr.ndim < 2 or int(np.prod(X_arr.shape[1:])) != self.n_features_in_:
            raise ValueError(f"X has shape {X_arr.shape}, but the detector inpaints samples "
                             f"of {self.n_features_in_} values (shape "
                             f"{tuple(self._sample_shape)}), in a batch: (n, ...)")
        start = np.where(mask_arr, self.training_mean_.reshape(X_arr.shape[1:]), X_arr)
        rows, sample_shape = validate_samples(self, start, reset=False)
        filled = inpaint_rows(
            self.scorer_, torch.from_numpy(rows), torch.from_numpy(mask_arr.reshape(rows.shape)),
            n_iter=int(n_iter), langevin_steps=int(langevin_steps), step_size=step_size,
            generator=torch.Generator().manual_seed(_torch_seed(random_state)))
        return self._as_output(filled.numpy(), sample_shape)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write the fitted detector to the directory ``path`` (JSON + safetensors, no pickle).

        Returns the directory.
        """
        from anomaly._persistence import save_detector

        return save_detector(self, path)

    @classmethod
    def load(cls, path: str | Path) -> LatentEBMDetector:
        """Read a detector written by :meth:`save`; verifies the weights' checksum."""
        from anomaly._persistence import load_detector

        return load_detector(cls, path)

    def to_onnx(self, path: str | Path, graph: str = "scorer") -> Path:
        """Export to a self-contained ONNX file (see :func:`serving.export.export_onnx`):
        ``graph="scorer"`` maps raw rows to score_samples, decision and label."""
        from serving.export import export_onnx

        return export_onnx(self, path, graph=graph)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = self.missing == "mask"
        return tags
