"""Tests for byte_level_bpe: known answers, round trips, Hugging Face `tokenizers` parity, files, errors."""
from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest
import regex
import torch
from hypothesis import given, settings, strategies as st

import byte_level_bpe
from byte_level_bpe import ByteLevelBPETokenizer, TokenizerError
from cli_cases import assert_one_line_error, run_main, snapshot
from conftest import SAMPLE_ZH, TRAIN_TXT, corpus_lines

tokenizers = pytest.importorskip("tokenizers")

TRICKY_TEXTS = [
    "",
    "hello world",
    "  leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\n\n\n   \n",
    "人工智能是指机器模拟人类智能的技术，涵盖机器学习。",
    "emoji 👩‍👩‍👧‍👦 🎉🎉 flags 🇨🇳🇺🇸",
    "control \x00\x01\x1b[0m\x7f bytes",
    "mixed: it's they're we've I'm you'll he'd 12345 ３４５",
    "</s> <s> <pad> <unk> written literally",
    "ĠĊ byte-unicode look-alikes Ā ÿ",
]

# Random text that stresses the byte level: any code point (no lone surrogates), plus CJK, emoji and whitespace runs.
unicode_text = st.lists(
    st.one_of(
        # Cn excluded: code points unassigned in Python's Unicode 14 tables may be letters to `regex` (newer Unicode)
        # but not to HF's Oniguruma; round trip holds for them too (test_round_trip_random_any_code_point)
        st.characters(exclude_categories=("Cs", "Cn")),
        st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),
        st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF),
        st.sampled_from([" ", "  ", "\t", "\n", "\r\n", "\x0b", "\x0c", "\u3000", "\xa0", "'s", "'ll", " the", "</s>"]),
    ),
    max_size=40,
).map("".join)


def hf_tokenizer(directory):
    return tokenizers.ByteLevelBPETokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))


@pytest.fixture(scope="module")
def hf_tiny(tiny_tokenizer_dir):
    return hf_tokenizer(tiny_tokenizer_dir)


# ----- known answer -----------------------------------------------------------------------------
# Corpus "aaab aaab ab": pre-tokens "aaab", " aaab", " ab" (once each; Ġ = space).
#   pairs: (a,a)=4, (a,b)=3, (Ġ,a)=2           -> merge 1: "a a"   -> id 260; words [aa,a,b] [Ġ,aa,a,b] [Ġ,a,b]
#   pairs: (a,b)=3, (aa,a)=2, (Ġ,aa)=1, (Ġ,a)=1 -> merge 2: "a b"   -> id 261; words [aa,ab] [Ġ,aa,ab] [Ġ,ab]
#   pairs: (aa,ab)=2, (Ġ,aa)=1, (Ġ,ab)=1       -> merge 3: "aa ab" -> id 262; words [aaab] [Ġ,aaab] [Ġ,ab]
#   pairs: (Ġ,aaab)=1, (Ġ,ab)=1: tie, b"aaab" < b"ab" -> merge 4: "Ġ aaab" -> 263, then merge 5: "Ġ ab" -> 264
KNOWN_MERGES = [("a", "a"), ("a", "b"), ("aa", "ab"), ("Ġ", "aaab"), ("Ġ", "ab")]


CLASSIC_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # the hand-worked ids below: 4 specials, then the bytes


def test_known_answer_merges_and_ids():
    tok = ByteLevelBPETokenizer(vocab_size=265, special_tokens=CLASSIC_SPECIALS)
    tok.train(["aaab aaab ab"], min_frequency=1, show_progress=False)
    assert tok.merges == KNOWN_MERGES
    assert len(tok) == 265
    assert ([tok.vocab[t] for t in ("<s>", "<pad>", "</s>", "<unk>", "a", "Ġ", "aa", "ab", "aaab", "Ġaaab", "Ġab")]
            == [0, 1, 2, 3, 4 + 97, 4 + 32, 260, 261, 262, 263, 264])
    assert tok.encode("aaab aaab ab")["input_ids"] == [0, 262, 263, 264, 2]
    # "aaaa": (a,a) has the lowest rank, leftmost first: [a,a,a,a] -> [aa,a,a] -> [aa,aa]
    assert tok.encode_ordinary("aaaa") == [260, 260]
    assert tok.encode_ordinary("ba") == [4 + 98, 4 + 97]


