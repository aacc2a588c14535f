"""Build the finetuning demo data in data/sft/ from the embedded corpus, deterministically for a seed.

Four task families, each with one exact answer that a checker can verify:

- ``arithmetic``: ``计算 {a} + {b} = ?`` -> ``{a + b}`` with 0 <= a, b <= 99 (the fixed format results compare on);
- ``poem_next_line``: three consecutive lines of a Tang/Song poem, then ``{line}的下一句？`` -> the line after it
  (the train split also holds excerpts of three lines from different train poems: see ``mixed_excerpt_examples``);
- ``poem_author``: a poem's heading as the corpus writes it (title, poet, first line), then ``作者是？`` -> the poet;
- ``speaker``: two consecutive speeches of a play (speaker and opening words each), then ``Who says "{words}"?``
  -> the speaker of those words.

Dialogues (``{"messages": [...]}`` records) whose later answers depend on earlier ones: ``arithmetic_chat`` opens
with a sum, then ``再加 {c} 呢？``, ``再减 {d} 呢？``, ``再加 {e} 呢？`` on the running total (1 <= c, d, e <= 20;
four assistant turns, ``--chat_follow_ups``); ``author_chat`` names a poem's author, then ``这位诗人姓什么？`` -> the
surname. Train dialogues (from train sums and poems) are in ``sft_data.json`` beside the single-turn records;
held-out ones (from test sums and poems) in ``chat_test.json`` (their references: the answers alone).

In the train dialogues the assistant answers each follow-up with the built-in calculator (the default,
``--arithmetic_chat_form tool``, ``calculator.py``): an OpenAI tool call on the running total read off its previous
answer (``{"expression": "42+8"}``), the tool's result, then the answer; or with its answer alone
(``--arithmetic_chat_form plain``). A whole dialogue fits SFT's default 256-token context of a rotary model
(``--context``); a dialogue longer than ``--context`` is written as the windows a chat shows the model (the oldest
turn dropped): turns 1-2, then each turn with the one before it as context only (``"weight": 0``, OpenAI's flag).

Only arithmetic must be computed; the other families are reading tasks: the answer is in the prompt, so a small
model can learn them (recalling facts of a corpus it read for five minutes, the families' earlier form, it could
not: 0.00-0.09 exact match after SFT). One split of prompts serves every file: train files (``sft_data.json``,
``rlhf_pairwise.json``) draw from the train prompts, test files (``sft_test.json``, ``rlhf_pairwise_test.json``)
from the rest; poems and speeches are split as documents, so no poem or speech is shown in both. With
``--arithmetic_rl N``, N of the train sums go to ``rlvf_prompts.json`` instead (prompts for GRPO that neither SFT
nor the preference data hold; the test files stay byte for byte the same). Not the default: with 4,000 SFT sums
held-out arithmetic after SFT depended on the pretrained model (0.93 from one, 0.16 from another); with all 9,500
it is 0.998 and 0.996. Preference pairs reject a plausible wrong answer: a near-miss sum (+-1, +-10), a truncated
answer, another line of the same excerpt, another poet, the other speaker of the exchange or another speaker of the
scene.

    python -m data.sft.build_sft_data [--seed 0] [--output_dir data/sft]
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cli
from atomic_file import atomic_path
from byte_level_bpe import ByteLevelBPETokenizer
from prompts import CALCULATOR, CHAT_TEMPLATE, SFT_TEMPLATE, render_sample
from readers import read_documents, read_lines

DEFAULT_OUTPUT = Path("data/sft")
DEFAULT_CORPUS = Path("data/pretrain/train.txt")
ARITHMETIC_PROMPT = "计算 {a} + {b} = ?"
NEXT_LINE_PROMPT = "{a}，{b}，{c}。{line}的下一句？"
AUTHOR_PROMPT = "{title}\n{author}：{line}\n作者是？"
SPEAKER_PROMPT = '{a}: {a_words}\n{b}: {b_words}\nWho says "{quote}"?'
ADD_PROMPT, SUB_PROMPT, SURNAME_PROMPT = "再加 {n} 呢？", "再减 {n} 呢？", "这位诗人姓什么？"  # the dialogues' follow-ups
COMPOUND_SURNAMES = ("欧阳", "司马", "上官", "诸葛", "长孙", "皇甫", "令狐")
ANONYMOUS = ("无名氏", "佚名")
CHAT_FORMS = ("tool", "plain")  # arithmetic dialogues: follow-ups through the calculator, or answers alone
FOLLOW_UP_MAX = 20  # the numbers a follow-up adds or subtracts: 1 to 20 (the total never goes below 0)
POEM = re.compile(r"^(《[^》]+》\S*) (\S+?)：(.+)$")  # 《title》[其二] author：lines
SPEECH = re.compile(r"^([A-Z][A-Z'\- ]*[A-Z]): (.+)$")  # SPEAKER: speech
CLAUSE_END = re.compile(r"[，。？！；：、]")
LINE_CHARS = (4, 9)  # first lines shown in an author prompt (5 and 7 characters in regular verse)
EXCERPT_LINE_CHARS = 5  # the next-line excerpts: three five-character lines fit the 64-token context
MAX_TITLE_CHARS = 16
EXCERPT_WORDS = 6  # opening words of each speech shown in a speaker prompt
QUOTE_WORDS = 3  # of which the question quotes the first three
OUTPUT_FILES = ("sft_data.json", "sft_test.json", "chat_test.json", "rlhf_pairwise.json", "rlhf_pairwise_test.json")
RL_FILE = "rlvf_prompts.json"  # written only with --arithmetic_rl > 0
CONTEXT = 64  # the default pretrained model's context: every prompt + answer (+ <s>, </s>) fits it
CHAT_CONTEXT = 256  # SFT's default context for a rotary model (finetune --max_seq_len): whole dialogues fit it
VOCAB_SIZE = 8192  # the tokenizer `python pretrain_trainer.py` trains on the same corpus
Fits = Callable[["Example"], bool]


class BuildError(ValueError):
    """The corpus is missing or cannot give the requested data."""


@dataclass(frozen=True)
class Example:
    """One prompt with its exact answer and the plausible wrong answers a preference pair may reject."""

    task: str
    instruction: str
    response: str
    wrong: tuple[str, ...]


@dataclass(frozen=True)
class Sizes:
    """How many prompts each family contributes to the train and test splits."""

    arithmetic_train: int = 9500  # every sum not held out: with 2,000 the held-out exact match stays ~0.1
    arithmetic_test: int = 500
    arithmetic_rl: int = 0  # of the train sums, kept out of the SFT and preference data as RL prompts
    pairwise_arithmetic: int = 2000  # sums with one sampled wrong answer among the train preference pairs
    speaker_train: int = 4000
    speaker_test: int = 300
    poem_test_fraction: float = 0.15
    excerpts_per_poem: int = 1000  # every excerpt of every poem (the corpus has 347 poems)
    mixed_excerpts_train: int = 3000  # + excerpts whose lines come from different train poems (two prompts each)
    all_wrong_sums: bool = True  # plus every other wrong answer of every train example (a reward model needs them)
    chat_sums_train: int = 5000  # train sums that also open a three-turn dialogue in sft_data.json
    chat_sums_test: int = 300  # held-out sums that open a dialogue in chat_test.json
    arithmetic_chat_form: str = "tool"  # train dialogues: "tool" (follow-ups through calculator calls) or "plain"
    chat_follow_ups: int = 3  # follow-ups after a dialogue's sum: 再加, 再减, 再加, ... (3: a four-turn dialogue)
    context: int = CHAT_CONTEXT  # tokens a dialogue must fit (else split into windows; a test dialogue left out)


# ----------------------------------------------------------------------------- corpus

def read_corpus(path: Path) -> tuple[list[tuple[str, str, str]], list[tuple[str, str]]]:
    """(poems as (title, author, body), speeches as (speaker, speech) or None for a line between two speeches that
    is not one) in corpus order."""
    if not path.is_file():
        raise BuildError(f"corpus file {path} not found: pass --corpus data/pretrain/train.txt "
                         "(rebuild it with python -m data.build_pretrain_data)")
    poems, speeches = [], []
    for line in read_lines(path):  # a bad byte names the file and line
        if match := POEM.match(line):
            poems.append((match.group(1), match.group(2), match.group(3)))
        elif match := SPEECH.match(line):
            speeches.append((match.group(1), match.group(2)))
        elif speeches and speeches[-1] is not None:
            speeches.append(None)  # so that two speeches next to each other in the list are next to each other here
    if not poems or not speeches:
        raise BuildError(f"{path} holds {len(poems)} poems and {len(speeches)} speeches; both are needed "
                         "(expected lines like '《title》 author：...' and 'SPEAKER: speech')")
    return poems, speeches


def poem_lines(body: str) -> list[str]:
    """The lines (clauses between punctuation marks) of a poem body."""
    return [clause for clause in CLAUSE_END.split(body) if clause]


# ----------------------------------------------------------------------------- families

def arithmetic_examples(rng: random.Random, sizes: Sizes) -> tuple[list[Example], list[Example]]:
    """Distinct (a, b) pairs: test pairs first, train pairs from the rest, so no sum prompt is in both."""
    pairs = [(a, b) for a in range(100) for b in range(100)]
    if sizes.arithmetic_train + sizes.arithmetic_test > len(pairs):
        raise BuildError(f"only {len(pairs)} distinct sums exist; ask for fewer arithmetic examples")
    most_rl = sizes.arithmetic_train - sizes.pairwise_arithmetic
    if sizes.arithmetic_rl > most_rl:
        raise BuildError(f"--arithmetic_rl {sizes.arithmetic_rl} leaves fewer train sums than --pairwise_arithmetic "
                         f"{sizes.pairwise_arithmetic}: ask for at most {most_rl}")
    rng.shuffle(pairs)
    test = pairs[:sizes.arithmetic_test]
    train = pairs[sizes.arithmetic_test:sizes.arithmetic_test + sizes.arithmetic_train]
    return [arithmetic_example(a, b) for a, b in train], [arithmetic_example(a, b) for a, b in test]


def arithmetic_example(a: int, b: int) -> Example:
    total = a + b
    wrong = {str(total + d) for d in (-10, -1, 1, 10) if total + d >= 0}
    if total >= 10:
        wrong.add(str(total)[:-1])  # truncated answer
    return Example("arithmetic", ARITHMETIC_PROMPT.format(a=a, b=b), str(total), tuple(sorted(wrong)))


def split_poems(rng: random.Random, poems: Sequence[tuple[str, str, str]], sizes: Sizes) -> tuple[list, list]:
    """A seeded split of the poems (documents) into train and test."""
    order = list(range(len(poems)))
    rng.shuffle(order)
    n_test = max(1, round(len(poems) * sizes.poem_test_fraction))
    return [poems[i] for i in sorted(order[n_test:])], [poems[i] for i in sorted(order[:n_test])]


def next_line_examples(rng: random.Random, poems: Sequence[tuple[str, str, str]], sizes: Sizes,
                       fits: Fits) -> list[Example]:
    """Up to ``excerpts_per_poem`` excerpts per poem: three consecutive five-character lines, and the line that
    follows the first, and the second, of them. Rejected: the asked line itself, the excerpt's other line, a
    truncation."""
    out = []
    for _, _, body in poems:
        lines = poem_lines(body)
        starts = [i for i in range(len(lines) - 2) if all(len(x) == EXCERPT_LINE_CHARS for x in lines[i:i + 3])
                  and len(set(lines[i:i + 3])) == 3]
        for i in rng.sample(starts, min(len(starts), sizes.excerpts_per_poem)):
            out += excerpt_examples(lines[i:i + 3])
    return [e for e in out if fits(e)]


def excerpt_examples(excerpt: Sequence[str]) -> list[Example]:
    """The two prompts of a three-line excerpt: the line after the first, and after the second."""
    out = []
    for k in range(2):
        asked, following = excerpt[k], excerpt[k + 1]
        wrong = {asked, excerpt[2 - k], following[:-1]}
        instruction = NEXT_LINE_PROMPT.format(a=excerpt[0], b=excerpt[1], c=excerpt[2], line=asked)
        out.append(Example("poem_next_line", instruction, following, tuple(sorted(wrong))))
    return out


def mixed_excerpt_examples(rng: random.Random, poems: Sequence[tuple[str, str, str]], avoid: set[str], count: int,
                           fits: Fits) -> list[Example]:
    """``count`` excerpts of three five-character lines drawn from different poems, asked like the real ones. The
    skill is copying the line after the asked one, and the ~900 real train prompts are too few to learn it: a model
    memorises their answers (held-out loss rises); recombined lines give as many distinct excerpts as wanted. Lines
    in ``avoid`` (those of test poems) are never used."""
    lines = sorted({line for _, _, body in poems for line in poem_lines(body)
                    if len(line) == EXCERPT_LINE_CHARS and line.isalpha() and line not in avoid})
    out, seen = [], set()
    while len(out) < 2 * count and len(seen) < count * 10:
        excerpt = rng.sample(lines, 3)
        if tuple(excerpt) in seen:
            continue
        seen.add(tuple(excerpt))
        out += [example for example in excerpt_examples(excerpt) if fits(example)]
    return out[:2 * count]


def _line_ok(line: str) -> bool:
    return LINE_CHARS[0] <= len(line) <= LINE_CHARS[1]


def author_examples(rng: random.Random, poems: Sequence[tuple[str, str, str]], fits: Fits) -> list[Example]:
    """One example per poem with a short title and a first line of at most nine characters: the poem's heading as
    the corpus writes it (title, poet, first line), and the poet to name. Rejected: another poet, a truncation."""
    authors = sorted({author for _, author, _ in poems})
    out = []
    for title, author, body in poems:
        first = poem_lines(body)[0] if poem_lines(body) else ""
        if len(title) > MAX_TITLE_CHARS or not _line_ok(first):
            continue
        others = [a for a in authors if a != author]
        wrong = {*rng.sample(others, min(3, len(others)))}
        if len(author) >= 3:
            wrong.add(author[:-1])
        instruction = AUTHOR_PROMPT.format(title=title, author=author, line=first)
        out.append(Example("poem_author", instruction, author, tuple(sorted(wrong))))
    return [e for e in out if fits(e)]


def speaker_examples(rng: random.Random, speeches: Sequence[tuple[str, str] | None], sizes: Sizes,
                     fits: Fits) -> tuple[list, list]:
    """Two consecutive speeches by different speakers (their opening words) and the opening words of one of them:
    who says it. Test and train exchanges share no speech. Rejected: the other speaker, another of the scene."""
    usable = [i for i in range(len(speeches) - 1) if speeches[i] and speeches[i + 1]
              and speeches[i][0] != speeches[i + 1][0]
              and min(len(speeches[i][1].split()), len(speeches[i + 1][1].split())) >= EXCERPT_WORDS
              and _opening(speeches[i][1], QUOTE_WORDS) != _opening(speeches[i + 1][1], QUOTE_WORDS)]
    rng.shuffle(usable)
    taken, examples = set(), []
    for i in usable:  # exchanges that share no speech, so train and test never show the same one
        if i in taken or i + 1 in taken or not fits(example := _speaker(rng, speeches, i)):
            continue
        taken |= {i, i + 1}
        examples.append(example)
        if len(examples) == sizes.speaker_train + sizes.speaker_test:
            break
    if len(examples) < sizes.speaker_train + sizes.speaker_test:
        raise BuildError(f"only {len(examples)} usable exchanges for {sizes.speaker_train} train + "
                         f"{sizes.speaker_test} test speaker examples; ask for fewer")
    return examples[sizes.speaker_test:], examples[:sizes.speaker_test]


def _opening(speech: str, words: int) -> str:
    return " ".join(speech.split()[:words])


def _speaker(rng: random.Random, speeches: Sequence[tuple[str, str] | None], index: int) -> Example:
    (first, first_speech), (second, second_speech) = speeches[index], speeches[index + 1]
    k = rng.randrange(2)
    speaker, other = (first, second) if k == 0 else (second, first)
    quote = _opening((first_speech, second_speech)[k], QUOTE_WORDS)
    instruction = SPEAKER_PROMPT.format(a=first, a_words=_opening(first_speech, EXCERPT_WORDS), b=second,
                                        b_words=_opening(second_speech, EXCERPT_WORDS), quote=quote)
    scene = sorted({s[0] for s in speeches[max(0, index - 6):index + 8] if s and s[0] not in (first, second)})
    return Example("speaker", instruction, speaker, (other, *rng.sample(scene, min(2, len(scene)))))


# ----------------------------------------------------------------------------- assembly

def context_tokenizer(corpus: Path) -> ByteLevelBPETokenizer:
    """The tokenizer `python pretrain_trainer.py` trains on the same corpus (deterministic, ~2 s)."""
    tokenizer = ByteLevelBPETokenizer(vocab_size=VOCAB_SIZE)
    tokenizer.train(read_documents(corpus), show_progress=False)
    return tokenizer


def context_fit(tokenizer: ByteLevelBPETokenizer) -> Fits:
    """Whether an example (its prompt with the longest of its answers) fits the default model's context."""

    def fits(example: Example) -> bool:
        longest = max(len(tokenizer.encode_ordinary(SFT_TEMPLATE.format(instruction=example.instruction, response=a)))
                      for a in (example.response, *example.wrong))
        return longest + 2 <= CONTEXT  # + <s> and </s>

    return fits


