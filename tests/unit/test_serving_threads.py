"""What a replica's model call runs with and how it is timed (docs/serving.md, Performance): the
model batch runs on the model queue's worker thread with the torch thread count set where the
replica was constructed, and ``/stats`` reports the call's wall seconds, its thread's CPU seconds
and that thread count, so a benchmark can tell a slower model from a thread that waited for a CPU.
No server: ``GenerateServer._run_requests`` and ``ModelQueue`` are called directly."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
import torch

from aigc.serving.app import GenerateServer
from aigc.serving.batching import BatchStats, ModelQueue
from aigc.serving.limits import GenerateRequest


@pytest.fixture
def torch_threads():
    """Restore torch's thread count after a test that sets it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


class Model:
    """``generate`` that spins for ``seconds`` of its thread's CPU time or sleeps ``seconds`` (no
    CPU), and returns grey images."""

    generate_options: dict = {}

    def __init__(self, seconds: float, spin: bool):
        self.seconds, self.spin = seconds, spin

    def generate(self, prompts, num_samples=1, seed=None, **options):
        if self.spin:
            end = time.thread_time() + self.seconds
            while time.thread_time() < end:
                pass
        else:
            time.sleep(self.seconds)
        return torch.zeros(len(prompts) * num_samples, 1, 8, 8, dtype=torch.uint8)


def run_batch(model: Model, n: int) -> dict:
    replica = SimpleNamespace(
        stats=BatchStats(), follower=SimpleNamespace(current=SimpleNamespace(module=model, version="1"))
    )
    answers = GenerateServer.func_or_class._run_requests(replica, [GenerateRequest("a digit")] * n)
    assert [len(a.images) for a in answers] == [1] * n
    return replica.stats.as_dict()


def test_stats_split_the_model_call_into_wall_and_its_threads_cpu(torch_threads) -> None:
    torch.set_num_threads(1)
    busy = run_batch(Model(0.05, spin=True), 2)
    assert busy["model_cpu_seconds"] >= 0.05
    assert busy["model_seconds"] >= busy["model_cpu_seconds"] - 0.002  # rounding to ms
    assert busy["model_torch_threads"] == 1
    waiting = run_batch(Model(0.05, spin=False), 1)
    assert waiting["model_seconds"] >= 0.05
    assert waiting["model_cpu_seconds"] < 0.02  # off the CPU: wall time only


def test_the_model_queues_worker_thread_runs_with_the_threads_set_at_construction(torch_threads) -> None:
    """``GenerateServer.__init__`` sets torch's threads on the constructing thread; the model batch
    runs on a worker thread of the event loop's executor, which must see the same count (torch
    applies it to each new thread's OpenMP team before its first parallel region)."""
    torch.set_num_threads(1)
    seen: list[tuple[int, int]] = []

    def run(requests: list[GenerateRequest]) -> list[int]:
        x = torch.randn(64, 64)
        (x @ x).sum()  # a parallel region on this thread
        seen.append((torch.get_num_threads(), torch.get_num_interop_threads()))
        return [0] * len(requests)

    async def main() -> None:
        queue = ModelQueue(run, max_requests=8, refill_wait_s=0)
        await queue.submit([GenerateRequest("a digit")])
        await queue.submit([GenerateRequest("a digit")] * 2)

    asyncio.run(main())
    assert [threads for threads, _ in seen] == [1, 1]
