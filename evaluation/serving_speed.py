"""Scoring speed on the CPU: torch eager against ONNX Runtime, same fitted model.

Timed paths: the estimator's ``score_samples`` (torch, float64, what a Python user calls),
torch eager on the float32 exported module (the same graph ONNX Runtime runs), and
``OnnxDetector`` (ONNX Runtime). Batch 1 latency is measured call by call; throughput on one
large batch.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from anomaly import LatentEBMDetector
from serving.export import FusedScorer, export_scorer
from serving.runtime import OnnxDetector


def _latencies(fn: Callable[[np.ndarray], object], rows: np.ndarray, calls: int) -> np.ndarray:
    for i in range(10):
        fn(rows[i:i + 1])
    out = np.empty(calls)
    for i in range(calls):
        row = rows[i % len(rows):i % len(rows) + 1]
        started = time.perf_counter()
        fn(row)
        out[i] = time.perf_counter() - started
    return out


def _throughput(fn: Callable[[np.ndarray], object], rows: np.ndarray, repeats: int) -> float:
    fn(rows[:1000])
    best = np.inf
    for _ in range(repeats):
        started = time.perf_counter()
        fn(rows)
        best = min(best, time.perf_counter() - started)
    return len(rows) / best


def _torch_eager(detector: LatentEBMDetector) -> Callable[[np.ndarray], np.ndarray]:
    """The exported module itself (float32 networks, float64 sums) run by torch."""
    module = FusedScorer(export_scorer(detector), detector.offset_).eval()

    def run(rows: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(rows.reshape(len(rows), -1)))[0].numpy()

    return run


def time_model(name: str, detector: LatentEBMDetector, rows: np.ndarray, *,
               calls: int = 500, repeats: int = 3) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        runtime = OnnxDetector(detector.to_onnx(Path(tmp) / "model.onnx"),
                               providers=["CPUExecutionProvider"])
    paths = {"estimator (torch float64)": detector.score_samples,
             "torch eager (float32 graph)": _torch_eager(detector),
             "onnxruntime": runtime.score_samples}
    records = []
    for path, fn in paths.items():
        lat = _latencies(fn, rows, calls) * 1e3
        records.append({"model": name, "path": path, "batch1_p50_ms": np.percentile(lat, 50),
                        "batch1_p99_ms": np.percentile(lat, 99),
                        "large_batch_rows": len(rows),
                        "rows_per_s": _throughput(fn, rows, repeats)})
    return records


def serving_speed(adbench_dir: Path | None, mnist_dir: Path | None,
                  epochs: int = 2) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Returns (per-path timing table, end-to-end http table)."""
    from sklearn.ensemble import IsolationForest

    from evaluation import datasets

    rng = np.random.RandomState(0)
    if mnist_dir is not None:
        images = datasets.mnist(mnist_dir)[0][:12000].astype(np.float64)
    else:
        images = rng.randint(0, 256, (12000, 28, 28)).astype(np.float64)
    if adbench_dir is not None:
        X_http, _ = datasets.load_adbench_file(Path(adbench_dir) / "16_http.npz")
    else:
        X_http = rng.normal(size=(567498, 3))
    tabular = LatentEBMDetector(epochs=epochs, random_state=0).fit(
        X_http[rng.choice(len(X_http), 20000, replace=False)])
    conv = LatentEBMDetector(epochs=1, random_state=0).fit(images[:2000])
    timings = pd.DataFrame(
        time_model("tabular MLP (http, 3 features)", tabular, X_http[:100000])
        + time_model("conv (MNIST 28x28)", conv, images[2000:12000]))

    e2e = []
    with tempfile.TemporaryDirectory() as tmp:
        runtime = OnnxDetector(tabular.to_onnx(Path(tmp) / "http.onnx"),
                               providers=["CPUExecutionProvider"])
        forest = IsolationForest(random_state=0).fit(X_http[:20000])
        for name, fn in (("LatentEBMDetector via onnxruntime", runtime.score_samples),
                         ("LatentEBMDetector via torch (estimator)", tabular.score_samples),
                         ("IsolationForest.score_samples", forest.score_samples)):
            started = time.perf_counter()
            fn(X_http)
            e2e.append({"method": name, "rows": len(X_http),
                        "seconds": time.perf_counter() - started})
    return timings, pd.DataFrame(e2e)
