"""`vitfast predict`: classify (and/or embed) a set of images.

    vitfast predict IMAGES... --model NAME --checkpoint PATH [--batch-size N] [--topk K] [--labels FILE]
                    [--output preds.jsonl] [--embeddings out.npy] [--workers W] [--resume] [--img-size S]
    torchrun --nproc-per-node G -m vitfast predict ...        (one GPU, or one CPU process, per rank)

Output: one JSON line per image, {"path", "indices" (top-k, best first), "probs" (softmax), "labels"
(with --labels)}, appended and flushed after every batch by a background thread (the GPU and the
decoders never wait for the disk), so a crash loses no batch that reached the writer.
`--embeddings` keeps the pre-logit features, row i for line i of the output (a raw `<output>.emb`
file during the run, the final `.npy` at the end). Images that cannot be decoded are reported on
stderr, counted, and left out of the output.

Decoding: DataLoader workers (one per core by default) decode with Pillow; a JPEG at least twice the
resize target is decoded at reduced scale in the DCT domain (`vitfast.data.load_image`; `--exact-resize`
gives timm's eval transform bit for bit). With `--decode gpu` (the default on CUDA when torchvision's
decode_jpeg is importable) the workers only read the files, and JPEG batches are decoded (nvJPEG),
resized and cropped on the GPU; other formats, and JPEGs nvJPEG rejects, take the CPU path one by one.
`--profile` reports images/s per stage (read, decode, resize/crop, GPU decode, host-to-device copy,
model, write) and names the stage that bounds the run.

Resume: `--resume` keeps the complete lines of an existing output (and of part files left by an
interrupted multi-rank run), drops a half-written last line, and predicts only the other images.
Without --resume an existing output is replaced.

Scale-out: under torchrun (RANK / WORLD_SIZE set), torch.distributed is initialised (nccl on CUDA,
gloo on CPU); the sorted image list is cut into WORLD_SIZE contiguous shards, rank r writes
`<output>.rank{r}`, and after a barrier rank 0 merges everything into `<output>` in the global
(sorted-path) order and removes the parts. The final file is in that order in every case.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import queue
import re
import sys
import threading
import time

import numpy as np
import torch

from vitfast.data import (
    DEFAULT_CROP_PCT,
    WORKER_STAGES,
    data_config,
    default_workers,
    discover_images,
    good_batches,
    gpu_decode_available,
    gpu_decoded,
    make_loader,
)

PROG = "vitfast predict"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Classify / embed images with a ViT checkpoint.")
    p.add_argument("images", nargs="+", help="folders, globs, files, or list files (@list.txt or *.txt)")
    p.add_argument("--model", required=True, help="model name, e.g. vit_base_patch16_224 (see vitfast.list_models())")
    p.add_argument("--checkpoint", required=True, help="local .safetensors or torch checkpoint (timm/HF/torchvision)")
    p.add_argument("--model-kwargs", default="{}", help='JSON of constructor overrides, e.g. \'{"num_classes": 10}\'')
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--labels", help="text file with one class name per line")
    p.add_argument("--output", default="preds.jsonl")
    p.add_argument("--embeddings", help="save pre-logit features (.npy), in the order of the output file")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader decode workers (default: one per core, shared among torchrun's local ranks)")
    p.add_argument("--decode", choices=("auto", "cpu", "gpu"), default="auto",
                   help="where JPEGs are decoded: auto = gpu on CUDA when torchvision's decode_jpeg is importable "
                        "(and --exact-resize is not given), else cpu")
    p.add_argument("--exact-resize", action="store_true",
                   help="timm's eval transform bit for bit: full-size decode and resize (the CPU path; slower on "
                        "large JPEGs)")
    p.add_argument("--profile", action="store_true",
                   help="report images/s per pipeline stage and the stage that bounds the run (on stderr)")
    p.add_argument("--resume", action="store_true", help="skip images already in the output")
    p.add_argument("--img-size", type=int, help="input resolution (default: the model's)")
    p.add_argument("--crop-pct", type=float, help=f"eval center-crop fraction (default: model's, else "
                                                   f"{DEFAULT_CROP_PCT})")
    p.add_argument("--mean", type=float, nargs=3, help="normalisation mean (default: model's, else ImageNet's)")
    p.add_argument("--std", type=float, nargs=3, help="normalisation std (default: model's, else ImageNet's)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", help="default: cuda (cuda:LOCAL_RANK under torchrun) when available, else cpu")
    p.add_argument("--no-progress", action="store_true")
    return p


# --------------------------------------------------------------------------------------------
# Output files: JSON lines + raw float32 embedding rows (one per line)
# --------------------------------------------------------------------------------------------
def emb_path(path: str) -> str:
    return path + ".emb"


def part_files(output: str) -> list[str]:
    pat = re.compile(re.escape(os.path.basename(output)) + r"\.rank\d+$")
    return sorted(f for f in glob.glob(glob.escape(output) + ".rank*") if pat.match(os.path.basename(f)))


def _complete_lines(path: str) -> tuple[list[dict], list[int]]:
    """Records of the complete, valid lines at the start of `path`, and each line's end offset."""
    records, ends, pos = [], [], 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                rec = json.loads(raw)
            except ValueError:
                break
            if not isinstance(rec, dict) or "path" not in rec:
                break
            pos += len(raw)
            records.append(rec)
            ends.append(pos)
    return records, ends