def build_examples(corpus: Path, seed: int, tokenizer: ByteLevelBPETokenizer,
                   sizes: Sizes = Sizes()) -> tuple[list[Example], list[Example], list[Example]]:
    """(train examples, test examples) of every family, each list shuffled with the seed, and the mixed next-line
    excerpts for training (their own generator: the other examples are what they were without them)."""
    rng = random.Random(seed)
    poems, speeches = read_corpus(corpus)
    fits = context_fit(tokenizer)
    arith_train, arith_test = arithmetic_examples(rng, sizes)
    poems_train, poems_test = split_poems(rng, poems, sizes)
    speaker_train, speaker_test = speaker_examples(rng, speeches, sizes, fits)
    train = [*arith_train, *next_line_examples(rng, poems_train, sizes, fits), *author_examples(rng, poems_train, fits),
             *speaker_train]
    test = [*arith_test, *next_line_examples(rng, poems_test, sizes, fits), *author_examples(rng, poems_test, fits),
            *speaker_test]
    rng.shuffle(train)
    rng.shuffle(test)
    test_lines = {line for _, _, body in poems_test for line in poem_lines(body)}
    mixed = mixed_excerpt_examples(random.Random(seed + 3), poems_train, test_lines, sizes.mixed_excerpts_train, fits)
    return train, test, mixed


