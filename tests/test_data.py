"""The decode paths of batch inference (vitfast.data): the exact path equals timm's eval transform bit for
bit, the fast path (reduced-scale JPEG decode, reducing_gap) stays within the documented pixel tolerance
of it on large images and equals it on small ones, the tensor resize of the GPU path is Pillow's within a
level or two, and the GPU-decode batch assembly keeps order, falls back to the CPU path and names the
files it cannot read. nvJPEG itself runs in the `gpu` tests."""

import io

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

from vitfast import data, testing
from vitfast.data import load_image, resize_crop

# The fast path's documented distance from the exact one (benchmarks/RESULTS.md), in uint8 levels.
FAST_MEAN_ABS, FAST_P99 = 1.0, 6.0


def photo(w: int, h: int, seed: int) -> Image.Image:
    return testing.photo(w, h, seed, shapes=20)


def timm_eval_transform(path, img_size: int, crop_pct: float) -> torch.Tensor:
    """timm's eval transform written out: full decode, Resize(floor(S / crop_pct)) bicubic, CenterCrop(S)."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    short = int(img_size / crop_pct)
    size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    im = im.resize(size, Image.BICUBIC)
    top, left = int(round((size[1] - img_size) / 2)), int(round((size[0] - img_size) / 2))
    a = np.asarray(im)[top:top + img_size, left:left + img_size]
    return torch.from_numpy(a.copy()).permute(2, 0, 1)


@pytest.fixture
def draft_calls(monkeypatch):
    """The scales Pillow's JPEG draft was asked for (the reduced decode happened)."""
    calls = []
    real = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        calls.append(size)
        return real(self, mode, size)
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return calls


def diff_stats(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = (a.int() - b.int()).abs().float()
    return d.mean().item(), d.flatten().quantile(0.99).item()


@pytest.mark.parametrize("w,h,img_size", [(1200, 900, 224), (2100, 1500, 224), (1000, 1400, 160)])
def test_fast_path_on_large_jpegs_is_within_tolerance_of_exact(w, h, img_size, tmp_path, draft_calls):
    path = tmp_path / "big.jpg"
    photo(w, h, seed=w).save(path, quality=90)
    exact = load_image(str(path), img_size, 0.9, exact=True)
    assert not draft_calls                                          # the exact path decodes at full size
    assert torch.equal(exact, timm_eval_transform(path, img_size, 0.9))
    fast = load_image(str(path), img_size, 0.9)
    assert len(draft_calls) == 1                                    # the reduced decode ran
    assert fast.shape == exact.shape == (3, img_size, img_size) and fast.dtype == torch.uint8
    mean_abs, p99 = diff_stats(fast, exact)
    assert mean_abs <= FAST_MEAN_ABS and p99 <= FAST_P99, (mean_abs, p99)
    assert not torch.equal(fast, exact)                             # a different path, not the same one


@pytest.mark.parametrize("kind", ["jpeg", "png"])
@pytest.mark.parametrize("w,h", [(400, 300), (495, 700), (248, 248)])
def test_images_too_small_for_a_reduced_decode_give_identical_pixels(kind, w, h, tmp_path, draft_calls):
    """Shorter side below twice the resize target (2 · 248 at 224 px): both paths give the same pixels."""
    path = tmp_path / f"small.{'jpg' if kind == 'jpeg' else 'png'}"
    photo(w, h, seed=h).save(path, **({"quality": 90} if kind == "jpeg" else {}))
    assert not data.reduced_decode(w, h, 224, 0.9)
    exact = load_image(str(path), 224, exact=True)
    assert torch.equal(load_image(str(path), 224), exact)
    assert torch.equal(exact, timm_eval_transform(path, 224, 0.9))
    assert not draft_calls


def test_reducing_gap_on_a_large_png(tmp_path):
    """Non-JPEG images decode at full size on both paths; the fast one box-reduces a 6x+ downscale first."""
    path = tmp_path / "big.png"
    photo(1800, 1650, seed=3).save(path)
    exact, fast = load_image(str(path), 224, exact=True), load_image(str(path), 224)
    assert torch.equal(exact, timm_eval_transform(path, 224, 0.9))
    mean_abs, p99 = diff_stats(fast, exact)
    assert 0 < mean_abs <= FAST_MEAN_ABS and p99 <= FAST_P99, (mean_abs, p99)


def test_load_image_reads_file_objects_and_names_bad_ones(tmp_path):
    path = tmp_path / "x.jpg"
    photo(300, 200, seed=1).save(path, quality=90)
    assert torch.equal(load_image(io.BytesIO(path.read_bytes()), 64), load_image(str(path), 64))
    (tmp_path / "bad.jpg").write_bytes(path.read_bytes()[:500])
    with pytest.raises(OSError):
        load_image(str(tmp_path / "bad.jpg"), 64)


@pytest.mark.parametrize("w,h,img_size,crop_pct", [(500, 375, 224, 0.9), (375, 500, 224, 0.875),
                                                   (640, 480, 384, 1.0), (250, 250, 224, 0.9)])
def test_resize_crop_on_tensors_matches_pillow(w, h, img_size, crop_pct, tmp_path):
    """The GPU path's transform (antialiased bicubic in torch, on the decoded tensor), run on the CPU,
    against Pillow's exact path from the same decoded pixels."""
    path = tmp_path / "x.png"
    photo(w, h, seed=w + h).save(path)
    decoded = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)
    got = resize_crop(decoded, img_size, crop_pct)
    want = load_image(str(path), img_size, crop_pct, exact=True)
    assert got.shape == want.shape and got.dtype == torch.uint8
    d = (got.int() - want.int()).abs()
    assert d.max() <= 1 and d.float().mean() <= 1e-3, (d.float().mean(), d.max())


