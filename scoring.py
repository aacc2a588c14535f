"""Scoring: the one scoring function per metric. Each is a plain function of (model, data[, tokenizer, params]) ->
figures, and every caller measures through it: the evaluator CLI, the trainers' held-out evaluations (pretraining's
``val_bpb``, each finetuning stage's ``val_*``) and the RL steps' held-out figures.

    loss / perplexity / bits per byte   text_loss (documents), stream_loss (a token stream), response_loss (SFT)
    exact match of greedy answers       answer_exact_match (greedy_answers, then exact_match_by_task)
    reward pairs                        reward_pairs: Bradley-Terry loss, pairwise accuracy (per task), mean margin
    classification                      classification: loss, accuracy, precision / recall, confusion matrix

Bits per byte has one rule: documents are laid out as the token cache lays them out (``<s> doc </s> <s> doc </s>``),
scored in sequential windows of the model's context with stride context - 1 (every token after the first predicted
once; the context runs across document boundaries, as in training), and the bytes are those of the predicted tokens
(``data_loader.token_byte_lengths``: ``</s>`` stands for the newline). A pretraining run's ``val_bpb`` is therefore
``python evaluator.py``'s ``bits_per_byte`` of the same checkpoint and file.

The arithmetic (NLL sums, perplexity, bits per byte, exact match, pairwise accuracy, confusion matrix) is metrics.py's;
this module decides what is scored and in which batches.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

import metrics
from data_loader import collate_batch, collate_pairs, sequential_batches, sequential_windows, token_byte_lengths
from decoding import SamplingParams, cut_at_eos, generate_responses, visible_text
from devices import autocast_context
from losses import bradley_terry_loss
from prompts import document_ids, final_answer, fit, max_prompt_len, record_prompt_ids, record_reference


class ScoringError(ValueError):
    """Nothing to score (an empty set, every label masked)."""


@dataclass(frozen=True)
class ScoreParams:
    """How a scoring pass runs, never what it measures: the figures do not depend on these (up to float rounding)."""

    batch_size: int = 8
    dtype: torch.dtype = torch.float32  # forward passes under autocast in this dtype; float32: exact, no autocast
    progress: bool = False  # a tqdm bar per pass


def _bar(iterable: Iterable | None, desc: str, total: int | None, params: ScoreParams) -> tqdm:
    return tqdm(iterable, desc=desc, total=total, disable=not params.progress, leave=False)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# ----------------------------------------------------------------------------- loss, perplexity, bits per byte

def _nll(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], params: ScoreParams, desc: str,
         total: int | None) -> tuple[float, int]:
    device = _device(model)
    with autocast_context(device, params.dtype):
        total_nll, n_tokens = metrics.sum_nll(model, _bar(batches, desc, total, params), device)
    if n_tokens == 0:
        raise ScoringError("no tokens to score: the test set is empty or every label is masked (-100)")
    return total_nll, n_tokens


def _loss_figures(total_nll: float, n_tokens: int) -> dict[str, float]:
    return {"loss": total_nll / n_tokens, "perplexity": metrics.perplexity(total_nll, n_tokens), "n_tokens": n_tokens}


def token_loss(model: torch.nn.Module, batches: Sequence[Mapping[str, torch.Tensor]],
               params: ScoreParams = ScoreParams()) -> dict[str, float]:
    """loss (mean NLL per predicted token, nats), perplexity and n_tokens over batches of input_ids / attention_mask
    / labels; token-weighted (never a mean of batch means)."""
    return _loss_figures(*_nll(model, batches, params, "nll", len(batches)))


def stream_batch_count(n_tokens: int, seq_len: int, batch_size: int) -> int:
    """How many batches ``data_loader.sequential_batches`` makes of a stream (full windows batched, a short one
    alone)."""
    windows = sequential_windows(n_tokens, seq_len)
    full = sum(end - start == seq_len for start, end in windows)
    return math.ceil(full / batch_size) + len(windows) - full


def stream_loss(model: torch.nn.Module, tokens: np.ndarray, byte_lengths: np.ndarray,
                params: ScoreParams = ScoreParams(), max_batches: int | None = None) -> dict[str, float]:
    """loss, perplexity, bits_per_byte, n_tokens and n_bytes of a token stream, in sequential windows of the model's
    context (the rule in this module's docstring); ``max_batches`` scores only the first ones."""
    seq_len = model.config.max_seq_len
    covered = {"bytes": 0}

    def batches() -> Iterator[dict]:
        for batch in sequential_batches(tokens, seq_len, params.batch_size, byte_lengths, max_batches):
            covered["bytes"] += batch["n_bytes"]  # the bytes of the tokens this batch predicts
            yield batch

    total = stream_batch_count(len(tokens), seq_len, params.batch_size)
    total_nll, n_tokens = _nll(model, batches(), params, "bits per byte", min(total, max_batches or total))
    return {**_loss_figures(total_nll, n_tokens), "bits_per_byte": metrics.bits_per_byte(total_nll, covered["bytes"]),
            "n_bytes": covered["bytes"]}


def text_stream(tokenizer, documents: Sequence[str]) -> np.ndarray:
    """Documents as the token cache lays them out, ``<s> doc </s> <s> doc </s> ...`` (in memory, not cached)."""
    num_workers = None if sum(map(len, documents)) > 1_000_000 else 1  # processes only pay off on large sets
    encoded = tokenizer.encode_many(documents, num_workers=num_workers)
    return np.fromiter(itertools.chain.from_iterable(document_ids(tokenizer, doc) for doc in encoded), dtype=np.int64)


def text_loss(model: torch.nn.Module, tokenizer, documents: Sequence[str],
              params: ScoreParams = ScoreParams()) -> dict[str, float]:
    """``stream_loss`` of documents, plus n_documents."""
    if not documents:
        raise ScoringError("no documents to score: the test set is empty")
    figures = stream_loss(model, text_stream(tokenizer, documents), token_byte_lengths(tokenizer), params)
    return {**figures, "n_documents": len(documents)}


def length_sorted_batches(dataset, pad_id: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of similar-length items, shortest first: little padding, and the same batches on every
    call (so an evaluation repeated during training sums in the same order)."""
    order = sorted(range(len(dataset)), key=lambda i: len(dataset[i]["input_ids"]))
    return [collate_batch([dataset[i] for i in order[k:k + batch_size]], pad_id)
            for k in range(0, len(order), batch_size)]


def response_loss(model: torch.nn.Module, dataset, pad_id: int,
                  params: ScoreParams = ScoreParams()) -> dict[str, float]:
    """loss, perplexity and n_tokens of the answer tokens of SFT samples (a ``data_loader.GPTSFTDataset``: prompt
    tokens are not scored)."""
    return token_loss(model, length_sorted_batches(dataset, pad_id, params.batch_size), params)


# ----------------------------------------------------------------------------- generated answers, exact match

def answer_prompts(tokenizer, records: Sequence[Mapping], template: str, context: int) -> list[list[int]]:
    """Held-out prompts as in training, leaving one token of the context to answer: a longer conversation loses its
    oldest turns, then its start (``<s>`` kept)."""
    return [record_prompt_ids(tokenizer, r, template, limit=max_prompt_len(context, 1)) for r in records]


def generated_answers(model: torch.nn.Module, tokenizer, prompts: Sequence[Sequence[int]], sampling: SamplingParams,
                      params: ScoreParams = ScoreParams(), generator: torch.Generator | None = None,
                      room: int = 1) -> list[str]:
    """The text each prompt's continuation through the decode engine (``params.batch_size`` slots), cut at ``</s>``,
    as the engine streams it (``decoding.visible_text``: a tool call and its result written out, the calculator run
    for a model trained with it). A prompt is cut (keeping ``<s>`` and its end) only to leave ``room`` new tokens;
    past that, each answer runs to ``sampling.max_new_tokens`` or its context's end."""
    limit = max_prompt_len(model.config.max_seq_len, room)
    encoded = [fit(list(p), limit) for p in prompts]
    with _bar(None, "generate", len(encoded), params) as bar, autocast_context(_device(model), params.dtype):
        outputs = generate_responses(model, encoded, sampling, params.batch_size, generator, lambda: bar.update(1),
                                     tokenizer=tokenizer)
    return [visible_text(tokenizer, cut_at_eos(ids, tokenizer.eos_token_id)) for ids in outputs]


def greedy_answers(model: torch.nn.Module, tokenizer, records: Sequence[Mapping], template: str, max_new_tokens: int,
                   params: ScoreParams = ScoreParams()) -> list[str]:
    """The greedy answer to each record's prompt (``answer_prompts``), at most ``max_new_tokens`` long."""
    prompts = answer_prompts(tokenizer, records, template, model.config.max_seq_len)
    sampling = SamplingParams(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    return generated_answers(model, tokenizer, prompts, sampling, params)


def exact_match_by_task(predictions: Sequence[str], records: Sequence[Mapping]) -> dict[str, float]:
    """{"exact_match": overall, "exact_match/<task>": per task family} (records may carry a "task" field); an
    answer written with tool calls is scored on its text after the last result (``prompts.final_answer``)."""
    predictions = [final_answer(p) for p in predictions]
    references = [record_reference(r) for r in records]
    out = {"exact_match": metrics.exact_match(predictions, references)}
    for task in sorted({r["task"] for r in records if isinstance(r.get("task"), str)}):
        rows = [i for i, r in enumerate(records) if r.get("task") == task]
        out[f"exact_match/{task}"] = metrics.exact_match([predictions[i] for i in rows], [references[i] for i in rows])
    return out


def answer_exact_match(model: torch.nn.Module, tokenizer, records: Sequence[Mapping], template: str,
                       max_new_tokens: int, params: ScoreParams = ScoreParams()) -> dict[str, float]:
    """Exact match of the greedy answers to held-out SFT records, overall and per "task"."""
    return exact_match_by_task(greedy_answers(model, tokenizer, records, template, max_new_tokens, params), records)


# ----------------------------------------------------------------------------- reward pairs

@torch.no_grad()
def pair_scores(model: torch.nn.Module, dataset, pad_id: int,
                params: ScoreParams = ScoreParams()) -> tuple[list[float], list[float]]:
    """(chosen scores, rejected scores) of every pair of a ``data_loader.PreferencePairDataset``, in order."""
    was_training = model.training
    model.eval()
    device, chosen, rejected = _device(model), [], []
    starts = range(0, len(dataset), params.batch_size)
    for start in _bar(starts, "reward pairs", len(starts), params):
        batch = collate_pairs([dataset[i] for i in range(start, min(start + params.batch_size, len(dataset)))], pad_id)
        with autocast_context(device, params.dtype):
            scores = model.score(*(batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))).float()
        c, r = scores.chunk(2)
        chosen += c.tolist()
        rejected += r.tolist()
    model.train(was_training)
    return chosen, rejected


def reward_pairs(model: torch.nn.Module, dataset, pad_id: int, params: ScoreParams = ScoreParams(),
                 tasks: Sequence[str | None] | None = None) -> dict[str, float]:
    """A reward model on held-out pairs: Bradley-Terry loss, pairwise accuracy (chosen scored strictly higher;
    also per task when ``tasks`` names each pair's), mean margin, n_samples."""
    chosen, rejected = pair_scores(model, dataset, pad_id, params)
    if not chosen:
        raise ScoringError("no preference pairs to score: the test set is empty")
    c, r = torch.tensor(chosen), torch.tensor(rejected)
    figures = {"loss": float(bradley_terry_loss(c, r)),
               "pairwise_accuracy": metrics.pairwise_accuracy(chosen, rejected),
               "mean_margin": float((c - r).mean()), "n_samples": len(chosen)}
    for task in sorted({t for t in tasks or () if isinstance(t, str)}):
        rows = [i for i, t in enumerate(tasks) if t == task]
        figures[f"pairwise_accuracy/{task}"] = metrics.pairwise_accuracy([chosen[i] for i in rows],
                                                                         [rejected[i] for i in rows])
    return figures


# ----------------------------------------------------------------------------- classification

@torch.no_grad()
def class_logits(model: torch.nn.Module, dataset,
                 params: ScoreParams = ScoreParams()) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, num_classes) float logits on the CPU and (N,) class ids of every item of a
    ``data_loader.ClassificationDataset``, in order (right-padded batches; the classifier reads the last real
    token)."""
    was_training = model.training
    model.eval()
    device, logits, targets = _device(model), [], []
    starts = range(0, len(dataset), params.batch_size)
    for start in _bar(starts, "classify", len(starts), params):
        batch = collate_batch([dataset[i] for i in range(start, min(start + params.batch_size, len(dataset)))], 0)
        with autocast_context(device, params.dtype):
            logits.append(model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).cpu())
        targets.append(batch["label"])
    model.train(was_training)
    return torch.cat(logits).float(), torch.cat(targets)


def classification_figures(targets: torch.Tensor, predictions: torch.Tensor, labels: Sequence[str]) -> dict:
    """accuracy, majority-class baseline, n_samples, "precision/<label>", "recall/<label>", the labels and the
    confusion matrix (rows: true class, columns: predicted)."""
    if len(targets) == 0:
        raise ScoringError("no records to classify: the test set is empty")
    confusion = metrics.confusion_matrix(targets, predictions, len(labels))
    precision, recall = metrics.precision_recall(confusion)
    return {"accuracy": float(confusion.diagonal().sum() / confusion.sum()),
            "majority_baseline": float(confusion.sum(1).max() / confusion.sum()), "n_samples": len(targets),
            **{f"precision/{label}": p for label, p in zip(labels, precision)},
            **{f"recall/{label}": r for label, r in zip(labels, recall)},
            "labels": list(labels), "confusion_matrix": confusion.tolist()}


def classification(model: torch.nn.Module, dataset, params: ScoreParams = ScoreParams()) -> dict:
    """A classifier on held-out records: its cross-entropy ("loss") and ``classification_figures`` of its argmax."""
    logits, targets = class_logits(model, dataset, params)
    figures = classification_figures(targets, logits.argmax(-1), model.labels)
    return {"loss": float(metrics.class_scores(logits, targets)["loss"]), **figures}
