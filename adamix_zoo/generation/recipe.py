"""The data-to-text recipe: setup -> train -> evaluate by generation -> save.

Same output folder as the GLUE recipe (run_config.json, metrics.jsonl, final_metrics.json,
adamix_experts.safetensors, merged/), plus generations.jsonl with every output and its references.
The LM head is the backbone's own (tied embeddings), so nothing besides the adapters trains.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

from adamix_zoo.backbones import fingerprint, resolve_backbone
from adamix_zoo.config import AdaMixConfig
from adamix_zoo.generation.data import collate_lm, encode_pair, grouped_examples, load_split, training_pairs
from adamix_zoo.generation.generate import generate_examples
from adamix_zoo.generation.metrics import nlg_metrics
from adamix_zoo.generation.objective import lm_loss
from adamix_zoo.generation.tasks import PROMPT_TEMPLATE, get_nlg_task
from adamix_zoo.io import (
    CURVE_FILE,
    EXPERTS_FILE,
    FINAL_METRICS_FILE,
    MERGED_DIR,
    METADATA_FILE,
    METRICS_FILE,
    RUN_CONFIG_FILE,
    save_experts,
    save_merged,
)
from adamix_zoo.model import AdaMixModel
from adamix_zoo.plots import plot_curve
from adamix_zoo.training import PRECISIONS, autocast, resolve_precision, select_device, seed_everything

METHODS = {  # method -> (kind, mixture?)
    "lora": ("lora", False),
    "adapter": ("adapter", False),
    "adamix-lora": ("lora", True),
    "adamix-adapter": ("adapter", True),
}


@dataclass
class GenerationArgs:
    """Settings of one data-to-text run (help text per field)."""

    task: str = field(default="e2e", metadata={"help": "e2e, webnlg or dart."})
    method: str = field(default="adamix-lora", metadata={"help": ", ".join(METHODS)})
    backbone: str = field(default="smollm2-135m", metadata={"help": "Alias, hub id or local folder."})
    output_dir: str = field(default="runs/e2e", metadata={"help": "Where the run is written."})
    data_dir: str | None = field(default=None, metadata={"help": "Folder with <task>/<split>.jsonl; None: hub."})
    num_experts: int = field(default=4, metadata={"help": "Experts K for the adamix methods."})
    rank: int = field(default=4, metadata={"help": "LoRA rank (official NLG setup: 4)."})
    alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (official NLG setup: 32)."})
    bottleneck: int = field(default=16, metadata={"help": "Adapter bottleneck size."})
    sharing: str = field(default="up", metadata={"help": "Shared projection: up, down or none."})
    consistency_weight: float | None = field(
        default=None, metadata={"help": "Token-masked KL weight (adamix); None: the lm default of AdaMixConfig (official GPT-2: 100)."})
    task_loss_passes: str = field(
        default="first", metadata={"help": "Cross-entropy on the first pass (official GPT-2) or both."})
    routing: str = field(default="row", metadata={"help": "Training routing: row or batch."})
    expert_init: str = field(default="identical", metadata={"help": "identical or independent experts."})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 where fast), bf16 or fp32."})
    train_size: int = field(default=2000, metadata={"help": "Training (source, reference) pairs used."})
    eval_size: int = field(default=100, metadata={"help": "Distinct validation sources scored."})
    max_length: int = field(default=96, metadata={"help": "Tokens of prompt + target kept."})
    batch_size: int = field(default=8, metadata={"help": "Training batch size."})
    steps: int = field(default=300, metadata={"help": "Optimizer steps."})
    lr: float = field(default=2e-3, metadata={"help": "Peak learning rate (AdamW)."})
    warmup_ratio: float = field(default=0.06, metadata={"help": "Share of steps with linear warmup."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    num_beams: int = field(default=1, metadata={"help": "1 greedy, more: beam search."})
    max_new_tokens: int = field(default=64, metadata={"help": "Generated tokens per input."})
    seed: int = field(default=0, metadata={"help": "Seed of data order, init and routing."})

    def __post_init__(self) -> None:
        get_nlg_task(self.task)
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not supported; choose one of {', '.join(METHODS)}")
        for name in ("train_size", "eval_size", "max_length", "batch_size", "steps", "num_beams"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        self.adamix_config()  # the mixture fields are validated by AdaMixConfig

    def adamix_config(self) -> AdaMixConfig:
        kind, mixture = METHODS[self.method]
        return AdaMixConfig(
            kind=kind, num_experts=self.num_experts if mixture else 1, rank=self.rank, alpha=self.alpha,
            bottleneck=self.bottleneck, sharing=self.sharing, seed=self.seed,
            consistency_weight=self.consistency_weight if mixture else 0.0,
            task_loss_passes=self.task_loss_passes, routing=self.routing, expert_init=self.expert_init,
        )


def load_backbone(name: str, device: torch.device):
    path = resolve_backbone(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    return model, tokenizer, path


def train_lm(model: AdaMixModel, loader: DataLoader, args: GenerationArgs, device, log) -> list[dict]:
    """The training loop; returns one record per logged step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(args.warmup_ratio * args.steps), args.steps)
    weight = model.config.consistency_weight_for("lm")
    precision = resolve_precision(args.precision, device)
    records, batches = [], iter(())
    model.train()
    for step in tqdm(range(1, args.steps + 1), desc=f"{args.method} {args.task}", leave=False):
        batch = next(batches, None)
        if batch is None:
            batches = iter(loader)
            batch = next(batches)
        with autocast(device, precision):
            loss = lm_loss(model, {k: v.to(device) for k, v in batch.items()}, weight,
                           model.config.task_loss_passes)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == args.steps:
            records.append({"step": step, "loss": loss.item(), "lr": scheduler.get_last_lr()[0]})
            log(records[-1])
    return records


