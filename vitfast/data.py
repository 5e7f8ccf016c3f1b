"""Images for batch inference: discovery, decoding, timm's eval transform, and a DataLoader.

The transform is timm's eval transform up to (and excluding) normalisation:
  resize the shorter side to floor(img_size / crop_pct) with bicubic (Pillow, antialiased, as
  torchvision's `Resize` does on PIL images), center crop img_size x img_size, uint8 [3, S, S].
Normalisation ((x / 255 - mean) / std) happens inside the patch-embed kernel (`InferenceEngine`).

Defaults: crop_pct 0.9 and bicubic, as timm's ViT configs (`vision_transformer._cfg`); mean/std
ImageNet's (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225). Note that many timm ViT weights
(the augreg ones) use mean = std = 0.5: a model's own `pretrained_cfg` wins when it has one
(`data_config`), and the CLI takes --mean/--std/--crop-pct.
"""

from __future__ import annotations

import glob
import io
import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 0.9
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


def data_config(model) -> dict:
    """mean / std / crop_pct of a model: from its input normalisation (`img_mean` / `img_std`) or
    timm-style `pretrained_cfg` (or `default_cfg`) when it has one, else the defaults above."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {})
    for key in ("mean", "std"):    # vitfast.VisionTransformer.set_input_normalization
        t = getattr(model, f"img_{key}", None)
        if t is not None:
            cfg[key] = t.tolist()
    return {
        "mean": tuple(cfg.get("mean", IMAGENET_MEAN)),
        "std": tuple(cfg.get("std", IMAGENET_STD)),
        "crop_pct": float(cfg.get("crop_pct", DEFAULT_CROP_PCT)),
    }


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------
def _read_list_file(path: str) -> list[str]:
    """One path per line; blank lines and lines starting with '#' are skipped; relative paths are
    taken relative to the list file's folder."""
    base = os.path.dirname(path)
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(line if os.path.isabs(line) else os.path.join(base, line))
    return out


