"""Batch-invariant bf16 and float32 kernels for the CPU (``exact_cpu.c``), built once per machine
with the system C compiler and called through ctypes.

Why: in bf16, oneDNN's result for a token depends on how many tokens share the GEMM, so a
verification pass and a one-token decode pass round near-ties differently and speculative output
drifts from plain decoding. These kernels compute every row the same way whatever the pass holds
(see the C file), and read the weights once for all rows of a pass, prefetching ahead, so a
one-token pass runs near the memory bandwidth in either dtype and verifying a few tokens costs
little more (docs/results.md: with the AVX-512 tiles, faster than oneDNN at every width measured).

The same library holds the block drafters' greedy tree search (``tree_cpu.c``), which calls the
linear kernel for DSpark's Markov head.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tandem.cache import cache_root
from tandem.errors import TandemError

SOURCES = tuple(Path(__file__).with_name(name) for name in ("exact_cpu.c", "tree_cpu.c"))
HEADERS = (Path(__file__).with_name("storage.h"),)
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c11")
BLOCK = 16  # output columns per packed weight block


class KernelUnavailable(TandemError):
    """The exact kernels cannot run here (no x86 AVX2/FMA, no C compiler, or a failed build)."""


def _cpu_flags() -> set[str]:
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        return set()
    for line in info.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _build() -> tuple[Path, str]:
    """The built library and its key (source and flags), building it if this machine has not."""
    if platform.machine() not in ("x86_64", "AMD64") or not {"avx2", "fma"} <= _cpu_flags():
        raise KernelUnavailable("the exact kernels need an x86-64 CPU with AVX2 and FMA")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise KernelUnavailable("the exact kernels need a C compiler (cc or gcc, or $CC)")
    text = b"".join(s.read_bytes() for s in (*SOURCES, *HEADERS)) + " ".join(FLAGS).encode()
    key = hashlib.sha256(text).hexdigest()[:16]
    library = cache_root() / "kernels" / f"exact_cpu-{key}.so"
    if library.is_file():
        return library, key
    library.parent.mkdir(parents=True, exist_ok=True)
    partial = library.with_suffix(f".{os.getpid()}.tmp")
    built = subprocess.run(
        [compiler, *FLAGS, "-o", str(partial), *map(str, SOURCES), "-lm"], capture_output=True, text=True
    )
    if built.returncode != 0:
        raise KernelUnavailable(f"building the exact kernels failed: {built.stderr.strip()[-400:]}")
    partial.replace(library)  # atomic: concurrent builders each write their own file
    return library, key


_P, _I, _F, _C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "tandem_linear": (_P, _I, _I, _I, _P, _I, _P, _P, _I, _C, _C, _C, _C),
    "tandem_rope_attention": (_P, _I, _P, _I, _P, _I, *[_P] * 6, *[_I] * 7, _P, _P, _F, _P, _C, _C),
    "tandem_rms_norm": (_P, _I, _I, _P, _F, _F, _P, _C),
    "tandem_act_mul": (_P, _I, _I, _C, _P, _C),
    "tandem_layers": (_P, _P, _I, _I, *[_P] * 9, _I, _P, _P, _I, _I, _P, _C),
    # base, B, D, V, roots, budgets, topk, depth, vocab_map, to_draft, codes, packed W2, rank, f32,
    # wide, threads, mode, confidence, its code part, temperatures, their count, cap, the four outputs
    "tandem_greedy_trees": (_P, _I, _I, _I, _P, _P, _I, _I, *[_P] * 4, _I, *[_C] * 4, *[_P] * 3, _I, _I, *[_P] * 4),
}
_RETURNS = {"tandem_greedy_trees": _I}  # the others return nothing
DTYPES = (torch.bfloat16, torch.float32)  # the storage types the kernels read and write
AVX512 = {"avx512f", "avx512bw", "avx512_bf16"}  # the wide linear tiles: 16-lane FMA, bf16 dot products
ISA_VARIABLE = "TANDEM_KERNEL_ISA"  # avx2 or avx512; unset: the widest this CPU has
LAYER_WEIGHTS = (  # tandem_layer's pointers, in order
    *("attn_norm", "mlp_norm", "post_attn_norm", "post_mlp_norm", "q_norm", "k_norm"),
    *("wqkv", "bqkv", "wo", "w13", "w2"),
)


class _Layer(ctypes.Structure):  # tandem_layer in exact_cpu.c
    _fields_ = [*((name, _P) for name in LAYER_WEIGHTS), ("sliding", _I)]


class _Model(ctypes.Structure):  # tandem_model in exact_cpu.c
    _fields_ = [
        *((name, _I) for name in ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate")),
        *((name, _F) for name in ("eps", "offset", "scale")),
        *((name, ctypes.c_int32) for name in ("gelu", "f32", "wide")),
        ("layer", ctypes.POINTER(_Layer)),
    ]


class StepPlan:
    """What :meth:`ExactKernels.layers` needs of a model, built once: every layer's weights (packed
    linears, norms) and the sizes, as the C structs; it keeps the tensors alive."""

    def __init__(
        self,
        kernels: ExactKernels,
        layers: Sequence[dict[str, torch.Tensor | None]],
        sliding: Sequence[bool],
        sizes: dict[str, int],
        eps: float,
        offset: float,
        scale: float,
        gelu: bool,
    ) -> None:
        """``layers``: per layer, :data:`LAYER_WEIGHTS` by name (linears packed by ``kernels``)."""
        self._tensors = [t for layer in layers for t in layer.values() if t is not None]
        dtype = self._tensors[0].dtype
        self._layers = (_Layer * len(layers))(
            *(
                _Layer(*(None if layer.get(name) is None else layer[name].data_ptr() for name in LAYER_WEIGHTS), s)
                for layer, s in zip(layers, sliding)
            )
        )
        self.struct = _Model(
            len(layers), *(sizes[k] for k in ("hidden", "heads", "kv_heads", "head_dim", "intermediate")),
            eps, offset, scale, gelu, dtype == torch.float32, kernels.isa == "avx512", self._layers,
        )  # fmt: skip


def _f32(t: torch.Tensor) -> int:
    """The kernels' storage-type flag for ``t`` (1 float32, 0 bf16)."""
    if t.dtype not in DTYPES:
        raise TypeError(f"the exact kernels take bf16 or float32 tensors, not {t.dtype}")
    return int(t.dtype == torch.float32)


