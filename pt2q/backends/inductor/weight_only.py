"""Lower `linear(x, pt2q.dequantize_weight(...), b)` to fused weight-only CPU kernels (pass `LowerWeightOnly`).

Each pair (see pt2q/ops.py for the packed layout) becomes, when a kernel fits the format and the shapes:

    x2 = reshape(x, [-1, K])                       # any leading shape [..., K]; skipped for 2-D x
    y  = pt2q.int{4,8}_linear_{avx2,avx512}(x2, words, scales, zero_terms, group, N)   # pt2q's own, x as is
    xa = x2.to(activation_dtype)                   # ATen's: skipped when x already has it
    y  = aten._weight_int8pack_mm(xa, w_int8, scales)                        # W8, per output channel, sym
    y  = aten._weight_int4pack_mm_for_cpu(xa, w_int4pack, g, scales_and_zeros)  # W4 int, grouped
    y  = reshape(y.to(x.dtype) + b, [..., N])      # bias added after the cast back, in x's dtype

and otherwise stays `dequantize_weight + linear`, with one INFO log line per layer giving the reason.

Which kernel is data: `KERNEL_CHOICES[vector ISA][regime][bits]` lists the kernels to try, fastest first
(measured, see the table's comment), for the ISA `pt2q.isa.detect().vector_isa` reports (ATen's dispatch
level, so ATEN_CPU_CAPABILITY=avx2 selects the AVX2 row on an AVX-512 machine) and the regime: "decode"
when x has one row (static), where pt2q's kernels are fastest, else "batch", where ATen's are. Each
candidate packs its constants (`KernelSpec.prepare`), runs the self-check, and passes the layer to the next
one when it cannot take it.
`LowerWeightOnly(kernels=...)` (or PT2Q_WEIGHT_ONLY_KERNELS) restricts the choice: "aten", "pt2q", or kernel
names. `LowerWeightOnly.report` lists per linear node the kernel chosen or the reasons none was
(`WeightOnlyReport.kernels()`; `compiled.weight_only_kernels` after `backends.inductor.compile`).

pt2q's kernels (pt2q/backends/inductor/kernels: C++ with AVX2+FMA and AVX-512 paths, built on first use with
torch's extension toolchain; ATen's kernels are used when no compiler is there, noted once in
`report.notes`): int4 and int8, symmetric or asymmetric, groups along K of 8k dividing the block (AVX2
int4: 8/16/32) or multiples of it (64, 128, ...; AVX-512 blocks are twice as wide), per channel, any N, any
K (x's missing columns are zeros); x fp32 / bf16 / fp16 in, output in x's dtype, fp32 accumulation: exact to
fp32 rounding against x @ dequantized W.T (the self-check bound is the fp32 one for fp32 x). Why our own:
ATen's int4 / int8 weight-only kernels are vectorized well only for AVX-512 with bf16 x; under AVX2 the int4
kernel was about as fast as bf16 Inductor. The ATen weights are repacked here, once: `w_int8 = code - 128`;
`w_int4pack = aten._convert_weight_to_int4pack_for_cpu(codes, 1)`; pt2q's by `kernels.pack`.
Decode step of the LLaMA-shaped model of tools/bench_weight_only.py (batch 1, 1 thread, CPU ms, Zen 4;
AVX2 = ATEN_CPU_CAPABILITY=avx2, Inductor following it): fp32 / bf16 Inductor 22.8 / 17.3 (AVX2: 24.1 /
15.9); pt2q kernels W8 6.6, W4 g32 6.7, W4 g128 5.8 (AVX2: 6.8 / 6.8 / 6.2); ATen's kernels W8 12.3, W4
g32 7.3, g128 6.9 (AVX2: 13.0 / 14.2 / 14.2).

ATen's kernel arithmetic (torch 2.13, read from aten/src/ATen/native/cpu/int{8,4}mm_kernel.cpp and
checked numerically here):
- `_weight_int8pack_mm(x, w, s)[m, n] = sum_k x[m, k] * (w[n, k] * s[n])`, `w` int8 `[N, K]`, `s` `[N]` in
  x's dtype. pt2q's symmetric code `c` dequantizes to `(c - 128) * scale`, so `w = c - 128` is exact.
- `_weight_int4pack_mm_for_cpu(x, wp, g, sz)` uses `W[n, k] = (q[n, k] - 8) * sz[k // g, n, 0] + sz[k // g, n, 1]`
  with `q` the unsigned code in [0, 16). pt2q's `(q - zp) * scale` is therefore
  `sz[..., 0] = scale, sz[..., 1] = (8 - zp) * scale` (0 for symmetric formats, whose zp is 8).

What ATen's kernels accept (checked on this torch; the pass tries the next kernel when any fails):
- int8: bits 8, integer codes, symmetric, one scale per output channel (group_size -1, or one group
  spanning K), group_dim 1, N > 8 (Inductor inlines a 1-D constant of <= 8 elements, here the scales,
  as a computed value that its `_weight_int8pack_mm` lowering does not accept). With bf16 activations
  K must be a multiple of 16: the AVX-512 kernel reads 16 activations and 16 weights per step with
  *aligned* loads and no tail, so another K reads past the rows (wrong results for K=8/24/40, a
  segfault for K=7/30). With fp32 activations (a scalar loop) any K.
- int4: bits 4, integer codes (sym or asym), group_dim 1, N a multiple of 16 (weight conversion), kernel
  group g in {32, 64, 128, 256} with K a multiple of g. A format group that is a multiple of such a g
  (e.g. 512, or -1 = per channel) is lowered with its scales repeated over g-wide kernel groups
  (exact); a K that is not a multiple of the group (a zero-padded last group, e.g. K=576 with g128) runs
  on K padded to whole groups with x padded by zeros (exact); a group of 16 falls back.
- Anything else (2/3/5/6/7 bits, nf4/fp4 code tables, group_dim 0, asymmetric int8, grouped int8, x not
  fp32/bf16/fp16 or without shape metadata) keeps dequantize + linear.

Precision trade-off of ATen's kernels (`activation_dtype`, default bfloat16; pt2q's kernels take x in
its own dtype and ignore it). On x86 both ATen kernels are vectorized only for
bf16 activations; their fp32 (and fp16) paths are scalar loops. Measured on the 2-core dev machine,
batch 1, N=5632, K=2048: F.linear fp32 2.1 ms, bf16 0.68 ms; `_weight_int8pack_mm` 4.8 ms with fp32 x,
0.30 ms with bf16 x and scales; `_weight_int4pack_mm_for_cpu` 10 ms with fp32 x, 0.36 ms with bf16 x and
scales_and_zeros. So by default x (and the scales, zeros) are cast to bf16 around the kernel and the
result cast back: each output then carries bf16 rounding of x, of the scales and of the output
(about 2**-9 relative per element; ~2e-3 relative error per layer against the fp32 dequantize path).
`activation_dtype=torch.float32` is exact to fp32 rounding but slower than the unlowered fp32 linear.

`dynamic_activations=True` asks for int8 dynamic activations x int4 weights (torchao's
`torchao.da8w4_linear_cpu`). pt2q uses it only when the installed torchao has a CPU kernel for it; the
torchao 0.18.0 wheel this project pins registers the schema without one, and pt2q does not wire that
kernel yet, so 4-bit layers use the int4 kernels and the reason is logged once per pass run.

Inputs in the activation dtype already (a bf16 model) are passed to the int8 kernel without a copy:
its aligned loads then need the rows of x to start on 32-byte boundaries, which holds for every tensor
the CPU allocator or Inductor allocates (64-byte aligned, K a multiple of 16) but not for a view at an
odd element offset.
"""
from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassResult

