"""gumbel_topk in torch: the CPU kernel of the op, and the backward of both paths.

The relaxation (see ``reference.relaxed_topk``): soft_i = sigmoid((z_i - lambda) / tau) with
lambda such that sum_i soft_i = k, in the shifted form d = (z - a) / tau around the anchor a
(the k-th largest z) and u = (lambda - a) / tau. The op runs it in float64 on the float32
perturbed scores. u is the exact root in z's dtype: two neighbouring floats lo < hi with
excess(lo) >= 0 > excess(hi), the one with the smaller |excess| (as the reference's bisection
over the bit patterns ends), or a float where the computed excess is 0. It is reached by
safeguarded Newton steps on the bit patterns instead of a fixed 64 halvings: a Newton step
where it lands inside the bracket and shrinks it fast enough, else the bracket's midpoint in
bit-pattern order, and near the root steps of at least 1, 2, 4, ... patterns so that the
bracket closes on the two neighbours. Each step evaluates the excess and its slope over the
row once (the hard-mask entries and the others stored apart, so that no step needs a mask).
The backward is the implicit-function gradient, O(N) per row: with s'_i = soft_i (1 - soft_i),
grad_z = (s' / tau) (g - sum(g s') / sum(s')).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

# float32's smallest normal number: the floor of the uniform draw (the Triton kernel's too).
UNIFORM_FLOOR = 2.0**-126

# Newton iterations before the solver falls back to plain bisection (which then needs at
# most 64 more): a guarantee against slow progress, never reached on ordinary rows.
_NEWTON_ITERATIONS = 48
# The largest minimum step (in bit patterns) near the root; past it the midpoint takes over.
_MAX_STRIDE = 1 << 40


def _negated_noise(batch: int, n: int, seed: int) -> Tensor:
    """(B, N) float32 log(-log(u)) on CPU, u the uniform draws of a CPU ``torch.Generator``
    seeded with ``seed`` in row-major order (floored at UNIFORM_FLOOR)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    u = torch.rand(batch, n, generator=gen, dtype=torch.float32)
    return u.clamp_min_(UNIFORM_FLOOR).log_().neg_().log_()


def noise(batch: int, n: int, seed: int, device: torch.device) -> Tensor:
    """(B, N) float32 Gumbel(0, 1) noise of the CPU kernel: -log(-log(u)) of the uniform
    draws of a CPU ``torch.Generator`` seeded with ``seed`` in row-major order.
    (The CUDA kernel draws its noise differently: a sample depends on seed and device type.)"""
    return _negated_noise(batch, n, seed).neg_().to(device)


def perturbed_scores(logits: Tensor, seed: int) -> Tensor:
    """z = float32(logits) + noise: (B, N) float32, on logits' device, computed as
    float32(logits) - log(-log(u)) (the same bits: a + (-b) is a - b in IEEE arithmetic)."""
    return torch.sub(logits.float(), _negated_noise(logits.shape[0], logits.shape[1], seed).to(logits.device))


def _key_codec(dtype: torch.dtype) -> tuple[Callable[[float], int], Callable[[int], float]]:
    """(key, unkey) for floats of dtype: key maps a float (no NaN) to an int whose order is
    the values' order, neighbouring floats to neighbouring ints; unkey inverts it."""
    fmt, ifmt, flip = ("<d", "<q", (1 << 63) - 1) if dtype == torch.float64 else ("<f", "<i", (1 << 31) - 1)
    pack, unpack = struct.Struct(fmt), struct.Struct(ifmt)

    def key(x: float) -> int:
        bits = unpack.unpack(pack.pack(x + 0.0))[0]  # + 0.0 turns -0.0 into +0.0
        return bits ^ flip if bits < 0 else bits

    def unkey(k: int) -> float:
        return pack.unpack(unpack.pack(k ^ flip if k < 0 else k))[0]

    return key, unkey


class Relaxation(NamedTuple):
    """The relaxation of a row set: x = d - u (B, N), soft_i = sigmoid(x_i); ``top`` (B, N)
    bool, the hard mask; ``degenerate`` (B, 1) bool, the rows without a finite lambda (they
    take the hard mask); ``shift`` (B, 2) in z's dtype, each row's (anchor, u) (what the
    backward needs to rebuild x without a search)."""

    x: Tensor
    top: Tensor
    degenerate: Tensor
    shift: Tensor


def _scaled(z: Tensor, anchor: Tensor, tau: float, finite: bool) -> Tensor:
    """d = (z - anchor) / tau, with the difference clamped to the dtype's range (so that no
    0 * inf appears for huge tau) and the infinities of z kept exactly."""
    big = torch.finfo(z.dtype).max
    d = torch.sub(z, anchor).clamp_(-big, big).div_(tau)
    return d if finite else torch.where(torch.isinf(z), z, d)


