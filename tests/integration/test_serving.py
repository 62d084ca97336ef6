"""``aigc serve``: real Ray Serve on 127.0.0.1 in a subprocess, a real MLflow sqlite registry, models
really trained (a few dozen steps in this process, with the one Trainer builder; no Ray needed for
that). The server is started once for the module and stopped by its process group id.

The first tests are pure (the request checks, the batch planner, the alias follower with fakes)
and take milliseconds; the rest talk HTTP to the running server.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from aigc.registry.versions import ModelRef
from aigc.serving.batching import ModelQueue, plan_calls
from aigc.serving.follower import AliasFollower
from aigc.serving.limits import (
    GenerateRequest,
    Interpolation,
    RequestLimits,
    RequestRejected,
    parse_generate_request,
)
from served_model import NAME, decode, get, post, serving, stop, trained_version

OPTIONS = {"steps": int, "guidance": float, "sampler": str}


# ------------------------------------------------------------------------------ pure: the checks
def test_request_checks_name_the_limit_and_its_value():
    limits = RequestLimits(max_num_samples=4, max_prompt_chars=10, max_steps=50)
    ok = parse_generate_request({"prompt": "p", "num_samples": 2, "seed": 3, "guidance": 1}, OPTIONS, limits)
    assert ok == GenerateRequest("p", 2, 3, (("guidance", 1.0),))
    assert isinstance(ok.option_dict["guidance"], float)  # an int is a valid float option

    cases = [
        ({"prompt": "p", "num_samples": 5}, "max_num_samples", 4),
        ({"prompt": "p" * 11}, "max_prompt_chars", 10),
        ({"prompt": "p", "steps": 51}, "max_steps", 50),
        ({"prompt": "p", "steps": 0}, "max_steps", 50),
        ({"prompt": "p", "bogus": 1}, "options", sorted(OPTIONS)),
        ({"prompt": "p", "steps": 2.5}, "options", sorted(OPTIONS)),
        ({"prompt": "p", "guidance": True}, "options", sorted(OPTIONS)),
        ({"prompt": "p", "guidance": float("nan")}, "options", sorted(OPTIONS)),
        ({"prompt": "p", "seed": -1}, "seed", None),
        ({"prompt": "p", "num_samples": True}, "num_samples", None),
        ({"prompt": None}, "prompt", None),
        (["p"], "body", None),
    ]
    for body, limit, value in cases:
        with pytest.raises(RequestRejected) as err:
            parse_generate_request(body, OPTIONS, limits)
        assert err.value.status == 422, body
        assert (err.value.body()["limit"], err.value.body()["value"]) == (limit, value), body
    with pytest.raises(RequestRejected) as err:
        parse_generate_request({"prompt": "p", "bogus": 1}, OPTIONS, limits)
    assert err.value.body()["allowed"]["sampler"] == "str"  # the 422 lists what is allowed


def png_b64(arr, fmt: str = "PNG", text: str = "") -> str:
    """A base64 image file of the uint8 (H, W) array; ``text``: a PNG text chunk to pad it."""
    from PIL.PngImagePlugin import PngInfo

    buf = io.BytesIO()
    info = PngInfo()
    if text:
        info.add_text("padding", text)
    Image.fromarray(arr).save(buf, format=fmt, **({"pnginfo": info} if fmt == "PNG" else {}))
    return base64.b64encode(buf.getvalue()).decode()


def test_edit_requests_are_checked_against_the_served_model():
    """Image-to-image, inpainting and interpolation fields: each limit named with its value, and a
    family without the mode answered with the modes it supports."""
    import numpy as np

    limits = RequestLimits(max_image_bytes=1024, max_frames=4)
    modes = frozenset({"img2img", "inpaint", "interpolate"})
    diffusion = SimpleNamespace(family="diffusion", edit_modes=modes, image_size=8, channels=1)
    gan = SimpleNamespace(family="gan", edit_modes=frozenset(), image_size=8, channels=1)
    picture = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    white = np.full((8, 8), 255, dtype=np.uint8)

    def parse(body, model=diffusion):
        return parse_generate_request({"prompt": "p", **body}, OPTIONS, limits, model=model)

    edit = parse({"init_image": png_b64(picture), "strength": 0, "seed": 1})
    assert edit.alone and edit.strength == 0.0 and edit.mask is None
    assert (edit.init_image.array() == picture[None]).all()
    rgb = png_b64(np.repeat(picture[..., None], 3, axis=-1))  # converted to the model's one channel
    assert (parse({"init_image": f"data:image/png;base64,{rgb}"}).init_image.array() == picture[None]).all()
    painted = parse({"init_image": png_b64(picture), "mask": png_b64(white)})
    assert painted.mask.array().all() and painted.mask.array().shape == (1, 8, 8)
    walk = parse({"seed": 2, "interpolate": {"prompt_b": "q", "frames": 3}})
    assert walk.alone and walk.interpolate == Interpolation("q", 2, 3)
    assert parse({"interpolate": {"seed_b": 5}}).interpolate == Interpolation("p", 5, 4)  # frames 8 > 4
    assert parse({"interpolate": {"seed_b": 5}}).seed == 0  # an interpolation's seed defaults to 0

    big = png_b64(np.zeros((16, 16), dtype=np.uint8))
    cases = [
        ({"init_image": big}, "image_size", [8, 8]),
        ({"init_image": png_b64(picture), "mask": big}, "image_size", [8, 8]),
        ({"init_image": png_b64(picture, "JPEG")}, "image_format", ["PNG"]),
        ({"init_image": png_b64(picture, text="x" * 1200)}, "max_image_bytes", 1024),
        ({"init_image": "not base64!"}, "init_image", None),
        ({"init_image": 7}, "init_image", None),
        ({"init_image": png_b64(picture), "strength": 1.5}, "strength", [0, 1]),
        ({"init_image": png_b64(picture), "strength": True}, "strength", [0, 1]),
        ({"mask": png_b64(white)}, "mask", None),
        ({"strength": 0.5}, "strength", None),
        ({"interpolate": {"seed_b": 1, "frames": 5}}, "max_frames", 4),
        ({"interpolate": {"seed_b": 1, "frames": 1}}, "max_frames", 4),
        ({"interpolate": {}}, "interpolate", ["prompt_b", "seed_b", "frames"]),
        ({"interpolate": {"prompt_c": "x"}}, "interpolate", ["prompt_b", "seed_b", "frames"]),
        ({"interpolate": {"seed_b": 1}, "num_samples": 2}, "interpolate", None),
        ({"interpolate": {"seed_b": 1}, "init_image": png_b64(picture)}, "interpolate", None),
        ({"interpolate": {"prompt_b": "q" * 300}}, "max_prompt_chars", 256),
        ({"interpolate": {"seed_b": -1}}, "seed_b", None),
    ]
    for body, limit, value in cases:
        with pytest.raises(RequestRejected) as err:
            parse(body)
        assert err.value.status == 422, body
        assert (err.value.body()["limit"], err.value.body()["value"]) == (limit, value), err.value.body()
    for body, mode in [
        ({"init_image": png_b64(picture)}, "img2img"),
        ({"init_image": png_b64(picture), "mask": png_b64(white)}, "inpaint"),
        ({"interpolate": {"seed_b": 1}}, "interpolate"),
    ]:
        with pytest.raises(RequestRejected) as err:
            parse(body, model=gan)
        assert (err.value.status, err.value.limit, err.value.value) == (422, "edit_modes", []), body
        assert f"family 'gan' does not support {mode}" in err.value.error, err.value.error
        assert "its editing operations: none" in err.value.error
    with pytest.raises(RequestRejected) as err:  # a gan lists no edit field as allowed
        parse({"bogus": 1}, model=gan)
    assert "init_image" not in err.value.body()["allowed"]


def test_batches_never_mix_options_or_seeds():
    r = [
        GenerateRequest("a", 2),  # 0: merged with 1 and 4 (no seed, default options)
        GenerateRequest("b", 1),  # 1
        GenerateRequest("a", 1, seed=5),  # 2: its own call, shared with the identical 5
        GenerateRequest("a", 1, options=(("steps", 3),)),  # 3: other options, its own call
        GenerateRequest("c", 3),  # 4
        GenerateRequest("a", 1, seed=5),  # 5
        GenerateRequest("b", 1, seed=5),  # 6: same seed, other prompt: its own call
    ]
    calls = plan_calls(r)
    assert [(c.prompts, c.num_samples, c.seed, c.options) for c in calls] == [
        (["a", "a", "b", "c", "c", "c"], 1, None, {}),
        (["a"], 1, 5, {}),
        (["a"], 1, None, {"steps": 3}),
        (["b"], 1, 5, {}),
    ]
    assert calls[0].slices == [(0, 0, 2), (1, 2, 1), (4, 3, 3)]
    assert calls[1].slices == [(2, 0, 1), (5, 0, 1)]
    served = sorted(i for c in calls for i, _, _ in c.slices)
    assert served == list(range(len(r)))

    # Edits and interpolations run alone, even when identical to another request.
    from aigc.serving.limits import Pixels

    image = Pixels((1, 1, 1), "|u1", b"\x00")
    walk = GenerateRequest("a", 1, 0, interpolate=Interpolation("b", 0, 5))
    e = [GenerateRequest("a", 2), GenerateRequest("a", 2, init_image=image), walk, walk]
    calls = plan_calls(e)
    assert [(c.edit, c.slices, c.images) for c in calls] == [
        (None, [(0, 0, 2)], 2),
        (e[1], [(1, 0, 2)], 2),
        (walk, [(2, 0, 5)], 5),
        (walk, [(3, 0, 5)], 5),
    ]


def test_the_model_queue_merges_what_arrived_while_the_model_was_busy():
    import asyncio

    seen: list[list[str]] = []

    def run(requests):
        seen.append([r.prompt for r in requests])
        time.sleep(0.05)
        return [r.prompt.upper() for r in requests]

    async def main():
        queue = ModelQueue(run, max_requests=3)
        first = asyncio.ensure_future(queue.submit([GenerateRequest("a")]))
        await asyncio.sleep(0.02)  # "a" is in the model now
        rest = [asyncio.ensure_future(queue.submit([GenerateRequest(p)])) for p in "bcde"]
        return await first, await asyncio.gather(*rest)

    first, rest = asyncio.run(main())
    assert first == ["A"] and rest == [["B"], ["C"], ["D"], ["E"]]
    assert seen == [["a"], ["b", "c", "d"], ["e"]]  # at most max_requests per model batch


def test_the_model_queue_waits_briefly_for_the_clients_it_just_answered():
    """Four clients sending one request after another: without the refill wait, model batches
    alternate between the one client that missed a batch and the other three."""
    import asyncio

    def sizes(refill_wait_s: float) -> list[int]:
        seen: list[int] = []

        def run(requests):
            seen.append(len(requests))
            time.sleep(0.02)
            return [r.prompt for r in requests]

        async def client(queue, i):
            await asyncio.sleep(0.001 * i)
            for k in range(6):
                await queue.submit([GenerateRequest(f"{i}-{k}")])
                await asyncio.sleep(0.002)  # the client's round trip

        async def main():
            queue = ModelQueue(run, max_requests=4, refill_wait_s=refill_wait_s)
            await asyncio.gather(*(client(queue, i) for i in range(4)))

        asyncio.run(main())
        return seen

    assert sizes(0.0)[:4] == [1, 3, 1, 3]
    assert sizes(0.05)[1:5] == [4, 4, 4, 4]


def test_follower_keeps_serving_when_the_registry_fails_and_swaps_when_the_alias_moves():
    alias = {"version": "1"}
    loads: list[str] = []

    def resolve(ref):
        if alias["version"] is None:
            raise ConnectionError("tracking server unreachable")
        return SimpleNamespace(version=alias["version"])

    def load(version):
        if version.version == "bad":
            raise OSError("artifact missing")
        loads.append(version.version)
        return f"module-{version.version}"

    f = AliasFollower(ModelRef(NAME, "production"), resolve, load, poll_interval_s=0)
    assert f.start().module == "module-1" and f.healthy()
    alias["version"] = None
    f.poll_once()
    h = f.health()
    assert f.current.version == "1" and not h["following"]["healthy"]
    assert "unreachable" in h["following"]["last_error"] and h["following"]["last_success_at"]
    alias["version"] = "bad"
    f.poll_once()
    f.poll_once()  # a failed load is not retried at every poll
    assert f.current.version == "1" and "artifact missing" in f.health()["following"]["last_error"]
    alias["version"] = "2"
    f.poll_once()
    assert (f.current.module, f.current.version, f.swaps, f.healthy()) == ("module-2", "2", 1, True)
    assert loads == ["1", "2"]


def test_replicas_never_retry_a_dead_registry_for_minutes_and_configs_are_checked():
    from pydantic import ValidationError

    from aigc.serving.app import app_builder
    from aigc.serving.config import ServeConfig, replica_env

    env = replica_env(ServeConfig(ref=f"{NAME}@production"))
    assert env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0" and int(env["MLFLOW_HTTP_REQUEST_TIMEOUT"]) <= 10
    with pytest.raises(ValidationError, match="max_ongoing_requests"):
        ServeConfig(ref="x", max_batch_size=32, max_ongoing_requests=16)
    with pytest.raises(ValidationError):
        ServeConfig(ref="x", limits={"max_num_samples": 0})
    with pytest.raises(ValidationError):  # a RayService's args are checked the same way
        app_builder({"ref": "x", "tracking_uri": "sqlite:////tmp/x.db", "max_steps": "many"})


def test_the_ingress_is_checked_and_a_clusters_is_its_own(tmp_path, monkeypatch):
    """``--ingress`` names its choices; with a cluster to join it is refused before anything starts
    (a cluster's Serve reads the variable in its own processes), naming the variable to set there."""
    from pydantic import ValidationError

    from aigc.serving.config import ServeConfig, deploy_config
    from aigc.serving.server import DRAINING_VARIABLE, _ingress_environment, start_serving

    with pytest.raises(ValidationError, match="'proxy' or 'haproxy'"):
        ServeConfig(ref="x", ingress="nginx")
    cfg = ServeConfig(ref=f"{NAME}@production", ingress="haproxy", ray_address="127.0.0.1:1")
    with pytest.raises(RuntimeError, match="RAY_SERVE_ENABLE_HA_PROXY=1"):
        start_serving(cfg.model_copy(update={"tracking_uri": f"sqlite:///{tmp_path / 'none.db'}"}))
    assert not (tmp_path / "none.db").exists()  # refused before the registry was touched
    assert "ingress" not in deploy_config(cfg)["applications"][0]["args"]
    env = _ingress_environment("haproxy")
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_HAPROXY_STATS_PORT"] != "8404"
    assert env[DRAINING_VARIABLE] == "2"  # not Ray's 30 s for load balancers this server does not have
    monkeypatch.setenv(DRAINING_VARIABLE, "7")
    assert _ingress_environment("haproxy")[DRAINING_VARIABLE] == "7"  # a value set outside is kept
    assert _ingress_environment("proxy") == {"RAY_SERVE_ENABLE_HA_PROXY": "0"}


def test_the_printed_serve_config_builds_the_application_aigc_serve_would_run(tmp_path):
    """`aigc serve --print-config` (a RayService's serveConfigV2) carries every setting of the command
    line: its builder's args give back the same ServeConfig, limits included."""
    from aigc.serving.app import app_builder
    from aigc.serving.config import APP_BUILDER, ServeConfig, deploy_config

    cfg = ServeConfig(
        ref="aigc-vae@production", host="0.0.0.0", port=8100, replicas=2, limits={"max_steps": 50}
    )
    config = deploy_config(cfg)
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8100}
    (app,) = config["applications"]
    assert (app["name"], app["route_prefix"], app["import_path"]) == ("aigc-vae", "/", APP_BUILDER)
    assert "tracking_uri" not in app["args"]  # a pod's MLFLOW_TRACKING_URI decides, not this machine's
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    bound = app_builder(app["args"])._bound_deployment.init_args[0]
    assert bound == {
        **cfg.model_dump(mode="json"),
        "host": "127.0.0.1",
        "port": 8000,
        "tracking_uri": bound["tracking_uri"],
    }
    given = deploy_config(cfg.model_copy(update={"tracking_uri": uri}))["applications"][0]["args"]
    assert app_builder(given)._bound_deployment.init_args[0]["tracking_uri"] == uri