def _walk_images(folder: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        out += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    return out


def discover_images(inputs: Sequence[str]) -> list[str]:
    """Image paths from folders (recursive, by extension), globs, list files (`@list.txt` or any
    `.txt`: one path per line) and plain files. Returns the sorted, de-duplicated list.
    Entries of list files are not checked here: an unreadable one is reported when decoded.
    An argument that matches nothing raises ValueError."""
    paths: list[str] = []
    for item in inputs:
        if item.startswith("@") or item.lower().endswith(".txt"):
            list_file = item[1:] if item.startswith("@") else item
            if not os.path.isfile(list_file):
                raise ValueError(f"images: list file {list_file!r} does not exist")
            paths += _read_list_file(list_file)
        elif os.path.isdir(item):
            paths += _walk_images(item)
        elif os.path.isfile(item):
            paths.append(item)
        elif glob.has_magic(item):
            matched = sorted(glob.glob(item, recursive=True))
            if not matched:
                raise ValueError(f"images: the glob {item!r} matches no file")
            for m in matched:
                paths += _walk_images(m) if os.path.isdir(m) else [m]
        else:
            raise ValueError(f"images: {item!r} is not a folder, file, glob or list file")
    return sorted({os.path.normpath(p) for p in paths})


# --------------------------------------------------------------------------------------------
# Decoding + eval transform
# --------------------------------------------------------------------------------------------
def eval_resize_size(img_size: int, crop_pct: float) -> int:
    """Shorter-side size before the center crop (timm: floor(img_size / crop_pct))."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct: expected a value in (0, 1], got {crop_pct}")
    return math.floor(img_size / crop_pct)


# Pillow's `reducing_gap` for the fast path: a downscale of more than 2x this factor first box-reduces by
# an integer factor (Image.reduce), then resamples the rest bicubically (the pixel distance this path keeps
# from the exact one is measured in benchmarks/RESULTS.md and bounded in tests/test_data.py).
REDUCING_GAP = 3.0


def resize_size(width: int, height: int, short: int) -> tuple[int, int]:
    """(width, height) after torchvision's Resize(short): the shorter side becomes `short`, the longer
    keeps the aspect ratio (truncated)."""
    return (short, int(short * height / width)) if width <= height else (int(short * width / height), short)


def crop_box(width: int, height: int, img_size: int) -> tuple[int, int, int, int]:
    """torchvision's CenterCrop(img_size) as a (left, top, right, bottom) box: offsets rounded half to even."""
    top, left = int(round((height - img_size) / 2.0)), int(round((width - img_size) / 2.0))
    return left, top, left + img_size, top + img_size


def reduced_decode(width: int, height: int, img_size: int, crop_pct: float) -> bool:
    """Whether the fast path decodes a JPEG of this size at reduced scale: its shorter side is at least
    twice the resize target. Smaller images take the exact path (identical pixels)."""
    return min(width, height) >= 2 * eval_resize_size(img_size, crop_pct)


def load_image(path, img_size: int, crop_pct: float = DEFAULT_CROP_PCT, *, exact: bool = False) -> Tensor:
    """Decode `path` (Pillow; a path or a binary file object) and apply the eval transform
    -> uint8 [3, img_size, img_size].

    exact=True: timm's eval transform bit for bit (full decode, bicubic resize, center crop).
    exact=False (the default): a JPEG whose shorter side is at least twice the resize target is decoded
    in the DCT domain at 1/2, 1/4 or 1/8 scale (Pillow's `draft`, never below the target size), and
    large downscales box-reduce first (`reducing_gap`); same geometry, pixels within a few levels of the
    exact path (benchmarks/RESULTS.md), several times faster on photos. Smaller images give the exact
    pixels. Raises (OSError, ValueError, ...) on unreadable, truncated or non-image files."""
    return _transform(path, img_size, crop_pct, exact)


def _transform(source, img_size: int, crop_pct: float, exact: bool, seconds: list[float] | None = None) -> Tensor:
    """`load_image`; with `seconds`, the decode and the resize/crop seconds are added to seconds[1], [2]."""
    from PIL import Image

    t0 = time.perf_counter()
    short = eval_resize_size(img_size, crop_pct)
    with Image.open(source) as im:
        size = resize_size(*im.size, short)
        if not exact and im.format == "JPEG" and reduced_decode(*im.size, img_size, crop_pct):
            im.draft("RGB", size)          # DCT scaling: the decoded image is still >= size
        im.load()                          # decode now: truncated files raise here, not later
        im = im.convert("RGB")
    t1 = time.perf_counter()
    if size != im.size:
        im = im.resize(size, Image.BICUBIC, reducing_gap=None if exact else REDUCING_GAP)
    arr = np.asarray(im.crop(crop_box(*size, img_size)), dtype=np.uint8)          # (S, S, 3)
    out = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()               # (3, S, S)
    if seconds is not None:
        seconds[1] += t1 - t0
        seconds[2] += time.perf_counter() - t1
    return out


def is_jpeg(data: bytes | Tensor) -> bool:
    """Whether encoded bytes start with a JPEG's SOI marker and a segment marker (FF D8 FF)."""
    head = bytes(data[:3].tolist()) if isinstance(data, Tensor) else bytes(data[:3])
    return head == b"\xff\xd8\xff"


def resize_crop(image: Tensor, img_size: int, crop_pct: float = DEFAULT_CROP_PCT) -> Tensor:
    """The eval transform on a decoded uint8 image [3, H, W] on any device (the GPU decode path): the
    shorter side resized to floor(img_size / crop_pct), center crop -> uint8 [3, S, S]. Pillow's resize
    done in torch: antialiased bicubic (the same filter), horizontal pass first, rounded to uint8
    between the passes as Pillow does; within one level of Pillow's pixels."""
    import torch.nn.functional as F

    _, h, w = image.shape
    new_w, new_h = resize_size(w, h, eval_resize_size(img_size, crop_pct))
    left, top, right, bottom = crop_box(new_w, new_h, img_size)
    x = image[None]
    if new_w != w:                         # horizontal pass, then keep the crop's columns only
        x = F.interpolate(x.float(), size=(h, new_w), mode="bicubic", align_corners=False, antialias=True)
        x = x.round_().clamp_(0, 255).to(torch.uint8)
    x = x[..., left:right]
    if new_h != h:
        x = F.interpolate(x.float(), size=(new_h, img_size), mode="bicubic", align_corners=False, antialias=True)
        x = x.round_().clamp_(0, 255).to(torch.uint8)
    return x[0, :, top:bottom].contiguous()


def decode_jpegs(datas: Sequence[Tensor], device) -> list[Tensor | Exception]:
    """Decode encoded JPEGs (uint8 1-D tensors) on `device` with torchvision (nvJPEG on CUDA), as RGB
    uint8 [3, H, W]; one batched call, then one by one if it fails, an image that still fails given as
    its exception."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return list(decode_jpeg(list(datas), mode=ImageReadMode.RGB, device=device))
    except Exception:                              # one bad file fails the batch: find which
        out: list[Tensor | Exception] = []
        for d in datas:
            try:
                out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
            except Exception as e:                 # noqa: BLE001 - reported per image by the caller
                out.append(e)
        return out


def gpu_decode_available() -> bool:
    """Whether JPEGs can be decoded on the GPU here: CUDA and torchvision's decode_jpeg."""
    if not torch.cuda.is_available():
        return False
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception:                              # not installed, or built without its image ops
        return False
    return True


# Stages of the decode pipeline that the workers time (`ImageDataset` items; `collate` sums them per batch).
WORKER_STAGES = ("read", "decode", "resize")


class ImageDataset(torch.utils.data.Dataset):
    """Items (index, payload, error message or "", seconds [read, decode, resize]). The payload is the
    image uint8 [3, S, S] (the eval transform, `load_image`), or with encoded=True a JPEG's bytes as
    a uint8 1-D tensor, left to decode on the GPU (any other format is still decoded here). A file that
    cannot be read or decoded yields a zero image and its error instead of raising, so one bad file
    never stops a run."""

    def __init__(self, paths: Sequence[str], img_size: int, crop_pct: float = DEFAULT_CROP_PCT, *,
                 exact: bool = False, encoded: bool = False):
        self.paths, self.img_size, self.crop_pct = list(paths), int(img_size), float(crop_pct)
        self.exact, self.encoded = bool(exact), bool(encoded)
        eval_resize_size(self.img_size, self.crop_pct)           # a bad crop_pct fails here, not per image

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        seconds = [0.0, 0.0, 0.0]
        try:
            t0 = time.perf_counter()
            with open(self.paths[i], "rb") as f:
                data = f.read()
            seconds[0] = time.perf_counter() - t0
            if self.encoded and is_jpeg(data):
                return i, torch.frombuffer(bytearray(data), dtype=torch.uint8), "", seconds
            return i, _transform(io.BytesIO(data), self.img_size, self.crop_pct, self.exact, seconds), "", seconds
        except Exception as e:          # any decoder failure is a per-image error, never fatal
            return i, torch.zeros(3, self.img_size, self.img_size, dtype=torch.uint8), f"{type(e).__name__}: {e}", \
                seconds


def collate(items):
    """A batch of ImageDataset items: (indices [B] int64, payloads, errors [B], seconds [3] summed). Payloads
    are stacked into uint8 [B, 3, S, S] when every item is a decoded image, else kept as a list."""
    indices = torch.tensor([it[0] for it in items], dtype=torch.int64)
    payloads = [it[1] for it in items]
    if all(p.dim() == 3 for p in payloads):
        payloads = torch.stack(payloads)
    return indices, payloads, [it[2] for it in items], [sum(it[3][k] for it in items) for k in range(3)]


def default_workers() -> int:
    """Decode workers: the cores this process may use, shared among the ranks of one machine (torchrun's
    LOCAL_WORLD_SIZE)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:                     # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def make_loader(paths: Sequence[str], img_size: int, batch_size: int, workers: int,
                crop_pct: float = DEFAULT_CROP_PCT, pin_memory: bool = False, *, exact: bool = False,
                encoded: bool = False) -> torch.utils.data.DataLoader:
    """In-order DataLoader over ImageDataset: batches (indices [B], payloads, errors, seconds), see `collate`."""
    return torch.utils.data.DataLoader(
        ImageDataset(paths, img_size, crop_pct, exact=exact, encoded=encoded), batch_size=batch_size,
        shuffle=False, num_workers=workers, collate_fn=collate, pin_memory=pin_memory and not encoded,
        drop_last=False, persistent_workers=False, prefetch_factor=4 if workers > 0 else None)


def gpu_decoded(loader: Iterable, img_size: int, crop_pct: float, device, *, exact: bool = False,
                seconds: dict | None = None) -> Iterator:
    """The batches of an `encoded=True` loader with their JPEGs decoded on `device` (`decode_jpegs`) and
    transformed there (`resize_crop`): (indices, images uint8 [B, 3, S, S] on device, errors, seconds).
    A JPEG the GPU decoder rejects is decoded on the CPU instead (`load_image`); one that fails there too
    keeps its error. `seconds` (a dict), when given, collects "gpu decode" (wall time, device synchronised)."""
    for indices, payloads, errors, worker_seconds in loader:
        if isinstance(payloads, Tensor):                   # every file was decoded by the workers
            yield indices, payloads.to(device, non_blocking=True), errors, worker_seconds
            continue
        t0 = time.perf_counter()
        errors = list(errors)
        jpeg = [j for j, p in enumerate(payloads) if p.dim() == 1 and not errors[j]]
        decoded = dict(zip(jpeg, decode_jpegs([payloads[j] for j in jpeg], device))) if jpeg else {}
        images = []
        for j, p in enumerate(payloads):
            img = decoded.get(j)
            if isinstance(img, Tensor):
                images.append(resize_crop(img, img_size, crop_pct))
                continue
            if img is not None:                            # nvJPEG refused it: the CPU path, one by one
                try:
                    p = load_image(io.BytesIO(p.numpy().tobytes()), img_size, crop_pct, exact=exact)
                except Exception as e:                     # noqa: BLE001 - reported per image by the caller
                    errors[j] = f"{type(e).__name__}: {e}"
                    p = torch.zeros(3, img_size, img_size, dtype=torch.uint8)
            images.append(p.to(device, non_blocking=True))
        batch = torch.stack(images)
        if seconds is not None:
            if batch.is_cuda:
                torch.cuda.synchronize(batch.device)
            seconds["gpu decode"] = seconds.get("gpu decode", 0.0) + time.perf_counter() - t0
        yield indices, batch, errors, worker_seconds


def good_batches(loader: Iterable, batch_size: int, on_error, seconds: dict | None = None
                 ) -> Iterator[tuple[list[int], Tensor]]:
    """Drop undecodable images (calling on_error(index, message) for each) and re-pack the rest into
    full batches of `batch_size` (the last may be partial): (indices, images uint8 [b, 3, S, S]).
    `loader` yields (indices, images [B, 3, S, S], errors, worker seconds [read, decode, resize]);
    `seconds` (a dict), when given, sums the worker seconds per stage."""
    idx_buf: list[int] = []
    img_buf: list[Tensor] = []
    filled = 0
    for indices, images, errors, worker_seconds in loader:
        if seconds is not None:
            for stage, sec in zip(WORKER_STAGES, worker_seconds):
                seconds[stage] = seconds.get(stage, 0.0) + sec
        keep = [j for j, err in enumerate(errors) if not err]
        for j, err in enumerate(errors):
            if err:
                on_error(int(indices[j]), err)
        if not keep:
            continue
        if len(keep) < len(errors):
            images = images[keep]
        idx_buf += [int(indices[j]) for j in keep]
        img_buf.append(images)
        filled += len(keep)
        while filled >= batch_size:
            cat = torch.cat(img_buf) if len(img_buf) > 1 else img_buf[0]
            yield idx_buf[:batch_size], cat[:batch_size]
            idx_buf, img_buf = idx_buf[batch_size:], [cat[batch_size:]] if filled > batch_size else []
            filled -= batch_size
    if filled:
        yield idx_buf, torch.cat(img_buf) if len(img_buf) > 1 else img_buf[0]
