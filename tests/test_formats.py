"""Published drafter checkpoints (EAGLE-3 as SpecForge saves it, DFlash as z-lab publishes it,
DSpark as DeepSpec saves it), written here in each upstream layout with random weights: each loads,
drafts what a reference forward written from the upstream code's description drafts (logits
compared, not only tokens), keeps greedy output equal to plain decoding, and goes back out through
``export_drafter`` unchanged. Bad checkpoints get errors naming the file and the tensor."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tandem.drafters import ADAPTERS, drafter_config, load_draft_model, load_drafter, new_draft_model
from tandem.drafters.base import DraftRequest
from tandem.drafters.dspark import DSparkDrafter
from tandem.drafters.formats import export_drafter, layout_overrides
from tandem.drafters.neural import DraftConfig
from tandem.engine import Engine, Request
from tandem.errors import ModelLoadError
from tandem.models.loading import load_model
from tandem.sampling import SamplingParams
from tandem.train.features import sequence_features
from tandem.tree_search import TreeShape
from tests.tiny_models import build_tiny

VOCAB, LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 96, 8, 64, 4, 2, 16, 96
EPS, THETA = 1e-6, 1000.0
IDS = [1, 3, 5]  # target layer outputs the drafters read (the last layer's HF state is normed: avoided)
MASK = VOCAB - 1
SEQUENCE = [5, 17, 42, 8, 33, 71, 2, 60, 19, 27, 88, 4]  # context + the anchor (last)


@pytest.fixture(scope="module")
def target_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3-target")
    build_tiny("qwen3", folder, vocab=VOCAB, num_hidden_layers=LAYERS)
    return folder


@pytest.fixture(scope="module")
def hf_target(target_folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(target_folder, attn_implementation="eager").float().eval()


@pytest.fixture(scope="module")
def target(target_folder):
    return load_model(target_folder, torch.float32)[0]


@pytest.fixture(scope="module")
def states(hf_target):
    """Hugging Face ``hidden_states`` of the context (everything before the anchor): the
    reference reads the target through transformers, not through Tandem's decoder."""
    with torch.no_grad():
        out = hf_target(torch.tensor([SEQUENCE[:-1]]), output_hidden_states=True)
    return [h[0] for h in out.hidden_states]


# ---- the upstream layouts, written as their code saves them ---------------------------------------


def _normal(*shape: int, scale: float = 0.3) -> torch.Tensor:
    return torch.randn(*shape) * scale


def _norm_weight(dim: int) -> torch.Tensor:
    return 1 + 0.3 * torch.randn(dim)


