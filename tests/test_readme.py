"""The README and the guides as a reader runs them: their commands as written (with their small sizes), then their
Python blocks, in the order of ``DOC_FILES`` (blocks marked ``<!-- not run: REASON -->`` are shown only).

The benchmark command is tested in ``test_inversion_speed.py`` and the bring-your-own-model chain in
``test_own_model_and_data.py``, so the suite's two workers run the three groups side by side."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import (README_ENV, README_GROUPS, readme_blocks, readme_commands, readme_group, real_digits,
                      run_readme_commands)

from smi_plugin import load_teacher
from smi_plugin.evaluation import sqnr_db
from smi_plugin.integrations.deploy import CARD_FILE, CompiledPackage


def test_readme_command_groups_cover_every_command_once():
    groups = [readme_group(name) for name in (*README_GROUPS, "rest")]
    assert all(groups) and sorted(sum(groups, [])) == sorted(readme_commands()) and len(readme_commands()) >= 8


@pytest.mark.slow(seconds=240)
def test_readme_commands_then_python_blocks_run(tmp_path):
    run_readme_commands(readme_group("rest"), tmp_path)
    for name in ("distill.json", "digits-w8a8/model.pt2", "inverted-2proc/manifest.json"):
        assert (tmp_path / "outputs/readme" / name).is_file(), name
    _check_the_default_tuned_compile(tmp_path / "outputs/readme/digits-w8a8")
    # every Python block in one process, in the same folder (one block loads the model a command saved)
    code = "\n".join(readme_blocks("python"))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=README_ENV, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "outputs/readme/grid.png").is_file()
    assert (tmp_path / "outputs/readme/kd/learning_curve.png").is_file()


def _check_the_default_tuned_compile(directory):
    """``smi quantize``'s default compiles twice, the second time with GEMM kernels tuned for batch 1
    (a minute or two of C++ builds; the suite's other real one is the own-model chain's). The tuned compile
    ships only where it timed faster, which depends on the CPU and its load; when it ships, it agrees with
    oneDNN's."""
    compiled = json.loads((directory / CARD_FILE).read_text())["compiled"]
    assert compiled["tuned_for_batch"] == 1
    if compiled["latency_up_to_batch"]:
        teacher = load_teacher("digits-vit")
        images = real_digits(teacher)
        path = directory / compiled["file"]
        with torch.no_grad():
            onednn, tuned = CompiledPackage(path)(images), CompiledPackage(path, latency_up_to_batch=64)(images)
        assert (onednn.argmax(1) == tuned.argmax(1)).float().mean() >= 0.98 and sqnr_db(tuned, onednn) > 30
