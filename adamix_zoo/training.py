"""The GLUE training recipe: full fine-tuning, LoRA, adapters and their AdaMix mixtures in one loop.

Setup -> train -> save, spelled out: ``prepare`` builds the task model and loaders, ``fit`` runs the
plain loop (AdamW, warmup + linear decay, gradient clipping, the AdaMix consistency loss, evaluation
every N steps keeping the best checkpoint) and writes the output folder. ``train_steps`` is the
reusable inner loop (federated clients call it on their own model and loader).

Data-parallel: under ``torchrun`` / ``accelerate launch`` (WORLD_SIZE > 1) each rank reads its shard
through a ``DistributedSampler`` and gradients are averaged by an explicit all-reduce. AdaMix routing
must pick the same experts on every rank in a step, so every rank seeds its router identically and
draws the same number of times; only experts used in the step have gradients on any rank.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from adamix_zoo.config import SHARING, AdaMixConfig
from adamix_zoo.consistency import consistency_loss, two_routed_passes
from adamix_zoo.data import Loaders, make_loaders
from adamix_zoo.heads import POOLINGS, ClassificationHead, TaskModel, save_head
from adamix_zoo.io import (
    ANALYSIS_FILE,
    CURVE_FILE,
    EXPERTS_FILE,
    FINAL_METRICS_FILE,
    FULL_MODEL_FILE,
    HEAD_FILE,
    MERGED_DIR,
    METRICS_FILE,
    RUN_CONFIG_FILE,
    SPREAD_FILE,
    save_experts,
    save_merged,
)
from adamix_zoo.model import AdaMixModel
from adamix_zoo.tasks import TaskSpec, get_task

METHODS = ("full", "lora", "adapter", "adamix-lora", "adamix-adapter")
PRECISIONS = ("auto", "bf16", "fp32")
# Learning rates that work for all-MiniLM-L6-v2 on GLUE with a few hundred steps (see the
# fidelity benchmark): adapters and LoRA need ~1e-3, full fine-tuning ~5e-5.
DEFAULT_LR = {"full": 5e-5, "lora": 1e-3, "adapter": 1e-3, "adamix-lora": 1e-3, "adamix-adapter": 1e-3}


def _help(text: str, default: Any = None, **kw: Any) -> Any:
    return field(default=default, metadata={"help": text}, **kw)


@dataclass
class TrainArgs:
    """Everything one training run needs; validated on construction."""

    task: str = _help("GLUE task (sst2, rte, mrpc, stsb, qnli, wnli, cola, mnli, qqp) or data-to-text (e2e, webnlg, dart).", "sst2")
    method: str = _help("full, lora, adapter, adamix-lora or adamix-adapter.", "adamix-lora")
    backbone: str = _help("Backbone alias (minilm-l6), hub id or local folder.", "minilm-l6")
    data_dir: str | None = _help("Local folder of tasks in the hub schema; None reads nyu-mll/glue.")
    output_dir: str | None = _help("Output folder; None means runs/<task>-<method>-s<seed>.")
    seed: int = _help("Seed of initialisation, data order, dropout and routing.", 42)
    data_seed: int = _help("Seed of the train/validation subsets and few-shot sampling.", 0)
    max_steps: int = _help("Optimizer steps; 0 means epochs x steps per epoch.", 0)
    epochs: float = _help("Epochs when max_steps is 0.", 3.0)
    batch_size: int = _help("Examples per step (per rank when data-parallel).", 32)
    eval_batch_size: int = _help("Examples per evaluation batch.", 64)
    lr: float | None = _help("Peak learning rate; None picks the method's default.")
    head_lr: float | None = _help("Peak learning rate of the task head; None uses lr.")
    weight_decay: float = _help("AdamW weight decay (not on biases and norms).", 0.01)
    warmup_ratio: float = _help("Fraction of the steps with a linear warmup.", 0.06)
    max_grad_norm: float = _help("Gradient clipping norm; 0 disables clipping.", 1.0)
    max_length: int = _help("Tokens per example after truncation.", 128)
    train_subset: int = _help("Use a fixed random subset of this many train rows; 0 = all.", 0)
    validation_subset: int = _help("Use a fixed random subset of the validation split; 0 = all.", 0)
    few_shot: int = _help("Few-shot: k train examples per class (k in total for regression).", 0)
    eval_every: int = _help("Evaluate every N steps; 0 = once per epoch (and always at the end).", 0)
    num_experts: int = _help("Experts K for adamix-* methods (lora/adapter use 1).", 4)
    rank: int = _help("LoRA rank r.", 8)
    alpha: float = _help("LoRA alpha (scale = alpha / r).", 16.0)
    bottleneck: int = _help("Adapter bottleneck size.", 16)
    sharing: str = _help("Projection shared by the experts: up, down or none.", "up")
    consistency_weight: float | None = _help(
        "Weight of the consistency loss (adamix-* methods); None: the per-problem default.")
    routing: str = _help("Training routing of adamix-* methods: row or batch.", "row")
    expert_init: str = _help("Experts start identical (one draw copied) or independent.", "identical")
    adapter_init: str = _help("Adapter weights: normal (N(0, 0.02) down and up) or zero-up.", "normal")
    task_loss_passes: str = _help("Task loss on both consistency passes or the first only.", "both")
    precision: str = _help("auto (bf16 autocast on CUDA and on CPUs with AMX / AVX-512 bf16), bf16 or fp32.", "auto")
    pooling: str = _help("Head pooling: mean (default; what MiniLM expects) or cls.", "mean")
    head_dropout: float = _help("Dropout before the head's linear layer.", 0.1)
    device: str = _help("auto (cuda when present), cpu, cuda or cuda:N.", "auto")
    analyze_experts: bool = _help("After training, evaluate single adapters vs the merged one.", False)
    analysis_samples: int = _help("Random single adapters drawn for the analysis.", 8)
    progress: bool = _help("Show a progress bar.", True)
    save: bool = _help("Write the output folder.", True)

    def __post_init__(self) -> None:
        get_task(self.task)
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not supported; choose one of {', '.join(METHODS)}")
        if self.sharing not in SHARING:
            raise ValueError(f"sharing={self.sharing!r}; choose one of {', '.join(SHARING)}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r}; choose one of {', '.join(POOLINGS)}")
        for name in ("batch_size", "eval_batch_size", "max_length", "num_experts", "rank", "bottleneck"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "train_subset", "validation_subset", "few_shot", "eval_every",
                     "analysis_samples", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.max_steps == 0 and not self.epochs > 0:
            raise ValueError("set max_steps > 0 or epochs > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        for name in ("lr", "head_lr"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        adamix_config(self)  # the mixture fields are validated by AdaMixConfig

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    @property
    def out(self) -> Path:
        return Path(self.output_dir or f"runs/{self.task}-{self.method}-s{self.seed}")


# -- model -----------------------------------------------------------------------------------------
def adamix_config(args: TrainArgs) -> AdaMixConfig | None:
    """The AdaMix config of a method: K=1 and no consistency loss for the lora/adapter baselines."""
    if args.method == "full":
        return None
    mixture = args.method.startswith("adamix-")
    return AdaMixConfig(
        kind=args.method.removeprefix("adamix-"),
        num_experts=args.num_experts if mixture else 1,
        rank=args.rank,
        alpha=args.alpha,
        bottleneck=args.bottleneck,
        sharing=args.sharing,
        consistency_weight=args.consistency_weight if mixture else 0.0,
        routing=args.routing,
        expert_init=args.expert_init,
        adapter_init=args.adapter_init,
        task_loss_passes=args.task_loss_passes,
        seed=args.seed,  # identical on every rank: routing must agree across data-parallel ranks
    )


def build_task_model(
    backbone: nn.Module | str,
    task: TaskSpec,
    adamix: AdaMixConfig | None = None,
    pooling: str = "mean",
    head_dropout: float = 0.1,
) -> TaskModel:
    """A bare backbone (``AutoModel``), AdaMix injected when ``adamix`` is given, plus a task head.

    Args:
        backbone: a loaded bare transformers model, or a local folder / hub id to load one from.
        task: the task; sets the head's width (num_labels, 1 for regression).
        adamix: the mixture config; None leaves the backbone fully trainable (full fine-tuning).
    """
    if isinstance(backbone, str):
        from transformers import AutoModel

        backbone = AutoModel.from_pretrained(backbone)
    hidden = backbone.config.hidden_size
    if adamix is not None:
        backbone = AdaMixModel(backbone, adamix, head_modules=[])
    head = ClassificationHead(hidden, task.num_labels, pooling=pooling, dropout=head_dropout)
    return TaskModel(backbone, head)


def bare_backbone(model: TaskModel) -> nn.Module:
    """The transformers backbone inside a TaskModel, with or without its AdaMix wrapper."""
    return model.backbone.model if isinstance(model.backbone, AdaMixModel) else model.backbone


def model_adamix_config(model: nn.Module) -> AdaMixConfig | None:
    """The AdaMix config of a TaskModel's backbone, or None without AdaMix."""
    backbone = getattr(model, "backbone", None)
    return backbone.config if isinstance(backbone, AdaMixModel) else None


