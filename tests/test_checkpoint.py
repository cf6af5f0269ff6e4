"""Checkpoints: a fit killed mid-way resumes and ends with the uninterrupted fit's model."""

import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from anomaly import LatentEBMDetector
from training.checkpoint import CHECKPOINT_NAME

PARAMS = dict(latent_dim=2, width=16, depth=1, epochs=12, batch_size=32, random_state=0)
X = np.random.RandomState(0).normal(size=(200, 5))

# The child trains with the single thread conftest gives this process: float sums split
# over a different number of threads round differently, so a resumed fit matches the
# uninterrupted one bit for bit only at equal thread counts.
KILLED_FIT = f"""
import sys, time
import numpy as np
import torch
from anomaly import LatentEBMDetector
torch.set_num_threads(1)
X = np.random.RandomState(0).normal(size=(200, 5))
def slow(epoch, metrics):
    print(epoch, flush=True)
    time.sleep(0.3)
LatentEBMDetector(**{PARAMS!r}).fit(X, callbacks=[slow], checkpoint_dir=sys.argv[1])
"""


@pytest.mark.slow
def test_a_killed_fit_resumes_to_the_uninterrupted_model(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", KILLED_FIT, str(tmp_path)],
                               stdout=subprocess.PIPE, text=True)
    for line in process.stdout:
        if int(line) == 5:
            break
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    epochs_seen = []
    resumed = LatentEBMDetector(**PARAMS).fit(
        X, checkpoint_dir=tmp_path, resume=True,
        callbacks=[lambda epoch, metrics: epochs_seen.append(epoch)])
    # it did not start over; the default's three members on rows count their epochs on
    assert 5 <= epochs_seen[0] - 1 < 12 and epochs_seen[-1] == 12 * resumed.n_members_ == 36
    uninterrupted = LatentEBMDetector(**PARAMS).fit(X)
    np.testing.assert_array_equal(resumed.score_samples(X), uninterrupted.score_samples(X))
    def without_timing(history):
        return [{k: v for k, v in epoch.items() if k != "seconds"} for epoch in history]

    assert without_timing(resumed.training_history_) == without_timing(
        uninterrupted.training_history_)


def test_checkpoint_contents_and_refusals(tmp_path):
    det = LatentEBMDetector(**{**PARAMS, "epochs": 3}).fit(X, checkpoint_dir=tmp_path,
                                                            checkpoint_every=2)
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)  # no code on load
    assert len(state["epochs"]) == 3  # the last epoch is always written
    assert not list(tmp_path.glob("*.tmp"))
    # resuming a finished fit gives its model back without training again
    calls = []
    again = LatentEBMDetector(**{**PARAMS, "epochs": 3}).fit(
        X, checkpoint_dir=tmp_path, resume=True, callbacks=[lambda e, m: calls.append(e)])
    assert calls == []
    np.testing.assert_array_equal(again.score_samples(X), det.score_samples(X))
    with pytest.raises(ValueError, match="belongs to another fit"):
        LatentEBMDetector(**{**PARAMS, "epochs": 3}).fit(X[::-1], checkpoint_dir=tmp_path,
                                                         resume=True)
    with pytest.raises(ValueError, match="belongs to another fit"):
        LatentEBMDetector(**{**PARAMS, "epochs": 3, "learning_rate": 1e-3}).fit(
            X, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="needs the checkpoint_dir"):
        LatentEBMDetector(**PARAMS).fit(X, resume=True)
    with pytest.raises(ValueError, match="checkpoint_every"):
        LatentEBMDetector(**PARAMS).fit(X, checkpoint_dir=tmp_path, checkpoint_every=0)
    # resume=True with an empty directory starts afresh
    fresh = LatentEBMDetector(**{**PARAMS, "epochs": 3}).fit(
        X, checkpoint_dir=tmp_path / "new", resume=True)
    np.testing.assert_array_equal(fresh.score_samples(X), det.score_samples(X))