from ... import meta
from ...graph import add_constant, drop_unused_attribute, get_constant
from ...isa import detect
from ...ops import DEQUANTIZE_WEIGHT, unpack_codes
from . import kernels as kernel_library

log = logging.getLogger(__name__)

aten = torch.ops.aten

__all__ = ["INT4_GROUP_SIZES", "INT4_KERNEL", "INT8_KERNEL", "KERNELS", "KERNEL_CHOICES", "KernelSpec",
           "LowerWeightOnly", "PT2Q_INT4_AVX2", "PT2Q_INT4_AVX512", "PT2Q_INT8_AVX2", "PT2Q_INT8_AVX512",
           "WeightOnlyLayer", "WeightOnlyReport", "da8w4_available"]

INT8_KERNEL = "_weight_int8pack_mm"
INT4_KERNEL = "_weight_int4pack_mm_for_cpu"
PT2Q_INT8_AVX2, PT2Q_INT4_AVX2 = "pt2q::int8_linear_avx2", "pt2q::int4_linear_avx2"
PT2Q_INT8_AVX512, PT2Q_INT4_AVX512 = "pt2q::int8_linear_avx512", "pt2q::int4_linear_avx512"
INT4_GROUP_SIZES = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu accepts; largest first
INT4_N_MULTIPLE = 16                   # _convert_weight_to_int4pack_for_cpu: N divisible by 16
INT8_BF16_K_MULTIPLE = 16              # the AVX-512 bf16 int8 kernel: 16 per step, aligned, no tail
# Inductor inlines 1-D constants of <= 8 elements as computed values (GraphLowering.can_inline_constant)
# and its _weight_int8pack_mm lowering does not realize its `scales` argument: the compile fails.
INT8_MIN_N = 9
ACTIVATION_DTYPES = (torch.bfloat16, torch.float32)
_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Self-check bound (relative error of the kernel on 2 random rows against x @ W.T in fp32): far above
# the expected ~2e-3 (bf16) / ~3e-7 (fp32), far below what a wrong formula or layout gives (>0.3).
_SELF_CHECK_TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 1e-4}
_SELF_CHECK_ROWS = 64


