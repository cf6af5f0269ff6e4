"""Training checkpoints: everything a killed fit needs to continue as if it had never stopped.

A checkpoint holds the networks, the three optimizers (learning rates included), the
schedulers, the state of the random generator that orders minibatches and draws noise, the
finished epochs' metrics and the rollback count. It is written with ``torch.save`` to a
temporary file and renamed over the previous one, so a kill leaves the last complete
checkpoint; it is read with ``weights_only=True``, so loading one runs no code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass(frozen=True)
class Checkpointer:
    """Where and how often to checkpoint one fit.

    Parameters
    ----------
    directory : Path
        Created if missing; holds ``checkpoint.pt``.
    fingerprint : str
        Identifies the fit (data and settings); a checkpoint with another fingerprint is
        never resumed from.
    every : int
        Write a checkpoint after every ``every`` finished epochs (and after the last one).
    resume : bool
        Continue from the checkpoint in ``directory`` if there is one.
    """

    directory: Path
    fingerprint: str
    every: int = 1
    resume: bool = False

    @property
    def path(self) -> Path:
        return Path(self.directory) / CHECKPOINT_NAME

    def load(self) -> dict[str, Any] | None:
        """The saved state to resume from, or None (no resume asked, or no checkpoint)."""
        if not self.resume or not self.path.is_file():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"the checkpoint in {self.directory} belongs to another fit (other training "
                "data or settings); use another checkpoint directory, or resume=False to "
                "start over and overwrite it")
        return state

    def save(self, state: dict[str, Any]) -> None:
        directory = Path(self.directory)
        directory.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_name(CHECKPOINT_NAME + ".tmp")
        with open(temp, "wb") as file:
            torch.save({**state, "fingerprint": self.fingerprint}, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, self.path)
