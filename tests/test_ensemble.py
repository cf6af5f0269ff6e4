"""Ensembles of independently trained members: the mean score, and everything a single
model does (save and load, ONNX, p-values, attributions, checkpoints) still holding."""

import numpy as np
import pytest
import torch

from anomaly import LatentEBMDetector
from serving.runtime import OnnxDetector
from tests.conftest import TINY
from training.scorer import AnomalyScorer
from training.scorer_ensemble import ScorerEnsemble

X = np.random.RandomState(0).normal(size=(150, 5))
X[:8] += 4.0
IMAGES = np.random.RandomState(1).randint(0, 256, size=(40, 8, 8)).astype(np.uint8)


@pytest.fixture(scope="module")
def ensemble():
    return LatentEBMDetector(**TINY, n_members=3, calibration=0.2, random_state=0).fit(X)


def _member_scores(detector, rows):
    with torch.no_grad():
        x = torch.from_numpy(rows)
        return [member(x).numpy() for member in detector.scorer_.members]


def test_the_score_is_the_mean_of_independent_members(ensemble):
    assert isinstance(ensemble.scorer_, ScorerEnsemble) and ensemble.n_members_ == 3
    by_member = _member_scores(ensemble, X)
    # each member is a model of its own seed, not a copy of the first
    assert not np.allclose(by_member[0], by_member[1])
    assert not np.allclose(by_member[1], by_member[2])
    np.testing.assert_allclose(-ensemble.score_samples(X), np.mean(by_member, axis=0),
                               rtol=1e-12)
    assert {record["member"] for record in ensemble.training_history_} == {0, 1, 2}


def test_the_first_member_is_the_single_model_of_the_same_seed():
    single = LatentEBMDetector(**TINY, n_members=1, random_state=0).fit(X)
    several = LatentEBMDetector(**TINY, n_members=2, random_state=0).fit(X)
    assert isinstance(single.scorer_, AnomalyScorer)
    np.testing.assert_array_equal(_member_scores(several, X)[0], -single.score_samples(X))
    # what needs one model's networks comes from the first member
    np.testing.assert_array_equal(several.encode(X), single.encode(X))


def test_auto_is_three_members_on_rows_and_one_on_images():
    assert LatentEBMDetector(**TINY, random_state=0).fit(X).n_members_ == 3
    images = LatentEBMDetector(**TINY, random_state=0).fit(IMAGES)
    assert images.n_members_ == 1 and isinstance(images.scorer_, AnomalyScorer)


def test_p_values_and_attributions_are_the_ensembles(ensemble):
    anomaly = -ensemble.score_samples(X)
    calibration = ensemble.scorer_.calibration_scores.numpy()
    expected = (1 + (calibration[None, :] >= anomaly[:, None]).sum(1)) / (len(calibration) + 1)
    np.testing.assert_allclose(ensemble.p_values(X), expected)
    np.testing.assert_allclose(ensemble.feature_scores(X).sum(1), anomaly, rtol=1e-9)


def test_save_load_and_onnx_give_the_ensembles_scores(ensemble, tmp_path):
    loaded = LatentEBMDetector.load(ensemble.save(tmp_path / "model"))
    assert isinstance(loaded.scorer_, ScorerEnsemble) and loaded.n_members_ == 3
    np.testing.assert_array_equal(loaded.score_samples(X), ensemble.score_samples(X))
    np.testing.assert_array_equal(loaded.p_values(X), ensemble.p_values(X))
    runtime = OnnxDetector(ensemble.to_onnx(tmp_path / "scorer.onnx"))
    np.testing.assert_allclose(runtime.score_samples(X), ensemble.score_samples(X),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(runtime.predict(X), ensemble.predict(X))
    # fresh rows: a calibration row of X ties with its own calibration score, and the
    # float32 networks' rounding breaks such ties either way
    fresh = np.random.RandomState(2).normal(size=(50, 5))
    np.testing.assert_allclose(runtime.p_values(fresh), ensemble.p_values(fresh), atol=1e-12)


def test_a_resumed_ensemble_fit_trains_nothing_again(tmp_path):
    params = dict(**TINY, n_members=2, random_state=0)
    first = LatentEBMDetector(**params).fit(X, checkpoint_dir=tmp_path)
    assert (tmp_path / "member1").is_dir()
    calls = []
    again = LatentEBMDetector(**params).fit(X, checkpoint_dir=tmp_path, resume=True,
                                            callbacks=[lambda e, m: calls.append(e)])
    assert calls == []
    np.testing.assert_array_equal(again.score_samples(X), first.score_samples(X))


def test_members_share_the_time_budget():
    budget = 3.0
    detector = LatentEBMDetector(**{**TINY, "epochs": 100_000}, n_members=2,
                                 max_training_seconds=budget, random_state=0).fit(X)
    seconds = [sum(r["seconds"] for r in detector.training_history_ if r["member"] == m)
               for m in (0, 1)]
    # a budget per member would take twice the budget; each member stops after the first
    # minibatch past its share of it
    assert all(s > 0 for s in seconds)
    assert sum(seconds) < 1.5 * budget


def test_missing_entries_are_scored_by_every_member_and_in_the_graph(tmp_path):
    holes = X.copy()
    hide = np.random.RandomState(3).random_sample(X.shape) < 0.2
    hide[:, 0] = False  # every row keeps an entry
    holes[hide] = np.nan
    detector = LatentEBMDetector(**TINY, n_members=2, missing="mask", random_state=0).fit(holes)
    # each member maps its own scores of incomplete rows by its own missing-rate calibration
    assert all(member.missing_rates.shape[0] > 1 for member in detector.scorer_.members)
    np.testing.assert_allclose(-detector.score_samples(holes),
                               np.mean(_member_scores(detector, holes), axis=0), rtol=1e-12)
    runtime = OnnxDetector(detector.to_onnx(tmp_path / "scorer.onnx"))
    np.testing.assert_allclose(runtime.score_samples(holes), detector.score_samples(holes),
                               rtol=1e-5, atol=1e-5)


def test_a_streamed_ensemble_scores_as_the_in_memory_one():
    batches = lambda: (X[i:i + 50] for i in range(0, len(X), 50))  # noqa: E731
    streamed = LatentEBMDetector(**TINY, n_members=2, random_state=0).fit_stream(batches)
    in_memory = LatentEBMDetector(**TINY, n_members=2, random_state=0).fit(X)
    assert isinstance(streamed.scorer_, ScorerEnsemble)
    np.testing.assert_allclose(streamed.score_samples(X), in_memory.score_samples(X),
                               rtol=1e-6)
