"""The ``divtri fit``, ``divtri export`` and ``divtri score`` commands."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from serving.data_files import iter_row_batches, read_rows


def fit_command(data: Path, out: Path, params: dict, *, drop_columns=(),
                checkpoint_dir: Path | None = None, resume: bool = False,
                mlflow_experiment: str | None = None, register: str | None = None,
                stream: bool = False, spill_dir: Path | None = None):
    """Fit a detector with ``params`` on the samples in ``data`` (read as ``divtri score``
    reads them) and save it to ``out``; with ``mlflow_experiment``, inside an MLflow run
    (parameters, per-epoch metrics, the ONNX-backed model, registered as ``register``).
    ``drop_columns`` are left out of a table (ids, labels). With ``stream``, the file is
    read in batches (``fit_stream``: memory does not grow with its rows), the preprocessed
    copy of the rows going to ``spill_dir``. Under ``torchrun`` the processes train as one
    data-parallel group and rank 0 alone logs and saves. Returns the fitted detector."""
    from anomaly import LatentEBMDetector
    from training.distributed import init_from_environment

    if register is not None and mlflow_experiment is None:
        raise ValueError("--register needs --mlflow-experiment")
    shard = init_from_environment(str(params.get("device", "auto")))
    if shard is not None:
        params = dict(params)
        if params.get("random_state") is None:
            params["random_state"] = shard.shared_seed()
        if not shard.is_main:
            params["verbose"] = 0
            mlflow_experiment = register = None
    if stream:
        first = next(iter_row_batches(data, 1), None)
        if first is not None and np.ndim(first) > 2:
            # images (n, H, W) / (n, C, H, W) are streamed as flat rows of that shape
            params = {"image_shape": tuple(first.shape[1:]), **params}

        def rows():
            for batch in iter_row_batches(data, SCORE_BATCH_ROWS):
                batch = _without_columns(batch, drop_columns, data)
                yield batch.reshape(len(batch), -1) if np.ndim(batch) > 2 else batch
        source = {"batches": rows}
    else:
        source = {"X": _without_columns(read_rows(data), drop_columns, data)}
    detector = LatentEBMDetector(**params)
    fit_params = {} if checkpoint_dir is None else {"checkpoint_dir": checkpoint_dir,
                                                    "resume": resume}
    if stream and spill_dir is not None:
        fit_params["spill_dir"] = spill_dir
    if mlflow_experiment is None:
        if stream:
            detector.fit_stream(source["batches"], **fit_params)
        else:
            detector.fit(source["X"], **fit_params)
    else:
        import mlflow

        from serving.mlflow_model import fit_logged

        mlflow.set_experiment(mlflow_experiment)
        with mlflow.start_run(run_name=f"fit {Path(data).name}"):
            mlflow.log_param("data", str(data))
            fit_logged(detector, source.get("X"), batches=source.get("batches"),
                       registered_model_name=register, **fit_params)
    if shard is None or shard.is_main:
        detector.save(out)
    if shard is not None:
        shard.barrier()  # the model is saved before any process reports success
        shard.close()
    return detector


def _without_columns(rows, drop_columns, data: Path):
    """``rows`` without the named columns (ids, labels), which must be there."""
    if not drop_columns:
        return rows
    if not hasattr(rows, "drop"):
        raise ValueError(f"--drop-columns needs a CSV or parquet file with column names; "
                         f"{data} has none")
    missing = [c for c in drop_columns if c not in rows.columns]
    if missing:
        raise ValueError(f"--drop-columns {missing} are not columns of {data}: "
                         f"{[str(c) for c in rows.columns]}")
    return rows.drop(columns=list(drop_columns))


def export_command(model_dir: Path, out: Path, graph: str = "scorer") -> Path:
    from anomaly import LatentEBMDetector
    from serving.export import export_onnx

    return export_onnx(LatentEBMDetector.load(model_dir), out, graph=graph)


# Rows per batch of ``divtri score``: memory stays flat in the file's size.
SCORE_BATCH_ROWS = 65_536


def score_command(model: Path, data: Path, out: Path, alpha: float | None = None,
                  batch_rows: int = SCORE_BATCH_ROWS) -> int:
    """Score ``data`` with an .onnx file (torch is not imported) or a saved detector
    directory; write score_samples, decision, label and p_value (NaN for an uncalibrated
    model) to ``out``, a CSV or (``.parquet``) a parquet file. With ``alpha`` the label flags
    p-values at most ``alpha``. The file is read and scored ``batch_rows`` rows at a time
    and each batch written as it comes (:func:`iter_row_batches`), so memory does not grow
    with the file. Returns the row count."""
    from serving.runtime import check_alpha

    if alpha is not None:
        check_alpha(alpha)
    score_batch = (_onnx_scorer(model, alpha) if Path(model).suffix.lower() == ".onnx"
                   else _detector_scorer(model, alpha))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _ScoreWriter(out) as writer:
        for rows in iter_row_batches(data, batch_rows):
            if len(rows):
                writer.write(score_batch(rows))
    return writer.n_rows


def _onnx_scorer(model: Path, alpha: float | None):
    from serving.runtime import OnnxDetector

    runtime = OnnxDetector(model)
    return lambda rows: runtime.score_all(rows, alpha=alpha)


def _detector_scorer(model: Path, alpha: float | None):
    import torch

    from anomaly import LatentEBMDetector
    from anomaly._rules import outlier_labels
    from serving.runtime import conformal_labels

    detector = LatentEBMDetector.load(model)
    calibrated = detector.scorer_.calibration_scores.shape[0] > 0
    if alpha is not None and not calibrated:
        raise ValueError("--alpha needs a calibrated model (calibrate(X_normal) or "
                         "calibration=0.2 when fitting)")

    def score_batch(rows) -> dict[str, np.ndarray]:
        if hasattr(rows, "to_numpy") and not hasattr(detector, "feature_names_in_"):
            rows = rows.to_numpy()
        score = detector.score_samples(rows)
        decision = score - detector.offset_
        # p-values from the scores already computed, not a second pass through the networks
        p_value = (detector.scorer_.p_values(torch.from_numpy(-score)).numpy() if calibrated
                   else np.full(len(score), np.nan))
        label = (outlier_labels(decision) if alpha is None
                 else conformal_labels(p_value, alpha))
        return {"score_samples": score, "decision": decision, "label": label,
                "p_value": p_value}

    return score_batch


class _ScoreWriter:
    """Appends batches of result columns to a CSV or a parquet file. Writes to a temporary
    name and renames it at the end, so a failed run leaves no half-written result under
    the name asked for."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.parquet = path.suffix.lower() == ".parquet"
        self.partial = path.with_name(path.name + ".partial")
        self.n_rows = 0
        self._parquet_writer = None

    def __enter__(self) -> _ScoreWriter:
        self.partial.unlink(missing_ok=True)
        return self

    def write(self, columns: dict[str, np.ndarray]) -> None:
        import pandas as pd

        frame = pd.DataFrame(columns)
        if self.parquet:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(frame, preserve_index=False)
            if self._parquet_writer is None:
                self._parquet_writer = pq.ParquetWriter(self.partial, table.schema)
            self._parquet_writer.write_table(table)
        else:
            frame.to_csv(self.partial, mode="a", header=self.n_rows == 0, index=False)
        self.n_rows += len(frame)

    def __exit__(self, kind, error, traceback) -> None:
        if self._parquet_writer is not None:
            self._parquet_writer.close()
        if kind is not None:
            self.partial.unlink(missing_ok=True)
            return
        if self.n_rows == 0:
            raise ValueError("no rows to score: the input file is empty")
        self.partial.replace(self.path)
