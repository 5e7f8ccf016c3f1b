"""`make gpu`: the whole GPU check in one command, on the Python at hand, offline, in a time box.

Runs with the interpreter that runs this script (`make gpu` uses `python3` on PATH, or PYTHON=...) and
the packages it already has: no virtual environment is made and nothing is downloaded or installed
except vitfast itself (an editable install, built offline). Steps, each with a deadline; a step that
fails or runs out of time does not stop the later ones:

  modules  the required imports resolve (a missing one is named and the run stops); optional ones listed
  build    `pip install --no-index --no-deps --no-build-isolation -e .` with CUDA for this GPU's
           architecture, then `import vitfast._C` and its CUDA kernels registered.
           Without CUDA the run stops here with status 3: the offline dry run of a CPU machine.
  smoke    `vitfast smoke`: every op once at ViT-B/16 bf16 shapes against the reference
  tests    the `gpu`-marked tests in one process (one GPU), autotuning cut to one config per shape
           (VITFAST_AUTOTUNE=quick); tests not started by the deadline are listed as not run
  bench    ViT-B/16 and ViT-B/8, batch 256, bf16, end to end: timm (eager, SDPA), torch.compile,
           vitfast with its CUDA graphs and without (vitfast-eager); per-op TFLOP/s and GB/s;
           attention alone over N; with --bench-models NAMES instead: each named model (DINOv2, CLIP,
           SigLIP, ...) at its own size, end to end, against timm and torch.compile
  host     (only when --steps names it) `benchmarks/bench_host.py`: host time of one ViT-B/16 bf16 batch-1
           forward (eager and with CUDA graphs) and of one op call, and vitfast's share of each Triton
           launch (the kernel stubbed); autotuning cut to one config per shape
  decode   (only when --steps names it) `benchmarks/bench_decode.py`: CPU decode per core (exact and
           fast paths), nvJPEG decode, and `vitfast predict --profile` on a folder of JPEGs against the
           engine on synthetic uint8 (ViT-B/16 bf16, batch 256)
  train    (only when --steps names it) `benchmarks/bench_train.py`: a ViT-B/16 bf16 training step at
           batch 64 (vitfast, eager torch with SDPA, torch.compile) with peak memory, and the attention
           backward against SDPA's
  towers   (only when --steps names it) `benchmarks/bench_towers.py`: the vision towers of today's VLMs
           (Gemma 4's, SigLIP so400m, DINOv2-L, Qwen2.5-VL's, Llama 3.2 Vision's) from their configs, bf16: HF's eager
           model against `vitfast.optimize` of it, images/s and the error against HF in float32

--steps picks the steps after the build (e.g. `--steps bench --bench-models vit_base_patch14_dinov2,...`
or `--steps host,decode,train` / `--steps towers` for a later call that only measures).

Everything lands in one folder (default gpu-results/), six files at most: gpu.log (all output),
tests.txt (one line per test), results.json, results.md, attention_vs_tokens.png, images_per_s.png.
The run ends with a summary table. Exit status 0 when every step passed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {"torch": "torch", "triton": "triton", "numpy": "numpy", "pytest": "pytest",
            "setuptools": "setuptools", "pip": "pip"}
OPTIONAL = {"xdist": "pytest-xdist", "tqdm": "tqdm", "matplotlib": "matplotlib", "timm": "timm",
            "torchvision": "torchvision", "transformers": "transformers", "safetensors": "safetensors",
            "PIL": "pillow", "ninja": "ninja", "pytest_benchmark": "pytest-benchmark", "ruff": "ruff"}
# Kernels first, the other test files after them: when the time box cuts the tests short, what is left
# out is the slow model-level tail.
FIRST_TEST_FILES = ["test_attention.py", "test_linear.py", "test_patch_embed.py", "test_layer_norm.py",
                    "test_rms_norm.py", "test_model.py", "test_engine.py"]
ATTENTION_TOKENS = "50,197,257,577,785,1025,2305,4097"
PLOTS = ("attention_vs_tokens.png", "images_per_s.png")
NO_CUDA = 3   # exit status of a run that stopped after the build because CUDA is not available


class Run:
    """The output folder, the log, the deadlines and the results of one `make gpu`."""

    def __init__(self, out: Path, budget: float, bench_seconds: float):
        self.out, self.budget, self.bench_seconds = out, budget, bench_seconds
        self.start = time.monotonic()
        self.out.mkdir(parents=True, exist_ok=True)
        for name in ("gpu.log", "tests.txt", "results.json", "results.md", *PLOTS):   # no stale files
            (self.out / name).unlink(missing_ok=True)
        self.log = open(self.out / "gpu.log", "w", buffering=1)
        self.result = {"environment": {}, "steps": [], "smoke": None, "tests": None, "bench": None,
                       "host": None, "decode": None, "train": None, "towers": None}

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def say(self, text: str = "") -> None:
        print(text, flush=True)
        self.log.write(text + "\n")

    def step(self, name: str, status: str, t0: float, detail: str = "") -> bool:
        seconds = round(time.monotonic() - t0, 1)
        self.result["steps"].append({"step": name, "status": status, "seconds": seconds, "detail": detail})
        self.say(f"== {name}: {status} in {seconds:.0f} s{': ' + detail if detail else ''}")
        self.write()
        return status == "ok"

    def run(self, cmd: list[str], seconds: float, env: dict | None = None) -> tuple[int | None, str]:
        """Run cmd in ROOT, its output streamed to the console and the log; killed (its whole process
        group) after `seconds`. Returns (exit status, or None when killed; the output's last 4000 chars)."""
        self.say(f"$ {' '.join(cmd)}    (time box {seconds:.0f} s)")
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
        tail: list[str] = []

        def pump():
            for line in proc.stdout:
                sys.stdout.write(line)
                self.log.write(line)
                tail.append(line)
                del tail[:-200]
        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=max(1.0, seconds))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        reader.join(timeout=10)
        sys.stdout.flush()
        return rc, "".join(tail)[-4000:]

    def write(self) -> None:
        """results.json and results.md as they stand (rewritten after every step)."""
        (self.out / "results.json").write_text(json.dumps(self.result, indent=1, default=str) + "\n")
        (self.out / "results.md").write_text(markdown(self.result))


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------
def check_modules(run: Run) -> bool:
    t0 = time.monotonic()
    missing = [pkg for mod, pkg in REQUIRED.items() if importlib.util.find_spec(mod) is None]
    absent = [pkg for mod, pkg in OPTIONAL.items() if importlib.util.find_spec(mod) is None]
    run.result["environment"]["optional_missing"] = absent
    if absent:
        run.say(f"optional, not installed (the parts that use them are skipped): {', '.join(absent)}")
    if missing:
        return run.step("modules", "failed", t0, f"{sys.executable} lacks required modules: {', '.join(missing)}; "
                                                 "install them into this environment, then run again")
    return run.step("modules", "ok", t0, f"{sys.executable}")


