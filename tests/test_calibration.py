"""Conformal p-values and a threshold at a chosen false-alarm rate, on every path."""

import numpy as np
import pandas as pd
import pytest

from anomaly import LatentEBMDetector
from evaluation import cli
from serving.runtime import OnnxDetector
from tests.conftest import TINY

RNG = np.random.RandomState(0)
NORMAL = RNG.normal(size=(600, 4))


@pytest.fixture(scope="module")
def calibrated():
    return LatentEBMDetector(**TINY, random_state=0, calibration=0.5, alpha=0.1).fit(NORMAL)


def test_p_values_follow_the_conformal_formula(calibrated):
    calibration = calibrated.scorer_.calibration_scores.numpy()
    assert len(calibration) == 300 and np.all(np.diff(calibration) >= 0)
    X = np.vstack([RNG.normal(size=(20, 4)), RNG.normal(loc=6, size=(5, 4))])
    anomaly = -calibrated.score_samples(X)
    expected = (1 + (calibration[None, :] >= anomaly[:, None]).sum(1)) / (len(calibration) + 1)
    np.testing.assert_array_equal(calibrated.p_values(X), expected)
    assert calibrated.p_values(X)[-5:].max() < 0.05  # far-away rows: tiny p-values


def test_predict_flags_exactly_the_p_values_at_most_alpha(calibrated):
    X = RNG.normal(size=(400, 4)) * 1.5
    flagged = calibrated.predict(X) == -1
    np.testing.assert_array_equal(flagged, calibrated.p_values(X) <= 0.1)
    np.testing.assert_array_equal(calibrated.decision_function(X) < 0, flagged)


def test_false_alarm_rate_is_at_most_alpha_on_exchangeable_normal_data():
    # Over many calibration / test draws, the mean false-alarm rate stays at or below alpha
    # (the guarantee is on the expectation); a model that ignored the calibration fails.
    det = LatentEBMDetector(**TINY, random_state=0).fit(RNG.normal(size=(300, 4)))
    rates = {0.05: [], 0.2: []}
    for draw in range(30):
        rng = np.random.RandomState(100 + draw)
        det.calibrate(rng.normal(size=(99, 4)))
        p = det.p_values(rng.normal(size=(200, 4)))
        for alpha in rates:
            rates[alpha].append(np.mean(p <= alpha))
    for alpha, observed in rates.items():
        # 30 draws x 200 rows: the mean's sampling error is about 0.02 (calibration-driven)
        assert alpha - 0.04 < np.mean(observed) <= alpha + 0.02, (alpha, np.mean(observed))


def test_calibration_survives_save_load_and_export_with_parity(calibrated, tmp_path):
    X = RNG.normal(size=(50, 4)) * 2
    loaded = LatentEBMDetector.load(calibrated.save(tmp_path / "m"))
    np.testing.assert_array_equal(loaded.p_values(X), calibrated.p_values(X))
    runtime = OnnxDetector(calibrated.to_onnx(tmp_path / "m.onnx"))
    assert runtime.n_calibration_ == 300
    np.testing.assert_allclose(runtime.p_values(X), calibrated.p_values(X), rtol=1e-5)
    np.testing.assert_array_equal(runtime.predict(X), calibrated.predict(X))
    for alpha in (0.01, 0.3):
        np.testing.assert_array_equal(runtime.predict(X, alpha=alpha),
                                      np.where(calibrated.p_values(X) <= alpha, -1, 1))
    pd.DataFrame(X).to_csv(tmp_path / "x.csv", index=False)
    for model in (tmp_path / "m.onnx", tmp_path / "m"):  # the ONNX file and the saved model
        assert cli.main(["score", str(model), str(tmp_path / "x.csv"),
                         "--out", str(tmp_path / "s.csv"), "--alpha", "0.3"]) == 0
        scored = pd.read_csv(tmp_path / "s.csv")
        np.testing.assert_allclose(scored.p_value, calibrated.p_values(X), rtol=1e-5)
        np.testing.assert_array_equal(scored.label,
                                      np.where(calibrated.p_values(X) <= 0.3, -1, 1))


