"""Saved models: no pickle, integrity of every byte, self-describing networks, atomic saves."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from anomaly import LatentEBMDetector
from tests.conftest import TINY

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def fitted(tabular_module):
    return LatentEBMDetector(**TINY, random_state=0).fit(tabular_module)


@pytest.fixture(scope="module")
def tabular_module():
    return np.random.RandomState(0).normal(size=(80, 5))


def test_files_hold_no_pickle_and_tampered_weights_are_refused(tmp_path, fitted):
    directory = fitted.save(tmp_path / "model")
    names = sorted(p.name for p in directory.iterdir())
    assert names[0] == "detector.json" and len(names) == 2
    assert names[1].startswith("weights-") and names[1].endswith(".safetensors")
    weights = directory / names[1]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        LatentEBMDetector.load(directory)
    with pytest.raises(FileNotFoundError, match="no saved detector"):
        LatentEBMDetector.load(tmp_path / "missing")


@pytest.mark.parametrize(("section", "key", "value"), [
    ("fitted", "offset", 123.0), ("fitted", "score_rule", "energy"),
    ("fitted", "decoder_sigma", 0.5), ("params", "decoder_sigma", 0.5),
    ("params", "latent_dim", 7), ("params", "objective", "vae"), ("network", "width", 4),
])
def test_any_edit_of_the_json_is_refused(tmp_path, fitted, section, key, value):
    directory = fitted.save(tmp_path / "model")
    config = json.loads((directory / "detector.json").read_text())
    config[section][key] = value
    (directory / "detector.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match its own checksum"):
        LatentEBMDetector.load(directory)


def test_a_saved_model_loads_after_the_defaults_change(tmp_path, fitted, tabular_module,
                                                       monkeypatch):
    import training.config

    directory = fitted.save(tmp_path / "model")
    before = fitted.score_samples(tabular_module)
    # A later version with other default sizes: the model still rebuilds as it was saved.
    monkeypatch.setattr(LatentEBMDetector, "_network_config",
                        lambda self, shape: training.config.NetworkConfig(
                            input_shape=shape, latent_dim=64, width=512, depth=3))
    loaded = LatentEBMDetector.load(directory)
    np.testing.assert_array_equal(loaded.score_samples(tabular_module), before)


@pytest.mark.parametrize("version", [2, 3])
def test_models_saved_by_earlier_formats_still_load(version):
    """Fixtures saved by the code of each format (a 3-feature DataFrame model); a change of
    format that cannot read them fails here."""
    loaded = LatentEBMDetector.load(FIXTURES / f"model_v{version}")
    probe = np.load(FIXTURES / f"model_v{version}_probe.npz")
    frame = pd.DataFrame(probe["X"], columns=["a", "b", "c"])
    np.testing.assert_allclose(loaded.score_samples(frame), probe["score"], rtol=1e-12)


def test_resaving_leaves_one_model_and_no_litter(tmp_path, fitted, tabular_module):
    directory = fitted.save(tmp_path / "model")
    (directory / "weights-0123456789abcdef.safetensors").write_bytes(b"half written")
    (directory / "detector.json.tmp").write_text("{")
    (directory / "notes.txt").write_text("the user's own file")
    other = LatentEBMDetector(**TINY, random_state=1).fit(tabular_module)
    other.save(directory)
    names = sorted(p.name for p in directory.iterdir())
    assert len(names) == 3 and "notes.txt" in names and "detector.json" in names
    np.testing.assert_array_equal(LatentEBMDetector.load(directory).score_samples(
        tabular_module), other.score_samples(tabular_module))


SAVE_LOOP = """
import sys
from anomaly import LatentEBMDetector
models = [LatentEBMDetector.load(path) for path in sys.argv[2:]]
print("ready", flush=True)
i = 0
while True:
    models[i % 2].save(sys.argv[1])
    i += 1
