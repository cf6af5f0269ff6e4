"""Data-parallel training: the shard and noise rules in one process, and real 2-process groups
under ``torchrun`` (gloo on CPU)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import anomaly._detector as detector_module
from anomaly import LatentEBMDetector
from evaluation.ddp_first_step import ROWS, first_step
from training.distributed import GlobalMinibatch, Shard

REPO = Path(__file__).resolve().parents[1]


def _torchrun(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={processes}", *args],
        cwd=REPO, capture_output=True, text=True, timeout=300)


def test_shards_split_a_minibatch_into_contiguous_parts_that_cover_it():
    rows = torch.arange(7)
    parts = [Shard(rank, 3).part(rows) for rank in range(3)]
    assert torch.equal(torch.cat(parts), rows)
    assert [len(p) for p in parts] == [3, 2, 2]
    assert Shard(0, 3).is_main and not Shard(2, 3).is_main


@pytest.mark.parametrize("share", [1.0, 0.5])
def test_ranks_noise_parts_make_up_one_process_draw_for_the_whole_minibatch(share):
    like = torch.zeros(4, 3)  # a rank's rows of a global minibatch of 8, latent size 3
    parts = []
    for rank in range(2):
        noise = GlobalMinibatch(torch.Generator().manual_seed(5), Shard(rank, 2))
        noise.begin(8)
        parts.append(noise.normal(like, share))
    one_process = torch.randn((int(8 * share), 3), generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.cat(parts), one_process)


def test_a_group_fit_needs_one_int_random_state(monkeypatch):
    monkeypatch.setattr(detector_module, "current_shard", lambda: Shard(0, 2))
    X = np.random.RandomState(0).normal(size=(20, 3))
    with pytest.raises(ValueError, match="same int in every process"):
        LatentEBMDetector(epochs=1).fit(X)


@pytest.mark.slow
@pytest.mark.parametrize("objective, order", [("triangle", "alternating"),
                                              ("triangle", "simultaneous"),
                                              ("vae", "alternating")])
def test_two_processes_take_the_step_of_one_with_twice_the_batch(tmp_path, objective, order):
    out = tmp_path / "rank0.pt"
    run = _torchrun("-m", "evaluation.ddp_first_step", str(out), objective, order)
    assert run.returncode == 0, run.stderr[-3000:]
    group = torch.load(out, weights_only=True)
    alone = first_step(ROWS, None, objective, order)
    assert group["grads"].keys() == alone["grads"].keys()
    for name, grad in alone["grads"].items():
        # DDP's average of the two halves' mean gradients is the mean over the whole batch
        torch.testing.assert_close(group["grads"][name], grad, rtol=1e-5, atol=1e-7,
                                   msg=f"gradient of {name}")
    for name, value in alone["params"].items():
        torch.testing.assert_close(group["params"][name], value, rtol=1e-5, atol=1e-6,
                                   msg=f"{name} after the step")
    # and the step did move the networks
    assert any(not torch.equal(group["params"][k], v) for k, v in alone["initial"].items())


@pytest.mark.slow
def test_divtri_fit_under_torchrun_saves_one_model_that_scores(tmp_path):
    rng = np.random.RandomState(0)
    X = rng.normal(size=(120, 5)).astype(np.float32)
    np.save(tmp_path / "rows.npy", X)
    model = tmp_path / "model"
    run = _torchrun("-m", "evaluation.cli", "fit", str(tmp_path / "rows.npy"), "--out",
                    str(model), "--epochs", "3", "--random-state", "0",
                    "--params", '{"batch_size": 16, "verbose": 0}')
    assert run.returncode == 0, run.stderr[-3000:]
    detector = LatentEBMDetector.load(model)
    # the default's three members on rows, each trained in the group for 3 epochs
    assert detector.n_members_ == 3 and len(detector.training_history_) == 3 * 3
    far = X[:5] + 25.0
    assert np.all(detector.score_samples(far) < np.median(detector.score_samples(X)))


@pytest.mark.slow
def test_a_torch_distributor_fit_saves_a_model_that_scores(tmp_path, monkeypatch):
    from pyspark.sql import SparkSession

    from serving.spark_training import fit_with_torch_distributor

    monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)
    X = np.random.RandomState(1).normal(size=(100, 4))
    np.save(tmp_path / "rows.npy", X)
    spark = (SparkSession.builder.master("local[2]").appName("divtri-test")
             .config("spark.ui.enabled", "false")
             .config("spark.driver.host", "127.0.0.1")
             .config("spark.driver.bindAddress", "127.0.0.1").getOrCreate())
    try:
        model = fit_with_torch_distributor(tmp_path / "rows.npy", tmp_path / "model",
                                           {"epochs": 2, "random_state": 0, "width": 16},
                                           num_processes=2)
    finally:
        spark.stop()
    detector = LatentEBMDetector.load(model)
    assert detector.n_members_ == 3 and len(detector.training_history_) == 3 * 2
    assert np.all(detector.score_samples(X[:5] + 25.0) < np.median(detector.score_samples(X)))
