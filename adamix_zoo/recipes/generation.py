"""The data-to-text recipe: setup -> train -> evaluate by generation -> save.

Same run folder as the GLUE recipe (``adamix_zoo.formats.run_folder``), plus generations.jsonl with
every output and its references. The LM head is the backbone's own (tied embeddings), so nothing
besides the adapters trains. The steps run in the shared loop (``adamix_zoo.loop``) with the
token-masked LM loss as its hook, AdamW and ``transformers``' linear warmup schedule.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from adamix_zoo.backbones import fingerprint, resolve_backbone
from adamix_zoo.config import ADAPTER_METHODS, AdaMixConfig, args_from_options, flat_options, method_config
from adamix_zoo.formats.files import CURVE_FILE
from adamix_zoo.formats.run_folder import RunFolder, run_config
from adamix_zoo.generation.data import collate_lm, encode_pair, grouped_examples, load_split, training_pairs
from adamix_zoo.generation.generate import generate_examples
from adamix_zoo.generation.metrics import nlg_metrics
from adamix_zoo.generation.nlg_tasks import PROMPT_TEMPLATE, get_nlg_task
from adamix_zoo.generation.objective import generation_adamix, lm_loss_fn
from adamix_zoo.loop import train_steps
from adamix_zoo.model import AdaMixModel
from adamix_zoo.optim import EXPERT_LR_SCALE_HELP, make_optimizer, make_scheduler
from adamix_zoo.plots import plot_curve
from adamix_zoo.runtime import PRECISIONS, resolve_precision, seed_everything, select_device

METHODS = ADAPTER_METHODS
LOG_EVERY = 10  # steps between the records of metrics.jsonl


@dataclass
class GenerationArgs:
    """Settings of one data-to-text run (help text per field)."""

    task: str = field(default="e2e", metadata={"help": "e2e, webnlg or dart."})
    method: str = field(default="adamix-lora", metadata={"help": ", ".join(METHODS)})
    backbone: str = field(default="smollm2-135m", metadata={"help": "Alias, hub id or local folder."})
    output_dir: str = field(default="runs/e2e", metadata={"help": "Where the run is written."})
    data_dir: str | None = field(default=None, metadata={"help": "Folder with <task>/<split>.jsonl; None: hub."})
    adamix: AdaMixConfig = field(default_factory=generation_adamix, metadata={
        "help": "The mixture (rank 4, alpha 32, K=4, cross-entropy on the first pass by default; "
                "consistency_weight None: the lm default, official GPT-2: 100); the method sets its kind "
                "and K=1 for the lora / adapter baselines."})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 where fast), bf16 or fp32."})
    train_size: int = field(default=2000, metadata={"help": "Training (source, reference) pairs used."})
    eval_size: int = field(default=100, metadata={"help": "Distinct validation sources scored."})
    max_length: int = field(default=96, metadata={"help": "Tokens of prompt + target kept."})
    batch_size: int = field(default=8, metadata={"help": "Training batch size."})
    steps: int = field(default=300, metadata={"help": "Optimizer steps."})
    lr: float = field(default=2e-3, metadata={"help": "Peak learning rate (AdamW)."})
    warmup_ratio: float = field(default=0.06, metadata={"help": "Share of steps with linear warmup."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    expert_lr_scale: float = field(default=1.0, metadata={"help": EXPERT_LR_SCALE_HELP})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    num_beams: int = field(default=1, metadata={"help": "1 greedy, more: beam search."})
    max_new_tokens: int = field(default=64, metadata={"help": "Generated tokens per input."})
    seed: int = field(default=0, metadata={"help": "Seed of data order, init and routing."})

    def __post_init__(self) -> None:
        get_nlg_task(self.task)
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not supported; choose one of {', '.join(METHODS)}")
        if not self.expert_lr_scale > 0:
            raise ValueError(f"expert_lr_scale must be > 0, got {self.expert_lr_scale}")
        for name in ("train_size", "eval_size", "max_length", "batch_size", "steps", "num_beams"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        self.adamix_config()

    @classmethod
    def from_options(cls, **options: Any) -> "GenerationArgs":
        """From flat options, the mixture's among them (``rank=8, num_experts=2, ...``)."""
        return args_from_options(cls, generation_adamix(), options)

    def options(self) -> dict[str, Any]:
        """The flat options (``from_options`` inverts it); run_config.json's ``train`` block."""
        return flat_options(self)

    def adamix_config(self) -> AdaMixConfig:
        return method_config(self.method, self.adamix, self.seed)


