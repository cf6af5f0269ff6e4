import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from anomaly import LatentEBMDetector
from tests.conftest import TINY


def _fit(X, **params):
    return LatentEBMDetector(**{**TINY, "random_state": 0, **params}).fit(X)


def test_scores_api_and_sign(tabular):
    det = _fit(tabular)
    scores = det.score_samples(tabular)
    assert scores.dtype == np.float64 and scores.shape == (len(tabular),)
    np.testing.assert_array_equal(det.anomaly_score(tabular), -scores)
    np.testing.assert_allclose(det.decision_function(tabular), scores - det.offset_)
    np.testing.assert_array_equal(det.predict(tabular),
                                  np.where(scores < det.offset_, -1, 1))


def test_separates_a_shifted_cluster():
    rng = np.random.RandomState(0)
    normal = rng.normal(size=(400, 6))
    far = rng.normal(loc=4.0, size=(40, 6))
    det = LatentEBMDetector(latent_dim=2, width=32, epochs=15, random_state=0).fit(normal)
    test = np.vstack([rng.normal(size=(200, 6)), far])
    truth = np.r_[np.zeros(200), np.ones(40)]
    assert roc_auc_score(truth, det.anomaly_score(test)) > 0.95
    assert (det.predict(far) == -1).mean() > 0.9


def test_feature_scores_share_the_score_out_and_find_a_shifted_feature():
    rng = np.random.RandomState(0)
    loadings = rng.normal(size=(2, 8))
    normal = rng.normal(size=(600, 2)) @ loadings + 0.1 * rng.normal(size=(600, 8))
    det = LatentEBMDetector(latent_dim=2, width=32, epochs=20, random_state=0).fit(normal)
    test = rng.normal(size=(50, 2)) @ loadings + 0.1 * rng.normal(size=(50, 8))
    shifted = test.copy()
    shifted[np.arange(50), np.arange(50) % 8] += 6 * normal.std(axis=0)[np.arange(50) % 8]
    maps = det.feature_scores(shifted)
    assert maps.shape == (50, 8)
    np.testing.assert_allclose(maps.sum(axis=1), det.anomaly_score(shifted), rtol=1e-9)
    assert (maps.argmax(axis=1) == np.arange(50) % 8).mean() >= 0.9
    # in the score's units: the same feature of a normal row carries far less
    column = np.arange(50) % 8
    assert np.median(det.feature_scores(test)[np.arange(50), column]) < \
        0.2 * np.median(maps[np.arange(50), column])


def test_feature_scores_of_images_are_maps(images):
    det = _fit(images)
    assert det.feature_scores(images[:3]).shape == (3, 8, 8)
    assert det.feature_scores(images[:3].reshape(3, 1, 8, 8)).shape == (3, 1, 8, 8)
    with pytest.raises(ValueError, match="NaN"):
        det.feature_scores(np.full((1, 8, 8), np.nan))


@pytest.mark.parametrize("contamination", [0.05, 0.2])
def test_contamination_sets_training_outlier_fraction(tabular, contamination):
    # A rule without the code bank: training rows score as they did when the offset was set.
    det = _fit(tabular, contamination=contamination, score_rule="joint")
    assert (det.predict(tabular) == -1).mean() == pytest.approx(contamination, abs=1 / 80)


@pytest.mark.parametrize("rule", ["fused", "latent_knn"])
def test_bank_rules_keep_the_training_codes_and_the_contamination_contract(tabular, rule):
    import torch

    det = _fit(tabular, contamination=0.1, score_rule=rule)
    assert det.scorer_.code_bank.shape == (len(tabular), TINY["latent_dim"])
    np.testing.assert_allclose(det.scorer_.code_bank, det.encode(tabular))
    assert (det.predict(tabular) == -1).mean() == pytest.approx(0.1, abs=1 / 80)
    # Left out of its own neighbours, a training row looks as anomalous as an unseen one.
    x = torch.from_numpy(tabular)
    loo = -det.scorer_.scores_in_chunks(x, (rule,), leave_one_out=True)[rule].numpy()
    assert (det.score_samples(tabular) >= loo - 1e-12).all()
    assert (det.score_samples(tabular) > loo).any()


