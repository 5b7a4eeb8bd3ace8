"""Patch-selection policies head to head at equal CPU time: SMI, random, dense and Patch Rebirth.

Issue 20. For each teacher and each selection policy (``InversionConfig.selection``), with the
repo's data-like recipe for grayscale teachers (``InversionConfig.preset("data-like")``):

1. speed: the inversion of one batch (``--iterations``, ``--batch-size``) is timed, giving samples
   per second; every emitted sample counts (Patch Rebirth emits up to v per trajectory);
2. equal budget: every policy gets the same time (``--seconds``) and inverts as many batches as fit
   by that timing (at least one; the timed batch is the first of them), all from the same seeds;
3. calibration: torchao PTQ (pt2e, linear layers) at W8A8 and W4A4, calibrated on
   ``--calibration-images`` samples drawn at random from each policy's samples (``--calibration-draws``
   draws, the same draw seeds for every policy; mean and spread over draws), evaluated densely on the
   real held-out set: top-1 and the logits' SQNR against FP32;
4. distillation (``--kd-minutes 0`` skips it): ``smi distill --teacher NAME --selection POLICY`` with
   the command's defaults (the online loop; mode auto: the linear probe where the zoo card names a
   pretrained backbone, full KD otherwise) for the same wall-clock minutes per policy, ``--kd-jobs`` at
   a time with one thread each (equal CPU); top-1 on the teacher's real held-out set;
5. pictures: a grid of each policy's samples per teacher (Patch Rebirth: one trajectory per row)
   and the four side by side, under ``--out``, with a summary JSON per teacher.

Prints a table per teacher and writes JSON (``--json``). No real training image is used.

    python benchmarks/selection_policies.py --json outputs/selection/selection.json
    python benchmarks/selection_policies.py --teachers digits-vit --seconds 20 --kd-minutes 2 --json sel.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
from distillation_transfer import invert_for, online_runs

from smi_plugin import InversionConfig, SparseInverter, load_teacher
from smi_plugin.batch import InvertedBatch
from smi_plugin.calibration import SparseInvertedCalibrationDataset
from smi_plugin.data import load_split
from smi_plugin.evaluation import predict_logits, sqnr_db, top1_accuracy
from smi_plugin.images import model_normalization
from smi_plugin.integrations.torchao import quantize_with_inverted_data
from smi_plugin.integrations.torchao_report import summarize
from smi_plugin.io import atomic_path, atomic_write_text
from smi_plugin.tokens import forward_kept_tokens
from smi_plugin.visualize import save_grid
from smi_plugin.zoo import load_card

POLICIES = ("smi", "random", "dense", "rebirth")
SCHEMES = ("w8a8", "w4a4")


def inversion_recipe(args: argparse.Namespace, grayscale: bool, policy: str) -> InversionConfig:
    """The run's recipe for ``policy``: data-like for grayscale teachers, the library default otherwise."""
    return InversionConfig.preset("data-like" if grayscale else "default", iterations=args.iterations,
                                  batch_size=args.batch_size, selection=policy,
                                  rebirth_divisions=args.rebirth_divisions, log_every=args.iterations)


def invert_at_budget(teacher, config: InversionConfig, seconds: float, seed: int) -> dict:
    """Time one batch, then invert as many batches as that timing fits in ``seconds`` (at least one)."""
    cpu = time.process_time()
    first, first_seconds = invert_for(teacher, config, None, 1, config.batch_size, seed)
    count = max(1, math.floor(seconds / first_seconds))
    rest, rest_seconds = [], 0.0
    if count > 1:  # invert_for counts emitted rows; every batch of a config emits as many
        rest, rest_seconds = invert_for(teacher, config, None, (count - 1) * len(first[0]), config.batch_size, seed + 1)
    batches = first + rest
    return {"batches": batches, "timed_batch_seconds": first_seconds, "seconds": first_seconds + rest_seconds,
            "cpu_seconds": time.process_time() - cpu}


def trajectories(batch: InvertedBatch) -> int:
    """Inverted trajectories behind a batch's rows (Patch Rebirth: several rows per trajectory)."""
    return len(set(batch.provenance.get("trajectory", range(len(batch)))))


@torch.no_grad()
def teacher_hits(teacher, pool: InvertedBatch) -> float:
    """Share of samples the teacher assigns to their target class, seeing only their kept patches."""
    pixels = pool.normalized()
    logits = torch.cat([forward_kept_tokens(teacher, pixels[i:i + 512], pool.patch_mask[i:i + 512])
                        for i in range(0, len(pool), 512)])
    return top1_accuracy(logits, pool.labels)


