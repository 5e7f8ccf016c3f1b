"""The vision towers of Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3.5 on vitfast (`vitfast.optimize` dispatches here
from `vitfast.hf`, and copies their VLMs with the tower replaced).

These towers take the patches of several images (and video frames) packed into one sequence, as HF's processor
lays them out: hidden_states [T, C·t·P·P] (each patch flattened as (channel, frame, row, column)) with grid_thw
[n, 3] (frames, patch rows, patch columns per image). Every frame attends within itself only, and Qwen2.5-VL's
other blocks within windows of 8 x 8 merged patches: the attention kernel's varlen form (`ops.attention_qkv` with
`cu_seqlens`) runs all the frames or windows of a batch in one launch, with no padding and no per-image loop. Per
block: LayerNorm (RMSNorm in Qwen2.5-VL), the packed qkv GEMM, the axial 2D RoPE on q and k (`ops.rope_qkv`, the
tables from each patch's row and column), varlen attention, the projection with the residual in its epilogue, then
the MLP (QuickGELU, GELU-tanh or SwiGLU in fc1's epilogue, the residual in fc2's). The patch embedding (a Conv3d
whose stride is its kernel) is one `ops.linear` over the flattened patches, Qwen3-VL's interpolated position
embeddings added in its epilogue; the patch merger (and Qwen3-VL's DeepStack mergers) are a norm and two GEMMs with
the GELU in the first one's epilogue.

| transformers class | output |
|---|---|
| Qwen2VisionTransformerPretrainedModel (Qwen2-VL) | BaseModelOutputWithPooling: last_hidden_state [T, C], |
| | pooler_output the merger's [T / 4, D] |
| Qwen2_5_VisionTransformerPretrainedModel (Qwen2.5-VL) | the same; last_hidden_state in window order, as HF's |
| Qwen2_5OmniVisionEncoder (Qwen2.5-Omni's thinker) | the same (its q / k / v projections joined as the packed qkv) |
| Exaone4_5_VisionModel (EXAONE 4.5) | the same (grouped-query: its k / v heads repeated in the packed qkv) |
| Qwen3VLVisionModel, Qwen3VLMoeVisionModel (Qwen3-VL) | BaseModelOutputWithDeepstackFeatures: also deepstack_features |
| Qwen3OmniMoeVisionEncoder (Qwen3-Omni's thinker) | the same |
| Qwen3_5VisionModel, Qwen3_5MoeVisionModel (Qwen3.5) | BaseModelOutputWithPooling (Qwen3-VL's tower, no DeepStack) |

The layout of a batch (positions, segments, windows, Qwen3-VL's position-table taps) depends only on grid_thw: it
is made on the host once per grid (one read of grid_thw, as HF's own code reads it) and kept, and the CUDA graph of
a forward is keyed by the token count, the segment counts and the longest segment, so batches of other images
with those replay it with their layout as data. The stand-in holds HF's parameter tensors (an optimizer over either
model trains both). Not supported (named in the error): attention outputs, precomputed layout arguments.
"""

from __future__ import annotations

import sys
from collections import OrderedDict

import torch
from torch import Tensor, nn

from vitfast import ops
from vitfast.convert import UnsupportedFeatureError, _build, _Findings, _mlp_ratio
from vitfast.graphs import CUDAGraphRunner
from vitfast.layers import Block, JoinedLinear, LayerNorm, RMSNorm
from vitfast.reference import (
    qwen3_position_taps,
    qwen_patch_layout,
    qwen_rope_tables,
    qwen_window_layout,
    weighted_rows,
)

