"""BEiT and Data2Vec-vision on vitfast: transformers' `BeitModel` (BEiT, BEiT v2 and DiT, Microsoft's document image
transformer, whose checkpoints are BEiT's) and `Data2VecVisionModel` (its copy under Data2Vec's older module names),
which `BeitForImageClassification`, `BeitForMaskedImageModeling`, `BeitForSemanticSegmentation` and `BeitBackbone`
hold as `beit` and Data2Vec's classifier and segmenter as `data2vec_vision` (their heads, necks and losses shared).

The model takes images pixel_values [B, C, H, W] of any size of at least one patch (pixels past whole patches dropped,
as HF's convolution drops them) and an optional bool_masked_pos [B, patches] (True: the patch enters as the mask
token, as HF's; only where the model has one). The patch embedding is one `ops.patch_embed` with the class token as
its prefix row and, where the model has one (use_absolute_position_embeddings), HF's table (resampled by HF's own
method for another grid) in its epilogue. Per block: the LayerNorm, the packed q / k / v GEMM (HF's three projections
joined, k's missing bias as zeros), the attention with BEiT's relative position bias added to the scores inside the
kernel (`ops.attention_qkv(attn_bias=...)`: the table of each block, and the shared one where the model has it,
gathered by HF's own module into one [heads, N, N] bias for the whole batch: no [B, heads, N, N] scores), the output
projection with the layer-scale (lambda_1) and the residual in its epilogue, the LayerNorm, fc1 with its GELU in its
epilogue, fc2 with lambda_2 and the residual. Then the final LayerNorm (not with use_mean_pooling: then HF's pooler
takes the patches' mean through its own LayerNorm).

Output: HF's output object: last_hidden_state, pooler_output (where the model has a pooler), and with
output_hidden_states (True, or an index or list of indices that keeps only those) the embeddings and each block's
output. The stand-in holds HF's model (`self.model`, its forward unused) and so its parameter tensors, the relative
position tables too: it trains, the tables' gradients summed over the batch by the attention's backward kernels. On
CUDA in eval mode without grad its forward replays a CUDA graph per input shape. Not supported (named in the error):
attention outputs, a padding attention_mask, dropout and drop-path in train mode, activations other than the GELUs
and QuickGELU.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from vitfast import ops
from vitfast.convert import UnsupportedFeatureError, _Findings
from vitfast.hf_sam import _ACTIVATIONS
from vitfast.hf_vitlayer import HFStandIn, check_images
from vitfast.layers import JoinedLinear
from vitfast.reference import mask_patches

# transformers class -> family
CLASSES = {"BeitModel": "beit", "Data2VecVisionModel": "beit"}


def _layers(model: nn.Module) -> nn.ModuleList:
    """The blocks: BeitModel's `layers` (transformers 5.x), Data2VecVisionModel's `encoder.layer`."""
    return model.layers if hasattr(model, "layers") else model.encoder.layer


def _parts(layer: nn.Module) -> dict:
    """One block's modules and layer-scales under either layout: BeitLayer's (transformers 5.x: attention.q_proj ...
    o_proj, mlp.fc1 / fc2, relative_position_bias) or Data2VecVisionLayer's (attention.attention.query / key / value
    with its relative_position_bias, attention.output.dense, intermediate.dense, output.dense). A layer-scale that
    the model leaves out (HF's float 1.0 or None) is None."""
    a = layer.attention
    if hasattr(a, "q_proj"):
        qkv, o, fc1, fc2 = (a.q_proj, a.k_proj, a.v_proj), a.o_proj, layer.mlp.fc1, layer.mlp.fc2
        rel, where = layer.relative_position_bias, ("attention.q_proj", "attention.k_proj", "attention.v_proj",
                                                     "attention.o_proj", "mlp.fc1", "mlp.fc2")
        dropouts = [(layer.dropout, "dropout")]
    else:
        s = a.attention
        qkv, o, fc1, fc2 = (s.query, s.key, s.value), a.output.dense, layer.intermediate.dense, layer.output.dense
        rel = s.relative_position_bias if getattr(s, "has_relative_position_bias", False) else None
        where = ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                 "attention.output.dense", "intermediate.dense", "output.dense")
        dropouts = [(a.output.dropout, "attention.output.dropout"), (layer.output.dropout, "output.dropout")]
    scale = lambda t: t if isinstance(t, Tensor) else None
    return dict(qkv=qkv, o=o, fc1=fc1, fc2=fc2, rel=rel, where=where, dropouts=dropouts, n1=layer.layernorm_before,
                n2=layer.layernorm_after, lambda_1=scale(layer.lambda_1), lambda_2=scale(layer.lambda_2))