def environment(run: Run) -> dict:
    import torch
    import triton

    env = run.result["environment"]
    env.update(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), python=platform.python_version(),
               executable=sys.executable, torch=torch.__version__, torch_cuda=torch.version.cuda,
               triton=triton.__version__, cuda_available=torch.cuda.is_available(), cpus=os.cpu_count())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   gpu_memory_gib=round(props.total_memory / 2**30, 1))
        env["driver"] = _command_line(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    env["nvcc"] = _command_line(["nvcc", "--version"], last=True)
    return env


def _command_line(cmd: list[str], last: bool = False) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return (lines[-1] if last else lines[0]).strip() if out.returncode == 0 and lines else None


def build(run: Run, env: dict) -> bool:
    t0 = time.monotonic()
    build_env = {"MAX_JOBS": str(os.cpu_count() or 4)}
    if env.get("capability"):
        build_env["VITFAST_CUDA_ARCHS"] = env["capability"].replace(".", "")   # this GPU only: half the build
    rc, tail = run.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", "-e", "."], min(240.0, run.left()), build_env)
    if rc != 0:
        return run.step("build", "timeout" if rc is None else "failed", t0, _last_error(tail))
    rc, tail = run.run([sys.executable, "-c", "import torch, vitfast._C as C; print('WITH_CUDA', C.WITH_CUDA)"], 60)
    if rc != 0:
        return run.step("build", "failed", t0, "vitfast._C does not import: " + _last_error(tail))
    with_cuda = "WITH_CUDA 1" in tail
    if env["torch_cuda"] and not with_cuda:
        return run.step("build", "failed", t0, "vitfast._C was built without its CUDA kernels although torch has CUDA")
    return run.step("build", "ok", t0, "vitfast._C imports" + (", with its CUDA kernels" if with_cuda
                                                               else " (CPU kernels only: torch has no CUDA)"))


def _last_error(tail: str) -> str:
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    hits = [ln for ln in lines if "error" in ln.lower()] or lines
    return hits[-1][:300] if hits else "no output"


def smoke(run: Run) -> bool:
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "smoke.json"
        rc, tail = run.run([sys.executable, "-m", "vitfast", "smoke", "--json", str(path)],
                           min(150.0, max(30.0, run.left() - run.bench_seconds - 60)), {"VITFAST_AUTOTUNE": "quick"})
        rows = json.loads(path.read_text()) if path.is_file() else None
    run.result["smoke"] = rows
    if rc is None:
        return run.step("smoke", "timeout", t0)
    bad = [r["op"] for r in rows or [] if r["status"] != "PASS"]
    if rc != 0 or rows is None:
        return run.step("smoke", "failed", t0, f"not passing: {', '.join(bad)}" if bad else _last_error(tail))
    return run.step("smoke", "ok", t0, f"{len(rows)}/{len(rows)} pass")


def tests(run: Run) -> bool:
    t0 = time.monotonic()
    seconds = max(30.0, run.left() - run.bench_seconds)
    report = run.out / "tests.txt"
    env = {"VITFAST_AUTOTUNE": "quick", "VITFAST_TEST_DEADLINE": str(time.time() + seconds),
           "VITFAST_TEST_REPORT": str(report),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tools"), os.environ.get("PYTHONPATH")]))}
    rest = sorted(p.name for p in (ROOT / "tests").glob("test_*.py") if p.name not in FIRST_TEST_FILES)
    files = [f"tests/{f}" for f in FIRST_TEST_FILES + rest if (ROOT / "tests" / f).is_file()]
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:xdist", "-p", "no:cacheprovider", "-p",
           "gpu_pytest", "-q", "-rfE", "--tb=short", "--durations=15", *files]
    rc, _ = run.run(cmd, seconds + 45, env)                  # the plugin stops starting tests at `seconds`
    counts = read_test_report(report)
    run.result["tests"] = counts
    detail = ", ".join(f"{counts[k]} {k}" for k in ("passed", "failed", "error", "skipped", "not run") if counts[k])
    if rc is None:
        return run.step("tests", "timeout", t0, detail + " (killed in a running test)")
    return run.step("tests", "ok" if rc == 0 and not counts["failed"] and not counts["error"] else "failed",
                    t0, detail or "no test ran")


def read_test_report(path: Path) -> dict:
    """Counts per outcome and the failing test ids from tests.txt (written by tools/gpu_pytest.py)."""
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0, "not run": 0, "failures": []}
    if not path.is_file():
        return counts
    for line in path.read_text().splitlines():
        outcome, _, rest = line.partition(" ")
        key = {"PASSED": "passed", "FAILED": "failed", "ERROR": "error", "SKIPPED": "skipped",
               "NOT-RUN": "not run"}.get(outcome)
        if key:
            counts[key] += 1
            if key in ("failed", "error"):
                counts["failures"].append(rest.split(" ")[0])
    return counts


