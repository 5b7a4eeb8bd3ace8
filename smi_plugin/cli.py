"""The ``smi`` command line: a thin layer over the library calls a Python user makes.

Runs as ``smi ...``, ``python -m smi_plugin.cli ...`` and ``accelerate launch -m smi_plugin.cli ...``.
Every inversion option mirrors an ``InversionConfig`` field; ``--config FILE`` (YAML or JSON) sets
them too, with flags given on the command line taking precedence.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

from .config import InversionConfig

COMMANDS = ("invert", "quantize", "distill", "bench", "demo", "train-teacher")


class CLIError(SystemExit):
    """An error with a message for the user (exit status 2, no traceback)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"smi: error: {message}")


# ------------------------------------------------------------------------------ shared options
def add_teacher_arguments(parser: argparse.ArgumentParser, default: str | None = "fashion-mnist-vit") -> None:
    group = parser.add_argument_group("teacher")
    group.add_argument("--teacher", default=default,
                       help="zoo name (fashion-mnist-vit, digits-vit) or any timm model name (default: %(default)s)")
    group.add_argument("--pretrained", action="store_true", help="timm names: load timm's pretrained weights (hub)")
    group.add_argument("--checkpoint", default=None, help="timm names: a local checkpoint (.safetensors/.pth)")
    group.add_argument("--num-classes", type=int, default=None, help="timm names: classifier size")


