"""Data-free W8/A8 and W4/A8 quantization of a ViT with torchao, calibrated on sparse inversions.

    python examples/quantize.py [--teacher digits-vit] [--iterations 200]
"""

import argparse

from smi_plugin.integrations.torchao import quantize_with_inverted_data
from smi_plugin import InversionConfig, StoppingSchedule, load_teacher
from smi_plugin.calibration import SparseInvertedCalibrationDataset
from smi_plugin.data import load_split
from smi_plugin.evaluation import evaluate_accuracy
from smi_plugin.images import model_normalization
from smi_plugin.zoo import load_card

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--teacher", default="digits-vit")
parser.add_argument("--iterations", type=int, default=200)
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
for scheme in ("w8a8", "w4a8"):
    qmodel = quantize_with_inverted_data(teacher, calibration, scheme)  # pt2e, X86 inductor quantizer
    print(f"{scheme} top-1 on real held-out images: {evaluate_accuracy(qmodel, test, mean, std):.2%}")

