"""The wire format and the cluster config, without Ray: what crosses gRPC comes back unchanged,
and the generated stubs match proto/."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cluster.config import ConfigError, load_config
from tandem.errors import InvalidRequest
from tandem.sampling import SamplingParams
from tandem.tree import TokenTree
from tandem.verifier import Step
from tandem_proto.v1 import api_pb2, worker_pb2, worker_pb2_grpc
from workers.wire import (
    params_from_proto,
    params_to_proto,
    step_from_proto,
    step_to_proto,
    tensor_from_proto,
    tensor_to_proto,
    tree_from_proto,
    tree_to_proto,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_tensors_cross_the_wire_bit_for_bit(dtype: torch.dtype) -> None:
    tensor = (torch.randn(3, 5) * 100).to(dtype)
    back = tensor_from_proto(worker_pb2.Tensor.FromString(tensor_to_proto(tensor).SerializeToString()))
    assert back.dtype == dtype and torch.equal(back, tensor)
    assert tensor_from_proto(worker_pb2.Tensor()) is None
    assert tensor_from_proto(tensor_to_proto(torch.zeros(0, 4))).shape == (0, 4)


def test_trees_and_steps_round_trip() -> None:
    probs = torch.softmax(torch.randn(4, 10), -1)
    tree = TokenTree(torch.tensor([5, 1, 2, 3]), torch.tensor([-1, 0, 0, 1]), probs)
    back = tree_from_proto(tree_to_proto(tree))
    assert (back.tokens, back.parents) == (tree.tokens, tree.parents)
    assert torch.equal(back.draft_probs, probs)
    assert tree_from_proto(tree_to_proto(TokenTree(torch.tensor([5]), torch.tensor([-1])))).draft_probs is None
    step = Step([4, 9], 1, torch.randn(2, 6).bfloat16())
    msg = step_to_proto(step, room=7, capacity=64)
    assert (msg.room, msg.capacity) == (7, 64)
    back_step = step_from_proto(msg)
    assert back_step.tokens == step.tokens and back_step.accepted == 1
    assert back_step.features is None  # features go to the draft replica (tests/test_feature_plane.py)


def test_q_travels_over_its_support_bit_for_bit() -> None:
    """A drafter's q over a reduced vocabulary (8 of 100 ids here) crosses as those columns and
    their ids, and comes back as the same dense tensor; a q over most of the vocabulary stays dense."""
    vocab = torch.tensor([3, 7, 11, 20, 21, 50, 64, 99])
    sparse = torch.zeros(5, 100).index_copy_(1, vocab, torch.softmax(torch.randn(5, 8), -1))
    sparse[0] = 0  # the anchor's row is unused
    sparse[2, 64] = 0  # a column one node leaves out is still sent for the others
    tree = TokenTree(torch.tensor([5, 3, 7, 11, 20]), torch.tensor([-1, 0, 0, 1, 1]), sparse)
    msg = worker_pb2.Tree.FromString(tree_to_proto(tree).SerializeToString())
    assert msg.vocab_size == 100 and list(tensor_from_proto(msg.draft_support)) == vocab.tolist()
    back = tree_from_proto(msg)
    assert back.draft_probs.shape == (5, 100) and torch.equal(back.draft_probs, sparse)
    dense_tree = TokenTree(tree.tokens, tree.parents, torch.softmax(torch.randn(5, 100), -1))
    dense = tree_to_proto(dense_tree)
    assert not dense.HasField("draft_support") and len(msg.SerializeToString()) < len(dense.SerializeToString()) / 5
    assert torch.equal(tree_from_proto(dense).draft_probs, dense_tree.draft_probs)
    msg.draft_support.CopyFrom(tensor_to_proto(vocab[:5].to(torch.int32)))
    with pytest.raises(ValueError, match="draft_support does not match"):
        tree_from_proto(msg)


def test_sampling_params_defaults_and_validation() -> None:
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, max_tokens=9, seed=3, stop=("x",), ignore_eos=True)
    assert params_from_proto(params_to_proto(params)) == params
    assert params_from_proto(api_pb2.SamplingParams()) == SamplingParams()  # unset fields: the defaults
    for bad in (api_pb2.SamplingParams(max_tokens=0), api_pb2.SamplingParams(top_p=0.0)):
        with pytest.raises(InvalidRequest):
            params_from_proto(bad)


def test_generated_stubs_carry_the_services() -> None:
    services = api_pb2.DESCRIPTOR.services_by_name
    assert [m.name for m in services["Tandem"].methods] == ["Generate", "Abort"]
    assert hasattr(worker_pb2_grpc, "DraftStub") and hasattr(worker_pb2_grpc, "VerifyStub")


def test_config_rejects_unknown_keys_and_fills_defaults(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("target: {tp: 2, num_cpus: 0.5}\ndraft: {drafter: none}\n")
    config = load_config(path, address="127.0.0.1:1")
    assert config.target.tp == 2 and not config.has_draft_pool
    assert config.address == "127.0.0.1:1" and config.model == "smollm2-135m-instruct"
    assert config.target.serve_options(config.grace_period_s)["num_replicas"] == 1
    path.write_text("target: {tpp: 2}\n")
    with pytest.raises(ConfigError, match="unknown keys in config.target: tpp"):
        load_config(path)


@pytest.mark.parametrize(
    "target,threads",
    [
        ({"num_cpus": 0.5}, None),  # one replica: the node's cores / tp, resolved in the rank
        ({"num_cpus": 0.5, "num_replicas": 2}, 1),  # replicas may share a node: the CPU share
        ({"num_cpus": 2.5, "autoscaling_config": {"max_replicas": 4}}, 2),
        ({"num_cpus": 0.5, "autoscaling_config": {"max_replicas": 4}, "max_replicas_per_node": 1}, None),
        ({"num_cpus": 1, "num_gpus": 1}, 1),  # a GPU rank needs no cores of its own
        ({"num_cpus": 0.5, "num_replicas": 2, "torch_threads": 3}, 3),
    ],
)
def test_target_threads_use_the_machine_where_the_replica_is_alone(target: dict, threads: int | None) -> None:
    assert load_config(None, target=target).target.threads == threads


def test_the_local_config_loads_and_gives_the_target_every_core() -> None:
    config = load_config(Path(__file__).parents[1] / "configs" / "local.yaml")
    assert config.target.threads is None and config.router.num_replicas == 2
