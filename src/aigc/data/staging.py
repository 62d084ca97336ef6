"""Write a dataset folder whole or not at all: ``aigc data build`` and ``aigc data encode`` alike.

The folder is written under a hidden sibling name (``.<name>.building-<pid>``) and renamed to its
final name only once everything in it is written, so an existing dataset survives a failed rebuild
untouched and a half-written folder never carries the final name. A build killed outright (SIGKILL,
power loss) leaves its hidden folder behind; the next write of the same dataset removes it once the
process that made it is gone.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
from pathlib import Path
from types import TracebackType

from aigc.data.manifest import DatasetError

__all__ = ["StagedFolder"]

log = logging.getLogger("aigc.data")


class StagedFolder:
    """The dataset folder ``target``, written through a temporary sibling and swapped in whole.

    Constructing it refuses an existing ``target`` unless ``overwrite`` (and a ``target`` that is
    not a folder at all), so a caller can fail before any expensive work. ``with`` yields the empty
    temporary folder to write into; a clean exit renames it to ``target`` (replacing the old folder,
    which is kept until the rename has succeeded), an exception removes it and leaves ``target`` as
    it was. ``action`` words the refusal ("rebuild", "re-encode").
    """

    def __init__(self, target: str | os.PathLike[str], *, overwrite: bool = False, action: str = "rebuild"):
        self.target = Path(target).expanduser().absolute()
        if self.target.exists() and not overwrite:
            raise DatasetError(
                f"{self.target} already exists; pass --overwrite (overwrite=True) to {action} it"
            )
        if self.target.exists() and not self.target.is_dir():
            raise DatasetError(f"{self.target} exists and is not a folder")
        self.tmp = self.target.with_name(f".{self.target.name}.building-{os.getpid()}")

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale()
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            try:
                self._swap_in()
            except BaseException:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _swap_in(self) -> None:
        # Two renames, not rmtree then rename: until the new folder is in place the old one is
        # only moved aside, and is put back if the second rename fails.
        old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
        if self.target.exists():
            os.replace(self.target, old)
        try:
            os.replace(self.tmp, self.target)
        except OSError:
            if old.exists():
                os.replace(old, self.target)
            raise
        shutil.rmtree(old, ignore_errors=True)

    def _remove_stale(self) -> None:
        """Remove the temporary folders of earlier writes of ``target`` whose process is gone."""
        name = self.target.name
        for tmp in self.target.parent.glob(f".{glob.escape(name)}.*-*"):
            kind, _, pid = tmp.name.rpartition("-")
            ours = kind in (f".{name}.building", f".{name}.old")
            if ours and pid.isdigit() and not _pid_alive(int(pid)):
                log.info("removing %s left by an interrupted write", tmp)
                shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process, or we cannot tell: keep its folder
    return True
