"""Byte-level BPE tokenizer (GPT-2 style), pure Python + `regex`.

Text is split into pre-tokens with GPT-2's regex, each pre-token is turned into UTF-8 bytes, and
learned merges are applied inside each pre-token by rank. Ids: special tokens first (default
``<s> <pad> </s> <unk>`` = 0..3, then the chat format's ``<|system|> <|user|> <|assistant|> <|end|>`` = 4..7), then
the 256 byte tokens, then one id per merge. A tokenizer trained before the chat tokens gets them appended after its
last id (``with_special_tokens``). Files are saved
in the GPT-2 / Hugging Face format (``vocab.json`` + ``merges.txt``) plus ``tokenizer_config.json``.

CLI: ``python byte_level_bpe.py --input data/pretrain/train.txt --vocab_size 8000 --output models/bpe_tokenizer``

Training memory is bounded by the corpus's distinct pre-tokens, not its size: documents are streamed from the reader
and only a Counter of pre-tokens is kept (``_count_pretokens``); ``--max_train_bytes`` learns from a prefix of the
corpus when even reading all of it would take too long.
"""
from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable
from pathlib import Path
from typing import Iterator, Literal, Sequence

import regex
from tqdm import tqdm

import cli
from atomic_file import atomic_directory, remove_stale_temps
from prompts import CHAT_TOKENS
from readers import DEFAULT_TEXT_FIELD, data_files, read_documents

GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
DEFAULT_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", *CHAT_TOKENS]
ROLES = ("bos", "pad", "eos", "unk")  # roles of the first four special tokens, in this order
GPT2_ENDOFTEXT = "<|endoftext|>"
MAX_CACHE_ENTRIES = 65_536  # pre-tokens cached per process, cleared when full: memory stays flat (on 8 MB
# of generated text it encodes as fast as a 500,000-entry cache: benchmarks/bench_scale.py). The pre-tokens that are
# one whole token (at most one entry per vocabulary token) are kept on top of these and survive a clear.
CHUNK_CHARS = 1 << 16  # text per worker task in encode_many
NO_MERGE = 1 << 62  # rank of a pair that has no merge
LONG_PIECE = 256  # bytes of a pre-token past which _bpe_heap (n log n) beats _bpe's list scans
# training counts a longer pre-token (a line of CJK or of one repeated letter has no split points) as pieces of this
# many characters: every merge rescans each word that holds its pair, so one 300,000-character word made each of
# thousands of merges scan all of it (72 s at --vocab_size 8000 for one such line; a few seconds once cut). Tokens
# longer than this are never learned, which costs nothing: real tokens are a few characters long.
MAX_TRAIN_PIECE_CHARS = 256
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")
# pre-tokens counted per Counter.update: ~4 MB of pending strings at most, and few enough calls to cost nothing
PRETOKEN_BATCH = 1 << 16


