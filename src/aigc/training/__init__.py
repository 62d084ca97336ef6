"""Distributed training: the request (:class:`TrainRequest`), the launcher (driver side), the job
record and its run folder, the per-worker loop, the one Trainer builder and the Lightning callbacks."""

from aigc.training.job import TrainError, TrainJob
from aigc.training.launcher import TrainResult, train
from aigc.training.request import TrainRequest

__all__ = ["TrainError", "TrainJob", "TrainRequest", "TrainResult", "train"]
