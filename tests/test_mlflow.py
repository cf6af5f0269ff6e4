import json
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from mlflow import MlflowClient

from anomaly import LatentEBMDetector
from serving.mlflow_model import MlflowEpochLogger, fit_logged, load_model, log_model
from serving.rest import mlflow_server
from tests.conftest import TINY

X = np.random.RandomState(0).normal(size=(120, 4))


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    """A private SQLite backend and artifact root per test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = mlflow.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    mlflow.set_experiment(experiment_id=experiment)
    yield uri
    mlflow.end_run()


@pytest.fixture(scope="module")
def detector():
    return LatentEBMDetector(**TINY, random_state=0, calibration=0.3).fit(X)


def test_nothing_is_logged_unless_asked(tracking, detector):
    LatentEBMDetector(**TINY).fit(X)
    assert mlflow.search_runs(output_format="list") == []


def test_pyfunc_takes_alpha_as_an_inference_parameter(tracking, detector):
    with mlflow.start_run():
        info = log_model(detector, "m")
    model = load_model(info.model_uri)
    assert model.metadata.get_params_schema().to_dict()[0]["default"] == -1.0
    frame = pd.DataFrame(X[:40] * 1.5, columns=[f"x{i}" for i in range(4)])
    default = model.predict(frame)
    np.testing.assert_array_equal(default["label"], detector.predict(X[:40] * 1.5))
    p_values = detector.p_values(X[:40] * 1.5)
    np.testing.assert_allclose(default["p_value"], p_values, rtol=1e-5)
    for alpha in (0.05, 0.5):
        out = model.predict(frame, params={"alpha": alpha})
        np.testing.assert_array_equal(out["label"], np.where(p_values <= alpha, -1, 1))


def test_pyfunc_gives_feature_scores_when_asked(tracking, detector):
    with mlflow.start_run():
        info = log_model(detector, "m")
    model = load_model(info.model_uri)
    shifted = X[:10].copy()
    shifted[:, 1] += 6.0
    frame = pd.DataFrame(shifted, columns=[f"x{i}" for i in range(4)])
    assert "feature_scores" not in model.predict(frame).columns
    out = model.predict(frame, params={"feature_scores": True})
    np.testing.assert_allclose(np.stack(out["feature_scores"]),
                               detector.feature_scores(shifted), rtol=1e-5, atol=1e-5)
    with pytest.raises(mlflow.exceptions.MlflowException, match="feature_scores"):
        model.predict(frame, params={"feature_scores": "yes"})


@pytest.mark.slow
def test_mlflow_models_predict_in_the_local_environment(tracking, detector, tmp_path):
    # what `mlflow models predict` and MLflow's own pre-deployment check run
    with mlflow.start_run():
        info = log_model(detector, "m")
    frame = pd.DataFrame(X[:5] * 1.5, columns=[f"x{i}" for i in range(4)])
    out = tmp_path / "predictions.json"
    mlflow.models.predict(info.model_uri, input_data=frame, env_manager="local",
                          output_path=str(out))
    got = pd.DataFrame(json.loads(out.read_text())["predictions"])
    np.testing.assert_allclose(got["score_samples"], detector.score_samples(X[:5] * 1.5),
                               rtol=1e-5)
    np.testing.assert_allclose(got["p_value"], detector.p_values(X[:5] * 1.5), rtol=1e-5)


def test_logging_an_unfitted_detector_says_so(tracking):
    from sklearn.exceptions import NotFittedError

    with mlflow.start_run(), pytest.raises(NotFittedError, match="not fitted"):
        log_model(LatentEBMDetector(**TINY), "model")


def test_fit_logged_records_params_metrics_and_model(tracking):
    det, info = fit_logged(LatentEBMDetector(**TINY, random_state=0), X, run_name="r")
    run = mlflow.get_run(info.run_id)
    assert run.data.params["latent_dim"] == "2"
    history = MlflowClient().get_metric_history(info.run_id, "energy_gap")
    # the default's three members on rows: their epochs count on, one member after another
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
    members = MlflowClient().get_metric_history(info.run_id, "member")
    assert [m.value for m in sorted(members, key=lambda m: m.step)] == [0, 0, 1, 1, 2, 2]
    assert {"loss_ebm", "encoder_variance", "time_per_epoch"} <= set(run.data.metrics)
    scored = load_model(info.model_uri).predict(pd.DataFrame(X[:5], columns=["x0", "x1",
                                                                               "x2", "x3"]))
    np.testing.assert_allclose(scored["score_samples"], det.score_samples(X[:5]), rtol=1e-5)


def test_callback_logs_into_the_active_run(tracking):
    with mlflow.start_run() as run:
        LatentEBMDetector(**TINY, n_members=1).fit(X, callbacks=[MlflowEpochLogger()])
    assert len(MlflowClient().get_metric_history(run.info.run_id, "reconstruction")) == 2


def test_registry_versions_and_aliases(tracking, detector):
    with mlflow.start_run():
        info = log_model(detector, "m", registered_model_name="detector")
    client = MlflowClient()
    version = info.registered_model_version
    client.set_registered_model_alias("detector", "champion", version)
    frame = pd.DataFrame(X[:7], columns=[f"x{i}" for i in range(4)])
    want = detector.score_samples(X[:7])
    for uri in (f"models:/detector/{version}", "models:/detector@champion"):
        out = load_model(uri).predict(frame)
        assert list(out.columns) == ["score_samples", "decision", "label", "p_value"]
        np.testing.assert_allclose(out["score_samples"], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(out["label"], detector.predict(X[:7]))
    model = load_model("models:/detector@champion")
    assert [c.name for c in model.metadata.get_input_schema().inputs] == ["x0", "x1", "x2",
                                                                           "x3"]


@pytest.mark.slow
def test_rest_serving_end_to_end(tracking, detector):
    with mlflow.start_run():
        info = log_model(detector, "m", registered_model_name="served")
    MlflowClient().set_registered_model_alias("served", "prod", info.registered_model_version)
    with mlflow_server("models:/served@prod", tracking_uri=tracking) as base:
        assert base.startswith("http://127.0.0.1:")
        payload = {"dataframe_split": {"columns": [f"x{i}" for i in range(4)],
                                       "data": X[:9].tolist()}}
        answer = requests.post(f"{base}/invocations", json=payload, timeout=30)
        assert answer.status_code == 200, answer.text
        got = pd.DataFrame(answer.json()["predictions"])
        np.testing.assert_allclose(got["score_samples"], detector.score_samples(X[:9]),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got["label"], detector.predict(X[:9]))
        bad = requests.post(f"{base}/invocations", data="{not json", timeout=30,
                            headers={"Content-Type": "application/json"})
        assert 400 <= bad.status_code < 500
        wrong_width = {"dataframe_split": {"columns": ["x0"], "data": [[1.0]]}}
        assert 400 <= requests.post(f"{base}/invocations", json=wrong_width,
                                    timeout=30).status_code < 500
        for data, reason in (([[np.nan, 0.0, 0.0, 0.0]], "NaN"), ([], "0 sample")):
            body = json.dumps({"dataframe_split": {"columns": [f"x{i}" for i in range(4)],
                                                   "data": data}})  # NaN as JSON's NaN
            answer = requests.post(f"{base}/invocations", data=body, timeout=30,
                                   headers={"Content-Type": "application/json"})
            assert answer.status_code == 400 and reason in answer.json()["message"], answer.text
            assert "Traceback" not in answer.text
        # fresh rows: a calibration row's own score ties with itself, and the float32 graph
        # may break that tie the other way than the float64 estimator
        fresh = np.random.RandomState(5).normal(size=(9, 4)) * 1.5
        with_alpha = {"dataframe_split": {"columns": [f"x{i}" for i in range(4)],
                                          "data": fresh.tolist()}, "params": {"alpha": 0.3}}
        answer = requests.post(f"{base}/invocations", json=with_alpha, timeout=30)
        got = pd.DataFrame(answer.json()["predictions"])
        p_values = detector.p_values(fresh)
        np.testing.assert_allclose(got["p_value"], p_values, rtol=1e-5)
        np.testing.assert_array_equal(got["label"], np.where(p_values <= 0.3, -1, 1))
        explained = requests.post(f"{base}/invocations", timeout=30, json={
            **with_alpha, "params": {"feature_scores": True}})
        assert explained.status_code == 200, explained.text
        got = pd.DataFrame(explained.json()["predictions"])
        np.testing.assert_allclose(np.array(got["feature_scores"].tolist()),
                                   detector.feature_scores(fresh), rtol=1e-5, atol=1e-5)
        assert requests.get(f"{base}/ping", timeout=5).status_code == 200
        again = requests.post(f"{base}/invocations", json=payload, timeout=30)
        assert again.status_code == 200


@pytest.mark.slow
def test_spark_udf_scores_like_local(tracking, detector, monkeypatch):
    pyspark = pytest.importorskip("pyspark", reason="the 'spark' extra is not installed")
    from serving.spark_scoring import score_spark

    monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)
    with mlflow.start_run():
        info = log_model(detector, "m", registered_model_name="spark")
    spark = (pyspark.sql.SparkSession.builder.master("local[2]")
             .config("spark.ui.enabled", "false").config("spark.driver.host", "127.0.0.1")
             .config("spark.driver.bindAddress", "127.0.0.1").getOrCreate())
    try:
        frame = spark.createDataFrame(pd.DataFrame(X, columns=[f"x{i}" for i in range(4)]))
        scored = score_spark(spark, f"models:/spark/{info.registered_model_version}",
                             frame).toPandas()
    finally:
        spark.stop()
    np.testing.assert_allclose(scored["score_samples"], detector.score_samples(X),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(scored["label"], detector.predict(X))
    assert list(scored.columns[:4]) == [f"x{i}" for i in range(4)]


def test_bench_logs_its_tables_to_mlflow(tracking, tmp_path):
    from evaluation import cli

    for suite, extra in (("quick", ["--classes", "1", "--methods", "triangle,lof"]),
                         ("calibration", ["--classes", "3", "--seeds", "0"])):
        args = ["bench", "--suite", suite, "--epochs", "1", "--out", str(tmp_path),
                "--mlflow-experiment", "bench", *extra]
        assert cli.main(args) == 0
    runs = {run.data.params["suite"]: run for run in mlflow.search_runs(
        experiment_names=["bench"], output_format="list")}
    summary = pd.read_csv(tmp_path / "quick" / "summary.csv", index_col=0)
    quick = runs["quick"].data.metrics
    assert quick["summary/triangle/auroc_mean"] == pytest.approx(
        summary.loc["triangle", "auroc_mean"])
    assert quick["summary/lof/auprc_mean"] == pytest.approx(summary.loc["lof", "auprc_mean"])
    calibration = pd.read_csv(tmp_path / "calibration" / "summary.csv", index_col=0)
    key = "digits, estimator, alpha=0.05"
    assert runs["calibration"].data.metrics[
        "summary/digits_estimator_alpha_0.05/false_alarm_mean"] == \
        pytest.approx(calibration.loc[key, "false_alarm_mean"])
    artifacts = {Path(a.path).name for a in MlflowClient().list_artifacts(
        runs["quick"].info.run_id, "results")}
    assert {"summary.csv", "digits.csv"} <= artifacts


def test_fit_command_logs_and_registers(tracking, tmp_path, capsys):
    from evaluation import cli

    np.save(tmp_path / "train.npy", X)
    args = ["fit", str(tmp_path / "train.npy"), "--out", str(tmp_path / "model"),
            "--epochs", "2", "--random-state", "0",
            "--params", '{"width": 8, "depth": 1, "latent_dim": 2}',
            "--mlflow-experiment", "fits", "--register", "from-cli"]
    assert cli.main(args) == 0
    run, = mlflow.search_runs(experiment_names=["fits"], output_format="list")
    assert run.data.params["epochs"] == "2"
    assert "reconstruction" in run.data.metrics
    detector = LatentEBMDetector.load(tmp_path / "model")
    served = load_model("models:/from-cli/1").predict(
        pd.DataFrame(X[:5], columns=[f"x{i}" for i in range(4)]))
    np.testing.assert_allclose(served["score_samples"], detector.score_samples(X[:5]),
                               rtol=1e-5, atol=1e-5)
    assert cli.main([*args[:-4], "--register", "x"]) == 2
    assert "needs --mlflow-experiment" in capsys.readouterr().err


def test_pyfunc_and_rest_take_missing_cells_for_a_model_fitted_with_them(tracking):
    holes = X.copy()
    holes[np.random.RandomState(3).rand(*X.shape) < 0.25] = np.nan
    holes[np.isnan(holes).all(axis=1), 0] = 0.0
    masked = LatentEBMDetector(**TINY, missing="mask", random_state=0).fit(holes)
    with mlflow.start_run():
        info = log_model(masked, "m", registered_model_name="masked")
    columns = [f"x{i}" for i in range(4)]
    frame = pd.DataFrame(holes[:12], columns=columns)
    out = load_model(info.model_uri).predict(frame)
    np.testing.assert_allclose(out["score_samples"], masked.score_samples(holes[:12]),
                               rtol=1e-5, atol=1e-5)
    with mlflow_server("models:/masked/1", tracking_uri=tracking) as base:
        rows = [[None if np.isnan(v) else v for v in row] for row in holes[:12].tolist()]
        answer = requests.post(f"{base}/invocations", timeout=30, json={
            "dataframe_split": {"columns": columns, "data": rows}})  # JSON null
        assert answer.status_code == 200, answer.text
        got = pd.DataFrame(answer.json()["predictions"])
        np.testing.assert_allclose(got["score_samples"], masked.score_samples(holes[:12]),
                                   rtol=1e-5, atol=1e-5)
        empty = requests.post(f"{base}/invocations", timeout=30, json={
            "dataframe_split": {"columns": columns, "data": [[None] * 4]}})
        assert empty.status_code == 400 and "every entry missing" in empty.json()["message"]


def test_throwaway_registry_serves_a_registered_model_and_leaves_nothing(tracking, detector):
    from evaluation.tracking import throwaway_registry

    with throwaway_registry(detector, "scratch") as (uri, info, directory):
        assert mlflow.get_tracking_uri() == uri != tracking
        assert info.registered_model_version == 1
        loaded = mlflow.pyfunc.load_model("models:/scratch/1")
        frame = pd.DataFrame(X[:3], columns=[f"x{i}" for i in range(4)])
        np.testing.assert_allclose(loaded.predict(frame)["score_samples"],
                                   detector.score_samples(X[:3]), rtol=1e-5)
    assert not directory.exists()
    assert mlflow.get_tracking_uri() == tracking and mlflow.get_registry_uri() == tracking
