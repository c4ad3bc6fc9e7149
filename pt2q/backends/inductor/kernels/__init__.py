"""pt2q's own CPU kernels: fused dequantize + GEMV for packed int4 / int8 weights (x86 AVX2+FMA and
AVX-512), and a fused attention with bf16 dot products (AVX512-BF16).

The C++ (weight_only.cpp, weight_only_body.h, attention.cpp) is compiled on first use with torch's own
extension toolchain (`torch.utils.cpp_extension.load`: the system C++ compiler and ninja; cached in torch's
extension directory, keyed by a hash of the sources), and registers five CPU ops in the `pt2q` namespace:

    pt2q::int4_linear_avx2, pt2q::int8_linear_avx2, pt2q::int4_linear_avx512, pt2q::int8_linear_avx512
    (x [M, K] fp32/bf16/fp16, words, scales, zero_terms, group_size, out_features) -> [M, N] in x's dtype
    pt2q::attention_bf16(q, k, v, mask, scale, is_causal): see attention.cpp and ../attention.py

with fake kernels registered here, so Inductor keeps them as extern calls and the graph exports. `load()`
raises `KernelsUnavailable` (the build error, what to install) when no compiler works; the lowering then
uses ATen's kernels.

Arithmetic: fp32 accumulation of x * code per group, times the group's fp32 scale, minus
scale * zero_point * sum(x over the group); exact to fp32 rounding against x @ dequantize(W).T (only the
summation order differs). Activations smaller than ~1e-30 in magnitude lose precision (they are pre-scaled
by up to 2**-24, see weight_only_body.h). M < 16 rows: GEMV per row against the packed words (decode; the
rows reuse each 4-row weight block from cache, but every row pays the dequantize arithmetic again);
M >= 16: tiles of 64 weight rows are dequantized to fp32 and multiplied with at::mm (prefill). Beyond one
row ATen's bf16 kernels are faster where they apply (the lowering's "batch" regime prefers them).

`pack` writes the layout (weight_only_body.h): per ISA, `LANES[isa]` columns per step, blocks of
`32 / bits * lanes` columns, rows interleaved by 4.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import math
from pathlib import Path

import torch

log = logging.getLogger(__name__)

__all__ = ["KERNEL_OPS", "LANES", "KernelsUnavailable", "block_columns", "fits_group", "kernel_op", "load", "pack"]

_SOURCES = ("weight_only.cpp", "weight_only_body.h", "attention.cpp")
_COMPILED = ("weight_only.cpp", "attention.cpp")
LANES = {"avx2": 8, "avx512": 16}
KERNEL_OPS = {(bits, isa): f"int{bits}_linear_{isa}" for bits in (4, 8) for isa in LANES}


class KernelsUnavailable(RuntimeError):
    """pt2q's C++ weight-only kernels could not be built or loaded in this process."""


def block_columns(bits: int, isa: str) -> int:
    """Columns per packed block: K is padded to a multiple of it."""
    return 32 // bits * LANES[isa]


def fits_group(group_size: int, bits: int, isa: str) -> bool:
    """Whether the kernel takes groups of `group_size` columns: a multiple of the block, or a divisor of
    it that is a whole number of steps (AVX2 int4: 8, 16, 32, or multiples of 64)."""
    block, lanes = block_columns(bits, isa), LANES[isa]
    return group_size > 0 and (group_size % block == 0 or (block % group_size == 0 and group_size % lanes == 0))


@functools.lru_cache(maxsize=None)
def _build() -> str | None:
    """Build and load the extension once per process; None on success, else the error text."""
    here = Path(__file__).parent
    digest = hashlib.sha256(b"".join((here / name).read_bytes() for name in _SOURCES)).hexdigest()[:12]
    try:
        from torch.utils import cpp_extension

        _remove_stale_lock(cpp_extension, f"pt2q_kernels_{digest}")
        cpp_extension.load(name=f"pt2q_kernels_{digest}", sources=[str(here / name) for name in _COMPILED],
                           extra_cflags=["-O3"], extra_include_paths=[str(here)], is_python_module=False,
                           verbose=False)
    except Exception as error:  # noqa: BLE001 - no compiler, no ninja, a build error: all mean "unavailable"
        lines = [line for line in str(error).splitlines() if line.strip()]
        return f"{type(error).__name__}: {' | '.join(lines[-3:])[:600]}"
    for name in KERNEL_OPS.values():
        torch.library.register_fake(f"pt2q::{name}")(_fake)
    torch.library.register_fake("pt2q::attention_bf16")(_fake_attention)
    return None


