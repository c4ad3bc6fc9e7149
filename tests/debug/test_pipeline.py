"""dump_pipeline: files, numeric report, SmoothQuant report, bad directories, failures, PT2Q_DUMP_DIR."""
from __future__ import annotations

import json
import math

import pytest
import torch

import pt2q
from pt2q.debug import DumpDirectoryError, dump_pipeline
from pt2q.debug.numeric import bypass_observers, sqnr_db, structural_copy
from tests.debug.conftest import gelu_mlp, minmax_config, mlp2, tiny_cnn
from tests.conftest import PROCESS_ISA


def test_files_and_stage_numbering(dump):
    result = dump(*mlp2())
    names = sorted(p.name for p in result.out_dir.iterdir())
    assert names == ["00_capture.txt", "01_matmul_to_linear.diff", "01_matmul_to_linear.txt",
                     "02_prepare_pt2e.diff", "02_prepare_pt2e.txt", "03_calibrate.diff", "03_calibrate.txt",
                     "04_convert_pt2e.diff", "04_convert_pt2e.txt", "index.html", "numeric.txt", "summary.json"]
    summary = json.loads(result.summary.read_text())
    assert [s["name"] for s in summary["stages"]] == [s.name for s in result.stages]
    assert summary["error"] is None and summary["int8_kernels"] is None
    assert {"capture", "prepare", "calibrate", "convert", "numeric", "html"} <= set(summary["timings"])


def test_quantized_model_is_the_one_quantize_returns(dump):
    model, calib = tiny_cnn()
    result = dump(model, calib)
    expected = pt2q.quantize(model, minmax_config(), calib, progress=False)
    with torch.no_grad():
        assert torch.equal(result.qmodel(*calib[1]), expected(*calib[1]))


def test_numeric_report_sorted_worst_first_and_consistent(dump):
    result = dump(*mlp2())
    rows = result.numeric
    assert [r.node for r in rows] and all(r.int8_weight for r in rows)
    assert [r.sqnr_db for r in rows] == sorted(r.sqnr_db for r in rows)
    assert result.worst is rows[0]
    # The last linear's output is the model output: same numbers by two routes.
    last = next(r for r in rows if r.node == "linear_1")
    (output,) = result.outputs
    assert last.sqnr_db == pytest.approx(output.sqnr_db) and last.max_abs_err == pytest.approx(output.max_abs_err)
    assert 20 < output.sqnr_db < 80
    text = (result.out_dir / "numeric.txt").read_text().splitlines()
    assert text[2].split()[3] == rows[0].node


def test_numeric_covers_conv_pool_and_folded_batchnorm(dump):
    model, calib = tiny_cnn()
    result = dump(model, calib)
    by_node = {r.node: r for r in result.numeric}
    assert {"conv2d", "conv2d_1", "linear", "adaptive_avg_pool2d", "flatten"} <= set(by_node)
    assert by_node["conv2d"].module == "conv1" and by_node["conv2d"].int8_weight
    assert not by_node["flatten"].int8_weight
    # conv2d in the reference already has BatchNorm folded in: a quantization-sized error only.
    assert all(r.sqnr_db > 25 for r in result.numeric), [(r.node, r.sqnr_db) for r in result.numeric]


def test_fp32_reference_matches_the_model():
    """The reference (observed graph, observers bypassed) computes exactly the fp32 model."""
    model, calib = tiny_cnn()
    prepared = pt2q.prepare(model, minmax_config(), calib[0])
    reference = bypass_observers(structural_copy(prepared))
    with torch.no_grad():
        assert sqnr_db(model(*calib[0]), reference(*calib[0])) > 100
    assert any(n.op == "call_module" and "activation_post_process" in n.name for n in prepared.graph.nodes)


def test_sqnr_definition():
    ref = torch.tensor([3.0, 4.0])
    assert sqnr_db(ref, ref) == math.inf
    assert sqnr_db(ref, torch.tensor([3.0, 3.5])) == pytest.approx(10 * math.log10(25 / 0.25))


