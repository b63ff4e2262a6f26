"""Checks for the fields of the method configs, run in each config's ``__post_init__`` so that a
bad option fails when the config is built, with the field's own name (not later, inside an op,
under an internal name).

Every check raises ``ValueError("tokenkern.<method>: <field> must be ..., got ...")``. Bools are
refused where an int or a float is expected (``True`` is not a count).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _fail(method: str, name: str, expected: str, value: object) -> None:
    raise ValueError(f"tokenkern.{method}: {name} must be {expected}, got {value!r}")


def keep(method: str, value: object, name: str = "keep") -> None:
    """A fraction in (0, 1] (float) or a count >= 1 (int)."""
    expected = "a fraction in (0, 1] (float) or a token count >= 1 (int)"
    if isinstance(value, bool) or not isinstance(value, int | float):
        _fail(method, name, expected, value)
    if isinstance(value, float) and not (math.isfinite(value) and 0.0 < value <= 1.0):
        _fail(method, name, expected, value)
    if isinstance(value, int) and value < 1:
        _fail(method, name, expected, value)


def integer(method: str, name: str, value: object, lo: int | None = None, hi: int | None = None) -> None:
    """An int (not a bool) in [lo, hi] (either bound may be None)."""
    bounds = (
        f" in [{lo}, {hi}]" if lo is not None and hi is not None
        else f" >= {lo}" if lo is not None
        else f" <= {hi}" if hi is not None
        else ""
    )  # fmt: skip
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(method, name, f"an int{bounds}", value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        _fail(method, name, f"an int{bounds}", value)


def optional_integer(method: str, name: str, value: object, lo: int | None = None, hi: int | None = None) -> None:
    if value is not None:
        integer(method, name, value, lo, hi)


def number(
    method: str,
    name: str,
    value: object,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> None:
    """A finite int or float (not a bool) in the interval given by lo/hi (open ends as asked)."""
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    if lo is not None and hi is not None:
        expected = f"a finite number in {left}{lo}, {hi}{right}"
    elif lo is not None:
        expected = f"a finite number {'>' if lo_open else '>='} {lo}"
    elif hi is not None:
        expected = f"a finite number {'<' if hi_open else '<='} {hi}"
    else:
        expected = "a finite number"
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        _fail(method, name, expected, value)
    if lo is not None and (value < lo or (lo_open and value == lo)):
        _fail(method, name, expected, value)
    if hi is not None and (value > hi or (hi_open and value == hi)):
        _fail(method, name, expected, value)


def choice(method: str, name: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
        _fail(method, name, f"one of {tuple(choices)}", value)


def flag(method: str, name: str, value: object) -> None:
    if not isinstance(value, bool):
        _fail(method, name, "a bool", value)