def repair(path: str, emb_dim: int | None) -> None:
    """Truncate `path` to its complete lines (and, with emb_dim, both it and its embedding file
    to the lines that have an embedding row)."""
    if not os.path.exists(path):
        return
    records, ends = _complete_lines(path)
    keep = len(records)
    if emb_dim is not None:
        rows = os.path.getsize(emb_path(path)) // (4 * emb_dim) if os.path.exists(emb_path(path)) else 0
        keep = min(keep, rows)
        with open(emb_path(path), "ab") as f:
            f.truncate(keep * 4 * emb_dim)
    with open(path, "ab") as f:
        f.truncate(ends[keep - 1] if keep else 0)


def read_done(files: list[str]) -> set[str]:
    done: set[str] = set()
    for path in files:
        if os.path.exists(path):
            done |= {r["path"] for r in _complete_lines(path)[0]}
    return done


def merge(output: str, sources: list[str], order: list[str], emb_dim: int | None, embeddings: str | None) -> int:
    """Write every record of `sources` into `output` (and the embeddings into `embeddings`) in
    the order of `order`; records of paths not in `order` (earlier runs) come first, as they were.
    Removes the part files. Returns the number of records."""
    rank_of = {p: i for i, p in enumerate(order)}
    records, rows, seen = [], [], set()
    for src in sources:
        if not os.path.exists(src):
            continue
        recs, _ = _complete_lines(src)
        emb = None
        if emb_dim is not None:
            emb = np.fromfile(emb_path(src), dtype=np.float32).reshape(-1, emb_dim)[:len(recs)] \
                if os.path.exists(emb_path(src)) else np.zeros((0, emb_dim), np.float32)
            recs = recs[:len(emb)]
        for i, rec in enumerate(recs):
            if rec["path"] not in seen:
                seen.add(rec["path"])
                records.append(rec)
                rows.append(emb[i] if emb is not None else None)
    perm = sorted(range(len(records)), key=lambda i: (records[i]["path"] in rank_of,
                                                      rank_of.get(records[i]["path"], i)))
    tmp = output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(records[i]) + "\n" for i in perm)
    if embeddings is not None:
        arr = np.stack([rows[i] for i in perm]) if perm else np.zeros((0, emb_dim), np.float32)
        with open(embeddings + ".tmp", "wb") as f:
            np.save(f, arr)
        os.replace(embeddings + ".tmp", embeddings)
    os.replace(tmp, output)
    for src in sources:
        if src != output and os.path.exists(src):
            os.remove(src)
        if os.path.exists(emb_path(src)):
            os.remove(emb_path(src))
    return len(records)


