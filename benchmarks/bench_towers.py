"""The vision towers of today's VLMs, as Hugging Face runs them and on vitfast (`vitfast.optimize`): images/s and
each one's error against HF in float32, in one run.

Towers, built from each model's config with random weights (nothing is downloaded), inputs as the model's
processor lays them out:
  gemma4         Gemma4VisionModel at Gemma 4 31B's / 26B-A4B's config (1152 wide, 27 blocks, 16 heads of 72,
                 the gated MLP unclipped, standardized): 2520 patches of 16 px per image (280 soft tokens), batch 8
  gemma4_e4b     the same at Gemma 4 E2B's / E4B's (768 wide, 16 blocks, 12 heads of 64, clipped linears), batch 8
  siglip         SiglipVisionModel at so400m-patch14-384's config (Gemma 3's, PaliGemma 2's, LLaVA-OneVision's
                 tower), 384 px, batch 32
  dinov2         Dinov2Model at DINOv2-L/14's config, 224 px, batch 64
  qwen2_5_vl     Qwen2.5-VL-7B's tower (Qwen2_5_VisionTransformerPretrainedModel): 4 images of 1008 x 1008 px packed
                 into one sequence (5184 patches each), windowed and full-attention blocks
  mllama         MllamaVisionModel at Llama 3.2 11B / 90B Vision's config: images of 2 x 2 tiles of 448 px (4100
                 tokens), the 32 local and 8 gated global blocks, batch 8
  sam            SamVisionModel at SAM ViT-H's config (1280 wide, 32 blocks, 16 heads of 80): 1024 px (64 x 64
                 patches), 14 x 14 windows and 4 global blocks with relative positions, the neck, batch 4
  sam3           Sam3VisionModel at SAM 3's config (its ViT: 1024 wide, 32 blocks, 16 heads of 64): 1008 px (72 x 72
                 patches), 24 x 24 windows and 4 global blocks with the axial RoPE, the FPN neck, batch 4
  radio          RadioModel at C-RADIO v4-H's config (1280 wide, 32 blocks, 16 heads of 80, 3 class tokens and 7
                 registers): 768 x 768 px (2304 patches of 16), batch 16
  vjepa2         VJEPA2Model at V-JEPA 2 ViT-L's config (1024 wide, 24 blocks, 16 heads of 64): clips of 16 frames
                 at 256 px (2048 tubelet tokens), the encoder alone (skip_predictor), batch 8
  blip2          Blip2VisionModel at BLIP-2's config (EVA ViT-g / 14: 1408 wide, 39 blocks, 16 heads of 88), 224 px,
                 batch 64
  eomt           EomtForUniversalSegmentation at EoMT-L's config (DINOv2-L: 1024 wide, 24 blocks, 16 heads of 64, 4
                 registers; 200 queries in the last 4 blocks, 133 COCO panoptic classes): 640 px (1600 patches of
                 16), the mask and class heads (masks upscaled to 160 x 160), batch 8
  sapiens2       Sapiens2Model at Sapiens2-0.4B's config (1024 wide, 24 blocks, 16 heads of 64, 8 of them grouped-query
                 with 8 key / value heads, q / k norms, 8 registers): 1024 x 768 px (3072 patches of 16), batch 8;
                 skipped where the installed transformers has no Sapiens2
  vitpose        VitPoseForPoseEstimation at ViTPose-B's config (768 wide, 12 blocks, 12 heads of 64) with its simple
                 heatmap head: person crops of 256 x 192 px (192 patches of 16), batch 64
  videomae       VideoMAEModel at VideoMAE-B's config (768 wide, 12 blocks, 12 heads of 64): clips of 16 frames at
                 224 px (1568 tubelet tokens of 2 x 16 x 16), batch 8
  yolos          YolosForObjectDetection at YOLOS-S's config (384 wide, 12 blocks, 6 heads of 64, 100 detection
                 tokens, no mid position tables) with its heads: 800 x 1333 px (4251 tokens), batch 4
  dpt            DPTForDepthEstimation at DPT-Large's config (1024 wide, 24 blocks, 16 heads of 64; the neck and
                 depth head): 384 x 384 px (577 tokens), batch 8
  timesformer    TimesformerModel at TimeSformer-B's config (768 wide, 12 blocks, 12 heads of 64, divided space-time
                 attention): clips of 8 frames at 224 px (1569 tokens), batch 8
  vitdet         VitDetModel at ViTMatte-B's backbone config (768 wide, 12 blocks, 12 heads of 64: 8 in windows of
                 14 with relative positions, 4 global with residual conv blocks): 1024 px (4096 patches), batch 2
  beit           BeitModel at BEiT-B/16's fine-tuned config (768 wide, 12 blocks, 12 heads of 64, a relative position
                 bias per block, layer-scales, mean pooling): 224 px (197 tokens), batch 64
  vivit          VivitModel at ViViT-B's config (768 wide, 12 blocks, 12 heads of 64, spatio-temporal attention): clips
                 of 32 frames at 224 px (3137 tokens of 2 x 16 x 16 tubelets), batch 4
Methods, the same weights and inputs:
  hf        HF's model in bf16, eager, with its default attention (SDPA)
  vitfast   vitfast.optimize of that model (its CUDA graphs: eval mode, no grad)
rel err: ‖out − HF fp32‖ / ‖HF fp32‖ over the tower's last_hidden_state (ViTPose's heatmaps, DPT's depth)
(`vitfast.testing.rel_err`), for HF bf16 itself and for vitfast.
Without CUDA: small configs in fp32 at batch 2 (a dry run of the script: says nothing about GPU speed).

    python benchmarks/bench_towers.py [--towers gemma4,siglip] [--time-budget 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
import time
from pathlib import Path

import torch

import vitfast
from vitfast.testing import perturbed, rel_err
from vitfast.timing import bench

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def _grid(w: int, h: int, batch: int) -> torch.Tensor:
    """Gemma 4's patch positions: (x, y) of a w x h grid, row by row, for each image -> [batch, w·h, 2]."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([xs, ys], -1).reshape(1, -1, 2).repeat(batch, 1, 1)


