"""Offline checks of the Kubernetes manifests (k8s/), the image (platform/Dockerfile) and the Ray
cluster-launcher config (platform/cluster.yaml). No cluster, no Docker, no network.

- Every overlay renders with ``kubectl kustomize`` (the kubectl on PATH or ``AIGC_KUBECTL``; CI
  installs Debian's kubernetes-client, kubectl 1.20 with kustomize v2.0.3). Without a kubectl the
  tests fail: they are the only check of the manifests.
- Core, apps, batch and networking resources, and every pod template inside the Ray resources,
  validate against the Kubernetes 1.32 OpenAPI schemas bundled with ``kubernetes_validate`` (strict:
  unknown fields fail).
- RayCluster, RayJob and RayService validate against KubeRay's CRD schemas (ray.io/v1, trimmed and
  vendored in ``kuberay-crd-schemas.json``, see ``k8s_render.py``), and the fields the platform
  relies on are checked by name below (``RAY_FIELDS``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from k8s_render import POD_TEMPLATE_PATHS, ROOT, SCHEMAS, find_kubectl, kustomize, pick

K8S_VERSION = "1.32.0"  # a version kubernetes_validate 1.37 bundles (1.25 ... 1.37)
NAMESPACE = "aigc"
SECRET = "aigc-credentials"
# The MLflow users the Ray pods log in as (mlflow/init-users.py makes them, the Job mlflow-users runs
# it): training pods as the job user, serving pods as the read-only serving user, never the admin.
JOB_SECRET = "aigc-mlflow-job"
SERVING_SECRET = "aigc-mlflow-serving"
MLFLOW_LOGIN = {"RayJob": JOB_SECRET, "RayCluster": JOB_SECRET, "RayService": SERVING_SECRET}
ADMIN_KEYS = {"mlflow-username", "mlflow-password"}  # in aigc-credentials
OVERLAYS = ("dev-cpu", "gpu")
ENTRYPOINTS = {
    "dev-cpu": "aigc train models/diffusion.yaml --workers 2 --set data.location=s3://aigc/datasets/digits",
    "gpu": (
        "aigc train models/diffusion.yaml --workers 2 --gpus-per-worker 1 --set trainer.precision=bf16-mixed"
        " --set data.location=s3://aigc/datasets/digits"
    ),
}
PRINT_CONFIG = ["serve", "aigc-diffusion@production", "--host", "0.0.0.0", "--print-config"]
# The ray.io/v1 fields the manifests rely on, by kind (dotted paths; [] = every item). Each must be
# in KubeRay's CRD schema (vendored) and set in every rendered resource of that kind.
CLUSTER_FIELDS = [
    "rayVersion",
    "enableInTreeAutoscaling",
    "authOptions.mode",
    "autoscalerOptions.resources",
    "autoscalerOptions.securityContext",
    "headGroupSpec.rayStartParams",
    "headGroupSpec.template",
    "workerGroupSpecs[].groupName",
    "workerGroupSpecs[].replicas",
    "workerGroupSpecs[].minReplicas",
    "workerGroupSpecs[].maxReplicas",
    "workerGroupSpecs[].rayStartParams",
    "workerGroupSpecs[].template",
]
RAY_FIELDS = {
    "RayCluster": [f"spec.{f}" for f in CLUSTER_FIELDS],
    "RayJob": [
        "spec.entrypoint",
        "spec.submissionMode",
        "spec.shutdownAfterJobFinishes",
        "spec.ttlSecondsAfterFinished",
        "spec.activeDeadlineSeconds",
        "spec.submitterPodTemplate",
        *(f"spec.rayClusterSpec.{f}" for f in CLUSTER_FIELDS),
    ],
    "RayService": ["spec.serveConfigV2", *(f"spec.rayClusterConfig.{f}" for f in CLUSTER_FIELDS)],
}
CLUSTER_SPEC = {"RayCluster": "spec", "RayJob": "spec.rayClusterSpec", "RayService": "spec.rayClusterConfig"}
# What every aigc container of training and serving gets: value (None: from the Secret).
TRAINING_ENV = {
    "MLFLOW_TRACKING_URI": "http://mlflow:5000",
    "AIGC_STORAGE_PATH": "s3://aigc/runs",
    "MLFLOW_TRACKING_USERNAME": None,
    "MLFLOW_TRACKING_PASSWORD": None,
    "AWS_ACCESS_KEY_ID": None,
    "AWS_SECRET_ACCESS_KEY": None,
    "AWS_ENDPOINT_URL_S3": "",
    "MLFLOW_S3_ENDPOINT_URL": "",
    "AWS_DEFAULT_REGION": "",
}
MLFLOW_ENV = [
    "MLFLOW_BACKEND_STORE_URI",
    "MLFLOW_ARTIFACTS_DESTINATION",
    "MLFLOW_AUTH_ADMIN_USERNAME",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
    "MLFLOW_AUTH_DATABASE_URI",
    "MLFLOW_ALLOWED_HOSTS",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "MLFLOW_S3_ENDPOINT_URL",
]
RAY_PORTS = (8265, 6379, 10001)  # dashboard / job submission, GCS, Ray client
Rendered = dict[str, list[dict[str, Any]]]  # overlay -> its resources


# ---------------------------------------------------------------------------------------------------
# rendering


@pytest.fixture(scope="module")
def rendered() -> Rendered:
    kubectl = find_kubectl()
    if kubectl is None:
        pytest.fail(
            "no kubectl found: install one (Debian: apt-get install kubernetes-client) or set AIGC_KUBECTL "
            "to its path; the k8s/ manifests are rendered with `kubectl kustomize`"
        )
    return {name: kustomize(kubectl, ROOT / "k8s" / "overlays" / name) for name in OVERLAYS}


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def all_docs(rendered: Rendered) -> list[tuple[str, dict[str, Any]]]:
    return [(overlay, doc) for overlay, docs in rendered.items() for doc in docs]


def label(overlay: str, doc: dict[str, Any]) -> str:
    return f"{overlay}: {doc['kind']}/{doc['metadata']['name']}"


def pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every pod template of a resource (Deployment, StatefulSet, Job, the Ray kinds)."""
    if doc["kind"] in POD_TEMPLATE_PATHS:
        return [t for path in POD_TEMPLATE_PATHS[doc["kind"]] for t in pick(doc, path)]
    return pick(doc, "spec.template")


def containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    spec = template.get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def effective_env(container: dict[str, Any], configmaps: dict[str, dict[str, str]]) -> dict[str, Any]:
    """name -> value (str) or the valueFrom dict; envFrom ConfigMaps first, env on top."""
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        assert ref, f"{container['name']}: envFrom other than a configMapRef: {source}"
        assert ref["name"] in configmaps, f"{container['name']}: ConfigMap {ref['name']} is not rendered"
        env.update(configmaps[ref["name"]])
    for var in container.get("env", []):
        env[var["name"]] = var["valueFrom"] if "valueFrom" in var else var.get("value", "")
    return env


def test_overlays_render_with_every_part(rendered: Rendered) -> None:
    overlays = ROOT / "k8s" / "overlays"
    found = sorted(p.name for p in overlays.iterdir() if (p / "kustomization.yaml").exists())
    assert found == sorted(OVERLAYS)
    for overlay, docs in rendered.items():
        names = {(d["kind"], d["metadata"]["name"]) for d in docs}
        for needed in [
            ("RayCluster", "aigc"),
            ("RayJob", "aigc-train-diffusion"),
            ("RayService", "aigc-serve"),
            ("Deployment", "mlflow"),
            ("Service", "mlflow"),
            ("Service", "postgres"),
            ("ConfigMap", "aigc-settings"),
            ("NetworkPolicy", "aigc-ray-internal"),
        ]:
            assert needed in names, f"{overlay}: {needed} is not rendered"
        for doc in docs:
            assert doc["metadata"].get("namespace") == NAMESPACE, label(overlay, doc)
    dev = {(d["kind"], d["metadata"]["name"]) for d in rendered["dev-cpu"]}
    assert {("StatefulSet", "postgres"), ("StatefulSet", "minio"), ("Service", "minio")} <= dev


# ---------------------------------------------------------------------------------------------------
# schemas


def test_core_resources_validate_against_kubernetes_schemas(rendered: Rendered) -> None:
    for overlay, doc in all_docs(rendered):
        if doc["apiVersion"].startswith("ray.io/"):
            # The pod templates inside: as PodTemplates, so the core schema checks every container.
            for i, template in enumerate(pod_templates(doc)):
                wrapped = {
                    "apiVersion": "v1",
                    "kind": "PodTemplate",
                    "metadata": {"name": f"{doc['metadata']['name']}-{i}"},
                    "template": template,
                }
                try:
                    kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)
                except kubernetes_validate.ValidationError as err:
                    pytest.fail(f"{label(overlay, doc)} pod template {i}: {err.message} at {list(err.path)}")
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{label(overlay, doc)}: {err.message} at {list(err.path)}")


@pytest.fixture(scope="module")
def crd_schemas() -> dict[str, Any]:
    return json.loads(SCHEMAS.read_text())


def test_ray_resources_validate_against_kuberay_crds(rendered: Rendered, crd_schemas: dict[str, Any]) -> None:
    assert crd_schemas["tag"].startswith("v1."), crd_schemas["tag"]
    for overlay, doc in all_docs(rendered):
        if not doc["apiVersion"].startswith("ray.io/"):
            continue
        assert doc["apiVersion"] == "ray.io/v1", label(overlay, doc)
        schema = crd_schemas["schemas"][doc["kind"]]
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
        problems = "; ".join(f"{list(e.path)}: {e.message}" for e in errors)
        assert not errors, f"{label(overlay, doc)}: {problems}"


def schema_has(schema: dict[str, Any], path: str) -> bool:
    node = schema
    for part in path.split("."):
        key = part.removesuffix("[]")
        node = node.get("properties", {}).get(key)
        if node is None:
            return False
        if part.endswith("[]"):
            node = node.get("items", {})
    return True


def test_ray_fields_exist_in_kuberay_v1_and_are_set(rendered: Rendered, crd_schemas: dict[str, Any]) -> None:
    for kind, fields in RAY_FIELDS.items():
        for field in fields:
            assert schema_has(crd_schemas["schemas"][kind], field), f"{kind}.{field}: not in KubeRay v1"
    for overlay, docs in rendered.items():
        for kind, fields in RAY_FIELDS.items():
            (doc,) = of_kind(docs, kind)
            for field in fields:
                values = pick(doc, field)
                # A field of every worker group: as many values as groups (and at least one group).
                expected = len(pick(doc, field.split("[]")[0] + "[]")) if "[]" in field else 1
                assert expected and len(values) == expected, f"{label(overlay, doc)}: {field} is not set"


