"""gumbel_topk: the CPU kernel (torch) and the CUDA kernel (Triton; on CPU via the interpreter)
against reference.gumbel_topk in float64 given the same noise, its gradients, its noise."""

import itertools
import math
import re

import pytest
import testing
import torch
from testing import BACKENDS, FLOAT_DTYPES, HAS_CUDA, TRITON_DEVICE, assert_rel_close

import tokenkern
from tokenkern import reference
from tokenkern._cpu import gumbel as cpu_gumbel
from tokenkern.ops.gumbel import gumbel_topk_backward_cuda, gumbel_topk_triton, gumbel_topk_triton_with_noise

EPS32 = 2.0**-24
TINY32 = 2.0**-126  # float32's smallest normal number


def relaxation_parts(z: torch.Tensor, k: int, tau: float) -> dict[str, torch.Tensor]:
    """The reference relaxation of z (B, N) (float32 values, NaN as -inf) in float64, split
    into the quantities the error bounds need: d = (z - a) / tau, u, x = d - u, soft,
    s' = soft (1 - soft) and the rows without a finite lambda."""
    z = z.double()
    z = torch.where(torch.isnan(z), float("-inf"), z)
    degenerate = reference.relaxed_topk_degenerate(z, k)
    top = reference.hard_topk_mask(z, k) > 0
    anchor = torch.where(degenerate, 0.0, z.topk(k, dim=-1).values[:, k - 1 :])
    d = (z - anchor) / tau
    u = reference.relaxed_topk_shift(d, top)
    x = d - u
    soft = torch.sigmoid(x)
    sp = torch.sigmoid(x) * torch.sigmoid(-x)
    return {"d": d, "u": u, "x": x, "soft": soft, "sp": sp, "degenerate": degenerate}


