"""Scale and faults on the in-process grid (tiny model): sampled clients (reproducibly), the evaluation cadence,
clients that crash or straggle past the round timeout, the wait for clients, the client model
cache, and the client timing that the benchmark's round overhead is made of."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, MetricRecord, RecordDict

from adamix_zoo.formats.files import EXPERTS_FILE, read_safetensors
from federation.client_app import app
from federation.config import FederationConfig
from federation.mods import injected_fault
from federation.records import HEAD_PREFIX
from federation.sampling import PARTITION_KEY, REPLY_KEY, ClientCycle, ClientOrder
from federation.server_app import FederationError, run_federation
from tests.test_federation_support import InProcessGrid, make_glue, tiny_run_config

pytestmark = pytest.mark.usefixtures("server_identity", "one_thread")

pytest_plugins = ["tests.test_federation_support"]


class TimedGrid(InProcessGrid):
    """Clients answering in parallel: a reply that took longer than ``timeout`` never arrives."""

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for msg in messages:
            start = time.perf_counter()
            reply = super().send_and_receive([msg], timeout=timeout)
            if timeout is None or time.perf_counter() - start <= timeout:
                out += reply
        return out


def weighted_mean(replies: list) -> dict[str, np.ndarray]:
    weights = np.array([r.content["metrics"]["num-examples"] for r in replies], dtype=np.float64)
    names = replies[0].content["arrays"].keys()
    return {
        k: sum(w * r.content["arrays"][k].numpy().astype(np.float64) for w, r in zip(weights, replies))
        / weights.sum()
        for k in names
    }


def test_twenty_clients_sampled_per_round_and_only_the_sampled_are_aggregated(tiny_env):
    make_glue(tiny_env / "data", rows=400)  # 20 partitions of 20 rows (10 validation rows)
    rc = tiny_run_config(tiny_env, **{
        "num-clients": 20, "num-rounds": 3, "fraction-train": 0.25, "fraction-evaluate": 0.1,
        "evaluate-every": 2, "publish": False,
    })
    grid = InProcessGrid(app, rc, num_nodes=20)
    outcome = run_federation(grid, FederationConfig.from_run_config(rc))

    train = [(sent, replies) for kind, sent, replies in grid.exchanges if kind == "train"]
    assert [len(sent) for sent, _ in train] == [5, 5, 5]  # int(0.25 x 20) per round
    for sent, _ in train:
        assert len({m.metadata.dst_node_id for m in sent}) == 5
    assert len({m.metadata.dst_node_id for sent, _ in train for m in sent}) > 5  # drawn anew
    log = outcome.metrics["federation"]
    assert log["accepted_updates"] == {1: 5, 2: 5, 3: 5} and log["aggregated_rounds"] == [1, 2, 3]
    # The global experts are the weighted mean of the last round's five sampled clients alone.
    saved = read_safetensors(outcome.folder / EXPERTS_FILE)
    for name, value in weighted_mean(train[-1][1]).items():
        if not name.startswith(HEAD_PREFIX):
            np.testing.assert_allclose(saved[name].numpy(), value, rtol=1e-5, atol=1e-7)
    # Federated evaluation ran at rounds 2 (every 2) and 3 (the last), on max(2, 0.1 x 20) clients.
    evaluated = [len(sent) for kind, sent, _ in grid.exchanges if kind in ("evaluate", "")]
    assert evaluated == [0, 2, 2]
    assert sorted(log["round_eval_phase_seconds"]) == [2, 3]
    # Each client's whole handler time covers its training loop.
    for handler, loop in zip(log["client_handler_seconds"].values(), log["client_train_seconds"].values()):
        assert len(handler) == 5 and all(h >= t > 0 for h, t in zip(handler, loop))


class DrawnIdsGrid(InProcessGrid):
    """Node ids drawn at random, as a SuperLink draws them, listed in no particular order;
    partition i is still partition i."""

    def __init__(self, app, run_config: dict, num_nodes: int, draw: int) -> None:
        super().__init__(app, run_config, num_nodes)
        ids = random.Random(draw).sample(range(10**6, 10**9), num_nodes)
        self.contexts = {new: Context(run_id=1, node_id=new, node_config=ctx.node_config, state=ctx.state,
                                      run_config=ctx.run_config) for new, ctx in zip(ids, self.contexts.values())}
        self.partition = {new: ctx.node_config["partition-id"] for new, ctx in self.contexts.items()}

    def get_node_ids(self) -> list[int]:
        return sorted(self.contexts)


def test_one_seed_trains_the_same_partitions_whatever_the_node_ids(tiny_env):
    make_glue(tiny_env / "data", rows=400)
    runs = []
    for i, (seed, draw) in enumerate([(0, 1), (0, 2), (1, 1)]):
        rc = tiny_run_config(tiny_env, **{"num-clients": 20, "num-rounds": 3, "fraction-train": 0.25,
                                          "seed": seed, "publish": False, "output-dir": str(tiny_env / f"out{i}")})
        grid = DrawnIdsGrid(app, rc, 20, draw)
        random.seed(draw)  # whatever state Python's generator is in
        outcome = run_federation(grid, FederationConfig.from_run_config(rc))
        sampled = [[grid.partition[m.metadata.dst_node_id] for m in sent]
                   for kind, sent, _ in grid.exchanges if kind == "train"]
        runs.append((sampled, read_safetensors(outcome.folder / EXPERTS_FILE)))
    (first, experts), (again, experts_again), (other, _) = runs
    assert first == again and len(first) == 3 and all(len(set(s)) == 5 for s in first)
    assert first != other  # another seed samples other clients
    assert experts.keys() == experts_again.keys()
    for name in experts:  # replies aggregated in partition order: bitwise the same global experts
        assert torch.equal(experts[name], experts_again[name]), name


def test_cyclic_sampling_trains_every_client_once_per_cycle(tiny_env):
    make_glue(tiny_env / "data", rows=400)
    sampled = {}
    for seed in (0, 1):
        rc = tiny_run_config(tiny_env, **{"num-clients": 20, "num-rounds": 8, "fraction-train": 0.25,
                                          "client-sampling": "cyclic", "seed": seed, "publish": False,
                                          "evaluate-every": 8, "output-dir": str(tiny_env / f"out{seed}")})
        grid = DrawnIdsGrid(app, rc, 20, draw=seed)
        outcome = run_federation(grid, FederationConfig.from_run_config(rc))
        rounds = [[grid.partition[m.metadata.dst_node_id] for m in sent]
                  for kind, sent, _ in grid.exchanges if kind == "train"]
        assert [len(r) for r in rounds] == [5] * 8
        for cycle in (rounds[:4], rounds[4:]):  # 20 clients / 5 a round: a cycle of 4 rounds
            assert sorted(p for r in cycle for p in r) == list(range(20))
        assert outcome.metrics["federation"]["aggregated_rounds"] == list(range(1, 9))
        assert random.sample == random.Random.sample.__get__(random._inst)  # restored after each draw
        assert rounds[:4] != rounds[4:]  # each cycle in its own order
        sampled[seed] = rounds
    assert sampled[0] != sampled[1]


def test_a_client_cycle_skips_departed_clients_and_takes_joiners_next_cycle():
    cycle = ClientCycle(seed=0)
    first = cycle.take([1, 2, 3, 4], 2)
    rest = cycle.take([1, 2, 3, 4, 5], 2)  # 5 joined mid-cycle: not in this cycle
    assert sorted(first + rest) == [1, 2, 3, 4]
    gone = rest[0]
    live = [n for n in (1, 2, 3, 4, 5) if n != gone]
    drawn = cycle.take(live, 2) + cycle.take(live, 2)
    assert sorted(drawn) == sorted(live) and gone not in drawn  # the next cycle: 5 in, the departed out
    # A round across a cycle's end: the old cycle's last client, then new ones, none twice.
    odd = ClientCycle(seed=3)
    draws = [odd.take([1, 2, 3], 2) for _ in range(3)]
    assert all(len(set(d)) == 2 for d in draws)
    assert sorted(draws[0] + draws[1][:1]) == [1, 2, 3]
    with pytest.raises(ValueError, match="cannot sample 4 clients of 3"):
        odd.take([1, 2, 3], 4)


def test_nodes_without_a_partition_id_are_sampled_after_the_others():
    class Grid:
        def get_node_ids(self):
            return [7, 5, 9]

        def send_and_receive(self, messages, *, timeout=None):
            replies = []
            for msg, pid in zip(messages, [2, None, 0]):  # node 5 answers with an error
                if pid is None:
                    replies.append(Message(Error(1, "no partition-id"), reply_to=msg))
                else:
                    content = RecordDict({REPLY_KEY: MetricRecord({PARTITION_KEY: pid})})
                    replies.append(Message(content, reply_to=msg))
            return replies

    order = ClientOrder(seed=0)
    with order.sampling(Grid(), 1, "train") as grid:
        assert grid.get_node_ids() == [9, 7, 5]
    assert order.partitions == {7: 2, 9: 0}


def test_crashing_clients_are_dropped_and_the_round_aggregates_the_rest(tiny_env):
    rc = tiny_run_config(tiny_env, **{"num-clients": 6, "num-rounds": 2, "drop-rate": 0.4, "publish": False})
    cfg = FederationConfig.from_run_config(rc)
    dropped = {r: {100 + p for p in range(6) if injected_fault(cfg, r, p) == "drop"} for r in (1, 2)}
    assert all(1 <= len(d) <= 4 for d in dropped.values()), dropped  # the seed drops some, not all
    grid = InProcessGrid(app, rc, num_nodes=6)
    outcome = run_federation(grid, cfg)
    log = outcome.metrics["federation"]
    assert log["accepted_updates"] == {r: 6 - len(d) for r, d in dropped.items()}
    assert log["aggregated_rounds"] == [1, 2]
    for r, d in dropped.items():
        rejected = {x["node"]: x["reason"] for x in log["rejected_updates"][r]}
        assert set(rejected) == d and all("fault injection" in why for why in rejected.values())


def test_fault_draws_are_repeatable_and_follow_the_rates():
    cfg = FederationConfig(num_clients=20, drop_rate=0.2, straggler_rate=0.3, seed=3)
    draws = [injected_fault(cfg, r, p) for r in range(1, 51) for p in range(20)]
    assert draws == [injected_fault(cfg, r, p) for r in range(1, 51) for p in range(20)]
    assert draws.count("drop") / 1000 == pytest.approx(0.2, abs=0.04)
    assert draws.count("straggle") / 1000 == pytest.approx(0.8 * 0.3, abs=0.04)  # if not dropped
    assert all(injected_fault(FederationConfig(), r, p) is None for r in range(1, 5) for p in range(4))


def test_a_straggler_past_the_round_timeout_does_not_stall_the_round(tiny_env):
    base = {"num-clients": 4, "num-rounds": 1, "straggler-rate": 0.3, "straggler-seconds": 4.0,
            "round-timeout": 3.0, "publish": False}
    seed = next(s for s in range(100) if sum(
        injected_fault(FederationConfig.from_run_config(tiny_run_config(tiny_env, **base, seed=s)), 1, p)
        == "straggle" for p in range(4)) == 1)
    rc = tiny_run_config(tiny_env, **base, seed=seed)
    cfg = FederationConfig.from_run_config(rc)
    late = next(100 + p for p in range(4) if injected_fault(cfg, 1, p) == "straggle")
    grid = TimedGrid(app, rc, num_nodes=4)
    outcome = run_federation(grid, cfg)
    assert outcome.metrics["federation"]["accepted_updates"] == {1: 3}
    good = [r for r in grid.replies if r.metadata.message_type == "train" and r.metadata.src_node_id != late]
    assert len(good) == 3
    saved = read_safetensors(outcome.folder / EXPERTS_FILE)
    for name, value in weighted_mean(good).items():
        if not name.startswith(HEAD_PREFIX):
            np.testing.assert_allclose(saved[name].numpy(), value, rtol=1e-5, atol=1e-7)


def test_the_server_waits_for_min_available_clients_before_round_one(tiny_env):
    rc = tiny_run_config(tiny_env, **{"num-clients": 4, "num-rounds": 1, "round-timeout": 1.0, "publish": False})
    with pytest.raises(FederationError, match="only 3 of 4 clients connected within 1s"):
        run_federation(InProcessGrid(app, rc, num_nodes=3), FederationConfig.from_run_config(rc))
    rc["min-available-clients"] = 3
    outcome = run_federation(InProcessGrid(app, rc, num_nodes=3), FederationConfig.from_run_config(rc))
    assert outcome.metrics["federation"]["accepted_updates"] == {1: 3}


class ShrinkingGrid(InProcessGrid):
    """Two of the clients go away after round 1's training."""

    def get_node_ids(self) -> list[int]:
        ids = super().get_node_ids()
        return ids if train_rounds(self) < 1 else ids[:2]


