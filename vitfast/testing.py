"""Comparison helpers for tests (DESIGN.md §4).

Ground truth is `vitfast.reference` in float64 on the CPU. A result in dtype `dt` passes when
    rel_err(out, ref64) <= TOLERANCE[dt]                           (absolute ceiling), and
    rel_err(out, ref64) <= 2 · rel_err(eager_same_dtype, ref64) + floor   (when eager is given),
with rel_err(a, b) = ‖a − b‖ / ‖b‖ in float64.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch import Tensor

from vitfast.kernels import tf32_enabled

# Rough ceilings of the relative error vs the float64 reference, per dtype.
TOLERANCE = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,     # ieee fp32
    "tf32": 1e-3,            # fp32 inputs with tf32 matmuls allowed
    torch.float16: 5e-3,
    torch.bfloat16: 2e-2,
}
# Ceilings for a whole 12-block ViT-B in low precision vs its fp32 output. The per-op ceilings above do
# not bound a deep model: the eager reference ViT-B/16 (timm-like init scales) is already ~1.6e-2 off in
# bf16 and ~2e-3 in fp16. The bound that matters is err <= 2x the eager model's own error in that dtype.
MODEL_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 5e-2}
# Floor added to 2x eager's error: eager may be nearly exact on tiny problems.
FLOOR = {torch.float64: 1e-13, torch.float32: 2e-6, "tf32": 2e-4, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def tolerance_key(dtype: torch.dtype, device: torch.device | str = "cpu"):
    """The TOLERANCE key for results in `dtype` on `device` (fp32 on CUDA with tf32 allowed -> 'tf32')."""
    if dtype == torch.float32 and torch.device(device).type == "cuda" and tf32_enabled():
        return "tf32"
    return dtype


@contextlib.contextmanager
def matmul_tf32(enabled: bool):
    """Allow (or forbid) TF32 for fp32 matmuls inside the block, through torch's current API
    (`torch.backends.cuda.matmul.fp32_precision`; the legacy `allow_tf32` on older torch), and put
    the previous setting back after it."""
    matmul = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    value = ("tf32" if enabled else "ieee") if name == "fp32_precision" else enabled
    old = getattr(matmul, name)
    setattr(matmul, name, value)
    try:
        yield
    finally:
        setattr(matmul, name, old)


def rel_err(out: Tensor, ref: Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (on the CPU). NaN/Inf anywhere in `out` gives inf."""
    if out.shape != ref.shape:
        raise AssertionError(f"shape mismatch: got {tuple(out.shape)}, reference {tuple(ref.shape)}")
    out64 = out.detach().to("cpu", torch.float64)
    ref64 = ref.detach().to("cpu", torch.float64)
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    num = (out64 - ref64).norm().item()
    if denom == 0.0:
        return num
    return num / denom


def assert_close(out: Tensor, ref64: Tensor, dtype: torch.dtype | None = None, eager: Tensor | None = None,
                 tol: float | None = None, floor: float | None = None, name: str = "output") -> float:
    """Assert `out` matches the float64 reference `ref64` within DESIGN.md §4; returns the error.

    dtype: the compute dtype (defaults to out.dtype); eager: the same computation done by eager
    PyTorch in that dtype, whose error bounds ours (≤ 2x + floor).
    """
    key = tolerance_key(dtype or out.dtype, out.device)
    tol = TOLERANCE[key] if tol is None else tol
    err = rel_err(out, ref64)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e} ({key})"
    if eager is not None:
        floor = FLOOR[key] if floor is None else floor
        eager_err = rel_err(eager, ref64)
        bound = 2 * eager_err + floor
        assert err <= bound, (f"{name}: relative error {err:.3e} > 2 x eager's {eager_err:.3e} + {floor:.0e} "
                              f"({key})")
    return err


def assert_selects_hidden_states(model, hf64, args: tuple, ref, pick) -> None:
    """`model(*args, output_hidden_states=pick)` with `pick` an index or a list of indices returns HF's tuple of
    hidden states with only the picked ones (those of `ref`, HF's float64 output with all of them), the others None,
    as transformers 5.2x does (and none for 0, which HF reads as False); HF's own answer, `hf64` on the float64 args,
    is checked too where it has that form (transformers 5.17 keeps them all for an index and mistakes a list)."""
    n = len(ref.hidden_states)
    picked = {i % n for i in ([pick] if isinstance(pick, int) else pick)}
    with torch.no_grad():
        out = model(*args, output_hidden_states=pick)
        theirs = hf64(*(a.double() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args),
                      output_hidden_states=pick).hidden_states
    if not pick:
        assert out.hidden_states is None and theirs is None, f"output_hidden_states={pick}"
        return
    assert [h is None for h in out.hidden_states] == [i not in picked for i in range(n)], \
        f"output_hidden_states={pick}: got {[h is not None for h in out.hidden_states]}"
    for i in picked:
        assert_close(out.hidden_states[i], ref.hidden_states[i], name=f"output_hidden_states={pick}: [{i}]")
    if len(theirs) == n and any(h is None for h in theirs):
        assert [h is None for h in out.hidden_states] == [h is None for h in theirs]


