"""Pixtral's vision encoder on vitfast: transformers' `PixtralVisionModel`, the vision tower of Pixtral-12B (in
`LlavaForConditionalGeneration`) and of Mistral Small 3.1 / 3.2 (`Mistral3ForConditionalGeneration`), which
`vitfast.optimize` copies with the tower replaced.

Pixtral takes images of any size in one padded batch pixel_values [n, C, H, W] with image_sizes [n, 2] (each image's
height and width, at the top left of its slot): each image's (height // P) x (width // P) patches, row by row, are
packed into one sequence, and every image attends within itself only. HF builds a dense [T, T] block-diagonal mask
for that (268 M entries for four 1024 x 1024 images), and its attention computes all T² scores of each head; vitfast
runs the attention kernel's varlen form (`ops.attention_qkv` with `cu_seqlens`): one launch for the batch, no mask,
no padding, the sum of each image's n² scores only. The patch embedding (a Conv2d without bias whose stride is its
kernel) is one `ops.linear` over the batch's patches gathered in that order; then an RMSNorm (ln_pre) and per block:
RMSNorm, the packed q / k / v GEMM (HF's three projections joined), the axial 2D RoPE on q and k (`ops.rope_qkv`:
the row's angles on the even frequencies, the column's on the odd ones), varlen attention, o_proj with the residual
in its epilogue, RMSNorm, the gated MLP (SiLU: gate and up as the packed SwiGLU fc1, the gating in its epilogue),
down_proj with the residual in its epilogue. No biases anywhere, as in HF's.

Output: HF's BaseModelOutputWithPooling (BaseModelOutput in transformers 5.17) with last_hidden_state [1, T, C] and,
with output_hidden_states, the embeddings and each block's output (an index or a list of indices, as a VLM's
`vision_feature_layer` asks, keeps only those, the others None, as HF's). The layout of a batch (which patch each
token is, its position, the segments) depends only on image_sizes and the padded size: it is made on the host once
per such batch (one read of image_sizes, as HF's own code reads it) and kept, and the CUDA graph of a forward is
keyed by the token count, the image count and the largest image, so batches of other image sizes with those replay
it with their layout as data. The stand-in holds HF's parameter tensors (an optimizer over either model trains
both). Not supported (named in the error): attention outputs, hidden_act other than SiLU.
"""

from __future__ import annotations

import sys
from collections import OrderedDict

import torch
from torch import Tensor, nn

from vitfast import ops
from vitfast.convert import UnsupportedFeatureError, _build, _Findings, _mlp_ratio
from vitfast.graphs import CUDAGraphRunner
from vitfast.hf_qwen import _norm_eps, kept_hidden_states, renamed_state
from vitfast.layers import Block, JoinedLinear, RMSNorm
from vitfast.reference import pixtral_patch_layout, qwen_rope_tables

# transformers class -> family
CLASSES = {"PixtralVisionModel": "pixtral"}
# HF's key -> the tower's (each replacement applied in turn)
_RENAME = (("transformer.layers.", "blocks."), (".attention_norm.", ".norm1."), (".ffn_norm.", ".norm2."),
           (".attention.o_proj.", ".attn.proj."), (".feed_forward.down_proj.", ".mlp.fc2."))