def _pointer(t: torch.Tensor | None) -> int | None:
    """A contiguous tensor's data pointer for the kernels, or NULL (a copy made here would be freed
    before the call)."""
    if t is not None and not t.is_contiguous():
        raise ValueError("the exact kernels take this argument contiguous")
    return None if t is None else t.data_ptr()


def _isa(asked: str | None) -> str:
    """The linear tiles to use: ``avx512`` where the CPU has :data:`AVX512`, else ``avx2``;
    ``asked`` (or else the environment's :data:`ISA_VARIABLE`) may ask for the narrower ones, or
    insist on the wider."""
    has_avx512 = AVX512 <= _cpu_flags()
    asked = (asked or os.environ.get(ISA_VARIABLE, "")).strip().lower()
    if asked not in ("", "avx2", "avx512"):
        raise KernelUnavailable(f"{ISA_VARIABLE} must be avx2 or avx512, not {asked!r}")
    if asked == "avx512" and not has_avx512:
        raise KernelUnavailable(f"{ISA_VARIABLE}=avx512, but this CPU lacks {' '.join(sorted(AVX512))}")
    return asked or ("avx512" if has_avx512 else "avx2")


def _token_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``t`` ``[B, T, heads, D]`` as evenly strided token rows of ``heads * D`` values (a view of a
    fused projection where it is one), and the row stride."""
    batch, steps, heads, dim = t.shape
    if t.stride(3) != 1 or t.stride(2) != dim or t.stride(0) != steps * t.stride(1):
        t = t.contiguous()
    return t, t.stride(1)


@dataclass(frozen=True)
class TreeHeads:
    """DSpark's heads as :meth:`ExactKernels.greedy_trees` reads them, all contiguous on the CPU."""

    to_draft: torch.Tensor | None = None  # [target vocabulary] long: each target id's draft id (V: none)
    codes: torch.Tensor | None = None  # [V + 1, rank] the Markov head's codes (W1), in the storage type
    packed_bias: torch.Tensor | None = None  # its W2, packed (None: the codes feed the confidence only)
    confidence: torch.Tensor | None = None  # [B, D] float32 w_h . norm(h) + b (None: a confidence of 1)
    confidence_code: torch.Tensor | None = None  # [rank] float32, the codes' part of the confidence weight
    temperatures: torch.Tensor | None = None  # [n] float32 per block position (None: 1)


