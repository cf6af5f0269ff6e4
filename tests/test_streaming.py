"""Fitting on data read in batches: streamed statistics, rows read back from disk, and
``fit_stream`` / ``divtri fit --stream`` against the in-memory fit."""

import numpy as np
import pandas as pd
import pytest
import torch

from anomaly import LatentEBMDetector
from anomaly._moments import ColumnMoments
from evaluation import cli
from training import streaming
from training.streaming import SpilledRows

TINY = dict(epochs=3, latent_dim=2, width=16, batch_size=16, random_state=0)


def _batches(X, size):
    return lambda: (X[i:i + size] for i in range(0, len(X), size))


def test_streamed_column_statistics_equal_the_in_memory_ones():
    rng = np.random.RandomState(0)
    X = rng.standard_t(3, size=(1000, 5)) * [1.0, 1e3, 1e-3, 5.0, 1.0] + [0, 1e6, 0, -3, 7]
    moments = ColumnMoments()
    for start, stop in [(0, 1), (1, 250), (250, 251), (251, 1000)]:
        moments.update(X[start:stop])
    moments.update(X[:0])  # an empty batch changes nothing
    assert moments.n_rows == 1000
    np.testing.assert_allclose(moments.mean, X.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(moments.std, X.std(axis=0), rtol=1e-12)
    np.testing.assert_array_equal(moments.low, X.min(axis=0))
    np.testing.assert_array_equal(moments.high, X.max(axis=0))


def _spill(tmp_path, n, shape):
    rows = np.arange(n * int(np.prod(shape)), dtype=np.float32).reshape(n, *shape)
    rows.tofile(tmp_path / "rows.f32")
    return rows, SpilledRows(tmp_path / "rows.f32", n, shape)


def test_spilled_rows_visit_every_row_once_per_epoch_in_shuffled_windows(tmp_path, monkeypatch):
    monkeypatch.setattr(streaming, "BLOCK_BYTES", 4 * 3 * 10)  # blocks of 10 rows of 3 values
    monkeypatch.setattr(streaming, "WINDOW_BLOCKS", 4)  # windows of 40 rows
    rows, spilled = _spill(tmp_path, 137, (3,))
    generator = torch.Generator().manual_seed(0)
    epochs = []
    for _ in range(2):
        batches = list(spilled.minibatches(16, generator))
        assert all(len(b) <= 16 for b in batches)
        seen = torch.cat(batches)[:, 0].numpy() / 3
        epochs.append(seen)
        np.testing.assert_array_equal(np.sort(seen), np.arange(137))  # each row once
        # a minibatch mixes blocks: more than one block among its rows
        assert len(np.unique(seen[:16] // 10)) > 1
    assert not np.array_equal(epochs[0], epochs[1])
    np.testing.assert_array_equal(spilled.read_all().numpy(), rows)


def test_spilled_rows_refuse_a_file_of_another_size(tmp_path):
    _spill(tmp_path, 10, (4,))
    with pytest.raises(ValueError, match="holds 160 bytes, not the 200"):
        SpilledRows(tmp_path / "rows.f32", 10, (5,))


def test_fit_stream_on_data_that_fits_one_window_is_the_in_memory_fit(tmp_path):
    X = np.random.RandomState(0).normal(size=(150, 4)) * [1, 10, 0.1, 3]
    in_memory = LatentEBMDetector(**TINY).fit(X)
    streamed = LatentEBMDetector(**TINY).fit_stream(_batches(X, 37), spill_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # the float32 copy is gone
    probe = np.vstack([X[:20], X[:5] + 8.0])
    np.testing.assert_allclose(streamed.score_samples(probe), in_memory.score_samples(probe),
                               rtol=1e-6)
    assert streamed.offset_ == pytest.approx(in_memory.offset_, rel=1e-6)
    assert streamed.n_features_in_ == 4


def test_fit_stream_trains_across_windows_and_scores_far_rows_as_anomalies(monkeypatch):
    monkeypatch.setattr(streaming, "BLOCK_BYTES", 4 * 4 * 32)
    monkeypatch.setattr(streaming, "WINDOW_BLOCKS", 2)  # windows of 64 of the 400 rows
    X = np.random.RandomState(1).normal(size=(400, 4))
    detector = LatentEBMDetector(**TINY).fit_stream(_batches(X, 100))
    # the default's three members on rows, 3 epochs each, one after another
    assert [r["member"] for r in detector.training_history_] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert detector.training_history_[0]["batches_fraction"] == 1.0
    assert np.all(detector.score_samples(X[:10] + 20.0) < np.median(detector.score_samples(X)))


def test_fit_stream_takes_frames_and_keeps_their_column_names():
    frame = pd.DataFrame(np.random.RandomState(2).normal(size=(60, 3)), columns=["a", "b", "c"])
    detector = LatentEBMDetector(**TINY).fit_stream(
        lambda: (frame.iloc[i:i + 25] for i in range(0, 60, 25)))
    assert list(detector.feature_names_in_) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="feature names"):
        detector.score_samples(frame.rename(columns={"a": "z"}))


@pytest.mark.parametrize("params, batches, match", [
    ({"missing": "mask"}, None, "missing"),
    ({"calibration": 0.2}, None, "calibrate"),
    ({}, lambda: iter([np.ones((3, 2, 2))]), "2-D batches"),
    ({}, lambda: iter([np.ones((3, 2)), np.ones((3, 3))]), "features"),
    ({}, lambda: iter([np.ones((3, 2)), np.array([[1.0, np.nan]])]), "NaN"),
    ({}, lambda: iter([np.ones((3, 2)), np.array([[1.0, np.inf]])]), "infinity"),
    ({}, lambda: iter([np.ones((0, 2))]), "no rows"),
    ({"image_shape": (3, 3)}, lambda: iter([np.ones((4, 8))]), "image_shape"),
])
def test_fit_stream_refuses_what_it_cannot_fit_with_a_clear_error(params, batches, match):
    batches = batches or (lambda: iter([np.ones((4, 2))]))
    with pytest.raises(ValueError, match=match):
        LatentEBMDetector(**{**TINY, **params}).fit_stream(batches)


def test_fit_stream_needs_a_callable_it_can_read_again():
    with pytest.raises(TypeError, match="callable"):
        LatentEBMDetector(**TINY).fit_stream(iter([np.ones((4, 2))]))


def test_divtri_fit_stream_reads_a_parquet_file_and_drops_columns(tmp_path):
    rng = np.random.RandomState(3)
    frame = pd.DataFrame(rng.normal(size=(120, 3)), columns=["a", "b", "c"])
    frame.insert(0, "id", np.arange(120))
    frame.to_parquet(tmp_path / "rows.parquet")
    args = ["fit", str(tmp_path / "rows.parquet"), "--drop-columns", "id", "--epochs", "2",
            "--random-state", "0", "--params", '{"verbose": 0, "width": 16}']
    assert cli.main([*args, "--stream", "--out", str(tmp_path / "streamed")]) == 0
    assert cli.main([*args, "--out", str(tmp_path / "in_memory")]) == 0
    streamed = LatentEBMDetector.load(tmp_path / "streamed")
    in_memory = LatentEBMDetector.load(tmp_path / "in_memory")
    X = frame[["a", "b", "c"]]
    np.testing.assert_allclose(streamed.score_samples(X), in_memory.score_samples(X),
                               rtol=1e-6)


def test_divtri_fit_stream_takes_an_npy_file_of_images(tmp_path):
    images = np.random.RandomState(4).uniform(size=(40, 8, 8)).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    assert cli.main(["fit", str(tmp_path / "images.npy"), "--stream", "--epochs", "1",
                     "--random-state", "0", "--params", '{"verbose": 0, "width": 8}',
                     "--out", str(tmp_path / "model")]) == 0
    detector = LatentEBMDetector.load(tmp_path / "model")
    assert detector.input_shape_ == (1, 8, 8)
    assert detector.score_samples(images[:3]).shape == (3,)
