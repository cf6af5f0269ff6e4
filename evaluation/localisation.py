"""Does ``feature_scores`` point at the anomaly? Implant a known one and score the attribution.

Images: test digits with a random ``PATCH`` x ``PATCH`` square replaced by uniform noise or by
the same square of another test digit; the pixel-level AUROC of the anomaly maps, pooled over
all pixels of all implanted images, against the pixels the implant changed (a square of
background copied onto background changes nothing and counts as normal).

Tables: normal test rows with one feature, drawn at random among the non-constant ones,
shifted by ``SHIFT_SDS`` training standard deviations (random sign); the share of rows whose
largest feature score is the shifted feature.

Each is compared with the plain absolute reconstruction residual |x - g(mu(x))| (in
standardised units on tables); tables also report a reference that needs no model, the
feature farthest from its training mean in standard deviations.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from evaluation import plots

PATCH = 8
SHIFT_SDS = 5.0
IMPLANTS = ("noise", "digit")


def implant_patches(images: np.ndarray, kind: str, rng: np.random.RandomState,
                    low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    """``images`` ``(n, H, W)`` with one square implanted each, and the boolean mask of the
    pixels it changed."""
    if kind not in IMPLANTS:
        raise ValueError(f"implant kind must be one of {IMPLANTS}, got {kind!r}")
    n, height, width = images.shape
    implanted = images.astype(np.float64).copy()
    region = np.zeros(images.shape, dtype=bool)
    for i in range(n):
        top, left = rng.randint(height - PATCH + 1), rng.randint(width - PATCH + 1)
        square = (i, slice(top, top + PATCH), slice(left, left + PATCH))
        if kind == "noise":
            implanted[square] = rng.uniform(low, high, size=(PATCH, PATCH))
        else:
            donor = (i + 1 + rng.randint(n - 1)) % n  # any other image
            implanted[square] = images[donor, top:top + PATCH, left:left + PATCH]
        region[square] = True
    return implanted, region & (implanted != images)


def image_localisation(models: Mapping[str, object], test: np.ndarray, *, low: float,
                       high: float, seed: int, plot_dir: Path | None = None) -> list[dict]:
    """Pixel AUROC of ``feature_scores`` and of the absolute residual of each fitted model
    in ``models`` (name -> detector), per implant kind."""
    rows = []
    for kind in IMPLANTS:
        implanted, changed = implant_patches(test, kind, np.random.RandomState(seed), low,
                                             high)
        shown: list[np.ndarray] = [implanted[:10], changed[:10].astype(float)]
        labels = [f"{kind} implant", "changed"]
        for name, model in models.items():
            maps = {"feature_scores": model.feature_scores(implanted),
                    "abs_residual": np.abs(implanted - model.reconstruct(implanted))}
            for attribution, values in maps.items():
                rows.append({"data": "mnist", "implant": kind, "method": name,
                             "attribution": attribution,
                             "pixel_auroc": float(roc_auc_score(changed.ravel(),
                                                                values.ravel()))})
            shown.append(maps["feature_scores"][:10])
            labels.append(f"{name} map")
        if plot_dir is not None:
            plots.anomaly_maps(shown, labels, Path(plot_dir) / f"localisation_{kind}.png")
    return rows


def shifted_feature_rows(X: np.ndarray, rng: np.random.RandomState, scale: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``X`` with one non-constant feature each shifted by ``SHIFT_SDS * scale``, and
    the index of that feature."""
    candidates = np.flatnonzero(scale > 0)
    if not len(candidates):
        raise ValueError("every feature is constant; nothing to shift")
    shifted = X.astype(np.float64).copy()
    which = candidates[rng.randint(len(candidates), size=len(X))]
    sign = rng.choice([-1.0, 1.0], size=len(X))
    shifted[np.arange(len(X)), which] += sign * SHIFT_SDS * scale[which]
    return shifted, which


def tabular_localisation(model, X_train: np.ndarray, X_normal: np.ndarray, *, seed: int
                         ) -> dict[str, float]:
    """Top-1 accuracy of each attribution at finding the shifted feature."""
    mean, scale = X_train.mean(axis=0), X_train.std(axis=0)
    shifted, which = shifted_feature_rows(X_normal, np.random.RandomState(seed), scale)
    safe = np.where(scale > 0, scale, 1.0)
    attributions = {
        "feature_scores": model.feature_scores(shifted),
        "abs_residual": np.abs(shifted - model.reconstruct(shifted)) / safe,
        "largest_z (no model)": np.abs(shifted - mean) / safe,
    }
    return {name: float(np.mean(values.argmax(axis=1) == which))
            for name, values in attributions.items()}