def gemma4(small: bool, batch: int, on_device: bool = False):
    import transformers as T

    if small:
        size = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
                    num_key_value_heads=3, head_dim=16, patch_size=4, position_embedding_size=64)
        w, h = 6, 6
    elif on_device:
        size = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=16, num_attention_heads=12,
                    num_key_value_heads=12, head_dim=64, patch_size=16)
        w, h = 60, 42                   # 2520 patches: 280 soft tokens after the 3 x 3 pooling
    else:
        size = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    num_key_value_heads=16, head_dim=72, patch_size=16)
        w, h = 60, 42
    cfg = T.Gemma4VisionConfig(**size, pooling_kernel_size=3, use_clipped_linears=on_device,
                               standardize=not on_device)
    P = cfg.patch_size
    inputs = dict(pixel_values=torch.rand(batch, w * h, 3 * P * P), pixel_position_ids=_grid(w, h, batch))
    return T.Gemma4VisionModel(cfg), inputs, w * h


def siglip(small: bool, batch: int):
    import transformers as T

    size = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3, image_size=32,
                patch_size=8) if small else dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                                 num_attention_heads=16, image_size=384, patch_size=14)
    cfg = T.SiglipVisionConfig(**size)
    n = (cfg.image_size // cfg.patch_size) ** 2
    return T.SiglipVisionModel(cfg), dict(pixel_values=torch.randn(batch, 3, cfg.image_size, cfg.image_size)), n


def dinov2(small: bool, batch: int):
    import transformers as T

    size = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3, image_size=32,
                patch_size=8) if small else dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                 num_attention_heads=16, image_size=518, patch_size=14)
    cfg = T.Dinov2Config(**size)
    px = 32 if small else 224
    return T.Dinov2Model(cfg), dict(pixel_values=torch.randn(batch, 3, px, px)), (px // cfg.patch_size) ** 2 + 1


def qwen2_5_vl(small: bool, batch: int):
    import transformers as T

    size = dict(depth=2, hidden_size=48, intermediate_size=96, num_heads=3, out_hidden_size=64, window_size=32,
                fullatt_block_indexes=[1], patch_size=4) if small else \
        dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, window_size=112,
             fullatt_block_indexes=[7, 15, 23, 31], patch_size=14)
    cfg = T.Qwen2_5_VLVisionConfig(**size, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    side = 8 if small else 72                  # patches per side: 1008 px at patch 14
    grid = torch.tensor([[1, side, side]] * batch)
    P = cfg.patch_size
    inputs = dict(hidden_states=torch.randn(batch * side * side, 3 * 2 * P * P), grid_thw=grid)
    tower = T.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel(cfg)
    return tower, inputs, side * side


def mllama(small: bool, batch: int):
    import transformers as T

    size = dict(hidden_size=48, attention_heads=3, num_hidden_layers=4, num_global_layers=2, intermediate_size=96,
                image_size=16, patch_size=8, intermediate_layers_indices=[1, 3], vision_output_dim=144) if small \
        else {}                                     # the config's defaults are Llama 3.2 11B / 90B Vision's
    cfg = T.MllamaVisionConfig(**size)
    S, tiles = cfg.image_size, cfg.max_num_tiles
    inputs = dict(pixel_values=torch.randn(batch, 1, tiles, 3, S, S),             # one image per prompt, 2 x 2 tiles
                  aspect_ratio_ids=torch.full((batch, 1), 6),                   # [2, 2]: id 6
                  aspect_ratio_mask=torch.ones(batch, 1, tiles, dtype=torch.long))
    return T.MllamaVisionModel(cfg), inputs, tiles * ((S // cfg.patch_size) ** 2 + 1)


def sam(small: bool, batch: int):
    import transformers as T

    size = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, mlp_dim=96, output_channels=16,
                image_size=32, patch_size=4, window_size=3, global_attn_indexes=[1]) if small else \
        dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, mlp_dim=5120,
             global_attn_indexes=[7, 15, 23, 31])              # ViT-H; the rest of the config's defaults are SAM's
    cfg = T.SamVisionConfig(**size)
    S = cfg.image_size
    return T.SamVisionModel(cfg), dict(pixel_values=torch.randn(batch, 3, S, S)), (S // cfg.patch_size) ** 2


def sam3(small: bool, batch: int):
    import transformers as T

    vit = T.Sam3ViTConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
                          image_size=40, patch_size=4, window_size=4, global_attn_indexes=[1],
                          pretrain_image_size=16) if small else T.Sam3ViTConfig()          # SAM 3's defaults
    G = vit.image_size // vit.patch_size
    cfg = T.Sam3VisionConfig(backbone_config=vit, fpn_hidden_size=16 if small else 256,
                             backbone_feature_sizes=[[4 * G, 4 * G], [2 * G, 2 * G], [G, G]])
    return T.Sam3VisionModel(cfg), dict(pixel_values=torch.randn(batch, 3, vit.image_size, vit.image_size)), G * G


def radio(small: bool, batch: int):
    import transformers as T

    cfg = T.RadioConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, mlp_ratio=2.0, patch_size=4,
                        max_img_size=48, num_cls_tokens=2, num_registers=3, summary_idxs=[0, 1]) if small else \
        T.RadioConfig()                                                       # C-RADIO v4-H's defaults
    S = 32 if small else 768
    tokens = (S // cfg.patch_size) ** 2 + cfg.num_cls_tokens + cfg.num_registers
    return T.RadioModel(cfg), dict(pixel_values=torch.rand(batch, 3, S, S)), tokens


def vjepa2(small: bool, batch: int):
    import transformers as T

    cfg = T.VJEPA2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, crop_size=32, frames_per_clip=4,
                         patch_size=8, tubelet_size=2, pred_hidden_size=24, pred_num_hidden_layers=1,
                         pred_num_attention_heads=2) if small else T.VJEPA2Config(frames_per_clip=16)   # ViT-L
    F, S = cfg.frames_per_clip, cfg.crop_size
    inputs = dict(pixel_values_videos=torch.randn(batch, F, 3, S, S), skip_predictor=True)
    return T.VJEPA2Model(cfg), inputs, F // cfg.tubelet_size * (S // cfg.patch_size) ** 2


