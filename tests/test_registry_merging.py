"""Cross-task merging: numerically equal to PEFT's add_weighted_adapter, exact where it says so."""

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.tuners.lora import LoraModel
from safetensors.torch import load_file
from torch.testing import assert_close

from adamix_zoo.formats.files import ADAPTER_WEIGHTS_FILE
from adamix_zoo.formats.merged import PEFT_PREFIX
from adamix_zoo.heads import load_head
from registry import Store
from registry.merging import merge_entries
from tests.registry_runs import make_run
from tests.tiny import tiny_batch, tiny_model

WEIGHTS = [0.7, 0.4]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("merging")
    zoo = Store(tmp / "store")
    zoo.publish(make_run(tmp / "sst2", task="sst2", seed=1, sharing="none", rank=4, alpha=8))
    zoo.publish(make_run(tmp / "rte", task="rte", seed=2, sharing="none", rank=4, alpha=16))
    zoo.publish(make_run(tmp / "mrpc", task="mrpc", seed=3, sharing="none", rank=2, alpha=4))
    zoo.publish(make_run(tmp / "a1", task="stsb", kind="adapter", seed=4, sharing="none", bottleneck=8))
    zoo.publish(make_run(tmp / "a2", task="qnli", kind="adapter", seed=5, sharing="none", bottleneck=4))
    return zoo


def _peft_merge(store, refs, method, seed, **kwargs):
    """PEFT's add_weighted_adapter on the same entries. PEFT draws the new adapter's random init
    from the global generator before merging: reseeding after that aligns DARE's mask stream."""
    model = PeftModel.from_pretrained(tiny_model("bert", head="base"), store.get(refs[0]), adapter_name="s0")
    for i, ref in enumerate(refs[1:], 1):
        model.load_adapter(store.get(ref), adapter_name=f"s{i}")
    inject = LoraModel.inject_adapter

    def reseeded(self, *args, **kw):
        out = inject(self, *args, **kw)
        torch.manual_seed(seed)
        return out

    LoraModel.inject_adapter = reseeded
    try:
        model.add_weighted_adapter([f"s{i}" for i in range(len(refs))], WEIGHTS[: len(refs)], "m",
                                   combination_type=method, **kwargs)
    finally:
        LoraModel.inject_adapter = inject
    model.set_adapter("m")
    return model.eval()


@pytest.mark.parametrize("method, kwargs", [
    ("linear", {}), ("cat", {}), ("svd", {}), ("svd", {"svd_rank": 8}), ("ties", {"density": 0.5}),
    ("dare_linear", {"density": 0.5}), ("dare_ties", {"density": 0.7}), ("magnitude_prune", {"density": 0.3}),
    ("ties_svd", {"density": 0.5}), ("dare_linear_svd", {"density": 0.6}),
])
def test_lora_merge_equals_peft_add_weighted_adapter(store, method, kwargs):
    before = torch.random.get_rng_state()
    info = merge_entries(store, ["sst2", "rte"], WEIGHTS, method, seed=11, task=f"m-{method}-{len(kwargs)}",
                         version=None, **{k: v for k, v in kwargs.items()})
    assert torch.equal(torch.random.get_rng_state(), before)  # the global generator is untouched
    peft_model = _peft_merge(store, ["sst2", "rte"], method, 11, **kwargs)
    ours = load_file(str(info.path / ADAPTER_WEIGHTS_FILE))
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "m" in module.lora_A:
            assert_close(ours[f"{PEFT_PREFIX}{name}.lora_A.weight"], module.lora_A["m"].weight)
            assert_close(ours[f"{PEFT_PREFIX}{name}.lora_B.weight"], module.lora_B["m"].weight)
    batch = tiny_batch()
    with torch.no_grad():
        expected = peft_model(**batch).last_hidden_state
        got = store.attach(info.ref, tiny_model("bert", head="base"), task="sst2").backbone(**batch)
        assert_close(got.last_hidden_state, expected)


def _deltas(store, ref):
    tensors = load_file(str(store.get(ref) / ADAPTER_WEIGHTS_FILE))
    config = store.show(ref)
    scale = config["alpha"] / config["rank"] if config["merge"]["method"] == "expert-average" else 1.0
    return {k[: -len(".lora_A.weight")]: scale * tensors[k.replace("lora_A", "lora_B")] @ tensors[k]
            for k in tensors if k.endswith("lora_A.weight")}


