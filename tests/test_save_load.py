"""pt2q.save / pt2q.load: torch.export archives, bit-identical outputs, and no pickled code on load.

How torch 2.13 reads a `.pt2` archive (torch/export/pt2_archive/_package.py, torch/_export/serde):
plain weights and constants are raw bytes (`use_pickle: false` in data/weights/*_config.json), but
tensor-subclass payloads (`use_pickle: true`) go through `torch.load(..., weights_only=False)`,
opaque constants through `pickle.loads`, and the sample inputs through `torch.load(weights_only=True)`
with a silent *fallback to weights_only=False* when that fails. A crafted archive therefore runs code
under a bare `torch.export.load`; `pt2q.load` must refuse it.
"""
from __future__ import annotations

import io
import json
import pickle
import zipfile

import pytest
import torch

import pt2q
from tests.conftest import DQ_PER_CHANNEL, Q_PER_TENSOR, call, count_of

EXECUTED: list = []


def _mark_executed(*args):
    """What a malicious pickle calls. Returns something harmless so loading can carry on."""
    EXECUTED.append(args)
    return ((), {})


class _Payload:
    def __reduce__(self):
        return (_mark_executed, ("pickled code ran",))


def _quantized(zm, **kwargs):
    return pt2q.quantize(zm.model, pt2q.StaticQuantConfig(), [(zm.args, zm.kwargs)], progress=False, **kwargs)


@pytest.fixture(scope="module")
def saved_mlp(tmp_path_factory, zoo):
    zm = zoo("mlp")
    qmodel = _quantized(zm)
    path = tmp_path_factory.mktemp("saved") / "mlp.pt2"
    pt2q.save(qmodel, path)
    return zm, qmodel, path


# -- round trips ----------------------------------------------------------------------------------
def test_mlp_round_trip_is_bit_identical(saved_mlp):
    zm, qmodel, path = saved_mlp
    loaded = pt2q.load(path)
    assert torch.equal(call(loaded, zm.args), call(qmodel, zm.args))
    other = torch.randn_like(zm.args[0])
    assert torch.equal(call(loaded, (other,)), call(qmodel, (other,)))
    assert pt2q.count_quantized_layers(loaded) == zm.num_quantizable
    assert count_of(loaded, Q_PER_TENSOR) == count_of(qmodel, Q_PER_TENSOR)
    assert count_of(loaded, DQ_PER_CHANNEL) == count_of(qmodel, DQ_PER_CHANNEL)


def test_bert_round_trip_is_bit_identical(zoo, tmp_path):
    zm = zoo("bert")
    qmodel = _quantized(zm)
    pt2q.save(qmodel, tmp_path / "bert.pt2")
    loaded = pt2q.load(tmp_path / "bert.pt2")
    expected, actual = call(qmodel, zm.args, zm.kwargs), call(loaded, zm.args, zm.kwargs)
    assert type(actual) is type(expected)  # the Hugging Face ModelOutput survives
    assert torch.equal(actual.last_hidden_state, expected.last_hidden_state)
    assert torch.equal(actual.pooler_output, expected.pooler_output)
    assert pt2q.count_quantized_layers(loaded) == zm.num_quantizable


@pytest.mark.parametrize("name", ["mlp", "bert"])
def test_dynamic_batch_round_trip(zoo, tmp_path, name):
    zm = zoo(name)
    qmodel = _quantized(zm, dynamic_shapes="batch")
    pt2q.save(qmodel, tmp_path / "dyn.pt2")
    loaded = pt2q.load(tmp_path / "dyn.pt2")
    args = tuple(torch.cat([a] * 3) for a in zm.args)
    kwargs = {k: torch.cat([v] * 3) for k, v in zm.kwargs.items()}
    expected = zm.output_fn(call(qmodel, args, kwargs))
    actual = zm.output_fn(call(loaded, args, kwargs))
    assert actual.shape[0] == 3 * 2
    assert torch.equal(actual, expected)


def test_dynamic_quant_config_round_trip(zoo, tmp_path):
    zm = zoo("mlp")
    qmodel = pt2q.quantize(zm.model, pt2q.DynamicQuantConfig(backend="xpu"), example_inputs=zm.args,
                           progress=False)
    pt2q.save(qmodel, tmp_path / "d.pt2")
    loaded = pt2q.load(tmp_path / "d.pt2")
    assert torch.equal(call(loaded, zm.args), call(qmodel, zm.args))
    config = loaded.meta["pt2q_config"]
    assert isinstance(config, pt2q.DynamicQuantConfig) and config.backend == "xpu"


def test_saved_file_is_a_torch_export_archive(saved_mlp):
    zm, qmodel, path = saved_mlp
    assert zipfile.is_zipfile(path)
    names = zipfile.ZipFile(path).namelist()
    assert any(n.endswith("/archive_format") for n in names)
    assert any(n.endswith("/models/model.json") for n in names)
    extra = {"pt2q.json": ""}
    exported = torch.export.load(path, extra_files=extra)  # torch alone can read it
    assert isinstance(exported, torch.export.ExportedProgram)
    metadata = json.loads(extra["pt2q.json"])
    numerics = metadata.pop("int8_numerics")
    assert metadata == {"format": 1, "backend": "x86", "mixed_bf16": False, "dynamic": False,
                        "config": "StaticQuantConfig", "output_types": []}  # plain tensors out
    # the saturation guard chosen here and the ISA it was chosen for travel with the file
    assert numerics["saturation_guard"] == "auto"
    assert numerics["built_on"] == pt2q.isa.detect().describe()
    saturates = pt2q.isa.detect().int8_saturates
    assert numerics["resolved"] == ["weights7" if saturates else "off"]
    assert numerics["weight_range"] == ([-64, 63] if saturates else [-128, 127])
    assert torch.equal(exported.module()(*zm.args), call(qmodel, zm.args))


