"""GLUE task specifications: input columns, problem type, labels and metrics, in the hub schema.

Column names and label ids follow the Hugging Face Hub dataset ``nyu-mll/glue``, so a local folder
normalised to that schema and the hub version read the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

PROBLEMS = ("classification", "regression")


@dataclass(frozen=True)
class TaskSpec:
    """One GLUE task.

    Attributes:
        name: the hub config name (``nyu-mll/glue``, name).
        text_columns: one column (single sentence) or two (a sentence pair), in model order.
        problem: 'classification' or 'regression'.
        label_names: class names by label id; empty for regression.
        metrics: every metric reported for the task (names of ``adamix_zoo.metrics.METRICS``).
        main_metric: the one that picks the best checkpoint (higher is better).
        validation_split: the dev split's name on the hub.
    """

    name: str
    text_columns: tuple[str, ...]
    problem: str
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]
    main_metric: str
    validation_split: str = "validation"

    def __post_init__(self) -> None:
        if self.problem not in PROBLEMS:
            raise ValueError(f"problem={self.problem!r}; choose one of {', '.join(PROBLEMS)}")
        if self.main_metric not in self.metrics:
            raise ValueError(f"main_metric {self.main_metric!r} is not among {self.metrics}")

    @property
    def num_labels(self) -> int:
        """Output width of the head: the number of classes, or 1 for regression."""
        return 1 if self.problem == "regression" else len(self.label_names)

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column a split must have."""
        return (*self.text_columns, "label")


_ENTAIL = ("entailment", "not_entailment")
_CLS = "classification"
TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec("sst2", ("sentence",), _CLS, ("negative", "positive"), ("accuracy",), "accuracy"),
    "cola": TaskSpec(
        "cola", ("sentence",), _CLS, ("unacceptable", "acceptable"), ("mcc", "accuracy"), "mcc"
    ),
    "rte": TaskSpec("rte", ("sentence1", "sentence2"), _CLS, _ENTAIL, ("accuracy",), "accuracy"),
    "mrpc": TaskSpec(
        "mrpc", ("sentence1", "sentence2"), _CLS, ("not_equivalent", "equivalent"),
        ("f1", "accuracy"), "f1",
    ),
    "qnli": TaskSpec("qnli", ("question", "sentence"), _CLS, _ENTAIL, ("accuracy",), "accuracy"),
    "wnli": TaskSpec(
        "wnli", ("sentence1", "sentence2"), _CLS, ("not_entailment", "entailment"),
        ("accuracy",), "accuracy",
    ),
    "qqp": TaskSpec(
        "qqp", ("question1", "question2"), _CLS, ("not_duplicate", "duplicate"),
        ("f1", "accuracy"), "f1",
    ),
    "mnli": TaskSpec(
        "mnli", ("premise", "hypothesis"), _CLS, ("entailment", "neutral", "contradiction"),
        ("accuracy",), "accuracy", validation_split="validation_matched",
    ),
    "stsb": TaskSpec(
        "stsb", ("sentence1", "sentence2"), "regression", (), ("pearson", "spearman"), "pearson"
    ),
}


def get_task(name: str) -> TaskSpec:
    """The spec of a GLUE task by its name (case-insensitive).

    Raises:
        ValueError: unknown task; the message lists the known ones.
    """
    key = name.lower().replace("-", "")
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(sorted(TASKS))}")
    return TASKS[key]