def train_rounds(grid: InProcessGrid) -> int:
    return sum(1 for kind, sent, _ in grid.exchanges if kind == "train" and sent)


def test_a_round_with_fewer_than_min_clients_connected_is_skipped_not_stalled(tiny_env, caplog):
    rc = tiny_run_config(tiny_env, **{"num-clients": 4, "min-clients": 3, "num-rounds": 2,
                                      "round-timeout": 1.0, "publish": False})
    grid = ShrinkingGrid(app, rc, num_nodes=4)
    outcome = run_federation(grid, FederationConfig.from_run_config(rc))
    log = outcome.metrics["federation"]
    assert log["aggregated_rounds"] == [1] and log["skipped_rounds"] == [2]
    assert train_rounds(grid) == 1  # round 2 sent no training message
    assert "round 2: only 2 clients connected (min-clients=3): no training" in caplog.text
    assert "round 2: only 2 clients connected (min-clients=3): no evaluation" in caplog.text


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("fraction-train", 0.0, "fraction-train must be in"),
        ("fraction-evaluate", 1.5, "fraction-evaluate must be in"),
        ("min-available-clients", 1, "min-available-clients=1 must be 0 or between min-clients=2"),
        ("min-available-clients", 5, "and num-clients=4"),
        ("drop-rate", -0.1, "drop-rate must be in"),
        ("evaluate-every", 0, "evaluate-every must be >= 1"),
    ],
)
def test_bad_scale_settings_name_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        FederationConfig.from_run_config({"num-clients": 4, key: value})


