"""The package's structure: layers without cycles, adapters in the project's namespace, lazy toolkits."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_layers_hold():
    # The contract in pyproject.toml names every module; function-local imports count too.
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "0 broken" in result.stdout


def test_adapters_install_under_the_project_namespace(tmp_path):
    # From a folder that is not the checkout, only smi_plugin.integrations exists, no top-level "integrations".
    code = ("import importlib.util, json, sys; import smi_plugin.integrations.torchao, smi_plugin.cli; "
            "print(json.dumps({'top_level': importlib.util.find_spec('integrations') is not None, "
            "'toolkits_loaded': sorted(m for m in ('torchao', 'onnxruntime') if m in sys.modules)}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert facts == {"top_level": False, "toolkits_loaded": []}