class TokenizerError(ValueError):
    """Bad tokenizer input, files or arguments; the message says what is wrong and how to fix it."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table (so vocab files hold no raw bytes)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


BYTE_ENCODER = bytes_to_unicode()
BYTE_DECODER = {c: b for b, c in BYTE_ENCODER.items()}


def token_to_str(token: bytes) -> str:
    return "".join(BYTE_ENCODER[b] for b in token)


def str_to_token(text: str) -> bytes | None:
    """Inverse of token_to_str; None when `text` is not in byte-unicode form."""
    try:
        return bytes(BYTE_DECODER[c] for c in text)
    except KeyError:
        return None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class ByteLevelBPETokenizer:
    """GPT-2 style byte-level BPE: train, encode, decode, save and load."""

    def __init__(self, vocab_size: int = 50000, special_tokens: list[str] | None = None):
        if not _is_int(vocab_size):
            raise TokenizerError(f"vocab_size must be an int, got {vocab_size!r}")
        if special_tokens is not None and (isinstance(special_tokens, str)
                                           or not isinstance(special_tokens, (list, tuple))):
            raise TokenizerError(f"special_tokens must be a list of strings, got {special_tokens!r}")
        specials = list(DEFAULT_SPECIAL_TOKENS if special_tokens is None else special_tokens)
        if (len(specials) < len(ROLES) or len(set(specials)) != len(specials)
                or not all(isinstance(s, str) and s for s in specials)):
            raise TokenizerError("special_tokens must be >= 4 distinct non-empty strings (bos, pad, eos, unk first), "
                                 f"got {specials!r}")
        if vocab_size < 256 + len(specials):
            raise TokenizerError(f"vocab_size={vocab_size} is too small: it must be at least 256 byte tokens + "
                                 f"{len(specials)} special tokens = {256 + len(specials)}")
        self.target_vocab_size = vocab_size
        id_to_bytes = [s.encode("utf-8") for s in specials] + [bytes([b]) for b in range(256)]
        special_ids = {s: i for i, s in enumerate(specials)}
        self._set_state(id_to_bytes, special_ids, dict(zip(ROLES, range(len(ROLES)))), [])

    # ----- state -------------------------------------------------------------------------------
    def _set_state(self, id_to_bytes: list[bytes], special_ids: dict[str, int], role_ids: dict[str, int],
                   merges: list[tuple[int, int]]) -> None:
        """Install vocab (id -> bytes; specials hold their UTF-8 text), specials, roles and merges in rank order."""
        self._id_to_bytes = id_to_bytes
        self._special_ids = dict(special_ids)
        self._special_id_set = frozenset(special_ids.values())
        self._role_ids = dict(role_ids)
        self._merge_list = list(merges)
        self._bytes_to_id = {b: i for i, b in enumerate(id_to_bytes) if i not in self._special_id_set}
        self._byte_ids = [self._bytes_to_id[bytes([b])] for b in range(256)]
        self._ranks: dict[tuple[int, int], int] = {}
        self._merge_ids: dict[tuple[int, int], int] = {}
        for rank, (a, b) in enumerate(merges):
            # a repeated pair keeps its first rank (Hugging Face keeps the last, so training never writes one)
            if (a, b) not in self._ranks:
                self._ranks[(a, b)] = rank
                self._merge_ids[(a, b)] = self._bytes_to_id[id_to_bytes[a] + id_to_bytes[b]]
        self._decode_table = [b"" if i in self._special_id_set else t for i, t in enumerate(id_to_bytes)]
        self._pattern = regex.compile(GPT2_SPLIT_PATTERN)
        self._special_pattern_cache: dict[frozenset[str], regex.Pattern] = {}
        self._whole_tokens = self._single_token_pieces()
        self._cache: dict[str, list[int]] = dict(self._whole_tokens)
        self.__dict__.pop("_fingerprint", None)
        self.__dict__.pop("_vocab", None)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = dict(self._whole_tokens)
        state["_special_pattern_cache"] = {}
        return state

    # ----- properties --------------------------------------------------------------------------
    @property
    def bos_token_id(self) -> int:
        return self._role_ids["bos"]

    @property
    def pad_token_id(self) -> int:
        return self._role_ids["pad"]

    @property
    def eos_token_id(self) -> int:
        return self._role_ids["eos"]

    @property
    def unk_token_id(self) -> int:
        return self._role_ids["unk"]

    @property
    def special_tokens(self) -> list[str]:
        return sorted(self._special_ids, key=self._special_ids.get)

    def special_token_id(self, token: str) -> int | None:
        """The id of a special token (None when the tokenizer has no such special token)."""
        return self._special_ids.get(token)

    def with_special_tokens(self, tokens: Sequence[str]) -> "ByteLevelBPETokenizer":
        """A copy with each of ``tokens`` it lacks added as a special token after the last id (merges, ids of every
        existing token and so every encoding of plain text unchanged)."""
        new = [t for t in dict.fromkeys(tokens) if t not in self._special_ids]
        if not all(isinstance(t, str) and t for t in new):
            raise TokenizerError(f"special tokens must be non-empty strings, got {list(tokens)!r}")
        clash = [t for t in new if t.encode("utf-8") in self._bytes_to_id]
        if clash:
            raise TokenizerError(f"{clash} already exist as ordinary tokens; special tokens must be new strings")
        copy = self.__class__.__new__(self.__class__)
        copy.target_vocab_size = len(self) + len(new)
        ids = {**self._special_ids, **{t: len(self) + i for i, t in enumerate(new)}}
        copy._set_state(self._id_to_bytes + [t.encode("utf-8") for t in new], ids, self._role_ids, self._merge_list)
        return copy

    @property
    def merges(self) -> list[tuple[str, str]]:
        """Merges in rank order, as pairs of byte-unicode token strings (the merges.txt lines)."""
        return [(self._token_str(a), self._token_str(b)) for a, b in self._merge_list]

    @property
    def vocab(self) -> dict[str, int]:
        """token string -> id (a copy); specials as written, other tokens in GPT-2's byte-unicode form."""
        if "_vocab" not in self.__dict__:
            self._vocab = {self._token_str(i): i for i in range(len(self._id_to_bytes))}
        return dict(self._vocab)

    def __len__(self) -> int:
        return len(self._id_to_bytes)

    @property
    def fingerprint(self) -> str:
        """sha256 of vocab, merges and specials: the cache key of tokenized data."""
        if "_fingerprint" not in self.__dict__:
            payload = {
                "vocab": [self._token_str(i) for i in range(len(self))],
                "merges": [list(m) for m in self._merge_list],
                "special_tokens": self._special_ids,
                "roles": self._role_ids,
                "pre_tokenizer": "gpt2",
            }
            blob = json.dumps(payload, ensure_ascii=False, sort_keys=True).encode("utf-8")
            self._fingerprint = hashlib.sha256(blob).hexdigest()
        return self._fingerprint

    def _token_str(self, token_id: int) -> str:
        token = self._id_to_bytes[token_id]
        return token.decode("utf-8") if token_id in self._special_id_set else token_to_str(token)

    # ----- training ----------------------------------------------------------------------------
    def train(self, texts: Iterable[str], min_frequency: int = 2, show_progress: bool = True) -> None:
        """Learn merges from `texts` (any iterable, e.g. a file streamed line by line) until vocab_size."""
        if not _is_int(min_frequency) or min_frequency < 1:
            raise TokenizerError(f"min_frequency must be an int >= 1, got {min_frequency!r}")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, Iterable):
            raise TokenizerError(f"train() needs an iterable of strings, got {type(texts).__name__}")
        word_counts = self._count_pretokens(texts)
        if not word_counts:
            raise TokenizerError("no training text: the input is empty; pass a non-empty iterable of strings")
        if all(piece.isspace() for piece in word_counts):
            raise TokenizerError("nothing to learn: the training text is only whitespace; pass real text")
        specials = {s: i for i, s in enumerate(self.special_tokens)}
        id_to_bytes = [s.encode("utf-8") for s in specials] + [bytes([b]) for b in range(256)]
        byte_ids = list(range(len(specials), len(specials) + 256))  # ids: specials, then the 256 bytes
        merges = _learn_merges(word_counts, id_to_bytes, byte_ids, self.target_vocab_size, min_frequency,
                               set(specials), show_progress)
        if not merges and self.target_vocab_size > len(id_to_bytes):  # e.g. only blank or one-character lines
            raise TokenizerError(f"nothing to learn: no pair of bytes occurs {min_frequency} time(s) in the training "
                                 "text (it is only whitespace or single characters); pass real text")
        self._set_state(id_to_bytes, specials, {r: specials[s] for r, s in zip(ROLES, self.special_tokens)}, merges)

    def _count_pretokens(self, texts: Iterable[str]) -> Counter:
        """pre-token -> count, splitting each text on its own (exactly as encode() will). ``texts`` is consumed as a
        stream: memory holds the Counter and at most ~1M pending pieces, never the texts themselves."""
        counts: Counter = Counter()
        findall = self._pattern.findall
        pieces: list[str] = []
        for text in texts:
            if not isinstance(text, str):
                raise TokenizerError(f"train() needs strings, got {type(text).__name__}; decode bytes to str first")
            pieces += _cut_long_pieces(findall(text))
            if len(pieces) > PRETOKEN_BATCH:  # batched: Counter.update runs in C, and memory stays bounded
                counts.update(pieces)
                pieces = []
        counts.update(pieces)
        return counts

    # ----- encoding ----------------------------------------------------------------------------
    def _bpe(self, piece: str) -> list[int]:
        """Apply merges to one pre-token: repeatedly merge the leftmost lowest-rank adjacent pair."""
        byte_ids = self._byte_ids
        ids = [byte_ids[b] for b in piece.encode("utf-8")]
        if len(ids) < 2:
            return ids
        if len(ids) > LONG_PIECE:
            return self._bpe_heap(ids)
        rank_of = self._ranks.get
        no_merge = NO_MERGE
        # ranks[k] = rank of (ids[k], ids[k + 1]); min/index run in C, only neighbours are recomputed
        ranks = [rank_of(p, no_merge) for p in zip(ids, ids[1:])]
        while True:
            best = min(ranks)
            if best == no_merge:
                return ids
            i = ranks.index(best)
            ids[i : i + 2] = (self._merge_ids[(ids[i], ids[i + 1])],)
            if len(ids) == 1:
                return ids
            del ranks[i]
            if i > 0:
                ranks[i - 1] = rank_of((ids[i - 1], ids[i]), no_merge)
            if i < len(ids) - 1:
                ranks[i] = rank_of((ids[i], ids[i + 1]), no_merge)

    def _single_token_pieces(self) -> dict[str, list[int]]:
        """{text: [id]} for every token whose text BPE encodes as that one token: found at load, so a cold encode
        (and one after the cache was cleared) merges only the pre-tokens that are not a word of the vocabulary
        (half the distinct pre-tokens of Shakespeare, their shorter half)."""
        whole = {}
        for token_id, raw in enumerate(self._id_to_bytes):
            if token_id in self._special_id_set or len(raw) < 2:
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # part of a character: never a whole pre-token
                continue
            if self._bpe(text) == [token_id]:  # not every merge result re-forms from its own bytes
                whole[text] = [token_id]
        return whole

    def _bpe_heap(self, ids: list[int]) -> list[int]:
        """The same merges as ``_bpe`` in O(n log n) for a long pre-token (``_bpe`` is quadratic in its length): a
        heap of (rank, position) over a linked list; the lowest rank, then the leftmost, merges first, as there."""
        rank_of, merge_ids = self._ranks.get, self._merge_ids
        nxt, prv = list(range(1, len(ids) + 1)), list(range(-1, len(ids) - 1))
        nxt[-1] = -1
        heap = [(rank, i) for i, pair in enumerate(zip(ids, ids[1:])) if (rank := rank_of(pair)) is not None]
        heapq.heapify(heap)
        alive = [True] * len(ids)
        while heap:
            rank, i = heapq.heappop(heap)
            j = nxt[i]
            if not alive[i] or j < 0 or rank_of((ids[i], ids[j])) != rank:
                continue  # a stale entry: one side was merged away since it was pushed
            ids[i], alive[j] = merge_ids[(ids[i], ids[j])], False
            nxt[i] = nxt[j]
            if nxt[j] >= 0:
                prv[nxt[j]] = i
            for left, right in ((prv[i], i), (i, nxt[i])):
                if left >= 0 and right >= 0 and (r := rank_of((ids[left], ids[right]))) is not None:
                    heapq.heappush(heap, (r, left))
        return [t for t, keep in zip(ids, alive) if keep]

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of `text` with no special tokens and no truncation (the fast path)."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode_ordinary() needs a str, got {type(text).__name__}")
        cache = self._cache
        if len(cache) > MAX_CACHE_ENTRIES + len(self._whole_tokens):
            cache.clear()
            cache.update(self._whole_tokens)
        out: list[int] = []
        extend, cached = out.extend, cache.get
        for piece in self._pattern.findall(text):
            ids = cached(piece)
            if ids is None:
                ids = cache[piece] = self._bpe(piece)
            extend(ids)
        return out

    def _encode_with_specials(self, text: str, allowed_special: set[str] | frozenset[str] | str) -> list[int]:
        if allowed_special == "all":
            allowed = frozenset(self._special_ids)
        elif isinstance(allowed_special, str):
            raise TokenizerError(f"allowed_special must be a set of special tokens or 'all', got {allowed_special!r}")
        else:
            allowed = frozenset(allowed_special)
            unknown = allowed - self._special_ids.keys()
            if unknown:
                raise TokenizerError(f"allowed_special has tokens that are not special tokens: {sorted(unknown)}; "
                                     f"known: {self.special_tokens}")
        if not allowed:
            return self.encode_ordinary(text)
        pattern = self._special_pattern_cache.get(allowed)
        if pattern is None:
            alternation = "|".join(regex.escape(s) for s in sorted(allowed, key=len, reverse=True))
            pattern = self._special_pattern_cache[allowed] = regex.compile(f"({alternation})")
        ids: list[int] = []
        for i, part in enumerate(pattern.split(text)):
            if i % 2:
                ids.append(self._special_ids[part])
            elif part:
                ids.extend(self.encode_ordinary(part))
        return ids

    def encode(
        self,
        text: str,
        max_seq_len: int | None = None,
        add_special_tokens: bool = True,
        padding: bool = False,
        truncation: bool = True,
        allowed_special: set[str] | Literal["all"] = frozenset(),
    ) -> dict[str, list[int]]:
        """Encode one text to ``{"input_ids", "attention_mask"}`` (plain lists).

        add_special_tokens wraps in ``<s> ... </s>``; truncation keeps the first max_seq_len ids (``</s>``
        stays last); padding=True pads with pad id up to max_seq_len. Special tokens written in `text`
        are plain bytes unless listed in allowed_special (so user text cannot inject control tokens).
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode() needs a str, got {type(text).__name__}")
        if max_seq_len is not None and (not _is_int(max_seq_len) or max_seq_len < 1):
            raise TokenizerError(f"max_seq_len must be a positive int or None, got {max_seq_len}")
        if padding and max_seq_len is None:
            raise TokenizerError("padding=True needs max_seq_len (the length to pad to)")
        ids = self._encode_with_specials(text, allowed_special)
        if add_special_tokens:
            ids = [self.bos_token_id, *ids, self.eos_token_id]
        if truncation and max_seq_len is not None and len(ids) > max_seq_len:
            ids = ids[: max_seq_len - 1] + [self.eos_token_id] if add_special_tokens else ids[:max_seq_len]
        mask = [1] * len(ids)
        if padding and len(ids) < max_seq_len:
            n_pad = max_seq_len - len(ids)
            ids = ids + [self.pad_token_id] * n_pad
            mask = mask + [0] * n_pad
        return {"input_ids": ids, "attention_mask": mask}

    def encode_batch(self, texts: list[str], **encode_kwargs) -> list[dict[str, list[int]]]:
        return [self.encode(text, **encode_kwargs) for text in texts]

    def encode_many(self, texts: Iterable[str], num_workers: int | None = None,
                    show_progress: bool = False) -> Iterator[list[int]]:
        """encode_ordinary over many texts, in order, across `num_workers` processes (None = all cores)."""
        num_workers = (os.cpu_count() or 1) if num_workers is None else num_workers
        if not _is_int(num_workers) or num_workers < 1:
            raise TokenizerError(f"num_workers must be >= 1 or None, got {num_workers}")
        bar = tqdm(desc="encoding", unit="text", disable=not show_progress)
        if num_workers == 1 or multiprocessing.current_process().daemon:  # daemon processes cannot have children
            for text in texts:
                yield self.encode_ordinary(text)
                bar.update(1)
        else:
            yield from self._encode_parallel(texts, num_workers, bar)
        bar.close()

    def _encode_parallel(self, texts: Iterable[str], num_workers: int, bar: tqdm) -> Iterator[list[int]]:
        # fork: workers start instantly and also work from scripts without a file (stdin, -c); the
        # workers only run Python + regex, never torch, so inherited threads are not touched there
        ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        pending: deque = deque()
        with ctx.Pool(num_workers, initializer=_init_worker, initargs=(self,)) as pool:
            for chunk in _chunk_texts(texts, CHUNK_CHARS):
                pending.append(pool.apply_async(_encode_chunk, (chunk,)))
                while len(pending) >= 4 * num_workers:  # bounded: a huge file never sits in memory
                    yield from self._drain(pending.popleft(), bar)
            while pending:
                yield from self._drain(pending.popleft(), bar)

    @staticmethod
    def _drain(result, bar: tqdm) -> Iterator[list[int]]:
        ids_list = result.get()
        bar.update(len(ids_list))
        yield from ids_list

    # ----- decoding ----------------------------------------------------------------------------
    def decode_bytes(self, ids: Sequence[int], skip_special_tokens: bool = True) -> bytes:
        """Raw bytes of `ids` (exact byte accounting; may be invalid UTF-8 for arbitrary ids)."""
        if hasattr(ids, "tolist"):  # torch.Tensor / numpy array, without importing torch here
            ids = ids.tolist()
        if isinstance(ids, int) and not isinstance(ids, bool):
            ids = [ids]
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise TokenizerError(f"decode() needs a sequence of int ids, got {type(ids).__name__}")
        table = self._decode_table if skip_special_tokens else self._id_to_bytes
        try:
            out = b"".join([table[i] for i in ids])
            if ids and min(ids) < 0:  # a negative index would silently pick a token from the end
                raise IndexError
            return out
        except (IndexError, TypeError):
            bad = next((i for i in ids if not _is_int(i) or not 0 <= i < len(table)), ids)
            raise TokenizerError(f"cannot decode id {bad!r}: ids must be ints in [0, {len(table)})") from None

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` in whole characters: a character cut off at the end (generation stopped inside it) is
        left out; other invalid UTF-8 (possible for arbitrary ids) becomes U+FFFD."""
        raw = self.decode_bytes(ids, skip_special_tokens)
        return raw[:len(raw) - incomplete_tail(raw)].decode("utf-8", errors="replace")

    # ----- files -------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """Write vocab.json + merges.txt (GPT-2 / Hugging Face format) and tokenizer_config.json, all or none.

        The files are written to a temporary folder that then replaces ``directory`` as a whole, so a crash never
        leaves a vocab.json and a merges.txt that do not belong together. Other files already in the folder are kept.
        """
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise TokenizerError(f"{directory} is a file: pass a folder to save the tokenizer into")
        others = [p for p in directory.iterdir() if p.name not in TOKENIZER_FILES] if directory.is_dir() else []
        if any(p.is_dir() for p in others):
            raise TokenizerError(f"{directory} holds folders besides the tokenizer files: save the tokenizer into a "
                                 f"folder of its own (e.g. {directory / 'tokenizer'})")
        vocab_json = json.dumps(self.vocab, ensure_ascii=False, indent=0)
        merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges)
        config = {
            "tokenizer_class": "ByteLevelBPETokenizer",
            "pre_tokenizer": "gpt2",
            "vocab_size": len(self),
            "special_tokens": self._special_ids,
            **{f"{role}_token": self._token_str(i) for role, i in self._role_ids.items()},
        }
        contents = (vocab_json, merges_txt, json.dumps(config, ensure_ascii=False, indent=2))
        remove_stale_temps(directory.parent)
        with atomic_directory(directory) as tmp:
            for name, content in zip(TOKENIZER_FILES, contents):
                (tmp / name).write_text(content + ("" if content.endswith("\n") else "\n"), encoding="utf-8")
            for other in others:  # keep the user's other files: hard links cost nothing
                try:
                    os.link(other, tmp / other.name)
                except OSError:
                    shutil.copy2(other, tmp / other.name)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "ByteLevelBPETokenizer":
        """Load a directory written by save(), or any GPT-2-format vocab.json + merges.txt pair.

        Without tokenizer_config.json the special tokens are the vocab entries that are neither byte
        tokens nor merge results; OpenAI GPT-2's only one, ``<|endoftext|>``, serves as bos, eos, pad and unk.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise TokenizerError(f"tokenizer directory {str(directory)!r} does not exist; "
                                 f"train one with `python byte_level_bpe.py --input ... --output {directory}`")
        vocab = _read_json(directory / "vocab.json")
        if not isinstance(vocab, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()):
            raise TokenizerError(f"{directory / 'vocab.json'} must be a JSON object of token string -> int id")
        merge_strs = _read_merges(directory / "merges.txt")
        config_path = directory / "tokenizer_config.json"
        if config_path.exists():
            special_ids, role_ids = _configured_specials(_read_json(config_path), vocab, config_path)
        else:
            merged_strs = {a + b for a, b in merge_strs}
            special_ids = {t: vocab[t] for t in vocab
                           if str_to_token(t) is None or (len(t) > 1 and t not in merged_strs)}
            role_ids = _guess_roles(special_ids, directory)
        id_to_bytes = _id_to_bytes(vocab, special_ids, directory / "vocab.json")
        merges = []
        for line_no, (a, b) in enumerate(merge_strs, start=2):
            ids = vocab.get(a), vocab.get(b), vocab.get(a + b)
            if None in ids or any(i in special_ids.values() for i in ids):
                raise TokenizerError(f"{directory / 'merges.txt'}:{line_no}: merge '{a} {b}' uses or makes a token "
                                     "missing from vocab.json (or a special token); the files do not belong together")
            merges.append((ids[0], ids[1]))
        tokenizer = cls.__new__(cls)
        tokenizer.target_vocab_size = len(vocab)
        tokenizer._set_state(id_to_bytes, special_ids, role_ids, merges)
        return tokenizer


