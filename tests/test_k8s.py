"""The KubeRay manifests, checked offline: each RayService against the v1 CRD schema (unknown
fields are errors except where the schema preserves them), its Serve config against Serve's own
schema and Tandem's config loader, and the resources it asks for against what its pods offer."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from cluster.app import build
from cluster.config import ClusterConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
CRDS = ROOT / "k8s" / "crds"  # vendored from KubeRay v1.7.0 (see its README)
MANIFESTS = sorted((ROOT / "k8s").glob("rayservice-*.yaml"))


def _strict(schema: Any) -> Any:
    """OpenAPI v3 -> JSON Schema that rejects fields the CRD does not declare."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        closed = "properties" in schema and "additionalProperties" not in schema
        if closed and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def rayservice_schema() -> dict:
    path = CRDS / "ray.io_rayservices.yaml"
    crd = yaml.safe_load(path.read_text())
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))


def _serve_config(manifest: dict) -> dict:
    return yaml.safe_load(manifest["spec"]["serveConfigV2"])


def _tandem_config(manifest: dict) -> ClusterConfig:
    [app] = _serve_config(manifest)["applications"]
    return load_config(None, **app["args"])


def _ray_resources(group: dict) -> dict[str, float]:
    params = group["rayStartParams"]
    resources = {"CPU": float(params.get("num-cpus", 0)), "GPU": float(params.get("num-gpus", 0))}
    if "resources" in params:
        resources.update(json.loads(json.loads(params["resources"])))
    return resources


