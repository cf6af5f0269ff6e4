"""Missing values: detection with cells removed, and false alarms by missing rate.

Two benchmarks for ``LatentEBMDetector(missing="mask")``:

- :func:`missing_suite`: ADBench tables with cells removed completely at random (10%, 30%,
  50%) or in a structured pattern (whole feature groups missing for blocks of rows), in
  both the training and the test rows, the same cells for every method. The detector with
  the missing cells left out is compared with its VAE ablation leaving them out, with itself
  and the peers behind scikit-learn imputers, and every method on the complete rows is the
  ceiling.
- :func:`false_alarm_suite`: on normal held-out rows of ``load_digits``, the share flagged at
  the fitted offset and at conformal alphas, by missing rate, for the estimator and for its
  ONNX export.
"""

from __future__ import annotations

import tempfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.experimental import enable_iterative_imputer  # noqa: F401  (registers it)
from sklearn.impute import IterativeImputer, SimpleImputer
from tqdm.auto import tqdm

from anomaly import LatentEBMDetector
from evaluation import datasets, protocols
from evaluation.methods import MethodOptions, anomaly_scores, make_method
from evaluation.metrics import detection_metrics
from evaluation.results import ResultLog, mean_rank

PATTERNS = ("complete", "mcar_0.1", "mcar_0.3", "mcar_0.5", "blocks")
# Peers that refuse NaN, each run behind both imputers.
IMPUTED_PEERS = ("isolation_forest", "lof", "pyod_knn", "pyod_ecod")
IMPUTERS = ("median", "iterative")
# Our models: each runs on complete rows under its own name and with missing cells left out
# as ``<name>_mask`` (both with missing="mask"); the triangle also behind the median imputer.
OUR_MODELS = ("triangle", "vae_ablation")
# The ADBench sets of 200 to 5,000 rows and 5 to 40 features (a rule on size, so the grid
# fits an afternoon on 2 cores; not a choice by results).
DEFAULT_SETS = ("Cardiotocography", "Ionosphere", "Pima", "WBC", "Wilt", "breastw", "cardio",
                "glass", "letter", "thyroid", "vertebral", "vowels", "yeast")
# Feature groups and row blocks of the structured pattern: rows fall into BLOCKS blocks;
# block 0 is complete, block j misses the j-th of BLOCKS - 1 contiguous feature groups.
BLOCKS = 4


def removal_mask(shape: tuple[int, int], pattern: str, rng: np.random.RandomState
                 ) -> np.ndarray:
    """Boolean mask ``(n, d)`` of the cells to remove (True = missing) for ``pattern``.

    ``mcar_<rate>``: each cell independently with probability ``rate``. ``blocks``: rows
    split at random into ``BLOCKS`` blocks, block 0 complete and block j without the j-th of
    ``BLOCKS - 1`` contiguous groups of features. Every row keeps at least one cell (a row
    with none cannot be scored by anything but an imputer's constant)."""
    n, d = shape
    if pattern == "complete":
        return np.zeros(shape, dtype=bool)
    if pattern.startswith("mcar_"):
        mask = rng.rand(n, d) < float(pattern.split("_", 1)[1])
    elif pattern == "blocks":
        mask = np.zeros(shape, dtype=bool)
        block = rng.randint(0, BLOCKS, n)
        groups = np.array_split(np.arange(d), BLOCKS - 1)
        for j, group in enumerate(groups, start=1):
            mask[np.ix_(block == j, group)] = True
    else:
        raise ValueError(f"unknown missing pattern {pattern!r}; expected {PATTERNS}")
    empty = np.flatnonzero(mask.all(axis=1))
    mask[empty, rng.randint(0, d, len(empty))] = False
    return mask


def _imputer(kind: str, seed: int):
    if kind == "median":
        return SimpleImputer(strategy="median")
    return IterativeImputer(max_iter=10, random_state=seed)


