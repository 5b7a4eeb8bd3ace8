"""The main job end to end on the embedded Fashion-MNIST teachers (``make demo``).

1. Load the zoo teacher and measure it on the real held-out test set. The default teacher sees
   Fashion-MNIST items shrunk and scattered over a dark canvas (``fashion-mnist-scattered``), so
   that, as in the paper's ImageNet, most patches are background and its attention finds the object.
2. Invert calibration images densely and sparsely (same iterations), timing both.
3. Quantize the teacher with torchao (W8/A8, W4/A8) calibrated on Gaussian noise, dense and sparse
   inversions (and real images, the reference a data-free user lacks); evaluate on real images.
4. The deployable int8 model: W8/A8 calibrated on the sparse inversions, lowered to int8 kernels,
   saved as ``OUT/int8/model.pt2`` + ``compiled.pt2`` (its package for this CPU) + ``card.json``,
   loaded back and timed against compiled FP32.
5. Distil with ``smi distill``'s defaults (the paper's setting: a student sharing the teacher's
   pretrained backbone learns a new head from inverted images only, inverted online with SMI
   stopping while it learns), for a few minutes; the student is saved to ``OUT/student`` and loaded
   back with ``load_teacher``.
6. Export the sparse inversions as a Hugging Face dataset.
7. Print one summary table and write pictures: image grids (stopped patches black), one image's
   stopping stages, the inversion loss and the student's learning curve.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from smi_plugin.batch import balanced_labels
from smi_plugin.config import InversionConfig
from smi_plugin.data import load_split
from smi_plugin.evaluation import evaluate_accuracy
from smi_plugin.images import model_normalization
from smi_plugin.inverter import SparseInverter
from smi_plugin.io import atomic_write_text
from smi_plugin.visualize import save_curves, save_grid, save_stage_strip
from smi_plugin.zoo import load_card, load_teacher


@dataclass
class DemoConfig:
    """Sizes of the demo (``quick`` shrinks everything for smoke tests)."""

    teacher: str = "fashion-mnist-scattered-vit"
    kd_teacher: str = "fashion-mnist-vit-ft"
    iterations: int = 400
    calibration_images: int = 32
    kd_minutes: float = 4.0
    kd_flags: tuple[str, ...] = ()
    eval_batch_size: int = 100  # the int8 model's evaluation and latency batch
    eval_images: int | None = None
    schemes: tuple[str, ...] = ("w8a8", "w4a8")
    tune_for_batch: int = 1  # smi quantize's default: a second compile with GEMMs tuned for batch 1

    @classmethod
    def quick(cls) -> "DemoConfig":
        return cls(iterations=40, calibration_images=16, kd_minutes=0.0, eval_batch_size=100, eval_images=500,
                   kd_flags=("--steps", "8", "--images-per-round", "16", "--batch-size", "16", "--iterations", "8",
                             "--kd-batch-size", "16", "--eval-every", "8"), schemes=("w8a8",), tune_for_batch=0)


def inversion_config(iterations: int, sparse: bool, seed: int = 0) -> InversionConfig:
    """The demo's inversion: the library's data-like preset (the paper's method with its stages
    scaled to the run, one gray channel, crops, stronger TV, lr 0.1, the input-statistics prior)."""
    return InversionConfig.preset("data-like", iterations=iterations, seed=seed, log_every=max(1, iterations // 20),
                                  schedule="paper-scaled" if sparse else "dense")


def _timed_inversion(teacher, iterations: int, sparse: bool, labels: list[int], seed: int, snapshots: bool = False):
    started = time.perf_counter()
    batch = SparseInverter(teacher, inversion_config(iterations, sparse, seed)).invert(labels, snapshots=snapshots)
    return batch, time.perf_counter() - started


def run(config: DemoConfig, out: Path) -> dict[str, Any]:
    from smi_plugin.integrations.torchao_report import compare_calibrations

    from smi_plugin.flops import count_step_flops
    from smi_plugin.export import FORMAT, to_hf_dataset
    from smi_plugin.images import frozen

    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"config": asdict(config)}
    print("(1/6) teacher on real held-out images")
    teacher = load_teacher(config.teacher)
    mean, std = model_normalization(teacher)
    dataset = load_card(config.teacher)["dataset"]
    train, test = load_split(dataset, "train"), _heldout(dataset, config.eval_images)
    results["teacher_top1"] = evaluate_accuracy(teacher, test, mean, std)

    print("(2/6) inverting calibration images, dense and sparse")
    labels = balanced_labels(config.calibration_images, int(teacher.num_classes))
    dense, dense_s = _timed_inversion(teacher, config.iterations, False, labels, seed=0)
    sparse, sparse_s = _timed_inversion(teacher, config.iterations, True, labels, seed=0, snapshots=True)
    inverter = SparseInverter(teacher, inversion_config(config.iterations, True), progress=False)
    with frozen(teacher):
        states = [inverter.state_at_stage(labels[:8], 0, stage) for stage in (0, len(inverter.stages))]
        flops = [count_step_flops(lambda i, s=s: inverter.step(s, i)) for s in states]
    with torch.no_grad():
        hits = {name: (teacher(b.normalized()).argmax(1) == b.labels).float().mean().item()
                for name, b in (("dense", dense), ("sparse", sparse))}
    results["inversion"] = {"iterations": config.iterations, "images": len(labels), "dense_seconds": dense_s,
                            "sparse_seconds": sparse_s, "speedup": dense_s / sparse_s,
                            "final_stage_flop_ratio": flops[0] / flops[1], "kept_fraction": sparse.patch_mask.float().mean().item(),
                            "kept_counts": inverter.kept_counts, "teacher_hits_dense": hits["dense"],
                            "teacher_hits_sparse": hits["sparse"]}
    names = list(test.class_names)
    save_grid(sparse, out / "inverted_sparse.png", nrow=8, class_names=names)
    save_grid(dense, out / "inverted_dense.png", nrow=8, masked=False, class_names=names)
    save_stage_strip(sparse, out / "stopping_stages.png", index=0, scale=6, class_names=names)
    save_curves({"dense": [(r["iteration"], r["loss"]) for r in dense.history],
                 "sparse": [(r["iteration"], r["loss"]) for r in sparse.history]},
                out / "inversion_loss.png", xlabel="iteration", ylabel="loss", title="Inversion loss")

    print("(3/6) torchao PTQ calibrated on each source, evaluated on real held-out images")
    report = compare_calibrations(teacher, test, train, sources=("gaussian", "dense", "sparse", "real"),
                                  schemes=config.schemes, coverages=("linear",), seeds=(0,),
                                  num_calibration=config.calibration_images,
                                  inversion=inversion_config(config.iterations, True))
    results["quantization"] = report["summary"]

    print("(4/6) the deployable int8 model: saved, loaded back, timed against compiled FP32")
    results["deployment"] = _deploy(teacher, sparse, test, config, out / "int8")

    print("(5/6) data-free distillation with smi distill's defaults (student = pretrained backbone + new head)")
    results["distillation"] = _distill(config, out)

    print("(6/6) exporting the sparse inversions as a Hugging Face dataset")
    manifest = {"format": FORMAT, "teacher": config.teacher, "mean": list(mean), "std": list(std),
                "class_names": list(test.class_names), "num_classes": int(teacher.num_classes),
                "config": inversion_config(config.iterations, True).to_dict()}
    to_hf_dataset([sparse], manifest, items=[0]).save_to_disk(str(out / "dataset"))
    results["dataset"] = str(out / "dataset")
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    return results


def _heldout(dataset: str, eval_images: int | None):
    """The dataset's real held-out test split, or its first ``eval_images``."""
    test = load_split(dataset, "test")
    return test.first(eval_images)


