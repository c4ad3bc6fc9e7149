"""Text dumps: expecttest goldens on small seeded models, stability across runs, formatting rules.

Regenerate the goldens after an intended format change with
`EXPECTTEST_ACCEPT=1 .venv/bin/python -m pytest tests/debug/test_text.py`.
"""
from __future__ import annotations

import re

import expecttest
import pytest
import torch

import pt2q
from pt2q.debug.text import fmt_arg, fmt_float, graph_text
from tests.debug.conftest import gelu_mlp, minmax_config, mlp2, tiny_cnn


def _read(result, stage: str, suffix: str = "txt") -> str:
    files = result.stage(stage)
    return (files.text if suffix == "txt" else files.diff).read_text()


class TestGoldens(expecttest.TestCase):
    @pytest.fixture(autouse=True)
    def _inject(self, dump):
        self.dump = dump

    def test_mlp_every_stage(self):
        result = self.dump(*mlp2())
        self.assertEqual([s.name for s in result.stages],
                         ["capture", "matmul_to_linear", "prepare_pt2e", "calibrate", "convert_pt2e"])
        self.assertExpectedInline(_read(result, "capture"), """\
# 00_capture: 10 nodes
fc1_weight = get_attr fc1.weight : f32[16, 8]
fc1_bias = get_attr fc1.bias : f32[16]
fc2_weight = get_attr fc2.weight : f32[4, 16]
fc2_bias = get_attr fc2.bias : f32[4]
x = placeholder : f32[4, 8]
_guards_fn = call_module _guards_fn(x)
linear = call_function aten.linear.default(x, fc1_weight, fc1_bias) : f32[4, 16]
relu = call_function aten.relu.default(linear) : f32[4, 16]
linear_1 = call_function aten.linear.default(relu, fc2_weight, fc2_bias) : f32[4, 4]
output((linear_1,))
""")
        self.assertExpectedInline(_read(result, "prepare_pt2e", "diff"), """\
--- 01_matmul_to_linear.txt
+++ 02_prepare_pt2e.txt
@@ -1,10 +1,14 @@
 fc1_weight = get_attr fc1.weight : f32[16, 8]
+activation_post_process_1 = call_module activation_post_process_1(fc1_weight) : f32[16, 8]  {PerChannelMinMaxObserver i8 per_channel_symmetric axis=0 (not calibrated)}
 fc1_bias = get_attr fc1.bias : f32[16]
 fc2_weight = get_attr fc2.weight : f32[4, 16]
+activation_post_process_3 = call_module activation_post_process_3(fc2_weight) : f32[4, 16]  {PerChannelMinMaxObserver i8 per_channel_symmetric axis=0 (not calibrated)}
 fc2_bias = get_attr fc2.bias : f32[4]
 x = placeholder : f32[4, 8]
+activation_post_process_0 = call_module activation_post_process_0(x) : f32[4, 8]  {MinMaxObserver u8 per_tensor_affine (not calibrated)}
 _guards_fn = call_module _guards_fn(x)
-linear = call_function aten.linear.default(x, fc1_weight, fc1_bias) : f32[4, 16]
-relu = call_function aten.relu.default(linear) : f32[4, 16]
-linear_1 = call_function aten.linear.default(relu, fc2_weight, fc2_bias) : f32[4, 4]
+linear = call_function aten.linear.default(activation_post_process_0, activation_post_process_1, fc1_bias) : f32[4, 16]  ann=linear
+relu = call_function aten.relu.default(linear) : f32[4, 16]  ann=linear_unary
+activation_post_process_2 = call_module activation_post_process_2(relu) : f32[4, 16]  {MinMaxObserver u8 per_tensor_affine (not calibrated)}
+linear_1 = call_function aten.linear.default(activation_post_process_2, activation_post_process_3, fc2_bias) : f32[4, 4]  ann=linear
 output((linear_1,))
""")
        self.assertExpectedInline(_read(result, "calibrate"), """\
# 03_calibrate: 14 nodes
fc1_weight = get_attr fc1.weight : f32[16, 8]
activation_post_process_1 = call_module activation_post_process_1(fc1_weight) : f32[16, 8]  {PerChannelMinMaxObserver i8 per_channel_symmetric axis=0 n=16 min=-0.3527 max=0.3515 -> scale=(n=16 min=0.00215 max=0.002766) zp=0}
fc1_bias = get_attr fc1.bias : f32[16]
fc2_weight = get_attr fc2.weight : f32[4, 16]
activation_post_process_3 = call_module activation_post_process_3(fc2_weight) : f32[4, 16]  {PerChannelMinMaxObserver i8 per_channel_symmetric axis=0 n=4 min=-0.2411 max=0.2258 -> scale=(n=4 min=0.001616 max=0.001891) zp=0}
fc2_bias = get_attr fc2.bias : f32[4]
x = placeholder : f32[4, 8]
activation_post_process_0 = call_module activation_post_process_0(x) : f32[4, 8]  {MinMaxObserver u8 per_tensor_affine min=-3.331 max=2.357 -> scale=0.02231 zp=149}
_guards_fn = call_module _guards_fn(x)
linear = call_function aten.linear.default(activation_post_process_0, activation_post_process_1, fc1_bias) : f32[4, 16]  ann=linear
relu = call_function aten.relu.default(linear) : f32[4, 16]  ann=linear_unary
activation_post_process_2 = call_module activation_post_process_2(relu) : f32[4, 16]  {MinMaxObserver u8 per_tensor_affine min=0 max=1.519 -> scale=0.005958 zp=0}
linear_1 = call_function aten.linear.default(activation_post_process_2, activation_post_process_3, fc2_bias) : f32[4, 4]  ann=linear
output((linear_1,))
""")
        self.assertExpectedInline(_read(result, "convert_pt2e"), """\
# 04_convert_pt2e: 20 nodes
_scale_0 = get_attr _scale_0 : f32[16]
_zero_point_0 = get_attr _zero_point_0 : i64[16]
quantize_per_channel_default = get_attr _frozen_param0 : i8[16, 8]
dequantize_per_channel_default = call_function quantized_decomposed.dequantize_per_channel.default(quantize_per_channel_default, _scale_0, _zero_point_0, 0, -128, 127, torch.int8) : f32[16, 8]  {i8 per-channel axis=0 scale(n=16 min=0.00215 max=0.002766) zp=0 range=[-128, 127]}
fc1_bias = get_attr fc1.bias : f32[16]
_scale_1 = get_attr _scale_1 : f32[4]
_zero_point_1 = get_attr _zero_point_1 : i64[4]
quantize_per_channel_default_1 = get_attr _frozen_param1 : i8[4, 16]
dequantize_per_channel_default_1 = call_function quantized_decomposed.dequantize_per_channel.default(quantize_per_channel_default_1, _scale_1, _zero_point_1, 0, -128, 127, torch.int8) : f32[4, 16]  {i8 per-channel axis=0 scale(n=4 min=0.001616 max=0.001891) zp=0 range=[-128, 127]}
fc2_bias = get_attr fc2.bias : f32[4]
x = placeholder : f32[4, 8]
quantize_per_tensor_default = call_function quantized_decomposed.quantize_per_tensor.default(x, 0.02231, 149, 0, 255, torch.uint8) : u8[4, 8]  {u8 scale=0.02231 zp=149 range=[0, 255]}
dequantize_per_tensor_default = call_function quantized_decomposed.dequantize_per_tensor.default(quantize_per_tensor_default, 0.02231, 149, 0, 255, torch.uint8) : f32[4, 8]  {u8 scale=0.02231 zp=149 range=[0, 255]}
_guards_fn = call_module _guards_fn(x)
linear = call_function aten.linear.default(dequantize_per_tensor_default, dequantize_per_channel_default, fc1_bias) : f32[4, 16]  {int8 weight}  ann=linear
relu = call_function aten.relu.default(linear) : f32[4, 16]  ann=linear_unary
quantize_per_tensor_default_1 = call_function quantized_decomposed.quantize_per_tensor.default(relu, 0.005958, 0, 0, 255, torch.uint8) : u8[4, 16]  {u8 scale=0.005958 zp=0 range=[0, 255]}
dequantize_per_tensor_default_1 = call_function quantized_decomposed.dequantize_per_tensor.default(quantize_per_tensor_default_1, 0.005958, 0, 0, 255, torch.uint8) : f32[4, 16]  {u8 scale=0.005958 zp=0 range=[0, 255]}
linear_1 = call_function aten.linear.default(dequantize_per_tensor_default_1, dequantize_per_channel_default_1, fc2_bias) : f32[4, 4]  {int8 weight}  ann=linear
output((linear_1,))
""")
        self.assertExpectedInline(_read(result, "convert_pt2e", "diff"), """\
--- 03_calibrate.txt
+++ 04_convert_pt2e.txt
@@ -1,14 +1,20 @@
-fc1_weight = get_attr fc1.weight : f32[16, 8]
-activation_post_process_1 = call_module activation_post_process_1(fc1_weight) : f32[16, 8]  {PerChannelMinMaxObserver i8 per_channel_symmetric axis=0 n=16 min=-0.3527 max=0.3515 -> scale=(n=16 min=0.00215 max=0.002766) zp=0}
+_scale_0 = get_attr _scale_0 : f32[16]
+_zero_point_0 = get_attr _zero_point_0 : i64[16]
+quantize_per_channel_default = get_attr _frozen_param0 : i8[16, 8]
+dequantize_per_channel_default = call_function quantized_decomposed.dequantize_per_channel.default(quantize_per_channel_default, _scale_0, _zero_point_0, 0, -128, 127, torch.int8) : f32[16, 8]  {i8 per-channel axis=0 scale(n=16 min=0.00215 max=0.002766) zp=0 range=[-128, 127]}
 fc1_bias = get_attr fc1.bias : f32[16]
-fc2_weight = get_attr fc2.weight : f32[4, 16]
-activation_post_process_3 = call_module activation_post_process_3(fc2_weight) : f32[4, 16]  {PerChannelMinMaxObserver i8 per_channel_symmetric axis=0 n=4 min=-0.2411 max=0.2258 -> scale=(n=4 min=0.001616 max=0.001891) zp=0}
+_scale_1 = get_attr _scale_1 : f32[4]
+_zero_point_1 = get_attr _zero_point_1 : i64[4]
+quantize_per_channel_default_1 = get_attr _frozen_param1 : i8[4, 16]
+dequantize_per_channel_default_1 = call_function quantized_decomposed.dequantize_per_channel.default(quantize_per_channel_default_1, _scale_1, _zero_point_1, 0, -128, 127, torch.int8) : f32[4, 16]  {i8 per-channel axis=0 scale(n=4 min=0.001616 max=0.001891) zp=0 range=[-128, 127]}
 fc2_bias = get_attr fc2.bias : f32[4]
 x = placeholder : f32[4, 8]
-activation_post_process_0 = call_module activation_post_process_0(x) : f32[4, 8]  {MinMaxObserver u8 per_tensor_affine min=-3.331 max=2.357 -> scale=0.02231 zp=149}
+quantize_per_tensor_default = call_function quantized_decomposed.quantize_per_tensor.default(x, 0.02231, 149, 0, 255, torch.uint8) : u8[4, 8]  {u8 scale=0.02231 zp=149 range=[0, 255]}
+dequantize_per_tensor_default = call_function quantized_decomposed.dequantize_per_tensor.default(quantize_per_tensor_default, 0.02231, 149, 0, 255, torch.uint8) : f32[4, 8]  {u8 scale=0.02231 zp=149 range=[0, 255]}
 _guards_fn = call_module _guards_fn(x)
-linear = call_function aten.linear.default(activation_post_process_0, activation_post_process_1, fc1_bias) : f32[4, 16]  ann=linear
+linear = call_function aten.linear.default(dequantize_per_tensor_default, dequantize_per_channel_default, fc1_bias) : f32[4, 16]  {int8 weight}  ann=linear
 relu = call_function aten.relu.default(linear) : f32[4, 16]  ann=linear_unary
-activation_post_process_2 = call_module activation_post_process_2(relu) : f32[4, 16]  {MinMaxObserver u8 per_tensor_affine min=0 max=1.519 -> scale=0.005958 zp=0}
-linear_1 = call_function aten.linear.default(activation_post_process_2, activation_post_process_3, fc2_bias) : f32[4, 4]  ann=linear
+quantize_per_tensor_default_1 = call_function quantized_decomposed.quantize_per_tensor.default(relu, 0.005958, 0, 0, 255, torch.uint8) : u8[4, 16]  {u8 scale=0.005958 zp=0 range=[0, 255]}
+dequantize_per_tensor_default_1 = call_function quantized_decomposed.dequantize_per_tensor.default(quantize_per_tensor_default_1, 0.005958, 0, 0, 255, torch.uint8) : f32[4, 16]  {u8 scale=0.005958 zp=0 range=[0, 255]}
+linear_1 = call_function aten.linear.default(dequantize_per_tensor_default_1, dequantize_per_channel_default_1, fc2_bias) : f32[4, 4]  {int8 weight}  ann=linear
 output((linear_1,))
""")

    def test_conv_net_converted(self):
        result = self.dump(*tiny_cnn())
        self.assertExpectedInline(_read(result, "convert_pt2e"), """\
# 04_convert_pt2e: 34 nodes
_scale_0 = get_attr _scale_0 : f32[4]
_zero_point_0 = get_attr _zero_point_0 : i64[4]
quantize_per_channel_default = get_attr _frozen_param0 : i8[4, 3, 3, 3]
dequantize_per_channel_default = call_function quantized_decomposed.dequantize_per_channel.default(quantize_per_channel_default, _scale_0, _zero_point_0, 0, -128, 127, torch.int8) : f32[4, 3, 3, 3]  {i8 per-channel axis=0 scale(n=4 min=0.001049 max=0.001968) zp=0 range=[-128, 127]}
conv1_bias = get_attr conv1.bias : f32[4]
_scale_1 = get_attr _scale_1 : f32[4]
_zero_point_1 = get_attr _zero_point_1 : i64[4]
quantize_per_channel_default_1 = get_attr _frozen_param1 : i8[4, 4, 3, 3]
dequantize_per_channel_default_1 = call_function quantized_decomposed.dequantize_per_channel.default(quantize_per_channel_default_1, _scale_1, _zero_point_1, 0, -128, 127, torch.int8) : f32[4, 4, 3, 3]  {i8 per-channel axis=0 scale(n=4 min=0.001103 max=0.001293) zp=0 range=[-128, 127]}
conv2_bias = get_attr conv2.bias : f32[4]
_scale_2 = get_attr _scale_2 : f32[2]
_zero_point_2 = get_attr _zero_point_2 : i64[2]
quantize_per_channel_default_2 = get_attr _frozen_param2 : i8[2, 4]
dequantize_per_channel_default_2 = call_function quantized_decomposed.dequantize_per_channel.default(quantize_per_channel_default_2, _scale_2, _zero_point_2, 0, -128, 127, torch.int8) : f32[2, 4]  {i8 per-channel axis=0 scale(n=2 min=0.001422 max=0.00301) zp=0 range=[-128, 127]}
head_bias = get_attr head.bias : f32[2]
images = placeholder : f32[2, 3, 8, 8]
quantize_per_tensor_default = call_function quantized_decomposed.quantize_per_tensor.default(images, 0.02495, 134, 0, 255, torch.uint8) : u8[2, 3, 8, 8]  {u8 scale=0.02495 zp=134 range=[0, 255]}
dequantize_per_tensor_default = call_function quantized_decomposed.dequantize_per_tensor.default(quantize_per_tensor_default, 0.02495, 134, 0, 255, torch.uint8) : f32[2, 3, 8, 8]  {u8 scale=0.02495 zp=134 range=[0, 255]}
_guards_fn = call_module _guards_fn(images)
conv2d = call_function aten.conv2d.default(dequantize_per_tensor_default, dequantize_per_channel_default, conv1_bias, [1, 1], [1, 1]) : f32[2, 4, 8, 8]  {int8 weight}  ann=conv
relu = call_function aten.relu.default(conv2d) : f32[2, 4, 8, 8]  ann=conv_unary
quantize_per_tensor_default_1 = call_function quantized_decomposed.quantize_per_tensor.default(relu, 0.008987, 0, 0, 255, torch.uint8) : u8[2, 4, 8, 8]  {u8 scale=0.008987 zp=0 range=[0, 255]}
dequantize_per_tensor_default_1 = call_function quantized_decomposed.dequantize_per_tensor.default(quantize_per_tensor_default_1, 0.008987, 0, 0, 255, torch.uint8) : f32[2, 4, 8, 8]  {u8 scale=0.008987 zp=0 range=[0, 255]}
conv2d_1 = call_function aten.conv2d.default(dequantize_per_tensor_default_1, dequantize_per_channel_default_1, conv2_bias) : f32[2, 4, 6, 6]  {int8 weight}  ann=conv
quantize_per_tensor_default_2 = call_function quantized_decomposed.quantize_per_tensor.default(conv2d_1, 0.00707, 161, 0, 255, torch.uint8) : u8[2, 4, 6, 6]  {u8 scale=0.00707 zp=161 range=[0, 255]}
dequantize_per_tensor_default_2 = call_function quantized_decomposed.dequantize_per_tensor.default(quantize_per_tensor_default_2, 0.00707, 161, 0, 255, torch.uint8) : f32[2, 4, 6, 6]  {u8 scale=0.00707 zp=161 range=[0, 255]}
adaptive_avg_pool2d = call_function aten.adaptive_avg_pool2d.default(dequantize_per_tensor_default_2, [1, 1]) : f32[2, 4, 1, 1]  {dequantized input}  ann=pooling
quantize_per_tensor_default_3 = call_function quantized_decomposed.quantize_per_tensor.default(adaptive_avg_pool2d, 0.00707, 161, 0, 255, torch.uint8) : u8[2, 4, 1, 1]  {u8 scale=0.00707 zp=161 range=[0, 255]}
dequantize_per_tensor_default_3 = call_function quantized_decomposed.dequantize_per_tensor.default(quantize_per_tensor_default_3, 0.00707, 161, 0, 255, torch.uint8) : f32[2, 4, 1, 1]  {u8 scale=0.00707 zp=161 range=[0, 255]}
flatten = call_function aten.flatten.using_ints(dequantize_per_tensor_default_3, 1) : f32[2, 4]  {dequantized input}  ann=flatten
quantize_per_tensor_default_4 = call_function quantized_decomposed.quantize_per_tensor.default(flatten, 0.00707, 161, 0, 255, torch.uint8) : u8[2, 4]  {u8 scale=0.00707 zp=161 range=[0, 255]}
dequantize_per_tensor_default_4 = call_function quantized_decomposed.dequantize_per_tensor.default(quantize_per_tensor_default_4, 0.00707, 161, 0, 255, torch.uint8) : f32[2, 4]  {u8 scale=0.00707 zp=161 range=[0, 255]}
linear = call_function aten.linear.default(dequantize_per_tensor_default_4, dequantize_per_channel_default_2, head_bias) : f32[2, 2]  {int8 weight}  ann=linear
output((linear,))
""")

    def test_smooth_quant_explicit_mul(self):
        config = minmax_config(smooth_quant=pt2q.SmoothQuantConfig(alpha=0.5, skip_if_worse=False))
        result = self.dump(*gelu_mlp(), config=config)
        self.assertExpectedInline(_read(result, "smooth_quant_apply", "diff"), """\
--- 06_calibrate.txt
+++ 07_smooth_quant_apply.txt
@@ -1,16 +1,18 @@
-fc1_weight = get_attr fc1.weight : f32[16, 8]
-activation_post_process_1 = call_module activation_post_process_1(fc1_weight) : f32[16, 8]  {PerChannelMinMaxObserver i8 per_channel_symmetric axis=0 n=16 min=-0.3527 max=0.3515 -> scale=(n=16 min=0.00215 max=0.002766) zp=0}
+fc1_weight_sq = get_attr fc1_weight_sq : f32[16, 8]  {smooth_quant scaled}
+activation_post_process_1 = call_module activation_post_process_1(fc1_weight_sq) : f32[16, 8]  {PerChannelMinMaxObserver i8 per_channel_symmetric axis=0 n=16 min=-2.383 max=2.374 -> scale=(n=16 min=0.006593 max=0.01869) zp=0}
 fc1_bias = get_attr fc1.bias : f32[16]
-fc2_weight = get_attr fc2.weight : f32[4, 16]
-activation_post_process_3 = call_module activation_post_process_3(fc2_weight) : f32[4, 16]  {PerChannelMinMaxObserver i8 per_channel_symmetric axis=0 n=4 min=-0.2411 max=0.2258 -> scale=(n=4 min=0.001616 max=0.001891) zp=0}
+fc2_weight_sq = get_attr fc2_weight_sq : f32[4, 16]  {smooth_quant scaled}
+activation_post_process_3 = call_module activation_post_process_3(fc2_weight_sq) : f32[4, 16]  {PerChannelMinMaxObserver i8 per_channel_symmetric axis=0 n=4 min=-1.049 max=1.166 -> scale=(n=4 min=0.007568 max=0.009147) zp=0}
 fc2_bias = get_attr fc2.bias : f32[4]
 x = placeholder : f32[4, 8]
-activation_post_process_0 = call_module activation_post_process_0(x) : f32[4, 8]  {MinMaxObserver u8 per_tensor_affine min=-16.09 max=2.357 -> scale=0.07236 zp=222}
-pt2q_channel_recorder_0 = call_module pt2q_channel_recorder_0(x) : f32[4, 8]  {ChannelRecorder channels=8 absmax(n=8 min=1.161 max=16.09)}
+x_sq_inv_scale = get_attr x_sq_inv_scale : f32[1, 8]  {smooth_quant 1/s (n=8 min=0.148 max=0.5257)}
+mul_tensor = call_function aten.mul.Tensor(x, x_sq_inv_scale) : f32[4, 8]  {smooth_quant x*(1/s) 1/s(n=8 min=0.148 max=0.5257)}
+activation_post_process_0 = call_module activation_post_process_0(mul_tensor) : f32[4, 8]  {MinMaxObserver u8 per_tensor_affine min=-2.383 max=0.8941 -> scale=0.01285 zp=185}
 _guards_fn = call_module _guards_fn(x)
 linear = call_function aten.linear.default(activation_post_process_0, activation_post_process_1, fc1_bias) : f32[4, 16]  ann=linear
 gelu = call_function aten.gelu.default(linear) : f32[4, 16]  ann=linear_unary
-activation_post_process_2 = call_module activation_post_process_2(gelu) : f32[4, 16]  {MinMaxObserver u8 per_tensor_affine min=-0.17 max=6.186 -> scale=0.02493 zp=7}
-pt2q_channel_recorder_1 = call_module pt2q_channel_recorder_1(gelu) : f32[4, 16]  {ChannelRecorder channels=16 absmax(n=16 min=0.1698 max=6.186)}
+gelu_sq_inv_scale = get_attr gelu_sq_inv_scale : f32[1, 16]  {smooth_quant 1/s (n=16 min=0.1684 max=1.115)}
+mul_tensor_1 = call_function aten.mul.Tensor(gelu, gelu_sq_inv_scale) : f32[4, 16]  {smooth_quant x*(1/s) 1/s(n=16 min=0.1684 max=1.115)}
+activation_post_process_2 = call_module activation_post_process_2(mul_tensor_1) : f32[4, 16]  {MinMaxObserver u8 per_tensor_affine min=-0.1892 max=1.166 -> scale=0.005315 zp=36}
 linear_1 = call_function aten.linear.default(activation_post_process_2, activation_post_process_3, fc2_bias) : f32[4, 4]  ann=linear
 output((linear_1,))
""")