def add_inversion_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per ``InversionConfig`` field (defaults None: unset flags keep config/file values)."""
    group = parser.add_argument_group("inversion (InversionConfig)")
    group.add_argument("--config", default=None, help="YAML or JSON file whose keys are InversionConfig fields")
    group.add_argument("--iterations", type=int, help="optimisation steps per batch (paper: 4000)")
    group.add_argument("--batch-size", type=int, help="images inverted together (paper: 32)")
    group.add_argument("--lr", type=float, help="Adam learning rate (paper: 0.25)")
    group.add_argument("--schedule", help="'paper', 'paper-scaled' (paper's stages scaled to --iterations), "
                                          "'dense' or 'IT:RATIO,...' e.g. '50:0.3,100:0.3'")
    group.add_argument("--base-method", choices=["deepinversion", "psaq"], help="the dense method sped up")
    group.add_argument("--tv-l2-weight", type=float, help="weight of the l2 total variation (paper: 1e-4)")
    group.add_argument("--l2-weight", type=float, help="weight of the l2 image prior")
    group.add_argument("--input-stats-weight", type=float,
                       help="weight of matching the batch's pixel mean/variance to the teacher's normalization")
    group.add_argument("--jitter", type=float, help="max roll as a fraction of the side, in whole patches")
    group.add_argument("--tie-channels", action=argparse.BooleanOptionalAction, default=None,
                       help="optimise one gray channel (a prior for grayscale teachers)")
    group.add_argument("--lr-schedule", choices=["constant", "cosine"], help="learning-rate schedule")
    group.add_argument("--augment", choices=["patch", "pixel"], help="whole-patch roll/flip, or crops of the image")
    group.add_argument("--competition-weight", type=float, help="adaptive competition with the student (ADI)")
    group.add_argument("--seed", type=int, help="run seed (images and augmentation)")


def read_config_file(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    file = Path(path)
    if not file.is_file():
        raise CLIError(f"config file {path} not found")
    text = file.read_text()
    try:
        if file.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as err:
        raise CLIError(f"cannot parse {path}: {err}") from err
    if not isinstance(data, dict):
        raise CLIError(f"{path} must hold a mapping of InversionConfig fields, got {type(data).__name__}")
    return data


def inversion_config(args: argparse.Namespace, **defaults: Any) -> InversionConfig:
    """``InversionConfig`` from: library defaults < ``defaults`` < ``--config`` file < explicit flags."""
    from .schedule import StoppingSchedule

    fields = {f.name for f in dataclasses.fields(InversionConfig)}
    values = {**defaults, **read_config_file(getattr(args, "config", None))}
    for name in fields:
        flag = getattr(args, name, None)
        if flag is not None:
            values[name] = flag
    unknown = sorted(set(values) - fields)
    if unknown:
        raise CLIError(f"unknown InversionConfig keys {unknown}; valid keys: {sorted(fields)}")
    if str(values.get("schedule", "")).lower() == "paper-scaled":
        values["schedule"] = StoppingSchedule.paper_scaled(values.get("iterations", InversionConfig.iterations))
    try:
        return InversionConfig(**values)
    except (ValueError, TypeError) as err:
        raise CLIError(str(err)) from err


def load_teacher_from_args(args: argparse.Namespace):
    from .zoo import TeacherError, load_teacher

    try:
        return load_teacher(args.teacher, pretrained=args.pretrained, checkpoint_path=args.checkpoint,
                            num_classes=args.num_classes)
    except TeacherError as err:
        raise CLIError(str(err)) from err


def parse_labels(text: str | None, num_images: int | None, num_classes: int) -> list[int]:
    from .calibration import balanced_labels

    if text:
        try:
            return [int(x) for x in text.split(",") if x.strip()]
        except ValueError as err:
            raise CLIError(f"--labels must be comma-separated class indices, got {text!r}") from err
    if not num_images or num_images < 1:
        raise CLIError("give --num-images N (labels balanced over classes) or --labels 0,1,2,...")
    return balanced_labels(num_images, num_classes)


# ------------------------------------------------------------------------------------ commands
def cmd_invert(args: argparse.Namespace) -> None:
    from .distributed import OutputDirectoryError, invert_to_directory
    from .export import load_inverted, push_to_hub

    teacher = load_teacher_from_args(args)
    config = inversion_config(args, iterations=300, schedule="paper-scaled")
    labels = parse_labels(args.labels, args.num_images, int(teacher.num_classes))
    try:
        out = invert_to_directory(teacher, config, args.out, labels, progress=not args.quiet)
    except (OutputDirectoryError, ValueError) as err:
        raise CLIError(str(err)) from err
    from .distributed import distributed_state

    if not distributed_state().is_main_process:
        return
    inverted = load_inverted(out)
    if args.parquet:
        inverted.dataset.to_parquet(args.parquet)
    if args.grid:
        from .visualize import save_grid

        save_grid(_first_rows_as_batch(inverted, 64), args.grid)
    print(f"wrote {len(inverted)} inverted images with {distributed_state().num_processes} process(es) to {out} "
          "(datasets.load_from_disk) "
          f"kept {inverted.tensors()['patch_mask'].float().mean().item():.1%} of patches")
    if args.push_to_hub:
        try:
            push_to_hub(inverted.dataset, args.push_to_hub)
        except ConnectionError as err:
            raise CLIError(str(err)) from err


def _first_rows_as_batch(inverted, count: int):
    from .inverter import InvertedBatch
    from .tokens import mask_to_indices

    data = inverted.tensors()
    rows = slice(0, min(count, len(inverted)))
    mask = data["patch_mask"][rows]
    counts = mask.flatten(1).sum(1)
    kept = mask_to_indices(mask) if bool((counts == counts[0]).all()) else mask.flatten(1)[:0].long()
    return InvertedBatch(data["pixel_values"][rows], mask, data["label"][rows], kept, inverted.mean, inverted.std)


def cmd_train_teacher(args: argparse.Namespace) -> None:
    from .zoo import train_teacher

    card = train_teacher(args.name, out_dir=args.out_dir or Path(__file__).parent / "zoo", epochs=args.epochs)
    print(json.dumps({k: card[k] for k in ("name", "heldout_top1", "train_seconds", "parameters")}, indent=2))


def cmd_bench(args: argparse.Namespace) -> None:
    from .bench import run_from_args

    run_from_args(args)


def teacher_splits(args: argparse.Namespace, teacher):
    """The real (train, held-out) splits of the teacher's dataset (zoo card, or --dataset)."""
    from .data import DatasetNotFoundError, load_split

    name = getattr(args, "dataset", None) or teacher.pretrained_cfg.get("dataset")
    if name is None and teacher.pretrained_cfg.get("zoo_name"):
        from .zoo import load_card

        name = load_card(teacher.pretrained_cfg["zoo_name"])["dataset"]
    if name is None:
        raise CLIError("no real held-out data known for this teacher; pass --dataset fashion-mnist|digits")
    try:
        return load_split(name, "train"), load_split(name, "test")
    except (DatasetNotFoundError, ValueError) as err:
        raise CLIError(str(err)) from err


