"""Latency of a forward: the one timing helper the pipeline, the package and the benchmarks share."""

from __future__ import annotations

import time
from typing import Callable

import torch


def timed_calls(forward: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, repeats: int = 5,
                warmup: int = 1) -> tuple[dict[str, float], torch.Tensor]:
    """Latency of ``forward(inputs)``: median and min over ``repeats`` calls after ``warmup`` calls (the first
    of which, timed apart as ``first_call_s``, compiles), and the output."""
    with torch.no_grad():
        started = time.perf_counter()
        out = forward(inputs)
        first = time.perf_counter() - started
        for _ in range(max(0, warmup - 1)):
            forward(inputs)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            forward(inputs)
            times.append(time.perf_counter() - started)
    times.sort()
    return {"median_s": times[len(times) // 2], "min_s": times[0], "first_call_s": first}, out

