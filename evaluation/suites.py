"""Benchmark suites: each runs methods on the same rows and appends one row per result."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from anomaly import LatentEBMDetector
from evaluation import datasets, protocols
from evaluation.methods import MethodOptions, anomaly_scores, flat, make_method, scores_by_rule
from evaluation.metrics import detection_metrics
from evaluation.results import ResultLog

logger = logging.getLogger(__name__)


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
) -> None:
    """Held-out-class protocol for every (class, seed, method) not yet in ``log``.

    Peers see flattened rows; our methods get the same rows and, when
    ``options.image_shape`` is set, reshape them to images inside the estimator.
    """
    jobs = [(c, s, m) for c in classes for s in seeds for m in methods
            if not log.done(dataset=dataset, target=c, seed=s, method=m)]
    for held_out, seed, name in tqdm(jobs, desc=f"{dataset} held-out class",
                                     disable=not verbose):
        split = protocols.held_out_class(X, y, held_out)
        method = make_method(name, seed, options)
        started = time.perf_counter()
        method.fit(flat(split.X_train))
        fit_seconds = time.perf_counter() - started
        scored = {name: anomaly_scores(method, flat(split.X_test))}
        if isinstance(method, LatentEBMDetector):
            scored.update({f"{name}[{rule}]": scores for rule, scores in
                           scores_by_rule(method, flat(split.X_test)).items()})
        for method_name, scores in scored.items():
            log.append({"dataset": dataset, "target": held_out, "seed": seed,
                        "method": method_name, **detection_metrics(split.y_test, scores),
                        "fit_seconds": round(fit_seconds, 2)})


def digits_suite(out: Path, *, classes, seeds, methods, options, verbose=True) -> ResultLog:
    X, y = datasets.digits()
    log = ResultLog(Path(out) / "digits.csv")
    held_out_class_suite(X, y, dataset="digits", classes=classes, seeds=seeds, methods=methods,
                         log=log, options=options, verbose=verbose)
    return log