def _deploy(teacher, sparse, test, config: DemoConfig, directory: Path) -> dict[str, Any]:
    """W8/A8 calibrated on the sparse inversions' retained tokens, saved and loaded back; the card holds
    its held-out accuracy and its latency against the FP32 teacher compiled alike."""
    from smi_plugin import load_quantized
    from smi_plugin.calibration import SparseInvertedCalibrationDataset
    from smi_plugin.integrations.deploy import quantize_for_deployment, save_quantized

    data = SparseInvertedCalibrationDataset.from_batches([sparse])
    program, compiled, card = quantize_for_deployment(teacher, data, "w8a8", test_split=test,
                                                      teacher_name=config.teacher,
                                                      eval_batch_size=config.eval_batch_size,
                                                      tune_for_batch=config.tune_for_batch,
                                                      calibration={"seed": 0,
                                                                   "inversion": sparse.provenance.get("config")})
    save_quantized(program, directory, card, compiled)
    loaded = load_quantized(directory)
    mean, std = model_normalization(teacher)
    return {"directory": str(directory), "card": card,
            "reloaded_top1": evaluate_accuracy(loaded, test, mean, std, batch_size=config.eval_batch_size),
            "fp32_state_dict_bytes": sum(t.numel() * t.element_size() for t in teacher.state_dict().values())}


