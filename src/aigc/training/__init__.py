"""Distributed training: the Ray Train launcher (driver side), the per-worker loop, callbacks."""

from aigc.training.launcher import TrainError, TrainResult, train

__all__ = ["TrainError", "TrainResult", "train"]
