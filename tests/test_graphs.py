"""vitfast.graphs.CUDAGraphRunner: which calls replay a graph and which run eagerly.

On CPU the runner is pointed at CPU tensors with a stand-in for the CUDA capture that keeps a graph's
semantics (vitfast.testing.simulate_cuda_graphs: static inputs copied in, outputs in fixed buffers
overwritten by every replay), so the signature keys, the LRU bound, recapture on weight changes, each
eager fallback and the cloning of outputs run through the real runner. The real capture runs in the
`gpu` tests (model, engine, HF)."""

import copy
import pickle
import weakref

import pytest
import torch
from torch import nn

import vitfast
from vitfast import graphs, reference
from vitfast.testing import assert_close, simulate_cuda_graphs


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.calls = 0
        self.cuda_graphs = simulate_cuda_graphs(graphs.CUDAGraphRunner(max_graphs=2))

    def forward(self, x, scale=1.0, as_dict=False):
        return self.cuda_graphs(self, self._forward, x, scale=scale, as_dict=as_dict)

    def _forward(self, x, scale=1.0, as_dict=False):
        self.calls += 1
        y = self.lin(x) * scale
        return {"y": y, "sum": y.sum(-1)} if as_dict else y


@pytest.fixture
def tiny():
    return Tiny().eval()


def test_first_call_eager_second_captured_then_replays(tiny):
    x = torch.randn(2, 4)
    with torch.no_grad():
        want = tiny.lin(x)
        assert torch.equal(tiny(x), want) and tiny.cuda_graphs.captures == 0      # eager
        assert torch.equal(tiny(x), want) and tiny.cuda_graphs.captures == 1      # captured, replayed
        y = torch.randn(2, 4)
        assert torch.equal(tiny(y), tiny.lin(y)) and tiny.cuda_graphs.captures == 1   # replay on new data
    assert tiny.cuda_graphs.cached_inputs() == [[(2, 4)]]


def test_outputs_handed_out_are_not_overwritten_by_later_replays(tiny):
    xs = [torch.randn(2, 4) for _ in range(4)]
    with torch.no_grad():
        outs = [tiny(x, as_dict=True) for x in xs]
        for x, out in zip(xs, outs):
            assert set(out) == {"y", "sum"}
            assert torch.equal(out["y"], tiny.lin(x)) and torch.equal(out["sum"], tiny.lin(x).sum(-1))


def test_signatures_shapes_dtypes_and_flags_and_the_lru_bound(tiny):
    with torch.no_grad():
        for _ in range(2):
            for shape, scale in (((2, 4), 1.0), ((3, 4), 1.0), ((2, 4), 2.0)):
                x = torch.randn(*shape)
                assert torch.equal(tiny(x, scale=scale), tiny.lin(x) * scale)
        # three signatures captured, the bound (2) keeps the two used last
        assert tiny.cuda_graphs.captures == 3 and tiny.cuda_graphs.cached_inputs() == [[(3, 4)], [(2, 4)]]
        x = torch.randn(2, 4)
        tiny(x)                                           # (2, 4) at scale 1 was dropped: captured again
        assert tiny.cuda_graphs.captures == 4
        x64 = torch.randn(2, 4, dtype=torch.float64)
        tiny.double()
        tiny(x64)                                         # new dtype: a new signature (and moved weights)
        assert tiny.cuda_graphs.captures == 4


def test_the_forward_function_is_part_of_the_signature(tiny):
    """Two entry points of one model (forward, forward_intermediates) share its runner: the same arguments
    through another function get a graph of their own."""
    x = torch.randn(2, 4)
    other = lambda x, scale=1.0, as_dict=False: tiny.lin(x) * -scale     # noqa: E731
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(tiny(x), tiny.lin(x))
            assert torch.equal(tiny.cuda_graphs(tiny, other, x, scale=1.0, as_dict=False), -tiny.lin(x))
    assert tiny.cuda_graphs.captures == 2


