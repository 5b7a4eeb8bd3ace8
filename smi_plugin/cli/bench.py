"""``smi bench``: runs the speed benchmark harness, ``benchmarks/inversion_speed.py``.

The harness is an application beside the package (as timm keeps ``benchmark.py`` beside ``timm/``):
it needs the repository checkout, which an editable install (``pip install -e .``) has.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from .options import CLIError

HARNESS = Path(__file__).resolve().parents[2] / "benchmarks" / "inversion_speed.py"


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", add_help=False, help="benchmark dense vs sparse inversion (speed, FLOPs, "
                            "memory); `smi bench --help` lists its options")
    parser.set_defaults(func=run, passes_through=True)  # main() hands it every argument after "bench"


def run(args: argparse.Namespace) -> None:
    if not HARNESS.is_file():
        raise CLIError(f"the benchmark harness {HARNESS} is not here: `smi bench` needs the repository checkout "
                       "(git clone, then pip install -e .); or run python benchmarks/inversion_speed.py there")
    spec = importlib.util.spec_from_file_location("smi_inversion_speed", HARNESS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    module.main(args.extra_args)
