"""timm's BEiT through `vitfast.optimize` (vitfast.timm_beit): the relative position bias of each block and the shared
one in the attention kernel, the q / v biases apart from the qkv weight, the layer-scales (gamma_1 / gamma_2), mean
pooling through fc_norm or the class token. Without timm installed, a port of timm.models.beit's forward (the same
class and attribute names, under timm's module) is the reference, in float64; with timm, timm's own Beit too (on the
CPU, and on a GPU in bf16)."""

import copy
import math

import pytest
import torch
from torch import nn

import vitfast
from vitfast.convert import UnsupportedFeatureError
from vitfast.graphs import CUDAGraphRunner
from vitfast.testing import assert_close, backward_weighted, perturbed, rel_err, simulate_cuda_graphs
from vitfast.timm_beit import TimmBeit


# ---- a port of timm.models.beit (timm 1.0): what vitfast reads, and timm's forward as the reference ----
def gen_relative_position_index(window_size):
    num_relative_distance = (2 * window_size[0] - 1) * (2 * window_size[1] - 1) + 3
    window_area = window_size[0] * window_size[1]
    coords = torch.stack(torch.meshgrid(torch.arange(window_size[0]), torch.arange(window_size[1]), indexing="ij"))
    coords_flatten = torch.flatten(coords, 1)
    relative_coords = (coords_flatten[:, :, None] - coords_flatten[:, None, :]).permute(1, 2, 0).contiguous()
    relative_coords[:, :, 0] += window_size[0] - 1
    relative_coords[:, :, 1] += window_size[1] - 1
    relative_coords[:, :, 0] *= 2 * window_size[1] - 1
    index = torch.zeros(size=(window_area + 1,) * 2, dtype=relative_coords.dtype)
    index[1:, 1:] = relative_coords.sum(-1)
    index[0, 0:] = num_relative_distance - 3
    index[0:, 0] = num_relative_distance - 2
    index[0, 0] = num_relative_distance - 1
    return index


class PatchEmbed(nn.Module):
    __module__ = "timm.layers.patch_embed"

    def __init__(self, img_size, patch_size, in_chans, dim):
        super().__init__()
        self.img_size, self.patch_size, self.dynamic_img_pad = (img_size,) * 2, (patch_size,) * 2, False
        self.proj, self.norm = nn.Conv2d(in_chans, dim, patch_size, patch_size), nn.Identity()

    def forward(self, x):
        assert tuple(x.shape[2:]) == self.img_size
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class Mlp(nn.Module):
    __module__ = "timm.layers.mlp"

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0)
        self.norm, self.fc2, self.drop2 = nn.Identity(), nn.Linear(hidden, dim), nn.Dropout(0.0)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class Attention(nn.Module):
    __module__ = "timm.models.beit"

    def __init__(self, dim, num_heads, qkv_bias, window_size):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        if window_size:
            self.window_size = window_size
            n = (2 * window_size[0] - 1) * (2 * window_size[1] - 1) + 3
            self.relative_position_bias_table = nn.Parameter(torch.zeros(n, num_heads))
            self.register_buffer("relative_position_index", gen_relative_position_index(window_size),
                                 persistent=False)
        else:
            self.window_size = self.relative_position_bias_table = self.relative_position_index = None
        self.attn_drop, self.proj, self.proj_drop = nn.Dropout(0.0), nn.Linear(dim, dim), nn.Dropout(0.0)

    def _get_rel_pos_bias(self):
        area = self.window_size[0] * self.window_size[1] + 1
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(area, area, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x, shared_rel_pos_bias=None):
        B, N, C = x.shape
        if self.q_bias is None:
            qkv = self.qkv(x)
        else:
            qkv = nn.functional.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.relative_position_bias_table is not None:
            attn = attn + self._get_rel_pos_bias()
        if shared_rel_pos_bias is not None:
            attn = attn + shared_rel_pos_bias
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    __module__ = "timm.models.beit"

    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, window_size, init_values):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, num_heads, qkv_bias, window_size)
        self.drop_path1 = self.drop_path2 = nn.Identity()
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, int(dim * mlp_ratio))
        if init_values:
            self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
            self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x, shared_rel_pos_bias=None):
        if self.gamma_1 is None:
            x = x + self.drop_path1(self.attn(self.norm1(x), shared_rel_pos_bias=shared_rel_pos_bias))
            return x + self.drop_path2(self.mlp(self.norm2(x)))
        x = x + self.drop_path1(self.gamma_1 * self.attn(self.norm1(x), shared_rel_pos_bias=shared_rel_pos_bias))
        return x + self.drop_path2(self.gamma_2 * self.mlp(self.norm2(x)))