def test_the_default_reserves_the_chat_and_tool_tokens_after_the_four_roles():
    tok = ByteLevelBPETokenizer(vocab_size=300)
    assert tok.special_tokens == [*CLASSIC_SPECIALS, "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
                                  "<|tool_call|>", "<|/tool_call|>", "<|tool_result|>", "<|/tool_result|>"]
    tok.train(["aaab aaab ab"], min_frequency=1, show_progress=False)
    assert tok.merges == KNOWN_MERGES and tok.vocab["a"] == 12 + 97  # the same merges, bytes from id 12
    assert tok.encode("<|user|>hi", allowed_special={"<|user|>"})["input_ids"][1] == tok.special_token_id("<|user|>")
    assert tok.special_token_id("<|nope|>") is None


def test_with_special_tokens_appends_after_the_last_id_and_keeps_every_encoding(tmp_path):
    old = ByteLevelBPETokenizer(vocab_size=265, special_tokens=CLASSIC_SPECIALS)
    old.train(["aaab aaab ab"], min_frequency=1, show_progress=False)
    new = old.with_special_tokens(["<|user|>", "<|end|>", "<s>"])  # <s> exists: kept as is
    assert len(new) == 267 and new.special_token_id("<|user|>") == 265 and new.special_token_id("<|end|>") == 266
    assert new.encode_ordinary("aaab ba") == old.encode_ordinary("aaab ba") and len(old) == 265
    assert new.fingerprint != old.fingerprint and new.decode([265, 262]) == "aaab"
    new.save(tmp_path / "tok")
    again = ByteLevelBPETokenizer.from_pretrained(tmp_path / "tok")
    assert again.fingerprint == new.fingerprint and again.special_token_id("<|end|>") == 266
    with pytest.raises(TokenizerError, match="already exist as ordinary tokens"):
        old.with_special_tokens(["aa"])


def test_min_frequency_stops_training():
    tok = ByteLevelBPETokenizer(vocab_size=1000, special_tokens=CLASSIC_SPECIALS)
    tok.train(["aaab aaab ab"], min_frequency=2, show_progress=False)
    assert tok.merges == KNOWN_MERGES[:3]  # the next best pair occurs once
    assert len(tok) == 263


# ----- round trip ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_round_trip_tricky(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text
    assert tiny_tokenizer.decode_bytes(ids) == text.encode("utf-8")


@settings(max_examples=150, deadline=None)
@given(unicode_text)
def test_round_trip_random(tiny_tokenizer, text):
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text, add_special_tokens=False)["input_ids"]) == text


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40))
def test_round_trip_random_any_code_point(tiny_tokenizer, text):
    assert tiny_tokenizer.decode(tiny_tokenizer.encode_ordinary(text)) == text


def test_corpus_round_trip_and_compression(tiny_tokenizer):
    lines = corpus_lines(limit=300)
    for line in lines:
        assert tiny_tokenizer.decode(tiny_tokenizer.encode_ordinary(line)) == line
    n_bytes = sum(len(line.encode()) for line in lines)
    n_tokens = sum(len(tiny_tokenizer.encode_ordinary(line)) for line in lines)
    assert n_bytes / n_tokens > 1.5  # 250 merges must compress English well beyond raw bytes


def test_decode_tensor_specials_and_invalid_utf8(tiny_tokenizer):
    ids = tiny_tokenizer.encode("hi there")["input_ids"]
    assert tiny_tokenizer.decode(torch.tensor(ids)) == "hi there"
    assert tiny_tokenizer.decode(ids, skip_special_tokens=False) == "<s>hi there</s>"
    lone_byte = tiny_tokenizer.vocab[byte_level_bpe.BYTE_ENCODER[0xE4]]  # first byte of a 3-byte CJK char
    assert tiny_tokenizer.decode([lone_byte]) == ""  # a character cut off at the end is left out
    a = tiny_tokenizer.encode_ordinary("a")
    assert tiny_tokenizer.decode([lone_byte, *a]) == "\ufffda"  # an invalid byte inside the text stays visible
    assert tiny_tokenizer.decode_bytes([lone_byte]) == b"\xe4"
    with pytest.raises(TokenizerError, match="cannot decode id"):
        tiny_tokenizer.decode([len(tiny_tokenizer)])