def test_ray_clusters_autoscale_with_token_auth(rendered: Rendered) -> None:
    ray_version = importlib.metadata.version("ray")
    for overlay, docs in rendered.items():
        for kind, spec_path in CLUSTER_SPEC.items():
            for doc in of_kind(docs, kind):
                (spec,) = pick(doc, spec_path)
                where = label(overlay, doc)
                assert spec["rayVersion"] == ray_version, f"{where}: rayVersion is not the pinned ray"
                assert spec["enableInTreeAutoscaling"] is True, where
                assert spec["authOptions"] == {"mode": "token"}, f"{where}: Ray token auth is off"
                assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", where
                for group in spec["workerGroupSpecs"]:
                    low, n, high = group["minReplicas"], group["replicas"], group["maxReplicas"]
                    assert 0 <= low <= n <= high, (where, group["groupName"])
                    assert low < high, f"{where}: {group['groupName']} cannot scale"
    for doc in of_kind(rendered["gpu"], "RayJob") + of_kind(rendered["gpu"], "RayCluster"):
        spec = pick(doc, CLUSTER_SPEC[doc["kind"]])[0]
        gpu = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
        assert len(gpu) == 1, f"gpu: {label('gpu', doc)} has no gpu worker group"
        (container,) = gpu[0]["template"]["spec"]["containers"]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
        assert gpu[0]["minReplicas"] == 0 and gpu[0]["maxReplicas"] >= 2
        cpu = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "cpu"]
        assert cpu and cpu[0]["replicas"] == 0, "gpu: the CPU worker group should start empty"
    for doc in rendered["dev-cpu"]:
        for template in pod_templates(doc):
            for c in containers(template):
                assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {}), label("dev-cpu", doc)


def test_rayjobs_run_the_documented_entrypoints(rendered: Rendered) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for overlay, docs in rendered.items():
        (job,) = of_kind(docs, "RayJob")
        spec = job["spec"]
        assert spec["entrypoint"] == ENTRYPOINTS[overlay], overlay
        assert spec["shutdownAfterJobFinishes"] is True
        assert spec["submissionMode"] == "K8sJobMode"
        # Nothing starts at apply time: the shards and MLflow come first, then k8s/README.md
        # unsuspends the job and promotes what it registered (the RayService serves @production).
        assert spec["suspend"] is True, overlay
        k8s_readme = (ROOT / "k8s" / "README.md").read_text(encoding="utf-8")
        assert (
            f'patch rayjob {job["metadata"]["name"]} --type merge -p \'{{"spec":{{"suspend":false}}}}\''
            in k8s_readme
        )
        assert "aigc promote aigc-diffusion" in k8s_readme
        assert spec["entrypoint"] in readme, f"README.md does not quote the {overlay} RayJob's entrypoint"


def _cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if str(quantity).endswith("m") else float(quantity)


def test_the_gpu_head_that_runs_the_final_evaluation_is_not_smaller_than_a_cpu_worker(
    rendered: Rendered,
) -> None:
    """The job's driver runs on the head (KubeRay's submitter only tails it): after training it loads
    the checkpoint and runs the final evaluation, training the reference evaluator on first use. A
    1-CPU head (what the gpu overlay had) makes that the slowest step of a GPU run: there the head gets
    at least the CPUs of the biggest CPU worker. dev-cpu keeps a 1-CPU head that fits a laptop's kind
    or minikube, where the evaluation is as slow as the training anyway."""
    biggest_cpu = 0.0
    for _, doc in all_docs(rendered):
        for spec in pick(doc, CLUSTER_SPEC.get(doc["kind"], "-")):
            for group in spec["workerGroupSpecs"]:
                limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
                if "nvidia.com/gpu" not in limits:
                    biggest_cpu = max(biggest_cpu, _cpus(limits["cpu"]))
    assert biggest_cpu >= 2
    (job,) = of_kind(rendered["gpu"], "RayJob")
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert _cpus(head["resources"]["limits"]["cpu"]) >= biggest_cpu, head["resources"]


def test_rayservice_serve_config_is_what_aigc_serve_prints(rendered: Rendered) -> None:
    aigc = Path(sys.executable).with_name("aigc")
    out = subprocess.run(
        [str(aigc), *PRINT_CONFIG], capture_output=True, text=True, timeout=120, cwd=ROOT, check=False
    )
    assert out.returncode == 0, f"`aigc {' '.join(PRINT_CONFIG)}` failed:\n{out.stderr[-2000:]}"
    printed = yaml.safe_load(out.stdout)
    assert printed["applications"][0]["import_path"] == "aigc.serving.app:app_builder"
    for overlay, docs in rendered.items():
        services = of_kind(docs, "RayService")
        assert services
        for doc in services:
            config = yaml.safe_load(doc["spec"]["serveConfigV2"])
            assert config == printed, (
                f"{label(overlay, doc)}: serveConfigV2 is not what --print-config prints"
            )


# ---------------------------------------------------------------------------------------------------
# security and resources


def documented_secrets() -> dict[str, set[str]]:
    """Secret name -> its keys, from the `kubectl -n aigc create secret generic` commands of k8s/README.md."""
    k8s_readme = (ROOT / "k8s" / "README.md").read_text(encoding="utf-8")
    commands = re.findall(
        r"kubectl -n aigc create secret generic ([a-z0-9-]+)((?:[^\n]*\\\n)*[^\n]*)", k8s_readme
    )
    return {name: set(re.findall(r"--from-literal=([a-z0-9-]+)=", args)) for name, args in commands}


