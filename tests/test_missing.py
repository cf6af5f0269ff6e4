"""Missing values: missing='mask' learns and scores with NaN entries left out, on every path;
missing='error' refuses them everywhere."""

import numpy as np
import pandas as pd
import pytest
import torch

from anomaly import LatentEBMDetector
from evaluation import cli
from evaluation.missing import removal_mask
from serving.runtime import OnnxDetector
from tests.conftest import TINY
from training import objectives
from training.loop import fill_missing
from training.networks import NetworkConfig, build_networks

RNG = np.random.RandomState(0)
TABLE = RNG.normal(size=(240, 6)) @ RNG.normal(size=(6, 6))  # correlated columns
# one member: these tests read the scorer's own calibration (ensembles: test_ensemble.py)
FIT = dict(TINY, epochs=4, width=16, latent_dim=3, n_members=1)


def _holes(X, rate, seed=1):
    """``X`` with a ``rate`` of its entries set to NaN at random, no row left empty."""
    mask = removal_mask(X.reshape(len(X), -1).shape, f"mcar_{rate}",
                        np.random.RandomState(seed)).reshape(X.shape)
    return np.where(mask, np.nan, X.astype(np.float64))


@pytest.fixture(scope="module")
def masked_model():
    return LatentEBMDetector(**FIT, missing="mask", random_state=0).fit(_holes(TABLE, 0.3))


def test_the_reconstruction_term_counts_observed_entries_only():
    x, x_hat = torch.randn(4, 5), torch.randn(4, 5)
    observed = torch.rand(4, 5) > 0.4
    other = torch.where(observed, x, torch.randn(4, 5) * 100)  # anything where unobserved
    value = objectives.reconstruction_nll(x, x_hat, 0.5, observed)
    torch.testing.assert_close(objectives.reconstruction_nll(other, x_hat, 0.5, observed), value)
    torch.testing.assert_close(value, 0.5 * ((x - x_hat) * observed).pow(2).sum(1) / 0.25)


def test_training_fills_missing_entries_with_the_reconstruction_and_keeps_observed():
    networks = build_networks(NetworkConfig(input_shape=(5,), latent_dim=2, width=8, depth=1),
                              with_energy=False)
    data = torch.randn(10, 5)
    observed = torch.rand(10, 5) > 0.5
    before = data.clone()
    index = torch.tensor([1, 3, 4])
    fill_missing(networks, data, observed, index)
    with torch.no_grad():
        expected = networks.generator(networks.encoder(before[index])[0])
    rows = data[index]
    torch.testing.assert_close(rows[observed[index]], before[index][observed[index]])
    torch.testing.assert_close(rows[~observed[index]], expected[~observed[index]])
    untouched = torch.ones(10, dtype=torch.bool)
    untouched[index] = False
    torch.testing.assert_close(data[untouched], before[untouched])


def test_epochs_count_passes_of_observed_entries():
    """Half the entries missing: twice the passes, so the networks see as many observed
    entries as the same epochs over complete rows would show them."""
    params = dict(FIT, epochs=3, missing="mask", random_state=0)
    complete = LatentEBMDetector(**params).fit(TABLE)
    assert len(complete.training_history_) == 3
    half = _holes(TABLE, 0.5)
    share = np.mean(~np.isnan(half))
    incomplete = LatentEBMDetector(**params).fit(half)
    assert len(incomplete.training_history_) == int(np.ceil(3 / share))
    assert len(incomplete.training_history_) >= 6


def test_fit_and_score_tables_with_missing_cells(masked_model):
    det = masked_model
    assert det.__sklearn_tags__().input_tags.allow_nan
    X = _holes(TABLE[:50], 0.4, seed=2)
    for scores in (det.score_samples(X), det.decision_function(X)):
        assert np.isfinite(scores).all()
    assert set(det.predict(X)) <= {-1, 1}
    # observed entries come back unchanged, missing ones filled
    filled = det.reconstruct(X)
    assert np.isfinite(filled).all()
    maps = det.feature_scores(X)
    assert (maps[np.isnan(X)] == 0).all()  # a missing entry holds no evidence
    np.testing.assert_allclose(maps.sum(1), -det.score_samples(X), rtol=1e-9)
    assert det.encode(X).shape == (50, 3)


def test_preprocessing_statistics_come_from_observed_entries(masked_model):
    X = _holes(TABLE, 0.3)
    np.testing.assert_allclose(masked_model.scorer_.shift.numpy(), np.nanmean(X, axis=0))
    np.testing.assert_allclose(masked_model.scorer_.scale.numpy(), np.nanstd(X, axis=0))