# ----- Hugging Face parity -----------------------------------------------------------------------
def test_hf_parity_corpus_and_chinese(tiny_tokenizer, hf_tiny):
    lines = corpus_lines(limit=3000)[-1000:] + SAMPLE_ZH.read_text(encoding="utf-8").splitlines() + TRICKY_TEXTS
    theirs = [e.ids for e in hf_tiny.encode_batch(lines)]
    assert [tiny_tokenizer.encode_ordinary(line) for line in lines] == theirs
    assert [hf_tiny.decode(ids) for ids in theirs] == [tiny_tokenizer.decode(ids) for ids in theirs]


@settings(max_examples=150, deadline=None)
@given(unicode_text)
def test_hf_parity_random(tiny_tokenizer, hf_tiny, text):
    assert tiny_tokenizer.encode_ordinary(text) == hf_tiny.encode(text).ids


def test_pre_tokenizer_matches_hf_for_every_assigned_code_point():
    hf_split = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str
    pattern = regex.compile(byte_level_bpe.GPT2_SPLIT_PATTERN)
    chars = [chr(cp) for cp in range(0x110000) if unicodedata.category(chr(cp)) not in ("Cn", "Cs")]
    for start in range(0, len(chars), 4000):
        text = "".join(f"a{c}'s {c}1{c} " for c in chars[start : start + 4000])
        ours = [byte_level_bpe.token_to_str(piece.encode("utf-8")) for piece in pattern.findall(text)]
        assert ours == [piece for piece, _ in hf_split(text)], ("pre-tokens differ in code points "
                                                                f"{ord(chars[start]):#x}..")


def test_gpt2_format_pair_without_config_loads(tmp_path):
    # A GPT-2-style vocab.json + merges.txt written by HF tokenizers, whose only special is <|endoftext|>.
    hf = tokenizers.ByteLevelBPETokenizer()
    hf.train_from_iterator(corpus_lines(limit=500), vocab_size=400, min_frequency=2, special_tokens=["<|endoftext|>"],
                           show_progress=False)
    hf.save_model(str(tmp_path))
    tok = ByteLevelBPETokenizer.from_pretrained(tmp_path)
    eot = hf.token_to_id("<|endoftext|>")
    assert tok.special_tokens == ["<|endoftext|>"]
    assert tok.bos_token_id == tok.eos_token_id == tok.pad_token_id == tok.unk_token_id == eot
    assert len(tok) == hf.get_vocab_size()
    for text in corpus_lines(limit=600)[500:] + TRICKY_TEXTS:
        assert tok.encode_ordinary(text) == hf.encode(text).ids
    assert tok.encode("hi")["input_ids"] == [eot, *hf.encode("hi").ids, eot]


# ----- special tokens, padding, truncation ------------------------------------------------------
def test_allowed_special(tiny_tokenizer):
    tok = tiny_tokenizer
    text = "a</s>b"
    plain = tok.encode(text, add_special_tokens=False)["input_ids"]
    assert tok.eos_token_id not in plain and tok.decode(plain) == text  # literal text cannot inject </s>
    assert tok.encode_ordinary(text) == plain
    allowed = tok.encode(text, add_special_tokens=False, allowed_special={"</s>"})["input_ids"]
    assert allowed == tok.encode_ordinary("a") + [tok.eos_token_id] + tok.encode_ordinary("b")
    everything = tok.encode("<s>x<pad>", add_special_tokens=False, allowed_special="all")["input_ids"]
    assert everything == [tok.bos_token_id, *tok.encode_ordinary("x"), tok.pad_token_id]
    only_bos = tok.encode("<s></s>", add_special_tokens=False, allowed_special={"<s>"})["input_ids"]
    assert only_bos == [tok.bos_token_id, *tok.encode_ordinary("</s>")]
    with pytest.raises(TokenizerError, match="not special tokens"):
        tok.encode(text, allowed_special={"<mask>"})
    with pytest.raises(TokenizerError, match="allowed_special"):
        tok.encode(text, allowed_special="none")


def test_texts_are_pre_tokenized_one_by_one():
    # Glued with "\n", "ab" + "  ab" would give the pre-token "\n " (merge "Ċ Ġ"); one by one, "  ab" is " ", " ab".
    tok = ByteLevelBPETokenizer(vocab_size=300)
    tok.train(["ab", "  ab"] * 10, show_progress=False)
    assert tok.merges == [("a", "b"), ("Ġ", "ab")]


