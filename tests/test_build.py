"""The build and the one GPU command, on a machine without a GPU: setup.py refuses a CUDA torch with no
CUDA compiler and finds the CUDA toolkit behind a wrapper nvcc, vitfast._C says whether its CUDA kernels are
compiled in, and `make gpu` (tools/gpu.py) stops after the build without CUDA, reports each step, keeps to its
six files, and its pytest plugin stops starting tests at the deadline and reports every test."""

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f"vitfast_tools_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_tool = _load_tool("gpu")

# setup.py run as `setup.py --version` with torch made to look like a CUDA build and CUDA_HOME unset.
_SETUP_WITH_CUDA_TORCH_NO_NVCC = """
import runpy, sys, torch, torch.utils.cpp_extension as ce
torch.version.cuda, ce.CUDA_HOME = "13.0", None
sys.argv = ["setup.py", "--version"]
runpy.run_path("setup.py", run_name="__main__")
"""


def _setup(env_extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITFAST_")}
    return subprocess.run([sys.executable, "-c", _SETUP_WITH_CUDA_TORCH_NO_NVCC], cwd=ROOT, capture_output=True,
                          text=True, env={**env, **env_extra}, timeout=120)


def test_setup_refuses_cuda_torch_without_a_cuda_compiler():
    proc = _setup({})
    assert proc.returncode != 0
    assert "built with CUDA 13.0, but no CUDA compiler was found" in proc.stderr
    assert "VITFAST_NO_CUDA=1" in proc.stderr
    proc = _setup({"VITFAST_NO_CUDA": "1"})           # the CPU-only extension, asked for
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "0.1.0"


def _setup_function(name):
    """A function of setup.py, without running setup() (it builds nothing when called)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    body = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
            or (isinstance(n, ast.FunctionDef) and n.name == name)]
    namespace = {}
    exec(compile(ast.Module(body=body, type_ignores=[]), "setup.py", "exec"), namespace)
    return namespace[name]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc on PATH")
def test_setup_finds_the_cuda_toolkit_behind_a_wrapper_nvcc(tmp_path, monkeypatch):
    """`nvcc` on PATH as a wrapper script outside the toolkit (as /usr/local/bin/nvcc running
    /usr/local/cuda-13.0/bin/nvcc is): torch alone takes the folder above the wrapper as CUDA_HOME, which has no
    cuda_runtime_api.h, and the host compiler's part of the CUDA build failed. setup.py sets CUDA_HOME to the
    toolkit nvcc reports; torch's own guess stands where it holds the headers, and a CUDA_HOME set is kept."""
    find = _setup_function("_cuda_home_behind_nvcc")
    nvcc = shutil.which("nvcc")
    (tmp_path / "bin").mkdir()
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec "{nvcc}" "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    home = Path(find())
    assert (home / "include" / "cuda_runtime_api.h").is_file() and (home / "bin" / "nvcc").is_file()
    (tmp_path / "include").mkdir()                                    # the wrapper's folder looks like a toolkit
    (tmp_path / "include" / "cuda_runtime_api.h").write_text("")
    assert find() is None
    monkeypatch.setenv("CUDA_HOME", str(home))
    assert find() is None


def test_extension_says_whether_its_cuda_kernels_are_compiled_in():
    from vitfast import _C
    if torch.version.cuda is None:
        assert _C.WITH_CUDA == 0
    else:
        assert _C.WITH_CUDA in (0, 1)


@pytest.mark.gpu
def test_extension_has_its_cuda_kernels_on_a_gpu_machine():
    from vitfast import _C
    assert _C.WITH_CUDA == 1


# --------------------------------------------------------------------------------------------
# tools/gpu.py
# --------------------------------------------------------------------------------------------
def test_gpu_run_stops_after_the_build_without_cuda(tmp_path, monkeypatch, capsys):
    """What `unshare -n make gpu` does on a CPU machine, with the build step stubbed (a real build here
    would replace the extension other tests have loaded)."""
    built = []
    monkeypatch.setattr(gpu_tool, "build", lambda run, env: built.append(env) or run.step("build", "ok", 0.0))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "results"
    assert gpu_tool.main(["--out", str(out)]) == gpu_tool.NO_CUDA
    assert built and built[0]["cuda_available"] is False and built[0]["torch"] == torch.__version__
    result = json.loads((out / "results.json").read_text())
    assert [(s["step"], s["status"]) for s in result["steps"]] == [("modules", "ok"), ("build", "ok"),
                                                                   ("gpu", "skipped")]
    assert "CUDA is not available" in result["steps"][-1]["detail"]
    assert sorted(p.name for p in out.iterdir()) == ["gpu.log", "results.json", "results.md"]
    text = capsys.readouterr().out
    assert "gpu       skipped" in text and "smoke, tests and bench need an NVIDIA GPU" in text
    assert "| build | ok |" in (out / "results.md").read_text()


def test_gpu_run_names_missing_required_modules(tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_tool.REQUIRED, "vitfast_no_such_module", "no-such-package")
    assert gpu_tool.main(["--out", str(tmp_path)]) == 2
    step = json.loads((tmp_path / "results.json").read_text())["steps"][0]
    assert step["step"] == "modules" and step["status"] == "failed"
    assert "lacks required modules: no-such-package" in step["detail"]


def test_results_markdown_holds_every_step_and_section():
    result = {"environment": {"gpu": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0"},
              "steps": [{"step": "smoke", "status": "failed", "seconds": 41.2, "detail": "not passing: attention"}],
              "smoke": [{"op": "attention", "shape": "[8,12,197,64]", "rel_err": 3.1e-2, "eager_err": 4e-3,
                         "bound": 1.6e-2, "first_ms": 812.0, "ms": 0.2, "status": "FAIL", "error": None},
                        {"op": "linear qkv", "shape": "[8,197,768]", "status": "ERROR", "error": "RuntimeError: x"}],
              "tests": {"passed": 3, "failed": 1, "error": 0, "skipped": 2, "not run": 5,
                        "failures": ["tests/test_linear.py::test_x[1]"]},
              "bench": {"markdown": "# title\n\n## End to end\n\n| a |\n", "records": [], "attention_exponent": None}}
    md = gpu_tool.markdown(result)
    assert "| smoke | failed | 41 | not passing: attention |" in md
    assert "| attention | [8,12,197,64] | 3.10e-02 | 4.00e-03 | 1.6e-02 | 812.0 | 0.20 | FAIL |" in md
    assert "| linear qkv | [8,197,768] | RuntimeError: x | | | | | ERROR |" in md
    assert "3 passed, 1 failed, 0 error, 2 skipped, 5 not run" in md
    assert "- failed: `tests/test_linear.py::test_x[1]`" in md
    assert "### End to end" in md and "# title" not in md


def test_bench_models_runs_each_name_and_merges_its_results(tmp_path, monkeypatch):
    """`make gpu GPU_ARGS="--steps bench --bench-models A,B"`: one `vitfast bench --model` per name (stubbed
    here: it writes what the bench writes), the records tagged with their model, one step."""
    calls = []

    def fake_run(self, cmd, seconds):
        calls.append(cmd)
        name, out = cmd[cmd.index("--model") + 1], Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True)
        records = [{"kind": "model", "backend": b, "ms": 2.0, "error": None, "patch_size": 14, "tokens": 257,
                    "batch": 256, "images_per_s": 1000.0 * (i + 1)} for i, b in enumerate(["timm", "vitfast"])]
        (out / "results.json").write_text(json.dumps({"environment": {"gpu": "G"}, "records": records}))
        (out / "results.md").write_text(f"# vitfast bench: {name} (dim 768)\n\n## End to end\n\n| a |\n")
        return 0, ""

    monkeypatch.setattr(gpu_tool.Run, "run", fake_run)
    run = gpu_tool.Run(tmp_path, budget=300, bench_seconds=200)
    args = gpu_tool.argparse.Namespace(bench_models="vit_base_patch14_dinov2, vit_base_patch16_siglip_224",
                                       compile_mode="reduce-overhead", bench_args=[])
    assert gpu_tool.bench(run, args)
    assert [c[c.index("--model") + 1] for c in calls] == ["vit_base_patch14_dinov2", "vit_base_patch16_siglip_224"]
    assert all("--no-kernels" in c and "--model-size" not in c for c in calls)
    bench = run.result["bench"]
    assert bench["models"] == ["vit_base_patch14_dinov2", "vit_base_patch16_siglip_224"]
    assert [r["model"] for r in bench["records"]] == [*["vit_base_patch14_dinov2"] * 2,
                                                      *["vit_base_patch16_siglip_224"] * 2]
    assert run.result["steps"][-1]["status"] == "ok" and "4 measured, 0 failed" in run.result["steps"][-1]["detail"]
    md = gpu_tool.markdown({**run.result, "environment": {"gpu": "G"}})
    assert "### vitfast bench: vit_base_patch14_dinov2" in md and "### vitfast bench: vit_base_patch16_siglip_224" in md
    assert "vit_base_patch16_siglip_224 P14 257 tokens batch 256 vitfast" in gpu_tool.summary(run.result)


def test_decode_step_runs_the_decode_benchmark_and_reports_it(tmp_path, monkeypatch):
    """`--steps decode`: benchmarks/bench_decode.py (run for real, on this machine's CPU, with few images),
    its results and table in results.json / results.md."""
    def small_run(self, cmd, seconds, env=None):
        assert cmd[1] == "benchmarks/bench_decode.py"
        rc = subprocess.run([*cmd, "--images", "3", "--big-images", "1"], cwd=gpu_tool.ROOT, capture_output=True,
                            text=True, timeout=300)
        return rc.returncode, rc.stdout + rc.stderr

    monkeypatch.setattr(gpu_tool.Run, "run", small_run)
    run = gpu_tool.Run(tmp_path, budget=300, bench_seconds=200)
    assert gpu_tool.decode(run)
    sets = run.result["decode"]["sets"]
    assert sets["imagenet"]["pixels"] == {"mean_abs": 0.0, "p99": 0.0, "max": 0.0}    # too small: exact pixels
    assert 0 < sets["12mp"]["pixels"]["mean_abs"] <= 1.0 and sets["12mp"]["fast"]["images_per_s"] > 0
    assert "12mp fast/exact" in run.result["steps"][-1]["detail"]
    md = gpu_tool.markdown({**run.result, "environment": {"gpu": "G"}})
    assert "## Batch inference by stage" in md and "| 12mp 4000x3000 | fast |" in md


def test_train_step_runs_the_training_benchmark_and_reports_it(tmp_path, monkeypatch):
    """`--steps train`: benchmarks/bench_train.py (run for real on this machine's CPU: a dry run with a
    ViT-Ti, one step per backend), its table in results.md."""
    def small_run(self, cmd, seconds, env=None):
        assert cmd[1] == "benchmarks/bench_train.py"
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # the CPU path, no interpreter
        rc = subprocess.run([*cmd, "--steps", "1"], cwd=gpu_tool.ROOT, capture_output=True, text=True, timeout=300,
                            env=env)
        return rc.returncode, rc.stdout + rc.stderr

    monkeypatch.setattr(gpu_tool.Run, "run", small_run)
    run = gpu_tool.Run(tmp_path, budget=300, bench_seconds=200)
    assert gpu_tool.train(run)
    steps = run.result["train"]["steps"]
    assert set(steps) == {"torch", "vitfast"} and all(v["ms"] > 0 and v["error"] is None for v in steps.values())
    assert "vitfast" in run.result["steps"][-1]["detail"]
    md = gpu_tool.markdown({**run.result, "environment": {"gpu": "G"}})
    assert "## Training step" in md and "| vitfast |" in md


def test_towers_step_runs_the_towers_benchmark_and_reports_it(tmp_path, monkeypatch):
    """`--steps towers`: benchmarks/bench_towers.py (run for real on this machine's CPU: each tower at a small
    config, HF and vitfast), its table in results.md."""
    pytest.importorskip("transformers")

    def small_run(self, cmd, seconds, env=None):
        assert cmd[1] == "benchmarks/bench_towers.py" and "--time-budget" in cmd
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # the CPU path, no interpreter
        rc = subprocess.run(cmd, cwd=gpu_tool.ROOT, capture_output=True, text=True, timeout=300, env=env)
        return rc.returncode, rc.stdout + rc.stderr

    monkeypatch.setattr(gpu_tool.Run, "run", small_run)
    run = gpu_tool.Run(tmp_path, budget=300, bench_seconds=200)
    assert gpu_tool.towers(run)
    rows = run.result["towers"]["rows"]
    towers = ("gemma4", "gemma4_e4b", "siglip", "dinov2", "qwen2_5_vl", "mllama", "sam", "sam3", "radio", "vjepa2",
              "blip2", "eomt", "sapiens2", "vitpose", "videomae",
              "yolos", "dpt", "timesformer", "vitdet", "beit", "vivit")
    assert {(r["tower"], r["method"]) for r in rows} == {(t, m) for t in towers for m in ("hf", "vitfast")}
    for r in rows:                     # vitfast within fp32 rounding of HF in fp32, as HF itself in fp32
        assert r["error"] is None and r["ms"] > 0 and r["rel_err"] < 1e-4, r
    assert "gemma4" in run.result["steps"][-1]["detail"]
    md = gpu_tool.markdown({**run.result, "environment": {"gpu": "G"}})
    assert "## VLM vision towers" in md and "| gemma4 | 2 | 36 | vitfast |" in md


def test_gpu_run_refuses_unknown_steps(tmp_path):
    with pytest.raises(SystemExit):
        gpu_tool.main(["--out", str(tmp_path), "--steps", "smoke,nope"])


_PLUGIN_TESTS = textwrap.dedent("""
    import pytest

    def test_passes():
        assert 1 + 1 == 2

    def test_fails():
        assert 1 + 1 == 3, "arithmetic is broken"

    @pytest.mark.skip(reason="not here")
    def test_skipped():
        pass

    def test_last():
        pass
""")


@pytest.mark.parametrize("deadline_passed", [False, True])
def test_pytest_plugin_reports_every_test_and_stops_at_the_deadline(tmp_path, deadline_passed):
    (tmp_path / "test_sample.py").write_text(_PLUGIN_TESTS)
    report = tmp_path / "tests.txt"
    env = {**os.environ, "VITFAST_TEST_REPORT": str(report), "PYTHONPATH": str(ROOT / "tools"),
           "VITFAST_TEST_DEADLINE": str(time.time() + (-1 if deadline_passed else 3600))}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "gpu_pytest", "-p", "no:cacheprovider", "-q",
                           "-p", "no:xdist", str(tmp_path / "test_sample.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    lines = report.read_text().splitlines()
    outcomes = [(ln.split()[0], ln.split()[1].split("::")[1]) for ln in lines]
    if deadline_passed:
        assert proc.returncode == 0, proc.stdout[-2000:]     # nothing ran, nothing failed
        assert outcomes == [("NOT-RUN", t) for t in ("test_passes", "test_fails", "test_skipped", "test_last")]
    else:
        assert proc.returncode == 1
        assert outcomes == [("PASSED", "test_passes"), ("FAILED", "test_fails"), ("SKIPPED", "test_skipped"),
                            ("PASSED", "test_last")]
        assert "arithmetic is broken" in lines[1]
    counts = gpu_tool.read_test_report(report)
    assert (counts["passed"], counts["failed"], counts["skipped"], counts["not run"]) == (
        (0, 0, 0, 4) if deadline_passed else (2, 1, 1, 0))
    assert counts["failures"] == ([] if deadline_passed else ["test_sample.py::test_fails"])


def test_host_step_runs_the_host_benchmark_and_reports_it(tmp_path, monkeypatch):
    """`--steps host`: benchmarks/bench_host.py (run for real on this machine's CPU: a ViT-Ti, ops computed
    synchronously), with autotuning cut to one config and rounds of fewer calls (--quick); its rows in
    results.json, its table in results.md."""
    def small_run(self, cmd, seconds, env=None):
        assert cmd[1] == "benchmarks/bench_host.py" and env == {"VITFAST_AUTOTUNE": "quick"}
        full = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}    # the CPU path, no interpreter
        rc = subprocess.run([*cmd, "--quick"], cwd=gpu_tool.ROOT, capture_output=True, text=True, timeout=300,
                            env={**full, **env})                               # rounds of fewer calls
        return rc.returncode, rc.stdout + rc.stderr

    monkeypatch.setattr(gpu_tool.Run, "run", small_run)
    run = gpu_tool.Run(tmp_path, budget=300, bench_seconds=200)
    assert gpu_tool.host(run)
    rows = {r["what"]: r for r in run.result["host"]["rows"]}
    assert {"forward, eager", "forward, graphs", "launcher linear (+ residual)", "steady linear (+ residual)",
            "launcher attention_qkv", "steady attention_qkv", "launcher patch_embed"} <= set(rows)
    assert all(r["vitfast"] > 0 for r in rows.values()) and rows["forward, eager"]["unit"] == "ms"
    assert rows["launcher linear (+ residual)"]["unit"] == rows["steady linear (+ residual)"]["unit"] == "µs"
    # without CUDA: the steady ops and a forward with Triton's real JIT function, compiled and not run
    assert {"direct linear (+ residual)", "jit linear (+ residual)", "direct patch_embed",
            "forward, Triton path, compiled, nothing run"} <= set(rows)
    assert rows["direct linear (+ residual)"]["unit"] == "µs"
    assert rows["forward, Triton path, compiled, nothing run"]["unit"] == "ms"
    assert "forward, eager" in run.result["steps"][-1]["detail"]
    md = gpu_tool.markdown({**run.result, "environment": {"gpu": "G"}})
    assert "## Host cost" in md and "| launcher patch_embed |" in md