def incomplete_tail(raw: bytes) -> int:
    """How many bytes at the end of ``raw`` start a UTF-8 character that they do not finish (0, 1, 2 or 3)."""
    for back in range(1, min(4, len(raw) + 1)):
        byte = raw[-back]
        if byte & 0xC0 == 0x80:  # a continuation byte: look further back for the character's lead byte
            continue
        if byte < 0xC0:
            return 0
        needed = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
        return back if back < needed else 0
    return 0


def _configured_specials(config, vocab: dict[str, int], config_path: Path) -> tuple[dict[str, int], dict[str, int]]:
    """(special token -> id, role -> id) of a tokenizer_config.json (ours, or a Hugging Face one with its special
    tokens in ``added_tokens_decoder``, as an exported model folder has), checked against vocab.json."""
    special_ids = config.get("special_tokens") if isinstance(config, dict) else None
    if special_ids is None and isinstance(config, dict) and isinstance(config.get("added_tokens_decoder"), dict):
        special_ids = {entry.get("content"): int(i) for i, entry in config["added_tokens_decoder"].items()
                       if isinstance(entry, dict) and entry.get("special") and str(i).isdigit()}
    if not isinstance(special_ids, dict):
        raise TokenizerError(f"{config_path}: missing 'special_tokens' mapping; re-save the tokenizer")
    for token, i in special_ids.items():
        if vocab.get(token) != i:
            raise TokenizerError(f"{config_path}: special token {token!r} has id {i} but vocab.json says "
                                 f"{vocab.get(token)}; the files are inconsistent")
    role_ids = {}
    for role in ROLES:
        token = config.get(f"{role}_token")
        if token not in special_ids:
            raise TokenizerError(f"{config_path}: {role}_token {token!r} is not one of the special tokens "
                                 f"{list(special_ids)}")
        role_ids[role] = special_ids[token]
    return special_ids, role_ids