def test_no_secret_values_in_the_manifests(rendered: Rendered) -> None:
    documented = documented_secrets()
    for name in (SECRET, JOB_SECRET, SERVING_SECRET):
        assert name in documented, (
            f"k8s/README.md lacks the `kubectl -n aigc create secret generic {name}` command"
        )
    assert documented[JOB_SECRET] == documented[SERVING_SECRET] == {"username", "password"}
    for overlay, doc in all_docs(rendered):
        assert doc["kind"] != "Secret" or not (doc.get("data") or doc.get("stringData")), label(overlay, doc)
        for ref in find_key(doc, "secretKeyRef"):
            assert ref["name"] in documented, (
                f"{label(overlay, doc)}: Secret {ref['name']} not in k8s/README.md"
            )
            assert ref["key"] in documented[ref["name"]], (
                f"{label(overlay, doc)}: key {ref['key']} of {ref['name']} not in k8s/README.md"
            )
    for path in (ROOT / "k8s").rglob("*.yaml"):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"^kind:\s*Secret\s*$", text, re.M), f"{path}: defines a Secret"


def find_key(obj: Any, key: str) -> list[Any]:
    """Every value under ``key`` anywhere in ``obj``."""
    if isinstance(obj, dict):
        return [v for k, v in obj.items() if k == key] + [x for v in obj.values() for x in find_key(v, key)]
    if isinstance(obj, list):
        return [x for v in obj for x in find_key(v, key)]
    return []


def run_as_non_root(pod_sc: dict[str, Any], sc: dict[str, Any]) -> bool:
    non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
    user = sc.get("runAsUser", pod_sc.get("runAsUser"))
    return bool(non_root) and user != 0


def test_every_container_runs_as_non_root_with_requests_and_limits(
    rendered: Rendered,
) -> None:
    count = 0
    for overlay, doc in all_docs(rendered):
        for template in pod_templates(doc):
            pod_sc = template["spec"].get("securityContext", {})
            for c in containers(template):
                where = f"{label(overlay, doc)} container {c['name']}"
                sc = c.get("securityContext", {})
                assert run_as_non_root(pod_sc, sc), f"{where}: may run as root"
                assert sc.get("allowPrivilegeEscalation") is False, where
                assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
                res = c.get("resources", {})
                for kind in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(res.get(kind, {})), f"{where}: no cpu/memory {kind}"
                count += 1
        # The autoscaler sidecar KubeRay adds to the head.
        for spec in pick(doc, CLUSTER_SPEC.get(doc["kind"], "-")):
            opts = spec.get("autoscalerOptions", {})
            assert run_as_non_root({"runAsUser": 1000}, opts.get("securityContext", {})), label(overlay, doc)
            assert {"requests", "limits"} <= set(opts.get("resources", {})), label(overlay, doc)
    assert count >= 20


# Labels KubeRay v1.7.0 puts on every Ray pod, read in its source (tag ray-operator/v1.7.0):
# ray-operator/controllers/ray/common/pod.go `labelPod` (lines 1167-1191; called at 236 for the head
# with group "headgroup", utils/constant.go:352, and at 671 for a worker group) starts from
# ray.io/is-ray-node=yes, ray.io/cluster, ray.io/node-type, ray.io/group, ray.io/identifier
# (<cluster>-<type>, utils/util.go:385), app.kubernetes.io/name=kuberay and
# app.kubernetes.io/created-by=kuberay-operator (utils/constant.go:19-23, 98-99, 126, 129), then
# lets the template's labels (merged with the group's `labels`) override every key except
# ray.io/node-type, ray.io/group and ray.io/cluster. A head Service (common/service.go
# `HeadServiceLabels`, lines 25-33) selects cluster, node-type, identifier, name=kuberay and
# created-by; the RayJob- and RayService-level head Services use the same labels, so a template
# that sets app.kubernetes.io/name makes them select no pod (KubeRay #2648).
def kuberay_pod_labels(cluster: str, template: dict[str, Any], node_type: str, group: str) -> dict[str, str]:
    return {
        "ray.io/is-ray-node": "yes",
        "ray.io/identifier": f"{cluster}-{node_type}"[-63:],
        "app.kubernetes.io/name": "kuberay",
        "app.kubernetes.io/created-by": "kuberay-operator",
        **template.get("metadata", {}).get("labels", {}),
        "ray.io/cluster": cluster,
        "ray.io/node-type": node_type,
        "ray.io/group": group,
    }


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert not selector.get("matchExpressions"), "only matchLabels is simulated here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def test_network_policies_and_head_services_select_the_ray_pods(rendered: Rendered) -> None:
    for overlay, docs in rendered.items():
        policies = {d["metadata"]["name"]: d for d in of_kind(docs, "NetworkPolicy")}
        for doc in docs:
            for spec in pick(doc, CLUSTER_SPEC.get(doc["kind"], "-")):
                name = doc["metadata"]["name"]
                pods = [kuberay_pod_labels(name, spec["headGroupSpec"]["template"], "head", "headgroup")]
                pods += [
                    kuberay_pod_labels(name, g["template"], "worker", g["groupName"])
                    for g in spec["workerGroupSpecs"]
                ]
                for labels in pods:
                    where = f"{label(overlay, doc)} {labels['ray.io/node-type']}"
                    # The head Services of a RayJob / RayService select the head (KubeRay #2648).
                    if labels["ray.io/node-type"] == "head":
                        head_service = {
                            "ray.io/cluster": name,
                            "ray.io/node-type": "head",
                            "ray.io/identifier": f"{name}-head"[-63:],
                            "app.kubernetes.io/name": "kuberay",
                            "app.kubernetes.io/created-by": "kuberay-operator",
                        }
                        assert selects({"matchLabels": head_service}, labels), where
                    assert selects(policies["aigc-ray-internal"]["spec"]["podSelector"], labels), where
                    serving = selects(policies["aigc-ray-serve"]["spec"]["podSelector"], labels)
                    # Serve's port 8000 (the Ingress, and the operator's /-/healthz of the head's
                    # proxy) is open on the RayService's pods, head included, and on no other.
                    assert serving == (doc["kind"] == "RayService"), where
        ports = [p["port"] for r in policies["aigc-ray-serve"]["spec"]["ingress"] for p in r.get("ports", [])]
        assert 8000 in ports


