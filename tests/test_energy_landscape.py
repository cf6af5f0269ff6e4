import json

import numpy as np
import pandas as pd
import torch

from anomaly import LatentEBMDetector
from evaluation import cli
from evaluation.energy_landscape import descend_score, landscape_row
from tests.conftest import TINY

RNG = np.random.RandomState(0)


def _rows(n, anomalies=0):
    X = RNG.normal(size=(n, 3))
    X[:anomalies] += 6.0
    y = np.zeros(n, dtype=int)
    y[:anomalies] = 1
    return X, y


def test_descent_lowers_the_score_it_follows():
    # The chains must go down E(x, mu(x)); a sign error (ascent) or a step that ignores the
    # gradient leaves their mean energy at or above where the noise started.
    det = LatentEBMDetector(**TINY, random_state=0).fit(_rows(200)[0])
    scorer = det.scorer_
    start = descend_score(scorer, 3, torch.Generator().manual_seed(1), n_chains=64, steps=0)
    end = descend_score(scorer, 3, torch.Generator().manual_seed(1), n_chains=64, steps=100)
    with torch.no_grad():
        e_start = scorer.energy(start, scorer.encoder(start)[0]).mean()
        e_end = scorer.energy(end, scorer.encoder(end)[0]).mean()
    assert e_end < e_start


def test_landscape_row_measures_shares_and_distances():
    X_train, _ = _rows(150)
    X_test, y_test = _rows(60, anomalies=6)
    det = LatentEBMDetector(**TINY, random_state=0).fit(X_train)
    row = landscape_row(det, X_train, X_test, y_test, seed=0)
    assert 0.0 <= row["share_below_every_training_row"] <= row["share_below_training_median"] <= 1
    assert row["distance_ratio"] > 0
    assert 0.0 <= row["energy_auroc"] <= 1.0


def test_energy_landscape_command_writes_one_row_per_set_and_resumes(tmp_path):
    data = tmp_path / "adbench"
    data.mkdir()
    for name in ("1_alpha", "2_beta"):
        X, y = _rows(120, anomalies=12)
        np.savez(data / f"{name}.npz", X=X, y=y)
    params = json.dumps({k: v for k, v in TINY.items() if k != "epochs"})
    args = ["bench", "--suite", "energy-landscape", "--data", str(data), "--seeds", "0",
            "--epochs", "1", "--detector-params", params, "--out", str(tmp_path / "out")]
    assert cli.main(args) == 0
    out = tmp_path / "out" / "energy-landscape"
    runs = pd.read_csv(out / "landscape_runs.csv")
    assert sorted(runs["target"]) == ["alpha", "beta"]
    table = pd.read_csv(out / "energy_landscape.csv", index_col=0)
    assert list(table.index[:2]) == ["alpha", "beta"]
    # the last row counts the sets where at least half the chains undercut every training row
    halves = (table["share_below_every_training_row"].iloc[:2] >= 0.5).sum()
    assert table["share_below_every_training_row"].iloc[-1] == halves
    assert cli.main(args) == 0  # a rerun resumes: nothing is fitted or appended again
    assert len(pd.read_csv(out / "landscape_runs.csv")) == 2
