"""Options every command shares: the teacher, the inversion config, labels and held-out data."""

from __future__ import annotations

import argparse
from typing import Any

from ..batch import balanced_labels
from ..config import PRESETS, InversionConfig
from ..data import DatasetNotFoundError, load_split
from ..zoo import TeacherError, load_card, load_teacher, zoo_names
from .options import CLIError, add_config_arguments, config_from_args, read_config_file


def add_teacher_arguments(parser: argparse.ArgumentParser, default: str | None = "fashion-mnist-vit") -> None:
    group = parser.add_argument_group("teacher")
    group.add_argument("--teacher", default=default,
                       help=f"zoo name ({', '.join(zoo_names())}) or any timm ViT name (default: %(default)s)")
    group.add_argument("--pretrained", action="store_true", help="timm names: load timm's pretrained weights (hub)")
    group.add_argument("--checkpoint", default=None, help="timm names: a local checkpoint (.safetensors/.pth)")
    group.add_argument("--num-classes", type=int, default=None, help="timm names: classifier size")


def load_teacher_from_args(args: argparse.Namespace):
    try:
        return load_teacher(args.teacher, pretrained=args.pretrained, checkpoint_path=args.checkpoint,
                            num_classes=args.num_classes)
    except TeacherError as err:
        raise CLIError(str(err)) from err


def add_inversion_arguments(parser: argparse.ArgumentParser) -> None:
    """``--preset``, ``--config FILE`` and one flag per ``InversionConfig`` field."""
    group = parser.add_argument_group("inversion presets")
    group.add_argument("--preset", default="default", choices=sorted(PRESETS),
                       help="named recipe the flags below override: default (the paper's method, stages scaled "
                            "to --iterations), paper (4000 iterations), data-like (grayscale teachers' recipe) "
                            "(default: %(default)s)")
    group.add_argument("--config", default=None, help="YAML or JSON file whose keys are InversionConfig fields")
    add_config_arguments(parser, InversionConfig, "inversion (InversionConfig)")


def inversion_config(args: argparse.Namespace, **defaults: Any) -> InversionConfig:
    """``InversionConfig`` from: library defaults < preset < ``defaults`` < ``--config`` file < explicit flags.

    A schedule whose stages never apply is an error here (the library only warns).
    """
    preset = PRESETS[getattr(args, "preset", "default")]
    file_values = read_config_file(getattr(args, "config", None), InversionConfig)
    config = config_from_args(InversionConfig, args, {**preset, **defaults}, file_values)
    late = config.late_stages()
    if late:
        raise CLIError(f"stopping stages at iterations {late} come at or after the last of {config.iterations} "
                       "iterations and would never apply; raise --iterations or use --schedule paper-scaled")
    return config


def parse_labels(text: str | None, num_images: int | None, num_classes: int) -> list[int]:
    if text:
        try:
            return [int(x) for x in text.split(",") if x.strip()]
        except ValueError as err:
            raise CLIError(f"--labels must be comma-separated class indices, got {text!r}") from err
    if not num_images or num_images < 1:
        raise CLIError("give --num-images N (labels balanced over classes) or --labels 0,1,2,...")
    return balanced_labels(num_images, num_classes)


def teacher_splits(args: argparse.Namespace, teacher):
    """The real (train, held-out) splits of the teacher's dataset (zoo card, or --dataset)."""
    name = getattr(args, "dataset", None) or teacher.pretrained_cfg.get("dataset")
    if name is None and teacher.pretrained_cfg.get("zoo_name"):
        name = load_card(teacher.pretrained_cfg["zoo_name"])["dataset"]
    if name is None:
        raise CLIError("no real held-out data known for this teacher; pass --dataset fashion-mnist|digits")
    try:
        return load_split(name, "train"), load_split(name, "test")
    except (DatasetNotFoundError, ValueError) as err:
        raise CLIError(str(err)) from err


def csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]
