"""merge_tokens and bipartite_merge: merge the tokens a selection drops into the ones it keeps
(the general rule) and ToMe's bipartite soft matching.

Faces: the public functions, the ``torch.library.custom_op`` schemas of
``tokenkern::merge_tokens`` and ``tokenkern::bipartite_merge``, their fake kernels, their CPU
and CUDA kernels and their autograd. The CPU and CUDA kernels call the private C++ ops
``tokenkern::_merge_tokens_kernel`` and ``tokenkern::_bipartite_merge_kernel`` (schemas in
csrc/tokenkern.cpp, kernels in csrc/cpu/merge_cpu.cpp and csrc/cuda/merge_cuda.cu).

One source for each validation rule: the checks of this module. Every face of a public op
runs the argument checks (``check_merge_tokens`` / ``check_bipartite_merge``: shapes, dtypes,
devices, scalar arguments) with the messages ``tokenkern.<op>: <argument> must ...``; the
private C++ ops restate none of them and only assert the invariants their memory safety
needs (csrc/merge_args.h). The value checks read the tensors (``merge_values``: keep_idx
strictly ascending in [0, N), weight / size finite and non-negative; ``merge_mass``: every
output mass within float32): the CPU kernels always make them; on CUDA they are host syncs,
so only the public functions make them there, when ``validate=True``. The CUDA op itself never
syncs: it writes NaN for a sample whose keep_idx or weights are invalid, and an overflowing
mass comes back inf.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import custom_op, register_fake

from .. import _C
from . import _args as checks
from ._grad import _const, _linear_vjp

MERGE_DTYPES = checks.FLOAT_DTYPES
# The CUDA merge kernels span one sample's similarity tiles (64 rows each) on grid axis y
# (<= 65535 blocks): N <= 65535 * 64 (csrc/cuda/merge_kernels.cuh, kMaxTokens).
MERGE_CUDA_MAX_TOKENS = 65535 * 64
COMBINES = ("mean", "sum", "add_mean")
ASSIGNS = ("dropped", "kept")

# ------------------------------------------------------------------------ argument checks


def merge_cuda_tokens(op: str, x: Tensor) -> None:
    if x.device.type == "cuda" and x.shape[1] > MERGE_CUDA_MAX_TOKENS:
        limit = f"x must have N <= {MERGE_CUDA_MAX_TOKENS} tokens on CUDA (the kernels' grid limit)"
        checks.fail(op, f"{limit}, got N={x.shape[1]}")


def _same_bn(op: str, name: str, t: object, b: int, n: int, layout: str) -> Tensor:
    t = checks.tensor(op, name, t)
    dims = len(layout.split(","))
    if t.dim() != dims or tuple(t.shape[:2]) != (b, n):
        expected = f"({b}, {n}, C)" if dims == 3 else f"({b}, {n})"
        checks.fail(op, f"{name} must be {layout} with x's B and N = {expected}, got shape {tuple(t.shape)}")
    checks.dtype(op, name, t, MERGE_DTYPES)
    if dims == 3 and t.shape[2] < 1:
        checks.fail(op, f"{name} must have C >= 1 features, got shape {tuple(t.shape)}")
    return t


def _tokens(op: str, x: object) -> Tensor:
    x = checks.tensor(op, "x", x)
    checks.ndim(op, "x", x, 3, "(B, N, D)")
    checks.dtype(op, "x", x, MERGE_DTYPES)
    merge_cuda_tokens(op, x)
    return x


def check_merge_tokens(
    x, keep_idx, metric, weight, topm, temperature, combine, query_metric, assign
) -> tuple[int, int]:
    """The argument checks of merge_tokens (every face; no value is read); returns (K, D)."""
    op = "merge_tokens"
    x = _tokens(op, x)
    b, n, d = x.shape
    keep_idx = checks.tensor(op, "keep_idx", keep_idx)
    checks.ndim(op, "keep_idx", keep_idx, 2, "(B, K)")
    checks.dtype(op, "keep_idx", keep_idx, (torch.int64,))
    if keep_idx.shape[0] != b:
        checks.fail(op, f"keep_idx has batch size {keep_idx.shape[0]} but x has {b}")
    k = keep_idx.shape[1]
    if not 1 <= k <= n:
        checks.fail(op, f"keep_idx must keep K in [1, N={n}] tokens, got K={k}")
    m = x if metric is None else _same_bn(op, "metric", metric, b, n, "(B, N, C)")
    c = m.shape[2]
    if query_metric is not None:
        q = checks.tensor(op, "query_metric", query_metric)
        if tuple(q.shape) != (b, n, c):
            checks.fail(op, f"query_metric must be (B, N, C) = ({b}, {n}, {c}), got shape {tuple(q.shape)}")
        if q.dtype != m.dtype:
            got = checks.dtype_name(q.dtype)
            checks.fail(op, f"query_metric must have metric's dtype {checks.dtype_name(m.dtype)}, got {got}")
    if weight is not None:
        _same_bn(op, "weight", weight, b, n, "(B, N)")
    checks.same_device(op, [("x", x), ("keep_idx", keep_idx), ("metric", metric), ("weight", weight),
                            ("query_metric", query_metric)])  # fmt: skip
    if combine not in COMBINES:
        checks.fail(op, f"combine must be one of {COMBINES}, got {combine!r}")
    if assign not in ASSIGNS:
        checks.fail(op, f"assign must be one of {ASSIGNS}, got {assign!r}")
    candidates = n - 1 if assign == "kept" else k
    rule = "1 <= topm <= N - 1 with assign='kept'" if assign == "kept" else "1 <= topm <= K"
    checks.int_range(op, "topm", topm, 1, candidates, f" ({rule})")
    temperature_arg(op, temperature)
    return k, d


def temperature_arg(op: str, temperature: object) -> None:
    """0 (uniform weights) or a positive float32 normal number: in [2^-126, 3.4028235e38], so
    that the kernels' float32 temperature is never a silent 0 or inf."""
    t = checks.number(op, "temperature", temperature)
    if isinstance(t, float) and t != 0.0 and not checks.FLOAT32_TINY <= t <= checks.FLOAT32_MAX:
        checks.fail(
            op,
            f"temperature must be finite and >= 0: 0 or in [{checks.FLOAT32_TINY:.8g}, {checks.FLOAT32_MAX:.8g}] "
            f"(float32), got {temperature!r}",
        )