def test_exact_methods_reproduce_the_weighted_sum_of_delta_w(store):
    weights = [0.5, 0.3, 0.2]
    sources = [_deltas(store, r) for r in ("sst2", "rte", "mrpc")]  # ranks 4, 4, 2
    target = {k: sum(w * d[k] for w, d in zip(weights, sources)) for k in sources[0]}
    for method, kwargs in (("cat", {}), ("svd", {"svd_rank": 10})):
        info = merge_entries(store, ["sst2", "rte", "mrpc"], weights, method, task=f"exact-{method}", **kwargs)
        meta = store.show(info.ref)
        assert meta["merge"]["exact"] and meta["rank"] == 10 and meta["alpha"] == 10
        merged = _deltas(store, info.ref)
        for key, delta in target.items():
            assert_close(merged[key], delta, atol=1e-5, rtol=1e-4)
    linear = _deltas(store, merge_entries(store, ["sst2", "rte"], [0.5, 0.5], "linear", task="approx").ref)
    exact = {k: 0.5 * sources[0][k] + 0.5 * sources[1][k] for k in target}
    assert all(not torch.allclose(linear[k], exact[k], atol=1e-4) for k in exact)  # factor averaging is not
    assert not store.show("approx")["merge"]["exact"]


def test_merged_entry_keeps_every_task_head_and_its_provenance(store):
    info = merge_entries(store, ["sst2", "rte"], method="linear", task="pair")
    meta = store.show(info.ref)
    assert sorted(meta["tasks"]) == ["rte", "sst2"] and meta["method"] == "cross-task-merge"
    assert meta["tasks"]["rte"]["head"] == "heads/rte.safetensors" and meta["tasks"]["rte"]["source"] == "local/rte@1"
    assert meta["merge"]["weights"] == [0.5, 0.5] and meta["merge"]["sources"] == ["local/sst2@1", "local/rte@1"]
    assert [m["ref"] for m in meta["provenance"]["merged_from"]] == ["local/sst2@1", "local/rte@1"]
    head = store.attach(info.ref, tiny_model("bert", head="base"), task="rte").head
    source = load_head(store.get("rte") / "head.safetensors")
    assert torch.equal(head.classifier.weight, source.classifier.weight)
    with pytest.raises(ValueError, match=r"serves several tasks \['rte', 'sst2'\]: pass task="):
        store.attach(info.ref, tiny_model("bert", head="base"))
    assert merge_entries(store, ["sst2", "rte"]).ref == "local/sst2+rte@1"  # default name


def _adapter_parts(store, ref):
    tensors = load_file(str(store.get(ref) / ADAPTER_WEIGHTS_FILE))
    module = sorted({k.rsplit(".", 2)[0] for k in tensors})[0]
    return {k[len(module) + 1:]: v for k, v in tensors.items() if k.startswith(module + ".")}


def test_adapter_entries_average_parameters_and_cat_is_exact(store):
    lin = _adapter_parts(store, merge_entries(store, ["stsb", "stsb"], [0.25, 0.75], "linear", task="self").ref)
    src = _adapter_parts(store, "stsb")
    for key, value in src.items():
        assert_close(lin[key], value)  # averaging an adapter with itself returns it
    info = merge_entries(store, ["stsb", "qnli"], [0.6, 0.4], "cat", task="adapters-cat")
    merged, parts = _adapter_parts(store, info.ref), [_adapter_parts(store, r) for r in ("stsb", "qnli")]
    assert merged["adapter_down.weight"].shape[0] == 12 and store.show(info.ref)["bottleneck"] == 12
    h = torch.randn(5, 32)

    def apply(p):  # the adapter's residual branch: up(gelu(down(h)))
        return F.linear(F.gelu(F.linear(h, p["adapter_down.weight"], p["adapter_down.bias"])),
                        p["adapter_up.weight"], p["adapter_up.bias"])

    assert_close(apply(merged), 0.6 * apply(parts[0]) + 0.4 * apply(parts[1]), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("refs, method, kwargs, message", [
    (["sst2", "mrpc"], "linear", {}, "needs all sources to share one rank r, got \\[2, 4\\]; use cat or svd"),
    (["stsb", "qnli"], "ties", {"density": 0.5}, "share one bottleneck, got \\[4, 8\\]; use cat"),
    (["sst2", "rte"], "ties", {}, "'ties' needs a density"),
    (["stsb", "qnli"], "svd", {}, "works in LoRA delta-W space"),
    (["sst2", "stsb"], "linear", {}, "cannot merge different adapter kinds"),
    (["sst2", "rte"], "average", {}, "merge method 'average' is not supported; choose one of linear"),
])
def test_merge_refuses_what_it_cannot_do(store, refs, method, kwargs, message):
    count = len(store.list())
    with pytest.raises(ValueError, match=message):
        merge_entries(store, refs, method=method, task="refused", **kwargs)
    assert len(store.list()) == count and store.check() == []