def test_missing_rate_calibration_keeps_normal_rows_where_complete_ones_are(masked_model):
    det = masked_model
    rows = TABLE[:200]
    complete = np.median(det.score_samples(rows))
    sparse = det.score_samples(_holes(rows, 0.5, seed=3))
    spread = np.subtract(*np.percentile(det.score_samples(rows), [75, 25]))
    assert abs(np.median(sparse) - complete) < 0.25 * spread
    # without the calibration, the same rows drift (what the calibration corrects)
    scorer = det.scorer_
    saved = scorer.missing_rates
    try:
        scorer.missing_rates = torch.zeros(0, dtype=torch.float64)
        raw = det.score_samples(_holes(rows, 0.5, seed=3))
        assert np.isfinite(raw).all()
        assert not np.allclose(raw, sparse)
        uncalibrated_complete = det.score_samples(rows[:20])
    finally:
        scorer.missing_rates = saved
    # trained on rows that all arrive incomplete, complete rows are scored at the lowest
    # calibrated rate (next test), so the calibration changes them too
    assert not np.allclose(det.score_samples(rows[:20]), uncalibrated_complete)


def test_complete_rows_keep_their_score_when_some_training_rows_were_complete():
    det = LatentEBMDetector(**FIT, missing="mask", random_state=0).fit(TABLE)
    assert float(det.scorer_.missing_rates[0]) == 0.0
    rows = TABLE[:20]
    calibrated = det.score_samples(rows)
    det.scorer_.missing_rates = torch.zeros(0, dtype=torch.float64)
    np.testing.assert_array_equal(det.score_samples(rows), calibrated)


def test_rows_more_complete_than_the_lowest_calibrated_rate_are_scored_at_that_rate(
        masked_model):
    # Every training row had about 30% of its 6 cells missing: the lowest rate calibrated
    # is 1 of 6, so a complete row is scored with one entry hidden, one the row's own values
    # choose: the same entry whatever the batch, and a different one from row to row.
    det, rows = masked_model, TABLE[:200]
    scorer = det.scorer_
    assert round(float(scorer.missing_rates[0]) * 6) == 1
    with torch.no_grad():
        raw = torch.from_numpy(rows)
        hidden = torch.isnan(scorer._hidden_to_lowest_rate(raw, scorer.preprocess(raw)))
    np.testing.assert_array_equal(hidden.sum(1).numpy(), np.ones(200))
    per_feature = hidden.sum(0).numpy()
    assert per_feature.min() >= 15, per_feature  # about 33 each when drawn uniformly
    scores = det.score_samples(rows)
    # the hidden entry is the row's own choice: reversing the batch changes only float32
    # rounding (the encoder's softplus ceiling rounds an entry in its vectorised body and in
    # its scalar tail differently); a hidden entry that moved with the batch would change a
    # score by far more
    np.testing.assert_allclose(det.score_samples(rows[::-1])[::-1], scores, rtol=1e-12)
    # the complete row scores exactly as the row with that entry missing
    np.testing.assert_allclose(det.score_samples(np.where(hidden.numpy(), np.nan, rows)),
                               scores, rtol=1e-12)
    # a row already missing its share is not touched
    sparse = _holes(rows, 0.5, seed=3)
    with torch.no_grad():
        raw = torch.from_numpy(sparse)
        kept = scorer._hidden_to_lowest_rate(raw, scorer.preprocess(raw))
    at_least_one = np.isnan(sparse).any(1)
    np.testing.assert_array_equal(np.isnan(kept.numpy())[at_least_one],
                                  np.isnan(sparse)[at_least_one])


def test_missing_rate_calibration_brings_each_row_to_an_exact_rate():
    # Rows that arrive incomplete (30% missing, 6 columns) are each brought to exactly k of 6
    # missing entries; a rate that fewer than a fifth of them can reach (k = 0: about 12% of
    # the rows are complete) is skipped, so the lowest rate kept is the reference.
    rows = _holes(TABLE, 0.3)
    scorer = LatentEBMDetector(**FIT, missing="mask", random_state=0).fit(rows).scorer_
    counts = scorer.missing_rates.numpy() * TABLE.shape[1]
    np.testing.assert_allclose(counts, [1, 2, 3, 4, 5])
    # from complete rows every rate is reachable, and 0 is the reference
    complete = LatentEBMDetector(**FIT, missing="mask", random_state=0).fit(TABLE).scorer_
    np.testing.assert_allclose(complete.missing_rates.numpy() * TABLE.shape[1],
                               [0, 1, 2, 3, 4, 5])


