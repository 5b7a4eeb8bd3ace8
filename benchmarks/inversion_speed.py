"""Inversion speed, FLOPs and memory: dense vs sparse, ours vs a reference-style implementation.

Everything is measured within one run as ratios. Per model and batch size:

* seconds per iteration of *our* inverter (the production ``SparseInverter.step``) at every kept
  count of the schedule, timed round-robin over the stages after warm-up, the fastest of the rounds (on a
  shared machine noise only adds time, as ``timeit`` notes; every implementation and stage alike); with
  ``compile_step`` also the compiled step (``InversionConfig.compile_step``) after its compilation;
* the projected whole run (``iterations`` steps, the schedule's stage lengths) and dense/sparse ratio;
* the public API end to end (``SparseInverter(...).invert(labels)``, default logging): dense against the
  schedule scaled to ``public_iterations`` (whole run), and the cost of one more iteration at the final
  kept count against one more dense iteration (runs of ``public_iterations`` and half that, every stop
  in the first iterations; the fastest of ``rounds`` interleaved runs each), so the step timing cannot
  drift from what users get;
* FLOPs per iteration (torch's ``FlopCounterMode``, with torch's SDPA formulas registered for the
  CPU flash-attention ops it does not cover);
* peak memory of one iteration above the loaded model (fresh process per measurement on the CPU,
  peak RSS with the high-water mark reset before the steps; ``max_memory_allocated`` on a GPU);
* the same for a reference-style implementation as the authors' code behaves: explicit attention
  maps kept for every block, full-image patch embedding, full-image Adam step, clamp and TV, and
  teacher weights that still receive gradients.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from smi_plugin.config import InversionConfig
from smi_plugin.inverter import InversionState, SparseInverter
from smi_plugin.images import frozen
from smi_plugin.losses import tv_l2
from smi_plugin.schedule import StoppingSchedule
from smi_plugin.flops import count_step_flops
from smi_plugin.tokens import PRECISIONS, forward_tokens

DEFAULT_MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224")


@dataclass
class BenchConfig:
    """What to benchmark.

    Args:
        models: timm model names (random weights: timing does not depend on them).
        batch_sizes: images per inversion batch.
        iterations: whole-run length the projection uses (the paper: 4000).
        schedule: stopping schedule (text form); the paper's by default.
        steps: timed iterations per stage and round; rounds: interleaved repetitions (the fastest is taken:
            a per-iteration figure from two runs' difference is otherwise at the mercy of one slow moment).
        warmup: untimed iterations per stage before timing.
        public_iterations: length of the public-API runs (0 skips them); 80 = the paper's 4000 / 50,
            so the scaled stops (1, 2, 4, 6) keep the paper's proportions exactly.
        compile_step: also time the compiled step at every stage.
        precision: our inverter's ``InversionConfig.precision`` (float32 or bfloat16 autocast); the
            reference-style implementation stays float32, as the authors' code runs.
        reference: also time the reference-style implementation.
        memory: also measure peak memory (fresh processes on the CPU).
        flops: also count FLOPs.
        device: ``cpu``/``cuda``; default: cuda when available.
    """

    models: tuple[str, ...] = DEFAULT_MODELS
    batch_sizes: tuple[int, ...] = (8,)
    iterations: int = 4000
    schedule: str = "paper"
    steps: int = 3
    rounds: int = 3
    warmup: int = 1
    public_iterations: int = 80
    compile_step: bool = False
    precision: str = "float32"
    reference: bool = True
    memory: bool = True
    flops: bool = True
    device: str | None = None

    def __post_init__(self) -> None:
        if self.public_iterations and self.public_iterations < 20:
            # Per-iteration costs are differences between runs of n and n/2 iterations after n/2 >= stops + 1.
            raise ValueError(f"public_iterations={self.public_iterations} is too short to time per iteration: "
                             "give at least 20 (or 0 to skip the public-API runs)")

    @classmethod
    def quick(cls, **overrides: Any) -> "BenchConfig":
        """Settings that keep one model under a minute on a 2-core CPU."""
        return cls(**{"steps": 2, "rounds": 2, "warmup": 1, **overrides})


def _device(cfg: BenchConfig) -> torch.device:
    return torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _build(model_name: str, batch_size: int, cfg: BenchConfig, device: torch.device):
    import timm

    model = timm.create_model(model_name, pretrained=False).to(device).eval()
    config = InversionConfig(iterations=cfg.iterations, batch_size=batch_size, schedule=cfg.schedule,
                             seed=0, log_every=cfg.iterations, precision=cfg.precision)
    inverter = SparseInverter(model, config, progress=False)
    labels = torch.arange(batch_size, device=device) % inverter.num_classes
    return model, inverter, labels


def _state_at_stage(inverter: SparseInverter, labels: torch.Tensor, stage: int,
                    stop_seconds: list[float] | None = None) -> InversionState:
    """A state whose retained patches went through the first ``stage`` stops (random scores).

    The wall time of each stop (selection, Adam-state slicing, prior planning) is appended to
    ``stop_seconds`` when given: a real sparse run pays it once per stage.
    """
    if stop_seconds is None:
        return inverter.state_at_stage(labels, seed=stage, stage=stage)
    # The same stops as state_at_stage (same seeds), each one timed.
    state = inverter.start(labels, seed=stage)
    generator = torch.Generator().manual_seed(stage)
    for planned in inverter.stages[:stage]:
        scores = torch.rand(state.kept.shape, generator=generator).to(state.kept.device)
        started = time.perf_counter()
        inverter.stop(state, planned, scores)
        _sync(state.kept.device)
        stop_seconds.append(time.perf_counter() - started)
    return state


class ReferenceStyleInversion:
    """One iteration as the authors' code runs it (see ``docs/design.md#how-the-authors-code-runs``).

    Full-size image parameter, Adam, clamp and TV over every pixel; patch embedding of the whole
    image, then a gather of the kept tokens; unfused attention in every block with every map kept;
    teacher weights left trainable, so their gradients are computed and accumulated.
    """

    def __init__(self, inverter: SparseInverter, labels: torch.Tensor, kept: torch.Tensor) -> None:
        self.inverter, self.labels, self.model = inverter, labels, inverter.model
        grid = inverter.grid
        generator = torch.Generator().manual_seed(0)
        self.image = torch.randn(labels.numel(), grid.in_chans, *grid.image_size, generator=generator)
        self.image = self.image.to(labels.device).requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.image], lr=inverter.config.lr, betas=inverter.config.betas)
        prefix = torch.arange(grid.num_prefix_tokens, device=kept.device).expand(kept.shape[0], -1)
        self.token_index = torch.cat([prefix, kept + grid.num_prefix_tokens], 1)
        self.maps: list[torch.Tensor] = []
        self.low = inverter.channels.low.view(1, -1, 1, 1)
        self.high = inverter.channels.high.view(1, -1, 1, 1)

    @contextmanager
    def patched(self) -> Iterator[None]:
        """Unfused attention everywhere, maps kept, weights trainable; all restored afterwards."""
        attns = [block.attn for block in self.model.blocks]
        fused = [a.fused_attn for a in attns]
        handles = [a.attn_drop.register_forward_hook(lambda m, i, o: self.maps.append(o)) for a in attns]
        for a in attns:
            a.fused_attn = False
        self.model.requires_grad_(True)
        try:
            yield
        finally:
            for a, flag in zip(attns, fused):
                a.fused_attn = flag
            for h in handles:
                h.remove()
            self.model.requires_grad_(False)
            self.model.zero_grad(set_to_none=True)

    def step(self, iteration: int) -> None:
        self.maps.clear()
        side = self.image.shape[-1]
        lim = side // 8
        dy, dx = (int(v) for v in torch.randint(-lim, lim + 1, (2,)))
        x = torch.roll(self.image, shifts=(dy, dx), dims=(2, 3))
        if torch.rand(()) < 0.5:
            x = x.flip(3)
        tokens = self.model._pos_embed(self.model.patch_embed(x))
        tokens = tokens.gather(1, self.token_index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        logits = forward_tokens(self.model, tokens)
        loss = F.cross_entropy(logits, self.labels) + self.inverter.config.tv_l2_weight * tv_l2(self.image)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            self.image.copy_(torch.maximum(torch.minimum(self.image, self.high), self.low))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(step, count: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for i in range(count):
        step(i)
    _sync(device)
    return (time.perf_counter() - start) / count


def public_api_seconds(model, stages: Sequence[tuple[int, float]], batch_size: int, cfg: BenchConfig,
                       device: torch.device) -> dict[str, float]:
    """Wall times of ``SparseInverter(model, config).invert(labels)``, end to end, default logging.

    ``whole_run``: the schedule's ``stages`` scaled to ``public_iterations`` (the paper's proportions
    exactly when it is a multiple of ``iterations / 50``), against ``dense`` of the same length.
    Per iteration: runs of half that length as well; the difference over the extra iterations is what
    an iteration costs through the public loop (its logging, learning-rate and augmentation draws
    included), free of the per-run set-up. ``final_stage`` runs stop every patch they will stop in
    their first iterations, so their extra iterations are all at the final kept count. Each run is the
    fastest of ``cfg.rounds``, the five runs interleaved round by round: one slow moment of a shared
    machine in a half-length run once made that difference negative.
    """
    n, scaled, previous = cfg.public_iterations, [], 0
    for iteration, ratio in stages:  # kept strictly increasing when a short run squeezes the stages
        previous = max(previous + 1, round(iteration * n / cfg.iterations))
        scaled.append(f"{previous}:{ratio}")
    early = ",".join(f"{j + 1}:{ratio}" for j, (_, ratio) in enumerate(stages))
    half = max(len(stages) + 1, n // 2)
    runs = {"dense": ("dense", n), "whole_run": (",".join(scaled), n), "dense_half": ("dense", half),
            "final_stage": (early, n), "final_stage_half": (early, half)}
    labels = torch.arange(batch_size, device=device) % int(model.num_classes)
    seconds: dict[str, float] = {}
    for _ in range(cfg.rounds):
        for name, (schedule, iterations) in runs.items():
            config = InversionConfig(iterations=iterations, batch_size=batch_size, schedule=schedule, seed=0,
                                     precision=cfg.precision)
            inverter = SparseInverter(model, config, progress=False)
            _sync(device)
            started = time.perf_counter()
            inverter.invert(labels)
            _sync(device)
            seconds[name] = min(seconds.get(name, float("inf")), time.perf_counter() - started)
    seconds["dense_per_iteration"] = (seconds["dense"] - seconds["dense_half"]) / (n - half)
    seconds["final_stage_per_iteration"] = (seconds["final_stage"] - seconds["final_stage_half"]) / (n - half)
    return seconds


def _stage_lengths(schedule: StoppingSchedule, iterations: int) -> list[int]:
    bounds = [0] + [i for i, _ in schedule.stages if i < iterations] + [iterations]
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    return lengths + [0] * (len(schedule.stages) + 1 - len(lengths))


def measure_memory(model_name: str, batch_size: int, stage: int, implementation: str, cfg: BenchConfig) -> int:
    """Peak bytes of inversion steps above the loaded model, in this process.

    On the CPU the kernel's RSS high-water mark is reset right before the steps (Linux
    ``/proc/self/clear_refs``), so call this in a fresh process (``--probe-memory``).
    """
    device = _device(cfg)
    model, inverter, labels = _build(model_name, batch_size, cfg, device)
    _release_free_memory()
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else _rss_bytes()
    state = _state_at_stage(inverter, labels, stage)
    if implementation == "reference":
        runner = ReferenceStyleInversion(inverter, labels, state.kept)
        context, step = runner.patched(), runner.step
    else:
        context, step = frozen(model), (lambda i: inverter.step(state, i))
    with context:
        _release_free_memory()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        else:
            _reset_peak_rss()
        for i in range(2):
            step(i)
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_rss_bytes()
    return peak - baseline


def _release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so RSS counts live memory only."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: RSS may then include freed heap, which only overstates both runs


def _proc_status_kib(field_name: str) -> int:
    with open("/proc/self/status") as handle:
        return int(re.search(rf"{field_name}:\s+(\d+)", handle.read()).group(1))


def _rss_bytes() -> int:
    return _proc_status_kib("VmRSS") * 1024


def _peak_rss_bytes() -> int:
    return _proc_status_kib("VmHWM") * 1024


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _memory_in_subprocess(model_name: str, batch_size: int, stage: int, implementation: str,
                          cfg: BenchConfig) -> int | None:
    if not os.path.exists("/proc/self/clear_refs"):
        return None  # peak RSS cannot be reset on this OS; memory is reported as unknown
    payload = json.dumps(dict(model=model_name, batch_size=batch_size, stage=stage,
                              implementation=implementation, config=asdict(cfg)))
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--probe-memory", payload],
                            capture_output=True, text=True, check=True)
    return int(json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"])


def benchmark_one(model_name: str, batch_size: int, cfg: BenchConfig) -> dict[str, Any]:
    """All measurements for one model and batch size (one JSON record)."""
    device = _device(cfg)
    model, inverter, labels = _build(model_name, batch_size, cfg, device)
    schedule = inverter.config.schedule
    counts = inverter.kept_counts
    stop_seconds: list[float] = []
    states = [_state_at_stage(inverter, labels, s) for s in range(len(counts) - 1)]
    states.append(_state_at_stage(inverter, labels, len(counts) - 1, stop_seconds))
    runners: dict[str, Any] = {}
    if cfg.reference:
        runners = {"reference_dense": ReferenceStyleInversion(inverter, labels, states[0].kept),
                   "reference_final": ReferenceStyleInversion(inverter, labels, states[-1].kept)}
    ours: dict[int, list[float]] = {s: [] for s in range(len(counts))}
    reference: dict[str, list[float]] = {name: [] for name in runners}
    for round_index in range(cfg.rounds):
        with frozen(model):
            for s, state in enumerate(states):
                step = lambda i, st=state: inverter.step(st, i)  # noqa: E731
                if round_index == 0:
                    _time_steps(step, cfg.warmup, device)
                ours[s].append(_time_steps(step, cfg.steps, device))
        for name, runner in runners.items():
            with runner.patched():
                if round_index == 0:
                    _time_steps(runner.step, cfg.warmup, device)
                reference[name].append(_time_steps(runner.step, cfg.steps, device))
    compiled: list[float] = []
    if cfg.compile_step:
        # Every model's step is the same code object (SparseInverter._objective): without a reset, dynamo's
        # per-code recompile limit is reached on a later model, whose "compiled" step then runs eager.
        torch._dynamo.reset()
        compiled_inverter = SparseInverter(model, inverter.config.replace(compile_step=True), progress=False)
        with frozen(model):
            for state in states:  # compilation first (a handful of graphs), then the timed steps
                step = lambda i, st=state: compiled_inverter.step(st, i)  # noqa: E731
                _time_steps(step, 2, device)
                compiled.append(min(_time_steps(step, cfg.steps, device) for _ in range(cfg.rounds)))
    stage_seconds = [min(ours[s]) for s in range(len(counts))]
    lengths = _stage_lengths(schedule, cfg.iterations)
    dense_run = cfg.iterations * stage_seconds[0]
    sparse_run = sum(n * t for n, t in zip(lengths, stage_seconds)) + sum(stop_seconds)
    record: dict[str, Any] = {
        "model": model_name, "batch_size": batch_size, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "precision": cfg.precision, "iterations": cfg.iterations,
        "timing": f"fastest of {cfg.rounds} rounds of {cfg.steps} steps",
        "schedule": str(schedule),
        "kept_counts": counts, "stage_lengths": lengths, "stage_seconds_per_iteration": stage_seconds,
        "dense_seconds_per_iteration": stage_seconds[0], "whole_run_seconds_dense": dense_run,
        "whole_run_seconds_sparse": sparse_run, "stop_seconds": stop_seconds,
        "whole_run_speedup": dense_run / sparse_run,
        "final_stage_speedup": stage_seconds[0] / stage_seconds[-1],
        "torch_version": torch.__version__,
    }
    if compiled:
        compiled_sparse_run = sum(n * t for n, t in zip(lengths, compiled)) + sum(stop_seconds)
        record.update(compiled_stage_seconds_per_iteration=compiled,
                      compiled_whole_run_speedup=cfg.iterations * compiled[0] / compiled_sparse_run,
                      compiled_final_stage_speedup=compiled[0] / compiled[-1],
                      compiled_dense_speedup_over_eager=stage_seconds[0] / compiled[0],
                      compiled_final_speedup_over_eager=stage_seconds[-1] / compiled[-1])
    if cfg.public_iterations and schedule.stages:
        public = public_api_seconds(model, schedule.stages, batch_size, cfg, device)
        record.update(public_iterations=cfg.public_iterations, public_seconds=public,
                      public_whole_run_speedup=public["dense"] / public["whole_run"],
                      public_final_stage_speedup=public["dense_per_iteration"] / public["final_stage_per_iteration"])
    if runners:
        ref = {name: min(v) for name, v in reference.items()}
        record.update(reference_dense_seconds_per_iteration=ref["reference_dense"],
                      reference_final_stage_seconds_per_iteration=ref["reference_final"],
                      reference_dense_speedup=ref["reference_dense"] / stage_seconds[0],
                      reference_final_stage_speedup=ref["reference_dense"] / ref["reference_final"])
    if cfg.flops:
        with frozen(model):
            dense_flops = count_step_flops(lambda i: inverter.step(states[0], i))
            final_flops = count_step_flops(lambda i: inverter.step(states[-1], i))
        record.update(dense_flops=dense_flops, final_stage_flops=final_flops,
                      final_stage_flop_ratio=dense_flops / final_flops,
                      final_stage_speedup_over_flop_ratio=record["final_stage_speedup"] / (dense_flops / final_flops))
        if runners:
            with runners["reference_dense"].patched():
                record["reference_dense_flops"] = count_step_flops(runners["reference_dense"].step)
    del states, runners, model, inverter
    gc.collect()
    if cfg.memory:
        last = len(counts) - 1
        if device.type == "cuda":
            measure = lambda stage, impl: measure_memory(model_name, batch_size, stage, impl, cfg)  # noqa: E731
        else:
            measure = lambda stage, impl: _memory_in_subprocess(model_name, batch_size, stage, impl, cfg)  # noqa: E731
        dense_mem, sparse_mem = measure(0, "ours"), measure(last, "ours")
        record.update(peak_memory_dense_bytes=dense_mem, peak_memory_sparse_bytes=sparse_mem,
                      peak_memory_ratio=None if not dense_mem else sparse_mem / dense_mem)
        if cfg.reference:
            ref_dense, ref_sparse = measure(0, "reference"), measure(last, "reference")
            record.update(reference_peak_memory_dense_bytes=ref_dense, reference_peak_memory_sparse_bytes=ref_sparse)
    return record


def run_benchmark(cfg: BenchConfig, progress: bool = True) -> list[dict[str, Any]]:
    """One record per (model, batch size)."""
    from tqdm.auto import tqdm

    jobs = [(m, b) for m in cfg.models for b in cfg.batch_sizes]
    records = []
    for model_name, batch_size in tqdm(jobs, desc="benchmark", disable=not progress):
        records.append(benchmark_one(model_name, batch_size, cfg))
    return records


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """A fixed-width table of the headline ratios."""
    columns = [("model", "model", "{}"), ("B", "batch_size", "{}"), ("precision", "precision", "{}"),
               ("dense s/it", "dense_seconds_per_iteration", "{:.3f}"),
               ("final s/it", "stage_seconds_per_iteration", None),
               ("whole-run x", "whole_run_speedup", "{:.2f}"), ("final x", "final_stage_speedup", "{:.2f}"),
               ("FLOP x", "final_stage_flop_ratio", "{:.2f}"),
               ("API whole-run x", "public_whole_run_speedup", "{:.2f}"),
               ("API final x", "public_final_stage_speedup", "{:.2f}"),
               ("compiled final x", "compiled_final_stage_speedup", "{:.2f}"),
               ("compiled/eager dense", "compiled_dense_speedup_over_eager", "{:.2f}"),
               ("x/FLOP x", "final_stage_speedup_over_flop_ratio", "{:.0%}"),
               ("mem sparse/dense", "peak_memory_ratio", "{:.0%}"),
               ("ours vs ref dense x", "reference_dense_speedup", "{:.2f}")]
    rows = [[title for title, _, _ in columns]]
    for record in records:
        row = []
        for _, key, fmt in columns:
            value = record.get(key)
            if key == "stage_seconds_per_iteration":
                row.append(f"{value[-1]:.3f}")
            elif value is None:
                row.append("-")
            else:
                row.append(fmt.format(value))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="comma-separated timm model names (random weights)")
    parser.add_argument("--batch-size", default="8", help="comma-separated batch sizes")
    parser.add_argument("--iterations", type=int, default=4000, help="whole-run length for the projection")
    parser.add_argument("--schedule", default="paper", help="'paper', 'dense' or 'IT:RATIO,...'")
    parser.add_argument("--steps", type=int, default=3, help="timed iterations per stage and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the fastest is taken)")
    parser.add_argument("--quick", action="store_true", help="fewer timed steps and rounds")
    parser.add_argument("--public-iterations", type=int, default=None,
                        help="length of the public-API invert() runs (default 80: the paper's proportions; 0 skips them)")
    parser.add_argument("--compile-step", action="store_true",
                        help="also time the compiled step (InversionConfig.compile_step) at every stage")
    parser.add_argument("--precision", default="float32", choices=PRECISIONS,
                        help="our inverter's precision (the reference-style one stays float32)")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference-style implementation")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory measurements")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--json", default=None, help="write the records to this JSON file")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    common = dict(models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
                  batch_sizes=tuple(int(b) for b in str(args.batch_size).split(",")),
                  iterations=args.iterations, schedule=args.schedule, reference=not args.no_reference,
                  memory=not args.no_memory, device=args.device, compile_step=args.compile_step,
                  precision=args.precision)
    if args.public_iterations is not None:
        common["public_iterations"] = args.public_iterations
    if args.quick:
        return BenchConfig.quick(**common)
    return BenchConfig(steps=args.steps, rounds=args.rounds, **common)


def run_from_args(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run, print the table and JSON summary, and write ``--json``."""
    from smi_plugin.io import atomic_write_text

    records = run_benchmark(config_from_args(args))
    print(format_table(records))
    text = json.dumps(records, indent=2)
    if args.json:
        atomic_write_text(args.json, text + "\n")
    print(text)
    return records


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--probe-memory"]:
        spec = json.loads(argv[1])
        cfg = BenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["config"].items()})
        peak = measure_memory(spec["model"], spec["batch_size"], spec["stage"], spec["implementation"], cfg)
        print(json.dumps({"peak_bytes": peak}))
        return
    parser = argparse.ArgumentParser(prog="smi bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config_from_args(args)  # a bad setting is one line, before any model is built
    except ValueError as err:
        parser.error(str(err))
    run_from_args(args)


if __name__ == "__main__":
    main()