def split_rl_sums(train: Sequence[Example], sizes: Sizes) -> tuple[list[Example], list[Example]]:
    """(train without the RL sums, the RL sums): the last ``arithmetic_rl`` sums of the shuffled train list. The
    first ``pairwise_arithmetic`` sums stay (``arithmetic_examples`` checks there are enough), so the preference pairs'
    random draws and the test files are unchanged."""
    sums = [i for i, e in enumerate(train) if e.task == "arithmetic"]
    rl = set(sums[len(sums) - sizes.arithmetic_rl:])
    return [e for i, e in enumerate(train) if i not in rl], [train[i] for i in sorted(rl)]


def surname(poet: str) -> str:
    return poet[:2] if poet[:2] in COMPOUND_SURNAMES else poet[0]


def follow_up_turns(total: int, rng: random.Random, n: int) -> list[tuple[str, str, str]]:
    """``n`` follow-ups on a running total, ``再加 c 呢？`` and ``再减 d 呢？`` in turn: (user, expression, answer)."""
    turns = []
    for k in range(n):
        if k % 2 == 0:
            step = rng.randint(1, FOLLOW_UP_MAX)
            turns.append((ADD_PROMPT.format(n=step), f"{total}+{step}", str(total + step)))
            total += step
        else:
            step = rng.randint(1, min(FOLLOW_UP_MAX, total))  # the total never goes below 0
            turns.append((SUB_PROMPT.format(n=step), f"{total}-{step}", str(total - step)))
            total -= step
    return turns


