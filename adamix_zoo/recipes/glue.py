"""The GLUE recipe: full fine-tuning, LoRA, adapters and their AdaMix mixtures, setup -> train -> save.

``prepare`` builds the task model and loaders, ``fit`` runs the step loop (``adamix_zoo.loop``:
AdamW, warmup + linear decay, gradient clipping, the AdaMix consistency loss) with an evaluation
every N steps keeping the best checkpoint, and writes the run folder (``adamix_zoo.formats``).
Data-parallel under ``torchrun`` / ``accelerate launch``: each rank reads its shard through a
``DistributedSampler``; ``adamix_zoo.runtime`` averages the gradients.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from adamix_zoo.config import ADAPTER_METHODS, AdaMixConfig, args_from_options, flat_options, method_config
from adamix_zoo.data import Loaders, make_loaders
from adamix_zoo.evaluation import analyze_experts, evaluate_model
from adamix_zoo.formats.files import ANALYSIS_FILE, CURVE_FILE, SPREAD_FILE
from adamix_zoo.formats.run_folder import RunFolder, run_config
from adamix_zoo.glue_tasks import TaskSpec, get_task
from adamix_zoo.head_init import check_head_init, feature_statistics, lda_head, set_head
from adamix_zoo.heads import POOLINGS, TaskModel
from adamix_zoo.loop import cycle_batches, load_trainable_state, train_steps, trainable_state
from adamix_zoo.model import AdaMixModel
from adamix_zoo.optim import EXPERT_LR_SCALE_HELP, make_optimizer, make_scheduler
from adamix_zoo.runtime import PRECISIONS, resolve_precision, seed_everything, select_device, setup_distributed
from adamix_zoo.task_model import build_task_model

METHODS = ("full", *ADAPTER_METHODS)
# The fidelity benchmark's protocol (docs/BENCHMARKS.md): learning rates from its grid, a budget of
# 600 steps of 16 for the single-adapter methods and the paper's 2x allowance for the mixtures, four
# dev evaluations per run keeping the best, and a fresh head at 1e-2.
DEFAULT_LR = {"full": 1e-4, "lora": 2e-3, "adapter": 4e-3, "adamix-lora": 2e-3, "adamix-adapter": 4e-3}
DEFAULT_STEPS = {"full": 600, "lora": 600, "adapter": 600, "adamix-lora": 1200, "adamix-adapter": 1200}
DEFAULT_HEAD_LR = 1e-2
EVALS_PER_RUN = 4


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
    max_steps: int = _help("Optimizer steps; 0: epochs x steps per epoch when epochs is set, else the "
                           "method's budget (600; 1200 for adamix-*, the paper's 2x allowance).", 0)
    epochs: float = _help("Epochs when max_steps is 0; 0 uses the method's step budget.", 0.0)
    batch_size: int = _help("Examples per step (per rank when data-parallel).", 16)
    eval_batch_size: int = _help("Examples per evaluation batch.", 64)
    lr: float | None = _help("Peak learning rate; None picks the method's default.")
    head_lr: float | None = _help("Peak learning rate of the freshly drawn task head; None uses lr.",
                                  DEFAULT_HEAD_LR)
    weight_decay: float = _help("AdamW weight decay (not on biases and norms).", 0.01)
    expert_lr_scale: float = _help(EXPERT_LR_SCALE_HELP, 1.0)
    warmup_ratio: float = _help("Fraction of the steps with a linear warmup.", 0.06)
    max_grad_norm: float = _help("Gradient clipping norm; 0 disables clipping.", 1.0)
    max_length: int = _help("Tokens per example after truncation.", 128)
    train_subset: int = _help("Use a fixed random subset of this many train rows; 0 = all.", 0)
    validation_subset: int = _help("Use a fixed random subset of the validation split; 0 = all.", 0)
    few_shot: int = _help("Few-shot: k train examples per class (k in total for regression).", 0)
    eval_every: int = _help("Evaluate every N steps, keeping the best; 0 = four times per run.", 0)
    adamix: AdaMixConfig = field(default_factory=AdaMixConfig, metadata={
        "help": "The mixture (rank 8, alpha 16, K=4 by default); the method sets its kind, and K=1 "
                "with no consistency loss for the lora / adapter baselines."})
    precision: str = _help("auto (bf16 autocast on CUDA and on CPUs with AMX / AVX-512 bf16), bf16 or fp32.", "auto")
    pooling: str = _help("Head pooling: mean (default; what MiniLM expects) or cls.", "mean")
    head_init: str = _help("The head before training: random, or lda (a linear discriminant of the frozen "
                           "backbone's features of the training rows; adamix_zoo.head_init).", "random")
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
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r}; choose one of {', '.join(POOLINGS)}")
        for name in ("batch_size", "eval_batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "epochs", "train_subset", "validation_subset", "few_shot", "eval_every",
                     "analysis_samples", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        for name in ("lr", "head_lr", "expert_lr_scale"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        check_head_init(self.head_init, get_task(self.task).num_labels)
        adamix_config(self)

    @classmethod
    def from_options(cls, **options: Any) -> "TrainArgs":
        """From flat options, the mixture's among them (``rank=4, routing="batch", ...``)."""
        return args_from_options(cls, AdaMixConfig(), options)

    def options(self) -> dict[str, Any]:
        """The flat options (``from_options`` inverts it); run_config.json's ``train`` block."""
        return flat_options(self)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    @property
    def out(self) -> Path:
        return Path(self.output_dir or f"runs/{self.task}-{self.method}-s{self.seed}")