def test_ray_containers_request_what_they_are_limited_to(rendered: Rendered) -> None:
    """Ray advertises a pod's limits as its resources (KubeRay sets --num-cpus / --memory from the
    container's limits), so the scheduler must reserve as much: requests equal limits."""
    count = 0
    for overlay, doc in all_docs(rendered):
        for spec in pick(doc, CLUSTER_SPEC.get(doc["kind"], "-")):
            for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
                ray = group["template"]["spec"]["containers"][0]
                res = ray["resources"]
                assert res["requests"] == res["limits"], f"{label(overlay, doc)} {ray['name']}: {res}"
                count += 1
    assert count >= 9


def test_every_pod_meets_pod_security_restricted(rendered: Rendered) -> None:
    """The rules of the Pod Security Standards' "restricted" profile
    (kubernetes.io/docs/concepts/security/pod-security-standards) that a namespace labelled
    pod-security.kubernetes.io/enforce=restricted checks on admission."""
    count = 0
    for overlay, doc in all_docs(rendered):
        for template in pod_templates(doc):
            spec = template["spec"]
            pod_sc = spec.get("securityContext", {})
            where = label(overlay, doc)
            assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), where
            for v in spec.get("volumes", []):
                assert "hostPath" not in v, f"{where}: hostPath volume {v['name']}"
            for c in containers(template):
                sc = c.get("securityContext", {})
                seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
                assert seccomp.get("type") in ("RuntimeDefault", "Localhost"), f"{where} {c['name']}: seccomp"
                assert sc.get("privileged") is not True, f"{where} {c['name']}"
                assert not set(sc.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}, where
                assert all("hostPort" not in port for port in c.get("ports", [])), f"{where} {c['name']}"
                count += 1
        # KubeRay's autoscaler sidecar takes the pod's seccomp profile and its own securityContext.
        for cspec in pick(doc, CLUSTER_SPEC.get(doc["kind"], "-")):
            opts = cspec.get("autoscalerOptions", {}).get("securityContext", {})
            head_sc = cspec["headGroupSpec"]["template"]["spec"].get("securityContext", {})
            assert head_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", label(overlay, doc)
            assert opts.get("allowPrivilegeEscalation") is False, label(overlay, doc)
            assert opts.get("capabilities", {}).get("drop") == ["ALL"], label(overlay, doc)
    assert count >= 20