def dialogues(examples: Sequence[Example], rng: random.Random, max_sums: int, tool: bool = False,
              follow_ups: int = 2) -> list[dict]:
    """Conversations whose later answers depend on the earlier ones: a sum (of the first ``max_sums`` sums) then
    ``follow_ups`` of ``再加 c 呢？`` and ``再减 d 呢？`` on the running total (``tool``: each follow-up answered
    through a calculator call); a poem's author then ``这位诗人姓什么？``."""
    out, sums = [], 0
    for e in examples:
        if e.task == "arithmetic" and sums < max_sums:
            sums += 1
            turns = [(e.instruction, e.response), *follow_up_turns(int(e.response), rng, follow_ups)]
            turns = [turn if tool or len(turn) == 2 else (turn[0], turn[2]) for turn in turns]
            out.append({"messages": conversation(turns), "task": "arithmetic_chat"})
        elif e.task == "poem_author" and e.response not in ANONYMOUS:
            turns = [(e.instruction, e.response), (SURNAME_PROMPT, surname(e.response))]
            out.append({"messages": conversation(turns), "task": "author_chat"})
    return out


def conversation(turns: Sequence[tuple[str, ...]]) -> list[dict]:
    """Messages of (user, answer) turns; a (user, expression, answer) turn calls the calculator first."""
    return [m for turn in turns for m in ({"role": "user", "content": turn[0]}, *reply(*turn[1:]))]