def _id_to_bytes(vocab: dict[str, int], special_ids: dict[str, int], vocab_path: Path) -> list[bytes]:
    """Each id's bytes (a special token: its UTF-8 text), checked to cover 0..n-1 and all 256 byte tokens."""
    n = len(vocab)
    id_to_str: list[str | None] = [None] * n
    for token, i in vocab.items():
        if not 0 <= i < n or id_to_str[i] is not None:
            raise TokenizerError(f"{vocab_path}: ids must be unique and cover 0..{n - 1}; id {i} ({token!r}) breaks "
                                 "that")
        id_to_str[i] = token
    id_to_bytes: list[bytes] = []
    for i, token in enumerate(id_to_str):
        raw = token.encode("utf-8") if token in special_ids else str_to_token(token)
        if raw is None:
            raise TokenizerError(f"{vocab_path}: token {token!r} (id {i}) is not in GPT-2 byte-unicode form and not a "
                                 "special token")
        id_to_bytes.append(raw)
    plain = {b for i, b in enumerate(id_to_bytes) if i not in special_ids.values()}
    missing = [b for b in range(256) if bytes([b]) not in plain]
    if missing:
        raise TokenizerError(f"{vocab_path} lacks {len(missing)} of the 256 byte tokens (e.g. byte {missing[0]}); it "
                             "is not a byte-level BPE vocab")
    return id_to_bytes