def blip2(small: bool, batch: int):
    import transformers as T

    cfg = T.Blip2VisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
                              image_size=32, patch_size=8) if small else T.Blip2VisionConfig()   # EVA ViT-g / 14
    S = cfg.image_size
    return T.Blip2VisionModel(cfg), dict(pixel_values=torch.randn(batch, 3, S, S)), (S // cfg.patch_size) ** 2 + 1


def eomt(small: bool, batch: int):
    import transformers as T

    cfg = T.EomtConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, mlp_ratio=2, image_size=32,
                       patch_size=8, num_blocks=1, num_queries=5, num_register_tokens=2) if small else \
        T.EomtConfig(num_labels=133)                                # EoMT-L's defaults, COCO panoptic's classes
    model = T.EomtForUniversalSegmentation(cfg)
    model.attn_mask_probs.zero_()                                   # as a trained model has them
    S = cfg.image_size
    return model, dict(pixel_values=torch.randn(batch, 3, S, S)), (S // cfg.patch_size) ** 2 + \
        1 + cfg.num_register_tokens + cfg.num_queries


def sapiens2(small: bool, batch: int):
    import transformers as T

    cfg = T.Sapiens2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_attention_heads=2, num_first_full_attention_layers=1,
                           num_last_full_attention_layers=1, num_register_tokens=2, patch_size=8) if small else \
        T.Sapiens2Config()                                          # Sapiens2-0.4B's defaults
    H, W = (32, 24) if small else (1024, 768)
    P = cfg.patch_size
    return T.Sapiens2Model(cfg), dict(pixel_values=torch.randn(batch, 3, H, W)), \
        (H // P) * (W // P) + 1 + cfg.num_register_tokens


def vitpose(small: bool, batch: int):
    import transformers as T

    size = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, mlp_ratio=2, image_size=[64, 48]) \
        if small else {}                                            # ViTPose-B's defaults
    cfg = T.VitPoseConfig(backbone_config=dict(model_type="vitpose_backbone", out_indices=[-1], **size),
                          num_labels=17)                            # COCO's keypoints
    H, W = cfg.backbone_config.image_size
    P = cfg.backbone_config.patch_size[0]
    return T.VitPoseForPoseEstimation(cfg), dict(pixel_values=torch.randn(batch, 3, H, W)), (H // P) * (W // P)


def videomae(small: bool, batch: int):
    import transformers as T

    cfg = T.VideoMAEConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96,
                           image_size=32, patch_size=8, num_frames=4) if small else T.VideoMAEConfig()   # VideoMAE-B
    F, S, P = cfg.num_frames, cfg.image_size, cfg.patch_size
    return T.VideoMAEModel(cfg), dict(pixel_values=torch.randn(batch, F, 3, S, S)), \
        F // cfg.tubelet_size * (S // P) ** 2