def check_bipartite_merge(x, metric, r, size, protect_first) -> int:
    """The argument checks of bipartite_merge (every face; no value is read); returns N."""
    op = "bipartite_merge"
    x = _tokens(op, x)
    b, n, _ = x.shape
    _same_bn(op, "metric", metric, b, n, "(B, N, C)")
    if size is not None:
        _same_bn(op, "size", size, b, n, "(B, N)")
    checks.same_device(op, [("x", x), ("metric", metric), ("size", size)])
    checks.flag(op, "protect_first", protect_first)
    n_a, n_b = (n + 1) // 2, n // 2
    mergeable = 0 if n_b == 0 else n_a - (1 if protect_first else 0)
    protected = ", token 0 protected" if protect_first else ""
    checks.int_range(op, "r", r, 0, mergeable, f" (the number of set-A tokens that can merge{protected})")
    return n


# --------------------------------------------------------------------------- value checks


def _first(mask: Tensor) -> list[int]:
    """The index of the first True of mask in row-major order."""
    return [int(i) for i in mask.nonzero()[0]]


def _keep_values(op: str, keep_idx: Tensor, n: int) -> None:
    """keep_idx (B, K): every value in [0, N) and every row strictly ascending; the message
    names the first offending position in row-major order."""
    outside = (keep_idx < 0) | (keep_idx >= n)
    unsorted = torch.zeros_like(outside)
    unsorted[:, 1:] = keep_idx[:, 1:] <= keep_idx[:, :-1]
    if not bool((outside | unsorted).any()):
        return
    b, t = _first(outside | unsorted)
    v = int(keep_idx[b, t])
    if bool(outside[b, t]):
        checks.fail(op, f"keep_idx values must be in [0, N={n}), got {v} at [{b}, {t}]")
    prev = int(keep_idx[b, t - 1])
    checks.fail(
        op, f"keep_idx rows must be strictly ascending (sorted, no duplicates), got {prev} then {v} at [{b}, {t}]"
    )


def merge_values(op: str, keep_idx: Tensor | None, n: int, nonneg: dict[str, Tensor | None]) -> None:
    """The value checks before a merge (they read the tensors: always on CPU, a host sync on
    CUDA where only validate=True makes them): keep_idx strictly ascending in [0, N); the named
    weight tensors finite and non-negative."""
    if keep_idx is not None and keep_idx.numel():
        _keep_values(op, keep_idx, n)
    for name, t in nonneg.items():
        if t is None or not isinstance(t, Tensor) or not t.numel():
            continue
        bad = ~(torch.isfinite(t) & (t >= 0))
        if bool(bad.any()):
            where = _first(bad)
            checks.fail(op, f"{name} must be non-negative and finite, got {float(t[tuple(where)])} at {where}")