def model_consistency_weight(model: nn.Module, problem: str) -> float:
    """The consistency weight configured on a TaskModel's AdaMix backbone (0 without AdaMix)."""
    config = model_adamix_config(model)
    return config.consistency_weight_for(problem) if config is not None else 0.0


# -- environment -----------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' is bf16 where bfloat16 matmuls are fast: CUDA with bf16 support, CPUs with AMX or
    AVX-512 bf16 (there a bf16 MiniLM step is about 2.4x faster than fp32); fp32 elsewhere."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "fp32"


def cpu_has_fast_bf16() -> bool:
    capability = torch.backends.cpu.get_cpu_capability()  # e.g. "AVX512", "AVX2"
    if capability != "AVX512":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in (" amx_bf16", " avx512_bf16"))


def autocast(device: torch.device, precision: str):
    """bfloat16 autocast for ``precision="bf16"``; a no-op context for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def select_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    if device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def setup_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world_size); joins the process group that torchrun / accelerate describe in the env."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sync_gradients(model: nn.Module) -> None:
    """Average gradients over data-parallel ranks (no-op in a single process).

    Parameters without a gradient (experts not routed to in this step) are skipped; routing is
    identical on every rank, so the skipped set is the same everywhere.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for param in model.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad /= world


# -- optimisation ----------------------------------------------------------------------------------
def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float = 0.01, head_lr: float | None = None
) -> torch.optim.AdamW:
    """AdamW on the trainable parameters; no weight decay on biases and normalisation weights.

    Args:
        head_lr: learning rate of the task head (``head.*``); None uses ``lr``. A freshly drawn
            head on a frozen encoder often wants a higher rate than the adapters or the backbone.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            no_decay = name.endswith("bias") or "norm" in name.lower()
            groups.setdefault((name.startswith("head."), no_decay), []).append(param)
    return torch.optim.AdamW(
        [{"params": params, "weight_decay": 0.0 if no_decay else weight_decay,
          "lr": head_lr if is_head and head_lr is not None else lr}
         for (is_head, no_decay), params in groups.items()],
        lr=lr,
    )


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    """Linear warmup to the peak learning rate, then linear decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def task_loss(logits: torch.Tensor, labels: torch.Tensor, problem: str) -> torch.Tensor:
    """Cross-entropy for classification, mean squared error for regression. logits: (batch, labels)."""
    if problem == "regression":
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


