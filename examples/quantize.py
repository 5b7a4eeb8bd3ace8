"""Data-free W8/A8 quantization of a ViT with torchao, calibrated on sparse inversions, saved and reloaded.

    python examples/quantize.py [--teacher digits-vit] [--iterations 200] [--out quantized-digits]

Calibration runs on the retained tokens only; the result is lowered to int8 kernels (inductor,
freezing, compiled ahead of time), saved as OUT/model.pt2 + OUT/compiled.pt2 + OUT/card.json and
loaded back with ``load_quantized``.
"""

import argparse

from smi_plugin import InversionConfig, StoppingSchedule, load_quantized, load_teacher
from smi_plugin.calibration import SparseInvertedCalibrationDataset
from smi_plugin.data import load_split
from smi_plugin.evaluation import evaluate_accuracy
from smi_plugin.images import model_normalization
from smi_plugin.integrations.deploy import quantize_for_deployment, save_quantized
from smi_plugin.integrations.torchao import quantize_with_inverted_data
from smi_plugin.zoo import load_card

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--teacher", default="digits-vit")
parser.add_argument("--iterations", type=int, default=200)
parser.add_argument("--out", default="quantized-model")
args = parser.parse_args()

teacher = load_teacher(args.teacher)
mean, std = model_normalization(teacher)
test = load_split(load_card(args.teacher)["dataset"], "test")

# 32 sparsely inverted calibration images: the paper's stopping stages scaled to the run.
config = InversionConfig(iterations=args.iterations, schedule=StoppingSchedule.paper_scaled(args.iterations),
                         tie_channels=True)
calibration = SparseInvertedCalibrationDataset.from_inverter(teacher, 32, config)
print(f"calibration: {len(calibration)} images, {calibration.kept_fraction:.0%} of patches retained")
print(f"FP32 top-1 on real held-out images: {evaluate_accuracy(teacher, test, mean, std):.2%}")

# W4/A8 in memory (q/dq simulation: W4 accuracy; no 4-bit kernel here).
qmodel = quantize_with_inverted_data(teacher, calibration, "w4a8")
print(f"w4a8 top-1 on real held-out images: {evaluate_accuracy(qmodel, test, mean, std):.2%}")

# W8/A8 lowered to int8 kernels, evaluated, saved, and loaded back.
program, fast, card = quantize_for_deployment(teacher, calibration, "w8a8", test_split=test,
                                              calibration={"seed": config.seed, "inversion": config.to_dict()},
                                              teacher_name=args.teacher)
print(f"w8a8 int8 top-1 on real held-out images: {card['quantized_accuracy']:.2%} "
      f"(agreement with FP32 {card['agreement']:.2%}, SQNR {card['sqnr_db']:.1f} dB)")
save_quantized(program, args.out, card, fast)
loaded = load_quantized(args.out)
print(f"saved to {args.out}/model.pt2; reloaded ({loaded.loaded_from}) top-1: "
      f"{evaluate_accuracy(loaded, test, mean, std):.2%}")
