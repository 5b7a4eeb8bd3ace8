"""The deployable int8 model: smi quantize --out, model.pt2 + card.json, load_quantized.

Compiles are the cost here (tens of seconds each on a small CPU): the module fixtures compile the
digits teacher's program a few times only, and identical graphs hit inductor's cache.
"""

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import real_digits

from smi_plugin import load_quantized as root_load_quantized
from smi_plugin import load_teacher
from smi_plugin.calibration import SparseInvertedCalibrationDataset
from smi_plugin.cli import main
from smi_plugin.integrations.deploy import (CARD_FILE, FORMAT, MODEL_FILE, PACKAGE_FILE, CompiledPackage,
                                            FrozenCompiled, QuantizedModelError, attention_in_bfloat16,
                                            bfloat16_attention, check_deployable, compile_package, compile_quantized,
                                            cpu_target, export_quantized, load_quantized, measure_latency_crossover,
                                            save_quantized, write_program)
from smi_plugin.evaluation import sqnr_db
from smi_plugin.integrations.torchao import InvertedPTQConfig, quantize_with_inverted_data
from smi_plugin.integrations.trust import TRUST_STORE_ENV, file_sha256

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.slow(seconds=4)]  # each, with the fixtures' compiles
EVAL_IMAGES = 200


@pytest.fixture(scope="module", autouse=True)
def trust_store(tmp_path_factory):
    """This module's packages are recorded in a trust store of its own (inherited by the subprocesses)."""
    with pytest.MonkeyPatch.context() as patch:
        path = tmp_path_factory.mktemp("trust") / "trusted_packages.json"
        patch.setenv(TRUST_STORE_ENV, str(path))
        yield path


@pytest.fixture(scope="module")
def teacher():
    return load_teacher("digits-vit")


