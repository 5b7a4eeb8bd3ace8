"""The command line: its help, flags and error messages, run in process as a shell would see them."""

import os
import re
import sys
from types import SimpleNamespace

import pytest

from smi_plugin import StoppingSchedule


def _smi(capsys, *args) -> SimpleNamespace:
    """``smi ARGS`` run in this process, as ``(returncode, stdout, stderr)``: what a user's shell sees,
    without paying a fresh interpreter per error message. An exception the CLI lets escape fails the test
    with its traceback, as it would have printed one."""
    from smi_plugin.cli import main

    capsys.readouterr()
    try:
        main([str(arg) for arg in args])
        code = 0
    except SystemExit as exit_:  # as the interpreter ends: a message goes to stderr with status 1
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        if isinstance(exit_.code, str):
            print(exit_.code, file=sys.stderr)
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


@pytest.mark.parametrize("args, message", [
    (["invert", "--teacher", "nope", "--num-images", "2", "--out", "x"], "unknown teacher 'nope'"),
    (["invert", "--teacher", "digits-vit", "--out", "x"], "--num-images"),
    (["invert", "--teacher", "digits-vit", "--num-images", "2", "--schedule", "50-0.3", "--out", "x"], "ITERATION:RATIO"),
    (["invert", "--teacher", "digits-vit", "--labels", "0,12", "--out", "x"], "outside"),
    (["invert", "--teacher", "digits-vit", "--num-images", "2", "--config", "missing.yaml", "--out", "x"], "not found"),
    (["distill", "--teacher", "digits-vit", "--mode", "linear-probe"], "pretrained backbone"),
    (["distill", "--teacher", "digits-vit", "--eval-images", "0"], "--eval-images: must be a positive integer"),
    (["distill", "--teacher", "digits-vit", "--push-to-hub", "me/student"], "give --out DIR too"),
    (["distill", "--teacher", "digits-vit", "--student", "deit_tiny_patch16_224"],
     "cannot take the teacher's (3, 32, 32) images on its (8, 8) patch grid"),
])
def test_cli_errors_say_what_to_do(tmp_path, capsys, args, message):
    result = _smi(capsys, *[str(tmp_path / a) if a in ("x",) else a for a in args])
    assert result.returncode != 0 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_timm_student_with_an_imagenet_head_learns_the_teachers_classes(tmp_path, capsys):
    """A user's own student (a timm CNN, built with 1000 classes) gets a head of the teacher's 10, trains
    and saves a model that loads back with that head."""
    import torch

    from smi_plugin import load_teacher

    out = tmp_path / "student"
    result = _smi(capsys, "distill", "--teacher", "digits-vit", "--mode", "full", "--student", "resnet10t",
                  "--num-images", "8", "--iterations", "4", "--steps", "2", "--eval-images", "16", "--out", out)
    assert result.returncode == 0 and "Traceback" not in result.stderr
    student = load_teacher(str(out))
    assert student.num_classes == 10 and student(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_a_students_own_shape_and_a_saved_student_go_through_distill(tmp_path, capsys):
    """--student-model-kwargs shapes a timm student; the student saved then serves as the next run's
    --student, and what that run saves loads back with the same shape."""
    import torch

    from smi_plugin import load_teacher

    first, second = tmp_path / "first", tmp_path / "second"
    common = ["distill", "--teacher", "digits-vit", "--mode", "full", "--num-images", "8", "--iterations", "4",
              "--steps", "2", "--eval-images", "16"]
    shape = ["--student-model-kwargs", "img_size=32", "patch_size=4", "embed_dim=32", "depth=1", "num_heads=2"]
    assert _smi(capsys, *common, "--student", "vit_tiny_patch16_224", *shape, "--out", first).returncode == 0
    refused = _smi(capsys, *common, "--student", first, *shape, "--out", second)  # its card fixes its shape
    assert refused.returncode != 0 and "drop --student-model-kwargs" in refused.stderr and not second.exists()
    assert _smi(capsys, *common, "--student", first, "--out", second).returncode == 0
    student = load_teacher(str(second))
    assert student.embed_dim == 32 and len(student.blocks) == 1
    assert student(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_distill_inverts_with_its_modes_recipe_unless_a_flag_says_otherwise(tmp_path, capsys):
    """``--mode`` names a library recipe (resolved against the teacher when auto): a linear probe with its solved
    head runs the paper's loop in rounds and inverts each sample longer, keeping more of it; full KD learns from
    the online pool; explicit flags beat either."""
    import json

    from smi_plugin.recipes import RECIPES

    def recipe(teacher: str, *flags: str) -> tuple[str, str, int, str]:
        out = tmp_path / "kd.json"
        result = _smi(capsys, "distill", "--teacher", teacher, "--steps", "1", "--num-images", "8",
                      "--images-per-round", "8", "--kd-batch-size", "8", "--eval-images", "16", "--json", out, *flags)
        assert result.returncode == 0, result.stderr
        report = json.loads(out.read_text())
        return report["mode"], report["source"], report["inversion"]["iterations"], report["inversion"]["schedule"]

    probe, full = RECIPES["linear-probe"].inversion["iterations"], RECIPES["full"].inversion["iterations"]
    assert probe != full and RECIPES["linear-probe"].distillation["source"] == "alternating"
    # --mode auto picks the probe here; the paper's first stage, scaled to its iterations, keeps 70%.
    assert recipe("fashion-mnist-vit-ft") == ("linear-probe", "alternating", probe,
                                              str(StoppingSchedule.paper_scaled(probe, 1)))
    assert recipe("digits-vit") == ("full", "online", full, str(StoppingSchedule.paper_scaled(full)))
    assert recipe("fashion-mnist-vit-ft", "--iterations", "12") == ("linear-probe", "alternating", 12,
                                                                     str(StoppingSchedule.paper_scaled(12, 1)))
    assert recipe("fashion-mnist-vit-ft", "--schedule", "dense", "--probe-head", "gradient", "--source", "online") == (
        "linear-probe", "online", probe, "dense")


def test_distill_refuses_in_one_line_to_resume_a_run_with_other_settings(tmp_path, capsys):
    """An --out directory from another recipe is refused before any inversion, naming what differs."""
    flags = ("distill", "--teacher", "digits-vit", "--steps", "1", "--num-images", "8", "--kd-batch-size", "8",
             "--eval-images", "16", "--iterations", "4", "--out", tmp_path / "run")
    assert _smi(capsys, *flags).returncode == 0
    result = _smi(capsys, *flags[:-2], "--iterations", "6", "--out", tmp_path / "run")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "InversionConfig.iterations 4 -> 6" in result.stderr and "--out" in result.stderr


def test_config_file_keys_mirror_the_dataclass(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("iterations: 5\nlearning_rate: 0.1\n")
    result = _smi(capsys, "invert", "--teacher", "digits-vit", "--num-images", "2", "--config", str(tmp_path / "run.yaml"),
                  "--out", str(tmp_path / "o"))
    assert result.returncode != 0 and "unknown InversionConfig keys ['learning_rate']" in result.stderr


def test_help_explains_every_command(capsys):
    for command in ("invert", "quantize", "distill", "bench", "train-teacher"):
        result = _smi(capsys, command, "--help")
        assert result.returncode == 0 and "usage: smi" in result.stdout


# --- bring your own model: a timm ViT as a timm user passes it, and errors a user can act on ---------------------

USER_VIT = {"img_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3}
USER_FLAGS = ["--model-kwargs", "img_size=32", "patch_size=4", "embed_dim=96", "depth=4", "num_heads=3"]


@pytest.fixture(scope="module")
def user_checkpoints(tmp_path_factory):
    """A user's own timm ViT saved to safetensors, plus broken and foreign checkpoint files."""
    import timm
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("checkpoints")
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, **USER_VIT)
    save_file(model.state_dict(), str(folder / "mine.safetensors"))
    (folder / "random.safetensors").write_bytes(os.urandom(256))
    (folder / "random.pth").write_bytes(os.urandom(256))
    torch.save({"epoch": 3, "notes": "not weights"}, folder / "foreign.pth")
    return folder


def test_a_users_timm_vit_inverts_with_its_normalization(tmp_path, capsys, user_checkpoints):
    out = tmp_path / "out"
    result = _smi(capsys, "invert", "--teacher", "vit_tiny_patch16_224", "--checkpoint",
                  str(user_checkpoints / "mine.safetensors"), "--num-classes", "10", *USER_FLAGS,
                  "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25", "--num-images", "4",
                  "--iterations", "5", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["mean"] == [0.5] * 3 and manifest["std"] == [0.25] * 3 and manifest["num_images"] == 4


@pytest.mark.parametrize("args, message", [
    (["--teacher", "resnet18"], "ResNet is not supported"),
    (["--teacher", "swin_tiny_patch4_window7_224"], "SwinTransformer is not supported"),
    (["--teacher", "vit_tiny_patch16_224", "--checkpoint", "CK/mine.safetensors"],
     "pos_embed: checkpoint (1, 65, 96) vs model (1, 197, 192)"),
    (["--teacher", "vit_tiny_patch16_224", "--checkpoint", "CK/mine.safetensors"],
     "--model-kwargs img_size=32 patch_size=4 embed_dim=96 depth=4"),
    (["--teacher", "vit_tiny_patch16_224", "--checkpoint", "CK/mine.safetensors", *USER_FLAGS, "--num-classes", "5"],
     "head.weight: checkpoint (10, 96) vs model (5, 96)"),  # without --num-classes the checkpoint's 10 are used
    (["--teacher", "vit_tiny_patch16_224", "--checkpoint", "CK/random.safetensors"], "not a valid safetensors file"),
    (["--teacher", "vit_tiny_patch16_224", "--checkpoint", "CK/random.pth"], "not a torch checkpoint"),
    (["--teacher", "vit_tiny_patch16_224", "--checkpoint", "CK/foreign.pth"], "not a state dict of tensors"),
    (["--teacher", "vit_tiny_patch16_224", "--checkpoint", "CK/missing.pth"], "checkpoint not found: "),
    (["--teacher", "vit_tiny_patch16_224", "--model-kwargs", "img_size"], "KEY=VALUE"),
    (["--teacher", "vit_tiny_patch16_224", "--mean", "0.5", "--std", "0.2"], "one value per input channel"),
    (["--teacher", "digits-vit", "--labels", "-1,3"], "outside the valid range 0..9"),
    (["--teacher", "digits-vit", "--labels=-1,3"], "outside the valid range 0..9"),
    (["--teacher", "digits-vit", "--labels", "0,10"], "outside the valid range 0..9"),
    (["--teacher", "digits-vit", "--num-images", "-5"], "must be a positive integer, got -5"),
])
def test_bring_your_own_model_errors_are_one_actionable_line(tmp_path, capsys, user_checkpoints, args, message):
    out = tmp_path / "never"
    args = [a.replace("CK/", f"{user_checkpoints}/") for a in args]
    if "--labels" not in " ".join(args) and "--num-images" not in args:
        args += ["--num-images", "2"]
    result = _smi(capsys, "invert", *args, "--iterations", "2", "--out", str(out))
    assert result.returncode != 0, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.stderr
    assert "weights_only=False" not in result.stderr
    assert not out.exists()


def test_help_shows_every_default_and_every_zoo_teacher(capsys):
    import argparse

    from smi_plugin.cli import build_parser
    from smi_plugin.zoo import zoo_names

    text = _smi(capsys, "invert", "--help").stdout
    flat = re.sub(r"-\s+", "-", " ".join(text.split()))  # argparse wraps lines at hyphens too
    assert all(name in flat for name in zoo_names()) and "--model-kwargs KEY=VALUE" in flat
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["invert"]
    undocumented = [a.option_strings[0] for a in sub._actions if a.option_strings and a.dest != "help"
                    and "(default:" not in (a.help or "") and "(required)" not in (a.help or "")]
    assert undocumented == []


def test_model_kwargs_are_python_literals():
    from smi_plugin.cli import build_parser

    args = build_parser().parse_args(["invert", "--out", "x", "--model-kwargs", "img_size=32", "drop_rate=0.1",
                                      "global_pool=avg", "class_token=True", "img_size2=(32, 48)"])
    assert args.model_kwargs == {"img_size": 32, "drop_rate": 0.1, "global_pool": "avg", "class_token": True,
                                 "img_size2": (32, 48)}


def test_evaluation_split_order(tmp_path):
    import argparse

    from smi_plugin import load_teacher
    from smi_plugin.cli.common import evaluation_split
    from smi_plugin.cli.options import CLIError

    teacher = load_teacher("digits-vit")
    zoo = evaluation_split(argparse.Namespace(eval_data=None), teacher)
    assert zoo.name == "digits" and zoo.split == "test"
    _write_image_folder(tmp_path / "val", ["a", "b"], size=20)
    mine = evaluation_split(argparse.Namespace(eval_data=str(tmp_path / "val"), dataset="fashion-mnist"), teacher)
    assert mine.class_names == ("a", "b") and mine.images().shape == (4, 3, 32, 32)
    plain = load_teacher("vit_tiny_patch16_224", num_classes=3, **USER_VIT)
    assert evaluation_split(argparse.Namespace(eval_data=None), plain) is None
    with pytest.raises(CLIError, match="--eval-data: .* not found"):
        evaluation_split(argparse.Namespace(eval_data=str(tmp_path / "nope")), teacher)
    _write_image_folder(tmp_path / "many", [f"c{i}" for i in range(4)], size=20)
    with pytest.raises(CLIError, match="4 classes but the model has 3 outputs"):
        evaluation_split(argparse.Namespace(eval_data=str(tmp_path / "many")), plain)


def _write_image_folder(root, classes, size=20, per_class=2):
    import numpy as np
    from PIL import Image

    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((size, size, 3), 40 * i, dtype=np.uint8)).save(root / name / f"{i}.png")