@dataclass(frozen=True)
class KernelSpec:
    """One weight-only kernel: its report name, who provides it, the weight bits it takes, the vector ISA
    its packing is for (pt2q's kernels) and the LowerWeightOnly method that packs a layer's constants."""

    name: str
    provider: str       # "aten" or "pt2q"
    bits: int
    isa: str | None
    prepare: str


KERNELS = {spec.name: spec for spec in (
    KernelSpec(INT8_KERNEL, "aten", 8, None, "_prepare_aten_int8"),
    KernelSpec(INT4_KERNEL, "aten", 4, None, "_prepare_aten_int4"),
    KernelSpec(PT2Q_INT8_AVX2, "pt2q", 8, "avx2", "_prepare_pt2q"),
    KernelSpec(PT2Q_INT4_AVX2, "pt2q", 4, "avx2", "_prepare_pt2q"),
    KernelSpec(PT2Q_INT8_AVX512, "pt2q", 8, "avx512", "_prepare_pt2q"),
    KernelSpec(PT2Q_INT4_AVX512, "pt2q", 4, "avx512", "_prepare_pt2q"),
)}
# Vector ISA (pt2q.isa.detect().vector_isa) -> regime -> weight bits -> kernels to try, fastest first; a
# kernel that does not take the layer (shape limits, self-check, no compiler) passes it to the next.
# "decode": x has one row ([1, K] or [1, 1, K], static), the memory-bound GEMV; "batch": more rows, or a
# row count not known when lowering. Measured on the AVX-512 dev machine (Zen 4), 1 thread, N x K = 5632 x
# 2048, CPU time per call (ms):
#                     M=1 int4 g32 / int8   M=4 int4 / int8   M=8 int4 / int8   (bf16 F.linear M=1 / 8: 2.3 / 2.2)
#   ATen (bf16 x)            0.69 / 1.23        1.13 / 1.69       2.22 / 3.30
#   pt2q avx512              0.49 / 0.36        2.15 / 1.85       3.99 / 3.38
#   ATEN_CPU_CAPABILITY=avx2:
#   ATen (bf16 x)            1.52 / 1.31        1.85 / 2.88       4.11 / 4.84
#   pt2q avx2                0.51 / 0.47        3.13 / 2.80       6.03 / 4.27
# pt2q's kernels compute in fp32 (one FMA per weight per row); ATen's in bf16 with wider dot products, which
# wins once a weight serves several rows.
KERNEL_CHOICES = {
    "avx512": {"decode": {8: (PT2Q_INT8_AVX512, INT8_KERNEL), 4: (PT2Q_INT4_AVX512, INT4_KERNEL)},
               "batch": {8: (INT8_KERNEL, PT2Q_INT8_AVX512), 4: (INT4_KERNEL, PT2Q_INT4_AVX512)}},
    "avx2": {"decode": {8: (PT2Q_INT8_AVX2, INT8_KERNEL), 4: (PT2Q_INT4_AVX2, INT4_KERNEL)},
             "batch": {8: (INT8_KERNEL, PT2Q_INT8_AVX2), 4: (INT4_KERNEL, PT2Q_INT4_AVX2)}},
    "default": {"decode": {8: (INT8_KERNEL,), 4: (INT4_KERNEL,)},
                "batch": {8: (INT8_KERNEL,), 4: (INT4_KERNEL,)}},
}
REGIMES = ("decode", "batch")
KERNEL_SETS = ("auto", "pt2q", "aten")
KERNELS_ENV = "PT2Q_WEIGHT_ONLY_KERNELS"