def test_weights_modified_moved_or_replaced_recapture(tiny):
    x = torch.randn(2, 4)
    with torch.no_grad():
        tiny(x), tiny(x)
        assert tiny.cuda_graphs.captures == 1
        tiny.lin.weight.mul_(2)                           # in place: the version counter moves
        assert torch.equal(tiny(x), tiny.lin(x))
        tiny.lin.weight = nn.Parameter(torch.randn(3, 4))  # replaced
        assert torch.equal(tiny(x), tiny.lin(x))
        assert tiny.cuda_graphs.captures == 3


def test_the_module_tree_is_listed_once_and_again_after_a_registration(tiny):
    """A replay does not walk the module tree: the runner keeps the parameter and buffer tables of its
    submodules until a parameter, buffer or submodule is registered somewhere; the stamp still reads the
    tables on every call, so a parameter put there directly (as some checkpoint loaders do) makes the graphs
    be captured again. The runner holds no strong reference to the model."""
    x = torch.randn(2, 4)
    runner = tiny.cuda_graphs
    with torch.no_grad():
        tiny(x), tiny(x), tiny(x)
        listed = runner._tables
        assert runner.captures == 1 and listed == [(m._parameters, m._buffers) for m in (tiny, tiny.lin)]
        tiny(x)
        assert runner._tables is listed                                            # not listed again
        tiny.lin._parameters["weight"] = nn.Parameter(torch.randn(3, 4))             # no registration hook
        assert torch.equal(tiny(x), tiny.lin(x)) and runner.captures == 2
        assert runner._tables is listed
        tiny.lin = nn.Sequential(nn.Linear(4, 3))                                    # a submodule registered
        assert torch.equal(tiny(x), tiny.lin(x)) and runner.captures == 3
        assert len(runner._tables) == 3
        listed = runner._tables
        tiny.lin[0].register_buffer("offset", torch.zeros(3))                        # a buffer registered
        tiny(x)
        assert runner._tables is not listed and runner._tables == listed
        new = nn.Linear(4, 3)                                                        # registers its parameters
        tiny(x)
        assert runner.captures == 4
        tiny.lin._modules["0"] = new                                                 # no registration hook
        assert torch.equal(tiny(x), tiny.lin(x)) and runner.captures == 5
    model = Tiny().eval()
    with torch.no_grad():
        model(x), model(x), model(x)
    assert model.cuda_graphs._tables
    model.cuda_graphs._graphs.clear()                    # the stand-in graphs' replays call the model's forward
    ref = weakref.ref(model)
    del model
    assert ref() is None                                 # freed by reference counting: no cycle through the runner


def test_training_grad_and_disabled_run_eagerly(tiny):
    x = torch.randn(2, 4)
    tiny(x), tiny(x)                                       # grad mode and parameters that require grad
    out = tiny(x)
    assert out.requires_grad and tiny.cuda_graphs.captures == 0
    out.sum().backward()
    assert tiny.lin.weight.grad is not None
    with torch.no_grad():
        tiny.train()
        tiny(x), tiny(x)
        assert tiny.cuda_graphs.captures == 0
        tiny.eval()
        tiny.cuda_graphs.enabled = False
        tiny(x), tiny(x)
        assert tiny.cuda_graphs.captures == 0
        tiny.cuda_graphs.enabled = None
        tiny(x), tiny(x)
        assert tiny.cuda_graphs.captures == 1
    tiny.requires_grad_(False)
    tiny(torch.randn(5, 4)), tiny(torch.randn(5, 4))        # grad mode, but nothing requires grad
    assert tiny.cuda_graphs.captures == 2


def test_a_failed_capture_runs_eagerly_and_stays_eager(tiny):
    def broken(fn, leaves, spec, device):
        raise RuntimeError("operation not permitted when stream is capturing")
    tiny.cuda_graphs.capture = broken
    x = torch.randn(2, 4)
    with torch.no_grad():
        tiny(x)
        with pytest.warns(RuntimeWarning, match="capture failed for Tiny, running eagerly.*not permitted"):
            assert torch.equal(tiny(x), tiny.lin(x))
        calls = tiny.calls
        assert torch.equal(tiny(x), tiny.lin(x)) and tiny.calls == calls + 1   # eager, no second warning


