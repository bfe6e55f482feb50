"""Placement: what goes where under fake device capacities, and offloaded runs equal all-on-one-device."""

import pytest
import torch

import grokquant
from grokquant.errors import GrokquantError
from grokquant.runtime.generate import sample_iter
from grokquant.runtime.offload import ExpertCache, OffloadedMoE
from grokquant.runtime.placement import DoesNotFit, LayerBytes, ModelBytes, Placement, plan_placement
from test_gptq_weights import make_artifact

pytestmark = pytest.mark.usefixtures("one_thread")

MB = 10**6


def sizes(n_layers=4, attention=10 * MB, dense=20 * MB, expert=5 * MB, head=8 * MB):
    return ModelBytes(embed=8 * MB, head=head, layers=[LayerBytes(attention, dense, [expert] * 8) for _ in range(n_layers)],
                      kv_bytes_per_token=1000, top_k=2)


def test_everything_fits_on_one_gpu():
    s = sizes()  # 4 layers x 70 MB + head
    p = plan_placement(s, {"cuda:0": 400 * MB, "cpu": 100 * MB}, context=1000)
    assert p.layers == ["cuda:0"] * 4 and p.head == "cuda:0" and p.embed == "cpu"
    assert all(not off for off in p.offload) and p.expert_cache == {}
    assert p.gpu_bytes(s)["cuda:0"] == 4 * (70 * MB + 1000 * 1000) + 8 * MB
    assert p.transfer_bytes_per_token(s) == 0


def test_experts_leave_first_then_dense_mlps_then_whole_layers():
    s = sizes()
    # room for every layer's attention and dense MLP but not all experts: the last layers' experts go
    p = plan_placement(s, {"cuda:0": 220 * MB, "cpu": 10**10}, context=0)
    n_exp = len(p.offloaded_layers("experts"))
    assert 0 < n_exp < 4 and p.offloaded_layers("experts") == list(range(4 - n_exp, 4))
    assert p.offloaded_layers("dense_mlp") == []
    assert 2 <= p.expert_cache["cuda:0"] <= 8 * n_exp
    # less: all experts offloaded, then dense MLPs from the last layer backwards; the GPU keeps room to
    # stage two experts and two dense MLPs (one running, one prefetched): 10 + 80 MB
    wide = sizes(dense=40 * MB)
    p = plan_placement(wide, {"cuda:0": 180 * MB, "cpu": 10**10}, context=0)
    assert p.offloaded_layers("experts") == [0, 1, 2, 3]
    assert p.offloaded_layers("dense_mlp") == [1, 2, 3]  # 40 + 3 x 10 MB resident
    assert p.gpu_bytes(wide)["cuda:0"] == 80 * MB + 8 * MB
    # less still: the first layers compute on the CPU (llama.cpp's -ngl keeps the last layers on the GPU)
    # (a GPU layer then needs its attention and room to stage two dense MLPs and two experts: 60 MB)
    p = plan_placement(s, {"cuda:0": 65 * MB, "cpu": 10**10}, context=0)
    assert p.layers == ["cpu"] * 3 + ["cuda:0"] and p.head == "cpu"
    assert p.offload[0] == frozenset()  # a CPU layer offloads nothing: it is all in CPU memory
    assert plan_placement(s, {"cuda:0": 5 * MB, "cpu": 10**10}, context=0).layers == ["cpu"] * 4
    with pytest.raises(DoesNotFit, match="CPU memory"):
        plan_placement(s, {"cuda:0": 65 * MB, "cpu": 200 * MB}, context=0)


def test_layers_fill_gpus_in_order_without_spanning():
    s = sizes(n_layers=6, head=12 * MB)
    p = plan_placement(s, {"cuda:0": 150 * MB, "cuda:1": 150 * MB, "cuda:2": 150 * MB, "cpu": 10**10}, context=0)
    assert p.layers == ["cuda:0"] * 2 + ["cuda:1"] * 2 + ["cuda:2"] * 2  # 70 MB layers, two per GPU
    assert p.head == "cpu"  # 140 + 12 MB exceed cuda:2
    p = plan_placement(s, {"cuda:0": 150 * MB, "cuda:1": 150 * MB, "cuda:2": 160 * MB, "cpu": 10**10}, context=0)
    assert p.head == "cuda:2"
    dm = p.device_map()
    assert dm["model.layers.3"] == "cuda:1" and dm["lm_head"] == "cuda:2"
    again = Placement.from_device_map(dm, 6)
    assert again.layers == p.layers and again.offload == p.offload and again.head == p.head
    with pytest.raises(GrokquantError, match="unknown module"):
        Placement.from_device_map({"model.layer.0": "cpu"}, 6)