def yolos(small: bool, batch: int):
    import transformers as T

    size = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96, image_size=[32, 48],
                patch_size=8, num_detection_tokens=5) if small else \
        dict(hidden_size=384, num_attention_heads=6, intermediate_size=1536, image_size=[800, 1333])   # YOLOS-S
    cfg = T.YolosConfig(**size, use_mid_position_embeddings=False, num_labels=91)
    H, W = cfg.image_size
    P = cfg.patch_size
    return T.YolosForObjectDetection(cfg), dict(pixel_values=torch.randn(batch, 3, H, W)), \
        1 + (H // P) * (W // P) + cfg.num_detection_tokens


def dpt(small: bool, batch: int):
    import transformers as T

    size = dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=3, intermediate_size=96, image_size=32,
                patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 24, 32],
                fusion_hidden_size=16) if small else \
        dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,   # DPT-Large
             backbone_out_indices=[5, 11, 17, 23], neck_hidden_sizes=[256, 512, 1024, 1024])
    cfg = T.DPTConfig(**size)
    model = perturbed(T.DPTForDepthEstimation(cfg))                 # off the init, whose neck passes nothing on
    with torch.no_grad():
        model.head.head[-2].bias.fill_(1.0)                         # depth above the final ReLU (not all zeros)
    S = cfg.image_size
    return model, dict(pixel_values=torch.randn(batch, 3, S, S)), (S // cfg.patch_size) ** 2 + 1


def timesformer(small: bool, batch: int):
    import transformers as T

    cfg = T.TimesformerConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96,
                              image_size=32, patch_size=8, num_frames=4) if small else T.TimesformerConfig()   # -B
    F, S, P = cfg.num_frames, cfg.image_size, cfg.patch_size
    return T.TimesformerModel(cfg), dict(pixel_values=torch.randn(batch, F, 3, S, S)), 1 + F * (S // P) ** 2


def vitdet(small: bool, batch: int):
    import transformers as T

    size = dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=3, mlp_ratio=2, image_size=32,
                pretrain_image_size=32, patch_size=8, window_size=3, window_block_indices=[0, 2],
                residual_block_indices=[1, 3]) if small else \
        dict(image_size=1024, window_size=14, window_block_indices=[0, 1, 3, 4, 6, 7, 9, 10],
             residual_block_indices=[2, 5, 8, 11])                  # ViTMatte-B's backbone
    cfg = T.VitDetConfig(**size, use_relative_position_embeddings=True)
    S, P = cfg.image_size, cfg.patch_size
    return T.VitDetModel(cfg), dict(pixel_values=torch.randn(batch, 3, S, S)), (S // P) ** 2


def beit(small: bool, batch: int):
    import transformers as T

    size = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96, image_size=32,
                patch_size=8) if small else {}                       # BEiT-B/16 at 224 px
    cfg = T.BeitConfig(**size, use_relative_position_bias=True, use_mean_pooling=True)
    model = perturbed(T.BeitModel(cfg))
    with torch.no_grad():                                           # tables of a trained model's size, not init's 0
        for layer in model.layers:
            layer.relative_position_bias.relative_position_bias_table.normal_(0.0, 1.5)
    S = cfg.image_size
    return model, dict(pixel_values=torch.randn(batch, 3, S, S)), (S // cfg.patch_size) ** 2 + 1


def vivit(small: bool, batch: int):
    import transformers as T

    cfg = T.VivitConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96,
                        image_size=32, num_frames=4, tubelet_size=[2, 8, 8]) if small else T.VivitConfig()   # -B
    F, S, (t, P, _) = cfg.num_frames, cfg.image_size, cfg.tubelet_size
    return T.VivitModel(cfg), dict(pixel_values=torch.randn(batch, F, 3, S, S)), 1 + F // t * (S // P) ** 2


