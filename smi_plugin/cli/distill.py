"""``smi distill``: data-free knowledge distillation from inverted images, judged on real held-out images.

The ``DistillConfig`` flags are generated from its fields. With no flag, the command trains for
``DEFAULT_MINUTES``, in linear-probe mode where a pretrained backbone is known and full mode otherwise:
a linear probe's head is solved by least squares over rounds of finished sparse inversions (``PROBE_ROUNDS``),
a full student learns from the online source (a pool kept under sparse inversion while it learns);
``DistillConfig.for_mode`` gives each mode's recipe and any flag given overrides it.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from typing import Any

import torch

from ..batch import balanced_labels
from ..distill import (
    MODE_DEFAULTS,
    MODES,
    SOURCE_DEFAULTS,
    CheckpointMismatchError,
    DistillConfig,
    KDTrainer,
    failed,
    forward_sparse,
    linear_probe_student,
    save_student,
)
from ..evaluation import evaluate_accuracy
from ..images import model_normalization
from ..inverter import SparseInverter
from ..io import atomic_write_text
from ..zoo import RECIPES, TeacherError, load_card, load_teacher
from .common import (
    add_evaluation_arguments,
    add_inversion_arguments,
    add_teacher_arguments,
    evaluation_split,
    inversion_config,
    load_teacher_from_args,
    teacher_dataset,
)
from .options import CLIError, KeyValueAction, add_config_arguments, config_from_args

logger = logging.getLogger(__name__)

# How to invert for KD. SMI stopping (InversionConfig's default, the paper's): at equal KD steps, with seeded
# students, it trained better students than random stopping in 5 of 5 runs (full KD: digits 88.3% / 85.8% vs
# 86.4% / 81.9%, Fashion-MNIST 32.9% / 35.5% vs 26.2% / 28.5%; linear probe 53.5% vs 51.8%;
# benchmarks/README.md, "SMI stopping"); earlier unseeded 6-minute pairs had pointed the other way. Dirichlet soft
# targets (ZSKD) at scale 0.3: at equal steps digits 86.4% vs 77.2% one-hot; on a fixed pool of 1024
# Fashion-MNIST inversions 35% vs 20% (scale 1.0: 26%, 0.1: 30%) (benchmarks/README.md, "The data-like priors").
KD_INVERSION = {"soft_targets": 0.3}
# Inversion defaults of the online source: big batches, few small steps at a time, each slot starting from
# noise drawn per patch and smoothed (initial_noise="patch"): at equal KD steps it trained better full-KD
# students than the paper's per-pixel noise (digits 95.3% vs 88.3%; Fashion-MNIST 40.4% / 41.5% vs 32.6% /
# 35.9%) and an equal linear probe. Adam steps in each patch's cosine basis with high frequencies scaled
# down (frequency_decay=3) keep the samples smooth as they are inverted: Fashion-MNIST full KD 51.0% against
# 40.5% with per-pixel steps, the linear probe 62.5% against 55.1% (decays 1 / 2 / 5: 44.8% / 45.5% / 46.4%
# and 56.7% / 60.5% / 60.9%), chosen on 2000 real training images, not the test set (benchmarks/README.md,
# "Patch noise" and "Smooth steps").
ONLINE_INVERSION = {"batch_size": 128, "lr": 0.1, "iterations": 100, "initial_noise": "patch", "frequency_decay": 3.0}
# What the linear probe changes on top. A head on a frozen backbone learns from what finished samples show the
# backbone, and it is judged on whole images but trained on the kept patches: the frozen backbone's features of
# part of an image are not those of the whole. With the solved head, on 1024 inversions each (2000 real training
# images as validation, never the test set): 65.7% at 14 of 64 patches kept (all four stages), 69.05% at 30 (two),
# 71.25% at 44 (the paper's first stage alone); in 15 minutes of rounds 71.0% at 44 against 69.3% at 30, and
# 71.5% dense beside it: level within a point (benchmarks/README.md, "The probe's head, solved").
PROBE_INVERSION = {"iterations": 200, "schedule": "paper-scaled:1"}
# The linear probe's source, with its head solved by least squares (DistillConfig.probe_head): the paper's loop,
# each round inverting one batch of 128 to the end and adding it to the head's sums. The solved head needs no KD
# steps, so the budget goes to inversion: in 15 minutes on the validation images, 69.3% with two stages against
# 67.4% from the online pool with a head solved over its KD batches and 66.5% with KD steps
# (benchmarks/README.md, "The probe's head, solved").
PROBE_ROUNDS = {"source": "alternating", "images_per_round": 128, "kd_steps_per_round": 1, "eval_every": 5,
                "checkpoint_every": 5}
# The command's training budget when neither --steps nor --epochs is given.
DEFAULT_MINUTES = 10.0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("distill", help="data-free knowledge distillation from inverted images",
                             description="Train a student on inverted images only; evaluate on real held-out images.")
    add_teacher_arguments(parser)
    add_inversion_arguments(parser, {**KD_INVERSION, **ONLINE_INVERSION},
                            title=f"inversion (InversionConfig; the defaults shown are the online and alternating "
                                  f"sources', and linear-probe mode changes {PROBE_INVERSION})")
    _add_distill_arguments(parser)
    group = parser.add_argument_group("student and outputs")
    group.add_argument("--mode", default="auto", choices=["auto", *MODES],
                       help="linear-probe: frozen pretrained backbone + new head (the paper); full: train every "
                            "weight; auto: linear-probe where a pretrained backbone is known (the zoo card's, or a "
                            "pretrained --student), full otherwise (default: %(default)s)")
    group.add_argument("--student", default=None, help="student (zoo or timm name, given a head of the teacher's "
                       "classes; it must take the teacher's images); default: the teacher card's backbone for "
                       "linear-probe, a smaller ViT on the same patch grid for full")
    group.add_argument("--student-pretrained", action="store_true", help="timm student: timm's pretrained weights")
    group.add_argument("--student-checkpoint", default=None, help="timm student: a local checkpoint")
    group.add_argument("--student-model-kwargs", nargs="+", action=KeyValueAction, default=None, metavar="KEY=VALUE",
                       help="timm student: timm.create_model keyword arguments, as --model-kwargs (e.g. img_size=32 "
                            "patch_size=4 embed_dim=64 depth=3 num_heads=2)")
    group.add_argument("--num-images", type=int, default=None, help="inverted images: the pool of --source pool "
                       "(default: 256), the images under inversion of --source online (default: --pool-size)")
    add_evaluation_arguments(group)
    group.add_argument("--out", default=None, help="checkpoints (resumable), history.json, learning_curve.png "
                       "and the student: student.safetensors + student.json, loadable by load_teacher(DIR)")
    group.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.set_defaults(func=run)


# DistillConfig fields whose names InversionConfig's flags already take: prefixed with --kd-.
PREFIXED = ("batch_size", "lr", "lr_schedule", "flip")


def _add_distill_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per ``DistillConfig`` field (``--kd-`` before the names inversion uses; the seed is
    the inversion's ``--seed``, the mode is ``--mode``)."""
    title = (f"distillation (DistillConfig; --mode full starts from {MODE_DEFAULTS['full']}, --source online "
             f"from {SOURCE_DEFAULTS['online']}, a least-squares linear probe from {PROBE_ROUNDS}; the online and "
             f"alternating sources invert with {ONLINE_INVERSION} (with {PROBE_INVERSION} in linear-probe mode); "
             f"every source inverts with {KD_INVERSION}; without --steps or --epochs the budget is --minutes; "
             f"--seed also seeds the student's initial weights and the KD batches)")
    source = f"online; {PROBE_ROUNDS['source']} for a least-squares linear probe"
    add_config_arguments(parser, DistillConfig, title, defaults={"source": source, "minutes": DEFAULT_MINUTES},
                         skip=("mode", "seed"), prefix="kd_", prefixed=PREFIXED)