def reply(*steps: str) -> list[dict]:
    """An answer, or (expression, answer): a calculator call in OpenAI's shape, its result, then the answer."""
    if len(steps) == 1:
        return [{"role": "assistant", "content": steps[0]}]
    expression, answer = steps
    call = {"id": "call_0", "type": "function",
            "function": {"name": CALCULATOR, "arguments": json.dumps({"expression": expression})}}
    return [{"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_0", "content": answer}, {"role": "assistant", "content": answer}]


def dialogue_fit(tokenizer: ByteLevelBPETokenizer, context: int = CONTEXT) -> Callable[[dict], bool]:
    """Whether a conversation fits ``context`` tokens in the chat format (prompts.render_sample)."""
    return lambda record: len(render_sample(tokenizer, record["messages"], CHAT_TEMPLATE, 1 << 30).input_ids) <= context


def windows(record: dict, fits: Callable[[dict], bool]) -> list[dict]:
    """The record when it fits; else, per turn, that turn after the one before it (context only, ``weight`` 0,
    but for the first turn, learned with the second): what a chat shows the model once its oldest turns are
    dropped. Windows that do not fit either are left out."""
    if fits(record):
        return [record]
    turns: list[list[dict]] = []
    for message in record["messages"]:
        if message["role"] == "user":
            turns.append([])
        turns[-1].append(message)
    out = []
    for k in range(1, len(turns)):
        before = turns[k - 1] if k == 1 else [{**m, "weight": 0} if m["role"] == "assistant" else m
                                              for m in turns[k - 1]]
        out.append({**record, "messages": [*before, *turns[k]]})
    return [w for w in out if fits(w)]