def _x_error(p: dict[str, torch.Tensor], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bound on the float32 kernels' error in x_i = d_i - u, and the summation depth L.

    d_i = fl(fl(z_i - a) * fl(1 / tau)): three roundings, 3 eps |d_i|. u solves the kernel's
    excess equation, so it moves by the s'-weighted mean of the d errors plus the excess's own
    error over sum s': each term sigmoid(-|x_j|) (1 at the anchor's ties) carries exp's error
    (4 + |x_j|) eps (the argument's rounding scaled by |x|) and the fp32 sum L eps (a tree of
    log2 N levels within a chunk, chunks added in turn); u is then one of two neighbouring
    floats, 2 eps |u|."""
    chunks = -(-n // 4096)
    depth = math.ceil(math.log2(max(n, 2))) + chunks + 1
    finite = torch.isfinite(p["d"])
    dd = torch.where(finite, 3 * EPS32 * p["d"].abs(), 0.0)
    ax = torch.where(finite, p["x"].abs(), 0.0)
    terms = torch.where(p["d"] == 0, 1.0, torch.sigmoid(-p["x"].abs()))
    d_excess = EPS32 * (terms * (4 + ax + depth)).sum(-1, keepdim=True)
    total = p["sp"].sum(-1, keepdim=True)
    du = ((p["sp"] * dd).sum(-1, keepdim=True) + d_excess) / torch.where(total > 0, total, 1.0)
    du = torch.where(total > 0, du, 0.0) + 2 * EPS32 * p["u"].abs()
    return dd + du + EPS32 * (2 + ax), torch.tensor(float(depth), dtype=torch.float64)


def soft_error_bound(z: torch.Tensor, k: int, tau: float) -> torch.Tensor:
    """(B, N) bound on |soft_kernel - soft_reference| for the float32 kernels: s'_i times
    the error in x_i (``_x_error``), plus 2 eps for sigmoid's rounding (1 / (1 + e) and the
    float32 output), times 2 for second-order terms. 0 in rows without a finite lambda (the
    hard mask there is exact)."""
    p = relaxation_parts(z, k, tau)
    dx, _ = _x_error(p, z.shape[-1])
    bound = 2 * (p["sp"] * dx + 2 * EPS32)
    return torch.where(p["degenerate"], 0.0, bound)


def grad_error_bound(z: torch.Tensor, k: int, tau: float, w: torch.Tensor) -> torch.Tensor:
    """(B, N) bound on the float32 kernels' gradient error for the incoming gradient w:
    grad_i = (s'_i / tau) (w_i - c), c = sum(w s') / sum(s'). s'_i is off by
    (|x error| + 4 eps) relatively (d log s' / dx = 1 - 2 soft, exp's and the products'
    roundings); c by the s'-weighted relative errors plus the fp32 sums (L eps) and w's
    rounding to float32; the final products round by 3 eps; below 2^-126 float32 underflows.
    Times 2 for second-order terms."""
    p = relaxation_parts(z, k, tau)
    dx, depth = _x_error(p, z.shape[-1])
    w = w.double()
    sp, total = p["sp"], p["sp"].sum(-1, keepdim=True)
    safe = torch.where(total > 0, total, 1.0)
    c = (w * sp).sum(-1, keepdim=True) / safe
    rel = dx + 4 * EPS32
    dc = ((w.abs() + c.abs()) * sp * (rel + depth * EPS32)).sum(-1, keepdim=True) / safe
    dc = dc + EPS32 * w.abs().amax(-1, keepdim=True)
    g = sp / tau * (w - c)
    bound = sp / tau * ((w - c).abs() * rel + dc + EPS32 * w.abs()) + 3 * EPS32 * g.abs()
    # float32 underflow (flushed to 0 on GPUs) of s' and of the result.
    bound = bound + TINY32 * ((w.abs() + w.abs().amax(-1, keepdim=True)) / tau + 1)
    return torch.where(p["degenerate"] | (total == 0), 0.0, 2 * bound)


def assert_within(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    """|out - ref| <= bound elementwise; NaN never passes."""
    out, ref = out.double().cpu(), ref.double().cpu()
    err = (out - ref).abs()
    ok = (err <= bound) | (out == ref)
    assert bool(ok.all()), f"{what}: error {err[~ok].max().item():.3e} over its bound (seed {testing.test_seed()})"


def soft_bound(backend: str, z: torch.Tensor, k: int, tau: float, ref: torch.Tensor) -> torch.Tensor:
    """The CPU kernel computes in float64 and rounds once to float32; the CUDA kernel runs in
    float32 (``soft_error_bound``)."""
    if backend == "cpu":
        return EPS32 * ref.abs() + 1e-14
    return soft_error_bound(z, k, tau)


def grad_bound(backend: str, z: torch.Tensor, k: int, tau: float, w: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    if backend == "cpu":  # float64, rounded once to float32 (subnormals included)
        return EPS32 * want.abs() + 1e-12 * want.abs().amax(-1, keepdim=True) + TINY32
    return grad_error_bound(z, k, tau, w)


def noise_of(backend: str, batch: int, n: int, seed: int) -> torch.Tensor:
    """The noise the backend's kernel draws for (seed, B, N), on CPU."""
    if backend == "cpu":
        return cpu_gumbel.noise(batch, n, seed, torch.device("cpu"))
    from tokenkern._triton import gumbel

    return gumbel.noise(batch, n, seed, torch.device(TRITON_DEVICE)).cpu()


def run(backend: str, logits, k, tau, seed, hard=True):
    """-> (output, noise the kernel drew), both on CPU."""
    if backend == "cpu":
        out = torch.ops.tokenkern.gumbel_topk(logits, k, tau, seed, hard)
        return out, noise_of("cpu", *logits.shape, seed)
    out, noise = gumbel_topk_triton_with_noise(logits.to(TRITON_DEVICE), k, tau, seed, hard)
    if HAS_CUDA:  # the registered CUDA kernel is the same launch
        assert torch.equal(torch.ops.tokenkern.gumbel_topk(logits.cuda(), k, tau, seed, hard), out)
    return out.cpu(), noise.cpu()


def check_forward(backend, logits, k, tau, seed):
    hard, noise = run(backend, logits, k, tau, seed, hard=True)
    soft, noise2 = run(backend, logits, k, tau, seed, hard=False)
    assert torch.equal(noise, noise2), "the noise depends on hard"
    assert torch.isfinite(noise).all()
    assert hard.dtype == torch.float32 and soft.dtype == torch.float32
    assert hard.shape == soft.shape == logits.shape
    ref_hard = reference.gumbel_topk(logits, k, tau, noise, hard=True)
    ref_soft = reference.gumbel_topk(logits, k, tau, noise, hard=False)
    assert torch.equal(hard.double(), ref_hard), "hard mask differs from the reference"
    assert bool(((hard == 0) | (hard == 1)).all()) and bool((hard.sum(-1) == k).all())
    z = reference.perturbed_scores(logits, noise)
    bound = soft_bound(backend, z, k, tau, ref_soft)
    assert_within(soft, ref_soft, bound, "soft")
    assert bool(((soft >= 0) & (soft <= 1)).all()), "soft outside [0, 1]"
    if logits.shape[0]:
        sums = soft.double().sum(-1)
        assert bool(((sums - k).abs() <= bound.sum(-1) + 1e-12).all()), (sums - k).abs().max()
    return hard, soft, noise


SHAPES = [(1, 1, 1), (2, 7, 3), (3, 577, 144), (1, 576, 576), (2, 300, 1), (1, 4100, 37)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("b", "n", "k"), SHAPES)
def test_matches_reference_given_noise(backend, b, n, k, gen):
    tau = [0.3, 1.0, 2.5][int(torch.randint(0, 3, (1,), generator=gen))]
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    logits = torch.randn(b, n, generator=gen) * 2
    check_forward(backend, logits, k, tau, seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [*FLOAT_DTYPES, torch.float64])
def test_dtypes(backend, dtype, gen):
    logits = torch.randn(2, 200, generator=gen).to(dtype)
    check_forward(backend, logits, 50, 0.5, 7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_logits(backend, gen):
    logits = torch.randn(150, 3, generator=gen).t()  # (3, 150), stride (1, 3)
    check_forward(backend, logits, 20, 1.0, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_and_special_values(backend):
    # 1e9 + g rounds back to 1e9 in float32 (|g| < 30 < half an ulp): every score ties, the
    # lower indices win. NaN ranks as -inf and ties with it; -inf never beats a finite score.
    nan, inf = float("nan"), float("inf")
    logits = torch.full((3, 12), 1e9)
    logits[1, :4] = torch.tensor([nan, -inf, nan, -inf])
    logits[2] = torch.tensor([nan, -inf, 1e9, -inf, 1e9, nan, 1e9, 1e9, -inf, 1e9, nan, 1e9])
    for k in (1, 5, 8, 9, 12):
        hard, noise = run(backend, logits, k, 1.0, 3, hard=True)
        assert torch.equal(hard.double(), reference.gumbel_topk(logits, k, 1.0, noise, hard=True))
        assert hard[0].nonzero().flatten().tolist() == list(range(k))
        want = [*range(4, 12), 0, 1, 2, 3][:k]
        assert hard[1].nonzero().flatten().tolist() == sorted(want)
        finite = [2, 4, 6, 7, 9, 11]
        want = [*finite, 0, 1, 3, 5, 8, 10][:k]
        assert hard[2].nonzero().flatten().tolist() == sorted(want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_with_infinite_logits(backend, gen):
    """-inf and NaN entries get soft 0 and +inf entries 1; the rest shares what is left of k.
    Rows without a finite threshold (>= k entries +inf, or <= k above -inf) are the hard mask."""
    nan, inf = float("nan"), float("inf")
    logits = torch.randn(6, 40, generator=gen)
    logits[0, ::3] = -inf
    logits[0, 1::7] = nan
    logits[1, 5] = inf
    logits[2] = -inf  # no entry above -inf: the hard mask (the first 6)
    logits[3, 10:16] = inf  # exactly k entries +inf
    logits[4, 7:] = nan  # 7 entries above -inf, k = 6: a finite lambda
    logits[5, 6:] = -inf  # 6 entries above -inf: all of them
    soft, noise = run(backend, logits, 6, 0.8, 9, hard=False)
    ref = reference.gumbel_topk(logits, 6, 0.8, noise, hard=False)
    z = reference.perturbed_scores(logits, noise)
    assert_within(soft, ref, soft_bound(backend, z, 6, 0.8, ref), "soft with infinite entries")
    dead = torch.isnan(logits) | (logits == -inf)
    assert bool((soft[[0, 1, 4]][dead[[0, 1, 4]]] == 0).all()) and soft[1, 5] == 1
    assert bool(((soft.double().sum(-1) - 6).abs() <= 1e-5).all())
    hard, _ = run(backend, logits, 6, 0.8, 9, hard=True)
    assert torch.equal(soft[[2, 3, 5]], hard[[2, 3, 5]])
    assert hard[2].nonzero().flatten().tolist() == list(range(6))
    assert hard[3].nonzero().flatten().tolist() == list(range(10, 16))
    assert hard[5].nonzero().flatten().tolist() == list(range(6))


def test_relaxation_approaches_hard_as_tau_shrinks(gen):
    """How hard the relaxation is depends on gap / tau: scores 0.5 apart here."""
    z = torch.stack([torch.randperm(50, generator=gen) for _ in range(2)]).double() * 0.5
    hard = reference.hard_topk_mask(z, 10)
    taus = (1.0, 0.3, 0.1, 0.03, 0.01)
    errs = [(reference.relaxed_topk(z, 10, tau) - hard).abs().max().item() for tau in taus]
    assert errs[-1] < 1e-9 and all(a > b for a, b in itertools.pairwise(errs)), errs


# ----------------------------------------------------------------------------------- noise


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_is_gumbel(backend):
    g = noise_of(backend, 4, 5000, 12345).double().flatten()
    assert torch.isfinite(g).all()
    euler_gamma, var = 0.5772156649, math.pi**2 / 6
    se = math.sqrt(var / g.numel())
    assert abs(g.mean().item() - euler_gamma) < 6 * se, g.mean()
    assert abs(g.var().item() - var) < 0.1, g.var()
    # P(g <= x) = exp(-exp(-x)): compare the empirical CDF at a few points.
    for x in (-1.0, 0.0, 1.0, 3.0):
        emp = (g <= x).double().mean().item()
        assert abs(emp - math.exp(-math.exp(-x))) < 0.02, (x, emp)


def test_fused_kernel_draws_the_standalone_noise(gen):
    """The backward redraws the noise with the standalone kernel: it must be the same bits."""
    logits = torch.randn(3, 4100, generator=gen)
    for hard in (True, False):
        _, fused = gumbel_topk_triton_with_noise(logits.to(TRITON_DEVICE), 3, 1.0, 2**40 + 5, hard)
        assert torch.equal(fused.cpu(), noise_of("triton", 3, 4100, 2**40 + 5))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hard", [True, False])
def test_deterministic_per_seed(backend, hard, gen):
    logits = torch.randn(3, 200, generator=gen)
    a, na = run(backend, logits, 40, 0.5, 42, hard)
    b, nb = run(backend, logits, 40, 0.5, 42, hard)
    assert torch.equal(a, b) and torch.equal(na, nb)
    if backend == "triton":  # the registered kernel (which does not write the noise) agrees
        assert torch.equal(gumbel_topk_triton(logits.to(TRITON_DEVICE), 40, 0.5, 42, hard).cpu(), a)
    c, nc = run(backend, logits, 40, 0.5, 43, hard)
    assert not torch.equal(na, nc)
    assert all(not torch.equal(a[i], c[i]) for i in range(3)), "different seeds gave the same sample"


# -------------------------------------------------------------------------------- gradients


class _Relaxed(torch.autograd.Function):
    """The kernels' hand-written backward (any dtype) behind autograd, for gradcheck."""

    @staticmethod
    def forward(ctx, z, k, tau):
        ctx.save_for_backward(z)
        ctx.k, ctx.tau = k, tau
        return cpu_gumbel.relaxed_topk(z, k, tau)

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        return cpu_gumbel.relaxed_topk_backward(z, ctx.k, ctx.tau, grad), None, None


@pytest.mark.parametrize(("n", "k"), [(1, 1), (9, 1), (9, 4), (9, 9), (20, 10)])
def test_backward_gradcheck_float64(n, k, gen):
    z = torch.randn(2, n, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _Relaxed.apply(t, k, 0.7), (z,))
    # ... and it is autograd through the reference, to float64 rounding.
    grad = torch.randn(2, n, generator=gen, dtype=torch.float64)
    (want,) = torch.autograd.grad(reference.relaxed_topk(z, k, 0.7), z, grad)
    got = cpu_gumbel.relaxed_topk_backward(z.detach(), k, 0.7, grad)
    if k == n:  # no finite threshold: the relaxation is the constant all-ones mask
        assert torch.equal(got, torch.zeros_like(got)) and torch.equal(want, torch.zeros_like(want))
    else:
        assert_rel_close(got, want, 1e-12, "hand-written backward")


def test_gradcheck_reference_soft_path(gen):
    """The reference's relaxation against finite differences (in float64 throughout: the
    reference op itself rounds z to float32, as the kernels do, so it is checked above)."""
    logits = torch.randn(2, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    noise = cpu_gumbel.noise(2, 12, 0, torch.device("cpu")).double()
    assert torch.autograd.gradcheck(lambda t: reference.relaxed_topk(t + noise, 5, 0.6), (logits,))


def op_grad(backend, logits, k, tau, seed, hard, grad):
    if backend == "cpu" or HAS_CUDA:
        dev = "cpu" if backend == "cpu" else "cuda"
        x = logits.to(dev).requires_grad_()
        out = torch.ops.tokenkern.gumbel_topk(x, k, tau, seed, hard)
        out.backward(grad.to(dev, out.dtype))
        return out.detach().cpu(), x.grad.cpu()
    # Under the interpreter: the CUDA kernels called directly on CPU tensors.
    out = gumbel_topk_triton(logits, k, tau, seed, hard)
    return out, gumbel_topk_backward_cuda(grad.float(), logits, k, tau, seed)


def check_grad(backend, logits, k, tau, seed, hard, grad, what="d logits"):
    """The op's gradient against autograd through the reference, elementwise within the
    backend's bound; returns (out, got, want)."""
    grad = grad.float().double()  # what the kernels see
    out, got = op_grad(backend, logits, k, tau, seed, hard, grad)
    noise = noise_of(backend, *logits.shape, seed)
    x = logits.double().requires_grad_()
    ref = reference.gumbel_topk(x, k, tau, noise, hard)
    (want,) = torch.autograd.grad(ref, x, grad)
    if hard:
        assert torch.equal(out.double(), ref.detach()), "hard mask differs from the reference"
    assert got.dtype == logits.dtype
    z = reference.perturbed_scores(logits, noise)
    assert_within(got, want, grad_bound(backend, z, k, tau, grad, want), what)
    return out, got, want


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hard", [True, False])
@pytest.mark.parametrize(("b", "n", "k", "tau"), [(2, 7, 3, 0.5), (3, 300, 40, 1.0), (1, 64, 64, 2.0)])
def test_op_backward_matches_reference(backend, hard, b, n, k, tau, gen):
    logits = torch.randn(b, n, generator=gen)
    grad = torch.randn(b, n, generator=gen, dtype=torch.float64)
    check_grad(backend, logits, k, tau, 5, hard, grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_straight_through_gradient_is_the_soft_gradient(backend, gen):
    logits = torch.randn(2, 100, generator=gen)
    grad = torch.randn(2, 100, generator=gen, dtype=torch.float64)
    _, g_hard = op_grad(backend, logits, 13, 0.4, 8, True, grad)
    _, g_soft = op_grad(backend, logits, 13, 0.4, 8, False, grad)
    assert torch.equal(g_hard, g_soft)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("b", "n", "k"), [(2, 5, 1), (2, 4100, 3), (1, 4096, 17), (1, 8200, 900)])
def test_backward_one_and_long_rows(backend, b, n, k, gen):
    """k = 1, and rows at and past the kernels' 4096-element chunk (past it the CUDA kernels
    loop over chunks)."""
    logits = torch.randn(b, n, generator=gen)
    grad = torch.randn(b, n, generator=gen, dtype=torch.float64)
    check_grad(backend, logits, k, 0.8, 11, False, grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_with_infinite_logits_and_strided_grad(backend, gen):
    """-inf, NaN and +inf logits get gradient 0 and leave the rest of the row's gradient as
    autograd through the reference gives it; rows without a finite threshold get 0. The
    incoming gradient may be non-contiguous."""
    logits = torch.randn(3, 40, generator=gen)
    logits[0, ::3] = float("-inf")
    logits[0, 1::7] = float("nan")
    logits[1, 5] = float("inf")
    logits[2] = float("-inf")
    grad = torch.randn(40, 3, generator=gen, dtype=torch.float64).t()
    _, got, _ = check_grad(backend, logits, 6, 0.8, 9, True, grad, "d logits with infinite entries")
    dead = torch.isnan(logits) | torch.isinf(logits)
    assert bool((got[dead] == 0).all()) and bool((got[2] == 0).all())
    assert bool(torch.isfinite(got).all())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_grad_has_logits_dtype(dtype, gen):
    x = torch.randn(2, 20, generator=gen).to(dtype).requires_grad_()
    tokenkern.gumbel_topk(x, 5, 1.0, 0).sum().backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()


def test_compiled_forward_and_backward(gen):
    logits = torch.randn(3, 50, generator=gen)

    def f(t):
        return (torch.ops.tokenkern.gumbel_topk(t, 10, 0.5, 7) * torch.arange(50.0)).sum()

    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    torch._dynamo.reset()
    f(x1).backward()
    # aot_eager: the AOT autograd trace (fake kernels, the backward op) without inductor codegen.
    torch.compile(f, fullgraph=True, backend="aot_eager")(x2).backward()
    assert torch.equal(x1.grad, x2.grad)


# ------------------------------------------------------------------------ wrapper and checks


def test_wrapper_single_row_and_batch(gen):
    logits = torch.randn(3, 40, generator=gen)
    batched = tokenkern.gumbel_topk(logits, 8, tau=0.5, seed=4)
    assert torch.equal(batched, torch.ops.tokenkern.gumbel_topk(logits, 8, 0.5, 4, True))
    single = tokenkern.gumbel_topk(logits[0], 8, tau=0.5, seed=4, hard=False)
    assert single.shape == (40,)
    assert torch.equal(single, torch.ops.tokenkern.gumbel_topk(logits[:1], 8, 0.5, 4, False)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    out, _ = run(backend, torch.empty(0, 5), 2, 1.0, 0, hard=True)
    assert out.shape == (0, 5)
    out, _ = run(backend, torch.empty(0, 5), 2, 1.0, 0, hard=False)
    assert out.shape == (0, 5)


BAD_CALLS = [
    ("logits must be (B, N)", lambda x: (x[0], 2, 1.0, 0)),
    ("logits must be (B, N)", lambda x: (x[:, :, None], 2, 1.0, 0)),
    ("logits must be a floating tensor", lambda x: (x.long(), 2, 1.0, 0)),
    ("logits must have N >= 1", lambda x: (x[:, :0], 1, 1.0, 0)),
    ("k must be in [1, 10]", lambda x: (x, 0, 1.0, 0)),
    ("k must be in [1, 10]", lambda x: (x, 11, 1.0, 0)),
    ("k must be in [1, 10]", lambda x: (x, -2, 1.0, 0)),
    ("tau must be a finite number > 0", lambda x: (x, 2, 0.0, 0)),
    ("tau must be a finite number > 0", lambda x: (x, 2, -1.0, 0)),
    ("tau must be a finite number > 0", lambda x: (x, 2, float("inf"), 0)),
    ("tau must be a finite number > 0", lambda x: (x, 2, float("nan"), 0)),
    ("seed must be", lambda x: (x, 2, 1.0, -1)),
]


@pytest.mark.parametrize("face", ["cpu", "fake", "triton", "backward"])
@pytest.mark.parametrize(("message", "make"), BAD_CALLS)
def test_bad_input(face, message, make):
    x = torch.randn(2, 10, device="meta" if face == "fake" else "cpu")
    args = make(x)
    with pytest.raises(ValueError, match=re.escape(message)):
        if face == "triton":
            gumbel_topk_triton(*args)
        elif face == "backward":
            torch.ops.tokenkern.gumbel_topk_backward(torch.ones(args[0].shape), *args)
        else:
            torch.ops.tokenkern.gumbel_topk(*args)


def test_bad_backward_grad():
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match=re.escape("grad must have logits' shape")):
        torch.ops.tokenkern.gumbel_topk_backward(torch.ones(2, 9), x, 2, 1.0, 0)
    with pytest.raises(ValueError, match="grad must be a floating tensor"):
        torch.ops.tokenkern.gumbel_topk_backward(torch.ones(2, 10, dtype=torch.long), x, 2, 1.0, 0)


# ------------------------------------------------------------------- GPU compile without a GPU

_COMPILE_SCRIPT = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tokenkern._triton import gumbel

# sm_90: every variant for fp32 and bf16 logits; sm_80: the single-chunk ones for bf16.
for arch, dtypes, chunks in ((90, ("fp32", "bf16"), ((1024, True), (4096, True), (4096, False))),
                             (80, ("bf16",), ((1024, True),))):
    target = GPUTarget("cuda", arch, 32)
    for dtype in dtypes:
        sig = {"l_ptr": "*" + dtype, "out_ptr": "*fp32", "noise_ptr": "*fp32", "shift_ptr": "*fp64", "N": "i32",
               "k": "i32", "inv_tau": "fp32", "log_n": "fp32", "seed": "i64", "l_sb": "i32", "l_sn": "i32",
               "S": "i32", "CHUNK": "constexpr", "SINGLE_CHUNK": "constexpr", "HARD": "constexpr",
               "STORE_NOISE": "constexpr", "STORE_SHIFT": "constexpr"}
        for chunk, single in chunks:
            for hard in (True, False):
                consts = {"CHUNK": chunk, "SINGLE_CHUNK": single, "HARD": hard, "STORE_NOISE": hard,
                          "STORE_SHIFT": not hard}
                src = ASTSource(gumbel._gumbel_topk_kernel, sig, constexprs=consts)
                opts = {"num_warps": gumbel._num_warps(chunk)}
                assert triton.compile(src, target=target, options=opts).asm["cubin"]
        sig = {"l_ptr": "*" + dtype, "g_ptr": "*fp32", "out_ptr": "*fp32", "N": "i32", "k": "i32",
               "inv_tau": "fp32", "log_n": "fp32", "seed": "i64", "l_sb": "i32", "l_sn": "i32", "g_sb": "i32",
               "g_sn": "i32", "shift_ptr": "*fp64", "S": "i32", "CHUNK": "constexpr", "SINGLE_CHUNK": "constexpr",
               "HAS_SHIFT": "constexpr"}
        for chunk, single in chunks:
            for has_shift in (False, True):
                consts = {"CHUNK": chunk, "SINGLE_CHUNK": single, "HAS_SHIFT": has_shift}
                src = ASTSource(gumbel._gumbel_topk_backward_kernel, sig, constexprs=consts)
                opts = {"num_warps": gumbel._num_warps(chunk)}
                assert triton.compile(src, target=target, options=opts).asm["cubin"]
    sig = {"out_ptr": "*fp32", "total": "i64", "seed": "i64", "BLOCK": "constexpr"}
    src = ASTSource(gumbel._noise_kernel, sig, constexprs={"BLOCK": gumbel._NOISE_BLOCK})
    assert triton.compile(src, target=target).asm["cubin"]
print("compiled")
"""


@pytest.mark.skipif(HAS_CUDA, reason="a GPU runs the kernels themselves")
def test_kernels_compile_for_cuda():
    """Ahead-of-time compile of every kernel variant to sm_80/sm_90 cubins with Triton's bundled
    ptxas (in a fresh interpreter: under TRITON_INTERPRET=1 the kernels are not JIT functions),
    so that type and lowering errors the interpreter cannot see fail on machines without a GPU."""
    pytest.importorskip("triton")
    proc = testing.run_compiling(_COMPILE_SCRIPT)
    if proc.returncode and ("ptxas" in proc.stderr or "No module named 'triton.backends.nvidia'" in proc.stderr):
        pytest.skip(f"this Triton cannot compile for CUDA: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
