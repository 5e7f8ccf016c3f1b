"""Checkpoint files and key layouts: timm / torchvision keys, safetensors and torch files (wrapped
or DDP-prefixed), position tables resampled to the model's grid, and errors naming the bad keys.
(The HF layouts against HF's own forward are in test_convert.py.)"""

import pytest
import torch

import vitfast
from vitfast import reference
from vitfast.checkpoint import load_checkpoint, load_state_dict_file, to_timm, torchvision_to_timm

KW = dict(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=5)


def source_state_dict(**overrides):
    model = vitfast.VisionTransformer(**{**KW, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model.state_dict()


def assert_loaded(model, sd):
    got = model.state_dict()
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert torch.equal(got[k], v), k


def to_torchvision_keys(sd, legacy_mlp=False):
    """timm keys -> torchvision's VisionTransformer keys, written out by hand."""
    fc = ("linear_1", "linear_2") if legacy_mlp else ("0", "3")
    per_block = {"norm1": "ln_1", "norm2": "ln_2", "attn.qkv.weight": "self_attention.in_proj_weight",
                 "attn.qkv.bias": "self_attention.in_proj_bias", "attn.proj": "self_attention.out_proj",
                 "mlp.fc1": f"mlp.{fc[0]}", "mlp.fc2": f"mlp.{fc[1]}"}
    top = {"cls_token": "class_token", "pos_embed": "encoder.pos_embedding", "patch_embed.proj": "conv_proj",
           "norm": "encoder.ln", "head": "heads.head"}
    out = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            stem = next(s for s in per_block if rest.startswith(s))
            out[f"encoder.layers.encoder_layer_{i}.{per_block[stem]}{rest[len(stem):]}"] = v
        else:
            stem = next(s for s in top if k == s or k.startswith(s + "."))
            out[top[stem] + k[len(stem):]] = v
    return out


@pytest.mark.parametrize("fmt", ["safetensors", "torch", "torch_wrapped", "torch_ddp"])
def test_timm_layout_files_load(tmp_path, fmt):
    sd = source_state_dict()
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pth")
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(path))
    elif fmt == "torch":
        torch.save(sd, path)
    elif fmt == "torch_wrapped":
        torch.save({"state_dict": sd, "epoch": 3}, path)
    else:
        torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, path)
    assert_loaded(load_checkpoint(vitfast.VisionTransformer(**KW), path), sd)
    model = vitfast.create_model("vit_tiny_patch16_224", img_size=32, embed_dim=32, depth=2, num_heads=2,
                                 num_classes=5, checkpoint_path=path)
    assert_loaded(model, sd)


@pytest.mark.parametrize("legacy_mlp", [False, True], ids=["mlp.0/3", "mlp.linear_1/2"])
def test_torchvision_layout_loads(tmp_path, legacy_mlp):
    sd = source_state_dict()
    tv = to_torchvision_keys(sd, legacy_mlp)
    assert "encoder.layers.encoder_layer_1.self_attention.in_proj_weight" in tv
    torch.save(tv, tmp_path / "tv.pth")
    assert_loaded(load_checkpoint(vitfast.VisionTransformer(**KW), tmp_path / "tv.pth"), sd)
    bad = {**tv, "heads.pre_logits.weight": torch.zeros(3, 32)}
    with pytest.raises(ValueError, match=r"heads\.pre_logits\.weight.*representation_size"):
        torchvision_to_timm(bad)


def test_pos_embed_of_another_grid_is_resampled():
    sd = source_state_dict()                                           # 2x2 grid
    model = load_checkpoint(vitfast.VisionTransformer(**{**KW, "img_size": 48}), sd)
    assert model.pos_embed.shape == (1, 10, 32)
    expect = reference.resample_pos_embed(sd["pos_embed"], (3, 3), (2, 2))
    assert torch.equal(model.pos_embed.detach(), expect)
    assert torch.equal(model.pos_embed[:, 0].detach(), sd["pos_embed"][:, 0])


def test_bad_checkpoints_name_the_keys(tmp_path):
    model = vitfast.VisionTransformer(**KW)
    sd = source_state_dict()
    missing = {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['blocks\.1\.mlp\.fc2\.bias'\]"):
        load_checkpoint(model, missing)
    with pytest.raises(ValueError, match=r"unexpected keys \['blocks\.0\.ls1\.gamma'\]"):
        load_checkpoint(model, {**sd, "blocks.0.ls1.gamma": torch.ones(32)})
    with pytest.raises(ValueError, match=r"head\.weight: checkpoint \(9, 32\) vs model \(5, 32\).*num_classes"):
        load_checkpoint(model, source_state_dict(num_classes=9))
    with pytest.raises(ValueError, match="no such file"):
        load_checkpoint(model, tmp_path / "nope.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="holds no state_dict"):
        load_state_dict_file(tmp_path / "list.pth")
    with pytest.raises(ValueError, match="unrecognised key layout"):
        to_timm({"foo.weight": torch.zeros(1)})
    # a failed load leaves the model untouched
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError):
        load_checkpoint(model, missing)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
