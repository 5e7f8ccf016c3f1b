"""`vitfast bench` on the CPU: the output files and their schema, the fitted attention exponent, the
sweep and batch rules, and the `fused_attn` (SDPA) baseline of the reference model."""

import copy
import json
import math
import sys
import types

import numpy as np
import pytest
import torch

from vitfast import bench, ops, reference
from vitfast.testing import assert_close

# 64 px at patch 32 / 16 / 8: 5, 17 and 65 tokens, one block. The CPU sweep on every machine (a GPU
# machine would default to cuda, bf16 and the GPU-only backends).
ARGS = ["--model-size", "tiny", "--depth", "1", "--batch-size", "2", "--image-sizes", "64",
        "--patch-sizes", "32,16,8", "--reps", "1", "--device", "cpu"]
CONFIGS = [(64, 32, 5), (64, 16, 17), (64, 8, 65)]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    # Like `make bench` on a CPU machine: vitfast's CPU path, not Triton's interpreter (the kernels
    # have their own tests; timing them in the interpreter would take minutes).
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops, "INTERPRET", False)
        rc = bench.main([*ARGS, "--out", str(out)])
    return rc, out, json.loads((out / "results.json").read_text())


def test_exit_code_and_environment(run):
    rc, _, result = run
    assert rc == 0
    env = result["environment"]
    for key in ("gpu", "driver", "torch", "triton", "date", "config", "command", "notes"):
        assert key in env, key
    assert env["gpu"] == "cpu" and env["torch"] == torch.__version__
    assert any("need an NVIDIA GPU" in n for n in env["notes"])
    cfg = env["config"]
    assert (cfg["model_size"], cfg["embed_dim"], cfg["depth"], cfg["num_heads"]) == ("tiny", 192, 1, 3)
    assert [(c["image_size"], c["patch_size"], c["tokens"]) for c in cfg["configs"]] == CONFIGS


