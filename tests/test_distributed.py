"""Data-parallel training: two CPU processes (gloo) train exactly like one process on both shards.

Each rank reads every other example (DistributedSampler without shuffling) and averages gradients
with the others; AdaMix routing is seeded identically on both ranks. The reference is one process
with a batch twice as large, so after a few steps all three must hold the same weights. That holds
for per-batch routing; per-row routing draws each rank's rows on that rank, so there the ranks must
stay bitwise in sync and train.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, DistributedSampler

from adamix_zoo.config import AdaMixConfig
from adamix_zoo.data import Collator, encode, load_task_data
from adamix_zoo.glue_tasks import get_task
from adamix_zoo.loop import train_steps
from adamix_zoo.optim import make_optimizer
from adamix_zoo.runtime import seed_everything
from adamix_zoo.task_model import build_task_model
from tests.tiny_glue import tiny_backbone_dir, tiny_tokenizer, write_glue

BATCH, STEPS = 8, 4


def _setup(root: str, method_kind: str, rank: int = 0, world: int = 1, routing: str = "batch"):
    task = get_task("sst2")
    train, _, _ = load_task_data(task, f"{root}/glue", train_subset=BATCH * 2 * STEPS)
    data = encode(train, task, tiny_tokenizer(), 32)
    seed_everything(0)  # same head init and routing seed on every rank
    config = AdaMixConfig(kind=method_kind, num_experts=4, consistency_weight=1.0, seed=0, routing=routing)
    model = build_task_model(f"{root}/bert", task, config, head_dropout=0.0)
    collate = Collator(0)
    if world > 1:
        sampler = DistributedSampler(data, world, rank, shuffle=False)
        loader = DataLoader(data, BATCH, sampler=sampler, collate_fn=collate)
    else:
        loader = DataLoader(data, BATCH * 2, shuffle=False, collate_fn=collate)
    return model, loader, task


def _trained_state(model, loader, task) -> dict[str, torch.Tensor]:
    train_steps(model, loader, task, STEPS, make_optimizer(model, 1e-2), max_grad_norm=0.5)
    return {k: v.detach().clone().contiguous() for k, v in model.named_parameters() if v.requires_grad}


def _worker(rank: int, world: int, root: str, kind: str, routing: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=world)
    try:
        model, loader, task = _setup(root, kind, rank, world, routing)
        save_file(_trained_state(model, loader, task), f"{root}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("kind", "routing"), [
    ("lora", "batch"), ("lora", "row"), pytest.param("adapter", "batch", marks=pytest.mark.slow)])
def test_two_gloo_processes_match_one_process(tmp_path, kind, routing):
    tiny_backbone_dir(tmp_path / "bert", dropout=0.0)  # no dropout: all runs see the same network
    write_glue(tmp_path / "glue", n_train=128, n_val=8)
    os.environ.pop("WORLD_SIZE", None)
    mp.spawn(_worker, args=(2, str(tmp_path), kind, routing), nprocs=2, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, loader, task = _setup(str(tmp_path), kind, routing=routing)
        initial = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
        reference = _trained_state(model, loader, task)
    finally:
        torch.set_num_threads(threads)
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    for name, tensor in reference.items():
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0)  # in sync
        if routing == "batch":
            torch.testing.assert_close(ranks[0][name], tensor, rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(initial[n], ranks[0][n]) for n in reference if "adamix" in n)
    assert any(not torch.equal(initial[n], reference[n]) for n in reference if "adamix" in n)
