"""The documentation: the README as a front page, the site builds with no broken link or reference, the results
pages are what the records give, and no file points outside the repository."""

import os
import re
import subprocess
import sys

import pytest
from conftest import DOC_FILES, NOT_RUN, ROOT, fenced_blocks, load_benchmark

# The public names the API reference documents, each as the anchor mkdocstrings gives it, by page.
API_NAMES = {
    "inversion": ["smi_plugin.SparseInverter", "smi_plugin.InversionConfig", "smi_plugin.StoppingSchedule"],
    "teachers": ["smi_plugin.load_teacher"],
    "calibration": ["smi_plugin.SparseInvertedCalibrationDataset"],
    "quantization": ["smi_plugin.integrations.torchao.quantize_with_inverted_data", "smi_plugin.load_quantized"],
    "distillation": ["smi_plugin.KDTrainer", "smi_plugin.KDTrainer.from_recipe", "smi_plugin.DistillConfig",
                     "smi_plugin.distillation_stream"],
    "selection": ["smi_plugin.selection.SELECTION_POLICIES", "smi_plugin.selection.register_selection_policy"],
    "recipes": ["smi_plugin.recipes", "smi_plugin.recipes.RECIPES"],
}


def test_the_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for command in ("make demo", "make test", "make check", "make docs"):
        assert command in text, command


def test_every_not_run_block_says_why():
    for path in DOC_FILES:
        text = (ROOT / path).read_text()
        reasons = [reason for language in ("bash", "python", "text") for _, reason in fenced_blocks(text, language)
                   if reason is not None]
        assert len(reasons) == text.count(NOT_RUN), f"{path}: a '{NOT_RUN}' comment not right before a code block"
        assert all(reasons), f"{path}: a block marked not run without a reason"


def test_the_results_pages_are_what_the_records_give():
    pages = load_benchmark("results_pages").pages()
    for name, text in pages.items():
        assert (ROOT / "docs/results" / name).read_text() == text, \
            f"docs/results/{name} differs from the records: run python benchmarks/results_pages.py"
    for name in ("inversion-speed.md", "deployable-int8.md", "distillation.md"):
        tables = pages[name].count("\n| ---")
        assert tables and pages[name].count("*Machine: ") == tables and pages[name].count("Date: 20") == tables


def test_no_file_refers_to_a_path_outside_the_repository():
    outside = re.compile(r"\.\./shared|shared/(notes|paper)/")
    skipped = {".venv", ".git", "outputs", "runs", "smi_plugin.egg-info", ".pytest_cache"}
    patterns = ("*.py", "*.md", "*.toml", "*.sh", "*.yml", "Makefile")
    files = [path for pattern in patterns for path in ROOT.rglob(pattern)
             if not skipped & set(path.relative_to(ROOT).parts) and path != ROOT / "tests/test_docs.py"]
    offenders = [f"{path.relative_to(ROOT)}:{number}" for path in files
                 for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if outside.search(line)]
    assert not offenders, offenders


def test_the_site_builds_strict_with_an_api_page_for_each_public_name(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(module)
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for page, names in API_NAMES.items():
        html = (tmp_path / "site/api" / page / "index.html").read_text()
        for name in names:
            assert f'id="{name}"' in html, (page, name)
    assert (tmp_path / "site/results/log/index.html").is_file()
