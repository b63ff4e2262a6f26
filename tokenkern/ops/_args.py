"""Argument checks shared by every face of an op (fake, CPU and CUDA kernels), so that a
bad call fails the same way, with a message naming the argument, wherever it runs."""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type: a TypeError, and a ValueError like every other bad
    argument (so that ``except ValueError`` keeps catching all of them)."""


def fail(op: str, message: str) -> None:
    raise ValueError(f"tokenkern.{op}: {message}")


def fail_type(op: str, message: str) -> None:
    raise ArgumentTypeError(f"tokenkern.{op}: {message}")


def tensor(op: str, name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        fail_type(op, f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value  # type: ignore[return-value]


def ndim(op: str, name: str, t: torch.Tensor, dims: int, layout: str) -> None:
    if t.dim() != dims:
        fail(op, f"{name} must be {layout}, got shape {tuple(t.shape)}")


def dtype(op: str, name: str, t: torch.Tensor, allowed: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    if t.dtype not in allowed:
        names = " or ".join(dtype_name(d) for d in allowed)
        fail(op, f"{name} must have dtype {names}, got {dtype_name(t.dtype)}")


def dtype_name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def same_device(op: str, named: Sequence[tuple[str, torch.Tensor | None]]) -> None:
    present = [(n, t) for n, t in named if t is not None]
    first_name, first = present[0]
    for name, t in present[1:]:
        if t.device != first.device:
            fail(op, f"{name} is on {t.device} but {first_name} is on {first.device}")


INT64_MAX = 2**63 - 1
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)  # the smallest normal float32


def _type_error(op: str, name: str, expected: str, value: object, convert: str) -> None:
    if isinstance(value, torch.Tensor):
        got = f"a Tensor of shape {tuple(value.shape)} (pass a Python value, e.g. {name}={convert}(t))"
    else:
        got = f"{type(value).__name__} {value!r}"
    fail_type(op, f"{name} must be {expected}, got {got}")


def integer(op: str, name: str, value: object) -> None:
    """A Python int (or a SymInt under torch.compile): not a bool, a float or a tensor, 0-d
    ones included (the ops' schemas take int64; a tensor would need a host sync). TypeError
    otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | torch.SymInt):
        _type_error(op, name, "a Python int", value, "int")


def int_range(op: str, name: str, value: int, lo: int, hi: int | None = None, what: str = "") -> None:
    """A Python int (see integer) in [lo, hi]; hi=None: any value up to 2**63 - 1 (int64)."""
    integer(op, name, value)
    if value < lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        fail(op, f"{name} must be {bound}{what}, got {value}")
    if hi is None and value > INT64_MAX:
        fail(op, f"{name} must be in [{lo}, 2**63 - 1] (an int64){what}, got {value}")


def at_most(op: str, name: str, value: int, hi: int, why: str) -> None:
    """value <= hi, a documented maximum (why: what it bounds)."""
    if value > hi:
        fail(op, f"{name} must be <= {hi} ({why}), got {value}")


def number(op: str, name: str, value: object) -> float:
    """A finite Python int or float (not a bool or a tensor) representable in float32:
    |value| <= 3.4028235e38. Returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, int | float | torch.SymFloat | torch.SymInt):
        _type_error(op, name, "a finite Python number", value, "float")
    if isinstance(value, torch.SymFloat | torch.SymInt):
        return value  # type: ignore[return-value]
    if not abs(value) <= FLOAT32_MAX:  # also NaN, Inf and ints too large for a float
        fail(op, f"{name} must be a finite number with |{name}| <= {FLOAT32_MAX:.8g} (float32), got {value!r}")
    return float(value)


def flag(op: str, name: str, value: object) -> None:
    """A Python bool (not an int or a tensor)."""
    if not isinstance(value, bool | torch.SymBool):
        _type_error(op, name, "a bool", value, "bool")


def tokens(op: str, name: str, x: object) -> torch.Tensor:
    """A (B, N, D) float32/float16/bfloat16 token matrix with N, D >= 1."""
    x = tensor(op, name, x)
    ndim(op, name, x, 3, "(B, N, D)")
    dtype(op, name, x)
    if x.shape[1] < 1 or x.shape[2] < 1:
        fail(op, f"{name} must have N >= 1 tokens and D >= 1 features, got shape {tuple(x.shape)}")
    return x


def batched(op: str, name: str, x: object) -> tuple[torch.Tensor, bool]:
    """x: (N, D) or (B, N, D) -> (B, N, D) and whether x was one sample (the public functions
    that also take a single token matrix)."""
    x = tensor(op, name, x)
    if x.dim() == 2:
        return x.unsqueeze(0), True
    ndim(op, name, x, 3, "(N, D) or (B, N, D)")
    return x, False


def is_cuda(x: object) -> bool:
    """Whether x is a CUDA tensor (fake ones included: the fake kernels check CUDA limits)."""
    return isinstance(x, torch.Tensor) and x.device.type == "cuda"


def keep_count(op: str, name: str, value: int, n: int) -> None:
    int_range(op, name, value, 1, n, f" (1 <= {name} <= {n})")
