"""Peak memory and wall time of ``divtri score`` and ``divtri fit`` as the file grows,
against scoring or fitting the same rows held in memory.

Each measurement runs in its own Python process, so that its peak resident set size
(``ru_maxrss``) is its own. The synthetic parquet files are written batch by batch into a
temporary directory and deleted after.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd

N_FEATURES = 16
WRITE_BATCH_ROWS = 500_000

# Run in a fresh interpreter: score one file, print wall time and peak RSS as JSON.
_STREAMED = """
import json, resource, sys, time
from serving.commands import score_command
started = time.perf_counter()
n = score_command(sys.argv[1], sys.argv[2], sys.argv[3])
print(json.dumps({"rows": n, "seconds": time.perf_counter() - started,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""
_IN_MEMORY = """
import json, resource, sys, time
import pandas as pd
from serving.runtime import OnnxDetector
started = time.perf_counter()
rows = pd.read_parquet(sys.argv[2])
result = OnnxDetector(sys.argv[1]).score_all(rows)
pd.DataFrame(result).to_csv(sys.argv[3], index=False)
print(json.dumps({"rows": len(rows), "seconds": time.perf_counter() - started,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


# Fit on one file in a fresh interpreter; print wall time and peak RSS as JSON.
_FIT = """
import json, resource, sys, time
from serving.commands import fit_command
started = time.perf_counter()
detector = fit_command(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]),
                       stream=sys.argv[1] == "streamed")
history = detector.training_history_
print(json.dumps({"seconds": time.perf_counter() - started,
                  "training_seconds": sum(e["seconds"] for e in history),
                  "epoch_fraction": sum(e["batches_fraction"] for e in history),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_synthetic_parquet(path: Path, n_rows: int, seed: int = 0) -> None:
    """``n_rows`` x ``N_FEATURES`` standard normal rows, written batch by batch."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.RandomState(seed)
    columns = [f"x{i}" for i in range(N_FEATURES)]
    writer = None
    try:
        for start in range(0, n_rows, WRITE_BATCH_ROWS):
            block = rng.normal(size=(min(WRITE_BATCH_ROWS, n_rows - start), N_FEATURES))
            table = pa.Table.from_pandas(pd.DataFrame(block, columns=columns),
                                         preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()


def _run_script(script: str, *args) -> dict:
    """Run ``script`` in a fresh interpreter with ``args``; the JSON of its last line."""
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _measure_each_size(log, row_counts: Sequence[int], modes: Callable[[int], Sequence[str]],
                       measure: Callable[[str, Path, int], dict], work: Path) -> pd.DataFrame:
    """For each row count, the ``modes`` not yet in ``log``: one synthetic parquet file of
    that many rows, ``measure(mode, file, rows)`` on it, each result appended to ``log`` as
    it finishes. Returns the log's rows for ``row_counts``."""
    for n_rows in row_counts:
        todo = [m for m in modes(n_rows)
                if not log.done(dataset="synthetic", target=n_rows, seed=0, method=m)]
        if not todo:
            continue
        data = work / f"rows_{n_rows}.parquet"
        write_synthetic_parquet(data, n_rows)
        for mode in todo:
            log.append({"dataset": "synthetic", "target": n_rows, "seed": 0, "method": mode,
                        "file_mb": round(data.stat().st_size / 2**20, 1),
                        **measure(mode, data, n_rows)})
        data.unlink()
    return _measurements(log, row_counts)


def scoring_memory(log, row_counts: Sequence[int] = (1_000_000, 3_000_000, 10_000_000), *,
                   epochs: int = 3, in_memory_up_to: int = 10_000_000) -> pd.DataFrame:
    """One row per (rows, mode): ``streamed`` is ``divtri score`` (an ONNX model, parquet in,
    CSV out); ``in memory`` reads the whole file with pandas and scores it in one call.
    The model is the default detector fitted on 5,000 rows of the same distribution (seeded,
    so a resumed run scores with the same model), only when a measurement is left to take.
    Each measurement is appended to ``log`` (an :class:`evaluation.results.ResultLog`) as
    it finishes, and a rerun skips those already there."""
    from anomaly import LatentEBMDetector

    scripts = {"streamed": _STREAMED, "in memory": _IN_MEMORY}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)

        @cache
        def model() -> Path:
            X = np.random.RandomState(1).normal(size=(5000, N_FEATURES))
            return LatentEBMDetector(epochs=epochs, random_state=0).fit(X).to_onnx(
                work / "model.onnx")

        def modes(n_rows: int) -> list[str]:
            return ["streamed", "in memory"] if n_rows <= in_memory_up_to else ["streamed"]

        def measure(mode: str, data: Path, n_rows: int) -> dict:
            result = _run_script(scripts[mode], model(), data, work / "scores.csv")
            scored = result.pop("rows")
            if scored != n_rows:
                raise RuntimeError(f"{mode} scoring returned {scored} scores for {n_rows} "
                                   f"rows")
            return {**result, "rows_per_second": n_rows / result["seconds"]}

        return _measure_each_size(log, row_counts, modes, measure, work)


def training_memory(log, row_counts: Sequence[int] = (1_000_000, 3_000_000, 10_000_000), *,
                    training_seconds: float = 60.0) -> pd.DataFrame:
    """One row per (rows, mode): ``divtri fit`` on the parquet file, ``streamed``
    (``--stream``: batches in, a float32 copy on disk) or ``in memory`` (the file read
    whole). The default detector trains for ``training_seconds``, so that the rows change
    the reading, preprocessing and scoring, not the training time. Each measurement is
    appended to ``log`` (an :class:`evaluation.results.ResultLog`) as it finishes, and a rerun
    skips those already there."""
    params = json.dumps({"epochs": 1000, "max_training_seconds": training_seconds,
                         "random_state": 0, "verbose": 0})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        return _measure_each_size(
            log, row_counts, lambda n_rows: ["streamed", "in memory"],
            lambda mode, data, n_rows: _run_script(_FIT, mode, data, work / "model", params),
            work)


def _measurements(log, row_counts: Sequence[int]) -> pd.DataFrame:
    """The log's rows for ``row_counts``, keyed by rows and mode."""
    frame = log.frame()
    frame = frame[frame["target"].isin(list(row_counts))]
    return (frame.rename(columns={"target": "rows", "method": "mode"})
            .drop(columns=["dataset", "seed"]))