# ----- training core (module level so it is easy to profile) -----------------------------------
def _learn_merges(
    word_counts: Counter,
    id_to_bytes: list[bytes],
    byte_ids: list[int],
    vocab_size: int,
    min_frequency: int,
    special_strs: set[str],
    show_progress: bool,
) -> list[tuple[int, int]]:
    """Incremental BPE: pair counts + pair -> words index + lazy max-heap; ties -> smallest byte strings.

    Mutates id_to_bytes (appends new tokens) and returns merges in rank order.
    """
    words = [[byte_ids[b] for b in w.encode("utf-8")] for w in word_counts]
    freqs = list(word_counts.values())
    pair_counts: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], set[int]] = {}
    for w, (word, f) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] = pair_counts.get(pair, 0) + f
            s = where.get(pair)
            if s is None:
                where[pair] = {w}
            else:
                s.add(w)
    heap = [(-c, id_to_bytes[a], id_to_bytes[b], (a, b)) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)
    # a merge must never create a token whose vocab.json key equals a special token's (no collision, no injection)
    banned = {raw for raw in map(str_to_token, special_strs) if raw is not None}
    bytes_to_id = {t: i for i, t in enumerate(id_to_bytes) if i >= len(special_strs)}
    merges: list[tuple[int, int]] = []
    done: set[tuple[int, int]] = set()
    bar = tqdm(total=vocab_size - len(id_to_bytes), desc="bpe merges", unit="merge", disable=not show_progress)
    while len(id_to_bytes) < vocab_size and heap:
        neg_count, bytes_a, bytes_b, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count != -neg_count:  # stale entry: re-queue with its current count
            if count > 0:
                heapq.heappush(heap, (-count, bytes_a, bytes_b, pair))
            continue
        if count < min_frequency:
            break
        new_bytes = bytes_a + bytes_b
        if new_bytes in banned or pair in done:
            continue
        new_id = bytes_to_id.get(new_bytes)
        if new_id is None:  # the same string can arise from two different splits: reuse its id
            new_id = bytes_to_id[new_bytes] = len(id_to_bytes)
            id_to_bytes.append(new_bytes)
            bar.update(1)
        merges.append(pair)
        done.add(pair)
        increased = _apply_merge(pair, new_id, words, freqs, pair_counts, where)
        for p in increased:
            heapq.heappush(heap, (-pair_counts[p], id_to_bytes[p[0]], id_to_bytes[p[1]], p))
    bar.close()
    return merges


