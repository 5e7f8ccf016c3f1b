"""Tuning that persists, and `vitfast tune`.

What vitfast learns by timing on a GPU — each Triton autotuner's config per shape key (forward and
backward kernels), and `ops.linear`'s choice between cuBLAS and its Triton forms per shape (forward, and
the backward's fused kernel against torch's elementwise pass + cuBLAS) — is kept on disk, so that a new
process runs no timing for shapes it has seen:

    $VITFAST_CACHE_DIR (default ~/.cache/vitfast) / tuning-<gpu>-<hash>.json

one file per GPU name and software (the hash covers the GPU name and compute capability, the CUDA,
torch, Triton and vitfast versions). The file holds {"environment": {...}, "tables": {table: {key:
value}}}: a key is the repr of the in-memory key; an autotuner's value is the config's index in its
list and the config's text (an entry whose text no longer matches, after a change of the config
list, is ignored and tuned again). Each new entry rewrites the file atomically, merged with what other
processes wrote meanwhile. Nothing is read or written under VITFAST_AUTOTUNE=quick, or without CUDA.

    vitfast tune --model vit_base_patch16_224 --batch-size 256 [--dtype bf16]

runs the model once at every batch-size bucket the engine uses (1, 2, 4, ... and the batch size), which
tunes every shape of its forward ahead of time (a training run tunes its backward shapes on its first step).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

CACHE_ENV = "VITFAST_CACHE_DIR"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "vitfast")


def environment() -> dict | None:
    """What a tuning result depends on, for the current CUDA device; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    import triton

    import vitfast

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"gpu": props.name, "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
            "torch": torch.__version__, "triton": triton.__version__, "vitfast": vitfast.__version__}


class TuningStore:
    """One tuning file, for `env` (default: the current CUDA device's `environment()`), loaded on first use."""

    def __init__(self, env: dict | None = None, directory: str | os.PathLike | None = None):
        self._env, self._directory, self._tables = env, directory, None

    @property
    def env(self) -> dict | None:
        if self._env is None:
            self._env = environment()
        return self._env

    @property
    def path(self) -> Path | None:
        env = self.env
        if env is None:
            return None
        digest = hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()[:16]
        name = "".join(c if c.isalnum() else "-" for c in env["gpu"]).strip("-")
        return Path(self._directory or cache_dir()) / f"tuning-{name}-{digest}.json"

    def _read(self) -> dict:
        path = self.path
        try:
            data = json.loads(path.read_text()) if path is not None and path.is_file() else {}
        except (OSError, ValueError):
            data = {}                  # unreadable: tune again, rewrite it
        return data.get("tables", {}) if data.get("environment") == self.env else {}

    def get(self, table: str, key: str):
        if self._tables is None:
            self._tables = self._read()
        return self._tables.get(table, {}).get(key)

    def put(self, table: str, key: str, value) -> None:
        path = self.path
        if path is None:
            return
        tables = self._read()                            # merge what other processes wrote meanwhile
        tables.setdefault(table, {})[key] = value
        self._tables = tables
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
                json.dump({"environment": self.env, "tables": tables}, f, indent=1, sort_keys=True)
            os.replace(f.name, path)
        except OSError:
            pass                       # a read-only home: tuning still works, it just is not kept


STORE = TuningStore()


def _active() -> bool:
    from vitfast.kernels import autotune_mode

    return autotune_mode() == "full" and torch.cuda.is_available()


