"""Data-to-text clients (E2E, WebNLG, DART): AdaMix on a frozen causal LM, trained with the data-to-text
recipe's objective (``adamix_zoo.generation.objective``: cross-entropy on the target tokens plus the
token-masked consistency term) in the shared loop. The LM head is the backbone's own, so only the
experts train and travel; a published entry has no head and records its prompt template.

Clients hold IID partitions of the training (source, reference) pairs; their evaluation is the
target-token loss on one pair per validation source of their partition (cheap: no generation). The
server's final evaluation generates for ``eval-limit`` distinct validation sources and scores them
against all their references (BLEU, ROUGE-L, NIST), as the recipe does.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from adamix_zoo.generation.data import IGNORE, collate_lm, encode_pair, grouped_examples, load_split, training_pairs
from adamix_zoo.generation.generate import generate_examples
from adamix_zoo.generation.metrics import nlg_metrics
from adamix_zoo.generation.nlg_tasks import PROMPT_TEMPLATE, get_nlg_task
from adamix_zoo.generation.objective import lm_loss_fn
from adamix_zoo.loop import LossFn
from adamix_zoo.model import AdaMixModel
from adamix_zoo.runtime import select_device
from federation.config import FederationConfig
from federation.task import Batch, GlobalEvaluation, TaskFamily, TaskInfo, pretrained_backbone, tokenizer_for

if TYPE_CHECKING:
    import datasets


class GenerationFamily(TaskFamily):
    name = "generation"
    weight_decay = 0.0  # the data-to-text recipe's AdamW

    def build_model(self, cfg: FederationConfig, task: str, head_seed: int | None = None) -> AdaMixModel:
        lm = copy.deepcopy(pretrained_backbone(cfg.backbone, causal_lm=True))
        torch.manual_seed(cfg.seed)
        return AdaMixModel(lm, cfg.adamix_config(), head_modules=[]).to(select_device())

    def adamix_model(self, model: AdaMixModel) -> AdaMixModel:
        return model

    # -- data -------------------------------------------------------------------------------------
    def load_rows(self, cfg: FederationConfig, task: str, split: str) -> "datasets.Dataset":
        """(source, target) pairs, shuffled by the run's seed so that partitions are IID: training,
        the first ``train-limit`` pairs (as the recipe); validation, one pair (its first reference)
        per source of the first ``eval-limit`` distinct sources."""
        from datasets import Dataset

        nlg = get_nlg_task(task)
        rows = load_split(nlg, split, self.data_source(cfg))
        if split == "train":
            pairs = training_pairs(nlg, rows, limit=cfg.train_limit or None)
        else:
            pairs = [(e.source, e.references[0]) for e in grouped_examples(nlg, rows, cfg.eval_limit or None)]
        sources, targets = [s for s, _ in pairs], [t for _, t in pairs]
        return Dataset.from_dict({"source": sources, "target": targets}).shuffle(seed=cfg.seed)

    def encode(self, cfg: FederationConfig, task: str, rows: "datasets.Dataset") -> list[dict[str, Any]]:
        """Prompt + target token ids, labels IGNORE on the prompt (``encode_pair``)."""
        tokenizer, nlg = tokenizer_for(cfg.backbone), get_nlg_task(task)
        return [encode_pair(tokenizer, nlg, r["source"], r["target"], cfg.max_length) for r in rows]

    def collate(self, cfg: FederationConfig, task: str, examples: list[dict[str, Any]]) -> Batch:
        batch = collate_lm(examples, tokenizer_for(cfg.backbone).pad_token_id)
        return {k: v.to(select_device()) for k, v in batch.items()}

    # -- training and evaluation -------------------------------------------------------------------
    def loss_fn(self, model: AdaMixModel, cfg: FederationConfig, task: str, examples: list[dict[str, Any]]) -> LossFn:
        return lm_loss_fn(model.config)

    @torch.no_grad()
    def evaluate(
        self, cfg: FederationConfig, task: str, model: AdaMixModel, examples: list[dict[str, Any]]
    ) -> dict[str, float]:
        """``eval-loss``: the mean cross-entropy per target token (merged routing)."""
        if not examples:
            raise ValueError(f"{task}: nothing to evaluate on")
        model.eval()
        total, tokens = 0.0, 0
        size = max(cfg.batch_size, 32)
        for start in range(0, len(examples), size):
            batch = self.collate(cfg, task, examples[start : start + size])
            count = int((batch["labels"][:, 1:] != IGNORE).sum())  # targets the loss averages over
            total += model(**batch).loss.item() * count
            tokens += count
        return {"eval-loss": total / max(tokens, 1), "eval-tokens": float(tokens)}

    def evaluate_global(self, cfg: FederationConfig, model: nn.Module, task: str) -> GlobalEvaluation:
        """Greedy outputs for ``eval-limit`` distinct validation sources, scored against all their
        references with the recipe's metrics."""
        nlg = get_nlg_task(task)
        rows = load_split(nlg, "validation", self.data_source(cfg))
        examples = grouped_examples(nlg, rows, cfg.eval_limit or None)
        model.eval()
        outputs = generate_examples(model, tokenizer_for(cfg.backbone), nlg, examples,
                                    max_new_tokens=cfg.max_new_tokens)
        scores = nlg_metrics(outputs, [list(e.references) for e in examples])
        return GlobalEvaluation({"main_metric": "bleu", **scores, "eval_sources": len(examples)},
                                examples, outputs)

    # -- output -----------------------------------------------------------------------------------
    def describe(self, cfg: FederationConfig, task: str | None) -> TaskInfo:
        return TaskInfo("lm", [], PROMPT_TEMPLATE)

    def data_source(self, cfg: FederationConfig) -> Path:
        return cfg.data_root()

    def task_model(
        self, cfg: FederationConfig, task: str, experts: dict[str, torch.Tensor], out: Path
    ) -> AdaMixModel:
        """Every task shares the whole model (no heads): the global experts on the LM."""
        model = self.build_model(cfg, task)
        model.load_adapter_state_dict(experts)
        return model


GENERATION = GenerationFamily()
