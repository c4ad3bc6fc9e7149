"""IPEX backend (legacy): the qconf patcher on the qconf IPEX 2.8 produced for the small BERT-like model
(tests/backends/data/, made by tools/ipex_make_qconf.py), pt2q's quantities, the lazy-import gate, and
the real IPEX path.

The `real_ipex` tests run only where IPEX imports (torch 2.8): `make test-ipex` builds that venv and runs
them there with `-k real_ipex`, after tools/ipex_run.py has compared IPEX-with-pt2q's-scales to pt2q's own
Q/DQ graph. Everything else runs in CI (torch 2.13, no IPEX).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import pt2q
from pt2q.backends import ipex as ipex_backend
from pt2q.backends.ipex import backend as ipex_flow
from pt2q import jsonfile as ipex_files
from pt2q.backends.ipex import QconfError, QuantitiesError
from pt2q.errors import BackendUnavailable
from pt2q.graph import get_constant, module_fqn
from tests.backends import ipex_tiny_bert

DATA = Path(__file__).parent / "data"
QCONF = DATA / "ipex_tiny_bert_qconf.json"
PROVENANCE = DATA / "ipex_tiny_bert_qconf.provenance.json"
REPO = Path(__file__).resolve().parents[2]
CALIBRATION_BATCHES = 4  # as tools/ipex_make_qconf.py calibrated IPEX
LINEAR_NAMES = sorted(name for name, module in ipex_tiny_bert.build().named_modules()
                      if isinstance(module, torch.nn.Linear))

real_ipex = pytest.mark.skipif(ipex_backend.ipex_unavailable_reason() is not None,
                               reason=f"IPEX does not import here ({ipex_backend.ipex_unavailable_reason()}); "
                                      f"`make test-ipex` runs these in a torch 2.8 venv")


# -- helpers ---------------------------------------------------------------------------------------------
def _committed_qconf() -> dict:
    return json.loads(QCONF.read_text())


def _entries_of(qconf: dict, name: str) -> list[dict]:
    return [qconf[scope]["q_op_infos"][index] for scope, index in ipex_backend.int8_module_entries(qconf)[name]]


def _only_value(value):
    """The single list of an IPEX value: a list, or a dict keyed by weight (SmoothQuant) of one list."""
    if isinstance(value, dict):
        (value,) = value.values()
    return value


def _first(infos: list[dict]) -> dict:
    return next(info for info in infos if info)


def quantities_from_qconf(qconf: dict) -> dict[str, dict]:
    """pt2q-form quantities holding IPEX's own values of `qconf` (its weight factor is pt2q's `s`)."""
    quantities = {}
    for name, places in ipex_backend.int8_module_entries(qconf).items():
        scope, index = places[0]
        entry = qconf[scope]["q_op_infos"][index]
        activation, weight = _first(entry["input_tensor_infos"]), _first(entry["weight_tensor_infos"])
        observer, weight_observer = entry["activation_observer"], entry["weight_observer"]
        quantities[name] = {
            "module_class": "torch.nn.modules.linear.Linear",
            "input_scale": _only_value(activation["scale"])[0],
            "input_zero_point": _only_value(activation["zero_point"])[0],
            "input_dtype": {"torch.quint8": "uint8", "torch.qint8": "int8"}[activation["force_dtype"]],
            "input_quant_min": observer["quant_min"], "input_quant_max": observer["quant_max"],
            "weight_scales": list(weight["scale"]), "weight_zero_points": list(weight["zero_point"]),
            "weight_quant_min": weight_observer["quant_min"], "weight_quant_max": weight_observer["quant_max"],
            "smooth_quant_scaling_factor": list(weight["smooth_quant_scaling_factor"])
            if "smooth_quant_scaling_factor" in weight else None,
        }
    return quantities


def _differing_paths(before, after, path=()) -> list[tuple]:
    if isinstance(before, dict) and isinstance(after, dict) and set(before) == set(after):
        return [p for key in before for p in _differing_paths(before[key], after[key], path + (key,))]
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after) and \
            all(isinstance(item, (dict, list)) for item in before):
        return [p for i, (a, b) in enumerate(zip(before, after)) for p in _differing_paths(a, b, path + (i,))]
    return [] if before == after else [path]


def _close(first: list[float], second: list[float], rel: float) -> bool:
    return len(first) == len(second) and all(math.isclose(a, b, rel_tol=rel) for a, b in zip(first, second))


@pytest.fixture(scope="module")
def pt2q_model():
    """The tiny BERT quantized by pt2q with SmoothQuant 0.5 on every group (as IPEX smooths every Linear),
    on the batches IPEX was calibrated with."""
    model = ipex_tiny_bert.build()
    batches = ipex_tiny_bert.batches(CALIBRATION_BATCHES)
    # Full-range weights, as IPEX computes them: on a CPU whose int8 kernels saturate (the AVX2 run) the
    # "auto" guard would give 7-bit weights, twice IPEX's scales.
    config = pt2q.StaticQuantConfig(smooth_quant=pt2q.SmoothQuantConfig(alpha=0.5, skip_if_worse=False),
                                    saturation_guard="off")
    return pt2q.quantize(model, config, batches, example_inputs=batches[0])


@pytest.fixture(scope="module")
def quantities(pt2q_model):
    return ipex_backend.extract_quantities(pt2q_model)


@pytest.fixture
def fresh_quantities(quantities):
    return copy.deepcopy(quantities)


# -- the committed data ----------------------------------------------------------------------------------
def test_committed_qconf_is_ipex_2_8s_for_the_tiny_bert():
    provenance = json.loads(PROVENANCE.read_text())
    assert provenance["torch"].startswith("2.8.") and provenance["intel_extension_for_pytorch"].startswith("2.8.")
    assert provenance["calibration"] == f"ipex_tiny_bert.batches({CALIBRATION_BATCHES})"
    qconf = ipex_backend.read_qconf(QCONF)
    # Every Linear of the model is an int8 module entry of IPEX's qconf, and nothing else is.
    assert sorted(ipex_backend.int8_module_entries(qconf)) == LINEAR_NAMES


# -- pt2q's quantities -----------------------------------------------------------------------------------
def test_extract_quantities_reads_the_graphs_quantize_nodes_and_smooth_quant_scales(pt2q_model, quantities):
    assert sorted(quantities) == LINEAR_NAMES
    report = pt2q_model.meta["pt2q_smooth_quant_report"]
    scales = {name: group.scale.tolist() for group in report.groups for name in group.consumers}
    assert set(scales) == set(LINEAR_NAMES)
    qd = torch.ops.quantized_decomposed
    for node in pt2q_model.graph.nodes:
        if node.target is not torch.ops.aten.linear.default:
            continue
        name = module_fqn(node)
        layer = quantities[name]
        dequantize = node.args[0]
        assert dequantize.target is qd.dequantize_per_tensor.default
        assert (layer["input_scale"], layer["input_zero_point"]) == (dequantize.args[1], dequantize.args[2])
        assert (layer["input_dtype"], layer["input_quant_min"], layer["input_quant_max"]) == ("uint8", 0, 255)
        weight_scales = get_constant(pt2q_model, node.args[1].args[1])
        assert layer["weight_scales"] == weight_scales.tolist()
        assert layer["smooth_quant_scaling_factor"] == pytest.approx(scales[name], rel=1e-7)


def test_a_layer_pt2q_keeps_in_fp32_is_not_listed_and_the_patch_names_it():
    model, batches = ipex_tiny_bert.build(), ipex_tiny_bert.batches(2)
    config = pt2q.StaticQuantConfig().set_local(r"pooler", None)
    quantities = ipex_backend.extract_quantities(pt2q.quantize(model, config, batches))
    assert "pooler" not in quantities and "classifier" in quantities
    with pytest.raises(QconfError, match=r"without pt2q quantities: pooler;"):
        ipex_backend.patch_qconf(_committed_qconf(), quantities)


def test_extract_quantities_refuses_a_model_pt2q_did_not_quantize():
    with pytest.raises(QuantitiesError, match="pt2q.quantize"):
        ipex_backend.extract_quantities(torch.fx.symbolic_trace(torch.nn.Linear(4, 4)))


def test_quantities_file_round_trip_and_its_errors(tmp_path, quantities):
    path = ipex_backend.save_quantities(quantities, tmp_path / "quantities.json")
    assert ipex_backend.load_quantities(path) == quantities
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(QuantitiesError, match="not valid JSON"):
        ipex_backend.load_quantities(path)
    path.write_text(json.dumps({"format": "something else", "layers": quantities}))
    with pytest.raises(QuantitiesError, match="format 'something else'"):
        ipex_backend.load_quantities(path)
    broken = copy.deepcopy(quantities)
    broken["pooler"]["weight_scales"][0] = float("nan")
    with pytest.raises(QuantitiesError, match=r"quantities\['pooler'\].weight_scales: nan"):
        ipex_backend.save_quantities(broken, tmp_path / "other.json")
    assert not (tmp_path / "other.json").exists()


# -- the patcher on the committed qconf -------------------------------------------------------------------
def test_patched_values_land_in_each_layers_entry(quantities):
    patched, report = ipex_backend.patch_qconf(_committed_qconf(), quantities)
    assert sorted(report.patched) == LINEAR_NAMES and sorted(report.smooth_quant) == LINEAR_NAMES
    for name in LINEAR_NAMES:
        layer = quantities[name]
        (entry,) = _entries_of(patched, name)
        activation, weight = _first(entry["input_tensor_infos"]), _first(entry["weight_tensor_infos"])
        # IPEX keys the SmoothQuant activation values by weight ("<op index>_0"): the keys stay.
        assert isinstance(activation["scale"], dict)
        assert _only_value(activation["scale"]) == [layer["input_scale"]]
        assert _only_value(activation["zero_point"]) == [layer["input_zero_point"]]
        assert weight["scale"] == layer["weight_scales"] and weight["zero_point"] == layer["weight_zero_points"]
        # pt2q divides the activation by s and multiplies the weight by s; IPEX multiplies both by its factors.
        assert weight["smooth_quant_scaling_factor"] == layer["smooth_quant_scaling_factor"]
        assert _only_value(activation["smooth_quant_scaling_factor"]) == pytest.approx(
            [1.0 / s for s in layer["smooth_quant_scaling_factor"]], rel=1e-12)


def test_pt2qs_values_in_ipex_form_equal_what_ipex_computed_itself(quantities):
    """Same model, data and alpha: IPEX's own SmoothQuant factors and scales in the committed qconf must be
    pt2q's after the patcher's conversion (up to IPEX's 1e-6 epsilon on the max-abs values). An inverted
    factor would be off by s^2 here."""
    original = _committed_qconf()
    patched, _ = ipex_backend.patch_qconf(original, quantities)
    for name in LINEAR_NAMES:
        (before,) = _entries_of(original, name)
        (after,) = _entries_of(patched, name)
        for key in ("input_tensor_infos", "weight_tensor_infos"):
            ipex_info, pt2q_info = _first(before[key]), _first(after[key])
            for field in ("scale", "smooth_quant_scaling_factor"):
                assert _close(_only_value(ipex_info[field]), _only_value(pt2q_info[field]), rel=1e-4), \
                    (name, key, field)
            assert _only_value(ipex_info["zero_point"]) == _only_value(pt2q_info["zero_point"]), (name, key)


def test_every_other_field_is_kept_and_the_input_is_not_changed(quantities):
    original = _committed_qconf()
    untouched = copy.deepcopy(original)
    patched, report = ipex_backend.patch_qconf(original, quantities)
    assert original == untouched
    changed = _differing_paths(original, patched)
    assert changed
    for path in changed:  # (scope, "q_op_infos", index, infos, position, field[, weight key])
        assert path[1] == "q_op_infos" and path[3] in {"input_tensor_infos", "weight_tensor_infos"}, path
        assert path[5] in {"scale", "zero_point", "smooth_quant_scaling_factor"}, path
    # The attention matmuls keep IPEX's own calibration, and the report says so.
    assert len(report.kept_ipex) == 4 and all(" matmul (layers." in line for line in report.kept_ipex)
    for scope, layer in original.items():
        for index, entry in layer["q_op_infos"].items():
            if "matmul" in entry["op_type"]:
                assert patched[scope]["q_op_infos"][index] == entry
        assert patched[scope]["nonq_op_infos"] == layer["nonq_op_infos"]


def test_entries_naming_a_patched_input_tensor_get_the_same_values(quantities):
    """IPEX's loader keeps one scale per tensor id and scope, the last entry read wins: the residual add
    reading `intermediate`'s input (same tensor id) must carry pt2q's values too."""
    patched, report = ipex_backend.patch_qconf(_committed_qconf(), quantities)
    assert report.shared_entries == 2
    for layer_index in (0, 1):
        scope = patched[f"layers:{layer_index}"]["q_op_infos"]
        intermediate = next(e for e in scope.values() if e["fqn"] == f"layers.{layer_index}.intermediate")
        tensor_id = intermediate["input_tensor_infos"][0]["id"]
        add = next(e for e in scope.values() if e["fqn"] == f"layers.{layer_index}" and
                   any(info.get("id") == tensor_id for info in e["input_tensor_infos"]))
        shared = next(info for info in add["input_tensor_infos"] if info.get("id") == tensor_id)
        for field in ("scale", "zero_point", "smooth_quant_scaling_factor"):
            assert shared[field] == intermediate["input_tensor_infos"][0][field]


def test_patched_file_round_trip_is_loadable_and_the_source_file_is_untouched(tmp_path, quantities):
    source_digest = hashlib.sha256(QCONF.read_bytes()).hexdigest()
    out = tmp_path / "patched.json"
    report = ipex_backend.patch_qconf_file(QCONF, quantities, out)
    assert hashlib.sha256(QCONF.read_bytes()).hexdigest() == source_digest
    written = ipex_backend.read_qconf(out)  # check_loadable: every key IPEX's load_qconf_summary reads
    assert written == ipex_backend.patch_qconf(_committed_qconf(), quantities)[0]
    assert sorted(report.patched) == LINEAR_NAMES
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert [p.name for p in tmp_path.iterdir()] == ["patched.json"]  # no temporary file left behind
    # A quantities file works the same as the dict.
    ipex_backend.save_quantities(quantities, tmp_path / "q.json")
    ipex_backend.patch_qconf_file(QCONF, tmp_path / "q.json", tmp_path / "patched2.json")
    assert json.loads((tmp_path / "patched2.json").read_text()) == written


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- the patcher's errors --------------------------------------------------------------------------------
def test_a_qconf_layer_without_pt2q_quantities_is_named(fresh_quantities):
    del fresh_quantities["layers.1.output"]
    with pytest.raises(QconfError, match=r"without pt2q quantities: layers\.1\.output;"):
        ipex_backend.patch_qconf(_committed_qconf(), fresh_quantities)


def test_pt2q_quantities_for_a_layer_ipex_does_not_have_are_named(fresh_quantities):
    fresh_quantities["decoder.head"] = fresh_quantities["classifier"]
    with pytest.raises(QconfError, match=r"not int8 modules of the IPEX qconf: decoder\.head;"):
        ipex_backend.patch_qconf(_committed_qconf(), fresh_quantities)


def test_a_smooth_quant_factor_of_the_wrong_length_names_the_entry(fresh_quantities):
    fresh_quantities["layers.0.output"]["smooth_quant_scaling_factor"] = [1.0] * 16  # the layer has 32 inputs
    with pytest.raises(QconfError, match=r"qconf\['layers:0'\]\.q_op_infos\['2'\] \(layers\.0\.output\)"
                                         r"\.smooth_quant_scaling_factor: IPEX has 32 input channels, "
                                         r"pt2q's factor has 16"):
        ipex_backend.patch_qconf(_committed_qconf(), fresh_quantities)


def test_per_tensor_weight_scales_are_refused_with_the_fix(fresh_quantities):
    fresh_quantities["pooler"]["weight_scales"] = [0.01]
    fresh_quantities["pooler"]["weight_zero_points"] = [0]
    with pytest.raises(QconfError, match=r"\(pooler\)\.weight_tensor_infos\[0\]\.scale: IPEX has 16 output "
                                         r"channels, pt2q 1 .*weight_granularity='per_channel'"):
        ipex_backend.patch_qconf(_committed_qconf(), fresh_quantities)


def test_layers_sharing_one_ipex_input_need_equal_pt2q_scales(fresh_quantities):
    fresh_quantities["layers.0.attention.key"]["input_scale"] *= 2
    with pytest.raises(QconfError, match=r"input of layers\.0\.attention\.query and layers\.0\.attention\.key "
                                         r"once"):
        ipex_backend.patch_qconf(_committed_qconf(), fresh_quantities)


def test_signed_activations_are_refused(fresh_quantities):
    fresh_quantities["classifier"].update(input_dtype="int8", input_zero_point=0, input_quant_min=-128,
                                          input_quant_max=127)
    with pytest.raises(QconfError, match=r"\(classifier\): IPEX quantizes the input to uint8, pt2q to int8; "
                                         r"quantize with StaticQuantConfig\(backend='x86'\)"):
        ipex_backend.patch_qconf(_committed_qconf(), fresh_quantities)


def test_smoothed_pt2q_layer_needs_an_ipex_smooth_quant_entry(quantities):
    qconf = _committed_qconf()
    (entry,) = _entries_of(qconf, "pooler")
    entry["activation_observer"]["smooth_quant_enabled"] = False
    with pytest.raises(QconfError, match=r"\(pooler\): pt2q smoothed this layer .*"
                                         r"get_smooth_quant_qconfig_mapping"):
        ipex_backend.patch_qconf(qconf, quantities)


def test_a_layer_pt2q_did_not_smooth_gets_unit_factors(fresh_quantities):
    fresh_quantities["pooler"]["smooth_quant_scaling_factor"] = None
    patched, report = ipex_backend.patch_qconf(_committed_qconf(), fresh_quantities)
    assert "pooler" in report.patched and "pooler" not in report.smooth_quant
    (entry,) = _entries_of(patched, "pooler")
    assert _first(entry["weight_tensor_infos"])["smooth_quant_scaling_factor"] == [1.0] * 16
    assert _only_value(_first(entry["input_tensor_infos"])["smooth_quant_scaling_factor"]) == [1.0] * 16


def test_a_truncated_qconf_is_refused_and_nothing_is_written(tmp_path, quantities):
    truncated = tmp_path / "truncated.json"
    truncated.write_bytes(QCONF.read_bytes()[:50_000])
    out = tmp_path / "out.json"
    out.write_text("previous content")
    with pytest.raises(QconfError, match=r"truncated\.json is not a complete IPEX qconf .*truncated.*save_qconf_summary"):
        ipex_backend.patch_qconf_file(truncated, quantities, out)
    assert out.read_text() == "previous content"
    with pytest.raises(QconfError, match="cannot read the IPEX qconf"):
        ipex_backend.read_qconf(tmp_path / "missing.json")


def test_a_field_ipexs_loader_reads_is_required_by_name(quantities):
    qconf = _committed_qconf()
    del qconf["layers:1:attention"]["q_op_infos"]["2"]["input_tensor_infos"][0]["force_dtype"]
    with pytest.raises(QconfError, match=r"qconf\['layers:1:attention'\]\.q_op_infos\['2'\]"
                                         r"\.input_tensor_infos\[0\]: missing 'force_dtype'"):
        ipex_backend.patch_qconf(qconf, quantities)
    qconf = _committed_qconf()
    qconf[" "]["q_op_infos"]["1"]["weight_tensor_infos"][0]["inf_dtype"] = "torch.int4"
    with pytest.raises(QconfError, match=r"weight_tensor_infos\[0\]\.inf_dtype: 'torch.int4' is not a dtype"):
        ipex_backend.patch_qconf(qconf, quantities)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, quantities):
    out = tmp_path / "out.json"
    out.write_text("previous content")

    def failing_replace(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(ipex_files.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        ipex_backend.patch_qconf_file(QCONF, quantities, out)
    assert out.read_text() == "previous content"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


# -- the lazy-import gate ---------------------------------------------------------------------------------
def test_importing_the_backend_never_imports_ipex(tmp_path):
    """An `intel_extension_for_pytorch` that fails at import (as IPEX 2.8 does on torch 2.13) is on the path:
    `import pt2q.backends.ipex` still works, and `quantize` turns the failure into BackendUnavailable."""
    fake = tmp_path / "intel_extension_for_pytorch"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise AttributeError(\"module 'os' has no attribute 'exit'\")\n")
    script = textwrap.dedent("""
        import sys
        import pt2q.backends.ipex as backend
        assert "intel_extension_for_pytorch" not in sys.modules
        from pt2q.errors import BackendUnavailable
        try:
            backend.quantize(None, {}, [])
        except BackendUnavailable as error:
            print(error)
    """)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment,
                            cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "importing intel_extension_for_pytorch failed: AttributeError" in result.stdout
    assert "make test-ipex" in result.stdout and "pt2q.backends.inductor" in result.stdout


@pytest.mark.skipif(ipex_backend.ipex_unavailable_reason() is None, reason="IPEX imports here")
def test_quantize_raises_backend_unavailable_without_touching_the_model():
    model = ipex_tiny_bert.build()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(BackendUnavailable) as error:
        ipex_backend.quantize(model, {}, ipex_tiny_bert.batches(1))
    message = str(error.value)
    assert "needs torch 2.8" in message and "make test-ipex" in message and "pt2q.backends.inductor" in message
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


@pytest.mark.skipif(torch.__version__.startswith("2.8."), reason="IPEX 2.8 matches this torch")
def test_a_mismatched_ipex_is_refused_before_it_is_imported(monkeypatch, tmp_path):
    """IPEX 2.8 installed next to torch 2.13: the gate reads the installed version and never imports it."""
    fake = tmp_path / "intel_extension_for_pytorch"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise AssertionError('the gate imported IPEX')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(ipex_flow.importlib.metadata, "version", lambda package: "2.8.0+cpu")
    assert ipex_backend.ipex_unavailable_reason() == (
        f"intel-extension-for-pytorch 2.8.0+cpu is installed but needs torch 2.8.*, and torch {torch.__version__} "
        f"is here")
    with pytest.raises(BackendUnavailable, match=r"needs torch 2\.8\.\*.*make test-ipex"):
        ipex_backend.import_ipex()
    assert "intel_extension_for_pytorch" not in sys.modules


# -- the real IPEX path (torch 2.8 + IPEX 2.8 only) ----------------------------------------------------------
def _ipex_prepared(ipex, model):
    mapping = ipex.quantization.get_smooth_quant_qconfig_mapping(alpha=0.5)
    return ipex.quantization.prepare(model, mapping, example_kwarg_inputs=ipex_tiny_bert.batches(1)[0],
                                     inplace=False)


def _structure(qconf: dict) -> dict:
    """What IPEX's trace decides (scopes, op indices, module names, tensor ids, dtypes), without values."""
    def infos(items):
        return [(info.get("id"), info.get("orig_dtype"), info.get("inf_dtype"), info.get("force_dtype"))
                for info in items]

    return {scope: {index: (entry["fqn"], entry["op_type"].split(" at 0x")[0], infos(entry["input_tensor_infos"]),
                            infos(entry["weight_tensor_infos"]), infos(entry["output_tensor_infos"]))
                    for index, entry in layer["q_op_infos"].items()} for scope, layer in qconf.items()}


@real_ipex
def test_real_ipex_committed_qconf_matches_a_fresh_trace(tmp_path):
    ipex = ipex_backend.import_ipex()
    prepared = _ipex_prepared(ipex, ipex_tiny_bert.build())
    with torch.no_grad():
        for batch in ipex_tiny_bert.batches(CALIBRATION_BATCHES):
            prepared(**batch)
    prepared.save_qconf_summary(qconf_summary=str(tmp_path / "fresh.json"))
    fresh = json.loads((tmp_path / "fresh.json").read_text())
    assert _structure(fresh) == _structure(_committed_qconf())
    for name, layer in quantities_from_qconf(fresh).items():
        committed = quantities_from_qconf(_committed_qconf())[name]
        assert _close(layer["weight_scales"], committed["weight_scales"], rel=1e-5), name
        assert _close(layer["smooth_quant_scaling_factor"], committed["smooth_quant_scaling_factor"], rel=1e-5), name


@real_ipex
def test_real_ipex_loader_takes_the_patched_values(tmp_path):
    """Patch changed values into the committed qconf; IPEX's load_qconf_summary and convert must hold them."""
    ipex = ipex_backend.import_ipex()
    changed = quantities_from_qconf(_committed_qconf())
    for layer in changed.values():
        layer["input_scale"] *= 1.25
        layer["weight_scales"] = [value * 1.5 for value in layer["weight_scales"]]
        layer["smooth_quant_scaling_factor"] = [value * 1.1 for value in layer["smooth_quant_scaling_factor"]]
    patched_path = tmp_path / "patched.json"
    ipex_backend.patch_qconf_file(QCONF, changed, patched_path)
    patched = json.loads(patched_path.read_text())
    prepared = _ipex_prepared(ipex, ipex_tiny_bert.build())
    prepared.load_qconf_summary(qconf_summary=str(patched_path))
    states = prepared._fqn_to_auto_quant_state_map
    for name, places in ipex_backend.int8_module_entries(patched).items():
        scope, index = places[0]
        state, layer = states[scope], changed[name]
        tensor_id = _first(patched[scope]["q_op_infos"][index]["input_tensor_infos"])["id"]
        scale, zero_point = state.tensor_id_to_scale_zp[tensor_id]
        assert _only_value({k: v.tolist() for k, v in scale.items()}) == pytest.approx([layer["input_scale"]])
        assert _only_value({k: v.tolist() for k, v in zero_point.items()}) == [layer["input_zero_point"]]
        weight_scale, _ = state.weight_tensor_id_to_scale_zp[f"{index}_0"]
        assert weight_scale.tolist() == pytest.approx(layer["weight_scales"], rel=1e-6)
        weight_factor = state.weight_tensor_id_to_smooth_quant_scaling_factor[f"{index}_0"]
        assert weight_factor.tolist() == pytest.approx(layer["smooth_quant_scaling_factor"], rel=1e-6)
        activation_factor = _only_value({k: v.tolist() for k, v in
                                         state.tensor_id_to_smooth_quant_scaling_factor[str(tensor_id)].items()})
        assert activation_factor == pytest.approx([1 / s for s in layer["smooth_quant_scaling_factor"]], rel=1e-6)
    converted = ipex.quantization.convert(prepared)
    with torch.no_grad():
        converted(**ipex_tiny_bert.batches(1)[0])  # IPEX's convert runs on the patched state


@real_ipex
def test_real_ipex_quantize_with_ipexs_own_values_reproduces_ipex(tmp_path):
    """pt2q.backends.ipex.quantize end to end, fed IPEX's own values in pt2q's convention: the model must be
    the one IPEX converts from its own qconf, and the user's model is left as it was."""
    ipex = ipex_backend.import_ipex()
    model = ipex_tiny_bert.build()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    batches = ipex_tiny_bert.batches(CALIBRATION_BATCHES)
    result = ipex_backend.quantize(model, quantities_from_qconf(_committed_qconf()), batches, work_dir=tmp_path)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    assert sorted(result.report.patched) == LINEAR_NAMES
    assert result.int8_ops().get("int8 linear") == len(LINEAR_NAMES)
    prepared = _ipex_prepared(ipex, model)
    prepared.load_qconf_summary(qconf_summary=str(QCONF))
    converted = ipex.quantization.convert(prepared)
    evaluation = ipex_tiny_bert.batches(4, seed=1000)
    with torch.no_grad():
        reference = torch.jit.freeze(torch.jit.trace(converted, example_kwarg_inputs=batches[0], check_trace=False,
                                                     strict=False))
        for batch in evaluation:
            torch.testing.assert_close(result(**batch), reference(**batch), rtol=1e-4, atol=1e-4)