def test_aigc_containers_get_the_training_environment(rendered: Rendered) -> None:
    for overlay, docs in rendered.items():
        configmaps = {d["metadata"]["name"]: d["data"] for d in of_kind(docs, "ConfigMap")}
        for doc in docs:
            if doc["kind"] not in CLUSTER_SPEC:
                continue
            (spec,) = pick(doc, CLUSTER_SPEC[doc["kind"]])
            groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
            templates = [g["template"] for g in groups]
            for template in templates:
                for c in template["spec"]["containers"]:
                    env = effective_env(c, configmaps)
                    where = f"{label(overlay, doc)} {c['name']}"
                    for name, value in TRAINING_ENV.items():
                        assert name in env, f"{where}: no {name}"
                        if value is None and name.startswith("MLFLOW_TRACKING_"):
                            ref = env[name]["secretKeyRef"]
                            assert ref["name"] == MLFLOW_LOGIN[doc["kind"]], f"{where}: {name} from {ref}"
                        elif value is None:
                            assert env[name]["secretKeyRef"]["name"] == SECRET, f"{where}: {name}"
                        elif value:
                            assert env[name] == value, f"{where}: {name}={env[name]}"
                        else:
                            assert isinstance(env[name], str) and env[name], f"{where}: {name} is empty"
        settings = configmaps["aigc-settings"]
        if overlay == "dev-cpu":
            assert (
                settings["AWS_ENDPOINT_URL_S3"] == settings["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
            )
            (minio,) = [d for d in of_kind(docs, "Service") if d["metadata"]["name"] == "minio"]
            assert 9000 in [p["port"] for p in minio["spec"]["ports"]]
        else:
            assert "minio" not in settings["AWS_ENDPOINT_URL_S3"]
        # The global AWS_ENDPOINT_URL would also send the STS calls of IRSA / Pod Identity (the
        # pod's web-identity token exchange) to the S3 endpoint; only the S3-scoped name is set.
        for doc in docs:
            if doc["kind"] == "ConfigMap":
                assert "AWS_ENDPOINT_URL" not in doc.get("data", {}), label(overlay, doc)
            for template in pod_templates(doc):
                for c in containers(template):
                    names = [e["name"] for e in c.get("env", [])]
                    assert "AWS_ENDPOINT_URL" not in names, f"{label(overlay, doc)} {c['name']}"


def test_mlflow_server_uses_the_start_script_with_auth(rendered: Rendered) -> None:
    for overlay, docs in rendered.items():
        configmaps = {d["metadata"]["name"]: d["data"] for d in of_kind(docs, "ConfigMap")}
        (deployment,) = [d for d in of_kind(docs, "Deployment") if d["metadata"]["name"] == "mlflow"]
        (service,) = [d for d in of_kind(docs, "Service") if d["metadata"]["name"] == "mlflow"]
        (c,) = deployment["spec"]["template"]["spec"]["containers"]
        assert c["command"] == ["mlflow/start-server.sh", "--host", "0.0.0.0", "--auth"]
        assert c.get("workingDir") == "/app"
        env = effective_env(c, configmaps)
        for name in MLFLOW_ENV:
            assert name in env, f"{overlay}: the MLflow server gets no {name}"
        assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
        assert env["MLFLOW_AUTH_DATABASE_URI"].startswith("postgresql://")
        assert env["MLFLOW_ARTIFACTS_DESTINATION"] == "s3://aigc/mlflow"
        for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "AWS_SECRET_ACCESS_KEY"):
            assert env[name]["secretKeyRef"]["name"] == SECRET
        # The admin the server creates; only the Job mlflow-users logs in as it (see below).
        assert env["MLFLOW_AUTH_ADMIN_USERNAME"]["secretKeyRef"]["key"] == "mlflow-username"
        assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["secretKeyRef"]["key"] == "mlflow-password"
        # Users see only what they are granted: the serving user's READ grant means read-only.
        assert env["MLFLOW_AUTH_DEFAULT_PERMISSION"] == "NO_PERMISSIONS"
        assert c["readinessProbe"]["httpGet"]["path"] == "/health"
        assert [(p["port"], p.get("targetPort")) for p in service["spec"]["ports"]] == [(5000, "http")]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()