def load_backbone(name: str, device: torch.device):
    path = resolve_backbone(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    return model, tokenizer, path


def train_lm(model: AdaMixModel, loader: DataLoader, args: GenerationArgs, device, log) -> list[dict]:
    """The optimizer steps; returns one record (step, loss, lr) per ``LOG_EVERY`` steps and the last."""
    optimizer = make_optimizer(model, args.lr, args.weight_decay, expert_lr_scale=args.expert_lr_scale)
    scheduler = make_scheduler(optimizer, args.steps, math.ceil(args.warmup_ratio * args.steps), warmup_offset=0)
    records: list[dict] = []

    def record(step: int, loss: float) -> None:
        if step % LOG_EVERY == 0 or step == args.steps:
            records.append({"step": step, "loss": loss, "lr": scheduler.get_last_lr()[0]})
            log(records[-1])

    bar = tqdm(total=args.steps, desc=f"{args.method} {args.task}", leave=False)
    train_steps(model, loader, None, args.steps, optimizer, scheduler, max_grad_norm=args.max_grad_norm,
                device=device, progress=bar, precision=resolve_precision(args.precision, device),
                loss_fn=lm_loss_fn(model.config), on_step=record)
    bar.close()
    return records


def run_generation(args: GenerationArgs) -> dict:
    """Train, evaluate by generation and save; returns the final metrics."""
    seed_everything(args.seed)
    device = select_device()
    task = get_nlg_task(args.task)
    folder = RunFolder(args.output_dir)
    backbone, tokenizer, path = load_backbone(args.backbone, device)
    base_fingerprint = fingerprint(backbone)
    model = AdaMixModel(backbone, args.adamix_config(), head_modules=[])

    pairs = training_pairs(task, load_split(task, "train", args.data_dir), limit=args.train_size)
    features = [encode_pair(tokenizer, task, s, t, args.max_length) for s, t in pairs]
    loader = DataLoader(features, batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(args.seed),
                        collate_fn=lambda f: collate_lm(f, tokenizer.pad_token_id))
    examples = grouped_examples(task, load_split(task, "validation", args.data_dir), limit=args.eval_size)
    folder.start(run_config(
        task=args.task, method=args.method, backbone=args.backbone, backbone_path=path,
        backbone_fingerprint=base_fingerprint, problem="lm", label_names=[], adamix=model.config.to_dict(),
        train=args.options(), seed=args.seed, prompt_template=PROMPT_TEMPLATE,
        data={"source": args.data_dir or task.hub_id, "train_size": len(pairs),
              "validation_size": len(examples), "few_shot": None},
    ))

    start = time.perf_counter()
    records = train_lm(model, loader, args, device, folder.log)
    train_seconds = time.perf_counter() - start
    model.eval()
    outputs = generate_examples(model, tokenizer, task, examples, num_beams=args.num_beams,
                                max_new_tokens=args.max_new_tokens)
    metrics = nlg_metrics(outputs, [list(e.references) for e in examples])
    final = {"main_metric": "bleu", "best_step": args.steps, **metrics, "train_seconds": train_seconds}
    folder.log({"step": args.steps, "eval": metrics})

    folder.write_generations(examples, outputs)
    folder.save_lm_adapter(model, args.backbone, args.task, base_fingerprint, PROMPT_TEMPLATE)
    folder.write_final(final)
    plot_curve(records, folder.out / CURVE_FILE, None, title=f"{args.method} {args.task}")
    return final