def method_names(pattern: str) -> list[str]:
    """The methods run on ``pattern``: on complete rows each base method once (the
    ceilings); with missing cells the detector leaving them out, its VAE ablation leaving
    them out (what the critic costs or earns there), the detector behind the median imputer
    and every peer behind each imputer."""
    if pattern == "complete":
        return ["triangle", "vae_ablation", *IMPUTED_PEERS]
    return ["triangle_mask", "vae_ablation_mask", "triangle_median",
            *(f"{peer}_{kind}" for peer in IMPUTED_PEERS for kind in IMPUTERS)]


def base_method(name: str) -> str:
    """The complete-data method whose score is ``name``'s ceiling."""
    for ours in OUR_MODELS:
        if name.startswith(ours):
            return ours
    for kind in IMPUTERS:
        if name.endswith(f"_{kind}"):
            return name[:-len(kind) - 1]
    return name


def build(name: str, seed: int, options: MethodOptions):
    """A fresh method by name (see :func:`method_names`); a peer behind an imputer is
    returned without it (the suite imputes once for all peers, see :func:`impute`)."""
    base = base_method(name)
    if base in OUR_MODELS and imputer_of(name) is None:
        options = MethodOptions(options.epochs, None,
                                {**options.detector_params, "missing": "mask"})
    return make_method(base, seed, options)


def imputer_of(name: str) -> str | None:
    """The imputer ``name`` runs behind, or None."""
    if name == "triangle_median":
        return "median"
    peer = base_method(name)
    return None if peer == name or peer in OUR_MODELS else name[len(peer) + 1:]