MODELS = {"triangle": "triangle", "vae_ablation": "vae"}


def _detector(objective: str, seed: int, epochs: int | None, detector_params: dict):
    from anomaly import LatentEBMDetector

    params = {**detector_params, "objective": objective, "random_state": seed}
    if epochs is not None:
        params["epochs"] = epochs
    return LatentEBMDetector(**params)


def localisation_suite(data_root: Path, log, *, seeds, epochs: int | None,
                       image_epochs: int | None, detector_params: dict, image_params: dict,
                       datasets_wanted=None, n_images: int = 1000, plot_dir: Path | None = None,
                       verbose: bool = True) -> None:
    """MNIST (``data_root/mnist``) and the ADBench sets (``data_root/adbench``) that exist,
    appended to ``log`` (a :class:`evaluation.results.ResultLog`): ``target`` is the implant
    kind or the attribution, ``method`` the model and attribution, ``value`` the metric."""
    from tqdm.auto import tqdm

    from evaluation import datasets, protocols

    data_root = Path(data_root)
    mnist_dir = data_root / "mnist"
    if mnist_dir.is_dir() and not log.done(dataset="mnist", target=IMPLANTS[-1],
                                           seed=seeds[0], method="vae_ablation/abs_residual"):
        images, _ = datasets.mnist(mnist_dir)
        train, test = images[:datasets.MNIST_TRAIN_ROWS], images[datasets.MNIST_TRAIN_ROWS:]
        rng = np.random.RandomState(seeds[0])
        test = test[rng.choice(len(test), min(n_images, len(test)), replace=False)]
        models = {}
        for name, objective in tqdm(MODELS.items(), desc="mnist models", disable=not verbose):
            models[name] = _detector(objective, seeds[0], image_epochs,
                                     image_params).fit(train)
        low, high = float(train.min()), float(train.max())
        for row in image_localisation(models, test, low=low, high=high, seed=seeds[0],
                                      plot_dir=plot_dir):
            log.append({"dataset": "mnist", "target": row["implant"], "seed": seeds[0],
                        "method": f"{row['method']}/{row['attribution']}",
                        "metric": "pixel_auroc", "value": row["pixel_auroc"]})
    adbench_dir = data_root / "adbench"
    files = datasets.adbench(adbench_dir) if adbench_dir.is_dir() else {}
    if datasets_wanted is not None:
        files = {name: files[name] for name in datasets_wanted}
    jobs = [(name, seed) for name in files for seed in seeds
            if not log.done(dataset=name, target="largest_z (no model)", seed=seed,
                            method="vae_ablation")]
    for name, seed in tqdm(jobs, desc="tables", disable=not verbose):
        X, y = datasets.load_adbench_file(files[name])
        split = protocols.tabular(X, y, seed, semi_supervised=True)
        normal = split.X_test[split.y_test == 0]
        for model_name, objective in MODELS.items():
            model = _detector(objective, seed, epochs, detector_params).fit(split.X_train)
            accuracy = tabular_localisation(model, split.X_train, normal, seed=seed)
            for attribution, value in accuracy.items():
                log.append({"dataset": name, "target": attribution, "seed": seed,
                            "method": model_name, "metric": "top1_shifted_feature",
                            "value": value})


def localisation_tables(frame) -> dict:
    """``images``: pixel AUROC per implant (rows) and model/attribution (columns);
    ``tables``: mean top-1 accuracy over datasets and seeds per model (rows) and attribution
    (columns), with the chance level; ``tables_per_dataset``."""
    out = {}
    images = frame[frame.metric == "pixel_auroc"]
    if len(images):
        out["images"] = images.pivot_table(index="target", columns="method", values="value")
    rows = frame[frame.metric == "top1_shifted_feature"]
    if len(rows):
        per_dataset = rows.groupby(["dataset", "method", "target"]).value.mean()
        table = per_dataset.groupby(["method", "target"]).mean().unstack("target")
        table["datasets"] = rows.groupby("method").dataset.nunique()
        out["tables"] = table
        out["tables_per_dataset"] = per_dataset.unstack(["method", "target"])
    return out
