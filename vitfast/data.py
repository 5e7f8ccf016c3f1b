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
import math
import os
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


def load_image(path: str, img_size: int, crop_pct: float = DEFAULT_CROP_PCT) -> Tensor:
    """Decode `path` (Pillow) and apply the eval transform -> uint8 [3, img_size, img_size].
    Raises (OSError, ValueError, ...) on unreadable, truncated or non-image files."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()                       # decode now: truncated files raise here, not later
        im = im.convert("RGB")
    w, h = im.size
    short = eval_resize_size(img_size, crop_pct)
    # torchvision Resize(int): the shorter side becomes `short`, the longer keeps the aspect ratio
    new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), Image.BICUBIC)
    # torchvision CenterCrop: offsets rounded half to even, like int(round(...))
    top, left = int(round((new_h - img_size) / 2.0)), int(round((new_w - img_size) / 2.0))
    im = im.crop((left, top, left + img_size, top + img_size))
    arr = np.asarray(im, dtype=np.uint8)                          # (S, S, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()   # (3, S, S)


class ImageDataset(torch.utils.data.Dataset):
    """Items (index, image uint8 [3, S, S], error message or ""). A file that cannot be decoded
    yields a zero image and its error instead of raising, so one bad file never stops a run."""

    def __init__(self, paths: Sequence[str], img_size: int, crop_pct: float = DEFAULT_CROP_PCT):
        self.paths, self.img_size, self.crop_pct = list(paths), int(img_size), float(crop_pct)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, load_image(self.paths[i], self.img_size, self.crop_pct), ""
        except Exception as e:          # any decoder failure is a per-image error, never fatal
            return i, torch.zeros(3, self.img_size, self.img_size, dtype=torch.uint8), f"{type(e).__name__}: {e}"


def make_loader(paths: Sequence[str], img_size: int, batch_size: int, workers: int,
                crop_pct: float = DEFAULT_CROP_PCT, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """In-order DataLoader over ImageDataset: batches (indices [B], images uint8 [B, 3, S, S], errors)."""
    return torch.utils.data.DataLoader(
        ImageDataset(paths, img_size, crop_pct), batch_size=batch_size, shuffle=False, num_workers=workers,
        pin_memory=pin_memory, drop_last=False, persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None)


def good_batches(loader: Iterable, batch_size: int, on_error) -> Iterator[tuple[list[int], Tensor]]:
    """Drop undecodable images (calling on_error(index, message) for each) and re-pack the rest into
    full batches of `batch_size` (the last may be partial): (indices, images uint8 [b, 3, S, S])."""
    idx_buf: list[int] = []
    img_buf: list[Tensor] = []
    filled = 0
    for indices, images, errors in loader:
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
