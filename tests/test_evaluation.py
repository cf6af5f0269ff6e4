import numpy as np
import pandas as pd
import pytest
import torch

from evaluation import cli, datasets, protocols
from evaluation.methods import MethodOptions, anomaly_scores, make_method
from evaluation.metrics import detection_metrics
from evaluation.results import ResultLog, mean_rank, paired, summary, write_tables
from evaluation.suites import held_out_class_suite
from tests.conftest import TINY


def test_held_out_split_follows_the_protocol():
    X, y = datasets.digits()
    split = protocols.held_out_class(X, y, held_out=4)
    n_normal, n_four = int((y != 4).sum()), int((y == 4).sum())
    n_train = int(0.8 * n_normal)
    assert len(split.X_train) == n_train
    assert len(split.X_test) == n_normal - n_train + n_four
    assert split.y_test.sum() == n_four and (split.y_test[: n_normal - n_train] == 0).all()
    order = np.random.RandomState(42).permutation(n_normal)
    np.testing.assert_array_equal(split.X_train, X[y != 4][order[:n_train]])
    np.testing.assert_array_equal(split.X_test[-n_four:], X[y == 4])
    with pytest.raises(ValueError, match="does not occur"):
        protocols.held_out_class(X, y, held_out=11)


def test_metrics_match_hand_computed_cases():
    y = np.array([0, 0, 1, 1])
    assert detection_metrics(y, np.array([0.1, 0.2, 0.8, 0.9])) == {"auroc": 1.0, "auprc": 1.0}
    # one inversion among 4 pairs -> AUROC 3/4; precision at the two positives: 1/1, 2/3
    got = detection_metrics(y, np.array([0.1, 0.85, 0.8, 0.9]))
    assert got["auroc"] == pytest.approx(0.75)
    assert got["auprc"] == pytest.approx(0.5 * (1 + 2 / 3))


def test_peer_score_signs_agree_higher_is_anomalous():
    rng = np.random.RandomState(0)
    train = rng.normal(size=(200, 3))
    test = np.vstack([rng.normal(size=(20, 3)), rng.normal(loc=8, size=(5, 3))])
    for name in ("isolation_forest", "lof", "ocsvm", "pyod_knn", "pyod_ecod"):
        method = make_method(name, seed=0).fit(train)
        scores = anomaly_scores(method, test)
        assert scores[-5:].min() > np.median(scores[:20]), name


def _tiny_suite(log, methods, plot_dir=None):
    rng = np.random.RandomState(0)
    X = rng.normal(size=(90, 4, 4))
    y = np.repeat(np.arange(3), 30)
    X[y == 2] += 3.0
    held_out_class_suite(X, y, dataset="toy", classes=[2], seeds=[0], methods=methods,
                         log=log, options=MethodOptions(detector_params=TINY), verbose=False,
                         plot_dir=plot_dir)


def test_result_log_resumes(tmp_path):
    log = ResultLog(tmp_path / "r.csv")
    _tiny_suite(log, ["lof", "triangle"])
    first = pd.read_csv(tmp_path / "r.csv")
    assert {"lof", "triangle", "triangle[energy]", "triangle[joint]"} <= set(first.method)
    again = ResultLog(tmp_path / "r.csv")
    assert again.done(dataset="toy", target=2, seed=0, method="lof")
    _tiny_suite(again, ["lof", "triangle", "isolation_forest"])
    second = pd.read_csv(tmp_path / "r.csv")
    assert len(second) == len(first) + 1  # only the new method ran
    assert summary(second).loc["lof", "runs"] == 1


def test_tables_never_overwrite_the_raw_results(tmp_path):
    # the missing-alarms suite once named its table like its raw log, so each run replaced
    # the resumable per-fit rows with the summary
    raw = tmp_path / "false_alarms.csv"
    raw.write_text("seed,flagged\n0,1\n")
    table = pd.DataFrame({"rate": [0.1]})
    with pytest.raises(ValueError, match="overwrite the raw results"):
        write_tables({"false_alarms": table}, tmp_path, keep=raw)
    assert raw.read_text() == "seed,flagged\n0,1\n"
    write_tables({"false_alarm_rates": table}, tmp_path, keep=raw)
    assert pd.read_csv(tmp_path / "false_alarm_rates.csv")["rate"].tolist() == [0.1]
    assert raw.read_text() == "seed,flagged\n0,1\n"


