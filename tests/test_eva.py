"""timm's Eva class through `vitfast.optimize`: DINOv3 (RoPE, registers, layer-scale as gamma_1 / gamma_2,
the plain, packed and unpacked SwiGLU MLPs, separate q / v biases) and EVA with a position table.

On every machine, Eva's module tree (its class and attribute names, built here from a float64 reference
ViT's weights) is converted and compared with that reference; with timm installed, timm's own Eva models
are compared with timm in float64 (on the CPU through Triton's interpreter, and on a GPU)."""

import copy

import pytest
import torch
from torch import nn

import vitfast
from vitfast import reference
from vitfast.convert import UnsupportedFeatureError
from vitfast.testing import TOLERANCE, assert_close, rel_err

F64 = torch.float64


def _timm_class(name: str, base: type = nn.Module) -> type:
    return type(name, (base,), {"__module__": "timm.models.eva"})


Eva, EvaBlock, EvaAttention = _timm_class("Eva"), _timm_class("EvaBlock"), _timm_class("EvaAttention")
AttentionRope = type("AttentionRope", (nn.Module,), {"__module__": "timm.layers.attention"})
RotaryEmbeddingDinoV3, RotaryEmbeddingCat = _timm_class("RotaryEmbeddingDinoV3"), _timm_class("RotaryEmbeddingCat")
SwiGLU = _timm_class("SwiGLU")


def _rope(head_dim: int, cls: type = RotaryEmbeddingDinoV3) -> nn.Module:
    rope = cls()
    rope.dim, rope.temperature, rope.min_period, rope.max_period = head_dim, 100.0, None, None
    rope.normalize_coords, rope.grid_offset, rope.grid_indexing, rope.rotate_half = "separate", 0.0, "ij", True
    rope.aug_active = False
    return rope


def _cat_rope(ref: reference.VisionTransformer, rotate_half: bool) -> nn.Module:
    """timm's RotaryEmbeddingCat as EVA-02 has it, whose get_embed gives `ref`'s RoPE angles as [sin | cos] in
    timm's layout: each angle on its pair's two columns (interleaved pairs) or on column i of each half."""
    rope = RotaryEmbeddingCat()
    rope.dim, rope.rotate_half, rope.aug_active = ref.embed_dim // ref.blocks[0].attn.num_heads, rotate_half, False
    grid = ref.patch_embed.grid_size

    def get_embed(shape=None):
        cos, sin = reference.dinov3_rope(tuple(shape or grid), rope.dim, ref.rope_temperature, torch.float64)
        spread = (lambda t: torch.cat([t, t], -1)) if rotate_half else (lambda t: t.repeat_interleave(2, -1))
        return torch.cat([spread(sin), spread(cos)], -1)
    rope.get_embed = get_embed
    return rope


