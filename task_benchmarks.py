"""Standard benchmark tasks: reading their published files (HellaSwag, ARC, MMLU, GSM8K) and scoring a language
model on them, multiple choice by continuation log-likelihood (lm-evaluation-harness's ``acc`` / ``acc_norm``),
GSM8K by greedy generation and the final number, and a CORE-like summary (DCLM, nanochat): each task's accuracy
centred on its chance level, ``(acc - chance) / (1 - chance)``, averaged over the tasks run.

    tasks = load_tasks(parse_task_list("hellaswag=hellaswag_val.jsonl,mmlu=data/test"), limit=500, num_fewshot=0)
    results = run_benchmarks(model, tokenizer, tasks, BenchmarkParams(batch_size=16))   # {"tasks": ..., "core": ...}

A multiple-choice example is scored as ``<s> prefix context`` followed by each choice (" " + its text): the choice's
summed log-probability (``metrics.scored_logprobs``, the project's one log-prob function) ranks it for ``acc``, the
same divided by the choice's UTF-8 bytes for ``acc_norm``. Contexts too long for the model keep ``<s>`` and their end
(``prompts.fit``). Few-shot demonstrations are the file's first K examples, which are then not scored.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from tqdm import tqdm

from data_loader import collate_batch
from decoding import SamplingParams, cut_at_eos, generate_responses
from devices import autocast_context
from metrics import scored_logprobs
from prompts import IGNORE_INDEX, encode_prompt, fit, max_prompt_len
from readers import ROW_SUFFIXES, DataError, read_rows
from verifiers import last_number, math_verifier

SHOT_SEPARATOR = "\n\n"  # between few-shot demonstrations and before the question, as lm-evaluation-harness writes
GSM8K_STOPS = ("Question:", "\n\n")  # a generated GSM8K answer ends where the next question would begin
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")  # "1,234" -> "1234"; "1,23" is two numbers and stays


class BenchmarkError(DataError):
    """A benchmark that cannot run as asked: an unknown task, a bad --tasks value, too few examples."""


@dataclass(frozen=True)
class Example:
    """One benchmark question: the prompt text, its candidate answers (multiple choice) and the right one."""
    context: str  # the text the answer continues ("Question: ...\nAnswer:")
    choices: tuple[str, ...]  # candidate answers, each scored as " " + text; () for a generated answer
    label: int  # index of the right choice (0 for a generated answer)
    answer: str  # the right answer as a demonstration writes it after the context and a space
    reference: str | None = None  # a generated answer's reference (GSM8K: the solution with its #### line)


@dataclass(frozen=True)
class Task:
    """A benchmark: how a row of its file becomes an Example, and the accuracy CORE centres."""
    name: str
    parse: Callable[[Any, str], Example]  # (row, "file:line") -> Example; a bad row raises DataError naming it
    metric: str  # "acc" or "acc_norm": the figure centred for CORE (the Open LLM Leaderboard's choice per task)
    generate: bool = False  # answered by greedy generation (exact match of the final number), not by choices


@dataclass(frozen=True)
class LoadedTask:
    """A task's file read: the few-shot demonstrations and the examples to score."""
    task: Task
    path: Path
    shots: tuple[Example, ...]
    examples: tuple[Example, ...]


@dataclass(frozen=True)
class BenchmarkParams:
    batch_size: int = 8  # sequences per forward pass / generation slots
    max_new_tokens: int = 256  # generated tasks: the most new tokens per answer
    dtype: torch.dtype = torch.float32  # forward passes under autocast for bf16/fp16
    show_progress: bool = True


# ----------------------------------------------------------------------------- reading rows