class PixtralTower(nn.Module):
    """The parameters of Pixtral's vision encoder in vitfast's layers (HF's tensors, adopted by `_build`):
    patch_conv, ln_pre, blocks (timm's Block with RMSNorms and the packed SwiGLU MLP: norm1, attn.qkv, attn.proj,
    norm2, mlp.fc1 = [gate | up], mlp.fc2), all without bias."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, hidden: int, in_chans: int, patch_size: int,
                 eps: float = 1e-5):
        super().__init__()
        self.patch_conv = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size, bias=False)
        self.ln_pre = RMSNorm(embed_dim, eps=eps)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio=_mlp_ratio(2 * hidden, embed_dim),
                                           qkv_bias=False, proj_bias=False, eps=eps, mlp="swiglu")
                                     for _ in range(depth)])
        for blk in self.blocks:
            blk.norm1, blk.norm2 = RMSNorm(embed_dim, eps=eps), RMSNorm(embed_dim, eps=eps)
            blk.mlp.fc1, blk.mlp.fc2 = nn.Linear(embed_dim, 2 * hidden, bias=False), nn.Linear(hidden, embed_dim,
                                                                                                bias=False)


def optimize_pixtral(model: nn.Module) -> HFPixtralVisionModel:
    """A transformers PixtralVisionModel -> its stand-in on vitfast (module docstring)."""
    name, cfg = type(model).__name__, model.config
    f = _Findings(f"Hugging Face {name}")
    layers = list(model.transformer.layers)
    act = getattr(cfg, "hidden_act", None)
    f.need(act == "silu", f"hidden_act={act!r} (supported: ['silu'], the gated MLP as SwiGLU)")
    f.patchify(model.patch_conv, "patch_conv", bias=False)
    norms = [model.ln_pre, *(n for layer in layers for n in (layer.attention_norm, layer.ffn_norm))]
    eps = {_norm_eps(n) for n in norms}
    f.need(len(eps) == 1 and None not in eps,
           f"norms (expected RMSNorms of one eps, got {sorted({type(n).__name__ for n in norms})} of eps {eps})")
    for i, layer in enumerate(layers):        # HF's projections have no bias, and the tower takes none
        for part, proj in [("attention", p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
                [("feed_forward", p) for p in ("gate_proj", "up_proj", "down_proj")]:
            m, where = getattr(getattr(layer, part), proj, None), f"transformer.layers.{i}.{part}.{proj}"
            f.linear(m, where, bias=False) and f.need(m.bias is None, f"{where} with bias")
        f.need(getattr(layer.attention, "dropout", 0.0) == 0.0 or not model.training,
               f"transformer.layers.{i}.attention dropout")
    f.check(False)
    state = renamed_state(model, _RENAME)
    for i in range(len(layers)):     # the packed qkv and fc1, joined from HF's projections after the build
        pre = f"blocks.{i}."
        state[pre + "attn.qkv.weight"] = torch.cat([state.pop(f"{pre}attention.{p}_proj.weight")
                                                    for p in "qkv"]).detach()
        state[pre + "mlp.fc1.weight"] = torch.cat([state.pop(f"{pre}feed_forward.{p}_proj.weight")
                                                   for p in ("gate", "up")]).detach()
    pe = model.patch_conv
    tower_cfg = dict(embed_dim=pe.out_channels, depth=len(layers), num_heads=layers[0].attention.num_heads,
                     hidden=layers[0].feed_forward.gate_proj.out_features, in_chans=pe.in_channels,
                     patch_size=pe.kernel_size[0], eps=eps.pop())
    tower = _build(tower_cfg, state, model, f, PixtralTower)
    for blk, layer in zip(tower.blocks, layers):
        a, m = layer.attention, layer.feed_forward
        blk.attn.qkv = JoinedLinear([(a.q_proj, "weight", None, None), (a.k_proj, "weight", None, None),
                                     (a.v_proj, "weight", None, None)])
        blk.mlp.fc1 = JoinedLinear([(m.gate_proj, "weight", None, None), (m.up_proj, "weight", None, None)])
    hf_module = sys.modules[type(model).__module__]       # its output class: BaseModelOutput in transformers 5.17
    output = getattr(hf_module, "BaseModelOutputWithPooling", None) or hf_module.BaseModelOutput
    return HFPixtralVisionModel(cfg, tower, model.patch_positional_embedding.inv_freq, output).train(model.training)


class HFPixtralVisionModel(nn.Module):
    """Stands in for a PixtralVisionModel: `forward(pixel_values, image_sizes=None, ...)` as HF's, returning HF's
    output object (module docstring). The tower's parameters are HF's tensors (`self.tower`). Its VLM reads
    `patch_size` from it, as from HF's."""

    _MAX_LAYOUTS = 32

    def __init__(self, config, tower: PixtralTower, inv_freq: Tensor, output: type):
        super().__init__()
        self.config, self.tower, self._output = config, tower, output
        self.patch_size = tower.patch_conv.kernel_size[0]
        # HF's frequencies [D / 2]: the row's (the even ones of a 1D RoPE) then the column's (the odd ones)
        self.register_buffer("inv_freq", inv_freq.detach().clone().reshape(2, -1), persistent=False)
        self._layouts: OrderedDict[tuple, dict] = OrderedDict()
        self.cuda_graphs = CUDAGraphRunner()

    @property
    def dtype(self) -> torch.dtype:
        return self.tower.patch_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.tower.patch_conv.weight.device

    def get_input_embeddings(self) -> nn.Module:
        return self.tower.patch_conv

    # ----------------------------------------------------------------------------------------
    def forward(self, pixel_values=None, image_sizes=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        if output_attentions or getattr(self.config, "output_attentions", False) and output_attentions is None:
            raise UnsupportedFeatureError("optimized model: unsupported argument output_attentions=True")
        sizes = self._check(pixel_values, image_sizes)
        lay = self._layout(sizes, pixel_values.shape[-2:], pixel_values.device)
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        keep = kept_hidden_states(output_hidden_states, len(self.tower.blocks) + 1)
        return self.cuda_graphs(self, self._forward, pixel_values, lay["where"], lay["cu"], lay["cos"], lay["sin"],
                                max_seqlen=lay["max"], keep=keep, return_dict=return_dict)

    def _check(self, pixel_values, image_sizes) -> list[tuple[int, int]]:
        """The arguments checked; -> each image's (height, width) (the one host read of the forward)."""
        pe = self.tower.patch_conv
        if not isinstance(pixel_values, Tensor) or pixel_values.dim() != 4 or pixel_values.shape[1] != pe.in_channels:
            got = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values: expected images [n, {pe.in_channels}, H, W], got {got}")
        n, _, H, W = pixel_values.shape
        P = self.patch_size
        if image_sizes is None:                  # each image fills its slot
            if H < P or W < P:
                raise ValueError(f"pixel_values: expected images of at least the patch size {P} x {P}, got {H} x {W}")
            return [(H, W)] * n
        if isinstance(image_sizes, Tensor):
            if image_sizes.is_floating_point() or image_sizes.is_complex():
                raise ValueError(f"image_sizes: expected integers (height, width) per image, got {image_sizes.dtype}")
            image_sizes = image_sizes.tolist()
        try:
            sizes = [(int(h), int(w)) for h, w in image_sizes]
        except (TypeError, ValueError):
            sizes = None
        if sizes is None or len(sizes) != n or any(not (P <= h <= H and P <= w <= W) for h, w in sizes):
            raise ValueError(f"image_sizes: expected {n} (height, width) pairs, each between the patch size {P} and "
                             f"the padded batch's {H} x {W}, got {image_sizes!r}")
        return sizes

    def _layout(self, sizes: list[tuple[int, int]], padded: tuple[int, int], device: torch.device) -> dict:
        """What the forward needs of a batch's image sizes, on the device: each token's patch, cu_seqlens and the
        largest image, the RoPE tables; made once per (sizes, padded size) and kept (least recently used dropped
        first)."""
        f64 = self.dtype == torch.float64
        key = (tuple(sizes), tuple(padded), device, f64, torch.is_inference_mode_enabled())
        hit = self._layouts.get(key)
        if hit is not None:
            self._layouts.move_to_end(key)
            return hit
        where, cu = pixtral_patch_layout(sizes, self.patch_size)
        cos, sin = qwen_rope_tables(where[:, 1:], self.inv_freq, torch.float64 if f64 else torch.float32)
        lay = dict(where=where.T.contiguous().to(device), cu=cu.to(device), cos=cos.to(device), sin=sin.to(device),
                   max=int((cu[1:] - cu[:-1]).max()))
        self._layouts[key] = lay
        while len(self._layouts) > self._MAX_LAYOUTS:
            self._layouts.popitem(last=False)
        return lay

    def _forward(self, pixels, where, cu, cos, sin, *, max_seqlen, keep, return_dict):
        tower = self.tower
        pe = tower.patch_conv
        P, dtype = self.patch_size, pe.weight.dtype
        n, c, H, W = pixels.shape
        grid = pixels.to(dtype)[:, :, :H // P * P, :W // P * P].reshape(n, c, H // P, P, W // P, P)
        patches = grid.permute(0, 2, 4, 1, 3, 5)[where[0], where[1], where[2]]           # (T, C, P, P): one gather
        x = ops.linear(patches.reshape(1, patches.shape[0], -1), pe.weight.reshape(pe.out_channels, -1), None)
        x = tower.ln_pre(x)                                                              # (1, T, C)
        kept = () if keep is None else keep
        hidden = [x if 0 in kept else None]
        for i, blk in enumerate(tower.blocks, 1):
            x = blk(x, rope=(cos, sin), cu_seqlens=cu, max_seqlen=max_seqlen)
            hidden.append(x if i in kept else None)
        states = None if keep is None else tuple(hidden)
        out = self._output(last_hidden_state=x, hidden_states=states)
        use_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        return out if use_dict else out.to_tuple()