def eva_like(ref: reference.VisionTransformer, *, qkv_bias: bool = False, unpacked_swiglu: bool = False,
             rope_cat: str | None = None, split_qkv: bool = False, attn_rope: bool = False) -> nn.Module:
    """timm's Eva tree holding `ref`'s weights (copies): what timm.models.eva.Eva has where vitfast looks.
    rope_cat "interleaved" / "half": EVA-02's RotaryEmbeddingCat with `ref`'s angles instead of DINOv3's RoPE
    module, q's and k's rows in Eva's order for those pairs; split_qkv: q / k / v projections (qkv_fused=False);
    attn_rope: timm's AttentionRope (Perception Encoder's) with the packed qkv's own bias, k's rows too; `ref`'s
    attention-pooling head as Eva's."""
    ref = copy.deepcopy(ref)
    dim, heads = ref.embed_dim, ref.blocks[0].attn.num_heads
    d = dim // heads
    m = Eva()
    m.embed_dim, m.global_pool, m.num_prefix_tokens = dim, ref.global_pool, ref.num_prefix_tokens
    m.no_embed_class, m.dynamic_img_size, m.rope_mixed = ref.no_embed_class, ref.dynamic_img_size, False
    m.patch_embed, m.cls_token, m.reg_token, m.pos_embed = ref.patch_embed, ref.cls_token, ref.reg_token, ref.pos_embed
    m.pos_drop, m.patch_drop, m.norm_pre = nn.Dropout(0.0), None, ref.norm_pre
    m.rope = None if not ref.rope_type else _cat_rope(ref, rope_cat == "half") if rope_cat else _rope(d)
    # Eva's row of q / k for rotate-half row r of a head: interleaved pairs keep pair i on rows 2i, 2i + 1
    perm = torch.arange(dim).view(heads, 2, d // 2).transpose(1, 2).reshape(dim) if rope_cat == "interleaved" \
        else torch.arange(dim)
    rows = torch.cat([perm, dim + perm, torch.arange(2 * dim, 3 * dim)])
    m.blocks = nn.ModuleList()
    for rb in ref.blocks:
        blk, attn = EvaBlock(), AttentionRope() if attn_rope else EvaAttention()
        attn.num_heads, attn.head_dim, attn.scale = heads, d, d ** -0.5
        attn.num_prefix_tokens, attn.rotate_half, attn.gate = ref.num_prefix_tokens, rope_cat != "interleaved", None
        w = rb.attn.qkv.weight.detach()[rows].clone()
        b = None if rb.attn.qkv.bias is None else rb.attn.qkv.bias.detach()[rows].clone()
        attn.qkv = nn.Linear(dim, 3 * dim, bias=attn_rope and b is not None)
        attn.qkv.weight = nn.Parameter(w)
        if attn_rope:                      # AttentionRope: its Linear's bias, no q / v biases
            attn.num_kv_heads = heads
            if b is not None:
                attn.qkv.bias = nn.Parameter(b)
        else:
            attn.q_bias = attn.v_bias = None
        if qkv_bias and not attn_rope:     # Eva keeps q and v biases apart and no k bias
            attn.q_bias = nn.Parameter(b[:dim].clone())
            attn.v_bias = nn.Parameter(b[2 * dim:].clone())
        if split_qkv:                      # EVA-02's q_proj / k_proj / v_proj (k without bias)
            attn.qkv = None
            for i, n in enumerate("qkv"):
                lin = nn.Linear(dim, dim, bias=qkv_bias and n != "k", dtype=w.dtype)
                with torch.no_grad():
                    lin.weight.copy_(w[i * dim:(i + 1) * dim])
                    if lin.bias is not None:
                        lin.bias.copy_(b[i * dim:(i + 1) * dim])
                setattr(attn, f"{n}_proj", lin)
            attn.q_bias = attn.v_bias = None
        attn.q_norm, attn.k_norm, attn.norm = nn.Identity(), nn.Identity(), rb.attn.norm
        attn.attn_drop, attn.proj_drop, attn.proj = nn.Dropout(0.0), nn.Dropout(0.0), rb.attn.proj
        blk.norm1, blk.attn, blk.norm2 = rb.norm1, attn, rb.norm2
        blk.drop_path1, blk.drop_path2 = nn.Identity(), nn.Identity()
        blk.gamma_1 = getattr(rb.ls1, "gamma", None)
        blk.gamma_2 = getattr(rb.ls2, "gamma", None)
        blk.mlp = rb.mlp
        if unpacked_swiglu:                # timm's SwiGLU: the packed fc1's gate and up halves as two linears
            glu, (g, x) = SwiGLU(), rb.mlp.fc1.weight.detach().chunk(2)
            h = g.shape[0]
            glu.fc1_g, glu.fc1_x = nn.Linear(dim, h, dtype=g.dtype), nn.Linear(dim, h, dtype=g.dtype)
            with torch.no_grad():
                for lin, w, b in ((glu.fc1_g, g, rb.mlp.fc1.bias[:h]), (glu.fc1_x, x, rb.mlp.fc1.bias[h:])):
                    lin.weight.copy_(w)
                    lin.bias.copy_(b)
            glu.act, glu.drop1, glu.norm, glu.fc2, glu.drop2 = nn.SiLU(), nn.Dropout(0.0), nn.Identity(), \
                rb.mlp.fc2, nn.Dropout(0.0)
            blk.mlp = glu
        m.blocks.append(blk)
    m.norm, m.fc_norm, m.attn_pool, m.head_drop, m.head = ref.norm, ref.fc_norm, ref.attn_pool, nn.Dropout(0.0), \
        ref.head
    return m.train(ref.training)


# DINOv3's settings at a small size (timm's vit_*_patch16_dinov3: RoPE, 4 registers, layer-scale, no position
# table, no qkv bias, the mean of the patches after the final norm), and EVA's (a position table, no RoPE).
DINOV3 = dict(img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=2, qkv_bias=False, init_values=0.5,
              reg_tokens=4, pos_embed="none", rope="dinov3", rope_rounding="timm", global_pool="avg", fc_norm=False,
              norm_eps=1e-5, dynamic_img_size=True, num_classes=5)
EVA02 = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_layer="swiglu", mlp_ratio=3.0,
             scale_mlp_norm=True, rope="dinov3", rope_temperature=10000.0, num_classes=3)
