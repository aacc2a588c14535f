"""The built-in calculator: exact arithmetic on a table of expressions checked against Fraction arithmetic by hand,
and hostile input (Python code, huge numbers, deep nesting, bad syntax) answered with an error string, never raised
and never evaluated."""
from __future__ import annotations

from fractions import Fraction

import pytest

import calculator
from calculator import MAX_DEPTH, MAX_EXPRESSION_CHARS, evaluate

GOOD = [("42+8", "50"), ("50-5", "45"), (" 12 + 7 ", "19"), ("-3", "-3"), ("+3", "3"), ("-(-5)", "5"),
        ("(3 - 5) * 7 / 2", "-7"), ("2*3+4", "10"), ("2*(3+4)", "14"), ("7/2", "3.5"), ("1/3", "0.3333333333"),
        ("0.1+0.2", "0.3"), ("10/4*2", "5"), ("198+20", "218"), ("0-20", "-20"), ("1e3+1", "1001"),
        ("((((1))))", "1"), ("1" + "+1" * 60, "61"), (str(10 ** 15), str(10 ** 15)), ("22/7", "3.142857143")]

HOSTILE = [("__import__('os').system('echo pwned')", "not an arithmetic expression"),
           ("open('/etc/passwd').read()", "not an arithmetic expression"),
           ("(lambda: 1)()", "not an arithmetic expression"), ("x + 1", "not an arithmetic expression"),
           ("[1, 2]", "not an arithmetic expression"), ("'a' * 3", "not an arithmetic expression"),
           ("True + 1", "not an arithmetic expression"), ("1j", "not an arithmetic expression"),
           ("2 ** 10", "not an arithmetic expression"), ("9 ** 9 ** 9", "not an arithmetic expression"),
           ("7 // 2", "not an arithmetic expression"), ("7 % 2", "not an arithmetic expression"),
           ("1 if 1 else 2", "not an arithmetic expression"), ("1 < 2", "not an arithmetic expression"),
           ("1/0", "division by zero"), ("1/(2-2)", "division by zero"), ("0/0", "division by zero"),
           ("9" * 16, "number too large"), (f"{10 ** 15} + 1", "number too large"),
           ("99999999 * 99999999", "number too large"), ("1e999", "number too large"),
           ("1e300", "number too large"), ("(" * 70 + "1" + ")" * 70, "nested too deeply"),
           ("-" * 100 + "1", "nested too deeply"), ("1" + "+1" * 100, "longer than"), ("", "not an arithmetic"),
           ("1 +", "not an arithmetic"), ("(1", "not an arithmetic"), ("\x00", "not an arithmetic"),
           ("1\n+1", "not an arithmetic"), ("\ud800", "not an arithmetic")]


@pytest.mark.parametrize("expression,expected", GOOD)
def test_arithmetic_is_exact(expression, expected):
    assert evaluate(expression) == expected
    reference = Fraction(expected)  # the written result, read back, is the value to its 10 significant digits
    assert abs(calculator.value_of(expression) - reference) <= abs(reference) * Fraction(1, 10 ** 9)


@pytest.mark.parametrize("expression,reason", HOSTILE)
def test_hostile_expressions_are_an_error_string_never_an_exception(expression, reason):
    result = evaluate(expression)
    assert result.startswith("error: ") and reason in result


def test_nothing_is_ever_evaluated_as_python(monkeypatch):
    """The calculator's code never reaches eval, exec or compile (names it would find before the builtins)."""
    called = []
    for name in ("eval", "exec", "compile"):
        monkeypatch.setattr(calculator, name, lambda *a, **k: called.append(a), raising=False)
    for expression, _ in GOOD + HOSTILE:
        evaluate(expression)
    assert not called and evaluate("42+8") == "50"


def test_bounds_are_the_documented_ones():
    assert evaluate("1" * (MAX_EXPRESSION_CHARS + 1)).startswith("error: expression longer than")
    assert evaluate("(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1)) == "error: expression nested too deeply"
    assert evaluate(None) == "error: not an arithmetic expression"