def cmd_quantize(args: argparse.Namespace) -> None:
    from integrations.torchao_report import compare_calibrations, format_report

    from .io import atomic_write_text

    teacher = load_teacher_from_args(args)
    config = inversion_config(args, iterations=300, schedule="paper-scaled")
    train, test = teacher_splits(args, teacher)
    try:
        report = compare_calibrations(
            teacher, test, train, sources=_csv(args.calibration), schemes=_csv(args.schemes),
            coverages=_csv(args.coverages), seeds=[int(s) for s in _csv(args.seeds)],
            num_calibration=args.num_calibration, inversion=config, backend=args.backend,
            range_estimator=args.range_estimator, eval_images=args.eval_images)
    except (ValueError, TypeError) as err:
        raise CLIError(str(err)) from err
    print(format_report(report))
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def distill_student(args: argparse.Namespace, teacher):
    """The student: ``--student`` (zoo or timm name), else the teacher card's backbone for linear
    probes, else a smaller ViT on the teacher's patch grid for full KD."""
    import timm

    from .distill import linear_probe_student
    from .zoo import RECIPES, TeacherError, load_teacher

    classes = int(teacher.num_classes)
    name = args.student
    zoo_name = teacher.pretrained_cfg.get("zoo_name")
    if name is None and args.mode == "linear-probe":
        name = RECIPES[zoo_name].init_from if zoo_name in RECIPES else None
        if name is None:
            raise CLIError("linear-probe needs a pretrained backbone: pass --student NAME (a zoo name, or a timm "
                           "name with --student-pretrained/--student-checkpoint)")
    if name is None:
        grid = teacher.patch_embed
        kwargs = dict(img_size=tuple(grid.img_size), patch_size=tuple(grid.patch_size), num_classes=classes,
                      embed_dim=max(32, teacher.embed_dim // 2), depth=max(1, len(teacher.blocks) - 1),
                      num_heads=max(1, teacher.blocks[0].attn.num_heads - 1))
        return timm.create_model("vit_tiny_patch16_224", **kwargs)
    try:
        backbone = load_teacher(name, pretrained=args.student_pretrained, checkpoint_path=args.student_checkpoint)
    except TeacherError as err:
        raise CLIError(str(err)) from err
    return linear_probe_student(backbone, classes) if args.mode == "linear-probe" else backbone


def cmd_distill(args: argparse.Namespace) -> None:
    from .distill import DistillConfig, KDTrainer
    from .evaluation import evaluate_accuracy, model_normalization
    from .inverter import SparseInverter
    from .io import atomic_write_text

    teacher = load_teacher_from_args(args)
    config = inversion_config(args, iterations=200, schedule="paper-scaled", batch_size=64)
    _, test = teacher_splits(args, teacher)
    student = distill_student(args, teacher)
    try:
        kd = DistillConfig(mode=args.mode, steps=args.steps, epochs=args.epochs, batch_size=args.kd_batch_size,
                           lr=args.kd_lr, optimizer=args.optimizer, temperature=args.temperature, mixup=args.mixup,
                           source=args.source, images_per_round=args.images_per_round,
                           kd_steps_per_round=args.kd_steps_per_round, eval_every=args.eval_every, seed=config.seed)
    except ValueError as err:
        raise CLIError(str(err)) from err
    mean, std = model_normalization(teacher)
    inverter = SparseInverter(teacher, config)
    trainer = KDTrainer(teacher, student, kd, test, mean, std, out_dir=args.out, inverter=inverter)
    pool = None
    if args.source == "pool":
        from .calibration import balanced_labels

        pool = [inverter.invert(balanced_labels(args.num_images, int(teacher.num_classes)))]
    history = trainer.fit(pool)
    result = {"teacher": args.teacher, "mode": args.mode, "source": args.source, "schedule": str(config.schedule),
              "inverted_images": len(trainer.pool), "teacher_accuracy": evaluate_accuracy(teacher, test, mean, std),
              "student_accuracy": history["eval"][-1][1], "best_student_accuracy": max(a for _, a in history["eval"]),
              "curve": history["eval"], "inversion": config.to_dict(), "distillation": dataclasses.asdict(kd)}
    print(json.dumps({k: result[k] for k in ("mode", "schedule", "inverted_images", "teacher_accuracy",
                                             "student_accuracy")}, indent=2))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args)


