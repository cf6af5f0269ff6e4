"""Where the critic's score has its lowest points.

An energy that ranked by density would be lowest where the training rows are. This suite
tests that on fitted detectors: start chains from broad noise in the model's input units,
descend the score itself, E(x, mu(x)) through the encoder, by cold Langevin steps, and
compare the energies the chains reach, and their distance to the nearest training row, with
the training rows' own. Chains that end far from every training row with a lower energy than
every training row show minima of the score away from the data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from evaluation import protocols
from evaluation.methods import MethodOptions, make_method
from evaluation.results import ResultLog
from training.sampling import langevin

N_CHAINS = 256
DESCENT_STEPS = 300
GRADIENT_STEP = 0.1   # x <- x - GRADIENT_STEP * grad + NOISE * eps: cold, as the EBM papers sample
NOISE = 0.01
START_SD = 2.0        # chains start at N(0, START_SD^2 I) in the model's standardised units
# the same step as training.sampling.langevin's s and T: s^2 / 2 = GRADIENT_STEP, s sqrt(T) = NOISE
STEP_SIZE = math.sqrt(2.0 * GRADIENT_STEP)
TEMPERATURE = NOISE**2 / (2.0 * GRADIENT_STEP)


def descend_score(scorer, n_features: int, generator: torch.Generator, *,
                  n_chains: int = N_CHAINS, steps: int = DESCENT_STEPS) -> torch.Tensor:
    """``(n_chains, n_features)`` points in model units after ``steps`` cold Langevin steps
    down E(x, mu(x)) from broad noise (``scorer``: a fitted detector's ``scorer_``)."""
    x = START_SD * torch.randn((n_chains, n_features), generator=generator,
                               dtype=scorer.shift.dtype)
    return langevin(x, lambda v: _score(scorer, v), steps, STEP_SIZE, generator, TEMPERATURE)


def _score(scorer, x_model: torch.Tensor) -> torch.Tensor:
    return scorer.energy(x_model, scorer.encoder(x_model)[0])


def landscape_row(detector, X_train: np.ndarray, X_test: np.ndarray, y_test: np.ndarray,
                  seed: int) -> dict[str, float]:
    """The energies and nearest-training-row distances of a fitted flat-row detector's
    training rows, test rows and descended chains (model units)."""
    scorer = detector.scorer_
    train = scorer.preprocess(torch.as_tensor(X_train, dtype=scorer.shift.dtype))
    test = scorer.preprocess(torch.as_tensor(X_test, dtype=scorer.shift.dtype))
    if train.dim() != 2:
        raise ValueError("the energy landscape is measured on flat rows, not images")
    generator = torch.Generator().manual_seed(seed)
    chains = descend_score(scorer, train.shape[1], generator)
    with torch.no_grad():
        e_train, e_test, e_chain = (_score(scorer, x).numpy() for x in (train, test, chains))
        # a row's nearest other training row: the second-smallest distance (the first is 0)
        nn_train = torch.cdist(train, train).topk(2, largest=False).values[:, 1]
        nn_chain = torch.cdist(chains, train).min(1).values
    anomalous = y_test == 1
    return {
        "energy_auroc": roc_auc_score(y_test, e_test),
        "energy_train_median": float(np.median(e_train)),
        "energy_test_anomaly_median": float(np.median(e_test[anomalous])),
        "energy_descended_median": float(np.median(e_chain)),
        "share_below_every_training_row": float(np.mean(e_chain < e_train.min())),
        "share_below_training_median": float(np.mean(e_chain < np.median(e_train))),
        "distance_ratio": float(nn_chain.median() / nn_train.median().clamp_min(1e-12)),
    }


def landscape_suite(files: Mapping[str, Path],
                    load: Callable[[Path], tuple[np.ndarray, np.ndarray]], *,
                    seeds: Sequence[int], log: ResultLog, options: MethodOptions) -> None:
    """Per set and seed (the ADBench split of that seed, the default triangle with
    ``options``): one :func:`landscape_row`, appended to ``log`` as it finishes."""
    jobs = [(name, seed) for name in files for seed in seeds
            if not log.done(dataset="adbench", target=name, seed=seed, method="triangle")]
    loaded: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, seed in tqdm(jobs, desc="energy landscape", unit="fit"):
        if name not in loaded:  # jobs run set by set: one file read per set, one in memory
            loaded.clear()
            loaded[name] = load(files[name])
        split = protocols.tabular(*loaded[name], seed)
        detector = make_method("triangle", seed, options).fit(split.X_train)
        row = landscape_row(detector, split.X_train, split.X_test, split.y_test, seed)
        log.append({"dataset": "adbench", "target": name, "seed": seed, "method": "triangle",
                    **row})


def landscape_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per set, the means over seeds, and a last row ``all sets``: the mean AUROC, the
    count of sets where at least half the chains score below every training row, and the
    median distance ratio over sets."""
    columns = ["energy_auroc", "energy_train_median", "energy_test_anomaly_median",
               "energy_descended_median", "share_below_every_training_row",
               "share_below_training_median", "distance_ratio"]
    table = frame.groupby("target")[columns].mean()
    overall = {
        "energy_auroc": table["energy_auroc"].mean(),
        "share_below_every_training_row": float(
            (table["share_below_every_training_row"] >= 0.5).sum()),
        "distance_ratio": table["distance_ratio"].median(),
    }
    table.loc["all sets (AUROC mean; sets with half below; ratio median)"] = pd.Series(overall)
    return table.rename_axis("dataset")
