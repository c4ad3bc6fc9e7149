"""Calibrated starting ranges for QAT's activation fake quantization.

torchao's fake quants start from the first training batch's range and follow the batches' ranges by a
moving average (1% a step), which converges to a typical batch's range: larger values of other batches
are clipped, and clipping is the error training cannot remove. `pt2q.calibrate` on a model that
`pt2q.prepare_qat` returned sets every static activation fake quant's range as post-training
quantization would: the config's activation observer (histogram by default) over the whole calibration
data, the model in eval form and nothing fake-quantized. Training then keeps those ranges (moving-average
fake quants stop observing; learnable ones train from them). Weights' fake quants are left alone: they
observe the weights themselves on every step.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch.fx import GraphModule

from .calibration import fake_quantizers, run_calibration


def activation_fake_quants(prepared: GraphModule) -> dict[str, torch.nn.Module]:
    """The fake quants of static activations (not of weights, not dynamic), by module name."""
    from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase

    found = {}
    for node in prepared.graph.nodes:
        if node.op != "call_module":
            continue
        module = prepared.get_submodule(node.target)
        observer = getattr(module, "activation_post_process", None)
        if isinstance(module, FakeQuantizeBase) and node.args[0].op != "get_attr" and \
                not getattr(observer, "is_dynamic", False) and module.qscheme == torch.per_tensor_affine:
            found[node.target] = module
    return found


def calibrate_fake_quant_ranges(prepared: GraphModule, calib_data: Iterable, observer_cls, *, progress: bool = True,
                                desc: str = "pt2q calibrate (QAT ranges)") -> int:
    """Run `calib_data` through `prepared` with nothing fake-quantized, feeding each static activation
    fake quant's input to a fresh `observer_cls`, then give each fake quant the range its observer chose.
    Returns the number of batches. The model's train/eval form and every fake quant's switches are
    restored, whatever happens."""
    from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train
    from torchao.quantization.pt2e.export_utils import _EXPORTED_TRAINING_ATTR

    from .quantizers.base import _EPS

    targets = activation_fake_quants(prepared)
    every_fake_quant = list(fake_quantizers(prepared).values())
    switches = [(m, bool(m.fake_quant_enabled[0]), bool(m.observer_enabled[0])) for m in every_fake_quant]
    fresh = {name: observer_cls(dtype=fq.dtype, qscheme=fq.qscheme, quant_min=fq.quant_min,
                                quant_max=fq.quant_max, eps=_EPS) for name, fq in targets.items()}
    hooks = [fq.register_forward_pre_hook(lambda _module, inputs, observer=fresh[name]: observer(inputs[0].detach()))
             for name, fq in targets.items()]
    was_training = getattr(prepared, _EXPORTED_TRAINING_ATTR, True)
    move_exported_model_to_eval(prepared)  # batch-norm statistics and dropout do not move
    try:
        for module in every_fake_quant:
            module.disable_fake_quant()  # observe the float model's activations, as PTQ does
            module.disable_observer()
        count = run_calibration(prepared, calib_data, progress=progress, desc=desc)
    finally:
        for hook in hooks:
            hook.remove()
        for module, fake_quant_on, observer_on in switches:
            module.enable_fake_quant(fake_quant_on)
            module.enable_observer(observer_on)
        if was_training:
            move_exported_model_to_train(prepared)
    for name, fq in targets.items():
        _set_range(fq, *fresh[name].calculate_qparams())
        # Keep the calibrated range: a moving average would pull it back toward a typical batch's range
        # (LearnableFakeQuantize trains it from here; its observer is already off while it learns).
        fq.disable_observer()
    return count


def _set_range(fake_quant, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
    """Give `fake_quant` these qparams and its moving-average observer the matching float range."""
    scale = scale.reshape(-1)[:1].to(torch.float32)
    zero_point = zero_point.reshape(-1)[:1]
    low = (fake_quant.quant_min - zero_point.to(torch.float32)) * scale
    high = (fake_quant.quant_max - zero_point.to(torch.float32)) * scale
    observer = fake_quant.activation_post_process
    observer.min_val = low.reshape(observer.min_val.shape)
    observer.max_val = high.reshape(observer.max_val.shape)
    if hasattr(fake_quant, "_initialize_or_update_qparams"):  # LearnableFakeQuantize: trained parameters
        fake_quant._initialize_or_update_qparams(scale.clone(), zero_point.clone())
    else:
        fake_quant.scale.resize_(scale.shape).copy_(scale)
        fake_quant.zero_point.resize_(zero_point.shape).copy_(zero_point.to(fake_quant.zero_point.dtype))
