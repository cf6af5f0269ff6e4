"""Torch-only building blocks: networks, divergence-triangle objectives, the training loop."""

from training.config import NetworkConfig, TrainConfig
from training.loop import TrainingDivergedError, TrainingHistory, train_networks
from training.networks import Networks, build_networks
from training.scorer import SCORE_RULES, AnomalyScorer

__all__ = [
    "SCORE_RULES",
    "AnomalyScorer",
    "NetworkConfig",
    "Networks",
    "TrainConfig",
    "TrainingDivergedError",
    "TrainingHistory",
    "build_networks",
    "train_networks",
]