def test_transfer_estimate():
    s = sizes(n_layers=2)
    p = Placement(["cuda:0", "cuda:0"], [frozenset({"experts"}), frozenset({"experts", "dense_mlp"})],
                  expert_cache={"cuda:0": 4})
    # per token: layer 1's dense MLP, and 2 experts per layer of which a quarter are cached (4 of 16)
    assert p.transfer_bytes_per_token(s) == pytest.approx(20 * MB + 2 * 2 * 5 * MB * 0.75)


def test_expert_cache_evicts_least_recently_used():
    stats = {"fetches": 0, "bytes": 0, "hits": 0, "misses": 0}

    class Handle:
        def __init__(self):
            self.resident = False

        def fetch(self, stream=None):
            self.resident = True

        def ready(self):
            pass

        def release(self):
            self.resident = False

    handles = {(0, e): Handle() for e in range(4)}
    cache = ExpertCache(2, None, stats)
    for e in (0, 1, 0, 2):  # 2 evicts 1, the least recently used
        cache.get((0, e), handles[(0, e)])
    assert list(cache.entries) == [(0, 0), (0, 2)] and not handles[(0, 1)].resident
    assert (stats["hits"], stats["misses"]) == (1, 3)
    cache.prefetch([(0, 3), (0, 2)], handles)  # brings 3 in without evicting 2
    assert set(cache.entries) == {(0, 2), (0, 3)}


@pytest.fixture(scope="module")
def artifact(tiny_tp8, tmp_path_factory):
    return make_artifact(tiny_tp8, tmp_path_factory.mktemp("place") / "w4g128")


FAKE_GPUS = {"cuda:0": "cpu", "cuda:1": "cpu"}


def test_offloaded_model_equals_the_all_on_one_device_model(artifact):
    reference = grokquant.load(artifact)
    x = torch.randint(0, reference.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = reference(x)
    from grokquant.runtime.load import Builder, model_bytes, open_source

    s = model_bytes(Builder(open_source(artifact), "auto", None, torch.float32), "cpu")
    expert = max(s.layers[0].experts)
    # two fake GPUs, each with room for one layer's attention and dense MLP and three experts
    room = s.layers[0].attention + s.layers[0].dense_mlp + 3 * expert
    model = grokquant.load(artifact, device_map="auto", max_memory={"cuda:0": room, "cuda:1": room + s.head,
                                                                    "cpu": 10**9},
                           context=0, gpu_reserve=0, physical=FAKE_GPUS, dtype=torch.float32)
    p = model.placement
    assert p.layers == ["cuda:0", "cuda:1"] and p.offloaded_layers("experts") == [0, 1]
    assert p.expert_cache == {"cuda:0": 3, "cuda:1": 3}
    assert isinstance(model.model.layers[0].block_sparse_moe, OffloadedMoE)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert model.transfers["misses"] > 0 and model.transfers["bytes"] > 0
    prompt = x[0].tolist()
    assert list(sample_iter(model, prompt, 6)) == list(sample_iter(reference, prompt, 6))
    assert model.transfers["hits"] > 0  # decoding reuses cached experts


def test_explicit_device_map_with_dense_offload(artifact):
    reference = grokquant.load(artifact)
    x = torch.randint(0, reference.cfg.vocab_size, (1, 10), generator=torch.Generator().manual_seed(1))
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cuda:0", "model.layers.1": "cuda:1",
                  "model.layers.0.mlp": "cpu", "model.layers.1.mlp": "cpu",
                  "model.layers.1.block_sparse_moe.experts": "cpu", "model.norm": "cuda:1", "lm_head": "cuda:1"}
    model = grokquant.load(artifact, device_map=device_map, physical=FAKE_GPUS, dtype=torch.float32)
    assert model.placement.offload == [frozenset({"dense_mlp"}), frozenset({"dense_mlp", "experts"})]
    before = dict(model.transfers)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    assert model.transfers["fetches"] > before["fetches"]
    dense = model.model.layers[0].mlp.gate_proj.weight
    assert dense.data_ptr() != reference.model.layers[0].mlp.gate_proj.weight.data_ptr()
    assert list(sample_iter(model, x[0].tolist(), 5)) == list(sample_iter(reference, x[0].tolist(), 5))
