"""The served model: `ServedModel` (the model, tokenizer, engine thread, best_of scorer, the tokenizer as the grammar
library sees it, and their description for /health), `load_served_model` (checkpoint, optional INT8, device and
dtype, the engine and its thread), the --reward_model checks and loading, and best_of: each candidate's seed
(`candidate_seeds`) and its score (`score_candidates`, in the scorer thread: the reward model's, or
`mean_token_logprobs`, OpenAI's rule)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

import checkpoints
from cli import UsageError
from decoding import DecodeEngine
from devices import autocast_context, resolve_device, resolve_dtype
from grammar_constraint import GrammarVocabulary
from gpt_model import GPTModel
from inference.engine_worker import EngineWorker, Job
from inference.server_metrics import Metrics
from inference.settings import Settings
from loss_labels import IGNORE_INDEX
from metrics import sequence_logprobs
from model_heads import GPTRewardModel
from quantization import is_quantized
from reward_scoring import reward_scores
from speculative import DraftParams


def scorer_thread() -> ThreadPoolExecutor:
    """One thread scores best_of candidates: bounded memory, never the event loop."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="best-of-scorer")


@dataclass
class ServedModel:
    """What /health reports and the routes need: the model, tokenizer, engine thread and their description."""

    path: Path
    model: torch.nn.Module
    tokenizer: Any
    worker: EngineWorker
    template: str
    quantization: str
    parameters: int
    device: torch.device
    dtype: torch.dtype
    grammar_vocab: GrammarVocabulary  # built once: response_format and tool-call grammars compile against it
    reward_path: Path | None = None
    reward_model: GPTRewardModel | None = None
    scorer: ThreadPoolExecutor = field(default_factory=scorer_thread)

    @property
    def context(self) -> int:
        return self.model.config.max_seq_len

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @property
    def name(self) -> str:
        return self.path.stem


def load_served_model(settings: Settings, metrics: Metrics) -> ServedModel:
    """Load the checkpoint (INT8 or float, quantizing on request), build the engine and start its thread."""
    path = settings.resolved_model_path()
    tokenizer_dir = Path(settings.tokenizer_dir) if settings.tokenizer_dir else path.parent / "tokenizer"
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    loaded = checkpoints.load(path, tokenizer_dir, device, quantize=settings.quantize, dtype=dtype, expect="lm")
    model, tokenizer, template = loaded.model, loaded.tokenizer, loaded.template
    reward_path = Path(settings.reward_model) if settings.reward_model else None
    reward = load_reward_model(reward_path, tokenizer, tokenizer_dir, device) if reward_path else None
    with torch.device("meta"):
        parameters = GPTModel(model.config).num_parameters()
    engine = DecodeEngine(model, tokenizer, n_slots=settings.max_batch_size, compile=settings.compile,
                          prefix_cache=settings.prefix_cache == "on",
                          speculative=DraftParams(k=settings.speculative) if settings.speculative else None)
    worker = EngineWorker(engine, metrics, settings.max_queue, device, dtype, settings.num_threads)
    worker.start()  # with --compile on its graphs compile first, before /health says ok
    return ServedModel(path, model, tokenizer, worker, template, "int8" if is_quantized(model) else "none",
                       parameters, device, dtype, GrammarVocabulary(tokenizer), reward_path, reward)


def check_reward_checkpoint(path: Path, fingerprint: str | None) -> None:
    """UsageError unless ``path`` is a file whose recorded tokenizer fingerprint (if any) is ``fingerprint``."""
    if not path.is_file():
        raise UsageError(f"--reward_model {path} is not a file; pass a reward-model checkpoint (.pth)")
    recorded = checkpoints.checkpoint_metadata(path).get("tokenizer_fingerprint")
    if fingerprint is not None and recorded is not None and recorded != fingerprint:
        raise UsageError(f"--reward_model {path} was trained with another tokenizer than the served model (tokenizer "
                         "fingerprint mismatch); pass a reward model trained from the served model's tokenizer")


def load_reward_model(path: Path, tokenizer: Any, tokenizer_dir: Path, device: torch.device) -> GPTRewardModel:
    """The --reward_model checkpoint, on the served model's device, checked against the served tokenizer."""
    check_reward_checkpoint(path, tokenizer.fingerprint)
    return checkpoints.load(path, tokenizer_dir, device, expect="reward", flag="--reward_model").model


def score_candidates(s: ServedModel, prompt_ids: list[int], jobs: Sequence[Job],
                     texts: Sequence[str]) -> list[float]:
    """best_of scores (in the scorer thread): the reward model's score of the prompt + `text </s>` when one is loaded,
    else the mean log-prob of each candidate's sampled tokens (its </s> included) under the served model."""
    with autocast_context(s.device, s.dtype):  # autocast state is per thread
        if s.reward_model is not None:
            return reward_scores(s.reward_model, s.tokenizer, [prompt_ids] * len(texts), texts, s.device)
        return mean_token_logprobs(s.model, prompt_ids, [job.sequence.output_ids for job in jobs])


def candidate_seeds(seed: int | None, n: int) -> list[int | None]:
    """Sampling seeds of a request's n best-of candidates: seed, seed + 1, ... (mod 2^63), so a fixed seed gives the
    same candidates again and candidate 0 is what the request samples alone; without a seed, n unseeded draws."""
    return [None] * n if seed is None else [(seed + i) % 2**63 for i in range(n)]


@torch.inference_mode()
def mean_token_logprobs(model: torch.nn.Module, prompt_ids: Sequence[int],
                        responses: Sequence[Sequence[int]]) -> list[float]:
    """Mean log-prob per token of each response after ``prompt_ids`` under the model's own distribution (temperature
    1, no top-k / top-p): OpenAI's best_of rule. One right-padded forward pass; the LM head runs on the responses."""
    rows = [list(prompt_ids) + list(r) for r in responses]
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, (row, response) in enumerate(zip(rows, responses)):
        ids[i, :len(row)] = torch.tensor(row)
        labels[i, len(prompt_ids):len(row)] = torch.tensor(list(response))
    device = next(model.parameters()).device
    start = len(prompt_ids) - 1  # the position that predicts the first response token
    hidden = model.hidden_states(ids.to(device))[:, start:]  # right padding: causal attention is exact
    return sequence_logprobs(model.lm_head(hidden), labels[:, start:].to(device), average=True).tolist()
