"""Train on a Spark cluster: ``divtri fit``'s data-parallel training launched by pyspark's
``TorchDistributor`` (``pip install .[spark]``); scoring stays on ``spark_udf``."""

from __future__ import annotations

from pathlib import Path


def fit_with_torch_distributor(data: str | Path, out: str | Path, params: dict, *,
                               num_processes: int = 2, local_mode: bool = True,
                               use_gpu: bool = False, stream: bool = False,
                               drop_columns=(), spill_dir: str | Path | None = None) -> Path:
    """Fit a detector on the file ``data`` with ``num_processes`` data-parallel processes
    started by ``TorchDistributor`` (each one ``torchrun`` rank, gloo on CPU and NCCL with
    ``use_gpu``), and save it to ``out``. Needs an active ``SparkSession``.

    ``local_mode=True`` runs the processes on the driver; ``False`` runs them in Spark
    barrier tasks on the executors, so ``data`` and ``out`` must then be paths every node
    reads and writes alike (DBFS, a mounted bucket, NFS). Each process reads the file
    (``stream=True``: in batches, see ``LatentEBMDetector.fit_stream``), takes its part of
    every global minibatch of ``num_processes * batch_size`` rows, and rank 0 saves.
    ``params`` are the estimator's; without ``random_state`` one seed is drawn for all.
    Returns ``out``.
    """
    from pyspark.ml.torch.distributor import TorchDistributor

    distributor = TorchDistributor(num_processes=num_processes, local_mode=local_mode,
                                   use_gpu=use_gpu)
    params = dict(params)
    if use_gpu:
        params.setdefault("device", "cuda")
    distributor.run(_fit_in_group, str(data), str(out), params, stream, list(drop_columns),
                    None if spill_dir is None else str(spill_dir))
    return Path(out)


def _fit_in_group(data: str, out: str, params: dict, stream: bool, drop_columns: list,
                  spill_dir: str | None) -> None:
    """What each ``TorchDistributor`` process runs (it sets the torchrun environment)."""
    from serving.commands import fit_command

    fit_command(Path(data), Path(out), params, drop_columns=drop_columns, stream=stream,
                spill_dir=None if spill_dir is None else Path(spill_dir))
