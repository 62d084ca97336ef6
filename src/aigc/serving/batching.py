"""How ``/generate`` requests become model calls: the model queue, the call plan, the counters.

**Batches that fill while the model works.** ``@serve.batch`` (ray 2.60) forms the next batch as
soon as one request arrives plus ``batch_wait_timeout_s``, even while the previous batch is still
in the model; with ``max_concurrent_batches=1`` the formed batches then wait their turn one by one.
With a model slower than the wait (a 20-step diffusion call takes ~100 ms, the wait 10 ms), eight
concurrent clients were served in batches of 1-2. So the replica lets Serve's batches through at
once (a high ``max_concurrent_batches``) into a :class:`ModelQueue`, which runs one model batch at
a time and, whenever the model is free, takes everything that queued meanwhile (up to
``max_batch_size`` requests). After each model batch it also waits a moment for the clients it
just answered (see :meth:`ModelQueue._refill`); a lone request waits only Serve's short window.

**Never mixing options or seeds.** A model batch may ask for different options and seeds; one
``generate`` call has one set of options and one random generator (:func:`plan_calls`):

- requests without a seed and with the same options are merged into one call: each prompt is
  repeated ``num_samples`` times and the call makes one image per entry, so the images come back
  grouped by request, in order;
- a request with a seed gets the images ``generate([prompt], num_samples, seed, **options)`` makes
  on its own, whatever it was batched with (the generator's draws depend on the whole call's
  batch, so merging two seeded requests would change both). Identical seeded requests in one
  batch share one call.
- an edit (image-to-image, inpainting) or an interpolation runs alone, one call per request
  (:attr:`GenerateRequest.alone`): ``generate`` takes one set of init images, masks and strength
  per call, and ``interpolate`` one pair of end points. Merging unseeded edits with the same
  strength would be correct but is not done; edits still share the model batch (and its single
  version) with the requests around them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aigc.serving.limits import GenerateRequest


@dataclass
class ModelCall:
    """One ``generate`` call and which requests its images belong to."""

    prompts: list[str]
    num_samples: int
    seed: int | None
    options: dict[str, Any]
    #: (request index in the batch, first image, number of images) for each request served
    slices: list[tuple[int, int, int]] = field(default_factory=list)
    #: the one request of an edit or interpolation call (its init image, mask, strength, end point)
    edit: GenerateRequest | None = None

    @property
    def images(self) -> int:
        if self.edit is not None and self.edit.interpolate is not None:
            return self.edit.interpolate.frames
        return len(self.prompts) * self.num_samples


def plan_calls(requests: list[GenerateRequest]) -> list[ModelCall]:
    """The model calls that serve ``requests`` (see the module docstring), in first-seen order."""
    calls: dict[tuple, ModelCall] = {}
    for i, r in enumerate(requests):
        if r.alone:
            call = calls[("alone", i)] = ModelCall([r.prompt], r.num_samples, r.seed, r.option_dict, edit=r)
            call.slices.append((i, 0, call.images))
        elif r.seed is None:
            key = (r.options, None)
            call = calls.get(key)
            if call is None:
                call = calls[key] = ModelCall([], 1, None, r.option_dict)
            call.slices.append((i, len(call.prompts), r.num_samples))
            call.prompts.extend([r.prompt] * r.num_samples)
        else:
            key = (r.options, r.seed, r.prompt, r.num_samples)
            call = calls.get(key)
            if call is None:
                call = calls[key] = ModelCall([r.prompt], r.num_samples, r.seed, r.option_dict)
            call.slices.append((i, 0, r.num_samples))
    return list(calls.values())


class ModelQueue:
    """One model batch at a time; each takes every request queued while the previous one ran.

    ``run(requests) -> outcomes`` (one per request, in order) runs in a worker thread, so the event
    loop keeps accepting requests, answering ``/healthz`` and rejecting bad input meanwhile.
    Use from one event loop.
    """

    def __init__(
        self,
        run: Callable[[list[GenerateRequest]], list[Any]],
        max_requests: int,
        refill_wait_s: float = 0.01,
    ):
        self._run = run
        self.max_requests = max_requests
        self.refill_wait_s = refill_wait_s
        self._pending: list[tuple[GenerateRequest, asyncio.Future]] = []
        self._arrived: asyncio.Event | None = None
        self._draining = False

    async def submit(self, requests: list[GenerateRequest]) -> list[Any]:
        """The outcomes of ``requests``, once a model batch has run them."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in requests]
        self._pending.extend(zip(requests, futures, strict=True))
        if self._arrived is not None:
            self._arrived.set()
        if not self._draining:
            self._draining = True
            loop.create_task(self._drain())
        return list(await asyncio.gather(*futures))

    async def _refill(self, returning: int) -> None:
        """After a model batch of ``returning`` requests, wait up to ``refill_wait_s`` for their
        clients' next requests (they come within milliseconds when clients are busy) or a full
        batch, whichever is first. Without it, eight busy clients were served in batches that
        alternate between the few that queued meanwhile and the rest (2, 6, 2, 6, ...)."""
        loop = asyncio.get_running_loop()
        want = min(self.max_requests, len(self._pending) + returning)
        deadline = loop.time() + self.refill_wait_s
        self._arrived = asyncio.Event()
        try:
            while len(self._pending) < want and (left := deadline - loop.time()) > 0:
                self._arrived.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), left)
        finally:
            self._arrived = None

    async def _drain(self) -> None:
        try:
            while self._pending:
                # Requests whose caller went away (client disconnect) are not run.
                live = [(r, f) for r, f in self._pending if not f.done()]
                take, self._pending = live[: self.max_requests], live[self.max_requests :]
                if not take:
                    continue
                try:
                    outcomes = await asyncio.to_thread(self._run, [r for r, _ in take])
                except Exception as err:  # the run function failed as a whole: fail its requests
                    outcomes = [err] * len(take)
                for (_, future), outcome in zip(take, outcomes, strict=True):
                    if not future.done():
                        future.set_result(outcome)
                if self.refill_wait_s > 0:
                    await self._refill(returning=len(take))
        finally:
            self._draining = False