def test_outputs_that_are_not_tensors_make_the_signature_eager(tiny):
    tiny._forward = lambda x, scale=1.0, as_dict=False: [tiny.lin(x), object()]
    x = torch.randn(2, 4)
    with torch.no_grad():
        tiny(x)
        with pytest.warns(RuntimeWarning, match="cannot be handed out from a graph"):
            out = tiny(x)
    assert torch.equal(out[0], tiny.lin(x))


def test_tensors_on_another_device_and_unhashable_arguments_run_eagerly():
    runner = graphs.CUDAGraphRunner()                     # graphs CUDA tensors only
    module = nn.Linear(4, 3).eval()
    calls = []
    fn = lambda x, extra=None: calls.append(1) or module(x)
    with torch.no_grad():
        for _ in range(3):
            runner(module, fn, torch.randn(2, 4))
            runner(module, fn, torch.randn(2, 4), extra=[1, 2])
    assert len(calls) == 6 and runner.captures == 0


def test_copies_and_pickles_start_without_graphs(tiny):
    x = torch.randn(2, 4)
    with torch.no_grad():
        tiny(x), tiny(x)
    clone = copy.deepcopy(tiny)
    assert clone.cuda_graphs is not tiny.cuda_graphs and clone.cuda_graphs.captures == 0
    assert clone.cuda_graphs.max_graphs == 2
    runner = pickle.loads(pickle.dumps(graphs.CUDAGraphRunner(False, max_graphs=3)))
    assert (runner.enabled, runner.max_graphs, runner.captures) == (False, 3, 0)
    with pytest.raises(ValueError, match="max_graphs: expected a positive int"):
        graphs.CUDAGraphRunner(max_graphs=0)


def test_optimize_puts_the_runner_on_the_outermost_module():
    src = reference.VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2,
                                      num_classes=3).eval()
    opt = vitfast.optimize(src, cuda_graphs=False)
    assert opt.cuda_graphs.enabled is False
    assert vitfast.optimize(opt).cuda_graphs.enabled is None
    with pytest.raises(ValueError, match="cuda_graphs: expected None, True or False"):
        vitfast.optimize(src, cuda_graphs="yes")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(opt(x), src.double()(x.double()))


def test_forward_features_replays_its_own_graph():
    """forward_features (what transformers' TimmWrapperModel calls, then forward_head) is captured on its second
    call and replayed, apart from forward's graph; results handed out stay as they were."""
    torch.manual_seed(0)
    model = vitfast.VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2,
                                      num_classes=3).eval()
    simulate_cuda_graphs(model.cuda_graphs)
    ref = copy.deepcopy(model).double()
    xs = [torch.randn(2, 3, 32, 32) for _ in range(4)]
    with torch.no_grad():
        outs = [model.forward_features(x) for x in xs]                    # eager, capture, replay, replay
        assert model.cuda_graphs.captures == 1
        logits = [model(x) for x in xs[:3]]                                # forward: a graph of its own
        assert model.cuda_graphs.captures == 2
        for x, out, lg in zip(xs, outs, logits + [None]):
            assert_close(out, ref.forward_features(x.double()), name="features")
            if lg is not None:
                assert_close(lg, ref(x.double()), name="logits")


