"""Tandem objects <-> protobuf messages: tensors as raw bytes, token trees, sampling params, steps."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from tandem.devices import HOST
from tandem.errors import InvalidRequest
from tandem.sampling import SamplingParams
from tandem.tree import TokenTree
from tandem.verifier import Step
from tandem_proto.v1 import api_pb2, worker_pb2

# Features of a long prompt run to megabytes (sent in chunks of a sixteenth of this, see
# workers/features.py) and dense q to more; gRPC's 4 MiB default is too small between pools.
MAX_MESSAGE_BYTES = 256 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
DEFAULT_MAX_TOKENS = SamplingParams().max_tokens


def raw_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as uint8, in its shape (the last dimension times the element size): a
    view of a contiguous host tensor, so no torch kernel runs."""
    return tensor.detach().cpu().contiguous().view(torch.uint8).numpy()


def tensor_proto(data: bytes, dtype: torch.dtype, shape: Sequence[int]) -> worker_pb2.Tensor:
    return worker_pb2.Tensor(data=data, dtype=str(dtype).removeprefix("torch."), shape=list(shape))


def tensor_to_proto(tensor: torch.Tensor | None) -> worker_pb2.Tensor | None:
    if tensor is None:
        return None
    return tensor_proto(raw_bytes(tensor).tobytes(), tensor.dtype, tensor.shape)


def tensor_from_proto(msg: worker_pb2.Tensor) -> torch.Tensor | None:
    """``None`` for an empty message (proto3 cannot tell it from an absent one)."""
    if not msg.dtype:
        return None
    dtype = getattr(torch, msg.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown tensor dtype {msg.dtype!r}")
    raw = (
        torch.frombuffer(bytearray(msg.data), dtype=torch.uint8)
        if msg.data
        else torch.empty(0, dtype=torch.uint8, device=HOST)
    )
    return raw.view(dtype).reshape(tuple(msg.shape))


def tree_to_proto(tree: TokenTree) -> worker_pb2.Tree:
    """``q`` travels over its support alone (the token ids some node gives a probability), when
    that is at most half the vocabulary: the same numbers, a fraction of the bytes."""
    msg = worker_pb2.Tree(tokens=tree.tokens, parents=tree.parents, survival=tree.survival or [])
    q = tree.draft_probs
    if q is not None:
        support = q.ne(0).any(dim=0).nonzero().flatten()
        if 2 * len(support) <= q.shape[1]:
            msg.draft_support.CopyFrom(tensor_to_proto(support.to(torch.int32)))
            msg.vocab_size = q.shape[1]
            q = q[:, support]
        msg.draft_probs.CopyFrom(tensor_to_proto(q))
    return msg


def tree_from_proto(msg: worker_pb2.Tree) -> TokenTree:
    q = tensor_from_proto(msg.draft_probs)
    support = tensor_from_proto(msg.draft_support)
    if q is not None and support is not None:
        if support.dim() != 1 or len(support) != q.shape[1] or msg.vocab_size < len(support):
            raise ValueError("draft_support does not match draft_probs")
        dense = torch.zeros(q.shape[0], msg.vocab_size, dtype=q.dtype, device=q.device)
        q = dense.index_copy_(1, support.long(), q)
    return TokenTree(
        tokens=tuple(msg.tokens),
        parents=tuple(msg.parents),
        draft_probs=q,
        survival=tuple(msg.survival) if msg.survival else None,
    )


def params_to_proto(params: SamplingParams) -> api_pb2.SamplingParams:
    return api_pb2.SamplingParams(
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        max_tokens=params.max_tokens,
        seed=params.seed,
        stop=list(params.stop),
        stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
    )


def params_from_proto(msg: api_pb2.SamplingParams) -> SamplingParams:
    """Unset optional fields take SamplingParams' defaults; bad values raise InvalidRequest."""
    if any(t < 0 for t in msg.stop_token_ids):
        raise InvalidRequest("stop token ids must be >= 0")
    return SamplingParams(
        temperature=msg.temperature,
        top_k=msg.top_k,
        top_p=msg.top_p if msg.HasField("top_p") else 1.0,
        max_tokens=msg.max_tokens if msg.HasField("max_tokens") else DEFAULT_MAX_TOKENS,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=tuple(msg.stop),
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
    )


def step_to_proto(step: Step, room: int, capacity: int) -> worker_pb2.VerifyOut:
    """The verdict for the router; the step's features go to the draft replica (workers/features.py)."""
    return worker_pb2.VerifyOut(
        tokens=step.tokens,
        accepted=step.accepted,
        room=room,
        capacity=capacity,
        cached_tokens=step.cached_tokens,
        kv_blocks=step.kv_blocks,
    )


def step_from_proto(msg: worker_pb2.VerifyOut) -> Step:
    return Step(list(msg.tokens), msg.accepted, None, msg.cached_tokens, msg.kv_blocks)
