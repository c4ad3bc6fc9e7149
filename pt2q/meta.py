"""Every metadata key pt2q writes, in one place: `GraphModule.meta` keys of the models it returns, and
`Node.meta` keys of the graphs it annotates. Modules import the names; no other string literal is used."""

# -- GraphModule.meta ------------------------------------------------------------------------------------
EXAMPLE_INPUTS = "pt2q_example_inputs"        # (args, kwargs) of the capture; save() re-exports with them
DYNAMIC_SHAPES = "pt2q_dynamic_shapes"        # the torch.export dynamic_shapes spec of the capture
SOURCE_CLASS = "pt2q_source_class"            # class name of the captured model
CONFIG = "pt2q_config"                        # the quantization config the model was prepared with
PIPELINE = "pt2q_pipeline"                    # the pipeline.Pipeline a prepared model runs, until convert()
PREPARED = "pt2q_prepared"                    # True on a model prepare() returned, until convert()
QAT = "pt2q_qat"                              # True on a model prepare_qat() returned (a training graph)
CONVERTED = "pt2q_converted"                  # True on a prepared model that convert() consumed
QUANTIZED = "pt2q_quantized"                  # True on a converted (or loaded) model
SMOOTH_QUANT_PLAN = "pt2q_smooth_quant_plan"  # SmoothQuant groups and recorders, waiting for convert()
SMOOTH_QUANT_REPORT = "pt2q_smooth_quant_report"  # what SmoothQuant did (scales, skipped groups)
INT8_NUMERICS = "pt2q_int8_numerics"          # saturation guard chosen, per-op guards and the ISA (pt2q.isa)
FP8 = "pt2q_fp8"                              # the FP8 format, device and scale method a model was quantized with
FP8_MEASUREMENT = "pt2q_fp8_measurement"      # where a from_measurement model's statistics came from
SAVED_METADATA = "pt2q_saved_metadata"        # pt2q's metadata read back by load()
WEIGHT_ONLY_PLAN = "pt2q_weight_only_plan"    # layers to quantize and, once calibrated, their quantized weights
WEIGHT_ONLY_REPORT = "pt2q_weight_only_report"  # what weight-only quantization did, per layer
WEIGHT_TRANSFER_REPORT = "pt2q_weight_transfer_report"  # which packed weights transfer_quantized_weights carried
COVERAGE = "pt2q_report"                      # pt2q.coverage.CoverageReport: weighted ops left float, and why
TUNING = "pt2q_tuning"                        # pt2q.autotune's trial table (JSON data; save() keeps it)

# -- Node.meta ---------------------------------------------------------------------------------------------
ANNOTATION = "quantization_annotation"        # torchao's annotation key (read by prepare_pt2e)
SCHEME = "pt2q_scheme"                        # the QuantScheme a quantized op was annotated with
WEIGHT_FORMAT = "pt2q_weight_format"          # the WeightFormat of a pt2q.dequantize_weight node