class RelativePositionBias(nn.Module):
    __module__ = "timm.models.beit"

    def __init__(self, window_size, num_heads):
        super().__init__()
        self.window_size, self.window_area = window_size, window_size[0] * window_size[1]
        n = (2 * window_size[0] - 1) * (2 * window_size[1] - 1) + 3
        self.relative_position_bias_table = nn.Parameter(torch.zeros(n, num_heads))
        self.register_buffer("relative_position_index", gen_relative_position_index(window_size), persistent=False)

    def forward(self):
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(
            self.window_area + 1, self.window_area + 1, -1)
        return bias.permute(2, 0, 1).contiguous()


class Beit(nn.Module):
    __module__ = "timm.models.beit"

    def __init__(self, img_size=32, patch_size=8, num_classes=5, global_pool="avg", embed_dim=48, depth=2,
                 num_heads=3, mlp_ratio=2.0, qkv_bias=True, init_values=0.1, use_abs_pos_emb=False,
                 use_rel_pos_bias=True, use_shared_rel_pos_bias=False, use_fc_norm=True):
        super().__init__()
        self.num_classes, self.global_pool, self.embed_dim, self.num_prefix_tokens = num_classes, global_pool, \
            embed_dim, 1
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        grid = (img_size // patch_size,) * 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1] + 1, embed_dim)) if use_abs_pos_emb else None
        self.pos_drop = nn.Dropout(0.0)
        self.rel_pos_bias = RelativePositionBias(grid, num_heads) if use_shared_rel_pos_bias else None
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, grid if use_rel_pos_bias else None,
                                          init_values) for _ in range(depth))
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(embed_dim, eps=1e-6)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(0.0)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x):
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        rel_pos_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        for blk in self.blocks:
            x = blk(x, shared_rel_pos_bias=rel_pos_bias)
        return self.norm(x)

    def forward_head(self, x, pre_logits=False):
        if self.global_pool:
            x = x[:, self.num_prefix_tokens:].mean(dim=1) if self.global_pool == "avg" else x[:, 0]
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def beit(**kw):
    torch.manual_seed(0)
    model = Beit(**kw)
    with torch.no_grad():                     # tables of a trained model's size (a few units), not init's zeros
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_(0.0, 1.5)
    return perturbed(model)


