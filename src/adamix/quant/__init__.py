"""Quantization primitives: uniform grids (grid), mixed-precision GPTQ (gptq), bit packing (pack)."""
