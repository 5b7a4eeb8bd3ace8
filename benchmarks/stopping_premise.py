"""Can the patches SMI keeps carry the object? Stopping by attention vs an oracle and at random.

SMI's pictures are meant to show the object on the kept patches and background on the stopped
ones. That needs two things, measured here with an independent judge (a CNN trained on the real
train split, ``judge.py``) that sees only the kept patches, the rest set to the data's background:

1. room: on real held-out images, keep the k brightest patches (an oracle for foreground on a dark
   background), the k the teacher's last-block CLS attention ranks highest (SMI's rule), or k at
   random, for k = the paper's schedule's kept counts (44, 30, 21, 14 of 64 patches: 69%, 47%, 33%, 22%);
2. localization on inversions: the same on the teacher's dense inversions (the demo's recipe),
   attention vs random; the unmasked judge accuracy is the ceiling.

    python benchmarks/stopping_premise.py --teachers digits-vit,fashion-mnist-vit --json premise.json
"""

from __future__ import annotations

import argparse
import json

import torch
from judge import background_level, judge_accuracy, train_judge

from smi_plugin import InversionConfig, SparseInverter, StoppingSchedule, load_teacher
from smi_plugin.batch import balanced_labels
from smi_plugin.data import load_split
from smi_plugin.images import model_normalization, normalize
from smi_plugin.batch import InvertedBatch
from smi_plugin.images import frozen
from smi_plugin.io import atomic_write_text
from smi_plugin.tokens import indices_to_mask, patch_grid, record_cls_attention
from smi_plugin.zoo import load_card


@torch.no_grad()
def last_block_attention(teacher, normalized: torch.Tensor) -> torch.Tensor:
    with frozen(teacher), record_cls_attention(teacher) as record:
        teacher(normalized)
    return record["scores"]


def accuracy_keeping(judge, images, labels, scores, kept: int, grid, fill: float) -> float:
    """Judge top-1 when only each image's ``kept`` highest-scored patches are shown."""
    indices = scores.topk(kept, dim=1).indices.sort(dim=1).values
    batch = InvertedBatch(images, indices_to_mask(indices, grid), labels, indices, (0.0,), (1.0,))
    return judge_accuracy(judge, batch.masked_images(fill), labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teachers", default="digits-vit,fashion-mnist-vit,fashion-mnist-scattered-vit",
                        help="comma-separated zoo names")
    parser.add_argument("--real-images", type=int, default=1000)
    parser.add_argument("--inverted-images", type=int, default=100)
    parser.add_argument("--iterations", type=int, default=400, help="inversion iterations (dense, demo recipe)")
    parser.add_argument("--judge-epochs", type=int, default=None, help="default: about 100k images' worth")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    results = {}
    for name in args.teachers.split(","):
        teacher, card = load_teacher(name), load_card(name)
        mean, std = model_normalization(teacher)
        train, test = load_split(card["dataset"], "train"), load_split(card["dataset"], "test")
        judge, fill = train_judge(train, args.judge_epochs), background_level(train)
        grid = patch_grid(teacher)
        counts = StoppingSchedule.paper().kept_counts(grid.num_patches)[1:]
        generator = torch.Generator().manual_seed(0)

        images = test.images(slice(0, args.real_images))
        labels = test.labels[:len(images)]
        (ph, pw) = grid.patch_size
        brightness = images.mean(1).unfold(1, ph, ph).unfold(2, pw, pw).mean((-1, -2)).flatten(1)
        rankings = {"oracle (brightest)": brightness,
                    "attention (SMI)": last_block_attention(teacher, normalize(images, mean, std)),
                    "random": torch.rand(brightness.shape, generator=generator)}
        real = {"all patches": judge_accuracy(judge, images, labels),
                "background_patch_fraction": (brightness <= fill + 0.02).float().mean().item()}
        for ranking, scores in rankings.items():
            real[ranking] = [accuracy_keeping(judge, images, labels, scores, k, grid, fill) for k in counts]

        inverted_labels = torch.tensor(balanced_labels(args.inverted_images, int(teacher.num_classes)))
        config = InversionConfig.preset("data-like", iterations=args.iterations, schedule="dense")
        batch = SparseInverter(teacher, config).invert(inverted_labels)
        rankings = {"attention (SMI)": last_block_attention(teacher, batch.normalized()),
                    "random": torch.rand(len(batch), grid.num_patches, generator=generator)}
        inverted = {"all patches": judge_accuracy(judge, batch.images, inverted_labels)}
        for ranking, scores in rankings.items():
            inverted[ranking] = [accuracy_keeping(judge, batch.images, inverted_labels, scores, k, grid, fill)
                                 for k in counts]
        results[name] = {"kept_patches": counts, "num_patches": grid.num_patches, "real": real, "inverted": inverted}

    print(json.dumps(results))
    for name, result in results.items():
        share = [f"{k / result['num_patches']:.0%}" for k in result["kept_patches"]]
        print(f"\n{name}: judge top-1 with only the kept patches shown (kept share {', '.join(share)})")
        for images in ("real", "inverted"):
            rows = result[images]
            print(f"  {images} images, all patches: {100 * rows['all patches']:.1f}%")
            for ranking, values in rows.items():
                if isinstance(values, list):
                    print(f"    {ranking:<22}" + "".join(f"{100 * v:>8.1f}%" for v in values))
        print(f"  real patches that are empty background: {100 * result['real']['background_patch_fraction']:.1f}%")
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
