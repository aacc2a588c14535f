"""Verifiable rewards: functions that score a response against its record's reference answer, in a registry a
user extends in a few lines. GRPO (``finetune.py --mode rlvf``) trains on them and the evaluator's best-of-N can pick
with them; a module of its own so that neither imports the other for it.

    from verifiers import register_verifier

    @register_verifier("ends_with_period")
    def ends_with_period(response: str, record: dict) -> float:
        return float(response.strip().endswith("。"))

A record picks its verifier by ``"verifier"``, else by ``"task"`` (``TASK_VERIFIERS``), else ``exact``.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Callable

from prompts import record_reference
from readers import DataError

Verifier = Callable[[str, dict], float]
VERIFIERS: dict[str, Verifier] = {}
TASK_VERIFIERS = {"arithmetic": "math"}  # a record's "task" -> its verifier; others: "exact" or record["verifier"]
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def register_verifier(name: str) -> Callable[[Verifier], Verifier]:
    """Decorator: ``@register_verifier("mine")`` makes ``def mine(response, record) -> float`` a verifier."""
    def add(function: Verifier) -> Verifier:
        VERIFIERS[name] = function
        return function
    return add


def last_number(text: str) -> float | None:
    """The last number in a text: full-width digits and the Unicode minus are read as ASCII (NFKC)."""
    found = _NUMBER.findall(unicodedata.normalize("NFKC", text).replace("\u2212", "-"))
    return float(found[-1]) if found else None


@register_verifier("math")
def math_verifier(response: str, record: dict) -> float:
    """1 when the response's last number equals the reference's (surrounding text such as 答案是 42。 is fine)."""
    got, expected = last_number(response), last_number(record_reference(record))
    return float(got is not None and expected is not None and abs(got - expected) < 1e-9)


@register_verifier("exact")
def exact_verifier(response: str, record: dict) -> float:
    return float(response.strip() == record_reference(record).strip())


@register_verifier("format")
def format_verifier(response: str, record: dict) -> float:
    """1 for a well-formed answer: non-empty, one line, no leaked template marker."""
    text = response.strip()
    return float(bool(text) and "\n" not in text and "###" not in text)


def verifier_name(record: dict) -> str:
    """The registered verifier a record picks (record["verifier"], else by record["task"], else exact)."""
    for key in ("verifier", "task"):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise DataError(f"field {key!r} is a {type(record[key]).__name__}: it must be a string (one verifier's "
                            f"name; registered: {sorted(VERIFIERS)})")
    name = record.get("verifier") or TASK_VERIFIERS.get(record.get("task"), "exact")
    if name not in VERIFIERS:
        raise DataError(f"unknown verifier {name!r}; registered: {sorted(VERIFIERS)} (add one with register_verifier)")
    return name


def check_verifiers(records: list[dict], source: str) -> None:
    """Every record's verifier, looked up before anything runs (a run must not fail on its data after it started
    writing): the first bad one is a one-line error naming the file and the record."""
    for i, record in enumerate(records):
        try:
            verifier_name(record)
        except DataError as err:
            raise DataError(f"{source}: record {i + 1}: {err}") from None


def verifiable_reward(response: str, record: dict, format_weight: float = 0.1) -> float:
    """The task's verifier (see ``verifier_name``) plus a small format bonus."""
    name = verifier_name(record)
    return VERIFIERS[name](response, record) + format_weight * VERIFIERS["format"](response, record)