class Writer:
    """Appends each batch to the output files on a background thread, in the order given: the embedding
    rows first (a line never exists without its row), then the lines, each file flushed per batch.
    `seconds` sums the time spent writing. An error in the thread is raised by the next put() or close()."""

    def __init__(self, path: str, emb_file: str | None):
        self.seconds, self._error = 0.0, None
        self._queue: queue.Queue = queue.Queue(maxsize=16)
        self._files = (open(path, "a", encoding="utf-8"), open(emb_file, "ab") if emb_file else None)
        self._thread = threading.Thread(target=self._run, name="vitfast-predict-writer", daemon=True)
        self._thread.start()

    def put(self, lines: list[str], rows: bytes | None = None) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((lines, rows))

    def _run(self) -> None:
        out_f, emb_f = self._files
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue                                   # drain after a failure; close() reports it
            try:
                t0 = time.perf_counter()
                lines, rows = item
                if emb_f is not None and rows is not None:
                    emb_f.write(rows)
                    emb_f.flush()
                out_f.writelines(lines)
                out_f.flush()
                self.seconds += time.perf_counter() - t0
            except BaseException as e:                     # noqa: BLE001 - re-raised in the caller's thread
                self._error = e

    def close(self) -> None:
        """Write what is queued, close the files; raises the thread's error if it had one."""
        self._queue.put(None)
        self._thread.join()
        for f in self._files:
            if f is not None:
                f.close()
        if self._error is not None:
            raise self._error


