"""`vitfast smoke` on the CPU (Triton's interpreter, fp32, a one-block ViT-Ti at 32 px): every row
checked against the float64 reference, and a wrong op turns its row and the exit status to failure."""

import json

import pytest
import torch

from vitfast import ops, smoke

ARGS = ["--model", "vit_tiny_patch16_224", "--batch", "1", "--image-size", "32", "--dtype", "fp32", "--depth", "1",
        "--device", "cpu"]


def test_every_op_passes_against_the_reference(tmp_path, capsys):
    assert smoke.main([*ARGS, "--json", str(tmp_path / "smoke.json")]) == 0
    rows = json.loads((tmp_path / "smoke.json").read_text())
    assert [r["op"] for r in rows][:4] == ["patch_embed uint8+norm", "patch_embed", "layer_norm", "add_layer_norm"]
    assert {"linear fc1+gelu tiled", "linear fc1+gelu persistent", "linear fc1+gelu tma", "attention_qkv cls map",
            "model"} <= {r["op"] for r in rows}
    for r in rows:
        assert r["status"] == "PASS" and r["error"] is None, r
        assert r["rel_err"] <= r["bound"] <= 1e-5 and r["first_ms"] > 0 and r["ms"] > 0
    assert f"smoke: {len(rows)}/{len(rows)} pass" in capsys.readouterr().out


def test_a_wrong_op_fails_its_row_and_the_run(monkeypatch, capsys):
    monkeypatch.setattr(ops, "layer_norm", lambda x, w, b, eps=1e-6: torch.nn.functional.layer_norm(
        x, (x.shape[-1],), w, b, eps) * 1.01)
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image")
    monkeypatch.setattr(ops, "attention", broken)
    assert smoke.main(ARGS) == 1
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("layer_norm ", "attention "))}
    assert rows["layer_norm"].endswith("FAIL")
    assert "ERROR  RuntimeError: no kernel image" in rows["attention"]
    assert "not passing: layer_norm, attention" in out


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit):
        smoke.main(["--image-size", "100"])