def _kernel_selection(value) -> str | tuple[str, ...]:
    """"auto" / "pt2q" / "aten", or a tuple of kernel names, from the `kernels` option (None: the env)."""
    source = "kernels"
    if value is None:
        value, source = os.environ.get(KERNELS_ENV, "auto"), KERNELS_ENV
    if isinstance(value, str):
        value = value.strip()
        if value in KERNEL_SETS:
            return value
        value = [name.strip() for name in value.split(",") if name.strip()]
    names = tuple(value)
    unknown = [name for name in names if name not in KERNELS]
    if unknown or not names:
        raise ValueError(f"LowerWeightOnly {source}={value!r}: unknown weight-only kernel(s) {unknown}; use one of "
                         f"{', '.join(KERNEL_SETS)} or kernel names from {', '.join(KERNELS)}")
    return names


@dataclass(frozen=True)
class _Layer:
    """One linear's packed weight and what the kernels need to know about it."""

    packed: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    code_table: torch.Tensor | None
    bits: int
    group_size: int
    out_features: int
    in_features: int
    x_dtype: torch.dtype
    layout: tuple  # (bits, group_size, shape, group_dim) as the dequantize node has them


@dataclass(frozen=True)
class _Prepared:
    """A kernel ready for one layer: its op, graph constants, how its arguments are built from x and the
    constants (`make_args(x, constants)`: works on tensors and on graph nodes alike), the dtype x is cast to,
    the K x is zero-padded to, and the kernel group (reported)."""

    op: Any
    constants: tuple
    make_args: Callable
    run_dtype: torch.dtype
    padded_k: int
    kernel_group: int | None
    hint: str


def da8w4_available() -> bool:
    """Whether torchao's int8-activation x int4-weight CPU kernel (`torchao::da8w4_linear_cpu`) has a CPU
    implementation in this process (the schema alone is registered by torchao wheels built without it)."""
    try:
        importlib.import_module("torchao")  # registers torch.ops.torchao
        return torch._C._dispatch_has_kernel_for_dispatch_key("torchao::da8w4_linear_cpu", "CPU")
    except Exception:  # noqa: BLE001 - no torchao, or no such op: not available
        return False


@dataclass(frozen=True)
class WeightOnlyLayer:
    """One linear: the kernel it runs (`None`: kept as dequantize + linear) and why, or a note."""

    kernel: str | None
    reason: str = ""
    bits: int = 0
    group_size: int = 0
    dtype: str = "int"
    sym: bool = True
    shape: tuple = ()
    kernel_group_size: int | None = None  # the int4 kernel's group (may divide the format's group)

    @property
    def lowered(self) -> bool:
        return self.kernel is not None

    def describe(self) -> str:
        return self.kernel if self.kernel is not None else f"fallback: {self.reason}"


@dataclass
class WeightOnlyReport:
    """Per linear node name, what `LowerWeightOnly` did; `notes` holds pass-wide remarks (e.g. da8w4)."""

    activation_dtype: torch.dtype = torch.bfloat16
    dynamic_activations: bool = False
    isa: str = ""                     # the vector ISA the kernel table was read for
    selection: str | tuple = "auto"   # which kernels were allowed (LowerWeightOnly's `kernels`)
    layers: dict[str, WeightOnlyLayer] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def kernels(self) -> dict[str, str]:
        """{linear node name: kernel name, or "fallback: <reason>"}."""
        return {name: layer.describe() for name, layer in self.layers.items()}

    @property
    def lowered(self) -> dict[str, WeightOnlyLayer]:
        return {name: layer for name, layer in self.layers.items() if layer.lowered}

    @property
    def fallbacks(self) -> dict[str, str]:
        return {name: layer.reason for name, layer in self.layers.items() if not layer.lowered}

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for layer in self.layers.values():
            key = layer.kernel or "fallback"
            counts[key] = counts.get(key, 0) + 1
        return counts


class _Fallback(Exception):
    """A layer no kernel takes; the message is the reason."""


_DEQUANTIZE_ARGS = tuple(argument.name for argument in DEQUANTIZE_WEIGHT._schema.arguments)


def _dequantize_args(node: Node) -> tuple:
    """The 8 arguments of a dequantize_weight node, in schema order, whether passed by position or name."""
    values = list(node.args)
    for name in _DEQUANTIZE_ARGS[len(values):]:
        values.append(node.kwargs.get(name))
    return tuple(values)


def _activation_dtype(value) -> torch.dtype:
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
    dtype = names.get(value, value) if isinstance(value, str) else value
    if dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"weight-only activation dtype {value!r} is not supported; use torch.bfloat16 (fast, "
                         "the default) or torch.float32 (exact, slow: the kernels' fp32 paths are scalar)")
    return dtype