def _forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return model(**inputs)


def compute_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    task: TaskSpec,
    consistency_weight: float,
    task_loss_passes: str = "both",
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of one batch: task loss, plus AdaMix's consistency term when weighted.

    With consistency, two passes route independently (and draw independent dropout), run as one
    doubled batch; the task loss is the mean over both passes (as in R-Drop) or, with
    ``task_loss_passes="first"``, the first pass's, and ``w * consistency(pass1, pass2)`` is added.
    """
    if consistency_weight <= 0:
        loss = task_loss(_forward(model, batch), batch["labels"], task.problem)
        return loss, {"task_loss": loss.item(), "consistency": 0.0}
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits, logits2 = two_routed_passes(model, lambda b: model(**b), inputs)
    loss = task_loss(logits, batch["labels"], task.problem)
    if task_loss_passes == "both":
        loss = 0.5 * (loss + task_loss(logits2, batch["labels"], task.problem))
    squeeze = task.problem == "regression"
    reg = consistency_loss(
        logits.squeeze(-1) if squeeze else logits, logits2.squeeze(-1) if squeeze else logits2, task.problem
    )
    return loss + consistency_weight * reg, {"task_loss": loss.item(), "consistency": reg.item()}


def cycle_batches(loader: Iterable) -> Iterator:
    """Endless batches over epochs, reshuffling each epoch (DistributedSampler included)."""
    epoch = 0
    while True:
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def train_steps(
    model: nn.Module,
    loader: Iterable | Iterator,
    task: TaskSpec,
    num_steps: int,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    consistency_weight: float | None = None,
    max_grad_norm: float = 1.0,
    device: torch.device | str | None = None,
    progress: Any = None,
    precision: str = "fp32",
) -> dict[str, float]:
    """Run ``num_steps`` optimizer steps on ``model`` (in place) and return the mean losses.

    Args:
        loader: a DataLoader (cycled over epochs when it runs out) or an iterator of batches
            (continued where the previous call stopped, as ``fit`` does between evaluations).
        consistency_weight: None takes the weight of the model's AdaMix config for the task's
            problem (0 without AdaMix).
        precision: "bf16" runs forward and backward under bfloat16 autocast (weights stay fp32).
        device: where batches go; None uses the device of the model's parameters.
        progress: an optional tqdm bar, advanced once per step with the current loss.

    Returns:
        {"loss", "task_loss", "consistency"} averaged over the steps, "steps" and "examples"
        (examples seen by this process).
    """
    if consistency_weight is None:
        consistency_weight = model_consistency_weight(model, task.problem)
    config = model_adamix_config(model)
    passes = config.task_loss_passes if config is not None else "both"
    device = torch.device(device) if device is not None else next(model.parameters()).device
    batches = loader if isinstance(loader, Iterator) else cycle_batches(loader)
    trainable = [p for p in model.parameters() if p.requires_grad]
    totals = {"loss": 0.0, "task_loss": 0.0, "consistency": 0.0}
    examples = 0
    model.train()
    for _ in range(num_steps):
        batch = {k: v.to(device) for k, v in next(batches).items()}
        with autocast(device, precision):
            loss, parts = compute_loss(model, batch, task, consistency_weight, passes)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sync_gradients(model)
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        totals["loss"] += loss.item()
        totals["task_loss"] += parts["task_loss"]
        totals["consistency"] += parts["consistency"]
        examples += len(batch["labels"])
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    steps = max(num_steps, 1)
    return {k: v / steps for k, v in totals.items()} | {"steps": num_steps, "examples": examples}


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of every trainable tensor (the best-checkpoint snapshot)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, tensor in state.items():
        params[name].copy_(tensor)


# -- the recipe ------------------------------------------------------------------------------------
@dataclass
class RunSetup:
    """What ``prepare`` builds: the model on its device, the loaders and the run's facts."""

    args: TrainArgs
    task: TaskSpec
    model: TaskModel
    loaders: Loaders
    tokenizer: Any
    device: torch.device
    backbone_path: str
    backbone_fingerprint: str
    rank: int = 0
    world_size: int = 1


