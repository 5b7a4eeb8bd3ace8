"""Data-free knowledge transfer, dense vs sparse inversion at the same inversion compute.

The paper's Table 5 analogue on the real held-out set of the teacher's dataset:
1. invert ``--dense-images`` images densely (timed) and distil a student from them;
2. invert sparsely for the same wall time (more images, since sparse is faster) and distil;
3. distil from growing prefixes of the sparse pool to find how many sparse images reach the
   dense run's best accuracy;
4. for reference only (not data-free), distil with the same trainer from as many real *training*
   images, labelled by the teacher: how far the inversions are from the data they stand in for; and
   from the same real images showing only the patches a sparse inversion keeps (each image's most
   attended by the teacher's last block, as many as the sparse pool keeps): what seeing so few tokens
   costs a student that is then judged on whole images, whatever the images.

No real training image is seen by the inverter or by KD; the student may start from a backbone
pretrained on other real data (``--mode linear-probe``, the paper's setting) or train from scratch
(``--mode full``). Prints a table and writes JSON.

    python benchmarks/distillation_transfer.py --teacher fashion-mnist-vit-ft --mode linear-probe --json kd.json
    python benchmarks/distillation_transfer.py --teacher digits-vit --mode full --dense-images 512 --json kd.json

``--online MINUTES`` measures the online loop instead (``smi distill``'s default source): each of
``--variants`` (``ONLINE_VARIANTS``: the defaults, dense, random stopping, one-hot targets, a fixed pool, warm
starts, the competition term, ...) runs ``smi distill`` with its defaults plus the variant's flags for the same
wall-clock budget, ``--jobs`` at a time with one thread each (equal CPU per variant), and the table
reports student top-1 against minutes of training (wall clock, evaluations included):

    python benchmarks/distillation_transfer.py --teacher digits-vit --mode full --online 12 --jobs 2 --json online.json

``--online-steps N`` gives each variant N KD steps instead: the runs are then bit-identical until the
variant's flag first acts, so a difference is the flag's, not the drift of a wall-clock learning-rate schedule.

Inversion flags are the CLI's (``smi invert --help``); ``--schedule`` sets the sparse run's stages
(default: the paper's, scaled to ``--iterations``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from smi_plugin import InversionConfig, SparseInverter, StoppingSchedule, load_teacher
from smi_plugin.batch import InvertedBatch, balanced_labels
from smi_plugin.cli.common import add_inversion_arguments, inversion_config
from smi_plugin.data import load_split
from smi_plugin.distill import PROBE_HEADS, DistillConfig, KDTrainer, linear_probe_student
from smi_plugin.evaluation import evaluate_accuracy
from smi_plugin.images import model_normalization
from smi_plugin.io import atomic_write_text
from smi_plugin.selection import most_attended
from smi_plugin.tokens import indices_to_mask, patch_grid
from smi_plugin.zoo import RECIPES, load_card
from stopping_premise import last_block_attention


def invert_for(teacher, config: InversionConfig, seconds: float | None, images: int | None, chunk: int, seed: int):
    """Invert in chunks until ``images`` are done or ``seconds`` have passed; returns (batches, seconds)."""
    batches, started, index = [], time.perf_counter(), 0
    classes = int(teacher.num_classes)
    while True:
        done = sum(len(b) for b in batches)
        if (images is not None and done >= images) or (seconds is not None and time.perf_counter() - started >= seconds):
            break
        labels = balanced_labels(chunk, classes)
        labels = labels[index % classes:] + labels[:index % classes]
        batches.append(SparseInverter(teacher, config.replace(seed=seed + index), progress=False).invert(labels))
        index += 1
    return batches, time.perf_counter() - started


def make_student(args, teacher):
    import timm

    classes = int(teacher.num_classes)
    if args.mode == "linear-probe":
        backbone = args.backbone or RECIPES[args.teacher].init_from
        return linear_probe_student(load_teacher(backbone), classes)
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=64, depth=3, num_heads=2,
                             num_classes=classes)


def real_reference_pool(teacher, dataset: str, size: int, mean, std, seed: int = 0,
                        kept: int | None = None) -> InvertedBatch:
    """``size`` random real training images (labels unused: KD asks the teacher), every patch kept, or
    with ``kept`` only each image's ``kept`` patches most attended by the teacher's last block."""
    train = load_split(dataset, "train")
    index = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:size]
    grid = patch_grid(teacher)
    pool = InvertedBatch.from_images(train.images(index), grid, mean, std, train.labels[index])
    if kept is None:
        return pool
    device = next(teacher.parameters()).device  # KDTrainer may have moved the teacher to a GPU
    indices = most_attended(last_block_attention(teacher, pool.normalized().to(device)), kept).cpu()
    return InvertedBatch(pool.images, indices_to_mask(indices, grid), pool.labels, indices, pool.mean, pool.std)


def distil(args, teacher, batches, test, mean, std) -> dict:
    # The published rows' settings: the field defaults for the probe; AdamW, cosine and batch 64 from scratch.
    full = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "lr_schedule": "cosine", "batch_size": 64}
    kd = DistillConfig(mode=args.mode, steps=args.steps, epochs=args.epochs, eval_every=args.eval_every,
                       mixup=1.0 if args.mixup else 0.0, probe_head=args.probe_head,
                       **({} if args.mode == "linear-probe" else full))
    history = KDTrainer(teacher, make_student(args, teacher), kd, test, mean, std, progress=False).fit(batches)
    return {"images": history["pool_size"][-1][1], "final_top1": history["eval"][-1][1],
            "best_top1": max(a for _, a in history["eval"]), "curve": history["eval"]}


# smi distill flags of each online variant, on top of the command's defaults.
ONLINE_VARIANTS = {
    # SMI stopping, Dirichlet soft targets (scale 0.3), patch noise, Adam in smooth cosines (frequency decay 3)
    "defaults (sparse, renewed pool)": [],
    "pixel noise (the paper's start)": ["--initial-noise", "pixel"],
    "per-pixel steps (the paper's Adam)": ["--frequency-decay", "0"],
    "dense": ["--schedule", "dense"],
    "random stopping": ["--selection", "random"],
    "rebirth": ["--selection", "rebirth"],
    "one-hot targets": ["--soft-targets", "0"],
    "data-like priors": ["--augment", "pixel", "--tv-l2-weight", "3e-2", "--input-stats-weight", "1.0"],
    "fixed pool (no renewal)": ["--no-renew"],
    "no replay (fresh batch only)": ["--kd-batch-size", "0"],
    "warm starts (two-class mixes)": ["--warm-start"],
    "competition term": ["--competition-weight", "1.0"],
    "PSAQ-ViT base method": ["--base-method", "psaq"],  # patch-similarity entropy of every block
    "three free channels": ["--no-tie-channels"],  # the zoo's grayscale teachers tie them by default
}


def online_runs(teacher: str, variants: dict[str, list[str]], budget: list[str], jobs: int,
                extra: list[str] = ()) -> dict:
    """``smi distill --teacher TEACHER`` with its defaults plus each variant's flags, the ``budget`` flags
    (``--minutes M`` or ``--steps N``) and ``extra``; ``jobs`` at a time, one thread each if more than one."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"} if jobs > 1 else dict(os.environ)
    results, running = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, flags) in enumerate(variants.items()):
            out = Path(tmp) / f"{index}.json"
            command = [sys.executable, "-m", "smi_plugin.cli", "distill", "--teacher", teacher, *budget,
                       "--json", str(out), *flags, *extra]
            running.append((name, out, subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)))
            if len(running) >= jobs or index == len(variants) - 1:
                for run_name, run_out, process in running:
                    if process.wait() != 0:
                        for _, _, other in running:
                            other.kill()
                        raise SystemExit(f"variant {run_name!r} failed: {' '.join(process.args)}")
                    report = json.loads(run_out.read_text())
                    results[run_name] = {key: report[key] for key in ("mode", "student_accuracy", "teacher_accuracy",
                                                                      "steps", "inverted_images", "curve",
                                                                      "curve_minutes", "kd_loss", "failed")}
                running = []
    return results


