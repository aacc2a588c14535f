"""Scores of generated text against references: the scoring tokenizer (``score_tokens``), corpus and sentence BLEU-4,
ROUGE-1/2/L and the longest common subsequence behind ROUGE-L.

Its own module, with no torch, because these are pure functions of strings that the evaluator, the benchmarks and
the tests share, and none of them should load a model (or the evaluator) for them.

Tokens are one per CJK character, otherwise lower-cased words and single punctuation marks, so Chinese text is not
scored as one "word" per sentence.
"""
from __future__ import annotations

from typing import Sequence

import regex
from rouge import Rouge

_CJK = r"\p{Han}\p{Hiragana}\p{Katakana}"
_SCORE_TOKEN = regex.compile(rf"[{_CJK}]|[^\W{_CJK}]+|[^\w\s]")
ROUGE_METRICS = ("rouge-1", "rouge-2", "rouge-l")


class MetricInputError(ValueError):
    """Predictions and references that cannot be scored together (counts differ, none given, wrong nesting)."""


def score_tokens(text: str) -> list[str]:
    """Tokens for BLEU and ROUGE: one per CJK character, else lower-cased words and single punctuation marks."""
    return _SCORE_TOKEN.findall(text.lower())


def _check_pairs(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise MetricInputError(f"got {len(predictions)} predictions but {len(references)} references: "
                               "pass one reference entry per prediction")
    if not predictions:
        raise MetricInputError("no predictions to score: pass at least one prediction/reference pair")


# ----------------------------------------------------------------------------- BLEU

def _bleu_inputs(predictions: Sequence[str],
                 references: Sequence[Sequence[str]]) -> tuple[list[list[list[str]]], list[list[str]]]:
    _check_pairs(predictions, references)
    if any(isinstance(refs, str) for refs in references):
        raise MetricInputError("BLEU references must be a list of reference lists, one list per prediction, "
                               "e.g. [[ref_a], [ref_b1, ref_b2]]")
    return [[score_tokens(ref) for ref in refs] for refs in references], [score_tokens(pred) for pred in predictions]


def compute_bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 (nltk, uniform weights, smoothing method1: 0.1 added to zero n-gram matches)."""
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu  # lazy: nltk takes seconds to import

    refs, hyps = _bleu_inputs(predictions, references)
    return float(corpus_bleu(refs, hyps, smoothing_function=SmoothingFunction().method1))


def mean_sentence_bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean of per-sample BLEU-4 (nltk sentence_bleu, smoothing method1)."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu  # lazy: nltk takes seconds to import

    refs, hyps = _bleu_inputs(predictions, references)
    smoothing = SmoothingFunction().method1
    return sum(float(sentence_bleu(r, h, smoothing_function=smoothing)) for r, h in zip(refs, hyps)) / len(hyps)


# ----------------------------------------------------------------------------- ROUGE

def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Longest common subsequence length, O(len(a) * len(b)) time and O(len(b)) memory."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def _precision_recall_f1(overlap: int, n_pred: int, n_ref: int) -> dict[str, float]:
    precision, recall = overlap / n_pred, overlap / n_ref
    f1 = 2 * precision * recall / (precision + recall) if overlap else 0.0
    return {"p": precision, "r": recall, "f": f1}


def _as_rouge_text(tokens: list[str]) -> str:
    """Tokens joined for the `rouge` package, which splits sentences on "." (so a "." token is renamed; tokens never
    contain "<" with letters)."""
    return " ".join("<period>" if t == "." else t for t in tokens)


def _rouge_pair(prediction: list[str], reference: list[str]) -> dict[str, dict[str, float]]:
    """ROUGE-1/2 from the `rouge` package with n-gram multiplicity, ROUGE-L from the token LCS."""
    if not prediction or not reference:  # the package raises on empty text; nothing overlaps, so 0
        return {metric: {"p": 0.0, "r": 0.0, "f": 0.0} for metric in ROUGE_METRICS}
    # exclusive=False counts repeated n-grams with clipping (as ROUGE-1.5.5 does; the default counts a set).
    # The package's ROUGE-L is the summary-level union LCS with a recursive backtrack that overflows the stack on
    # long texts; for our single-"sentence" token sequences that equals plain LCS, computed here iteratively.
    scorer = Rouge(metrics=["rouge-1", "rouge-2"], exclusive=False)
    scores = scorer.get_scores(_as_rouge_text(prediction), _as_rouge_text(reference))[0]
    scores["rouge-l"] = _precision_recall_f1(lcs_length(prediction, reference), len(prediction), len(reference))
    return scores


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, dict[str, float]]:
    """Mean ROUGE-1/2/L precision ("p"), recall ("r") and F1 ("f") over prediction/reference pairs."""
    _check_pairs(predictions, references)
    pairs = [_rouge_pair(score_tokens(p), score_tokens(r)) for p, r in zip(predictions, references)]
    return {m: {s: sum(pair[m][s] for pair in pairs) / len(pairs) for s in ("p", "r", "f")} for m in ROUGE_METRICS}
