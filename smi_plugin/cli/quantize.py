"""``smi quantize``: data-free post-training quantization with torchao, ending in a deployable int8 model.

``smi quantize --teacher NAME --out DIR`` inverts calibration images (sparse by default), calibrates
torchao's pt2e flow on their retained tokens, lowers to int8 kernels, compiles ahead of time, evaluates on
the teacher's real held-out images and writes ``DIR/model.pt2`` (the portable program),
``DIR/compiled.pt2`` (its AOTInductor package for this CPU, recorded in this user's trust store) and
``DIR/card.json`` (load with ``smi_plugin.load_quantized(DIR)``). ``--runtime openvino`` calibrates NNCF
on the same images instead and writes the int8 OpenVINO IR with the same card. ``smi quantize --compare``
prints the older table comparing calibration sources.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..io import atomic_write_text
from ..recipes import RECIPES
from .common import (add_evaluation_arguments, add_inversion_arguments, add_teacher_arguments, csv, evaluation_split,
                     inversion_config, load_teacher_from_args, teacher_splits)
from ..integrations.package import RUNTIMES
from ..integrations.torchao import InvertedPTQConfig
from .options import CLIError, add_config_arguments, config_from_args

COMPARE_SOURCES = "gaussian,dense,sparse,real"
# How calibration inverts: the library's "calibration" recipe, as SparseInvertedCalibrationDataset.from_inverter.
CALIBRATION_INVERSION = dict(RECIPES["calibration"].inversion)
PTQ_PREFIXED = ("batch_size",)  # --ptq-batch-size: --batch-size is the inversion's


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("quantize", help="data-free PTQ with torchao: a saved, faster int8 model",
                            description="Quantize a teacher with torchao, calibrated on the retained tokens of "
                                        "inverted images (or a saved dataset), lower it to int8 kernels, evaluate "
                                        "it on real held-out images and save DIR/model.pt2, its compiled "
                                        "package DIR/compiled.pt2 and DIR/card.json. "
                                        "--compare instead compares calibration sources in a table.")
    add_teacher_arguments(parser)
    add_inversion_arguments(parser, CALIBRATION_INVERSION)
    group = parser.add_argument_group("quantization")
    group.add_argument("--out", default=None, help="output directory for model.pt2, compiled.pt2 and card.json "
                       "(default: outputs/quantized/TEACHER-SCHEME, -openvino added for that runtime)")
    group.add_argument("--runtime", default="torch", choices=RUNTIMES,
                       help="torch: torchao int8 program + AOTInductor package (default); openvino: NNCF int8 "
                            "OpenVINO IR (pip install 'smi-plugin[openvino]'), calibrated on the same whole images")
    group.add_argument("--calibration", default=None,
                       help="calibration source: sparse (inverted with --selection, random stopping unless "
                            "given), dense, gaussian, real, or a dataset directory "
                            f"(default: sparse; with --compare a comma-separated list, default {COMPARE_SOURCES})")
    group.add_argument("--num-calibration", type=int, default=32, help="calibration images (default: %(default)s)")
    add_evaluation_arguments(group)
    add_config_arguments(parser, InvertedPTQConfig, "quantization (InvertedPTQConfig)", prefix="ptq_",
                         prefixed=PTQ_PREFIXED)
    compare = parser.add_argument_group("comparing calibration sources (--compare)")
    compare.add_argument("--compare", action="store_true",
                         help="print a table comparing calibration sources instead of saving a model")
    compare.add_argument("--schemes", default="w8a8,w4a8", help="comma-separated: w8a8, w4a8, w8a6, w4a4 "
                         "(default: %(default)s)")
    compare.add_argument("--coverages", default="linear", help="comma-separated: linear, full (default: %(default)s)")
    compare.add_argument("--seeds", default="0", help="comma-separated calibration seeds (default: %(default)s)")
    compare.add_argument("--range-estimators", default=None, help="comma-separated range estimators to compare "
                         "(default: --range-estimator's)")
    compare.add_argument("--json", default=None, help="write the comparison to this JSON file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    ptq = config_from_args(InvertedPTQConfig, args, prefix="ptq_", prefixed=PTQ_PREFIXED)
    args.scheme, args.backend, args.coverage, args.range_estimator = ptq.scheme, ptq.backend, ptq.coverage, \
        ptq.range_estimator
    args.ptq_options = {"percentile": ptq.percentile, "batch_size": ptq.batch_size, "max_samples": ptq.max_samples}
    args.unquantized_precision, args.tune_for_batch = ptq.unquantized_precision, ptq.tune_for_batch
    if args.compare:
        return run_compare(args)
    if not args.out:  # a useful default: the model lands where the summary says, never over a user's folder
        suffix = "-openvino" if args.runtime == "openvino" else ""
        args.out = str(Path("outputs") / "quantized" / f"{Path(args.teacher).name}-{args.scheme}{suffix}")
    return run_deploy(args)


def run_deploy(args: argparse.Namespace) -> None:
    """Invert, calibrate, quantize, compile, evaluate and save ``--out``."""
    from ..integrations.deploy import check_deployable, check_output_directory, quantize_for_deployment, save_quantized
    from ..integrations.openvino import check_openvino, quantize_for_openvino, save_openvino
    from ..integrations.torchao_report import calibration_data

    source = args.calibration or "sparse"
    if "," in source:
        raise CLIError(f"--calibration takes one source when saving a model, got {source!r} (lists need --compare)")
    try:
        check_output_directory(args.out)
        if args.runtime == "openvino":
            check_openvino()
            if args.scheme != "w8a8":
                raise ValueError(f"--runtime openvino quantizes w8a8 (NNCF's int8), got --scheme {args.scheme}")
        else:
            check_deployable(args.scheme, args.backend, args.coverage)
    except ValueError as err:
        raise CLIError(str(err)) from err
    if args.num_calibration < 1:
        raise CLIError(f"--num-calibration must be >= 1, got {args.num_calibration}")
    teacher = load_teacher_from_args(args)
    config = inversion_config(args, teacher, **CALIBRATION_INVERSION)
    test = evaluation_split(args, teacher)  # None: no real held-out data, the card's accuracies stay null
    train = teacher_splits(args, teacher)[0] if source == "real" else None
    try:
        data, seconds = calibration_data(source, teacher, args.num_calibration, config.seed, config, train,
                                         progress=True)
        provenance = {"source_option": source, "seed": config.seed, "seconds": seconds,
                      "inversion": config.to_dict() if source in ("sparse", "dense") else None}
        if args.runtime == "openvino":
            model, _, card = quantize_for_openvino(teacher, data, test_split=test, calibration=provenance,
                                                   teacher_name=args.teacher)
            out = save_openvino(model, args.out, card)
        else:
            program, compiled, card = quantize_for_deployment(
                teacher, data, args.scheme, coverage=args.coverage, range_estimator=args.range_estimator,
                backend=args.backend, test_split=test, calibration=provenance,
                unquantized_precision=args.unquantized_precision, tune_for_batch=args.tune_for_batch,
                **args.ptq_options, teacher_name=args.teacher)
            out = save_quantized(program, args.out, card, compiled)
    except (ValueError, TypeError) as err:
        raise CLIError(str(err)) from err
    print(format_summary(card, out))


def format_summary(card: dict, out) -> str:
    """A few lines: what was saved, which file was evaluated and how it does on real held-out images."""
    from ..integrations.trust import is_trusted

    def pct(value):
        return "n/a" if value is None else f"{100 * value:.2f}%"

    files, compiled = card["files"], card.get("compiled") or {}
    if card.get("runtime") == "openvino":
        saved = (f"saved {card['scheme']} OpenVINO int8 model of {card['teacher']} (NNCF, {card['nncf']['preset']} "
                 f"preset, calibrated on whole images) to " + ", ".join(
                     f"{out}/{name} ({size / 1e6:.2f} MB)" for name, size in files.items()) +
                 f" and card.json; unquantized ops in {card['unquantized_precision']}; evaluated with OpenVINO")
    else:
        tuned = f"; GEMMs tuned for batch {compiled['tuned_for_batch']} run batches up to " \
            f"{compiled['latency_up_to_batch']}" if compiled.get("tuned_for_batch") else ""
        trusted = ", recorded in this user's trust store" if is_trusted(compiled.get("sha256", "")) else ""
        package = f", {out}/compiled.pt2 ({files['compiled.pt2'] / 1e6:.2f} MB, compiled for this CPU{tuned}" \
            f"{trusted})" if "compiled.pt2" in files else ""
        ran = "compiled.pt2" if "compiled.pt2" in files else "model.pt2 compiled just in time"
        saved = (f"saved {card['scheme']} int8 model of {card['teacher']} to {out}/model.pt2 "
                 f"({files['model.pt2'] / 1e6:.2f} MB){package} and card.json; unquantized ops in "
                 f"{card['unquantized_precision']}; evaluated with {ran}")
    lines = [saved,
             f"calibration: {card['calibration']['images']} {card['calibration']['source']} images "
             f"(kept fraction {card['calibration']['kept_fraction']:.2f})"]
    if card.get("evaluation"):
        lines.append(f"held-out top-1: FP32 {pct(card['fp32_accuracy'])}, int8 {pct(card['quantized_accuracy'])}; "
                     f"agreement {pct(card['agreement'])}, SQNR {card['sqnr_db']:.1f} dB "
                     f"on {card['evaluation']['images']} images")
        latency = card["latency"]
        lines.append(f"latency at batch {latency['batch']}: int8 ({card.get('runtime', 'torch')}) "
                     f"{1000 * latency['seconds_per_batch']:.1f} ms, FP32 "
                     f"compiled {1000 * latency['fp32_compiled_seconds_per_batch']:.1f} ms -> "
                     f"{latency['speedup_vs_fp32_compiled']:.2f}x ({latency['threads']} threads; a quick timing)")
    else:
        lines.append("no real held-out data known for this teacher: accuracy not measured (pass --eval-data DIR)")
    lines.append("load with: from smi_plugin import load_quantized; model = load_quantized(DIR)")
    return "\n".join(lines)


def run_compare(args: argparse.Namespace) -> None:
    """The table comparing calibration sources (the earlier behaviour of this command)."""
    from ..integrations.torchao_report import compare_calibrations, format_report

    teacher = load_teacher_from_args(args)
    config = inversion_config(args, teacher, **CALIBRATION_INVERSION)
    train, test = teacher_splits(args, teacher)
    try:
        report = compare_calibrations(
            teacher, test, train, sources=csv(args.calibration or COMPARE_SOURCES), schemes=csv(args.schemes),
            coverages=csv(args.coverages), seeds=[int(s) for s in csv(args.seeds)],
            num_calibration=args.num_calibration, inversion=config, backend=args.backend,
            range_estimator=csv(args.range_estimators) if args.range_estimators else args.range_estimator)
    except (ValueError, TypeError) as err:
        raise CLIError(str(err)) from err
    print(format_report(report))
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
