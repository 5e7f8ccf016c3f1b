"""timm's BEiT on vitfast: `timm.models.beit.Beit` (`beit_*`, BEiT v2's `beitv2_*` and the models fine-tuned from
them) through `vitfast.optimize`, as a stand-in that holds timm's model and its parameter tensors and runs its
forward, forward_features and forward_head on vitfast's kernels.

Per forward: the patch embedding with the class token and, where the model has one (use_abs_pos_emb), the position
table in its epilogue (`ops.patch_embed`); per block the LayerNorm, the packed qkv GEMM (timm's qkv weight with its
q / v biases and a zero k bias, joined as a `JoinedLinear` so that they train), the attention with BEiT's relative
position bias added to the scores inside the kernel (`ops.attention_qkv(attn_bias=...)`: each block's table, and the
shared one where the model has it, gathered by timm's own modules into one [heads, N, N] bias for the batch), the
projection with gamma_1 and the residual in its epilogue, the LayerNorm, fc1 with its GELU in its epilogue, fc2 with
gamma_2 and the residual; then the final norm, or the mean of the patch tokens through fc_norm (use_fc_norm), and
the head. timm's Beit takes images of its img_size only (its patch embedding asserts it), and so does this.
The stand-in trains (the tables' gradients summed over the batch by the attention's backward kernels) and on CUDA
in eval mode without grad replays a CUDA graph per input shape. Other attributes and methods are timm's model's
(`forward_intermediates` runs timm's own code). Not supported (named by `vitfast.optimize`): SwiGLU MLPs, norms
inside the MLP, dropout / drop-path in train mode, activations other than the GELUs and QuickGELU.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vitfast import ops
from vitfast.graphs import CUDAGraphRunner
from vitfast.layers import JoinedLinear


def from_timm_beit(model: nn.Module) -> TimmBeit:
    """timm's Beit -> its stand-in on vitfast (module docstring); what it cannot run raises UnsupportedFeatureError."""
    from vitfast.convert import (  # imports this module
        _activation,
        _Findings,
        _is_identity,
        _keep_pretrained_cfg,
        _timm_attention,
        _timm_block,
        _timm_seen,
        _timm_stem,
        _timm_tail,
    )

    f = _Findings("timm Beit")
    dim = model.embed_dim
    seen = _timm_seen()
    _, eps = _timm_stem(f, model, dim, seen)
    f.need(_is_identity(getattr(model, "norm_pre", None)), "norm_pre")
    f.need(model.global_pool in ("avg", "token"), f"global_pool={model.global_pool!r} (only 'avg' and 'token')")
    for i, blk in enumerate(model.blocks):
        w = f"blocks.{i}"
        attn = blk.attn
        f.need(isinstance(getattr(attn, "qkv", None), nn.Linear) and attn.qkv.bias is None,
               f"{w}.attn.qkv (expected timm Beit's Linear without bias, its q / v biases apart)")
        _timm_attention(f, attn, w, dim, seen)
        _timm_block(f, blk, w, dim, eps, seen)
        f.need(type(blk.mlp).__name__ == "Mlp" and _is_identity(getattr(blk.mlp, "norm", None)),
               f"{w}.mlp: {type(blk.mlp).__name__} (only timm's Mlp without a norm inside)")
        g1, g2 = getattr(blk, "gamma_1", None), getattr(blk, "gamma_2", None)
        f.need((g1 is None) == (g2 is None), f"{w}: layer-scale on one branch only")
        seen["layer-scale"].add(g1 is not None)
    _timm_tail(f, model, dim, eps, seen)
    f.one_dtype_device(model.parameters())
    f.check(model.training)
    out = TimmBeit(model, _activation(model.blocks[0].mlp.act) if len(model.blocks) else "gelu")
    _keep_pretrained_cfg(model, out)
    return out.train(model.training)


