"""Evaluation of checkpoints on held-out data, and the ``python evaluator.py`` CLI: perplexity and bits per byte
(pretrain), response perplexity, BLEU/ROUGE and exact match of generated responses (sft), pairwise accuracy (reward
models), and accuracy, per-class precision / recall and the confusion matrix (classifiers).

    python evaluator.py --model_path models/pretrain/pretrain_best.pth --test_data_path data/pretrain/val.txt
    python evaluator.py --model_type sft --model_path models/sft/sft_best.pth --test_data_path data/sft/test.jsonl
    python evaluator.py --model_type sft --compare pretrain.pth sft.pth ppo.pth --test_data_path test.jsonl \
        --plot compare.png
    python evaluator.py --model_type classify --model_path models/classify/classify_best.pth \
        --test_data_path data/classify/test.jsonl
    python evaluator.py --model_path models/pretrain/pretrain_best.pth --tasks hellaswag=hellaswag_val.jsonl,mmlu=test

Every figure comes from the one scoring function of its metric (``scoring.py``), the one the trainers' held-out
evaluations call: this module reads and checks the test files, runs generation for BLEU/ROUGE, and writes the
report. Perplexity is token-weighted (exp of total NLL / predicted tokens, never a mean of batch means). The text
metrics themselves (how BLEU and ROUGE tokenize and count) live in text_metrics.py; standard benchmarks
(--tasks: HellaSwag, ARC, MMLU, GSM8K and their CORE figure) in task_benchmarks.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Iterable, Sequence

import torch

import checkpoints
import cli
import scoring
import task_benchmarks
from atomic_file import atomic_path
from data_loader import ClassificationDataset, GPTSFTDataset, PreferencePairDataset
from decoding import SamplingParams
from devices import DTYPE_CHOICES, resolve_device, resolve_dtype, set_threads
from metrics import exact_match
from prompts import SFT_TEMPLATE, encode_prompt, final_answer, record_messages, record_reference, render_prompt
from quantization import weight_count
from readers import (DEFAULT_TEXT_FIELD, FORMATS_TEXT, holds_records, load_classification_records,
                     load_preference_records, load_sft_records, read_documents)
from reward_scoring import reward_scores
from scoring import ScoreParams
from text_metrics import ROUGE_METRICS, compute_bleu, mean_sentence_bleu, rouge_scores
from verifiers import check_verifiers, verifiable_reward

PLOT_SOFTWARE = "python evaluator.py --plot"  # the PNG tag that marks a chart as the evaluator's own
REPORT_KEYS = {"model_type", "test_data_path", "settings", "results"}  # what marks an earlier report


class EvaluationError(ValueError):
    """Bad evaluation input (wrong data format for the model type, empty test set, ...)."""


# ----------------------------------------------------------------------------- input checks

def _check_data_format(path: str | os.PathLike, model_type: str, text_field: str = DEFAULT_TEXT_FIELD) -> Path:
    """Fail early, with a hint, when the test file does not fit the model type."""
    path = Path(path)
    if not path.exists():
        raise EvaluationError(f"test data not found: {path} (check --test_data_path)")
    suffix = path.suffix.lower()
    if model_type == "sft" and (path.is_dir() or suffix not in (".json", ".jsonl")):
        raise EvaluationError(f"SFT evaluation needs a .json or .jsonl file of {{\"instruction\", \"response\"}} "
                              f"records, got {path} (use --model_type pretrain for plain text)")
    if model_type == "classify" and (path.is_dir() or suffix not in (".json", ".jsonl")):
        raise EvaluationError(f"classifier evaluation needs a .jsonl file of {{\"text\", \"label\"}} records, "
                              f"got {path}")
    if model_type == "reward" and (path.is_dir() or suffix not in (".json", ".jsonl")):
        raise EvaluationError(f"reward evaluation needs a .json or .jsonl file of {{\"instruction\", \"chosen\", "
                              f"\"rejected\"}} records, got {path}")
    if model_type == "pretrain" and holds_records(path, text_field):
        raise EvaluationError(f"{path} holds instruction/response records, not {FORMATS_TEXT} documents: "
                              "use --model_type sft")
    return path


# ----------------------------------------------------------------------------- evaluator

class GPTEvaluator:
    """A GPTModel (or reward model, or classifier) with its tokenizer, scored on held-out files through ``scoring``:
    each ``evaluate_*`` reads and checks a test file, then calls the one scoring function of each figure.

    device=None keeps the model where it is; otherwise it is moved to `devices.resolve_device(device)`.
    dtype: "float32" (default, exact), or "auto"/"bf16"/"fp16" to run forward passes under autocast.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = "float32", show_progress: bool = True,
                 template: str = SFT_TEMPLATE):
        if device is not None:
            model = model.to(resolve_device(device))
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.dtype = resolve_dtype(dtype, self.device)
        self.show_progress = show_progress
        self.template = template  # the SFT template the model was trained with (stored in its checkpoint)

    @property
    def prompt_room(self) -> int:
        """The longest prompt that leaves one token to answer; a longer conversation loses its oldest turns first
        (prompts.render_prompt), as in the chat CLI and the server."""
        return self.model.config.max_seq_len - 1

    def params(self, batch_size: int) -> ScoreParams:
        """How this evaluator's scoring passes run: its dtype and progress bars, ``batch_size`` at a time."""
        if batch_size < 1:
            raise EvaluationError(f"batch_size must be at least 1, got {batch_size}")
        return ScoreParams(batch_size=batch_size, dtype=self.dtype, progress=self.show_progress)

    # -- generation

    def generate_predictions(self, prompts: Sequence[str | Sequence[int]], sampling: SamplingParams,
                             batch_size: int = 16, seed: int | None = None,
                             min_new_tokens: int | None = None) -> list[str]:
        """Continuations of each prompt (a text, read as `<s> text`, or rendered ids such as
        ``prompts.record_prompt_ids``'), decoded as ``sampling`` says and stopped at the tokenizer's `</s>`,
        ``batch_size`` at a time through the decode engine (``scoring.generated_answers``); ``seed`` seeds one
        generator the whole run draws from. A prompt is cut (keeping its end) only to leave room for
        ``min_new_tokens`` new tokens (default ``sampling.max_new_tokens``); past that, each prompt generates up to
        ``sampling.max_new_tokens`` or its context's end."""
        encoded = [encode_prompt(self.tokenizer, p) if isinstance(p, str) else list(p) for p in prompts]
        generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        sampling = dataclasses.replace(sampling, eos_token_id=self.tokenizer.eos_token_id)  # answers end at </s>
        return scoring.generated_answers(self.model, self.tokenizer, encoded, sampling, self.params(batch_size),
                                         generator, room=min_new_tokens or sampling.max_new_tokens)

    def best_of_n_predictions(self, prompts: Sequence[Sequence[int]], n: int, reward_model: torch.nn.Module | None,
                              sampling: SamplingParams, batch_size: int = 64, seed: int | None = None,
                              min_new_tokens: int | None = None, records: Sequence[dict] | None = None) -> list[str]:
        """For each prompt, n responses sampled as ``sampling`` says; the one the reward model scores highest is kept.
        Without a reward model, each prompt's record is given and its verifier picks (``verifiers.verifiable_reward``):
        an oracle that knows the reference answer, so this is pass@n, the ceiling a perfect reward model would reach."""
        if n < 1:
            raise EvaluationError(f"best_of must be at least 1, got {n}")
        if reward_model is None and records is None:
            raise EvaluationError("best-of-N needs a reward model or the records' verifiers to pick with")
        if n > 1 and not sampling.do_sample:
            raise EvaluationError("best-of-N picks among sampled responses: greedy decoding gives one answer n times")
        repeated = [prompt for prompt in prompts for _ in range(n)]
        samples = self.generate_predictions(repeated, sampling, batch_size=batch_size, seed=seed,
                                            min_new_tokens=min_new_tokens)
        if reward_model is not None:
            scores = reward_scores(reward_model, self.tokenizer, repeated, samples, self.device)
        else:
            scores = [verifiable_reward(sample, records[i // n]) for i, sample in enumerate(samples)]
        best = [max(range(i * n, (i + 1) * n), key=scores.__getitem__) for i in range(len(prompts))]
        return [samples[i] for i in best]

    # -- whole test sets

    def evaluate_pretrained(self, test_data_path: str | os.PathLike, batch_size: int = 8,
                            max_samples: int | None = None, text_field: str = DEFAULT_TEXT_FIELD) -> dict:
        """Perplexity, loss and bits per byte of documents (their text in ``text_field`` of a .jsonl* or .parquet),
        by ``scoring.text_loss``: the rule a pretraining run's val_bpb follows."""
        path = _check_data_format(test_data_path, "pretrain", text_field)
        documents = _take(read_documents(path, text_field), max_samples)
        if not documents:
            raise EvaluationError(f"no documents in {test_data_path}: the test set is empty")
        return scoring.text_loss(self.model, self.tokenizer, documents, self.params(batch_size))

    def evaluate_sft(self, test_data_path: str | os.PathLike, sampling: SamplingParams, batch_size: int = 8,
                     max_samples: int | None = None, seed: int | None = None, n_examples: int = 3,
                     reward_model: torch.nn.Module | None = None, best_of: int = 1,
                     best_of_scorer: str = "reward") -> dict:
        """Perplexity on response tokens only, plus BLEU/ROUGE and exact match of responses generated from the
        instructions as ``sampling`` says (the best of ``best_of`` samples when > 1), and greedy exact match of every
        turn of multi-turn records."""
        if best_of > 1 and best_of_scorer == "reward" and reward_model is None:
            raise EvaluationError("best-of-N needs a reward model to pick with: pass --reward_model "
                                  "(or --best_of_scorer verifier)")
        records = _take(load_sft_records(_check_data_format(test_data_path, "sft")), max_samples)
        if not records:
            raise EvaluationError(f"no records in {test_data_path}: the test set is empty")
        if best_of > 1 and best_of_scorer == "verifier":
            check_verifiers(records, str(test_data_path))  # before the first (slow) generation, not after
        losses = self.response_loss(records, batch_size)
        prompts = scoring.answer_prompts(self.tokenizer, records, self.template, self.model.config.max_seq_len)
        references = [record_reference(record) for record in records]
        room = 1  # a prompt that fits the context is never cut; its answer gets the rest of the context
        if best_of > 1:
            picker = reward_model if best_of_scorer == "reward" else None
            predictions = self.best_of_n_predictions(prompts, best_of, picker, sampling, batch_size, seed,
                                                     min_new_tokens=room, records=records)
        else:
            predictions = self.generate_predictions(prompts, sampling, batch_size=batch_size, seed=seed,
                                                    min_new_tokens=room)
        rouge = rouge_scores(predictions, references)
        scores = {}
        if reward_model is not None:
            scores["reward_score"] = mean_reward_score(reward_model, self.tokenizer, prompts, predictions, self.device)
        dialogues = [r for r in records if sum(m.get("role") == "assistant" for m in r.get("messages", ())) > 1]
        if dialogues:  # every turn of multi-turn records, with the model's own earlier answers and with the references
            greedy = dataclasses.replace(sampling, do_sample=False)  # exact match scores the most likely answers
            scores["dialogue"] = {"own_history": self.dialogue_exact_match(dialogues, greedy, True, batch_size),
                                  "teacher_forced": self.dialogue_exact_match(dialogues, greedy, False, batch_size)}
        return {**losses, "n_samples": len(records), **scoring.exact_match_by_task(predictions, records), **scores,
                "bleu": compute_bleu(predictions, [[ref] for ref in references]),
                "sentence_bleu": mean_sentence_bleu(predictions, [[ref] for ref in references]),
                **{metric: rouge[metric]["f"] for metric in ROUGE_METRICS},
                "rouge": rouge,
                "examples": [{"prompt": self.tokenizer.decode(p[1:], skip_special_tokens=False), "reference": r,
                              "prediction": g}
                             for p, r, g in list(zip(prompts, references, predictions))[:n_examples]]}

    def dialogue_exact_match(self, records: Sequence[dict], sampling: SamplingParams, own_history: bool = True,
                             batch_size: int = 64) -> dict[str, float]:
        """Exact match of every assistant turn of conversations, each generated as ``sampling`` says (greedy, as
        ``evaluate_sft`` asks, for a figure of the most likely answers), per turn ("turn2") and per task and turn.

        ``own_history``: earlier turns hold the model's own answers, as in a chat; else the references
        (teacher-forced history)."""
        conversations = [record_messages(r) for r in records]
        answers = [[m["content"] for m in c if m["role"] == "assistant"] for c in conversations]
        predicted: list[list[str]] = [[] for _ in conversations]
        for turn in range(max(map(len, answers), default=0)):
            rows = [i for i, a in enumerate(answers) if len(a) > turn]
            prompts = [render_prompt(self.tokenizer, history_before(conversations[i], turn,
                                                                    predicted[i] if own_history else None),
                                     self.template, limit=self.prompt_room).ids for i in rows]
            for i, p in zip(rows, self.generate_predictions(prompts, sampling, batch_size=batch_size,
                                                            min_new_tokens=1)):
                predicted[i].append(p)
        return turn_exact_match(predicted, answers, [r.get("task") for r in records])

    def response_loss(self, records: Sequence[dict], batch_size: int = 8) -> dict[str, float]:
        """loss, perplexity and n_tokens of the response tokens of SFT records (prompt tokens are not scored)."""
        dataset = GPTSFTDataset(list(records), self.tokenizer, self.model.config.max_seq_len, self.template)
        return scoring.response_loss(self.model, dataset, self.tokenizer.pad_token_id, self.params(batch_size))

    def response_perplexity(self, test_data_path: str | os.PathLike, batch_size: int = 8,
                            max_samples: int | None = None) -> float:
        """Perplexity of the responses of held-out SFT records (.json / .jsonl)."""
        records = _take(load_sft_records(_check_data_format(test_data_path, "sft")), max_samples)
        return self.response_loss(records, batch_size)["perplexity"]

    def evaluate_reward(self, test_data_path: str | os.PathLike, batch_size: int = 32,
                        max_samples: int | None = None) -> dict:
        """A reward model on held-out preference pairs (``scoring.reward_pairs``): pairwise accuracy (chosen scored
        higher), overall and per "task" when the records say, the mean margin and the Bradley-Terry loss."""
        records = _take(load_preference_records(_check_data_format(test_data_path, "reward")), max_samples)
        if not records:
            raise EvaluationError(f"no records in {test_data_path}: the test set is empty")
        dataset = PreferencePairDataset(records, self.tokenizer, self.model.config.max_seq_len, self.template)
        return scoring.reward_pairs(self.model, dataset, self.tokenizer.pad_token_id, self.params(batch_size),
                                    [r.get("task") for r in records])

    def evaluate_classification(self, test_data_path: str | os.PathLike, batch_size: int = 64,
                                max_samples: int | None = None) -> dict:
        """A classifier on held-out {"text", "label"} records (``scoring.classification``): accuracy, per-class
        precision / recall, confusion matrix."""
        records = _take(load_classification_records(_check_data_format(test_data_path, "classify")), max_samples)
        if not records:
            raise EvaluationError("no records to classify: the test set is empty")
        dataset = ClassificationDataset(records, self.tokenizer, self.model.config.max_seq_len, self.model.labels)
        return scoring.classification(self.model, dataset, self.params(batch_size))


def turn_exact_match(predicted: Sequence[Sequence[str]], answers: Sequence[Sequence[str]],
                     tasks: Sequence[str | None]) -> dict[str, float]:
    """{"turn1": ..., "<task>/turn1": ...}: exact match of each assistant turn, overall and per task; a turn written
    with tool calls is scored on its text after the last result (``prompts.final_answer``)."""
    predicted = [[final_answer(p) for p in turns] for turns in predicted]
    out = {}
    for turn in range(max(map(len, answers), default=0)):
        for task in [None, *sorted({t for t in tasks if isinstance(t, str)})]:
            rows = [i for i, a in enumerate(answers) if len(a) > turn and task in (None, tasks[i])]
            if rows:
                out[f"{task + '/' if task else ''}turn{turn + 1}"] = exact_match(
                    [predicted[i][turn] for i in rows], [answers[i][turn] for i in rows])
    return out


def history_before(messages: Sequence[dict], turn: int, own: Sequence[str] | None) -> list[dict]:
    """The messages before assistant turn ``turn`` (0-based), earlier answers replaced by ``own`` when given."""
    out, seen = [], 0
    for message in messages:
        if message["role"] == "assistant":
            if seen == turn:
                break
            message = {**message, "content": own[seen]} if own is not None else message
            seen += 1
        out.append(message)
    return out


def mean_reward_score(reward_model: torch.nn.Module, tokenizer, prompts: Sequence[Sequence[int]],
                      responses: Sequence[str], device: torch.device, batch_size: int = 32) -> float:
    """Mean reward-model score of rendered prompts + ``response </s>`` (as the reward model was trained)."""
    scores = reward_scores(reward_model, tokenizer, prompts, responses, device, batch_size)
    return sum(scores) / len(scores)


# ----------------------------------------------------------------------------- classification

def format_confusion(confusion: Sequence[Sequence[int]], labels: Sequence[str]) -> str:
    """The confusion matrix as text: one row per true class, one column per predicted class."""
    corner = "true \\ pred"
    width = max(len(corner), *(len(label) for label in labels)) + 1
    lines = [f"{corner:<{width}}" + "".join(f"{label:>{width}}" for label in labels)]
    lines += [f"{label:<{width}}" + "".join(f"{n:>{width}}" for n in row) for label, row in zip(labels, confusion)]
    return "\n".join(lines)


def plot_confusion_matrix(confusion: Sequence[Sequence[int]], labels: Sequence[str], path: str | os.PathLike,
                          title: str = "confusion matrix") -> None:
    """A heat map of counts (rows: true class, columns: predicted), written atomically to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = torch.as_tensor(confusion)
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2.5, 1.1 * len(labels) + 1.8))
    ax.imshow(counts.numpy(), cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for (i, j), n in zip(((i, j) for i in range(len(labels)) for j in range(len(labels))), counts.flatten().tolist()):
        ax.text(j, i, str(n), ha="center", va="center", color="white" if n > counts.max() / 2 else "black")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def _take(items: Iterable, limit: int | None) -> list:
    if limit is not None and limit < 1:
        raise EvaluationError(f"max_samples must be at least 1, got {limit}")
    items = iter(items)
    return [item for _, item in zip(range(limit), items)] if limit is not None else list(items)


# ----------------------------------------------------------------------------- reports

TABLE_METRICS = {"pretrain": ("loss", "perplexity", "bits_per_byte", "n_tokens"),
                 "sft": ("loss", "perplexity", "bleu", "sentence_bleu", "rouge-1", "rouge-2", "rouge-l", "exact_match",
                         "n_tokens"),
                 "reward": ("pairwise_accuracy", "mean_margin", "n_samples"),
                 "classify": ("accuracy", "majority_baseline", "n_samples")}


def _model_names(reports: list[dict]) -> list[str]:
    names = [Path(r["model_path"]).stem for r in reports]
    return names if len(set(names)) == len(names) else [str(Path(r["model_path"]).with_suffix("")) for r in reports]


def report_metrics(reports: list[dict], model_type: str) -> list[str]:
    """The metrics a comparison shows: the model type's own, then per-task, reward and per-class figures."""
    extra = sorted({k for r in reports for k in r
                    if k.startswith(("exact_match/", "pairwise_accuracy/")) or k == "reward_score"})
    extra += [k for k in reports[0] if k.startswith(("precision/", "recall/"))]
    return [*TABLE_METRICS[model_type], *extra]


def format_table(reports: list[dict], model_type: str) -> str:
    names = _model_names(reports)
    width = max(12, *(len(n) for n in names))
    rows = report_metrics(reports, model_type)
    first = max(14, *(len(m) + 1 for m in rows))
    lines = [f"{'metric':<{first}}" + "".join(f"{n:>{width + 2}}" for n in names)]
    for metric in rows:
        cells = ("-" if metric not in r else f"{r[metric]:,}" if isinstance(r[metric], int) else f"{r[metric]:.4f}"
                 for r in reports)
        lines.append(f"{metric:<{first}}" + "".join(f"{c:>{width + 2}}" for c in cells))
    return "\n".join(lines)


def plot_comparison(reports: list[dict], model_type: str, path: str) -> None:
    """One bar chart per metric (the table's, per-task ones included), one bar per checkpoint; five charts a row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in report_metrics(reports, model_type) if m not in ("n_tokens", "n_samples")]
    names = _model_names(reports)
    columns = min(len(metrics), 5)
    rows = math.ceil(len(metrics) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    for ax, metric in zip(axes.flat, metrics):
        values = [r.get(metric, 0.0) for r in reports]
        bars = ax.bar(names, values, color=[f"C{i}" for i in range(len(reports))])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        if min(values) >= 0 and max(values) > 0:  # scores such as a reward model's can be negative
            ax.set_ylim(bottom=0)
        ax.set_title(metric)
        ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a full disk leaves the earlier chart, not half of one
        fig.savefig(tmp, dpi=120, format="png", metadata={"Software": PLOT_SOFTWARE})
    plt.close(fig)


def _is_own_output(path: Path) -> bool:
    """Whether an existing file is an earlier run's report or chart (replaced without --overwrite): a report is a
    JSON object with the report's keys, a chart a PNG carrying ``PLOT_SOFTWARE``."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"\x89PNG"):
        return b"tEXtSoftware\x00" + PLOT_SOFTWARE.encode() in head
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested beyond any report
        return False
    return isinstance(report, dict) and REPORT_KEYS <= report.keys()


def print_reports(reports: list[dict], model_type: str) -> None:
    """The comparison table, then sft examples or classifier confusion matrices, one block per checkpoint."""
    print(format_table(reports, model_type))
    for name, report in zip(_model_names(reports), reports):
        if model_type == "sft":
            for example in report["examples"]:
                print(f"\n[{name}] prompt: {example['prompt']!r}\n"
                      f"  reference:  {example['reference']!r}\n  prediction: {example['prediction']!r}")
        elif model_type == "classify":
            print(f"\n[{name}] confusion matrix (rows: true class, columns: predicted)\n"
                  + format_confusion(report["confusion_matrix"], report["labels"]))


# ----------------------------------------------------------------------------- evaluating one checkpoint

MODEL_KINDS = {"reward": "reward", "classify": "classify"}  # --model_type -> checkpoint kind; the others: "lm"


def _check_model_kind(checkpoint_path: str, loaded_kind: str, model_type: str) -> None:
    """The checkpoint must be what --model_type measures (a language model for pretrain and sft)."""
    kind = {"lm-int8": "lm", "lora": "lm"}.get(loaded_kind, loaded_kind)
    if kind != MODEL_KINDS.get(model_type, "lm"):
        names = {"reward": "a reward model", "classify": "a classifier", "lm": "a language model"}
        raise EvaluationError(f"{checkpoint_path} is {names[kind]}: use --model_type "
                              f"{MODEL_KINDS.get(kind, 'pretrain or sft')}")


def _evaluate_sft(evaluator: GPTEvaluator, args: argparse.Namespace, checkpoint_path: str) -> dict:
    reward_model = None
    if args.reward_model:  # it scores this model's tokens: it must read them as this model's tokenizer does
        reward_model = checkpoints.load(args.reward_model, args.tokenizer_dir, args.device, expect="reward",
                                        flag="--reward_model",
                                        same_tokenizer_as=(evaluator.tokenizer, str(checkpoint_path))).model
    return evaluator.evaluate_sft(args.test_data_path, sampling_params(args), batch_size=args.batch_size,
                                  max_samples=args.max_samples, seed=args.seed, reward_model=reward_model,
                                  best_of=args.best_of, best_of_scorer=args.best_of_scorer)


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """How --model_type sft generates, from the generation flags: greedy unless --do_sample; --best_of samples."""
    return SamplingParams(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample or args.best_of > 1,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def evaluate_checkpoint(checkpoint_path: str, args: argparse.Namespace,
                        tasks: Sequence[task_benchmarks.LoadedTask] = ()) -> dict:
    """Load one checkpoint with its tokenizer and evaluate it as args say (and on the benchmark ``tasks``)."""
    if args.test_data_path:
        _check_data_format(args.test_data_path, args.model_type, args.text_field)  # before the (slow) model load
    loaded = checkpoints.load(checkpoint_path, args.tokenizer_dir, args.device, dtype=args.dtype)
    _check_model_kind(checkpoint_path, loaded.kind, args.model_type)
    evaluator = GPTEvaluator(loaded.model, loaded.tokenizer, dtype=args.dtype, show_progress=not args.no_progress,
                             template=loaded.template)
    if not args.test_data_path:  # benchmarks only
        metrics = {}
    elif args.model_type == "sft":
        metrics = _evaluate_sft(evaluator, args, checkpoint_path)
    elif args.model_type == "pretrain":
        metrics = evaluator.evaluate_pretrained(args.test_data_path, batch_size=args.batch_size,
                                                max_samples=args.max_samples, text_field=args.text_field)
    else:
        evaluate = {"reward": evaluator.evaluate_reward, "classify": evaluator.evaluate_classification}[args.model_type]
        metrics = evaluate(args.test_data_path, batch_size=args.batch_size, max_samples=args.max_samples)
    if tasks:
        params = task_benchmarks.BenchmarkParams(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                                 dtype=evaluator.dtype, show_progress=not args.no_progress)
        metrics["benchmarks"] = task_benchmarks.run_benchmarks(loaded.model, loaded.tokenizer, tasks, params)
    return {"model_path": str(checkpoint_path), "n_parameters": weight_count(loaded.model), **metrics}


# ----------------------------------------------------------------------------- CLI

def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="python evaluator.py",
                                description="Evaluate GPTModel checkpoints: perplexity and bits per byte (pretrain), "
                                            "response perplexity plus BLEU/ROUGE of generated responses (sft), "
                                            "pairwise accuracy (reward), accuracy and confusion matrix (classify).")
    _add_model_flags(parser)
    _add_generation_flags(parser)
    _add_benchmark_flags(parser)
    _add_run_flags(parser)
    return parser


def _add_benchmark_flags(parser: cli.ArgumentParser) -> None:
    parser.add_argument("--tasks", metavar="NAME=PATH[,NAME=PATH...]",
                        help="standard benchmarks to run (language models), each on its file: "
                             f"{', '.join(task_benchmarks.TASKS)}; e.g. hellaswag=hellaswag_val.jsonl,mmlu=data/test "
                             "(docs/evaluation.md: formats, acc / acc_norm / centred / CORE)")
    parser.add_argument("--limit", type=cli.positive_int, help="--tasks: score at most N examples of each task")
    parser.add_argument("--num_fewshot", type=cli.nonnegative_int, default=0,
                        help="--tasks: the first K examples of each file, with their answers, prefix every question")


def _add_model_flags(parser: cli.ArgumentParser) -> None:
    parser.add_argument("--model_path", help="checkpoint (.pth) to evaluate; its config sets the model size")
    parser.add_argument("--compare", nargs="+", metavar="CKPT",
                        help="several checkpoints evaluated on the same data and shown side by side")
    parser.add_argument("--test_data_path",
                        help="(required unless --tasks) pretrain: .txt (one document per line), .jsonl / .jsonl.gz / "
                             ".jsonl.zst ({\"text\": ...}), .parquet or a folder of any mix; sft: .json/.jsonl of "
                             "{\"instruction\", \"response\"} records")
    parser.add_argument("--text_field", type=cli.field_name, default=DEFAULT_TEXT_FIELD,
                        help="pretrain: the field (.jsonl*) or column (.parquet) that holds each document's text")
    parser.add_argument("--model_type", choices=("pretrain", "sft", "reward", "classify"), default="pretrain",
                        help="what to measure: pretrain (perplexity, bits/byte), sft (response perplexity, BLEU, "
                             "ROUGE, exact match), reward (pairwise accuracy, margin) or classify (accuracy, per-class "
                             "precision/recall, confusion matrix; .jsonl of {\"text\", \"label\"})")
    parser.add_argument("--reward_model", help="sft: also report the mean score this reward model gives the responses")
    parser.add_argument("--tokenizer_dir", help="tokenizer folder (default: <checkpoint folder>/tokenizer)")


def _add_generation_flags(parser: cli.ArgumentParser) -> None:
    parser.add_argument("--max_new_tokens", type=cli.positive_int, default=100,
                        help="sft: most new tokens per generated response")
    parser.add_argument("--do_sample", action="store_true", help="sft: sample responses instead of greedy decoding")
    parser.add_argument("--temperature", type=cli.positive_float, default=0.8,
                        help="sft with --do_sample: sampling temperature")
    parser.add_argument("--top_k", type=cli.nonnegative_int, default=50,
                        help="sft with --do_sample: keep the k most likely tokens, 0 = all")
    parser.add_argument("--top_p", type=cli.probability, default=1.0,
                        help="sft with --do_sample: nucleus probability mass (1.0 = off)")
    parser.add_argument("--seed", type=cli.nonnegative_int, help="seed for reproducible sampling")
    parser.add_argument("--best_of", type=cli.positive_int, default=1,
                        help="sft: sample N responses per prompt (--temperature, --top_k, --top_p) and keep the one "
                             "--best_of_scorer scores highest (1 = off)")
    parser.add_argument("--best_of_scorer", choices=("reward", "verifier"), default="reward",
                        help="sft with --best_of: pick with --reward_model, or with each record's verifier "
                             "(verifiers.py; it knows the reference, so this measures pass@N)")


def _add_run_flags(parser: cli.ArgumentParser) -> None:
    parser.add_argument("--batch_size", type=cli.positive_int, default=8,
                        help="sequences per forward pass / generation batch")
    parser.add_argument("--max_samples", type=cli.positive_int, help="evaluate only the first N documents / records")
    parser.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32",
                        help="float32 (exact), or auto/bf16/fp16 for autocast forward passes (faster on GPUs)")
    parser.add_argument("--num_threads", type=cli.positive_int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--output", default="eval_report.json", help="where to write the JSON report")
    parser.add_argument("--plot", help="write a bar chart of the metrics of every checkpoint to this .png")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --output / --plot that is not an earlier report or chart of this "
                             "command (those are replaced anyway)")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bars")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.model_path and not args.compare:
        parser.error("give --model_path CKPT or --compare CKPT [CKPT ...]")
    if not args.test_data_path and not args.tasks:
        parser.error("give --test_data_path (or --tasks)")
    if args.tasks and args.model_type not in ("pretrain", "sft"):
        parser.error(f"--tasks scores language models, not --model_type {args.model_type}")
    if args.plot and not args.test_data_path:
        parser.error("--plot charts the --test_data_path metrics: give --test_data_path")
    return args


def _check_device(args: argparse.Namespace) -> None:
    try:
        resolve_dtype(args.dtype, resolve_device(args.device))
    except ValueError as exc:  # devices reports these as plain ValueError
        raise EvaluationError(str(exc)) from None


def _check_output_file(path: str, flag: str) -> None:
    """Before minutes of evaluation: the report must be writable."""
    target = Path(path)
    if target.is_dir():
        raise EvaluationError(f"{flag} {target} is a folder: pass a file name such as {target / 'eval_report.json'}")
    cli.check_output_folder(target.parent if str(target.parent) else Path("."), f"{flag} {target}: folder")


def write_report(reports: list[dict], args: argparse.Namespace) -> None:
    """The JSON report (settings and every checkpoint's results), written atomically; the plot if asked for."""
    report = {"model_type": args.model_type, "test_data_path": str(args.test_data_path), "settings": vars(args),
              "results": reports}
    with atomic_path(args.output) as tmp:
        tmp.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    if args.plot:
        plot_comparison(reports, args.model_type, args.plot)


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; bad input gives one `error:` line and exit 2 (cli.run_cli)."""
    return cli.run_cli(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    _check_device(args)
    _check_output_file(args.output, "--output")
    if args.plot:
        _check_output_file(args.plot, "--plot")
    models = [("--model_path", args.model_path), *(("--compare", path) for path in args.compare or ()),
              ("--reward_model", args.reward_model)]
    inputs = [pair for flag, path in models for pair in checkpoints.checkpoint_inputs(flag, path, args.tokenizer_dir)]
    inputs.append(("--test_data_path", args.test_data_path))
    task_paths = task_benchmarks.parse_task_list(args.tasks) if args.tasks else []
    inputs += [("--tasks", path) for _, path in task_paths]
    cli.check_outputs({"--output": args.output, "--plot": args.plot}, inputs, args.overwrite, own=_is_own_output)
    tasks = task_benchmarks.load_tasks(task_paths, args.limit, args.num_fewshot)  # bad data fails before any model
    set_threads(args.num_threads)
    paths = ([args.model_path] if args.model_path else []) + list(args.compare or [])
    reports = [evaluate_checkpoint(path, args, tasks) for path in paths]
    write_report(reports, args)
    if args.test_data_path:
        print_reports(reports, args.model_type)
    if tasks:
        for name, report in zip(_model_names(reports), reports):
            print(f"\n[{name}] benchmarks\n" + task_benchmarks.format_results(report["benchmarks"]))
    print(f"\nreport: {args.output}" + (f"  plot: {args.plot}" if args.plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
