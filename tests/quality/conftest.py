"""Fixtures of the quality tests: the reference evaluators, trained once per session, and the quality
runs themselves, run as one-thread processes two at a time (``pool.py``) for the tests the session
selected. What a digits run does is ``quality_run.py``; an emoji run, ``emoji_run.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
from emoji_run import RECIPES
from pool import Job, run_jobs


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


@pytest.fixture(scope="session")
def emoji32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The OpenMoji emoji at 32 px RGB, built into the session's temp folder (seconds); read-only."""
    from aigc.config import DataConfig
    from aigc.data import build_dataset

    out = tmp_path_factory.mktemp("datasets") / "emoji32"
    build_dataset(DataConfig(name="emoji32", source="openmoji", image_size=32, channels=3), out)
    return out


# Every quality run, by key: its runner's arguments and about how many seconds it takes alone on an
# idle core (for the longest-first order). A test asks for its runs with
# ``@pytest.mark.quality_runs(key, ...)`` and reads them from ``quality_runs``; the emoji runs wait for
# the ``emoji/evaluator`` job.
DIGITS_RUNS = {
    "digits/diffusion": (("diffusion", "--validate"), 130),
    "digits/autoregressive": (("autoregressive", "--validate"), 115),
    "digits/gan": (("gan",), 75),
    "digits/vae": (("vae", "--validate"), 75),
}
# In the pool every digits run reads its shards in its own process: a DataLoader worker process per run
# would be a third and fourth process on 2 cores, and its batches are the same (seed 0 GAN: identical
# figures with data.num_workers 0 and 1).
DIGITS_COMMON = ("--set", "data.num_workers=0")
EMOJI_SECONDS = {
    "gan": 330,
    "latent-autoregressive": 270,
    "diffusion": 190,
    "vae": 150,
    "latent-diffusion": 140,
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "quality_runs(*keys): the quality runs (conftest.py) a test reads")


@pytest.fixture(scope="session")
def quality_runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The results of the quality runs that this session's selected tests ask for, by key.

    The digits evaluator is trained here first (the ``reference_evaluator`` fixture), the emoji one
    as a job of the pool; the runs load them from the session's cache (``AIGC_EVALUATOR_CACHE``,
    tests/conftest.py)."""
    keys = {k for item in request.session.items for m in item.iter_markers("quality_runs") for k in m.args}
    jobs = []
    if any(k.startswith("digits/") for k in keys):
        digits = request.getfixturevalue("digits_dataset")
        request.getfixturevalue("reference_evaluator")
        for key in sorted(k for k in keys if k.startswith("digits/")):
            argv, seconds = DIGITS_RUNS[key]
            argv = ("quality_run.py", argv[0], "--dataset", str(digits), *argv[1:], *DIGITS_COMMON)
            jobs.append(Job(key, argv, seconds))
    if any(k.startswith("emoji/") for k in keys):
        # The emoji evaluator trains as a one-thread job beside the digits runs; the emoji runs wait.
        emoji = request.getfixturevalue("emoji32")
        work = tmp_path_factory.mktemp("emoji-work")
        jobs.append(Job("emoji/evaluator", ("emoji_run.py", "evaluator", "--dataset", str(emoji)), 999))
        for key in sorted(k for k in keys if k.startswith("emoji/")):
            name = key.removeprefix("emoji/")
            argv = ("emoji_run.py", name, "--dataset", str(emoji), "--workdir", str(work / name))
            jobs.append(Job(key, argv, EMOJI_SECONDS[name], after="emoji/evaluator"))
    unknown = keys - set(DIGITS_RUNS) - {f"emoji/{n}" for n in RECIPES}
    assert not unknown, f"no quality run named {sorted(unknown)}"
    return run_jobs(jobs, tmp_path_factory.mktemp("quality-runs"))
