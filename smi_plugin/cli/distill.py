"""``smi distill``: data-free knowledge distillation from inverted images, judged on real held-out images.

The command runs a recipe of ``smi_plugin.recipes`` (``--mode``: ``full`` or ``linear-probe``; ``auto`` picks
the probe where a pretrained backbone is known) through ``KDTrainer.from_recipe``, the library's one call;
the flags, generated from ``InversionConfig`` and ``DistillConfig``, override the recipe's settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import re


from ..batch import balanced_labels
from ..distill import (
    MODES,
    CheckpointMismatchError,
    DistillConfig,
    KDTrainer,
    Student,
    default_student,
    failed,
    load_student,
    save_student,
    seeded,
)
from ..evaluation import evaluate_accuracy
from ..io import atomic_write_text
from ..recipes import RECIPES
from ..zoo import RECIPES as ZOO_RECIPES
from ..zoo import TeacherError, push_student_to_hub
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


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("distill", help="data-free knowledge distillation from inverted images",
                             description="Train a student on inverted images only; evaluate on real held-out images.")
    add_teacher_arguments(parser)
    full, probe = RECIPES["full"], RECIPES["linear-probe"]
    changed = {k: v for k, v in probe.inversion.items() if full.inversion.get(k) != v}
    add_inversion_arguments(parser, dict(full.inversion),
                            title=f"inversion (InversionConfig; the defaults shown are the full recipe's, and the "
                                  f"linear-probe recipe changes {changed})")
    _add_distill_arguments(parser)
    group = parser.add_argument_group("student and outputs")
    group.add_argument("--mode", default="auto", choices=["auto", *MODES],
                       help="the recipe: linear-probe: frozen pretrained backbone + new head (the paper); full: train "
                            "every weight; auto: linear-probe where a pretrained backbone is known (the zoo card's, "
                            "or a pretrained --student), full otherwise (default: %(default)s)")
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
                       "and the student as a timm Hub folder (config.json, model.safetensors, README.md), loadable "
                       "by timm.create_model('local-dir:DIR') and load_teacher(DIR)")
    group.add_argument("--push-to-hub", default=None, metavar="REPO",
                       help="push the saved student (needs --out) to this Hub model repo (default: none)")
    group.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.set_defaults(func=run)


# DistillConfig fields whose names InversionConfig's flags already take: prefixed with --kd-.
PREFIXED = ("batch_size", "lr", "lr_schedule", "flip")


def _add_distill_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per ``DistillConfig`` field (``--kd-`` before the names inversion uses; the seed is
    the inversion's ``--seed``, the mode is ``--mode``), the full recipe's values shown as defaults."""
    full, probe = RECIPES["full"], RECIPES["linear-probe"]
    title = (f"distillation (DistillConfig; the defaults shown are the full recipe's, and the linear-probe recipe "
             f"sets {dict(probe.distillation)}; without --steps or --epochs the budget is --minutes; --seed also "
             f"seeds the student's initial weights and the KD batches)")
    add_config_arguments(parser, DistillConfig, title, defaults=dict(full.distillation), skip=("mode", "seed"),
                         prefix="kd_", prefixed=PREFIXED)


def resolve_mode(args: argparse.Namespace, teacher) -> str:
    """``--mode``, with ``auto`` resolved: linear-probe where a pretrained backbone is known, else full."""
    if args.mode != "auto":
        return args.mode
    if args.student is not None:
        pretrained = args.student in ZOO_RECIPES or args.student_pretrained or args.student_checkpoint
    else:
        zoo_name = teacher.pretrained_cfg.get("zoo_name")
        pretrained = zoo_name in ZOO_RECIPES and ZOO_RECIPES[zoo_name].init_from is not None
    return "linear-probe" if pretrained else "full"


def distill_config(args: argparse.Namespace, seed: int) -> DistillConfig:
    """The ``--mode`` recipe's ``DistillConfig`` overridden by the flags given (a length given by ``--steps`` or
    ``--epochs`` replaces the recipe's minutes; ``--num-images`` sizes an online pool)."""
    if args.mode == "auto":
        raise CLIError("--mode auto is resolved against the teacher first (resolve_mode)")
    recipe = dict(RECIPES[args.mode].distillation)
    length_given = args.steps is not None or args.epochs is not None
    if length_given and args.minutes is not None:
        raise CLIError("--minutes and --steps/--epochs both set the training length: give one")
    if length_given:
        recipe["minutes"] = None
    if (args.source or recipe["source"]) == "online" and args.num_images is not None:
        recipe["pool_size"] = args.num_images
    return config_from_args(DistillConfig, args, {**recipe, "seed": seed}, prefix="kd_", prefixed=PREFIXED)


