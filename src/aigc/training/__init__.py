"""Distributed training: the launcher (driver side), the job record, Ray start-up, the per-worker
loop, the one Trainer builder and the Lightning callbacks."""

from aigc.training.job import TrainError, TrainJob
from aigc.training.launcher import TrainResult, train

__all__ = ["TrainError", "TrainJob", "TrainResult", "train"]
