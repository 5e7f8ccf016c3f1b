"""vitfast.tuning: the tuning file (written, read back, keyed by GPU and versions), the persistent tables
behind the autotuners and ops.linear's dispatch, and `vitfast tune` without a GPU."""

import json

import pytest
import torch
import triton

from vitfast import ops, tuning

ENV = {"gpu": "NVIDIA H200", "capability": "9.0", "cuda": "13.0", "torch": "2.11.0", "triton": "3.6.0",
       "vitfast": "0.1.0"}
CONFIGS = [triton.Config({"BLOCK_M": m}, num_warps=w) for m, w in ((64, 4), (128, 4), (128, 8))]


def test_store_round_trip_and_one_file_per_environment(tmp_path):
    store = tuning.TuningStore(ENV, tmp_path)
    assert store.path.parent == tmp_path and store.path.name.startswith("tuning-NVIDIA-H200-")
    store.put("linear_paths", "(0, 256)", "triton-tma")
    store.put("autotune:attention", "(197, 64)", [2, "x"])
    data = json.loads(store.path.read_text())
    assert data["environment"] == ENV
    assert data["tables"] == {"linear_paths": {"(0, 256)": "triton-tma"}, "autotune:attention": {"(197, 64)": [2, "x"]}}
    again = tuning.TuningStore(dict(ENV), tmp_path)               # a new process, same GPU and versions
    assert again.get("linear_paths", "(0, 256)") == "triton-tma"
    other = tuning.TuningStore({**ENV, "triton": "3.9.0"}, tmp_path)
    assert other.path != store.path and other.get("linear_paths", "(0, 256)") is None
    h100 = tuning.TuningStore({**ENV, "gpu": "NVIDIA H100 80GB HBM3"}, tmp_path)
    assert h100.path != store.path and h100.get("linear_paths", "(0, 256)") is None


def test_store_merges_other_writers_and_survives_a_corrupt_file(tmp_path):
    a, b = tuning.TuningStore(ENV, tmp_path), tuning.TuningStore(ENV, tmp_path)
    a.put("t", "k1", 1)
    b.put("t", "k2", 2)                                   # b never read k1 itself: the write merges it
    assert tuning.TuningStore(ENV, tmp_path).get("t", "k1") == 1
    assert tuning.TuningStore(ENV, tmp_path).get("t", "k2") == 2
    a.path.write_text("{not json")
    fresh = tuning.TuningStore(ENV, tmp_path)
    assert fresh.get("t", "k1") is None
    fresh.put("t", "k3", 3)
    assert json.loads(a.path.read_text())["tables"] == {"t": {"k3": 3}}


def test_persistent_table_writes_new_entries_and_reads_misses(tmp_path):
    store = tuning.TuningStore(ENV, tmp_path)
    paths = tuning.PersistentTable("linear_paths", store=store)
    key = (0, 256, 2304, 768, torch.bfloat16, False, True, None, False, True)
    assert key not in paths and paths.get(key) is None
    paths[key] = "triton-persistent"
    later = tuning.PersistentTable("linear_paths", store=tuning.TuningStore(ENV, tmp_path))
    assert key in later and later[key] == "triton-persistent" and dict(later) == {key: "triton-persistent"}


def test_autotuner_table_keeps_configs_by_index_and_drops_stale_entries(tmp_path):
    class Tuner:
        configs, cache = CONFIGS, {}
    store = tuning.TuningStore(ENV, tmp_path)
    table = tuning.autotuner_table("attention", Tuner, store)
    table[(197, 64, "torch.bfloat16")] = CONFIGS[2]
    assert store.get("autotune:attention", "(197, 64, 'torch.bfloat16')") == [2, str(CONFIGS[2])]
    reread = tuning.autotuner_table("attention", Tuner, tuning.TuningStore(ENV, tmp_path))
    assert reread[(197, 64, "torch.bfloat16")] is CONFIGS[2]

    class Changed:                                        # the config list changed: index 2 is another tile
        configs, cache = [CONFIGS[0], CONFIGS[1], triton.Config({"BLOCK_M": 32}, num_warps=2)], {}
    stale = tuning.autotuner_table("attention", Changed, tuning.TuningStore(ENV, tmp_path))
    assert (197, 64, "torch.bfloat16") not in stale


def test_every_autotuner_and_the_linear_dispatch_get_a_persistent_table():
    kernels = ops._kernels()
    for tuner in (kernels.attention._attention_fwd_kernel, kernels.linear._linear_kernel,
                  kernels.linear._linear_persistent_kernel, kernels.patch_embed._patch_embed_kernel):
        assert isinstance(tuner.cache, tuning.PersistentTable)
    assert isinstance(ops._LINEAR_PATHS, tuning.PersistentTable)
    assert tuning._active() is False                      # no CUDA here: in memory only


def test_tune_needs_a_gpu(capsys):
    assert tuning.main(["--model", "vit_tiny_patch16_224", "--batch-size", "8"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tuning.main(["--model", "no_such_model", "--batch-size", "8"])


@pytest.mark.gpu
def test_a_new_process_times_nothing_for_shapes_it_has_seen(tmp_path, monkeypatch):
    """Tuned once (full autotuning) and kept on disk; with fresh in-memory tables, as in a new process,
    the same shapes run without timing anything: the dispatch and the autotuners read the file."""
    monkeypatch.delenv("VITFAST_AUTOTUNE", raising=False)
    monkeypatch.setattr(tuning, "STORE", tuning.TuningStore(directory=tmp_path))
    kernels = ops._kernels()
    attention = kernels.attention._attention_fwd_kernel
    x, w, b = (torch.randn(3 * 197, 768, device="cuda", dtype=torch.bfloat16),
               torch.randn(2304, 768, device="cuda", dtype=torch.bfloat16) * 0.03,
               torch.randn(2304, device="cuda", dtype=torch.bfloat16))
    qkv = torch.randn(3, 197, 3 * 768, device="cuda", dtype=torch.bfloat16)

    def fresh_tables():
        monkeypatch.setattr(ops, "_LINEAR_PATHS", tuning.PersistentTable("linear_paths"))
        monkeypatch.setattr(ops, "_LINEAR_PLANS", {})
        monkeypatch.setattr(ops, "_ATTENTION_PLANS", {})
        monkeypatch.setattr(attention, "cache", tuning.autotuner_table("attention", attention))

    fresh_tables()
    first = ops.linear(x, w, b), ops.attention_qkv(qkv, 12)
    data = json.loads(tuning.STORE.path.read_text())
    assert len(data["tables"]["linear_paths"]) == 1 and data["tables"]["autotune:attention"]
    fresh_tables()

    def no_timing(*args, **kwargs):
        raise AssertionError("timed a shape that was kept on disk")
    monkeypatch.setattr(ops, "_choose_linear_path", no_timing)
    monkeypatch.setattr(attention, "_do_bench", no_timing)
    monkeypatch.setattr(attention, "do_bench", no_timing)
    again = ops.linear(x, w, b), ops.attention_qkv(qkv, 12)
    for a, b_ in zip(first, again):
        torch.testing.assert_close(a, b_)