def calibration_runs(teacher, policy: str, pool: InvertedBatch, count: int, draws: int, test, reference,
                     mean, std, range_estimator: str, seconds: float) -> list[dict]:
    """One PTQ per scheme and draw, each calibrated on ``count`` samples of ``pool`` drawn at random (draw
    ``k`` seeded with ``k`` for every policy: Patch Rebirth's rows come grouped by emission, so its
    first rows would all be the first-emitted samples); rows as ``torchao_report.summarize`` takes them."""
    runs = []
    for draw in range(draws):
        rows = torch.randperm(len(pool), generator=torch.Generator().manual_seed(draw))[:count]
        calibration = SparseInvertedCalibrationDataset.from_batches([pool.select(rows.tolist())])
        for scheme in SCHEMES:
            qmodel = quantize_with_inverted_data(teacher, calibration, scheme, backend="pt2e", coverage="linear",
                                                 range_estimator=range_estimator)
            logits = predict_logits(qmodel, test, mean, std)
            runs.append({"source": policy, "seed": draw, "scheme": scheme, "coverage": "linear",
                         "top1": top1_accuracy(logits, test.labels), "sqnr_db": sqnr_db(reference, logits),
                         "calibration_seconds": seconds, "kept_fraction": calibration.kept_fraction})
    return runs