def two_image_prompt() -> Tensor:
    """Token ids [1, 17] around two images of 6 and 2 merged tokens (image token 98, each between the vision start /
    end tokens 96 / 95), then 5 text tokens: the prompt of the packed-sequence VLMs' tests."""
    return torch.cat([torch.tensor([[2, 96]]), torch.full((1, 6), 98), torch.tensor([[95, 96]]),
                      torch.full((1, 2), 98), torch.tensor([[95]]), torch.randint(3, 90, (1, 5))], dim=1)


def assert_vlm_equals_hf(opt, model, model64, x: Tensor, kw: dict) -> None:
    """The VLM `opt` (model with its tower on vitfast) on pixel_values x and the other arguments kw: logits within 2x
    HF's own fp32 error (model64: model in float64), greedy `generate` HF's tokens."""
    with torch.no_grad():
        out, ref, eager = (m(pixel_values=px, **kw).logits for m, px in ((opt, x), (model64, x.double()),
                                                                          (model, x)))
        assert_close(out, ref, eager=eager, name="logits")
        gen = dict(kw, pixel_values=x, max_new_tokens=3, do_sample=False)
        assert torch.equal(opt.generate(**gen), model.generate(**gen))


def assert_packed_tower_replays(hf, dtype: torch.dtype, grids: list, patches, keys=("last_hidden_state",)) -> None:
    """A packed-sequence tower `hf` (fp32, on CUDA) copied to `dtype` and optimized: eager, then its CUDA graph's
    capture and replays over batches of other images (each of `grids`, the same token and segment counts; patches(T)
    makes the input), each output of `keys` in `dtype` and against HF in fp32 within 2x the error of HF itself in
    that dtype; one capture."""
    import copy

    import vitfast

    low = copy.deepcopy(hf).to(dtype)
    opt = vitfast.optimize(low)
    with torch.no_grad():
        for grid in grids:
            x = patches(sum(t * h * w for t, h, w in grid))
            g = torch.tensor(grid, device=x.device)
            ref, eager, out = hf(x, g), low(x.to(dtype), g), opt(x.to(dtype), g)
            for key in keys:
                assert out[key].dtype == dtype
                assert_close(out[key], ref[key], dtype=dtype, eager=eager[key], tol=MODEL_TOLERANCE[dtype], name=key)
    assert opt.cuda_graphs.captures == 1


def _to_float64(args: tuple) -> tuple:
    """A forward's arguments for a float64 twin: floating-point tensors in float64, the rest as they are."""
    return tuple(a.double() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)


def assert_trains_hf_tensors(hf, args: tuple, weights: Tensor, key: str = "last_hidden_state") -> None:
    """A tower `hf` (fp32) optimized in train mode trains HF's own tensors: Σ out[key] · weights backpropagated through
    vitfast (with `vitfast.reference` raising: no backward recomputes it) and through a float64 twin of `hf` gives
    every HF parameter the twin's gradient within tolerance. args: the forward's positional arguments."""
    import copy

    import vitfast

    hf64 = copy.deepcopy(hf).double().train()
    opt = vitfast.optimize(hf).train()
    hf.train()
    assert {id(p) for p in opt.parameters()} == {id(p) for p in hf.parameters()}
    backward_weighted(getattr(hf64(*_to_float64(args)), key), weights)
    backward_weighted(getattr(opt(*args), key), weights, reference_free=True)     # into HF's own tensors' .grad
    assert_grads_match(hf, hf64)


def assert_tower_replays(hf, batches: list[tuple], key: str = "last_hidden_state") -> None:
    """A tower `hf` (fp32, eval mode) optimized with CUDA graphs (simulated on the CPU): one capture serves every batch
    of `batches` (each a forward's positional arguments, of the same shapes), and each output[key] equals HF's in
    float64 within 2x HF's own fp32 error."""
    import copy

    import vitfast
    from vitfast.graphs import CUDAGraphRunner

    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    runner = opt.cuda_graphs = simulate_cuda_graphs(CUDAGraphRunner())
    with torch.no_grad():
        for args in batches:
            out, ref, eager = (getattr(m(*a), key) for m, a in ((opt, args), (hf64, _to_float64(args)), (hf, args)))
            assert out.shape == ref.shape
            assert_close(out, ref, eager=eager, name=key)
    assert runner.captures == 1