def test_ray_pods_log_in_to_mlflow_as_least_privilege_users_made_by_the_init_job(rendered: Rendered) -> None:
    """Training pods log in as the job user, serving pods as the read-only serving user; the Job
    mlflow-users runs mlflow/init-users.py (verbatim, from a ConfigMap) to make both, for the
    experiment the RayJob logs to and the model the RayService serves. Only the MLflow server and
    that Job see the admin's credentials."""
    script = (ROOT / "mlflow" / "init-users.py").read_text(encoding="utf-8")
    entry = ENTRYPOINTS["dev-cpu"].split()
    config = yaml.safe_load((ROOT / entry[entry.index("train") + 1]).read_text(encoding="utf-8"))
    experiment = config["tracking"]["experiment"]
    served_model = PRINT_CONFIG[1].split("@")[0]
    for overlay, docs in rendered.items():
        configmaps = {d["metadata"]["name"]: d["data"] for d in of_kind(docs, "ConfigMap")}
        logins = 0
        for doc in docs:
            for template in pod_templates(doc):
                for c in containers(template):
                    where = f"{label(overlay, doc)} {c['name']}"
                    refs = [r for r in find_key(c.get("env", []), "secretKeyRef") if r["name"] == SECRET]
                    admin = [r["key"] for r in refs if r["key"] in ADMIN_KEYS]
                    if doc["kind"] in MLFLOW_LOGIN:
                        assert not admin, f"{where}: gets the MLflow admin's {admin}"
                        env = effective_env(c, configmaps)
                        if "MLFLOW_TRACKING_USERNAME" in env:
                            for name, key in (("USERNAME", "username"), ("PASSWORD", "password")):
                                ref = env[f"MLFLOW_TRACKING_{name}"]["secretKeyRef"]
                                assert ref == {"name": MLFLOW_LOGIN[doc["kind"]], "key": key}, where
                            logins += 1
                    elif admin:
                        assert doc["metadata"]["name"] in ("mlflow", "mlflow-users"), f"{where}: gets {admin}"
        assert logins >= 6, f"{overlay}: only {logins} Ray containers log in to MLflow"

        (job,) = [d for d in of_kind(docs, "Job") if d["metadata"]["name"] == "mlflow-users"]
        spec = job["spec"]["template"]["spec"]
        assert spec["restartPolicy"] in ("OnFailure", "Never") and job["spec"]["backoffLimit"] >= 3
        (c,) = spec["containers"]
        assert split_image(c["image"])[0].rsplit("/", 1)[-1] == "aigc", c["image"]
        (mount,) = c["volumeMounts"]
        assert c["command"] == ["python", f"{mount['mountPath']}/init-users.py"]
        (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        source = configmaps[volume["configMap"]["name"]]
        assert source["init-users.py"] == script, (
            f"{overlay}: the ConfigMap {volume['configMap']['name']} is not mlflow/init-users.py: copy it "
            "(k8s/README.md, Least-privilege MLflow users)"
        )
        env = effective_env(c, configmaps)
        assert env["MLFLOW_TRACKING_URI"] == {
            "configMapKeyRef": {"name": "aigc-settings", "key": "MLFLOW_TRACKING_URI"}
        }
        expected = {
            "MLFLOW_AUTH_ADMIN_USERNAME": (SECRET, "mlflow-username"),
            "MLFLOW_AUTH_ADMIN_PASSWORD": (SECRET, "mlflow-password"),
            "AIGC_MLFLOW_JOB_USERNAME": (JOB_SECRET, "username"),
            "AIGC_MLFLOW_JOB_PASSWORD": (JOB_SECRET, "password"),
            "AIGC_MLFLOW_SERVING_USERNAME": (SERVING_SECRET, "username"),
            "AIGC_MLFLOW_SERVING_PASSWORD": (SERVING_SECRET, "password"),
        }
        for name, (secret, key) in expected.items():
            assert env[name]["secretKeyRef"] == {"name": secret, "key": key}, f"{overlay}: {name}"
        # Grants for what the RayJob logs to and what the RayService serves.
        assert experiment in env["AIGC_MLFLOW_EXPERIMENTS"].split(","), env["AIGC_MLFLOW_EXPERIMENTS"]
        assert served_model in env["AIGC_MLFLOW_MODELS"].split(","), env["AIGC_MLFLOW_MODELS"]
        for name in re.findall(r"\b(?:MLFLOW|AIGC)_[A-Z_]+\b", script.split('"""')[1]):
            if name.startswith(("AIGC_MLFLOW_", "MLFLOW_AUTH_ADMIN_", "MLFLOW_TRACKING_URI")):
                assert name in env or name == "AIGC_MLFLOW_WAIT_S", f"{overlay}: the Job sets no {name}"


def test_serving_workers_are_ready_on_the_proxys_healthz(rendered: Rendered) -> None:
    for overlay, docs in rendered.items():
        for doc in of_kind(docs, "RayService"):
            spec = doc["spec"]["rayClusterConfig"]
            for group in spec["workerGroupSpecs"]:
                (c,) = group["template"]["spec"]["containers"]
                probe = c["readinessProbe"]["httpGet"]
                # The proxy's own health route, not a route of the app (which a replica answers).
                assert probe == {"path": "/-/healthz", "port": 8000}, label(overlay, doc)
            # KubeRay deploys the Serve app only once the head pod is Ready: no app probe there.
            (head,) = spec["headGroupSpec"]["template"]["spec"]["containers"]
            assert "readinessProbe" not in head, f"{label(overlay, doc)}: a head probe on the app deadlocks"


def split_image(ref: str) -> tuple[str, str | None, str | None]:
    """(name, tag, digest) of an image reference; a registry's :port is part of the name."""
    name, _, digest = ref.partition("@")
    if ":" in name.rsplit("/", 1)[-1]:
        name, tag = name.rsplit(":", 1)
        return name, tag, digest or None
    return name, None, digest or None


def test_every_image_has_an_explicit_tag_and_a_place_to_pin_its_digest(rendered: Rendered) -> None:
    """No image floats: each has a tag other than `latest` (or a digest), and each is in its overlay's
    `images:` block, where k8s/README.md says to pin digests."""
    assert split_image("registry.example.com:5000/aigc:1.0@sha256:" + "0" * 64)[:2] == (
        "registry.example.com:5000/aigc",
        "1.0",
    )
    for overlay, docs in rendered.items():
        kustomization = yaml.safe_load(
            (ROOT / "k8s" / "overlays" / overlay / "kustomization.yaml").read_text()
        )
        listed = {i.get("newName", i["name"]) for i in kustomization["images"]}
        seen = set()
        for doc in docs:
            for template in pod_templates(doc):
                for c in containers(template):
                    where = f"{label(overlay, doc)} {c['name']}"
                    name, tag, digest = split_image(c["image"])
                    assert tag or digest, f"{where}: {c['image']} has no tag"
                    assert tag != "latest", f"{where}: {c['image']}"
                    assert digest is None or re.fullmatch(r"sha256:[0-9a-f]{64}", digest), where
                    assert name in listed, f"{where}: {name} is not in {overlay}/kustomization.yaml images"
                    seen.add(name)
        assert seen == listed, f"{overlay}: images listed but unused: {listed - seen}"


PULL_SECRETS = [{"name": "aigc-registry"}]


def without_pull_secrets(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: without_pull_secrets(v) for k, v in obj.items() if k != "imagePullSecrets"}
    if isinstance(obj, list):
        return [without_pull_secrets(v) for v in obj]
    return obj


def test_private_registry_example_gives_every_pod_of_the_gpu_overlay_its_pull_secret(
    rendered: Rendered,
) -> None:
    """k8s/examples/private-registry: the gpu overlay with imagePullSecrets on every pod spec, and
    nothing else changed; the overlays themselves name no pull secret (it is optional)."""
    kubectl = find_kubectl()
    assert kubectl
    docs = kustomize(kubectl, ROOT / "k8s" / "examples" / "private-registry")
    count = 0
    for doc in docs:
        for i, template in enumerate(pod_templates(doc)):
            assert template["spec"].get("imagePullSecrets") == PULL_SECRETS, (
                f"{label('example', doc)} pod {i}"
            )
            wrapped = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": "t"},
                "template": template,
            }
            kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)
            count += 1
    assert count >= 11
    assert without_pull_secrets(docs) == rendered["gpu"]
    for overlay, doc in all_docs(rendered):
        assert not find_key(doc, "imagePullSecrets"), f"{label(overlay, doc)}: a pull secret in an overlay"
    k8s_readme = (ROOT / "k8s" / "README.md").read_text(encoding="utf-8")
    assert "kubectl -n aigc create secret docker-registry aigc-registry" in k8s_readme


