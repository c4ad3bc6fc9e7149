"""Weight-quantization algorithms, one module each: rtn (round to nearest, and the grouped integer
arithmetic the others share), gptq, awq. Each turns a float weight into a `rtn.QuantizedWeight`."""
