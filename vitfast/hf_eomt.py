"""EoMT on vitfast: transformers' `EomtForUniversalSegmentation` (the Encoder-only Mask Transformer, "Your ViT is
Secretly an Image Segmentation Model": a DINOv2 ViT with registers whose last num_blocks blocks also carry learned
query tokens; panoptic, instance and semantic segmentation from the queries) and `EomtDinov3ForUniversalSegmentation`
(the same on DINOv3: RoPE on the patch tokens instead of a position table) and `VideomtForUniversalSegmentation`
(VidEoMT: EoMT over the frames of a clip, the queries of each frame carried to the next through `query_updater`;
`HFVideomtForUniversalSegmentation`).

The model takes images pixel_values [B, C, H, W] of the configured size, as HF's. The patch embedding is one
`ops.patch_embed` with the class and register rows and the patches' position table (EoMT's; DINOv3's has none) in its
epilogue. Before block L - num_blocks the queries are put in front of the tokens, as HF puts them. Per block: the
LayerNorm, the packed q / k / v GEMM (HF's three projections joined; a key projection without bias gets a zero bias),
DINOv3's RoPE on q and k of the patch tokens (`ops.rope_qkv`, tables made once per grid), the attention, the output
projection with the layer-scale and the residual in its epilogue, the LayerNorm, fc1 with the GELU in its epilogue
(or the SwiGLU: gate and up in one GEMM, the gating in its epilogue), fc2 with the layer-scale and the residual. Then
the final LayerNorm and the prediction heads, as HF's: class logits from the queries (one GEMM), the mask head's three
linears (the activations in their epilogues), and the upscale blocks on the patch tokens kept channels-last: each
transposed 2 x 2 convolution as one GEMM (rows in (dy, dx, channel) order, the activation in its epilogue), the 3 x 3
depthwise convolution (torch's), the LayerNorm over channels; the mask logits are one batched GEMM of the queries and
the upscaled features.

Output: HF's EomtForUniversalSegmentationOutput: class_queries_logits, masks_queries_logits, last_hidden_state (after
the final norm), patch_offsets as given, with output_hidden_states (True, or an index or list of indices that keeps
only those) the embeddings and each block's output (the last slot holding last_hidden_state, as HF's), and with
mask_labels and class_labels HF's loss (its Hungarian matcher and criterion, HF's modules, over the final prediction
and, in train mode, over each query block's, as HF's). The stand-in holds HF's model (`self.model`, its forward
unused) and so its parameter tensors; on CUDA in eval mode without grad its forward replays a CUDA graph per input
shape. It trains.

EoMT's masked attention, where a query attends only to the patches its intermediate mask covers, is the start of its
training (annealed away: attn_mask_probs go from 1 to 0); a trained model has every attn_mask_probs at 0 and runs
without it, as HF's does then. Not supported (named in the error): attn_mask_probs above 0 (that masked attention),
attention outputs, dropout and drop-path in train mode, EoMT-DINOv3's train-time RoPE augmentations (pos_embed_shift /
jitter / rescale) in train mode, activations other than the GELUs and QuickGELU (the heads run the model's activation
in GEMM epilogues: EoMT-DINOv3's gated MLP with SiLU is refused).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitfast import ops
from vitfast.convert import UnsupportedFeatureError, _Findings
from vitfast.graphs import CUDAGraphRunner
from vitfast.hf_qwen import kept_hidden_states
from vitfast.hf_sam import _ACTIVATIONS
from vitfast.layers import JoinedLinear
from vitfast.reference import dinov3_rope

# transformers class -> family
CLASSES = {"EomtForUniversalSegmentation": "eomt", "EomtDinov3ForUniversalSegmentation": "eomt",
           "VideomtForUniversalSegmentation": "eomt"}


def _patch_conv(model: nn.Module) -> tuple[nn.Module, str]:
    """The patchify Conv2d: EoMT's embeddings.patch_embeddings.projection, EoMT-DINOv3's embeddings.patch_embeddings."""
    pe = model.embeddings.patch_embeddings
    return (pe.projection, "embeddings.patch_embeddings.projection") if hasattr(pe, "projection") else \
        (pe, "embeddings.patch_embeddings")


def _bias(m: nn.Module) -> str | None:
    return "bias" if m.bias is not None else None


def _mlp_parts(mlp: nn.Module) -> tuple[list, nn.Module, bool]:
    """A block's MLP as (fc1's parts for `JoinedLinear`, fc2, gated): EoMT's fc1 / fc2, EoMT-DINOv3's up_proj /
    down_proj, or the gated MLPs' gate_proj and up_proj (gate rows first) / down_proj, or EoMT's SwiGLU before
    transformers 5.2x: its packed weights_in (gate rows first) / weights_out."""
    if hasattr(mlp, "gate_proj"):
        return [(m, "weight", _bias(m), None) for m in (mlp.gate_proj, mlp.up_proj)], mlp.down_proj, True
    if hasattr(mlp, "weights_in"):
        return [(mlp.weights_in, "weight", _bias(mlp.weights_in), None)], mlp.weights_out, True
    fc1, fc2 = (mlp.fc1, mlp.fc2) if hasattr(mlp, "fc1") else (mlp.up_proj, mlp.down_proj)
    return [(fc1, "weight", _bias(fc1), None)], fc2, False


def _out_proj(attention: nn.Module) -> nn.Module:
    return attention.out_proj if hasattr(attention, "out_proj") else attention.o_proj


def _rope_augmented(cfg) -> list[str]:
    """EoMT-DINOv3's train-time moves of the RoPE coordinates its config asks for."""
    return [f"{k}={getattr(cfg, k)}" for k in ("pos_embed_shift", "pos_embed_jitter", "pos_embed_rescale")
            if getattr(cfg, k, None) is not None]


