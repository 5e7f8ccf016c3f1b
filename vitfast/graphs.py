"""CUDA graphs for whole forward passes: the first call with a new signature runs eagerly, the second
is captured, later ones replay. One implementation for `vitfast.optimize` / `create_model` models and
for `InferenceEngine`.

A *signature* is what a graph is only valid for: the forward function (a model's `forward` and
`forward_intermediates` share its runner), the shapes, dtypes and devices of the tensor arguments,
the values of the other arguments (flags such as `return_cls_attn`), and the grad / inference / autocast
modes. Per signature:

    call 1   eager: Triton compiles and autotunes, `ops.linear` picks cuBLAS or Triton, caches fill;
    call 2   warm-up on a side stream, capture (thread-local mode), replay;
    later    copy the arguments into the captured inputs, replay, return clones of the outputs.

Graphs live in an LRU cache of `max_graphs` entries over one shared memory pool. Outputs handed to the
caller are clones, so a later replay (of any graph of the pool) never overwrites them. The graphs read
the parameters' and buffers' memory: when one is moved, replaced or modified in place (its data
pointer or version counter changes), every graph is dropped and captured again. Other changes to the
model (attributes such as `global_pool`) need `runner.reset()`.

A call runs eagerly, never with an error, when graphs cannot apply: disabled, CPU tensors, training
mode, a gradient being recorded (grad mode with a parameter or input that requires grad), torch.compile
tracing, a capture already under way (nested models), arguments that are not tensors or hashable
values, outputs that are not tensors / containers of them, or a capture that failed (that signature
then stays eager, and a warning says why once).
"""

from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

_PLAIN = (type(None), bool, int, float, str, torch.dtype, torch.device)

# Registrations of parameters, buffers and submodules in any module of the process (attribute assignment,
# register_*, load_state_dict(assign=True)) are counted: a runner lists the tables of its module's
# submodules again when the count has moved, instead of walking the module tree on every call (a few
# hundred µs for a ViT-B).
_REGISTRATIONS = [0]


def _count_registration(*args) -> None:
    _REGISTRATIONS[0] += 1


for _register in (nn.modules.module.register_module_parameter_registration_hook,
                  nn.modules.module.register_module_buffer_registration_hook,
                  nn.modules.module.register_module_module_registration_hook):
    _register(_count_registration)


