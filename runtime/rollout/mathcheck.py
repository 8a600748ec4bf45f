"""The math answer checker: the final answer of a completion, and whether it equals the reference.

The answer is the content of the last ``\\boxed{...}`` (braces balanced), or, when there is none,
the last number of the text. Two answers are equal when, in this order:

1. their normalised strings are equal (spaces, ``$``, ``\\left``/``\\right``, ``\\!``, ``\\,``,
   ``\\text{..}`` wrappers, ``^\\circ``, a trailing period and thousands separators removed);
2. both are exact rationals and equal: integers, decimals, ``a/b``, ``\\frac{a}{b}`` (``\\dfrac``,
   ``\\tfrac``, ``\\frac12``), with signs (so ``0.5 == \\frac{1}{2} == 2/4``, compared exactly as
   fractions, never as floats: ``0.333`` is not ``1/3``);
3. both parse as SymPy expressions over a small whitelist (numbers, one-letter symbols,
   ``sqrt``, ``pi``, ``e``, ``log``, trigonometric functions; LaTeX ``\\sqrt``, ``\\frac``,
   ``\\cdot``, ``^``, ``\\pi`` translated first) and ``simplify(a - b) == 0``.

Why SymPy: rationals cover arithmetic answers, but ``2\\sqrt{2}`` against ``\\sqrt{8}`` or
``x + 1`` against ``1 + x`` need a computer-algebra system; SymPy is already installed with torch
(the runtime's dependency). Its parser evaluates Python, so nothing outside the whitelist reaches
it, and long expressions (> 200 characters) or towers of powers are not tried.
"""

from __future__ import annotations

import re
from fractions import Fraction

NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
SYMPY_NAMES = {"sqrt", "pi", "E", "I", "log", "ln", "exp", "sin", "cos", "tan", "oo"}
SYMPY_MAX_CHARS = 200


def boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    at = text.find("{", start)
    if at < 0:
        return None
    depth = 0
    for i in range(at, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[at + 1:i]
    return None


def final_answer(text: str) -> str | None:
    """The last boxed answer, else the last number of ``text``; None when there is neither."""
    answer = boxed(text)
    if answer is not None:
        return answer
    numbers = NUMBER.findall(text.replace("−", "-"))
    return numbers[-1] if numbers else None


def normalise(s: str) -> str:
    s = s.replace("−", "-").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\left|\\right|\\!|\\,|\\;|\\ |\$|\^\{?\\circ\}?|\\%|%", "", s)
    s = re.sub(r"(\d),(\d{3})(?!\d)", r"\1\2", s)
    s = re.sub(r"\s+", "", s)
    return s.rstrip(".")


def rational(s: str) -> Fraction | None:
    """``s`` (normalised) as an exact rational, or None."""
    m = re.fullmatch(r"(-?)\\frac\{?(-?\d+)\}?\{?(-?\d+)\}?", s) or re.fullmatch(r"(-?)\\frac(\d)(\d)", s)
    if m:
        sign, num, den = m.groups()
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
        return -value if sign else value
    if re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)(/\d+)?", s):
        try:
            return Fraction(s)
        except (ValueError, ZeroDivisionError):
            return None
    return None


def _sympy_text(s: str) -> str | None:
    """``s`` in SymPy syntax, or None when it holds anything outside the whitelist."""
    s = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
    s = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", s)
    s = s.replace("\\cdot", "*").replace("\\times", "*").replace("\\pi", "pi").replace("^", "**")
    s = s.replace("{", "(").replace("}", ")")
    s = re.sub(r"\\(sin|cos|tan|log|ln|exp)", r"\1", s)
    if len(s) > SYMPY_MAX_CHARS or not re.fullmatch(r"[0-9A-Za-z+\-*/(). ]*", s) or re.search(r"\.\s*[A-Za-z_]", s):
        return None
    if any(len(w) > 1 and w not in SYMPY_NAMES for w in re.findall(r"[A-Za-z_]+", s)):
        return None
    if s.count("**") > 1 or re.search(r"\*\*\s*\(?\s*\d{4,}", s):  # 9^9^9 or 2^99999 would never finish
        return None
    return s


def _symbolic_equal(a: str, b: str) -> bool:
    ta, tb = _sympy_text(a), _sympy_text(b)
    if ta is None or tb is None:
        return False
    from sympy import simplify
    from sympy.parsing.sympy_parser import implicit_multiplication_application, parse_expr, standard_transformations

    transformations = (*standard_transformations, implicit_multiplication_application)
    try:
        return bool(simplify(parse_expr(ta, transformations=transformations, evaluate=True)
                             - parse_expr(tb, transformations=transformations, evaluate=True)) == 0)
    except Exception:  # noqa: BLE001 -- an answer SymPy cannot read is not equal
        return False


def equivalent(answer: str, reference: str) -> bool:
    """Whether ``answer`` equals ``reference`` (see the module docstring for the three tests)."""
    a, b = normalise(answer), normalise(reference)
    if not a:
        return False
    if a == b:
        return True
    ra, rb = rational(a), rational(b)
    if ra is not None and rb is not None:
        return ra == rb
    return _symbolic_equal(a, b)