def test_trained_vocab_never_holds_a_merge_equal_to_a_special():
    tok = ByteLevelBPETokenizer(vocab_size=400)
    tok.train(["<s> </s> <pad> <unk>"] * 50, min_frequency=2, show_progress=False)
    assert len(tok.vocab) == len(tok)  # no two ids share a vocab.json key
    assert tok.encode_ordinary("</s>") != [tok.eos_token_id]


def test_padding_and_truncation(tiny_tokenizer):
    tok = tiny_tokenizer
    text = "To be, or not to be, that is the question"
    full = tok.encode(text)
    assert full["input_ids"][0] == tok.bos_token_id and full["input_ids"][-1] == tok.eos_token_id
    assert full["attention_mask"] == [1] * len(full["input_ids"])
    n = len(full["input_ids"])
    assert tok.encode(text, max_seq_len=n + 100) == full  # no padding unless asked
    padded = tok.encode(text, max_seq_len=n + 3, padding=True)
    assert padded["input_ids"] == full["input_ids"] + [tok.pad_token_id] * 3
    assert padded["attention_mask"] == [1] * n + [0] * 3
    cut = tok.encode(text, max_seq_len=5)
    assert cut["input_ids"] == full["input_ids"][:4] + [tok.eos_token_id]
    assert tok.encode(text, max_seq_len=5, add_special_tokens=False)["input_ids"] == full["input_ids"][1:6]
    assert tok.encode(text, max_seq_len=5, truncation=False) == full
    assert tok.encode_batch([text, "x"], max_seq_len=8, padding=True) == [tok.encode(text, max_seq_len=8, padding=True),
                                                                          tok.encode("x", max_seq_len=8, padding=True)]
    with pytest.raises(TokenizerError, match="padding=True needs max_seq_len"):
        tok.encode(text, padding=True)
    with pytest.raises(TokenizerError, match="max_seq_len"):
        tok.encode(text, max_seq_len=0)