def test_smooth_quant_report(dump):
    config = minmax_config(smooth_quant=pt2q.SmoothQuantConfig(alpha=0.5, skip_if_worse=False))
    result = dump(*gelu_mlp(), config=config)
    assert [s.name for s in result.stages][-3:] == ["calibrate", "smooth_quant_apply", "convert_pt2e"]
    report = result.smooth_quant
    assert len(report.groups) == 2 and report.num_absorbed == 0
    summary = json.loads(result.summary.read_text())
    assert [g["status"] for g in summary["smooth_quant"]] == ["explicit mul", "explicit mul"]
    numeric = (result.out_dir / "numeric.txt").read_text()
    assert "# SmoothQuant: 2 groups smoothed (0 absorbed, 2 explicit mul), 0 skipped" in numeric
    assert "explicit mul: x -> fc1 alpha=0.5" in numeric
    # SmoothQuant is exact in fp32; the model output is compared against the unsmoothed fp32 graph.
    check = next(r for r in result.outputs if r.op == "smooth_quant check")
    assert check.sqnr_db > 80
    assert next(r for r in result.outputs if r.op == "output").sqnr_db > 20


def test_smooth_quant_absorbed_producer_compares_against_smoothed_graph(dump):
    """fc1 absorbs fc2's 1/s in its output rows: its output changes, so the per-node reference must
    be the smoothed fp32 graph (against the unsmoothed one the SQNR would be meaningless)."""
    config = minmax_config(smooth_quant=pt2q.SmoothQuantConfig(alpha=0.5, skip_if_worse=False))
    result = dump(*mlp2(), config=config)
    assert any(g.absorbed and g.producer.startswith("linear:linear") for g in result.smooth_quant.groups)
    assert all(r.sqnr_db > 25 for r in result.numeric), [(r.node, r.sqnr_db) for r in result.numeric]
    assert "absorbed: linear:linear (fc1) -> fc2" in result.stage("smooth_quant_apply").text.read_text()


def test_dynamic_config_needs_no_calibration_data(tmp_path):
    model, calib = mlp2()
    result = dump_pipeline(model, pt2q.DynamicQuantConfig(), None, calib[0], out_dir=tmp_path / "d",
                           compile=False, progress=False)
    text = result.stage("convert_pt2e").text.read_text()
    assert "choose_qparams" in text and "dynamic" in text
    assert result.numeric and result.outputs[0].sqnr_db > 20


def test_weight_only_layers_get_per_node_rows(dump):
    """A weight-only linear reads pt2q's dequantize_weight, not an int8 Q/DQ pair: it is compared too, and
    the last linear's row is the model output (the reference is the capture, nothing was annotated)."""
    model, calib = mlp2()
    result = dump(model, calib, config=pt2q.RTNConfig(bits=4, group_size=8))
    by_node = {r.node: r for r in result.numeric}
    assert set(by_node) == {"linear", "linear_1"} and by_node["linear"].module == "fc1"
    assert by_node["linear_1"].sqnr_db == pytest.approx(result.outputs[0].sqnr_db)
    assert all(10 < r.sqnr_db < 60 for r in result.numeric), [(r.node, r.sqnr_db) for r in result.numeric]


