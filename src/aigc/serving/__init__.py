"""Serving registered models over HTTP: ``aigc serve aigc-<family>@production``.

- ``aigc.serving.limits``: the request limits and the validation of a ``/generate`` body;
- ``aigc.serving.batching``: the model queue (merges what arrives while the model is busy) and how a
  batch becomes ``generate`` calls (never mixing options or seeds);
- ``aigc.serving.follower``: each replica's thread following the registry alias, swapping versions
  off the request path;
- ``aigc.serving.config``: ``ServeConfig``, everything ``aigc serve`` sets (importable without Ray);
- ``aigc.serving.app``: the Ray Serve deployment (FastAPI ingress);
- ``aigc.serving.server``: the driver: start Ray and Serve, deploy, wait for a signal, shut down.

``aigc.serving.app`` imports Ray Serve; ``aigc.serving.server`` imports Ray only once it has set
the environment Ray reads at import time. See docs/serving.md.
"""

from aigc.serving.limits import GenerateRequest, RequestLimits, RequestRejected

__all__ = ["GenerateRequest", "RequestLimits", "RequestRejected"]