def test_mean_rank_ranks_methods_not_score_rule_variants():
    table = pd.DataFrame({"a": [0.9, 0.5, 0.7], "b": [0.8, 0.6, np.nan],
                          "a[energy]": [0.95, 0.99, 0.99]}, index=["d1", "d2", "d3"])
    ranks = mean_rank(table)
    assert list(ranks.index) == ["a", "b"]
    # d1: a first; d2: b first; d3: a alone (b's missing result is not ranked)
    assert ranks["a"] == pytest.approx((1 + 2 + 1) / 3)
    assert ranks["b"] == pytest.approx((2 + 1) / 2)


def test_paired_compares_the_reference_on_shared_runs_only():
    rows = [("a", 0, 0.9), ("b", 0, 0.8), ("a", 1, 0.7), ("b", 1, 0.75), ("a", 2, 0.6),
            ("b", 2, 0.5), ("a", 3, 0.9), ("c", 3, 0.9), ("a", 4, 0.8)]
    frame = pd.DataFrame([{"dataset": "d", "target": t, "seed": 0, "method": m, "auroc": v}
                          for m, t, v in rows])
    table = paired(frame, "a")
    assert table.loc["b", "runs"] == 3  # targets 0-2; a's run on target 4 has no partner
    assert table.loc["b", "auroc_difference"] == pytest.approx((0.1 - 0.05 + 0.1) / 3)
    assert (table.loc["b", "wins"], table.loc["b", "losses"]) == (2, 1)
    assert 0 < table.loc["b", "wilcoxon_p"] <= 1
    assert table.loc["c", "runs"] == 1 and np.isnan(table.loc["c", "wilcoxon_p"])  # a tie


def test_anomaly_scores_by_rule_match_each_rule_s_definition(images):
    from sklearn.covariance import MinCovDet
    from sklearn.neighbors import LocalOutlierFactor

    from anomaly import LatentEBMDetector
    from training.scorer import LOF_NEIGHBORS, MCD_SUPPORT_FRACTION

    det = LatentEBMDetector(**TINY, score_rule="elbo", random_state=0).fit(images)
    rules = det.anomaly_scores_by_rule(images)
    assert set(rules) == {"energy", "joint", "reconstruction", "elbo", "latent_knn",
                          "latent_lof", "fused", "latent_fused", "latent_mahalanobis",
                          "global_fused"}
    np.testing.assert_allclose(rules["elbo"], det.anomaly_score(images))
    # Each rule by its definition, from the networks directly.
    fitted = det.scorer_
    with torch.no_grad():
        x = fitted.preprocess(torch.from_numpy(images.reshape(len(images), -1)))
        mu, logvar = fitted.encoder(x)
        energy = fitted.energy(x, mu).numpy()
        sq_error = ((x - fitted.generator(mu)) ** 2).flatten(1).sum(1).numpy()
    recon = sq_error / (2 * fitted.decoder_sigma ** 2)
    kl = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(1).numpy()
    prior = 0.5 * (mu ** 2).sum(1).numpy()
    np.testing.assert_allclose(rules["energy"], energy, rtol=1e-10)
    np.testing.assert_allclose(rules["reconstruction"], recon, rtol=1e-10)
    np.testing.assert_allclose(rules["elbo"], recon + kl, rtol=1e-10)
    np.testing.assert_allclose(rules["joint"], energy + recon + prior, rtol=1e-10)
    # latent_knn: mean distance to the 5 nearest training codes (brute force here).
    bank = fitted.code_bank.numpy()
    distances = np.linalg.norm(mu.numpy()[:, None, :] - bank[None], axis=2)
    knn = np.sort(distances, axis=1)[:, :5].mean(1)
    # atol: |a|^2 - 2ab + |b|^2 cancels to ~1e-16 rather than 0 for a row's own code.
    np.testing.assert_allclose(rules["latent_knn"], knn, rtol=1e-8, atol=1e-7)
    # latent_lof: scikit-learn's local outlier factor of the codes among the bank's.
    lof = LocalOutlierFactor(n_neighbors=LOF_NEIGHBORS, novelty=True).fit(bank)
    np.testing.assert_allclose(rules["latent_lof"], -lof.score_samples(mu.numpy()), rtol=1e-8)
    center, spread = fitted.fusion_center.numpy(), fitted.fusion_spread.numpy()
    standardised = [(s - c) / w
                    for s, c, w in zip((recon, knn, energy), center[:3], spread[:3], strict=True)]
    # Some rows are more normal than the median under some rule: the cut at 0 is exercised.
    assert min(z.min() for z in standardised) < 0
    fused = sum(np.maximum(z, 0.0) for z in standardised)
    np.testing.assert_allclose(rules["fused"], fused, rtol=1e-6, atol=1e-5)
    # latent_fused: latent_knn and latent_lof, standardised alike (entries 1 and 3)
    latent = [(s - center[i]) / spread[i] for s, i in ((knn, 1), (rules["latent_lof"], 3))]
    assert min(z.min() for z in latent) < 0 < max(z.max() for z in latent)
    np.testing.assert_allclose(rules["latent_fused"], sum(np.maximum(z, 0.0) for z in latent),
                               rtol=1e-6, atol=1e-5)
    # latent_mahalanobis: scikit-learn's robust (MCD) squared distance of the codes from the
    # bank's; global_fused: it with the reconstruction and the energy (entries 4, 0, 2)
    mcd = MinCovDet(support_fraction=MCD_SUPPORT_FRACTION, random_state=0).fit(bank)
    maha = mcd.mahalanobis(mu.numpy())
    np.testing.assert_allclose(rules["latent_mahalanobis"], maha, rtol=1e-8)
    global_terms = [(s - center[i]) / spread[i] for s, i in ((recon, 0), (maha, 4), (energy, 2))]
    np.testing.assert_allclose(rules["global_fused"],
                               sum(np.maximum(z, 0.0) for z in global_terms), rtol=1e-6, atol=1e-5)