def assert_tower_on_gpu(build, args: tuple, key: str = "last_hidden_state", **kwargs) -> None:
    """A tower `build()` makes (random weights, perturbed; made on the GPU) in bf16 through `vitfast.optimize`: its
    eager call, capture and replay each equal to HF's model in float32 on the GPU, within 2x HF's own bf16 error.
    args: the forward's positional arguments (CUDA tensors, float ones given in float32); kwargs: its flags."""
    import copy

    import vitfast

    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = perturbed(build())
    ref = copy.deepcopy(hf)
    hf16 = hf.to(torch.bfloat16)
    opt = vitfast.optimize(hf16)
    low = tuple(a.bfloat16() if a.is_floating_point() else a for a in args)
    with torch.no_grad():
        want = getattr(ref(*args, **kwargs), key).double()
        eager = getattr(hf16(*low, **kwargs), key)
        for _ in range(3):                                           # eager, capture, replay
            assert_close(getattr(opt(*low, **kwargs), key), want, eager=eager, name=key)


def assert_trains_after_inference_mode(opt, args: tuple, patch_weight: Tensor, key: str = "last_hidden_state") -> None:
    """A stand-in `opt` that ran under torch.inference_mode (its cached tables, RoPE's, made there are inference
    tensors) then trains: the backward of its train-mode forward runs (autograd refuses to save an inference tensor)
    and reaches the patch embedding's weight, `patch_weight`."""
    with torch.inference_mode():
        getattr(opt.eval()(*args), key)
    opt.train()
    getattr(opt(*args), key).float().square().sum().backward()
    assert patch_weight.grad is not None and patch_weight.grad.abs().max() > 0


def assert_grads_match(model, model64) -> None:
    """After a backward through each: every parameter of `model` that requires grad has a gradient (the frozen ones,
    such as MAE's sin-cos tables, none), within tolerance of the one its float64 twin `model64` (same parameter
    order) got; where that gradient is exactly 0 in theory (a key projection's bias without RoPE: softmax ignores a
    shift per query), ours is small in absolute terms instead."""
    for (name, p), (_, p64) in zip(model.named_parameters(), model64.named_parameters()):
        if not p.requires_grad:
            assert p.grad is None and p64.grad is None, name
            continue
        assert p.grad is not None, name
        if p64.grad.norm() < 1e-9 * max(1.0, p64.norm().item()):
            assert p.grad.norm() < 1e-4, f"grad {name}: {p.grad.norm():.3e} where float64's is 0"
        else:
            assert_close(p.grad, p64.grad, name=f"grad {name}")


def backward_weighted(out: Tensor, weights: Tensor, reference_free: bool = False) -> None:
    """Backpropagate Σ out · weights (weights in out's dtype): a loss that reaches every output element with a
    weight of its own, run through a model and its float64 twin before `assert_grads_match`. reference_free: the
    backward runs `without_reference` (a vitfast model's)."""
    loss = (out * weights.to(out.dtype)).sum()
    if reference_free:
        with without_reference():
            loss.backward()
    else:
        loss.backward()


@contextlib.contextmanager
def without_reference():
    """Every function of `vitfast.reference` raising inside the block: a backward run there shows that no op's
    backward recomputes the reference math (the monkeypatch form: `forbid_reference`)."""
    from vitfast import reference

    saved = {name: f for name, f in vars(reference).items()
             if inspect.isfunction(f) and f.__module__ == reference.__name__}

    def forbidden(*args, **kwargs):
        raise AssertionError("a backward called the reference math")
    try:
        for name in saved:
            setattr(reference, name, forbidden)
        yield
    finally:
        for name, f in saved.items():
            setattr(reference, name, f)


def hf_exact_attention() -> str:
    """The name of a transformers attention implementation, registered on first use (with SDPA's mask), for the
    float64 twins of tests (`model.set_attn_implementation(name)`): HF's SDPA path with an additive mask in q's
    dtype and is_causal off. HF's eager attention of some models takes its softmax in float32 (not a float64
    reference), torch's SDPA gets a float32 mask against float64 q and k wrong (EoMT's train mode adds one), and
    Phi-4-multimodal's vision attention sets is_causal, which HF's SDPA path applies to a batch without padding (its
    eager path and the original model are bidirectional)."""
    import transformers
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    name = "vitfast_testing_exact_sdpa"

    def exact(module, query, key, value, attention_mask, **kwargs):
        mask = attention_mask if attention_mask is None or attention_mask.dtype == torch.bool else \
            attention_mask.to(query.dtype)                                  # a bool mask: True takes part
        return sdpa_attention_forward(module, query, key, value, mask, **{**kwargs, "is_causal": False})
    transformers.AttentionInterface.register(name, exact)
    transformers.AttentionMaskInterface.register(name, sdpa_mask)
    return name