class TimmBeit(nn.Module):
    """Stands in for a timm Beit (module docstring): `forward(x)`, `forward_features(x)`, `forward_head(x,
    pre_logits=False)` as timm's, on vitfast's kernels; timm's model is `self.model`, `self.qkv` its blocks' packed
    qkv with their q / v biases (`JoinedLinear`s over timm's tensors)."""

    def __init__(self, model: nn.Module, activation: str):
        super().__init__()
        self.model, self.activation = model, activation
        joined = []
        for blk in model.blocks:
            a = blk.attn
            if a.q_bias is None:                         # no biases: timm's Linear itself
                joined.append(a.qkv)
                continue
            parts = nn.Module()                          # timm's qkv weight with its q / v biases (k has none)
            parts.weight, parts.q_bias, parts.v_bias = a.qkv.weight, a.q_bias, a.v_bias
            dim = a.qkv.in_features
            joined.append(JoinedLinear([(parts, "weight", "q_bias", slice(0, dim)),
                                        (parts, "weight", None, slice(dim, 2 * dim)),
                                        (parts, "weight", "v_bias", slice(2 * dim, 3 * dim))]))
        self.qkv = nn.ModuleList(joined)
        self.cuda_graphs = CUDAGraphRunner()
        self._biases: dict[tuple, Tensor] = {}

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self._modules.get("model")
            if model is None:
                raise
            return getattr(model, name)                  # timm's attributes: num_classes, embed_dim, ...

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        return self.cuda_graphs(self, self._forward, x)

    def forward_features(self, x: Tensor) -> Tensor:
        self._check(x)
        return self.cuda_graphs(self, self._features, x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        m = self.model
        if m.global_pool:
            x = x[:, m.num_prefix_tokens:].mean(dim=1) if m.global_pool == "avg" else x[:, 0]
        if isinstance(m.fc_norm, nn.LayerNorm):
            x = ops.layer_norm(x, m.fc_norm.weight, m.fc_norm.bias, eps=m.fc_norm.eps)
        if pre_logits or not isinstance(m.head, nn.Linear):
            return x
        return ops.linear(x, m.head.weight, m.head.bias)

    def _check(self, x) -> None:
        pe = self.model.patch_embed
        C, size = pe.proj.in_channels, tuple(pe.img_size)
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != C or tuple(x.shape[2:]) != size:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x: expected images [B, {C}, {size[0]}, {size[1]}] (timm Beit's img_size), got {got}")

    def _forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self._features(x))

    def _bias(self, module: nn.Module, gather) -> Tensor:
        """timm's relative position bias of `module` ([heads, N, N] from `gather()`, timm's own method), cached while
        nothing records a gradient through it."""
        table = module.relative_position_bias_table
        if (torch.is_grad_enabled() and table.requires_grad) or \
                (table.is_cuda and torch.cuda.is_current_stream_capturing()):
            return gather()
        key = (id(module), table.data_ptr(), table._version, table.dtype, torch.is_inference_mode_enabled())
        bias = self._biases.get(key)
        if bias is None:
            if len(self._biases) >= 2 * len(self.qkv) + 2:
                self._biases.clear()
            bias = self._biases[key] = gather()
        return bias

    def _features(self, images: Tensor) -> Tensor:
        m = self.model
        proj = m.patch_embed.proj
        w = proj.weight
        x = ops.patch_embed(images.to(w.dtype), w, proj.bias, cls_token=m.cls_token, pos_embed=m.pos_embed)
        shared = None if m.rel_pos_bias is None else self._bias(m.rel_pos_bias, m.rel_pos_bias)
        for blk, qkv in zip(m.blocks, self.qkv):
            a = blk.attn
            bias = shared
            if a.relative_position_bias_table is not None:
                own = self._bias(a, a._get_rel_pos_bias)[0]
                bias = own if bias is None else own + bias
            n1, n2, fc1, fc2 = blk.norm1, blk.norm2, blk.mlp.fc1, blk.mlp.fc2
            h = ops.linear(ops.layer_norm(x, n1.weight, n1.bias, eps=n1.eps), qkv.weight, qkv.bias)
            h = ops.attention_qkv(h, a.num_heads, attn_bias=None if bias is None else bias.to(h.dtype))
            x = ops.linear(h, a.proj.weight, a.proj.bias, residual=x, scale=blk.gamma_1)
            h = ops.linear(ops.layer_norm(x, n2.weight, n2.bias, eps=n2.eps), fc1.weight, fc1.bias,
                           activation=self.activation)
            x = ops.linear(h, fc2.weight, fc2.bias, residual=x, scale=blk.gamma_2)
        if isinstance(m.norm, nn.LayerNorm):
            x = ops.layer_norm(x, m.norm.weight, m.norm.bias, eps=m.norm.eps)
        return x
