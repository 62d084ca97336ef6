"""Print this Python's bundle target (its version, SOABI and installed distributions) as JSON.

Run on the GPU machine with the Python that holds its CUDA torch; the output is what
``build_bundle.py --target`` reads. Standard library only (it runs before any bundle is there)::

    python3 platform/device/probe.py > "$OUT/target.json"
"""

from __future__ import annotations

import json
import sys
import sysconfig
from importlib import metadata


def main() -> None:
    packages = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            packages.setdefault(name, dist.version)  # first on sys.path wins, as for imports
    print(
        json.dumps(
            {
                "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
                "soabi": sysconfig.get_config_var("SOABI"),
                "note": f"probe.py on {sys.executable} (Python {sys.version.split()[0]})",
                "packages": [{"name": n, "version": v} for n, v in sorted(packages.items())],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