def merge_mass(op: str, name: str, mass: Tensor) -> None:
    """The value check after a merge (always on CPU, with validate=True on CUDA): every mass
    finite. With finite, non-negative weights a mass is infinite only when the weights merged
    into one token sum past float32's range."""
    over = torch.isinf(mass)
    if bool(over.any()):
        checks.fail(
            op,
            f"{name} must keep every output mass (the sum of the weights merged into a token) within float32 "
            f"(<= {checks.FLOAT32_MAX:.8g}), got an overflowing mass at {_first(over)}; rescale {name}",
        )


def _cuda_kernels(op: str) -> None:
    if not _C.WITH_CUDA:
        raise RuntimeError(
            f"tokenkern.{op}: this tokenkern was built without its CUDA kernels (no CUDA torch or nvcc at "
            "install time); reinstall it where both are present, or pass CPU tensors"
        )


# ------------------------------------------------------------------------- merge_tokens

_MERGE_TOKENS_SCHEMA = (
    "(Tensor x, Tensor keep_idx, Tensor? metric=None, Tensor? weight=None, int topm=1, float temperature=0.0, "
    'str combine="mean", Tensor? query_metric=None, str assign="dropped") -> (Tensor merged, Tensor mass)'
)


@custom_op("tokenkern::merge_tokens", mutates_args=(), device_types="cpu", schema=_MERGE_TOKENS_SCHEMA)
def _merge_tokens_op(
    x: Tensor,
    keep_idx: Tensor,
    metric: Tensor | None = None,
    weight: Tensor | None = None,
    topm: int = 1,
    temperature: float = 0.0,
    combine: str = "mean",
    query_metric: Tensor | None = None,
    assign: str = "dropped",
) -> tuple[Tensor, Tensor]:
    check_merge_tokens(x, keep_idx, metric, weight, topm, temperature, combine, query_metric, assign)
    merge_values("merge_tokens", keep_idx, x.shape[1], {"weight": weight})
    merged, mass = torch.ops.tokenkern._merge_tokens_kernel(
        x, keep_idx, metric, weight, topm, float(temperature), combine, query_metric, assign
    )
    merge_mass("merge_tokens", "weight", mass)
    return merged, mass


@_merge_tokens_op.register_fake
def _merge_tokens_fake(x, keep_idx, metric=None, weight=None, topm=1, temperature=0.0, combine="mean",
                       query_metric=None, assign="dropped"):  # fmt: skip
    k, d = check_merge_tokens(x, keep_idx, metric, weight, topm, temperature, combine, query_metric, assign)
    return x.new_empty(x.shape[0], k, d), x.new_empty(x.shape[0], k, dtype=torch.float32)


@_merge_tokens_op.register_kernel("cuda")
def _merge_tokens_cuda(x, keep_idx, metric=None, weight=None, topm=1, temperature=0.0, combine="mean",
                       query_metric=None, assign="dropped"):  # fmt: skip
    check_merge_tokens(x, keep_idx, metric, weight, topm, temperature, combine, query_metric, assign)
    _cuda_kernels("merge_tokens")
    return torch.ops.tokenkern._merge_tokens_kernel(
        x, keep_idx, metric, weight, topm, float(temperature), combine, query_metric, assign
    )


@register_fake("tokenkern::_merge_tokens_kernel")
def _merge_tokens_kernel_fake(x, keep_idx, metric, weight, topm, temperature, combine, query_metric, assign):
    b, k = keep_idx.shape
    return x.new_empty(b, k, x.shape[2]), x.new_empty(b, k, dtype=torch.float32)


def _merge_tokens_setup_context(ctx, inputs, output) -> None:
    x, keep_idx, metric, weight, topm, temperature, combine, query_metric, assign = inputs
    ctx.mark_non_differentiable(output[1])
    # metric=None means "x is the metric": pass it explicitly so that the one-hot replay
    # keeps x's assignment.
    ctx.save_for_backward(keep_idx, x if metric is None else metric, weight, query_metric)
    ctx.n = x.shape[1]
    ctx.options = (topm, temperature, combine, assign)


