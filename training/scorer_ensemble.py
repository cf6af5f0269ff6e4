"""Several independently trained scorers of the same data, scored as one: their mean.

Fits of the same networks from other random seeds rank a table's anomalies differently
(0.82-0.84 mean ADBench AUROC on one split for three seeds), and the mean of their
standardised scores ranks better than a typical member (README, twenty-seventh round). Every
member is a complete :class:`AnomalyScorer` (networks, code bank, calibration); the
ensemble adds the conformal calibration of the mean score. What needs one model's networks
rather than a score (codes, reconstructions, samples, inpainting) uses the first member.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from training.scorer import CHUNK_ROWS, SCORE_RULES, AnomalyScorer, conformal_p_values

# Read from the first member: its networks (sampling, inpainting, the encoder and energy
# graphs), the preprocessing all members share, and settings that all members share.
FIRST_MEMBER_ATTRIBUTES = frozenset({
    "encoder", "generator", "energy", "shift", "scale", "input_shape", "rule",
    "decoder_sigma", "allows_missing", "code_bank", "preprocess", "postprocess", "complete",
    "encode"})


def _mean_by_rule(by_member: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Each rule's scores ``(n,)`` averaged over the members' dicts of scores."""
    return {rule: torch.stack([scores[rule] for scores in by_member]).mean(0)
            for rule in by_member[0]}


class ScorerEnsemble(nn.Module):
    """The mean of the anomaly scores of ``members``, under each rule.

    Parameters
    ----------
    members : sequence of AnomalyScorer
        At least two scorers of the same preprocessing, input shape, rule and objective,
        each with its own networks and (after :meth:`calibrate`) its own code bank.
    calibration_scores : Tensor of shape (n_calibration,) or None
        Sorted anomaly scores (the members' mean) of normal rows none of the networks were
        trained on, for :meth:`p_values`.
    """

    def __init__(self, members: Sequence[AnomalyScorer],
                 calibration_scores: torch.Tensor | None = None) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        first = members[0]
        for member in members[1:]:
            if (member.rule != first.rule or member.input_shape != first.input_shape
                    or (member.energy is None) != (first.energy is None)
                    or member.allows_missing != first.allows_missing):
                raise ValueError("ensemble members must share the score rule, input shape, "
                                 "objective and handling of missing entries")
        self.members = nn.ModuleList(members)
        dtype = first.shift.dtype
        self.register_buffer("calibration_scores", torch.zeros(0, dtype=dtype)
                             if calibration_scores is None else calibration_scores.clone())

    def __getattr__(self, name: str):
        if name in FIRST_MEMBER_ATTRIBUTES:
            return getattr(self.members[0], name)
        return super().__getattr__(name)

    @property
    def is_calibrated(self) -> bool:
        return all(member.is_calibrated for member in self.members)

    def calibrate(self, x_bank_raw: torch.Tensor) -> None:
        """Each member's :meth:`AnomalyScorer.calibrate` on the same raw rows."""
        for member in self.members:
            member.calibrate(x_bank_raw)

    def calibrate_missing_rates(self, x_bank_raw: torch.Tensor, seed: int = 0,
                                in_bank: bool = True) -> None:
        """Each member's :meth:`AnomalyScorer.calibrate_missing_rates`: every member maps
        its own scores of incomplete rows onto its complete rows' before the mean."""
        for member in self.members:
            member.calibrate_missing_rates(x_bank_raw, seed, in_bank)

    def scores(self, x_raw: torch.Tensor, rules: tuple[str, ...] = SCORE_RULES,
               leave_one_out: bool = False) -> dict[str, torch.Tensor]:
        """The members' mean score ``(n,)`` of raw rows ``(n, n_features)`` under each rule
        (see :meth:`AnomalyScorer.scores`)."""
        return _mean_by_rule([member.scores(x_raw, rules, leave_one_out)
                              for member in self.members])

    def scores_in_chunks(self, x_raw: torch.Tensor, rules: tuple[str, ...] = SCORE_RULES,
                         chunk_rows: int = CHUNK_ROWS, leave_one_out: bool = False
                         ) -> dict[str, torch.Tensor]:
        """:meth:`scores` of many rows, each member scoring them in bounded chunks."""
        return _mean_by_rule([member.scores_in_chunks(x_raw, rules, chunk_rows, leave_one_out)
                              for member in self.members])

    def forward(self, x_raw: torch.Tensor) -> torch.Tensor:
        return self.scores(x_raw, (self.rule,))[self.rule]

    def p_values(self, anomaly: torch.Tensor) -> torch.Tensor:
        """Split-conformal p-values of the ensemble's anomaly scores ``(n,)`` (see
        :func:`training.scorer.conformal_p_values`)."""
        return conformal_p_values(self.calibration_scores, anomaly)

    def feature_scores(self, x_raw: torch.Tensor, anomaly: torch.Tensor) -> torch.Tensor:
        """Each feature's part of ``anomaly`` ``(n,)``, ``(n, n_features)``: the mean of the
        members' attributions, each of which sums to ``anomaly`` over a row, as does the
        mean."""
        return torch.stack([member.feature_scores(x_raw, anomaly)
                            for member in self.members]).mean(0)
