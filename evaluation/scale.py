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
from collections.abc import Sequence
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


def _measure(script: str, model: Path, data: Path, out: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", script, str(model), str(data), str(out)],
                          check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def scoring_memory(log, row_counts: Sequence[int] = (1_000_000, 3_000_000, 10_000_000), *,
                   epochs: int = 3, in_memory_up_to: int = 10_000_000) -> pd.DataFrame:
    """One row per (rows, mode): ``streamed`` is ``divtri score`` (an ONNX model, parquet in,
    CSV out); ``in memory`` reads the whole file with pandas and scores it in one call.
    The model is the default detector fitted on 5,000 rows of the same distribution (seeded,
    so a resumed run scores with the same model). Each measurement is appended to ``log``
    (an :class:`evaluation.results.ResultLog`) as it finishes, and a rerun skips those
    already there."""
    from anomaly import LatentEBMDetector

    def todo(n_rows: int) -> list[tuple[str, str]]:
        modes = [("streamed", _STREAMED)]
        if n_rows <= in_memory_up_to:
            modes.append(("in memory", _IN_MEMORY))
        return [(mode, script) for mode, script in modes
                if not log.done(dataset="synthetic", target=n_rows, seed=0, method=mode)]

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = None
        for n_rows in row_counts:
            measurements = todo(n_rows)
            if not measurements:
                continue
            if model is None:
                X = np.random.RandomState(1).normal(size=(5000, N_FEATURES))
                model = LatentEBMDetector(epochs=epochs, random_state=0).fit(X).to_onnx(
                    work / "model.onnx")
            data = work / f"rows_{n_rows}.parquet"
            write_synthetic_parquet(data, n_rows)
            for mode, script in measurements:
                result = _measure(script, model, data, work / "scores.csv")
                scored = result.pop("rows")
                if scored != n_rows:
                    raise RuntimeError(f"{mode} scoring returned {scored} scores for "
                                       f"{n_rows} rows")
                log.append({"dataset": "synthetic", "target": n_rows, "seed": 0,
                            "method": mode, "file_mb": round(data.stat().st_size / 2**20, 1),
                            **result, "rows_per_second": n_rows / result["seconds"]})
            data.unlink()
    return _measurements(log, row_counts)


def training_memory(log, row_counts: Sequence[int] = (1_000_000, 3_000_000, 10_000_000), *,
                    training_seconds: float = 60.0) -> pd.DataFrame:
    """One row per (rows, mode): ``divtri fit`` on the parquet file, ``streamed``
    (``--stream``: batches in, a float32 copy on disk) or ``in memory`` (the file read
    whole). The default detector trains for ``training_seconds``, so that the rows change
    the reading, preprocessing and scoring, not the training time. Each measurement is
    appended to ``log`` (an :class:`evaluation.results.ResultLog`) as it finishes, and a rerun
    skips those already there."""
    params = {"epochs": 1000, "max_training_seconds": training_seconds, "random_state": 0,
              "verbose": 0}
    modes = ("streamed", "in memory")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for n_rows in row_counts:
            todo = [m for m in modes if not log.done(dataset="synthetic", target=n_rows,
                                                     seed=0, method=m)]
            if not todo:
                continue
            data = work / f"rows_{n_rows}.parquet"
            write_synthetic_parquet(data, n_rows)
            for mode in todo:
                done = subprocess.run([sys.executable, "-c", _FIT, mode, str(data),
                                       str(work / "model"), json.dumps(params)],
                                      check=True, capture_output=True, text=True)
                result = json.loads(done.stdout.strip().splitlines()[-1])
                log.append({"dataset": "synthetic", "target": n_rows, "seed": 0,
                            "method": mode, "file_mb": round(data.stat().st_size / 2**20, 1),
                            **result})
            data.unlink()
    return _measurements(log, row_counts)


def _measurements(log, row_counts: Sequence[int]) -> pd.DataFrame:
    """The log's rows for ``row_counts``, keyed by rows and mode."""
    frame = log.frame()
    frame = frame[frame["target"].isin(list(row_counts))]
    return (frame.rename(columns={"target": "rows", "method": "mode"})
            .drop(columns=["dataset", "seed"]))
