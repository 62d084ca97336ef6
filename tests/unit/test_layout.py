"""The repository layout: top-level data folders are never Python packages, and no tracked file cites
a document or tracker that the repository's users do not have."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOP_LEVEL = ["platform", "models", "datasets", "mlflow", "k8s"]


@pytest.mark.parametrize("folder", TOP_LEVEL)
def test_top_level_folder_exists_with_readme_and_no_init(folder: str) -> None:
    path = ROOT / folder
    assert path.is_dir(), f"{folder}/ is missing"
    assert (path / "README.md").is_file(), f"{folder}/README.md is missing"
    inits = list(path.rglob("__init__.py"))
    assert not inits, f"{folder}/ must not be a Python package: {inits}"


def test_stdlib_platform_and_real_mlflow_import_from_repo_root() -> None:
    # Run from the repository root, where a stray platform/__init__.py or mlflow/__init__.py would
    # shadow the standard library / the installed mlflow.
    code = (
        "import platform, mlflow, sys; "
        "assert hasattr(platform, 'python_version'), platform.__file__; "
        "assert hasattr(mlflow, 'start_run'), mlflow.__file__; "
        "print(platform.__file__); print(mlflow.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    platform_file, mlflow_file = out.stdout.split()
    assert not platform_file.startswith(str(ROOT / "platform"))
    assert not mlflow_file.startswith(str(ROOT / "mlflow"))


def test_package_is_importable_under_src() -> None:
    import aigc

    assert Path(aigc.__file__).resolve().is_relative_to(ROOT / "src" / "aigc")


# A citation of something outside the repository: the design and stack notes the project was planned
# in (by name, by section, or by the folder they lived in), or an issue or stop of the project's
# tracker by its number. What they said belongs in docs/architecture.md or the other docs/*.md. An
# upstream project's issue is cited as owner/repo#N or by its URL, which this does not match. The
# character classes keep this file from matching itself.
CITATION = re.compile(
    r"\bDESIG[N]\b"
    r"|(?i:\bdesig[n](?:\.md\b|\s*§))"
    r"|\bSTACK-NOTE[S]\b"
    r"|(?:\.\./|/work/)share[d]/"
    r"|\b[Ii]ssue[s]?\s+#?\d+"
    # a stop by its number, not a process that stops some seconds later, nor `ray stop 2>...`
    r"|\b[Ss]top[s]?\s+\d+(?=['’;,.:)]|\s|$)(?!\s*(?:s|ms|min|seconds?|minutes?|steps?|%)\b)"
)
# What git grep pre-selects (case-insensitive) before CITATION decides, line by line.
COARSE = r"desig[n]|stack-note[s]|share[d]/|issue|sto[p]"


def citations(root: Path) -> list[str]:
    """``path:line: text`` of every line of a tracked text file under ``root`` that CITATION matches."""
    out = subprocess.run(
        ["git", "grep", "-z", "-n", "-I", "-i", "-E", "-e", COARSE],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode in (0, 1), out.stderr  # 1: no line matched
    found = []
    for row in out.stdout.splitlines():
        path, line, text = row.split("\0", 2)
        if CITATION.search(text):
            found.append(f"{path}:{line}: {text.strip()}")
    return found


def git_checkout(root: Path) -> bool:
    if shutil.which("git") is None:
        return False
    top = subprocess.run(
        ["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True, timeout=60
    )
    return top.returncode == 0 and Path(top.stdout.strip()).resolve() == root.resolve()


def test_no_tracked_file_cites_a_document_or_tracker_outside_the_repository() -> None:
    if not git_checkout(ROOT):
        pytest.skip(f"{ROOT} is not a git checkout")
    found = citations(ROOT)
    assert not found, (
        "these lines cite a document or a tracker issue the repository's users do not have; say it "
        "here, or point to docs/architecture.md or another docs/*.md:\n" + "\n".join(found)
    )


def test_the_citation_check_catches_citations_and_spares_ordinary_text(tmp_path: Path) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    # Built from pieces so that this file cites nothing itself.
    cited = [
        "The rule (" + "DES" + "IGN" + " §3), on figures measured the same way.",
        "See " + "design" + ".md for the layout.",
        "redeploys stall requests (" + "STACK" + "-NOTES)",
        "as the notes in ../" + "shared/ say",
        "Issue" + " 3's target for this family: 90 %.",
        "Latent datasets (" + "issue" + " 12): aigc data encode.",
        "The rest of this section is " + "stop" + " 21's record.",
        "(2026-11-27, " + "stop" + " 18; batch 16)",
    ]
    ordinary = [
        "All emojis designed by OpenMoji; one trunk design that works for any size.",
        "Ray's own bug, ray#48664, https://github.com/ray-project/ray/issues/48664",
        'monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////shared/mlflow.db")',
        "the workers stop 2 s later; ray stop 2>/dev/null; stop 3 steps early",
    ]
    (tmp_path / "cited.md").write_text("\n".join(["# title", *cited]) + "\n", encoding="utf-8")
    (tmp_path / "ordinary.py").write_text(
        "\n".join(f"# {line}" for line in ordinary) + "\n", encoding="utf-8"
    )
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True, timeout=60)
    subprocess.run(["git", "add", "cited.md", "ordinary.py"], cwd=tmp_path, check=True, timeout=60)
    found = citations(tmp_path)
    assert [row.split(": ", 1)[0] for row in found] == [f"cited.md:{i}" for i in range(2, len(cited) + 2)]
