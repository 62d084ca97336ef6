"""Workflows: what chains the layers below into one user-facing job.

- :mod:`aigc.workflows.quickstart`: digits shards -> train -> register -> promote, from a clean clone;
- :mod:`aigc.workflows.pipeline`: the DVC stages' params and the records they pass on (``dvc.yaml``).

The layers below never import a workflow (``docs/architecture.md``, checked by ``lint-imports``).
"""
