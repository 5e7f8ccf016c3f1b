"""`vitfast attention-map`: where the CLS token looks, drawn over the image.

    vitfast attention-map IMAGE --model NAME --checkpoint PATH --out map.png [--save-npy maps.npy]

Three kinds of map, each over the patch grid (gh x gw):
- per head and mean over heads: the last layer's CLS attention row (softmax of q_cls · kᵀ over the
  patch tokens), as the attention kernel returns it from `model(x, return_cls_attn=True)` — no
  T x T matrix is ever stored for these;
- attention rollout (Abnar & Zuidema, 2020): R = Π_l (0.5·A_l + 0.5·I) with A_l the head-mean
  attention of layer l, rows renormalised; the map is R's CLS row. Rollout needs every layer's full
  T x T attention matrix, which the fused kernel never forms, so it is computed honestly with the
  reference math (`vitfast.reference.attention_probs`) in float64 for this one image, on the same
  weights.
The maps are raw probabilities (the CLS token's weight on itself is left out, so a row sums to < 1).
`--save-npy` writes them as float32 [H + 2, gh, gw]: heads 0..H-1, then the mean, then the rollout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
from torch import Tensor

from vitfast import reference
from vitfast.data import DEFAULT_CROP_PCT, data_config, load_image

PROG = "vitfast attention-map"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Draw the last layer's CLS attention over an image.")
    p.add_argument("image")
    p.add_argument("--model", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--model-kwargs", default="{}", help="JSON of constructor overrides")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--save-npy", help="also save the maps, float32 [heads + 2, gh, gw] (heads, mean, rollout)")
    p.add_argument("--img-size", type=int)
    p.add_argument("--crop-pct", type=float, help=f"default: the model's, else {DEFAULT_CROP_PCT}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def reference_attention(model, name: str, model_kwargs: dict, x: Tensor) -> list[Tensor]:
    """Full attention probabilities of every layer, [H, T, T] each, float64 on the CPU, from the
    reference model holding `model`'s weights (x: normalised float images [1, 3, H, W])."""
    ref = reference.create_model(name, **model_kwargs)
    ref.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()}, strict=True)
    ref = ref.double().eval()
    x = x.detach().cpu().double()
    pe = ref.patch_embed
    with torch.no_grad():
        tokens = reference.patch_embed(x, pe.proj.weight, pe.proj.bias, ref.prefix_tokens(),
                                       ref._pos_embed_for(*x.shape[-2:]), None, None,
                                       not ref.no_embed_class)                              # (1, T, D)
        tokens, rope = ref.norm_pre(tokens), ref.rope_for(x)
        probs = []
        for blk in ref.blocks:
            qkv = blk.attn.qkv(blk.norm1(tokens))
            if rope is not None:
                qkv = reference.rope_qkv(qkv, blk.attn.num_heads, *rope)
            q, k, _ = reference.split_qkv(qkv, blk.attn.num_heads)                              # (1, H, T, Dh)
            probs.append(reference.attention_probs(q, k, blk.attn.scale)[0])                   # (H, T, T)
            tokens = blk(tokens, rope=rope)
    return probs


def attention_rollout(probs: list[Tensor]) -> Tensor:
    """Rollout from per-layer attention [H, T, T]: R = Π (0.5·mean_h A + 0.5·I), rows renormalised
    (first layer rightmost). Returns R [T, T]."""
    T = probs[0].shape[-1]
    eye = torch.eye(T, dtype=probs[0].dtype)
    R = eye
    for p in probs:
        a = 0.5 * p.mean(dim=0) + 0.5 * eye
        a = a / a.sum(dim=-1, keepdim=True)
        R = a @ R
    return R


def compute_maps(model, name: str, model_kwargs: dict, image: Tensor, mean, std, device) -> np.ndarray:
    """image uint8 [3, S, S] -> maps float32 [H + 2, gh, gw] (heads, head mean, rollout)."""
    x = reference.normalize_images(image[None], torch.tensor(mean), torch.tensor(std), torch.float32)  # (1, 3, S, S)
    if getattr(model, "cls_token", None) is None:
        raise ValueError("--model: the CLS attention map needs a model with a class token")
    P = model.patch_embed.proj.weight.shape[-2:]
    gh, gw = x.shape[-2] // P[0], x.shape[-1] // P[1]
    with torch.inference_mode():
        _, cls_attn = model.to(device)(x.to(device), return_cls_attn=True)
    last = cls_attn[-1][0].float().cpu()                          # (H, T)
    npt = getattr(model, "num_prefix_tokens", 1)                  # class, registers: before the patches
    heads = last[:, npt:].reshape(-1, gh, gw)                     # (H, gh, gw): CLS -> patches
    rollout = attention_rollout(reference_attention(model, name, model_kwargs, x))[0, npt:].reshape(1, gh, gw)
    return torch.cat([heads, heads.mean(dim=0, keepdim=True), rollout.float()]).numpy().astype(np.float32)


def draw(image: Tensor, maps: np.ndarray, out: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = image.permute(1, 2, 0).numpy()
    S_h, S_w = img.shape[:2]
    H = maps.shape[0] - 2
    ncols = max(3, min(H, 6))
    nrows = 1 + -(-H // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.8 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")

    def overlay(ax, m, label):
        ax.imshow(img)
        ax.imshow(m, cmap="inferno", alpha=0.6, extent=(0, S_w, S_h, 0), interpolation="bilinear")
        ax.set_title(label, fontsize=9)

    axes[0, 0].imshow(img)
    axes[0, 0].set_title("image", fontsize=9)
    overlay(axes[0, 1], maps[H], "CLS attention, mean of heads")
    overlay(axes[0, 2], maps[H + 1], "attention rollout")
    for h in range(H):
        overlay(axes[1 + h // ncols, h % ncols], maps[h], f"head {h}")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model_kwargs = json.loads(args.model_kwargs)
        if not isinstance(model_kwargs, dict):
            raise ValueError("not an object")
    except ValueError as e:
        print(f"{PROG}: error: --model-kwargs: expected a JSON object, got {args.model_kwargs!r} ({e})",
              file=sys.stderr)
        return 2
    for flag, path in (("image", args.image), ("--checkpoint", args.checkpoint)):
        if not os.path.isfile(path):
            print(f"{PROG}: error: {flag}: file {path!r} does not exist", file=sys.stderr)
            return 2
    from vitfast.engine import load_model

    if args.img_size is not None:
        model_kwargs["img_size"] = args.img_size
    try:
        model = load_model(args.model, args.checkpoint, **model_kwargs).float()
        cfg = data_config(model)
        img_size = args.img_size or int(model.patch_embed.img_size[0])
        image = load_image(args.image, img_size, args.crop_pct or cfg["crop_pct"])
        maps = compute_maps(model, args.model, model_kwargs, image, cfg["mean"], cfg["std"], args.device)
    except (ValueError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if args.save_npy:
        np.save(args.save_npy, maps)
    draw(image, maps, args.out, f"{args.model}: {os.path.basename(args.image)}")
    print(f"{PROG}: wrote {args.out}" + (f" and {args.save_npy}" if args.save_npy else ""), file=sys.stderr)
    return 0
