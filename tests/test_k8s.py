"""The KubeRay manifests, checked offline: each RayService against the v1 CRD schema (unknown
fields are errors except where the schema preserves them), its Serve config against Serve's own
schema and Tandem's config loader, and the resources it asks for against what its pods offer."""

from __future__ import annotations

import copy
import json
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
    assert {p.name for p in MANIFESTS} == {"rayservice-cpu.yaml", "rayservice-gpu.yaml"}


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
    assert 50051 in head_ports  # the head service exposes the router's gRPC port
    assert set(config.router.resources) <= set(_ray_resources(head))  # the router lands on the head
    workers = [_ray_resources(group) for group in cluster["workerGroupSpecs"]]
    target = config.target
    assert any(w["CPU"] >= target.tp * target.num_cpus and w["GPU"] >= target.tp * target.num_gpus for w in workers)
    assert any(w["CPU"] >= config.draft.num_cpus for w in workers)