def test_hf_output_objects_come_out_of_a_graph_whole():
    """transformers' ModelOutput classes are pytree nodes: a replay hands out the same output object
    (logits, loss, hidden states), with the tensors cloned."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64, num_labels=5)
    hf = transformers.ViTForImageClassification(cfg).eval()
    opt = vitfast.optimize(hf)
    simulate_cuda_graphs(opt.cuda_graphs)
    x, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 4])
    with torch.no_grad():
        outs = [opt(pixel_values=x, labels=labels, output_hidden_states=True) for _ in range(3)]
        want = hf(pixel_values=x, labels=labels, output_hidden_states=True)
    assert opt.cuda_graphs.captures == 1
    for out in outs:
        assert type(out) is type(want)
        assert_close(out.logits, want.logits)
        assert_close(out.loss, want.loss, name="loss")
        assert len(out.hidden_states) == 2 and out.attentions is None
    assert outs[2].logits.data_ptr() != outs[1].logits.data_ptr()
    with torch.no_grad():                         # HF's own q projection changed in place: graphs recaptured,
        hf.vit.layers[0].attention.q_proj.weight.add_(0.5)     # the packed qkv rebuilt from it
        for _ in range(3):
            assert_close(opt(pixel_values=x).logits, hf(pixel_values=x).logits)
    assert opt.cuda_graphs.captures == 2


# --------------------------------------------------------------------------------------------
# On a GPU: the real capture, through vitfast's models
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_model_replay_equals_eager_and_recaptures_after_weight_change():
    torch.manual_seed(0)
    kw = dict(img_size=64, patch_size=16, embed_dim=96, depth=2, num_heads=3, num_classes=10)
    model = vitfast.VisionTransformer(**kw).cuda().eval()
    ref = reference.VisionTransformer(**kw).double().eval()
    ref.load_state_dict(model.state_dict())
    xs = [torch.randn(4, 3, 64, 64, device="cuda") for _ in range(4)]
    with torch.inference_mode():
        outs = [model(x) for x in xs]                      # eager, capture, replay, replay
        assert model.cuda_graphs.captures == 1
        for x, out in zip(xs, outs):                       # earlier outputs not overwritten by later replays
            assert_close(out, ref(x.double().cpu()), dtype=torch.float32)
        logits, maps = model(xs[0], return_cls_attn=True)  # another signature: eager first
        assert len(maps) == 2 and model.cuda_graphs.captures == 1
    with torch.no_grad():
        model.head.weight.mul_(0.5)                        # in place: the graph must be captured again
        ref.head.weight.mul_(0.5)
        for _ in range(2):
            assert_close(model(xs[1]), ref(xs[1].double().cpu()), dtype=torch.float32)
    assert model.cuda_graphs.captures == 2


@pytest.mark.gpu
def test_optimized_hf_and_timm_models_replay_on_cuda():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=64, patch_size=16, hidden_size=96, num_hidden_layers=2,
                                 num_attention_heads=3, intermediate_size=384, num_labels=5)
    hf = transformers.ViTForImageClassification(cfg).cuda().eval()
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    xs = [torch.randn(2, 3, 64, 64, device="cuda") for _ in range(3)]
    with torch.no_grad():
        outs = [opt(pixel_values=x) for x in xs]           # eager, capture, replay
        assert opt.cuda_graphs.captures == 1
        for x, out in zip(xs, outs):
            assert type(out).__name__ == "ImageClassifierOutput"
            assert_close(out.logits, hf64(pixel_values=x.double()).logits, eager=hf(pixel_values=x).logits)
    timm = pytest.importorskip("timm")
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7).cuda().eval()
    src64 = copy.deepcopy(src).double()
    opt = vitfast.optimize(src)
    x = torch.randn(3, 3, 224, 224, device="cuda")
    with torch.no_grad():
        ref, eager = src64(x.double()), src(x)
        for _ in range(3):
            assert_close(opt(x), ref, eager=eager)
    assert opt.cuda_graphs.captures == 1


@pytest.mark.gpu
def test_optimized_timm_dinov3_replays_per_image_size_and_recaptures_after_a_bias_update():
    """timm's DINOv3 (its Eva class, with q / v biases joined from Eva's tensors): one graph per image size (its
    own RoPE tables), outputs equal timm's; an in-place update of Eva's q_bias is captured again."""
    timm = pytest.importorskip("timm")
    src = timm.create_model("vit_small_patch16_dinov3_qkvb", pretrained=False, depth=2, embed_dim=128,
                            num_heads=2).cuda().eval()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    opt = vitfast.optimize(src)
    with torch.no_grad():
        for size in ((64, 64), (96, 64)):
            x = torch.randn(2, 3, *size, device="cuda")
            ref, eager = copy.deepcopy(src).double()(x.double()), src(x)
            for _ in range(3):                             # eager, capture, replay
                assert_close(opt(x), ref, eager=eager)
        assert opt.cuda_graphs.captures == 2
        src.blocks[1].attn.q_bias.add_(0.5)
        ref, eager = copy.deepcopy(src).double()(x.double()), src(x)
        for _ in range(2):
            assert_close(opt(x), ref, eager=eager)
    assert opt.cuda_graphs.captures == 3
