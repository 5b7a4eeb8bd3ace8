"""``smi quantize``: data-free post-training quantization with torchao, judged on real held-out images."""

from __future__ import annotations

import argparse
import json

from ..io import atomic_write_text
from .common import (add_inversion_arguments, add_teacher_arguments, csv, inversion_config, load_teacher_from_args,
                     teacher_splits)
from .options import CLIError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("quantize", help="data-free PTQ with torchao, evaluated on real held-out images",
                            description="Quantize a teacher with torchao, calibrated on inverted images "
                                        "(or a saved dataset), and compare calibration sources on real data.")
    add_teacher_arguments(parser)
    add_inversion_arguments(parser)
    group = parser.add_argument_group("quantization")
    group.add_argument("--calibration", default="gaussian,dense,sparse,real",
                       help="comma-separated sources: gaussian, dense, sparse, real, or a dataset directory "
                            "(default: %(default)s)")
    group.add_argument("--num-calibration", type=int, default=32, help="calibration images (default: %(default)s)")
    group.add_argument("--schemes", default="w8a8,w4a8", help="comma-separated: w8a8, w4a8, w8a6, w4a4 "
                       "(default: %(default)s)")
    group.add_argument("--coverages", default="linear", help="comma-separated: linear, full (default: %(default)s)")
    group.add_argument("--backend", default="pt2e", choices=["pt2e", "quantize_"],
                       help="torchao flow (default: %(default)s)")
    group.add_argument("--range-estimator", default="minmax", choices=["minmax", "percentile", "mse"],
                       help="activation range estimator over retained tokens (default: %(default)s)")
    group.add_argument("--seeds", default="0", help="comma-separated calibration seeds (default: %(default)s)")
    group.add_argument("--eval-images", type=int, default=None, help="limit the held-out images evaluated")
    group.add_argument("--dataset", default=None, choices=["fashion-mnist", "digits"],
                       help="real data to evaluate on (default: the zoo teacher's)")
    group.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..integrations.torchao_report import compare_calibrations, format_report

    teacher = load_teacher_from_args(args)
    config = inversion_config(args)
    train, test = teacher_splits(args, teacher)
    try:
        report = compare_calibrations(
            teacher, test, train, sources=csv(args.calibration), schemes=csv(args.schemes),
            coverages=csv(args.coverages), seeds=[int(s) for s in csv(args.seeds)],
            num_calibration=args.num_calibration, inversion=config, backend=args.backend,
            range_estimator=args.range_estimator, eval_images=args.eval_images)
    except (ValueError, TypeError) as err:
        raise CLIError(str(err)) from err
    print(format_report(report))
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
