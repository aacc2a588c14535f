"""Speculative decoding's two halves, apart from any model: a draft of the next tokens by prompt lookup (the last
n-gram of the sequence found earlier in it, and what followed it there: Saxena's prompt-lookup decoding) and the
rule that keeps the longest run of draft tokens the model agrees with (Leviathan et al. 2023, Chen et al. 2023).

    draft = propose(history, DraftParams(k=4))                    # up to k token ids, or [] when nothing repeats
    tokens = accept(draft, probs)                                 # probs (len(draft) + 1, V): the model's next-token
                                                                  # distributions after each draft prefix
Greedy (``accept_greedy``) keeps draft tokens while they equal the model's argmax and adds the argmax after them: the
tokens of plain greedy decoding. Sampling (``accept``) keeps draft token x with probability min(1, p(x) / q(x)) and on
the first refusal draws from max(p - q, 0) renormalized: each token is distributed as p, whatever the draft (q is
one-hot for a lookup draft, a draft model's distribution otherwise). The engine (decoding.DecodeEngine) verifies a
draft in one forward pass over its KV cache and rolls back the positions refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class DraftParams:
    """Prompt-lookup drafts: up to k tokens after the latest earlier occurrence of the sequence's last n tokens,
    n tried from max_ngram down to min_ngram."""

    k: int = 4
    max_ngram: int = 3
    min_ngram: int = 1

    def __post_init__(self) -> None:
        for name in ("k", "max_ngram", "min_ngram"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.min_ngram > self.max_ngram:
            raise ValueError(f"min_ngram ({self.min_ngram}) must not exceed max_ngram ({self.max_ngram})")


def propose(history: Sequence[int], params: DraftParams, limit: int | None = None) -> list[int]:
    """min(k, limit) tokens that followed the latest earlier occurrence of history's last n tokens (the longest n
    that occurs), the copy running on into the draft itself where the history ends; [] when none occurs."""
    k = params.k if limit is None else min(params.k, limit)
    if k < 1:
        return []
    for n in range(min(params.max_ngram, len(history) - 1), params.min_ngram - 1, -1):
        tail = list(history[len(history) - n:])
        for start in range(len(history) - n - 1, -1, -1):  # latest first: the most local context
            if history[start:start + n] == tail:
                sequence = list(history)
                for position in range(start + n, start + n + k):  # past the end it copies its own draft: a loop
                    sequence.append(sequence[position])           # of period p drafts k tokens, not p
                return sequence[len(history):]
    return []


def accept_greedy(draft: Sequence[int], logits: torch.Tensor) -> list[int]:
    """The draft tokens equal to the argmax of the model's logits (len(draft) + 1, V) before them, up to the first
    that is not, then the model's own argmax there: 1 to len(draft) + 1 tokens, those of plain greedy decoding."""
    best = logits.argmax(dim=-1).tolist()
    out = []
    for token, target in zip(draft, best):
        out.append(target)
        if token != target:
            return out
    return out + [best[len(draft)]]


def accept(draft: Sequence[int], probs: torch.Tensor, draft_probs: torch.Tensor | None = None,
           generator: torch.Generator | None = None) -> list[int]:
    """Speculative sampling: 1 to len(draft) + 1 tokens, each distributed as the target ``probs`` (len(draft) + 1, V)
    after the tokens before it. ``draft_probs`` (len(draft), V) is the draft's own distribution (None: one-hot on the
    draft tokens, as a lookup draft is)."""
    device = probs.device
    for i, token in enumerate(draft):
        p = probs[i]
        q = draft_probs[i] if draft_probs is not None else torch.nn.functional.one_hot(
            torch.tensor(token, device=device), p.numel()).to(p.dtype)
        if torch.rand((), generator=generator, device=device) < p[token] / q[token]:
            continue
        residual = (p - q).clamp(min=0)
        if residual.sum() <= 0:  # p == q exactly: a refusal has probability 0 (rounding); draw from p
            residual = p
        return list(draft[:i]) + [int(torch.multinomial(residual, 1, generator=generator))]
    return list(draft) + [int(torch.multinomial(probs[len(draft)], 1, generator=generator))]