# the output compared with HF's, where not last_hidden_state
OUTPUT = {"vitpose": "heatmaps", "dpt": "predicted_depth"}
# name -> (builder, GPU batch)
TOWERS = {"gemma4": (gemma4, 8), "gemma4_e4b": (lambda small, batch: gemma4(small, batch, on_device=True), 8),
          "siglip": (siglip, 32), "dinov2": (dinov2, 64), "qwen2_5_vl": (qwen2_5_vl, 4), "mllama": (mllama, 8),
          "sam": (sam, 4), "sam3": (sam3, 4), "radio": (radio, 16), "vjepa2": (vjepa2, 8), "blip2": (blip2, 64),
          "eomt": (eomt, 8), "sapiens2": (sapiens2, 8), "vitpose": (vitpose, 64),
          "videomae": (videomae, 8), "yolos": (yolos, 4), "dpt": (dpt, 8),
          "timesformer": (timesformer, 8), "vitdet": (vitdet, 2), "beit": (beit, 64), "vivit": (vivit, 4)}


def run_tower(name: str, small: bool, batch: int, dtype: torch.dtype, rep_ms: float) -> list[dict]:
    """The rows of one tower: HF in `dtype`, then vitfast, each timed, each compared with HF in float32."""
    build, _ = TOWERS[name]
    torch.manual_seed(0)
    try:
        with torch.device(DEVICE):
            model, inputs, tokens = build(small, batch)
    except AttributeError as e:                        # a model this transformers does not have yet
        import transformers

        return [dict(tower=name, method=m, batch=batch, tokens=None, ms=None, images_per_s=None, rel_err=None,
                     error=f"skipped (transformers {transformers.__version__}: {e})"[:300]) for m in ("hf", "vitfast")]
    model = model.to(DEVICE).eval()
    inputs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}   # and flags
    low_inputs = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                  for k, v in inputs.items()}
    key = OUTPUT.get(name, "last_hidden_state")
    with torch.no_grad():
        ref = getattr(model(**inputs), key)
        low = copy.deepcopy(model).to(dtype)
        del model
        models = {"hf": low, "vitfast": vitfast.optimize(low)}
        rows = []
        for method, m in models.items():
            row = dict(tower=name, method=method, batch=batch, tokens=tokens, dtype=str(dtype).replace("torch.", ""),
                       attention=getattr(low.config, "_attn_implementation", None), ms=None, images_per_s=None,
                       rel_err=None, error=None)
            try:
                row["rel_err"] = rel_err(getattr(m(**low_inputs), key), ref)
                row["ms"] = bench(lambda m=m: m(**low_inputs), device=DEVICE, rep_ms=rep_ms, cpu_reps=2)
                row["images_per_s"] = batch / row["ms"] * 1e3
            except Exception as e:                     # a failed method is reported, the others still run
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
    del models, low
    if HAS_CUDA:
        torch.cuda.empty_cache()
    return rows