PE_CORE = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, pre_norm=True, norm_eps=1e-5,
               rope="dinov3", rope_temperature=10000.0, global_pool="map", pool_include_prefix=True,
               attn_pool_num_heads=8, attn_pool_mlp_ratio=2.0, num_classes=6)
EVA_CASES = {
    "dinov3": (DINOV3, {}),
    "dinov3_qkv_bias": ({**DINOV3, "qkv_bias": True}, dict(qkv_bias=True)),
    "dinov3_swiglu": ({**DINOV3, "mlp_layer": "swiglu", "mlp_ratio": 3.0}, dict(unpacked_swiglu=True)),
    "dinov3_packed_swiglu": ({**DINOV3, "mlp_layer": "swiglu", "mlp_ratio": 3.0}, {}),
    "eva_pos_embed": (dict(img_size=32, patch_size=16, embed_dim=48, depth=2, num_heads=3, global_pool="avg",
                           num_classes=4), dict(qkv_bias=True)),
    # EVA-02: a position table and RoPE from timm's RotaryEmbeddingCat (interleaved pairs, or rotate-half ones),
    # q / k / v projections or a packed qkv, the LayerNorm inside the SwiGLU
    "eva02": (EVA02, dict(qkv_bias=True, rope_cat="interleaved", split_qkv=True)),
    "eva02_packed_no_bias": ({**EVA02, "qkv_bias": False}, dict(rope_cat="interleaved")),
    "eva02_rotate_half": (EVA02, dict(qkv_bias=True, rope_cat="half", split_qkv=True)),
    # Perception Encoder (PE-Core): AttentionRope with a k bias too, interleaved pairs, norm_pre, a position table,
    # attention pooling over the class token too, with its own head count and MLP ratio
    "pe_core": (PE_CORE, dict(attn_rope=True, rope_cat="interleaved")),
    "pe_core_registers_no_class_token": ({**PE_CORE, "class_token": False, "reg_tokens": 2, "num_classes": 0},
                                         dict(attn_rope=True, rope_cat="interleaved")),
}


