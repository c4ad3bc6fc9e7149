"""pt2q.load against hostile archives: every way torch.export.load (torch 2.13) can run code from a file
is refused with a Pt2qError, and no marker file is ever created; valid archives still load.

Each attack is first shown to be real (plain torch.export.load, or the module it returns, runs it)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

import pt2q
from tests.conftest import call


@pytest.fixture(scope="module")
def dynamic_mlp(tmp_path_factory):
    """A dynamic-batch MLP archive: its model.json holds symbolic-shape expressions."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    x = torch.randn(2, 8)
    qmodel = pt2q.quantize(model, pt2q.DynamicQuantConfig(), example_inputs=(x,), dynamic_shapes="batch",
                           progress=False)
    path = tmp_path_factory.mktemp("archives") / "mlp.pt2"
    pt2q.save(qmodel, path)
    return qmodel, x, path


def rewrite(src, dst, edit):
    """Copy zip `src` to `dst`, each member through `edit(name, bytes) -> bytes | None` (None drops it);
    `edit` may also return a list of (name, bytes) to add members."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            result = edit(info.filename, zin.read(info.filename))
            if isinstance(result, list):
                for name, data in result:
                    zout.writestr(name, data)
            elif result is not None:
                zout.writestr(info, result)


def edit_model_json(change):
    def edit(name, data):
        if name.endswith("/models/model.json"):
            return json.dumps(change(json.loads(data))).encode()
        return data
    return edit


def shell_marker(marker) -> str:
    return f"__import__('os').system('touch {marker}')"


def assert_refused(path, marker, match):
    with pytest.raises(pt2q.Pt2qError, match=match):
        pt2q.load(path)
    assert not marker.exists(), "pt2q.load ran code from the archive"


def test_expression_string_runs_code_under_torch_and_is_refused(dynamic_mlp, tmp_path):
    _, _, path = dynamic_mlp
    marker = tmp_path / "PWNED"
    evil = tmp_path / "expr.pt2"

    def edit(name, data):
        if name.endswith("/models/model.json"):
            text = data.decode()
            assert '"expr_str": "Symbol(' in text
            return text.replace('"expr_str": "Symbol(', f'"expr_str": "0*{shell_marker(marker)} + Symbol(', 1).encode()
        return data

    rewrite(path, evil, edit)
    try:
        torch.export.load(evil)
    except Exception:  # noqa: BLE001 - the command ran while torch parsed the expression
        pass
    assert marker.exists(), "the attack is not real: torch did not evaluate the expression"
    marker.unlink()
    assert_refused(evil, marker, r"model\.json, field graph_module\.graph\..*expr_str: the expression \"0\*__import__")


def test_guard_code_runs_under_torch_and_is_refused(dynamic_mlp, tmp_path):
    """torch `exec`s the guards into the module's `_guards_fn`, which every call runs."""
    _, x, path = dynamic_mlp
    marker = tmp_path / "PWNED"
    evil = tmp_path / "guards.pt2"
    rewrite(path, evil, edit_model_json(lambda m: {**m, "guards_code": [f"{shell_marker(marker)} == 0"]}))
    try:
        torch.export.load(evil).module()(x)
    except Exception:  # noqa: BLE001
        pass
    assert marker.exists(), "the attack is not real: torch did not execute the guard"
    marker.unlink()
    assert_refused(evil, marker, r"guards_code\[0\]")


def test_any_torch_attribute_as_node_target_is_refused(dynamic_mlp, tmp_path):
    """torch.export resolves targets with getattr from the torch module, so `torch.os.system` is a
    callable node target: the graph would run a shell command on its first call."""
    _, x, path = dynamic_mlp
    marker = tmp_path / "PWNED"
    evil = tmp_path / "target.pt2"

    def change(model):
        relu = next(n for n in model["graph_module"]["graph"]["nodes"] if n["target"] == "torch.ops.aten.relu.default")
        relu["target"] = "torch.os.system"
        relu["inputs"] = [{"name": "command", "arg": {"as_string": f"touch {marker}"}, "kind": 1}]
        return model

    rewrite(path, evil, edit_model_json(change))
    assert_refused(evil, marker, r"calls 'torch\.os\.system'")


def test_unknown_operator_namespace_is_refused(dynamic_mlp, tmp_path):
    _, _, path = dynamic_mlp
    evil = tmp_path / "op.pt2"

    def change(model):
        model["graph_module"]["graph"]["nodes"][0]["target"] = "torch.ops.evil_lib.run.default"
        return model

    rewrite(path, evil, edit_model_json(change))
    assert_refused(evil, tmp_path / "never", r"torch\.ops\.evil_lib\.run\.default")