@dataclass
class TrainResult:
    """The outcome of ``fit``: best checkpoint's metrics, the eval history and the trained model."""

    output_dir: Path | None
    main_metric: str
    best_step: int
    best_metrics: dict[str, float]
    history: list[dict[str, Any]]
    model: TaskModel
    analysis: dict[str, Any] | None = None

    @property
    def best(self) -> float:
        return self.best_metrics[self.main_metric]


def prepare(args: TrainArgs) -> RunSetup:
    """Seed, pick the device, join the process group, load and check the data, build the model.

    Raises:
        ValueError / FileNotFoundError: bad task, data or backbone, before any training starts.
    """
    from transformers import AutoModel, AutoTokenizer

    from adamix_zoo.backbones import fingerprint, resolve_backbone

    task = get_task(args.task)
    device = select_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
    rank, world_size = setup_distributed(device)
    path = resolve_backbone(args.backbone)
    tokenizer = AutoTokenizer.from_pretrained(path)
    loaders = make_loaders(
        task, tokenizer, args.data_dir, batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size, max_length=args.max_length,
        train_subset=args.train_subset, validation_subset=args.validation_subset,
        few_shot_k=args.few_shot, data_seed=args.data_seed, seed=args.seed,
        world_size=world_size, rank=rank,
    )
    seed_everything(args.seed)  # same head init and routing seed on every rank
    backbone = AutoModel.from_pretrained(path)
    digest = fingerprint(backbone)  # of the pre-trained weights, before injection
    model = build_task_model(backbone, task, adamix_config(args), args.pooling, args.head_dropout)
    seed_everything(args.seed + rank)  # dropout and shuffling may differ per rank
    return RunSetup(args, task, model.to(device), loaders, tokenizer, device, path, digest, rank, world_size)