def resolve_mode(args: argparse.Namespace, teacher) -> str:
    """``--mode``, with ``auto`` resolved: linear-probe where a pretrained backbone is known, else full."""
    if args.mode != "auto":
        return args.mode
    if args.student is not None:
        pretrained = args.student in RECIPES or args.student_pretrained or args.student_checkpoint
    else:
        zoo_name = teacher.pretrained_cfg.get("zoo_name")
        pretrained = zoo_name in RECIPES and RECIPES[zoo_name].init_from is not None
    return "linear-probe" if pretrained else "full"


def solved_probe(args: argparse.Namespace) -> bool:
    """Whether the resolved ``--mode`` is a linear probe whose head is solved by least squares."""
    return args.mode == "linear-probe" and (args.probe_head or DistillConfig.probe_head) == "least-squares"


def kd_source(args: argparse.Namespace) -> str:
    """``--source``, else the command's: PROBE_ROUNDS' for a solved linear probe, the online pool otherwise."""
    return args.source or (PROBE_ROUNDS["source"] if solved_probe(args) else "online")


def stream_inversion(mode: str) -> dict[str, Any]:
    """The inversion defaults of the sources that invert as the student learns (online, alternating), for a
    resolved ``mode`` (flags, presets and files override them)."""
    return {**ONLINE_INVERSION, **(PROBE_INVERSION if mode == "linear-probe" else {})}


