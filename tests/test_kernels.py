"""The batch-invariant bf16 CPU kernels (tandem/kernels): right against float32 references, and
bit-identical for a row whatever shares its call; then the exact mode end to end, where
speculative bf16 output equals plain bf16 decoding token for token."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from tandem.drafters import NgramDrafter, make_drafter
from tandem.engine import Engine
from tandem.kernels.cpu import KernelUnavailable, exact_kernels
from tandem.models.exact import apply_exact
from tandem.models.loading import load_model
from tandem.sampling import SamplingParams
from tandem.target import load_target
from tests.test_engine import OracleDrafter, _benchmark_prompts, _outputs
from tests.tiny_models import FAMILIES, build_tiny

try:
    KERNELS = exact_kernels()
except KernelUnavailable as exc:  # not x86 with AVX2, or no C compiler
    pytest.skip(f"exact kernels unavailable: {exc}", allow_module_level=True)


def _bf16(*shape: int, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).bfloat16()


@pytest.mark.parametrize(("n", "k", "bias"), [(48, 64, False), (37, 50, True), (1000, 576, False)])
def test_linear_matches_float32_and_is_row_invariant(n, k, bias):
    w, x = _bf16(n, k, seed=1), _bf16(13, k, seed=2)
    b = _bf16(n, seed=3) if bias else None
    packed = KERNELS.pack(w)
    out = KERNELS.linear(x, packed, n, b, torch.float32)
    ref = x.float() @ w.float().T + (b.float() if bias else 0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(KERNELS.linear(x, packed, n, b, torch.bfloat16), ref.bfloat16(), rtol=1e-2, atol=1e-2)
    for m in range(1, 13):  # every tile shape: alone, or at any place in a larger call
        assert torch.equal(KERNELS.linear(x[:m], packed, n, b, torch.float32), out[:m])
    assert torch.equal(KERNELS.linear(x[7:8], packed, n, b, torch.float32), out[7:8])


def test_linear_does_not_depend_on_the_thread_count():
    w, x = _bf16(300, 96, seed=4), _bf16(5, 96, seed=5)
    packed = KERNELS.pack(w)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = KERNELS.linear(x, packed, 300, None, torch.float32)
        torch.set_num_threads(2)
        two = KERNELS.linear(x, packed, 300, None, torch.float32)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def _cache(rows: int, kv_heads: int, cap: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _bf16(rows, kv_heads, cap, dim, seed=seed), _bf16(rows, kv_heads, cap, dim, seed=seed + 1)


def test_attention_matches_sdpa_with_gqa_and_a_tree_mask():
    batch, heads, kv_heads, steps, dim, cap, length = 2, 4, 2, 5, 16, 40, 30
    keys, values = _cache(3, kv_heads, cap, dim, seed=6)
    q = _bf16(batch, heads, steps, dim, seed=8)
    row_ids = torch.tensor([2, 0])
    g = torch.Generator().manual_seed(9)
    mask = torch.rand(batch, steps, length, generator=g) < 0.6
    mask[:, :, 0] = True  # every query sees at least one key
    out = KERNELS.attention(q, keys, values, row_ids, mask, 0.3)
    ref = F.scaled_dot_product_attention(
        q.float(),
        keys[row_ids, :, :length].float(),
        values[row_ids, :, :length].float(),
        attn_mask=mask[:, None],
        scale=0.3,
        enable_gqa=True,
    )
    torch.testing.assert_close(
        out.float(), ref.transpose(1, 2).reshape(batch, steps, heads * dim), atol=2e-2, rtol=2e-2
    )


def test_attention_of_a_query_depends_only_on_the_keys_it_sees():
    """The same query against the same visible keys: alone over a short prefix, or inside a wide
    tree pass with other queries and hidden slots in between (as plain decoding vs verification)."""
    heads, kv_heads, dim, cap = 2, 1, 16, 64
    keys, values = _cache(1, kv_heads, cap, dim, seed=10)
    q = _bf16(1, heads, 6, dim, seed=12)
    wide = torch.zeros(1, 6, 50, dtype=torch.bool)
    wide[0, :, :40] = True
    wide[0, 3, 41:45] = True  # query 3 also sees slots 41-44; the others see only the prefix
    wide[0, 3, 42] = False
    alone = torch.zeros(1, 1, 45, dtype=torch.bool)
    alone[0, 0, :40] = True
    alone[0, 0, [41, 43, 44]] = True
    both = KERNELS.attention(q, keys, values, torch.tensor([0]), wide, 0.25)
    single = KERNELS.attention(q[:, :, 3:4].contiguous(), keys, values, torch.tensor([0]), alone, 0.25)
    assert torch.equal(both[:, 3], single[:, 0])


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_matches_float32_and_is_row_invariant(offset):
    x, w = _bf16(9, 100, scale=3.0, seed=13), _bf16(100, scale=0.3, seed=14)
    out = KERNELS.rms_norm(x, w, 1e-6, offset)
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    ref = normed * (offset + w.float()) if offset else w.float() * normed.bfloat16().float()
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)
    assert torch.equal(KERNELS.rms_norm(x[4:5], w, 1e-6, offset), out[4:5])


@pytest.mark.parametrize("gelu", [False, True])
def test_gated_activation_matches_float32_and_is_row_invariant(gelu):
    gate_up = _bf16(7, 2 * 45, scale=4.0, seed=15)  # 45: the tail goes through the vector code
    out = KERNELS.act_mul(gate_up, gelu)
    gate, up = gate_up.float().split(45, dim=-1)
    act = F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)
    torch.testing.assert_close(out.float(), act * up, rtol=2e-2, atol=2e-2)
    assert torch.equal(KERNELS.act_mul(gate_up[3:4], gelu), out[3:4])


# --- the exact mode end to end ---------------------------------------------------------------


@pytest.fixture(scope="module", params=FAMILIES)
def tiny_bf16(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"exact-{request.param}")
    build_tiny(request.param, folder, vocab=64)
    model, _ = load_model(folder, torch.bfloat16)
    assert apply_exact(model, True)
    return model


@pytest.mark.parametrize("batch", [1, 4])
def test_bf16_speculation_equals_plain_decoding_on_tiny_models(tiny_bf16, batch):
    """Tiny random bf16 models are full of near-ties: the stock kernels break this test."""
    rng = random.Random(batch)
    prompts = [[rng.randrange(64) for _ in range(rng.randint(3, 30))] for _ in range(16)]
    params = SamplingParams(max_tokens=24)
    plain = _outputs(Engine(tiny_bf16), prompts, params, batch=1)
    engine = Engine(tiny_bf16, NgramDrafter(depth=3, branches=3), max_draft_nodes=8)
    assert _outputs(engine, prompts, params, batch) == plain
    for start in range(0, len(prompts), batch):
        group = prompts[start : start + batch]
        refs = [p + plain[start + i] for i, p in enumerate(group)]
        engine = Engine(tiny_bf16, OracleDrafter(refs, seed=start), max_draft_nodes=8)
        assert _outputs(engine, group, params, batch) == plain[start : start + batch]


def test_exact_mode_is_refused_where_it_cannot_run(tmp_path):
    build_tiny("llama", tmp_path, vocab=64)
    model, _ = load_model(tmp_path, torch.float32)
    with pytest.raises(KernelUnavailable, match="bf16 model on the CPU"):
        apply_exact(model, True)
    assert apply_exact(model, None) is False  # auto: float32 keeps the stock kernels
    assert not model.exact


@pytest.fixture(scope="module")
def smollm_bf16():
    target = load_target("smollm2-135m-instruct", "bfloat16")  # auto: exact on this CPU
    assert target.model.exact
    tok = target.tokenizer
    prompts = [tok.encode(p, chat=True) for p in _benchmark_prompts(5)]
    params = SamplingParams(max_tokens=48)
    plain = _outputs(Engine(target.model, eos_token_ids=target.eos_token_ids), prompts, params, batch=1)
    return target, prompts, params, plain


@pytest.mark.slow
@pytest.mark.parametrize(("drafter", "batch"), [("ngram-tree", 4), ("dspark:4,6,16", 1)])
def test_real_model_bf16_speculation_equals_plain_decoding(smollm_bf16, drafter, batch):
    """In bf16 with the stock kernels, 11 of these 20 outputs differ from plain decoding at batch 1
    and 15 at batch 4 (near-ties); the exact kernels make them equal."""
    target, prompts, params, plain = smollm_bf16
    spec = make_drafter(drafter, target.model, "smollm2-135m-instruct")
    engine = Engine(target.model, spec, target.eos_token_ids, max_draft_nodes=16)
    assert _outputs(engine, prompts, params, batch) == plain
