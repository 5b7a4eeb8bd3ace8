"""Write a ViT checkpoint and an image folder the way a user brings their own (for the README's path).

The weights are a plain timm ``vit_tiny_patch16_224`` state dict at 32x32 with patch 4 (here, the
digits teacher's trained weights, so the numbers mean something), and the images are the real
held-out digits as PNG files in one sub-folder per class, which ``--eval-data`` reads like
torchvision's ``ImageFolder``. Nothing of the zoo is used after this step.

    python examples/own_model_and_data.py --out outputs/own
    smi quantize --teacher vit_tiny_patch16_224 --checkpoint outputs/own/vit.safetensors --num-classes 10 \\
        --model-kwargs img_size=32 patch_size=4 embed_dim=96 depth=4 num_heads=3 \\
        --mean 0.305 0.305 0.305 --std 0.324 0.324 0.324 --eval-data outputs/own/images --out outputs/own/int8
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image
from safetensors.torch import save_file

from smi_plugin import load_teacher
from smi_plugin.data import load_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/own", help="folder for vit.safetensors and images/ "
                        "(default: %(default)s)")
    parser.add_argument("--images", type=int, default=200, help="held-out images to write (default: %(default)s)")
    args = parser.parse_args()
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    teacher = load_teacher("digits-vit")
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(out / "vit.safetensors"))
    test = load_split("digits", "test")
    for index in range(min(args.images, len(test))):
        label = int(test.labels[index])
        folder = out / "images" / f"{label:02d}_{test.class_names[label]}"  # sorted folders = class order
        folder.mkdir(exist_ok=True)
        Image.fromarray(test.pixels[index, 0].numpy(), mode="L").save(folder / f"{index:05d}.png")
    print(f"wrote {out / 'vit.safetensors'} and {min(args.images, len(test))} images under {out / 'images'}")


if __name__ == "__main__":
    main()