# ------------------------------------------------------------------------ a real server on Ray Serve
@pytest.fixture(scope="module")
def registry(digits_dataset, tmp_path_factory):
    """Two trained versions of aigc-diffusion; production names the first."""
    from aigc.registry.versions import client_for

    tmp = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    v1 = trained_version(uri, tmp, digits_dataset, "first", steps=24, seed=0)
    client = client_for(uri)
    client.set_registered_model_alias(NAME, "production", v1)
    v2 = trained_version(uri, tmp, digits_dataset, "second", steps=24, seed=1)
    return SimpleNamespace(uri=uri, tmp=tmp, client=client, v1=str(v1), v2=str(v2))


@pytest.fixture(scope="module")
def server(registry):
    """``aigc serve`` in its own session; small queue limits so overload is cheap to provoke."""
    args = ["--poll-interval", "1", "--max-ongoing-requests", "8", "--max-queued-requests", "16"]
    # A small body limit (the 413 tests stay cheap) and image limit (an oversize PNG stays small).
    args += ["--max-body-bytes", "16384", "--max-image-bytes", "1024"]
    with serving(f"{NAME}@production", registry.uri, registry.tmp, args) as served:
        yield served


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_serves_pngs_of_the_loaded_version(registry, server):
    out = server.log.read_text()
    assert f"model      {NAME} version {registry.v1} (alias production, followed)" in out
    assert f"serving    {server.url}" in out

    health = get(server.url, "/healthz")
    assert health["status"] == "ok" and (health["model"], health["alias"]) == (NAME, "production")
    assert health["version"] == registry.v1 and health["following"]["healthy"] is True

    status, answer = post(server.url, {"prompt": "the digit 3", "num_samples": 3, "seed": 7})
    assert status == 200, answer
    assert (answer["model"], answer["version"]) == (NAME, registry.v1)
    images = decode(answer["images"])
    assert len(images) == 3 and all(im.size == (8, 8) and im.mode == "L" for im in images)
    # A seed gives the same images again, and another seed other images.
    assert (
        post(server.url, {"prompt": "the digit 3", "num_samples": 3, "seed": 7})[1]["images"]
        == (answer["images"])
    )
    assert (
        post(server.url, {"prompt": "the digit 3", "num_samples": 3, "seed": 8})[1]["images"]
        != (answer["images"])
    )


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_everything_listens_on_loopback_but_the_replicas_grpc_server(server):
    """Ray 2.60 hard-codes each replica's inter-deployment gRPC server to [::]:0; every other socket
    of the server's process tree (HTTP proxy, GCS, raylet, agents) is on 127.0.0.1."""
    import psutil

    wide = []
    procs = [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(recursive=True)]
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            for c in proc.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN and c.laddr.ip not in ("127.0.0.1", "::ffff:127.0.0.1"):
                    wide.append((proc.name(), c.laddr.ip))
    assert all(name.startswith("ray::ServeRepli") for name, _ in wide), wide


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_each_limit_is_a_4xx_naming_it_and_valid_requests_are_still_answered(server):
    valid = {"prompt": "the digit 1", "steps": 2}
    rejected = [
        ({"prompt": "x", "num_samples": 17}, 422, "max_num_samples", 16),
        ({"prompt": "x" * 257}, 422, "max_prompt_chars", 256),
        ({"prompt": "x", "steps": 201}, 422, "max_steps", 200),
        ({"prompt": "x" * 20_000}, 413, "max_body_bytes", 16384),
        ({"prompt": "x", "temperature": 1.0}, 422, "options", ["guidance", "sampler", "steps"]),
        ({"prompt": "x", "guidance": "high"}, 422, "options", ["guidance", "sampler", "steps"]),
        ({"prompt": "x", "sampler": "euler"}, 422, "options", ["guidance", "sampler", "steps"]),
        ({"prompt": "x", "seed": "seven"}, 422, "seed", None),
    ]
    for body, code, limit, value in rejected:
        status, answer = post(server.url, body)
        assert status == code, (body, answer)
        assert (answer["limit"], answer["value"]) == (limit, value), answer
        assert post(server.url, valid)[0] == 200
    status, answer = post(server.url, {"prompt": "x", "temperature": 1.0})
    assert answer["allowed"] == {
        "prompt": "str",
        "num_samples": "int",
        "seed": "int | null",
        "init_image": "str (base64 PNG) | null",
        "mask": "str (base64 PNG) | null",
        "strength": "float | null",
        "interpolate": "{prompt_b: str, seed_b: int, frames: int} | null",
        "steps": "int",
        "guidance": "float",
        "sampler": "str",
    }
    assert post(server.url, None, raw=b"{not json")[0] == 400
    # A chunked body (no Content-Length) is cut off at the limit too.
    big = urllib.request.Request(
        f"{server.url}/generate",
        data=iter([b'{"prompt": "', b"x" * 9000, b"x" * 9000, b'"}']),
        headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(big, timeout=30)
    assert err.value.code == 413 and json.loads(err.value.read())["limit"] == "max_body_bytes"
    assert post(server.url, valid)[0] == 200


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_mixed_batch_is_split_by_options_and_seed(server):
    """Concurrent requests with different options and seeds: each gets its own count of images,
    and a seeded request gets exactly the images it gets alone."""
    alone = post(server.url, {"prompt": "the digit 5", "num_samples": 2, "seed": 11})[1]["images"]
    bodies = [
        {"prompt": "the digit 1", "num_samples": 2},
        {"prompt": "the digit 2", "num_samples": 1},
        {"prompt": "the digit 5", "num_samples": 2, "seed": 11},
        {"prompt": "the digit 1", "num_samples": 3, "steps": 2},
        {"prompt": "the digit 5", "num_samples": 2, "seed": 11},
        {"prompt": "the digit 9", "num_samples": 1, "guidance": 1.0},
    ]  # 6 at once: well within --max-ongoing-requests 8 + --max-queued-requests 16
    answers: list = [None] * len(bodies)

    def send(i: int) -> None:
        answers[i] = post(server.url, bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for body, (status, answer) in zip(bodies, answers, strict=True):
        assert status == 200, answer
        assert len(answer["images"]) == body["num_samples"]
        if body.get("seed") == 11:
            assert answer["images"] == alone
    stats = get(server.url, "/stats")
    assert stats["requests"] >= len(bodies) and max(int(k) for k in stats["batch_sizes"]) > 1, stats
    # Each answered request's time in the handler holds its model batch's time: benchmarks/serving.py
    # subtracts one from the other to tell the replica's own overhead from Serve's proxy.
    assert stats["served_requests"] >= len(bodies), stats
    assert stats["handler_seconds"] >= stats["model_seconds"] > 0, stats


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_edits_and_interpolation_over_http_and_their_limits(server):
    """Image-to-image at strength 0 returns the input, inpainting keeps the unmasked pixels,
    interpolation's ends are the end points generated alone; each bad edit is a 422 naming its
    limit, and the next request is answered."""
    import numpy as np

    picture = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    version = get(server.url, "/healthz")["version"]
    base = {"prompt": "the digit 1", "steps": 2}
    status, answer = post(
        server.url, {**base, "init_image": png_b64(picture), "strength": 0, "num_samples": 2}
    )
    assert status == 200, answer
    assert (answer["model"], answer["version"]) == (NAME, version)
    images = [np.asarray(im) for im in decode(answer["images"])]
    assert len(images) == 2 and all(np.array_equal(im, picture) for im in images)

    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[2:6, :] = 255
    status, answer = post(
        server.url, {**base, "init_image": png_b64(picture), "mask": png_b64(mask), "seed": 1}
    )
    assert status == 200, answer
    (painted,) = [np.asarray(im) for im in decode(answer["images"])]
    assert np.array_equal(painted[mask == 0], picture[mask == 0])

    walk = {**base, "seed": 3, "interpolate": {"prompt_b": "the digit 7", "seed_b": 4, "frames": 4}}
    status, answer = post(server.url, walk)
    assert status == 200 and len(answer["images"]) == 4, answer
    for prompt, seed, frame in (
        ("the digit 1", 3, answer["images"][0]),
        ("the digit 7", 4, answer["images"][-1]),
    ):
        alone = post(server.url, {"prompt": prompt, "seed": seed, "steps": 2, "sampler": "ddim"})[1]
        assert np.array_equal(np.asarray(decode(alone["images"])[0]), np.asarray(decode([frame])[0]))

    rejected = [
        ({"init_image": png_b64(np.zeros((16, 16), dtype=np.uint8))}, "image_size", [8, 8]),
        ({"init_image": png_b64(picture, "JPEG")}, "image_format", ["PNG"]),
        ({"init_image": png_b64(picture, text="x" * 2000)}, "max_image_bytes", 1024),
        ({"init_image": png_b64(picture), "strength": 2}, "strength", [0, 1]),
        ({"interpolate": {"seed_b": 1, "frames": 17}}, "max_frames", 16),
    ]
    for body, limit, value in rejected:
        status, answer = post(server.url, {**base, **body})
        assert status == 422, (limit, answer)
        assert (answer["limit"], answer["value"]) == (limit, value), answer
        assert post(server.url, base)[0] == 200


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_overload_is_503_and_the_server_recovers(server):
    overload_is_503_and_the_server_recovers(server.url)


def overload_is_503_and_the_server_recovers(url: str) -> None:
    """60 heavy requests at once against 8 ongoing + 16 queued at most: some answered, the rest
    503, and the server answers afterwards."""
    heavy = {"prompt": "the digit 8", "num_samples": 16, "steps": 20}
    codes: list[int] = []
    lock = threading.Lock()

    def send() -> None:
        status, _ = post(url, heavy, timeout=120)
        with lock:
            codes.append(status)

    threads = [threading.Thread(target=send) for _ in range(60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) > 0, codes
    assert post(url, {"prompt": "the digit 1"})[0] == 200


CLIENT = r"""
import json, sys, time, urllib.error, urllib.request
url, max_requests, max_seconds, new_version = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
body = json.dumps({"prompt": "the digit 4", "steps": 2}).encode()
headers = {"Content-Type": "application/json"}
results, start, seen_new = [], time.monotonic(), 0
def done():
    return len(results) >= max_requests or (len(results) >= 150 and seen_new >= 40)
while not done() and time.monotonic() - start < max_seconds:
    t0 = time.perf_counter()
    try:
        req = urllib.request.Request(url + "/generate", data=body, headers=headers)
        with urllib.request.urlopen(req, timeout=10) as r:
            answer = json.loads(r.read())
            results.append([r.status, answer["version"], time.perf_counter() - t0])
    except Exception as err:
        results.append([getattr(err, "code", -1), repr(err)[:200], time.perf_counter() - t0])
    seen_new += results[-1][1] == new_version
    if len(results) == 20:
        print("ready", flush=True)
print(json.dumps(results), flush=True)
"""


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_promotion_switches_versions_with_zero_failed_requests(registry, server):
    """A client in another process sends requests while the alias moves to the second version."""
    assert get(server.url, "/healthz")["version"] == registry.v1
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, server.url, "400", "30", registry.v2],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert client.stdout.readline().strip() == "ready"
        registry.client.set_registered_model_alias(NAME, "production", registry.v2)
        out, _ = client.communicate(timeout=60)
    finally:
        if client.poll() is None:
            os.killpg(client.pid, signal.SIGKILL)
            client.wait(timeout=10)
    results = json.loads(out.strip().splitlines()[-1])
    assert len(results) >= 150
    print(f"{len(results)} requests, max latency {max(r[2] for r in results):.3f} s")
    failed = [r for r in results if r[0] != 200]
    assert not failed, failed[:5]
    versions = [r[1] for r in results]
    switch = versions.index(registry.v2)
    assert set(versions[:switch]) == {registry.v1} and set(versions[switch:]) == {registry.v2}, versions
    assert max(r[2] for r in results) < 5.0  # no request waited for the load

    health = get(server.url, "/healthz")
    assert health["version"] == registry.v2 and health["following"]["swaps"] == 1
    assert health["status"] == "ok"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_lost_alias_keeps_the_version_served_and_healthz_says_so(registry, server):
    served = get(server.url, "/healthz")["version"]
    registry.client.delete_registered_model_alias(NAME, "production")
    try:
        deadline = time.monotonic() + 20
        while (health := get(server.url, "/healthz"))["status"] == "ok":
            assert time.monotonic() < deadline, health
            time.sleep(0.5)
        assert health["status"] == "degraded" and health["following"]["healthy"] is False
        assert "production" in health["following"]["last_error"]
        status, answer = post(server.url, {"prompt": "the digit 6", "steps": 2})
        assert status == 200 and answer["version"] == served
    finally:
        registry.client.set_registered_model_alias(NAME, "production", served)
    deadline = time.monotonic() + 20
    while get(server.url, "/healthz")["status"] != "ok":
        assert time.monotonic() < deadline
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigterm_to_the_process_group_shuts_down_within_30_s(server):
    t0 = time.monotonic()
    rc = stop(server.proc)
    log = server.log.read_text()
    assert rc == 0 and "stopped" in log, log[-3000:]
    assert time.monotonic() - t0 < 30
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{server.url}/healthz", timeout=2)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_haproxy_ingress_serves_and_leaves_no_process_behind(registry):
    """``--ingress haproxy``: Ray's HAProxy answers on the port (the replica serves HTTP itself), with
    the same answers, checks and overload 503s; its stats and metrics listeners are the only other
    sockets off loopback. ``haproxy`` runs in a process group of its own under its actor, which Ray's shutdown
    kills: ``aigc serve`` must end it too, or it keeps holding the port after "stopped"; and remove
    the folder of HAProxy's config and sockets (Ray's default leaves one per start in /tmp)."""
    import psutil

    tmp = registry.tmp / "haproxy"
    tmp.mkdir()
    args = ["--ingress", "haproxy", "--max-ongoing-requests", "8", "--max-queued-requests", "16"]
    with serving(f"{NAME}@production", registry.uri, tmp, args) as served:
        port = int(served.url.rsplit(":", 1)[1])
        tree = psutil.Process(served.proc.pid).children(recursive=True)
        listeners: dict[tuple[str, int], str] = {}
        for proc in tree:
            with contextlib.suppress(psutil.Error):
                for c in proc.net_connections(kind="inet"):
                    if c.status == psutil.CONN_LISTEN:
                        listeners[(c.laddr.ip, c.laddr.port)] = proc.name()
        assert listeners.get(("127.0.0.1", port)) == "haproxy", listeners
        wide = {name for (ip, _), name in listeners.items() if ip not in ("127.0.0.1", "::ffff:127.0.0.1")}
        assert all(n == "haproxy" or n.startswith("ray::ServeRepli") for n in wide), listeners
        # HAProxy's config and sockets are in a folder of this server's, not Ray's shared default
        (haproxy,) = [p for p in tree if p.name() == "haproxy"]
        (config,) = [Path(a) for a in haproxy.cmdline() if a.endswith("haproxy.cfg")]
        scratch = next(p for p in config.parents if p.name.startswith("aigc-haproxy-"))
        assert scratch.is_dir() and not str(config).startswith("/tmp/haproxy-serve"), config

        health = get(served.url, "/healthz")
        status, answer = post(served.url, {"prompt": "the digit 3", "num_samples": 2, "seed": 7})
        assert status == 200 and answer["version"] == health["version"], answer
        assert len(decode(answer["images"])) == 2
        assert post(served.url, {"prompt": "the digit 3", "num_samples": 2, "seed": 7})[1] == answer
        status, refused = post(served.url, {"prompt": "the digit 3", "num_samples": 10_000})
        assert status == 422 and refused["limit"] == "max_num_samples", refused
        assert post(served.url, {"prompt": "the digit 1", "steps": 2})[0] == 200
        overload_is_503_and_the_server_recovers(served.url)  # the replica itself refuses past the queue

        assert stop(served.proc) == 0 and "stopped" in served.log.read_text()
    _, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive, [(p.pid, p.name()) for p in alive]
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{served.url}/healthz", timeout=2)
    assert not scratch.exists()  # removed with the server
