"""Data-parallel training on this machine: does a 2-process group take the step of one
process with twice the batch, how fast does it train, and does a fit launched by Spark's
``TorchDistributor`` score like a single-process one?

Every fit runs in its own processes (``divtri fit``, ``torchrun``, ``TorchDistributor``), one
configuration at a time. ``torchrun`` gives each of its processes one thread
(``OMP_NUM_THREADS=1``); the single process keeps torch's default (one per core).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from evaluation.ddp_first_step import ROWS, first_step

FIRST_STEP_SETTINGS = (("triangle", "alternating"), ("triangle", "simultaneous"),
                       ("vae", "alternating"))


def _torchrun(processes: int, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={processes}", *args], check=True, capture_output=True,
                   text=True)


def first_step_table() -> pd.DataFrame:
    """Largest differences between 2 processes x ``ROWS / 2`` rows and 1 process x ``ROWS``
    rows after one step: gradients and parameters, per training setting."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for objective, order in FIRST_STEP_SETTINGS:
            out = Path(tmp) / "rank0.pt"
            _torchrun(2, "-m", "evaluation.ddp_first_step", str(out), objective, order)
            group = torch.load(out, weights_only=True)
            alone = first_step(ROWS, None, objective, order)

            def largest(kind: str, group=group, alone=alone) -> float:
                return max(float((group[kind][k] - v).abs().max()) for k, v in
                           alone[kind].items())

            moved = max(float((alone["params"][k] - v).abs().max())
                        for k, v in alone["initial"].items())
            rows.append({"objective": objective, "update order": order,
                         "largest gradient difference": largest("grads"),
                         "largest parameter difference": largest("params"),
                         "largest parameter move in the step": moved})
    return pd.DataFrame(rows)


def _fit_stats(model: Path, started: float) -> dict:
    from anomaly import LatentEBMDetector

    detector = LatentEBMDetector.load(model)
    history = detector.training_history_
    return {"epochs": len(history),
            "training_seconds": sum(e["seconds"] for e in history),
            "wall_seconds": time.perf_counter() - started}


def _fit(data: Path, model: Path, params: dict, processes: int) -> dict:
    args = ["-m", "evaluation.cli", "fit", str(data), "--out", str(model),
            "--params", json.dumps({"verbose": 0, **params})]
    started = time.perf_counter()
    if processes == 1:
        subprocess.run([sys.executable, *args], check=True, capture_output=True, text=True)
    else:
        _torchrun(processes, *args)
    return _fit_stats(model, started)


def throughput_table(X: np.ndarray, *, epochs: int, batch_size: int = 64) -> pd.DataFrame:
    """Training samples per second of ``divtri fit`` on the rows ``X``: one process with
    minibatches of ``batch_size`` and of twice that, and 2 processes of ``batch_size`` each
    (a global minibatch of twice that)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "rows.npy"
        np.save(data, X.astype(np.float32))
        for processes, per_process in ((1, batch_size), (1, 2 * batch_size),
                                       (2, batch_size)):
            stats = _fit(data, Path(tmp) / "model",
                         {"epochs": epochs, "batch_size": per_process, "random_state": 0},
                         processes)
            rows.append({"processes": processes, "batch per process": per_process,
                         "global batch": processes * per_process, "rows": len(X), **stats,
                         "samples_per_second":
                             len(X) * stats["epochs"] / stats["training_seconds"]})
    table = pd.DataFrame(rows)
    table["vs 1 process, same global batch"] = (
        table["samples_per_second"]
        / table.set_index("global batch").loc[2 * batch_size, "samples_per_second"].iloc[0])
    return table


def torch_distributor_table(name: str, X: np.ndarray, y: np.ndarray, *, epochs: int,
                            seed: int = 0, batch_size: int = 64) -> pd.DataFrame:
    """AUROC on the ADBench split of ``X, y`` of a fit launched by ``TorchDistributor`` (2
    processes x ``batch_size``, Spark in local mode) and of single-process fits with the
    same seed: with the same global minibatch (2 x ``batch_size``) and with the default."""
    from pyspark.sql import SparkSession
    from sklearn.metrics import roc_auc_score

    from anomaly import LatentEBMDetector
    from evaluation.protocols import tabular
    from serving.spark_training import fit_with_torch_distributor

    split = tabular(X, y, seed)
    params = {"epochs": epochs, "random_state": seed, "verbose": 0}
    rows = []
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.npy"
        np.save(data, split.X_train)
        spark = (SparkSession.builder.master("local[2]").appName("divtri-train")
                 .config("spark.ui.enabled", "false")
                 .config("spark.driver.host", "127.0.0.1")
                 .config("spark.driver.bindAddress", "127.0.0.1").getOrCreate())
        try:
            started = time.perf_counter()
            model = fit_with_torch_distributor(data, Path(tmp) / "spark",
                                               {**params, "batch_size": batch_size},
                                               num_processes=2)
            runs = [("TorchDistributor", 2, batch_size, model, _fit_stats(model, started))]
        finally:
            spark.stop()
        for per_process in (2 * batch_size, batch_size):
            model = Path(tmp) / f"single_{per_process}"
            runs.append(("divtri fit, 1 process", 1, per_process, model,
                         _fit(data, model, {**params, "batch_size": per_process}, 1)))
        for launch, processes, per_process, model, stats in runs:
            scores = -LatentEBMDetector.load(model).score_samples(split.X_test)
            rows.append({"dataset": name, "launch": launch, "processes": processes,
                         "global batch": processes * per_process,
                         "train rows": len(split.X_train),
                         "auroc": roc_auc_score(split.y_test, scores), **stats})
    return pd.DataFrame(rows)
