import numpy as np
import pandas as pd
import pytest

from evaluation import cli, datasets
from evaluation.localisation import PATCH, SHIFT_SDS, implant_patches, shifted_feature_rows


@pytest.mark.parametrize("kind", ["noise", "digit"])
def test_implants_change_one_square_per_image_and_the_mask_says_which_pixels(kind):
    rng = np.random.RandomState(0)
    images = (rng.rand(30, 16, 16) > 0.6) * 255.0
    implanted, changed = implant_patches(images, kind, np.random.RandomState(1), 0.0, 255.0)
    np.testing.assert_array_equal(changed, implanted != images)
    for i in range(len(images)):
        rows, cols = np.nonzero(changed[i])
        assert rows.max() - rows.min() < PATCH and cols.max() - cols.min() < PATCH
    assert changed.sum(axis=(1, 2)).mean() > 0.3 * PATCH * PATCH
    with pytest.raises(ValueError, match="implant kind"):
        implant_patches(images, "blur", rng, 0.0, 255.0)


def test_shifted_rows_move_one_non_constant_feature_by_the_stated_amount():
    X = np.random.RandomState(0).normal(size=(200, 5))
    scale = np.array([1.0, 0.0, 2.0, 0.5, 3.0])
    shifted, which = shifted_feature_rows(X, np.random.RandomState(0), scale)
    moved = shifted != X
    assert (moved.sum(axis=1) == 1).all() and (which != 1).all()
    np.testing.assert_allclose(np.abs((shifted - X)[np.arange(200), which]),
                               SHIFT_SDS * scale[which])
    assert set(which) == {0, 2, 3, 4}


def test_localisation_command_writes_both_tables_and_resumes(tmp_path, monkeypatch, capsys):
    rng = np.random.RandomState(0)
    mnist = tmp_path / "data" / "mnist"
    mnist.mkdir(parents=True)
    images = (rng.rand(60, 12, 12) * 255).astype(np.uint8)
    for i in range(datasets.MNIST_TRAIN_PARTS):
        np.savez(mnist / f"mnist_train_part{i}.npz", X=images[i * 10:(i + 1) * 10],
                 y=np.zeros(10, dtype=int))
    np.savez(mnist / "mnist_test.npz", X=images[40:], y=np.zeros(20, dtype=int))
    monkeypatch.setattr(datasets, "MNIST_TRAIN_ROWS", 40)
    tables = tmp_path / "data" / "adbench"
    tables.mkdir()
    X = rng.normal(size=(300, 4))
    np.savez(tables / "01_toy.npz", X=X, y=(rng.rand(300) < 0.1).astype(int))
    args = ["bench", "--suite", "localisation", "--data", str(tmp_path / "data"),
            "--epochs", "1", "--detector-params", '{"width": 8, "latent_dim": 2}',
            "--out", str(tmp_path)]
    out = tmp_path / "localisation"
    assert cli.main(args) == 0
    raw = pd.read_csv(out / "localisation.csv")
    pixel = raw[raw.metric == "pixel_auroc"]
    assert len(pixel) == 2 * 2 * 2  # implants x models x attributions
    assert pixel.value.between(0, 1).all()
    top1 = raw[raw.metric == "top1_shifted_feature"]
    assert set(top1.target) == {"feature_scores", "abs_residual", "largest_z (no model)"}
    assert len(top1) == 3 * 2 and top1.value.between(0, 1).all()
    assert (out / "localisation_noise.png").stat().st_size > 0
    assert "feature_scores" in capsys.readouterr().out
    assert cli.main(args) == 0
    assert len(pd.read_csv(out / "localisation.csv")) == len(raw)