def _shared_bias(model: nn.Module) -> nn.Module | None:
    """The relative position bias every block adds (use_shared_relative_position_bias), or None."""
    if hasattr(model, "layers"):
        return model.shared_position_bias
    enc = model.encoder
    return enc.relative_position_bias if enc.has_relative_position_bias else None


def optimize_beit(model: nn.Module) -> HFBeitModel:
    """A transformers BeitModel or Data2VecVisionModel -> its stand-in on vitfast (module docstring)."""
    name, cfg = type(model).__name__, model.config
    f = _Findings(f"Hugging Face {name}")
    dim, heads = cfg.hidden_size, cfg.num_attention_heads
    f.need(dim % heads == 0, f"hidden_size={dim} with num_attention_heads={heads}")
    f.need(cfg.hidden_act in _ACTIVATIONS, f"hidden_act={cfg.hidden_act!r} (only {sorted(_ACTIVATIONS)})")
    emb = model.embeddings
    f.patchify(emb.patch_embeddings.projection, "embeddings.patch_embeddings.projection")
    f.dropout(emb.dropout, "embeddings.dropout")
    if isinstance(model.layernorm, nn.LayerNorm):
        f.layer_norm_eps(model.layernorm, "layernorm", dim)
    at = "layers" if hasattr(model, "layers") else "encoder.layer"
    for i, layer in enumerate(_layers(model)):
        p, where = _parts(layer), f"{at}.{i}"
        for n in ("layernorm_before", "layernorm_after"):
            f.layer_norm_eps(getattr(layer, n), f"{where}.{n}", dim)
        for m, w, bias in zip((*p["qkv"], p["o"], p["fc1"], p["fc2"]), p["where"], (True, False) + (True,) * 4):
            f.linear(m, f"{where}.{w}", bias=bias)
        if cfg.attention_probs_dropout_prob > 0:
            f.train_only.append(f"dropout p={cfg.attention_probs_dropout_prob:g} ({where}.attention)")
        for m, w in p["dropouts"]:
            f.dropout(m, f"{where}.{w}")
        f.dropout(layer.drop_path, f"{where}.drop_path", "drop-path")
    f.one_dtype_device(model.parameters())
    f.check(model.training)
    module = sys.modules[type(model).__module__]
    output = getattr(module, "BeitModelOutputWithPooling", None) or module.Data2VecVisionModelOutputWithPooling
    return HFBeitModel(model, output).train(model.training)


