"""Data-to-text metrics against every reference of each input, through maintained packages.

BLEU: sacrebleu (corpus BLEU, multi-reference, its default 13a tokenisation). ROUGE-L: Google's
rouge-score (F-measure, best reference per hypothesis, averaged). NIST: NLTK's corpus_nist.
METEOR (needs WordNet data downloaded at run time) and CIDEr (no maintained pure-Python package
installs here) are not computed.
"""

from __future__ import annotations

import sacrebleu
from nltk.translate.nist_score import corpus_nist
from rouge_score import rouge_scorer


def _check(hypotheses: list[str], references: list[list[str]]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if any(not refs for refs in references):
        raise ValueError("every hypothesis needs at least one reference")


def bleu(hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU (0-100); references[i] holds all references of hypothesis i."""
    _check(hypotheses, references)
    depth = max(len(r) for r in references)
    # sacrebleu wants one stream per reference position; missing ones are None.
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(depth)]
    return sacrebleu.corpus_bleu(hypotheses, streams).score


def rouge_l(hypotheses: list[str], references: list[list[str]]) -> float:
    """Mean over hypotheses of the best ROUGE-L F1 against their references (0-100)."""
    _check(hypotheses, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    best = [max(scorer.score(r, h)["rougeL"].fmeasure for r in refs) for h, refs in zip(hypotheses, references)]
    return 100.0 * sum(best) / len(best)


def nist(hypotheses: list[str], references: list[list[str]], n: int = 5) -> float:
    """Corpus NIST (n-grams up to 5, as the E2E challenge), on whitespace tokens."""
    _check(hypotheses, references)
    hyps = [h.split() for h in hypotheses]
    refs = [[r.split() for r in rs] for rs in references]
    # NLTK divides by the count of hypothesis n-grams of each order: orders longer than every
    # hypothesis have none and contribute nothing, so leave them out rather than crash.
    n = min(n, max(len(h) for h in hyps))
    return float(corpus_nist(refs, hyps, n=n)) if n > 0 else 0.0


def nlg_metrics(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    return {
        "bleu": bleu(hypotheses, references),
        "rouge_l": rouge_l(hypotheses, references),
        "nist": nist(hypotheses, references),
    }
