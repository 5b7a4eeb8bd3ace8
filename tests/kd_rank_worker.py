"""Run by ``accelerate launch`` in tests/test_distill_processes.py: the Python one-call form of ``smi distill``
on each process, recording per step a hash of the process's KD batch and of its student's weights."""

import hashlib
import json
import sys

from safetensors.torch import save_file

from smi_plugin import load_teacher
from smi_plugin.distill import KDTrainer

SETTINGS = {"steps": 6, "pool_size": 16, "checkpoint_every": 2, "eval_every": 1000}
INVERSION = {"iterations": 6}


def digest(tensors) -> str:
    hasher = hashlib.sha256()
    for tensor in tensors:
        hasher.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return hasher.hexdigest()[:16]


def main(out: str) -> None:
    trainer = KDTrainer.from_recipe(load_teacher("digits-vit"), "full", out_dir=f"{out}/run", inversion=INVERSION,
                                    seed=3, progress=False, **SETTINGS)
    steps, train_step = [], trainer.train_step

    def recording_step(x, m):
        loss = train_step(x, m)
        steps.append({"batch": digest([x, m]), "weights": digest(trainer.student.state_dict().values())})
        return loss

    trainer.train_step = recording_step
    trainer.fit()
    rank = trainer.accelerator.process_index
    record = {"steps": steps, "processes": trainer.accelerator.num_processes, "inverted": trainer.inverted_images(),
              "seen": trainer.images_seen}
    with open(f"{out}/rank{rank}.json", "w") as handle:
        json.dump(record, handle)
    if trainer.accelerator.is_main_process:
        save_file({k: v.contiguous() for k, v in trainer.student.state_dict().items()}, f"{out}/student.safetensors")


if __name__ == "__main__":
    main(sys.argv[1])