def _format_of(dequantize: Node, code_table: torch.Tensor | None) -> tuple[str, bool]:
    """(dtype name, symmetric) of a dequantize node: from its WeightFormat when recorded, else its inputs."""
    fmt = dequantize.meta.get(meta.WEIGHT_FORMAT)
    zero_point = _dequantize_args(dequantize)[2]
    if fmt is not None:
        return fmt.dtype, zero_point is None
    if code_table is None:
        return "int", zero_point is None
    from ...algorithms.rtn import CODE_TABLES

    for name, table in CODE_TABLES.items():
        if code_table.numel() == len(table) and torch.allclose(code_table.float(), torch.tensor(table)):
            return name, True
    return "table", True


class LowerWeightOnly:
    """Rewrite `pt2q.dequantize_weight -> aten.linear` pairs into weight-only CPU kernels (see the module
    docstring). `report` is a `WeightOnlyReport`.

    activation_dtype: the dtype ATen's kernels run in (bfloat16, default: fast; float32: exact, slow).
        pt2q's own kernels take x in its own dtype and accumulate in fp32 whatever this says.
    dynamic_activations: int8 dynamic activations for 4-bit weights when torchao's da8w4 CPU kernel exists.
    verify: run each chosen kernel once on two random inputs against pt2q's dequantized weight (64 sampled
        output channels) and fall back when it disagrees: guards against a kernel contract changed in
        another torch. Cheap (one kernel call and a 64-row dequantize per layer).
    kernels: which kernels may be used (see `KERNEL_CHOICES`): "auto" (the table's row for this CPU's
        vector ISA, fastest first), "pt2q" (only pt2q's own), "aten" (only ATen's), or kernel names in the
        order to try them (a list, or one comma-separated string), e.g. ["pt2q::int4_linear_avx2"]. None
        (default): the environment variable PT2Q_WEIGHT_ONLY_KERNELS, else "auto".
    """

    name = "lower_weight_only"

    def __init__(self, *, activation_dtype=torch.bfloat16, dynamic_activations: bool = False,
                 verify: bool = True, kernels=None):
        self.activation_dtype = _activation_dtype(activation_dtype)
        self.dynamic_activations = dynamic_activations
        self.verify = verify
        self.kernels = _kernel_selection(kernels)
        self.isa = detect().vector_isa
        self.report = WeightOnlyReport(self.activation_dtype, dynamic_activations, self.isa, self.kernels)

    def candidates(self, bits: int, regime: str = "decode") -> tuple[str, ...]:
        """The kernels tried for `bits`-bit weights in `regime` ("decode": one row of x; "batch"), in order."""
        if isinstance(self.kernels, tuple):
            return tuple(name for name in self.kernels if KERNELS[name].bits == bits)
        row = KERNEL_CHOICES[self.isa][regime].get(bits, ())
        if self.kernels == "auto":
            return row
        return tuple(name for name in row if KERNELS[name].provider == self.kernels)

    # -- the pass --------------------------------------------------------------------------------------
    def call(self, graph_module: GraphModule) -> PassResult:
        self.report = WeightOnlyReport(self.activation_dtype, self.dynamic_activations, self.isa, self.kernels)
        graph = graph_module.graph
        modified = False
        for dequantize in list(graph.find_nodes(op="call_function", target=DEQUANTIZE_WEIGHT)):
            linears = [user for user in dequantize.users
                       if user.target is aten.linear.default and len(user.args) > 1 and user.args[1] is dequantize]
            for linear in linears:
                try:
                    layer = self._lower(graph_module, dequantize, linear)
                    modified = True
                except _Fallback as reason:
                    layer = self._describe(graph_module, dequantize, None, str(reason))
                    log.info("pt2q weight-only: %s keeps dequantize + linear: %s", linear.name, reason)
                self.report.layers[linear.name] = layer
            if not dequantize.users:
                self._erase_with_inputs(graph_module, dequantize)
        if modified:
            graph.lint()
            graph_module.recompile()
        if self.report.layers:
            log.info("pt2q weight-only kernels (%s ISA, %s): %s", self.isa,
                     self.kernels if isinstance(self.kernels, str) else ",".join(self.kernels), self.report.counts())
        return PassResult(graph_module, modified)

    def _note(self, note: str) -> None:
        """A pass-wide remark, logged and recorded once per pass run."""
        if note not in self.report.notes:
            self.report.notes.append(note)
            log.info("pt2q weight-only: %s", note)

    def _dynamic_activations_note(self) -> str:
        """Why a 4-bit layer runs a weight-only int4 kernel despite `dynamic_activations`."""
        if not self.dynamic_activations:
            return ""
        if da8w4_available():
            note = ("dynamic_activations: torchao's da8w4_linear_cpu kernel is present but pt2q does not lower "
                    "to it yet; 4-bit layers use the weight-only int4 kernels")
        else:
            note = ("dynamic_activations: torchao's da8w4_linear_cpu has no CPU kernel in this torchao build; "
                    "4-bit layers use the weight-only int4 kernels")
        self._note(note)
        return note

    # -- one layer -------------------------------------------------------------------------------------
    def _describe(self, gm, dequantize: Node, kernel, reason, kernel_group=None) -> WeightOnlyLayer:
        _, _, _, table_node, bits, group_size, shape, _ = _dequantize_args(dequantize)
        dtype, sym = _format_of(dequantize, get_constant(gm, table_node))
        return WeightOnlyLayer(kernel, reason, bits, group_size, dtype, sym, tuple(shape), kernel_group)

    def _lower(self, gm: GraphModule, dequantize: Node, linear: Node) -> WeightOnlyLayer:
        args = _dequantize_args(dequantize)
        packed_node, scale_node, zero_node, table_node, bits, group_size, shape, group_dim = args
        constants = [get_constant(gm, node) for node in (packed_node, scale_node, zero_node, table_node)]
        if constants[0] is None or constants[1] is None or any(
                node is not None and value is None for node, value in zip((zero_node, table_node), constants[2:])):
            raise _Fallback("the packed weight, scales or zero points are not graph constants")
        packed, scale, zero_point, code_table = constants
        dtype, sym = _format_of(dequantize, code_table)
        out_features, in_features = shape
        if code_table is not None or dtype != "int":
            raise _Fallback(f"{dtype} code table: no CPU kernel takes a code table")
        if group_dim != 1:
            raise _Fallback("group_dim=0 (groups along the output dimension): the kernels group along K")
        if bits not in (4, 8):
            raise _Fallback(f"{bits}-bit weights: the CPU kernels take 8-bit or 4-bit weights")
        x = linear.args[0]
        x_val = x.meta.get("val") if isinstance(x, Node) else None
        if not isinstance(x_val, torch.Tensor):
            raise _Fallback("the input has no shape metadata ('val')")
        if x_val.dim() < 1 or x_val.dtype not in _INPUT_DTYPES or x_val.shape[-1] != in_features:
            raise _Fallback(f"input {x_val.dtype} {tuple(x_val.shape)} is not a float [..., {in_features}] tensor")
        layer = _Layer(packed, scale, zero_point, code_table, bits, group_size, out_features, in_features,
                       x_val.dtype, tuple(args[4:]))
        rows = 1
        for size in x_val.shape[:-1]:
            rows = rows * size
        regime = "decode" if isinstance(rows, int) and rows == 1 else "batch"
        candidates = self.candidates(bits, regime)
        if not candidates:
            raise _Fallback(f"no {bits}-bit kernel selected (kernels={self.kernels!r}, {self.isa} ISA, {regime})")
        rejected = []
        for name in candidates:
            try:
                prepared = getattr(self, KERNELS[name].prepare)(KERNELS[name], layer)
                if self.verify:
                    self._self_check(prepared, layer)
            except _Fallback as reason:
                rejected.append(f"{name}: {reason}")
                continue
            self._rewrite(gm, linear, prepared, x_val, out_features, in_features)
            note = "; ".join([*(f"not {line}" for line in rejected),
                              *([self._dynamic_activations_note()] if bits == 4 and self.dynamic_activations else [])])
            return WeightOnlyLayer(name, note, bits, group_size, dtype, sym, tuple(shape), prepared.kernel_group)
        raise _Fallback("; ".join(rejected))

    # -- per kernel: constants and call ---------------------------------------------------------------
    def _prepare_aten_int8(self, spec, layer: _Layer) -> _Prepared:
        scale, out_features, in_features = layer.scale, layer.out_features, layer.in_features
        if layer.zero_point is not None:
            raise _Fallback("asymmetric 8-bit: _weight_int8pack_mm has no zero point")
        if scale.shape[1] != 1:  # group_size -1, or one group spanning K
            raise _Fallback(f"8-bit with group_size={layer.group_size}: _weight_int8pack_mm takes one scale per "
                            "output channel")
        if out_features < INT8_MIN_N:
            raise _Fallback(f"N={out_features} < {INT8_MIN_N}: Inductor inlines its {out_features} scales as a "
                            "computed value, which its _weight_int8pack_mm lowering cannot take")
        if self.activation_dtype == torch.bfloat16 and in_features % INT8_BF16_K_MULTIPLE:
            raise _Fallback(f"K={in_features} is not a multiple of {INT8_BF16_K_MULTIPLE}, which the bf16 "
                            "_weight_int8pack_mm kernel needs (aligned 16-wide loads, no tail)")
        codes = unpack_codes(layer.packed, 8)[:, :in_features]
        weight = (codes - 128).to(torch.int8).contiguous()
        scales = scale[:out_features, 0].to(self.activation_dtype).contiguous()
        return _Prepared(aten._weight_int8pack_mm.default, (("weight", weight), ("scales", scales)),
                         lambda x, consts: (x, *consts), self.activation_dtype, in_features, None, "w8")

    def _prepare_aten_int4(self, spec, layer: _Layer) -> _Prepared:
        scale, zero_point = layer.scale, layer.zero_point
        out_features, in_features, group_size = layer.out_features, layer.in_features, layer.group_size
        if out_features % INT4_N_MULTIPLE:
            raise _Fallback(f"N={out_features} is not a multiple of {INT4_N_MULTIPLE} "
                            "(_convert_weight_to_int4pack_for_cpu)")
        per_channel = group_size == -1 or scale.shape[1] == 1  # one group spanning K
        width = in_features if per_channel else group_size
        # A zero-padded last group: the kernel runs on K padded to whole groups, x padded with zeros (exact:
        # the padding columns multiply zeros).
        padded_k = in_features if per_channel else -(-in_features // group_size) * group_size
        fits = [g for g in INT4_GROUP_SIZES if width % g == 0 and padded_k % g == 0]
        if not fits:
            raise _Fallback(f"group_size={group_size} with K={in_features}: _weight_int4pack_mm_for_cpu takes "
                            f"groups of {', '.join(map(str, sorted(INT4_GROUP_SIZES)))} dividing K")
        kernel_group = fits[0]
        codes = unpack_codes(layer.packed, 4)[:out_features, :padded_k].to(torch.int32).contiguous()
        weight = aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        # kernel group j covers columns [j*g, (j+1)*g), inside format group (j*g) // width
        index = torch.arange(padded_k // kernel_group) * kernel_group // width
        scales = scale[:out_features, index].to(torch.float32)
        zeros = (8.0 - (8.0 if zero_point is None else zero_point[:out_features, index].to(torch.float32))) * scales
        scales_and_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).to(self.activation_dtype).contiguous()
        return _Prepared(aten._weight_int4pack_mm_for_cpu.default,
                         (("weight", weight), ("scales_and_zeros", scales_and_zeros)),
                         lambda x, consts: (x, consts[0], kernel_group, consts[1]), self.activation_dtype, padded_k,
                         kernel_group, "w4")

    def _prepare_pt2q(self, spec, layer: _Layer) -> _Prepared:
        try:
            op = kernel_library.kernel_op(spec.bits, spec.isa)
        except kernel_library.KernelsUnavailable as error:
            self._note(str(error))
            raise _Fallback("pt2q's kernels could not be built (see the pass notes)") from None
        per_channel = layer.group_size == -1 or layer.scale.shape[1] == 1  # one group spanning K
        group = -1 if per_channel else layer.group_size
        if not per_channel and not kernel_library.fits_group(group, spec.bits, spec.isa):
            block = kernel_library.block_columns(spec.bits, spec.isa)
            raise _Fallback(f"group_size={group}: takes groups that are multiples of its {block}-column block, "
                            f"or divisors of it in steps of {kernel_library.LANES[spec.isa]}")
        codes = unpack_codes(layer.packed, spec.bits)[:layer.out_features, :layer.in_features]
        words, scales, zero_terms, kernel_group = kernel_library.pack(
            codes, layer.scale[:layer.out_features], None if layer.zero_point is None else
            layer.zero_point[:layer.out_features], spec.bits, group, spec.isa)
        out_features = layer.out_features
        return _Prepared(op, (("words", words), ("scales", scales), ("zero_terms", zero_terms)),
                         lambda x, consts: (x, *consts, kernel_group, out_features), layer.x_dtype, layer.in_features,
                         kernel_group, f"w{spec.bits}_{spec.isa}")

    def _kernel_call(self, prepared: _Prepared, x: torch.Tensor) -> torch.Tensor:
        return prepared.op(*prepared.make_args(x, [value for _, value in prepared.constants]))

    def _self_check(self, prepared: _Prepared, layer: _Layer) -> None:
        """The kernel on 2 random rows of x against x @ W.T, W dequantized by pt2q's op, on up to
        `_SELF_CHECK_ROWS` output channels spread over N (every kernel needs group_dim 1: rows = channels)."""
        bits, group_size, shape, _ = layer.layout
        rows = torch.linspace(0, shape[0] - 1, min(shape[0], _SELF_CHECK_ROWS)).round().long().unique()
        zero_rows = None if layer.zero_point is None else layer.zero_point[rows]
        reference_weight = DEQUANTIZE_WEIGHT(layer.packed[rows], layer.scale[rows], zero_rows, layer.code_table,
                                             bits, group_size, [len(rows), shape[1]], 1)
        x = torch.randn(2, layer.in_features, generator=torch.Generator().manual_seed(0)).to(prepared.run_dtype)
        with torch.no_grad():
            expected = x.float() @ reference_weight.t()
            padded = torch.nn.functional.pad(x, (0, prepared.padded_k - layer.in_features))
            try:
                actual = self._kernel_call(prepared, padded)
            except RuntimeError as error:
                raise _Fallback(f"rejected the layer: {str(error).splitlines()[0]}") from error
            actual = actual[:, rows].float()
        error = ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()
        if not error <= _SELF_CHECK_TOLERANCE[prepared.run_dtype]:
            raise _Fallback(f"self-check failed: relative error {error:.3g} against the dequantized "
                            "weight (kernel contract changed?)")

    # -- graph surgery ---------------------------------------------------------------------------------
    def _rewrite(self, gm, linear: Node, prepared: _Prepared, x_val, out_features, in_features) -> None:
        graph = gm.graph
        x = linear.args[0]
        bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
        fake_mode = getattr(x_val, "fake_mode", None)
        hint = f"{linear.name}_{prepared.hint}"
        new_nodes: list[Node] = []

        def add(op_or_target, *args, **kwargs) -> Node:
            node = graph.call_function(op_or_target, args, kwargs)
            new_nodes.append(node)
            return node

        def constant(suffix, value) -> Node:
            node = graph.get_attr(add_constant(gm, f"{hint}_{suffix}", value))
            if fake_mode is not None:
                node.meta["val"] = fake_mode.from_tensor(value, static_shapes=True)
            return node

        with graph.inserting_before(linear):
            weight_nodes = [constant(suffix, value) for suffix, value in prepared.constants]
            flat = x if x_val.dim() == 2 else add(aten.reshape.default, x, [-1, in_features])
            if prepared.padded_k != in_features:  # a zero-padded last group (see _prepare_aten_int4)
                flat = add(aten.constant_pad_nd.default, flat, [0, prepared.padded_k - in_features], 0.0)
            cast = flat if x_val.dtype == prepared.run_dtype else \
                add(aten._to_copy.default, flat, dtype=prepared.run_dtype)
            out = add(prepared.op, *prepared.make_args(cast, weight_nodes))
            if x_val.dtype != prepared.run_dtype:
                out = add(aten._to_copy.default, out, dtype=x_val.dtype)
            if bias is not None:
                out = add(aten.add.Tensor, out, bias)
            if x_val.dim() != 2:
                leading = [size if isinstance(size, int) else add(aten.sym_size.int, x, dim)
                           for dim, size in enumerate(x_val.shape[:-1])]
                out = add(aten.reshape.default, out, [*leading, out_features])
        for node in new_nodes:
            for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
                if key in linear.meta:
                    node.meta[key] = linear.meta[key]
            if fake_mode is not None:
                self._propagate_val(node, fake_mode)
        linear.replace_all_uses_with(out)
        graph.erase_node(linear)

    @staticmethod
    def _propagate_val(node: Node, fake_mode) -> None:
        """node.meta['val'] from its inputs' (fake) values, as export records it; left unset on failure."""
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
        try:
            with fake_mode:
                node.meta["val"] = node.target(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - metadata only: the graph itself is still valid
            log.debug("pt2q weight-only: no fake value for %s: %s", node.name, error)

    @staticmethod
    def _erase_with_inputs(gm: GraphModule, dequantize: Node) -> None:
        inputs = [node for node in dequantize.all_input_nodes if node.op == "get_attr"]
        gm.graph.erase_node(dequantize)
        for node in inputs:
            if not node.users:
                target = node.target
                gm.graph.erase_node(node)
                drop_unused_attribute(gm, target)