@pytest.mark.slow
def test_quick_suite_end_to_end(tmp_path, capsys):
    # digit 0 is an easy held-out digit: every method should rank it well above chance
    code = cli.main(["bench", "--suite", "quick", "--classes", "0", "--epochs", "2",
                     "--out", str(tmp_path)])
    assert code == 0
    table = pd.read_csv(tmp_path / "quick" / "summary.csv", index_col=0)
    assert {"triangle", "vae_ablation", "lof", "isolation_forest", "ocsvm"} <= set(table.index)
    assert table.loc["lof", "auroc_mean"] > 0.95
    assert table.loc["triangle", "auroc_mean"] > 0.75
    assert table.loc["triangle[latent_knn]", "auroc_mean"] > 0.8
    assert (tmp_path / "quick" / "summary.md").read_text().startswith("| method")
    paired_table = pd.read_csv(tmp_path / "quick" / "paired_auroc.csv", index_col=0)
    assert paired_table.loc["vae_ablation", "runs"] == 1
    assert "lof" in capsys.readouterr().out


def test_a_failing_or_non_finite_peer_is_recorded_not_fatal(tmp_path, monkeypatch):
    import evaluation.suites as suites

    real = suites.anomaly_scores

    def flaky(method, X):
        scores = real(method, X)
        if type(method).__name__ == "IsolationForest":  # an inf score, as PyOD PCA gives
            scores[0] = np.inf
        return scores

    monkeypatch.setattr(suites, "anomaly_scores", flaky)
    log = ResultLog(tmp_path / "r.csv")
    _tiny_suite(log, ["isolation_forest", "no_such_method", "lof"], plot_dir=tmp_path)
    frame = pd.read_csv(tmp_path / "r.csv").set_index("method")
    assert frame.loc["isolation_forest", "error"] == "non-finite scores"
    assert np.isnan(frame.loc["isolation_forest", "auroc"])
    assert "unknown method" in frame.loc["no_such_method", "error"]
    assert frame.loc["lof", "auroc"] > 0.9
    assert (tmp_path / "toy_2_seed0_roc_pr.png").is_file()  # drawn without the inf scores


