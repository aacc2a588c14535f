"""Which keys and values already in a KV cache a new prompt can reuse: an index of the tokens each cache slot holds,
in blocks of ``block`` tokens named by chained hashes (vLLM's automatic prefix caching), and the slot to evict.

    index = PrefixIndex(n_slots=8)
    index.hold(slot, ids)                 # slot's cache holds the keys/values of ids (full blocks are indexed)
    match = index.longest(prompt_ids)     # Match(slots, n_tokens): reuse n_tokens of one of them, prefill the rest

A block's hash covers every token before it, so equal hashes mean equal prefixes (the tokens are compared too: a hash
collision can only cost a miss, never a wrong answer). Free slots keep what they held until a new sequence needs
their room; ``victim`` picks an empty slot, else the least recently used one. It knows nothing of tensors: the engine
(decoding.DecodeEngine) copies the keys and prefills what is left.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

BLOCK = 16  # tokens per block: reuse is counted in whole blocks (vLLM's default)


def block_hashes(ids: Sequence[int], block: int = BLOCK) -> list[int]:
    """One hash per full block of ids, each covering the block and every token before it."""
    hashes, previous = [], 0
    for start in range(0, len(ids) - block + 1, block):
        previous = hash((previous, tuple(ids[start:start + block])))
        hashes.append(previous)
    return hashes


class Match(NamedTuple):
    slots: frozenset[int]  # every slot holding the longest match
    n_tokens: int  # a multiple of the block, at most len(prompt) - 1 (the last token is always computed)


class PrefixIndex:
    """The full blocks each slot's cache holds, found by hash; a use clock per slot for least-recently-used eviction."""

    def __init__(self, n_slots: int, block: int = BLOCK):
        if block < 1:
            raise ValueError(f"block must be at least 1, got {block}")
        self.block = block
        self.held: list[list[int]] = [[] for _ in range(n_slots)]  # the tokens of each slot's indexed blocks
        self._hashes: list[list[int]] = [[] for _ in range(n_slots)]
        self._holders: dict[int, set[int]] = {}  # block hash -> slots holding that prefix
        self._used = [0] * n_slots
        self._clock = 0

    def hold(self, slot: int, ids: Sequence[int]) -> None:
        """The slot's cache now holds the keys/values of ``ids`` from position 0 (only full blocks are indexed)."""
        self.drop(slot)
        hashes = block_hashes(ids, self.block)
        self.held[slot] = list(ids[:len(hashes) * self.block])
        self._hashes[slot] = hashes
        for h in hashes:
            self._holders.setdefault(h, set()).add(slot)
        self.touch(slot)

    def drop(self, slot: int) -> None:
        """Forget what the slot holds (it is about to be overwritten)."""
        for h in self._hashes[slot]:
            holders = self._holders[h]
            holders.discard(slot)
            if not holders:
                del self._holders[h]
        self.held[slot], self._hashes[slot] = [], []

    def touch(self, slot: int) -> None:
        self._clock += 1
        self._used[slot] = self._clock

    def longest(self, ids: Sequence[int], exclude: frozenset[int] | set[int] = frozenset()) -> Match | None:
        """The slots (none in ``exclude``) holding the longest run of ids' leading blocks, leaving at least one
        token of ids to compute; None when no slot holds even the first block."""
        best: Match | None = None
        alive: set[int] | None = None  # slots whose tokens matched every block so far
        for n_blocks, h in enumerate(block_hashes(ids[:len(ids) - 1], self.block), start=1):
            end = n_blocks * self.block
            tokens = list(ids[end - self.block:end])
            slots = {s for s in self._holders.get(h, ()) if s not in exclude and (alive is None or s in alive)
                     and self.held[s][end - self.block:end] == tokens}
            if not slots:
                break
            alive, best = slots, Match(frozenset(slots), end)
        return best

    def victim(self, free: Sequence[int]) -> int:
        """The free slot to give a new sequence: the lowest one holding nothing, else the least recently used."""
        empty = [s for s in free if not self.held[s]]
        return min(empty) if empty else min(free, key=lambda s: self._used[s])
