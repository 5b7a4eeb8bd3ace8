"""FLOPs of one step of any torch code, CPU flash attention included.

The measure behind every speed-up this project reports against its FLOP limit.
"""

from __future__ import annotations

from typing import Callable

import torch


def flop_counter():
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    custom = {
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v),
    }
    return FlopCounterMode(display=False, custom_mapping=custom)


def count_step_flops(step: Callable[[int], object]) -> int:
    """FLOPs of ``step(0)`` (forward, backward and optimizer), CPU flash attention included."""
    counter = flop_counter()
    with counter:
        step(0)
    return int(counter.get_total_flops())
