"""Does ``alpha`` hold? Observed false-alarm rate of conformal p-values on held-out normal data.

Per run: the detector is fitted with ``calibration=0.2`` (a fifth of its normal training
rows held out to calibrate), then the test rows are scored: the false-alarm rate at alpha is
the share of normal test rows with p <= alpha, the detection rate the share of anomalies.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from anomaly import LatentEBMDetector
from evaluation import datasets, protocols
from evaluation.results import ResultLog

ALPHAS = (0.01, 0.05, 0.1)
CALIBRATION_FRACTION = 0.2


def _rates(p_values: np.ndarray, y: np.ndarray, alphas: Sequence[float]) -> list[dict]:
    return [{"alpha": alpha, "false_alarm_rate": float(np.mean(p_values[y == 0] <= alpha)),
             "detection_rate": float(np.mean(p_values[y == 1] <= alpha)),
             "normal_test_rows": int((y == 0).sum())} for alpha in alphas]


def calibration_suite(splits, *, seeds: Sequence[int], log: ResultLog, epochs: int | None,
                      onnx_seeds: Sequence[int] = (0,), alphas: Sequence[float] = ALPHAS,
                      detector_params: dict | None = None, verbose: bool = True) -> None:
    """``splits`` maps (dataset, target) to a function ``seed -> Split`` whose training rows
    are normal. Runs not yet in ``log`` are fitted and scored; for seeds in ``onnx_seeds``
    the exported ONNX model's p-values are measured too (``path`` = "onnx")."""
    jobs = [(key, seed) for key in splits for seed in seeds
            if not log.done(dataset=key[0], target=key[1], seed=seed,
                            method=f"triangle@{alphas[0]}")]
    for (dataset, target), seed in tqdm(jobs, desc="calibration", disable=not verbose):
        split = splits[(dataset, target)](seed)
        params = {**(detector_params or {}), "random_state": seed,
                  "calibration": CALIBRATION_FRACTION}
        if epochs is not None:
            params["epochs"] = epochs
        detector = LatentEBMDetector(**params).fit(split.X_train)
        paths = {"estimator": detector.p_values(split.X_test)}
        if seed in onnx_seeds:
            from serving.runtime import OnnxDetector

            with tempfile.TemporaryDirectory() as tmp:
                onnx_path = detector.to_onnx(Path(tmp) / "model.onnx")
                paths["onnx"] = OnnxDetector(onnx_path).p_values(split.X_test)
        rows = []
        for path, p_values in paths.items():
            for rate in _rates(p_values, split.y_test, alphas):
                method = f"triangle@{rate['alpha']}" + ("" if path == "estimator" else "/onnx")
                rows.append({"dataset": dataset, "target": target, "seed": seed,
                             "method": method, "path": path, **rate})
        # the estimator's rows last: a run counts as done once they are written
        for row in sorted(rows, key=lambda r: r["path"] == "estimator"):
            log.append(row)


def digits_splits(classes: Sequence[int] = tuple(range(10))) -> dict:
    X, y = datasets.digits()
    X = X.reshape(len(X), -1)
    return {("digits", digit): (lambda seed, digit=digit: protocols.held_out_class(X, y, digit))
            for digit in classes}


def adbench_splits(directory: Path) -> dict:
    """ADBench files, the semi-supervised split (the training rows are the normal ones, so
    the calibration rows drawn from them are normal); the test rows are ADBench's."""
    files = datasets.adbench(directory)

    def split(name: str, seed: int) -> protocols.Split:
        X, y = datasets.load_adbench_file(files[name])
        return protocols.tabular(X, y, seed, semi_supervised=True)

    return {("adbench", name): (lambda seed, name=name: split(name, seed)) for name in files}


def calibration_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (suite, path, alpha): mean and worst false-alarm rate over runs, and the mean
    detection rate."""
    grouped = frame.groupby(["dataset", "path", "alpha"])
    table = pd.DataFrame({
        "runs": grouped.size(),
        "false_alarm_mean": grouped.false_alarm_rate.mean(),
        "false_alarm_worst": grouped.false_alarm_rate.max(),
        "detection_mean": grouped.detection_rate.mean(),
        "normal_test_rows_mean": grouped.normal_test_rows.mean(),
    })
    table.index = [f"{dataset}, {path}, alpha={alpha}" for dataset, path, alpha in table.index]
    return table.rename_axis("suite, path, alpha")
