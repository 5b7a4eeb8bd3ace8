"""``smi invert``: invert images from a teacher into a Hugging Face dataset (resumable, distributed)."""

from __future__ import annotations

import argparse
import logging

from ..distributed import OutputDirectoryError, distributed_state, invert_to_directory
from ..export import CARD_FILE, load_inverted, push_to_hub
from ..io import atomic_path
from ..visualize import save_grid
from .common import add_inversion_arguments, add_teacher_arguments, inversion_config, load_teacher_from_args, parse_labels
from .options import CLIError, positive_int

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("invert", help="invert images from a teacher (distributed with accelerate launch)",
                            description="Invert images and write them as a Hugging Face dataset "
                                        "(datasets.load_from_disk(OUT)). Resumable: rerun the same command.")
    add_teacher_arguments(parser)
    add_inversion_arguments(parser)
    group = parser.add_argument_group("output")
    group.add_argument("--num-images", type=positive_int, default=None,
                       help="images to invert, labels balanced over classes (default: none; give this or --labels)")
    group.add_argument("--labels", default=None, metavar="L,L,...",
                       help="explicit comma-separated class indices instead of --num-images, e.g. --labels 0,3,9 "
                            "or --labels=0,3,9 (default: none)")
    group.add_argument("--out", required=True,
                       help="output directory: a saved datasets.Dataset with a dataset card README.md when done "
                            "(required)")
    group.add_argument("--parquet", default=None, help="also write the rows to this Parquet file (default: none)")
    group.add_argument("--grid", default=None,
                       help="also write a PNG grid of the first 64 images, titled with class names (default: none)")
    group.add_argument("--push-to-hub", default=None, metavar="REPO",
                       help="push the dataset and its card to this Hub repo (default: none)")
    group.add_argument("--quiet", action="store_true", help="no progress bar (default: off)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    teacher = load_teacher_from_args(args)
    config = inversion_config(args, teacher)
    labels = parse_labels(args.labels, args.num_images, int(teacher.num_classes))
    try:
        out = invert_to_directory(teacher, config, args.out, labels, progress=not args.quiet)
    except (OutputDirectoryError, ValueError) as err:
        raise CLIError(str(err)) from err
    if not distributed_state().is_main_process:
        return
    inverted = load_inverted(out)
    batch = inverted.to_batch()
    if args.parquet:
        with atomic_path(args.parquet) as tmp:
            inverted.dataset.to_parquet(str(tmp))
    if args.grid:
        save_grid(batch.select(range(min(64, len(batch)))), args.grid, class_names=inverted.class_names)
    print(f"wrote {len(inverted)} inverted images with {distributed_state().num_processes} process(es) to {out} "
          f"(datasets.load_from_disk); kept {batch.patch_mask.float().mean().item():.1%} of patches")
    if args.push_to_hub:
        try:
            card = out / CARD_FILE
            push_to_hub(inverted.dataset, args.push_to_hub, card=card.read_text() if card.is_file() else None)
        except ConnectionError as err:
            raise CLIError(str(err)) from err