def test_saved_weights_are_smaller_than_fp32(saved_mlp):
    """Only the int8 weights are stored, not also the fp32 originals convert_pt2e leaves behind."""
    zm, _, path = saved_mlp
    with zipfile.ZipFile(path) as archive:
        weight_bytes = sum(i.file_size for i in archive.infolist()
                           if "/data/weights/weight_" in i.filename or "/data/constants/tensor_" in i.filename)
    fp32_bytes = sum(t.numel() * t.element_size() for t in zm.model.state_dict().values())
    assert weight_bytes < 0.5 * fp32_bytes


def test_loaded_metadata(saved_mlp):
    _, _, path = saved_mlp
    loaded = pt2q.load(path)
    assert loaded.meta["pt2q_quantized"] is True
    assert loaded.meta["pt2q_saved_metadata"]["backend"] == "x86"
    config = loaded.meta["pt2q_config"]
    assert isinstance(config, pt2q.StaticQuantConfig) and config.backend == "x86"


def test_load_from_a_file_object(saved_mlp):
    zm, qmodel, path = saved_mlp
    with open(path, "rb") as file:
        loaded = pt2q.load(file)
    assert torch.equal(call(loaded, zm.args), call(qmodel, zm.args))


def test_save_rejects_foreign_modules(tmp_path):
    with pytest.raises(pt2q.ConfigError, match="produced by pt2q"):
        pt2q.save(torch.nn.Linear(2, 2), tmp_path / "x.pt2")


# -- loading runs no pickled code ---------------------------------------------------------------------
class _ForbiddenUnpickler:
    def __init__(self, *args, **kwargs):
        raise AssertionError("unrestricted unpickling during load")


def _forbid_unrestricted_pickle(monkeypatch):
    """torch.load(weights_only=False) unpickles with `pickle.Unpickler`, torch's weights-only path uses
    its own restricted unpickler; `pickle.load(s)` is what opaque constants go through."""
    monkeypatch.setattr(pickle, "Unpickler", _ForbiddenUnpickler)
    monkeypatch.setattr(pickle, "load", _ForbiddenUnpickler)
    monkeypatch.setattr(pickle, "loads", _ForbiddenUnpickler)


def test_load_uses_no_unrestricted_unpickler(saved_mlp, monkeypatch):
    zm, qmodel, path = saved_mlp
    weights_only_flags = []
    real_torch_load = torch.load

    def spy_torch_load(*args, **kwargs):
        weights_only_flags.append(kwargs.get("weights_only"))
        return real_torch_load(*args, **kwargs)

    _forbid_unrestricted_pickle(monkeypatch)
    monkeypatch.setattr(torch, "load", spy_torch_load)
    # the guard is effective: an unrestricted torch.load now fails
    with pytest.raises(AssertionError, match="unrestricted unpickling"):
        buffer = io.BytesIO()
        torch.save({"a": 1}, buffer)
        buffer.seek(0)
        real_torch_load(buffer, weights_only=False)
    loaded = pt2q.load(path)
    assert torch.equal(call(loaded, zm.args), call(qmodel, zm.args))
    assert weights_only_flags and all(flag is True for flag in weights_only_flags)


def _rewrite_archive(src, dst, replace):
    """Copy the zip archive `src` to `dst`, passing each member through `replace(name, data)`."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, replace(info.filename, zin.read(info.filename)))


def _pickled_payload() -> bytes:
    buffer = io.BytesIO()
    torch.save(_Payload(), buffer)
    return buffer.getvalue()


def _with_malicious_sample_inputs(name, data):
    return _pickled_payload() if "/data/sample_inputs/" in name else data


def _with_pickled_weight(name, data):
    if name.endswith("/data/weights/model_weights_config.json"):
        config = json.loads(data)
        first = next(iter(config["config"].values()))
        first["use_pickle"] = True
        return json.dumps(config).encode()
    if name.endswith("/data/weights/weight_0"):
        return _pickled_payload()
    return data


@pytest.mark.parametrize("tamper", [_with_malicious_sample_inputs, _with_pickled_weight],
                         ids=["sample_inputs", "use_pickle_weight"])
def test_crafted_archive_does_not_run_code(saved_mlp, tmp_path, tamper):
    _, _, path = saved_mlp
    evil = tmp_path / "evil.pt2"
    _rewrite_archive(path, evil, tamper)

    # the attack is real: torch.export.load on its own executes the payload
    EXECUTED.clear()
    try:
        torch.export.load(evil)
    except Exception:  # noqa: BLE001 - the payload ran before anything failed
        pass
    assert EXECUTED == [("pickled code ran",)]

    EXECUTED.clear()
    with pytest.raises(pt2q.Pt2qError, match="refusing to load"):
        pt2q.load(evil)
    assert EXECUTED == []


def test_legacy_or_foreign_files_are_refused(tmp_path):
    not_zip = tmp_path / "junk.pt2"
    not_zip.write_bytes(b"definitely not an archive")
    with pytest.raises(pt2q.Pt2qError, match="not a torch.export archive"):
        pt2q.load(not_zip)
    pickled = tmp_path / "model.pt2"
    torch.save({"weight": torch.zeros(2)}, pickled)  # a torch.save zip, not a PT2 archive
    with pytest.raises(pt2q.Pt2qError, match="refusing to load"):
        pt2q.load(pickled)