def run_generation(args: GenerationArgs) -> dict:
    """Train, evaluate by generation and save; returns the final metrics."""
    seed_everything(args.seed)
    device = select_device()
    task = get_nlg_task(args.task)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    backbone, tokenizer, path = load_backbone(args.backbone, device)
    base_fingerprint = fingerprint(backbone)
    model = AdaMixModel(backbone, args.adamix_config(), head_modules=[])

    pairs = training_pairs(task, load_split(task, "train", args.data_dir), limit=args.train_size)
    features = [encode_pair(tokenizer, task, s, t, args.max_length) for s, t in pairs]
    loader = DataLoader(features, batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(args.seed),
                        collate_fn=lambda f: collate_lm(f, tokenizer.pad_token_id))
    examples = grouped_examples(task, load_split(task, "validation", args.data_dir), limit=args.eval_size)

    metrics_log = (out / METRICS_FILE).open("w")
    start = time.perf_counter()
    records = train_lm(model, loader, args, device, lambda r: metrics_log.write(json.dumps(r) + "\n"))
    train_seconds = time.perf_counter() - start
    model.eval()
    outputs = generate_examples(model, tokenizer, task, examples, num_beams=args.num_beams,
                                max_new_tokens=args.max_new_tokens)
    metrics = nlg_metrics(outputs, [list(e.references) for e in examples])
    final = {"main_metric": "bleu", "best_step": args.steps, **metrics, "train_seconds": train_seconds}
    metrics_log.write(json.dumps({"step": args.steps, "eval": metrics}) + "\n")
    metrics_log.close()

    with (out / "generations.jsonl").open("w") as f:
        for e, o in zip(examples, outputs):
            f.write(json.dumps({"source": e.source, "output": o, "references": list(e.references)}) + "\n")
    save_experts(model, out / EXPERTS_FILE)
    merged = save_merged(model, out / MERGED_DIR, base_model=args.backbone)
    base_model = {"id": args.backbone, "fingerprint": base_fingerprint}
    # What a serving engine needs to attach the merged folder as a generation task (no head).
    (merged / METADATA_FILE).write_text(json.dumps(
        {"task": args.task, "problem": "lm", "prompt_template": PROMPT_TEMPLATE, "base_model": base_model},
        indent=2))
    run_config = {
        "task": args.task, "method": args.method, "backbone": args.backbone, "backbone_path": path,
        "backbone_fingerprint": base_fingerprint, "problem": "lm", "label_names": [],
        "prompt_template": PROMPT_TEMPLATE,
        "adamix": model.config.to_dict(), "train": dataclasses.asdict(args), "seed": args.seed,
        "data": {"source": args.data_dir or task.hub_id, "train_size": len(pairs),
                 "validation_size": len(examples), "few_shot": None},
    }
    (out / RUN_CONFIG_FILE).write_text(json.dumps(run_config, indent=2))
    (out / FINAL_METRICS_FILE).write_text(json.dumps(final, indent=2))
    plot_curve(records, out / CURVE_FILE, None, title=f"{args.method} {args.task}")
    return final