def test_uncalibrated_models_say_so(tmp_path, capsys):
    det = LatentEBMDetector(**TINY, random_state=0, alpha=0.1).fit(NORMAL)
    with pytest.raises(ValueError, match="p-values need calibration"):
        det.p_values(NORMAL[:3])
    runtime = OnnxDetector(det.to_onnx(tmp_path / "m.onnx"))
    assert np.isnan(runtime.score_all(NORMAL[:3])["p_value"]).all()
    with pytest.raises(ValueError, match="without calibration scores"):
        runtime.predict(NORMAL[:3], alpha=0.1)
    with pytest.raises(ValueError, match="alpha must be a float in"):
        runtime.predict(NORMAL[:3], alpha=1.5)
    # calibrating later moves the threshold to alpha
    before = det.offset_
    det.calibrate(RNG.normal(size=(200, 4)))
    assert det.offset_ != before
    with pytest.raises(ValueError, match="'alpha' parameter of LatentEBMDetector must be"):
        LatentEBMDetector(**TINY, alpha=1.0).fit(NORMAL)
    with pytest.raises(ValueError, match="leaves 0 calibration"):
        LatentEBMDetector(**TINY, calibration=0.001).fit(NORMAL[:100])


def test_calibration_suite_measures_both_paths(tmp_path):
    from evaluation import protocols
    from evaluation.calibration import calibration_suite, calibration_summary
    from evaluation.results import ResultLog

    rng = np.random.RandomState(1)
    X = np.vstack([rng.normal(size=(400, 3)), rng.normal(loc=5, size=(40, 3))])
    y = np.r_[np.zeros(400), np.ones(40)].astype(int)
    log = ResultLog(tmp_path / "c.csv")
    splits = {("toy", "set"): lambda seed: protocols.tabular(X, y, seed, semi_supervised=True)}
    calibration_suite(splits, seeds=[0, 1], log=log, epochs=2, onnx_seeds=(0,),
                      detector_params={k: v for k, v in TINY.items() if k != "epochs"},
                      verbose=False)
    frame = log.frame()
    assert len(frame) == 3 * 3  # 2 seeds on the estimator, 1 on ONNX, 3 alphas each
    estimator = frame[frame.path == "estimator"].set_index(["seed", "alpha"])
    onnx = frame[frame.path == "onnx"].set_index(["seed", "alpha"])
    np.testing.assert_allclose(onnx.false_alarm_rate, estimator.loc[0].false_alarm_rate.values)
    assert (estimator.detection_rate.loc[(0, 0.1)] > 0.9)  # anomalies 5 sd away
    table = calibration_summary(frame)
    assert table.loc["toy, estimator, alpha=0.1", "runs"] == 2
    calibration_suite(splits, seeds=[0, 1], log=log, epochs=2, verbose=False)
    assert len(log.frame()) == 9  # resumed: nothing rerun


def test_calibration_command_keeps_its_raw_results(tmp_path, capsys):
    args = ["bench", "--suite", "calibration", "--classes", "3", "--seeds", "0", "--epochs", "1",
            "--detector-params", '{"width": 8, "latent_dim": 2, "depth": 1}',
            "--out", str(tmp_path)]
    assert cli.main(args) == 0
    assert "digits, onnx, alpha=0.05" in capsys.readouterr().out
    raw = pd.read_csv(tmp_path / "calibration" / "calibration.csv")
    assert len(raw) == 6 and set(raw.path) == {"estimator", "onnx"}
    assert cli.main(args) == 0  # resumes from the raw file: nothing to rerun, still 6 rows
    assert len(pd.read_csv(tmp_path / "calibration" / "calibration.csv")) == 6
