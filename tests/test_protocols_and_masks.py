import numpy as np
import pandas as pd
import pytest

from anomaly import LatentEBMDetector
from evaluation import cli, datasets, protocols
from evaluation.masks import (
    MASKS,
    block_side,
    inpainting_error,
    occlusion_mask,
    reconstruction_mse,
)
from evaluation.methods import MethodOptions
from evaluation.metrics import detection_metrics
from evaluation.results import ResultLog
from evaluation.suites import reconstruction_and_inpainting_suite, tabular_suite
from tests.conftest import TINY


def test_tabular_split_is_stratified_and_capped():
    rng = np.random.RandomState(0)
    X = rng.normal(size=(1000, 3))
    y = (rng.rand(1000) < 0.1).astype(int)
    split = protocols.tabular(X, y, seed=0)
    assert len(split.X_train) == 700 and len(split.X_test) == 300
    assert split.y_test.mean() == pytest.approx(y.mean(), abs=0.01)
    capped = protocols.tabular(X, y, seed=0, train_cap=100, test_cap=50)
    assert len(capped.X_train) == 100 and len(capped.X_test) == 50
    assert capped.y_test.sum() == round(50 * y.mean())
    again = protocols.tabular(X, y, seed=0)
    np.testing.assert_array_equal(again.X_test, split.X_test)
    assert not np.array_equal(protocols.tabular(X, y, seed=1).X_test, split.X_test)


def test_block_sides_scale_with_the_image():
    assert [block_side(s, 28) for s in (10, 20, 30)] == [4, 9, 13]
    assert [block_side(s, 64) for s in (10, 20, 30)] == [10, 20, 30]


@pytest.mark.parametrize("kind", MASKS)
def test_mask_coverage(kind):
    mask = occlusion_mask(kind, 200, 28, 28, np.random.RandomState(0))
    assert mask.shape == (200, 28, 28) and mask.dtype == bool
    covered = mask.reshape(200, -1).sum(1)
    if kind.startswith("P."):
        assert mask.mean() == pytest.approx(float(kind[1:]), abs=0.01)
    elif kind == "MB10":
        assert covered.max() <= 10 * 16 and covered.min() >= 16
    else:
        side = block_side(int(kind[1:]), 28)
        assert (covered == side * side).all()
    with pytest.raises(ValueError, match="unknown mask"):
        occlusion_mask("X9", 1, 8, 8, np.random.RandomState(0))


def test_inpainting_error_and_reconstruction_mse_by_hand():
    truth = np.array([[0.0, 255.0], [255.0, 0.0]])
    filled = np.array([[51.0, 0.0], [255.0, 0.0]])
    mask = np.array([[True, False], [True, False]])
    assert inpainting_error(truth, filled, mask, 255.0) == pytest.approx((51 / 255) / 2)
    with pytest.raises(ValueError, match="no pixel"):
        inpainting_error(truth, filled, np.zeros_like(mask), 255.0)
    mse = reconstruction_mse(np.array([0.0, 255.0]), np.array([0.0, 127.5]), 0.0, 255.0)
    assert mse == pytest.approx({"mse_01": 0.125, "mse_pm1": 0.5})


def test_tabular_suite_on_adbench_files(tmp_path):
    rng = np.random.RandomState(0)
    for i, name in ((1, "alpha"), (2, "beta")):
        X = np.vstack([rng.normal(size=(150, 4)), rng.normal(loc=5, size=(15, 4))])
        y = np.r_[np.zeros(150), np.ones(15)]
        np.savez(tmp_path / f"{i}_{name}.npz", X=X, y=y)
    np.savez(tmp_path / "MVTec-AD_bottle.npz", X=X, y=y)  # not ADBench's NN_name form
    files = datasets.adbench(tmp_path)
    assert list(files) == ["alpha", "beta", "MVTec-AD_bottle"]
    log = ResultLog(tmp_path / "out" / "r.csv")
    tabular_suite(files, datasets.load_adbench_file, seeds=[0], methods=["lof", "triangle"],
                  log=log, options=MethodOptions(detector_params=TINY), verbose=False,
                  model_dir=tmp_path / "models")
    frame = pd.read_csv(tmp_path / "out" / "r.csv")
    assert set(frame.dataset) == {"alpha", "beta", "MVTec-AD_bottle"}
    assert frame.loc[frame.method == "lof", "auroc"].min() > 0.9
    # the triangle of the first seed is saved per data set, and scores as it did in the run
    saved = LatentEBMDetector.load(tmp_path / "models" / "beta")
    split = protocols.tabular(*datasets.load_adbench_file(files["beta"]), 0)
    logged = frame.query("dataset == 'beta' and method == 'triangle'").auroc.item()
    assert detection_metrics(split.y_test, -saved.score_samples(split.X_test))["auroc"] \
        == pytest.approx(logged)


def test_semi_supervised_split_drops_training_anomalies_only():
    rng = np.random.RandomState(0)
    X, y = rng.normal(size=(200, 3)), np.r_[np.zeros(180), np.ones(20)].astype(int)
    unsupervised = protocols.tabular(X, y, 1)
    semi = protocols.tabular(X, y, 1, semi_supervised=True)
    np.testing.assert_array_equal(semi.X_test, unsupervised.X_test)
    assert len(unsupervised.X_train) == 140 and len(semi.X_train) == 140 - 14
    anomalies = {tuple(row) for row in X[y == 1]}
    assert not any(tuple(row) in anomalies for row in semi.X_train)


def test_reconstruction_and_inpainting_suite(tmp_path):
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, size=(60, 8, 8)).astype(np.float64)
    recon, inpaint = reconstruction_and_inpainting_suite(
        images[:40], images[40:], low=0.0, high=255.0, seed=0,
        options=MethodOptions(detector_params=TINY), out=tmp_path, n_images=10,
        masks=("P.5", "B20"))
    assert set(recon.index) == {"triangle", "vae_ablation"}
    np.testing.assert_allclose(recon["mse_pm1"], 4 * recon["mse_01"])
    assert list(inpaint.index) == ["P.5", "B20"]
    assert set(inpaint.columns) == {"triangle", "vae_ablation", "mean_fill"}
    assert ((inpaint > 0) & (inpaint < 1)).all().all()
    for png in ("reconstructions.png", "inpainting_P.5.png", "inpainting_B20.png",
                "samples.png"):
        assert (tmp_path / png).stat().st_size > 1000


@pytest.mark.slow
def test_images_suite_from_an_npz_file(tmp_path, capsys):
    rng = np.random.RandomState(0)
    X = rng.randint(0, 100, size=(90, 8, 8, 1)).astype(np.uint8)  # channels last
    y = np.repeat(np.arange(3), 30)
    X[y == 2] += 120
    np.savez(tmp_path / "toy.npz", X=X, y=y)
    code = cli.main(["bench", "--suite", "images", "--data", str(tmp_path / "toy.npz"),
                     "--classes", "2", "--epochs", "2", "--methods", "triangle,lof,pyod_ecod",
                     "--out", str(tmp_path)])
    assert code == 0
    table = pd.read_csv(tmp_path / "images" / "summary.csv", index_col=0)
    assert {"triangle", "lof", "pyod_ecod"} <= set(table.index)
    assert (tmp_path / "images" / "toy_2_seed0_roc_pr.png").is_file()
    assert (tmp_path / "images" / "toy_2_seed0_maps.png").stat().st_size > 1000
