"""The README's commands, run as written (with its small sizes), and the CLI's error messages."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


@pytest.mark.slow
def test_readme_python_tour_runs(tmp_path):
    code = "\n".join(block for block in _readme_blocks("python") if "pretrained=True" not in block)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "outputs/readme/grid.png").is_file() and (tmp_path / "outputs/readme/kd/learning_curve.png").is_file()


@pytest.mark.slow
def test_readme_commands_run(tmp_path):
    commands = [line for block in _readme_blocks("bash") for line in block.replace("\\\n", " ").splitlines()
                if line.startswith(".venv/bin/")]
    assert len(commands) >= 5
    bin_dir = Path(sys.executable).parent
    for command in commands:
        command = command.replace(".venv/bin/", f"{bin_dir}/")
        result = subprocess.run(command, shell=True, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
    assert (tmp_path / "outputs/readme/distill.json").is_file() and (tmp_path / "outputs/readme/bench.json").is_file()


def _smi(*args):
    return subprocess.run([sys.executable, "-m", "smi_plugin.cli", *args], env=ENV, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("args, message", [
    (["invert", "--teacher", "nope", "--num-images", "2", "--out", "x"], "unknown teacher 'nope'"),
    (["invert", "--teacher", "digits-vit", "--out", "x"], "--num-images"),
    (["invert", "--teacher", "digits-vit", "--num-images", "2", "--schedule", "50-0.3", "--out", "x"], "ITERATION:RATIO"),
    (["invert", "--teacher", "digits-vit", "--labels", "0,12", "--out", "x"], "outside"),
    (["invert", "--teacher", "digits-vit", "--num-images", "2", "--config", "missing.yaml", "--out", "x"], "not found"),
    (["distill", "--teacher", "digits-vit"], "pretrained backbone"),
])
def test_cli_errors_say_what_to_do(tmp_path, args, message):
    result = _smi(*[str(tmp_path / a) if a in ("x",) else a for a in args])
    assert result.returncode != 0 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_config_file_keys_mirror_the_dataclass(tmp_path):
    (tmp_path / "run.yaml").write_text("iterations: 5\nlearning_rate: 0.1\n")
    result = _smi("invert", "--teacher", "digits-vit", "--num-images", "2", "--config", str(tmp_path / "run.yaml"),
                  "--out", str(tmp_path / "o"))
    assert result.returncode != 0 and "unknown InversionConfig keys ['learning_rate']" in result.stderr


def test_help_explains_every_command():
    for command in ("invert", "quantize", "distill", "bench", "train-teacher"):
        result = _smi(command, "--help")
        assert result.returncode == 0 and "usage: smi" in result.stdout