def distill_config(args: argparse.Namespace, seed: int) -> DistillConfig:
    """``DistillConfig.for_mode(--mode)`` overridden by the flags given; the source is ``kd_source``'s (with
    ``PROBE_ROUNDS`` for a solved probe) and the budget ``DEFAULT_MINUTES`` unless the flags say otherwise."""
    if args.mode == "auto":
        raise CLIError("--mode auto is resolved against the teacher first (resolve_mode)")
    source = kd_source(args)
    rounds = PROBE_ROUNDS if solved_probe(args) and source == PROBE_ROUNDS["source"] else {"source": source}
    try:
        recipe = DistillConfig.for_mode(args.mode, **rounds).to_dict()
    except (ValueError, TypeError) as err:
        raise CLIError(str(err)) from err
    length_given = args.steps is not None or args.epochs is not None
    if length_given and args.minutes is not None:
        raise CLIError("--minutes and --steps/--epochs both set the training length: give one")
    recipe["minutes"] = None if length_given else DEFAULT_MINUTES
    if source == "online" and args.num_images is not None:
        recipe["pool_size"] = args.num_images
    return config_from_args(DistillConfig, args, {**recipe, "seed": seed}, prefix="kd_", prefixed=PREFIXED)


def distill_student(args: argparse.Namespace, teacher) -> tuple[Any, str, dict[str, Any]]:
    """The student, its timm architecture and ``create_model`` kwargs: ``--student`` (zoo or timm
    name), else the teacher card's backbone for linear probes, else a smaller ViT on the teacher's
    patch grid for full KD."""
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
        heads = max(1, teacher.blocks[0].attn.num_heads - 1)
        kwargs = {"img_size": list(grid.img_size), "patch_size": list(grid.patch_size), "num_classes": classes,
                  "embed_dim": max(32, (2 * teacher.embed_dim // 3) // heads * heads),
                  "depth": max(1, len(teacher.blocks) - 1), "num_heads": heads, "in_chans": grid.proj.in_channels}
        return timm.create_model("vit_tiny_patch16_224", **kwargs), "vit_tiny_patch16_224", kwargs
    try:
        backbone = load_teacher(name, pretrained=args.student_pretrained, checkpoint_path=args.student_checkpoint,
                                **(args.student_model_kwargs or {}))
    except TeacherError as err:  # worded for the teacher's flags: name the student's
        message = str(err).replace("--num-classes/", "")
        raise CLIError(re.sub(r"--(pretrained|checkpoint|model-kwargs)", r"--student-\1", message)) from err
    if name in RECIPES or "saved_dir" in backbone.pretrained_cfg:  # the architecture its card names
        card = load_card(name) if name in RECIPES else backbone.pretrained_cfg  # load_saved copied it there
        architecture, kwargs = card["architecture"], dict(card["model_kwargs"])
    else:
        architecture, kwargs = name, dict(args.student_model_kwargs or {})
    kwargs["num_classes"] = classes
    if args.mode == "linear-probe":
        return linear_probe_student(backbone, classes), architecture, kwargs
    if backbone.num_classes != classes:  # an ImageNet-headed timm model or checkpoint: its body, a new head
        logger.info("student %s: a new %d-class head in place of its %d-class one", name, classes,
                    backbone.num_classes)
        backbone.reset_classifier(classes)
    check_student_fits(backbone, teacher, name)
    return backbone, architecture, kwargs


def check_student_fits(student: torch.nn.Module, teacher, name: str) -> None:
    """One forward of a blank teacher-shaped image through the student, as KD will call it (kept
    tokens on the teacher's patch grid for a ViT), so that a student built for other images fails here
    in one line rather than at its first KD step."""
    grid = teacher.patch_embed
    images = torch.zeros(1, grid.proj.in_channels, *grid.img_size)
    try:
        with torch.no_grad():
            forward_sparse(student.eval(), images, torch.ones(1, *grid.grid_size, dtype=torch.bool))
    except (RuntimeError, ValueError, AssertionError) as err:
        raise CLIError(f"student {name!r} cannot take the teacher's {tuple(images.shape[1:])} images on its "
                       f"{tuple(grid.grid_size)} patch grid ({str(err).splitlines()[0]}); pick a student "
                       "built for that input size, channels and patch size, or leave --student out") from err


def run(args: argparse.Namespace) -> None:
    teacher = load_teacher_from_args(args)
    args.mode = resolve_mode(args, teacher)
    streamed = kd_source(args) != "pool"
    config = inversion_config(args, teacher, **KD_INVERSION, **(stream_inversion(args.mode) if streamed else {}))
    kd = distill_config(args, config.seed)
    test = evaluation_split(args, teacher)
    if test is None:
        logger.info("no held-out data for this teacher (give --eval-data DIR): the student is trained and saved, "
                    "nothing is evaluated")
    with torch.random.fork_rng(devices=[]):  # the student's initial weights follow --seed, not the process
        torch.manual_seed(config.seed)
        student, architecture, model_kwargs = distill_student(args, teacher)
    mean, std = model_normalization(teacher)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # KDTrainer's default accelerator device
    teacher = teacher.to(device)  # before the inverter, which builds its tensors on the model's device
    inverter = SparseInverter(teacher, config)
    try:
        trainer = KDTrainer(teacher, student, kd, test, mean, std, out_dir=args.out, inverter=inverter)
    except ValueError as err:  # e.g. a student whose head the probe cannot train or solve: one line, no work done
        raise CLIError(str(err)) from err
    try:
        trainer.check_resumable()
    except CheckpointMismatchError as err:
        raise CLIError(f"--out {args.out}: {err}") from err
    pool = None
    if kd.source == "pool":
        pool = [inverter.invert(balanced_labels(args.num_images or 256, int(teacher.num_classes)))]
    history = trainer.fit(pool)
    classes = int(teacher.num_classes)
    accuracy = history["eval"][-1][1] if history["eval"] else None
    result = {"teacher": args.teacher, "mode": kd.mode, "source": kd.source, "schedule": str(config.schedule),
              "inverted_images": trainer.images_seen,
              "teacher_accuracy": evaluate_accuracy(teacher, test, mean, std, device=device) if test is not None else None,
              "student_accuracy": accuracy, "chance_accuracy": 1 / classes,
              "eval_images": len(test) if test is not None else None,
              "failed": accuracy is not None and failed(accuracy, classes),
              "steps": trainer.step, "curve": history["eval"], "curve_minutes": history["minutes"],
              "kd_loss": history["kd_loss"], "inversion": config.to_dict(),
              "distillation": kd.to_dict()}
    if args.out:
        card = {"architecture": architecture, "model_kwargs": model_kwargs, "num_classes": classes,
                "mean": list(mean), "std": list(std), "accuracy": accuracy, "failed": result["failed"],
                "teacher": args.teacher, "mode": kd.mode, "dataset": args.eval_data or teacher_dataset(args, teacher),
                "eval_images": result["eval_images"]}
        result["student_path"] = str(save_student(trainer.accelerator.unwrap_model(trainer.student), args.out, card))
    print(json.dumps({k: result[k] for k in ("mode", "source", "schedule", "inverted_images", "teacher_accuracy",
                                             "student_accuracy", "failed")}, indent=2))
    if result["failed"]:
        message = (f"FAILED: the student ends at {accuracy:.1%} top-1, under {1.5 / classes:.1%} (1.5x chance "
                   f"{1 / classes:.1%}); this is not a result: train longer or change the recipe")
        logger.warning(message)  # on stderr, so that stdout stays the JSON summary
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
