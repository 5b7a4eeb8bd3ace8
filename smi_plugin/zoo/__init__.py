"""A small zoo of real teachers, and every way a model comes in or goes out of this project.

The shipped teachers are timm ViTs trained here on real data that ships in packages, each a timm Hub
folder beside this package (``NAME/config.json`` + ``model.safetensors`` + ``README.md``, the card:
recipe, seed, normalization, measured held-out top-1, under ``config.json``'s ``smi_plugin`` key).
One module per job:

* ``registry``: the teachers' recipes, names and cards (``RECIPES``, ``load_card``);
* ``loading``: ``load_teacher``, from a zoo name, a timm name (plus a checkpoint) or a folder;
* ``checkpoints``: reading a user's checkpoint and saying how it mismatches the model;
* ``saved``: the students this project writes, as timm Hub folders (``save_student``,
  ``load_saved``, ``push_student_to_hub``);
* ``transformers_vit``: Hugging Face transformers ViT/DeiT/CLIP classifiers as timm ViTs;
* ``training``: ``train_teacher``, the recipe's training loop;
* ``errors``: ``TeacherError``, what every loader raises, with what to do instead.

Example:
    >>> teacher = load_teacher("digits-vit")                         # a zoo name
    >>> teacher = load_teacher("deit_tiny_patch16_224", pretrained=True)   # timm hub weights
    >>> teacher = load_teacher("deit_tiny_patch16_224", checkpoint_path="ft.safetensors", num_classes=10)
    >>> teacher = load_teacher("my_vit/")       # smi distill --out, timm save_for_hf or transformers save_pretrained
"""

from .checkpoints import checkpoint_mismatch
from .errors import TeacherError
from .loading import load_teacher, set_normalization
from .registry import (BASE_ARCHITECTURE, RECIPES, ZOO_DIR, TeacherRecipe, card_path, load_card,
                       teacher_dir, weights_path, zoo_names)
from .saved import (SAVED_CARD, SAVED_FORMAT, SAVED_WEIGHTS, load_saved, push_student_to_hub, read_card,
                    save_student)
from .training import train_teacher
from .transformers_vit import load_transformers_vit

__all__ = [
    "BASE_ARCHITECTURE", "RECIPES", "SAVED_CARD", "SAVED_FORMAT", "SAVED_WEIGHTS", "ZOO_DIR", "TeacherError",
    "TeacherRecipe", "card_path", "checkpoint_mismatch", "load_card", "load_saved", "load_teacher",
    "load_transformers_vit", "push_student_to_hub", "read_card", "save_student", "set_normalization",
    "teacher_dir", "train_teacher", "weights_path", "zoo_names",
]
