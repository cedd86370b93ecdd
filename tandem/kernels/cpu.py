"""Batch-invariant bf16 kernels for the CPU (``exact_cpu.c``), built once per machine with the
system C compiler and called through ctypes.

Why: in bf16, oneDNN's result for a token depends on how many tokens share the GEMM, so a
verification pass and a one-token decode pass round near-ties differently and speculative output
drifts from plain decoding. These kernels compute every row the same way whatever the pass holds
(see the C file), and read the bf16 weights once for all rows of a pass, so verifying a few
tokens costs about what decoding one does on this kind of CPU (AVX2, no bf16 units).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch

from tandem.cache import cache_root
from tandem.errors import TandemError

SOURCE = Path(__file__).with_name("exact_cpu.c")
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


def _build() -> Path:
    if platform.machine() not in ("x86_64", "AMD64") or not {"avx2", "fma"} <= _cpu_flags():
        raise KernelUnavailable("the exact bf16 kernels need an x86-64 CPU with AVX2 and FMA")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise KernelUnavailable("the exact bf16 kernels need a C compiler (cc or gcc, or $CC)")
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    library = cache_root() / "kernels" / f"exact_cpu-{key}.so"
    if library.is_file():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    partial = library.with_suffix(f".{os.getpid()}.tmp")
    built = subprocess.run([compiler, *FLAGS, "-o", str(partial), str(SOURCE), "-lm"], capture_output=True, text=True)
    if built.returncode != 0:
        raise KernelUnavailable(f"building the exact bf16 kernels failed: {built.stderr.strip()[-400:]}")
    partial.replace(library)  # atomic: concurrent builders each write their own file
    return library


_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "tandem_linear": (_P, _I, _I, _I, _P, _I, _P, _P, _I, ctypes.c_int, ctypes.c_int),
    "tandem_attention": (_P, _I, _I, _I, _P, _P, _P, _I, _I, _I, _I, _I, _I, _I, _P, _F, _P, ctypes.c_int),
    "tandem_rms_norm": (_P, _I, _I, _P, _F, _F, _P),
    "tandem_act_mul": (_P, _I, _I, ctypes.c_int, _P),
}


class ExactKernels:
    """The loaded library; every call takes and returns bf16 CPU tensors."""

    def __init__(self, library: ctypes.CDLL) -> None:
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(library, name)
            fn.argtypes, fn.restype = argtypes, None
        self._lib = library

    @staticmethod
    def pack(weight: torch.Tensor) -> torch.Tensor:
        """``[N, K]`` weights as ``[ceil(N/16), K, 16]`` blocks (zero rows pad the last one)."""
        n, k = weight.shape
        padded = torch.zeros(-(-n // BLOCK) * BLOCK, k, dtype=torch.bfloat16, device=weight.device)
        padded[:n] = weight.detach()
        return padded.view(-1, BLOCK, k).transpose(1, 2).contiguous()

    def linear(
        self, x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None, out_dtype: torch.dtype
    ) -> torch.Tensor:
        """``x @ W.T (+ bias)`` for ``x`` ``[..., K]``; ``out_dtype`` bf16 or float32."""
        rows = x.reshape(-1, x.shape[-1])
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        out = torch.empty(rows.shape[0], n, dtype=out_dtype, device=x.device)
        self._lib.tandem_linear(
            rows.data_ptr(), rows.stride(0), rows.shape[0], rows.shape[1], packed.data_ptr(), n,
            None if bias is None else bias.data_ptr(), out.data_ptr(), n, out_dtype == torch.float32,
            torch.get_num_threads(),
        )  # fmt: skip
        return out.view(*x.shape[:-1], n)

    def attention(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        row_ids: torch.Tensor,
        mask: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """``q`` ``[B, H, T, D]`` over one layer's cache ``keys``/``values`` ``[rows, Hkv, cap, D]``
        (rows ``row_ids``), where ``mask`` ``[B, T, length]`` shows each query its keys; returns
        ``[B, T, H * D]``."""
        batch, heads, steps, dim = q.shape
        if q.stride(-1) != 1:
            q = q.contiguous()
        out = torch.empty(batch, steps, heads * dim, dtype=q.dtype, device=q.device)
        self._lib.tandem_attention(
            q.data_ptr(), q.stride(0), q.stride(1), q.stride(2), keys.data_ptr(), values.data_ptr(),
            row_ids.data_ptr(), batch, heads, keys.shape[1], steps, dim, keys.shape[2], mask.shape[-1],
            mask.contiguous().data_ptr(), scale, out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return out

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
        rows = x.contiguous()
        out = torch.empty_like(rows)
        dim = x.shape[-1]
        self._lib.tandem_rms_norm(
            rows.data_ptr(), rows.numel() // dim, dim, weight.data_ptr(), eps, offset, out.data_ptr()
        )
        return out

    def act_mul(self, gate_up: torch.Tensor, gelu: bool) -> torch.Tensor:
        """``act(gate) * up`` for ``gate_up`` ``[..., 2I]`` (gate first)."""
        rows = gate_up.contiguous()
        half = rows.shape[-1] // 2
        out = torch.empty(*rows.shape[:-1], half, dtype=rows.dtype, device=rows.device)
        self._lib.tandem_act_mul(rows.data_ptr(), rows.numel() // rows.shape[-1], half, int(gelu), out.data_ptr())
        return out


@functools.cache
def exact_kernels() -> ExactKernels:
    """The kernels, built on first use (about a second) and cached in ``$TANDEM_CACHE/kernels``;
    :class:`KernelUnavailable` says why not."""
    return ExactKernels(ctypes.CDLL(str(_build())))


if __name__ == "__main__":  # `python -m tandem.kernels.cpu`: build now (e.g. into an image), say how it went
    try:
        exact_kernels()
        print(f"exact kernels built in {cache_root() / 'kernels'}")
    except KernelUnavailable as exc:
        print(f"exact kernels not built: {exc}")
