"""``smi distill`` with its defaults, teacher by teacher: what a user gets with nothing but the teacher's flags.

Each teacher runs the command a new user would type (``smi distill --teacher NAME --mode full``, plus
``--minutes`` when given), alone, and the record keeps the command, the teacher's and the student's top-1 on the
real held-out images, the KD steps, the inverted images and the wall-clock minutes, with the machine and date.
Run it alone on a quiet machine (2 threads):

    OMP_NUM_THREADS=2 python benchmarks/distill_defaults.py --teachers digits-vit \
        --json benchmarks/results/distill_defaults-DATE.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distill_processes import cpu_name  # beside this file (a script's folder is on its path)

from smi_plugin.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]


def run(teacher: str, mode: str, minutes: float | None, seed: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    env.setdefault("OMP_NUM_THREADS", "2")
    length = ["--minutes", f"{minutes:g}"] if minutes else []
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "kd.json"
        args = ["distill", "--teacher", teacher, "--mode", mode, *length, "--seed", str(seed)]
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "smi_plugin.cli", *args, "--json", str(out)], env=env, check=True,
                       capture_output=True, text=True, cwd=ROOT)
        seconds = time.perf_counter() - started
        report = json.loads(out.read_text())
    return {"teacher": teacher, "command": "smi " + " ".join(args), "teacher_accuracy": report["teacher_accuracy"],
            "student_accuracy": report["student_accuracy"], "steps": report["steps"],
            "inverted_images": report["inverted_images"], "minutes": round(seconds / 60, 2),
            "threads": int(env["OMP_NUM_THREADS"])}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teachers", default="digits-vit", help="comma-separated zoo names or saved folders")
    parser.add_argument("--mode", default="full")
    parser.add_argument("--minutes", type=float, default=None, help="the budget (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the record to this file")
    args = parser.parse_args(argv)
    rows = []
    for teacher in args.teachers.split(","):
        rows.append(run(teacher.strip(), args.mode, args.minutes, args.seed))
        row = rows[-1]
        print(f"{row['teacher']}: student {row['student_accuracy']:.2%} (teacher {row['teacher_accuracy']:.2%}), "
              f"{row['steps']} KD steps, {row['inverted_images']} inverted images, {row['minutes']:.1f} min",
              flush=True)
    command = " ".join(["python", f"benchmarks/{Path(__file__).name}", *(sys.argv[1:] if argv is None else argv)])
    record = {"machine": f"{cpu_name()}, {os.cpu_count()} cores", "date": datetime.date.today().isoformat(),
              "command": command,
              "runs": rows}
    if args.json:
        atomic_write_text(args.json, json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    main()