def _apply_merge(pair, new_id, words, freqs, pair_counts, where) -> list[tuple[int, int]]:
    """Merge `pair` in every word listed for it, updating only the pairs next to each merge.

    Returns the pairs that gained count (to push on the heap). `where` may list words that no
    longer hold a pair (entries are only ever added, never removed): those are skipped here.
    """
    a, b = pair
    touched = set()
    for w in where.pop(pair):
        word = words[w]
        n_a = word.count(a)
        if not n_a:
            continue
        n = len(word)
        starts = []  # left-to-right, non-overlapping occurrences of (a, b)
        j = 0
        try:
            for _ in range(n_a):
                j = word.index(a, j)
                if j + 1 < n and word[j + 1] == b:
                    starts.append(j)
                    j += 2
                else:
                    j += 1
        except ValueError:  # only when a == b: a merge consumed one of the counted a's
            pass
        if not starts:
            continue
        f = freqs[w]
        merged, done, last = [], 0, -2
        for j in starts:
            merged += word[done:j]
            merged.append(new_id)
            if j > 0 and j != last + 2:  # (prev, a); when j == last + 2 it was counted as (b, a) below
                p = (word[j - 1], a)
                pair_counts[p] -= f
            if j + 2 < n:  # (b, next)
                p = (b, word[j + 2])
                pair_counts[p] -= f
            done, last = j + 2, j
        merged += word[done:]
        m, last = len(merged), -2
        for i, j in enumerate(starts):
            k = j - i  # position of this new token in merged
            if k > 0 and k != last + 1:  # (prev, new); when k == last + 1 it was added as (new, new) below
                p = (merged[k - 1], new_id)
                pair_counts[p] = pair_counts.get(p, 0) + f
                touched.add(p)
                where.setdefault(p, set()).add(w)
            if k + 1 < m:  # (new, next)
                p = (new_id, merged[k + 1])
                pair_counts[p] = pair_counts.get(p, 0) + f
                touched.add(p)
                where.setdefault(p, set()).add(w)
            last = k
        words[w] = merged
    pair_counts.pop(pair, None)
    return [p for p in touched if pair_counts.get(p, 0) > 0]