def markdown(rows: list[dict], where: str) -> str:
    import transformers

    lines = [f"# bench_towers on {where}, torch {torch.__version__}, transformers {transformers.__version__}, "
             f"{datetime.date.today()}", "",
             "| tower | batch | tokens / image | method | ms | images/s | vs hf | rel err vs HF fp32 |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    base = {r["tower"]: r["ms"] for r in rows if r["method"] == "hf"}
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['tower']} | {r['batch']} | {r['tokens']} | {r['method']} | {r['error']} | | | |")
            continue
        vs = f"{base[r['tower']] / r['ms']:.2f}x" if base.get(r["tower"]) else "–"
        lines.append(f"| {r['tower']} | {r['batch']} | {r['tokens']} | {r['method']} | {r['ms']:.2f} | "
                     f"{r['images_per_s']:.1f} | {vs} | {r['rel_err']:.2e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--towers", default=",".join(TOWERS), help=f"comma-separated, from {', '.join(TOWERS)}")
    p.add_argument("--batch-size", type=int, default=None, help="default: each tower's own on a GPU, 2 on CPU")
    p.add_argument("--time-budget", type=float, default=None, help="seconds: towers not started by then are "
                                                                   "listed as skipped")
    p.add_argument("--rep-ms", type=float, default=200, help="timing window per method (GPU)")
    p.add_argument("--json", help="write the results here as JSON")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.towers.split(",") if n.strip()]
    if not names or set(names) - set(TOWERS):
        p.error(f"--towers: expected a comma-separated subset of {','.join(TOWERS)}, got {args.towers!r}")
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    start = time.monotonic()
    rows = []
    for name in names:
        batch = args.batch_size or (TOWERS[name][1] if HAS_CUDA else 2)
        if args.time_budget is not None and time.monotonic() - start > args.time_budget:
            rows += [dict(tower=name, method=m, batch=batch, tokens=None, ms=None, images_per_s=None, rel_err=None,
                          error="skipped (time budget)") for m in ("hf", "vitfast")]
            continue
        rows += run_tower(name, not HAS_CUDA, batch, dtype, args.rep_ms)
    where = torch.cuda.get_device_name() if HAS_CUDA else "cpu (small configs: a dry run, says nothing about GPU speed)"
    text = markdown(rows, where)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": where, "torch": torch.__version__,
                                               "date": datetime.date.today().isoformat(), "rows": rows,
                                               "markdown": text}, indent=1))
    return 0 if all(r["error"] is None or r["error"].startswith("skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