def test_records_schema_and_values(run):
    _, _, result = run
    records = result["records"]
    assert all(r["error"] is None for r in records), [r for r in records if r["error"]]
    models = [r for r in records if r["kind"] == "model"]
    kernels = [r for r in records if r["kind"] == "kernel"]
    # On CPU: the reference, eager PyTorch on its fused ops, and vitfast, each at every configuration.
    assert sorted((r["image_size"], r["patch_size"], r["tokens"], r["backend"]) for r in models) == sorted(
        (s, p, t, b) for s, p, t in CONFIGS for b in ("reference", "torch", "vitfast"))
    assert {(r["op"], r["backend"]) for r in kernels} == {(o, b) for o in bench.OPS for b in bench.OP_BACKENDS}
    for r in records:
        assert r["tokens"] == 1 + (r["image_size"] // r["patch_size"]) ** 2
        assert r["batch"] == 2 and r["dtype"] == "float32"
        assert r["ms"] > 0 and math.isclose(r["ms_per_image"], r["ms"] / r["batch"])
        assert r["peak_mem_bytes"] is None            # no allocator statistics on CPU
    for r in models:
        assert math.isclose(r["images_per_s"], r["batch"] / r["ms"] * 1e3)
        assert r["tflops"] > 0 and 0 < r["attention_share"]
        # Every backend computes the same logits as the reference (fp32).
        assert r["rel_err_vs_reference"] <= (0 if r["backend"] == "reference" else 1e-5)
    for r in kernels:
        assert (r["gbps"] > 0) if r["op"] == "layer_norm" else (r["tflops"] > 0)
        # The op time of each backend (times its calls per forward) against its own end-to-end time of
        # the same configuration: a ratio of two timings, so its value is not asserted, only its definition.
        calls = 2 * 1 + 1 if r["op"] == "layer_norm" else 1                     # depth 1
        model = next(m["ms"] for b in bench.MODEL_OF[r["backend"]] for m in models
                     if m["backend"] == b and m["tokens"] == r["tokens"] and m["patch_size"] == r["patch_size"])
        assert r["model_share"] > 0 and math.isclose(r["model_share"], calls * r["ms"] / model)
    flops = {r["tokens"]: r["tflops"] * r["ms"] * 1e9 for r in kernels
             if (r["op"], r["backend"]) == ("attention", "reference")}
    for t, f in flops.items():       # 4·B·N²·C
        assert math.isclose(f, 4 * 2 * t * t * 192, rel_tol=1e-9)


def test_exponent_is_the_fit_of_the_recorded_attention_points(run):
    _, _, result = run
    backend = result["attention_fit_backend"]
    assert backend == "vitfast"
    pts = [(r["tokens"], r["ms_per_image"]) for r in result["records"]
           if r["kind"] == "kernel" and r["op"] == "attention" and r["backend"] == backend]
    assert sorted(n for n, _ in pts) == [5, 17, 65]
    n, t = np.array(pts, dtype=np.float64).T
    slope, intercept = np.polyfit(np.log(n), np.log(t), 1)
    assert result["attention_exponent"] == pytest.approx(slope, rel=1e-9, abs=1e-12)
    fit = result["fits"]["attention"][backend]
    assert fit["intercept"] == pytest.approx(intercept, rel=1e-9, abs=1e-12) and fit["points"] == 3
    assert set(result["fits"]["attention"]) == {"reference", "torch", "vitfast"}


def test_files_table_and_plots(run):
    _, out, result = run
    for name in ("attention_vs_tokens.png", "images_per_s.png", "attention_share.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000, name
    table = (out / "results.md").read_text()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| ")]
    for s, p, t in CONFIGS:
        for b in ("reference", "torch", "vitfast"):
            assert [str(p), str(s), str(t), "2", b] in [row[:5] for row in rows], (s, p, b)
        for op in bench.OPS:
            assert [str(t), str(p), str(s), op, "vitfast"] in [row[:5] for row in rows], (s, p, op)
    assert f"N^{result['attention_exponent']:.2f}" in table
    assert "need an NVIDIA GPU" in table


def test_fit_exponent_recovers_a_power_law():
    recs = [dict(kind="kernel", op="attention", backend="x", tokens=n, ms=1.0, ms_per_image=3e-4 * n ** 2.0)
            for n in (50, 197, 785, 4097)]
    recs.append(dict(kind="kernel", op="attention", backend="x", tokens=9, ms=None, ms_per_image=None))  # failed
    fit = bench.fit_exponent(recs, "kernel", "x", "attention")
    assert fit["exponent"] == pytest.approx(2.0, abs=1e-12) and fit["points"] == 4
    assert fit["intercept"] == pytest.approx(math.log(3e-4), abs=1e-10)
    assert bench.fit_exponent(recs[:1], "kernel", "x", "attention") is None


def test_attention_share():
    spec = bench.Spec("tiny", 192, 12, 3, 4.0)
    recs = [dict(kind="model", op=None, backend="vitfast", ms=10.0),
            dict(kind="kernel", op="attention", backend="vitfast", ms=0.25),
            dict(kind="kernel", op="layer_norm", backend="vitfast", ms=0.01),
            dict(kind="kernel", op="attention", backend="torch", ms=0.5)]
    bench.add_shares(recs, spec)
    assert recs[0]["attention_share"] == pytest.approx(12 * 0.25 / 10)
    assert recs[2]["model_share"] == pytest.approx(25 * 0.01 / 10)      # 2 per block + the final norm
    assert recs[3]["model_share"] is None


def test_sweep_and_batch_rules():
    gpu = bench.parse_args([])
    pairs = bench.sweep_configs(gpu, "cuda")
    assert sorted(1 + (s // p) ** 2 for s, p in pairs) == [50, 197, 257, 577, 785, 1025, 2305, 4097]
    assert all(s % p == 0 for s, p in pairs)
    # --patch-sizes alone: the default image sizes, only where they divide.
    assert bench.sweep_configs(bench.parse_args(["--patch-sizes", "14"]), "cuda") == [(224, 14)]
    assert bench.sweep_configs(bench.parse_args(["--image-sizes", "384", "--patch-sizes", "16,14,8"]),
                               "cpu") == [(384, 16), (384, 8)]
    assert [bench.batch_for(t, 256) for t in (50, 785, 1025, 4097)] == [256, 256, 196, 49]
    assert bench.batch_for(4097, 2) == 1
    with pytest.raises(SystemExit):
        bench.main(["--backends", "eager,nonsense"])
    with pytest.raises(SystemExit):
        bench.main(["--patch-sizes", "x"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kw", [dict(), dict(global_pool="avg", class_token=False, act_layer="gelu_tanh")],
                         ids=["token", "avg_tanh"])
def test_torch_baseline_matches_the_plain_reference(dtype, kw):
    """The `torch` backend (use_torch_ops: F.conv2d, F.layer_norm, SDPA, F.linear, F.gelu) against the
    plain math, and every module switched."""
    model = reference.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                                        num_classes=10, **kw).to(torch.float64).eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ref64 = model(x)
        plain = model.to(dtype)(x.to(dtype))
        fused = model.use_torch_ops()(x.to(dtype))
    assert model.fused and all(m.fused for m in model.modules() if isinstance(m, (reference.LayerNorm,
                                                                                 reference.Mlp)))
    assert all(m.fused_attn for m in model.modules() if isinstance(m, reference.Attention))
    assert_close(fused, ref64, dtype=dtype, eager=plain, name="torch baseline")
    with torch.no_grad():
        assert torch.equal(model.use_torch_ops(False)(x.to(dtype)), plain)


def test_speedups_against_torch_and_compile_and_fits_on_the_largest_batch():
    env = {"config": dict(model_size="tiny", embed_dim=192, depth=12, num_heads=3, dtype="bfloat16"), "gpu": "G",
           "date": "d", "torch": "t", "triton": "tr", "driver": "dr", "command": "c", "notes": []}
    recs = []
    for tokens, batch, torch_ms, compile_ms, vitfast_ms in ((197, 8, 4.0, 3.0, 2.0), (197, 64, 20.0, 16.0, 10.0),
                                                             (785, 64, 100.0, 80.0, 40.0)):
        for backend, ms in (("torch", torch_ms), ("compile", compile_ms), ("vitfast", vitfast_ms)):
            recs.append(bench._record("model", bench.Config(224, 16 if tokens == 197 else 8, batch), backend,
                                      torch.bfloat16, ms=ms, ms_per_image=ms / batch, images_per_s=batch / ms * 1e3))
    result = bench.assemble(env, recs)
    lines = bench.markdown(result).split("## End to end")[1].split("\n## ")[0].splitlines()
    header, *rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| ")]
    rows = {(r[2], r[3], r[4]): dict(zip(header, r)) for r in rows}       # (tokens, batch, backend) -> row
    assert (rows["197", "64", "vitfast"]["x torch"], rows["197", "64", "vitfast"]["x compile"]) == ("2.00", "1.60")
    assert (rows["785", "64", "compile"]["x torch"], rows["785", "64", "compile"]["x compile"]) == ("1.25", "1.00")
    assert rows["197", "8", "torch"]["x torch"] == "1.00"
    fit = result["fits"]["model"]["vitfast"]        # one point per token count: its largest batch
    assert fit["points"] == 2
    assert fit["exponent"] == pytest.approx(math.log((40 / 64) / (10 / 64)) / math.log(785 / 197))


def test_timm_is_a_gpu_backend_even_where_timm_is_installed(monkeypatch):
    """A CPU run lists the same backends whether timm is importable or not; on a GPU timm joins."""
    fake = types.ModuleType("timm.models.vision_transformer")
    fake.VisionTransformer = reference.VisionTransformer
    monkeypatch.setitem(sys.modules, "timm", types.ModuleType("timm"))
    monkeypatch.setitem(sys.modules, "timm.models", types.ModuleType("timm.models"))
    monkeypatch.setitem(sys.modules, "timm.models.vision_transformer", fake)
    assert bench._timm_class() is reference.VisionTransformer
    cpu, notes = bench.select_backends(bench.parse_args(ARGS), gpu=False)
    assert cpu == ["reference", "torch", "vitfast"] and not any("timm" in n for n in notes)
    gpu, _ = bench.select_backends(bench.parse_args([]), gpu=True)
    assert gpu == ["reference", "torch", "timm", "vitfast", "vitfast-eager", "compile"]
    _, notes = bench.select_backends(bench.parse_args(["--backends", "timm,vitfast"]), gpu=False)
    assert "backend timm skipped: it needs CUDA" in notes


def test_attention_sweep_is_what_the_exponent_is_fitted_on(tmp_path, monkeypatch):
    monkeypatch.setattr(ops, "INTERPRET", False)
    args = ["--model-size", "tiny", "--depth", "1", "--batch-size", "2", "--image-sizes", "64", "--patch-sizes",
            "32", "--reps", "1", "--device", "cpu", "--backends", "torch,vitfast",
            "--attention-tokens", "65,5,17,33", "--out", str(tmp_path)]
    assert bench.main(args) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    sweep = [r for r in result["records"] if r["kind"] == "attention"]
    assert sorted((r["tokens"], r["backend"]) for r in sweep) == [(n, b) for n in (5, 17, 33, 65)
                                                                  for b in ("torch", "vitfast")]
    for r in sweep:
        assert r["error"] is None and r["batch"] == 2 and r["ms"] > 0
        assert math.isclose(r["tflops"] * r["ms"] * 1e9, 4 * 2 * r["tokens"] ** 2 * 192, rel_tol=1e-9)
    pts = sorted((r["tokens"], r["ms_per_image"]) for r in sweep if r["backend"] == "vitfast")
    n, t = np.array(pts, dtype=np.float64).T
    assert result["fits"]["attention"]["vitfast"]["exponent"] == pytest.approx(np.polyfit(np.log(n), np.log(t), 1)[0])
    assert result["fits"]["attention"]["vitfast"]["points"] == 4
    assert "## Attention alone" in (tmp_path / "results.md").read_text()


def test_time_budget_skips_what_is_left_and_still_writes_results(tmp_path, monkeypatch):
    monkeypatch.setattr(ops, "INTERPRET", False)
    args = [*ARGS, "--time-budget", "0", "--attention-tokens", "5,17", "--out", str(tmp_path)]
    assert bench.main(args) == 0                      # skipped is not failed
    result = json.loads((tmp_path / "results.json").read_text())
    records = result["records"]
    assert len(records) == 3 * (3 + 3 * len(bench.OPS)) + 2 * 3
    assert all(r["error"] == bench.SKIPPED and r["ms"] is None for r in records)
    assert result["environment"]["config"]["time_budget_s"] == 0
    assert bench.SKIPPED in (tmp_path / "results.md").read_text()


# --model NAME: a named configuration (prefix tokens, layer-scale, pre-norm, eps, QuickGELU, MAP head)
NAMED = {"vit_small_patch14_reg4_dinov2": 5, "vit_base_patch16_clip_quickgelu_224": 1,
         "vit_base_patch16_siglip_224": 0, "deit_tiny_distilled_patch16_224": 2,
         "vit_giant_patch14_dinov2": 1}                                              # name -> prefix tokens


@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_model_sweep(name, tmp_path, monkeypatch):
    monkeypatch.setattr(ops, "INTERPRET", False)
    args = ["--model", name, "--depth", "1", "--batch-size", "2", "--image-sizes", "28", "--patch-sizes", "14",
            "--reps", "1", "--device", "cpu", "--backends", "reference,torch,vitfast", "--out", str(tmp_path)]
    assert bench.main(args) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    config = result["environment"]["config"]
    assert config["model"] == name and config["depth"] == 1
    from vitfast.configs import model_class_and_config
    expected = {k: v for k, v in model_class_and_config(name)[1].items()
                if k not in ("embed_dim", "depth", "num_heads", "mlp_ratio", "img_size", "patch_size",
                             "dynamic_img_size")}
    assert config["model_options"] == expected
    records = result["records"]
    assert len(records) == 3 + 3 * len(bench.OPS)
    for r in records:
        assert r["error"] is None and r["tokens"] == NAMED[name] + 4
    for r in records:
        if r["kind"] == "model":                     # the named model's kwargs on every backend: same logits
            assert r["rel_err_vs_reference"] <= (0 if r["backend"] == "reference" else 1e-5)
    assert f"# vitfast bench: {name}" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("name", sorted(NAMED))
@pytest.mark.parametrize("op", bench.OPS)
def test_named_op_cases_compute_the_same(name, op, monkeypatch):
    """The three op backends of a named model's block (its prefix rows, layer-scale, activation, eps)
    compute the same values."""
    monkeypatch.setattr(ops, "INTERPRET", False)
    spec = bench.spec_for_name(name, 1)
    make, fns, _ = bench.op_case(op, spec, bench.Config(28, 14, 2, spec.prefix), "cpu", torch.float32)
    inputs = make()
    ref = fns["reference"](*inputs)
    assert ref.shape[-2:] == ((spec.prefix + 4, spec.embed_dim * (3 if op == "linear_qkv" else 1))
                              if op != "attention" else (spec.prefix + 4, spec.embed_dim))
    for backend in ("torch", "vitfast"):
        torch.testing.assert_close(fns[backend](*inputs), ref, rtol=1e-4, atol=1e-4)


def test_model_name_errors():
    with pytest.raises(SystemExit, match="--model: unknown name 'vit_nope'"):
        bench.main(["--model", "vit_nope", "--device", "cpu"])
    with pytest.raises(SystemExit, match="not both"):
        bench.main(["--model", "vit_base_patch16_siglip_224", "--model-size", "tiny", "--device", "cpu"])


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_model_timm_backend_equals_reference(name):
    """timm's own classes built from a named Spec (eps through timm's norm layer, DeiT's distilled
    class) take the reference's weights strictly and compute its output."""
    pytest.importorskip("timm")
    spec = bench.spec_for_name(name, 1)
    cfg = bench.Config(28, 14, 2, spec.prefix)
    torch.manual_seed(0)
    ref = (reference.VisionTransformerDistilled if spec.distilled else reference.VisionTransformer)(
        **spec.kwargs(cfg)).cuda().eval()
    timm_model = bench.build_model_backend("timm", spec, cfg, ref.state_dict(), "cuda", torch.float32)
    x = torch.randn(2, 3, 28, 28, device="cuda")
    with torch.no_grad():
        assert_close(timm_model(x), ref.double()(x.double()), eager=ref.float()(x), tol=1e-3)


@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", ["vit_small_patch16_dinov3", "vit_small_plus_patch16_dinov3"])
def test_dinov3_timm_backend_is_timms_eva_with_the_reference_weights(name, device, no_tf32):
    """The timm backend of a DINOv3 name is timm's Eva (its RoPE, its unpacked SwiGLU), loaded strictly from the
    reference's weights, and computes the reference's output."""
    pytest.importorskip("timm")
    spec = bench.spec_for_name(name, 1)
    cfg = bench.Config(32, 16, 2, spec.prefix)
    ref = reference.VisionTransformer(**spec.kwargs(cfg)).to(device).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    timm_model = bench.build_model_backend("timm", spec, cfg, ref.state_dict(), device, torch.float32)
    assert type(timm_model).__name__ == "Eva"
    x = torch.randn(2, 3, 32, 32, device=device)
    with torch.no_grad():
        assert_close(timm_model(x), copy.deepcopy(ref).double()(x.double()), eager=ref(x))
