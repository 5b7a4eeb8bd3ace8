"""How much do inverted images look like the teacher's real data? An independent judge decides.

A small CNN (no attention, no shared weights) is trained on the real train split of the teacher's
dataset; it then classifies images inverted from the teacher. Its accuracy on them measures how
much of the inversions' class evidence is the data's own (shapes, backgrounds), not features only
the teacher responds to. Every ablation step adds one option to the previous one, starting from the
paper's recipe, and is run dense and sparse (stopped patches set to the dataset's background, as
a non-ViT student sees them). Prints JSON and a table and writes an image grid per step.

    python benchmarks/inversion_realism.py --teacher fashion-mnist-vit --json realism.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from judge import background_level, judge_accuracy, train_judge

from smi_plugin import InversionConfig, SparseInverter, StoppingSchedule, load_teacher
from smi_plugin.batch import balanced_labels
from smi_plugin.data import load_split
from smi_plugin.io import atomic_write_text
from smi_plugin.visualize import save_grid
from smi_plugin.zoo import load_card

# Cumulative steps: each adds its options to all the previous ones.
ABLATION = (
    ("paper recipe (CE + TV 1e-4, lr 0.25, whole-patch jitter/flip)", {}),
    ("+ stronger TV (3e-2)", {"tv_l2_weight": 3e-2}),
    ("+ random resized crops (augment='pixel')", {"augment": "pixel"}),
    ("+ lr 0.1", {"lr": 0.1}),
    ("+ input-statistics prior (1.0)", {"input_stats_weight": 1.0}),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="fashion-mnist-vit")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--judge-epochs", type=int, default=None, help="default: about 100k images' worth (2 on Fashion-MNIST, 69 on digits)")
    parser.add_argument("--out", default="outputs/realism")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    card = load_card(args.teacher)
    train, test = load_split(card["dataset"], "train"), load_split(card["dataset"], "test")
    judge = train_judge(train, args.judge_epochs)
    judge_real = judge_accuracy(judge, test.images(), test.labels)
    background = background_level(train)
    teacher = load_teacher(args.teacher)
    labels = torch.tensor(balanced_labels(args.images, int(teacher.num_classes)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, options = [], {"tie_channels": True, "iterations": args.iterations, "log_every": args.iterations}
    for step, (name, change) in enumerate(ABLATION):
        options.update(change)
        row = {"step": name, "options": dict(options)}
        for kind, schedule in (("dense", StoppingSchedule.dense()), ("sparse", StoppingSchedule.paper_scaled(args.iterations))):
            config = InversionConfig(schedule=schedule, **options)
            started = time.perf_counter()
            batch = SparseInverter(teacher, config, progress=False).invert(labels)
            seconds = time.perf_counter() - started
            images = batch.masked_images(fill=background)
            with torch.no_grad():
                hits = (teacher(batch.normalized()).argmax(1) == labels).float().mean().item()
            row[kind] = {"judge_top1": judge_accuracy(judge, images, labels), "teacher_hits": hits, "seconds": seconds}
            save_grid(batch, out / f"step{step}_{kind}.png", nrow=10, masked=kind == "sparse")
        rows.append(row)
    results = {"teacher": args.teacher, "judge_top1_on_real_test": judge_real, "background_level": background,
               "images": args.images, "iterations": args.iterations, "ablation": rows}
    print(json.dumps(results))
    print(f"judge (CNN trained on real {card['dataset']} train): {100 * judge_real:.2f}% on the real test set; "
          f"chance {100 / teacher.num_classes:.0f}%")
    print(f"{'step':<64}{'dense judge':>12}{'sparse judge':>14}{'teacher hits d/s':>18}")
    for row in rows:
        d, s = row["dense"], row["sparse"]
        print(f"{row['step']:<64}{100 * d['judge_top1']:>11.1f}%{100 * s['judge_top1']:>13.1f}%"
              f"{100 * d['teacher_hits']:>10.0f}%/{100 * s['teacher_hits']:.0f}%")
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