def _image_size(cfg) -> tuple[int, int]:
    return (cfg.image_size,) * 2 if isinstance(cfg.image_size, int) else tuple(cfg.image_size)


def optimize_eomt(model: nn.Module) -> HFEomtForUniversalSegmentation:
    """A transformers EomtForUniversalSegmentation, EomtDinov3ForUniversalSegmentation or
    VideomtForUniversalSegmentation -> its stand-in on vitfast (module docstring)."""
    name, cfg = type(model).__name__, model.config
    f = _Findings(f"Hugging Face {name}")
    dim, heads = cfg.hidden_size, cfg.num_attention_heads
    f.need(dim % heads == 0, f"hidden_size={dim} with num_attention_heads={heads}")
    rope = hasattr(model, "rope_embeddings")
    if rope:
        f.need((dim // heads) % 4 == 0, f"head dim {dim // heads} (DINOv3's RoPE needs a multiple of 4)")
        theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta")
        f.need(isinstance(theta, (int, float)), f"rope_parameters={getattr(cfg, 'rope_parameters', None)!r}")
        for aug in _rope_augmented(cfg):
            f.train_only.append(f"the RoPE augmentation {aug}")
    f.need(cfg.hidden_act in _ACTIVATIONS, f"hidden_act={cfg.hidden_act!r} (only {sorted(_ACTIVATIONS)}: the heads run "
                                           "it in GEMM epilogues)")
    f.need(1 <= cfg.num_blocks <= cfg.num_hidden_layers,
           f"num_blocks={cfg.num_blocks} with num_hidden_layers={cfg.num_hidden_layers}")
    conv, where = _patch_conv(model)
    f.patchify(conv, where)
    f.dropout(getattr(model.embeddings, "dropout", None), "embeddings.dropout")
    f.dropout(getattr(model, "dropout", None), "dropout")
    f.layer_norm_eps(model.layernorm, "layernorm", dim)
    for i, layer in enumerate(model.layers):
        where = f"layers.{i}"
        for n in ("norm1", "norm2"):
            f.layer_norm_eps(getattr(layer, n), f"{where}.{n}", dim)
        a = layer.attention
        for proj in ("q_proj", "k_proj", "v_proj"):
            f.linear(getattr(a, proj, None), f"{where}.attention.{proj}", bias=False)
        f.linear(_out_proj(a), f"{where}.attention output projection", bias=False)
        f.dropout(a.dropout, f"{where}.attention dropout")
        f.dropout(layer.drop_path, f"{where}.drop_path", "drop-path")
        fc1, fc2, _ = _mlp_parts(layer.mlp)
        for m, *_ in fc1:
            f.linear(m, f"{where}.mlp fc1", bias=False)
        f.linear(fc2, f"{where}.mlp fc2", bias=False)
    for n in ("fc1", "fc2", "fc3"):
        f.linear(getattr(model.mask_head, n), f"mask_head.{n}")
    f.linear(model.class_predictor, "class_predictor")
    video = hasattr(model, "query_updater")
    if video:
        f.linear(model.query_updater, "query_updater")
    for i, blk in enumerate(model.upscale_block.block):
        where, ct, dw = f"upscale_block.block.{i}", blk.conv1, blk.conv2
        f.need(isinstance(ct, nn.ConvTranspose2d) and tuple(ct.kernel_size) == tuple(ct.stride) == (2, 2)
               and tuple(ct.padding) == (0, 0) and tuple(ct.output_padding) == (0, 0)
               and tuple(ct.dilation) == (1, 1) and ct.groups == 1 and ct.in_channels == ct.out_channels == dim,
               f"{where}.conv1: {ct!r} (expected a 2 x 2, stride 2 ConvTranspose2d)")
        f.need(isinstance(dw, nn.Conv2d) and dw.groups == dw.in_channels == dw.out_channels == dim
               and tuple(dw.kernel_size) == (3, 3) and tuple(dw.padding) == (1, 1) and tuple(dw.stride) == (1, 1)
               and tuple(dw.dilation) == (1, 1), f"{where}.conv2: {dw!r} (expected a 3 x 3 depthwise Conv2d)")
        f.layer_norm_eps(blk.layernorm2d, f"{where}.layernorm2d", dim)
    f.one_dtype_device(model.parameters())
    f.check(model.training)
    output = getattr(sys.modules[type(model).__module__], name.replace("ForUniversalSegmentation",
                                                                       "ForUniversalSegmentationOutput"))
    cls = HFVideomtForUniversalSegmentation if video else HFEomtForUniversalSegmentation
    return cls(model, output).train(model.training)


class HFEomtForUniversalSegmentation(nn.Module):
    """Stands in for an EomtForUniversalSegmentation or EomtDinov3ForUniversalSegmentation
    (`forward(pixel_values, mask_labels=None, class_labels=None, patch_offsets=None, ...)`) as HF's, returning HF's
    output object (module docstring). HF's model is `self.model`; `self.joined` holds, per block, its q / k / v
    projections joined (and the gated MLP's gate and up), `JoinedLinear`s built from HF's tensors on each access while
    a gradient is recorded, so that they train, one cached copy otherwise."""

    def __init__(self, model: nn.Module, output: type):
        super().__init__()
        cfg = model.config
        self.config, self.model, self._output = cfg, model, output
        self.num_heads = cfg.num_attention_heads
        self.activation = _ACTIVATIONS[cfg.hidden_act]
        self.rope = hasattr(model, "rope_embeddings")
        self.joined = nn.ModuleList()
        for layer in model.layers:
            a = layer.attention
            fc1, *_ = _mlp_parts(layer.mlp)
            qkv = JoinedLinear([(m, "weight", _bias(m), None) for m in (a.q_proj, a.k_proj, a.v_proj)])
            self.joined.append(nn.ModuleDict(dict(qkv=qkv, fc1=JoinedLinear(fc1))))
        self._tables: dict[tuple, tuple[Tensor, Tensor]] = {}
        self._probs: tuple = (None, [])
        self.cuda_graphs = CUDAGraphRunner()

    @property
    def dtype(self) -> torch.dtype:
        return _patch_conv(self.model)[0].weight.dtype

    @property
    def device(self) -> torch.device:
        return _patch_conv(self.model)[0].weight.device

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def _masked_attention(self) -> list[float]:
        """attn_mask_probs above 0: read on the host once per value of HF's buffer (its data pointer and version)."""
        p = self.model.attn_mask_probs
        key = (p.data_ptr(), p._version, p.device)
        if self._probs[0] != key:
            self._probs = (key, [v for v in p.tolist() if v > 0])
        return self._probs[1]

    def _check(self, output_attentions, pixels, name: str, frames: bool) -> None:
        """The refusals every forward shares, and the input's shape: [B, C, S, S] ([B, F, C, S, S] with frames) at
        the configured size S."""
        cfg = self.config
        if output_attentions or getattr(cfg, "output_attentions", False) and output_attentions is None:
            raise UnsupportedFeatureError("optimized model: unsupported argument output_attentions=True")
        if self.training and self.rope and _rope_augmented(cfg):
            raise UnsupportedFeatureError(f"optimized model: train mode with the RoPE augmentations "
                                          f"{', '.join(_rope_augmented(cfg))}, which vitfast does not implement")
        C, size = _patch_conv(self.model)[0].in_channels, _image_size(cfg)
        want = (C, *size)
        if not isinstance(pixels, Tensor) or pixels.dim() != 4 + frames or tuple(pixels.shape[1 + frames:]) != want:
            got = tuple(pixels.shape) if isinstance(pixels, Tensor) else type(pixels).__name__
            layout = "videos [B, frames, " if frames else "images [B, "
            raise ValueError(f"{name}: expected {layout}{C}, {size[0]}, {size[1]}] (the configured size), got {got}")

    def _output_object(self, return_dict, **fields):
        out = self._output(**fields)
        use_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        return out if use_dict else out.to_tuple()

    def forward(self, pixel_values=None, mask_labels=None, class_labels=None, patch_offsets=None,
                output_hidden_states=None, output_attentions=None, return_dict=None, **kwargs):
        cfg = self.config
        self._check(output_attentions, pixel_values, "pixel_values", frames=False)
        if self._masked_attention():
            raise UnsupportedFeatureError(
                f"optimized model: attn_mask_probs={self.model.attn_mask_probs.tolist()}: EoMT's masked attention "
                "(the start of its training; a trained model has every attn_mask_probs at 0) is not supported")
        if output_hidden_states is None:
            output_hidden_states = getattr(cfg, "output_hidden_states", False)
        keep = kept_hidden_states(output_hidden_states, len(self.model.layers) + 1)
        masks, classes, x, hidden, per_block = self.cuda_graphs(self, self._forward, pixel_values, keep=keep,
                                                                per_block=self.training)
        loss = None
        if mask_labels is not None and class_labels is not None:              # HF's matcher and criterion
            loss = 0.0
            for m, c in (*per_block, (masks, classes)):
                loss_dict = self.model.get_loss_dict(masks_queries_logits=m, class_queries_logits=c,
                                                     mask_labels=mask_labels, class_labels=class_labels,
                                                     auxiliary_predictions=None)
                loss += self.model.get_loss(loss_dict)
        return self._output_object(return_dict, loss=loss, class_queries_logits=classes, masks_queries_logits=masks,
                                   last_hidden_state=x, hidden_states=None if keep is None else tuple(hidden),
                                   patch_offsets=patch_offsets)

    def _rope_tables(self, grid: tuple[int, int], device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key = (grid, device, dtype, torch.is_inference_mode_enabled())   # (inference tensors: never saved for backward)
        if key not in self._tables:
            work = torch.float64 if dtype == torch.float64 else torch.float32
            self._tables[key] = dinov3_rope(grid, self.config.hidden_size // self.num_heads,
                                            float(self.config.rope_parameters["rope_theta"]), work, device)
        return self._tables[key]

    def _embed(self, pixels: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Images [N, C, H, W] -> (tokens [N, 1 + registers + patches, D], the patch grid)."""
        emb, conv = self.model.embeddings, _patch_conv(self.model)[0]
        w, P = conv.weight, conv.kernel_size[0]
        prefix = torch.cat([emb.cls_token, emb.register_tokens], dim=1)
        table = None if self.rope else emb.position_embeddings.weight
        x = ops.patch_embed(pixels.to(w.dtype), w, conv.bias, prefix_tokens=prefix, pos_embed=table,
                            pos_embed_prefix=False)
        return x, (pixels.shape[2] // P, pixels.shape[3] // P)

    def _final_norm(self, x: Tensor) -> Tensor:
        n = self.model.layernorm
        return ops.layer_norm(x, n.weight, n.bias, eps=n.eps)

    def _forward(self, pixels: Tensor, *, keep, per_block: bool):
        m, cfg = self.model, self.config
        x, grid = self._embed(pixels)
        rope = self._rope_tables(grid, x.device, x.dtype) if self.rope else None
        start, kept = len(m.layers) - cfg.num_blocks, keep or ()
        hidden, preds = [x if 0 in kept else None], []
        for i, (layer, joined) in enumerate(zip(m.layers, self.joined)):
            if i == start:                                                      # the queries in front, as HF's
                x = torch.cat([m.query.weight[None].expand(x.shape[0], -1, -1), x], dim=1)
            if per_block and i >= start:                                        # train mode: each block's prediction
                preds.append(self._predict(self._final_norm(x), grid))
            x = self._block(layer, joined, x, rope)
            hidden.append(x if i + 1 in kept else None)
        x = self._final_norm(x)
        if hidden[-1] is not None:                  # HF's output capturing puts last_hidden_state in the last slot
            hidden[-1] = x
        masks, classes = self._predict(x, grid)
        return masks, classes, x, hidden, preds

    def _block(self, layer: nn.Module, joined: nn.ModuleDict, x: Tensor, rope) -> Tensor:
        """One EomtLayer / EomtDinov3Layer on tokens x [B, T, C]."""
        o = _out_proj(layer.attention)
        _, fc2, gated = _mlp_parts(layer.mlp)
        qkv, fc1 = joined["qkv"], joined["fc1"]
        h = ops.linear(ops.layer_norm(x, layer.norm1.weight, layer.norm1.bias, eps=layer.norm1.eps), qkv.weight,
                       qkv.bias)
        if rope is not None:                                                    # the patch tokens: the last ones
            h = ops.rope_qkv(h, self.num_heads, *rope, inplace=True)
        x = ops.linear(ops.attention_qkv(h, self.num_heads), o.weight, o.bias, residual=x,
                       scale=layer.layer_scale1.lambda1)
        h = ops.layer_norm(x, layer.norm2.weight, layer.norm2.bias, eps=layer.norm2.eps)
        h = ops.linear(h, fc1.weight, fc1.bias, activation="swiglu" if gated else self.activation)
        return ops.linear(h, fc2.weight, fc2.bias, residual=x, scale=layer.layer_scale2.lambda1)

    def _predict(self, x: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """HF's `predict` on normed tokens x [B, queries + prefix + patches, C] -> (mask logits [B, Q, 4^k gh, 4^k gw]
        after k upscale blocks, class logits [B, Q, labels + 1])."""
        m, Q = self.model, self.config.num_queries
        queries = x[:, :Q]
        classes = ops.linear(queries, m.class_predictor.weight, m.class_predictor.bias)
        head = m.mask_head
        q = ops.linear(queries, head.fc1.weight, head.fc1.bias, activation=self.activation)
        q = ops.linear(q, head.fc2.weight, head.fc2.bias, activation=self.activation)
        q = ops.linear(q, head.fc3.weight, head.fc3.bias)
        gh, gw = grid
        features = x[:, x.shape[1] - gh * gw:]                                  # the patch tokens, the last ones
        for blk in m.upscale_block.block:
            features, gh, gw = self._upscale(blk, features, gh, gw)
        masks = torch.bmm(q, features.transpose(1, 2))                          # HF's einsum over channels
        return masks.view(x.shape[0], Q, gh, gw), classes

    def _upscale(self, blk: nn.Module, x: Tensor, gh: int, gw: int) -> tuple[Tensor, int, int]:
        """One EomtScaleLayer on channels-last features x [B, gh · gw, C] -> [B, 2gh · 2gw, C]."""
        ct, dw, norm = blk.conv1, blk.conv2, blk.layernorm2d
        B, C = x.shape[0], ct.out_channels
        w = ct.weight.permute(2, 3, 1, 0).reshape(4 * C, ct.in_channels)       # rows (dy, dx, out channel)
        b = None if ct.bias is None else ct.bias.repeat(4)
        y = ops.linear(x, w, b, activation=self.activation)                     # [B, gh · gw, 4C]
        y = y.view(B, gh, gw, 2, 2, C).permute(0, 1, 3, 2, 4, 5).reshape(B, 2 * gh, 2 * gw, C)
        y = F.conv2d(y.permute(0, 3, 1, 2), dw.weight, dw.bias, padding=1, groups=C)   # NCHW view, channels-last
        y = y.permute(0, 2, 3, 1).reshape(B, 4 * gh * gw, C)
        return ops.layer_norm(y, norm.weight, norm.bias, eps=norm.eps), 2 * gh, 2 * gw


class HFVideomtForUniversalSegmentation(HFEomtForUniversalSegmentation):
    """Stands in for a VideomtForUniversalSegmentation (`forward(pixel_values_videos, ...)`) as HF's: the first
    L - num_blocks blocks over every frame as one batch; then frame by frame the queries (the learned ones for the first
    frame, then query_updater of the previous frame's output queries plus the learned ones: one GEMM and an add) in
    front of the frame's tokens through the last num_blocks blocks, the final norm and the heads. Outputs concatenated
    over frames (frame-major, as HF's): class_queries_logits, masks_queries_logits [F · B, Q, ...], last_hidden_state;
    hidden_states as HF's output capturing records them (each call of a block, the last slot last_hidden_state). No
    loss (HF's VidEoMT trains none); attn_mask_probs unused, as HF's."""

    main_input_name = "pixel_values_videos"

    def forward(self, pixel_values_videos=None, mask_labels=None, class_labels=None, patch_offsets=None,
                output_hidden_states=None, output_attentions=None, return_dict=None, **kwargs):
        if "pixel_values" in kwargs:
            raise ValueError("pixel_values: VideomtForUniversalSegmentation takes pixel_values_videos, as HF's")
        if mask_labels is not None or class_labels is not None:
            raise ValueError("mask_labels / class_labels: HF's VideomtForUniversalSegmentation trains no loss on "
                             "videos (flatten the frames into EomtForUniversalSegmentation, as HF says)")
        self._check(output_attentions, pixel_values_videos, "pixel_values_videos", frames=True)
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        start = len(self.model.layers) - self.config.num_blocks
        n = 1 + start + pixel_values_videos.shape[1] * self.config.num_blocks
        keep = kept_hidden_states(output_hidden_states, n)
        masks, classes, x, hidden = self.cuda_graphs(self, self._forward_video, pixel_values_videos, keep=keep)
        return self._output_object(return_dict, loss=None, class_queries_logits=classes, masks_queries_logits=masks,
                                   last_hidden_state=x, hidden_states=None if keep is None else tuple(hidden))

    def _forward_video(self, videos: Tensor, *, keep):
        m, cfg = self.model, self.config
        B, F = videos.shape[:2]
        x, grid = self._embed(videos.flatten(0, 1))                            # [B · F, T, D], batch-major
        rope = self._rope_tables(grid, x.device, x.dtype) if self.rope else None
        start, kept = len(m.layers) - cfg.num_blocks, keep or ()
        hidden = [x if 0 in kept else None]
        blocks = list(zip(m.layers, self.joined))
        for layer, joined in blocks[:start]:
            x = self._block(layer, joined, x, rope)
            hidden.append(x if len(hidden) in kept else None)
        x = x.view(B, F, *x.shape[1:])
        learned = m.query.weight[None].expand(B, -1, -1)
        masks, classes, outs, queries = [], [], [], None
        for f in range(F):
            q = learned if queries is None else \
                ops.linear(queries, m.query_updater.weight, m.query_updater.bias) + m.query.weight
            h = torch.cat([q, x[:, f]], dim=1)
            for layer, joined in blocks[start:]:
                h = self._block(layer, joined, h, rope)
                hidden.append(h if len(hidden) in kept else None)
            y = self._final_norm(h)
            mk, cl = self._predict(y, grid)
            masks.append(mk)
            classes.append(cl)
            outs.append(y)
            queries = h[:, :cfg.num_queries]
        y = torch.cat(outs)
        if hidden[-1] is not None:                  # HF's output capturing puts last_hidden_state in the last slot
            hidden[-1] = y
        return torch.cat(masks), torch.cat(classes), y, hidden
