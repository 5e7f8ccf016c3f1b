"""ViT building blocks on vitfast ops, with timm's module tree and parameter names.

`PatchEmbed(proj)`, `Attention(qkv, proj)`, `Mlp(fc1, fc2)`, `LayerNorm`, `RMSNorm`, `Block(norm1, attn, norm2, mlp)`:
the same state_dict keys as timm's (and `vitfast.reference`'s) modules, so checkpoints load as they
are. Every tensor op goes through `vitfast.ops` (DESIGN.md §1 data flow):

    h = norm1(x);  qkv = linear(h)                    # (B, T, 3C), timm's packed layout
    a = attention_qkv(qkv)                            # (B, T, C), q/k/v read in place by strides
    x = linear(a, proj, residual=x)                   # residual add in the GEMM epilogue
    h = norm2(x);  x = linear(gelu(linear(h, fc1)), fc2, residual=x)

No permute or contiguous copy sits between two ops.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vitfast import ops, reference
from vitfast.reference import resample_pos_embed

# Each layer subclasses its `vitfast.reference` twin: the same constructor, parameters and
# state_dict keys; only forward changes (vitfast ops instead of the reference math).


class LayerNorm(reference.LayerNorm):
    """nn.LayerNorm (weight/bias parameters, timm's eps default 1e-6) running `ops.layer_norm`."""

    def __init__(self, normalized_shape, eps: float = 1e-6, **kwargs):
        super().__init__(normalized_shape, eps=eps, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        return ops.layer_norm(x, self.weight, self.bias, eps=self.eps)


class RMSNorm(reference.RMSNorm):
    """RMSNorm (weight only; Qwen2.5-VL's vision tower) running `ops.rms_norm`."""

    def forward(self, x: Tensor) -> Tensor:
        return ops.rms_norm(x, self.weight, eps=self.eps)


class PatchEmbed(reference.PatchEmbed):
    """Patchify + project + CLS row + position embedding in one `ops.patch_embed` call.

    `proj` is the patchify Conv2d (timm's `patch_embed.proj`); its weight [D, C, P, P] is what the
    op multiplies with. The position table belongs to the model (timm's `pos_embed`); this module
    resamples it to the image's patch grid when the grid differs from the table's (bicubic,
    antialiased, like timm) and caches the result per grid: the cache is used only when no
    gradient flows to the table, and an entry is dropped when the table is replaced or modified
    in place (its version counter moves) or `clear_cache()` is called. A CUDA graph captured on
    a resampled table reads the cached tensor itself: capture again after changing `pos_embed`.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, embed_dim: int = 768, bias: bool = True):
        super().__init__(img_size, patch_size, in_chans, embed_dim, bias=bias)
        self._pos_cache: dict[tuple[int, int], tuple] = {}

    def clear_cache(self) -> None:
        self._pos_cache.clear()

    def grid_for(self, x: Tensor) -> tuple[int, int]:
        return x.shape[-2] // self.patch_size[0], x.shape[-1] // self.patch_size[1]

    def pos_embed_for(self, pos_embed: Tensor, grid: tuple[int, int], src_grid: tuple[int, int],
                      num_prefix_tokens: int) -> Tensor:
        """pos_embed [1, prefix + src_grid cells, D] -> [1, prefix + grid cells, D]."""
        if tuple(grid) == tuple(src_grid):
            return pos_embed
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and pos_embed.requires_grad):
            return resample_pos_embed(pos_embed, grid, src_grid, num_prefix_tokens)   # traced / differentiable
        # The source tensor itself is kept in the entry: comparing by identity cannot be fooled by
        # a reused address, and the version counter catches in-place updates (load_state_dict, optimizers).
        # Module.to / .cuda() / .half() keep the Parameter and its version but swap its data: the
        # data pointer, dtype and device catch that.
        stamp = (pos_embed._version, pos_embed.data_ptr(), pos_embed.dtype, pos_embed.device, tuple(src_grid),
                 num_prefix_tokens, torch.is_inference_mode_enabled())
        hit = self._pos_cache.get(tuple(grid))
        if hit is not None and hit[0] is pos_embed and hit[1] == stamp:
            return hit[2]
        with torch.no_grad():
            table = resample_pos_embed(pos_embed, grid, src_grid, num_prefix_tokens)
        self._pos_cache[tuple(grid)] = (pos_embed, stamp, table)
        return table

    def forward(self, x: Tensor, prefix_tokens: Tensor | None = None, pos_embed: Tensor | None = None, *,
                pos_embed_grid: tuple[int, int] | None = None, pos_embed_prefix: bool = True,
                mean: Tensor | None = None, std: Tensor | None = None) -> Tensor:
        """images [B, C, H, W] (float, or uint8 normalised with mean/std) -> tokens [B, NP + N, D].

        prefix_tokens [1, NP, D] or None (class, register, distillation tokens); pos_embed [1, T', D]
        made for the patch grid `pos_embed_grid` (default: this module's `grid_size`), with rows for the
        prefix tokens when pos_embed_prefix (timm's default) or for the patches only (no_embed_class),
        resampled to the image's grid if that differs.
        """
        if pos_embed is not None:
            prefix = 0 if prefix_tokens is None or not pos_embed_prefix else prefix_tokens.shape[-2]
            pos_embed = self.pos_embed_for(pos_embed, self.grid_for(x), pos_embed_grid or self.grid_size, prefix)
        if not isinstance(self.norm, nn.Identity):      # embed_norm (AIMv2's): the table added after the norm
            x = self.norm(ops.patch_embed(x, self.proj.weight, self.proj.bias, mean=mean, std=std))
            return reference.add_prefix_and_pos(x, prefix_tokens, pos_embed, pos_embed_prefix)
        return ops.patch_embed(x, self.proj.weight, self.proj.bias, prefix_tokens=prefix_tokens,
                               pos_embed=pos_embed, mean=mean, std=std, pos_embed_prefix=pos_embed_prefix)


class Attention(reference.Attention):
    """Multi-head self-attention from one packed qkv projection (timm's `attn.qkv`, `attn.proj`; `attn.norm`
    with scale_attn_norm)."""

    norm_layer = LayerNorm

    def forward(self, x: Tensor, residual: Tensor | None = None, return_cls_attn: bool = False,
                scale: Tensor | None = None, rope: tuple[Tensor, Tensor] | None = None, key_mask: Tensor | None = None,
                cu_seqlens: Tensor | None = None, max_seqlen: int | None = None):
        """x [B, T, C] -> proj(attention(qkv(x))) · scale (+ residual) [B, T, C] (scale: a layer-scale
        gamma [C], in the projection's epilogue); with return_cls_attn also the softmax row of the CLS
        query, cls_attn [B, H, T] in fp32. rope: (cos, sin) tables, q and k of the last tokens rotated
        (`ops.rope_qkv`) before the attention. key_mask: bool [B, T], the tokens every query may attend to
        (padding False: SigLIP 2's NaFlex batches). cu_seqlens, max_seqlen: x [1, T, C] packs segments (images,
        windows) that attend within themselves (`ops.attention_qkv`'s varlen form: Qwen2-VL's vision towers)."""
        qkv = ops.linear(x, self.qkv.weight, self.qkv.bias)                                  # (B, T, 3C)
        if rope is not None:
            qkv = ops.rope_qkv(qkv, self.num_heads, *rope, inplace=True)             # qkv: this call's own
        cls_attn = None
        if return_cls_attn:
            out, cls_attn = ops.attention_qkv(qkv, self.num_heads, scale=self.scale, return_cls_attn=True,
                                              key_mask=key_mask)
        else:
            out = ops.attention_qkv(qkv, self.num_heads, scale=self.scale, key_mask=key_mask,
                                    cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)                   # (B, T, C)
        if not isinstance(self.norm, nn.Identity):                                           # scale_attn_norm
            out = self.norm(out)
        y = ops.linear(out, self.proj.weight, self.proj.bias, residual=residual, scale=scale)
        return (y, cls_attn) if return_cls_attn else y


class Mlp(reference.Mlp):
    """fc2(act(fc1(x))) · scale (+ residual); the activation (GELU exact or tanh, QuickGELU) runs in fc1's
    epilogue, the layer-scale and the residual in fc2's."""

    norm_layer = LayerNorm

    def forward(self, x: Tensor, residual: Tensor | None = None, scale: Tensor | None = None) -> Tensor:
        h = ops.linear(x, self.fc1.weight, self.fc1.bias, activation=self.act)                 # (B, T, hidden)
        if not isinstance(self.norm, nn.Identity):                                             # scale_mlp_norm
            h = self.norm(h)
        return ops.linear(h, self.fc2.weight, self.fc2.bias, residual=residual, scale=scale)   # (B, T, C)


class GluMlp(reference.GluMlp):
    """fc2(silu(gate) · up) · scale (+ residual), [gate | up] = fc1(x) (timm's SwiGLUPacked, DINOv2-giant,
    DINOv3's plus and 7B models): the gating in fc1's epilogue (`ops.linear(..., activation="swiglu")`: the
    [B, T, hidden] product is never stored; in training the GEMM and the gating apart), the layer-scale and
    the residual in fc2's."""

    norm_layer = LayerNorm
    # GLM-5-Next's clamps (reference.swiglu_clamped): fc1's GEMM, then the clamped gating apart (no epilogue for it)
    swiglu_limit: float | None = None

    def forward(self, x: Tensor, residual: Tensor | None = None, scale: Tensor | None = None) -> Tensor:
        if self.swiglu_limit is not None:
            h = reference.swiglu_clamped(ops.linear(x, self.fc1.weight, self.fc1.bias), self.swiglu_limit)
        else:
            h = ops.linear(x, self.fc1.weight, self.fc1.bias, activation="swiglu")         # (B, T, hidden / 2)
        if not isinstance(self.norm, nn.Identity):                                         # scale_mlp_norm
            h = self.norm(h)
        return ops.linear(h, self.fc2.weight, self.fc2.bias, residual=residual, scale=scale)


class Block(reference.Block):
    """Pre-LN transformer block: x + ls1·attn(norm1(x)), then + ls2·mlp(norm2(x)); both layer-scales and
    residual adds happen in the epilogue of the projection GEMM (attn.proj, mlp.fc2)."""

    norm_layer, rms_layer, attn_layer, mlp_layer, glu_layer = LayerNorm, RMSNorm, Attention, Mlp, GluMlp

    def forward(self, x: Tensor, return_cls_attn: bool = False, rope: tuple[Tensor, Tensor] | None = None,
                key_mask: Tensor | None = None, cu_seqlens: Tensor | None = None, max_seqlen: int | None = None):
        """x [B, T, C] -> [B, T, C] (, cls_attn [B, H, T] fp32 with return_cls_attn); rope: the attention's
        RoPE tables; key_mask: bool [B, T], the tokens the attention may attend to; cu_seqlens, max_seqlen: the
        segments of a packed x [1, T, C] (`Attention`)."""
        g1, g2 = reference.layer_scale(self.ls1), reference.layer_scale(self.ls2)
        if return_cls_attn:
            x, cls_attn = self.attn(self.norm1(x), residual=x, return_cls_attn=True, scale=g1, rope=rope,
                                    key_mask=key_mask)
            return self.mlp(self.norm2(x), residual=x, scale=g2), cls_attn
        x = self.attn(self.norm1(x), residual=x, scale=g1, rope=rope, key_mask=key_mask, cu_seqlens=cu_seqlens,
                      max_seqlen=max_seqlen)
        return self.mlp(self.norm2(x), residual=x, scale=g2)


class AttentionPoolLatent(reference.AttentionPoolLatent):
    """Attention pooling with a latent query (timm's, SigLIP's head) on vitfast ops: the latent's q, the
    tokens' packed kv and the attention kernel with one query (N_q = 1 against N keys), read by strides."""

    mlp_layer, norm_layer = Mlp, LayerNorm

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """tokens x [B, N, D] -> pooled [B, D]; key_mask: bool [B, N], the tokens the query may attend to."""
        B, N, D = x.shape
        H, Dh = self.num_heads, self.head_dim
        q = ops.linear(self.latent.expand(B, -1, -1), self.q.weight, self.q.bias)            # (B, 1, D)
        kv = ops.linear(x, self.kv.weight, self.kv.bias)                                     # (B, N, 2D)
        k, v = kv.view(B, N, 2, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)                      # (B, H, N, Dh) views
        out = ops.attention(q.view(B, 1, H, Dh).transpose(1, 2), k, v, scale=self.scale,
                            key_mask=key_mask)                                                 # (B, H, 1, Dh)
        y = ops.linear(out.transpose(1, 2).reshape(B, 1, D), self.proj.weight, self.proj.bias)   # (B, 1, D)
        return self.mlp(self.norm(y), residual=y)[:, 0]


class JoinedLinear(nn.Module):
    """An nn.Linear whose `weight` and `bias` are row ranges of other modules' parameters, which stay the
    parameters: Hugging Face's separate q / k / v projections as timm's packed qkv, or the rows of a packed
    in_proj. The converted model then trains (and its optimizer and `save_pretrained` see) the source's own
    tensors, and holds no copy of them.

    sources: (module, weight attribute, bias attribute or None, row slice or None for all rows[, order]) per
    part, in row order; the slice applies to a bias with the weight's rows, a bias with the slice's rows is taken
    whole; `order`, a list of the part's row indices, then reorders the part's weight and bias rows (EVA-02's
    interleaved RoPE pairs as rotate-half ones; repeats allowed: grouped-query attention's k / v heads, one per query
    head); a part without bias, next to parts with one, counts as a zero
    bias. Parts may name one module more than
    once (timm's Eva: one packed qkv weight beside separate q and v biases); consecutive row slices of one
    tensor join as a view of it. While autograd records a
    gradient, each access builds the tensor from the live parameters (a
    concatenation, or a view for one part), so gradients reach them; otherwise one cached concatenation
    (or reordered copy of one part) serves, rebuilt when a part is replaced, moved or modified in place (its
    identity, data pointer or version counter changes)."""

    def __init__(self, sources):
        super().__init__()
        modules = []                         # each module once (a ModuleList entry per part would repeat its keys)
        for m, *_ in sources:
            if not any(m is k for k in modules):
                modules.append(m)
        self.sources = nn.ModuleList(modules)
        self._spec = [(next(i for i, k in enumerate(modules) if k is m), *rest[:3], rest[3] if len(rest) > 3 else None)
                      for m, *rest in sources]
        self._cache: dict[int, tuple] = {}
        self._zeros: dict[int, Tensor] = {}

    @property
    def weight(self) -> Tensor:
        return self._joined(0)

    @property
    def bias(self) -> Tensor | None:
        return self._joined(1)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        return ops.linear(x, self.weight, self.bias)

    def _zero_bias(self, i: int, module: nn.Module, spec: tuple) -> Tensor:
        """A zero bias for part i, which has none while others have one (DINOv3's key projection): one
        constant tensor per part, kept while its rows, dtype and device fit (so the joined cache still hits)."""
        w = getattr(module, spec[0])
        rows = w.shape[0] if spec[2] is None else len(range(w.shape[0])[spec[2]])
        if spec[3] is not None:                     # the part's rows reordered (or repeated: grouped-query k / v)
            rows = len(spec[3])
        z = self._zeros.get(i)
        if z is None or z.shape[0] != rows or z.dtype != w.dtype or z.device != w.device:
            z = self._zeros[i] = torch.zeros(rows, dtype=w.dtype, device=w.device)
        return z

    @staticmethod
    def _one_view(tensors: list[Tensor], rows: list, orders: list) -> Tensor | None:
        """The rows of one tensor that consecutive slices of it cover, as a view; None if they are not that."""
        t = tensors[0]
        if (len(tensors) < 2 or any(u is not t for u in tensors) or any(r is None for r in rows)
                or any(o is not None for o in orders)):
            return None
        spans = [range(t.shape[0])[r] for r in rows]
        if any(s.step != 1 for s in spans) or any(a.stop != b.start for a, b in zip(spans, spans[1:])):
            return None
        return t[spans[0].start:spans[-1].stop]

    def _joined(self, which: int) -> Tensor | None:
        tensors, parts = [], []
        specs = [(self.sources[spec[0]], spec[1:]) for spec in self._spec]
        found = [None if spec[which] is None else getattr(module, spec[which]) for module, spec in specs]
        if all(t is None for t in found):
            return None
        for i, ((module, spec), t) in enumerate(zip(specs, found)):
            if t is None:                           # a bias some parts lack: zeros there
                t = self._zero_bias(i, module, spec)
                spec = (*spec[:2], None, None)
            # a bias of the part's own rows (Eva's q_bias beside its packed qkv weight) is taken whole
            whole = spec[2] is None or (which == 1 and t.shape[0] != getattr(module, spec[0]).shape[0])
            tensors.append(t)
            part = t if whole else t[spec[2]]
            parts.append(part if spec[3] is None else part[spec[3]])
        one = self._one_view(tensors, [spec[2] for _, spec in specs], [spec[3] for _, spec in specs])
        if one is not None:
            parts = [one]
        live = torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(p.requires_grad for p in parts))
        gathered = any(spec[3] is not None for _, spec in specs)     # a reordered part is a copy: cached too
        if (len(parts) == 1 and not gathered) or live:
            return parts[0] if len(parts) == 1 else torch.cat(parts, 0)
        # The source tensors themselves are kept in the entry (identity cannot be fooled by a reused address);
        # the version counter catches in-place updates, the data pointer, dtype and device a .to() / .half().
        try:
            stamp = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
        except RuntimeError:                 # inference tensors keep no version counter: nothing to cache by
            return torch.cat(parts, 0)
        hit = self._cache.get(which)
        if hit is None or hit[1] != stamp or any(a is not b for a, b in zip(hit[0], tensors)):
            with torch.no_grad():
                hit = self._cache[which] = (tuple(tensors), stamp, torch.cat(parts, 0))
        return hit[2]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, parts={len(self._spec)}"