def _merge_tokens_backward(ctx, grad_merged, _grad_mass):
    if not ctx.needs_input_grad[0]:
        return (None,) * 9
    keep_idx, metric, weight, query_metric = ctx.saved_tensors
    topm, temperature, combine, assign = ctx.options

    def apply(x1: Tensor) -> Tensor:
        return torch.ops.tokenkern.merge_tokens(x1, keep_idx, metric.detach(), _const(weight), topm, temperature,
                                                combine, _const(query_metric), assign)[0]  # fmt: skip

    return (_linear_vjp(apply, grad_merged, ctx.n),) + (None,) * 8


_merge_tokens_op.register_autograd(_merge_tokens_backward, setup_context=_merge_tokens_setup_context)


def merge_tokens(
    x: Tensor,
    keep_idx: Tensor,
    metric: Tensor | None = None,
    weight: Tensor | None = None,
    topm: int = 1,
    temperature: float = 0.0,
    combine: str = "mean",
    query_metric: Tensor | None = None,
    assign: str = "dropped",
    validate: bool = True,
) -> tuple[Tensor, Tensor]:
    """Merge the tokens that keep_idx drops into the ones it keeps.

    x: (B, N, D) float32/float16/bfloat16; keep_idx: (B, K) int64, ascending, unique, in
    [0, N) (1 <= K <= N). metric: (B, N, C), default x; weight: (B, N) non-negative, default 1
    (ToMe sizes, [CLS] attention, ...). Returns merged (B, K, D) in x's dtype and mass (B, K)
    float32; accumulation is float32 and bit-for-bit deterministic.

    Each dropped token i picks its ``topm`` most similar kept tokens (cosine of metric rows;
    ties to the lower index) with weights a: 1 when topm=1, else softmax(sim / temperature)
    over them (uniform 1/topm when temperature=0). With c = a * weight[i] summed per kept
    token j (csum_j): ``combine="mean"`` gives ``(w_j x_j + sum c x_i) / (w_j + csum_j)``,
    ``"sum"`` gives ``x_j + sum c x_i``, and ``mass_j = w_j + csum_j``.

    Extensions (defaults leave the rule above unchanged):
      combine="add_mean": ``x_j + sum c x_i / csum_j`` (VisionZip's contextual tokens);
      query_metric (B, N, C): similarity ``query_metric[i] . metric[j]`` instead of the
        cosine (attention logits: FiCoCo's correlate step);
      assign="kept": each kept token j pulls its topm most similar other tokens (kept or
        dropped) instead (PruMerge's k-nearest-neighbour merge).

    Gradients: merged back-propagates to x exactly, with the assignment and its weights held
    constant (a stop-gradient: metric, query_metric and weight, or x itself when metric is
    None, carry no gradient through them); mass is not differentiable.

    weight must be finite, and every mass must fit float32 (<= 3.4e38): a larger total is
    refused (rescale weight). The kernels scale each contribution by 1 / mass (1 / csum for
    add_mean) before the sum, so no intermediate overflows where the result fits.

    validate: on CUDA, check keep_idx and weight values first and the masses after (host
    syncs). Without it the op itself never syncs and writes NaN for a sample whose keep_idx
    or weight is invalid (an overflowing mass comes back inf); the CPU op always raises.
    Empty dims: B = 0 gives empty outputs; D = 0 (with a metric) gives (B, K, 0) and the masses.
    """
    check_merge_tokens(x, keep_idx, metric, weight, topm, temperature, combine, query_metric, assign)
    checks.flag("merge_tokens", "validate", validate)
    check_values = validate and x.is_cuda
    if check_values:
        merge_values("merge_tokens", keep_idx, x.shape[1], {"weight": weight})
    merged, mass = torch.ops.tokenkern.merge_tokens(
        x, keep_idx, metric, weight, topm, temperature, combine, query_metric, assign
    )
    if check_values:
        merge_mass("merge_tokens", "weight", mass)
    return merged, mass


# ---------------------------------------------------------------------- bipartite_merge

_BIPARTITE_SCHEMA = (
    "(Tensor x, Tensor metric, int r, Tensor? size=None, bool protect_first=False) -> (Tensor merged, Tensor size)"
)


@custom_op("tokenkern::bipartite_merge", mutates_args=(), device_types="cpu", schema=_BIPARTITE_SCHEMA)
def _bipartite_merge_op(
    x: Tensor, metric: Tensor, r: int, size: Tensor | None = None, protect_first: bool = False
) -> tuple[Tensor, Tensor]:
    check_bipartite_merge(x, metric, r, size, protect_first)
    merge_values("bipartite_merge", None, 0, {"size": size})
    merged, out_size = torch.ops.tokenkern._bipartite_merge_kernel(x, metric, r, size, protect_first)
    merge_mass("bipartite_merge", "size", out_size)
    return merged, out_size