def grid_rows(batch: InvertedBatch, images: int) -> tuple[list[int], int]:
    """Rows to picture and the grid width: the first ``images`` rows, or with Patch Rebirth whole
    trajectories, one per grid row, their samples in emission order."""
    if "trajectory" not in batch.provenance:
        return list(range(min(images, len(batch)))), 8
    trajectory, emitted = batch.provenance["trajectory"], batch.provenance["emitted_at"]
    per_trajectory = len(batch) // trajectories(batch)
    shown = max(1, images // per_trajectory)
    rows = sorted((r for r in range(len(batch)) if trajectory[r] < shown), key=lambda r: (trajectory[r], emitted[r]))
    return rows, per_trajectory


def side_by_side(paths: list[Path], titles: list[str], target: Path) -> None:
    """One picture holding the policies' grids left to right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pictures = [plt.imread(p) for p in paths]
    height = max(p.shape[0] for p in pictures) / 100
    fig, axes = plt.subplots(1, len(pictures), figsize=(sum(p.shape[1] for p in pictures) / 100, height + 0.4),
                             dpi=100, squeeze=False)
    for ax, picture, title in zip(axes.flat, pictures, titles):
        ax.imshow(picture)
        ax.set_title(title, fontsize=12)
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def run_teacher(args: argparse.Namespace, name: str) -> dict:
    teacher, card = load_teacher(name), load_card(name)
    mean, std = model_normalization(teacher)
    test = load_split(card["dataset"], "test")
    test = test.first(args.eval_images)
    grayscale = test.pixels.shape[1] == 1
    class_names = card.get("class_names") or list(test.class_names)
    with torch.no_grad():
        reference = predict_logits(teacher, test, mean, std)
    out = Path(args.out) / name
    out.mkdir(parents=True, exist_ok=True)

    # Inversion first, for every policy, so that the timings are not mixed with quantization or KD.
    configs = {policy: inversion_recipe(args, grayscale, policy) for policy in args.policies}
    warm = configs[args.policies[0]].replace(iterations=2, batch_size=2, schedule="dense", selection="dense")
    SparseInverter(teacher, warm, progress=False).invert([0, 1])  # first-call costs stay out of the timings
    inverted = {policy: invert_at_budget(teacher, config, args.seconds, args.seed)
                for policy, config in configs.items()}

    calibration_count = min(args.calibration_images, *(sum(len(b) for b in r["batches"]) for r in inverted.values()))
    rows, runs, grids = {}, [], []
    for policy, run in inverted.items():
        batches = run.pop("batches")
        pool = InvertedBatch.concatenate(batches)
        samples = len(pool)
        row = {"inversion": configs[policy].to_dict(), "batches": len(batches),
               "trajectories": sum(trajectories(b) for b in batches), "samples": samples, **run,
               "samples_per_second": samples / run["seconds"],
               "samples_per_cpu_second": samples / max(run["cpu_seconds"], 1e-9),
               "timed_batch_samples_per_second": len(batches[0]) / run["timed_batch_seconds"],
               "kept_fraction": pool.patch_mask.float().mean().item(), "teacher_hits": teacher_hits(teacher, pool)}
        policy_runs = calibration_runs(teacher, policy, pool, calibration_count, args.calibration_draws, test,
                                       reference, mean, std, args.range_estimator,
                                       calibration_count / row["samples_per_second"])
        runs += policy_runs
        row["calibration_kept_fraction"] = statistics.fmean(r["kept_fraction"] for r in policy_runs)
        row["quantization"] = {r["scheme"]: {"top1": r["top1_mean"], "top1_std": r["top1_std"],
                                             "sqnr_db": r["sqnr_mean"], "sqnr_std": r["sqnr_std"]}
                               for r in summarize(policy_runs)}
        shown = batches[0] if "trajectory" in batches[0].provenance else pool  # rebirth: whole trajectories
        picture, width = grid_rows(shown, args.grid_images)
        path = out / f"{policy}.png"
        save_grid(shown.select(picture), path, nrow=width, class_names=class_names,
                  title=f"{name}, {policy}: {samples} samples in {run['seconds']:.0f} s, "
                        f"{row['kept_fraction']:.0%} of patches kept")
        grids.append(path)
        rows[policy] = row
    side_by_side(grids, list(rows), out / "policies.png")
    if args.kd_minutes > 0:  # every policy's student trains for the same minutes, after all timings
        budget = ["--minutes", str(args.kd_minutes), "--seed", str(args.seed)]
        students = online_runs(name, {p: ["--selection", p] for p in rows}, budget, args.kd_jobs)
        for policy, student in students.items():
            rows[policy]["distillation"] = {"minutes": args.kd_minutes, "jobs": args.kd_jobs, **student}

    result = {"teacher": name, "dataset": card["dataset"], "grayscale": grayscale, "eval_images": len(test),
              "fp32_top1": top1_accuracy(reference, test.labels), "seconds_per_policy": args.seconds,
              "calibration_images": calibration_count, "calibration_draws": args.calibration_draws,
              "range_estimator": args.range_estimator,
              "policies": rows, "quantization_summary": summarize(runs),
              "pictures": {p: str(out / f"{p}.png") for p in rows} | {"side_by_side": str(out / "policies.png")}}
    atomic_write_text(out / "summary.json", json.dumps(result, indent=2) + "\n")
    return result


def print_teacher(result: dict) -> None:
    print(f"\n{result['teacher']}: FP32 top-1 {100 * result['fp32_top1']:.2f}% on {result['eval_images']} real "
          f"held-out images; {result['seconds_per_policy']:.0f} s of inversion per policy; "
          f"{result['calibration_images']} calibration samples x {result['calibration_draws']} draws")
    header = (f"{'policy':<9}{'samples':>8}{'traj.':>7}{'batches':>8}{'seconds':>8}{'samples/s':>10}{'kept':>6}"
              f"{'hits':>6}" + "".join(f"{s.upper() + ' top-1 / SQNR':>28}" for s in SCHEMES) + f"{'KD top-1':>10}")
    print(header)
    for policy, r in result["policies"].items():
        quant = "".join(f"{100 * q['top1']:>10.2f}±{100 * q['top1_std']:.2f}% {q['sqnr_db']:>5.1f}±{q['sqnr_std']:.1f}dB"
                        for q in (r["quantization"][s] for s in SCHEMES))
        kd = f"{100 * r['distillation']['student_accuracy']:>9.2f}%" if "distillation" in r else f"{'-':>10}"
        print(f"{policy:<9}{r['samples']:>8}{r['trajectories']:>7}{r['batches']:>8}{r['seconds']:>8.1f}"
              f"{r['samples_per_second']:>10.1f}{r['kept_fraction']:>6.0%}{r['teacher_hits']:>6.0%}{quant}{kd}")
    kd = next((r["distillation"] for r in result["policies"].values() if "distillation" in r), None)
    if kd is not None:
        print(f"KD: smi distill --selection POLICY, mode {kd['mode']}, {kd['minutes']:g} min each, "
              f"{kd['jobs']} at a time (teacher {100 * kd['teacher_accuracy']:.2f}%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teachers", default="digits-vit,fashion-mnist-vit,fashion-mnist-vit-ft,fashion-mnist-scattered-vit",
                        help="comma-separated zoo names")
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated selection policies")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rebirth-divisions", type=int, default=4,
                        help="rebirth samples per trajectory (emitted at evenly spaced iterations)")
    parser.add_argument("--seconds", type=float, default=30.0, help="inversion time budget of every policy")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first batch (the same for every policy)")
    parser.add_argument("--calibration-images", type=int, default=32)
    parser.add_argument("--calibration-draws", type=int, default=3, help="random calibration sets per policy")
    parser.add_argument("--range-estimator", default="minmax", choices=("auto", "minmax", "percentile", "mse"))
    parser.add_argument("--eval-images", type=int, default=1000, help="real held-out images evaluated on")
    parser.add_argument("--kd-minutes", type=float, default=6.0, help="smi distill minutes per policy (0: skip)")
    parser.add_argument("--kd-jobs", type=int, default=2, help="KD runs at once (one thread each if > 1)")
    parser.add_argument("--grid-images", type=int, default=16, help="samples pictured per policy")
    parser.add_argument("--out", default="outputs/selection", help="pictures and per-teacher summaries")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    args.policies = [p.strip() for p in args.policies.split(",") if p.strip()]

    results = {}
    for name in [n.strip() for n in args.teachers.split(",") if n.strip()]:
        results[name] = run_teacher(args, name)
        print_teacher(results[name])
    report = {"settings": {k: v for k, v in vars(args).items() if k != "json"}, "teachers": results}
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
