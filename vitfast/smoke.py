"""`vitfast smoke`: every op once at ViT shapes (default ViT-B/16, batch 8, bf16) against the reference,
with a one-screen verdict. The first thing to run on a new GPU or a new torch / Triton.

Each row computes one op with vitfast and checks it against `vitfast.reference` run in float64 on the
same device, from exactly the same (rounded) inputs, and against eager PyTorch in the same dtype
(DESIGN.md §4): PASS when rel_err <= TOLERANCE[dtype] and rel_err <= 2 · eager's rel_err + FLOOR. The
whole-model rows compare against the reference model in float32 (a deep model in bf16 is further
off than one op: MODEL_TOLERANCE), and the CUDA-graph row replays the captured model on new
images. `first ms` is the first call (Triton compiles and autotunes there), `ms` a second call,
both host clock around a synchronised call. Exit status 0 when every row passes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from vitfast import ops, reference
from vitfast.configs import CONFIGS
from vitfast.testing import FLOOR, MODEL_TOLERANCE, TOLERANCE, rel_err, tolerance_key

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _timed(fn, device):
    """(result, ms) of one call, synchronised."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, (time.perf_counter() - t0) * 1e3


def _row(name, shape, out, ref64, eager, dtype, tol=None):
    """Verdict of one output: errors vs the float64 reference and eager's error in the same dtype."""
    key = tolerance_key(dtype, out.device)
    tol = TOLERANCE[key] if tol is None else tol
    err, eager_err = rel_err(out, ref64), rel_err(eager, ref64)
    bound = min(tol, 2 * eager_err + FLOOR[key])
    return {"op": name, "shape": shape, "rel_err": err, "eager_err": eager_err, "bound": bound,
            "status": "PASS" if err <= bound else "FAIL"}


