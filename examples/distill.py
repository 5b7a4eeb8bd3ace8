"""Data-free knowledge transfer: a student learns a new head from inverted images only.

The paper's setting: teacher and student share a pretrained backbone (here trained on real images
of Fashion-MNIST classes 0-4); the teacher was fine-tuned on all classes; the student is the
backbone with a new head, trained by KD on sparsely inverted images, judged on real held-out images.

    python examples/distill.py [--images 256] [--steps 300]
"""

import argparse

from smi_plugin import InversionConfig, SparseInverter, StoppingSchedule, load_teacher
from smi_plugin.batch import balanced_labels
from smi_plugin.data import load_split
from smi_plugin.distill import (
                         DistillConfig,
                         KDTrainer,
                         failed,
                         linear_probe_student,
                         save_student,
)
from smi_plugin.evaluation import evaluate_accuracy
from smi_plugin.images import model_normalization
from smi_plugin.zoo import load_card

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--images", type=int, default=256)
parser.add_argument("--iterations", type=int, default=200)
parser.add_argument("--steps", type=int, default=300)
parser.add_argument("--out", default="outputs/examples/distill")
args = parser.parse_args()

teacher, backbone = load_teacher("fashion-mnist-vit-ft"), load_teacher("fashion-mnist-backbone")
mean, std = model_normalization(teacher)
test = load_split("fashion-mnist", "test")

config = InversionConfig(iterations=args.iterations, schedule=StoppingSchedule.paper_scaled(args.iterations),
                         tie_channels=True, batch_size=64)
pool = SparseInverter(teacher, config).invert(balanced_labels(args.images, 10))

student = linear_probe_student(backbone, num_classes=10)
trainer = KDTrainer(teacher, student, DistillConfig(mode="linear-probe", steps=args.steps, eval_every=50),
                    test, mean, std, out_dir=args.out)
history = trainer.fit([pool])
accuracy = history["eval"][-1][1]
card = load_card("fashion-mnist-backbone")  # the student's architecture is its backbone's
save_student(student, args.out, {"architecture": card["architecture"], "model_kwargs": card["model_kwargs"],
                                 "num_classes": 10, "mean": mean, "std": std, "accuracy": accuracy})
print(f"teacher {evaluate_accuracy(teacher, test, mean, std):.2%}; student after KD on "
      f"{args.images} inverted images: {accuracy:.2%}{' (FAILED: near chance)' if failed(accuracy, 10) else ''} "
      f"(curve: {args.out}/learning_curve.png, student: {args.out}/student.safetensors)")
