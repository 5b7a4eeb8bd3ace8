"""Is the quantized model faster, and smaller? CPU latency and serialized size of nine variants
(eight with ``--tune-for-batch 0``).

Variants: FP32 eager; FP32 compiled just in time (inductor, freezing) and ahead of time (an
AOTInductor package: the same kernels called from C++); bf16 compiled (the FP32 model under bfloat16
autocast, compiled alike: what a CPU with native bfloat16 gives without quantizing); int8 compiled just
in time and int8 package (our pt2e path: kept-token calibration, convert_pt2e, inductor freezing ->
oneDNN int8 kernels; the ops left unquantized in ``--unquantized-precision``, by default bfloat16 on
AMX CPUs, bfloat16-matmul-attention with AVX512-BF16 alone, float32 elsewhere; the package is what ``smi quantize`` saves and ``load_quantized``
returns: by default it also holds GEMM kernels tuned for batch ``--tune-for-batch``, run at the batch
sizes where they measured faster, and "int8 package, oneDNN only" is the package without them);
ONNX Runtime FP32 and ONNX Runtime int8 (QDQ, per-channel weights, calibrated on the same
retained tokens). Latency is the median over ``--repeats`` timed calls after ``--warmup`` calls (the
first call compiles), per batch size. Sizes: FP32 ``torch.save`` state dict, ``model.pt2``,
``compiled.pt2``, the two ONNX files.

Models: the zoo teachers (calibrated on sparsely inverted images, timed and judged on their real
held-out images: logit SQNR and top-1 agreement with FP32) and random-weight timm DeiTs at 224
(calibrated on and fed Gaussian noise: speed and size only, their accuracy means nothing).
Run it alone on a quiet machine:

    OMP_NUM_THREADS=2 python benchmarks/quantized_speed.py --json quantized_speed.json
    python benchmarks/quantized_speed.py --models digits-vit --batches 1 --repeats 3     # quick
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smi_plugin import InversionConfig, StoppingSchedule, load_teacher  # noqa: E402
from smi_plugin.calibration import SparseInvertedCalibrationDataset  # noqa: E402
from smi_plugin.data import ImageSplit, load_split  # noqa: E402
from smi_plugin.evaluation import sqnr_db  # noqa: E402
from smi_plugin.integrations.torchao import UNQUANTIZED_PRECISIONS, InvertedPTQConfig  # noqa: E402
from smi_plugin.images import model_normalization, normalize  # noqa: E402
from smi_plugin.zoo import load_card, zoo_names  # noqa: E402

DEFAULT_MODELS = "digits-vit,fashion-mnist-vit,deit_tiny_patch16_224,deit_small_patch16_224"


def build_model(name: str) -> torch.nn.Module:
    if name in zoo_names():
        return load_teacher(name).eval()
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()


def calibration_set(model: torch.nn.Module, name: str, images: int, iterations: int) -> SparseInvertedCalibrationDataset:
    if name in zoo_names():
        config = InversionConfig(iterations=iterations, batch_size=images,
                                 schedule=StoppingSchedule.paper_scaled(iterations), tie_channels=True)
        return SparseInvertedCalibrationDataset.from_inverter(model, images, config, progress=False)
    return SparseInvertedCalibrationDataset.gaussian(model, images)


def benchmark_inputs(model: torch.nn.Module, split: ImageSplit | None, batch: int,
                     shape: tuple[int, ...]) -> torch.Tensor:
    """The first ``batch`` images of ``split`` (a zoo teacher's real held-out set), normalized and
    cycled if the split is smaller; Gaussian noise without one (random-weight models, whose
    calibration was noise too)."""
    if split is None:
        return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch))
    return normalize(split.images(torch.arange(batch) % len(split)), *model_normalization(model))


def bench_model(name: str, batches: list[int], args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from smi_plugin.integrations.deploy import (FrozenCompiled, compile_package, compile_quantized, export_quantized,
                                                timed_calls, write_program)
    from smi_plugin.integrations.onnxruntime import KeptTokenDataReader, OrtViT, export_patch_onnx, quantize_onnx
    from smi_plugin.integrations.torchao import quantize_with_inverted_data

    # Each model's compiled FP32 forward is VisionTransformer.forward again: without a reset, dynamo's
    # per-code recompile limit is reached after a few models and batch sizes and it silently runs eager.
    torch._dynamo.reset()
    model = build_model(name)
    data = calibration_set(model, name, args.calibration_images, args.iterations)
    started = time.perf_counter()
    program = export_quantized(quantize_with_inverted_data(model, data, "w8a8"))
    quantize_seconds = time.perf_counter() - started
    files = {"fp32 state dict": workdir / f"{name}.pt", "model.pt2": workdir / f"{name}.pt2",
             "compiled.pt2": workdir / f"{name}.compiled.pt2",
             "compiled.pt2, oneDNN only": workdir / f"{name}.onednn.pt2",
             "onnx fp32": workdir / f"{name}.onnx", "onnx int8": workdir / f"{name}.int8.onnx"}
    torch.save(model.state_dict(), files["fp32 state dict"])
    write_program(program, files["model.pt2"])
    precision = InvertedPTQConfig(unquantized_precision=args.unquantized_precision).resolved_unquantized_precision
    shape = tuple(data.pixel_values.shape[1:])
    variants: dict[str, Callable] = {
        "fp32 eager": model, "fp32 compiled": FrozenCompiled(model),
        "fp32 package": compile_package(model, workdir / f"{name}.fp32.pt2", image_shape=shape),
        "bf16 compiled": FrozenCompiled(model, torch.bfloat16),
        "int8 compiled": compile_quantized(program, precision),
        "int8 package": compile_package(program, files["compiled.pt2"], precision,
                                        tune_for_batch=args.tune_for_batch)}
    if args.tune_for_batch:
        variants["int8 package, oneDNN only"] = compile_package(program, files["compiled.pt2, oneDNN only"], precision)
    if not args.skip_ort:
        export_patch_onnx(model, files["onnx fp32"])
        quantize_onnx(files["onnx fp32"], files["onnx int8"], KeptTokenDataReader(data, model))
        variants["ort fp32"] = OrtViT(files["onnx fp32"], model, threads=torch.get_num_threads())
        variants["ort int8"] = OrtViT(files["onnx int8"], model, threads=torch.get_num_threads())
    if not args.skip_openvino:
        from smi_plugin.integrations.openvino import OpenVINOModel, convert_fp32, quantize_nncf

        fp32_ir = convert_fp32(model, shape)
        variants["openvino fp32"] = OpenVINOModel(fp32_ir)
        variants["openvino int8"] = OpenVINOModel(quantize_nncf(fp32_ir, data))  # the calibration set of the others
    result: dict[str, Any] = {"model": name, "input": list(shape), "quantize_seconds": quantize_seconds,
                              "int8_unquantized_precision": precision, "tune_for_batch": args.tune_for_batch,
                              "latency_up_to_batch": variants["int8 package"].latency_up_to_batch,
                              "calibration": data.source, "calibration_images": len(data),
                              "sizes_bytes": {k: p.stat().st_size for k, p in files.items() if p.exists()},
                              "latency": {}}
    split = load_split(load_card(name)["dataset"], "test") if name in zoo_names() else None
    result["inputs"] = "gaussian" if split is None else "real held-out"
    for batch in batches:
        inputs = benchmark_inputs(model, split, batch, shape)
        with torch.no_grad():
            reference = model(inputs)
        rows = {}
        for variant, forward in variants.items():
            timing, out = timed_calls(forward, inputs, args.repeats, args.warmup)
            rows[variant] = {**timing, "ms_per_image": 1000 * timing["median_s"] / batch,
                             "sqnr_db_vs_fp32": sqnr_db(reference, out.float()),
                             "agreement_vs_fp32": (out.argmax(1) == reference.argmax(1)).float().mean().item()}
        result["latency"][str(batch)] = rows
    return result


def format_table(results: list[dict[str, Any]]) -> str:
    lines = []
    for result in results:
        sizes = result["sizes_bytes"]
        fp32 = sizes.get("fp32 state dict", 1)
        tuned = (f", GEMMs tuned at batch {result['tune_for_batch']} run up to batch "
                 f"{result['latency_up_to_batch']}" if result["tune_for_batch"] else "")
        lines.append(f"{result['model']} {tuple(result['input'])}, int8 with {result['int8_unquantized_precision']} "
                     f"unquantized ops{tuned}: sizes " + ", ".join(
            f"{k} {v / 1e6:.2f} MB ({100 * v / fp32:.0f}%)" for k, v in sizes.items()))
        variants = list(next(iter(result["latency"].values())))
        # the last columns: our package, as smi quantize saves it, against the faster FP32 compile and, measured
        # in the same run, against OpenVINO's NNCF int8 (above 1.00x: the package is faster)
        openvino = "openvino int8" in variants
        table = [["batch", *variants, "int8 package vs faster FP32 compiled"]
                 + (["int8 package vs openvino int8"] if openvino else [])]
        for batch, rows in result["latency"].items():
            base = rows["fp32 eager"]["median_s"]
            fp32 = min(rows[v]["median_s"] for v in ("fp32 compiled", "fp32 package"))
            ours = rows["int8 package"]["median_s"]
            table.append([batch] + [f"{1000 * rows[v]['median_s']:.2f} ms (x{base / rows[v]['median_s']:.2f})"
                                    for v in variants] + [f"{fp32 / ours:.2f}x"]
                         + ([f"{rows['openvino int8']['median_s'] / ours:.2f}x"] if openvino else []))
        header = table[0]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table]
        batch, rows = list(result["latency"].items())[-1]
        lines.append(f"  vs FP32 at batch {batch} ({result['inputs']} inputs): " + ", ".join(
            f"{v} {rows[v]['sqnr_db_vs_fp32']:.1f} dB SQNR / {100 * rows[v]['agreement_vs_fp32']:.0f}% top-1 agreement"
            for v in ("bf16 compiled", "int8 package", "ort int8", "openvino int8") if v in rows))
    lines.append("latency: median per batch (speed-up over FP32 eager); noisy unless the machine is quiet")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated zoo or timm names")
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes (default: %(default)s)")
    parser.add_argument("--zoo-batches", default="1,32,100",
                        help="batch sizes for zoo teachers (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (the first compiles)")
    parser.add_argument("--calibration-images", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=100, help="inversion iterations (zoo teachers)")
    parser.add_argument("--skip-ort", action="store_true", help="leave out the ONNX Runtime variants")
    parser.add_argument("--skip-openvino", action="store_true",
                        help="leave out the OpenVINO variants (FP32 IR, and NNCF int8 as smi quantize --runtime openvino)")
    parser.add_argument("--unquantized-precision", default="auto", choices=UNQUANTIZED_PRECISIONS,
                        help="the int8 model's unquantized ops (default: %(default)s, as smi quantize)")
    parser.add_argument("--tune-for-batch", type=int, default=InvertedPTQConfig().tune_for_batch,
                        help="the int8 package's tuned GEMM kernels, as smi quantize (default: %(default)s; "
                             "0: oneDNN's only, and no 'oneDNN only' variant)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            batches = args.zoo_batches if name in zoo_names() else args.batches
            results.append(bench_model(name, [int(b) for b in batches.split(",")], args, Path(tmp)))
    import torchao

    from smi_plugin.integrations.deploy import cpu_target

    # the instruction sets decide the kernels (AMX or AVX512-VNNI int8 GEMMs): the figures belong to them
    report = {"torch": torch.__version__, "torchao": torchao.__version__, "cpu_target": cpu_target(),
              "threads": torch.get_num_threads(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "repeats": args.repeats, "results": results}
    print(format_table(results))
    print(f"CPU instruction sets (inductor's target): {report['cpu_target']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