@pytest.fixture(scope="module")
def cli_output(tmp_path_factory):
    """One run of ``smi quantize --out`` (sparse inversion, 16 calibration images), oneDNN's compile alone:
    the default's second, GEMM-tuned compile (a minute or two of C++ builds) runs in the README's test."""
    out = tmp_path_factory.mktemp("quantize") / "model"
    main(["quantize", "--teacher", "digits-vit", "--iterations", "20", "--tie-channels", "--num-calibration", "16",
          "--eval-images", str(EVAL_IMAGES), "--tune-for-batch", "0", "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def in_memory(teacher, tmp_path_factory):
    """An in-memory quantized program, its compiled module, and the same program saved to disk."""
    data = SparseInvertedCalibrationDataset.gaussian(teacher, 16)
    program = export_quantized(quantize_with_inverted_data(teacher, data, "w8a8"))
    directory = tmp_path_factory.mktemp("saved") / "model"
    save_quantized(program, directory, {"scheme": "w8a8", "teacher": "digits-vit"})
    return program, compile_quantized(program), directory


@pytest.fixture(scope="module")
def real_images(teacher):
    return real_digits(teacher)


def test_the_card_describes_the_model(cli_output):
    card = json.loads((cli_output / CARD_FILE).read_text())
    assert card["format"] == FORMAT and card["scheme"] == "w8a8" and card["backend"] == "pt2e"
    assert card["teacher"] == "digits-vit" and card["coverage"] == "linear" and card["range_estimator"] == "minmax"
    assert card["unquantized_precision"] == InvertedPTQConfig().resolved_unquantized_precision
    assert card["calibration"]["source"] == "sparse-inverted" and card["calibration"]["images"] == 16
    assert card["calibration"]["seed"] == 0 and card["calibration"]["inversion"]["iterations"] == 20
    assert card["calibration"]["kept_fraction"] < 0.5
    assert card["evaluation"] == {"dataset": "digits", "split": "test", "images": EVAL_IMAGES, "batch_size": 500,
                                  "compile_and_eval_seconds": card["evaluation"]["compile_and_eval_seconds"]}
    assert 0.9 <= card["fp32_accuracy"] <= 1 and card["quantized_accuracy"] >= card["fp32_accuracy"] - 0.03
    assert card["agreement"] >= 0.97 and card["sqnr_db"] > 20
    assert card["latency"]["seconds_per_batch"] > 0 and card["latency"]["fp32_compiled_seconds_per_batch"] > 0
    assert card["latency"]["speedup_vs_fp32_compiled"] > 0
    assert card["versions"]["torch"] == torch.__version__ and card["versions"]["torchao"]
    assert card["files"][MODEL_FILE] == (cli_output / MODEL_FILE).stat().st_size
    assert card["files"][PACKAGE_FILE] == (cli_output / PACKAGE_FILE).stat().st_size
    assert card["compiled"] == {"file": PACKAGE_FILE, "cpu_target": cpu_target(), "tuned_for_batch": 0,
                                "latency_up_to_batch": 0, "sha256": file_sha256(cli_output / PACKAGE_FILE)}
    assert sorted(p.name for p in cli_output.iterdir()) == [CARD_FILE, PACKAGE_FILE, MODEL_FILE]  # no temp files


def test_a_fresh_process_reproduces_the_card_accuracy(cli_output):
    script = f"""
import json, torch
from smi_plugin import load_quantized, load_teacher
from smi_plugin.data import load_split
from smi_plugin.evaluation import predict_logits, top1_accuracy
from smi_plugin.images import model_normalization
card = json.load(open({str(cli_output / CARD_FILE)!r}))
mean, std = model_normalization(load_teacher(card["teacher"]))
evaluation = card["evaluation"]  # names the real images it was measured on: the split's first N
split = load_split(evaluation["dataset"], evaluation["split"]).first(evaluation["images"])
model = load_quantized({str(cli_output)!r})
logits = predict_logits(model, split, mean, std, batch_size=card["evaluation"]["batch_size"])
print("ACCURACY", repr(top1_accuracy(logits, split.labels)), repr(card["quantized_accuracy"]), type(model).__name__)
"""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = [ln for ln in result.stdout.splitlines() if ln.startswith("ACCURACY")][0]
    _, reproduced, recorded, kind = line.split()
    assert reproduced == recorded and kind == "CompiledPackage"  # the package itself: no compile on load


@pytest.mark.slow(seconds=90)
def test_a_tuned_bfloat16_matmul_attention_package_runs_every_batch_size_from_a_cold_cache(in_memory, real_images,
                                                                                            tmp_path):
    """On a fresh machine (inductor's caches empty) autotuning inductor's C++ bmm template once froze the
    attention's first bmm at the example's batch size: the package then failed at any other batch."""
    _, _, directory = in_memory
    torch.save(real_images[:5], tmp_path / "images.pt")
    script = f"""
import torch
from smi_plugin.integrations.deploy import register_x86_lowering, compile_package
from smi_plugin.evaluation import sqnr_db
register_x86_lowering()
program = torch.export.load({str(directory / MODEL_FILE)!r})
package = compile_package(program, unquantized_precision="bfloat16-matmul-attention", tune_for_batch=1)
for batch in (1, 3, 5):
    images = torch.load({str(tmp_path / "images.pt")!r})[:batch]
    with torch.no_grad():
        print("SQNR", batch, sqnr_db(program.module()(images), package(images)))
"""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    sqnrs = [float(line.split()[2]) for line in result.stdout.splitlines() if line.startswith("SQNR")]
    assert len(sqnrs) == 3 and min(sqnrs) > 25  # both compiles, at batch sizes other than the example's


def test_a_package_for_another_cpu_is_compiled_here_instead(cli_output, tmp_path, caplog, real_images):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(cli_output, elsewhere)
    card = json.loads((elsewhere / CARD_FILE).read_text())
    card["compiled"]["cpu_target"] = "neon"
    (elsewhere / CARD_FILE).write_text(json.dumps(card))
    with caplog.at_level("INFO"):
        fallback = load_quantized(elsewhere)
    assert isinstance(fallback, FrozenCompiled) and "compiled for a CPU with neon" in caplog.text
    package = load_quantized(cli_output)
    assert isinstance(package, CompiledPackage)
    # the package, whichever batch sizes it runs, agrees with the just-in-time compile
    with torch.no_grad():
        jit = fallback(real_images)
        for aot in (package(real_images), torch.cat([package(real_images[:1]), package(real_images[1:])])):
            assert (jit.argmax(1) == aot.argmax(1)).float().mean() >= 0.98 and sqnr_db(aot, jit) > 30


def test_only_a_package_this_user_built_or_the_caller_trusts_is_run(cli_output, trust_store, tmp_path, caplog,
                                                                     real_images):
    """compiled.pt2 is native code: a folder from elsewhere (its hash not in this user's store) compiles
    model.pt2 here unless the caller vouches for it, and a package changed since it was built never runs."""
    built = load_quantized(cli_output)
    assert isinstance(built, CompiledPackage) and built.loaded_from == "compiled.pt2 (built by this user here)"
    store = trust_store.read_text()
    moved = tmp_path / "moved"
    shutil.copytree(cli_output, moved)  # the same bytes elsewhere: still this user's build
    assert isinstance(load_quantized(moved), CompiledPackage)
    try:
        trust_store.unlink()  # another machine, or another user: nothing recorded
        with caplog.at_level("INFO"):
            foreign = load_quantized(cli_output)
        assert isinstance(foreign, FrozenCompiled) and foreign.loaded_from.startswith("model.pt2, compiled here")
        assert "did not build" in caplog.text and "trust_compiled=True" in caplog.text
        vouched = load_quantized(cli_output, trust_compiled=True)
        assert isinstance(vouched, CompiledPackage) and vouched.loaded_from == "compiled.pt2 (trusted by the caller)"
    finally:
        trust_store.write_text(store)
        trust_store.chmod(0o600)
    with zipfile.ZipFile(moved / PACKAGE_FILE, "a") as package:  # still a valid zip, other bytes
        package.writestr("extra.txt", "changed")
    caplog.clear()
    with caplog.at_level("INFO"):
        tampered = load_quantized(moved)
    assert isinstance(tampered, FrozenCompiled) and "did not build" in caplog.text
    with torch.no_grad():
        assert (tampered(real_images[:8]).argmax(1) == built(real_images[:8]).argmax(1)).float().mean() >= 0.875


def test_a_package_not_built_in_this_process_is_not_recorded_when_saved(in_memory, cli_output, trust_store,
                                                                        tmp_path):
    program, _, _ = in_memory
    store = json.loads(trust_store.read_text())
    assert trust_store.stat().st_mode & 0o777 == 0o600  # only this user may add to it
    (entry,) = [e for e in store["packages"].values() if e["saved_to"] == str((cli_output / PACKAGE_FILE).resolve())]
    copied = CompiledPackage(cli_output / PACKAGE_FILE, cpu_target())  # loaded from a folder, not built here
    save_quantized(program, tmp_path / "resaved", {"scheme": "w8a8"}, copied)
    assert json.loads(trust_store.read_text()) == store  # it was already trusted, by its hash; nothing added
    (tmp_path / "resaved" / PACKAGE_FILE).write_bytes(b"not a package")
    assert isinstance(load_quantized(tmp_path / "resaved"), FrozenCompiled)


def test_a_card_with_a_precision_this_version_does_not_run_is_refused_in_one_line(cli_output, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(cli_output, elsewhere)
    card = json.loads((elsewhere / CARD_FILE).read_text())
    # the name an earlier version gave float32 with only the attention's matmuls in bfloat16
    card["unquantized_precision"], card["compiled"]["cpu_target"] = "bfloat16-attention", "neon"
    (elsewhere / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(QuantizedModelError, match="'bfloat16-attention'.*re-run 'smi quantize'"):
        load_quantized(elsewhere)


def test_a_package_takes_any_batch_size_and_matches_the_just_in_time_compile(in_memory, real_images):
    program, just_in_time, _ = in_memory
    package = compile_package(program)  # float32 unquantized ops, like the fixture's compile
    path = package.path
    assert path.exists() and package.cpu_target == cpu_target()
    with torch.no_grad():
        whole, reference = package(real_images), just_in_time(real_images)
        parts = torch.cat([package(real_images[:1]), package(real_images[1:4]), package(real_images[4:])])
    assert whole.shape == reference.shape and whole.dtype == torch.float32
    assert sqnr_db(reference, whole) > 40 and torch.equal(whole.argmax(1), reference.argmax(1))
    assert sqnr_db(whole, parts) > 40  # per-image results do not depend on the batch around them
    del package
    assert not path.exists()  # an unsaved package lives in a temporary directory removed with it


def test_loaded_model_equals_the_in_memory_one_bit_for_bit(in_memory, real_images):
    program, compiled, directory = in_memory
    with torch.no_grad():
        eager_loaded = load_quantized(directory, compile=False)(real_images)
        assert torch.equal(eager_loaded, program.module()(real_images))
        fast = root_load_quantized(directory)
        assert torch.equal(fast(real_images), compiled(real_images))
        # the compiled int8 kernels stay close to the eager q/dq simulation
        assert torch.nn.functional.cosine_similarity(fast(real_images), eager_loaded).min() > 0.99


@pytest.mark.parametrize("precision", ["bfloat16", "bfloat16-matmul-attention"])
def test_bfloat16_unquantized_ops_track_float32(in_memory, real_images, precision):
    program, float32_ops, _ = in_memory
    mixed = compile_quantized(program, precision)
    with torch.no_grad():
        reference, out = float32_ops(real_images), mixed(real_images)
    assert out.dtype == torch.float32
    assert not torch.equal(out, reference)  # the unquantized ops did run in bfloat16
    assert sqnr_db(reference, out) > 25
    assert (out.argmax(1) == reference.argmax(1)).float().mean() >= 0.95
    with pytest.raises(ValueError, match="unquantized_precision"):
        compile_quantized(program, "float16")


def test_bfloat16_attention_is_softmax_attention_in_bfloat16():
    query, key, value = torch.randn(3, 2, 4, 17, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    for scale in (None, 0.3):
        expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=scale)
        out = bfloat16_attention(query, key, value, scale=scale)
        assert out.dtype == torch.float32 and not torch.equal(out, expected)
        # by hand: the weights sum to one, so an output is off by at most bfloat16's rounding of the values
        assert (out - expected).abs().max() < 2 ** -7 * value.abs().max() * 4


class _TwoAttentions(torch.nn.Module):
    def forward(self, x, mask):
        sdpa = torch.nn.functional.scaled_dot_product_attention
        return sdpa(x, x, x) + sdpa(x, x, x, attn_mask=mask)


def test_only_unmasked_attention_is_rewritten():
    x, mask = torch.randn(2, 3, 5, 8), torch.rand(5, 5) > 0.3
    mask[:, 0] = True
    graph = torch.export.export(_TwoAttentions(), (x, mask)).module()
    with torch.no_grad():
        expected = graph(x, mask)
        rewritten = attention_in_bfloat16(graph)
        calls = [node.target for node in rewritten.graph.nodes if node.op == "call_function"]
        assert calls.count(torch.ops.aten.scaled_dot_product_attention.default) == 1  # the masked one stays
        assert calls.count(bfloat16_attention) == 1
        out = rewritten(x, mask)
    assert not torch.equal(out, expected) and torch.allclose(out, expected, atol=0.05)
    with pytest.raises(ValueError, match="exported program"):
        compile_quantized(_TwoAttentions(), "bfloat16-matmul-attention")


def test_auto_unquantized_precision_follows_the_cpu(monkeypatch):
    import smi_plugin.integrations.torchao as torchao_adapter

    for amx, native, expected in ((True, True, "bfloat16"), (False, True, "bfloat16-matmul-attention"),
                                  (False, False, "float32")):
        monkeypatch.setattr(torchao_adapter, "amx", lambda amx=amx: amx)
        monkeypatch.setattr(torchao_adapter, "native_bfloat16", lambda native=native: native)
        assert InvertedPTQConfig().resolved_unquantized_precision == expected
        assert InvertedPTQConfig(unquantized_precision="float32").resolved_unquantized_precision == "float32"
    with pytest.raises(ValueError, match="unquantized_precision"):
        InvertedPTQConfig(unquantized_precision="float16")


def test_the_same_program_saves_to_the_same_bytes(in_memory, tmp_path):
    program, _, directory = in_memory
    write_program(program, tmp_path / MODEL_FILE)
    assert (tmp_path / MODEL_FILE).read_bytes() == (directory / MODEL_FILE).read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == [MODEL_FILE]  # the uncompressed intermediate is gone


def test_the_int8_file_holds_no_fp32_weights(in_memory, teacher):
    program, _, directory = in_memory
    # Every weight matrix, the patch embedding's included, is stored in int8.
    matrices = {name: t.dtype for name, t in {**program.state_dict, **program.constants}.items() if t.dim() == 2}
    assert matrices and set(matrices.values()) == {torch.int8}, matrices
    fp32_bytes = sum(p.numel() * p.element_size() for p in teacher.state_dict().values())
    with zipfile.ZipFile(directory / MODEL_FILE) as archive:
        weights = sum(i.file_size for i in archive.infolist() if "/data/weights/weight" in i.filename)
        graph = sum(i.compress_size for i in archive.infolist() if "/data/weights/weight" not in i.filename)
    assert weights <= 0.35 * fp32_bytes
    # the rest is the serialized graph, deflated: small next to the weights
    assert graph < 0.1 * weights
    assert (directory / MODEL_FILE).stat().st_size <= 0.35 * fp32_bytes


def test_other_versions_and_foreign_directories_get_one_line_errors(in_memory, tmp_path):
    _, _, directory = in_memory
    moved = tmp_path / "old"
    shutil.copytree(directory, moved)
    card = json.loads((moved / CARD_FILE).read_text())
    card["versions"]["torchao"] = "0.1.0"
    (moved / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(QuantizedModelError, match="torchao 0.1.0") as info:
        load_quantized(moved)
    assert "\n" not in str(info.value)
    with pytest.raises(QuantizedModelError, match="not a saved quantized model"):
        load_quantized(tmp_path)


def test_a_bfloat16_card_loads_in_bfloat16_and_warns_where_the_cpu_emulates_it(in_memory, tmp_path, monkeypatch,
                                                                                  caplog):
    import smi_plugin.integrations.torchao as torchao_adapter

    _, _, directory = in_memory
    mixed = tmp_path / "mixed"
    shutil.copytree(directory, mixed)
    card = json.loads((mixed / CARD_FILE).read_text())
    (mixed / CARD_FILE).write_text(json.dumps({**card, "unquantized_precision": "bfloat16"}))
    monkeypatch.setattr(torchao_adapter, "native_bfloat16", lambda: False)
    with caplog.at_level("WARNING"):
        module = load_quantized(mixed)  # compiles lazily: nothing runs here
    assert module.eager.dtype == torch.bfloat16
    assert "emulates" in caplog.text and "--unquantized-precision float32" in caplog.text
    caplog.clear()
    assert not hasattr(load_quantized(directory).eager, "dtype") and not caplog.text  # float32 card: no autocast


def test_out_that_is_not_ours_is_refused_before_any_work(tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as info:
        main(["quantize", "--teacher", "digits-vit", "--out", str(foreign)])
    error = capsys.readouterr().err.strip()
    assert info.value.code == 2 and "refusing to overwrite" in error and "\n" not in error
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"] and (foreign / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("flags, message", [(["--scheme", "w4a4"], "no int8 kernel"),
                                            (["--coverage", "full"], "coverage 'full'"),
                                            (["--backend", "quantize_"], "in-memory model only")])
def test_settings_that_cannot_be_lowered_fail_before_work(tmp_path, flags, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(["quantize", "--teacher", "digits-vit", "--out", str(tmp_path / "x"), *flags])
    error = capsys.readouterr().err.strip()
    assert info.value.code == 2 and error.startswith("smi: error:") and message in error
    assert not (tmp_path / "x").exists()


def test_check_deployable_accepts_the_lowerable_schemes():
    check_deployable("w8a8")
    check_deployable("w4a8")
    with pytest.raises(ValueError):
        check_deployable("w8a6")


def test_importing_the_adapters_imports_no_toolkit():
    code = ("import sys, smi_plugin, smi_plugin.integrations.torchao, smi_plugin.integrations.deploy, "
            "smi_plugin.integrations.onnxruntime, smi_plugin.integrations.calibration_hooks; "
            "print(sorted(m for m in ('torchao', 'onnxruntime', 'onnx') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).parent)
    assert result.stdout.strip() == "[]", result.stderr[-2000:]


def test_tune_for_batch_adds_a_compile_with_gemm_kernels_timed_at_that_batch(in_memory, monkeypatch, tmp_path):
    import torch._inductor.package

    program, _, _ = in_memory
    calls = []

    def record(graph, args, options):
        calls.append((args[0].shape[0], {k: v for k, v in options.items() if not k.startswith("aot_inductor")}))
        return []

    def stop(path, files):
        raise RuntimeError("recorded")  # before packaging: the (long) compiles were not run

    monkeypatch.setattr(torch._inductor, "aot_compile", record)
    monkeypatch.setattr(torch._inductor.package, "package_aoti", stop)
    for batch in (0, 1, 8):
        with pytest.raises(RuntimeError, match="recorded"):
            compile_package(program, tmp_path / "p.pt2", tune_for_batch=batch)
    tuned = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
    assert calls == [(2, {"freezing": True}), (2, {"freezing": True}), (2, tuned), (8, {"freezing": True}), (8, tuned)]
    with pytest.raises(ValueError, match="tune_for_batch must be in"):
        compile_package(program, tune_for_batch=-1)
    with pytest.raises(ValueError, match="tune_for_batch must be >= 0"):
        InvertedPTQConfig(tune_for_batch=-1)


class _FakeClock:
    """``time.perf_counter`` for runners that take a known time: only they advance it (real sleeps overshoot
    by milliseconds on a loaded machine, which made the crossover test flaky in CI)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _TimedRunner:
    """Stands in for a loaded compile: takes ``fixed + per_image * batch`` seconds of ``clock``, returns ``logits``."""

    def __init__(self, clock: _FakeClock, fixed: float, per_image: float, logits: float) -> None:
        self.clock, self.fixed, self.per_image, self.logits = clock, fixed, per_image, logits

    def __call__(self, images):
        self.clock.now += self.fixed + self.per_image * images.shape[0]
        return torch.full((images.shape[0], 3), self.logits)


def _patch_runners(monkeypatch, default: tuple[float, float, float], latency: tuple[float, float, float]) -> None:
    import torch._inductor.package

    clock = _FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    runners = {"model": _TimedRunner(clock, *default), "latency": _TimedRunner(clock, *latency)}
    monkeypatch.setattr(torch._inductor.package, "load_package", lambda path, name: runners[name])


@pytest.mark.parametrize("latency, expected", [((0.0, 0.0004), 8),    # 3.2 ms < 4 ms at 8, 6.4 ms > 4 ms at 16
                                               ((0.005, 0.0), 0),     # slower even at batch 1
                                               ((0.0, 0.00001), 64)])  # faster up to the largest probe
def test_the_tuned_compile_runs_the_batches_at_which_it_measured_faster(monkeypatch, latency, expected):
    _patch_runners(monkeypatch, (0.004, 0.0, 1.0), (*latency, 1.0))
    assert measure_latency_crossover("p.pt2", (3, 4, 4), largest_batch=64, rounds=2, repeats=2) == expected


def test_a_tuned_compile_that_disagrees_with_onednn_is_left_out(monkeypatch, caplog):
    _patch_runners(monkeypatch, (0.004, 0.0, 1.0), (0.0, 0.0, -1.0))
    with caplog.at_level("WARNING"):
        assert measure_latency_crossover("p.pt2", (3, 4, 4), largest_batch=64) == 0
    assert "disagree with oneDNN's at batch 1" in caplog.text