def test_evaluation_rounds_are_every_n_and_the_last():
    cfg = FederationConfig(num_rounds=7, evaluate_every=3)
    assert [r for r in range(1, 8) if cfg.evaluates(r)] == [3, 6, 7]
    assert FederationConfig(num_clients=20).clients_before_start == 20
    assert FederationConfig(num_clients=20, min_available_clients=5).clients_before_start == 5


def test_the_client_model_is_built_once_and_reset_to_a_fresh_build(tiny_env):
    from federation import task

    cfg = FederationConfig.from_run_config(tiny_run_config(tiny_env))
    family = task.family_of(cfg)
    task._MODELS.clear()
    first = family.client_model(cfg, "sst2")
    with torch.no_grad():
        for p in first.parameters():
            if p.requires_grad:
                p.add_(1.0)  # what a round of training does to the trainable tensors
    first.backbone.seed_routing(12345)
    first.eval()
    again = family.client_model(cfg, "sst2", head_seed=7)
    assert again is first and again.training
    fresh = family.build_model(cfg, "sst2", head_seed=7)
    assert fresh.training
    mine, theirs = again.state_dict(), fresh.state_dict()
    assert mine.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(mine[name], theirs[name], rtol=0, atol=0, msg=name)
    assert again.backbone.router.generator.get_state().equal(fresh.backbone.router.generator.get_state())


def test_clients_train_in_the_run_precision(tiny_env, monkeypatch):
    from federation import task

    seen = {}
    real = task.train_steps

    def spy(*args, **kwargs):
        seen["precision"] = kwargs["precision"]
        return real(*args, **kwargs)

    monkeypatch.setattr(task, "train_steps", spy)
    cfg = FederationConfig.from_run_config(tiny_run_config(tiny_env, precision="bf16"))
    family = task.family_of(cfg)
    _, examples = family.client_data(cfg, 0, "train")
    stats = family.train_round(family.client_model(cfg, "sst2"), cfg, "sst2", examples, seed=1)
    assert seen["precision"] == "bf16" and np.isfinite(stats["train-loss"])
    with pytest.raises(ValueError, match="precision='fp8'"):
        FederationConfig(precision="fp8")
