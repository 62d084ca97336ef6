"""The Ray Serve deployment of ``aigc serve``: ``POST /generate``, ``GET /healthz``, ``GET /stats``,
``GET /info`` (what the served model takes) and the playground page at ``GET /``.

One deployment with a FastAPI ingress. Each replica:

- loads the version its reference names from the registry's export (safetensors + JSON, through
  ``aigc.registry.versions.load_version``: no pickle on this path) and follows the alias with a
  daemon thread (``aigc.serving.follower``), swapping versions without stalling a request;
- checks each request against :class:`~aigc.serving.limits.RequestLimits` before it is queued;
- batches requests with ``@serve.batch`` into a model queue that merges whatever arrived while
  the model was busy, and splits each model batch into ``generate`` calls that never mix options
  or seeds, with a call of its own for each edit or interpolation (``aigc.serving.batching``);
  the model runs in a worker thread, so the event loop keeps answering ``/healthz`` and
  rejecting bad requests while a batch computes;
- serves the playground (``playground.html``, shipped in the package: one static page with its own
  vanilla JavaScript, no build step, nothing fetched from elsewhere), which reads ``/info`` and
  posts to ``/generate`` like any client; ``/info`` reads the loaded module's class attributes and
  the limits, so it never waits for the model;
- is shielded from overload by Serve itself: past ``max_ongoing_requests`` per replica requests
  queue in the proxy, and past ``max_queued_requests`` the proxy answers 503 (with
  ``--ingress haproxy`` the replica's own HTTP server does both).

Networking (ray 2.60): the HTTP proxy binds the ``--host``/``--port`` given to ``serve.start``, and
with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (set by ``aigc.serving.server`` before ``ray`` is
imported) Ray's own servers bind 127.0.0.1, except each replica's inter-deployment gRPC server, which
``ray/serve/_private/replica.py`` hard-codes to ``[::]:0`` (every interface, a random port); no
setting changes it. Firewall the machine if that matters; ``docs/serving.md`` says more.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at run time, and
# inside a Serve ingress class a string annotation such as "Request" is not resolved (the route then
# wants a query parameter named `request` and answers 422 to every call).
import functools
import importlib.resources
import json
import logging
import time
import typing
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve

from aigc.serving.batching import BatchStats, ModelCall, ModelQueue, plan_calls
from aigc.serving.config import ServeConfig, replica_env
from aigc.serving.follower import AliasFollower
from aigc.serving.limits import (
    DEFAULT_FRAMES,
    GenerateRequest,
    RequestLimits,
    RequestRejected,
    check_body_size,
    parse_generate_request,
)

# A child of Serve's own logger: a replica's lines (version swaps, polling errors, failed batches)
# land in its log file under /tmp/ray/session_latest/logs/serve/, next to its access log.
log = logging.getLogger("ray.serve.aigc")

#: How long, beyond Serve's batch window, the model queue waits for the clients it just answered.
REFILL_MARGIN_S = 0.05


@dataclass(frozen=True)
class Answer:
    """A served request: the version that made the images and the images as base64 PNGs."""

    version: str
    images: list[str]


async def _read_body(request: Request, limits: RequestLimits) -> bytes:
    """The body, refused with 413 as soon as it grows past the limit (chunked bodies too)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise RequestRejected(
                413,
                f"request body over {limits.max_body_bytes} bytes",
                "max_body_bytes",
                limits.max_body_bytes,
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _not_the_batch_product_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("`max_batch_size` (")


def _run_call(module: Any, call: ModelCall) -> Any:
    """The images of one model call: ``generate``, with the edit's inputs, or ``interpolate``."""
    edit = call.edit
    if edit is None:
        return module.generate(call.prompts, num_samples=call.num_samples, seed=call.seed, **call.options)
    if edit.interpolate is not None:
        i = edit.interpolate
        return module.interpolate(edit.prompt, i.prompt_b, i.frames, edit.seed, i.seed_b, **call.options)
    import torch

    return module.generate(
        call.prompts,
        num_samples=call.num_samples,
        seed=call.seed,
        init_images=torch.from_numpy(edit.init_image.array().copy()),
        masks=None if edit.mask is None else torch.from_numpy(edit.mask.array().copy()),
        strength=edit.strength,
        **call.options,
    )


@functools.cache
def _playground_html() -> str:
    """The playground page, read once from the package (``aigc/serving/playground.html``)."""
    return importlib.resources.files("aigc.serving").joinpath("playground.html").read_text(encoding="utf-8")


def _option_info(module: Any) -> dict[str, dict[str, Any]]:
    """Each family option of ``module``: its JSON type, the model's default (None: decided per
    call), and the choices of an option whose config field is a ``Literal`` (the diffusion sampler)."""
    cfg = getattr(module, "model_cfg", None)
    fields = getattr(type(cfg), "model_fields", {})
    config_fields = getattr(module, "option_config_fields", {})
    out: dict[str, dict[str, Any]] = {}
    for name, kind in module.generate_options.items():
        field_name = config_fields.get(name, name)
        entry: dict[str, Any] = {"type": kind.__name__, "default": getattr(cfg, field_name, None)}
        field = fields.get(field_name)
        if field is not None:
            if typing.get_origin(field.annotation) is typing.Literal:
                entry["choices"] = list(typing.get_args(field.annotation))
            if field.description:
                entry["description"] = field.description
        out[name] = entry
    return out


def _model_info(name: str, loaded: Any, limits: RequestLimits) -> dict[str, Any]:
    """``/info``: the served model and version, its image size and channels, its options with their
    defaults, its edit modes (with their defaults) and the request limits."""
    from aigc.models.base import DEFAULT_STRENGTH, EDIT_MODES

    module = loaded.module
    modes = frozenset(getattr(module, "edit_modes", ()))
    return {
        "model": name,
        "version": loaded.version,
        "family": getattr(module, "family", None),
        "image_size": module.image_size,
        "channels": module.channels,
        "options": _option_info(module),
        "edit_modes": [m for m in EDIT_MODES if m in modes],
        "defaults": {
            "num_samples": 1,
            "strength": {"img2img": DEFAULT_STRENGTH, "inpaint": 1.0},
            "frames": min(DEFAULT_FRAMES, limits.max_frames),
        },
        "limits": limits.model_dump(),
    }


# Everything the class below uses must be defined above it: Serve pickles the ingress class by
# value when it is decorated, with the module globals that exist at that moment.
api = FastAPI(title="aigc serve", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment
@serve.ingress(api)
class GenerateServer:
    """One replica: the followed model, the limits, the batcher."""

    def __init__(self, config: dict[str, Any]):
        import torch

        from aigc.registry.versions import client_for, load_version, parse_ref, resolve_version

        self.cfg = ServeConfig.model_validate(config)
        self.limits = self.cfg.limits
        torch.set_num_threads(self.cfg.threads_per_replica)
        client = client_for(self.cfg.tracking_uri)
        self.follower = AliasFollower(
            parse_ref(self.cfg.ref),
            resolve=lambda ref: resolve_version(client, ref),
            load=lambda version: load_version(client, version),
            poll_interval_s=self.cfg.poll_interval_s,
            logger=log,
        )
        self.follower.start()  # the replica is not ready (no traffic) until the first load is done
        self.stats = BatchStats()
        # A client answered at the end of one model batch sends its next request through the proxy
        # and Serve's intake window: wait that long (plus a margin) for it before a part-full batch.
        self.model_queue = ModelQueue(
            self._run_requests,
            max_requests=self.cfg.max_batch_size,
            refill_wait_s=self.cfg.batch_wait_timeout_s + REFILL_MARGIN_S,
        )
        # Serve warns that max_batch_size * max_concurrent_batches exceeds max_ongoing_requests, which
        # is meant for batches that each run on their own; ours merge in the model queue.
        logging.getLogger("ray.serve").addFilter(_not_the_batch_product_warning)
        self._generate_batch.set_max_batch_size(self.cfg.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # constructed outside Serve (unit tests)
            self.replica = "local"

    def __del__(self) -> None:
        follower = getattr(self, "follower", None)
        if follower is not None:
            follower.stop(timeout=0)

    # --------------------------------------------------------------------------------- routes
    @api.post("/generate")
    async def generate(self, request: Request) -> JSONResponse:
        """``{"prompt", "num_samples", "seed", ...options}`` -> ``{"model", "version", "images"}``;
        with ``init_image`` (+ ``mask``, ``strength``) an edit, with ``interpolate`` the frames
        (``aigc.serving.limits`` checks them against the served model)."""
        t0 = time.perf_counter()
        try:
            check_body_size(request.headers.get("content-length"), self.limits)
            raw = await _read_body(request, self.limits)
            try:
                body = json.loads(raw)
            except ValueError:
                raise RequestRejected(400, "the body is not JSON", "body") from None
            module = self.follower.current.module
            parsed = parse_generate_request(body, module.generate_options, self.limits, model=module)
            outcome = await self._generate_batch(parsed)
            if isinstance(outcome, RequestRejected):
                raise outcome
        except RequestRejected as rejected:
            return JSONResponse(rejected.body(), status_code=rejected.status)
        if isinstance(outcome, Exception):
            return JSONResponse({"error": f"generation failed: {outcome}"}, status_code=500)
        response = JSONResponse(
            {"model": self.follower.ref.name, "version": outcome.version, "images": outcome.images}
        )
        self.stats.record_served(time.perf_counter() - t0)
        return response

    @api.get("/", response_class=HTMLResponse)
    async def playground(self) -> HTMLResponse:
        """The playground page (a static file; it asks ``/info`` what the model takes)."""
        return HTMLResponse(_playground_html())

    @api.get("/info")
    async def info(self) -> dict[str, Any]:
        """What the served model takes: family, size, options and defaults, edit modes, limits."""
        return _model_info(self.follower.ref.name, self.follower.current, self.limits)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """The loaded model and version, and whether following the alias works."""
        return self.status()

    @api.get("/stats")
    async def stats_route(self) -> dict[str, Any]:
        """The batches this replica formed (``/stats`` reaches one replica of several)."""
        return {
            "replica": self.replica,
            "max_batch_size": self.cfg.max_batch_size,
            "batch_wait_timeout_s": self.cfg.batch_wait_timeout_s,
            **self.stats.as_dict(),
        }

    def status(self) -> dict[str, Any]:
        """``/healthz``'s answer; also called through the deployment handle by ``aigc serve``."""
        health = self.follower.health()
        healthy = health["following"].get("healthy", True)
        return {"status": "ok" if healthy else "degraded", **health, "replica": self.replica}

    # ------------------------------------------------------------------------------- batching
    # Serve's batches are only the intake: they all pass at once (max_concurrent_batches is
    # effectively unbounded; a replica never holds more than max_ongoing_requests) into the model
    # queue, which merges whatever queued while the model was busy. See aigc.serving.batching.
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0, max_concurrent_batches=1024)
    async def _generate_batch(self, requests: list[GenerateRequest]) -> list[Answer | Exception]:
        self.stats.record_serve_batch(len(requests))
        return await self.model_queue.submit(requests)

    def _run_requests(self, requests: list[GenerateRequest]) -> list[Answer | Exception]:
        """One model batch, in the model queue's worker thread: a generate call per group, an
        edit or interpolation call per such request."""
        from aigc.registry.pyfunc import png_base64

        calls = plan_calls(requests)
        self.stats.record(len(requests), calls)
        loaded = self.follower.current  # read once: one version for the whole batch
        out: list[Answer | Exception] = [RuntimeError("not served")] * len(requests)
        for call in calls:
            try:
                t0, c0 = time.perf_counter(), time.thread_time()
                images = _run_call(loaded.module, call)  # uint8 (N, C, H, W), grouped by prompt
                t1 = time.perf_counter()
                self.stats.record_model_call(t1 - t0, time.thread_time() - c0)
                pngs = [png_base64(img) for img in images]
                self.stats.encode_s += time.perf_counter() - t1
            except ValueError as err:  # an option value the family refuses (e.g. sampler)
                rejected = RequestRejected(422, str(err), "options", sorted(loaded.module.generate_options))
                for i, _, _ in call.slices:
                    out[i] = rejected
                continue
            except Exception as err:
                log.exception("generate failed for %d prompt(s)", len(call.prompts))
                for i, _, _ in call.slices:
                    out[i] = RuntimeError(f"{type(err).__name__}: {err}")
                continue
            for i, start, count in call.slices:
                out[i] = Answer(loaded.version, pngs[start : start + count])
        return out


def build_app(cfg: ServeConfig):
    """The Serve application for ``cfg`` (``serve.run`` it)."""
    return GenerateServer.options(
        name="GenerateServer",
        num_replicas=cfg.replicas,
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        ray_actor_options={
            "num_cpus": cfg.cpus_per_replica,
            "runtime_env": {"env_vars": replica_env(cfg)},
        },
    ).bind(cfg.model_dump(mode="json"))


def app_builder(args: dict[str, Any]):
    """Serve's application-builder entry point, for a RayService or ``serve run``::

        import_path: aigc.serving.app:app_builder
        args: {ref: aigc-diffusion@production, max_num_samples: 8}

    ``args`` are :class:`ServeConfig` fields, with the limits' fields at the top level too; the
    tracking URI defaults to ``MLFLOW_TRACKING_URI``. Host and port are the cluster's Serve
    settings there, not ours.
    """
    from aigc.tracking import resolve_tracking_uri

    args = dict(args)
    limits = {k: args.pop(k) for k in list(args) if k in RequestLimits.model_fields}
    cfg = ServeConfig.model_validate({**args, "limits": {**args.get("limits", {}), **limits}})
    return build_app(cfg.model_copy(update={"tracking_uri": resolve_tracking_uri(cfg.tracking_uri)}))
