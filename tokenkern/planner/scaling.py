"""Scaling laws: predicted downstream error as a function of LLM size and visual tokens.

A law is any callable ``law(n_params, visual_tokens) -> error`` (``n_params``: LLM parameters,
a count, not billions; ``visual_tokens``: tokens per image the LLM sees, >= 1; lower error is
better). Two parametric forms ship:

* ``PowerLaw`` (the form of Li, Goyal, Semedo, Kolter, "Inference Optimal VLMs Need Only One
  Visual Token but Larger Models", arXiv 2411.03312)::

      error(N, V) = A * (N / 1e9) ** -alpha * V ** -beta + D

* ``AdditivePowerLaw`` (Chinchilla-style separable form)::

      error(N, V) = E + A * (N / 1e9) ** -alpha + B * V ** -beta

``DEFAULT_LAW`` is the paper's visual-reasoning law. Where its numbers come from:

* the form and ``alpha = 0.077``, ``beta = 0.015``: the authors' fit of the average error over
  their visual-reasoning benchmarks (LLaVA-NeXT-style models with Qwen-1.5 LLMs of 0.5B-7B, a
  CLIP ViT-L/14-336 tower, V in {1, 4, 16, 36, 64, 144, 576}), as reported in their repository
  (``locuslab/llava-token-compression``: the legend of the scaling plot drawn by
  ``scaling_law_code/objective.py``; the README's "performance varies 5x faster with LLM
  parameters than with visual tokens" is ``alpha / beta``). We did not have the paper's full
  text to cross-check them. That code evaluates the law at the visual token count V (the paper
  writes ``T = Q + V``), so the coefficients here are for V.
* ``A`` and ``D`` are **not published** (the fitting script writes them to a file that is not
  in the repository). We fitted them by least squares, with alpha and beta fixed at the values
  above and ``D >= 0``, to the 28 average accuracies in that repository's
  ``scaling_law_code/values.py`` (``LI2024_VISUAL_REASONING_POINTS`` below; error = 1 - accuracy).
  RMS residual 0.004. ``fit_power_law`` reproduces both steps (``tests/test_planner.py``); a free
  fit of all four with ``D >= 0`` gives alpha = 0.071, beta = 0.015.

The law was fitted on one model family and 0.5B-7B LLMs; applying it to other families (LLaVA-1.5,
Qwen2-VL) or sizes is extrapolation. The paper reports the opposite trend for OCR-like tasks
(visual tokens matter more than LLM size): for those, fit or supply your own law.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

N_UNIT = 1e9  # the laws take N in parameters and raise N / 1e9 (billions) to the power


class ScalingLaw(Protocol):
    def __call__(self, n_params: float, visual_tokens: float) -> float: ...


def _check_inputs(n_params: float, visual_tokens: float) -> None:
    if not n_params > 0:
        raise ValueError(f"scaling law: n_params must be > 0, got {n_params!r}")
    if not visual_tokens >= 1:
        raise ValueError(f"scaling law: visual_tokens must be >= 1, got {visual_tokens!r}")


@dataclass(frozen=True)
class PowerLaw:
    """``error(N, V) = A * (N / 1e9) ** -alpha * V ** -beta + D`` (N in parameters)."""

    A: float
    alpha: float
    beta: float
    D: float = 0.0

    def __call__(self, n_params: float, visual_tokens: float) -> float:
        _check_inputs(n_params, visual_tokens)
        return self.A * (n_params / N_UNIT) ** -self.alpha * visual_tokens**-self.beta + self.D

    def describe(self) -> str:
        return f"error = {self.A:.4g} * (N/1e9)^-{self.alpha:.4g} * V^-{self.beta:.4g} + {self.D:.4g}"


@dataclass(frozen=True)
class AdditivePowerLaw:
    """``error(N, V) = E + A * (N / 1e9) ** -alpha + B * V ** -beta`` (N in parameters)."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float

    def __call__(self, n_params: float, visual_tokens: float) -> float:
        _check_inputs(n_params, visual_tokens)
        return self.E + self.A * (n_params / N_UNIT) ** -self.alpha + self.B * visual_tokens**-self.beta

    def describe(self) -> str:
        return f"error = {self.E:.4g} + {self.A:.4g} * (N/1e9)^-{self.alpha:.4g} + {self.B:.4g} * V^-{self.beta:.4g}"