# transformers class -> family
CLASSES = {"Qwen2VisionTransformerPretrainedModel": "qwen2_vl",
           "Qwen2_5_VisionTransformerPretrainedModel": "qwen2_5_vl",
           # Qwen2.5-Omni's: Qwen2.5-VL's tower with separate q / k / v projections (joined here)
           "Qwen2_5OmniVisionEncoder": "qwen2_5_vl",
           # EXAONE 4.5's: Qwen2.5-VL's tower with grouped-query attention (its k / v heads repeated in the qkv here)
           "Exaone4_5_VisionModel": "qwen2_5_vl",
           "Qwen3VLVisionModel": "qwen3_vl", "Qwen3VLMoeVisionModel": "qwen3_vl",
           # Qwen3.5's: Qwen3-VL's tower without the DeepStack mergers
           "Qwen3_5VisionModel": "qwen3_vl", "Qwen3_5MoeVisionModel": "qwen3_vl",
           # Qwen4-Exp's: Qwen3.5's tower under its own name
           "Qwen4ExpVisionModel": "qwen3_vl",
           # Qwen3-Omni's: Qwen3-VL's tower, its DeepStack mergers named as Qwen2-VL's merger (merger_list)
           "Qwen3OmniMoeVisionEncoder": "qwen3_vl"}
_ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "quick_gelu": "quick_gelu"}
# The layout a caller may hand HF's tower precomputed (transformers' vision_utils): vitfast makes its own from
# grid_thw and refuses these rather than ignore them. Other keyword arguments (the VLM passes `use_cache` and
# such along) do not touch the tower, and are ignored as HF's tower ignores them.
_LAYOUT_KWARGS = {"cu_seqlens", "max_seqlen", "position_ids", "window_index", "cu_window_seqlens",
                  "max_window_seqlen", "interp_indices", "interp_weights"}
# HF's key -> the tower's (each replacement applied in turn)
_RENAME = (("merger.ln_q.", "merger.norm."), ("merger.mlp.0.", "merger.fc1."), ("merger.mlp.2.", "merger.fc2."),
           (".linear_fc1.", ".fc1."), (".linear_fc2.", ".fc2."), ("deepstack_merger_list.", "deepstack."),
           ("merger_list.", "deepstack."), (".ln_q.", ".norm."), (".mlp.0.", ".fc1."), (".mlp.2.", ".fc2."))


class _PatchEmbed3d(nn.Module):
    """Holds HF's Conv3d patch projection (stride = kernel): applied as one GEMM over flattened patches."""

    def __init__(self, in_chans: int, dim: int, kernel: tuple[int, int, int], bias: bool):
        super().__init__()
        self.proj = nn.Conv3d(in_chans, dim, kernel, stride=kernel, bias=bias)