# BEiT's fine-tuned models (a bias per block, mean pooling through fc_norm, layer-scale), BEiT's pretraining layout
# (a shared bias, the class token, the final norm, no layer-scale) with a position table and no q / v biases
VARIANTS = {"finetuned": {}, "shared": dict(use_shared_rel_pos_bias=True, use_rel_pos_bias=False, global_pool="token",
                                            use_fc_norm=False, init_values=None, use_abs_pos_emb=True,
                                            qkv_bias=False),
            "both": dict(use_shared_rel_pos_bias=True, num_classes=0)}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_equals_timm(variant):
    """forward, forward_features and forward_head(pre_logits=True) as timm's in float64, within 2x its own fp32
    error; the stand-in holds timm's parameters."""
    model = beit(**VARIANTS[variant])
    model64 = copy.deepcopy(model).double()
    opt = vitfast.optimize(model)
    assert isinstance(opt, TimmBeit) and opt.num_classes == model.num_classes
    assert {id(p) for p in opt.parameters()} == {id(p) for p in model.parameters()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for name, call in (("forward", lambda m, px: m(px)), ("forward_features", lambda m, px: m.forward_features(px)),
                           ("pre_logits", lambda m, px: m.forward_head(m.forward_features(px), pre_logits=True))):
            out, ref, eager = call(opt, x), call(model64, x.double()), call(model, x)
            assert out.shape == ref.shape
            assert_close(out, ref, eager=eager, name=name)


def test_trains_timms_tensors():
    """In train mode every parameter (q / v biases, tables, gammas) gets timm's float64 gradient through the kernels'
    backward, the reference never called."""
    model = beit(**{**VARIANTS["both"], "num_classes": 5})
    model64 = copy.deepcopy(model).double()
    opt = vitfast.optimize(model)
    for m in (model, model64, opt):
        m.train()
    x, w = torch.randn(3, 3, 32, 32), torch.randn(3, 5, dtype=torch.float64)
    backward_weighted(model64(x.double()), w)
    backward_weighted(opt(x), w, reference_free=True)
    for (n, p), (_, p64) in zip(model.named_parameters(), model64.named_parameters()):
        assert p.grad is not None, n
        if n.endswith("qkv.weight") or p64.grad.norm() > 1e-6 * max(1.0, p64.norm().item()):
            assert_close(p.grad, p64.grad, name=f"grad {n}")


def test_graph_replays_and_follows_the_tables():
    """One capture (simulated on the CPU) serves every batch; a table changed in place is taken up (the gathered
    biases cached while no gradient is recorded are gathered again, and the graph recaptured)."""
    model = beit()
    opt = vitfast.optimize(model)
    runner = opt.cuda_graphs = simulate_cuda_graphs(CUDAGraphRunner())
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(2, 3, 32, 32)
            assert_close(opt(x), model64(x.double()), eager=model(x), name="logits")
        assert runner.captures == 1
        model.blocks[0].attn.relative_position_bias_table.mul_(-1.0)
        model64 = copy.deepcopy(model).double()
        x = torch.randn(2, 3, 32, 32)
        assert_close(opt(x), model64(x.double()), eager=model(x), name="logits after the change")


def test_refuses_what_it_does_not_run():
    opt = vitfast.optimize(beit())
    with pytest.raises(ValueError, match=r"x: expected images \[B, 3, 32, 32\] \(timm Beit's img_size\), got "
                                         r"\(1, 3, 40, 32\)"):
        opt(torch.randn(1, 3, 40, 32))
    model = beit()
    model.blocks[1].mlp.act = nn.ReLU()
    with pytest.raises(UnsupportedFeatureError, match=r"blocks.1.mlp.act: ReLU"):
        vitfast.optimize(model)
    model = beit()
    model.blocks[0].drop_path1 = nn.Dropout(0.1)
    with pytest.raises(UnsupportedFeatureError, match=r"train mode with .*blocks.0.drop_path1"):
        vitfast.optimize(model.train())


timm = None
try:                                           # timm's own Beit, where timm is installed (never in CPU set-up)
    import timm
except ImportError:
    pass
needs_timm = pytest.mark.skipif(timm is None, reason="needs timm")


@needs_timm
@pytest.mark.parametrize("kw", [dict(use_rel_pos_bias=True, use_abs_pos_emb=False, init_values=0.1),
                                dict(use_shared_rel_pos_bias=True, use_abs_pos_emb=True, use_fc_norm=False,
                                     global_pool="token", qkv_bias=False)], ids=["beit_finetuned", "beit_pretrain"])
def test_equals_timms_own_beit(kw):
    """timm's own Beit (small: 32 px, patches of 8) through vitfast.optimize, logits as timm's in float64."""
    torch.manual_seed(0)
    model = timm.models.beit.Beit(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0,
                                  num_classes=5, **kw)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_(0.0, 1.5)
    model = perturbed(model)
    model64 = copy.deepcopy(model).double()
    opt = vitfast.optimize(model)
    assert isinstance(opt, TimmBeit)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(opt(x), model64(x.double()), eager=model(x), name="logits")


@pytest.mark.gpu
@needs_timm
def test_timm_beit_on_gpu():
    """timm's beit_base_patch16_224 (random weights, its tables and gammas perturbed) at batch 32 in bf16 on the GPU:
    eager, capture and replay within 2x timm's own bf16 error against timm in float32."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = perturbed(timm.create_model("beit_base_patch16_224", pretrained=False))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("relative_position_bias_table"):
                    p.normal_(0.0, 1.5)
    ref = copy.deepcopy(model)
    model16 = model.to(torch.bfloat16)
    opt = vitfast.optimize(copy.deepcopy(model16))
    x = torch.randn(32, 3, 224, 224, device="cuda")
    with torch.no_grad():
        want = ref(x)
        bound = 2 * rel_err(model16(x.bfloat16()), want) + 1e-3
        for call in ("eager", "capture", "replay"):
            err = rel_err(opt(x.bfloat16()), want)
            assert err <= bound and math.isfinite(err), f"{call}: {err:.3e} > {bound:.3e}"
        assert opt.cuda_graphs.captures == 1
