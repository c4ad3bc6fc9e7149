"""FP8Quantizer: FP8 (E4M3 / E5M2) activations and weights for Gaudi, from the same rule table and the
same torchao prepare / convert path as the int8 quantizers.

What differs is the observer. `FP8Observer` records max |x| (per tensor, or per output channel of a
weight) and, when torchao's `convert_pt2e` reaches it, writes pt2q's FP8 Q/DQ ops itself (torchao calls
an observer's `convert`): the decomposed int8 ops round to integers, which is not an FP8 cast. Weights
are cast at convert and stored as float8 constants; activations get `pt2q.quantize_fp8` /
`pt2q.dequantize_fp8` with the scale of the config's method (pt2q/fp8.py), or a run-time scale
(`pt2q.choose_fp8_scale`) in the dynamic mode.

Only linear layers and (opt-in) attention matmuls are annotated: the ops Gaudi's `fp8_gemm_v2` runs.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e.observer import ObserverBase
from torchao.quantization.pt2e.quantizer import QuantizationSpec
from torchao.quantization.pt2e.utils import create_getattr_from_value

from .. import fp8
from ..errors import CalibrationError
from ..graph import get_constant
from ..ops import CHOOSE_FP8_SCALE, DEQUANTIZE_FP8, QUANTIZE_FP8
from .base import QuantScheme, RuleQuantizer


class FP8Observer(ObserverBase):
    """max |x| of what it observes; at convert, the FP8 Q/DQ ops for it (see the module docstring).

    torchao builds observers from the QuantizationSpec's fields (quant_min, qscheme, ...): they mean
    nothing for FP8 and are ignored; the FP8 parameters come from `with_args`."""

    def __init__(self, dtype, is_dynamic: bool = False, *, scale_method: str = "maxabs_hw", backoff: float = 0.25,
                 device: str = "gaudi2", channel_axis: int | None = None, run_time_scale: bool = False,
                 **_spec_fields):
        # `run_time_scale` (dynamic activations) rather than the spec's is_dynamic: torchao's convert
        # expects an int8 choose_qparams node after a dynamic spec, and this observer writes its own ops.
        super().__init__(fp8.fp8_dtype(dtype), is_dynamic or run_time_scale)
        self.scale_method, self.backoff, self.device = scale_method, backoff, device
        self.channel_axis = channel_axis
        self.saturation = fp8.full_scale(self.dtype, device)
        self.register_buffer("amax", torch.tensor([]))  # empty until observed (or set from a measurement)

    @property
    def observed(self) -> bool:
        return self.amax.numel() > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_dynamic:
            return x
        amax = self.reduce(x.detach())
        self.amax = amax if not self.observed else torch.maximum(self.amax, amax)
        return x

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # `amax` is empty until observed: take the stored one whatever its shape (a recompile of a
        # torch.compile subgraph carries its calibration over this way).
        stored = state_dict.get(prefix + "amax")
        if stored is not None:
            self.amax = stored.detach().clone()
        elif strict:
            missing_keys.append(prefix + "amax")

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """max |x| over everything but the channel axis (all of x per tensor), float32."""
        x = x.abs().to(torch.float32)
        if self.channel_axis is None:
            return x.amax().reshape(())
        return x.transpose(0, self.channel_axis).reshape(x.shape[self.channel_axis], -1).amax(dim=1)

    def scale(self) -> torch.Tensor:
        """The dequantize scale: shape [] per tensor, [channels] per channel."""
        return fp8.compute_scale(self.amax, self.scale_method, self.dtype, self.device, self.backoff)

    def calculate_qparams(self):
        return self.scale(), torch.zeros_like(self.amax, dtype=torch.int32)

    # -- torchao's convert hook ----------------------------------------------------------------------
    def convert(self, model: GraphModule, observer_node: Node) -> None:
        source = observer_node.args[0]
        graph = model.graph
        device = source.meta["val"].device if "val" in source.meta else torch.device("cpu")
        out_dtype = source.meta["val"].dtype if "val" in source.meta else torch.float32
        with graph.inserting_before(observer_node):
            constant = get_constant(model, source)
            if constant is not None:  # a weight: cast it now, keep only the float8 copy
                self.amax = self.reduce(constant.detach())
                scale = self._broadcastable(self.scale(), constant.dim())
                stored = create_getattr_from_value(model, graph, "_fp8_weight", fp8.quantize(
                    constant.detach(), scale, self.dtype, self.saturation), device)
                scale_node = create_getattr_from_value(model, graph, "_fp8_weight_scale", scale, device)
                replacement = graph.call_function(DEQUANTIZE_FP8, (stored, scale_node, out_dtype))
            else:
                if self.is_dynamic:
                    scale_node = graph.call_function(CHOOSE_FP8_SCALE, (source, self.saturation))
                else:
                    if not self.observed:
                        raise CalibrationError(f"the input {source.name!r} of an FP8 layer was never observed: run "
                                               "calibration data through the prepared model (or quantize from a "
                                               "measurement file) before convert()")
                    if not torch.isfinite(self.amax).all():
                        raise CalibrationError(f"the input {source.name!r} of an FP8 layer saw NaN/Inf during "
                                               "calibration; check the model's numerics on the calibration data, or "
                                               "keep that layer in float with set_local(..., None)")
                    scale_node = create_getattr_from_value(model, graph, "_fp8_input_scale", self.scale(), device)
                quantized = graph.call_function(QUANTIZE_FP8, (source, scale_node, self.dtype, self.saturation))
                replacement = graph.call_function(DEQUANTIZE_FP8, (quantized, scale_node, out_dtype))
        observer_node.replace_all_uses_with(replacement)
        graph.erase_node(observer_node)

    def _broadcastable(self, scale: torch.Tensor, ndim: int) -> torch.Tensor:
        """A per-channel scale shaped [C, 1, ...] (axis 0) so it broadcasts against the weight."""
        if self.channel_axis is None:
            return scale
        shape = [1] * ndim
        shape[self.channel_axis] = scale.numel()
        return scale.reshape(shape)


class FP8PerChannelObserver(FP8Observer):
    """FP8Observer over output channels. (torchao passes `ch_axis` only to observers named PerChannel.)"""

    def __init__(self, dtype, is_dynamic: bool = False, *, ch_axis: int = 0, **kwargs):
        kwargs.pop("channel_axis", None)
        super().__init__(dtype, is_dynamic, channel_axis=ch_axis, **kwargs)


def fp8_scheme(dtype: torch.dtype, device: str = "gaudi2", *, scale_method: str = "maxabs_hw",
               per_channel: bool = True, dynamic: bool = False, weight_backoff: float = 0.5,
               activation_backoff: float = 0.25) -> QuantScheme:
    """The QuantScheme of one FP8 config: activation and weight specs whose observers carry the FP8
    parameters (`dtype` a float8 dtype, `device` a key of pt2q.fp8.DEVICES)."""
    fp8.full_scale(dtype, device)  # validates the device
    if scale_method == "maxabs_hw":
        fp8.hardware_scales(dtype, device)  # "generic" has none: say so now, not at convert
    activation = QuantizationSpec(
        dtype=dtype, qscheme=torch.per_tensor_symmetric,
        observer_or_fake_quant_ctr=FP8Observer.with_args(
            scale_method=scale_method, backoff=activation_backoff, device=device, run_time_scale=dynamic))
    if per_channel:
        weight = QuantizationSpec(dtype=dtype, qscheme=torch.per_channel_symmetric, ch_axis=0,
                                  observer_or_fake_quant_ctr=FP8PerChannelObserver.with_args(
                                      scale_method=scale_method, backoff=weight_backoff, device=device))
    else:
        weight = QuantizationSpec(dtype=dtype, qscheme=torch.per_tensor_symmetric,
                                  observer_or_fake_quant_ctr=FP8Observer.with_args(
                                      scale_method=scale_method, backoff=weight_backoff, device=device))
    return QuantScheme(activation, weight, "off")


class FP8Quantizer(RuleQuantizer):
    """FP8 linear layers (and attention matmuls with quantize_attention_matmul) for Gaudi; usable with
    torchao's prepare_pt2e / convert_pt2e like the int8 quantizers. Schemes: `fp8_scheme(...)`."""

    rule_names = frozenset({"linear", "attention_matmul"})
    targets_this_cpu = False  # FP8 has no int8 pair-sum saturation to guard


def fp8_observers(graph_module: GraphModule) -> dict[str, FP8Observer]:
    """Every FP8 observer of a prepared graph, by module name."""
    return {name: module for name, module in graph_module.named_modules() if isinstance(module, FP8Observer)}
