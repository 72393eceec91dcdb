"""Core speed and memory: AdaMix-LoRA against PEFT LoRA on all-MiniLM-L6-v2, in one run.

    .venv/bin/python bench/core.py            # full: batch 16, length 128
    .venv/bin/python bench/core.py --quick    # a smoke run

Every figure is a ratio of medians over interleaved repeats (ours, peer, ours, peer, ...), so slow
drift of the machine hits both sides alike. Memory: on CUDA the allocator's peak; on CPU (no
allocator statistics) the bytes a training step holds beyond the frozen weights: tensors saved for
backward (deduplicated by storage, parameters excluded) + gradients + AdamW state.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adamix_zoo import AdaMixConfig, AdaMixModel  # noqa: E402
from adamix_zoo.backbones import resolve_backbone  # noqa: E402
from adamix_zoo.consistency import consistency_loss, two_routed_passes  # noqa: E402
from adamix_zoo.heads import ClassificationHead  # noqa: E402
from bench.report import machine, markdown_table, write_json, write_section  # noqa: E402

TARGETS = {
    "train_step_ratio_vs_peft_lora": 1.05,
    "train_step_ratio_vs_peft_lora_consistency": 2.0,
    "merged_latency_ratio_vs_peft_lora": 1.02,
    "folded_latency_ratio_vs_backbone": 1.02,
    "peak_memory_ratio_vs_peft_lora": 1.10,
}
COMMAND = ".venv/bin/python bench/core.py"
HIDDEN = 384  # all-MiniLM-L6-v2


def make_batch(batch: int, length: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (batch, length), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


class Trainer:
    """One training step of backbone + mean-pooled head, with or without a second routed pass."""

    def __init__(self, backbone: torch.nn.Module, batch: dict, two_passes: bool, device: torch.device):
        self.backbone = backbone.to(device).train()
        self.head = ClassificationHead(HIDDEN, 2).to(device)
        self.batch, self.two_passes = batch, two_passes
        self.labels = torch.arange(len(batch["input_ids"]), device=device) % 2
        params = [p for p in backbone.parameters() if p.requires_grad] + list(self.head.parameters())
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.backbone(**batch).last_hidden_state
        return self.head(hidden, batch["attention_mask"])

    def step(self) -> None:
        if not self.two_passes:
            loss = torch.nn.functional.cross_entropy(self.logits(self.batch), self.labels)
        else:  # the two routed passes run as one doubled batch, as the training recipe does
            first, second = two_routed_passes(self.backbone, self.logits, self.batch)
            loss = torch.nn.functional.cross_entropy(first, self.labels)
            loss = loss + torch.nn.functional.cross_entropy(second, self.labels)
            loss = loss / 2 + consistency_loss(first, second, "classification")
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def peft_lora(base: torch.nn.Module, rank: int) -> torch.nn.Module:
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["query", "value"], lora_dropout=0.0)
    return get_peft_model(copy.deepcopy(base), config)


def adamix_lora(base: torch.nn.Module, rank: int) -> AdaMixModel:
    config = AdaMixConfig(kind="lora", num_experts=4, rank=rank, alpha=2 * rank, sharing="up")
    return AdaMixModel(copy.deepcopy(base), config)


def interleaved_medians(fns: dict[str, Callable[[], None]], repeats: int, device) -> dict[str, float]:
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def training_memory(trainer: Trainer, device: torch.device) -> int:
    """Peak bytes of one step beyond the frozen weights (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        trainer.step()
        return torch.cuda.max_memory_allocated() - base
    params = {p.untyped_storage().data_ptr() for p in trainer.backbone.parameters()}
    params |= {p.untyped_storage().data_ptr() for p in trainer.head.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.step()
    trainable = sum(p.numel() * p.element_size() for p in trainer.params)
    return sum(saved.values()) + 3 * trainable  # gradients + AdamW's two moments


@torch.no_grad()
def latency(model: torch.nn.Module, batch: dict) -> Callable[[], None]:
    model.eval()
    return lambda: model(**batch)


def run(batch_size: int, length: int, repeats: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = AutoModel.from_pretrained(resolve_backbone("minilm-l6"))
    batch = make_batch(batch_size, length, device)
    rank = 8

    ours, peer = adamix_lora(base, rank), peft_lora(base, rank)
    train_ours, train_peer = Trainer(ours, batch, False, device), Trainer(peer, batch, False, device)
    train_ours2 = Trainer(ours, batch, True, device)
    step = interleaved_medians(
        {"ours": train_ours.step, "peer": train_peer.step, "ours_consistency": train_ours2.step},
        repeats, device)
    memory_ours, memory_peer = training_memory(train_ours, device), training_memory(train_peer, device)

    ours.merge()
    folded = adamix_lora(base, rank).to(device)
    folded.fold()
    bare = copy.deepcopy(base).to(device)
    with torch.no_grad():
        infer = interleaved_medians(
            {"ours_merged": latency(ours, batch), "peer": latency(peer, batch),
             "ours_folded": latency(folded, batch), "backbone": latency(bare, batch)},
            repeats * 2, device)
    return {
        "train_step_ratio_vs_peft_lora": step["ours"] / step["peer"],
        "train_step_ratio_vs_peft_lora_consistency": step["ours_consistency"] / step["peer"],
        "merged_latency_ratio_vs_peft_lora": infer["ours_merged"] / infer["peer"],
        "folded_latency_ratio_vs_backbone": infer["ours_folded"] / infer["backbone"],
        "peak_memory_ratio_vs_peft_lora": memory_ours / memory_peer,
        "seconds": {**{f"train_{k}": v for k, v in step.items()}, **{f"infer_{k}": v for k, v in infer.items()}},
        "training_memory_bytes": {"ours": memory_ours, "peer": memory_peer},
        "setup": {"model": "all-MiniLM-L6-v2", "batch": batch_size, "length": length, "rank": rank,
                  "experts": 4, "targets": ["query", "value"], "repeats": repeats, "device": str(device)},
        "machine": machine(),
    }


def report(results: dict) -> None:
    rows = [[name, results[name], f"<= {target}", "yes" if results[name] <= target else "no"]
            for name, target in TARGETS.items()]
    s, setup = results["seconds"], results["setup"]
    write_section("core", "\n".join([
        "## Core: AdaMix-LoRA vs PEFT LoRA (speed and memory)",
        "",
        f"all-MiniLM-L6-v2, batch {setup['batch']}, length {setup['length']}, rank {setup['rank']}, "
        f"K={setup['experts']} (B shared), q and v, device {setup['device']}, "
        f"{results['machine']['threads']} threads, median of {setup['repeats']} interleaved repeats.",
        "",
        markdown_table(["figure", "value", "target", "met"], rows),
        "",
        f"Seconds per training step: AdaMix {s['train_ours']:.3f}, PEFT LoRA {s['train_peer']:.3f}, "
        f"AdaMix with consistency (two passes) {s['train_ours_consistency']:.3f}. Inference: merged "
        f"{s['infer_ours_merged']:.3f}, PEFT {s['infer_peer']:.3f}, folded {s['infer_ours_folded']:.3f}, "
        f"bare backbone {s['infer_backbone']:.3f}.",
        "",
        "The consistency step is two routed passes over the whole network (two forwards, two "
        "backwards) against PEFT's one, so 2.0 is its floor before any overhead; it runs as one "
        "doubled batch with independently routed halves (`two_routed_passes`, the recipe's path).",
        "",
        f"Command: `{COMMAND}` (results in `bench/results/core.json`).",
    ]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 4, length 32, 3 repeats; no files")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.quick:
        results = run(batch_size=4, length=32, repeats=3)
    else:
        results = run(batch_size=16, length=128, repeats=15)
        write_json("core", results)
        report(results)
    for name, target in TARGETS.items():
        print(f"{name:45s} {results[name]:.3f}  (target <= {target})")


if __name__ == "__main__":
    main()