# -------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smi", description="Sparse Model Inversion for ViTs: invert, quantize "
                                     "and distil without real data.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    invert = sub.add_parser("invert", help="invert images from a teacher (distributed with accelerate launch)",
                            description="Invert images and write them as a Hugging Face dataset "
                                        "(datasets.load_from_disk(OUT)). Resumable: rerun the same command.")
    add_teacher_arguments(invert)
    add_inversion_arguments(invert)
    invert.add_argument("--num-images", type=int, default=None, help="images to invert, labels balanced over classes")
    invert.add_argument("--labels", default=None, help="explicit comma-separated labels (instead of --num-images)")
    invert.add_argument("--out", required=True, help="output directory (a saved datasets.Dataset when done)")
    invert.add_argument("--parquet", default=None, help="also write the rows to this Parquet file")
    invert.add_argument("--grid", default=None, help="also write a PNG grid of the first 64 images")
    invert.add_argument("--push-to-hub", default=None, metavar="REPO", help="push the dataset to this Hub repo")
    invert.add_argument("--quiet", action="store_true", help="no progress bar")
    invert.set_defaults(func=cmd_invert)

    quantize = sub.add_parser("quantize", help="data-free PTQ with torchao, evaluated on real held-out images",
                              description="Quantize a teacher with torchao, calibrated on inverted images "
                                          "(or a saved dataset), and compare calibration sources on real data.")
    add_teacher_arguments(quantize)
    add_inversion_arguments(quantize)
    quantize.add_argument("--calibration", default="gaussian,dense,sparse,real",
                          help="comma-separated sources: gaussian, dense, sparse, real, or a dataset directory")
    quantize.add_argument("--num-calibration", type=int, default=32, help="calibration images (paper: 32)")
    quantize.add_argument("--schemes", default="w8a8,w4a8", help="comma-separated: w8a8, w4a8, w8a6, w4a4")
    quantize.add_argument("--coverages", default="linear", help="comma-separated: linear, full")
    quantize.add_argument("--backend", default="pt2e", choices=["pt2e", "quantize_"], help="torchao flow")
    quantize.add_argument("--range-estimator", default="minmax", choices=["minmax", "percentile", "mse"],
                          help="activation range estimator over retained tokens")
    quantize.add_argument("--seeds", default="0", help="comma-separated calibration seeds (mean and spread)")
    quantize.add_argument("--eval-images", type=int, default=None, help="limit the held-out images evaluated")
    quantize.add_argument("--dataset", default=None, choices=["fashion-mnist", "digits"],
                          help="real data to evaluate on (default: the zoo teacher's)")
    quantize.add_argument("--json", default=None, help="write the results to this JSON file")
    quantize.set_defaults(func=cmd_quantize)

    distill = sub.add_parser("distill", help="data-free knowledge distillation from inverted images",
                             description="Train a student on inverted images only; evaluate on real held-out images.")
    add_teacher_arguments(distill)
    add_inversion_arguments(distill)
    group = distill.add_argument_group("distillation (DistillConfig)")
    group.add_argument("--mode", default="linear-probe", choices=["linear-probe", "full"],
                       help="linear-probe: frozen pretrained backbone + new head (the paper); full: train everything")
    group.add_argument("--student", default=None, help="student (zoo or timm name); default: the teacher card's "
                       "backbone for linear-probe, a smaller ViT on the same patch grid for full")
    group.add_argument("--student-pretrained", action="store_true", help="timm student: timm's pretrained weights")
    group.add_argument("--student-checkpoint", default=None, help="timm student: a local checkpoint")
    group.add_argument("--num-images", type=int, default=256, help="inverted images in the pool (source=pool)")
    group.add_argument("--source", default="pool", choices=["pool", "alternating"],
                       help="pool: invert first, then distil; alternating: invert a batch, take KD steps, repeat")
    group.add_argument("--images-per-round", type=int, default=32, help="alternating: images inverted per round")
    group.add_argument("--kd-steps-per-round", type=int, default=4, help="alternating: KD steps per round")
    group.add_argument("--steps", type=int, default=300, help="KD steps")
    group.add_argument("--epochs", type=float, default=None,
                       help="pool: train for this many passes over the pool instead of --steps (bigger pools get more steps)")
    group.add_argument("--kd-batch-size", type=int, default=32, help="KD batch (paper: 32)")
    group.add_argument("--kd-lr", type=float, default=0.1, help="KD learning rate (paper: SGD 0.1)")
    group.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"], help="KD optimizer")
    group.add_argument("--temperature", type=float, default=20.0, help="KD temperature (paper: 20)")
    group.add_argument("--mixup", action="store_true",
                       help="KD on random mixes of two inverted images, each labelled by the teacher on the fly")
    group.add_argument("--eval-every", type=int, default=50, help="steps between held-out evaluations")
    group.add_argument("--dataset", default=None, choices=["fashion-mnist", "digits"],
                       help="real data to evaluate on (default: the zoo teacher's)")
    group.add_argument("--out", default=None, help="checkpoints, history.json and learning_curve.png (resumable)")
    group.add_argument("--json", default=None, help="write the results to this JSON file")
    distill.set_defaults(func=cmd_distill)

    bench = sub.add_parser("bench", help="benchmark dense vs sparse inversion (speed, FLOPs, memory)")
    from .bench import add_arguments as add_bench_arguments

    add_bench_arguments(bench)
    bench.set_defaults(func=cmd_bench)

    demo = sub.add_parser("demo", help="the main job end to end on the embedded Fashion-MNIST teacher")
    demo.add_argument("--out", default="outputs/demo", help="where pictures, tables and the dataset go")
    demo.add_argument("--quick", action="store_true", help="a much shorter run (for smoke tests)")
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser("train-teacher", help="retrain a zoo teacher from its recipe (CPU)")
    train.add_argument("name", help="zoo teacher name")
    train.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    train.add_argument("--out-dir", default=None, help="where to write NAME.safetensors and NAME.json")
    train.set_defaults(func=cmd_train_teacher)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
