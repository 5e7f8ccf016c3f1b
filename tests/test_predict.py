"""`vitfast predict` and `vitfast attention-map` on a generated folder of small images and a tiny
checkpoint: predictions equal the model's own top-k, corrupt files are reported and skipped,
--resume after a crash rebuilds the same file, 2 torchrun processes (gloo) equal 1 process, and the
attention map's CLS rows equal the reference attention probabilities."""

import contextlib
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import vitfast
from vitfast import attention_map, predict, reference
from vitfast.configs import DATA_CONFIGS
from vitfast.data import discover_images, eval_resize_size, load_image
from vitfast.engine import InferenceEngine
from vitfast.testing import assert_close

NAME = "vit_tiny_patch16_224"
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
MODEL_ARGS = ["--model", NAME, "--model-kwargs", json.dumps(TINY)]
# The model's own data configuration (timm's default weights of NAME): what predict normalises with.
MEAN, STD = DATA_CONFIGS[NAME]["mean"], DATA_CONFIGS[NAME]["std"]
CLASSES = ["cat", "dog", "fish", "bird", "ant"]
N_GOOD, BATCH, TOPK = 36, 8, 3


def tiny_reference_model(seed: int = 0) -> reference.VisionTransformer:
    """Weights large enough that different images get different top-k (timm's init gives a nearly
    image-independent output on a model this small)."""
    torch.manual_seed(seed)
    model = reference.VisionTransformer(**TINY)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A checkpoint (safetensors), a labels file, and a folder of N_GOOD images (PNG/JPEG, RGB/L/RGBA,
    non-square, nested) plus 4 corrupt ones (2 truncated, 2 not images) and a non-image .txt."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("predict")
    ckpt = root / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_reference_model().state_dict().items()}, str(ckpt))
    (root / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    imgs = root / "imgs"
    (imgs / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(N_GOOD):
        h, w = int(rng.integers(24, 64)), int(rng.integers(24, 64))
        base = rng.integers(0, 256, 3)
        a = np.clip(base + rng.normal(0, 60, (h, w, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(a)
        if i % 3 == 0:
            img.save(imgs / "sub" / f"img{i:02d}.jpg", quality=90)
        elif i % 5 == 1:
            img.convert("L").save(imgs / f"img{i:02d}.png")
        elif i % 7 == 2:
            img.convert("RGBA").save(imgs / f"img{i:02d}.png")
        else:
            img.save(imgs / f"img{i:02d}.png")
    png = (imgs / "img04.png").read_bytes()
    jpg = (imgs / "sub" / "img03.jpg").read_bytes()
    (imgs / "trunc_a.png").write_bytes(png[:len(png) // 2])
    (imgs / "sub" / "trunc_b.jpg").write_bytes(jpg[:len(jpg) // 3])
    (imgs / "not_an_image.jpg").write_text("hello")
    (imgs / "sub" / "empty.png").write_bytes(b"")
    (imgs / "README.txt").write_text("not an image extension: ignored by the folder walk")
    corrupt = sorted(str(imgs / p) for p in ("trunc_a.png", "sub/trunc_b.jpg", "not_an_image.jpg", "sub/empty.png"))
    return root, ckpt, corrupt


def predict_args(root, ckpt, out: str, *extra, device: str = "cpu") -> list[str]:
    """CLI arguments; the device is explicit (without it a GPU machine would pick cuda and bf16)."""
    return [str(root / "imgs"), *MODEL_ARGS, "--checkpoint", str(ckpt), "--batch-size", str(BATCH),
            "--topk", str(TOPK), "--labels", str(root / "labels.txt"), "--output", out, "--no-progress",
            "--device", device, *extra]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def full_run(workdir):
    """One uninterrupted single-process run (1 decode worker) with embeddings."""
    root, ckpt, _ = workdir
    out, emb = root / "full.jsonl", root / "full.npy"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = predict.main(predict_args(root, ckpt, str(out), "--embeddings", str(emb), "--workers", "1"))
    assert rc == 0, err.getvalue()
    return out, emb, err.getvalue()


@pytest.fixture(scope="module")
def expected(workdir):
    """The vitfast model's own predictions, computed here: same preprocessing, float input
    normalised with the reference math, model(x)."""
    root, ckpt, corrupt = workdir
    paths = [p for p in discover_images([str(root / "imgs")]) if p not in corrupt]
    model = vitfast.create_model(NAME, checkpoint_path=str(ckpt), **TINY).eval()
    u8 = torch.stack([load_image(p, 32) for p in paths])
    x = reference.normalize_images(u8, torch.tensor(MEAN), torch.tensor(STD), torch.float32)
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
    ref = tiny_reference_model().double()
    x64 = reference.normalize_images(u8, torch.tensor(MEAN), torch.tensor(STD), torch.float64)
    with torch.no_grad():
        ref_logits = ref(x64)
    return paths, logits, feats, ref_logits


# --------------------------------------------------------------------------------------------
# Data: discovery and the eval transform
# --------------------------------------------------------------------------------------------
def test_load_image_is_timms_eval_transform(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (37, 50, 3), dtype=np.uint8)            # H=37, W=50
    Image.fromarray(a).save(tmp_path / "x.png")
    out = load_image(str(tmp_path / "x.png"), 32, crop_pct=0.9)
    # timm: Resize(floor(32 / 0.9) = 35) on the shorter side, bicubic; CenterCrop(32)
    assert eval_resize_size(32, 0.9) == 35
    r = Image.fromarray(a).resize((int(35 * 50 / 37), 35), Image.BICUBIC)     # (47, 35)
    top, left = int(round((35 - 32) / 2)), int(round((47 - 32) / 2))
    want = torch.from_numpy(np.asarray(r)[top:top + 32, left:left + 32].copy()).permute(2, 0, 1)
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
    assert torch.equal(out, want)
    Image.fromarray(np.full((40, 30), 77, np.uint8)).save(tmp_path / "g.png")   # grayscale -> 3 equal channels
    assert torch.equal(load_image(str(tmp_path / "g.png"), 32), torch.full((3, 32, 32), 77, dtype=torch.uint8))
    with pytest.raises(ValueError, match="crop_pct"):
        load_image(str(tmp_path / "g.png"), 32, crop_pct=1.5)


def test_discover_images(workdir, tmp_path):
    root, _, corrupt = workdir
    imgs = root / "imgs"
    found = discover_images([str(imgs)])
    assert len(found) == N_GOOD + len(corrupt) and found == sorted(found)
    assert not any(p.endswith(".txt") for p in found)
    lst = tmp_path / "list.txt"
    lst.write_text(f"# comment\n{imgs / 'img01.png'}\n\n{imgs / 'sub' / 'img00.jpg'}\n")
    globbed = discover_images([str(imgs / "sub" / "*.jpg"), f"@{lst}", str(lst), str(imgs / "img01.png")])
    assert globbed == sorted({*(p for p in found if p.startswith(str(imgs / "sub")) and p.endswith(".jpg")),
                              str(imgs / "img01.png")})
    for bad, msg in ((str(tmp_path / "nope"), "not a folder"), (str(tmp_path / "*.png"), "matches no file"),
                     (f"@{tmp_path / 'missing.txt'}", "list file")):
        with pytest.raises(ValueError, match=msg):
            discover_images([bad])


# --------------------------------------------------------------------------------------------
# predict
# --------------------------------------------------------------------------------------------
def test_predict_gives_the_models_topk_and_skips_corrupt_images(workdir, full_run, expected):
    root, _, corrupt = workdir
    out, emb, err = full_run
    paths, logits, feats, ref_logits = expected
    recs = read_jsonl(out)
    assert [r["path"] for r in recs] == paths                       # sorted order, corrupt ones left out
    probs, idx = torch.softmax(logits, -1).topk(TOPK, -1)
    assert len({tuple(i) for i in idx.tolist()}) > 3, "test images should not all get the same top-k"
    assert [r["indices"] for r in recs] == idx.tolist()
    assert [r["labels"] for r in recs] == [[CLASSES[j] for j in row] for row in idx.tolist()]
    got = torch.tensor([r["probs"] for r in recs])
    torch.testing.assert_close(got, probs, rtol=1e-5, atol=1e-6)
    ref_probs = torch.softmax(ref_logits, -1).gather(1, idx)
    assert_close(got, ref_probs, torch.float32)
    assert_close(torch.from_numpy(np.load(emb)), feats.double(), torch.float32, name="embeddings")
    for p in corrupt:
        assert f"skipped unreadable image {p}" in err
    assert f"{N_GOOD} images predicted, 0 already done, {len(corrupt)} skipped" in err
    assert not any(f.name.startswith("full.jsonl.") for f in root.iterdir())   # no part/companion files left


def test_resume_after_a_crash_gives_the_same_files(workdir, full_run, monkeypatch, capsys):
    root, ckpt, _ = workdir
    full_out, full_emb, _ = full_run
    out, emb = root / "resumed.jsonl", root / "resumed.npy"
    args = predict_args(root, ckpt, str(out), "--embeddings", str(emb), "--workers", "0")

    real_stream = InferenceEngine.stream

    def crashing_stream(self, batches, **kw):     # the process dies after two finished batches
        for i, res in enumerate(real_stream(self, batches, **kw)):
            if i == 2:
                raise KeyboardInterrupt
            yield res

    monkeypatch.setattr(InferenceEngine, "stream", crashing_stream)
    with pytest.raises(KeyboardInterrupt):
        predict.main(args)
    monkeypatch.undo()
    assert len(read_jsonl(out)) == 2 * BATCH                # finished batches are on disk
    with open(out, "a") as f:                               # and a line cut off in the middle
        f.write('{"path": "half-writ')
    assert predict.main(args + ["--resume"]) == 0
    assert out.read_bytes() == full_out.read_bytes()
    assert np.array_equal(np.load(emb), np.load(full_emb))
    assert f"{N_GOOD - 2 * BATCH} images predicted, {2 * BATCH} already done" in capsys.readouterr().err
    # resuming a finished run does nothing and keeps both files
    assert predict.main(args + ["--resume"]) == 0
    assert out.read_bytes() == full_out.read_bytes()
    assert np.array_equal(np.load(emb), np.load(full_emb))
    assert "0 images predicted" in capsys.readouterr().err


def test_torchrun_two_processes_equal_one(workdir, full_run):
    root, ckpt, corrupt = workdir
    full_out, full_emb, _ = full_run
    out, emb = root / "dist.jsonl", root / "dist.npy"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "vitfast", "predict", *predict_args(root, ckpt, str(out), "--embeddings", str(emb),
                                                     "--workers", "0")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one, two = read_jsonl(full_out), read_jsonl(out)
    assert [r["path"] for r in two] == [r["path"] for r in one]
    assert [r["indices"] for r in two] == [r["indices"] for r in one]
    assert [r["labels"] for r in two] == [r["labels"] for r in one]
    torch.testing.assert_close(torch.tensor([r["probs"] for r in two]), torch.tensor([r["probs"] for r in one]),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.load(emb), np.load(full_emb), rtol=1e-5, atol=1e-5)
    assert not any(f.name.startswith("dist.jsonl.") for f in root.iterdir())   # parts merged and removed
    for p in corrupt:
        assert f"skipped unreadable image {p}" in proc.stderr
    assert f"{N_GOOD} images predicted, 0 already done, {len(corrupt)} skipped" in proc.stderr


@pytest.mark.gpu
def test_predict_on_cuda_equals_the_cpu_run(workdir, full_run, tmp_path):
    """The CUDA pipeline in fp32 (pinned DataLoader batches from 2 workers, side-stream copies, a
    bucket's first batch eager and its CUDA graph captured at its second, while the loader's pin-memory
    thread runs) gives the CPU run's top-k, probabilities and embeddings."""
    root, ckpt, _ = workdir
    full_out, full_emb, _ = full_run
    out, emb = tmp_path / "cuda.jsonl", tmp_path / "cuda.npy"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = predict.main(predict_args(root, ckpt, str(out), "--embeddings", str(emb), "--workers", "2",
                                       "--dtype", "float32", "--decode", "cpu", device="cuda"))
    assert rc == 0, err.getvalue()
    one, got = read_jsonl(full_out), read_jsonl(out)
    assert [r["path"] for r in got] == [r["path"] for r in one]
    assert [r["indices"] for r in got] == [r["indices"] for r in one]
    torch.testing.assert_close(torch.tensor([r["probs"] for r in got]), torch.tensor([r["probs"] for r in one]),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.load(emb), np.load(full_emb), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_predict_gpu_decode_equals_the_model_on_gpu_decoded_pixels(workdir, tmp_path):
    """--decode gpu: the JPEGs decoded by nvJPEG and transformed on the GPU, the PNGs by the workers, the
    corrupt files named and skipped; the predictions are the model's on exactly those pixels."""
    pytest.importorskip("torchvision")
    from vitfast.data import decode_jpegs, is_jpeg, resize_crop

    root, ckpt, corrupt = workdir
    out = tmp_path / "gpu.jsonl"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = predict.main(predict_args(root, ckpt, str(out), "--workers", "2", "--dtype", "float32",
                                       "--decode", "gpu", "--profile", device="cuda"))
    assert rc == 0, err.getvalue()
    assert "gpu decode" in err.getvalue()
    for p in corrupt:
        assert f"skipped unreadable image {p}" in err.getvalue()
    paths = [p for p in discover_images([str(root / "imgs")]) if p not in corrupt]
    pixels = []
    for p in paths:
        raw = torch.frombuffer(bytearray(open(p, "rb").read()), dtype=torch.uint8)
        pixels.append(resize_crop(decode_jpegs([raw], "cuda")[0], 32).cpu() if is_jpeg(raw) else load_image(p, 32))
    model = vitfast.create_model(NAME, checkpoint_path=str(ckpt), **TINY).eval()
    logits = InferenceEngine(model.cuda(), batch_size=BATCH, dtype=torch.float32).run(torch.stack(pixels))
    probs, top = torch.softmax(logits.cpu(), -1).topk(TOPK, -1)
    got = read_jsonl(out)
    assert [r["path"] for r in got] == paths
    assert [r["indices"] for r in got] == top.tolist()
    torch.testing.assert_close(torch.tensor([r["probs"] for r in got]), probs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("extra, message", [
    (["--topk", "9"], "--topk: expected 1..5"),
    (["--batch-size", "0"], "--batch-size: expected a positive int, got 0"),
    (["--model-kwargs", "[1]"], "--model-kwargs: expected a JSON object"),
    (["--labels", "__missing_labels__"], "__missing_labels__"),
    (["--decode", "gpu"], "--decode gpu: expected a CUDA device and torchvision with decode_jpeg, got device cpu"),
    (["--decode", "gpu", "--exact-resize"], "--decode gpu: the GPU decoder cannot give --exact-resize's pixels"),
    (["--workers", "-1"], "--workers: expected >= 0, got -1"),
])
def test_predict_bad_arguments(workdir, tmp_path, capsys, extra, message):
    root, ckpt, _ = workdir
    assert predict.main(predict_args(root, ckpt, str(tmp_path / "o.jsonl")) + extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_predict_missing_inputs(workdir, tmp_path, capsys):
    root, ckpt, _ = workdir
    args = [*MODEL_ARGS, "--output", str(tmp_path / "o.jsonl"), "--device", "cpu"]
    assert predict.main([str(root / "imgs"), *args, "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "--checkpoint: file" in capsys.readouterr().err
    assert predict.main([str(tmp_path / "nothing_here"), *args, "--checkpoint", str(ckpt)]) == 2
    assert "is not a folder, file, glob or list file" in capsys.readouterr().err


def test_predict_profile_reports_every_stage_and_the_bound(workdir, full_run, tmp_path, capsys):
    """--profile on the CPU: the worker stages, the model and the writer, each with images/s, the
    stage that bounds the run; the predictions are those of the plain run."""
    root, ckpt, _ = workdir
    full_out, _, _ = full_run
    out = tmp_path / "p.jsonl"
    assert predict.main(predict_args(root, ckpt, str(out), "--workers", "1", "--profile")) == 0
    err = capsys.readouterr().err
    assert f"profile: {N_GOOD} images in" in err
    rows = {line.split()[0]: line.split()[1:] for line in err.splitlines()
            if line.split() and line.split()[0] in ("read", "decode", "resize", "model", "write")}
    assert set(rows) == {"read", "decode", "resize", "model", "write"}
    assert all(float(r[0]) >= 0 and float(r[-1]) > 0 for r in rows.values())      # seconds, images/s
    bound = re.search(r"bounded by: (\S+(?: decode)?) \(([\d.]+) images/s\)", err)
    assert bound and bound.group(1) in ("cpu decode", "model", "write")
    assert [r["indices"] for r in read_jsonl(out)] == [r["indices"] for r in read_jsonl(full_out)]


def test_profile_report_names_the_slowest_stage():
    seconds = {"read": 0.5, "decode": 3.0, "resize": 0.5, "h2d": 0.1, "model": 1.0, "write": 0.05}
    text = predict.profile_report(seconds, 1000, 4.0, workers=4)
    # cpu decode: 1000 / 4 s per core x 4 workers = 1000 img/s; model 1000 / 1 s = 1000; h2d 10,000
    assert "bounded by: " in text and "cpu decode" in text.splitlines()[-2]
    line = {ln.split()[0]: ln.split() for ln in text.splitlines()[2:-1]}
    assert float(line["decode"][2]) == pytest.approx(1000 / 3.0, rel=1e-3)           # per core
    assert float(line["decode"][3]) == pytest.approx(4 * 1000 / 3.0, rel=1e-3)       # 4 workers
    assert float(line["h2d"][-1]) == pytest.approx(10_000, rel=1e-3)
    slow = predict.profile_report({**seconds, "model": 2.0}, 1000, 4.0, workers=4)
    assert slow.splitlines()[-1] == "bounded by: model (500.0 images/s)"


def test_writer_writes_in_order_and_raises_its_errors(tmp_path):
    w = predict.Writer(str(tmp_path / "o.jsonl"), str(tmp_path / "o.emb"))
    for k in range(50):
        w.put([f"{k}\n"], np.full(2, k, np.float32).tobytes())
    w.close()
    assert (tmp_path / "o.jsonl").read_text() == "".join(f"{k}\n" for k in range(50))
    assert np.fromfile(tmp_path / "o.emb", np.float32).reshape(50, 2)[:, 0].tolist() == list(range(50))
    bad = predict.Writer(str(tmp_path / "b.jsonl"), None)
    bad.put(["ok\n"])
    bad.put([None])                                    # not a str: the thread's write fails
    with pytest.raises(TypeError):
        bad.close()
    assert (tmp_path / "b.jsonl").read_text() == "ok\n"


# --------------------------------------------------------------------------------------------
# attention-map
# --------------------------------------------------------------------------------------------
def test_attention_map_png_and_cls_maps_equal_reference(workdir, tmp_path):
    root, _, _ = workdir
    ckpt = tmp_path / "tiny.pt"                                   # the torch.save format this time
    torch.save(tiny_reference_model().state_dict(), ckpt)
    image = root / "imgs" / "img01.png"
    out_png, out_npy = tmp_path / "map.png", tmp_path / "maps.npy"
    rc = attention_map.main([str(image), *MODEL_ARGS, "--checkpoint", str(ckpt), "--out", str(out_png),
                             "--save-npy", str(out_npy), "--device", "cpu"])
    assert rc == 0
    with Image.open(out_png) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    maps = torch.from_numpy(np.load(out_npy)).double()
    H, gh = TINY["num_heads"], TINY["img_size"] // TINY["patch_size"]
    assert maps.shape == (H + 2, gh, gh)

    # reference: softmax(q kᵀ·scale) of the last layer, CLS query row, over the patch keys (float64)
    ref = tiny_reference_model().double()
    u8 = load_image(str(image), 32)[None]
    x = reference.normalize_images(u8, torch.tensor(MEAN), torch.tensor(STD), torch.float64)
    pe = ref.patch_embed
    probs = []
    with torch.no_grad():
        t = reference.patch_embed(x, pe.proj.weight, pe.proj.bias, ref.cls_token, ref.pos_embed)
        for blk in ref.blocks:
            q, k, _ = reference.split_qkv(blk.attn.qkv(blk.norm1(t)), H)
            probs.append(reference.attention_probs(q, k)[0])             # (H, T, T)
            t = blk(t)
    cls_rows = probs[-1][:, 0, 1:].reshape(H, gh, gh)
    assert_close(maps[:H], cls_rows, torch.float32, name="per-head CLS maps")
    assert_close(maps[H], cls_rows.mean(0), torch.float32, name="mean CLS map")
    # rollout (Abnar & Zuidema): product of 0.5·A + 0.5·I over layers, rows renormalised
    rollout = np.eye(probs[0].shape[-1])
    for p in probs:
        a = 0.5 * p.mean(0).numpy() + 0.5 * np.eye(p.shape[-1])
        rollout = (a / a.sum(-1, keepdims=True)) @ rollout
    assert_close(maps[H + 1], torch.from_numpy(rollout[0, 1:].reshape(gh, gh)), torch.float32, name="rollout")


def test_attention_map_of_a_rope_model_with_registers(workdir, tmp_path):
    """DINOv3-like (RoPE, 4 registers): the per-head maps come from the kernels' CLS row over the patches only,
    and equal the float64 reference's attention (with its rotation) of the last layer."""
    root, _, _ = workdir
    name, kw = "vit_small_patch16_dinov3", dict(img_size=32, embed_dim=32, depth=2, num_heads=2, init_values=0.5)
    torch.manual_seed(0)
    ref = reference.create_model(name, **kw)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    ckpt, out_npy = tmp_path / "dinov3.pt", tmp_path / "maps.npy"
    torch.save(ref.state_dict(), ckpt)
    image = root / "imgs" / "img01.png"
    rc = attention_map.main([str(image), "--model", name, "--model-kwargs", json.dumps(kw), "--checkpoint",
                             str(ckpt), "--out", str(tmp_path / "map.png"), "--save-npy", str(out_npy),
                             "--device", "cpu"])
    assert rc == 0
    maps = torch.from_numpy(np.load(out_npy)).double()
    H, gh = 2, 2
    assert maps.shape == (H + 2, gh, gh)
    mean, std = DATA_CONFIGS[name]["mean"], DATA_CONFIGS[name]["std"]
    x = reference.normalize_images(load_image(str(image), 32, DATA_CONFIGS[name]["crop_pct"])[None],
                                   torch.tensor(mean), torch.tensor(std), torch.float64)
    ref = ref.double().eval()
    with torch.no_grad():
        t = ref.norm_pre(reference.patch_embed(x, ref.patch_embed.proj.weight, ref.patch_embed.proj.bias,
                                               ref.prefix_tokens()))
        rope = reference.dinov3_rope((gh, gh), 16, dtype=torch.float64)
        for blk in ref.blocks:
            qkv = reference.rope_qkv(blk.attn.qkv(blk.norm1(t)), H, *rope)
            q, k, _ = reference.split_qkv(qkv, H)
            probs = reference.attention_probs(q, k)[0]                        # (H, T, T)
            t = blk(t, rope=rope)
    assert_close(maps[:H], probs[:, 0, 5:].reshape(H, gh, gh), torch.float32, name="per-head CLS maps")


def test_attention_map_bad_image(workdir, tmp_path, capsys):
    root, ckpt, corrupt = workdir
    rc = attention_map.main([corrupt[0], *MODEL_ARGS, "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.png")])
    assert rc == 2 and "error" in capsys.readouterr().err and not (tmp_path / "m.png").exists()