class BatchStats:
    """What the replica formed: Serve's intake batches, model batches (requests per model run,
    after merging) and images per ``generate`` call, with the seconds spent in the model.

    Written from the model's worker thread and the event loop, one writer at a time per counter;
    read by ``/stats``.
    """

    def __init__(self) -> None:
        self.serve_batch_sizes: Counter[int] = Counter()
        self.batch_sizes: Counter[int] = Counter()
        self.call_images: Counter[int] = Counter()
        self.calls_per_batch: Counter[int] = Counter()
        self.model_s = 0.0  # seconds inside generate()
        self.model_cpu_s = 0.0  # CPU seconds of the model's thread inside generate()
        self.model_torch_threads: int | None = None  # torch's threads on that thread, last call
        self.encode_s = 0.0  # seconds encoding PNGs
        # Requests answered with images, and their seconds in the replica's /generate handler (from
        # the body's arrival to the response built): the rest of a client's latency is Serve's
        # proxy and the network.
        self.served = 0
        self.handler_s = 0.0

    def record_serve_batch(self, size: int) -> None:
        self.serve_batch_sizes[size] += 1

    def record(self, batch_size: int, calls: list[ModelCall]) -> None:
        self.batch_sizes[batch_size] += 1
        self.calls_per_batch[len(calls)] += 1
        for call in calls:
            self.call_images[call.images] += 1

    def record_model_call(self, wall_s: float, cpu_s: float) -> None:
        """One model call from the model's thread: its seconds, its thread's CPU seconds, and the
        torch thread count in effect there (what the replica really ran with)."""
        import torch

        self.model_s += wall_s
        self.model_cpu_s += cpu_s
        self.model_torch_threads = torch.get_num_threads()

    def record_served(self, handler_s: float) -> None:
        self.served += 1
        self.handler_s += handler_s

    def as_dict(self) -> dict[str, Any]:
        def keyed(c: Counter[int]) -> dict[str, int]:
            return {str(k): c[k] for k in sorted(c)}

        requests = sum(k * n for k, n in self.batch_sizes.items())
        batches = sum(self.batch_sizes.values())
        return {
            "requests": requests,
            "batches": batches,
            "mean_batch_size": round(requests / batches, 3) if batches else None,
            "batch_sizes": keyed(self.batch_sizes),
            "serve_batch_sizes": keyed(self.serve_batch_sizes),
            "model_calls": sum(self.call_images.values()),
            "model_calls_per_batch": keyed(self.calls_per_batch),
            "images_per_model_call": keyed(self.call_images),
            "model_seconds": round(self.model_s, 3),
            "model_cpu_seconds": round(self.model_cpu_s, 3),
            "model_torch_threads": self.model_torch_threads,
            "png_seconds": round(self.encode_s, 3),
            "served_requests": self.served,
            "handler_seconds": round(self.handler_s, 3),
        }
