"""The batch-invariant CPU kernels (tandem/kernels), in bf16 and float32: right against float32
references, and bit-identical for a row whatever shares its call; then the exact mode end to end,
where speculative output equals plain decoding token for token in either dtype."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from tandem.drafters import NgramDrafter, make_drafter
from tandem.engine import Engine
from tandem.kernels.cpu import AVX512, KernelUnavailable, _cpu_flags, exact_kernels
from tandem.models.decoder import apply_rotary
from tandem.models.exact import apply_exact
from tandem.models.loading import load_model
from tandem.sampling import SamplingParams
from tandem.target import load_target
from tandem.tree import ancestor_mask, tree_depths
from tandem.verifier import PREFILL_PASS_TOKENS, Verifier, prefill_groups
from tests.test_engine import OracleDrafter, _benchmark_prompts, _outputs
from tests.tiny_models import FAMILIES, build_tiny

try:
    KERNELS = exact_kernels()
except KernelUnavailable as exc:  # not x86 with AVX2, or no C compiler
    pytest.skip(f"exact kernels unavailable: {exc}", allow_module_level=True)


DTYPES = [torch.bfloat16, torch.float32]
ISAS = ["avx2", *(["avx512"] if AVX512 <= _cpu_flags() else [])]  # the linear tiles this CPU can run
TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-4}  # of a kernel's stored output vs float32 math


def _rand(*shape: int, scale: float = 1.0, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k", "bias"), [(48, 64, False), (37, 51, True), (1000, 576, False)])
def test_linear_matches_float32_and_is_row_invariant(n, k, bias, dtype, isa):
    kernels = exact_kernels(isa)
    w, x = _rand(n, k, seed=1, dtype=dtype), _rand(19, k, seed=2, dtype=dtype)
    b = _rand(n, seed=3, dtype=dtype) if bias else None
    packed = kernels.pack(w)
    out = kernels.linear(x, packed, n, b, torch.float32)
    ref = x.float() @ w.float().T + (b.float() if bias else 0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    stored = kernels.linear(x, packed, n, b, dtype)
    assert stored.dtype == dtype
    torch.testing.assert_close(stored, ref.to(dtype), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    for m in range(1, 19):  # every tile shape (AVX2: 6 rows, AVX-512: 16): alone, or inside a larger call
        assert torch.equal(kernels.linear(x[:m], packed, n, b, torch.float32), out[:m])
    assert torch.equal(kernels.linear(x[17:18], packed, n, b, torch.float32), out[17:18])


def test_linear_does_not_depend_on_the_thread_count():
    w, x = _rand(300, 96, seed=4), _rand(5, 96, seed=5)
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


def _paged(
    rows: int, kv_heads: int, cap: int, dim: int, seed: int, dtype: torch.dtype = torch.bfloat16, block: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random paged cache: keys and values ``[blocks, Hkv, block, D]`` and each row's table
    ``[rows, cap / block]``, its blocks scattered through the pool out of order."""
    n = rows * cap // block
    keys, values = (_rand(n, kv_heads, block, dim, seed=seed + i, dtype=dtype) for i in range(2))
    tables = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).view(rows, -1)
    return keys, values, tables