# -- bad input ----------------------------------------------------------------------------------------
def test_non_empty_directory_is_not_overwritten(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.md").write_text("keep me")
    model, calib = mlp2()
    with pytest.raises(DumpDirectoryError, match=f"dump directory '{out}' exists and is not empty.*--force"):
        dump_pipeline(model, minmax_config(), calib, out_dir=out, compile=False, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.md"]
    result = dump_pipeline(model, minmax_config(), calib, out_dir=out, force=True, compile=False, progress=False)
    assert (out / "notes.md").read_text() == "keep me"  # force replaces pt2q's files only
    (out / "09_stale_pass.txt").write_text("from an older run")
    dump_pipeline(model, minmax_config(), calib, out_dir=out, force=True, compile=False, progress=False)
    assert not (out / "09_stale_pass.txt").exists() and result.html.exists()


def test_directory_path_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    model, calib = mlp2()
    with pytest.raises(DumpDirectoryError, match="is not a directory"):
        dump_pipeline(model, minmax_config(), calib, out_dir=path, compile=False, progress=False)


def test_failing_pipeline_leaves_the_stages_before_the_failure(tmp_path):
    model, calib = mlp2()
    bad = [calib[0], (torch.randn(4, 5),)]  # second batch does not fit the captured graph
    out = tmp_path / "failed"
    with pytest.raises(pt2q.CalibrationError, match="calibration batch 1"):
        dump_pipeline(model, minmax_config(), bad, out_dir=out, compile=False, progress=False)
    assert (out / "02_prepare_pt2e.txt").exists() and not (out / "03_calibrate.txt").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["error"].startswith("CalibrationError: calibration batch 1")
    assert "The pipeline failed" in (out / "index.html").read_text()


# -- PT2Q_DUMP_DIR --------------------------------------------------------------------------------------
def test_env_hook_dumps_each_quantize_call(tmp_path, monkeypatch):
    model, calib = mlp2()
    plain = pt2q.quantize(model, minmax_config(), calib, progress=False)
    monkeypatch.setenv("PT2Q_DUMP_DIR", str(tmp_path / "dumps"))
    first = pt2q.quantize(model, minmax_config(), calib, progress=False)
    pt2q.quantize(model, minmax_config(), calib, progress=False)
    runs = sorted(p.name for p in (tmp_path / "dumps").iterdir())
    assert runs == ["000_MLP2", "001_MLP2"]
    run = tmp_path / "dumps" / "000_MLP2"
    assert {"00_capture.txt", "04_convert_pt2e.diff", "numeric.txt", "index.html"} <= {p.name for p in run.iterdir()}
    assert not any(p.name.endswith("_inductor.txt") for p in run.iterdir())  # quantize() does not compile
    with torch.no_grad():
        assert torch.equal(first(*calib[0]), plain(*calib[0]))
    assert first.meta[pt2q.api.QUANTIZED_KEY]


def test_env_hook_keeps_quantize_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("PT2Q_DUMP_DIR", str(tmp_path / "dumps"))
    model, _ = mlp2()
    with pytest.raises(pt2q.CalibrationError, match="calib_data is empty"):
        pt2q.quantize(model, minmax_config(), [])


def test_env_hook_survives_a_broken_dump(tmp_path, monkeypatch, caplog):
    """A failure of the dump machinery itself is logged; quantize() still returns the model."""
    import pt2q.debug.pipeline as pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("renderer bug")

    monkeypatch.setattr("pt2q.debug.render.render_html", broken)
    monkeypatch.setenv("PT2Q_DUMP_DIR", str(tmp_path / "dumps"))
    model, calib = mlp2()
    qmodel = pt2q.quantize(model, minmax_config(), calib, progress=False)
    assert pt2q.count_quantized_layers(qmodel) == 2
    assert "could not write html" in caplog.text and pipeline.DUMP_DIR_ENV == "PT2Q_DUMP_DIR"


# -- the one compile of this suite ------------------------------------------------------------------
def test_inductor_stage_reports_int8_kernels(dump):
    result = dump(*mlp2(), compile=True)
    assert result.stages[-1].name == "inductor" and result.stages[-1].diff is None
    assert result.kernels and all(name.startswith("q") for name in result.kernels)
    text = result.stages[-1].text.read_text()
    assert text.startswith("# 05_inductor\n# Inductor: ") and "quantized layer(s)" in text
    assert "qlinear_pointwise" in text
    assert json.loads(result.summary.read_text())["int8_kernels"] == result.kernels
    assert "Inductor int8 kernels" in result.html.read_text()
    # numeric.txt lists the kernels and the compiled model's error beside the Q/DQ graph's. The dump's
    # config pins full range (saturation_guard="off"), so where int8 kernels saturate this is exactly
    # what the report is for: the compiled model visibly leaves its graph (17 dB measured under AVX2)
    numeric = (result.out_dir / "numeric.txt").read_text()
    assert "fused int8 kernel call(s) for 2 quantized layer(s)" in numeric and "qlinear_pointwise" in numeric
    compiled_rows = {row.node: row for row in result.outputs if row.op == "compiled"}
    assert set(compiled_rows) == {"output[0] compiled vs fp32", "output[0] compiled vs Q/DQ graph"}
    assert "# output[0] compiled vs Q/DQ graph: SQNR" in numeric
    graph_sqnr = compiled_rows["output[0] compiled vs Q/DQ graph"].sqnr_db
    if PROCESS_ISA.int8_saturates:
        assert graph_sqnr < 40
    else:
        assert graph_sqnr > 60  # the kernels compute the graph
    assert 10 < compiled_rows["output[0] compiled vs fp32"].sqnr_db < 80