"""


@pytest.mark.slow
def test_a_save_killed_at_random_times_leaves_a_loadable_model(tmp_path):
    X = np.random.RandomState(0).normal(size=(3000, 40))
    models = [LatentEBMDetector(latent_dim=2, width=64, depth=1, epochs=1,
                                random_state=s).fit(X) for s in (0, 1)]
    sources = [str(m.save(tmp_path / f"source{i}")) for i, m in enumerate(models)]
    expected = [m.score_samples(X[:20]) for m in models]
    rng = np.random.RandomState(0)
    for trial in range(16):
        directory = tmp_path / f"model{trial}"
        process = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, str(directory), *sources],
                                   stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.5))
        process.send_signal(signal.SIGKILL)
        process.wait()
        scores = LatentEBMDetector.load(directory).score_samples(X[:20])
        assert any(np.array_equal(scores, e) for e in expected), trial
        # what the killed save left behind is cleared by the next save
        LatentEBMDetector.load(directory).save(directory)
        assert len(list(directory.iterdir())) == 2, sorted(p.name for p in directory.iterdir())


def test_a_model_saved_before_latent_lof_gets_its_banks_neighbourhoods_on_load():
    from sklearn.neighbors import LocalOutlierFactor

    from training.scorer import LOF_NEIGHBORS

    loaded = LatentEBMDetector.load(FIXTURES / "model_v3")
    probe = pd.DataFrame(np.load(FIXTURES / "model_v3_probe.npz")["X"], columns=["a", "b", "c"])
    bank = loaded.scorer_.code_bank.numpy()
    lof = LocalOutlierFactor(n_neighbors=min(LOF_NEIGHBORS, len(bank) - 1), novelty=True).fit(bank)
    np.testing.assert_allclose(loaded.anomaly_scores_by_rule(probe, ["latent_lof"])["latent_lof"],
                               -lof.score_samples(loaded.encode(probe)), rtol=1e-9)


def test_a_model_saved_before_latent_fused_gets_the_bank_statistics_it_needs_on_load(tmp_path):
    from sklearn.neighbors import LocalOutlierFactor

    from training.scorer import LOF_NEIGHBORS, STANDARDISED_RULES

    loaded = LatentEBMDetector.load(FIXTURES / "model_v3")
    scorer = loaded.scorer_
    assert scorer.fusion_center.shape == (len(STANDARDISED_RULES),)
    bank = scorer.code_bank.numpy()
    lof = LocalOutlierFactor(n_neighbors=min(LOF_NEIGHBORS, len(bank) - 1)).fit(bank)
    q1, median, q3 = np.percentile(-lof.negative_outlier_factor_, [25, 50, 75])
    lof_index = STANDARDISED_RULES.index("latent_lof")
    assert scorer.fusion_center[lof_index].item() == pytest.approx(median, rel=1e-9)
    assert scorer.fusion_spread[lof_index].item() == pytest.approx(q3 - q1, rel=1e-9)
    # and it saves, reloads and scores by the new rule like a model fitted today
    probe = pd.DataFrame(np.load(FIXTURES / "model_v3_probe.npz")["X"], columns=["a", "b", "c"])
    before = loaded.anomaly_scores_by_rule(probe, ["latent_fused"])["latent_fused"]
    again = LatentEBMDetector.load(loaded.save(tmp_path / "model"))
    np.testing.assert_array_equal(again.scorer_.fusion_center, scorer.fusion_center)
    np.testing.assert_allclose(again.anomaly_scores_by_rule(probe, ["latent_fused"])
                               ["latent_fused"], before, rtol=1e-12)


def test_a_model_saved_before_latent_mahalanobis_gets_its_codes_distribution_on_load(tmp_path):
    from sklearn.covariance import MinCovDet

    from training.scorer import MCD_SUPPORT_FRACTION, STANDARDISED_RULES

    loaded = LatentEBMDetector.load(FIXTURES / "model_v3")
    scorer = loaded.scorer_
    bank = scorer.code_bank.numpy()
    mcd = MinCovDet(support_fraction=MCD_SUPPORT_FRACTION, random_state=0).fit(bank)
    np.testing.assert_allclose(scorer.code_location.numpy(), mcd.location_, rtol=1e-9)
    probe = pd.DataFrame(np.load(FIXTURES / "model_v3_probe.npz")["X"], columns=["a", "b", "c"])
    by_rule = loaded.anomaly_scores_by_rule(probe, ["latent_mahalanobis", "global_fused"])
    np.testing.assert_allclose(by_rule["latent_mahalanobis"],
                               mcd.mahalanobis(loaded.encode(probe)), rtol=1e-8)
    # its training spread is computed from the bank, as fit computes it
    index = STANDARDISED_RULES.index("latent_mahalanobis")
    q1, median, q3 = np.percentile(mcd.mahalanobis(bank), [25, 50, 75])
    assert scorer.fusion_center[index].item() == pytest.approx(median, rel=1e-9)
    assert scorer.fusion_spread[index].item() == pytest.approx(q3 - q1, rel=1e-9)
    again = LatentEBMDetector.load(loaded.save(tmp_path / "model"))
    np.testing.assert_array_equal(again.scorer_.code_precision, scorer.code_precision)
    np.testing.assert_allclose(again.anomaly_scores_by_rule(probe, ["global_fused"])
                               ["global_fused"], by_rule["global_fused"], rtol=1e-12)