def _schedule(args: TrainArgs, steps_per_epoch: int) -> tuple[int, int, int]:
    """(total steps, warmup steps, eval interval)."""
    total = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
    warmup = int(args.warmup_ratio * total)
    interval = args.eval_every or min(total, max(1, steps_per_epoch))
    return total, warmup, interval


def fit(setup: RunSetup) -> TrainResult:
    """Train with periodic evaluation, restore the best checkpoint, write the output folder."""
    from tqdm.auto import tqdm

    from adamix_zoo.evaluation import evaluate

    args, task, model = setup.args, setup.task, setup.model
    total, warmup, interval = _schedule(args, len(setup.loaders.train))
    optimizer = make_optimizer(model, args.learning_rate, args.weight_decay, args.head_lr)
    scheduler = make_scheduler(optimizer, total, warmup)
    precision = resolve_precision(args.precision, setup.device)
    writer = RunWriter(setup) if args.save and setup.rank == 0 else None
    batches = cycle_batches(setup.loaders.train)
    bar = tqdm(total=total, desc=f"{task.name} {args.method}", disable=not args.progress or setup.rank != 0)
    history: list[dict[str, Any]] = []
    best: tuple[float, int, dict[str, float], dict[str, torch.Tensor]] | None = None
    step = 0
    while step < total:
        n = min(interval, total - step)
        stats = train_steps(model, batches, task, n, optimizer, scheduler, max_grad_norm=args.max_grad_norm,
                            device=setup.device, progress=bar, precision=precision)
        step += n
        metrics = evaluate(model, setup.loaders.validation, task, setup.device, precision)
        record = {"step": step, "loss": stats["loss"], "lr": scheduler.get_last_lr()[0], "metrics": metrics}
        history.append(record)
        # The description keeps the last dev metric; train_steps keeps the loss in the postfix.
        bar.set_description(f"{task.name} {args.method} dev {task.main_metric}={metrics[task.main_metric]:.4f}")
        if writer:
            writer.log(record)
        if best is None or metrics[task.main_metric] > best[0]:
            best = (metrics[task.main_metric], step, metrics, trainable_state(model))
    bar.close()
    _, best_step, best_metrics, state = best
    load_trainable_state(model, state)
    result = TrainResult(writer.out if writer else None, task.main_metric, best_step, best_metrics, history, model)
    if args.analyze_experts and setup.rank == 0:
        result.analysis = _analyze(setup, writer)
    if writer:
        writer.finish(result)
    if setup.world_size > 1:
        dist.barrier()
    return result


