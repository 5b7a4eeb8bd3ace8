"""Data-parallel KD on the CPU: ``smi distill`` in one process against two under ``accelerate launch``.

Two comparisons, each run of the command on its own (run the script alone on a quiet machine):

* equal steps: ``--steps N`` in one process (2 threads) and in two processes (1 thread each); two processes
  invert two pools, so a step trains on twice the samples;
* equal wall-clock on the machine's 2 cores: ``--minutes M``, 1 process x 2 threads against 2 processes x 1
  thread (the time budget is kept on the slowest process's clock).

Each row reports the inverted images counted over all processes, the student's top-1 on the real held-out
images and the seconds the command took; the record (``--json``) names the machine and the date.

    python benchmarks/distill_processes.py --json benchmarks/results/distill_processes-DATE.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from smi_plugin.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    """The CPU's model name and the instruction sets that decide int8/bfloat16 speed (from /proc/cpuinfo)."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    sets = [label for flag, label in (("amx_tile", "AMX"), ("avx512_bf16", "AVX512-BF16"),
                                      ("avx512_vnni", "AVX512-VNNI")) if flag in flags]
    return f"{name or platform.processor() or 'unknown CPU'} ({', '.join(sets) or 'no AVX512-VNNI'})"


def run(processes: int, length: list[str], teacher: str, mode: str, seed: int) -> dict:
    """One ``smi distill`` command; its JSON summary, the command line and its wall-clock seconds."""
    threads = "2" if processes == 1 else "1"
    env = {**os.environ, "OMP_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    launcher = [sys.executable] if processes == 1 else [
        str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", str(processes)]
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "kd.json"
        command = [*launcher, "-m", "smi_plugin.cli", "distill", "--teacher", teacher, "--mode", mode, *length,
                   "--seed", str(seed), "--json", str(out)]
        started = time.perf_counter()
        subprocess.run(command, env=env, check=True, capture_output=True, text=True, cwd=ROOT)
        seconds = time.perf_counter() - started
        report = json.loads(out.read_text())
    shown = " ".join(command[command.index("smi_plugin.cli") + 1:-2])
    return {"processes": processes, "threads_per_process": int(threads), "command": shown,
            "inverted_images": report["inverted_images"], "steps": report["steps"],
            "student_accuracy": report["student_accuracy"], "teacher_accuracy": report["teacher_accuracy"],
            "seconds": round(seconds, 1)}


def table(rows: list[dict]) -> str:
    lines = ["| comparison | processes x threads | KD steps | inverted images | student top-1 | seconds |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['comparison']} | {row['processes']} x {row['threads_per_process']} | {row['steps']} | "
                     f"{row['inverted_images']} | {row['student_accuracy']:.2%} | {row['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="digits-vit")
    parser.add_argument("--mode", default="full")
    parser.add_argument("--steps", default="60", help="comma-separated KD steps, a pair each (default: 60)")
    parser.add_argument("--minutes", type=float, default=3.0, help="budget of the equal-time pair (default: 3; "
                        "0: no such pair)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the record to this file")
    args = parser.parse_args(argv)
    rows = []
    pairs = [("equal steps", ["--steps", steps.strip()]) for steps in args.steps.split(",")]
    pairs += [("equal wall-clock", ["--minutes", str(args.minutes)])] if args.minutes else []
    for comparison, length in pairs:
        for processes in (1, 2):
            rows.append({"comparison": comparison, **run(processes, length, args.teacher, args.mode, args.seed)})
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    command = " ".join(["python", f"benchmarks/{Path(__file__).name}", *(sys.argv[1:] if argv is None else argv)])
    record = {"machine": f"{cpu_name()}, {os.cpu_count()} cores", "date": datetime.date.today().isoformat(),
              "command": command,
              "teacher": args.teacher, "mode": args.mode, "runs": rows}
    print(f"\n{record['machine']}, {record['date']}\n{table(rows)}")
    if args.json:
        atomic_write_text(args.json, json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    main()