def _top_of(z: Tensor, kth: Tensor, k: int) -> Tensor:
    """z: (B, N) without NaN, kth: (B, 1) its k-th largest values -> (B, N) bool mask of the
    k largest, ties to the lower index."""
    top = z >= kth
    if bool((top.sum(-1) == k).all()):  # no tie straddles the k-th place
        return top
    above = z > kth
    tie = z == kth
    need = k - above.sum(-1, keepdim=True)
    return above.logical_or_(tie.logical_and_(tie.cumsum(-1) <= need))


def _kth_largest(z: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """z: (B, N) without NaN -> the k largest values of each row (B, k) in no order, and the
    k-th largest (B, 1)."""
    values = z.topk(k, dim=-1, sorted=False).values
    return values, values.amin(-1, keepdim=True)


def _all_finite(z: Tensor) -> bool:
    """Whether no entry of z is infinite or NaN (a sum, so that no mask is written; an
    overflowing sum of finite entries only sends z down the general path)."""
    return math.isfinite(z.sum(dtype=torch.float64))


def _without_nan(z: Tensor) -> Tensor:
    return torch.where(torch.isnan(z), float("-inf"), z) if bool(torch.isnan(z).any()) else z


def _kth_value(z: Tensor, k: int) -> Tensor:
    """z: (B, N) -> (B, 1), the k-th largest value of each row when it has no NaN (else
    any value): numpy's selection for float32 and float64 (an introselect over the values,
    several times faster than torch.topk, which selects (value, index) pairs), topk otherwise."""
    n = z.shape[-1]
    if z.dtype not in (torch.float32, torch.float64) or z.device.type != "cpu":
        return _kth_largest(z, k)[1]
    picked = np.partition(z.detach().numpy(), n - k, axis=-1)
    return torch.from_numpy(picked[:, n - k : n - k + 1].copy())


def hard_mask_of(z: Tensor, k: int) -> Tensor:
    """(B, N) mask in z's dtype of the k largest z per row (ties to the lower index, NaN as
    -inf), any floating dtype."""
    kth = _kth_value(z, k)
    mask = torch.ge(z, kth, out=torch.empty_like(z))
    # Exactly k entries >= kth > -inf (NaN never is) outrank every other entry, NaN (as -inf)
    # included: they are the k largest, whatever kth's source and whatever z holds.
    exact = z.dtype == torch.float64 or (z.dtype == torch.float32 and z.shape[-1] < 2**24)  # counts of ones
    counts = mask.sum(-1, keepdim=True, dtype=None if exact else torch.float64)
    rows_ok = (counts == k).logical_and_(kth > float("-inf"))
    if bool(rows_ok.all()):
        return mask
    z = _without_nan(z)
    return _top_of(z, _kth_largest(z, k)[1], k).to(z.dtype)


def _excess_and_slope(on: Tensor, off: Tensor, u: Tensor) -> tuple[list[float], list[float]]:
    """on: (R, k) the d of the hard-mask entries, off: (R, N) d with -inf on the mask, u:
    (R, 1) -> the excess sum_i sigmoid(d_i - u) - k, summed as sigmoid(d_i - u) off the mask
    and -sigmoid(u - d_i) on it (small terms: nothing cancels when soft is nearly hard), and
    the slope's magnitude sum_i s'_i (s' = t (1 - t) of those small terms t), R each."""
    t_on = torch.sub(u, on).sigmoid_()
    t_off = torch.sub(off, u).sigmoid_()
    sum_on, sum_off = t_on.sum(-1), t_off.sum(-1)
    squares = t_on.mul_(t_on).sum(-1).add_(t_off.mul_(t_off).sum(-1))
    return (sum_off - sum_on).tolist(), sum_on.add_(sum_off).sub_(squares).tolist()


class _Row:
    """The root search of one row: the bracket lo < hi (keys) with excess(lo) >= 0 >
    excess(hi) (e_lo = +inf, e_hi = -inf while an end is the initial one), the point to
    evaluate next, on which side of the root the last point fell, and the step control (the
    minimum step ``stride`` in keys, whether it decided the last point, the length of the
    last Newton move)."""

    __slots__ = ("bound", "e_hi", "e_lo", "hi", "limit", "lo", "moved", "point", "side", "stride")

    def __init__(self, lo: int, hi: int, point: int, limit: float) -> None:
        self.lo, self.hi, self.e_lo, self.e_hi, self.limit = lo, hi, math.inf, -math.inf, limit
        self.point, self.side, self.stride, self.bound, self.moved = point, False, 1, False, math.inf
        if not lo < point < hi:
            self.point = (lo + hi) // 2

    def update(self, value: float, e: float, slope: float, step: int, key: Callable[[float], int]) -> bool:
        """Record the excess e and slope at the point (of the given value) and choose the next
        point; False when the search is over. The next point: the Newton step value + e /
        slope, at least ``stride`` keys toward the root; the midpoint instead where the slope
        is 0, where the step is not finite or leaves the bracket, where it would not halve the
        last move far from the root (slow progress) and after _NEWTON_ITERATIONS."""
        point, take = self.point, e >= 0
        if take:
            self.lo = lo = point
            self.e_lo = e
            hi = self.hi
        else:
            self.hi = hi = point
            self.e_hi = e
            lo = self.lo
        if e == 0 or hi <= lo + 1:  # a root of the computed excess, or two neighbours
            return False
        # The minimum step doubles while it decides the point and the root is not crossed.
        stride = min(2 * self.stride, _MAX_STRIDE) if (take == self.side and self.bound) else 1
        self.stride, self.side, self.bound = stride, take, False
        self.point = (lo + hi) // 2
        newton = value + e / slope if slope > 0 and step < _NEWTON_ITERATIONS else math.inf
        if not abs(newton) <= self.limit:  # no step, or not finite in the dtype
            self.moved = math.inf
            return True
        target = key(newton)
        least = point + stride if take else point - stride
        if (target <= least) if take else (target >= least):
            target, self.bound = least, True
        distance = abs(newton - value)
        if distance > 0.5 * self.moved and abs(target - point) > 1024:
            self.moved = math.inf
            return True
        self.moved = distance
        if lo < target < hi:
            self.point = target
        return True

    def result(self) -> int:
        return self.lo if self.e_lo <= -self.e_hi else self.hi


def _shift(on: Tensor, off: Tensor, dmin: Tensor, live: Tensor, start: Tensor) -> Tensor:
    """on: (B, k) and off: (B, N) the scaled scores d = (z - anchor) / tau of the hard mask
    and of the rest (-inf on the mask), dmin: (B, 1) the smallest finite d, live: (B, 1)
    bool, the rows with a finite lambda, start: (B, 1) a first guess of u. Returns u (B, 1)
    in d's dtype with sum_i sigmoid(d_i - u) = k: a root of the computed excess, or the end
    with the smaller |excess| of a final bracket of two neighbouring floats (0 in rows not
    live). The search of each row runs in Python (a few scalar operations per step); the
    excess of all the rows still searching is one batch of tensor operations per step."""
    b, n = off.shape
    dtype = off.dtype
    key, unkey = _key_codec(dtype)
    big = torch.finfo(dtype).max
    # Bracket: at min(finite d) - log N the sum exceeds k, at log N it is below k.
    hi_u = torch.full_like(dmin, math.log(n))
    lo_u = torch.minimum((dmin - math.log(n)).clamp(-big, big), hi_u)
    guess = start.clamp(lo_u, hi_u)
    searches = {
        r: _Row(key(low), key(high), key(first), big)
        for r, (alive, low, high, first) in enumerate(
            zip(
                live.view(-1).tolist(),
                lo_u.view(-1).tolist(),
                hi_u.view(-1).tolist(),
                guess.view(-1).tolist(),
                strict=True,
            )
        )
        if alive and key(high) > key(low) + 1
    }
    rows, step = list(searches), 0
    while rows:
        values = [unkey(searches[r].point) for r in rows]
        u = torch.tensor(values, dtype=dtype).view(-1, 1)
        if len(rows) == b:
            excess, slope = _excess_and_slope(on, off, u)
        else:
            index = torch.tensor(rows)
            excess, slope = _excess_and_slope(on.index_select(0, index), off.index_select(0, index), u)
        rows = [
            r for r, v, e, s in zip(rows, values, excess, slope, strict=True) if searches[r].update(v, e, s, step, key)
        ]
        step += 1
    found = [0.0] * b
    for r, search in searches.items():
        found[r] = unkey(search.result())
    return torch.tensor(found, dtype=dtype).view(b, 1)


def _degenerate(z: Tensor, k: int, finite: bool) -> Tensor:
    """z: (B, N) without NaN -> (B, 1) bool, the rows without a finite lambda (at least k
    entries +inf, or at most k above -inf)."""
    if finite:
        return torch.full((z.shape[0], 1), k >= z.shape[1])
    pinf = (z == float("inf")).sum(-1, keepdim=True)
    alive = (z > float("-inf")).sum(-1, keepdim=True)
    return (pinf >= k) | (alive <= k)


def relax(z: Tensor, k: int, tau: float) -> Relaxation:
    """z: (B, N) float32 or float64 (NaN as -inf) -> the relaxation, in z's dtype."""
    finite = _all_finite(z)
    if not finite:
        z = _without_nan(z)
    degenerate = _degenerate(z, k, finite)
    values, kth = _kth_largest(z, k)
    top = _top_of(z, kth, k)
    anchor = torch.where(degenerate, 0.0, kth)
    d = _scaled(z, anchor, tau, finite)
    # The mask's entries hold the k largest values (as a multiset, whichever of tied ones).
    on = _scaled(values, anchor, tau, finite)
    off = d.masked_fill(top, float("-inf"))
    dmin = (d if finite else torch.where(torch.isfinite(d), d, float("inf"))).amin(-1, keepdim=True)
    # First guess: halfway to the (k+1)-th largest (the root of a nearly hard relaxation).
    start = off.amax(-1, keepdim=True).mul_(0.5)
    u = _shift(on, off, dmin, ~degenerate, start)
    return Relaxation(d.sub_(u), top, degenerate, torch.cat([anchor, u], dim=1))


def relax_from_shift(z: Tensor, k: int, tau: float, shift: Tensor) -> tuple[Tensor, Tensor]:
    """z: (B, N) float32 or float64 (NaN as -inf), shift: (B, 2) (anchor, u) of ``relax``
    on the same z -> (x (B, N), degenerate (B, 1)) of ``relax``, bit for bit, without the
    selection and the search."""
    finite = _all_finite(z)
    if not finite:
        z = _without_nan(z)
    shift = shift.to(z.dtype)
    d = _scaled(z, shift[:, :1], tau, finite)
    return d.sub_(shift[:, 1:]), _degenerate(z, k, finite)


def _soft(r: Relaxation, dtype: torch.dtype) -> Tensor:
    soft = r.x.sigmoid_()
    if bool(r.degenerate.any()):
        soft = torch.where(r.degenerate, r.top.to(dtype), soft)
    return soft


def relaxed_topk(z: Tensor, k: int, tau: float) -> Tensor:
    """soft (B, N) in z's dtype (float32 or float64); NaN counts as -inf."""
    return _soft(relax(z, k, tau), z.dtype)


def relaxed_topk_with_shift(z: Tensor, k: int, tau: float) -> tuple[Tensor, Tensor]:
    """(soft (B, N), shift (B, 2)) in z's dtype: ``relaxed_topk`` and each row's (anchor, u)."""
    r = relax(z, k, tau)
    return _soft(r, z.dtype), r.shift


def _vjp(x: Tensor, degenerate: Tensor, tau: float, grad: Tensor) -> Tensor:
    """The implicit-function gradient at x = d - u (B, N); x is overwritten."""
    sp = torch.sigmoid(x)
    sp.mul_(x.neg_().sigmoid_())  # s (1 - s) without cancelling near s = 1
    total = sp.sum(-1, keepdim=True)
    c = (grad * sp).sum(-1, keepdim=True) / torch.where(total > 0, total, 1.0)
    gz = torch.sub(grad, c).mul_(sp).div_(tau)
    return gz.masked_fill_(degenerate | (total == 0), 0.0)


def relaxed_topk_backward(z: Tensor, k: int, tau: float, grad: Tensor, shift: Tensor | None = None) -> Tensor:
    """d(sum grad * relaxed_topk(z, k, tau)) / dz, in z's dtype (0 where z is not finite and
    in rows without a finite lambda). shift: (B, 2), the (anchor, u) of the forward on the
    same z (``relaxed_topk_with_shift``), skips the search; None runs it again."""
    if shift is None:
        r = relax(z, k, tau)
        x, degenerate = r.x, r.degenerate
    else:
        x, degenerate = relax_from_shift(z, k, tau, shift)
    return _vjp(x, degenerate, tau, grad.to(z.dtype))


def hard_mask(z: Tensor, k: int) -> Tensor:
    """(B, N) float32 mask of the k largest scores per row (the topk_gather rule: ties to the
    lower index, NaN as -inf)."""
    return hard_mask_of(z, k).float()


def gumbel_topk(logits: Tensor, k: int, tau: float, seed: int, hard: bool) -> Tensor:
    z = perturbed_scores(logits, seed)
    return hard_mask(z, k) if hard else relaxed_topk(z.double(), k, tau).float()


def gumbel_topk_soft(logits: Tensor, k: int, tau: float, seed: int) -> tuple[Tensor, Tensor]:
    """(soft (B, N) float32, shift (B, 2) float64): the soft forward and each row's (anchor,
    u), for ``gumbel_topk_backward``."""
    soft, shift = relaxed_topk_with_shift(perturbed_scores(logits, seed).double(), k, tau)
    return soft.float(), shift


def gumbel_topk_backward(
    grad: Tensor, logits: Tensor, z: Tensor, k: int, tau: float, shift: Tensor | None = None
) -> Tensor:
    """Gradient w.r.t. logits in logits' dtype, from the perturbed scores z (float32),
    computed in float64; shift: (B, 2) from ``gumbel_topk_soft`` or None."""
    return relaxed_topk_backward(z.double(), k, tau, grad.double(), shift).to(logits.dtype)