def _distill(config: DemoConfig, out: Path) -> dict[str, Any]:
    """``smi distill --teacher KD_TEACHER --minutes M --out OUT/student`` (its defaults otherwise), then
    the saved student loaded back with ``load_teacher`` and evaluated on the real held-out images."""
    from smi_plugin.cli import main as smi

    directory, summary = out / "student", out / "distill.json"
    length = ["--minutes", str(config.kd_minutes)] if config.kd_minutes else []
    subset = ["--eval-images", str(config.eval_images)] if config.eval_images else []
    smi(["distill", "--teacher", config.kd_teacher, *length, *config.kd_flags, *subset, "--out", str(directory),
         "--json", str(summary)])
    result = json.loads(summary.read_text())
    student = load_teacher(str(directory))
    test = _heldout(load_card(config.kd_teacher)["dataset"], config.eval_images)  # the images smi distill judged on
    result["reloaded_top1"] = evaluate_accuracy(student, test, *model_normalization(student))
    result["directory"] = str(directory)
    curve = [(minutes, accuracy) for (_, minutes), (_, accuracy) in zip(result["curve_minutes"], result["curve"])]
    save_curves({f"student (SMI inversion, {result['source']} source)": curve},
                out / "distillation_curves.png", xlabel="minutes", ylabel="top-1 on real held-out",
                references={"teacher": result["teacher_accuracy"], "chance": result["chance_accuracy"]},
                title="Data-free linear probe: student from inverted images only")
    return result


def format_summary(results: dict[str, Any]) -> str:
    inv, kd = results["inversion"], results["distillation"]
    lines = [
        f"smi-plugin demo: {results['config']['teacher']}, everything judged on real held-out images",
        f"  teacher FP32 top-1                     {100 * results['teacher_top1']:.2f}%",
        f"  inversion ({inv['images']} images x {inv['iterations']} it)   dense {inv['dense_seconds']:.1f}s, "
        f"sparse {inv['sparse_seconds']:.1f}s -> {inv['speedup']:.2f}x faster; final-stage FLOPs "
        f"{inv['final_stage_flop_ratio']:.2f}x fewer; {100 * inv['kept_fraction']:.0f}% of patches kept",
        f"  teacher hits its targets on inversions dense {100 * inv['teacher_hits_dense']:.0f}%, sparse "
        f"{100 * inv['teacher_hits_sparse']:.0f}%",
        "  torchao PTQ (pt2e, linear inputs)      top-1 / logit SQNR vs FP32, by calibration data:",
    ]
    for scheme in dict.fromkeys(r["scheme"] for r in results["quantization"]):
        cells = [f"{r['source']} {100 * r['top1_mean']:.2f}% / {r['sqnr_mean']:.1f}dB"
                 for r in results["quantization"] if r["scheme"] == scheme]
        lines.append(f"    {scheme}: " + " | ".join(cells))
    dep, card = results["deployment"], results["deployment"]["card"]
    latency = card["latency"]
    lines.append(f"  deployable int8 (W8A8, unquantized ops {card['unquantized_precision']}): "
                 f"{dep['directory']}/model.pt2 {card['files']['model.pt2'] / 1e6:.2f} MB "
                 f"({100 * card['files']['model.pt2'] / dep['fp32_state_dict_bytes']:.0f}% of FP32; compiled.pt2 "
                 f"{card['files']['compiled.pt2'] / 1e6:.2f} MB); top-1 "
                 f"{100 * card['quantized_accuracy']:.2f}% (FP32 {100 * card['fp32_accuracy']:.2f}%), reloaded "
                 f"{100 * dep['reloaded_top1']:.2f}%; batch {latency['batch']}: FP32 compiled "
                 f"{1000 * latency['fp32_compiled_seconds_per_batch']:.1f} ms, int8 "
                 f"{1000 * latency['seconds_per_batch']:.1f} ms -> {latency['speedup_vs_fp32_compiled']:.2f}x faster")
    status = "FAILED (near chance)" if kd["failed"] else "saved"
    lines.append(f"  data-free KD ({kd['mode']}, {kd['source']} inversion, {kd['curve_minutes'][-1][1]:.1f} min, "
                 f"{kd['inverted_images']} distinct images): student {100 * kd['student_accuracy']:.2f}% "
                 f"(teacher {100 * kd['teacher_accuracy']:.2f}%), {status} to {kd['directory']}, reloaded "
                 f"{100 * kd['reloaded_top1']:.2f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="examples/demo.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/demo", help="where pictures, tables and the dataset go "
                        "(default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a much shorter run (for smoke tests)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    out = Path(args.out)
    results = run(DemoConfig.quick() if args.quick else DemoConfig(), out)
    print()
    print(format_summary(results))
    print(f"\npictures: {out}/inverted_sparse.png, inverted_dense.png, stopping_stages.png, inversion_loss.png, "
          f"distillation_curves.png; int8 model: {out}/int8; student: {out}/student; dataset: {out}/dataset; "
          f"all numbers: {out}/results.json "
          f"({time.perf_counter() - started:.0f}s)")
    return results


if __name__ == "__main__":
    main()