def test_dumps_are_identical_across_runs(dump):
    first = dump(*tiny_cnn(), name="a")
    second = dump(*tiny_cnn(), name="b")
    assert [s.text.name for s in first.stages] == [s.text.name for s in second.stages]
    for a, b in zip(first.stages, second.stages):
        assert a.text.read_text() == b.text.read_text(), a.name
        if a.diff is not None:
            assert a.diff.read_text() == b.diff.read_text(), a.name
        assert not re.search(r"0x[0-9a-f]{6,}", a.text.read_text()), "a memory address leaked into the dump"


def test_unchanged_pass_has_an_empty_diff(dump):
    result = dump(*mlp2())
    assert _read(result, "matmul_to_linear", "diff") == \
        "# 00_capture -> 01_matmul_to_linear: no change\n"


def test_formatting_rules():
    assert fmt_float(0.0060731372) == "0.006073"
    assert fmt_float(-0.0) == "0"
    assert fmt_float(float("inf")) == "inf"
    assert fmt_arg([1, 2.123456, None, torch.uint8]) == "[1, 2.123, None, torch.uint8]"
    assert fmt_arg(torch.zeros(2, 3, dtype=torch.int8)) == "tensor(i8[2, 3])"
    assert fmt_arg(object()) == "object"  # never a default repr (it carries an address)


def test_graph_text_of_any_graph_module():
    model, calib = mlp2()
    text = graph_text(pt2q.capture(model, calib[0]), "mine")
    assert text.startswith("# 00_mine: 10 nodes\n")
    assert "linear = call_function aten.linear.default(x, fc1_weight, fc1_bias) : f32[4, 16]" in text