def _field(row: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    value = row.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise DataError(f"{where}: missing or non-{names} field {key!r} (its fields: {', '.join(map(repr, row))})")
    return value


def _strings(values: Any, what: str, where: str, least: int = 2) -> tuple[str, ...]:
    if not isinstance(values, (list, tuple)) or len(values) < least or not all(isinstance(v, str) for v in values):
        raise DataError(f"{where}: {what} must be a list of at least {least} strings")
    return tuple(values)


def _index(label: Any, labels: Sequence[str], where: str) -> int:
    """The index of an answer given as one of ``labels`` ("A", "1", ...) or as a position (an int)."""
    if isinstance(label, str) and label.strip() in labels:
        return list(labels).index(label.strip())
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(labels):
        return label
    raise DataError(f"{where}: answer {label!r} is none of the {len(labels)} choices ({', '.join(labels)})")


def _hellaswag_text(text: str) -> str:
    """HellaSwag's cleanup, as lm-evaluation-harness does it: WikiHow's " [title]" ends a sentence, other bracketed
    tags go, double spaces become one."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def parse_hellaswag(row: Any, where: str) -> Example:
    """A line of hellaswag_{train,val}.jsonl (or the Hugging Face copy): ``ctx_a`` + ``ctx_b`` (or ``ctx``) after the
    ``activity_label``, four ``endings``, ``label`` the right one (an int, or a digit string)."""
    if isinstance(row, dict) and isinstance(row.get("ctx_a"), str) and isinstance(row.get("ctx_b"), str):
        ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    else:
        ctx = _field(row, "ctx", str, where)
    if row.get("label") in (None, ""):
        raise DataError(f"{where}: no label (HellaSwag's test split is unlabelled: use hellaswag_val.jsonl)")
    activity = row.get("activity_label")
    context = _hellaswag_text(f"{activity}: {ctx}" if isinstance(activity, str) and activity else ctx)
    endings = tuple(_hellaswag_text(e) for e in _strings(row.get("endings"), "'endings'", where))
    label = _index(row["label"], [str(i) for i in range(len(endings))], where)
    return Example(context, endings, label, endings[label])


def parse_arc(row: Any, where: str) -> Example:
    """An ARC question: AI2's ``{"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}`` or the
    Hugging Face shape ``{"question", "choices": {"text": [...], "label": [...]}, "answerKey"}``."""
    question = _field(row, "question", (str, dict), where)
    if isinstance(question, dict):
        stem, options = _field(question, "stem", str, where), question.get("choices")
        if not isinstance(options, list) or not all(isinstance(o, dict) for o in options):
            raise DataError(f"{where}: question.choices must be a list of {{\"text\", \"label\"}} objects")
        texts = _strings([o.get("text") for o in options], "the choices' texts", where)
        labels = _strings([o.get("label") for o in options], "the choices' labels", where)
    else:
        stem, options = question, _field(row, "choices", dict, where)
        texts = _strings(options.get("text"), "choices.text", where)
        labels = _strings(options.get("label"), "choices.label", where, least=len(texts))
    if len(labels) != len(texts):
        raise DataError(f"{where}: {len(texts)} choice texts but {len(labels)} labels")
    label = _index(_field(row, "answerKey", str, where), labels, where)
    return Example(f"Question: {stem}\nAnswer:", texts, label, texts[label])


def parse_mmlu(row: Any, where: str) -> Example:
    """An MMLU question: a row of the original data/{dev,val,test}/*.csv (question, A, B, C, D, answer letter) or
    the Hugging Face shape ``{"question", "choices": [...], "answer": 0-3}``; answered by the choice's letter."""
    if isinstance(row, list):
        if len(row) < 4:
            raise DataError(f"{where}: an MMLU row is question,A,B,C,D,answer; this one has {len(row)} fields")
        question, options, answer = row[0], tuple(row[1:-1]), row[-1]
    else:
        question, answer = _field(row, "question", str, where), row.get("answer")
        options = _strings(row.get("choices"), "'choices'", where)
    letters = [chr(ord("A") + i) for i in range(len(options))]
    label = _index(answer, letters, where)
    lines = [question.strip(), *(f"{letter}. {text}" for letter, text in zip(letters, options)), "Answer:"]
    return Example("\n".join(lines), tuple(letters), label, letters[label])


def parse_gsm8k(row: Any, where: str) -> Example:
    """A line of GSM8K's {train,test}.jsonl: ``question``, and ``answer`` the worked solution ending in ``#### N``."""
    question, answer = _field(row, "question", str, where), _field(row, "answer", str, where)
    if "####" not in answer or final_number(answer) is None:
        raise DataError(f"{where}: the answer has no final '#### <number>' line")
    return Example(f"Question: {question}\nAnswer:", (), 0, answer.strip(), reference=answer)


TASKS = {task.name: task for task in (
    Task("hellaswag", parse_hellaswag, "acc_norm"),
    Task("arc_easy", parse_arc, "acc_norm"),
    Task("arc_challenge", parse_arc, "acc_norm"),
    Task("mmlu", parse_mmlu, "acc"),
    Task("gsm8k", parse_gsm8k, "acc", generate=True),
)}


def _task_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """The rows of a benchmark file, or of every benchmark file in a folder (MMLU's data/test/), by path."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in ROW_SUFFIXES)
        if not files:
            raise BenchmarkError(f"folder {path} holds no benchmark files ({', '.join(ROW_SUFFIXES)})")
        for file in files:
            yield from read_rows(file)
    else:
        yield from read_rows(path)


def load_task(name: str, path: str | Path, limit: int | None = None, num_fewshot: int = 0) -> LoadedTask:
    """A task's file: its first ``num_fewshot`` examples as demonstrations, then up to ``limit`` examples to score;
    every row read is checked (a bad one is a DataError naming file and line)."""
    if name not in TASKS:
        raise BenchmarkError(f"unknown task {name!r}: known tasks are {', '.join(TASKS)}")
    task, path = TASKS[name], Path(path)
    wanted = None if limit is None else num_fewshot + limit
    examples = []
    for where, row in _task_rows(path):
        if wanted is not None and len(examples) >= wanted:
            break
        examples.append(task.parse(row, where))
    if len(examples) <= num_fewshot:
        raise BenchmarkError(f"{path} holds {len(examples)} {name} examples: none left to score after "
                             f"{num_fewshot} few-shot demonstrations")
    return LoadedTask(task, path, tuple(examples[:num_fewshot]), tuple(examples[num_fewshot:]))


def parse_task_list(text: str) -> list[tuple[str, Path]]:
    """``"hellaswag=PATH,arc_easy=PATH"`` -> [(name, path), ...]: known names, each once."""
    pairs = []
    for item in (part.strip() for part in text.split(",")):
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise BenchmarkError(f"--tasks takes NAME=PATH[,NAME=PATH...], got {item!r} (tasks: {', '.join(TASKS)})")
        if name.strip() not in TASKS:
            raise BenchmarkError(f"unknown task {name.strip()!r} in --tasks: known tasks are {', '.join(TASKS)}")
        pairs.append((name.strip(), Path(path.strip())))
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise BenchmarkError(f"--tasks names a task twice: {', '.join(names)}")
    return pairs


def load_tasks(pairs: Iterable[tuple[str, str | Path]], limit: int | None = None,
               num_fewshot: int = 0) -> list[LoadedTask]:
    """Every task's file read and checked (before a model is loaded, so bad data fails at once)."""
    return [load_task(name, path, limit, num_fewshot) for name, path in pairs]


# ----------------------------------------------------------------------------- scoring

def few_shot_prefix(shots: Sequence[Example]) -> str:
    """The demonstrations, each written out with its right answer, then the separator before the question."""
    return "".join(f"{shot.context} {shot.answer}{SHOT_SEPARATOR}" for shot in shots)


def _fit_quietly(ids: list[int], limit: int) -> tuple[list[int], bool]:
    """``prompts.fit`` without its warning per context (the run reports how many were cut instead)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fit(ids, limit), len(ids) > limit


def choice_requests(tokenizer, examples: Sequence[Example], prefix: str,
                    max_seq_len: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(context ids, continuation ids) of every choice of every example, in order, each pair within
    ``max_seq_len`` (the context keeps ``<s>`` and its end); and how many were cut to fit."""
    requests, cut = [], 0
    for example in examples:
        context = encode_prompt(tokenizer, prefix + example.context)
        for choice in example.choices:
            continuation = tokenizer.encode_ordinary(" " + choice)[:max_seq_len - 1]  # <s> at least stays
            ids, was_cut = _fit_quietly(context, max_seq_len - len(continuation))
            requests.append((ids, continuation))
            cut += was_cut
    return requests, cut


@torch.no_grad()
def continuation_logprobs(model: torch.nn.Module, requests: Sequence[tuple[list[int], list[int]]], pad_id: int,
                          params: BenchmarkParams = BenchmarkParams()) -> list[float]:
    """Each continuation's summed log-probability given its context, in request order (right-padded batches of
    similar length; only the continuation's tokens are labelled)."""
    device = next(model.parameters()).device
    items = [{"input_ids": torch.tensor(ctx + cont), "attention_mask": torch.ones(len(ctx) + len(cont),
                                                                                  dtype=torch.long),
              "labels": torch.tensor([IGNORE_INDEX] * len(ctx) + cont)} for ctx, cont in requests]
    order = sorted(range(len(items)), key=lambda i: len(items[i]["input_ids"]), reverse=True)  # OOM shows first
    out = [0.0] * len(items)
    was_training = model.training
    model.eval()
    starts = range(0, len(order), params.batch_size)
    for start in tqdm(starts, desc="choices", disable=not params.show_progress, leave=False):
        rows = order[start:start + params.batch_size]
        batch = {k: v.to(device) for k, v in collate_batch([items[i] for i in rows], pad_id).items()}
        with autocast_context(device, params.dtype):
            sums = scored_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        for i, value in zip(rows, sums.float().tolist()):
            out[i] = value
    model.train(was_training)
    return out


def multiple_choice_scores(logprobs: Sequence[Sequence[float]], examples: Sequence[Example]) -> dict[str, float]:
    """acc: how often the highest summed log-prob is the right choice; acc_norm: the same per UTF-8 byte of each
    choice's text (lm-evaluation-harness's length normalisation); chance: the mean of 1 / choices."""
    def first_best(values: Sequence[float]) -> int:  # ties go to the earlier choice, as numpy's argmax
        return max(range(len(values)), key=lambda i: (values[i], -i))

    acc = acc_norm = 0
    for scores, example in zip(logprobs, examples, strict=True):
        per_byte = [s / max(1, len(c.encode("utf-8"))) for s, c in zip(scores, example.choices, strict=True)]
        acc += first_best(scores) == example.label
        acc_norm += first_best(per_byte) == example.label
    n = len(examples)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "chance": sum(1 / len(e.choices) for e in examples) / n}


def centred(accuracy: float, chance: float) -> float:
    """(accuracy - chance) / (1 - chance): 0 at chance, 1 when every answer is right, negative below chance."""
    return (accuracy - chance) / (1 - chance)


def core_score(results: dict[str, dict]) -> float:
    """The CORE-like figure: the tasks' centred accuracies, averaged (each task counts once)."""
    return sum(r["centred"] for r in results.values()) / len(results)


# ----------------------------------------------------------------------------- generated answers (GSM8K)

def answer_text(text: str) -> str:
    """Where a final answer is read: the line after the last ``####`` when there is one, else the whole text; with
    thousands separators dropped ("1,234" is one number)."""
    text = _THOUSANDS.sub("", text)
    return text.rsplit("####", 1)[1].strip().split("\n", 1)[0] if "####" in text else text


def final_number(text: str) -> float | None:
    """The final answer of a GSM8K solution or a generated one: the number after ``####``, else the last number."""
    return last_number(answer_text(text))


def cut_at_stop(text: str, stops: Sequence[str] = GSM8K_STOPS) -> str:
    """The text before the first stop string (the model going on to a next question)."""
    ends = [text.find(stop) for stop in stops if stop in text]
    return text[:min(ends)] if ends else text


def generate_answers(model: torch.nn.Module, tokenizer, prompts: Sequence[str],
                     params: BenchmarkParams) -> tuple[list[str], int]:
    """Greedy answers of text prompts (``<s> prompt``, cut at the front to leave room), stopped at ``</s>`` or a
    stop string; and how many prompts were cut."""
    limit = max_prompt_len(model.config.max_seq_len, params.max_new_tokens)
    fitted = [_fit_quietly(encode_prompt(tokenizer, p), limit) for p in prompts]
    eos = tokenizer.eos_token_id
    sampling = SamplingParams(max_new_tokens=params.max_new_tokens, do_sample=False, eos_token_id=eos)
    with tqdm(total=len(prompts), desc="generate", disable=not params.show_progress, leave=False) as bar, \
            autocast_context(next(model.parameters()).device, params.dtype):
        outputs = generate_responses(model, [ids for ids, _ in fitted], sampling, params.batch_size,
                                     on_finish=lambda: bar.update(1))
    texts = [cut_at_stop(tokenizer.decode(cut_at_eos(ids, eos), skip_special_tokens=True)) for ids in outputs]
    return texts, sum(cut for _, cut in fitted)


def answer_matches(generated: str, reference: str) -> bool:
    """Exact match of final numbers (``verifiers.math_verifier`` on the answers' final lines)."""
    return math_verifier(answer_text(generated), {"response": answer_text(reference)}) == 1.0


# ----------------------------------------------------------------------------- running tasks

def run_task(model: torch.nn.Module, tokenizer, loaded: LoadedTask, params: BenchmarkParams) -> dict:
    """One task's figures: acc (and acc_norm for multiple choice), chance, centred, n, and how many contexts were
    cut to fit the model."""
    prefix, examples = few_shot_prefix(loaded.shots), loaded.examples
    if loaded.task.generate:
        answers, cut = generate_answers(model, tokenizer, [prefix + e.context for e in examples], params)
        scores = {"acc": sum(answer_matches(a, e.reference) for a, e in zip(answers, examples)) / len(examples),
                  "chance": 0.0}
    else:
        requests, cut = choice_requests(tokenizer, examples, prefix, model.config.max_seq_len)
        flat = iter(continuation_logprobs(model, requests, tokenizer.pad_token_id, params))
        scores = multiple_choice_scores([[next(flat) for _ in e.choices] for e in examples], examples)
    return {**scores, "centred": centred(scores[loaded.task.metric], scores["chance"]), "metric": loaded.task.metric,
            "n": len(examples), "num_fewshot": len(loaded.shots), "n_truncated": cut, "path": str(loaded.path)}


def run_benchmarks(model: torch.nn.Module, tokenizer, tasks: Sequence[LoadedTask],
                   params: BenchmarkParams = BenchmarkParams()) -> dict:
    """{"tasks": {name: run_task's figures}, "core": their centred accuracies averaged}."""
    results = {loaded.task.name: run_task(model, tokenizer, loaded, params) for loaded in tasks}
    return {"tasks": results, "core": core_score(results)}


def format_results(benchmarks: dict) -> str:
    """A table: one row per task (n, acc, acc_norm, centred on the task's metric), then CORE."""
    lines = [f"{'task':<14}{'n':>7}{'acc':>9}{'acc_norm':>10}{'centred':>10}  centred on"]
    for name, r in benchmarks["tasks"].items():
        norm = f"{r['acc_norm']:.4f}" if "acc_norm" in r else "-"
        lines.append(f"{name:<14}{r['n']:>7}{r['acc']:>9.4f}{norm:>10}{r['centred']:>10.4f}  {r['metric']}")
    lines.append(f"{'CORE':<14}{'':>7}{'':>9}{'':>10}{benchmarks['core']:>10.4f}  mean of centred")
    return "\n".join(lines)
