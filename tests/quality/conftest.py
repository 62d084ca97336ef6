"""Fixtures of the quality tests: the digits reference evaluator, trained once per session, and one
torch thread per test. The shared train-then-evaluate loop is ``quality_run.py``."""

from __future__ import annotations

from pathlib import Path

import pytest


def evaluator_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One evaluator cache per pytest session (shared with tests/integration/test_evaluator.py)."""
    return tmp_path_factory.getbasetemp() / "reference-evaluators"


@pytest.fixture(scope="session")
def reference_evaluator(digits_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    """The reference evaluator of the ``digits_dataset`` shards (dual encoder + classifier).

    Trained on the first use in a session (about a minute on 2 busy cores) and cached in the
    session's temp folder, so every quality test and the evaluator's own integration test share it.
    """
    from aigc.evaluation import reference_evaluator as make_evaluator

    return make_evaluator(digits_dataset, cache_dir=evaluator_cache(tmp_path_factory))


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Train on one intra-op thread, restored afterwards.

    The 8x8 nets gain nothing from a second OpenMP thread, and the DataLoader worker process needs
    the other core: with 2 threads plus the worker on 2 busy cores, OpenMP's spin-waiting made a
    50-CPU-second run take over 600 s here. The shipped YAMLs say the same
    (``trainer.threads_per_worker: 1``).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