def test_latent_mahalanobis_is_robust_to_anomalies_among_the_training_codes(tabular):
    from sklearn.covariance import EmpiricalCovariance

    det = _fit(tabular, contamination=0.1, score_rule="global_fused", n_members=1)
    assert (det.predict(tabular) == -1).mean() == pytest.approx(0.1, abs=1 / 80)
    scorer = det.scorer_
    bank = scorer.code_bank.numpy()
    # A tenth of the codes moved far away: the robust location and covariance ignore them,
    # the plain ones are dragged towards them, and the moved codes score far out.
    shifted = bank.copy()
    shifted[: len(bank) // 10] += 50.0
    scorer.code_bank = torch.from_numpy(shifted)
    scorer.set_code_distribution()
    clean_mean = bank[len(bank) // 10:].mean(0)
    plain = EmpiricalCovariance().fit(shifted).location_
    robust_error = np.abs(scorer.code_location.numpy() - clean_mean).max()
    assert robust_error < 0.1 * np.abs(plain - clean_mean).max()
    maha = scorer.code_scores(torch.from_numpy(shifted), ("latent_mahalanobis",))
    maha = maha["latent_mahalanobis"].numpy()
    assert maha[: len(bank) // 10].min() > 100 * np.median(maha[len(bank) // 10:])


def test_latent_knn_is_the_mean_distance_to_the_nearest_bank_codes(tabular):
    from sklearn.neighbors import NearestNeighbors

    det = _fit(tabular, score_rule="latent_knn", n_members=1)
    bank = det.scorer_.code_bank.numpy()
    rng = np.random.RandomState(1)
    codes = np.vstack([rng.normal(size=(30, bank.shape[1])), bank[:5]])
    found = NearestNeighbors(n_neighbors=6).fit(bank).kneighbors(codes)[0]
    knn = det.scorer_.latent_knn(torch.from_numpy(codes))
    np.testing.assert_allclose(knn.numpy(), found[:, :5].mean(1), rtol=1e-10)
    # a bank row's own code is at distance exactly 0, so leaving it out keeps the next five
    loo = det.scorer_.latent_knn(torch.from_numpy(bank[:5]), leave_one_out=True)
    np.testing.assert_allclose(loo.numpy(), found[30:, 1:].mean(1), rtol=1e-10)
    assert (knn[30:] < loo).all()


def test_latent_lof_is_scikit_learns_local_outlier_factor_on_the_bank(tabular):
    from sklearn.neighbors import LocalOutlierFactor

    from training.scorer import LOF_NEIGHBORS

    det = _fit(tabular, score_rule="latent_lof", n_members=1)
    assert det.score_rule_ == "latent_lof"
    bank = det.scorer_.code_bank.numpy()
    lof = LocalOutlierFactor(n_neighbors=LOF_NEIGHBORS, novelty=True).fit(bank)
    codes = np.random.RandomState(1).normal(size=(30, bank.shape[1]))
    ours = det.scorer_.latent_lof(torch.from_numpy(codes)).numpy()
    np.testing.assert_allclose(ours, -lof.score_samples(codes), rtol=1e-9)
    # a bank row left out of its own neighbours gets its outlier factor within the bank
    loo = det.scorer_.latent_lof(torch.from_numpy(bank), leave_one_out=True).numpy()
    np.testing.assert_allclose(loo, -lof.negative_outlier_factor_, rtol=1e-9)
    # and the estimator scores raw rows by it, through the encoder
    np.testing.assert_allclose(det.anomaly_score(tabular[:10]),
                               -lof.score_samples(det.encode(tabular[:10])), rtol=1e-9)

def test_fused_rules_standardise_each_rule_by_its_training_spread(tabular):
    import torch

    det = _fit(tabular, score_rule="fused", n_members=1)
    scorer = det.scorer_
    by_rule = scorer.scores_in_chunks(torch.from_numpy(tabular), leave_one_out=True)
    for i, rule in enumerate(("reconstruction", "latent_knn", "energy", "latent_lof",
                              "latent_mahalanobis")):
        q1, median, q3 = np.percentile(by_rule[rule].numpy(), [25, 50, 75])
        assert scorer.fusion_center[i].item() == pytest.approx(median)
        assert scorer.fusion_spread[i].item() == pytest.approx(q3 - q1)


def test_code_bank_is_a_seeded_subset_of_large_training_sets(tabular):
    a, b = _fit(tabular, bank_size=30), _fit(tabular, bank_size=30)
    assert a.scorer_.code_bank.shape == (30, TINY["latent_dim"])
    np.testing.assert_array_equal(a.scorer_.code_bank, b.scorer_.code_bank)
    np.testing.assert_array_equal(a.score_samples(tabular), b.score_samples(tabular))
    # Every bank code is the code of one of the training rows.
    codes = a.encode(tabular)
    assert all(np.isclose(codes, c).all(axis=1).any() for c in a.scorer_.code_bank.numpy())


def test_auto_contamination_is_tukey_fence(tabular):
    det = _fit(tabular, score_rule="joint")
    q1, q3 = np.percentile(det.score_samples(tabular), [25, 75])
    assert det.offset_ == pytest.approx(q1 - 1.5 * (q3 - q1))


def test_reproducible_with_random_state(tabular):
    a = _fit(tabular).score_samples(tabular)
    np.testing.assert_array_equal(a, _fit(tabular).score_samples(tabular))
    assert not np.array_equal(a, _fit(tabular, random_state=1).score_samples(tabular))


def test_scores_do_not_depend_on_batch(tabular):
    det = _fit(tabular)
    full = det.score_samples(tabular)
    parts = np.concatenate([det.score_samples(tabular[i:i + 7]) for i in range(0, 80, 7)])
    np.testing.assert_allclose(parts, full, rtol=1e-12)
    # views with negative or non-unit strides are rows like any other
    np.testing.assert_allclose(det.score_samples(tabular[::-1])[::-1], full, rtol=1e-12)
    np.testing.assert_allclose(det.score_samples(np.asfortranarray(tabular)[::2]), full[::2],
                               rtol=1e-12)


@pytest.mark.parametrize("layout", ["nhw", "nchw", "rows"])
def test_image_inputs_all_reach_the_conv_model(images, layout):
    if layout == "nhw":
        X, params = images, {}
    elif layout == "nchw":
        X, params = images[:, None], {}
    else:
        X, params = images.reshape(len(images), -1), {"image_shape": (8, 8)}
    det = _fit(X, **params)
    assert det.input_shape_ == (1, 8, 8)
    assert det.n_features_in_ == 64
    # Every layout of the same images scores identically: 2-D rows feed the image model.
    expected = det.score_samples(X)
    for other in (images, images[:, None], images.reshape(len(images), -1)):
        np.testing.assert_array_equal(det.score_samples(other), expected)


def test_rgb_images(images):
    rgb = np.stack([images, images[::-1], images], axis=1)  # (n, 3, 8, 8)
    det = _fit(rgb)
    assert det.input_shape_ == (3, 8, 8)
    assert det.reconstruct(rgb[:2]).shape == (2, 3, 8, 8)


def test_dataframe_keeps_feature_names(tabular):
    frame = pd.DataFrame(tabular, columns=list("abcde"))
    det = _fit(frame)
    assert list(det.feature_names_in_) == list("abcde")
    with pytest.warns(UserWarning, match="feature names"):
        unnamed = det.score_samples(frame.to_numpy())
    np.testing.assert_array_equal(det.score_samples(frame), unnamed)


@pytest.mark.parametrize("params", [{}, {"objective": "vae", "score_rule": "elbo"},
                                    {"objective": "vae", "score_rule": "fused"},
                                    {"score_rule": "latent_knn"}, {"image_shape": (8, 8)}])
def test_save_load_round_trip(tmp_path, images, params):
    X = images.reshape(len(images), -1).astype(float)
    det = _fit(X, **params)
    det.save(tmp_path / "model")
    loaded = LatentEBMDetector.load(tmp_path / "model")
    np.testing.assert_array_equal(loaded.score_samples(X), det.score_samples(X))
    np.testing.assert_array_equal(loaded.predict(X), det.predict(X))
    assert loaded.get_params() == det.get_params()
    np.testing.assert_array_equal(loaded.reconstruct(X[:3]), det.reconstruct(X[:3]))


def test_pickle_round_trip(tabular):
    det = _fit(tabular)
    clone = pickle.loads(pickle.dumps(det))
    np.testing.assert_array_equal(clone.score_samples(tabular), det.score_samples(tabular))


def test_reconstruct_sample_inpaint(images):
    X = images.astype(float)
    det = _fit(X)
    assert det.reconstruct(X[:4]).shape == (4, 8, 8)
    assert det.sample(5).shape == (5, 8, 8)
    assert det.sample(2, langevin_steps=3, random_state=0).shape == (2, 8, 8)
    np.testing.assert_array_equal(det.sample(3, random_state=1), det.sample(3, random_state=1))
    assert det.encode(X[:3]).shape == (3, 2)

    rng = np.random.RandomState(0)
    mask = rng.rand(*X[:6].shape) < 0.5
    corrupted = np.where(mask, np.nan, X[:6])
    filled = det.inpaint(corrupted, mask, n_iter=3)
    assert np.isfinite(filled).all()
    np.testing.assert_array_equal(filled[~mask], X[:6][~mask])
    refined = det.inpaint(corrupted, mask, n_iter=2, langevin_steps=2, random_state=0)
    np.testing.assert_array_equal(refined[~mask], X[:6][~mask])


def test_langevin_samples_the_potential_it_is_given():
    # U(z) = ||z - 3||^2 / 2 is N(3, I): short-run chains from 0 must move there, with unit
    # spread.
    from training.sampling import langevin

    generator = torch.Generator().manual_seed(0)
    z = langevin(torch.zeros(4000, 2, dtype=torch.float64),
                      lambda v: 0.5 * (v - 3.0).pow(2).sum(1), 300, 0.2, generator)
    np.testing.assert_allclose(z.mean(0).numpy(), [3.0, 3.0], atol=0.1)
    np.testing.assert_allclose(z.std(0).numpy(), [1.0, 1.0], atol=0.1)


def test_inpaint_validates_mask(tabular):
    det = _fit(tabular)
    with pytest.raises(TypeError, match="boolean"):
        det.inpaint(tabular, np.zeros(tabular.shape))
    with pytest.raises(ValueError, match="shape"):
        det.inpaint(tabular, np.zeros((3, 5), dtype=bool))
    observed_nan = tabular.copy()
    observed_nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        det.inpaint(observed_nan, np.zeros(tabular.shape, dtype=bool))


@pytest.mark.parametrize(("bad", "error", "message"), [
    (np.array([[1.0, np.nan]] * 3), ValueError, "NaN"),
    (np.array([[1.0, np.inf]] * 3), ValueError, "infinity"),
    (np.empty((0, 2)), ValueError, "0 sample"),
    (np.ones(4), ValueError, "Expected 2D array"),
    (np.array([["a", "b"]] * 3), ValueError, "string|could not convert"),
    (np.array([[1.0, "x"]] * 3, dtype=object), ValueError, "could not convert"),
    (np.ones((3, 2)) + 1j, ValueError, "[Cc]omplex"),
    (np.ones((2, 2, 2, 2, 2)), ValueError, "5-D"),
])
def test_bad_training_input(bad, error, message):
    with pytest.raises(error, match=message):
        LatentEBMDetector(**TINY).fit(bad)


def test_image_shape_must_match_image_input(images):
    with pytest.raises(ValueError, match=r"image_shape \(4, 16\) does not match.*\(8, 8\)"):
        LatentEBMDetector(**TINY, image_shape=(4, 16)).fit(images)
    # the same shape, written either way, is accepted
    for shape in ((8, 8), (1, 8, 8)):
        assert LatentEBMDetector(**TINY, image_shape=shape).fit(images).input_shape_ == (1, 8, 8)


def test_a_huge_training_value_gives_a_finite_scale_and_a_warning(tabular):
    X = tabular.copy()
    X[0, 2] = 1e300
    expected = r"columns \[2\] hold values up to [0-9.]+e\+299 from their mean"
    with pytest.warns(UserWarning, match=expected):
        det = _fit(X)
    scale = det.scorer_.scale.numpy()
    assert np.isfinite(scale).all() and scale[2] > 1e298
    np.testing.assert_allclose(scale[[0, 1, 3, 4]], X[:, [0, 1, 3, 4]].std(axis=0))
    assert np.isfinite(det.score_samples(X[1:])).all()


def test_a_failed_refit_leaves_the_previous_model_intact(tabular, tmp_path, monkeypatch):
    import anomaly._detector as detector_module
    from training.loop import TrainingDivergedError

    det = _fit(tabular)
    before = det.score_samples(tabular)
    state = dict(vars(det))

    def diverge(*args, **kwargs):
        raise TrainingDivergedError("diverged")

    monkeypatch.setattr(detector_module, "train_networks", diverge)
    wider = np.hstack([tabular, tabular])
    with pytest.raises(TrainingDivergedError):
        det.fit(pd.DataFrame(wider, columns=[f"c{i}" for i in range(10)]))
    assert vars(det).keys() == state.keys()
    assert all(vars(det)[k] is v for k, v in state.items())
    np.testing.assert_array_equal(det.score_samples(tabular), before)  # its old width
    loaded = LatentEBMDetector.load(det.save(tmp_path / "m"))
    np.testing.assert_allclose(loaded.score_samples(tabular), before)
    fresh = LatentEBMDetector(**TINY)
    with pytest.raises(TrainingDivergedError):
        fresh.fit(tabular)
    assert not [k for k in vars(fresh) if k.endswith("_")]  # still unfitted


def test_sample_and_inpaint_validate_their_arguments(tabular):
    det = _fit(tabular)
    for kwargs, message in (({"step_size": np.nan}, "step_size"),
                            ({"step_size": -1.0}, "step_size"),
                            ({"langevin_steps": -5}, "langevin_steps"),
                            ({"langevin_steps": 1.5}, "langevin_steps")):
        with pytest.raises(ValueError, match=message):
            det.sample(2, **kwargs)
        with pytest.raises(ValueError, match=message):
            det.inpaint(tabular[:2], np.zeros((2, 5), dtype=bool), **kwargs)
    with pytest.raises(ValueError, match=r"X has shape \(5,\).*5 values"):
        det.inpaint(tabular[0], np.zeros(5, dtype=bool))
    with pytest.raises(ValueError, match=r"X has shape \(2, 4\)"):
        det.inpaint(tabular[:2, :4], np.zeros((2, 4), dtype=bool))


def test_bad_scoring_input(tabular, images):
    det = _fit(tabular)
    with pytest.raises(ValueError, match="X has 3 features, but LatentEBMDetector is expecting 5"):
        det.score_samples(tabular[:, :3])
    with pytest.raises(ValueError, match="NaN"):
        det.predict(np.full((2, 5), np.nan))
    image_det = _fit(images)
    with pytest.raises(ValueError, match=r"shape \(6, 6\).*\(8, 8\)"):
        image_det.score_samples(np.zeros((2, 6, 6)))


@pytest.mark.parametrize(("params", "message"), [
    ({"score_rule": "bogus"}, "score_rule"),
    ({"objective": "vae", "score_rule": "energy"}, "needs objective='triangle'"),
    ({"objective": "gan"}, "objective"),
    ({"contamination": 0.7}, "contamination"),
    ({"contamination": "high"}, "contamination"),
    ({"epochs": 0}, "epochs"),
    ({"image_shape": (4, 4)}, "image_shape"),
    ({"image_shape": (8, 8), "depth": 4}, "divisible"),
    ({"device": "tpu"}, "device"),
    ({"critic_negatives": ("generator", "bogus")}, "critic_negatives"),
    ({"decoder_sigma": np.inf}, "'decoder_sigma' parameter.*Got inf"),
    ({"learning_rate": np.inf}, "'learning_rate' parameter.*Got inf"),
    ({"energy_scale": np.nan}, "'energy_scale' parameter.*Got nan"),
    ({"width": True}, "'width' parameter.*Got True"),
    ({"energy_width": False}, "'energy_width' parameter.*Got False"),
    ({"update_order": "random"}, "update_order"),
    ({"critic_every": 1.5}, "critic_every"),
    ({"critic_every": True}, "critic_every"),
    ({"training_precision": "half"}, "training_precision"),
])
def test_bad_parameters(images, params, message):
    X = images.reshape(len(images), -1)
    with pytest.raises(ValueError, match=message):
        LatentEBMDetector(**{**TINY, **params}).fit(X)


def test_auto_score_rule_is_latent_fused_for_images_and_global_fused_for_tables(
        tabular, images, tmp_path):
    assert _fit(tabular).score_rule_ == "global_fused"
    image_model = _fit(images.astype(float))
    assert image_model.score_rule_ == "latent_fused" and image_model.score_rule == "auto"
    assert _fit(tabular, score_rule="joint").score_rule_ == "joint"
    loaded = LatentEBMDetector.load(image_model.save(tmp_path / "model"))
    assert loaded.score_rule_ == "latent_fused"


def test_auto_critic_negatives_are_wide_and_suspect_pairs_on_tables_and_none_on_images(
        tabular, images):
    """"auto" must train exactly as its resolution does, and differently from the other one,
    so the extra pairs really reach the critic on rows and never on images."""
    def energies(X, negatives):
        return _fit(X, critic_negatives=negatives, score_rule="energy").score_samples(X)

    rows_auto = energies(tabular, "auto")
    np.testing.assert_array_equal(rows_auto, energies(tabular, ("wide", "suspect")))
    assert not np.allclose(rows_auto, energies(tabular, ("wide",)))
    assert not np.allclose(rows_auto, energies(tabular, ()))
    pixels = images.astype(float)
    np.testing.assert_array_equal(energies(pixels, "auto"), energies(pixels, ()))


def test_anomaly_scores_by_rule_selects_rules_and_refuses_bad_ones(tabular):
    det = LatentEBMDetector(**TINY, random_state=0).fit(tabular)
    chosen = det.anomaly_scores_by_rule(tabular[:7], rules=("reconstruction", "energy"))
    assert set(chosen) == {"reconstruction", "energy"}
    everything = det.anomaly_scores_by_rule(tabular[:7])
    for rule, scores in chosen.items():
        assert scores.shape == (7,)
        np.testing.assert_array_equal(scores, everything[rule])
    np.testing.assert_array_equal(everything[det.score_rule_], det.anomaly_score(tabular[:7]))
    with pytest.raises(ValueError, match="unknown score rules"):
        det.anomaly_scores_by_rule(tabular, rules=("density",))
    with pytest.raises(TypeError, match="sequence of rule names"):
        det.anomaly_scores_by_rule(tabular, rules="energy")
    vae = LatentEBMDetector(**TINY, objective="vae", random_state=0).fit(tabular)
    assert "energy" not in vae.anomaly_scores_by_rule(tabular)
    with pytest.raises(ValueError, match="needs objective='triangle'"):
        vae.anomaly_scores_by_rule(tabular, rules=("energy",))


def test_langevin_on_the_model_s_potential_lowers_the_energy(tabular):
    # sample(langevin_steps=...) moves prior draws on E(g(z), z) + ||z||^2 / 2: against the
    # same chains (same noise) on the prior alone, the energy must come out lower.
    from training.sampling import langevin

    scorer = LatentEBMDetector(**TINY, random_state=0).fit(tabular).scorer_

    def energy(v):
        return scorer.energy(scorer.generator(v), v)

    def prior(v):
        return 0.5 * v.pow(2).sum(1)

    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    moved = langevin(z, lambda v: energy(v) + prior(v), 30, 0.1,
                     torch.Generator().manual_seed(1))
    prior_only = langevin(z, prior, 30, 0.1, torch.Generator().manual_seed(1))
    with torch.no_grad():
        lowered = energy(moved) - energy(prior_only)
    assert (lowered < 0).float().mean() > 0.9
    assert lowered.mean() < -10 * lowered.std() / len(lowered) ** 0.5