@_bipartite_merge_op.register_fake
def _bipartite_merge_fake(x, metric, r, size=None, protect_first=False):
    n = check_bipartite_merge(x, metric, r, size, protect_first)
    return x.new_empty(x.shape[0], n - r, x.shape[2]), x.new_empty(x.shape[0], n - r, dtype=torch.float32)


@_bipartite_merge_op.register_kernel("cuda")
def _bipartite_merge_cuda(x, metric, r, size=None, protect_first=False):
    check_bipartite_merge(x, metric, r, size, protect_first)
    _cuda_kernels("bipartite_merge")
    return torch.ops.tokenkern._bipartite_merge_kernel(x, metric, r, size, protect_first)


@register_fake("tokenkern::_bipartite_merge_kernel")
def _bipartite_merge_kernel_fake(x, metric, r, size, protect_first):
    b, n, d = x.shape
    return x.new_empty(b, n - r, d), x.new_empty(b, n - r, dtype=torch.float32)


# The launch plans of the CUDA merge launchers (csrc/common/merge_plan.h), read by the static
# kernel report: (kMaxMergeLaunches, 7) int64 CPU tensors.
LAUNCH_PLAN_SHAPE = (4, 7)


@register_fake("tokenkern::_merge_tokens_launch_plan")
def _merge_tokens_launch_plan_fake(batch, n, d, k, c, topm, kept_mode, cosine):
    return torch.empty(LAUNCH_PLAN_SHAPE, dtype=torch.int64)


@register_fake("tokenkern::_bipartite_merge_launch_plan")
def _bipartite_merge_launch_plan_fake(batch, n, d, c, r):
    return torch.empty(LAUNCH_PLAN_SHAPE, dtype=torch.int64)


def _bipartite_merge_setup_context(ctx, inputs, output) -> None:
    x, metric, r, size, protect_first = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(metric, size)
    ctx.n = x.shape[1]
    ctx.options = (r, protect_first)


def _bipartite_merge_backward(ctx, grad_merged, _grad_size):
    if not ctx.needs_input_grad[0]:
        return (None,) * 5
    metric, size = ctx.saved_tensors
    r, protect_first = ctx.options

    def apply(x1: Tensor) -> Tensor:
        return torch.ops.tokenkern.bipartite_merge(x1, metric.detach(), r, _const(size), protect_first)[0]

    return (_linear_vjp(apply, grad_merged, ctx.n),) + (None,) * 4


_bipartite_merge_op.register_autograd(_bipartite_merge_backward, setup_context=_bipartite_merge_setup_context)


def bipartite_merge(
    x: Tensor,
    metric: Tensor,
    r: int,
    size: Tensor | None = None,
    protect_first: bool = False,
    validate: bool = True,
) -> tuple[Tensor, Tensor]:
    """ToMe's bipartite soft matching: merge r tokens away.

    x: (B, N, D), metric: (B, N, C) (ToMe: the layer's keys averaged over heads), size:
    (B, N) token sizes (default 1). Tokens alternate into set A (even positions) and B (odd);
    each A token's match is its most cosine-similar B token; the r A tokens with the best
    matches merge into them by size-weighted average and the sizes add. protect_first keeps
    token 0 ([CLS]) unmerged. Ties go to the lower index. Gradients: merged back-propagates to
    x with the matching and the sizes held constant (metric and size get no gradient); the
    size output is not differentiable.

    Returns merged (B, N - r, D) in x's dtype and size (B, N - r) float32, in this order:
    the N_A - r unmerged A tokens by ascending position, then all B tokens by position (ToMe's
    ``[unmerged A, B]`` order; ToMe itself sorts the unmerged A tokens only when it protects
    the class token). size must be finite and non-negative, and the merged sizes must fit
    float32 (<= 3.4e38; a larger total is refused). B = 0 or N = 0 (r = 0) give empty outputs.

    validate: on CUDA, check that size is finite and non-negative first, and the merged sizes
    after (host syncs); without it a sample with an invalid size comes back NaN.
    """
    check_bipartite_merge(x, metric, r, size, protect_first)
    checks.flag("bipartite_merge", "validate", validate)
    check_values = validate and x.is_cuda
    if check_values:
        merge_values("bipartite_merge", None, 0, {"size": size})
    merged, out_size = torch.ops.tokenkern.bipartite_merge(x, metric, r, size, protect_first)
    if check_values:
        merge_mass("bipartite_merge", "size", out_size)
    return merged, out_size
