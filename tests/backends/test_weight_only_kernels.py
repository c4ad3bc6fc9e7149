"""pt2q's own weight-only kernels (pt2q/backends/inductor/kernels) and the lowering's kernel table.

Tolerances. The reference is x @ W.T in float64, W from pt2q's own dequantize of the same packed codes, x
the very values the kernel sees (bf16 x rounded first). fp32 x: the kernel accumulates in fp32, only the
summation order differs: measured 1e-7 .. 2e-6 relative, bound 1e-5. bf16 / fp16 x: the output is rounded
to x's dtype (2**-9 / 2**-12 relative per element at most), bound 4e-3 / 1e-3. A wrong layout, shift,
scale or zero-point term gives errors of 0.1 and more.

The AVX2 kernels run wherever ATen reports AVX2 or better (on an AVX-512 machine that is AVX2 code on
AVX-512 hardware); the AVX-512 tests skip without AVX-512. One test compiles with Inductor.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import pt2q
from pt2q.algorithms.rtn import WeightFormat, rtn_quantize
from pt2q.backends import inductor
from pt2q.backends.inductor import kernels as kernel_library
from pt2q.backends.inductor import weight_only
from pt2q.backends.inductor.weight_only import (INT4_KERNEL, INT8_KERNEL, KERNEL_CHOICES, PT2Q_INT4_AVX2,
                                                PT2Q_INT4_AVX512, PT2Q_INT8_AVX2, PT2Q_INT8_AVX512,
                                                LowerWeightOnly)
from pt2q.isa import detect
from pt2q.ops import DEQUANTIZE_WEIGHT
from pt2q.passes.manager import PassManager
from pt2q.passes.pack_weights import PackWeights
from tests.conftest import rel_error

REL = {torch.float32: 1e-5, torch.bfloat16: 4e-3, torch.float16: 1e-3}
ISA = detect()
ISAS = [pytest.param("avx2", marks=pytest.mark.skipif(ISA.vector_isa not in ("avx2", "avx512"),
                                                      reason=f"no AVX2 here ({ISA.describe()})")),
        pytest.param("avx512", marks=pytest.mark.skipif(ISA.vector_isa != "avx512",
                                                        reason=f"no AVX-512 here ({ISA.describe()})"))]


def quantized(out_features, in_features, fmt, seed=0):
    torch.manual_seed(seed)
    return rtn_quantize(torch.randn(out_features, in_features), fmt)


def run_kernel(q, isa, x):
    codes = q.codes.to(torch.int64)[:q.shape[0], :q.shape[1]]
    words, scales, zero_terms, group = kernel_library.pack(codes, q.scale, q.zero_point, q.fmt.bits,
                                                           q.fmt.group_size, isa)
    return kernel_library.kernel_op(q.fmt.bits, isa)(x, words, scales, zero_terms, group, q.shape[0])


def reference(q, x):
    weight = DEQUANTIZE_WEIGHT(q.packed(), q.scale, q.zero_point, None, q.fmt.bits, q.fmt.group_size,
                               list(q.shape), 1)
    return x.double() @ weight.double().t()


CASES = {  # name: (N, K, format)
    "int4_g32_sym": (96, 256, WeightFormat(bits=4, group_size=32)),
    "int4_g32_asym": (96, 256, WeightFormat(bits=4, group_size=32, sym=False)),
    "int4_g128_sym": (64, 384, WeightFormat(bits=4, group_size=128)),
    "int4_g128_asym_padded_k": (48, 576, WeightFormat(bits=4, group_size=128, sym=False)),  # SmolLM2's K
    "int4_g32_padded_k": (40, 100, WeightFormat(bits=4, group_size=32, sym=False)),  # N, K of no block
    "int4_per_channel": (37, 200, WeightFormat(bits=4, group_size=-1, sym=False)),
    "int8_per_channel": (96, 256, WeightFormat(bits=8, group_size=-1)),
    "int8_per_channel_odd_k": (30, 70, WeightFormat(bits=8, group_size=-1)),
    "int8_g32_asym": (64, 160, WeightFormat(bits=8, group_size=32, sym=False)),
}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("rows", [1, 3, 20, 70])  # GEMV; GEMV per row; >= 16 rows: dequantized tiles + at::mm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_the_dequantized_weight(isa, case, rows, dtype):
    out_features, in_features, fmt = CASES[case]
    q = quantized(out_features, in_features, fmt)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(1)).to(dtype)
    actual = run_kernel(q, isa, x)
    assert actual.shape == (rows, out_features) and actual.dtype == dtype
    assert rel_error(actual, reference(q, x.float())) < REL[dtype]


@pytest.mark.parametrize("isa", ISAS)
def test_kernel_fp16_input_and_non_contiguous_rows(isa):
    q = quantized(64, 128, WeightFormat(bits=4, group_size=32, sym=False))
    x = torch.randn(4, 256)[:, ::2].to(torch.float16)  # stride 2 along K: copied by the kernel
    actual = run_kernel(q, isa, x)
    assert actual.dtype == torch.float16 and rel_error(actual, reference(q, x.float())) < REL[torch.float16]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows", [2, 20])  # GEMV per row; dequantized tiles
def test_kernel_threads_split_rows_without_changing_them(isa, rows):
    q = quantized(520, 128, WeightFormat(bits=4, group_size=32, sym=False))  # 130 row blocks: several tasks
    x = torch.randn(rows, 128)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run_kernel(q, isa, x)
        torch.set_num_threads(2)
        assert torch.equal(run_kernel(q, isa, x), single)  # each row's sum is computed the same way
    finally:
        torch.set_num_threads(threads)
    assert rel_error(single, reference(q, x)) < REL[torch.float32]


def test_kernel_layout_errors_name_the_op():
    q = quantized(64, 128, WeightFormat(bits=4, group_size=32))
    codes = q.codes.to(torch.int64)[:64, :128]
    words, scales, zero_terms, group = kernel_library.pack(codes, q.scale, q.zero_point, 4, 32, "avx2")
    op = kernel_library.kernel_op(4, "avx2")
    with pytest.raises(RuntimeError, match=r"pt2q::int4_linear_avx2: x has K=200 > the packed K=128"):
        op(torch.randn(1, 200), words, scales, zero_terms, group, 64)
    with pytest.raises(RuntimeError, match=r"pt2q::int4_linear_avx2: words must be contiguous int32"):
        op(torch.randn(1, 128), words.transpose(1, 2), scales, zero_terms, group, 64)
    with pytest.raises(ValueError, match="group_size=48 does not fit"):
        kernel_library.pack(codes, q.scale, q.zero_point, 4, 48, "avx2")


# ------------------------------------------------------------------------------------------- the lowering


class TwoLinears(torch.nn.Module):
    def __init__(self, dims=(64, 96, 128)):
        super().__init__()
        self.up = torch.nn.Linear(dims[0], dims[1])
        self.down = torch.nn.Linear(dims[1], dims[2], bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def packed_model(x, formats, dims=(64, 96, 128)):
    """TwoLinears captured, `up` and `down` RTN-quantized in formats[0] / formats[1] and packed."""
    torch.manual_seed(0)
    gm = pt2q.capture(TwoLinears(dims).eval(), (x,))
    PassManager([PackWeights({"linear": rtn_quantize(gm.get_parameter("up.weight"), formats[0]),
                              "linear_1": rtn_quantize(gm.get_parameter("down.weight"), formats[1])})])(gm)
    return gm


def lowered(gm, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's LeafSpec deprecation when deep-copying
        copied = copy.deepcopy(gm)
    lower = LowerWeightOnly(**options)
    copied, _ = PassManager([lower])(copied)
    return copied, lower.report


def _output(result):
    return result[0] if isinstance(result, (tuple, list)) else result


def targets(gm):
    return [str(node.target) for node in gm.graph.nodes if node.op == "call_function"]


class FakeIsa:
    def __init__(self, vector_isa):
        self.vector_isa = vector_isa


W8, W4_ASYM = WeightFormat(bits=8, group_size=-1), WeightFormat(bits=4, group_size=32, sym=False)


@pytest.mark.parametrize("vector_isa, kernels, x_shape, expected", [
    ("avx2", "auto", (1, 1, 64), (PT2Q_INT8_AVX2, PT2Q_INT4_AVX2)),  # decode: one row
    ("avx2", "auto", (2, 3, 64), (INT8_KERNEL, INT4_KERNEL)),        # batch: ATen's bf16 kernels first
    ("avx512", "auto", (1, 64), (PT2Q_INT8_AVX512, PT2Q_INT4_AVX512)),
    ("avx2", "aten", (1, 1, 64), (INT8_KERNEL, INT4_KERNEL)),
    ("avx2", "pt2q", (2, 3, 64), (PT2Q_INT8_AVX2, PT2Q_INT4_AVX2)),
    ("default", "auto", (1, 1, 64), (INT8_KERNEL, INT4_KERNEL)),
    ("default", "pt2q", (1, 1, 64), (None, None)),  # no pt2q kernel for this ISA: dequantize + linear stays
    ("avx2", [PT2Q_INT4_AVX2, INT8_KERNEL], (2, 3, 64), (INT8_KERNEL, PT2Q_INT4_AVX2)),
    ("avx2", f"{INT8_KERNEL},{INT4_KERNEL}", (1, 1, 64), (INT8_KERNEL, INT4_KERNEL)),
])
def test_the_table_picks_the_kernel_by_isa_regime_and_override(monkeypatch, vector_isa, kernels, x_shape,
                                                               expected):
    if "avx512" in vector_isa and ISA.vector_isa != "avx512":
        pytest.skip(f"no AVX-512 here ({ISA.describe()})")
    monkeypatch.setattr(weight_only, "detect", lambda: FakeIsa(vector_isa))
    x = torch.randn(*x_shape)
    gm = packed_model(x, (W8, W4_ASYM))
    out, report = lowered(gm, kernels=kernels)
    assert report.isa == vector_isa
    assert [report.layers[name].kernel for name in ("linear", "linear_1")] == list(expected)
    found = targets(out)
    for kernel in expected:
        if kernel is not None:
            assert found.count(f"pt2q.{kernel[6:]}.default" if kernel.startswith("pt2q::")
                               else f"aten.{kernel}.default") == list(expected).count(kernel)
    assert found.count(str(DEQUANTIZE_WEIGHT)) == list(expected).count(None)
    bound = 1e-5 if all(k is None or k.startswith("pt2q::") for k in expected) else 1.5e-2  # ATen: bf16 x
    assert rel_error(_output(out(x)), _output(gm(x))) < bound


def test_the_environment_variable_selects_and_bad_names_are_refused(monkeypatch):
    monkeypatch.setenv("PT2Q_WEIGHT_ONLY_KERNELS", "aten")
    assert LowerWeightOnly().kernels == "aten"
    assert LowerWeightOnly(kernels="pt2q").kernels == "pt2q"  # the argument wins
    monkeypatch.setenv("PT2Q_WEIGHT_ONLY_KERNELS", "pt2q::int4_linear_sse")
    with pytest.raises(ValueError, match="PT2Q_WEIGHT_ONLY_KERNELS.*unknown weight-only kernel"):
        LowerWeightOnly()


def test_auto_reads_this_cpus_row_of_the_table():
    lower = LowerWeightOnly(kernels="auto")
    assert lower.isa == ISA.vector_isa
    for regime in ("decode", "batch"):
        for bits in (4, 8):
            assert lower.candidates(bits, regime) == KERNEL_CHOICES[ISA.vector_isa][regime][bits]


@pytest.mark.skipif(ISA.vector_isa not in ("avx2", "avx512"), reason=f"no AVX2 here ({ISA.describe()})")
@pytest.mark.parametrize("fmt, dims", [
    (WeightFormat(bits=4, group_size=32), (64, 40, 24)),           # N=40 / 24: ATen's int4 needs N % 16
    (WeightFormat(bits=4, group_size=16), (64, 96, 32)),           # groups of 16: ATen's int4 has none
    (WeightFormat(bits=8, group_size=32, sym=False), (64, 96, 8)),  # grouped, asymmetric int8; N=8
])
def test_pt2q_kernels_take_what_aten_cannot(fmt, dims):
    x = torch.randn(5, dims[0])
    gm = packed_model(x, (fmt, fmt), dims)
    out, report = lowered(gm, kernels=[PT2Q_INT4_AVX2, PT2Q_INT8_AVX2, INT4_KERNEL, INT8_KERNEL])
    expected = PT2Q_INT4_AVX2 if fmt.bits == 4 else PT2Q_INT8_AVX2
    assert report.kernels() == {"linear": expected, "linear_1": expected}
    aten_only, aten_report = lowered(gm, kernels="aten")
    assert not aten_report.lowered  # and ATen indeed takes neither
    assert rel_error(_output(out(x)), _output(gm(x))) < 1e-5


def test_a_group_no_kernel_takes_lists_every_reason():
    x = torch.randn(2, 96)
    fmt = WeightFormat(bits=4, group_size=48)
    gm = packed_model(x, (fmt, fmt), (96, 96, 96))
    out, report = lowered(gm, kernels=[PT2Q_INT4_AVX2, INT4_KERNEL])
    reason = report.fallbacks["linear"]
    assert f"{PT2Q_INT4_AVX2}: group_size=48" in reason and f"{INT4_KERNEL}: group_size=48" in reason
    assert targets(out).count(str(DEQUANTIZE_WEIGHT)) == 2


def test_no_compiler_falls_back_to_aten_with_one_note(monkeypatch):
    # the build's outcome (cached per process) as it is when torch's toolchain finds no compiler
    monkeypatch.setattr(kernel_library, "_build", lambda: "RuntimeError: Error building extension | c++: not found")
    with pytest.raises(kernel_library.KernelsUnavailable, match="c\\+\\+: not found.*Install a C\\+\\+ compiler"):
        kernel_library.load()
    x = torch.randn(3, 64)
    gm = packed_model(x, (W8, W4_ASYM))
    out, report = lowered(gm, kernels=[PT2Q_INT8_AVX2, PT2Q_INT4_AVX2, INT8_KERNEL, INT4_KERNEL])
    assert report.kernels() == {"linear": INT8_KERNEL, "linear_1": INT4_KERNEL}
    assert len(report.notes) == 1 and "c++: not found" in report.notes[0]  # once per pass, not per layer
    assert "could not be built" in report.layers["linear"].reason  # why the first choice was passed over
    assert rel_error(_output(out(x)), _output(gm(x))) < 1.5e-2  # ATen's kernels, bf16 x


def test_a_pt2q_kernel_that_disagrees_is_passed_over(monkeypatch):
    original = LowerWeightOnly._kernel_call

    def wrong_for_pt2q(self, prepared, x):
        out = original(self, prepared, x)
        return out * 1.1 if str(prepared.op).startswith("pt2q.") else out

    monkeypatch.setattr(LowerWeightOnly, "_kernel_call", wrong_for_pt2q)
    x = torch.randn(3, 64)
    gm = packed_model(x, (W8, W4_ASYM))
    _, report = lowered(gm, kernels=[PT2Q_INT8_AVX2, PT2Q_INT4_AVX2, INT8_KERNEL, INT4_KERNEL])
    assert report.kernels() == {"linear": INT8_KERNEL, "linear_1": INT4_KERNEL}
    assert "self-check failed" in report.layers["linear_1"].reason


@pytest.mark.skipif(ISA.vector_isa not in ("avx2", "avx512"), reason=f"no AVX2 here ({ISA.describe()})")
def test_the_lowered_graph_exports_with_the_kernel_nodes():
    x = torch.randn(2, 3, 64)
    gm = packed_model(x, (W8, W4_ASYM))
    out, _ = lowered(gm, kernels=[PT2Q_INT8_AVX2, PT2Q_INT4_AVX2])
    exported = torch.export.export(out, (x,))
    found = targets(exported.graph_module)
    assert found.count("pt2q.int8_linear_avx2.default") == 1 and found.count("pt2q.int4_linear_avx2.default") == 1
    assert rel_error(_output(exported.module()(x)), _output(gm(x))) < 1e-5


@pytest.mark.skipif(ISA.vector_isa not in ("avx2", "avx512"), reason=f"no AVX2 here ({ISA.describe()})")
def test_inductor_compile_runs_the_table_choice():
    """The one compiled test: W8 on `up`, W4 g32 asym on `down`, fp32 x, through pt2q's Inductor compile."""
    x = torch.randn(1, 64)
    gm = packed_model(x, (W8, W4_ASYM))
    expected = _output(gm(x))
    compiled = inductor.compile(gm, (x,))
    choice = KERNEL_CHOICES[ISA.vector_isa]
    assert compiled.weight_only_kernels == {"linear": choice["decode"][8][0], "linear_1": choice["decode"][4][0]}
    assert rel_error(_output(compiled(x)), expected) < 1e-5


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch, caplog):
    """A build killed mid-way leaves torch's `lock` file, and the next load would wait forever."""
    import os
    import time
    from types import SimpleNamespace

    fake = SimpleNamespace(_get_build_directory=lambda name, verbose: str(tmp_path))
    lock = tmp_path / "lock"
    lock.write_text("")
    kernel_library._remove_stale_lock(fake, "pt2q_kernels_x")
    assert lock.exists()                                   # a build may be running right now
    old = time.time() - kernel_library.STALE_LOCK_SECONDS - 5
    os.utime(lock, (old, old))
    with caplog.at_level("WARNING"):
        kernel_library._remove_stale_lock(fake, "pt2q_kernels_x")
    assert not lock.exists() and "did not finish" in caplog.text
    kernel_library._remove_stale_lock(fake, "pt2q_kernels_x")  # no lock: nothing to do