def test_dataset_encoded_items_and_errors(tmp_path):
    photo(300, 200, seed=0).save(tmp_path / "a.jpg", quality=90)
    photo(300, 200, seed=1).save(tmp_path / "b.png")
    (tmp_path / "c.jpg").write_text("not an image")
    paths = [str(tmp_path / n) for n in ("a.jpg", "b.png", "c.jpg")]
    ds = data.ImageDataset(paths, 64, encoded=True)
    i, payload, err, seconds = ds[0]
    assert (i, err) == (0, "") and payload.dim() == 1 and bytes(payload.numpy()) == (tmp_path / "a.jpg").read_bytes()
    assert data.is_jpeg(payload) and seconds[0] > 0
    _, payload, err, seconds = ds[1]                   # not a JPEG: decoded in the worker
    assert err == "" and torch.equal(payload, load_image(paths[1], 64)) and seconds[1] > 0
    _, payload, err, _ = ds[2]
    assert err.startswith("UnidentifiedImageError") and payload.shape == (3, 64, 64)
    indices, payloads, errors, summed = data.collate([ds[0], ds[1]])
    assert indices.tolist() == [0, 1] and isinstance(payloads, list) and errors == ["", ""] and len(summed) == 3
    _, stacked, _, _ = data.collate([data.ImageDataset(paths, 64)[k] for k in range(3)])
    assert stacked.shape == (3, 3, 64, 64)
    with pytest.raises(ValueError, match="crop_pct"):
        data.ImageDataset(paths, 64, crop_pct=0)


def test_gpu_decoded_batches_keep_order_fall_back_and_name_bad_files(tmp_path, monkeypatch):
    """The GPU-decode assembly with the decoder replaced by Pillow on the CPU: JPEGs go through
    `decode_jpegs` + `resize_crop`, one the decoder refuses takes the CPU path, one that fails there
    too keeps its error; other formats come decoded from the workers; order is kept."""
    names = ["a.jpg", "b.png", "c.jpg", "d.jpg", "e.jpg"]
    for k, n in enumerate(names[:3]):
        photo(320, 240, seed=k).save(tmp_path / n, **({"quality": 90} if n.endswith("jpg") else {}))
    photo(320, 240, seed=9).save(tmp_path / "d.jpg", quality=90)             # refused by the "GPU" decoder
    good = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "e.jpg").write_bytes(good[:len(good) // 3])                  # truncated: fails everywhere
    paths = [str(tmp_path / n) for n in names]
    refused = (tmp_path / "d.jpg").read_bytes()

    def fake_decode(datas, device):
        out = []
        for d in datas:
            raw = bytes(d.numpy())
            if raw in (refused, (tmp_path / "e.jpg").read_bytes()):
                out.append(RuntimeError("nvJPEG: unsupported"))
            else:
                out.append(torch.from_numpy(np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")).copy())
                           .permute(2, 0, 1))
        return out
    monkeypatch.setattr(data, "decode_jpegs", fake_decode)
    loader = data.make_loader(paths, 64, batch_size=5, workers=0, encoded=True)
    seconds = {}
    (indices, images, errors, _), = data.gpu_decoded(loader, 64, 0.9, "cpu", seconds=seconds)
    assert indices.tolist() == [0, 1, 2, 3, 4] and images.shape == (5, 3, 64, 64) and seconds["gpu decode"] > 0
    assert errors[:4] == ["", "", "", ""] and errors[4]
    for k in (0, 2):
        d = (images[k].int() - load_image(paths[k], 64, exact=True).int()).abs()
        assert d.max() <= 1 and d.float().mean() <= 1e-2
    assert torch.equal(images[1], load_image(paths[1], 64))                 # PNG: the workers' pixels
    assert torch.equal(images[3], load_image(paths[3], 64))                 # refused: the CPU path
    got = []
    batches = list(data.good_batches(data.gpu_decoded(loader, 64, 0.9, "cpu"), 2,
                                     lambda i, msg: got.append((paths[i], msg))))
    assert [b[0] for b in batches] == [[0, 1], [2, 3]]
    assert [p for p, _ in got] == [paths[4]]


def test_default_workers_follow_the_cores(monkeypatch):
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert data.default_workers() == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert data.default_workers() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert data.default_workers() == 1


@pytest.mark.gpu
def test_gpu_decode_matches_the_cpu_path(tmp_path):
    """nvJPEG + the tensor resize on the GPU against the CPU path (Pillow) on the same files: JPEG decoders
    may round their IDCT and upsample chroma differently, so a few levels apart."""
    pytest.importorskip("torchvision")
    assert data.gpu_decode_available()
    paths = []
    for k, (w, h) in enumerate([(500, 375), (375, 500), (1200, 900), (4000, 3000), (248, 260)]):
        paths.append(str(tmp_path / f"{k}.jpg"))
        photo(w, h, seed=k).save(paths[-1], quality=90)
    datas = [torch.frombuffer(bytearray(open(p, "rb").read()), dtype=torch.uint8) for p in paths]
    decoded = data.decode_jpegs(datas, "cuda")
    for p, img in zip(paths, decoded):
        assert isinstance(img, torch.Tensor) and img.is_cuda and img.dtype == torch.uint8
        got = resize_crop(img, 224, 0.9).cpu()
        want = load_image(p, 224, exact=True)
        mean_abs, p99 = diff_stats(got, want)
        assert mean_abs <= 2 * FAST_MEAN_ABS and p99 <= 2 * FAST_P99, (p, mean_abs, p99)