def profile_report(seconds: dict[str, float], images: int, wall: float, workers: int) -> str:
    """A table of images/s per stage: the worker stages (read, decode, resize) at `workers` workers in
    parallel (per core: one worker), the others as one stream each; the slowest bounds the run."""
    rows = []
    for stage in (*WORKER_STAGES, "gpu decode", "h2d", "model", "write"):
        sec = seconds.get(stage)
        if sec is None:
            continue
        per_core = images / sec if sec > 0 else float("inf")
        capacity = per_core * (max(1, workers) if stage in WORKER_STAGES else 1)
        rows.append((stage, sec, per_core if stage in WORKER_STAGES else None, capacity))
    lines = [f"{PROG} profile: {images} images in {wall:.2f} s = {images / wall if wall else 0:.1f} images/s "
             f"end to end ({workers} decode workers)",
             f"{'stage':12s} {'seconds':>9s} {'img/s/core':>11s} {'img/s':>10s}"]
    for stage, sec, per_core, cap in rows:
        lines.append(f"{stage:12s} {sec:9.3f} {'' if per_core is None else f'{per_core:.1f}':>11s} {cap:10.1f}")
    worker_total = sum(seconds.get(k, 0.0) for k in WORKER_STAGES)
    if worker_total:
        lines.append(f"{'cpu decode':12s} {worker_total:9.3f} {images / worker_total:11.1f} "
                     f"{images / worker_total * max(1, workers):10.1f}   (read + decode + resize)")
    bound = {"cpu decode": images / worker_total * max(1, workers)} if worker_total else {}
    bound.update({st: cap for st, _, _, cap in rows if st not in WORKER_STAGES})
    if bound:
        slowest = min(bound, key=bound.get)
        lines.append(f"bounded by: {slowest} ({bound[slowest]:.1f} images/s)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# torch.distributed
# --------------------------------------------------------------------------------------------
class Dist:
    """RANK / WORLD_SIZE from torchrun; a no-op with one process."""

    def __init__(self, use_cuda: bool):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.on = self.world > 1
        if self.on:
            import torch.distributed as dist
            if use_cuda:
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")

    def barrier(self):
        if self.on:
            torch.distributed.barrier()

    def sum(self, values: list[int]) -> list[int]:
        if not self.on:
            return values
        t = torch.tensor(values, dtype=torch.int64,
                         device="cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
        torch.distributed.all_reduce(t)
        return t.tolist()

    def close(self):
        if self.on:
            torch.distributed.destroy_process_group()


def shard(paths: list[str], rank: int, world: int) -> list[str]:
    """Contiguous shard `rank` of `world` (sizes differ by at most one)."""
    n = len(paths)
    return paths[rank * n // world:(rank + 1) * n // world]


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def _err(msg: str) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        return _err(f"--batch-size: expected a positive int, got {args.batch_size}")
    if args.workers is not None and args.workers < 0:
        return _err(f"--workers: expected >= 0, got {args.workers}")
    if args.decode == "gpu" and args.exact_resize:
        return _err("--decode gpu: the GPU decoder cannot give --exact-resize's pixels (Pillow's, bit for bit); "
                    "use --decode cpu or auto with --exact-resize")
    try:
        model_kwargs = json.loads(args.model_kwargs)
    except ValueError as e:
        return _err(f"--model-kwargs: expected a JSON object, got {args.model_kwargs!r} ({e})")
    if not isinstance(model_kwargs, dict):
        return _err(f"--model-kwargs: expected a JSON object, got {args.model_kwargs!r}")
    if not os.path.isfile(args.checkpoint):
        return _err(f"--checkpoint: file {args.checkpoint!r} does not exist")

    use_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if args.decode == "gpu" and not (use_cuda and gpu_decode_available()):
        return _err("--decode gpu: expected a CUDA device and torchvision with decode_jpeg, got "
                    + ("no torchvision decode_jpeg" if use_cuda else f"device {args.device or 'cpu'}"))
    dist = Dist(use_cuda)
    try:
        return _run(args, model_kwargs, dist, use_cuda)
    except (ValueError, OSError) as e:     # bad arguments, unreadable label/list/checkpoint files
        return _err(str(e))
    finally:
        dist.close()


def _run(args, model_kwargs: dict, dist: Dist, use_cuda: bool) -> int:
    from tqdm import tqdm

    from vitfast.engine import InferenceEngine, load_model

    device = torch.device(args.device or ("cuda" if use_cuda else "cpu"))
    if dist.on and use_cuda:
        device = torch.device("cuda", dist.local_rank)
    if args.img_size is not None:
        model_kwargs["img_size"] = args.img_size
    model = load_model(args.model, args.checkpoint, **model_kwargs)
    num_classes = getattr(model, "num_classes", 0)
    if num_classes < 1:
        raise ValueError(f"--model: the model has no classifier head (num_classes={num_classes})")
    if not 1 <= args.topk <= num_classes:
        raise ValueError(f"--topk: expected 1..{num_classes} (the number of classes), got {args.topk}")
    labels = None
    if args.labels:
        with open(args.labels, encoding="utf-8") as f:
            labels = [line.rstrip("\n") for line in f if line.strip()]
        if len(labels) != num_classes:
            raise ValueError(f"--labels: expected {num_classes} class names (one per line), got {len(labels)}")
    cfg = data_config(model)
    img_size = args.img_size or int(model.patch_embed.img_size[0])
    crop_pct = args.crop_pct or cfg["crop_pct"]
    emb_dim = int(getattr(model, "num_features", model.head.in_features)) if args.embeddings else None
    engine = InferenceEngine(model, args.batch_size, DTYPES.get(args.dtype), device,
                             output="both" if args.embeddings else "logits",
                             mean=args.mean or cfg["mean"], std=args.std or cfg["std"], profile=args.profile)
    workers = default_workers() if args.workers is None else args.workers
    gpu_decode = args.decode == "gpu" or (args.decode == "auto" and use_cuda and not args.exact_resize
                                          and gpu_decode_available())

    paths = discover_images(args.images)
    out_file = args.output if not dist.on else f"{args.output}.rank{dist.rank}"
    # 1. rank 0 prepares the files: a fresh start, or complete lines only (resume)
    if dist.rank == 0:
        sources = [args.output, *part_files(args.output)]
        if not args.resume:
            for src in sources:
                for f in (src, emb_path(src)):
                    if os.path.exists(f):
                        os.remove(f)
        else:
            if (emb_dim is not None and os.path.exists(args.output) and not os.path.exists(emb_path(args.output))
                    and os.path.exists(args.embeddings)):
                # a finished run: its .npy holds the rows of the output's lines
                np.load(args.embeddings).astype(np.float32).tofile(emb_path(args.output))
            for src in sources:
                repair(src, emb_dim)
    dist.barrier()
    # 2. every rank: what is done, and its own shard of the rest
    done = read_done([args.output, *part_files(args.output)]) if args.resume else set()
    todo = [p for p in shard(paths, dist.rank, dist.world) if p not in done]
    dist.barrier()   # everyone has read the files before anyone appends

    skipped = written = 0

    def on_error(i: int, msg: str):
        nonlocal skipped
        skipped += 1
        tqdm.write(f"{PROG}: skipped unreadable image {todo[i]}: {msg}", file=sys.stderr)

    bar = tqdm(total=len(todo), unit="img", desc=f"predict{'' if not dist.on else f' (rank 0 of {dist.world})'}",
               disable=args.no_progress or dist.rank != 0, file=sys.stderr, dynamic_ncols=True)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    if todo:
        loader = make_loader(todo, img_size, args.batch_size, workers, crop_pct, pin_memory=use_cuda and not gpu_decode,
                             exact=args.exact_resize, encoded=gpu_decode)
        if gpu_decode:
            loader = gpu_decoded(loader, img_size, crop_pct, device, exact=args.exact_resize,
                                 seconds=seconds if args.profile else None)
        batches = good_batches(loader, args.batch_size, on_error, seconds)
        index_queue: list[list[int]] = []

        def images():
            for indices, imgs in batches:
                index_queue.append(indices)
                yield imgs

        writer = Writer(out_file, emb_path(out_file) if emb_dim is not None else None)
        try:
            for outs in engine.stream(images(), to_host=True):     # batch i arrives while batch i+1 computes
                indices = index_queue.pop(0)
                feats, logits = outs if emb_dim is not None else (None, outs)
                probs, top = torch.softmax(logits, dim=-1).topk(args.topk, dim=-1)
                probs, top = probs.tolist(), top.tolist()
                lines = []
                for i, idx, pr in zip(indices, top, probs):
                    rec = {"path": todo[i], "indices": idx, "probs": pr}
                    if labels is not None:
                        rec["labels"] = [labels[j] for j in idx]
                    lines.append(json.dumps(rec) + "\n")
                writer.put(lines, None if feats is None else feats.numpy().astype(np.float32).tobytes())
                written += len(lines)
                bar.update(len(lines))
                bar.set_postfix(skipped=skipped, refresh=False)
        finally:
            writer.close()                                          # what reached the writer is on disk
        seconds["write"] = writer.seconds
        bar.update(len(todo) - bar.n)   # the skipped images
    bar.close()
    if args.profile and todo:
        # no host-to-device stage on the CPU, nor with GPU decode (the batches are made on the device)
        seconds.update({k: v for k, v in engine.stage_seconds().items() if k == "model" or v > 0})
        print(profile_report(seconds, written, time.perf_counter() - started, workers), file=sys.stderr)

    # 3. merge (rank 0), once every rank has finished
    dist.barrier()
    written, skipped = dist.sum([written, skipped])
    if dist.rank == 0:
        total = merge(args.output, [args.output, *part_files(args.output)], paths, emb_dim, args.embeddings)
        print(f"{PROG}: {written} images predicted, {len(done)} already done, {skipped} skipped (unreadable); "
              f"{total} lines in {args.output}" + (f", embeddings in {args.embeddings}" if args.embeddings else ""),
              file=sys.stderr)
    dist.barrier()
    return 0
