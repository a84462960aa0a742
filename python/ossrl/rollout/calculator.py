"""A safe calculator tool: arithmetic expressions evaluated by walking their syntax tree.

Never ``eval``: only numbers, arithmetic operators, parentheses, a few math functions and
constants are accepted, and integer results are bounded so ``9**9**9`` is refused at once.
"""

from __future__ import annotations

import ast
import math
from typing import Any, Callable



class CalculatorError(ValueError):
    """The expression is not valid arithmetic or its result would be too large."""


_CALC_MAX_CHARS = 2000
_CALC_MAX_NODES = 500
_CALC_MAX_BITS = 4096  # integers beyond 2**4096 (about 1233 digits) are refused
_CALC_FUNCS: dict[str, Callable[..., Any]] = {
    "abs": abs, "round": round, "min": min, "max": max,
    "sqrt": math.sqrt, "exp": math.exp, "log": math.log, "log2": math.log2, "log10": math.log10,
    "sin": math.sin, "cos": math.cos, "tan": math.tan, "floor": math.floor, "ceil": math.ceil,
}
_CALC_CONSTS = {"pi": math.pi, "e": math.e}


def _calc_check(x):
    if isinstance(x, int) and x.bit_length() > _CALC_MAX_BITS:
        raise CalculatorError("result too large")
    if isinstance(x, float) and not math.isfinite(x):
        raise CalculatorError("result is not a finite number")
    return x


def _calc_pow(a, b):
    try:
        if isinstance(a, int) and isinstance(b, int):
            if b < 0:  # a float result
                if a == 0:
                    raise CalculatorError("division by zero")
                return float(a) ** b
            # an integer result: bound its size before computing it
            if abs(a) > 1 and (b > _CALC_MAX_BITS or (abs(a).bit_length() - 1) * b > _CALC_MAX_BITS):
                raise CalculatorError("exponent too large: the result would exceed 2**4096")
            return a**b
        r = float(a) ** float(b)
    except OverflowError:
        raise CalculatorError("result too large") from None
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    if isinstance(r, complex):
        raise CalculatorError("the result is not a real number")
    return r


def evaluate_expression(expression: str) -> int | float:
    """Evaluate an arithmetic expression safely (``ast`` walk, no ``eval``). Supports numbers,
    ``+ - * / // % **``, unary signs, parentheses, ``pi``, ``e`` and abs, round, min, max,
    sqrt, exp, log, log2, log10, sin, cos, tan, floor, ceil. Raises CalculatorError."""
    if not isinstance(expression, str):
        raise CalculatorError("the expression must be a string")
    expr = expression.strip().replace("^", "**").replace("×", "*").replace("÷", "/")
    if not expr:
        raise CalculatorError("empty expression")
    if len(expr) > _CALC_MAX_CHARS:
        raise CalculatorError(f"expression too long (limit {_CALC_MAX_CHARS} characters)")
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise CalculatorError("invalid expression") from None
    if sum(1 for _ in ast.walk(tree)) > _CALC_MAX_NODES:
        raise CalculatorError("expression too complex")

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant):
            v = node.value
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise CalculatorError(f"unsupported constant {v!r}")
            return _calc_check(v)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            v = ev(node.operand)
            return v if isinstance(node.op, ast.UAdd) else -v
        if isinstance(node, ast.BinOp):
            a, b = ev(node.left), ev(node.right)
            op = node.op
            try:
                if isinstance(op, ast.Add):
                    return _calc_check(a + b)
                if isinstance(op, ast.Sub):
                    return _calc_check(a - b)
                if isinstance(op, ast.Mult):
                    return _calc_check(a * b)
                if isinstance(op, ast.Div):
                    return _calc_check(a / b)
                if isinstance(op, ast.FloorDiv):
                    return _calc_check(a // b)
                if isinstance(op, ast.Mod):
                    return _calc_check(a % b)
                if isinstance(op, ast.Pow):
                    return _calc_check(_calc_pow(a, b))
            except ZeroDivisionError:
                raise CalculatorError("division by zero") from None
            except OverflowError:
                raise CalculatorError("result too large") from None
            raise CalculatorError(f"unsupported operator {type(op).__name__}")
        if isinstance(node, ast.Name):
            if node.id in _CALC_CONSTS:
                return _CALC_CONSTS[node.id]
            raise CalculatorError(f"unknown name {node.id!r}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
            fn = _CALC_FUNCS.get(node.func.id)
            if fn is None:
                raise CalculatorError(f"unknown function {node.func.id!r}")
            args = [ev(a) for a in node.args]
            if not args:
                raise CalculatorError(f"{node.func.id}() needs an argument")
            try:
                return _calc_check(fn(*args))
            except (ValueError, TypeError, OverflowError) as e:
                raise CalculatorError(f"{node.func.id}: {e}") from None
        raise CalculatorError(f"unsupported syntax: {type(node).__name__}")

    try:
        return ev(tree)
    except RecursionError:
        raise CalculatorError("expression too deeply nested") from None


def format_number(x: int | float) -> str:
    """Integers exactly; floats with up to 12 significant digits (0.1 + 0.2 -> '0.3')."""
    if isinstance(x, float):
        s = format(x, ".12g")
        return s
    return str(x)


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression, e.g. '(17 + 25) * 3 / 2'."""
    return format_number(evaluate_expression(expression))
