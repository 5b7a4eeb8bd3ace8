"""``smi distill``: data-free knowledge distillation from inverted images, judged on real held-out images."""

from __future__ import annotations

import argparse
import dataclasses
import json

from ..batch import balanced_labels
from ..distill import DistillConfig, KDTrainer, linear_probe_student
from ..evaluation import evaluate_accuracy
from ..images import model_normalization
from ..inverter import SparseInverter
from ..io import atomic_write_text
from ..zoo import RECIPES, TeacherError, load_teacher
from .common import add_inversion_arguments, add_teacher_arguments, inversion_config, load_teacher_from_args, teacher_splits
from .options import CLIError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("distill", help="data-free knowledge distillation from inverted images",
                             description="Train a student on inverted images only; evaluate on real held-out images.")
    add_teacher_arguments(parser)
    add_inversion_arguments(parser)
    group = parser.add_argument_group("distillation (DistillConfig)")
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
    parser.set_defaults(func=run)


def distill_student(args: argparse.Namespace, teacher):
    """The student: ``--student`` (zoo or timm name), else the teacher card's backbone for linear
    probes, else a smaller ViT on the teacher's patch grid for full KD."""
    import timm

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


def run(args: argparse.Namespace) -> None:
    teacher = load_teacher_from_args(args)
    config = inversion_config(args)
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