# ----- helpers -----------------------------------------------------------------------------------
def _cut_long_pieces(pieces: list[str], size: int = MAX_TRAIN_PIECE_CHARS) -> list[str]:
    """Pre-tokens longer than ``size`` characters cut into pieces of ``size`` (for training's counts only)."""
    if all(len(piece) <= size for piece in pieces):
        return pieces
    return [piece[i:i + size] for piece in pieces for i in range(0, len(piece), size)]


def _chunk_texts(texts: Iterable[str], chunk_chars: int) -> Iterator[list[str]]:
    chunk, size = [], 0
    for text in texts:
        chunk.append(text)
        size += len(text) + 1
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


_WORKER_TOKENIZER: ByteLevelBPETokenizer | None = None


def _init_worker(tokenizer: ByteLevelBPETokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _encode_chunk(texts: list[str]) -> list[list[int]]:
    return [_WORKER_TOKENIZER.encode_ordinary(t) for t in texts]


def _guess_roles(special_ids: dict[str, int], directory: Path) -> dict[str, int]:
    if all(s in special_ids for s in DEFAULT_SPECIAL_TOKENS):
        return {role: special_ids[s] for role, s in zip(ROLES, DEFAULT_SPECIAL_TOKENS)}
    if GPT2_ENDOFTEXT in special_ids or len(special_ids) == 1:
        token = GPT2_ENDOFTEXT if GPT2_ENDOFTEXT in special_ids else next(iter(special_ids))
        return {role: special_ids[token] for role in ROLES}
    raise TokenizerError(
        f"{directory}: no tokenizer_config.json and the special tokens {sorted(special_ids)} "
        "do not say which is bos/pad/eos/unk; "
        "add a tokenizer_config.json (see save())"
    )


def _read_json(path: Path):
    if not path.is_file():
        raise TokenizerError(f"{path} is missing; "
                             "a tokenizer directory needs vocab.json and merges.txt (written by save())")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path} is not valid UTF-8 JSON ({e}); re-save the tokenizer") from None


