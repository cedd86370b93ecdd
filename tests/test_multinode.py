"""A real multi-node Ray cluster on this machine (a head and two worker nodes, each its own raylet,
from ``ray.cluster_utils``): the pools land where the placement settings say, losing the node
under a target replica loses no session (they resume on the other node's replica), and the
worker streams run over mutual TLS (a peer without the CA's certificate is refused)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cluster.config import ClusterConfig
from tests.cluster_helpers import (
    PROMPTS,
    Stream,
    config_for,
    engine_outputs,
    free_port,
    make_certificates,
    one_torch_thread,  # noqa: F401 - autouse
    replica_actors,
    running,
    tiny_target,
    wait_for,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

LONG = 600


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_target(tmp_path_factory.mktemp("multinode") / "tiny")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[object]:
    """The head holds the router and the draft pool ("head"); two nodes offer "target"."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"head": 1}})
    cluster.target_nodes = [cluster.add_node(num_cpus=1, resources={"target": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_certificates(tmp_path_factory.mktemp("internal-tls"))


@pytest.fixture(scope="module")
def config(model: Path, ray_cluster: object, certificates: dict[str, Path]) -> ClusterConfig:
    head = {"resources": {"head": 0.1}}
    tls = {"cert_file": "server", "key_file": "server_key", "ca_file": "ca"}
    return config_for(
        model,
        free_port(),
        internal_tls={**{key: str(certificates[name]) for key, name in tls.items()}, "server_name": "localhost"},
        ray={"address": ray_cluster.address},
        router={**head, "resume_timeout_s": 120.0},
        draft=head,
        target={"num_replicas": 2, "max_replicas_per_node": 1, "resources": {"target": 0.1}, "schedule": False},
    )


@pytest.fixture(scope="module")
def channel(config: ClusterConfig) -> Iterator[grpc.Channel]:
    with running(config) as channel:
        yield channel


def _replica_nodes(deployment: str) -> list[str]:
    """The node id of each of the deployment's replicas, asked of the replica process itself."""
    import ray

    def node_id(_: object) -> str:  # runs inside the replica
        return ray.get_runtime_context().get_node_id()

    return ray.get([replica.__ray_call__.remote(node_id) for replica in replica_actors(deployment)], timeout=30)


def test_the_pools_spread_over_the_nodes_as_configured(channel: grpc.Channel, ray_cluster: object) -> None:
    head = ray_cluster.head_node.node_id
    targets = {node.node_id for node in ray_cluster.target_nodes}
    assert _replica_nodes("Router") == [head] and _replica_nodes("Draft") == [head]
    assert set(_replica_nodes("Target")) == targets  # one replica on each target node


def test_losing_a_target_node_loses_no_session(channel: grpc.Channel, ray_cluster: object, model: Path) -> None:
    prompts = [PROMPTS[i % len(PROMPTS)] + [i] for i in range(6)]
    expected = engine_outputs(model, [(p, LONG) for p in prompts], ignore_eos=True)
    streams = [Stream(channel, p, LONG) for p in prompts]
    wait_for(lambda: all(s.started() for s in streams), 60, "every stream to start")
    ray_cluster.remove_node(ray_cluster.target_nodes[0], allow_graceful=False)
    assert [s.result() for s in streams] == expected
    assert sum(s.finished.usage.target_resumes for s in streams) >= 1  # the lost node held sessions


@pytest.mark.parametrize("pool", ["Draft", "Target"])
def test_workers_refuse_peers_without_the_internal_certificate(
    channel: grpc.Channel, certificates: dict[str, Path], pool: str
) -> None:
    from ray import serve

    from cluster.app import APP_NAME
    from tandem_proto.v1 import worker_pb2, worker_pb2_grpc

    placement = serve.get_deployment_handle(pool, app_name=APP_NAME).options(stream=True).session.remote("probe")
    address = next(iter(placement))  # the replica's gRPC address
    placement.cancel()
    ca = certificates["ca"].read_bytes()
    stub = worker_pb2_grpc.DraftStub if pool == "Draft" else worker_pb2_grpc.VerifyStub
    message = worker_pb2.DraftIn() if pool == "Draft" else worker_pb2.VerifyIn()
    server_name = [("grpc.ssl_target_name_override", "localhost")]
    key, cert = certificates["server_key"].read_bytes(), certificates["server"].read_bytes()
    member = grpc.ssl_channel_credentials(ca, key, cert)  # the cluster's own certificate
    stranger = grpc.ssl_channel_credentials(ca)  # trusts the worker, shows no certificate of its own
    for peer, code in (
        (grpc.insecure_channel(address), grpc.StatusCode.UNAVAILABLE),  # plain text
        (grpc.secure_channel(address, stranger, options=server_name), grpc.StatusCode.UNAVAILABLE),
        # the cluster's own certificate gets through, to the worker's refusal of a stream without an opening
        (grpc.secure_channel(address, member, options=server_name), grpc.StatusCode.INVALID_ARGUMENT),
    ):
        with peer, pytest.raises(grpc.RpcError) as refused:
            list(stub(peer).Session(iter([message]), timeout=30))
        assert refused.value.code() == code
