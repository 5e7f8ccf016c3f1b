"""High-throughput batch inference: `InferenceEngine`.

Per batch, on CUDA:

    host:        uint8 batch ──copy──> pinned staging[slot]              (slot = batch index % 2)
    side stream: pinned[slot] ──H2D──> device staging[slot]          (overlaps the previous batch's compute)
    main stream: device staging[slot] ──> graph input[:n] ──replay CUDA graph of bucket(n)──> outputs[:n]

- uint8 images stay uint8 until the patch-embed kernel, which normalises ((x/255 - mean) / std) in
  its load: no float image ever exists in memory.
- One CUDA graph per batch-size bucket (powers of two up to batch_size, and batch_size itself); a
  partial batch runs in the smallest bucket that holds it, the padding rows are trimmed. The graphs
  are `vitfast.graphs.CUDAGraphRunner`'s, as for a model's own forward: a bucket's first batch runs
  eagerly (Triton compiles and autotunes there, `ops.linear` picks cuBLAS or Triton there), its second
  is captured, in the "thread_local" error mode (a DataLoader's pin-memory thread allocating pinned
  memory meanwhile must not break it). The graphs read the parameters' memory: when a parameter is
  moved or replaced, or the position table changes, they are captured again (and the resampled table
  recomputed).
- Double buffering: two pinned and two device staging buffers; CUDA events order the H2D copy of
  batch i+1 after batch i-1 has consumed the same slot, and the host refills a pinned slot only
  once its previous copy finished. The iterator runs one batch ahead, so while the caller handles
  the outputs of batch i the GPU already works on batch i+1.
- Outputs to the host (`stream(..., to_host=True)`): batch i's outputs are copied into pinned memory
  on the main stream right behind its forward, and an event marks the copy's end; batch i is handed
  over once that event has passed, which never waits for batch i+1 (queued after it). Reading a
  device tensor back (`.cpu()`) would wait for everything queued, batch i+1 included.

On CPU the same pipeline runs eagerly: no staging, streams or graphs (padding would only cost time).
Everything runs under `torch.inference_mode`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from vitfast import reference
from vitfast.data import data_config
from vitfast.graphs import CUDAGraphRunner
from vitfast.model import create_model

OUTPUTS = ("logits", "embeddings", "both")


def load_model(name: str, checkpoint_path: str | None = None, **kwargs) -> nn.Module:
    """`vitfast.create_model(name, checkpoint_path=..., **kwargs)`, in eval mode."""
    return create_model(name, checkpoint_path=checkpoint_path, **kwargs).eval()


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def bucket_sizes(batch_size: int) -> list[int]:
    """Powers of two below batch_size, and batch_size itself: [1, 2, 4, ..., batch_size]."""
    sizes, b = [], 1
    while b < batch_size:
        sizes.append(b)
        b *= 2
    return sizes + [batch_size]


class InferenceEngine:
    """Batched ViT inference on uint8 images.

    model: a timm-style ViT (`vitfast.VisionTransformer`; `patch_embed.proj`, `cls_token`,
        `pos_embed`, `blocks`, `norm`, `forward_head(x, pre_logits)`, `head`). Its weights are cast
        to `dtype` and moved to `device` once, in place.
    batch_size: the largest batch run at once; larger inputs are split, smaller ones padded into a bucket.
    dtype: compute dtype; default bfloat16 on CUDA, float32 on CPU.
    device: default the model's device, else CUDA when available.
    output: "logits" [N, num_classes], "embeddings" (pre-logits features [N, num_features]) or "both".
    mean, std: per-channel normalisation in [0, 1] units; default the model's data config
        (`vitfast.data.data_config`: its pretrained_cfg, else ImageNet's).
    cuda_graphs: capture one CUDA graph per bucket (CUDA only).
    profile: keep the seconds spent in the host-to-device copy and in the model (`stage_seconds()`;
        on CUDA from timing events, read when asked).

    Outputs are float32 tensors on `device`, one row per image, in input order.
    """

    def __init__(self, model: nn.Module, batch_size: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, *, output: str = "logits",
                 mean=None, std=None, cuda_graphs: bool = True, profile: bool = False):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        if output not in OUTPUTS:
            raise ValueError(f"output: expected one of {OUTPUTS}, got {output!r}")
        for attr in ("embed", "patch_embed", "pos_embed", "blocks", "norm", "forward_head", "head"):
            if not hasattr(model, attr):
                raise ValueError(f"model: expected a timm-style ViT with a `{attr}` attribute, "
                                 f"got {type(model).__name__}")
        if device is None:
            param = next(model.parameters())
            device = param.device if param.device.type != "cpu" else (
                "cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = default_dtype(self.device) if dtype is None else dtype
        if self.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype: expected float32, float16 or bfloat16, got {self.dtype}")
        self.batch_size, self.output = batch_size, output
        cfg = data_config(model)
        mean = cfg["mean"] if mean is None else mean
        std = cfg["std"] if std is None else std
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1).to(self.device)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(-1).to(self.device)
        in_chans = model.patch_embed.proj.weight.shape[1]
        for name, t in (("mean", self.mean), ("std", self.std)):
            if t.numel() != in_chans:
                raise ValueError(f"{name}: expected {in_chans} values (one per channel), got {t.numel()}")
        self.model = model.to(device=self.device, dtype=self.dtype).eval()   # checked first: no half-done move
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        self.buckets = bucket_sizes(batch_size) if self.device.type == "cuda" else []
        self.graphs = CUDAGraphRunner(None if self.use_graphs else False, max_graphs=max(1, len(self.buckets)))
        self._image_shape: tuple[int, int, int] | None = None
        self._grid: tuple[int, int] | None = None
        self._pos_embed: Tensor | None = None
        self._stamp: tuple | None = None
        self.profile = profile
        self._seconds = {"h2d": 0.0, "model": 0.0}
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []   # (stage, start, end), unread

    def stage_seconds(self) -> dict[str, float]:
        """With profile=True: {"h2d": seconds of host-to-device copies, "model": seconds of forward passes}
        so far (GPU time on CUDA; wall time on the CPU, where no copy happens)."""
        for stage, start, end in self._events:
            end.synchronize()
            self._seconds[stage] += start.elapsed_time(end) / 1e3
        self._events.clear()
        return dict(self._seconds)

    def _timed(self, stage: str):
        """Timing events for one piece of `stage`'s work on CUDA under profile=True (the caller records
        them on the stream that does it): (start, end), else (None, None)."""
        if not self.profile or self.device.type != "cuda":
            return None, None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self._events.append((stage, start, end))
        return start, end

    # ----------------------------------------------------------------------------------------
    # The forward pass on a uint8 batch on the device
    # ----------------------------------------------------------------------------------------
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 images [B, 3, H, W] on the device -> (features [B, F], logits [B, K]), float32."""
        m = self.model
        rope = m.rope_for(images) if hasattr(m, "rope_for") else None                 # RoPE tables, cached
        x = m.embed(images, pos_embed=self._pos_embed, mean=self.mean, std=self.std)   # (B, T, D)
        for blk in m.blocks:
            x = blk(x, rope=rope) if rope is not None else blk(x)
        x = m.norm(x)                                                                 # (B, T, D)
        feats = m.forward_head(x, pre_logits=True)                                    # (B, F)
        logits = m.forward_head(x) if self.output != "embeddings" else feats          # (B, K); pool is cheap
        return feats.float(), logits.float()

    def _select(self, feats: Tensor, logits: Tensor):
        if self.output == "logits":
            return logits
        if self.output == "embeddings":
            return feats
        return feats, logits

    def _setup(self, shape: tuple[int, ...]) -> None:
        """Fix the image shape on the first batch: resampled pos_embed, staging buffers."""
        C, H, W = shape
        m = self.model
        P = tuple(m.patch_embed.proj.weight.shape[-2:])
        reference.check_image_size(torch.empty(0, C, H, W, device="meta"), m.patch_embed.proj.weight.shape[1],
                                   P, None if getattr(m, "dynamic_img_size", False) else m.patch_embed.img_size)
        Hc, Wc = reference.crop_size((H, W), P)          # what whole patches cover (timm's conv floor)
        self._grid = (Hc // P[0], Wc // P[1])
        self._refresh()
        self._image_shape = (C, H, W)
        if self.device.type == "cuda":
            n = (self.batch_size, C, H, W)
            with torch.cuda.device(self.device):    # streams, events and pinned memory of this device
                self._pinned = [torch.empty(n, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
                self._staged = [torch.empty(n, dtype=torch.uint8, device=self.device) for _ in range(2)]
                self._graph_in = torch.zeros(n, dtype=torch.uint8, device=self.device)
                self._copied = [torch.cuda.Event() for _ in range(2)]     # H2D into slot done
                self._consumed = [torch.cuda.Event() for _ in range(2)]   # slot read by the main stream
                self._copy_stream = torch.cuda.Stream(self.device)

    def _weights_stamp(self) -> tuple:
        """Where the parameters live and the position table's version: graphs read the parameters'
        memory, and `_pos_embed` may be a resampled copy of the table."""
        pos = self.model.pos_embed
        return tuple(p.data_ptr() for p in self.model.parameters()), None if pos is None else pos._version

    def _refresh(self) -> None:
        """(Re)make the position table for the image grid (the graph runner recaptures on its own: the
        weights it stamps moved or changed too)."""
        m = self.model
        if m.pos_embed is None:                          # no position table (RoPE models)
            self._pos_embed, self._stamp = None, self._weights_stamp()
            return
        with torch.no_grad():
            self._pos_embed = reference.resample_pos_embed(m.pos_embed.detach(), self._grid,
                                                           getattr(m.patch_embed, "grid_size", None),
                                                           m.pos_embed_prefix)
        self._stamp = self._weights_stamp()

    def _check_batch(self, images: Tensor) -> None:
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            got = f"{images.dtype} tensor of shape {tuple(images.shape)}" if isinstance(images, Tensor) \
                else type(images).__name__
            raise ValueError(f"images: expected a uint8 tensor [N, 3, H, W], got {got}")
        if self._image_shape is None:
            self._setup(tuple(images.shape[1:]))
        elif tuple(images.shape[1:]) != self._image_shape:
            raise ValueError(f"images: expected every batch to hold {self._image_shape} images (like the "
                             f"first), got {tuple(images.shape[1:])}")

    # ----------------------------------------------------------------------------------------
    # CUDA: staging, streams, graphs
    # ----------------------------------------------------------------------------------------
    def _bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _launch_cuda(self, images: Tensor, slot: int):
        """Queue one batch (n <= batch_size) on the GPU; returns its outputs (device tensors,
        valid once the main stream reaches them). Runs with self.device as the current device."""
        n = images.shape[0]
        main = torch.cuda.current_stream(self.device)
        if images.device.type == "cuda":
            staged = images.to(self.device)                  # already on a GPU: no staging
        else:
            self._copied[slot].synchronize()                 # the pinned slot's previous H2D is done
            self._pinned[slot][:n].copy_(images)
            start, end = self._timed("h2d")
            with torch.cuda.stream(self._copy_stream):
                self._copy_stream.wait_event(self._consumed[slot])
                if start is not None:
                    start.record(self._copy_stream)
                self._staged[slot][:n].copy_(self._pinned[slot][:n], non_blocking=True)
                self._copied[slot].record(self._copy_stream)
                if end is not None:
                    end.record(self._copy_stream)
            main.wait_event(self._copied[slot])
            staged = self._staged[slot][:n]
        start, end = self._timed("model")
        if start is not None:
            start.record(main)
        if not self.use_graphs:
            outs = self.forward(staged)
        else:
            bucket = self._bucket(n)
            if bucket != n:                                  # pad into the bucket: one graph per bucket
                self._graph_in[:n].copy_(staged)
                staged = self._graph_in[:bucket]
            feats, logits = self.graphs(self.model, self.forward, staged)    # outputs are fresh (cloned) tensors
            outs = (feats[:n] if self.output != "logits" else None, logits[:n] if self.output != "embeddings" else None)
        if end is not None:
            end.record(main)
        self._consumed[slot].record(main)
        return outs

    def _to_host(self, outs):
        """Queue the copy of a batch's outputs into pinned host memory on the main stream (right behind
        its forward); returns (host tensors, the event that marks their arrival)."""
        host = tuple(None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in outs)
        for h, t in zip(host, outs):
            if t is not None:
                h.copy_(t, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        return host, done

    # ----------------------------------------------------------------------------------------
    # Public API
    # ----------------------------------------------------------------------------------------
    def _batches(self, images) -> Iterator[Tensor]:
        if isinstance(images, Tensor):
            self._check_batch(images)
            for i in range(0, images.shape[0], self.batch_size):
                yield images[i:i + self.batch_size]
            return
        for batch in images:
            self._check_batch(batch)
            for i in range(0, batch.shape[0], self.batch_size):
                yield batch[i:i + self.batch_size]

    def stream(self, batches: Iterable[Tensor], *, to_host: bool = False) -> Iterator:
        """Streaming API: uint8 batches [n, 3, H, W] in (a batch larger than batch_size is split);
        yields the outputs (see `output`) of each run of at most batch_size images, in order, as
        float32 tensors on the device, or with to_host=True on the CPU (pinned, ready to read: on CUDA
        a batch is handed over when its own copy has arrived, while the next batch computes). On CUDA
        the next batch is already queued when a result is yielded."""
        slot, pending = 0, None
        for batch in self._batches(batches):
            if batch.shape[0] == 0:
                continue
            if self._weights_stamp() != self._stamp:     # weights moved / replaced, or pos_embed updated
                self._refresh()
            with torch.inference_mode():
                if self.device.type == "cuda":
                    with torch.cuda.device(self.device):  # Triton and the extension launch on the current device
                        outs = self._launch_cuda(batch, slot)
                        outs = self._to_host(outs) if to_host else (outs, None)
                    slot ^= 1
                else:
                    t0 = time.perf_counter()
                    outs = (self.forward(batch.to(self.device)), None)
                    if self.profile:
                        self._seconds["model"] += time.perf_counter() - t0
            if pending is not None:
                yield self._handed_over(*pending)
            pending = outs
        if pending is not None:
            yield self._handed_over(*pending)

    def _handed_over(self, outs, done):
        if done is not None:
            done.synchronize()          # this batch's copy only: the next batch was queued behind it
        return self._select(*outs)

    def run(self, images) -> Tensor | tuple[Tensor, Tensor]:
        """uint8 images [N, 3, H, W] (or an iterable of such batches) -> outputs for all N images."""
        outs = list(self.stream([images] if isinstance(images, Tensor) else images))
        if not outs:
            raise ValueError("images: expected at least one image, got none")
        if self.output == "both":
            return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
        return torch.cat(outs)

    def __call__(self, images):
        return self.run(images)
