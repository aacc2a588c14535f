"""The built-in calculator a chat model calls while it decodes: a safe evaluator of arithmetic expressions.

    evaluate("42+8")          # "50"
    evaluate("(3 - 5) * 7/2") # "-7"
    evaluate("1/0")           # "error: division by zero"

Only numbers, ``+ - * /``, parentheses and unary minus/plus: the expression is parsed with ``ast`` and walked node by
node (never ``eval``), within bounds on its length, its nesting depth and the magnitude of every number, so a hostile
expression costs microseconds and never raises: anything else is an ``error: ...`` string, which the model reads as
the tool's result. Arithmetic is exact (fractions); a result that is not an integer is written with 10 significant
digits.
"""
from __future__ import annotations

import ast
import math
from fractions import Fraction

MAX_EXPRESSION_CHARS = 200  # a demo expression is ~10 characters; this bounds the parse and the work
MAX_DEPTH = 64  # nested operations (and parentheses) at most: a sum of 64 numbers
MAX_MAGNITUDE = 10 ** 15  # every number, given or computed, stays within +-10^15
BINARY = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
          ast.Div: lambda a, b: a / b}
UNARY = {ast.USub: lambda a: -a, ast.UAdd: lambda a: a}


class CalculatorError(ValueError):
    """An expression the calculator refuses; its message is the result the model sees (after "error: ")."""


def evaluate(expression: str) -> str:
    """The value of ``expression`` as text, or ``"error: <why>"``; never raises, never evaluates Python."""
    try:
        return format_number(value_of(expression))
    except CalculatorError as err:
        return f"error: {err}"


def value_of(expression: str) -> Fraction:
    """The exact value of an arithmetic expression; CalculatorError for anything else."""
    if not isinstance(expression, str):
        raise CalculatorError("not an arithmetic expression")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    if expression.count("(") > MAX_DEPTH:  # the parser recurses on parentheses before our depth check sees them
        raise CalculatorError("expression nested too deeply")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: a NUL byte
        raise CalculatorError("not an arithmetic expression") from None
    return _walk(tree.body, 0)


def _walk(node: ast.AST, depth: int) -> Fraction:
    if depth > MAX_DEPTH:
        raise CalculatorError("expression nested too deeply")
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):  # not bool, complex or str
        if isinstance(node.value, float) and not math.isfinite(node.value):  # 1e999 parses as inf
            raise CalculatorError("number too large")
        return _bounded(Fraction(str(node.value)) if isinstance(node.value, float) else Fraction(node.value))
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        left, right = _walk(node.left, depth + 1), _walk(node.right, depth + 1)
        if isinstance(node.op, ast.Div) and right == 0:
            raise CalculatorError("division by zero")
        return _bounded(BINARY[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return _bounded(UNARY[type(node.op)](_walk(node.operand, depth + 1)))
    raise CalculatorError("not an arithmetic expression (numbers, + - * /, parentheses)")


def _bounded(value: Fraction) -> Fraction:
    if abs(value) > MAX_MAGNITUDE:
        raise CalculatorError("number too large")
    return value


def format_number(value: Fraction) -> str:
    """An integer as itself ("50", "-3"); any other value with 10 significant digits ("3.5", "0.3333333333")."""
    if value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):.10g}"