def bench(run: Run, args) -> bool:
    if args.bench_models:
        return bench_models(run, args)
    t0 = time.monotonic()
    seconds = max(30.0, run.left() - 15)
    with tempfile.TemporaryDirectory() as tmp:
        timm = importlib.util.find_spec("timm") is not None
        cmd = [sys.executable, "-m", "vitfast", "bench", "--model-size", "base", "--batch-size", "256",
               "--dtype", "bf16", "--image-sizes", "224", "--patch-sizes", "16,8",
               "--backends", f"{'timm' if timm else 'torch'},vitfast,vitfast-eager,compile",
               "--compile-mode", args.compile_mode, "--rep-ms", "50", "--attention-tokens", ATTENTION_TOKENS,
               "--time-budget", f"{max(10.0, seconds - 75):.0f}", "--out", tmp, *args.bench_args]
        rc, tail = run.run(cmd, seconds)
        out = Path(tmp)
        result = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else None
        if result is not None:
            result["markdown"] = (out / "results.md").read_text()
        for name in PLOTS:
            if (out / name).is_file():
                shutil.copy(out / name, run.out / name)
    run.result["bench"] = result
    if result is None:
        return run.step("bench", "timeout" if rc is None else "failed", t0, _last_error(tail))
    records = result["records"]
    done = sum(r["ms"] is not None for r in records)
    skipped = sum(str(r["error"]).startswith("skipped") for r in records)
    failed = sum(bool(r["error"]) and not str(r["error"]).startswith("skipped") for r in records)
    detail = f"{done} measured, {failed} failed, {skipped} skipped (time budget)"
    status = "timeout" if rc is None else "ok" if rc == 0 and not failed else "failed"
    return run.step("bench", status, t0, detail)