# (LLM size in billions as labelled, visual tokens, average accuracy over the visual-reasoning
# benchmarks), from the authors' scaling_law_code/values.py (see the module docstring).
_LI2024_V = (1, 4, 16, 36, 64, 144, 576)
_LI2024_ACC = {
    0.5: (0.3855, 0.3917, 0.4078, 0.4133, 0.4151, 0.4244, 0.4320),
    1.8: (0.4333, 0.4519, 0.4528, 0.4597, 0.4609, 0.4758, 0.4808),
    4.0: (0.4630, 0.4692, 0.4858, 0.4916, 0.5023, 0.5092, 0.5185),
    7.0: (0.4810, 0.4971, 0.5050, 0.5141, 0.5172, 0.5238, 0.5354),
}
LI2024_VISUAL_REASONING_POINTS: tuple[tuple[float, int, float], ...] = tuple(
    (n, v, acc) for n, accs in _LI2024_ACC.items() for v, acc in zip(_LI2024_V, accs, strict=True)
)

LI2024_ALPHA = 0.077
LI2024_BETA = 0.015
# A and D: our least-squares fit (alpha, beta fixed as above, D >= 0) to the points above.
LI2024_VISUAL_REASONING = PowerLaw(A=0.5534, alpha=LI2024_ALPHA, beta=LI2024_BETA, D=0.0357)
DEFAULT_LAW: PowerLaw = LI2024_VISUAL_REASONING


def _fit_a_d(x: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least squares ``e ~ A x + D`` along the last axis with ``A >= 0, D >= 0``; returns
    (A, D, sum of squared residuals) over the leading axes."""
    xm, em = x.mean(-1, keepdims=True), e.mean(-1, keepdims=True)
    var = ((x - xm) ** 2).sum(-1)
    cov = ((x - xm) * (e - em)).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(var > 0, cov / var, 0.0)
    d = em[..., 0] - a * xm[..., 0]
    # D < 0: refit through the origin; A < 0: a constant fits best
    neg_d = d < 0
    a_origin = (x * e).sum(-1) / np.maximum((x * x).sum(-1), np.finfo(float).tiny)
    a = np.where(neg_d, a_origin, a)
    d = np.where(neg_d, 0.0, d)
    neg_a = a < 0
    a = np.where(neg_a, 0.0, a)
    d = np.where(neg_a, np.maximum(em[..., 0], 0.0), d)
    sse = ((a[..., None] * x + d[..., None] - e) ** 2).sum(-1)
    return a, d, sse


def fit_power_law(
    n_params: Sequence[float],
    visual_tokens: Sequence[float],
    errors: Sequence[float],
    *,
    alpha: float | None = None,
    beta: float | None = None,
    alpha_max: float = 1.0,
    beta_max: float = 0.5,
) -> tuple[PowerLaw, float]:
    """Fit ``PowerLaw`` to measurements; returns ``(law, rms_residual)``.

    ``A >= 0, D >= 0`` are solved by least squares for each (alpha, beta); alpha and beta, unless
    fixed, are searched on a grid over ``[0, alpha_max] x [0, beta_max]`` (step 1/200 of the
    range), then on a 100x finer grid around the best cell. Deterministic.

    Args:
        n_params: LLM parameters of each measurement (counts, not billions).
        visual_tokens: visual tokens of each measurement (>= 1).
        errors: measured errors (e.g. ``1 - accuracy``).
    """
    n = np.asarray(n_params, dtype=np.float64) / N_UNIT
    v = np.asarray(visual_tokens, dtype=np.float64)
    e = np.asarray(errors, dtype=np.float64)
    if not (n.shape == v.shape == e.shape) or n.ndim != 1 or len(n) < 2:
        raise ValueError("fit_power_law: n_params, visual_tokens, errors must be 1-D sequences of equal length >= 2")
    if not (np.isfinite(n).all() and np.isfinite(v).all() and np.isfinite(e).all()):
        raise ValueError("fit_power_law: n_params, visual_tokens and errors must be finite")
    if (n <= 0).any() or (v < 1).any():
        raise ValueError("fit_power_law: n_params must be > 0 and visual_tokens >= 1")
    log_n, log_v = np.log(n), np.log(v)

    def search(alphas: np.ndarray, betas: np.ndarray) -> tuple[float, float, float, float, float]:
        x = np.exp(-alphas[:, None, None] * log_n - betas[None, :, None] * log_v)
        a, d, sse = _fit_a_d(x, np.broadcast_to(e, x.shape))
        i, j = np.unravel_index(int(np.argmin(sse)), sse.shape)
        return float(alphas[i]), float(betas[j]), float(a[i, j]), float(d[i, j]), float(sse[i, j])

    def grid(fixed: float | None, hi: float, centre: float | None = None) -> np.ndarray:
        if fixed is not None:
            return np.array([float(fixed)])
        step = hi / 200
        if centre is None:
            return np.linspace(0.0, hi, 201)
        return np.clip(np.linspace(centre - step, centre + step, 201), 0.0, None)

    al, be, _, _, _ = search(grid(alpha, alpha_max), grid(beta, beta_max))
    al, be, a, d, sse = search(grid(alpha, alpha_max, al), grid(beta, beta_max, be))
    return PowerLaw(A=a, alpha=al, beta=be, D=d), float(np.sqrt(sse / len(e)))
