"""aigc.data: sources (digits, openmoji, folder, img2dataset) -> WebDataset shards -> streaming loader.

Shard format: ``/datasets/README.md``.
"""

from aigc.data.build import BuildSummary, build_dataset
from aigc.data.captions import HELDOUT_TEMPLATE, TRAIN_TEMPLATES, digit_caption, heldout_captions
from aigc.data.location import dataset_path, resolve_location
from aigc.data.manifest import (
    FORMAT,
    MANIFEST_NAME,
    DatasetError,
    VerifyReport,
    compute_digest,
    read_manifest,
    verify_dataset,
)
from aigc.data.preview import write_preview
from aigc.data.sample import Sample
from aigc.data.shards import ShardInfo, ShardWriter, shard_name
from aigc.data.staging import StagedFolder
from aigc.data.version import version

__all__ = [
    "BuildSummary",
    "DatasetError",
    "FORMAT",
    "HELDOUT_TEMPLATE",
    "MANIFEST_NAME",
    "Sample",
    "ShardInfo",
    "ShardWriter",
    "StagedFolder",
    "TRAIN_TEMPLATES",
    "VerifyReport",
    "build_dataset",
    "compute_digest",
    "dataset_path",
    "digit_caption",
    "heldout_captions",
    "read_manifest",
    "resolve_location",
    "shard_name",
    "verify_dataset",
    "version",
    "write_preview",
]

# The streaming loader imports torch and Lightning: exported lazily so `import aigc.data` (and the
# CLI's data commands) stay light.
_LOADER_EXPORTS = ("BadDataError", "ShardDataModule", "ShardStream", "rank_and_world")
__all__ += list(_LOADER_EXPORTS)


def __getattr__(name: str):
    if name in _LOADER_EXPORTS:
        from aigc.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