def online_main(args, extra: list[str]) -> None:
    names = [n.strip() for n in args.variants.split(";")] if args.variants else list(ONLINE_VARIANTS)
    unknown = [n for n in names if n not in ONLINE_VARIANTS]
    if unknown:
        raise SystemExit(f"unknown --variants {unknown}; choose from {list(ONLINE_VARIANTS)} (separated by ';')")
    by_steps = args.online_steps is not None
    limit = ["--steps", str(args.online_steps)] if by_steps else ["--minutes", str(args.online)]
    budget = ["--mode", args.mode, *limit, "--eval-every", str(args.eval_every)]
    results = {"teacher": args.teacher, "mode": args.mode, "minutes": args.online, "steps": args.online_steps,
               "jobs": args.jobs, "threads_per_run": 1 if args.jobs > 1 else torch.get_num_threads(),
               "extra_flags": extra,
               "variants": online_runs(args.teacher, {n: ONLINE_VARIANTS[n] for n in names}, budget, args.jobs, extra)}
    if by_steps:
        marks, unit = [args.online_steps * quarter // 4 for quarter in (1, 2, 3, 4)], "steps"
    else:
        marks, unit = [m for m in (2, 5, 10, 15, 20, 30) if m < args.online] + [args.online], "min"
    print(f"online KD, teacher {args.teacher}, mode {args.mode}, {' '.join(limit[1:])} {unit} per variant, "
          f"{results['threads_per_run']} thread(s) each; top-1 on the real held-out set")
    print(f"{'variant':<34}{'steps':>7}{'samples':>9}{'minutes':>9}" + "".join(f"{f'@{m:g} {unit}':>12}" for m in marks))
    for name, r in results["variants"].items():
        at = []
        for mark in marks:  # the last evaluation at or before each mark (the final one at the budget)
            seen = [acc for (step, acc), (_, minute) in zip(r["curve"], r["curve_minutes"])
                    if (step if by_steps else minute) <= mark + 1e-9]
            at.append(f"{100 * seen[-1]:.1f}%" if seen else "-")
        at[-1] = f"{100 * r['student_accuracy']:.1f}%"
        minutes = r["curve_minutes"][-1][1] if r["curve_minutes"] else float("nan")
        print(f"{name:<34}{r['steps']:>7}{r['inverted_images']:>9}{minutes:>9.1f}" + "".join(f"{a:>12}" for a in at))
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--online", type=float, default=None, metavar="MINUTES",
                        help="measure the online loop's variants for this many minutes each (flags after -- go "
                             "to every smi distill run)")
    parser.add_argument("--online-steps", type=int, default=None, metavar="STEPS",
                        help="as --online, for this many KD steps each: runs are then identical up to where a "
                             "variant's flag first acts (--online compares at equal CPU time, where the minutes "
                             "budget's learning-rate clock alone makes runs drift apart)")
    parser.add_argument("--variants", default=None, help=f"';'-separated subset of {list(ONLINE_VARIANTS)}")
    parser.add_argument("--jobs", type=int, default=1, help="online variants run at once (one thread each if > 1)")
    parser.add_argument("--teacher", default="fashion-mnist-vit-ft")
    parser.add_argument("--backbone", default=None, help="linear-probe student backbone (default: the teacher's init_from)")
    parser.add_argument("--mode", default="linear-probe", choices=["linear-probe", "full"])
    parser.add_argument("--probe-head", default=DistillConfig.probe_head, choices=PROBE_HEADS,
                        help="linear-probe head: solved by least squares, or trained by KD steps (gradient; the "
                             "benchmarks/README.md's fixed-pool rows)")
    parser.add_argument("--dense-images", type=int, default=256)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--epochs", type=float, default=None, help="KD passes over each pool instead of --steps")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--pool-sizes", default="64,128,256")
    parser.add_argument("--mixup", action="store_true", help="KD on teacher-labelled mixes of inverted images")
    parser.add_argument("--real-reference", type=int, default=None,
                        help="real training images for the reference row (default: --dense-images; 0: skip)")
    parser.add_argument("--json", default=None)
    add_inversion_arguments(parser)
    args, extra = parser.parse_known_args()
    if args.online is not None and args.online_steps is not None:
        parser.error("--online (minutes) and --online-steps both set the budget of the online runs: give one")
    if args.online is not None or args.online_steps is not None:
        online_main(args, [e for e in extra if e != "--"])
        return
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")

    teacher = load_teacher(args.teacher)
    mean, std = model_normalization(teacher)
    test = load_split(load_card(args.teacher)["dataset"], "test")
    teacher_top1 = evaluate_accuracy(teacher, test, mean, std)
    sparse_config = inversion_config(args, iterations=200, batch_size=64, tie_channels=True, schedule="paper-scaled")
    sparse_config = sparse_config.replace(log_every=sparse_config.iterations)
    dense_config = sparse_config.replace(schedule=StoppingSchedule.dense())
    chunk = sparse_config.batch_size

    dense_batches, dense_seconds = invert_for(teacher, dense_config, None, args.dense_images, chunk, seed=0)
    sparse_batches, sparse_seconds = invert_for(teacher, sparse_config, dense_seconds, None, chunk, seed=10_000)
    results = {"teacher": args.teacher, "mode": args.mode, "teacher_top1": teacher_top1,
               "inversion": sparse_config.to_dict(), "dense_seconds": dense_seconds, "sparse_seconds": sparse_seconds,
               "dense": distil(args, teacher, dense_batches, test, mean, std),
               "sparse_same_compute": distil(args, teacher, sparse_batches, test, mean, std), "sparse_by_size": []}
    target = results["dense"]["best_top1"]
    pool = InvertedBatch.concatenate(sparse_batches)
    for size in [int(s) for s in args.pool_sizes.split(",")]:
        if size > len(pool):
            continue
        run = distil(args, teacher, pool.select(range(size)), test, mean, std)
        results["sparse_by_size"].append(run)
    reaching = [r["images"] for r in results["sparse_by_size"] + [results["sparse_same_compute"]]
                if r["best_top1"] >= target]
    results["sparse_images_to_reach_dense_best"] = min(reaching) if reaching else None
    reference_size = args.dense_images if args.real_reference is None else args.real_reference
    if reference_size:
        dataset = load_card(args.teacher)["dataset"]
        results["real_reference"] = distil(args, teacher, real_reference_pool(teacher, dataset, reference_size, mean, std),
                                           test, mean, std)
        if 0 < pool.num_kept < patch_grid(teacher).num_patches:  # a dense or mixed pool has no one sparse view
            sparse_views = real_reference_pool(teacher, dataset, reference_size, mean, std, kept=pool.num_kept)
            results["real_reference_sparse_views"] = {"kept": pool.num_kept,
                                                      **distil(args, teacher, sparse_views, test, mean, std)}

    print(f"teacher {args.teacher} top-1 {100 * teacher_top1:.2f}% on {len(test)} real held-out images; "
          f"mode {args.mode}; {sparse_config.iterations} inversion iterations")
    print(f"{'pool':<28}{'images':>8}{'inversion s':>13}{'final top-1':>13}{'best top-1':>12}")
    rows = [("dense", results["dense"], dense_seconds), ("sparse, same compute", results["sparse_same_compute"], sparse_seconds)]
    rows += [(f"sparse, first {r['images']}", r, None) for r in results["sparse_by_size"]]
    if "real_reference" in results:
        rows.append(("real images (reference)", results["real_reference"], None))
    if "real_reference_sparse_views" in results:
        views = results["real_reference_sparse_views"]
        rows.append((f"real, {views['kept']} of {patch_grid(teacher).num_patches} patches", views, None))
    for name, r, seconds in rows:
        print(f"{name:<28}{r['images']:>8}{'' if seconds is None else f'{seconds:.0f}':>13}"
              f"{100 * r['final_top1']:>12.2f}%{100 * r['best_top1']:>11.2f}%")
    print(f"sparse images needed to reach the dense run's best ({100 * target:.2f}%): "
          f"{results['sparse_images_to_reach_dense_best']}")
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