STALE_LOCK_SECONDS = 600


def _remove_stale_lock(cpp_extension, name: str) -> None:
    """torch's extension build waits, without a limit, for the `lock` file of a build that was killed
    (seen here: a process interrupted mid-build left one, and every later process hung). A lock older
    than STALE_LOCK_SECONDS (a build takes ~30 s) is taken as left over and removed, with a warning."""
    import os
    import time

    lock = Path(cpp_extension._get_build_directory(name, False)) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_SECONDS:
        log.warning("pt2q kernels: removing %s, left %.0f s ago by a build that did not finish", lock, age)
        try:
            os.remove(lock)
        except FileNotFoundError:
            pass


def _fake_attention(q, k, v, mask, scale, is_causal):
    torch._check(q.dim() == 4, lambda: f"pt2q attention kernel: q must be 4-D, got {q.dim()}-D")
    batch, heads, length, width = q.shape
    # the real kernel's layout: [B, S, H, D] memory seen as [B, H, S, D]
    return q.new_empty((batch, length, heads, width)).transpose(1, 2)


def _fake(x, words, scales, zero_terms, group_size, out_features):
    torch._check(x.dim() == 2, lambda: f"pt2q weight-only kernel: x must be 2-D, got {x.dim()}-D")
    return x.new_empty((x.shape[0], out_features))


def load() -> None:
    """Make the `pt2q::int*_linear_*` ops available (compiling them on first use, ~30 s), or raise
    `KernelsUnavailable` naming the build error."""
    error = _build()
    if error is not None:
        raise KernelsUnavailable(
            f"pt2q weight-only kernels (pt2q/backends/inductor/kernels) could not be built with torch's C++ "
            f"extension toolchain: {error}. Install a C++ compiler (g++) and ninja, or use ATen's kernels "
            "(LowerWeightOnly(kernels='aten'), or PT2Q_WEIGHT_ONLY_KERNELS=aten)")


def kernel_op(bits: int, isa: str):
    """The op overload for `bits`-bit weights on `isa` ("avx2" / "avx512"), loading the kernels first."""
    load()
    return getattr(torch.ops.pt2q, KERNEL_OPS[(bits, isa)]).default


def pack(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: int, group_size: int,
         isa: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(words, scales, zero_terms, kernel group) for unsigned `codes` [N, K] (int), `scale` [N, G_format]
    and `zero_point` [N, G_format] (None: symmetric, 2**(bits-1)) with groups of `group_size` columns along
    K (-1: one per row). Columns past K and rows past N are zero codes with zero scales."""
    if bits not in (4, 8) or isa not in LANES:
        raise ValueError(f"pt2q kernels pack: no kernel for {bits}-bit weights on {isa!r}")
    rows, cols = codes.shape
    lanes, per_word = LANES[isa], 32 // bits
    block = block_columns(bits, isa)
    padded_k = math.ceil(cols / block) * block
    group = padded_k if group_size == -1 else group_size
    if not fits_group(group, bits, isa):
        raise ValueError(f"pt2q kernels pack: group_size={group_size} does not fit the {block}-column block")
    groups = math.ceil(padded_k / group)
    padded_n = math.ceil(rows / 4) * 4
    full = torch.zeros(padded_n, padded_k, dtype=torch.int64)
    full[:rows, :cols] = codes.to(torch.int64)
    shifts = torch.arange(per_word, dtype=torch.int64).view(1, 1, per_word, 1) * bits
    words = (full.view(padded_n, padded_k // block, per_word, lanes) << shifts).sum(2)  # [N, blocks, L]
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    words = words.view(padded_n // 4, 4, padded_k // block, lanes).permute(0, 2, 1, 3).contiguous()

    def by_group(values: torch.Tensor) -> torch.Tensor:  # [N, G_format] -> [N/4, groups, 4], zero-padded
        out = torch.zeros(padded_n, groups, dtype=torch.float32)
        width = min(groups, values.shape[1])
        out[:rows, :width] = values[:, :width].to(torch.float32)
        return out.view(padded_n // 4, 4, groups).permute(0, 2, 1).contiguous()

    zero = (torch.full_like(scale, float(1 << (bits - 1)), dtype=torch.float32) if zero_point is None
            else zero_point.to(torch.float32))
    scales = scale.to(torch.float32)
    return words, by_group(scales), by_group(scales * zero), group