class ExactKernels:
    """The loaded library; every call takes and returns CPU tensors of one storage type, bf16 or
    float32 (the model's), except that a linear may return float32 from bf16. ``isa``: which
    linear tiles run (one per process, so every pass of a model computes a row the same way)."""

    def __init__(self, library: ctypes.CDLL, isa: str, key: str) -> None:
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(library, name)
            fn.argtypes, fn.restype = argtypes, _RETURNS.get(name)
        self._lib = library
        self.isa = isa
        self.label = f"exact-{isa}-{key}"  # what a pass costs depends on it (cached profiles are keyed by it)
        self._wide = isa == "avx512"

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """``[N, K]`` weights in the layout the linear tiles read: ``[ceil(N/16), K, 16]`` blocks
        (zero rows pad the last one); for bf16 on AVX-512, ``[ceil(N/16), ceil(K/2), 16, 2]``
        (pairs of k side by side for the dot-product instruction; a zero column pads odd K)."""
        n, k = weight.shape
        pairs = not _f32(weight) and self._wide
        columns = k + (k % 2 if pairs else 0)
        padded = torch.zeros(-(-n // BLOCK) * BLOCK, columns, dtype=weight.dtype, device=weight.device)
        padded[:n, :k] = weight.detach()
        if pairs:
            return padded.view(-1, BLOCK, padded.shape[1] // 2, 2).transpose(1, 2).contiguous()
        return padded.view(-1, BLOCK, k).transpose(1, 2).contiguous()

    def linear(
        self, x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None, out_dtype: torch.dtype
    ) -> torch.Tensor:
        """``x @ W.T (+ bias)`` for ``x`` ``[..., K]`` (the dtype of ``packed`` and ``bias``);
        ``out_dtype``: ``x``'s or float32."""
        rows = x.reshape(-1, x.shape[-1])
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        out = torch.empty(rows.shape[0], n, dtype=out_dtype, device=x.device)
        self._lib.tandem_linear(
            rows.data_ptr(), rows.stride(0), rows.shape[0], rows.shape[1], packed.data_ptr(), n,
            None if bias is None else bias.data_ptr(), out.data_ptr(), n, out_dtype == torch.float32,
            _f32(x), self._wide, torch.get_num_threads(),
        )  # fmt: skip
        return out.view(*x.shape[:-1], n)

    def greedy_trees(
        self,
        base: torch.Tensor,
        roots: Sequence[int],
        budgets: Sequence[int],
        topk: int,
        depth: int,
        vocab_map: torch.Tensor,
        heads: TreeHeads | None = None,
    ) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]:
        """Greedy best-first trees for the block drafters (``tree_cpu.c``): ``base`` ``[B, D, V]``
        float32 draft logits per block position, ``roots`` the anchors, ``budgets`` the draft
        nodes of each, ``vocab_map`` ``[V]`` the target id of each draft id, ``heads`` DSpark's
        (None: DFlash). Returns each tree's node count and its tokens, parents and survivals
        ``[B, budget + 1]`` (root first; a row past its count is unused)."""
        batch, positions, vocab = base.shape
        cap = max(budgets, default=0) + 1
        counts = torch.empty(batch, dtype=torch.long)
        tokens, parents = (torch.empty(batch, cap, dtype=torch.long) for _ in range(2))
        survival = torch.empty(batch, cap, dtype=torch.float64)
        base, vocab_map = base.float().contiguous(), vocab_map.long().contiguous()
        roots_t, budgets_t = (torch.tensor(list(v), dtype=torch.long) for v in (roots, budgets))
        h = heads or TreeHeads()
        mode = 0 if heads is None else 1 if h.confidence is not None else 2
        rank = 0 if h.codes is None else h.codes.shape[1]
        temperatures = 0 if h.temperatures is None else len(h.temperatures)
        failed = self._lib.tandem_greedy_trees(
            base.data_ptr(), batch, positions, vocab, roots_t.data_ptr(), budgets_t.data_ptr(), topk, depth,
            vocab_map.data_ptr(), _pointer(h.to_draft), _pointer(h.codes), _pointer(h.packed_bias), rank,
            0 if h.codes is None else _f32(h.codes), self._wide, torch.get_num_threads(), mode,
            _pointer(h.confidence), _pointer(h.confidence_code), _pointer(h.temperatures), temperatures, cap,
            counts.data_ptr(), tokens.data_ptr(), parents.data_ptr(), survival.data_ptr(),
        )  # fmt: skip
        if failed:
            raise MemoryError("tandem_greedy_trees could not allocate its working memory")
        return counts.tolist(), tokens, parents, survival

    def rope_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        starts: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        tables: torch.Tensor,
        tree: torch.Tensor,
        first: torch.Tensor | None,
        scale: float,
    ) -> torch.Tensor:
        """One attention layer after its projections: RoPE on ``q`` ``[B, T, H, D]`` and ``k``
        ``[B, T, Hkv, D]`` (float32 ``cos``/``sin`` ``[B, T, D]``), the new keys and ``v`` stored
        in one layer's block pool ``keys``/``values`` ``[blocks, Hkv, block_size, D]`` at
        positions ``starts`` ``[B]`` on of the rows whose blocks ``tables`` ``[B, n]`` lists,
        then attention: query ``(b, t)`` sees its row's prefix from ``first[b, t]`` on (None:
        all of it) and the new tokens ``tree`` ``[B, T, T]`` shows it. Returns ``[B, T, H * D]``."""
        batch, steps, heads, dim = q.shape
        (q, ldq), (k, ldk), (v, ldv) = (_token_rows(t) for t in (q, k, v))
        cos, sin = (t.contiguous() for t in rope)
        tree = tree.contiguous()
        out = torch.empty(batch, steps, heads * dim, dtype=q.dtype, device=q.device)
        self._lib.tandem_rope_attention(
            q.data_ptr(), ldq, k.data_ptr(), ldk, v.data_ptr(), ldv, cos.data_ptr(), sin.data_ptr(),
            starts.data_ptr(), keys.data_ptr(), values.data_ptr(), tables.data_ptr(), tables.shape[1],
            keys.shape[2], batch, heads, keys.shape[1], steps, dim, _pointer(first), tree.data_ptr(),
            scale, out.data_ptr(), torch.get_num_threads(), _f32(q),
        )  # fmt: skip
        return out

    def layers(
        self,
        plan: StepPlan,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        local_rope: tuple[torch.Tensor, torch.Tensor] | None,
        tree: torch.Tensor,
        local_tree: torch.Tensor | None,
        local_first: torch.Tensor | None,
        starts: torch.Tensor,
        tables: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        keep: Sequence[torch.Tensor | None],
    ) -> None:
        """Every decoder layer of a pass in one call, bit-identical to running the modules on
        these kernels: ``x`` ``[B, T, hidden]`` (contiguous) is updated in place; ``keys``/``values``
        the whole pool ``[layers, blocks, Hkv, block_size, D]``; ``keep[i]``: a tensor like ``x``
        to copy the hidden states after layer ``i`` into, or None. Sliding-window layers use
        ``local_rope``, ``local_tree`` and ``local_first``; the rest as :meth:`rope_attention`."""
        batch, steps, _ = x.shape
        cos, sin = (t.contiguous() for t in rope)
        local_cos, local_sin = (cos, sin) if local_rope is None else (t.contiguous() for t in local_rope)
        tree = tree.contiguous()
        local_tree = tree if local_tree is None else local_tree.contiguous()
        kept = (ctypes.c_void_p * len(keep))(*(None if t is None else t.data_ptr() for t in keep))
        self._lib.tandem_layers(
            ctypes.byref(plan.struct), x.data_ptr(), batch, steps, cos.data_ptr(), sin.data_ptr(),
            local_cos.data_ptr(), local_sin.data_ptr(), tree.data_ptr(), local_tree.data_ptr(), _pointer(local_first),
            starts.data_ptr(), tables.data_ptr(), tables.shape[1], keys.data_ptr(), values.data_ptr(), keys.shape[1],
            keys.shape[3], kept, torch.get_num_threads(),
        )  # fmt: skip

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
        rows = x.contiguous()
        out = torch.empty_like(rows)
        dim = x.shape[-1]
        self._lib.tandem_rms_norm(
            rows.data_ptr(), rows.numel() // dim, dim, weight.data_ptr(), eps, offset, out.data_ptr(), _f32(rows)
        )
        return out

    def act_mul(self, gate_up: torch.Tensor, gelu: bool) -> torch.Tensor:
        """``act(gate) * up`` for ``gate_up`` ``[..., 2I]`` (gate first)."""
        rows = gate_up.contiguous()
        half = rows.shape[-1] // 2
        out = torch.empty(*rows.shape[:-1], half, dtype=rows.dtype, device=rows.device)
        self._lib.tandem_act_mul(
            rows.data_ptr(), rows.numel() // rows.shape[-1], half, int(gelu), out.data_ptr(), _f32(rows)
        )
        return out


@functools.cache
def exact_kernels(isa: str | None = None) -> ExactKernels:
    """The kernels, built on first use (about a second) and cached in ``$TANDEM_CACHE/kernels``,
    with the linear tiles ``isa`` asks for (None: :func:`_isa`'s choice); :class:`KernelUnavailable`
    says why not."""
    library, key = _build()
    return ExactKernels(ctypes.CDLL(str(library)), _isa(isa), key)


if __name__ == "__main__":  # `python -m tandem.kernels.cpu`: build now (e.g. into an image), say how it went
    try:
        exact_kernels()
        print(f"exact kernels built in {cache_root() / 'kernels'} ({exact_kernels().isa} linear tiles)")
    except KernelUnavailable as exc:
        print(f"exact kernels not built: {exc}")