def distill_student(args: argparse.Namespace, teacher) -> Student:
    """``--student`` (zoo or timm name, or a saved student), else the recipe's default student."""
    try:
        if args.student is None:
            return default_student(teacher, RECIPES[args.mode])
        return load_student(args.student, teacher, args.mode, pretrained=args.student_pretrained,
                            checkpoint_path=args.student_checkpoint, model_kwargs=args.student_model_kwargs)
    except TeacherError as err:  # worded for the teacher's flags: name the student's
        message = str(err).replace("--num-classes/", "")
        raise CLIError(re.sub(r"--(pretrained|checkpoint|model-kwargs)", r"--student-\1", message)) from err
    except ValueError as err:
        hint = "pass --student NAME (a zoo name, or a timm name with --student-pretrained/--student-checkpoint)"
        raise CLIError(f"{err}; {hint}" if args.student is None else f"--student: {err}") from err


def run(args: argparse.Namespace) -> None:
    if args.push_to_hub and not args.out:
        raise CLIError("--push-to-hub uploads the student saved in --out: give --out DIR too")
    teacher = load_teacher_from_args(args)
    args.mode = resolve_mode(args, teacher)
    config = inversion_config(args, teacher, **RECIPES[args.mode].inversion)
    kd = distill_config(args, config.seed)
    test = evaluation_split(args, teacher)
    if test is None:
        logger.info("no held-out data for this teacher (give --eval-data DIR): the student is trained and saved, "
                    "nothing is evaluated")
    with seeded(config.seed):  # the student's initial weights follow --seed, as in KDTrainer.from_recipe
        student = distill_student(args, teacher)
    try:
        trainer = KDTrainer.from_recipe(teacher, args.mode, student=student.module, eval_split=test, out_dir=args.out,
                                        inversion=config, config=kd, seed=config.seed)
        trainer.check_resumable()
    except CheckpointMismatchError as err:
        raise CLIError(f"--out {args.out}: {err}") from err
    except ValueError as err:  # e.g. a student whose head the probe cannot train or solve: one line, no work done
        raise CLIError(str(err)) from err
    pool = None
    if kd.source == "pool":
        pool = [trainer.inverter.invert(balanced_labels(args.num_images or 256, int(teacher.num_classes)))]
    history = trainer.fit(pool)
    inverted = trainer.inverted_images()
    if not trainer.accelerator.is_main_process:  # the main process evaluates, reports and saves
        return
    _report(args, trainer, student, config, kd, test, history, inverted)


def _report(args, trainer, student: Student, config, kd: DistillConfig, test, history, inverted: int) -> None:
    teacher, classes = trainer.teacher, int(trainer.teacher.num_classes)
    mean, std = trainer.mean, trainer.std
    accuracy = history["eval"][-1][1] if history["eval"] else None
    result = {"teacher": args.teacher, "mode": kd.mode, "source": kd.source, "schedule": str(config.schedule),
              "processes": trainer.accelerator.num_processes, "inverted_images": inverted,
              "teacher_accuracy": evaluate_accuracy(teacher, test, mean, std, device=trainer.accelerator.device)
              if test is not None else None,
              "student_accuracy": accuracy, "chance_accuracy": 1 / classes,
              "eval_images": len(test) if test is not None else None,
              "failed": accuracy is not None and failed(accuracy, classes),
              "steps": trainer.step, "curve": history["eval"], "curve_minutes": history["minutes"],
              "kd_loss": history["kd_loss"], "inversion": config.to_dict(), "distillation": kd.to_dict()}
    if args.out:
        grid = teacher.patch_embed  # the student takes the teacher's images
        card = {"architecture": student.architecture, "model_kwargs": student.model_kwargs, "num_classes": classes,
                "mean": list(mean), "std": list(std), "input_size": [grid.proj.in_channels, *grid.img_size],
                "accuracy": accuracy, "failed": result["failed"],
                "teacher": args.teacher, "mode": kd.mode, "dataset": args.eval_data or teacher_dataset(args, teacher),
                "eval_images": result["eval_images"]}
        result["student_path"] = str(save_student(trainer.student, args.out, card))
        if args.push_to_hub:
            try:
                result["hub_url"] = push_student_to_hub(args.out, args.push_to_hub)
            except ConnectionError as err:
                raise CLIError(str(err)) from err
    print(json.dumps({k: result[k] for k in ("mode", "source", "schedule", "processes", "inverted_images",
                                             "teacher_accuracy", "student_accuracy", "failed")}, indent=2))
    if result["failed"]:
        message = (f"FAILED: the student ends at {accuracy:.1%} top-1, under {1.5 / classes:.1%} (1.5x chance "
                   f"{1 / classes:.1%}); this is not a result: train longer or change the recipe")
        logger.warning(message)  # on stderr, so that stdout stays the JSON summary
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
