"""Helpers of ``test_k8s.py``: render the kustomize overlays with kubectl, and the trimmed KubeRay
CRD schemas vendored next to this file (``kuberay-crd-schemas.json``).

Regenerate the schemas from a KubeRay checkout (the tag is recorded in the file)::

    git -C kuberay show v1.7.0:ray-operator/config/crd/bases/ray.io_rayclusters.yaml > /tmp/rc.yaml
    (same for ray.io_rayjobs.yaml, ray.io_rayservices.yaml)
    python tests/unit/k8s_render.py v1.7.0 <commit> /tmp/rc.yaml /tmp/rj.yaml /tmp/rs.yaml

Trimming keeps every KubeRay-owned field with its type and enum, drops the descriptions and the
``status``, and replaces each embedded Kubernetes PodTemplateSpec (head/worker ``template``,
``submitterPodTemplate``) and Service (``headService``, ``serveService``) with an open object: the
test validates those with the Kubernetes schemas of ``kubernetes_validate`` instead. Every other
object gets ``additionalProperties: false``, so a misspelt field fails (the API server would
silently prune it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SCHEMAS = HERE / "kuberay-crd-schemas.json"
# The Ray kinds and where the pod templates / Services sit in them (dotted paths, [] = each item).
POD_TEMPLATE_PATHS = {
    "RayCluster": ["spec.headGroupSpec.template", "spec.workerGroupSpecs[].template"],
    "RayJob": [
        "spec.rayClusterSpec.headGroupSpec.template",
        "spec.rayClusterSpec.workerGroupSpecs[].template",
        "spec.submitterPodTemplate",
    ],
    "RayService": [
        "spec.rayClusterConfig.headGroupSpec.template",
        "spec.rayClusterConfig.workerGroupSpecs[].template",
    ],
}
_OPEN = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}


def find_kubectl() -> str | None:
    """``AIGC_KUBECTL`` or the kubectl on PATH."""
    return os.environ.get("AIGC_KUBECTL") or shutil.which("kubectl")


def kustomize(kubectl: str, folder: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize folder``, parsed (one dict per resource)."""
    out = subprocess.run(
        [kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60, check=False
    )
    if out.returncode != 0:
        raise AssertionError(f"`{kubectl} kustomize {folder}` failed:\n{out.stderr}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def pick(obj: Any, path: str) -> list[Any]:
    """The values at a dotted ``path`` (``[]`` after a key: every item of that list); missing: []."""
    values = [obj]
    for part in path.split("."):
        each = part.endswith("[]")
        key = part[:-2] if each else part
        nxt: list[Any] = []
        for value in values:
            if isinstance(value, dict) and key in value:
                item = value[key]
                if each:
                    nxt.extend(item if isinstance(item, list) else [])
                else:
                    nxt.append(item)
        values = nxt
    return values


def _is_pod_template(schema: dict[str, Any]) -> bool:
    spec = schema.get("properties", {}).get("spec", {})
    return "metadata" in schema.get("properties", {}) and "containers" in spec.get("properties", {})


def _is_service(schema: dict[str, Any]) -> bool:
    spec = schema.get("properties", {}).get("spec", {})
    return "clusterIP" in spec.get("properties", {})


def trim(schema: Any) -> Any:
    """A strict, small copy of a CRD's openAPIV3Schema (see the module doc)."""
    if isinstance(schema, list):
        return [trim(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if _is_pod_template(schema) or _is_service(schema):
        return dict(_OPEN)
    out = {k: trim(v) for k, v in schema.items() if k != "description"}
    if "properties" in out:
        out["properties"] = {k: trim(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


def crd_schema(crd: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(kind, trimmed schema of its v1 version)."""
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = dict(version["schema"]["openAPIV3Schema"])
    schema["properties"] = {k: v for k, v in schema["properties"].items() if k != "status"}
    # apiVersion/kind/metadata are checked by the API server, not by the CRD schema.
    schema["properties"]["metadata"] = {"type": "object"}
    return crd["spec"]["names"]["kind"], trim(schema)


def main(argv: list[str]) -> None:
    tag, commit, *files = argv
    kinds = dict(crd_schema(yaml.safe_load(Path(f).read_text())) for f in files)
    doc = {
        "source": "https://github.com/ray-project/kuberay ray-operator/config/crd/bases/ray.io_*.yaml",
        "tag": tag,
        "commit": commit,
        "trimmed_by": "tests/unit/k8s_render.py (see its docstring)",
        "schemas": kinds,
    }
    SCHEMAS.write_text(json.dumps(doc, separators=(",", ":"), sort_keys=True) + "\n")
    print(f"{SCHEMAS}: {SCHEMAS.stat().st_size} bytes, kinds {sorted(kinds)}")


if __name__ == "__main__":
    main(sys.argv[1:])