def _qwen3_layers(count: int) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(count):
        p = f"layers.{i}."
        out |= {
            p + "input_layernorm.weight": _norm_weight(HIDDEN),
            p + "self_attn.q_proj.weight": _normal(HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": _normal(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": _normal(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": _normal(HIDDEN, HEADS * HEAD_DIM),
            p + "self_attn.q_norm.weight": _norm_weight(HEAD_DIM),
            p + "self_attn.k_norm.weight": _norm_weight(HEAD_DIM),
            p + "post_attention_layernorm.weight": _norm_weight(HIDDEN),
            p + "mlp.gate_proj.weight": _normal(FFN, HIDDEN),
            p + "mlp.up_proj.weight": _normal(FFN, HIDDEN),
            p + "mlp.down_proj.weight": _normal(HIDDEN, FFN),
        }
    return out


def _arch(**extra) -> dict:
    return dict(
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        rms_norm_eps=EPS,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        hidden_act="silu",
        attention_bias=False,
        **extra,
    )


def _block_arch(**extra) -> dict:
    """What z-lab's and DeepSpec's configs share: a two-layer Qwen3 drafter of an 8-layer target."""
    return _arch(model_type="qwen3", num_hidden_layers=2, num_target_layers=LAYERS, **extra)


def _backbone() -> dict[str, torch.Tensor]:
    """The DFlash backbone both publish: two Qwen3 layers, fc, hidden_norm, norm."""
    return _qwen3_layers(2) | {
        "fc.weight": _normal(HIDDEN, len(IDS) * HIDDEN, scale=0.1),
        "hidden_norm.weight": _norm_weight(HIDDEN),
        "norm.weight": _norm_weight(HIDDEN),
    }


def _write(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    return folder


def write_zlab(folder: Path, block: int = 4, seed: int = 0) -> Path:
    """z-lab's DFlashDraftModel: no embedding or LM head; block_size top-level, the rest nested."""
    torch.manual_seed(seed)
    config = _block_arch(
        architectures=["DFlashDraftModel"],
        block_size=block,
        rope_theta=THETA,
        rope_scaling=None,
        dflash_config={"mask_token_id": MASK, "target_layer_ids": IDS},
        tie_word_embeddings=True,
    )
    return _write(folder, config, _backbone())


def write_deepspec(folder: Path, target, rank: int = 8, confidence: bool = True, seed: int = 1) -> Path:
    """DeepSpec's Qwen3DSparkModel: top-level fields (transformers 5 rope_parameters), frozen
    copies of the target's embedding and LM head, the vanilla Markov head and the confidence head."""
    torch.manual_seed(seed)
    config = _block_arch(
        architectures=["Qwen3DSparkModel"],
        block_size=4,
        layer_types=["full_attention"] * 2,
        mask_token_id=MASK,
        target_layer_ids=IDS,
        num_anchors=512,
        enable_confidence_head=confidence,
        markov_rank=rank,
        rope_parameters={"rope_theta": THETA, "rope_type": "default"},
        tie_word_embeddings=False,
    )
    if rank:
        config["markov_head_type"] = "vanilla"
    if confidence:
        config["confidence_head_with_markov"] = True
    tensors = _backbone() | {
        "embed_tokens.weight": target.embed.weight.detach().clone(),
        "lm_head.weight": target.lm_head.weight.detach().clone(),
    }
    if rank:
        tensors["markov_head.markov_w1.weight"] = _normal(VOCAB, rank)
        tensors["markov_head.markov_w2.weight"] = _normal(VOCAB, rank)
    if confidence:
        tensors["confidence_head.proj.weight"] = _normal(1, HIDDEN + rank)
        tensors["confidence_head.proj.bias"] = _normal(1)
    return _write(folder, config, tensors)


DRAFT_VOCAB = 40


def write_specforge(folder: Path, ids: str = "nested", seed: int = 2) -> Path:
    """SpecForge's LlamaForCausalLMEagle3: ``midlayer.*``, fc over 3 layers, its own LM head over a
    reduced vocabulary with d2t offsets, t2d, no embedding. ``ids``: where the layer ids are
    (``nested``: SpecForge's eagle_config, layer outputs; ``top``: the speculators format, layer
    inputs; ``none``: EAGLE's default)."""
    torch.manual_seed(seed)
    config = _arch(
        architectures=["LlamaForCausalLMEagle3"], model_type="llama", num_hidden_layers=1, draft_vocab_size=DRAFT_VOCAB
    )
    config["rope_theta"] = THETA
    if ids == "nested":
        config["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": IDS}
    elif ids == "top":
        config["eagle_aux_hidden_state_layer_ids"] = [i + 1 for i in IDS]
    used = torch.randperm(VOCAB)[:DRAFT_VOCAB].sort().values
    layer = _qwen3_layers(1)
    tensors = {
        k.replace("layers.0.", "midlayer."): v
        for k, v in layer.items()
        if "q_norm" not in k and "k_norm" not in k and "proj" not in k
    }
    for name, rows in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
        tensors[f"midlayer.self_attn.{name}_proj.weight"] = _normal(rows * HEAD_DIM, 2 * HIDDEN)
    tensors |= {
        "midlayer.self_attn.o_proj.weight": layer["layers.0.self_attn.o_proj.weight"],
        "midlayer.mlp.gate_proj.weight": layer["layers.0.mlp.gate_proj.weight"],
        "midlayer.mlp.up_proj.weight": layer["layers.0.mlp.up_proj.weight"],
        "midlayer.mlp.down_proj.weight": layer["layers.0.mlp.down_proj.weight"],
        "midlayer.hidden_norm.weight": _norm_weight(HIDDEN),
        "fc.weight": _normal(HIDDEN, 3 * HIDDEN, scale=0.1),
        "norm.weight": _norm_weight(HIDDEN),
        "lm_head.weight": _normal(DRAFT_VOCAB, HIDDEN),
        "d2t": used - torch.arange(DRAFT_VOCAB),
        "t2d": torch.zeros(VOCAB, dtype=torch.bool).index_fill_(0, used, True),
    }
    return _write(folder, config, tensors)


def write_layout(layout: str, folder: Path, target, eagle3_ids: str = "nested") -> Path:
    if layout == "zlab":
        return write_zlab(folder)
    return write_deepspec(folder, target) if layout == "deepspec" else write_specforge(folder, eagle3_ids)


# ---- reference forwards, from the upstream code's description ------------------------------------


def _rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * weight


def _rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """NeoX rotate-half RoPE of ``x`` ``[T, heads, hd]`` at ``positions`` ``[T]``."""
    inv = 1.0 / THETA ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    angles = positions[:, None].float() * inv
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]
    first, second = x.chunk(2, -1)
    return x * cos + torch.cat([-second, first], -1) * sin


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    k, v = k.repeat_interleave(HEADS // KV_HEADS, 1), v.repeat_interleave(HEADS // KV_HEADS, 1)
    scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(HEAD_DIM)
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hts,shd->thd", weights, v).flatten(1)


def _mlp(w: dict, p: str, x: torch.Tensor) -> torch.Tensor:
    h = _rms(x, w[p + "post_attention_layernorm.weight"])
    return (F.silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[
        p + "mlp.down_proj.weight"
    ].T


def reference_block(w: dict, states: list, embed: torch.Tensor, block: int) -> torch.Tensor:
    """DFlash's backbone (z-lab and DeepSpec alike): ``hidden_norm(fc(concat of hidden_states[i + 1]))``
    projected by every layer into context keys/values (no layer norm on them), the block
    ``[anchor, mask, ...]`` at positions a .. a + B - 1 attending to all of it, per-head q/k norm.
    Returns the final-normed hidden states of every block row ``[B, d]``."""
    ctx = _rms(torch.cat([states[i + 1] for i in IDS], -1) @ w["fc.weight"].T, w["hidden_norm.weight"])
    a = len(ctx)
    x = embed[[SEQUENCE[-1]] + [MASK] * (block - 1)]
    positions = torch.arange(a + block)
    for i in range(2):
        p = f"layers.{i}."
        h = _rms(x, w[p + "input_layernorm.weight"])
        q = _rms(
            (h @ w[p + "self_attn.q_proj.weight"].T).view(block, HEADS, HEAD_DIM), w[p + "self_attn.q_norm.weight"]
        )
        both = torch.cat([ctx, h])
        k = _rms(
            (both @ w[p + "self_attn.k_proj.weight"].T).view(-1, KV_HEADS, HEAD_DIM), w[p + "self_attn.k_norm.weight"]
        )
        v = (both @ w[p + "self_attn.v_proj.weight"].T).view(-1, KV_HEADS, HEAD_DIM)
        q, k = _rope(q, positions[a:]), _rope(k, positions)
        x = x + _attend(q, k, v, torch.ones(block, a + block, dtype=torch.bool)) @ w[p + "self_attn.o_proj.weight"].T
        x = x + _mlp(w, p, x)
    return _rms(x, w["norm.weight"])


def reference_eagle3(w: dict, states: list, embed: torch.Tensor, layers: list[int], steps: int) -> tuple:
    """EAGLE-3 (cnets.py / SpecForge): row t reads ``[input_layernorm(embed(x_{t+1})) ;
    hidden_norm(h_t)]`` at position t, residual h_t = fc(features of x_t); a draft step reads its
    own pre-norm output at the next position. ``layers``: HF ``hidden_states`` indices. Returns
    the first step's draft-vocabulary logits and ``steps`` greedy target ids."""
    feats = torch.cat([states[i] for i in layers], -1) @ w["fc.weight"].T
    keys, values = [], []

    def step(tokens: list[int], hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x_in = torch.cat(
            [_rms(embed[tokens], w["midlayer.input_layernorm.weight"]), _rms(hidden, w["midlayer.hidden_norm.weight"])],
            -1,
        )
        q = _rope((x_in @ w["midlayer.self_attn.q_proj.weight"].T).view(-1, HEADS, HEAD_DIM), positions)
        keys.append(_rope((x_in @ w["midlayer.self_attn.k_proj.weight"].T).view(-1, KV_HEADS, HEAD_DIM), positions))
        values.append((x_in @ w["midlayer.self_attn.v_proj.weight"].T).view(-1, KV_HEADS, HEAD_DIM))
        k, v = torch.cat(keys), torch.cat(values)
        allowed = torch.arange(len(k))[None] <= (len(k) - len(tokens) + torch.arange(len(tokens)))[:, None]
        x = hidden + _attend(q, k, v, allowed) @ w["midlayer.self_attn.o_proj.weight"].T
        return x + _mlp(w, "midlayer.", x)

    n = len(feats)
    out = step(SEQUENCE[1:], feats, torch.arange(n))[-1:]
    first, drafted = None, []
    for s in range(steps):
        logits = _rms(out[0], w["norm.weight"]) @ w["lm_head.weight"].T
        first = logits if first is None else first
        best = int(logits.argmax())
        drafted.append(best + int(w["d2t"][best]))
        out = step(drafted[-1:], out, torch.tensor([n + s]))
    return first, drafted


# ---- tests -----------------------------------------------------------------------------------------


def _request(target, layers) -> DraftRequest:
    features = sequence_features(target, SEQUENCE[:-1], layers)
    return DraftRequest(0, SEQUENCE, max_nodes=16, params=SamplingParams(), features=features)


def test_zlab_dflash_drafts_what_its_own_forward_gives(target, states, tmp_path):
    folder = write_zlab(tmp_path / "zlab", block=4)
    w = load_file(str(folder / "model.safetensors"))
    drafter = load_drafter(folder, target)
    cfg = drafter.model.config
    assert (cfg.algo, cfg.feature_layers, cfg.drafts, cfg.mask_token_id) == ("dflash", IDS, 3, MASK)
    state = drafter.absorb(_request(target, IDS))
    logits, _ = (t[0] for t in drafter.blocks([state], SEQUENCE[-1:]))  # the block after the anchor
    hidden = reference_block(w, states, target.embed.weight.detach(), block=4)
    expected = hidden[1:] @ target.lm_head.weight.detach().T  # the anchor's row is dropped: masks draft
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    tree = drafter.draft(state, SEQUENCE, cfg.drafts, SamplingParams())
    assert list(tree.tokens[1:]) == expected.argmax(-1).tolist()


@pytest.mark.parametrize("rank, confidence", [(8, True), (0, False)], ids=["dspark", "dflash"])
def test_deepspec_drafts_what_its_own_forward_gives(target, states, tmp_path, rank, confidence):
    folder = write_deepspec(tmp_path / "deepspec", target, rank=rank, confidence=confidence)
    w = load_file(str(folder / "model.safetensors"))
    model = load_draft_model(folder, target)
    cfg = model.config
    assert cfg.algo == ("dspark" if rank else "dflash") and cfg.drafts == 4 and cfg.anchor_row
    drafter = DSparkDrafter(model, min_survival=0.0) if rank else ADAPTERS["dflash"](model)
    state = drafter.absorb(_request(target, IDS))
    base, _ = (t[0] for t in drafter.blocks([state], SEQUENCE[-1:]))
    hidden = reference_block(w, states, w["embed_tokens.weight"], block=4)
    torch.testing.assert_close(base, hidden @ w["lm_head.weight"].T, rtol=1e-4, atol=1e-4)
    # The Markov head, sequential from the anchor, and the confidence of each row.
    previous, tokens, survival = SEQUENCE[-1], [], 1.0
    expected_survival = []
    for k in range(4):
        logits = hidden[k] @ w["lm_head.weight"].T
        if rank:
            code = w["markov_head.markov_w1.weight"][previous]
            logits = logits + w["markov_head.markov_w2.weight"] @ code
            z = torch.cat([hidden[k], code]) @ w["confidence_head.proj.weight"][0] + w["confidence_head.proj.bias"][0]
            survival *= float(torch.sigmoid(z))
            expected_survival.append(survival)
        previous = int(logits.argmax())
        tokens.append(previous)
    tree = drafter.draft(state, SEQUENCE, 4, SamplingParams())
    assert list(tree.tokens[1:]) == tokens
    if rank:
        assert list(tree.survival[1:]) == pytest.approx(expected_survival, rel=1e-4)


@pytest.mark.parametrize("ids", ["nested", "top", "none"])
def test_specforge_eagle3_drafts_what_its_own_forward_gives(target, states, tmp_path, ids):
    """The three places layer ids can be (or not be) resolve to the same physical states:
    SpecForge's nested ids are layer outputs, the speculators' top-level ones layer inputs, and
    without ids EAGLE's default is the inputs of layers 2, N/2 and N - 3."""
    folder = write_specforge(tmp_path / "specforge", ids=ids)
    w = load_file(str(folder / "model.safetensors"))
    drafter = load_drafter(folder, target)
    cfg = drafter.model.config
    inputs = [i + 1 for i in IDS] if ids != "none" else [2, LAYERS // 2, LAYERS - 3]
    assert cfg.feature_layers == [i - 1 for i in inputs]
    assert drafter.model.vocab_map.tolist() == (torch.arange(DRAFT_VOCAB) + w["d2t"]).tolist()
    state = drafter.absorb(_request(target, cfg.feature_layers))
    first, drafted = reference_eagle3(w, states, target.embed.weight.detach(), inputs, steps=4)
    torch.testing.assert_close(drafter.model.draft_logits(state.extra["last"][0, -1]), first, rtol=1e-4, atol=1e-4)
    assert list(drafter.draft(state, SEQUENCE, 4, SamplingParams()).tokens[1:]) == drafted


@pytest.mark.parametrize("layout", ["zlab", "deepspec", "specforge"])
def test_published_drafters_keep_greedy_output_equal_to_plain_decoding(target, tmp_path, layout):
    folder = write_layout(layout, tmp_path / layout, target)
    prompts = [[3, 9, 27, 81 % VOCAB], [50, 51, 52], SEQUENCE[:7]]
    params = SamplingParams(max_tokens=20)
    plain = Engine(target).generate([Request(p, params) for p in prompts])
    for tree in (None, TreeShape()):
        engine = Engine(target, load_drafter(folder, target, tree), max_draft_nodes=8)
        spec = engine.generate([Request(p, params) for p in prompts])
        assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
        assert sum(r.stats.drafted for r in spec) > 0


@pytest.mark.parametrize("layout", ["zlab", "deepspec", "specforge"])
def test_a_published_checkpoint_goes_back_out_unchanged(target, tmp_path, layout):
    folder = write_layout(layout, tmp_path / "in", target)
    model = load_draft_model(folder, target)
    out = export_drafter(model, layout, tmp_path / "out", num_target_layers=LAYERS)
    before, after = load_file(str(folder / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    source = str(folder / "config.json")
    assert replace(drafter_config(out, target.config), target=source) == drafter_config(folder, target.config)


@pytest.mark.parametrize("algo, layout", [("dspark", "deepspec"), ("dflash", "deepspec"), ("eagle3", "specforge")])
def test_a_tandem_drafter_in_a_published_layout_round_trips_bit_equal(target, tmp_path, algo, layout):
    """A drafter Tandem builds in a published layout (``tandem train --layout``) -> export ->
    load gives the same drafts and the same logits, bit for bit."""
    torch.manual_seed(3)
    overrides = layout_overrides(layout, algo, target.config.vocab_size)
    # EAGLE-3's chain depth is not in its format: Tandem's default (8) on both sides
    overrides |= {"draft_vocab": DRAFT_VOCAB} if algo == "eagle3" else {"block_size": 4}
    cfg = DraftConfig.for_target(algo, target, "tiny", **overrides)
    vocab = torch.randperm(VOCAB)[: cfg.draft_vocab] if algo == "eagle3" else None
    model = new_draft_model(cfg, target, vocab)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn_like(param))
    out = export_drafter(model, layout, tmp_path / "out", num_target_layers=LAYERS)
    again = load_draft_model(out, target)
    adapter = (lambda m: DSparkDrafter(m, min_survival=0.0)) if algo == "dspark" else ADAPTERS[algo]
    first, second = adapter(model.eval()), adapter(again)
    for prompt in ([5, 6, 7, 8, 9], SEQUENCE):
        request = DraftRequest(
            0, prompt, max_nodes=8, features=sequence_features(target, prompt[:-1], cfg.feature_layers)
        )
        one, two = first.propose([request])[0], second.propose([request])[0]
        assert one.tokens == two.tokens
        first.release(0), second.release(0)


def test_tandem_own_layout_is_refused_by_export_with_what_differs(target, tmp_path):
    model = new_draft_model(DraftConfig.for_target("dspark", target, "tiny"), target)
    with pytest.raises(ModelLoadError, match="not in deepspec's layout.*fusion"):
        export_drafter(model, "deepspec", tmp_path, num_target_layers=LAYERS)
    with pytest.raises(ModelLoadError, match="cannot be written as specforge"):
        export_drafter(model, "specforge", tmp_path, num_target_layers=LAYERS)


def _edit(folder: Path, config=None, tensors=None) -> Path:
    if config:
        hf = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(config(hf) or hf))
    if tensors:
        state = load_file(str(folder / "model.safetensors"))
        state = tensors(state) or state
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    return folder


def test_bad_published_checkpoints_get_errors_naming_file_and_tensor(target, tmp_path):
    def bad(name: str, writer, config=None, tensors=None, match: str = "") -> None:
        folder = _edit(writer(tmp_path / name), config, tensors)
        with pytest.raises(ModelLoadError, match=match):
            load_drafter(folder, target)

    up = "layers.1.mlp.up_proj.weight"
    bad("missing", write_zlab, tensors=lambda s: {k: v for k, v in s.items() if k != up}, match=f"no tensor '{up}'")
    shape = r"model.safetensors: tensor 'fc.weight' has shape \[64, 128\], config.json implies \[64, 192\]"
    bad("shape", write_zlab, tensors=lambda s: s.update({"fc.weight": s["fc.weight"][:, :128]}), match=shape)
    bad(
        "layer",
        write_zlab,
        config=lambda h: h["dflash_config"].update(target_layer_ids=[1, 3, LAYERS]),
        match=r"layer ids \[8\] are outside",
    )
    bad(
        "vocab",
        write_specforge,
        config=lambda h: h.update(draft_vocab_size=VOCAB + 8),
        match="larger than the target's vocabulary",
    )
    bad("target", write_zlab, config=lambda h: h.update(vocab_size=VOCAB * 2), match="192-token vocabulary")
    deepspec = lambda f: write_deepspec(f, target)  # noqa: E731
    bad("depth", deepspec, config=lambda h: h.update(num_target_layers=36), match="36-layer target")
    bad("markov", deepspec, config=lambda h: h.update(markov_head_type="rnn"), match="only 'vanilla'")
    bad(
        "extra",
        write_zlab,
        tensors=lambda s: s.update({"layers.2.mlp.up_proj.weight": s["fc.weight"].clone()}),
        match="no place in a dflash drafter",
    )
    bad(
        "d2t",
        write_specforge,
        tensors=lambda s: s.update({"d2t": s["d2t"] + VOCAB}),
        match="outside the target's vocabulary",
    )
    with pytest.raises(ModelLoadError, match="neither a tandem drafter nor a published"):
        load_drafter(_edit(write_zlab(tmp_path / "unknown"), config=lambda h: {"architectures": ["Mystery"]}), target)


@pytest.mark.parametrize("layout", ["zlab", "deepspec", "specforge"])
def test_a_draft_worker_serves_a_published_drafter(target, target_folder, tmp_path, layout):
    """The cluster's view: the target pool computes the layers the published config names (the
    EAGLE-3 default needs the target's depth), and a draft worker next to the target's embedding
    and LM head alone drafts what one next to the whole target does."""
    from cluster.app import drafter_feature_layers
    from cluster.config import load_config
    from tandem.models.loading import load_embeddings

    folder = write_layout(layout, tmp_path / layout, target, eagle3_ids="none")
    config = load_config(None, model=str(target_folder), draft={"drafter": str(folder)})
    whole = load_drafter(folder, target)
    assert drafter_feature_layers(config) == tuple(whole.feature_layers)
    light = load_drafter(folder, load_embeddings(target_folder, torch.float32))
    request = _request(target, whole.feature_layers)
    assert whole.propose([request])[0].tokens == light.propose([request])[0].tokens
