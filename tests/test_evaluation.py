import pytest
import torch

from smi_plugin.data import load_split
from smi_plugin.evaluation import attention_foreground_auc
from smi_plugin.images import model_normalization
from smi_plugin.tokens import cls_attention_scores
from smi_plugin.zoo import load_teacher


def test_attention_foreground_auc_equals_a_pairwise_count():
    teacher = load_teacher("digits-vit")
    split = load_split("digits", "test")
    mean, std = model_normalization(teacher)
    aucs = attention_foreground_auc(teacher, split, mean, std, max_images=6)
    assert len(aucs) == len(teacher.blocks)

    last = teacher.blocks[-1].attn
    captured = {}
    handle = last.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    images = split.images(slice(0, 6))
    with torch.no_grad():
        teacher((images - mean[0]) / std[0])
        scores = cls_attention_scores(last, captured["x"], teacher.num_prefix_tokens)
    handle.remove()
    per_image = []
    for image, row in zip(images, scores):
        level = [image[:, y:y + 4, x:x + 4].mean().item() for y in range(0, 32, 4) for x in range(0, 32, 4)]
        fg = [s for s, v in zip(row.tolist(), level) if v > 0.02]
        bg = [s for s, v in zip(row.tolist(), level) if v <= 0.02]
        if fg and bg:
            per_image.append(sum(f > b for f in fg for b in bg) / (len(fg) * len(bg)))
    assert aucs[-1] == pytest.approx(sum(per_image) / len(per_image), abs=1e-6)


def test_digits_teacher_attention_finds_the_foreground_of_real_digits():
    teacher = load_teacher("digits-vit")
    aucs = attention_foreground_auc(teacher, load_split("digits", "test"), *model_normalization(teacher))
    assert aucs[-1] > 0.7  # measured 0.81; 0.5 is chance


def test_attention_foreground_auc_needs_a_background():
    teacher = load_teacher("digits-vit")
    with pytest.raises(ValueError, match="background_level"):
        attention_foreground_auc(teacher, load_split("digits", "test"), *model_normalization(teacher),
                                 background_level=-1.0, max_images=8)
