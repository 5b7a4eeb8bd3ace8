"""``smi train-teacher``: retrain a zoo teacher from its recipe."""

from __future__ import annotations

import argparse
import json

from ..zoo import ZOO_DIR, train_teacher, zoo_names


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("train-teacher", help="retrain a zoo teacher from its recipe (CPU)")
    parser.add_argument("name", choices=zoo_names(), help="zoo teacher name")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    parser.add_argument("--out-dir", default=None, help="where to write the teacher's folder NAME/ (config.json, "
                        "model.safetensors, README.md: what timm loads; default: the package's zoo folder)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    card = train_teacher(args.name, out_dir=args.out_dir or ZOO_DIR, epochs=args.epochs)
    print(json.dumps({k: card[k] for k in ("name", "heldout_top1", "train_seconds", "parameters")}, indent=2))