# ----- parallel encoding ----------------------------------------------------------------------------
def test_encode_many_keeps_the_order_across_workers(tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(byte_level_bpe, "CHUNK_CHARS", 2000)  # many small tasks, to exercise ordering
    lines = corpus_lines(limit=1500)
    expected = [tiny_tokenizer.encode_ordinary(line) for line in lines]
    assert list(tiny_tokenizer.encode_many(lines, num_workers=2)) == expected
    assert list(tiny_tokenizer.encode_many(iter(lines), num_workers=1)) == expected


# ----- files ------------------------------------------------------------------------------------
def test_save_load_identity(tiny_tokenizer, tiny_tokenizer_dir):
    loaded = ByteLevelBPETokenizer.from_pretrained(tiny_tokenizer_dir)
    assert loaded.fingerprint == tiny_tokenizer.fingerprint
    assert loaded.vocab == tiny_tokenizer.vocab and loaded.merges == tiny_tokenizer.merges
    assert (loaded.bos_token_id, loaded.pad_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2, 3)
    for text in corpus_lines(limit=200) + TRICKY_TEXTS:
        assert loaded.encode(text) == tiny_tokenizer.encode(text)
    merges_txt = (tiny_tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges_txt[0] == "#version: 0.2" and len(merges_txt) == 1 + len(tiny_tokenizer.merges)
    config = json.loads((tiny_tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["special_tokens"] == {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<|system|>": 4, "<|user|>": 5,
                                        "<|assistant|>": 6, "<|end|>": 7, "<|tool_call|>": 8, "<|/tool_call|>": 9,
                                        "<|tool_result|>": 10, "<|/tool_result|>": 11}
    assert config["pre_tokenizer"] == "gpt2" and config["vocab_size"] == len(tiny_tokenizer)


def test_training_is_deterministic(tmp_path):
    texts = corpus_lines(limit=800)
    for name in ("a", "b"):
        tok = ByteLevelBPETokenizer(vocab_size=600)
        tok.train(iter(texts), show_progress=False)
        tok.save(tmp_path / name)
    for file in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    other = ByteLevelBPETokenizer(vocab_size=601)
    other.train(texts, show_progress=False)
    assert other.fingerprint != ByteLevelBPETokenizer.from_pretrained(tmp_path / "a").fingerprint


def test_cli_trains_and_saves(tmp_path, capsys):
    source = tmp_path / "corpus"
    source.mkdir()
    (source / "a.txt").write_text("\n".join(corpus_lines(limit=300)), encoding="utf-8")
    (source / "b.txt").write_text(SAMPLE_ZH.read_text(encoding="utf-8"), encoding="utf-8")
    assert byte_level_bpe.main(["--input", str(source), "--vocab_size", "500", "--output", str(tmp_path / "tok"),
                                "--num_workers", "1"]) == 0
    assert "bytes/token" in capsys.readouterr().out
    tok = ByteLevelBPETokenizer.from_pretrained(tmp_path / "tok")
    assert len(tok) == 500


# ----- errors -----------------------------------------------------------------------------------
def test_cli_errors_exit_2(tmp_path, capsys):
    assert byte_level_bpe.main(["--input", str(tmp_path / "nope.txt"), "--output", str(tmp_path / "t")]) == 2
    assert capsys.readouterr().err.startswith("error: data path")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert byte_level_bpe.main(["--input", str(empty), "--output", str(tmp_path / "t")]) == 2
    assert "empty" in capsys.readouterr().err
    # rejected at parse time, before any training
    assert byte_level_bpe.main(["--input", str(TRAIN_TXT), "--vocab_size", "100", "--output", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--vocab_size: must be >= 268" in err and err.count("\n") == 1


def test_tokenizer_training_reads_what_the_trainer_reads(tmp_path, capsys):
    """One reader (readers.read_documents): .jsonl and folders too, and non-UTF-8 input is a one-line error, as in
    pretraining, instead of being trained on as U+FFFD."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("to be or not to be\n", encoding="utf-8")
    (tmp_path / "docs" / "b.jsonl").write_text('{"text": "床前明月光"}\n', encoding="utf-8")
    tok = byte_level_bpe.train_from_path(tmp_path / "docs", vocab_size=270, min_frequency=1, show_progress=False)
    assert len(tok) > 260 and tok.decode(tok.encode_ordinary("床前明月光")) == "床前明月光"
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"good line\ncaf\xe9 au lait\n")
    assert byte_level_bpe.main(["--input", str(latin1), "--output", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {latin1}:2: not UTF-8") and err.count("\n") == 1
    assert not (tmp_path / "t").exists()


def test_constructor_and_train_errors():
    with pytest.raises(TokenizerError, match="too small"):
        ByteLevelBPETokenizer(vocab_size=259)
    with pytest.raises(TokenizerError, match="special_tokens"):
        ByteLevelBPETokenizer(special_tokens=["<s>", "<s>", "</s>", "<unk>"])
    with pytest.raises(TokenizerError, match="no training text"):
        ByteLevelBPETokenizer(vocab_size=300).train([], show_progress=False)
    with pytest.raises(TokenizerError, match="needs strings"):
        ByteLevelBPETokenizer(vocab_size=300).train([b"bytes"], show_progress=False)


def _copy_dir(src, dst):
    dst.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_load_errors(tiny_tokenizer_dir, tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        ByteLevelBPETokenizer.from_pretrained(tmp_path / "missing")

    no_merges = _copy_dir(tiny_tokenizer_dir, tmp_path / "no_merges")
    (no_merges / "merges.txt").unlink()
    with pytest.raises(TokenizerError, match="merges.txt is missing"):
        ByteLevelBPETokenizer.from_pretrained(no_merges)

    bad_merge = _copy_dir(tiny_tokenizer_dir, tmp_path / "bad_merge")
    with open(bad_merge / "merges.txt", "a", encoding="utf-8") as f:
        f.write("zzzunknown q\n")
    with pytest.raises(TokenizerError, match="missing from vocab.json"):
        ByteLevelBPETokenizer.from_pretrained(bad_merge)

    no_bytes = _copy_dir(tiny_tokenizer_dir, tmp_path / "no_bytes")
    vocab = json.loads((no_bytes / "vocab.json").read_text(encoding="utf-8"))
    vocab = {t: i for t, i in vocab.items() if i < 12} | {byte_level_bpe.BYTE_ENCODER[b]: 12 + b for b in range(200)}
    (no_bytes / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (no_bytes / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match="lacks 56 of the 256 byte tokens"):
        ByteLevelBPETokenizer.from_pretrained(no_bytes)

    bad_config = _copy_dir(tiny_tokenizer_dir, tmp_path / "bad_config")
    config = json.loads((bad_config / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["special_tokens"]["</s>"] = 7
    (bad_config / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(TokenizerError, match="inconsistent"):
        ByteLevelBPETokenizer.from_pretrained(bad_config)

    makes_special = _copy_dir(tiny_tokenizer_dir, tmp_path / "makes_special")  # a merge that would build "<s>"
    vocab = {t: i for t, i in json.loads((makes_special / "vocab.json").read_text(encoding="utf-8")).items() if i < 268}
    (makes_special / "vocab.json").write_text(json.dumps(vocab | {"<s": 268}), encoding="utf-8")
    (makes_special / "merges.txt").write_text("#version: 0.2\n< s\n<s >\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"merges.txt:3: merge '<s >' uses or makes"):
        ByteLevelBPETokenizer.from_pretrained(makes_special)

    corrupt = _copy_dir(tiny_tokenizer_dir, tmp_path / "corrupt")
    (corrupt / "vocab.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match="not valid UTF-8 JSON"):
        ByteLevelBPETokenizer.from_pretrained(corrupt)


def test_long_pre_tokens_merge_exactly_as_short_ones_in_n_log_n(tiny_tokenizer, monkeypatch):
    """_bpe_heap (pre-tokens over LONG_PIECE bytes) gives _bpe's merges; 'the' * 13000 took 20 s before it."""
    import random
    import time

    rng = random.Random(0)
    parts = ["the", "thee", "aaa", "ab", "ROMEO", "明月", "光", "e"]
    pieces = ["".join(rng.choice(parts) for _ in range(rng.randint(1, 120))) for _ in range(200)]
    monkeypatch.setattr(byte_level_bpe, "LONG_PIECE", 10 ** 9)  # the list algorithm only
    reference = [tiny_tokenizer._bpe(p) for p in pieces]
    heap = [tiny_tokenizer._bpe_heap([tiny_tokenizer._byte_ids[b] for b in p.encode("utf-8")]) for p in pieces]
    assert heap == reference
    monkeypatch.undo()
    started = time.perf_counter()
    ids = tiny_tokenizer._bpe("the" * 13000)
    elapsed = time.perf_counter() - started
    assert tiny_tokenizer.decode(ids) == "the" * 13000 and elapsed < 10  # a bound against a hang, not a benchmark


# ----- hostile input -------------------------------------------------------------------------------------------
def test_training_counts_a_long_pre_token_in_pieces_of_the_bound():
    """One 300,000-character line without split points (CJK, one repeated letter) is one pre-token; training counts
    it in MAX_TRAIN_PIECE_CHARS pieces (each merge rescans every word holding its pair), encoding keeps it whole."""
    bound = byte_level_bpe.MAX_TRAIN_PIECE_CHARS
    line = "".join(chr(0x4E00 + (i * 7919) % 2000) for i in range(300_000))
    tok = ByteLevelBPETokenizer(vocab_size=300)
    counts = tok._count_pretokens([line, "short words stay whole"])
    assert max(map(len, counts)) == bound and line[:bound] in counts  # cut from the start, every character kept
    assert sum(len(piece) * n for piece, n in counts.items()) == len(line) + len("short words stay whole")
    assert tok._count_pretokens(corpus_lines(limit=200)) == ByteLevelBPETokenizer(vocab_size=300)._count_pretokens(
        corpus_lines(limit=200))  # ordinary text has no pre-token near the bound: counted as before
    tok.train([line], min_frequency=2, show_progress=False)
    assert len(tok) == 300 and tok.decode(tok.encode_ordinary(line[:5000])) == line[:5000]


@pytest.mark.parametrize("texts", [["\n", "   ", "\t\t"], ["a", "b", "c"], ["x"] * 5],
                         ids=["whitespace", "single characters", "one character"])
def test_text_with_nothing_to_learn_is_refused_and_the_tokenizer_kept(texts, tiny_tokenizer):
    tok = ByteLevelBPETokenizer(vocab_size=400)
    tok.train(corpus_lines(limit=100), show_progress=False)
    before = tok.fingerprint
    with pytest.raises(TokenizerError, match="nothing to learn"):
        tok.train(texts, show_progress=False)
    assert tok.fingerprint == before and len(tok.merges) > 0


def test_cli_refuses_a_blank_corpus_and_keeps_the_saved_tokenizer(tiny_tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "tok"
    ByteLevelBPETokenizer.from_pretrained(tiny_tokenizer_dir).save(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "blank.jsonl").write_text('{"text": "   "}\n{"text": ""}\n', encoding="utf-8")
    (tmp_path / "chars.txt").write_text("a\n \nb\n", encoding="utf-8")
    for corpus, message in (("blank.jsonl", "holds no documents"), ("chars.txt", "nothing to learn")):
        assert byte_level_bpe.main(["--input", str(tmp_path / corpus), "--output", str(out)]) == 2
        err = capsys.readouterr().err  # the merges' progress bar, then the one line
        assert err.strip().splitlines()[-1].startswith("error: ") and message in err and "Traceback" not in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ----- big corpora: every format, a streamed count, a byte cap -----------------------------------------
def test_counting_pre_tokens_streams_the_texts_instead_of_holding_them(monkeypatch):
    import tracemalloc

    monkeypatch.setattr(byte_level_bpe, "PRETOKEN_BATCH", 1000)
    words = ["alpha", "beta", "gamma", "delta", "床前明月光"]
    texts = (" ".join(words[(i + k) % 5] for k in range(20)) for i in range(20_000))  # 2.2 MB, never all at once
    tracemalloc.start()
    counts = ByteLevelBPETokenizer(vocab_size=300)._count_pretokens(texts)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert counts["alpha"] == 4_000 and counts[" alpha"] == 20_000 * 4 - 4_000  # first word of every 5th text
    assert peak < 1_000_000  # holding the texts would be 2.2 MB, their 400,000 pieces 25 MB


def test_max_train_bytes_learns_from_exactly_the_prefix(tmp_path):
    from readers import read_documents

    (tmp_path / "a.txt").write_text("\n".join(corpus_lines(limit=200)) + "\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text(SAMPLE_ZH.read_text(encoding="utf-8"), encoding="utf-8")
    capped = byte_level_bpe.train_from_path(tmp_path, 400, show_progress=False, max_train_bytes=2000)
    prefix = ByteLevelBPETokenizer(vocab_size=400)
    prefix.train([d for d in read_documents(tmp_path, max_bytes=2000)], show_progress=False)
    full = byte_level_bpe.train_from_path(tmp_path, 400, show_progress=False)
    assert capped.fingerprint == prefix.fingerprint != full.fingerprint
    assert sum(len(d.encode()) for d in read_documents(tmp_path, max_bytes=2000)) == 2000


def test_cli_trains_on_a_parquet_and_zstd_folder_with_text_field_and_a_byte_cap(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    lines = corpus_lines(limit=400)
    (tmp_path / "docs").mkdir()
    pq.write_table(pa.table({"body": lines[:200]}), tmp_path / "docs" / "a.parquet", row_group_size=50)
    records = "".join(json.dumps({"body": line}) + "\n" for line in lines[200:])
    (tmp_path / "docs" / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(records.encode()))
    argv = ["--input", str(tmp_path / "docs"), "--vocab_size", "300", "--output", str(tmp_path / "tok"),
            "--num_workers", "1", "--text_field", "body"]
    assert byte_level_bpe.main(argv + ["--max_train_bytes", "5000"]) == 0
    assert "bytes/token on the first 5,000 bytes of" in capsys.readouterr().out
    assert byte_level_bpe.main(argv[:-2] + ["--output", str(tmp_path / "other")]) == 2  # no "text" column
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'docs' / 'a.parquet'}: no column 'text'")


def test_tokenizer_cli_errors_leave_the_existing_tokenizer_as_it_was(tiny_tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "tok"
    ByteLevelBPETokenizer.from_pretrained(tiny_tokenizer_dir).save(out)
    before = snapshot(out)
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("x")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    text = tmp_path / "text.txt"
    text.write_text("\n".join(corpus_lines(limit=50)), encoding="utf-8")
    cases = [["--input", str(text), "--num_workers", "0"], ["--input", str(text), "--vocab_size", "abc"],
             ["--input", str(text), "--vocab_size", "100"], ["--input", str(text), "--min_frequency", "0"],
             ["--input", str(tmp_path / "missing.txt")], ["--input", str(empty)]]
    for extra in cases:
        code, err = run_main(byte_level_bpe.main, ["--output", str(out), *extra], capsys)
        assert_one_line_error(code, err)
    assert snapshot(out) == before
    for target in (a_file, a_file / "sub"):
        code, err = run_main(byte_level_bpe.main, ["--input", str(text), "--output", str(target)], capsys)
        assert_one_line_error(code, err)
    assert a_file.read_text() == "x"


def test_tokenizer_save_is_all_or_nothing(tiny_tokenizer, tmp_path, monkeypatch):
    out = tmp_path / "tok"
    tiny_tokenizer.save(out)
    (out / "README.md").write_text("mine")
    before = snapshot(out)
    other = ByteLevelBPETokenizer(vocab_size=300)
    other.train(corpus_lines(limit=50), show_progress=False)
    real_write = Path.write_text

    def crash_on_merges(self, *args, **kwargs):
        if self.name == "merges.txt":
            raise OSError(28, "No space left on device", str(self))
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", crash_on_merges)
    with pytest.raises(OSError):
        other.save(out)
    monkeypatch.undo()
    assert snapshot(out) == before  # vocab.json was written, but only inside the temporary folder
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    other.save(out)
    assert ByteLevelBPETokenizer.from_pretrained(out).fingerprint == other.fingerprint
    assert (out / "README.md").read_text() == "mine"  # the user's other files are kept


@pytest.mark.parametrize("call", [
    lambda tok: tok.decode([-1]), lambda tok: tok.decode(None), lambda tok: tok.decode(["a"]),
    lambda tok: tok.encode_ordinary(None), lambda tok: tok.encode(None), lambda tok: tok.train(None),
    lambda tok: tok.train([b"bytes"]), lambda tok: ByteLevelBPETokenizer(vocab_size="abc"),
    lambda tok: ByteLevelBPETokenizer(vocab_size=100), lambda tok: tok.encode("x", max_seq_len="9"),
    lambda tok: list(tok.encode_many(["x"], num_workers=0)), lambda tok: tok.train(["x"], min_frequency=0),
], ids=["decode-1", "decodeNone", "decodeStr", "encodeOrdNone", "encodeNone", "trainNone", "trainBytes",
        "vocabStr", "vocabSmall", "maxLenStr", "workers0", "minFreq0"])
def test_tokenizer_api_rejects_bad_input_with_a_value_error(call, tiny_tokenizer):
    with pytest.raises(TokenizerError):
        call(tiny_tokenizer)



def test_whole_token_pre_tokens_merge_as_bpe_and_survive_the_bounded_cache(tiny_tokenizer, tiny_tokenizer_dir,
                                                                            monkeypatch):
    """The load-time table of pre-tokens that are one token holds exactly the vocabulary texts BPE encodes as
    themselves; the bounded cache, cleared when full, keeps them and stays within its bound."""
    tokenizer = ByteLevelBPETokenizer.from_pretrained(tiny_tokenizer_dir)
    whole = tokenizer._whole_tokens
    assert whole and all(tokenizer._bpe(text) == ids for text, ids in whole.items())
    for token_id in range(len(tokenizer)):  # every multi-byte token whose text re-forms is in the table
        raw = tokenizer.decode_bytes([token_id], skip_special_tokens=True)
        text = raw.decode("utf-8", errors="ignore")
        if len(raw) > 1 and text.encode() == raw and tokenizer._bpe(text) == [token_id]:
            assert whole[text] == [token_id]
    monkeypatch.setattr(byte_level_bpe, "MAX_CACHE_ENTRIES", 8)
    words = ["".join("etaoinsh"[int(d)] for d in f"{i:03o}") for i in range(40)]  # 40 distinct pre-tokens
    expected = [tiny_tokenizer._bpe(w) for w in words]
    assert [tokenizer.encode_ordinary(w) for w in words] == expected
    assert len(tokenizer._cache) <= 8 + 1 + len(whole)  # checked before each call: one more pre-token at most
    assert all(tokenizer._cache.get(text) == ids for text, ids in whole.items())