def test_images_with_missing_pixels(images):
    occluded = _holes(images, 0.3)
    det = LatentEBMDetector(**TINY, missing="mask", random_state=0).fit(occluded)
    scores = det.score_samples(occluded)
    assert scores.shape == (len(images),) and np.isfinite(scores).all()
    assert det.feature_scores(occluded).shape == images.shape


def test_missing_error_refuses_nan_with_a_clear_message(tabular):
    X = tabular.copy()
    X[3, 2] = np.nan
    with pytest.raises(ValueError, match="missing='mask'"):
        LatentEBMDetector(**TINY).fit(X)
    det = LatentEBMDetector(**TINY, random_state=0).fit(tabular)
    assert not det.__sklearn_tags__().input_tags.allow_nan
    for method in (det.score_samples, det.predict, det.decision_function, det.feature_scores,
                   det.encode, det.reconstruct):
        with pytest.raises(ValueError, match="does not take missing values"):
            method(X)


def test_rows_and_columns_without_any_observed_value_are_refused(masked_model, tabular):
    X = _holes(TABLE[:10], 0.2)
    X[4] = np.nan
    with pytest.raises(ValueError, match=r"every entry missing.*rows \[4\]"):
        masked_model.score_samples(X)
    with pytest.raises(ValueError, match=r"every entry missing"):
        LatentEBMDetector(**TINY, missing="mask").fit(X)
    Y = tabular.copy()
    Y[:, 1] = np.nan
    with pytest.raises(ValueError, match=r"columns \[1\] of X hold no observed value"):
        LatentEBMDetector(**TINY, missing="mask").fit(Y)
    with pytest.raises(ValueError, match="inf"):
        masked_model.score_samples(np.where(np.isnan(X), np.inf, X))
    with pytest.raises(ValueError, match="'missing' parameter"):
        LatentEBMDetector(**TINY, missing="impute").fit(tabular)


