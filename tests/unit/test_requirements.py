"""The Python versions the project claims match what its pinned dependencies accept.

``pyproject.toml``'s ``requires-python`` is what pip checks before installing aigc, and README's
Requirements repeats it. Its lowest version must be one every package pinned in ``constraints.txt``
installs on (read from the installed distributions' own ``Requires-Python``), or ``make`` fails on
that Python with "no matching distribution", as numpy 2.4.6 did on the 3.10 the project once claimed.
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]


def _requires_python() -> SpecifierSet:
    return SpecifierSet(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"])


def _lowest_python(spec: SpecifierSet) -> Version:
    for minor in range(8, 20):
        if Version(f"3.{minor}") in spec:
            return Version(f"3.{minor}")
    raise AssertionError(f"requires-python {spec} admits no Python 3.8 ... 3.19")


def test_every_pinned_package_installs_on_the_lowest_python_claimed():
    lowest = _lowest_python(_requires_python())
    refused = []
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-\[\]]+)==(\S+)", line.strip())
        if not m:
            continue
        name = re.sub(r"\[.*\]", "", m.group(1))
        try:
            meta = importlib.metadata.metadata(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # pinned for another platform or extra, not installed here
        need = meta.get("Requires-Python")
        if need and lowest not in SpecifierSet(need):
            refused.append(f"{name}=={m.group(2)} requires Python {need}")
    assert not refused, f"requires-python starts at {lowest}, which these pins refuse: {refused}"


def test_readme_states_the_same_lowest_python():
    lowest = _lowest_python(_requires_python())
    requirements = (ROOT / "README.md").read_text().split("## Requirements", 1)[1].split("\n## ", 1)[0]
    first = requirements.strip().splitlines()[0]
    assert f"Python {lowest}" in first, f"README's Requirements should start at Python {lowest}: {first!r}"