class HFBeitModel(HFStandIn):
    """Stands in for a BeitModel or Data2VecVisionModel (`forward(pixel_values, bool_masked_pos=None,
    interpolate_pos_encoding=False, ...)`) as HF's, returning HF's output object (module docstring). HF's model is
    `self.model`; `self.qkv` holds, per block, its q / k / v projections joined, `JoinedLinear`s built from HF's
    tensors on each access while a gradient is recorded, so that they train, one cached copy otherwise."""

    def __init__(self, model: nn.Module, output: type):
        super().__init__(model, output)
        self.num_heads = self.config.num_attention_heads
        self.activation = _ACTIVATIONS[self.config.hidden_act]
        self.qkv = nn.ModuleList(
            JoinedLinear([(m, "weight", "bias" if m.bias is not None else None, None) for m in _parts(layer)["qkv"]])
            for layer in _layers(model))
        self._biases: dict[tuple, Tensor] = {}

    @property
    def embeddings(self) -> nn.Module:
        return self.model.embeddings

    @property
    def pooler(self) -> nn.Module | None:
        return self.model.pooler

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embeddings.patch_embeddings

    def _blocks(self) -> nn.ModuleList:
        return _layers(self.model)

    def forward(self, pixel_values=None, bool_masked_pos=None, output_attentions=None, output_hidden_states=None,
                interpolate_pos_encoding=False, return_dict=None, attention_mask=None, **kwargs):
        keep = self._keep(output_attentions, output_hidden_states)
        if attention_mask is not None:
            raise UnsupportedFeatureError("optimized model: unsupported argument attention_mask (a padding mask: "
                                          "BEiT's images have none)")
        emb = self.model.embeddings
        proj = emb.patch_embeddings.projection
        P = proj.kernel_size[0]
        check_images(pixel_values, proj.in_channels, P)
        B, N = pixel_values.shape[0], (pixel_values.shape[2] // P) * (pixel_values.shape[3] // P)
        masked = None
        if bool_masked_pos is not None:
            if emb.mask_token is None:
                raise UnsupportedFeatureError("optimized model: bool_masked_pos, where the model has no mask token "
                                              "(use_mask_token=False)")
            if not isinstance(bool_masked_pos, Tensor) or tuple(bool_masked_pos.shape) != (B, N):
                got = tuple(bool_masked_pos.shape) if isinstance(bool_masked_pos, Tensor) else \
                    type(bool_masked_pos).__name__
                raise ValueError(f"bool_masked_pos: expected [B, patches] = [{B}, {N}], got {got}")
            masked = bool_masked_pos.to(device=pixel_values.device, dtype=torch.bool)
        x, pooled, hidden = self.cuda_graphs(self, self._forward, pixel_values, masked, keep=keep,
                                             interpolate=bool(interpolate_pos_encoding))
        return self._result(return_dict, last_hidden_state=x, pooler_output=pooled,
                            hidden_states=None if keep is None else tuple(hidden))

    def _bias(self, module: nn.Module, grid: tuple[int, int], interpolate: bool, n: int) -> Tensor:
        """HF's relative position bias [1, heads, N, N] of `module` for this patch grid (its own method: the table
        gathered, resampled for another grid); cached while nothing records a gradient through it."""
        table = module.relative_position_bias_table
        if (torch.is_grad_enabled() and table.requires_grad) or \
                (table.is_cuda and torch.cuda.is_current_stream_capturing()):
            return module(grid, interpolate_pos_encoding=interpolate, dim_size=n)
        key = (id(module), table.data_ptr(), table._version, table.dtype, grid, interpolate, n,
               torch.is_inference_mode_enabled())
        bias = self._biases.get(key)
        if bias is None:
            if len(self._biases) >= 8 * len(self.qkv) + 8:
                self._biases.clear()
            bias = self._biases[key] = module(grid, interpolate_pos_encoding=interpolate, dim_size=n)
        return bias

    def _forward(self, pixels: Tensor, masked: Tensor | None, *, keep, interpolate: bool):
        m = self.model
        emb = m.embeddings
        proj = emb.patch_embeddings.projection
        w, P = proj.weight, proj.kernel_size[0]
        size = pixels.shape[2:]
        grid = (size[0] // P, size[1] // P)
        pixels = pixels[..., :grid[0] * P, :grid[1] * P].to(w.dtype)          # what whole patches cover
        N, cls = grid[0] * grid[1], emb.cls_token
        table = None
        if emb.position_embeddings is not None:          # HF's table, or its resampling for this grid
            table = emb.interpolate_pos_encoding(torch.empty(1, 1 + N, w.shape[0], device="meta"), *size)
            table = table.to(w.dtype)
            cls = cls + table[:, :1]
        x = ops.patch_embed(pixels, w, proj.bias, cls_token=cls.to(w.dtype),
                            pos_embed=None if table is None else table[:, 1:], pos_embed_prefix=False)
        if masked is not None:                            # the mask token, plus the patch's position row
            x = mask_patches(x, masked, emb.mask_token if table is None else emb.mask_token + table[:, 1:])
        shared = _shared_bias(m)
        shared = None if shared is None else self._bias(shared, grid, interpolate, 1 + N)
        kept = keep or ()
        hidden = [x if 0 in kept else None]
        for i, (layer, qkv) in enumerate(zip(_layers(m), self.qkv), 1):
            p = _parts(layer)
            bias = shared
            if p["rel"] is not None:
                own = self._bias(p["rel"], grid, interpolate, 1 + N)
                bias = own if bias is None else own + bias
            o, fc1, fc2, n1, n2 = p["o"], p["fc1"], p["fc2"], p["n1"], p["n2"]
            h = ops.linear(ops.layer_norm(x, n1.weight, n1.bias, eps=n1.eps), qkv.weight, qkv.bias)
            h = ops.attention_qkv(h, self.num_heads, attn_bias=None if bias is None else bias.to(h.dtype))
            x = ops.linear(h, o.weight, o.bias, residual=x, scale=p["lambda_1"])
            h = ops.linear(ops.layer_norm(x, n2.weight, n2.bias, eps=n2.eps), fc1.weight, fc1.bias,
                           activation=self.activation)
            x = ops.linear(h, fc2.weight, fc2.bias, residual=x, scale=p["lambda_2"])
            hidden.append(x if i in kept else None)
        if isinstance(m.layernorm, nn.LayerNorm):
            x = ops.layer_norm(x, m.layernorm.weight, m.layernorm.bias, eps=m.layernorm.eps)
        return x, (None if m.pooler is None else m.pooler(x)), hidden