def sft_records(examples: Sequence[Example]) -> list[dict[str, str]]:
    return [{"instruction": e.instruction, "response": e.response, "task": e.task} for e in examples]


def pairwise_records(examples: Sequence[Example], rng: random.Random, max_sums: int) -> list[dict[str, str]]:
    """One preference pair per example (the first ``max_sums`` sums only): the exact answer chosen, one of its
    plausible wrong answers rejected."""
    sums = 0
    out = []
    for e in examples:
        if e.task == "arithmetic":
            sums += 1
            if sums > max_sums:
                continue
        out.append({"instruction": e.instruction, "chosen": e.response, "rejected": rng.choice(e.wrong),
                    "task": e.task})
    return out


def all_wrong_answer_pairs(examples: Sequence[Example], have: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """A pair for every wrong answer of every train example not already in ``have``: the reward model's arithmetic
    accuracy on held-out sums grows with the number of pairs (0.58 with 2,000 sums, 0.84 with ~47,000 pairs)."""
    seen = {(r["instruction"], r["rejected"]) for r in have}
    return [{"instruction": e.instruction, "chosen": e.response, "rejected": wrong, "task": e.task}
            for e in examples for wrong in e.wrong if (e.instruction, wrong) not in seen]


def write_json(path: Path, records: list[dict[str, str]]) -> None:
    """A JSON list with one record per line (readable, small diffs), written atomically."""
    lines = ",\n".join(json.dumps(record, ensure_ascii=False) for record in records)
    with atomic_path(path) as tmp:
        tmp.write_text(f"[\n{lines}\n]\n", encoding="utf-8")


def build(corpus: Path, output_dir: Path, seed: int, sizes: Sizes = Sizes()) -> dict[str, Counter]:
    """Write the five files (six with ``arithmetic_rl``); returns the number of records per task family in each."""
    tokenizer = context_tokenizer(corpus) if corpus.is_file() else None  # read_corpus names a missing file
    train, test, mixed = build_examples(corpus, seed, tokenizer, sizes)
    train, rl_sums = split_rl_sums(train, sizes)
    rng = random.Random(seed + 1)
    train_pairs = pairwise_records(train, rng, sizes.pairwise_arithmetic)
    test_pairs = pairwise_records(test, rng, sizes.arithmetic_test)
    if sizes.all_wrong_sums:
        train_pairs += all_wrong_answer_pairs(train, train_pairs)
    mixing = random.Random(seed + 2)  # its own generator: the test pairs stay as they were
    train_pairs += pairwise_records(mixed, mixing, 0)
    mixing.shuffle(train_pairs)
    train = [*train, *mixed]
    mixing.shuffle(train)
    chats = random.Random(seed + 4)  # its own generator: the files above stay as they were
    fits = dialogue_fit(tokenizer, sizes.context)
    tool = sizes.arithmetic_chat_form == "tool"
    train_chats = [w for r in dialogues(train, chats, sizes.chat_sums_train, tool, sizes.chat_follow_ups)
                   for w in windows(r, fits)]
    test_chats = [r for r in dialogues(test, chats, sizes.chat_sums_test, follow_ups=sizes.chat_follow_ups)
                  if fits(r)]  # references: answers alone
    sft_train = sft_records(train) + train_chats
    chats.shuffle(sft_train)
    files = {"sft_data.json": sft_train, "sft_test.json": sft_records(test), "chat_test.json": test_chats,
             "rlhf_pairwise.json": train_pairs, "rlhf_pairwise_test.json": test_pairs}
    if rl_sums:
        files[RL_FILE] = sft_records(rl_sums)
    output_dir.mkdir(parents=True, exist_ok=True)
    for name, records in files.items():
        write_json(output_dir / name, records)
    stale = output_dir / RL_FILE
    if not rl_sums and stale.exists():  # an earlier --arithmetic_rl build's prompts are SFT data now
        stale.unlink()
        print(f"removed {stale}: its sums are in {output_dir / 'sft_data.json'} now")
    return {name: Counter(r["task"] for r in records) for name, records in files.items()}


# ----------------------------------------------------------------------------- CLI

def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m data.sft.build_sft_data", description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=cli.nonnegative_int, default=0,
                   help="seed of the split, the sampling and the wrong answers")
    p.add_argument("--output_dir", type=Path, default=DEFAULT_OUTPUT, help="folder the .json files are written to")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS,
                   help="the pretraining corpus (one document per line) the poem and speaker families come from")
    count = cli.nonnegative_int
    p.add_argument("--arithmetic_train", type=count, default=Sizes.arithmetic_train,
                   help="distinct sums (of the 10,000) in the train split")
    p.add_argument("--arithmetic_test", type=count, default=Sizes.arithmetic_test, help="distinct held-out sums")
    p.add_argument("--arithmetic_rl", type=count, default=Sizes.arithmetic_rl,
                   help="of the train sums, how many go to rlvf_prompts.json (prompts for --mode rlvf) instead of "
                        "the SFT and preference data: sums the SFT model never saw (the test files do not change)")
    p.add_argument("--pairwise_arithmetic", type=count, default=Sizes.pairwise_arithmetic,
                   help="sums with one sampled wrong answer among the train preference pairs (the test pairs hold "
                        "every test sum)")
    p.add_argument("--one_wrong_answer_per_sum", action="store_true",
                   help="leave out the extra pairs that give every wrong answer of every train sum")
    p.add_argument("--speaker_train", type=count, default=Sizes.speaker_train,
                   help="speaker examples in the train split")
    p.add_argument("--speaker_test", type=count, default=Sizes.speaker_test, help="speaker examples in the test split")
    p.add_argument("--chat_sums_train", type=count, default=Sizes.chat_sums_train,
                   help="train sums that also open a three-turn arithmetic dialogue in sft_data.json")
    p.add_argument("--chat_sums_test", type=count, default=Sizes.chat_sums_test,
                   help="held-out sums that open a dialogue in chat_test.json (at most --arithmetic_test)")
    p.add_argument("--arithmetic_chat_form", choices=CHAT_FORMS, default=Sizes.arithmetic_chat_form,
                   help="train arithmetic dialogues: tool = each follow-up answered through a calculator call "
                        "(the engine runs it), plain = the answers alone")
    p.add_argument("--chat_follow_ups", type=count, default=Sizes.chat_follow_ups,
                   help="follow-up turns after each dialogue's sum (再加 c 呢？, 再减 d 呢？, in turn)")
    p.add_argument("--context", type=cli.positive_int, default=Sizes.context,
                   help="tokens a dialogue must fit: a longer train dialogue is split into two-turn windows, a "
                        "longer test dialogue left out (the model's context at SFT)")
    p.add_argument("--mixed_excerpts_train", type=count, default=Sizes.mixed_excerpts_train,
                   help="next-line excerpts of lines from different train poems (two prompts each) added to the "
                        "train split: the real excerpts are too few to learn the copy from")
    return p