def bench_models(run: Run, args) -> bool:
    """--bench-models: each named model at its own size, end to end (no per-op timings), batch 256 bf16,
    against timm and torch.compile, the time left shared between them. One merged result: records tagged
    with their model, the markdown of each run in turn; no plots."""
    t0 = time.monotonic()
    names = [n.strip() for n in args.bench_models.split(",") if n.strip()]
    timm = importlib.util.find_spec("timm") is not None
    merged, rcs, markdowns = None, [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(names):
            seconds = max(30.0, (run.left() - 15) / (len(names) - i))
            out = Path(tmp) / name
            eager = "timm" if timm else "torch"
            cmd = [sys.executable, "-m", "vitfast", "bench", "--model", name, "--batch-size", "256", "--dtype",
                   "bf16", "--backends", f"{eager},vitfast,vitfast-eager,compile",
                   "--compile-mode", args.compile_mode, "--rep-ms", "50", "--no-kernels",
                   "--time-budget", f"{max(10.0, seconds - 60):.0f}", "--out", str(out), *args.bench_args]
            rc, tail = run.run(cmd, seconds)
            rcs.append(rc)
            if not (out / "results.json").is_file():
                run.say(f"bench {name}: no results ({_last_error(tail)})")
                continue
            result = json.loads((out / "results.json").read_text())
            for r in result["records"]:
                r["model"] = name
            markdowns.append((out / "results.md").read_text())
            if merged is None:
                merged = dict(result, records=[], models=[])
            merged["records"] += result["records"]
            merged["models"].append(name)
    if merged is not None:
        merged["markdown"] = "# bench\n\n" + "\n".join(
            md.replace("\n## ", "\n### ").replace("# vitfast bench", "## vitfast bench") for md in markdowns)
        merged["attention_exponent"] = None                  # one size per model: nothing to fit
    run.result["bench"] = merged
    if merged is None:
        return run.step("bench", "failed", t0, f"no results for {names}")
    records = merged["records"]
    done = sum(r["ms"] is not None for r in records)
    skipped = sum(str(r["error"]).startswith("skipped") for r in records)
    failed = sum(bool(r["error"]) and not str(r["error"]).startswith("skipped") for r in records)
    missing = len(names) - len(merged["models"])
    detail = f"{', '.join(merged['models'])}: {done} measured, {failed} failed, {skipped} skipped (time budget)"
    status = ("timeout" if None in rcs else "ok" if all(rc == 0 for rc in rcs) and not failed and not missing
              else "failed")
    return run.step("bench", status, t0, detail)


def _json_step(run: Run, name: str, script: str, seconds: float, env: dict | None = None, args: tuple = ()):
    """Run benchmarks/<script> --json into a temporary file within `seconds`: (rc, output tail); the
    parsed JSON (or None) goes to run.result[name]."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{name}.json"
        rc, tail = run.run([sys.executable, f"benchmarks/{script}", "--json", str(out), *args], seconds, env)
        run.result[name] = json.loads(out.read_text()) if out.is_file() else None
    return rc, tail


def host(run: Run, seconds: float | None = None) -> bool:
    """benchmarks/bench_host.py: host time per forward, per op call and per launch (issue: eager forward
    <= 1 ms). Autotuning is cut to one config per shape: host time does not depend on the tile."""
    t0 = time.monotonic()
    rc, tail = _json_step(run, "host", "bench_host.py", seconds or run.left() - 10, {"VITFAST_AUTOTUNE": "quick"})
    result = run.result["host"]
    if result is None:
        return run.step("host", "timeout" if rc is None else "failed", t0, _last_error(tail))
    detail = ", ".join(f"{r['what']} {r['vitfast']:.3g} {r['unit']}" for r in result["rows"]
                       if r["what"].startswith(("forward", "launcher linear", "steady linear")))
    return run.step("host", "ok" if rc == 0 else "failed", t0, detail)


def decode(run: Run, seconds: float | None = None) -> bool:
    """benchmarks/bench_decode.py: the batch-inference pipeline by stage."""
    t0 = time.monotonic()
    rc, tail = _json_step(run, "decode", "bench_decode.py", seconds or run.left() - 10)
    if run.result["decode"] is None:
        return run.step("decode", "timeout" if rc is None else "failed", t0, _last_error(tail))
    pipe = run.result["decode"].get("pipeline") or {}
    detail = ", ".join(f"{k} fast/exact {v['speedup']:.2f}x" for k, v in run.result["decode"]["sets"].items())
    if pipe:
        detail += ", predict " + ", ".join(f"--decode {d} {pipe[d]['images_per_s']} images/s" for d in ("cpu", "gpu"))
    return run.step("decode", "ok" if rc == 0 else "failed", t0, detail)


def train(run: Run, seconds: float | None = None) -> bool:
    """benchmarks/bench_train.py in the time left: a training step per backend, the attention backward."""
    t0 = time.monotonic()
    rc, tail = _json_step(run, "train", "bench_train.py", seconds or run.left() - 10)
    result = run.result["train"]
    if result is None:
        return run.step("train", "timeout" if rc is None else "failed", t0, _last_error(tail))
    steps = result["steps"]
    detail = ", ".join(f"{b} {v['ms']:.1f} ms/step" if v["ms"] is not None else f"{b} failed" for b, v in steps.items())
    ok = rc == 0 and all(v["error"] is None for v in steps.values())
    return run.step("train", "ok" if ok else "failed", t0, detail)


def towers(run: Run) -> bool:
    """benchmarks/bench_towers.py in the time left: each VLM tower on HF and on vitfast. The towers not started
    by 60 s before the deadline are listed as skipped (a tower takes about half a minute)."""
    t0 = time.monotonic()
    seconds = run.left() - 10
    rc, tail = _json_step(run, "towers", "bench_towers.py", seconds, args=("--time-budget", f"{seconds - 60:.0f}"))
    result = run.result["towers"]
    if result is None:
        return run.step("towers", "timeout" if rc is None else "failed", t0, _last_error(tail))
    hf = {r["tower"]: r["ms"] for r in result["rows"] if r["method"] == "hf"}
    detail = ", ".join(f"{r['tower']} {hf[r['tower']] / r['ms']:.2f}x" if r["ms"] and hf.get(r["tower"])
                       else f"{r['tower']} {r['error'] or 'no HF time'}" for r in result["rows"]
                       if r["method"] == "vitfast")
    return run.step("towers", "ok" if rc == 0 else "failed", t0, detail)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def _fmt(v, spec):
    return "–" if v is None else format(v, spec)


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# make gpu: {env.get('gpu', 'no GPU')}", "",
             f"{env.get('date', '?')} · torch {env.get('torch', '?')} (CUDA {env.get('torch_cuda')}) · "
             f"triton {env.get('triton', '?')} · driver {env.get('driver')} · nvcc {env.get('nvcc')} · "
             f"Python {env.get('python', '?')}", "",
             "| step | status | seconds | detail |", "|---|---|---:|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']:.0f} | {s['detail']} |" for s in result["steps"]]
    if result["smoke"]:
        lines += ["", "## Smoke (each op once vs the float64 reference; model rows vs float32)", "",
                  "| op | shape | rel err | eager rel err | bound | first ms | ms | verdict |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        for r in result["smoke"]:
            if r["status"] == "ERROR":
                lines.append(f"| {r['op']} | {r['shape']} | {r['error']} | | | | | ERROR |")
                continue
            lines.append(f"| {r['op']} | {r['shape']} | {_fmt(r['rel_err'], '.2e')} | {_fmt(r['eager_err'], '.2e')} | "
                         f"{_fmt(r['bound'], '.1e')} | {_fmt(r['first_ms'], '.1f')} | {_fmt(r['ms'], '.2f')} | "
                         f"{r['status']} |")
    t = result["tests"]
    if t:
        lines += ["", "## GPU tests (`pytest -m gpu`, VITFAST_AUTOTUNE=quick; one line per test in tests.txt)", "",
                  ", ".join(f"{t[k]} {k}" for k in ("passed", "failed", "error", "skipped", "not run"))]
        lines += [f"- failed: `{f}`" for f in t["failures"]]
    if result["bench"]:
        body = result["bench"]["markdown"].split("\n", 1)[1] if "\n" in result["bench"]["markdown"] else ""
        lines += ["", "## Benchmark (`vitfast bench`)", body.replace("\n## ", "\n### ")]
    if result.get("host"):
        lines += ["", "## Host cost (`benchmarks/bench_host.py`)", "",
                  result["host"]["markdown"].split("\n", 1)[1].lstrip("\n")]
    if result.get("decode"):
        lines += ["", "## Batch inference by stage (`benchmarks/bench_decode.py`)", "",
                  result["decode"]["markdown"].split("\n", 1)[1].lstrip("\n")]
    if result.get("train"):
        lines += ["", "## Training step (`benchmarks/bench_train.py`)", "", result["train"]["markdown"]]
    if result.get("towers"):
        lines += ["", "## VLM vision towers (`benchmarks/bench_towers.py`)", "",
                  result["towers"]["markdown"].split("\n", 1)[1].lstrip("\n")]
    return "\n".join(lines) + "\n"


def summary(result: dict) -> str:
    env = result["environment"]
    lines = ["", f"make gpu on {env.get('gpu', 'no GPU')} · torch {env.get('torch')} · triton {env.get('triton')}",
             f"{'step':<10}{'status':<10}{'seconds':>8}  detail"]
    lines += [f"{s['step']:<10}{s['status']:<10}{s['seconds']:>8.0f}  {s['detail']}" for s in result["steps"]]
    b = result["bench"]
    if b:
        models = [r for r in b["records"] if r["kind"] == "model" and r["images_per_s"]]
        for r in models:
            lines.append(f"  {r['model'] + ' ' if r.get('model') else ''}"
                         f"P{r['patch_size']} {r['tokens']} tokens batch {r['batch']} {r['backend']:<18} "
                         f"{r['images_per_s']:10.1f} images/s")
        if b.get("attention_exponent") is not None:
            lines.append(f"  attention time ∝ N^{b['attention_exponent']:.2f} ({b['attention_fit_backend']})")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu-results", help="output folder (default gpu-results/)")
    p.add_argument("--budget", type=float, default=530, help="seconds for the whole run (default 530)")
    p.add_argument("--bench-seconds", type=float, default=200,
                   help="seconds kept for the benchmark step at the end (default 200)")
    p.add_argument("--compile-mode", default="reduce-overhead",
                   help="torch.compile mode of the bench's compile backend (default reduce-overhead: CUDA "
                        "graphs, no GEMM autotuning, which would not fit the time box)")
    p.add_argument("--steps", default="smoke,tests,bench",
                   help="comma-separated steps after the build, from smoke, tests, bench, host, decode, train, "
                        "towers (default: smoke,tests,bench)")
    p.add_argument("--bench-models", default=None, metavar="NAMES",
                   help="comma-separated timm names (vitfast.list_models()): the bench step measures each at its "
                        "own size end to end instead of the ViT-B sweep, e.g. vit_base_patch14_dinov2,"
                        "vit_base_patch16_clip_224,vit_base_patch16_siglip_224")
    p.add_argument("--bench-args", nargs=argparse.REMAINDER, default=[],
                   help="extra arguments for `vitfast bench` (last on the command line)")
    args = p.parse_args(argv)
    steps = [x.strip() for x in args.steps.split(",") if x.strip()]
    if not steps or set(steps) - {"smoke", "tests", "bench", "host", "decode", "train", "towers"}:
        p.error("--steps: expected a comma-separated subset of smoke,tests,bench,host,decode,train,towers, "
                f"got {args.steps!r}")
    run = Run(Path(args.out), args.budget, args.bench_seconds)
    run.say(f"make gpu: {sys.executable}, budget {args.budget:.0f} s, results in {run.out}/")
    if not check_modules(run):
        run.say(summary(run.result))
        return 2
    env = environment(run)
    run.say(f"torch {env['torch']} (CUDA {env['torch_cuda']}), triton {env['triton']}, "
            f"GPU {env.get('gpu', 'none')}, nvcc {env.get('nvcc')}")
    built = build(run, env)
    if not env["cuda_available"]:
        run.step("gpu", "skipped", time.monotonic(),
                 f"CUDA is not available (torch {env['torch']}, CUDA {env['torch_cuda']}): the build "
                 f"{'passed' if built else 'FAILED'}; smoke, tests and bench need an NVIDIA GPU")
        run.say(summary(run.result))
        return NO_CUDA
    ok = built
    if "smoke" in steps:
        ok &= smoke(run)
    if "tests" in steps:
        ok &= tests(run)
    if "bench" in steps:
        ok &= bench(run, args)
    if "host" in steps:
        ok &= host(run, min(150.0, run.left() / 2) if {"decode", "train", "towers"} & set(steps) else None)
    if "decode" in steps:
        ok &= decode(run, run.left() / 2 if {"train", "towers"} & set(steps) else None)
    if "train" in steps:
        ok &= train(run, run.left() / 2 if "towers" in steps else None)
    if "towers" in steps:
        ok &= towers(run)
    run.write()
    run.say(summary(run.result))
    run.say(f"\nmake gpu: {'all steps passed' if ok else 'some steps did not pass'} in "
            f"{time.monotonic() - run.start:.0f} s; files in {run.out}/: "
            + ", ".join(sorted(f.name for f in run.out.iterdir())))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