def impute(kind: str, X_train: np.ndarray, X_test: np.ndarray, seed: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """Training and test rows completed by the imputer ``kind`` fitted on the training
    rows, as a scikit-learn ``Pipeline`` of the imputer and a method would do."""
    imputer = _imputer(kind, seed).fit(X_train)
    return imputer.transform(X_train), imputer.transform(X_test)


def _cells_seed(dataset: str, pattern: str, seed: int) -> int:
    """The same removed cells for every method of one (dataset, pattern, seed)."""
    return zlib.crc32(f"{dataset}/{pattern}/{seed}".encode())


def missing_suite(files: Mapping[str, Path], *, seeds: Sequence[int], log: ResultLog,
                  patterns: Sequence[str] = PATTERNS, options: MethodOptions | None = None,
                  verbose: bool = True) -> None:
    """Every (dataset, pattern, seed, method) not yet in ``log``: ADBench's split
    (:func:`protocols.tabular`), the cells of :func:`removal_mask` removed from training
    and test rows, fit on the training rows, AUROC / AUPRC on the test rows."""
    options = options or MethodOptions(epochs=30)
    jobs = [(name, pattern, seed, method) for name in files for pattern in patterns
            for seed in seeds for method in method_names(pattern)]
    todo = [j for j in jobs if not log.done(dataset=j[0], target=j[1], seed=j[2], method=j[3])]
    loaded: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    prepared: dict[tuple, tuple[np.ndarray, ...]] = {}  # one (dataset, pattern, seed) at a time
    for name, pattern, seed, method_name in tqdm(todo, desc="missing values", disable=not verbose):
        if name not in loaded:
            loaded.clear()
            loaded[name] = datasets.load_adbench_file(files[name])
        if (name, pattern, seed) not in prepared:
            prepared.clear()
            split = protocols.tabular(*loaded[name], seed)
            rng = np.random.RandomState(_cells_seed(name, pattern, seed))
            X_train = np.where(removal_mask(split.X_train.shape, pattern, rng), np.nan,
                               split.X_train)
            X_test = np.where(removal_mask(split.X_test.shape, pattern, rng), np.nan,
                              split.X_test)
            prepared[(name, pattern, seed)] = (X_train, X_test, split.y_test)
            imputed: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        X_train, X_test, y_test = prepared[(name, pattern, seed)]
        row = {"dataset": name, "target": pattern, "seed": seed, "method": method_name,
               "missing_share": round(float(np.isnan(X_test).mean()), 4)}
        try:
            kind = imputer_of(method_name)
            if kind is not None and kind not in imputed:
                imputed[kind] = impute(kind, X_train, X_test, seed)
            train, test = (X_train, X_test) if kind is None else imputed[kind]
            method = build(method_name, seed, options).fit(train)
            scores = anomaly_scores(method, test)
        except Exception as err:  # a failure is a result: recorded, the grid goes on
            log.append({**row, "auroc": np.nan, "auprc": np.nan,
                        "error": f"{type(err).__name__}: {err}"})
            continue
        finite = bool(np.isfinite(scores).all())
        metrics = (detection_metrics(y_test, scores) if finite
                   else {"auroc": np.nan, "auprc": np.nan})
        log.append({**row, **metrics, "error": "" if finite else "non-finite scores"})


def missing_tables(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Mean AUROC and AUPRC over datasets (of the per-dataset means over seeds) per pattern,
    the mean rank per pattern, and each method's mean loss of AUROC against its own
    complete-data ceiling (the same base method on the complete rows)."""
    per_set = (frame.groupby(["target", "method", "dataset"])[["auroc", "auprc"]].mean()
               .reset_index())
    tables = {}
    for metric in ("auroc", "auprc"):
        table = per_set.pivot_table(index="method", columns="target", values=metric,
                                    aggfunc="mean")
        tables[f"mean_{metric}"] = table[[p for p in PATTERNS if p in table.columns]]
    ranks = {}
    for pattern in PATTERNS:
        if pattern == "complete" or pattern not in set(per_set["target"]):
            continue
        grid = per_set[per_set["target"] == pattern].pivot(index="dataset", columns="method",
                                                           values="auroc")
        ranks[pattern] = mean_rank(grid)
    if ranks:
        tables["mean_rank"] = pd.DataFrame(ranks)
    ceiling = per_set[per_set["target"] == "complete"].set_index(["method", "dataset"])["auroc"]
    losses = per_set[per_set["target"] != "complete"].copy()
    keys = list(zip(losses["method"].map(base_method), losses["dataset"], strict=True))
    losses["loss"] = ceiling.reindex(keys).to_numpy() - losses["auroc"].to_numpy()
    if losses["loss"].notna().any():
        loss = losses.pivot_table(index="method", columns="target", values="loss",
                                  aggfunc="mean")
        tables["auroc_loss_vs_complete"] = loss[[p for p in PATTERNS if p in loss.columns]]
    return tables


def false_alarm_suite(*, classes: Sequence[int], seeds: Sequence[int],
                      train_rates: Sequence[float] = (0.0, 0.3),
                      test_rates: Sequence[float] = (0.0, 0.2, 0.5),
                      alphas: Sequence[float] = (0.05, 0.1), epochs: int = 30,
                      split_seeds: Sequence[int] = (protocols.DEFAULT_SHUFFLE_SEED,),
                      detector_params: Mapping | None = None, log: ResultLog,
                      verbose: bool = True) -> None:
    """Share of normal held-out ``load_digits`` rows flagged, by missing rate.

    Per (split, held-out digit, seed, training missing rate): fit ``missing="mask"`` with 20% of
    the training rows held out for calibration (so that both the fitted offset,
    ``contamination="auto"``, and conformal p-values exist); remove cells of the normal test
    rows completely at random at each test rate; count the rows flagged at the offset and at
    each alpha, by the estimator and by its ONNX export on ONNX Runtime.

    The test normals of one split are the same rows for every model seed, so their sampling
    error does not shrink with seeds; several ``split_seeds`` (the shuffle of
    :func:`protocols.held_out_class`) draw other test rows. Rows of the default split are
    logged as dataset ``digits``, those of split s as ``digits_split<s>``."""
    from serving.runtime import OnnxDetector

    X, y = datasets.digits()
    X = X.reshape(len(X), -1)
    jobs = [(p, c, s, r) for p in split_seeds for c in classes for s in seeds
            for r in train_rates]
    todo = [j for j in jobs if not log.done(dataset=_split_name(j[0]), target=j[1], seed=j[2],
                                            method=f"train_missing_{j[3]}")]
    for split_seed, digit, seed, train_rate in tqdm(todo, desc="false alarms",
                                                    disable=not verbose):
        name = _split_name(split_seed)
        split = protocols.held_out_class(X, y, digit, shuffle_seed=split_seed)
        rng = np.random.RandomState(_cells_seed(f"{name}{digit}", f"mcar_{train_rate}", seed))
        X_train = np.where(removal_mask(split.X_train.shape, f"mcar_{train_rate}", rng), np.nan,
                           split.X_train)
        detector = LatentEBMDetector(**{**(detector_params or {}), "missing": "mask",
                                        "epochs": epochs, "calibration": 0.2,
                                        "random_state": seed}).fit(X_train)
        normal = split.X_test[split.y_test == 0]
        row = {"dataset": name, "target": digit, "seed": seed,
               "method": f"train_missing_{train_rate}", "n_normal": len(normal)}
        with tempfile.TemporaryDirectory() as tmp:
            onnx = OnnxDetector(detector.to_onnx(Path(tmp) / "scorer.onnx"))
            for rate in test_rates:
                rows = np.where(removal_mask(normal.shape, f"mcar_{rate}", rng), np.nan, normal)
                p_values = detector.p_values(rows)
                exported = onnx.score_all(rows)
                row[f"offset_fa_{rate}"] = float((detector.decision_function(rows) < 0).mean())
                row[f"onnx_offset_fa_{rate}"] = float((exported["decision"] < 0).mean())
                for alpha in alphas:
                    row[f"alpha_{alpha}_fa_{rate}"] = float((p_values <= alpha).mean())
                    row[f"onnx_alpha_{alpha}_fa_{rate}"] = float(
                        (exported["p_value"] <= alpha).mean())
        log.append(row)


def _split_name(split_seed: int) -> str:
    return "digits" if split_seed == protocols.DEFAULT_SHUFFLE_SEED else f"digits_split{split_seed}"


def false_alarm_table(frame: pd.DataFrame) -> pd.DataFrame:
    """False-alarm rates pooled over splits, digits and seeds (weighted by normal rows), one
    row per (training missing rate, test missing rate)."""
    rows = []
    for method, group in frame.groupby("method"):
        weights = group["n_normal"].to_numpy()
        rates = sorted({c.rsplit("_", 1)[1] for c in group.columns if c.startswith("offset_fa_")},
                       key=float)
        for rate in rates:
            out = {"training missing": method.rsplit("_", 1)[1], "test missing": rate,
                   "normal rows": int(weights.sum())}
            for column in group.columns:
                if column.endswith(f"_fa_{rate}"):
                    name = column[:-len(f"_fa_{rate}")]
                    out[name] = float(np.average(group[column], weights=weights))
            rows.append(out)
    return pd.DataFrame(rows).set_index(["training missing", "test missing"])


# Training images of the learning-from-incomplete-images suite: the first 10,000 of MNIST's
# training set, so that KNNImputer's distances (n x n) fit in memory and time.
IMAGE_ROWS = 10_000
IMAGE_METHODS = ("triangle_incomplete", "vae_incomplete", "triangle_complete", "vae_complete",
                 "knn_imputer", "mean_fill")


def incomplete_images_suite(images: np.ndarray, *, masks: Sequence[str], seed: int,
                            epochs: int, log: ResultLog, detector_params: Mapping | None = None,
                            methods: Sequence[str] = IMAGE_METHODS, verbose: bool = True,
                            n_recovered: int = 1000) -> None:
    """Learning from incomplete images, as in the divergence-triangle paper: each training
    image ``(n, H, W)`` loses the pixels of one occlusion mask of kind ``masks`` (a fresh
    mask per image), and each method recovers them; the error is the mean absolute
    difference on the occluded pixels over the pixel range (lower is better).

    ``*_incomplete``: the triangle / its VAE ablation fitted with ``missing="mask"`` on the
    occluded images, which then inpaint them; ``*_complete``: the same models fitted on the
    complete images (the inpainting suite's setting, a reference the incomplete models
    cannot see); ``knn_imputer``: scikit-learn's ``KNNImputer`` fitted on the occluded rows;
    ``mean_fill``: the mean of each pixel's observed values. Every method learns from all
    the occluded images; the error is measured on ``n_recovered`` of them (a seeded random
    choice, the same for every method), because recovering each one takes 20 encode-decode
    passes of the float64 scorer."""
    from sklearn.impute import KNNImputer

    from evaluation.masks import inpainting_error, occlusion_mask

    low, high = float(images.min()), float(images.max())
    n, height, width = images.shape
    params = {**(detector_params or {}), "epochs": epochs, "random_state": seed}
    complete_models: dict[str, LatentEBMDetector] = {}
    jobs = [(kind, m) for kind in masks for m in methods]
    todo = [j for j in jobs if not log.done(dataset="mnist", target=j[0], seed=seed,
                                            method=j[1])]
    for kind, method in tqdm(todo, desc="incomplete images", disable=not verbose):
        rng = np.random.RandomState(_cells_seed("mnist-images", kind, seed))
        mask = occlusion_mask(kind, n, height, width, rng)
        occluded = np.where(mask, np.nan, images.astype(np.float64))
        chosen = np.sort(rng.choice(n, min(n_recovered, n), replace=False))
        objective = "vae" if method.startswith("vae") else "triangle"
        if method.endswith("_incomplete"):
            model = LatentEBMDetector(**params, objective=objective, missing="mask")
            filled = model.fit(occluded).inpaint(occluded[chosen], mask[chosen])
        elif method.endswith("_complete"):
            if method not in complete_models:
                complete_models[method] = LatentEBMDetector(**params, objective=objective
                                                            ).fit(images)
            filled = complete_models[method].inpaint(occluded[chosen], mask[chosen])
        elif method == "knn_imputer":
            rows = occluded.reshape(n, -1)
            filled = KNNImputer(n_neighbors=5).fit(rows).transform(rows[chosen])
            # a pixel never observed in any image is dropped by the imputer: fill it with `low`
            filled = _restore_dropped(filled, rows, low).reshape(-1, height, width)
        elif method == "mean_fill":
            means = np.nanmean(occluded.reshape(n, -1), axis=0)
            means = np.where(np.isnan(means), low, means).reshape(height, width)
            filled = np.where(mask[chosen], means, images[chosen])
        else:
            raise ValueError(f"unknown method {method!r}; expected {IMAGE_METHODS}")
        log.append({"dataset": "mnist", "target": kind, "seed": seed, "method": method,
                    "n_images": n, "n_recovered": len(chosen),
                    "recovery_error": inpainting_error(images[chosen].astype(np.float64),
                                                       filled, mask[chosen], high - low)})


def incomplete_images_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Recovery error per mask (rows, in the order of ``MASKS``) and method (columns)."""
    from evaluation.masks import MASKS

    table = frame.pivot_table(index="target", columns="method", values="recovery_error",
                              aggfunc="mean")
    return table.loc[[m for m in MASKS if m in table.index],
                     [m for m in IMAGE_METHODS if m in table.columns]]


def _restore_dropped(filled: np.ndarray, fitted_rows: np.ndarray, fill: float) -> np.ndarray:
    """Put back, as ``fill``, the columns an imputer fitted on ``fitted_rows`` dropped for
    having no observed value there."""
    kept = ~np.isnan(fitted_rows).all(axis=0)
    if kept.all():
        return filled
    out = np.full((len(filled), fitted_rows.shape[1]), fill)
    out[:, kept] = filled
    return out
