"""Benchmark suites: each runs methods on the same rows and appends one row per result."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from anomaly import LatentEBMDetector
from evaluation import datasets, plots, protocols
from evaluation.masks import MASKS, inpainting_error, occlusion_mask, reconstruction_mse
from evaluation.methods import (
    MethodOptions,
    anomaly_scores,
    flat,
    make_method,
)
from evaluation.metrics import detection_metrics
from evaluation.results import ResultLog

logger = logging.getLogger(__name__)


def _fit_and_score(method, name: str, split: protocols.Split
                   ) -> tuple[dict[str, np.ndarray], float]:
    """Anomaly scores of the test rows per reported method name, and the fit time."""
    started = time.perf_counter()
    method.fit(flat(split.X_train))
    fit_seconds = time.perf_counter() - started
    test = flat(split.X_test)
    if not isinstance(method, LatentEBMDetector):
        return {name: anomaly_scores(method, test)}, fit_seconds
    by_rule = method.anomaly_scores_by_rule(test)
    return ({name: by_rule[method.score_rule_]}
            | {f"{name}[{rule}]": s for rule, s in by_rule.items()}), fit_seconds


def _plot_most_anomalous(detector, X_test: np.ndarray, scores: np.ndarray,
                         image_shape: tuple[int, ...], path: Path, n: int = 10) -> None:
    """The ``n`` test images the detector finds most anomalous, and their anomaly maps."""
    top = np.argsort(-np.nan_to_num(scores, nan=-np.inf))[:n]
    images = flat(X_test[top])
    maps = detector.feature_scores(images).reshape(len(top), *image_shape)
    images = images.reshape(len(top), *image_shape)
    if len(image_shape) == 3:  # one map per channel: show the first channel and the sum
        images, maps = images[:, 0], maps.sum(axis=1)
    plots.anomaly_maps([images, maps], ["most anomalous", "feature_scores"], path)


def _run_jobs(jobs, make_split, *, dataset_of, options, log: ResultLog, desc: str,
              verbose: bool, plot_dir: Path | None = None, model_dir: Path | None = None
              ) -> None:
    """Run (target, seed, method) jobs not yet in ``log``; one ROC/PR plot per (target, seed)
    is drawn from the methods run in this call. With ``model_dir``, the triangle detector
    fitted on the first seed is saved there, one directory per target, for ``divtri score``
    and ``divtri export``."""
    todo = [j for j in jobs if not log.done(dataset=dataset_of(j[0]), target=j[0], seed=j[1],
                                            method=j[2])]
    curves: dict[tuple, dict[str, np.ndarray]] = {}
    for target, seed, name in tqdm(todo, desc=desc, disable=not verbose):
        split = make_split(target, seed)
        row = {"dataset": dataset_of(target), "target": target, "seed": seed}
        try:
            method = make_method(name, seed, options)
            scored, fit_seconds = _fit_and_score(method, name, split)
        except Exception as err:
            logger.warning("%s on %s/%s seed %s failed: %s", name, row["dataset"], target,
                           seed, err)
            log.append({**row, "method": name, "auroc": np.nan, "auprc": np.nan,
                        "fit_seconds": np.nan, "error": f"{type(err).__name__}: {err}"})
            continue
        if model_dir is not None and name == "triangle" and seed == jobs[0][1]:
            method.save(model_dir / str(target))
        if (plot_dir is not None and name == "triangle" and seed == jobs[0][1]
                and options is not None and options.image_shape is not None):
            _plot_most_anomalous(method, split.X_test, scored[name], options.image_shape,
                                 plot_dir / f"{dataset_of(target)}_{target}_seed{seed}_maps.png")
        for method_name, scores in scored.items():
            finite = np.isfinite(scores).all()
            metrics = (detection_metrics(split.y_test, scores) if finite
                       else {"auroc": np.nan, "auprc": np.nan})
            log.append({**row, "method": method_name, **metrics,
                        "fit_seconds": round(fit_seconds, 2),
                        "error": "" if finite else "non-finite scores"})
        if plot_dir is not None and seed == jobs[0][1] and np.isfinite(scored[name]).all():
            curves.setdefault((target, seed), {"y": split.y_test})[name] = scored[name]
    for (target, seed), scores in curves.items():
        y = scores.pop("y")
        stem = f"{dataset_of(target)}_{target}_seed{seed}"
        plots.roc_and_pr(y, scores, plot_dir / f"{stem}_roc_pr.png", title=stem)
        plots.score_histograms(y, scores, plot_dir / f"{stem}_scores.png")


def held_out_class_suite(
    X: np.ndarray,
    y: np.ndarray,
    *,
    dataset: str,
    classes: Sequence[int],
    seeds: Sequence[int],
    methods: Sequence[str],
    log: ResultLog,
    options: MethodOptions | None = None,
    verbose: bool = True,
    plot_dir: Path | None = None,
) -> None:
    """Held-out-class protocol for every (class, seed, method) not yet in ``log``.

    Peers see flattened rows; our methods get the same rows and, when
    ``options.image_shape`` is set, reshape them to images inside the estimator.
    """
    jobs = [(c, s, m) for c in classes for s in seeds for m in methods]
    _run_jobs(jobs, lambda c, s: protocols.held_out_class(X, y, c),
              dataset_of=lambda c: dataset, options=options, log=log,
              desc=f"{dataset} held-out class", verbose=verbose, plot_dir=plot_dir)


def tabular_suite(files: Mapping[str, Path], load: Callable[[Path], tuple[np.ndarray, np.ndarray]],
                  *, seeds: Sequence[int], methods: Sequence[str], log: ResultLog,
                  options: MethodOptions | None = None, verbose: bool = True,
                  split_options: Mapping[str, Any] | None = None, plot_dir: Path | None = None,
                  model_dir: Path | None = None) -> None:
    """ADBench-style protocol (:func:`protocols.tabular` with ``split_options``) on each
    ``files`` entry (name -> path), read by ``load`` into ``X`` and ``y`` (1 = anomaly)."""
    loaded: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def split(name: str, seed: int) -> protocols.Split:
        if name not in loaded:
            loaded.clear()  # one dataset in memory at a time
            loaded[name] = load(files[name])
        return protocols.tabular(*loaded[name], seed, **(split_options or {}))

    jobs = [(n, s, m) for n in files for s in seeds for m in methods]
    _run_jobs(jobs, split, dataset_of=lambda n: n, options=options, log=log,
              desc="tables", verbose=verbose, plot_dir=plot_dir, model_dir=model_dir)


def reconstruction_and_inpainting_suite(
    X_train: np.ndarray, X_test: np.ndarray, *, low: float, high: float, seed: int,
    options: MethodOptions, out: Path, n_images: int = 1000,
    masks: Sequence[str] = MASKS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Reconstruction MSE on held-out images and inpainting errors per mask, for the
    detector, its VAE ablation and a training-mean fill. Images ``(n, H, W)``."""
    rng = np.random.RandomState(seed)
    test = X_test[rng.choice(len(X_test), min(n_images, len(X_test)), replace=False)]
    models = {name: make_method(name, seed, options).fit(X_train)
              for name in ("triangle", "vae_ablation")}
    recon_rows, inpaint_rows, grids = [], [], {}
    for name, model in models.items():
        reconstructed = model.reconstruct(test)
        recon_rows.append({"method": name, **reconstruction_mse(test, reconstructed, low,
                                                                 high)})
        grids[name] = reconstructed[:12]
    plots.image_grid([test[:12], *grids.values()], out / "reconstructions.png", low, high,
                     labels=["data", *grids])
    mean_image = X_train.mean(axis=0)
    for kind in masks:
        mask = occlusion_mask(kind, len(test), *test.shape[1:], rng)
        occluded = np.where(mask, np.nan, test)
        filled = {name: model.inpaint(occluded, mask) for name, model in models.items()}
        filled["mean_fill"] = np.where(mask, mean_image, test)
        for name, result in filled.items():
            inpaint_rows.append({"mask": kind, "method": name,
                                 "error": inpainting_error(test, result, mask, high - low)})
        shown = np.where(mask[:12], low, test[:12])
        plots.image_grid([test[:12], shown, *(r[:12] for r in filled.values())],
                         out / f"inpainting_{kind}.png", low, high,
                         labels=["data", kind, *filled])
    samples = models["triangle"].sample(12, random_state=seed)
    refined = models["triangle"].sample(12, langevin_steps=20, random_state=seed)
    plots.image_grid([samples, refined], out / "samples.png", low, high,
                     labels=["g(z)", "Langevin 20"])
    inpainting = pd.DataFrame(inpaint_rows).pivot(index="mask", columns="method",
                                                  values="error")
    return pd.DataFrame(recon_rows).set_index("method"), inpainting.loc[list(masks)]


def digits_suite(out: Path, *, classes, seeds, methods, options, verbose=True) -> ResultLog:
    """load_digits held out digit by digit; our methods see the rows as the 8x8 images they
    are (conv networks), as in every image suite, and the peers see flat pixel rows. An
    ``image_shape`` in ``options.detector_params`` wins (None: our models on flat rows too)."""
    X, y = datasets.digits()
    if options.image_shape is None and "image_shape" not in options.detector_params:
        options = dataclasses.replace(options, image_shape=tuple(X.shape[1:]))
    log = ResultLog(Path(out) / "digits.csv")
    held_out_class_suite(X, y, dataset="digits", classes=classes, seeds=seeds, methods=methods,
                         log=log, options=options, verbose=verbose, plot_dir=Path(out))
    return log