def _reference(cfg: dict, k_bias: bool = False) -> reference.VisionTransformer:
    ref = reference.VisionTransformer(**cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for blk in ref.blocks:             # Eva has no k bias (AttentionRope has one)
            if blk.attn.qkv.bias is not None and not k_bias:
                blk.attn.qkv.bias[ref.embed_dim:2 * ref.embed_dim] = 0
    return ref


@pytest.mark.parametrize("case", sorted(EVA_CASES))
def test_optimize_eva_tree_equals_reference(case):
    cfg, kw = EVA_CASES[case]
    ref = _reference(cfg, k_bias=kw.get("attn_rope", False))
    src = eva_like(ref, **kw)
    opt = vitfast.optimize(src)
    assert type(opt) is vitfast.VisionTransformer
    assert {id(p) for p in opt.parameters()} == {id(p) for p in src.parameters()}     # Eva's tensors, no copies
    ref64 = copy.deepcopy(ref).double()
    x = torch.randn(2, 3, 48, 32) if cfg.get("dynamic_img_size") else torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(opt(x), ref64(x.double()), eager=ref(x))
        assert_close(opt.forward_features(x), ref64.forward_features(x.double()), eager=ref.forward_features(x),
                     name="features")


def test_eva_rope_takes_timms_rounding():
    """The converted model's RoPE tables are timm's (periods divided, not frequencies multiplied: a few float32
    ulps apart): in float64 it equals the reference with timm's rounding, not with Hugging Face's."""
    ref = _reference(DINOV3).double()
    opt = vitfast.optimize(eva_like(ref))
    assert opt.rope_rounding == "timm"
    x = torch.randn(1, 3, 48, 32, dtype=F64)
    hf = copy.deepcopy(ref)
    hf.rope_rounding = "hf"
    with torch.no_grad():
        out, want, other = opt.forward_features(x), ref.forward_features(x), hf.forward_features(x)
    assert_close(out, want)
    assert rel_err(other, want) > 10 * TOLERANCE[F64]         # the float64 comparisons here tell them apart


def test_training_through_optimized_eva_reaches_its_parts():
    """Gradients of the converted Eva land in Eva's own q / v biases and SwiGLU halves, equal to the
    reference's gradients of the packed tensors they form; the packed qkv weight is a view, not a copy."""
    cfg = {**DINOV3, "qkv_bias": True, "mlp_layer": "swiglu", "mlp_ratio": 3.0}
    ref = _reference(cfg).double().train()
    src = eva_like(ref, qkv_bias=True, unpacked_swiglu=True)
    opt = vitfast.optimize(src).train()
    assert opt.blocks[0].attn.qkv.weight.data_ptr() == src.blocks[0].attn.qkv.weight.data_ptr()
    x = torch.randn(2, 3, 32, 48, dtype=F64)
    opt(x).square().sum().backward()
    ref(x).square().sum().backward()
    dim = ref.embed_dim
    for blk, rb in zip(src.blocks, ref.blocks):
        g = rb.attn.qkv.bias.grad
        assert_close(blk.attn.q_bias.grad, g[:dim], name="q_bias grad")
        assert_close(blk.attn.v_bias.grad, g[2 * dim:], name="v_bias grad")
        assert_close(blk.attn.qkv.weight.grad, rb.attn.qkv.weight.grad, name="qkv grad")
        gate, up = rb.mlp.fc1.weight.grad.chunk(2)
        assert_close(blk.mlp.fc1_g.weight.grad, gate, name="fc1_g grad")
        assert_close(blk.mlp.fc1_x.weight.grad, up, name="fc1_x grad")
        assert_close(blk.gamma_1.grad, rb.ls1.gamma.grad, name="gamma_1 grad")


@pytest.mark.parametrize("case", ["dinov3", "eva02"])
def test_optimized_eva_traces_in_one_torch_compile_graph(case):
    """DINOv3's joined q / v biases and SwiGLU halves, EVA-02's reordered projections and its RoPE tables from the
    RotaryEmbeddingCat module: one torch.compile graph."""
    if case == "dinov3":
        ref = _reference({**DINOV3, "qkv_bias": True, "mlp_layer": "swiglu", "mlp_ratio": 3.0})
        src, x = eva_like(ref, qkv_bias=True, unpacked_swiglu=True), torch.randn(2, 3, 32, 48)
    else:
        ref = _reference(EVA02)
        src, x = eva_like(ref, qkv_bias=True, rope_cat="interleaved", split_qkv=True), torch.randn(2, 3, 32, 32)
    opt = torch.compile(vitfast.optimize(src), fullgraph=True)
    with torch.no_grad():
        assert_close(opt(x), copy.deepcopy(ref).double()(x.double()), eager=ref(x))


def _eva_half_off(m):
    m.rope.rotate_half = False


def _eva02_pairs_mismatch(m):
    for blk in m.blocks:
        blk.attn.rotate_half = False     # interleaved attention with the module's rotate-half tables


@pytest.mark.parametrize("feature, mutate, kw", [
    (r"rope: RotaryEmbedding \(only DINOv3's RotaryEmbeddingDinoV3 and EVA-02's", lambda m: setattr(
        m.rope, "__class__", _timm_class("RotaryEmbedding")), {}),
    (r"blocks.0.attn: rotate_half=False, .*expected the RoPE module's pairs", _eva02_pairs_mismatch,
     dict(rope_cat="half")),
    (r"blocks.1.attn: a k_proj bias", lambda m: setattr(m.blocks[1].attn, "k_proj", nn.Linear(64, 64)),
     dict(rope_cat="interleaved", split_qkv=True, qkv_bias=True)),
    (r"rope: dim 16 \(expected the head dim\)", lambda m: setattr(m.rope, "dim", 16), dict(rope_cat="interleaved")),
])
def test_eva02_unsupported_variants_are_named(feature, mutate, kw):
    model = eva_like(_reference({**EVA02, "qkv_bias": bool(kw.get("qkv_bias"))}), **kw)
    mutate(model)
    with pytest.raises(UnsupportedFeatureError, match=feature):
        vitfast.optimize(model)


def test_training_through_optimized_eva02_reaches_its_projections():
    """EVA-02's q / k / v projections (q and k rows reordered for the interleaved pairs) get the reference's
    gradients of the packed qkv rows they form."""
    ref = _reference(EVA02).double().train()
    src = eva_like(ref, qkv_bias=True, rope_cat="interleaved", split_qkv=True)
    opt = vitfast.optimize(src).train()
    x = torch.randn(2, 3, 32, 32, dtype=F64)
    opt(x).square().sum().backward()
    ref(x).square().sum().backward()
    dim, heads = ref.embed_dim, ref.blocks[0].attn.num_heads
    perm = torch.arange(dim).view(heads, 2, dim // heads // 2).transpose(1, 2).reshape(dim)
    for blk, rb in zip(src.blocks, ref.blocks):
        gw, gb = rb.attn.qkv.weight.grad, rb.attn.qkv.bias.grad
        assert_close(blk.attn.q_proj.weight.grad, gw[:dim][perm], name="q_proj grad")
        assert_close(blk.attn.k_proj.weight.grad, gw[dim:2 * dim][perm], name="k_proj grad")
        assert_close(blk.attn.v_proj.weight.grad, gw[2 * dim:], name="v_proj grad")
        assert_close(blk.attn.q_proj.bias.grad, gb[:dim][perm], name="q_proj bias grad")
        assert_close(blk.mlp.norm.weight.grad, rb.mlp.norm.weight.grad, name="mlp norm grad")


@pytest.mark.parametrize("feature, mutate", [
    (r"rope: RotaryEmbedding \(only DINOv3's", lambda m: setattr(m.rope, "__class__", _timm_class("RotaryEmbedding"))),
    (r"rope: rotate_half=False", _eva_half_off),
    ("rope_type='mixed'", lambda m: setattr(m, "rope_mixed", True)),
    (r"rope: min_period / max_period", lambda m: setattr(m.rope, "min_period", 0.5)),
    (r"blocks.1: layer-scale on one branch only", lambda m: setattr(m.blocks[1], "gamma_2", None)),
    ("qk-norm", lambda m: setattr(m.blocks[0].attn, "q_norm", nn.LayerNorm(32))),
    (r"blocks.0.attn: a gate \(gated_attn\)", lambda m: setattr(m.blocks[0].attn, "gate", nn.Linear(64, 64))),
    (r"blocks.0: block type EvaBlockPostNorm", lambda m: setattr(m.blocks[0], "__class__",
                                                                _timm_class("EvaBlockPostNorm"))),
    (r"blocks.1.mlp.act: GELU \(a SwiGLU only with SiLU", lambda m: setattr(m.blocks[1].mlp, "act", nn.GELU())),
    (r"blocks.0.mlp: fc1_g with bias, fc1_x without bias, fc2 with bias",
     lambda m: setattr(m.blocks[0].mlp.fc1_x, "bias", None)),
    ("global_pool='avgmax'", lambda m: setattr(m, "global_pool", "avgmax")),
])
def test_eva_unsupported_features_are_named(feature, mutate):
    model = eva_like(_reference({**DINOV3, "mlp_layer": "swiglu", "mlp_ratio": 3.0}), unpacked_swiglu=True)
    mutate(model)
    with pytest.raises(UnsupportedFeatureError, match=feature):
        vitfast.optimize(model)


def test_eva_rope_augmentation_is_refused_in_train_mode_only():
    model = eva_like(_reference(DINOV3))
    model.rope.aug_active = True
    with pytest.raises(UnsupportedFeatureError, match="train mode with RoPE coordinate augmentation"):
        vitfast.optimize(copy.deepcopy(model).train())
    opt = vitfast.optimize(model)
    with pytest.raises(ValueError, match="does not implement RoPE coordinate augmentation"):
        opt.train()(torch.randn(1, 3, 32, 32))


def test_eva_state_dict_loads_into_a_vitfast_model(tmp_path):
    """An Eva state_dict (gamma_1 / gamma_2, q_bias / v_bias, fc1_g / fc1_x) loads into the vitfast model of the
    same configuration, from a file too, and gives the reference's output."""
    from safetensors.torch import save_file

    from vitfast.checkpoint import load_checkpoint

    cfg = {**DINOV3, "qkv_bias": True, "mlp_layer": "swiglu", "mlp_ratio": 3.0}
    ref = _reference(cfg)
    state = eva_like(ref, qkv_bias=True, unpacked_swiglu=True).state_dict()
    assert "blocks.0.gamma_1" in state and "blocks.0.mlp.fc1_g.weight" in state and "blocks.0.attn.q_bias" in state
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "eva.safetensors")
    model = load_checkpoint(vitfast.VisionTransformer(**cfg).eval(), tmp_path / "eva.safetensors")
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        assert_close(model(x), copy.deepcopy(ref).double()(x.double()), eager=ref(x))
    del state["blocks.1.attn.v_bias"]
    with pytest.raises(ValueError, match=r"blocks.1.attn.q_bias without blocks.1.attn.v_bias"):
        load_checkpoint(vitfast.VisionTransformer(**cfg), state)


# --------------------------------------------------------------------------------------------
# timm's own Eva models (where timm is installed)
# --------------------------------------------------------------------------------------------
# timm's names at 2 blocks and a small width: its DINOv3 (plain MLP; q / v biases; the unpacked SwiGLU of the
# "plus" models; class-token pooling), EVA (a position table, no RoPE) and EVA-02
TIMM_EVA = {
    "vit_small_patch16_dinov3": dict(embed_dim=64, num_heads=2),
    "vit_small_patch16_dinov3_qkvb": dict(embed_dim=64, num_heads=2, global_pool="token"),
    "vit_small_plus_patch16_dinov3": dict(embed_dim=64, num_heads=2),
    "eva_giant_patch14_224": dict(embed_dim=48, num_heads=3, img_size=28),
    # EVA-02: RotaryEmbeddingCat's interleaved pairs and a position table; packed qkv (tiny) or q / k / v
    # projections with the MLP's LayerNorm (base), EVA-CLIP's attention LayerNorm, a dynamic image size
    "eva02_tiny_patch14_224": dict(img_size=56),
    "eva02_base_patch14_224": dict(embed_dim=96, num_heads=2, img_size=56),
    "eva02_base_patch16_clip_224": dict(embed_dim=96, num_heads=2, img_size=64),
    "eva02_small_patch14_336": dict(embed_dim=96, num_heads=2, img_size=56, dynamic_img_size=True),
    # Perception Encoder: timm's AttentionRope (a packed qkv with its own bias, interleaved pairs), RoPE with
    # grid offset 1 and xy indexing, norm_pre; PE-Core's attention-pooling head with 8 heads whatever the width
    # (and the gigantic's MLP ratio 4 beside the blocks' 5.83, no class token); PE-Lang's layer-scale without a
    # final norm; PE-Spatial's mean pooling
    "vit_pe_core_tiny_patch16_384": dict(embed_dim=48, num_heads=3, img_size=48),
    "vit_pe_core_gigantic_patch14_448": dict(embed_dim=96, num_heads=2, img_size=42),
    "vit_pe_lang_large_patch14_448": dict(embed_dim=64, num_heads=2, img_size=42),
    "vit_pe_spatial_tiny_patch16_512": dict(embed_dim=48, num_heads=3, img_size=48),
    # RoPE-ViT's axial RoPE, with and without a position table
    "vit_small_patch16_rope_224": dict(embed_dim=64, num_heads=2, img_size=48),
    "vit_small_patch16_rope_ape_224": dict(embed_dim=64, num_heads=2, img_size=48),
}
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(TIMM_EVA))
def test_optimize_timm_eva_equals_timm(name, device, no_tf32):
    timm = pytest.importorskip("timm")
    src = timm.create_model(name, pretrained=False, depth=2, **TIMM_EVA[name]).to(device).eval()
    with torch.no_grad():       # timm zeroes some biases and heads at init
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    src64 = copy.deepcopy(src).double()
    opt, opt64 = vitfast.optimize(src), vitfast.optimize(copy.deepcopy(src64))
    P = src.patch_embed.patch_size             # another grid (3 x 2 patches) for a dynamic size
    size = (3 * P[0], 2 * P[1]) if src.dynamic_img_size else src.patch_embed.img_size
    x = torch.randn(2, 3, *size, device=device)
    with torch.no_grad():
        ref, eager = src64(x.double()), src(x)
        assert_close(opt(x), ref, eager=eager)
        # (timm resamples a position table for another grid in float32, both models alike)
        resampled = src.dynamic_img_size and src.pos_embed is not None
        assert_close(opt64(x.double()), ref, tol=1e-7 if resampled else None, name="float64")
        assert_close(opt.forward_features(x), src64.forward_features(x.double()), eager=src.forward_features(x),
                     name="features")
        if device == "cuda":
            low = copy.deepcopy(src).to(torch.bfloat16)
            out = vitfast.optimize(low)(x.to(torch.bfloat16))
            assert_close(out, ref, dtype=torch.bfloat16, eager=low(x.to(torch.bfloat16)), name="bf16")


