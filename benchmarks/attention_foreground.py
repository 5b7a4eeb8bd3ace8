"""Does a teacher's CLS attention find the foreground of its real held-out images?

SMI stops the patches the last block's CLS token attends to least. This reports, per block, the AUC
of CLS attention for foreground vs empty-background patches on real held-out images (0.5 = chance;
``smi_plugin.evaluation.attention_foreground_auc``). A last-block AUC near 0.5 means stopping by
attention is no better than stopping at random for that teacher.

    python benchmarks/attention_foreground.py --teachers digits-vit,fashion-mnist-vit --json auc.json
"""

from __future__ import annotations

import argparse
import json

from smi_plugin.data import load_split
from smi_plugin.evaluation import attention_foreground_auc
from smi_plugin.images import model_normalization
from smi_plugin.io import atomic_write_text
from smi_plugin.zoo import load_card, load_teacher, zoo_names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teachers", default=",".join(zoo_names()), help="comma-separated zoo names")
    parser.add_argument("--max-images", type=int, default=1000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = {}
    for name in args.teachers.split(","):
        teacher = load_teacher(name)
        split = load_split(load_card(name)["dataset"], "test")
        results[name] = attention_foreground_auc(teacher, split, *model_normalization(teacher),
                                                 max_images=args.max_images)
    print(json.dumps(results))
    print(f"{'teacher':<26}" + "".join(f"{'block ' + str(i):>9}" for i in range(max(map(len, results.values())))))
    for name, aucs in results.items():
        print(f"{name:<26}" + "".join(f"{auc:>9.3f}" for auc in aucs))
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