def train_args(**options: Any) -> TrainArgs:
    """``TrainArgs`` from flat options (``rank=4, routing="batch", ...``): the CLI's and the benchmarks'."""
    return TrainArgs.from_options(**options)


def adamix_config(args: TrainArgs) -> AdaMixConfig | None:
    """The AdaMix config of a run: None for full fine-tuning, else the method's kind and K, seeded
    identically on every rank (routing must agree across data-parallel ranks)."""
    return None if args.method == "full" else method_config(args.method, args.adamix, args.seed)


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
    model = build_task_model(backbone, task, adamix_config(args), args.pooling, args.head_dropout).to(device)
    if args.head_init == "lda":
        init_lda_head(model, loaders.train, device, world_size)
    seed_everything(args.seed + rank)  # dropout and shuffling may differ per rank
    return RunSetup(args, task, model, loaders, tokenizer, device, path, digest, rank, world_size)


def init_lda_head(model: TaskModel, train: Iterable[dict[str, torch.Tensor]], device: torch.device,
                  world_size: int) -> None:
    """The head set to the LDA of the training rows' features (every rank's shard, summed)."""
    stats = feature_statistics(model, ({k: v.to(device) for k, v in b.items()} for b in train))
    if world_size > 1:
        for tensor in stats.tensors().values():
            moved = tensor.to(device)
            dist.all_reduce(moved)
            tensor.copy_(moved.cpu())
    set_head(model.head, *lda_head(stats))


def _schedule(args: TrainArgs, steps_per_epoch: int) -> tuple[int, int, int]:
    """(total steps, warmup steps, eval interval)."""
    if args.max_steps:
        total = args.max_steps
    elif args.epochs:
        total = max(1, math.ceil(args.epochs * steps_per_epoch))
    else:
        total = DEFAULT_STEPS[args.method]
    warmup = int(args.warmup_ratio * total)
    interval = args.eval_every or max(1, total // EVALS_PER_RUN)
    return total, warmup, interval


def fit(setup: RunSetup) -> TrainResult:
    """Train with periodic evaluation, restore the best checkpoint, write the output folder."""
    from tqdm.auto import tqdm

    args, task, model = setup.args, setup.task, setup.model
    total, warmup, interval = _schedule(args, len(setup.loaders.train))
    optimizer = make_optimizer(model, args.learning_rate, args.weight_decay, args.head_lr, args.expert_lr_scale)
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
        metrics = evaluate_model(model, setup.loaders.validation, task, setup.device, precision)
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
    """The run folder of ``fit`` (rank 0 only), with its curve and analysis plots."""

    def __init__(self, setup: RunSetup):
        self.setup = setup
        self.folder = RunFolder(setup.args.out)
        self.out = self.folder.out
        self.folder.start(glue_run_config(setup))

    def log(self, record: dict[str, Any]) -> None:
        self.folder.log(record)

    def write_analysis(self, analysis: dict[str, Any]) -> None:
        from adamix_zoo.plots import plot_expert_spread

        self.folder.write_json(ANALYSIS_FILE, analysis)
        plot_expert_spread(analysis, self.out / SPREAD_FILE, title=self.setup.args.method)

    def finish(self, result: TrainResult) -> None:
        from adamix_zoo.plots import plot_curve

        self.folder.write_final({"main_metric": result.main_metric, "best_step": result.best_step,
                                 **result.best_metrics})
        model = self.setup.model
        if isinstance(model.backbone, AdaMixModel):  # experts + merged adapter + head
            self.folder.save_adapter(model.backbone, self.setup.args.backbone, model.head)
        else:  # full fine-tuning: the whole model
            self.folder.save_full(model, model.head)
        plot_curve(result.history, self.out / CURVE_FILE, result.main_metric,
                   title=f"{self.setup.task.name} · {self.setup.args.method}")


def glue_run_config(setup: RunSetup) -> dict[str, Any]:
    args, task = setup.args, setup.task
    cfg = adamix_config(args)
    return run_config(
        task=task.name, method=args.method, backbone=args.backbone, backbone_path=setup.backbone_path,
        backbone_fingerprint=setup.backbone_fingerprint, problem=task.problem,
        label_names=list(task.label_names), adamix=cfg.to_dict() if cfg else None,
        train=args.options() | {"learning_rate": args.learning_rate}, seed=args.seed,
        data=dataclasses.asdict(setup.loaders.info), world_size=setup.world_size,
    )
