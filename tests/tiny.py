"""Tiny models for the tests whose point is the platform (Ray, DDP, MLflow, checkpoints, the registry,
serving), not quality: one override list per family, the one place a test's small model is defined.

Importable from every test (pytest puts ``tests/`` on ``sys.path`` for ``tests/conftest.py``). A test
that needs something else adds its overrides after these: the last ``--set`` of a key wins.
"""

from __future__ import annotations

from aigc.config import FAMILIES

#: The families that train from random weights on the test datasets with ``models/<family>.yaml``:
#: all but ``sd``, which fine-tunes a pretrained diffusers pipeline folder that a test has to build
#: first (tests/sd_pipeline.py; its tests are tests/unit/test_sd.py).
SCRATCH_FAMILIES = tuple(f for f in FAMILIES if f != "sd")

TINY: dict[str, list[str]] = {
    "diffusion": [
        "model.base_channels=16",
        "model.text.dim=32",
        "model.text.layers=1",
        "model.text.heads=2",
        "model.heads=2",
        "model.sample_steps=4",
    ],
    "gan": [
        "model.base_channels=16",
        "model.latent_dim=16",
        "model.cond_dim=16",
        "model.text.dim=32",
        "model.text.layers=1",
        "model.text.heads=2",
    ],
    "vae": [
        "model.base_channels=16",
        "model.latent_dim=8",
        "model.cond_dim=16",
        "model.text.dim=32",
        "model.text.layers=1",
        "model.text.heads=2",
    ],
    "autoregressive": [
        "model.dim=32",
        "model.layers=1",
        "model.heads=2",
        "model.text.dim=32",
        "model.text.layers=1",
        "model.text.heads=2",
    ],
    # Not text-conditioned: model.text only sizes the seeded draws the module takes and drops.
    "autoencoder": [
        "model.base_channels=8",
        "model.channel_mults=[1,2]",
        "model.text.dim=8",
        "model.text.layers=0",
        "model.text.heads=1",
    ],
}


def save_run_checkpoint(trainer, run_dir, step: int):
    """Write ``trainer``'s state into ``run_dir`` as one checkpoint folder of an ``aigc train`` run
    (:mod:`aigc.contract`: ``checkpoint-step<N>/`` holding the Lightning file and the step file), for
    tests that train in-process but hand the folder to code that reads real runs (register, lineage,
    export). A folder missing either file is not a complete checkpoint (``job.complete_checkpoints``).
    Returns the Lightning file's path."""
    import json
    from pathlib import Path

    from aigc.contract import CHECKPOINT_NAME, STEP_FILE, checkpoint_dir_name

    folder = Path(run_dir) / checkpoint_dir_name(step)
    trainer.save_checkpoint(folder / CHECKPOINT_NAME)
    (folder / STEP_FILE).write_text(json.dumps({"global_step": step}))
    return folder / CHECKPOINT_NAME