class Smoke:
    """The inputs of one ViT block and the checks that use them."""

    def __init__(self, model: str, batch: int, image_size: int, dtype: torch.dtype, device: torch.device,
                 depth: int | None = None):
        cfg = CONFIGS[model]
        self.model_name, self.dtype, self.device = model, dtype, device
        self.model_kwargs = dict(img_size=image_size, **({} if depth is None else {"depth": depth}))
        self.C, self.H, self.P = cfg["embed_dim"], cfg["num_heads"], cfg["patch_size"]
        self.B, self.S = batch, image_size
        self.T = 1 + (image_size // self.P) ** 2
        self.hidden = int(self.C * cfg.get("mlp_ratio", 4.0))
        g = torch.Generator().manual_seed(0)

        def rand(*shape, scale=1.0):   # drawn on the CPU (the same on every device), then moved and rounded
            return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

        self.rand = rand
        self.x = rand(batch, self.T, self.C)                                          # (B, T, C)
        self.residual = rand(batch, self.T, self.C)
        self.images_u8 = torch.randint(0, 256, (batch, 3, image_size, image_size), generator=g,
                                       dtype=torch.uint8).to(device)

    def f64(self, *ts):
        return [None if t is None else t.double() for t in ts]

    def checks(self):
        """(name, shape, run) for every op: run() -> (vitfast output, float64 reference, eager in dtype)."""
        B, T, C, H, P, S = self.B, self.T, self.C, self.H, self.P, self.S
        rand, f64 = self.rand, self.f64
        x, res = self.x, self.residual
        mean = torch.tensor(MEAN, device=self.device)
        std = torch.tensor(STD, device=self.device)
        pe_w, pe_b = rand(C, 3, P, P, scale=(3 * P * P) ** -0.5), rand(C, scale=0.1)
        cls, pos = rand(1, 1, C), rand(1, T, C, scale=0.5)
        ln_w, ln_b = 1 + rand(C, scale=0.1), rand(C, scale=0.1)
        lin = {name: (rand(n, k, scale=k ** -0.5), rand(n, scale=0.1)) for name, n, k in
               (("qkv", 3 * C, C), ("proj", C, C), ("fc1", self.hidden, C), ("fc2", C, self.hidden))}
        images_f = rand(B, 3, S, S)

        def pe_u8():
            args = (self.images_u8, pe_w, pe_b, cls, pos, mean, std)
            out = ops.patch_embed(self.images_u8, pe_w, pe_b, cls_token=cls, pos_embed=pos, mean=mean, std=std)
            return out, reference.patch_embed(self.images_u8, *f64(pe_w, pe_b, cls, pos), mean, std), \
                reference.patch_embed(*args)

        def pe_float():
            out = ops.patch_embed(images_f, pe_w, pe_b, cls_token=cls, pos_embed=pos)
            return (out, reference.patch_embed(*f64(images_f, pe_w, pe_b, cls, pos)),
                    reference.patch_embed(images_f, pe_w, pe_b, cls, pos))

        def layer_norm():
            return (ops.layer_norm(x, ln_w, ln_b), reference.layer_norm(*f64(x, ln_w, ln_b)),
                    torch.nn.functional.layer_norm(x, (C,), ln_w, ln_b, 1e-6))

        def add_layer_norm():
            y, _ = ops.add_layer_norm(x, res, ln_w, ln_b)
            return (y, reference.add_layer_norm(*f64(x, res, ln_w, ln_b))[0],
                    torch.nn.functional.layer_norm(x + res, (C,), ln_w, ln_b, 1e-6))

        def linear(name, inp, activation=None, residual=None, variant=None):
            w, b = lin[name]
            if variant is None:
                out = ops.linear(inp, w, b, activation=activation, residual=residual)
            else:
                from vitfast.kernels import linear as linear_kernels
                out = linear_kernels.linear(inp, w, b, activation=activation, residual=residual, variant=variant)
            return (out, reference.linear(*f64(inp, w, b), activation, *f64(residual)),
                    reference.linear(inp, w, b, activation, residual))

        qkv = rand(B, T, 3 * C)                      # (B, T, 3C), timm's packed layout
        hid = rand(B, T, self.hidden, scale=0.5)     # (B, T, hidden), fc1's output

        def attention_qkv():
            out, _ = ops.attention_qkv(qkv, H, return_cls_attn=True)
            return out, reference.attention_qkv(qkv.double(), H), reference.attention_qkv(qkv, H)

        def cls_attn():
            _, got = ops.attention_qkv(qkv, H, return_cls_attn=True)
            return (got, reference.attention_qkv(qkv.double(), H, return_cls_attn=True)[1],
                    reference.attention_qkv(qkv, H, return_cls_attn=True)[1])

        def attention():
            q, k, v = reference.split_qkv(qkv, H)    # (B, H, T, D) strided views
            return ops.attention(q, k, v), reference.attention(*f64(q, k, v)), reference.attention(q, k, v)

        rows = [("patch_embed uint8+norm", f"[{B},3,{S},{S}] -> [{B},{T},{C}]", pe_u8),
                ("patch_embed", f"[{B},3,{S},{S}] -> [{B},{T},{C}]", pe_float),
                ("layer_norm", f"[{B},{T},{C}]", layer_norm),
                ("add_layer_norm", f"[{B},{T},{C}]", add_layer_norm),
                ("linear qkv", f"[{B},{T},{C}] x [{3 * C},{C}]", lambda: linear("qkv", x)),
                ("attention_qkv", f"[{B},{T},{3 * C}] H={H}", attention_qkv),
                ("attention_qkv cls map", f"[{B},{H},{T}]", cls_attn),
                ("attention", f"[{B},{H},{T},{C // H}]", attention),
                ("linear proj+residual", f"[{B},{T},{C}] x [{C},{C}]", lambda: linear("proj", x, residual=res)),
                ("linear fc1+gelu", f"[{B},{T},{C}] x [{self.hidden},{C}]", lambda: linear("fc1", x, "gelu")),
                ("linear fc2+residual", f"[{B},{T},{self.hidden}] x [{C},{self.hidden}]",
                 lambda: linear("fc2", hid, residual=res))]
        for variant in ("tiled", "persistent", "tma"):
            rows.append((f"linear fc1+gelu {variant}", f"[{B},{T},{C}] x [{self.hidden},{C}]",
                         lambda v=variant: linear("fc1", x, "gelu", variant=v)))
        return rows

    def model_checks(self):
        """The whole model: vitfast vs the reference in float32 (and eager in dtype), then a CUDA graph
        of it replayed on new images."""
        from vitfast.model import create_model

        kw = self.model_kwargs
        torch.manual_seed(0)
        ref = reference.create_model(self.model_name, **kw).to(self.device).eval()
        with torch.no_grad():   # init leaves biases 0 and norms 1: make every weight count
            for p in ref.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        model = create_model(self.model_name, **kw).to(self.device).eval()
        model.load_state_dict(ref.state_dict())
        model = model.to(self.dtype)
        low = reference.create_model(self.model_name, **kw).to(self.device).eval()
        low.load_state_dict(ref.state_dict())
        low = low.to(self.dtype)
        images = torch.randn(self.B, 3, self.S, self.S, device=self.device)
        tol = MODEL_TOLERANCE.get(self.dtype)
        shape = f"{self.model_name} [{self.B},3,{self.S},{self.S}]"

        def forward():
            with torch.inference_mode():
                return model(images.to(self.dtype)), ref(images), low(images.to(self.dtype))

        rows = [("model", shape, forward, tol)]
        if self.device.type == "cuda":
            def graph():
                static = images.to(self.dtype).clone()
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.inference_mode(), torch.cuda.stream(side):
                    model(static)                     # warm-up on this shape (tuned by `model` already)
                torch.cuda.current_stream(self.device).wait_stream(side)
                g = torch.cuda.CUDAGraph()
                with torch.inference_mode(), torch.cuda.graph(g):
                    out = model(static)
                fresh = torch.randn_like(images)
                static.copy_(fresh.to(self.dtype))
                g.replay()
                with torch.inference_mode():
                    return out.clone(), ref(fresh), low(fresh.to(self.dtype))
            rows.append(("model CUDA graph replay", shape, graph, tol))
        return rows


def run(model: str = "vit_base_patch16_224", batch: int = 8, image_size: int = 224, dtype: str = "bf16",
        device: str | None = None, depth: int | None = None) -> list[dict]:
    """Every check; one dict per row (op, shape, rel_err, eager_err, bound, status, first_ms, ms, error).
    depth: blocks of the whole-model rows (default: the model's)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    smoke = Smoke(model, batch, image_size, DTYPES[dtype], dev, depth)
    checks = [(n, s, fn, None) for n, s, fn in smoke.checks()] + smoke.model_checks()
    rows = []
    for name, shape, fn, tol in checks:
        try:
            (out, ref, eager), first_ms = _timed(fn, dev)
            _, ms = _timed(fn, dev)
            row = _row(name, shape, out, ref, eager, smoke.dtype, tol)
            row.update(first_ms=first_ms, ms=ms, error=None)
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            row = {"op": name, "shape": shape, "status": "ERROR", "error": f"{type(e).__name__}: {e}".splitlines()[0]}
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    fmt = lambda v, f: "–" if v is None else format(v, f)
    lines = [f"{'op':<27}{'shape':<38}{'rel err':>9}{'eager':>9}{'bound':>9}{'first ms':>10}{'ms':>9}  verdict",
             "-" * 120]
    for r in rows:
        if r["status"] == "ERROR":
            lines.append(f"{r['op']:<27}{r['shape']:<38}  ERROR  {r['error'][:80]}")
            continue
        lines.append(f"{r['op']:<27}{r['shape']:<38}{fmt(r['rel_err'], '9.2e')}{fmt(r['eager_err'], '9.2e')}"
                     f"{fmt(r['bound'], '9.1e')}{fmt(r['first_ms'], '10.1f')}{fmt(r['ms'], '9.2f')}  {r['status']}")
    bad = [r["op"] for r in rows if r["status"] != "PASS"]
    lines.append(f"smoke: {len(rows) - len(bad)}/{len(rows)} pass"
                 + (f"; not passing: {', '.join(bad)}" if bad else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="vitfast smoke", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(CONFIGS), default="vit_base_patch16_224")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--depth", type=int, default=None, help="blocks of the whole-model rows (default: the model's)")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.batch < 1 or args.image_size % CONFIGS[args.model]["patch_size"]:
        p.error(f"--batch must be >= 1 and --image-size divisible by the patch size "
                f"{CONFIGS[args.model]['patch_size']}; got {args.batch} and {args.image_size}")
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"vitfast smoke: {args.model} batch {args.batch} {args.image_size} px {args.dtype} on {name} "
          f"(torch {torch.__version__})")
    rows = run(args.model, args.batch, args.image_size, args.dtype, args.device, args.depth)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if all(r["status"] == "PASS" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