class CUDAGraphRunner:
    """Replays a module's forward as CUDA graphs (see the module docstring).

    enabled: None or True: graphs where they apply (CUDA, eval mode, no gradient recorded); False: always
        eager. max_graphs: how many signatures keep a graph (least recently used dropped first).
    Call it as `runner(module, fn, *args, **kwargs)`: `fn(*args, **kwargs)` is the eager forward of `module`.
    """

    device_type = "cuda"     # the tensors that are graphed (CPU tests use "cpu" with a stand-in `capture`)

    def __init__(self, enabled: bool | None = None, max_graphs: int = 8):
        if enabled not in (None, True, False):
            raise ValueError(f"cuda_graphs: expected None, True or False, got {enabled!r}")
        if not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs: expected a positive int, got {max_graphs!r}")
        self.enabled, self.max_graphs = enabled, max_graphs
        self.reset()

    def reset(self) -> None:
        """Drop every graph, and forget which signatures ran or failed."""
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._seen: set[tuple] = set()
        self._failed: dict[tuple, str] = {}
        self._pool = None
        self._stamp = None
        self._module, self._listed, self._tables, self._children, self._tree = None, -1, [], [], []
        self.captures = 0          # graphs captured so far (tests and benchmarks read it)

    # A runner is per-process state: copies and pickles of a model start with none of its graphs.
    def __deepcopy__(self, memo):
        return CUDAGraphRunner(self.enabled, self.max_graphs)

    def __getstate__(self):
        return {"enabled": self.enabled, "max_graphs": self.max_graphs}

    def __setstate__(self, state):
        self.__init__(state["enabled"], state["max_graphs"])

    def __repr__(self):
        return (f"CUDAGraphRunner(enabled={self.enabled}, max_graphs={self.max_graphs}, "
                f"graphs={len(self._graphs)}, failed={len(self._failed)})")

    # ----------------------------------------------------------------------------------------
    def __call__(self, module: nn.Module, fn, *args, **kwargs):
        if self.enabled is False or module.training or torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        tensors = [x for x in leaves if isinstance(x, Tensor)]
        if not tensors or any(t.device.type != self.device_type for t in tensors) \
                or (self.device_type == "cuda" and torch.cuda.is_current_stream_capturing()):
            return fn(*args, **kwargs)
        tables = self._tables_of(module)
        if torch.is_grad_enabled() and (any(t.requires_grad for t in tensors) or _params_need_grad(tables)):
            return fn(*args, **kwargs)
        try:
            sig = (getattr(fn, "__func__", fn), spec,
                   tuple((tuple(x.shape), x.dtype, x.device) if isinstance(x, Tensor) else x for x in leaves),
                   torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cuda"),
                   torch.get_autocast_dtype("cuda"))
            hash(sig)
        except TypeError:                                  # an unhashable argument: no signature, no graph
            return fn(*args, **kwargs)
        if sig in self._failed:
            return fn(*args, **kwargs)
        stamp = _weights_stamp(tables)
        if stamp != self._stamp:                           # weights moved / replaced / updated: recapture
            self._graphs.clear()
            self._pool, self._stamp = None, stamp
        graph = self._graphs.get(sig)
        if graph is not None:
            self._graphs.move_to_end(sig)
            return graph.replay(tensors)
        if sig not in self._seen:
            self._seen.add(sig)
            return fn(*args, **kwargs)                     # first call: compile, tune, fill caches
        try:
            graph = self.capture(fn, leaves, spec, tensors[0].device)
        except Exception as e:                             # noqa: BLE001 - any capture failure means eager
            self._failed[sig] = f"{type(e).__name__}: {e}"
            warnings.warn(f"vitfast: CUDA-graph capture failed for {type(module).__name__}, running eagerly for "
                          f"these inputs: {self._failed[sig].splitlines()[0]}", RuntimeWarning, stacklevel=3)
            return fn(*args, **kwargs)
        self.captures += 1
        self._graphs[sig] = graph
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return graph.replay(tensors)


    def _tables_of(self, module: nn.Module) -> list[tuple[dict, dict]]:
        """The (parameters, buffers) tables of module.modules(), listed again when a parameter, buffer or
        submodule was registered anywhere since, or a submodule table holds other modules (one put into
        `_modules` directly). Only tables are kept, and the module through a weak reference: the runner
        is an attribute of the module, which is freed as soon as it is dropped."""
        if (self._module is None or self._module() is not module or self._listed != _REGISTRATIONS[0]
                or [c for table in self._children for c in table.values()] != self._tree):
            self._module, self._listed = weakref.ref(module), _REGISTRATIONS[0]
            modules = list(module.modules())
            self._tables = [(m._parameters, m._buffers) for m in modules]
            self._children = [m._modules for m in modules]
            self._tree = [c for table in self._children for c in table.values()]
        return self._tables

    def cached_inputs(self) -> list[list[tuple[int, ...]]]:
        """The tensor-argument shapes of each captured graph, least recently used first."""
        return [[tuple(t.shape) for t in g.inputs] for g in self._graphs.values()]

    def capture(self, fn, leaves: list, spec, device: torch.device) -> _Graph:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return _Graph(fn, leaves, spec, device, self._pool)


def _weights_stamp(tables: list[tuple[dict, dict]]) -> list[tuple[int, int]]:
    """Where each parameter and buffer in the modules' `tables` lives, and its version. Read from the tables
    on every call, so a tensor put there directly (`module._parameters[name] = ...`, as some loaders do)
    is seen too."""
    return [(t.data_ptr(), t._version) for pair in tables for table in pair for t in table.values() if t is not None]


def _params_need_grad(tables: list[tuple[dict, dict]]) -> bool:
    return any(p is not None and p.requires_grad for params, _ in tables for p in params.values())


class _Graph:
    """One captured forward: its static inputs (allocated outside the pool), a replay, its outputs."""

    def __init__(self, fn, leaves: list, spec, device: torch.device, pool):
        # Static inputs: clones made outside the capture (the pool holds only what the graph allocates).
        static = [x.clone() if isinstance(x, Tensor) else x for x in leaves]
        self.inputs = [x for x in static if isinstance(x, Tensor)]
        args, kwargs = pytree.tree_unflatten(static, spec)
        out, self._replay = self.record(fn, args, kwargs, device, pool)
        self.out_leaves, self.out_spec = pytree.tree_flatten(out)
        bad = [type(x).__name__ for x in self.out_leaves if not isinstance(x, (Tensor, *_PLAIN))]
        if bad:
            raise TypeError(f"outputs of types {bad} cannot be handed out from a graph (not tensors)")

    def record(self, fn, args, kwargs, device: torch.device, pool):
        """Warm up on a side stream, capture fn(*args, **kwargs); -> (its outputs, the replay)."""
        with torch.cuda.device(device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn(*args, **kwargs)                        # warm-up on the capture stream
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=side, capture_error_mode="thread_local"):
                out = fn(*args, **kwargs)
            torch.cuda.current_stream().wait_stream(side)
        return out, graph.replay

    def replay(self, tensors: list[Tensor]):
        for static, new in zip(self.inputs, tensors):
            static.copy_(new)
        self._replay()
        return pytree.tree_unflatten([x.clone() if isinstance(x, Tensor) else x for x in self.out_leaves],
                                     self.out_spec)