def _analyze(setup: RunSetup, writer: RunWriter | None) -> dict[str, Any] | None:
    from adamix_zoo.evaluation import analyze_experts

    backbone = setup.model.backbone
    if not isinstance(backbone, AdaMixModel) or backbone.config.num_experts < 2:
        print(f"--analyze-experts: method {setup.args.method} has no mixture to analyse; skipped")
        return None
    analysis = analyze_experts(setup.model, setup.loaders.validation, setup.task,
                               num_random=setup.args.analysis_samples, seed=setup.args.seed,
                               device=setup.device,
                               precision=resolve_precision(setup.args.precision, setup.device))
    if writer:
        writer.write_analysis(analysis)
    return analysis


def train(args: TrainArgs) -> TrainResult:
    """Run one training recipe end to end: ``fit(prepare(args))``."""
    setup = prepare(args)
    try:
        return fit(setup)
    finally:
        if setup.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


# -- the output folder -----------------------------------------------------------------------------
class RunWriter:
    """Writes the output folder (rank 0 only); file names are the contract others read."""

    def __init__(self, setup: RunSetup):
        self.setup = setup
        self.out = setup.args.out
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / METRICS_FILE).write_text("")
        self._write_json(RUN_CONFIG_FILE, run_config(setup))

    def _write_json(self, name: str, data: Any) -> None:
        (self.out / name).write_text(json.dumps(data, indent=2) + "\n")

    def log(self, record: dict[str, Any]) -> None:
        with open(self.out / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")

    def write_analysis(self, analysis: dict[str, Any]) -> None:
        from adamix_zoo.plots import plot_expert_spread

        self._write_json(ANALYSIS_FILE, analysis)
        plot_expert_spread(analysis, self.out / SPREAD_FILE, title=self.setup.args.method)

    def finish(self, result: TrainResult) -> None:
        from adamix_zoo.plots import plot_curve

        self._write_json(FINAL_METRICS_FILE, {"main_metric": result.main_metric,
                                              "best_step": result.best_step, **result.best_metrics})
        save_weights(self.setup, self.out)
        plot_curve(result.history, self.out / CURVE_FILE, result.main_metric,
                   title=f"{self.setup.task.name} · {self.setup.args.method}")


def run_config(setup: RunSetup) -> dict[str, Any]:
    args, task = setup.args, setup.task
    cfg = adamix_config(args)
    return {
        "task": task.name,
        "method": args.method,
        "backbone": args.backbone,
        "backbone_path": setup.backbone_path,
        "backbone_fingerprint": setup.backbone_fingerprint,
        "problem": task.problem,
        "label_names": list(task.label_names),
        "adamix": cfg.to_dict() if cfg else None,
        "train": dataclasses.asdict(args) | {"learning_rate": args.learning_rate},
        "seed": args.seed,
        "data": dataclasses.asdict(setup.loaders.info),
        "world_size": setup.world_size,
    }


def save_weights(setup: RunSetup, out: Path) -> None:
    """Experts + head + merged adapter for AdaMix methods; the whole model for ``full``."""
    from safetensors.torch import save_file

    model = setup.model
    save_head(model.head, out / HEAD_FILE)
    if not isinstance(model.backbone, AdaMixModel):
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(out / FULL_MODEL_FILE), metadata={"format": "pt"})
        return
    save_experts(model.backbone, out / EXPERTS_FILE)
    save_merged(model.backbone, out / MERGED_DIR, base_model=setup.args.backbone)
    save_head(model.head, out / MERGED_DIR / HEAD_FILE)
