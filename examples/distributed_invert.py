"""Invert images on every process of an accelerate launch and export a Hugging Face dataset.

    python examples/distributed_invert.py --out outputs/examples/inverted
    accelerate launch --multi_gpu --num_processes 2 examples/distributed_invert.py --out outputs/examples/inverted

(On a CPU-only machine accelerate's --multi_gpu starts torchrun workers that use gloo; on GPUs the
same command uses one GPU per process. Rerun the same command to resume a killed run.)
"""

import argparse

import datasets

from smi_plugin import InversionConfig, StoppingSchedule, load_teacher
from smi_plugin.batch import balanced_labels
from smi_plugin.distributed import distributed_state, invert_to_directory

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="outputs/examples/inverted")
parser.add_argument("--images", type=int, default=40)
parser.add_argument("--iterations", type=int, default=100)
args = parser.parse_args()

teacher = load_teacher("fashion-mnist-vit")
config = InversionConfig(iterations=args.iterations, batch_size=8, tie_channels=True,
                         schedule=StoppingSchedule.paper_scaled(args.iterations))
invert_to_directory(teacher, config, args.out, balanced_labels(args.images, 10))

if distributed_state().is_main_process:
    dataset = datasets.load_from_disk(args.out)
    print(dataset)
    dataset.to_parquet(f"{args.out}.parquet")
    print(f"saved to {args.out} (load_from_disk) and {args.out}.parquet")
