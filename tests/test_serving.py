import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import pandas as pd
import pytest
import torch

from anomaly import LatentEBMDetector
from evaluation import cli
from serving import runtime as runtime_module
from serving.commands import score_command
from serving.export import export_onnx, read_metadata
from serving.runtime import OnnxDetector
from tests.conftest import TINY
from training import SCORE_RULES
from training.scorer import NEIGHBOUR_RULES

RNG = np.random.RandomState(0)
TABULAR = RNG.normal(size=(200, 6))
IMAGES = RNG.randint(0, 256, size=(60, 8, 8)).astype(np.uint8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One tabular and one image model, fitted and exported once for the module."""
    root = tmp_path_factory.mktemp("onnx")
    models = {}
    for kind, X, params in (("tabular", TABULAR, {"contamination": 0.1}),
                            ("image", IMAGES, {})):
        det = LatentEBMDetector(**{**TINY, "random_state": 0, **params}).fit(X)
        models[kind] = (det, det.to_onnx(root / f"{kind}.onnx"))
    return models


def _fresh(kind, n):
    rng = np.random.RandomState(n)
    if kind == "tabular":
        return rng.normal(size=(n, 6))
    return rng.randint(0, 256, size=(n, 8, 8)).astype(np.uint8)


@pytest.mark.parametrize("kind", ["tabular", "image"])
@pytest.mark.parametrize("n", [1, 7, 1000])
def test_onnx_matches_the_estimator(exported, kind, n):
    det, path = exported[kind]
    runtime = OnnxDetector(path, providers=["CPUExecutionProvider"])
    X = _fresh(kind, n)
    want = det.score_samples(X)
    np.testing.assert_allclose(runtime.score_samples(X), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(runtime.decision_function(X), det.decision_function(X),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(runtime.predict(X), det.predict(X))
    np.testing.assert_allclose(runtime.anomaly_score(X), -want, rtol=1e-5, atol=1e-5)
    maps = runtime.feature_scores(X)
    assert maps.shape == X.shape
    np.testing.assert_allclose(maps, det.feature_scores(X), rtol=1e-5, atol=1e-5)


def test_metadata_round_trip(exported):
    det, path = exported["tabular"]
    meta = read_metadata(path)
    assert meta["score_rule"] == det.score_rule_
    assert float(meta["offset"]) == det.offset_
    assert meta["contamination"] == "0.1"
    assert json.loads(meta["input_shape"]) == [6]
    assert meta["n_features"] == "6" and meta["graph"] == "scorer"
    assert len(meta["weights_sha256"]) == 64
    runtime = OnnxDetector(path)
    assert runtime.offset_ == det.offset_ and runtime.n_features_in_ == 6
    assert runtime.providers_[-1] == "CPUExecutionProvider"
    onnx.checker.check_model(str(path), full_check=True)


def test_one_file_with_a_dynamic_batch_axis(exported):
    _, path = exported["image"]
    model = onnx.load(str(path))
    assert not any(init.data_location == onnx.TensorProto.EXTERNAL
                   for init in model.graph.initializer)
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")


def test_truncated_and_tampered_files_are_refused(exported, tmp_path):
    _, path = exported["tabular"]
    raw = path.read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="not a valid ONNX model"):
        OnnxDetector(truncated)
    model = onnx.load(str(path))
    weight = max(model.graph.initializer, key=lambda t: onnx.numpy_helper.to_array(t).size)
    values = onnx.numpy_helper.to_array(weight).copy()
    values.flat[0] += 1.0
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(model, str(tampered))
    with pytest.raises(ValueError, match="checksum"):
        OnnxDetector(tampered)


def _edited(path, tmp_path, edit):
    model = onnx.load(str(path))
    edit(model)
    out = tmp_path / "edited.onnx"
    onnx.save(model, str(out))
    return out


def test_edited_node_attributes_and_metadata_are_refused(exported, tmp_path):
    _, path = exported["tabular"]

    def slope(model):
        node = next(n for n in model.graph.node if n.op_type == "LeakyRelu")
        next(a for a in node.attribute if a.name == "alpha").f = 0.5

    def offset(model):
        entry = next(p for p in model.metadata_props if p.key == "divtri.offset")
        entry.value = "-1e9"

    for edit in (slope, offset):
        with pytest.raises(ValueError, match="graph or its metadata do not match"):
            OnnxDetector(_edited(path, tmp_path, edit))
    # an untouched copy, saved again by onnx, still loads
    assert OnnxDetector(_edited(path, tmp_path, lambda model: None)).n_features_in_ == 6


def test_runtime_validates_inputs(exported):
    runtime = OnnxDetector(exported["tabular"][1])
    with pytest.raises(ValueError, match="X has 3 features, but OnnxDetector is expecting 6"):
        runtime.score_samples(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="NaN"):
        runtime.score_samples(np.full((2, 6), np.nan))
    with pytest.raises(ValueError, match="numeric"):
        runtime.score_samples(np.array([["a"] * 6]))
    with pytest.raises(ValueError, match="2D"):
        runtime.score_samples(np.zeros(6))
    with pytest.raises(ValueError, match="0 sample"):
        runtime.score_samples(np.zeros((0, 6)))
    from scipy import sparse

    for bad in (sparse.csr_matrix(np.ones((2, 6))), sparse.coo_array(np.ones((2, 6)))):
        with pytest.raises(TypeError, match="Sparse data was passed"):
            runtime.score_samples(bad)
        with pytest.raises(TypeError, match="Sparse data was passed"):
            exported["tabular"][0].score_samples(bad)  # the estimator's message
    image_runtime = OnnxDetector(exported["image"][1])
    with pytest.raises(ValueError, match=r"shape \(6, 6\)"):
        image_runtime.score_samples(np.zeros((2, 6, 6)))
    # rows of 64 features are the same images
    X = _fresh("image", 5)
    np.testing.assert_array_equal(image_runtime.score_samples(X.reshape(5, -1)),
                                  image_runtime.score_samples(X))


def test_chunked_scoring_equals_one_pass(exported):
    _, path = exported["tabular"]
    X = _fresh("tabular", 1000)
    np.testing.assert_array_equal(OnnxDetector(path, chunk_rows=64).score_samples(X),
                                  OnnxDetector(path).score_samples(X))


def test_thread_safety(exported):
    _, path = exported["image"]
    runtime = OnnxDetector(path)
    batches = [_fresh("image", 50 + i) for i in range(8)]
    expected = [runtime.score_samples(b) for b in batches]
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(3):
            results = list(pool.map(runtime.score_samples, batches))
            for got, want in zip(results, expected, strict=True):
                np.testing.assert_array_equal(got, want)


def test_runtime_import_does_not_import_torch():
    code = ("import sys; import serving.runtime, serving.data_files; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_energy_and_encoder_graphs(exported, tmp_path):
    import onnxruntime as ort

    det, _ = exported["tabular"]
    X = _fresh("tabular", 9)
    encoder = ort.InferenceSession(str(export_onnx(det, tmp_path / "enc.onnx", "encoder")))
    mu, _ = encoder.run(None, {"x": X})
    np.testing.assert_allclose(mu, det.encode(X), rtol=1e-4, atol=1e-5)
    energy = ort.InferenceSession(str(export_onnx(det, tmp_path / "energy.onnx", "energy")))
    (values,) = energy.run(None, {"x": X, "z": mu})
    scorer = det.scorer_
    with torch.no_grad():
        expected = scorer.energy(scorer.preprocess(torch.from_numpy(X)),
                                 torch.from_numpy(mu).double()).numpy()
    np.testing.assert_allclose(values, expected, rtol=1e-4, atol=1e-5)
    vae = LatentEBMDetector(**TINY, objective="vae").fit(TABULAR)
    with pytest.raises(ValueError, match="no energy"):
        export_onnx(vae, tmp_path / "none.onnx", "energy")


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".csv", ".parquet"])
def test_cli_export_and_score(exported, tmp_path, suffix):
    det, _ = exported["tabular"]
    X = _fresh("tabular", 20)
    data = tmp_path / f"data{suffix}"
    if suffix == ".npy":
        np.save(data, X)
    elif suffix == ".npz":
        np.savez(data, X=X, y=np.zeros(len(X)))
    elif suffix == ".csv":
        pd.DataFrame(X).to_csv(data, index=False)
    else:
        pd.DataFrame(X, columns=[f"f{i}" for i in range(6)]).to_parquet(data)
    saved = det.save(tmp_path / "model")
    if suffix == ".npy":  # export once, through the CLI
        assert cli.main(["export", str(saved), str(tmp_path / "m.onnx")]) == 0
        model = tmp_path / "m.onnx"
    else:
        model = saved
    assert cli.main(["score", str(model), str(data), "--out", str(tmp_path / "s.csv")]) == 0
    scores = pd.read_csv(tmp_path / "s.csv")
    assert list(scores.columns) == ["score_samples", "decision", "label", "p_value"]
    np.testing.assert_allclose(scores["score_samples"], det.score_samples(X), rtol=1e-5)
    np.testing.assert_array_equal(scores["label"], det.predict(X))


@pytest.mark.parametrize("rule", SCORE_RULES)
def test_every_score_rule_exports_with_parity(tmp_path, rule, monkeypatch):
    det = LatentEBMDetector(**TINY, score_rule=rule, random_state=0).fit(TABULAR)
    path = det.to_onnx(tmp_path / f"{rule}.onnx")
    # only a rule that compares each row with the bank's codes shrinks the runtime's chunks
    monkeypatch.setattr(runtime_module, "MAX_DISTANCES", 4000)
    compared = len(TABULAR) if rule in NEIGHBOUR_RULES else 0
    assert OnnxDetector(path).chunk_rows == 4000 // max(compared, 1)
    monkeypatch.undo()
    runtime = OnnxDetector(path)
    X = _fresh("tabular", 50)
    np.testing.assert_allclose(runtime.score_samples(X), det.score_samples(X),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(runtime.feature_scores(X), det.feature_scores(X),
                               rtol=1e-5, atol=1e-5)
    assert runtime.score_rule_ == rule


@pytest.mark.parametrize("value", [1e40, -1e40, 1e300])
def test_values_beyond_float32_are_outliers_on_every_path(exported, value):
    det, path = exported["tabular"]
    runtime = OnnxDetector(path, providers=["CPUExecutionProvider"])
    X = _fresh("tabular", 3)
    X[1, 2] = value
    for model in (det, runtime):
        scores = model.score_samples(X)
        # beyond float32 the exported networks overflow; the estimator gives the same -inf
        assert scores[1] == -np.inf and np.isfinite(scores[[0, 2]]).all()
        assert model.predict(X)[1] == -1
    np.testing.assert_allclose(runtime.score_samples(X), det.score_samples(X), rtol=1e-5)
    np.testing.assert_array_equal(runtime.predict(X), det.predict(X))
    for model in (det, runtime):
        # the whole infinite score sits on the value that caused it
        maps = model.feature_scores(X)
        assert maps[1, 2] == np.inf and (maps[1, np.arange(6) != 2] == 0).all()
        assert np.isfinite(maps[[0, 2]]).all()


def test_column_names_are_checked_on_every_path(tmp_path, capsys):
    names = ["temp", "pressure", "flow", "speed", "load", "vibration"]
    frame = pd.DataFrame(TABULAR, columns=names)
    det = LatentEBMDetector(**TINY, random_state=0).fit(frame)
    path = det.to_onnx(tmp_path / "named.onnx")
    runtime = OnnxDetector(path)
    assert list(runtime.feature_names_in_) == names
    fresh = pd.DataFrame(_fresh("tabular", 10), columns=names)
    np.testing.assert_allclose(runtime.score_samples(fresh), det.score_samples(fresh),
                               rtol=1e-5)
    reordered = fresh[names[::-1]]
    renamed = fresh.rename(columns={"flow": "Flow"})
    for bad, detail in ((reordered, "another order"), (renamed, "unseen at fit time: ['Flow']")):
        with pytest.raises(ValueError, match="feature names should match"):
            det.score_samples(bad)
        with pytest.raises(ValueError, match=re.escape(detail)):
            runtime.score_samples(bad)
        bad.to_csv(tmp_path / "bad.csv", index=False)
        for model in (path, det.save(tmp_path / "saved")):
            code = cli.main(["score", str(model), str(tmp_path / "bad.csv"),
                             "--out", str(tmp_path / "s.csv")])
            error = capsys.readouterr().err
            assert code == 2 and "feature names should match" in error
            assert error.count("\n") == 1  # one line, no traceback


def test_score_cli_reads_every_row_of_a_csv_without_header(exported, tmp_path, capsys):
    det, path = exported["tabular"]
    X = _fresh("tabular", 20)
    pd.DataFrame(X).to_csv(tmp_path / "raw.csv", index=False, header=False)
    assert cli.main(["score", str(path), str(tmp_path / "raw.csv"),
                     "--out", str(tmp_path / "s.csv")]) == 0
    assert "scored 20 rows" in capsys.readouterr().out
    np.testing.assert_allclose(pd.read_csv(tmp_path / "s.csv").score_samples,
                               det.score_samples(X), rtol=1e-5)


def test_fit_command_trains_saves_and_feeds_score(tmp_path, capsys):
    frame = pd.DataFrame(TABULAR, columns=[f"f{i}" for i in range(6)])
    frame.insert(0, "id", np.arange(len(frame)))
    frame.to_csv(tmp_path / "train.csv", index=False)
    model = tmp_path / "model"
    args = ["fit", str(tmp_path / "train.csv"), "--out", str(model), "--drop-columns", "id",
            "--epochs", "2", "--latent-dim", "2", "--calibration", "0.25",
            "--random-state", "0", "--params", '{"width": 8, "depth": 1}']
    assert cli.main(args) == 0
    assert "6 features, 2 epochs x 3 members" in capsys.readouterr().out
    det = LatentEBMDetector.load(model)
    assert det.get_params()["latent_dim"] == 2 and det.get_params()["width"] == 8
    assert list(det.feature_names_in_) == [f"f{i}" for i in range(6)]
    assert len(det.scorer_.calibration_scores) == 50
    twin = LatentEBMDetector(**{**det.get_params(), "verbose": 0}).fit(frame.drop(columns="id"))
    np.testing.assert_allclose(det.score_samples(frame.drop(columns="id")),
                               twin.score_samples(frame.drop(columns="id")))
    frame.drop(columns="id").to_csv(tmp_path / "new.csv", index=False)
    assert cli.main(["score", str(model), str(tmp_path / "new.csv"),
                     "--out", str(tmp_path / "s.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "s.csv")) == len(frame)
    assert cli.main([*args[:-2], "--drop-columns", "nope"]) == 2
    assert "not columns" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".npy", ".csv", ".parquet", "dir"])
@pytest.mark.parametrize("engine", ["onnx", "saved"])
def test_score_streams_in_batches_to_csv_or_parquet(exported, tmp_path, suffix, engine):
    det, onnx_path = exported["tabular"]
    X = _fresh("tabular", 23)
    frame = pd.DataFrame(X, columns=[f"f{i}" for i in range(6)])
    data = tmp_path / ("parts" if suffix == "dir" else f"data{suffix}")
    if suffix == ".npy":
        np.save(data, X)
    elif suffix == ".csv":
        frame.to_csv(data, index=False)
    elif suffix == ".parquet":
        frame.to_parquet(data, row_group_size=4)
    else:  # a directory of parquet parts, read in name order
        data.mkdir()
        for i, start in enumerate(range(0, len(X), 10)):
            frame.iloc[start:start + 10].to_parquet(data / f"part-{i:02d}.parquet")
    model = onnx_path if engine == "onnx" else det.save(tmp_path / "model")
    for out in (tmp_path / "s.csv", tmp_path / "s.parquet"):
        # batches of 5 rows: the last is short, and a parquet row group spans two batches
        assert score_command(model, data, out, batch_rows=5) == len(X)
        scores = pd.read_csv(out) if out.suffix == ".csv" else pd.read_parquet(out)
        np.testing.assert_allclose(scores["score_samples"], det.score_samples(X), rtol=1e-5)
        np.testing.assert_array_equal(scores["label"], det.predict(X))
        assert not out.with_name(out.name + ".partial").exists()


def test_score_failing_midway_leaves_no_result_file(exported, tmp_path):
    _, onnx_path = exported["tabular"]
    X = _fresh("tabular", 12)
    X[9, 2] = np.inf  # in the second batch of 5 rows
    np.save(tmp_path / "bad.npy", X)
    out = tmp_path / "s.csv"
    with pytest.raises(ValueError, match="infinity"):
        score_command(onnx_path, tmp_path / "bad.npy", out, batch_rows=5)
    assert not out.exists() and not out.with_name("s.csv.partial").exists()
    np.save(tmp_path / "empty.npy", np.zeros((0, 6)))
    with pytest.raises(ValueError, match="no rows to score"):
        score_command(onnx_path, tmp_path / "empty.npy", out)
    assert not out.exists()
