"""The ``smi`` command line: thin verbs over the library calls a Python user makes.

Runs as ``smi ...``, ``python -m smi_plugin.cli ...`` and ``accelerate launch -m smi_plugin.cli ...``.
Inversion flags are generated from ``InversionConfig``'s fields (``options.add_config_arguments``);
``--config FILE`` (YAML or JSON) and ``--preset NAME`` set them too, with flags given on the command
line taking precedence.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from . import bench, distill, invert, quantize, teacher
from .options import CLIError

__all__ = ["CLIError", "build_parser", "main"]

COMMANDS = (invert, quantize, distill, bench, teacher)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smi", description="Sparse Model Inversion for ViTs: invert, quantize "
                                     "and distil without real data.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "passes_through", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra_args = extra
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args.func(args)
    except CLIError as err:  # one line, argparse's exit status for usage errors
        print(err.code, file=sys.stderr)
        raise SystemExit(2) from None