def test_unknown_tree_spec_type_is_refused(dynamic_mlp, tmp_path):
    _, _, path = dynamic_mlp
    evil = tmp_path / "spec.pt2"

    def change(model):
        signature = model["graph_module"]["module_call_graph"][0]["signature"]
        signature["out_spec"] = json.dumps([1, {"type": "evil_module.Gadget", "context": "null",
                                                "children_spec": []}])
        return model

    rewrite(path, evil, edit_model_json(change))
    assert_refused(evil, tmp_path / "never", r"names the type 'evil_module\.Gadget'")


def test_recorded_output_type_outside_the_allow_list_is_refused(dynamic_mlp, tmp_path):
    _, _, path = dynamic_mlp
    evil = tmp_path / "types.pt2"

    def edit(name, data):
        if name.endswith("/extra/pt2q.json"):
            return json.dumps({**json.loads(data), "output_types": ["os.system"]}).encode()
        return data

    rewrite(path, evil, edit)
    assert_refused(evil, tmp_path / "never", r"output type 'os\.system' from a module pt2q does not import")


@pytest.mark.parametrize("member", ["data/constants/custom_obj_0", "data/weights/evil.pt", "models/model.pkl",
                                    "aotinductor/model.so"])
def test_members_save_never_writes_are_refused(dynamic_mlp, tmp_path, member):
    _, _, path = dynamic_mlp
    evil = tmp_path / "member.pt2"
    root = zipfile.ZipFile(path).namelist()[0].split("/")[0]

    def edit(name, data):
        if name.endswith("/archive_format"):
            return [(name, data), (f"{root}/{member}", b"\x80\x04payload")]
        return data

    rewrite(path, evil, edit)
    assert_refused(evil, tmp_path / "never", "refusing to load")


def test_path_traversal_member_is_refused(dynamic_mlp, tmp_path):
    _, _, path = dynamic_mlp
    evil = tmp_path / "traversal.pt2"
    rewrite(path, evil, lambda name, data: [(name, data), ("../../outside.txt", b"x")]
            if name.endswith("/archive_format") else data)
    assert_refused(evil, tmp_path / "never", r"'\.\./\.\./outside\.txt' has a path that leaves the archive")


def test_zip_bomb_member_is_refused(dynamic_mlp, tmp_path):
    _, _, path = dynamic_mlp
    evil = tmp_path / "bomb.pt2"
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(evil, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, zin.read(info.filename))
        root = zin.namelist()[0].split("/")[0]
        zout.writestr(zipfile.ZipInfo(f"{root}/extra/padding.bin"), b"\0" * (16 * 2 ** 20),
                      compress_type=zipfile.ZIP_DEFLATED)
    assert_refused(evil, tmp_path / "never", r"extra/padding\.bin' expands 16777216 bytes.*zip bomb")


def test_valid_archives_of_every_config_kind_still_load_bit_identically(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    x = torch.randn(4, 8)
    for config in (pt2q.StaticQuantConfig(), pt2q.StaticQuantConfig(backend="xpu"), pt2q.DynamicQuantConfig(),
                   pt2q.WeightOnlyQuantConfig(), pt2q.StaticQuantConfig(smooth_quant=pt2q.SmoothQuantConfig())):
        qmodel = pt2q.quantize(model, config, [(x,)], progress=False)
        path = tmp_path / f"{type(config).__name__}.pt2"
        pt2q.save(qmodel, path)
        assert torch.equal(call(pt2q.load(path), (x,)), call(qmodel, (x,))), config


def test_hugging_face_model_saved_here_loads_in_a_fresh_process(zoo, tmp_path):
    """The output container (a transformers ModelOutput) is recorded at save and registered at load:
    the fresh process imports neither transformers nor its output types itself."""
    zm = zoo("bert")
    qmodel = pt2q.quantize(zm.model, pt2q.StaticQuantConfig(), [(zm.args, zm.kwargs)], progress=False)
    path = tmp_path / "bert.pt2"
    pt2q.save(qmodel, path)
    assert json.loads(zipfile.ZipFile(path).read(
        next(n for n in zipfile.ZipFile(path).namelist() if n.endswith("extra/pt2q.json"))))["output_types"] == \
        ["transformers.modeling_outputs.BaseModelOutputWithPoolingAndCrossAttentions"]
    torch.save(zm.kwargs, tmp_path / "inputs.pt")
    torch.save(call(qmodel, zm.args, zm.kwargs).last_hidden_state, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        import pt2q
        assert "transformers.modeling_outputs" not in sys.modules
        model = pt2q.load({str(path)!r})
        inputs = torch.load({str(tmp_path / "inputs.pt")!r}, weights_only=True)
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        with torch.no_grad():
            output = model(**inputs)
        print("type", type(output).__name__, "equal", torch.equal(output.last_hidden_state, expected))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "type BaseModelOutputWithPoolingAndCrossAttentions equal True" in result.stdout