def _read_merges(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        raise TokenizerError(f"{path} is missing; "
                             "a tokenizer directory needs vocab.json and merges.txt (written by save())")
    merges = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line or (line_no == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise TokenizerError(f"{path}:{line_no}: expected 'token_a token_b', got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def train_from_path(path: str | os.PathLike, vocab_size: int, min_frequency: int = 2, show_progress: bool = True,
                    text_field: str = DEFAULT_TEXT_FIELD, max_train_bytes: int | None = None) -> ByteLevelBPETokenizer:
    """Train on the documents of a data file or a folder of them (``readers.read_documents``), streamed.
    ``max_train_bytes``: learn from only the first that many bytes of text, in the reader's order (a prefix, not a
    random sample)."""
    tokenizer = ByteLevelBPETokenizer(vocab_size=vocab_size)
    tokenizer.train(read_documents(path, text_field, max_train_bytes), min_frequency=min_frequency,
                    show_progress=show_progress)
    return tokenizer


def bytes_per_token_counts(tokenizer: ByteLevelBPETokenizer, path: str | os.PathLike, num_workers: int | None = None,
                           text_field: str = DEFAULT_TEXT_FIELD, max_bytes: int | None = None) -> tuple[int, int]:
    """(UTF-8 bytes, tokens) of the documents of `path` (the first ``max_bytes`` of them) encoded without specials,
    streamed."""
    n_bytes = 0

    def counted_documents() -> Iterator[str]:
        nonlocal n_bytes
        for document in read_documents(path, text_field, max_bytes):
            n_bytes += len(document.encode("utf-8"))
            yield document

    n_tokens = sum(len(ids) for ids in tokenizer.encode_many(counted_documents(), num_workers=num_workers,
                                                             show_progress=True))
    return n_bytes, n_tokens


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(prog="python byte_level_bpe.py",
                                description="Train a byte-level BPE tokenizer and save it in GPT-2 / Hugging Face "
                                            "format.")
    parser.add_argument("--input", default="data/pretrain/train.txt",
                        help="training text (UTF-8): a .txt (one document per line), .jsonl / .jsonl.gz / .jsonl.zst "
                             "({\"text\": ...} per line) or .parquet file, or a folder of any mix")
    parser.add_argument("--text_field", type=cli.field_name, default=DEFAULT_TEXT_FIELD,
                        help="the field (.jsonl*) or column (.parquet) that holds each document's text")
    parser.add_argument("--max_train_bytes", type=cli.positive_int, default=None,
                        help="learn the merges from only the first N bytes of text, in reading order (files sorted by "
                             "path): a prefix, not a random sample, so mix the files first if their order is "
                             "skewed (default: all of it)")
    parser.add_argument("--vocab_size", type=cli.int_at_least(256 + len(DEFAULT_SPECIAL_TOKENS)), default=8000,
                        help="target vocabulary size incl. 4 special + 256 byte tokens")
    parser.add_argument("--output", default="models/bpe_tokenizer",
                        help="folder to write vocab.json, merges.txt, tokenizer_config.json (replaced as a whole)")
    parser.add_argument("--min_frequency", type=cli.positive_int, default=2,
                        help="stop merging when the best pair occurs fewer times than this")
    parser.add_argument("--num_workers", type=cli.positive_int, default=None,
                        help="processes for the bytes-per-token pass (default: all cores)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; bad input gives one `error:` line and exit 2 (cli.run_cli)."""
    return cli.run_cli(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    cli.check_output_folder(args.output, "--output")  # before minutes of training, not after
    # the folder's other files are kept (save()), so an earlier tokenizer there is this command's own to replace
    cli.check_outputs({"--output": args.output}, [("--input", args.input)], own=Path.is_dir)
    data_files(args.input)
    start = time.perf_counter()
    tokenizer = train_from_path(args.input, args.vocab_size, args.min_frequency, text_field=args.text_field,
                                max_train_bytes=args.max_train_bytes)
    train_s = time.perf_counter() - start
    tokenizer.save(args.output)
    # measured on the text trained on: a capped run over a huge corpus must not then encode all of it
    n_bytes, n_tokens = bytes_per_token_counts(tokenizer, args.input, args.num_workers, args.text_field,
                                               args.max_train_bytes)
    where = f"the first {n_bytes:,} bytes of {args.input}" if args.max_train_bytes else args.input
    print(f"trained in {train_s:.1f}s: vocab {len(tokenizer)} ({len(tokenizer.merges)} merges), "
          f"{n_bytes / max(n_tokens, 1):.2f} bytes/token on {where}, saved to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
