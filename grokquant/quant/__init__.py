"""Quantized formats: GGML block types and llama.cpp's quant mixes."""