def allows_outside_namespace(rule: dict[str, Any]) -> list[dict[str, Any]]:
    """The peers of an ingress rule that are not 'a pod of this namespace' ([{}] for no `from`)."""
    peers = rule.get("from") or [{}]
    return [p for p in peers if set(p) != {"podSelector"}]


def test_network_policy_keeps_ray_ports_inside_the_namespace(rendered: Rendered) -> None:
    for overlay, docs in rendered.items():
        policies = of_kind(docs, "NetworkPolicy")
        ray_policies = [
            p
            for p in policies
            if not p["spec"]["podSelector"].get("matchExpressions")
            and all(k.startswith("ray.io/") for k in p["spec"]["podSelector"].get("matchLabels", {}))
        ]
        # One policy selects every Ray pod KubeRay makes (label ray.io/is-ray-node=yes) for ingress.
        assert any(
            p["spec"]["podSelector"] == {"matchLabels": {"ray.io/is-ray-node": "yes"}}
            and "Ingress" in p["spec"]["policyTypes"]
            for p in ray_policies
        ), f"{overlay}: no NetworkPolicy selects all Ray pods"
        for policy in ray_policies:
            for rule in policy["spec"].get("ingress", []):
                ports = {p.get("port") for p in rule.get("ports", [])} or set(RAY_PORTS)  # none: every port
                outside = allows_outside_namespace(rule)
                if not outside:
                    continue
                where = f"{overlay}: NetworkPolicy {policy['metadata']['name']}"
                assert not ports & {6379, 10001}, f"{where} opens GCS/client ports beyond the namespace"
                if 8265 in ports:
                    for peer in outside:  # only the KubeRay operator may reach the dashboard
                        assert peer.get("podSelector") == {
                            "matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}
                        }, f"{where} opens the dashboard beyond the namespace: {peer}"
        covered = {
            port
            for p in ray_policies
            for rule in p["spec"].get("ingress", [])
            if not allows_outside_namespace(rule)
            for port in ({q.get("port") for q in rule.get("ports", [])} or set(RAY_PORTS))
        }
        missing = set(RAY_PORTS) - covered
        assert not missing, f"{overlay}: {missing} not reachable from inside the namespace"


# ---------------------------------------------------------------------------------------------------
# the image and the cluster launcher


def test_dockerfile_builds_a_non_root_image_from_the_constraints() -> None:
    text = (ROOT / "platform" / "Dockerfile").read_text(encoding="utf-8")
    joined = re.sub(r"\\\n", " ", text).splitlines()  # continuation lines joined
    lines = [x.strip() for x in joined if x.strip() and not x.strip().startswith("#")]
    assert lines[0].startswith("ARG BASE_IMAGE=python:3.11-slim"), "first: ARG BASE_IMAGE=python:3.11-slim-*"
    assert "FROM ${BASE_IMAGE}" in lines
    assert any(x.startswith("ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu") for x in lines)
    installs = [x for x in lines if "pip install" in x]
    assert any("-c constraints.txt" in x and "'.[server,minilm,s3,lora,diffusers]'" in x for x in installs), (
        installs
    )
    assert all("-c constraints.txt" in x for x in installs if "install --upgrade pip" not in x), installs
    # One index per install: with --extra-index-url pip takes each package from whichever index
    # offers the higher version, so the torch index could shadow PyPI for any name.
    assert not any("--extra-index-url" in x for x in installs), installs
    torch_installs = [x for x in installs if "torch_pin" in x]
    assert torch_installs and all('--index-url "${TORCH_INDEX_URL}"' in x for x in torch_installs)
    users = [x.split()[1] for x in lines if x.startswith("USER ")]
    assert users and users[-1] not in ("root", "0", "0:0"), "the image must end as a non-root USER"
    assert any(re.search(r"useradd --uid \"?\$\{AIGC_UID\}", x) for x in lines)
    assert "ARG AIGC_UID=1000" in lines
    assert any(x.startswith("WORKDIR /app") for x in lines)
    for path in ("models/", "params.yaml", "mlflow/start-server.sh"):
        assert any(x.startswith("COPY") and path in x for x in lines), f"the image lacks {path}"
    assert any("AIGC_PROJECT_ROOT=/app" in x for x in lines)
    apt = " ".join(x for x in lines if "apt-get install" in x)
    for tool in ("bash", "wget", "rsync", "openssh-client"):  # KubeRay probes; ray up's docker runner
        assert re.search(rf"\b{tool}\b", apt), f"the image lacks {tool}"
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    assert ignored and "*" in ignored, ".dockerignore should let in only what the image copies"


def test_cluster_launcher_config_validates_against_rays_schema() -> None:
    spec = importlib.util.find_spec("ray")
    assert spec and spec.submodule_search_locations
    schema_path = Path(spec.submodule_search_locations[0]) / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    config = yaml.safe_load((ROOT / "platform" / "cluster.yaml").read_text(encoding="utf-8"))
    jsonschema.validate(config, schema)
    assert config["docker"]["image"].rsplit("/", 1)[-1].startswith("aigc:")
    assert config["head_node_type"] in config["available_node_types"]
    starts = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert "ray start --head" in starts and "--num-cpus=0" in starts
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert "~/.ray/auth_token" in config["file_mounts"]