def _dense(pool: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """The rows' positions in order: ``[rows, Hkv, cap, D]``."""
    return pool[tables].transpose(1, 2).flatten(2, 3)


def _rope(batch: int, steps: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos/sin ``[B, T, D]`` shaped like the model's tables (two equal halves)."""
    angles = _rand(batch, steps, dim // 2, scale=3.0, seed=seed, dtype=torch.float32).repeat(1, 1, 2)
    return angles.cos(), angles.sin()


def _new_tokens(batch, steps, heads, kv_heads, dim, seed, dtype):
    """q ``[B, T, H, D]``, k and v ``[B, T, Hkv, D]``: views into one fused projection, as in the model."""
    fused = _rand(batch, steps, (heads + 2 * kv_heads) * dim, seed=seed, dtype=dtype)
    q, k, v = fused.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    return q.view(batch, steps, heads, dim), k.view(batch, steps, kv_heads, dim), v.view(batch, steps, kv_heads, dim)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_attention_matches_sdpa_with_gqa_a_tree_and_a_window(dtype):
    """RoPE, the cache write into scattered blocks and attention in one call, against
    apply_rotary, a dense copy of the rows and SDPA with the equivalent dense mask."""
    batch, heads, kv_heads, steps, dim, cap = 2, 4, 2, 5, 16, 40
    keys, values, tables = _paged(3, kv_heads, cap, dim, seed=6, dtype=dtype)
    tables = tables[[2, 0]]  # the pass's rows
    before_keys, before_values = _dense(keys, tables), _dense(values, tables)
    q, k, v = _new_tokens(batch, steps, heads, kv_heads, dim, seed=8, dtype=dtype)
    cos, sin = _rope(batch, steps, dim, seed=9)
    starts = torch.tensor([20, 25])
    g = torch.Generator().manual_seed(10)
    tree = torch.rand(batch, steps, steps, generator=g) < 0.6
    first = torch.randint(0, 15, (batch, steps), generator=g)  # a sliding window's first visible positions
    out = KERNELS.rope_attention(q, k, v, (cos, sin), starts, keys, values, tables, tree, first, 0.3)

    def rotated(t):
        return apply_rotary(t.float().transpose(1, 2), cos[:, None], sin[:, None]).to(dtype)

    ref_keys, ref_values = before_keys.clone(), before_values.clone()
    length = int(starts.max()) + steps
    mask = torch.zeros(batch, steps, length, dtype=torch.bool)
    for b, start in enumerate(starts.tolist()):
        ref_keys[b, :, start : start + steps] = rotated(k)[b]
        ref_values[b, :, start : start + steps] = v[b].transpose(0, 1)
        for t in range(steps):
            mask[b, t, int(first[b, t]) : start] = True
        mask[b, :, start : start + steps] = tree[b]
    tol = TOLERANCE[dtype]
    written_keys, written_values = _dense(keys, tables), _dense(values, tables)
    torch.testing.assert_close(written_keys.float(), ref_keys.float(), atol=tol, rtol=tol)  # where they belong
    assert torch.equal(written_values, ref_values)
    ref = F.scaled_dot_product_attention(
        rotated(q).float(),
        ref_keys[:, :, :length].float(),
        ref_values[:, :, :length].float(),
        attn_mask=mask[:, None],
        scale=0.3,
        enable_gqa=True,
    )
    assert out.dtype == dtype
    seen = mask.any(-1, keepdim=True)  # a query that sees nothing gives zeros (SDPA: NaN)
    ref = torch.where(seen[:, :, None], ref.transpose(1, 2), 0).reshape(batch, steps, heads * dim)
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_of_a_query_depends_only_on_the_keys_it_sees(dtype):
    """The same query against the same visible keys: inside a wide tree pass with other queries
    and hidden tokens in between, or in a pass of just those tokens (as plain decoding)."""
    heads, kv_heads, dim, cap, prefix = 2, 1, 16, 64, 40
    keys, values, tables = _paged(1, kv_heads, cap, dim, seed=11, dtype=dtype)
    q, k, v = _new_tokens(1, 6, heads, kv_heads, dim, seed=12, dtype=dtype)
    cos, sin = _rope(1, 6, dim, seed=13)
    start = torch.tensor([prefix])
    wide = torch.eye(6, dtype=torch.bool)[None].clone()
    wide[0, 3, [1, 3, 4]] = True  # token 3 sees tokens 1, 3 (itself) and 4
    both = KERNELS.rope_attention(q, k, v, (cos, sin), start, keys, values, tables, wide, None, 0.25)

    def alone(tokens: list[int]) -> torch.Tensor:  # token 3 again, with only ``tokens`` new after the prefix
        pick = (slice(None), tokens)
        sees = torch.ones(1, len(tokens), len(tokens), dtype=torch.bool)
        out = KERNELS.rope_attention(
            q[pick], k[pick], v[pick], (cos[pick], sin[pick]), start, keys, values, tables, sees, None, 0.25
        )
        return out[:, tokens.index(3)]

    assert torch.equal(alone([1, 3, 4]), both[:, 3])
    assert not torch.equal(alone([1, 3]), both[:, 3])  # the test can fail: other keys, other output


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_matches_float32_and_is_row_invariant(offset, dtype):
    x, w = _rand(9, 100, scale=3.0, seed=13, dtype=dtype), _rand(100, scale=0.3, seed=14, dtype=dtype)
    out = KERNELS.rms_norm(x, w, 1e-6, offset)
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    ref = normed * (offset + w.float()) if offset else w.float() * normed.to(dtype).float()
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    assert torch.equal(KERNELS.rms_norm(x[4:5], w, 1e-6, offset), out[4:5])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gelu", [False, True])
def test_gated_activation_matches_float32_and_is_row_invariant(gelu, dtype):
    gate_up = _rand(7, 2 * 45, scale=4.0, seed=15, dtype=dtype)  # 45: the tail goes through the vector code
    out = KERNELS.act_mul(gate_up, gelu)
    gate, up = gate_up.float().split(45, dim=-1)
    act = F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), act * up, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    assert torch.equal(KERNELS.act_mul(gate_up[3:4], gelu), out[3:4])


# --- the exact mode end to end ---------------------------------------------------------------


@pytest.fixture(scope="module", params=[(f, d, i) for f in FAMILIES for d in DTYPES for i in ISAS], ids=str)
def tiny_exact(request, tmp_path_factory):
    family, dtype, isa = request.param
    folder = tmp_path_factory.mktemp(f"exact-{family}")
    build_tiny(family, folder, vocab=64)
    model, _ = load_model(folder, dtype)
    model.use_exact_kernels(exact_kernels(isa))
    return model


@pytest.mark.parametrize("batch", [1, 4])
def test_speculation_equals_plain_decoding_on_tiny_models(tiny_exact, batch):
    """Tiny random bf16 models are full of near-ties: the stock kernels break this test."""
    rng = random.Random(batch)
    prompts = [[rng.randrange(64) for _ in range(rng.randint(3, 30))] for _ in range(16)]
    params = SamplingParams(max_tokens=24)
    plain = _outputs(Engine(tiny_exact), prompts, params, batch=1)
    engine = Engine(tiny_exact, NgramDrafter(depth=3, branches=3), max_draft_nodes=8)
    assert _outputs(engine, prompts, params, batch) == plain
    for start in range(0, len(prompts), batch):
        group = prompts[start : start + batch]
        refs = [p + plain[start + i] for i, p in enumerate(group)]
        engine = Engine(tiny_exact, OracleDrafter(refs, seed=start), max_draft_nodes=8)
        assert _outputs(engine, group, params, batch) == plain[start : start + batch]


def test_all_layers_in_one_call_equal_the_modules_bit_for_bit(tiny_exact):
    """The step plan (every layer in one C call) against the same kernels one module at a time:
    the same logits, kept features and cache, for a prompt and then a tree on two rows."""
    model, plan = tiny_exact, tiny_exact.step_plan
    assert plan is not None
    parents = [-1, 0, 0, 1, 2, 2]
    tree = (
        torch.tensor([tree_depths(parents)] * 2),
        ancestor_mask(parents, torch.device("cpu"))[None].expand(2, -1, -1),
    )
    prompts = torch.tensor([[rng % 64 for rng in range(7, 40, 3)], [rng % 64 for rng in range(5, 60, 5)]])
    layers = [0, model.config.num_layers - 1]
    runs = []
    try:
        for step_plan in (plan, None):
            model.step_plan = step_plan
            cache = model.new_cache(3, 64)
            depths = torch.arange(prompts.shape[1]).expand(2, -1)
            causal = torch.ones(2, prompts.shape[1], prompts.shape[1], dtype=torch.bool).tril()
            first = model.forward_features(prompts, depths, causal, cache, [2, 0], layers)
            for row in (2, 0):
                cache.commit(row, list(range(prompts.shape[1])))
            second = model.forward_features(prompts[:, :6], *tree, cache, [2, 0], layers)
            written = [t for row in (2, 0) for t in cache.contents(row, cache.lengths[row] + 6)]  # the tree too
            runs.append((*first, *second, *written))
    finally:
        model.step_plan = plan
    for one_call, modules in zip(*runs):
        assert torch.equal(one_call, modules)


@pytest.mark.parametrize(
    "chunk, pass_tokens, passes",
    [(5, math.inf, 5), (None, PREFILL_PASS_TOKENS, 2), (None, 0, 3)],
    ids=["parts", "grouped-by-length", "one-pass-a-row"],
)
def test_a_prompt_prefilled_in_parts_caches_what_one_pass_would(tiny_exact, chunk, pass_tokens, passes):
    """On the exact kernels, prefill in parts of 5 tokens (chunked prefill: rows of different
    lengths in one batch, so parts and padding differ by row), or with rows of different lengths
    in passes of their own, gives the first tokens, the prompt features and the KV cache of one
    whole pass over every row bit for bit, sampled draws included."""
    rng = random.Random(5)
    prompts = [[rng.randrange(64) for _ in range(n)] for n in (23, 4, 11)]
    runs = []
    for split, tokens_a_pass, count in ((None, math.inf, 1), (chunk, pass_tokens, passes)):
        layers = (0, tiny_exact.config.num_layers - 1)
        verifier = Verifier(tiny_exact, 3, 40, feature_layers=layers, prefill_pass_tokens=tokens_a_pass)
        rows = [verifier.open(p, SamplingParams(temperature=1.0), seed=i) for i, p in enumerate(prompts)]
        steps = verifier.prefill(rows, split)
        lengths = [verifier.cache.lengths[row] for row in rows]
        runs.append(([s.tokens for s in steps], [s.features for s in steps], lengths, verifier.cache))
        assert verifier.passes == count
    (tokens, features, lengths, whole), (tokens_parts, features_parts, lengths_parts, parts) = runs
    assert tokens == tokens_parts and lengths == lengths_parts == [len(p) for p in prompts]
    assert all(torch.equal(a, b) for a, b in zip(features, features_parts))
    for row in rows:
        assert all(torch.equal(a, b) for a, b in zip(whole.contents(row), parts.contents(row)))


def test_prefill_groups_pad_least_for_the_passes_they_take():
    """Rows sorted by length, cut into runs: the fewest padded tokens plus a pass's fixed cost."""
    assert prefill_groups([23, 4, 11], 8) == [[1, 2], [0]]  # 8+2*11 + 8+23 = 61: one a row 62, one pass 77
    assert prefill_groups([23, 4, 11], 0) == [[1], [2], [0]]
    assert prefill_groups([23, 4, 11], math.inf) == [[0, 1, 2]]
    assert prefill_groups([100, 98, 5, 6, 7], 8) == [[2, 3, 4], [0, 1]]
    assert prefill_groups([9], 0) == [[0]]
    lengths = [random.Random(s).randrange(1, 300) for s in range(12)]
    for pass_tokens in (0, 8, 64, 1e6):
        runs = prefill_groups(lengths, pass_tokens)
        assert sorted(i for run in runs for i in run) == list(range(12))
        cost = sum(pass_tokens + len(run) * max(lengths[i] for i in run) for run in runs)
        one = pass_tokens + 12 * max(lengths)
        assert cost <= one and (pass_tokens < 1e6 or len(runs) == 1)


def test_exact_mode_is_refused_where_it_cannot_run(tmp_path):
    build_tiny("llama", tmp_path, vocab=64)
    model, _ = load_model(tmp_path, torch.float16)
    with pytest.raises(KernelUnavailable, match="bf16 or float32 model on the CPU"):
        apply_exact(model, True)
    assert apply_exact(model, None) is False  # auto: float16 keeps the stock kernels
    assert not model.exact
    with pytest.raises(TypeError, match="bf16 or float32 tensors"):
        KERNELS.pack(torch.zeros(16, 8, dtype=torch.float16))
    with pytest.raises(KernelUnavailable, match="must be avx2 or avx512"):
        exact_kernels("sse")


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
@pytest.mark.parametrize(("drafter", "batch"), [("ngram-tree", 4), ("dspark:4,6,16", 1), ("dspark:4,6,16", 4)])
def test_real_model_bf16_speculation_equals_plain_decoding(smollm_bf16, drafter, batch):
    """In bf16 with the stock kernels, 11 of these 20 outputs differ from plain decoding at batch 1
    and 15 at batch 4 (near-ties); the exact kernels make them equal. DSpark's greedy trees grow
    in the native search here (tandem/kernels/tree_cpu.c), one sequence and four together."""
    target, prompts, params, plain = smollm_bf16
    spec = make_drafter(drafter, target.model, "smollm2-135m-instruct")
    engine = Engine(target.model, spec, target.eos_token_ids, max_draft_nodes=16)
    assert _outputs(engine, prompts, params, batch) == plain