def perturbed(model):
    """`model` in eval mode with every weight moved off its init (0 / 1 biases and norms would hide mistakes):
    each parameter plus 0.05 x N(0, 1) noise."""
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def poisoned(shape, dtype: torch.dtype, device="cpu") -> Tensor:
    """An output buffer filled with NaN (or 0xFF bytes for integers): every element a kernel
    forgets to write shows up as a failure."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if dtype.is_floating_point:
        t.fill_(float("nan"))
    else:
        t.fill_(-1)
    return t


class FakeCudaTensor:
    """What a kernel's autotune prune reads of a tensor on a GPU (dtype, is_cuda, device,
    element_size()), for testing the prunes on a machine without one."""
    is_cuda, device = True, "cuda:0"

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def element_size(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()



def forbid_reference(monkeypatch, *names: str) -> None:
    """Replace the named `vitfast.reference` functions with ones that raise, for a test that runs a backward
    which must not recompute the reference math (undo with monkeypatch.undo())."""
    from vitfast import reference

    def forbidden(*args, **kwargs):
        raise AssertionError("a backward called the reference math")
    for name in names:
        monkeypatch.setattr(reference, name, forbidden)


def photo(width: int, height: int, seed: int, shapes: int = 30):
    """A photo-like PIL RGB image for the decode tests and benchmark: a smooth colour field, hard-edged
    shapes, sensor-like noise (sigma 6 levels)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    field = rng.integers(0, 256, (max(2, height // 100), max(2, width // 100), 3), dtype=np.uint8)
    img = Image.fromarray(field).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(shapes):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        s = int(rng.integers(width // 50, width // 5))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x0 + s, y0 + s), fill=fill)
    noisy = np.asarray(img).astype(np.int16) + rng.normal(0, 6, (height, width, 3)).astype(np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


@contextlib.contextmanager
def compile_only_triton(launches: list | None = None):
    """Triton's CUDA driver for a machine without a GPU, as on an H100 / H200 (sm_90, 227 KiB of shared
    memory per block): kernels compile with Triton's bundled ptxas and are "loaded" (each load gets a new
    function handle, an int); a launch runs nothing and, with `launches`, appends what it received to it:
    (gridX, gridY, gridZ, stream, function, kernel metadata, launch metadata, enter hook, exit hook,
    *arguments). For measuring and testing vitfast's part of a launch and what it passes to Triton's
    launcher, under Triton 3.6 to 3.9, in a process without TRITON_INTERPRET (whose `@triton.jit` gives
    interpreter functions). The current device is 0, its stream 0; CPU tensors stand in for device ones.
    Use it where no GPU is used afterwards (a process of its own, or a machine without one): what it
    compiles stays in Triton's in-memory caches after the block, with handles no GPU can launch."""
    import itertools

    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver
    from triton.runtime.driver import driver

    handles = itertools.count(1)

    class Utils:
        def get_device_properties(self, device):
            return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                    "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 6144}

        def load_binary(self, name, kernel, shared, device):
            return next(handles), next(handles), 128, 0, 1024     # module, function, registers, spills, threads

        def unload_module(self, module):
            pass

    class Launcher:
        def __init__(self, src, metadata):
            pass

        def __call__(self, *args):
            if launches is not None:
                launches.append(args)

    class CompileOnlyDriver(CudaDriver):
        def __init__(self):        # CudaDriver's would load libcuda
            self.utils, self.launcher_cls = Utils(), Launcher
            self.get_current_device = lambda: 0
            self.get_current_stream = lambda device=None: 0
            self.get_device_capability = lambda device=None: (9, 0)
            self.set_current_device = lambda device: None

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    saved = driver._active
    driver.set_active(CompileOnlyDriver())
    try:
        yield
    finally:
        driver._active = saved


def simulate_cuda_graphs(runner):
    """Point a `vitfast.graphs.CUDAGraphRunner` at CPU tensors, with a stand-in for the CUDA capture that keeps
    a graph's semantics (static inputs copied in, outputs in fixed buffers overwritten by every replay): the
    runner's keys, bounds, fallbacks and output cloning run on a CPU. -> the runner."""
    from torch.utils import _pytree as pytree

    from vitfast import graphs

    class SimulatedGraph(graphs._Graph):
        def record(self, fn, args, kwargs, device, pool):
            out = fn(*args, **kwargs)

            def replay():                                # a graph writes its outputs into the same buffers
                for buf, new in zip(pytree.tree_leaves(out), pytree.tree_leaves(fn(*args, **kwargs))):
                    if isinstance(buf, Tensor):
                        buf.copy_(new)
            return out, replay

    runner.device_type = "cpu"
    runner.capture = lambda fn, leaves, spec, device: SimulatedGraph(fn, leaves, spec, device, None)
    return runner