class PersistentTable(dict):
    """A dict (an autotuner's `cache`, ops.linear's path table) whose misses are looked up in the tuning
    store and whose new entries are written to it. encode(value) -> JSON value, decode(JSON value) ->
    value or None (stale)."""

    def __init__(self, table: str, encode=lambda v: v, decode=lambda v: v, store: TuningStore | None = None):
        super().__init__()
        self.table, self.encode, self.decode, self.store = table, encode, decode, store

    def _store(self) -> TuningStore | None:
        if self.store is not None:
            return self.store
        return STORE if _active() else None

    def _load(self, key) -> bool:
        store = self._store()
        if store is None:
            return False
        raw = store.get(self.table, repr(key))
        value = None if raw is None else self.decode(raw)
        if value is None:
            return False
        super().__setitem__(key, value)
        return True

    def __contains__(self, key) -> bool:
        return super().__contains__(key) or self._load(key)

    def __getitem__(self, key):
        if not super().__contains__(key):
            self._load(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        return self[key] if key in self else default

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        store = self._store()
        if store is not None:
            store.put(self.table, repr(key), self.encode(value))


def autotuner_table(name: str, tuner, store: TuningStore | None = None) -> PersistentTable:
    """The persistent `cache` of a Triton Autotuner: values stored as [index, text] of the config."""
    configs = tuner.configs

    def decode(raw):
        i, text = raw
        return configs[i] if 0 <= i < len(configs) and str(configs[i]) == text else None
    table = PersistentTable(f"autotune:{name}", lambda c: [configs.index(c), str(c)], decode, store)
    table.update(tuner.cache)
    return table


def install(kernels) -> None:
    """Give every Triton autotuner of `kernels` (vitfast.kernels, imported) a persistent cache."""
    tuners = {"attention": kernels.attention._attention_fwd_kernel, "linear": kernels.linear._linear_kernel,
              "linear_persistent": kernels.linear._linear_persistent_kernel,
              "patch_embed": kernels.patch_embed._patch_embed_kernel,
              "attention_bwd_dkdv": kernels.attention._attention_bwd_dkdv_kernel,
              "attention_bwd_dq": kernels.attention._attention_bwd_dq_kernel,
              "linear_bwd": kernels.linear._linear_bwd_kernel}
    for name, tuner in tuners.items():
        if not isinstance(tuner.cache, PersistentTable):
            tuner.cache = autotuner_table(name, tuner)


# --------------------------------------------------------------------------------------------
# vitfast tune
# --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    from vitfast.configs import CONFIGS
    from vitfast.engine import bucket_sizes
    from vitfast.model import create_model

    p = argparse.ArgumentParser(prog="vitfast tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=sorted(CONFIGS))
    p.add_argument("--batch-size", type=int, required=True, help="the largest batch (every bucket below is tuned)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--image-size", type=int, default=None, help="default: the model's")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.batch_size < 1:
        p.error(f"--batch-size: expected >= 1, got {args.batch_size}")
    if not torch.cuda.is_available():
        print("vitfast tune: CUDA is not available; tuning is for an NVIDIA GPU", file=sys.stderr)
        return 2
    if not _active():
        print("vitfast tune: VITFAST_AUTOTUNE=quick is set; unset it to tune", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    kw = {} if args.image_size is None else {"img_size": args.image_size}
    model = create_model(args.model, **kw).cuda().to(dtype).eval()
    size = model.patch_embed.img_size
    from vitfast import ops
    kernels = ops._kernels()
    with torch.inference_mode():
        for b in bucket_sizes(args.batch_size):
            model(torch.randn(b, 3, *size, device="cuda", dtype=dtype))
            torch.cuda.synchronize()
            print(f"tuned batch {b}")
    print(f"vitfast tune: {args.model} {args.dtype} batches {bucket_sizes(args.batch_size)} on {STORE.env['gpu']}: "
          + ", ".join(f"{n} {len(t)} keys" for n, t in _tables(kernels).items()) + f"; kept in {STORE.path}")
    return 0


def _tables(kernels) -> dict:
    from vitfast import ops
    return {"linear paths": ops._LINEAR_PATHS, "attention": kernels.attention._attention_fwd_kernel.cache,
            "linear": kernels.linear._linear_kernel.cache,
            "linear persistent": kernels.linear._linear_persistent_kernel.cache,
            "patch_embed": kernels.patch_embed._patch_embed_kernel.cache,
            "linear backward paths": ops._LINEAR_BWD_PATHS}


if __name__ == "__main__":
    sys.exit(main())
