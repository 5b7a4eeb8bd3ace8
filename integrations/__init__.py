"""Adapters from smi-plugin to quantization/distillation toolkits (imported lazily, one per toolkit)."""