def sizes_of(args: argparse.Namespace) -> Sizes:
    """The Sizes the flags ask for."""
    return Sizes(arithmetic_train=args.arithmetic_train, arithmetic_test=args.arithmetic_test,
                 arithmetic_rl=args.arithmetic_rl, pairwise_arithmetic=args.pairwise_arithmetic,
                 speaker_train=args.speaker_train, speaker_test=args.speaker_test,
                 mixed_excerpts_train=args.mixed_excerpts_train, all_wrong_sums=not args.one_wrong_answer_per_sum,
                 chat_sums_train=args.chat_sums_train, chat_sums_test=args.chat_sums_test,
                 arithmetic_chat_form=args.arithmetic_chat_form, chat_follow_ups=args.chat_follow_ups,
                 context=args.context)


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; bad input gives one `error:` line and exit 2, nothing written (cli.run_cli)."""
    return cli.run_cli(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    cli.check_output_folder(args.output_dir, "--output_dir")
    # the files this builder writes (earlier builds of them are replaced); never the corpus it reads
    outputs = {f"--output_dir's {name}": args.output_dir / name for name in (*OUTPUT_FILES, RL_FILE)}
    cli.check_outputs(outputs, [("--corpus", args.corpus)], own=lambda path: True)
    counts = build(args.corpus, args.output_dir, args.seed, sizes_of(args))
    for name, per_task in counts.items():
        families = ", ".join(f"{task} {n}" for task, n in sorted(per_task.items()))
        print(f"{args.output_dir / name}: {sum(per_task.values())} records ({families})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