@pytest.mark.parametrize("kw", [dict(swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True), dict(scale_mlp=True)],
                         ids=["swiglu_eva_clip_norms", "mlp_norm"])
def test_optimize_timm_eva_with_inner_norms_equals_timm(kw):
    """EVA-02's LayerNorm on the (gated) MLP features and EVA-CLIP's on the attention output, in timm's Eva (without
    RoPE here)."""
    pytest.importorskip("timm")
    from timm.models.eva import Eva

    src = Eva(img_size=28, patch_size=14, embed_dim=48, depth=2, num_heads=3, mlp_ratio=4 * 2 / 3, num_classes=3,
              **kw).double().eval()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    opt = vitfast.optimize(copy.deepcopy(src))
    assert opt.blocks[0].mlp.norm.weight.shape == src.blocks[0].mlp.norm.weight.shape
    x = torch.randn(2, 3, 28, 28, dtype=F64)
    with torch.no_grad():
        assert_close(opt(x), src(x))


@pytest.mark.parametrize("name", ["vit_small_patch16_dinov3", "vit_small_plus_patch16_dinov3"])
def test_timm_dinov3_checkpoint_loads_into_the_named_model(name):
    """timm's DINOv3 state_dict (its Eva keys; the "plus" model's unpacked SwiGLU) loads into vitfast's model of
    the same name, which then equals timm's model (in float64, with timm's RoPE rounding)."""
    timm = pytest.importorskip("timm")
    kw = dict(depth=2, embed_dim=64, num_heads=2)
    src = timm.create_model(name, pretrained=False, num_classes=3, **kw).double().eval()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model = vitfast.create_model(name, num_classes=3, rope_rounding="timm", **kw)
    from vitfast.checkpoint import load_checkpoint

    load_checkpoint(model.double().eval(), src.state_dict())
    x = torch.randn(2, 3, 32, 64, dtype=F64)
    with torch.no_grad():
        assert_close(model(x), src(x))