def test_onnx_completes_missing_cells_inside_the_graph_with_parity(masked_model, tmp_path):
    det = masked_model
    path = det.to_onnx(tmp_path / "m.onnx")
    runtime = OnnxDetector(path)
    assert runtime.allows_missing_
    X = _holes(TABLE[:60], 0.35, seed=5)
    X[:10] = TABLE[:10]  # complete rows: the graph hides the same entry as the estimator
    np.testing.assert_allclose(runtime.score_samples(X), det.score_samples(X), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_array_equal(runtime.predict(X), det.predict(X))
    np.testing.assert_allclose(runtime.feature_scores(X), det.feature_scores(X), rtol=1e-5,
                               atol=1e-5)
    # JSON null arrives as None in an object array
    with_none = np.where(np.isnan(X), None, X).astype(object)
    np.testing.assert_allclose(runtime.score_samples(with_none), det.score_samples(X),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="every entry missing"):
        runtime.score_samples(np.full((1, 6), np.nan))
    assert any(node.op_type == "IsNaN" for node in __import__("onnx").load(path).graph.node)


def test_a_model_fitted_without_missing_values_refuses_them_on_every_path(tabular, tmp_path,
                                                                           capsys):
    det = LatentEBMDetector(**TINY, random_state=0).fit(tabular)
    runtime = OnnxDetector(det.to_onnx(tmp_path / "plain.onnx"))
    assert not runtime.allows_missing_
    X = tabular[:5].copy()
    X[0, 0] = np.nan
    with pytest.raises(ValueError, match="does not take missing values"):
        runtime.score_samples(X)
    pd.DataFrame(X).to_csv(tmp_path / "holes.csv", index=False)
    for model in (tmp_path / "plain.onnx", det.save(tmp_path / "plain")):
        code = cli.main(["score", str(model), str(tmp_path / "holes.csv"),
                         "--out", str(tmp_path / "s.csv")])
        assert code == 2 and "missing" in capsys.readouterr().err


def test_score_cli_reads_empty_csv_cells_as_missing(masked_model, tmp_path):
    X = _holes(TABLE[:20], 0.3, seed=7)
    pd.DataFrame(X).to_csv(tmp_path / "holes.csv", index=False)  # NaN -> empty cells
    assert ",," in (tmp_path / "holes.csv").read_text() or "\n," in (
        tmp_path / "holes.csv").read_text()
    path = masked_model.to_onnx(tmp_path / "m.onnx")
    for model in (path, masked_model.save(tmp_path / "saved")):
        assert cli.main(["score", str(model), str(tmp_path / "holes.csv"),
                         "--out", str(tmp_path / "s.csv")]) == 0
        np.testing.assert_allclose(pd.read_csv(tmp_path / "s.csv").score_samples,
                                   masked_model.score_samples(X), rtol=1e-5, atol=1e-5)


def test_save_and_load_keep_the_missing_setting(masked_model, tmp_path):
    loaded = LatentEBMDetector.load(masked_model.save(tmp_path / "m"))
    X = _holes(TABLE[:30], 0.3, seed=9)
    assert loaded.scorer_.allows_missing
    np.testing.assert_array_equal(loaded.score_samples(X), masked_model.score_samples(X))


def test_a_fit_with_missing_values_resumes_to_the_uninterrupted_model(tmp_path):
    X = _holes(TABLE, 0.3)
    params = dict(FIT, epochs=5, missing="mask", random_state=0)

    def stop_at_3(epoch, metrics):
        if epoch == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        LatentEBMDetector(**params).fit(X, callbacks=[stop_at_3], checkpoint_dir=tmp_path)
    resumed = LatentEBMDetector(**params).fit(X, checkpoint_dir=tmp_path, resume=True)
    uninterrupted = LatentEBMDetector(**params).fit(X)
    np.testing.assert_array_equal(resumed.score_samples(X), uninterrupted.score_samples(X))


def test_a_headerless_csv_whose_first_row_has_empty_cells_loses_no_row(masked_model, tmp_path):
    X = _holes(TABLE[:5], 0.3, seed=11)
    X[0, 0] = np.nan
    pd.DataFrame(X).to_csv(tmp_path / "raw.csv", index=False, header=False)
    assert (tmp_path / "raw.csv").read_text().startswith(",")
    path = masked_model.to_onnx(tmp_path / "m.onnx")
    assert cli.main(["score", str(path), str(tmp_path / "raw.csv"),
                     "--out", str(tmp_path / "s.csv")]) == 0
    np.testing.assert_allclose(pd.read_csv(tmp_path / "s.csv").score_samples,
                               masked_model.score_samples(X), rtol=1e-5, atol=1e-5)


def test_removal_patterns_remove_the_cells_they_say_and_leave_no_row_empty():
    rng = np.random.RandomState(0)
    for rate in (0.1, 0.5):
        mask = removal_mask((2000, 8), f"mcar_{rate}", rng)
        assert abs(mask.mean() - rate) < 0.02 and not mask.all(axis=1).any()
    blocks = removal_mask((400, 9), "blocks", rng)
    patterns = {tuple(row) for row in blocks}
    # one complete block and three blocks each without one contiguous group of 3 features
    assert patterns == {(False,) * 9, (True,) * 3 + (False,) * 6,
                        (False,) * 3 + (True,) * 3 + (False,) * 3, (False,) * 6 + (True,) * 3}
    assert not removal_mask((5, 3), "complete", rng).any()
    with pytest.raises(ValueError, match="unknown missing pattern"):
        removal_mask((5, 3), "mnar", rng)


def test_the_missing_suite_runs_each_of_our_models_with_cells_left_out_or_imputed():
    from evaluation import missing
    from evaluation.methods import MethodOptions

    options = MethodOptions(epochs=1, detector_params=TINY)
    expected = {"triangle": ("triangle", "mask", None),
                "triangle_mask": ("triangle", "mask", None),
                "triangle_median": ("triangle", "error", "median"),
                "vae_ablation": ("vae", "mask", None),
                "vae_ablation_mask": ("vae", "mask", None)}
    for name, (objective, setting, imputer) in expected.items():
        model = missing.build(name, 0, options)
        assert (model.objective, model.missing, missing.imputer_of(name)) == (
            objective, setting, imputer), name
    assert missing.base_method("vae_ablation_mask") == "vae_ablation"
    assert missing.imputer_of("pyod_knn_iterative") == "iterative"


def test_missing_suites_end_to_end(tmp_path, monkeypatch):
    from evaluation import missing
    from evaluation.methods import MethodOptions
    from evaluation.results import ResultLog

    rng = np.random.RandomState(0)
    X = rng.normal(size=(300, 5))
    y = (np.arange(300) < 30).astype(int)
    X[y == 1] += 4.0
    np.savez(tmp_path / "toy.npz", X=X, y=y)
    log = ResultLog(tmp_path / "missing.csv")
    missing.missing_suite({"toy": tmp_path / "toy.npz"}, seeds=[0], log=log,
                          patterns=("complete", "mcar_0.3"),
                          options=MethodOptions(epochs=2, detector_params=TINY), verbose=False)
    frame = log.frame()
    assert set(frame["method"]) == set(missing.method_names("complete")
                                       + missing.method_names("mcar_0.3"))
    assert frame["auroc"].notna().all()
    # anomalies shifted by 4 SD: the detector finds them with and without missing cells
    by_method = frame.set_index("method")["auroc"]
    assert (by_method[["triangle", "triangle_mask", "triangle_median", "vae_ablation",
                       "vae_ablation_mask"]] > 0.8).all()
    # a method loses against its own complete-data ceiling, per pattern
    tables = missing.missing_tables(frame)
    losses = tables["auroc_loss_vs_complete"]["mcar_0.3"]
    ceiling = frame.set_index(["target", "method"])["auroc"]
    assert losses["lof_median"] == pytest.approx(ceiling["complete", "lof"]
                                                 - ceiling["mcar_0.3", "lof_median"])
    # the ablation's ceiling is the ablation on complete rows, not the triangle
    assert tables["auroc_loss_vs_complete"].loc["vae_ablation_mask", "mcar_0.3"] == pytest.approx(
        ceiling["complete", "vae_ablation"] - ceiling["mcar_0.3", "vae_ablation_mask"])
    assert set(tables["mean_rank"].index) == set(missing.method_names("mcar_0.3"))

    alarms = ResultLog(tmp_path / "alarms.csv")
    shuffles = []
    split = missing.protocols.held_out_class
    monkeypatch.setattr(missing.protocols, "held_out_class",
                        lambda *a, shuffle_seed, **k: shuffles.append(shuffle_seed)
                        or split(*a, shuffle_seed=shuffle_seed, **k))
    missing.false_alarm_suite(classes=[0], seeds=[0], train_rates=(0.3,), test_rates=(0.0, 0.5),
                              split_seeds=(42, 7), epochs=2, detector_params=TINY, log=alarms,
                              verbose=False)
    fits = alarms.frame()
    # the default split keeps its old name (so earlier logs resume); another split is its own
    assert sorted(fits["dataset"]) == ["digits", "digits_split7"] and shuffles == [42, 7]
    table = missing.false_alarm_table(fits)
    assert list(table.index) == [("0.3", "0.0"), ("0.3", "0.5")]
    assert (table["normal rows"] == fits["n_normal"].sum()).all()
    # the ONNX path flags the same rows as the estimator
    np.testing.assert_allclose(table["onnx_offset"], table["offset"], atol=0.01)
    np.testing.assert_allclose(table["onnx_alpha_0.1"], table["alpha_0.1"], atol=0.01)

    images = rng.randint(0, 256, size=(40, 8, 8)).astype(np.uint8)
    recovered = ResultLog(tmp_path / "images.csv")
    missing.incomplete_images_suite(images, masks=("P.5", "B20"), seed=0, epochs=2,
                                    log=recovered, detector_params=TINY, verbose=False)
    errors = missing.incomplete_images_table(recovered.frame())
    assert list(errors.index) == ["P.5", "B20"]
    assert list(errors.columns) == list(missing.IMAGE_METHODS)
    assert ((errors > 0) & (errors < 1)).all().all()


def test_columns_an_imputer_drops_are_put_back():
    from sklearn.impute import KNNImputer

    from evaluation.missing import _restore_dropped

    rows = np.array([[1.0, np.nan, 3.0], [2.0, np.nan, np.nan], [4.0, np.nan, 5.0]])
    imputed = KNNImputer(n_neighbors=1).fit(rows).transform(rows[1:2])
    assert imputed.shape == (1, 2)  # the never-observed column is dropped
    restored = _restore_dropped(imputed, rows, -1.0)
    np.testing.assert_array_equal(restored[:, [0, 1]], [[2.0, -1.0]])
    assert restored.shape == (1, 3) and np.isfinite(restored).all()


@pytest.mark.slow
def test_missing_alarms_command_pools_the_splits_it_is_given(tmp_path):
    import json

    from evaluation import cli

    params = json.dumps({k: v for k, v in TINY.items() if k != "epochs"})
    args = ["bench", "--suite", "missing-alarms", "--classes", "3", "--seeds", "0",
            "--split-seeds", "42,5", "--epochs", "1", "--detector-params", params,
            "--out", str(tmp_path)]
    assert cli.main(args) == 0
    out = tmp_path / "missing-alarms"
    fits = pd.read_csv(out / "false_alarms.csv")
    assert sorted(set(fits["dataset"])) == ["digits", "digits_split5"]
    assert len(fits) == 4  # two splits x the two training missing rates
    table = pd.read_csv(out / "false_alarm_rates.csv")
    assert (table["normal rows"] == fits.groupby("method")["n_normal"].sum().iloc[0]).all()