def test_detector_params_option_reaches_our_models():
    from evaluation.methods import MethodOptions, make_method

    args = cli.build_parser().parse_args(
        ["bench", "--detector-params", '{"latent_dim": 3, "score_rule": "joint"}'])
    assert args.detector_params == {"latent_dim": 3, "score_rule": "joint"}
    model = make_method("vae_ablation", 0, MethodOptions(detector_params=args.detector_params))
    assert (model.latent_dim, model.score_rule, model.objective) == (3, "joint", "vae")
    for bad in ("[1, 2]", "{latent_dim: 3}"):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["bench", "--detector-params", bad])


def test_throughput_table_counts_the_flops_each_lever_saves():
    from evaluation.speed import scoring_throughput, training_throughput

    images = np.random.RandomState(0).randint(0, 256, (64, 8, 8)).astype(np.uint8)
    table = training_throughput(images, variants={
        "vae": {"objective": "vae"}, "triangle": {},
        "triangle, critic every 2": {"critic_every": 2}}, steps=2, repeats=1,
        batch_size=16, width=4, latent_dim=2).set_index("variant")
    assert table.loc["vae", "ratio_to_vae"] == 1.0
    assert (table.samples_per_s > 0).all() and (table.peak_fraction > 0).all()
    flops = table.gflop_per_step
    assert flops["vae"] < flops["triangle, critic every 2"] < flops["triangle"]
    scoring = scoring_throughput(images, width=4, latent_dim=2, batch_size=32,
                                 repeats=1).set_index("dtype")
    assert list(scoring.index) == ["float32", "float64"]
    assert (scoring.achieved_gflops > 0).all() and (scoring.peak_fraction > 0).all()


@pytest.mark.slow
def test_scale_suite_measures_streamed_and_in_memory_scoring_and_resumes(tmp_path):
    assert cli.main(["bench", "--suite", "scale", "--rows", "3000", "--out",
                     str(tmp_path)]) == 0
    first = pd.read_csv(tmp_path / "scale" / "scores.csv")
    code = cli.main(["bench", "--suite", "scale", "--rows", "3000,70000", "--out",
                     str(tmp_path)])
    assert code == 0
    log = pd.read_csv(tmp_path / "scale" / "scores.csv")
    # the 3,000-row measurements are kept from the first run, not taken again
    pd.testing.assert_frame_equal(log.iloc[:2], first)
    assert len(log) == 4
    table = pd.read_csv(tmp_path / "scale" / "scoring_memory.csv")
    assert sorted(zip(table["rows"], table["mode"], strict=True)) == [
        (3000, "in memory"), (3000, "streamed"), (70000, "in memory"), (70000, "streamed")]
    assert (table["peak_rss_mb"] > 0).all() and (table["seconds"] > 0).all()
    assert table["file_mb"].is_monotonic_increasing


@pytest.mark.slow
def test_scale_fit_suite_measures_streamed_and_in_memory_fits(tmp_path):
    code = cli.main(["bench", "--suite", "scale-fit", "--rows", "2000,5000",
                     "--budget-minutes", "0.02", "--out", str(tmp_path)])
    assert code == 0
    table = pd.read_csv(tmp_path / "scale-fit" / "training_memory.csv")
    assert sorted(zip(table["rows"], table["mode"], strict=True)) == [
        (2000, "in memory"), (2000, "streamed"), (5000, "in memory"), (5000, "streamed")]
    assert (table["peak_rss_mb"] > 0).all() and (table["training_seconds"] > 0).all()


def test_digits_suite_gives_our_models_images_unless_the_detector_params_say_otherwise(
        tmp_path, monkeypatch):
    import evaluation.suites as suites
    from evaluation.methods import _ours

    seen = []
    monkeypatch.setattr(suites, "held_out_class_suite",
                        lambda X, y, **kwargs: seen.append(kwargs["options"]))
    for options in (MethodOptions(), MethodOptions(detector_params={"image_shape": None})):
        suites.digits_suite(tmp_path, classes=[0], seeds=[0], methods=["triangle"],
                            options=options, verbose=False)
    images, flat = seen
    assert _ours("triangle", 0, images).image_shape == (8, 8)
    assert _ours("triangle", 0, flat).image_shape is None
