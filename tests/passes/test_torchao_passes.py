"""TorchaoPrepare / TorchaoConvert: torchao's prepare/convert as passes, without keeping modules alive."""
import gc
import weakref

import torch
from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

import pt2q
from pt2q.passes.manager import PassManager
from pt2q.passes.torchao_convert import TorchaoConvert
from pt2q.passes.torchao_prepare import TorchaoPrepare
from pt2q.quantizers import X86Quantizer
from tests.conftest import DQ_PER_CHANNEL, Q_PER_TENSOR, count_of


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()


def _quantizer():
    return X86Quantizer().set_global(X86Quantizer.static_scheme())


def test_upstream_prepare_pt2e_keeps_every_module_alive():
    """Pins the torchao 0.18 behaviour the cache clearing exists for. If this starts failing, torchao
    no longer memoises modules in `_assert_and_get_unique_device` and the clearing may go."""
    model = _mlp()
    parameter = weakref.ref(model[0].bias)
    prepare_pt2e(torch.export.export(model, (torch.randn(2, 16),)).module(), _quantizer())
    del model
    gc.collect()
    assert parameter() is not None


def test_passes_quantize_and_let_the_model_go():
    model = _mlp()
    x = torch.randn(8, 16)
    parameter = weakref.ref(model[0].bias)
    graph_module = torch.export.export(model, (x,)).module()
    prepared, _ = PassManager([TorchaoPrepare(_quantizer())])(graph_module)
    prepared(x)
    quantized, _ = PassManager([TorchaoConvert()])(prepared)
    assert count_of(quantized, DQ_PER_CHANNEL) == 2 and count_of(quantized, Q_PER_TENSOR) == 2
    del model, graph_module, prepared, quantized
    gc.collect()
    assert parameter() is None


def test_quantize_keeps_nothing_of_the_user_model_after_the_result_is_gone():
    model = _mlp()
    parameter = weakref.ref(model[0].bias)
    with torch.no_grad():
        pt2q.quantize(model, pt2q.StaticQuantConfig(), [(torch.randn(8, 16),)], progress=False)(torch.randn(8, 16))
    del model
    gc.collect()
    assert parameter() is None