class _Merger(nn.Module):
    """Qwen's patch merger: each merge x merge block of tokens as one row [units · C] -> fc2(gelu(fc1(row))),
    the norm before (over C) or after (over units · C: Qwen3-VL's DeepStack mergers) that reshape."""

    def __init__(self, dim: int, units: int, out_dim: int, norm_after: bool, norm: type = LayerNorm):
        super().__init__()
        self.width, self.norm_after = dim * units, norm_after
        self.norm = norm(self.width if norm_after else dim, eps=1e-6)
        self.fc1 = nn.Linear(self.width, self.width)
        self.fc2 = nn.Linear(self.width, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """tokens [1, T, C] -> merged [T / units, out_dim]."""
        h = self.norm(x.reshape(-1, self.width)) if self.norm_after else self.norm(x).reshape(-1, self.width)
        h = ops.linear(h, self.fc1.weight, self.fc1.bias, activation="gelu")
        return ops.linear(h, self.fc2.weight, self.fc2.bias)


class QwenVisionTower(nn.Module):
    """The parameters of a Qwen vision tower in vitfast's layers (HF's tensors, adopted by `_build`): patch_embed,
    pos_embed (Qwen3-VL), blocks (timm's Block: norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2), merger,
    deepstack (Qwen3-VL). norm="rms", act="swiglu": Qwen2.5-VL's RMSNorms and gated MLP (fc1 the packed
    [gate | up] of `hidden` features each)."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, hidden: int, act: str, in_chans: int,
                 temporal_patch: int, patch_size: int, out_dim: int, merge: int, patch_bias: bool = False,
                 pos_side: int = 0, deepstack: int = 0, norm_eps: float = 1e-6, norm: str = "layer"):
        super().__init__()
        self.patch_embed = _PatchEmbed3d(in_chans, embed_dim, (temporal_patch, patch_size, patch_size), patch_bias)
        self.pos_embed = nn.Embedding(pos_side * pos_side, embed_dim) if pos_side else None
        glu = act == "swiglu"
        width = 2 * hidden if glu else hidden
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio=_mlp_ratio(width, embed_dim),
                                           act="gelu" if glu else act, eps=norm_eps, mlp="swiglu" if glu else "mlp")
                                     for _ in range(depth)])
        norm_layer = RMSNorm if norm == "rms" else LayerNorm
        if norm == "rms":
            for blk in self.blocks:
                blk.norm1, blk.norm2 = RMSNorm(embed_dim, eps=norm_eps), RMSNorm(embed_dim, eps=norm_eps)
        units = merge * merge
        self.merger = _Merger(embed_dim, units, out_dim, norm_after=False, norm=norm_layer)
        self.deepstack = nn.ModuleList([_Merger(embed_dim, units, out_dim, norm_after=True)
                                        for _ in range(deepstack)])


def optimize_qwen(model: nn.Module) -> HFQwenVisionModel:
    """A transformers Qwen vision tower (one of CLASSES) -> its stand-in on vitfast (module docstring)."""
    name, cfg = type(model).__name__, model.config
    family = CLASSES[name]
    f = _Findings(f"Hugging Face {name}")
    blocks = list(model.blocks)
    glu = family == "qwen2_5_vl"                 # RMSNorms, and a gated MLP: down(act(gate(x)) · up(x))
    hidden_act = getattr(cfg, "hidden_act", None)
    act = ("swiglu" if hidden_act == "silu" else None) if glu else _ACTIVATIONS.get(hidden_act)
    f.need(act is not None, f"hidden_act={hidden_act!r} (supported: {['silu'] if glu else sorted(_ACTIVATIONS)})")
    eps = {_norm_eps(n) for b in blocks for n in (b.norm1, b.norm2)}
    kinds = sorted({type(n).__name__ for b in blocks for n in (b.norm1, b.norm2)})
    f.need(len(eps) == 1 and None not in eps,
           f"blocks' norms (expected {'RMSNorms' if glu else 'LayerNorms'} of one eps, got {kinds} of eps {eps})")
    for i, b in enumerate(blocks):
        for where in ("norm1", "norm2"):
            if glu:
                f.need(_norm_eps(getattr(b, where)) is not None and getattr(getattr(b, where), "bias", None) is None,
                       f"blocks.{i}.{where}: {type(getattr(b, where)).__name__} (expected an RMSNorm with a weight)")
            else:
                f.layer_norm_eps(getattr(b, where), f"blocks.{i}.{where}", b.attn.qkv.in_features)
        for proj in ("qkv",) if hasattr(b.attn, "qkv") else ("q", "k", "v"):
            f.linear(getattr(b.attn, proj, None), f"blocks.{i}.attn.{proj}")
        for proj in ("gate_proj", "up_proj", "down_proj") if glu else ():
            f.linear(getattr(b.mlp, proj, None), f"blocks.{i}.mlp.{proj}")
        f.need(getattr(b.attn, "attention_dropout", 0.0) == 0.0, f"blocks.{i}.attn dropout")
    mergers = [model.merger, *getattr(model, "deepstack_merger_list", [])]
    for m in mergers:
        act_fn = m.mlp[1] if hasattr(m, "mlp") else m.act_fn
        f.need(isinstance(act_fn, nn.GELU) and act_fn.approximate == "none",
               f"merger activation {act_fn!r} (expected exact nn.GELU)")
    f.check(False)
    state = renamed_state(model, _RENAME)
    split_qkv = not hasattr(blocks[0].attn, "qkv")      # Qwen2.5-Omni: q, k, v joined after the build, as fc1 below
    for i in range(len(blocks)) if split_qkv else ():
        for part in ("weight", "bias"):
            state[f"blocks.{i}.attn.qkv.{part}"] = torch.cat([state.pop(f"blocks.{i}.attn.{p}.{part}")
                                                              for p in "qkv"]).detach()
    order = _grouped_query_order(blocks[0].attn)       # EXAONE 4.5: each query head's k / v rows, in the qkv
    grouped = [JoinedLinear(_grouped_qkv_parts(b.attn, order)) for b in blocks] if order else []
    for i, joined in enumerate(grouped):                 # (of the repeated shape for the build; joined after it)
        for part in ("weight", "bias"):
            state[f"blocks.{i}.attn.qkv.{part}"] = getattr(joined, part).detach()
    if glu:     # fc1: [gate | up] joined from HF's projections after the build (the concatenation here is dropped)
        for i in range(len(blocks)):
            for part in ("weight", "bias"):
                state[f"blocks.{i}.mlp.fc1.{part}"] = torch.cat([state.pop(f"blocks.{i}.mlp.gate_proj.{part}"),
                                                                  state.pop(f"blocks.{i}.mlp.up_proj.{part}")]).detach()
                state[f"blocks.{i}.mlp.fc2.{part}"] = state.pop(f"blocks.{i}.mlp.down_proj.{part}")
    pe = model.patch_embed.proj
    dim = pe.out_channels
    tower_cfg = dict(embed_dim=dim, depth=len(blocks), num_heads=blocks[0].attn.num_heads,
                     hidden=next(getattr(blocks[0].mlp, a) for a in ("fc1", "linear_fc1", "gate_proj")
                                 if hasattr(blocks[0].mlp, a)).out_features,
                     act=act, in_chans=pe.in_channels, temporal_patch=pe.kernel_size[0], patch_size=pe.kernel_size[1],
                     out_dim=model.merger.mlp[2].out_features if hasattr(model.merger, "mlp")
                     else model.merger.linear_fc2.out_features,
                     merge=cfg.spatial_merge_size, patch_bias=pe.bias is not None,
                     pos_side=int(round(model.pos_embed.num_embeddings ** 0.5)) if hasattr(model, "pos_embed") else 0,
                     deepstack=len(getattr(model, "deepstack_merger_list", [])), norm_eps=eps.pop(),
                     norm="rms" if glu else "layer")
    tower = _build(tower_cfg, state, model, f, QwenVisionTower)
    for blk, b in zip(tower.blocks, blocks) if glu else ():
        blk.mlp.fc1 = JoinedLinear([(b.mlp.gate_proj, "weight", "bias", None), (b.mlp.up_proj, "weight", "bias", None)])
    for blk, b in zip(tower.blocks, blocks) if split_qkv else ():
        blk.attn.qkv = JoinedLinear([(getattr(b.attn, p), "weight", "bias", None) for p in "qkv"])
    for blk, joined in zip(tower.blocks, grouped):
        blk.attn.qkv = joined
    return HFQwenVisionModel(cfg, tower, family, model.rotary_pos_emb.inv_freq,
                             sys.modules[type(model).__module__]).train(model.training)


def _grouped_query_order(attn: nn.Module) -> list[int] | None:
    """A grouped-query attention's key / value rows for each query head (HF's repeat_kv: head h reads key / value
    head h // (heads / key-value heads)), as rows of the k or v part of its qkv; None without grouping."""
    kv = getattr(attn, "num_key_value_heads", None)
    if kv is None or kv == attn.num_heads:
        return None
    D, group = attn.head_dim, attn.num_heads // kv
    return [(h // group) * D + d for h in range(attn.num_heads) for d in range(D)]


def _grouped_qkv_parts(attn: nn.Module, order: list[int]) -> list[tuple]:
    """`JoinedLinear` parts making a grouped-query qkv [q | k | v heads] (EXAONE 4.5's) the packed qkv of as many
    k / v heads as q heads."""
    q, kv = attn.q_dim, attn.kv_dim
    return [(attn.qkv, "weight", "bias", slice(0, q)), (attn.qkv, "weight", "bias", slice(q, q + kv), order),
            (attn.qkv, "weight", "bias", slice(q + kv, q + 2 * kv), order)]


def kept_hidden_states(output_hidden_states, n: int) -> tuple[int, ...] | None:
    """Which of a tower's n hidden states (the embeddings and each block's output) to return: all (True), none
    (False / None, and 0 or an empty list, which HF reads as False: -> None), or those an index or a list of indices
    selects, negative ones from the end, as HF's output capturing (transformers 5.2x) reads them; the others are
    returned as None."""
    if output_hidden_states is None or isinstance(output_hidden_states, bool) or \
            isinstance(output_hidden_states, (int, list, tuple)) and not output_hidden_states:
        return tuple(range(n)) if output_hidden_states else None
    picked = [output_hidden_states] if isinstance(output_hidden_states, int) else output_hidden_states
    if not isinstance(picked, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                        for i in picked):
        raise ValueError(f"output_hidden_states: expected a bool, an index or a list of indices, got "
                         f"{output_hidden_states!r}")
    return tuple(sorted({i % n for i in picked if -n <= i < n}))


def renamed_state(model: nn.Module, rename) -> dict[str, Tensor]:
    """model's state_dict (its parameters themselves) with each (old, new) of `rename` replaced in every key,
    in turn."""
    state = {}
    for key, value in model.state_dict(keep_vars=True).items():
        for old, new in rename:
            key = key.replace(old, new)
        state[key] = value
    return state


def _norm_eps(norm: nn.Module) -> float | None:
    """The eps of a LayerNorm or of an RMSNorm (HF's keep it as `variance_epsilon`), None for anything else."""
    if isinstance(norm, nn.LayerNorm):
        return norm.eps
    if type(norm).__name__.endswith("RMSNorm") and isinstance(getattr(norm, "weight", None), Tensor):
        return rms_eps(norm)
    return None


def rms_eps(norm: nn.Module) -> float | None:
    """An HF RMSNorm's eps, with a weight or without: `variance_epsilon` (most, Gemma 4's in transformers 5.2x) or
    `eps` (Gemma 4's in 5.17)."""
    return getattr(norm, "variance_epsilon", getattr(norm, "eps", None))


class HFQwenVisionModel(nn.Module):
    """Stands in for a Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision tower: `forward(hidden_states, grid_thw, ...)` as
    HF's, returning HF's output object (module docstring). The tower's parameters are HF's tensors (`self.tower`).
    Its VLM reads `dtype` and `spatial_merge_size` from it, as from HF's."""

    _MAX_LAYOUTS = 32

    def __init__(self, config, tower: QwenVisionTower, family: str, inv_freq: Tensor, hf_module=None):
        super().__init__()
        self.config, self.tower, self.family = config, tower, family
        self.spatial_merge_size = getattr(config, "spatial_merge_size", None)     # (MoonViT has merge_kernel_size)
        self.deepstack_visual_indexes = list(getattr(config, "deepstack_visual_indexes", None) or [])
        self.register_buffer("inv_freq", inv_freq.detach().clone(), persistent=False)   # HF's RoPE frequencies
        self._output = getattr(hf_module, "BaseModelOutputWithDeepstackFeatures", None) if family == "qwen3_vl" \
            else None
        self._layouts: OrderedDict[tuple, dict] = OrderedDict()
        self.cuda_graphs = CUDAGraphRunner()

    @property
    def dtype(self) -> torch.dtype:
        return self.tower.patch_embed.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.tower.patch_embed.proj.weight.device

    def get_dtype(self) -> torch.dtype:
        return self.dtype

    def get_device(self) -> torch.device:
        return self.device

    # ----------------------------------------------------------------------------------------
    # What the stand-ins over packed sequences share (Qwen's, and those of vitfast.hf_glm, hf_kimi, hf_paddleocr,
    # hf_ernie): the refused arguments, the checked grid, the layout cache, the blocks' loop and the return.
    _layout_kwargs = _LAYOUT_KWARGS

    def forward(self, hidden_states=None, grid_thw=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        self._refuse(kwargs, output_attentions)
        lay = self._layout(self._check(hidden_states, grid_thw), hidden_states.device)
        return self.cuda_graphs(self, self._forward, hidden_states, lay["cu"], lay["cos"], lay["sin"], lay["taps"],
                                lay["weights"], lay["order"], lay["back"], lay["cu_window"],
                                max_seqlen=lay["max"], max_window=lay["max_window"],
                                keep=self._keep(output_hidden_states), return_dict=return_dict)

    def _refuse(self, kwargs: dict, output_attentions) -> None:
        """Attention outputs and a precomputed layout (`_layout_kwargs`) are refused by name; other keyword
        arguments (what a VLM passes along, `use_cache` and such) do not touch the tower and are ignored, as HF's
        tower ignores them."""
        bad = [k for k, v in kwargs.items() if k in self._layout_kwargs and v is not None]
        if output_attentions or getattr(self.config, "output_attentions", False) and output_attentions is None:
            bad.insert(0, "output_attentions=True")
        if bad:
            raise UnsupportedFeatureError(f"optimized model: unsupported arguments {bad} (vitfast computes the "
                                          "layout of the packed sequence from grid_thw itself)")

    def _keep(self, output_hidden_states) -> tuple[int, ...] | None:
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        return kept_hidden_states(output_hidden_states, len(self.tower.blocks) + 1)

    def _check(self, hidden_states, grid_thw) -> list[tuple[int, int, int]]:
        """The arguments checked; -> grid_thw as a list (the one host read of the forward)."""
        pe = self.tower.patch_embed.proj
        width = pe.weight[0].numel()
        if not isinstance(hidden_states, Tensor) or hidden_states.dim() != 2 or hidden_states.shape[1] != width:
            got = tuple(hidden_states.shape) if isinstance(hidden_states, Tensor) else type(hidden_states).__name__
            raise ValueError(f"hidden_states: expected patches [T, {width}] (channels x frames x patch_size^2), "
                             f"got {got}")
        m = self.spatial_merge_size
        return self._grid(grid_thw, hidden_states.shape[0], "T", (m, m))

    @staticmethod
    def _grid(grid_thw, total: int, total_name: str, divisors: tuple[int, int] = (1, 1)) -> list[tuple[int, int, int]]:
        """grid_thw checked (an integer tensor [n, 3] of at least one frame, patch row and column each, the rows
        and columns divisible by `divisors`, all the patches adding up to `total`) -> as a list (the one host read
        of the forward)."""
        if not isinstance(grid_thw, Tensor) or grid_thw.dim() != 2 or grid_thw.shape[1] != 3 \
                or grid_thw.is_floating_point() or grid_thw.is_complex():
            got = (f"{tuple(grid_thw.shape)} {grid_thw.dtype}" if isinstance(grid_thw, Tensor)
                   else type(grid_thw).__name__)
            raise ValueError(f"grid_thw: expected an integer tensor [n, 3] (frames, patch rows, patch columns), "
                             f"got {got}")
        grid = [tuple(int(v) for v in row) for row in grid_thw.tolist()]
        dh, dw = divisors
        if not grid or any(t < 1 or h < 1 or w < 1 or h % dh or w % dw for t, h, w in grid) \
                or sum(t * h * w for t, h, w in grid) != total:
            rule = "" if divisors == (1, 1) else (f" with patch rows and columns divisible by {dh}" if dh == dw else
                                                  f" with patch rows divisible by {dh} and columns by {dw}")
            raise ValueError(f"grid_thw: expected at least one grid, of at least 1 frame{rule} whose patches add up "
                             f"to {total_name} = {total}, got {grid}")
        return grid

    def _layout(self, grid: list[tuple[int, int, int]], device: torch.device) -> dict:
        """`_make_layout`'s dict for a grid, its tensors on the device; made once per grid and kept (least recently
        used dropped first)."""
        f64 = self.dtype == torch.float64
        key = (tuple(grid), device, f64, torch.is_inference_mode_enabled())
        hit = self._layouts.get(key)
        if hit is not None:
            self._layouts.move_to_end(key)
            return hit
        lay = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in self._make_layout(grid, f64).items()}
        self._layouts[key] = lay
        while len(self._layouts) > self._MAX_LAYOUTS:
            self._layouts.popitem(last=False)
        return lay

    def _make_layout(self, grid: list[tuple[int, int, int]], f64: bool) -> dict:
        """What the forward needs of a grid, on the CPU: cu_seqlens and the longest frame, the RoPE tables, the
        windows (Qwen2.5-VL), the position-table taps (Qwen3-VL)."""
        m = self.spatial_merge_size
        pos, cu = qwen_patch_layout(grid, m)
        lay = dict(taps=None, weights=None, order=None, back=None, cu_window=None, max_window=None)
        if self.family == "qwen2_5_vl":
            cfg = self.config
            blocks, lay["cu_window"] = qwen_window_layout(grid, m, cfg.window_size // m // cfg.patch_size)
            order = (blocks[:, None] * m * m + torch.arange(m * m)).flatten()           # the tokens in window order
            pos, lay["order"], lay["back"] = pos[order], order, torch.argsort(blocks)
            lay["max_window"] = int((lay["cu_window"][1:] - lay["cu_window"][:-1]).max())
        if self.tower.pos_embed is not None:
            side = int(round(self.tower.pos_embed.num_embeddings ** 0.5))
            lay["taps"], lay["weights"] = qwen3_position_taps(grid, m, side)
            if f64:
                lay["weights"] = lay["weights"].double()
        lay["cos"], lay["sin"] = qwen_rope_tables(pos, self.inv_freq, torch.float64 if f64 else torch.float32)
        lay["max"] = int((cu[1:] - cu[:-1]).max())
        lay["cu"] = cu
        return lay

    def _run_blocks(self, x: Tensor, rope, cu: Tensor, max_seqlen: int, keep) -> tuple[Tensor, list]:
        """x [1, T, C] through every block, each segment of cu attending within itself -> (x, hidden states: the
        input and each block's output where `keep` picks them, else None)."""
        kept = keep or ()
        hidden = [x[0] if 0 in kept else None]
        for i, blk in enumerate(self.tower.blocks, 1):
            x = blk(x, rope=rope, cu_seqlens=cu, max_seqlen=max_seqlen)
            hidden.append(x[0] if i in kept else None)
        return x, hidden

    def _returned(self, out, return_dict):
        """HF's output object, or its tuple with return_dict=False (the config's return_dict when None)."""
        use_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        return out if use_dict else out.to_tuple()

    def _forward(self, pixels, cu, cos, sin, taps, weights, order, back, cu_window, *, max_seqlen, max_window,
                 keep, return_dict):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        tower = self.tower
        proj = tower.patch_embed.proj
        dtype = proj.weight.dtype
        pos = None
        if taps is not None:                     # Qwen3-VL: the table's 4 rows per patch, weighted (HF: in fp32)
            pos = weighted_rows(tower.pos_embed.weight, taps, weights).to(dtype)[None]              # (1, T, C)
        x = ops.linear(pixels.to(dtype)[None], proj.weight.reshape(proj.out_channels, -1), proj.bias,
                       residual=pos)                                                               # (1, T, C)
        if order is not None:
            x = x[:, order]
        kept = keep or ()
        hidden = [x[0] if 0 in kept else None]
        rope = (cos, sin)
        full = getattr(self.config, "fullatt_block_indexes", None)
        deep = []
        for i, blk in enumerate(tower.blocks):
            windowed = order is not None and i not in full
            x = blk(x, rope=rope, cu_seqlens=cu_window if windowed else cu,
                    max_seqlen=max_window if windowed else max_seqlen)
            hidden.append(x[0] if i + 1 in kept else None)
            if i in self.deepstack_visual_indexes:
                deep.append(tower.deepstack[self.deepstack_visual_indexes.index(i)](x))
        merged = tower.merger(x)
        if back is not None:
            merged = merged[back]
        fields = dict(last_hidden_state=x[0], pooler_output=merged,
                      hidden_states=None if keep is None else tuple(hidden))
        out = self._output(**fields, deepstack_features=deep) if self._output is not None \
            else BaseModelOutputWithPooling(**fields)
        return self._returned(out, return_dict)