def test_there_are_cpu_and_gpu_manifests() -> None:
    assert {p.name for p in MANIFESTS} == {"rayservice-cpu.yaml", "rayservice-gpu.yaml", "rayservice-gpu-tp8.yaml"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_manifest_matches_the_crd(path: Path, rayservice_schema: dict) -> None:
    [manifest] = list(yaml.safe_load_all(path.read_text()))
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    jsonschema.validate(manifest, rayservice_schema)


def test_unknown_fields_are_rejected(rayservice_schema: dict) -> None:
    manifest = yaml.safe_load(MANIFESTS[0].read_text())
    manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParms"] = {}
    with pytest.raises(jsonschema.ValidationError, match="rayStartParms"):
        jsonschema.validate(manifest, rayservice_schema)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_serve_config_builds_the_tandem_app(path: Path) -> None:
    from ray.serve.schema import ServeDeploySchema

    manifest = yaml.safe_load(path.read_text())
    serve_config = ServeDeploySchema.model_validate(_serve_config(manifest))
    [app] = serve_config.applications
    assert app.import_path == "cluster.app:build"
    build(app.args)  # the builder Serve will call accepts these args (no Ray needed to build)
    config = _tandem_config(manifest)
    assert config.address.endswith(":50051") and config.worker_host == "0.0.0.0"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_pods_offer_what_the_deployments_ask(path: Path) -> None:
    manifest = yaml.safe_load(path.read_text())
    config = _tandem_config(manifest)
    cluster = manifest["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    head_ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert {50051, 8000} <= head_ports  # the router's gRPC port and Serve's HTTP proxy
    assert set(config.router.resources) <= set(_ray_resources(head))  # the router lands on the head
    workers = [_ray_resources(group) for group in cluster["workerGroupSpecs"]]
    target = config.target
    assert any(w["CPU"] >= target.tp * target.num_cpus and w["GPU"] >= target.tp * target.num_gpus for w in workers)
    assert any(w["CPU"] >= config.draft.num_cpus for w in workers)


def test_the_image_pins_torch_for_cpu_and_gpu() -> None:
    """Every build of the image installs the torch version the project is tested with: the GPU
    build changes only the wheel index, never the version (an unpinned torch drifts)."""
    dockerfile = (ROOT / "k8s" / "Dockerfile").read_text()
    pins = re.findall(r"^ARG TORCH_VERSION=(\S+)$", dockerfile, re.M)
    assert pins == ["2.13.0"]
    installs = [line for line in dockerfile.splitlines() if "pip install" in line and "torch" in line]
    assert installs and all('"torch==${TORCH_VERSION}"' in line for line in installs)
    assert "--build-arg TORCH=" not in dockerfile


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_probes_service_and_drain_match_the_config(path: Path) -> None:
    """Readiness is the router's /health (503 while draining), liveness its gRPC health; the serve
    Service carries both APIs; the preStop drain and the pods' grace period cover grace_period_s."""
    from cluster.app import ROUTER_STOP_S

    manifest = yaml.safe_load(path.read_text())
    config = _tandem_config(manifest)
    serve_config = _serve_config(manifest)
    assert serve_config["proxy_location"] == "HeadOnly" and serve_config["http_options"]["port"] == 8000
    assert serve_config["applications"][0]["route_prefix"] == "/"
    service_ports = {p["port"] for p in manifest["spec"]["serveService"]["spec"]["ports"]}
    assert service_ports == {8000, int(config.address.rsplit(":", 1)[1])}
    cluster = manifest["spec"]["rayClusterConfig"]
    [head] = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert head["readinessProbe"]["httpGet"] == {"path": "/health", "port": 8000}
    assert head["livenessProbe"]["grpc"] == {"port": 50051}
    drain = head["lifecycle"]["preStop"]["exec"]["command"]
    assert drain[:2] == ["tandem", "drain"] and float(drain[drain.index("--grace-period") + 1]) == config.grace_period_s
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    for pod in pods:
        assert pod["template"]["spec"]["terminationGracePeriodSeconds"] >= config.grace_period_s + ROUTER_STOP_S
    assert manifest["spec"]["rayClusterDeletionDelaySeconds"] >= config.grace_period_s + ROUTER_STOP_S


# The fields of a KubeRay v1 RayJob's spec (ray-project/kuberay, ray-operator/apis/ray/v1/rayjob_types.go);
# its rayClusterSpec is the same RayClusterSpec type a RayService's rayClusterConfig is.
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
    "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
    "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes", "submissionMode", "submitterConfig",
    "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished",
}  # fmt: skip
RAYJOB = ROOT / "k8s" / "rayjob-train-gpu.yaml"


def _train_args(manifest: dict):
    import shlex

    from tandem.cli import build_parser

    argv = shlex.split(manifest["spec"]["entrypoint"])
    assert argv[:2] == ["tandem", "train"]
    return build_parser().parse_args(argv[1:])


def test_the_training_rayjob_matches_the_crd(rayservice_schema: dict) -> None:
    manifest = yaml.safe_load(RAYJOB.read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    assert set(manifest["spec"]) <= RAYJOB_SPEC_FIELDS, set(manifest["spec"]) - RAYJOB_SPEC_FIELDS
    cluster_schema = rayservice_schema["properties"]["spec"]["properties"]["rayClusterConfig"]
    jsonschema.validate(manifest["spec"]["rayClusterSpec"], cluster_schema)
    broken = copy.deepcopy(manifest["spec"]["rayClusterSpec"])
    broken["workerGroupSpecs"][0]["rayStartParms"] = {}
    with pytest.raises(jsonschema.ValidationError, match="rayStartParms"):
        jsonschema.validate(broken, cluster_schema)


def test_the_training_rayjob_runs_tandem_train_on_what_its_pods_offer() -> None:
    """The entrypoint is a valid ``tandem train --workers N`` command line; the GPU workers hold N
    workers of the asked size (none on the head); every path it names lies on the volume that every
    pod mounts, so checkpoints survive a pod and a replaced worker finds them."""
    manifest = yaml.safe_load(RAYJOB.read_text())
    args = _train_args(manifest)
    assert args.workers >= 2 and args.gpus_per_worker == 1 and args.features == "online"
    cluster = manifest["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert _ray_resources(head)["CPU"] == 0
    slots = 0
    for group in cluster["workerGroupSpecs"]:
        offer = _ray_resources(group)
        per_pod = min(offer["GPU"] // args.gpus_per_worker, offer["CPU"] // args.cpus_per_worker)
        slots += int(per_pod) * group["minReplicas"]
        [container] = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == str(int(offer["GPU"]))
    assert slots >= args.workers
    for pod in [head, *cluster["workerGroupSpecs"]]:
        spec = pod["template"]["spec"]
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v
        }
        mounts = {m["mountPath"]: claims.get(m["name"]) for m in spec["containers"][0]["volumeMounts"]}
        for path in (args.model, args.data, args.out, args.storage):
            assert any(path.startswith(mount + "/") and claim for mount, claim in mounts.items()), path
