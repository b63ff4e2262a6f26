"""Numerical robustness: NaN propagation in the attention scores (every path follows the float64
reference's NaN pattern), scale invariance of leverage scores and IPR over the float32 range,
attention at large scale, and the flat launch grids of the Triton kernels."""

import functools
import pathlib
import re

import pytest
import torch
import triton
import triton.language as tl
from testing import BACKENDS, HAS_CUDA, TRITON_DEVICE, assert_rel_close, gapped_matrix, on_backend

from tokenkern import reference
from tokenkern._triton import utils as triton_utils
from tokenkern._triton.utils import flat_grid, unflatten2, unflatten3
from tokenkern.ops.attention import attn_topk_triton

NAN = float("nan")
# float32 attention: logits formed from d-term float32 dot products and exp'd, summed over at
# most Hq * Nq entries per key: a few 2^-24 relative per term, as in test_attention.
ATTN_TOL = 1e-5


attn_of = functools.partial(on_backend, "attn_scores")


def attn_topk_of(backend, q, k, x, n_keep, **kw):
    if backend == "cpu":
        return torch.ops.tokenkern.attn_topk(q, k, x, n_keep, **kw)
    if HAS_CUDA:
        kw = {n: (v.cuda() if isinstance(v, torch.Tensor) else v) for n, v in kw.items()}
        return tuple(t.cpu() for t in torch.ops.tokenkern.attn_topk(q.cuda(), k.cuda(), x.cuda(), n_keep, **kw))
    return attn_topk_triton(q, k, x, n_keep, **kw)


def assert_same_nan_pattern(out, ref, tol, what="scores"):
    """NaN exactly where the reference has NaN; the other entries finite and within tol."""
    out, ref = out.double().cpu(), ref.double().cpu()
    assert out.shape == ref.shape, (tuple(out.shape), tuple(ref.shape))
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), (
        f"{what}: NaN at {torch.isnan(out)}, want {torch.isnan(ref)}"
    )
    keep = ~torch.isnan(ref)
    assert_rel_close(out[keep], ref[keep], tol, what)


def qk(gen, b=2, hq=4, hkv=2, nq=6, nk=9, d=16):
    q = torch.randn(b, hq, nq, d, generator=gen) * 2.0
    k = torch.randn(b, hkv, nk, d, generator=gen)
    return q, k


def masks(gen, b, nq, nk):
    km = torch.rand(b, nk, generator=gen) > 0.3
    qm = torch.rand(b, nq, generator=gen) > 0.3
    km[:, -1] = True  # with causal, the last query of each sample sees a key
    qm[:, -1] = True
    return {"key_mask": km, "query_mask": qm}


def rand_index(gen, *sizes):
    return tuple(int(torch.randint(0, s, (1,), generator=gen)) for s in sizes)


# --------------------------------------------------------------------- NaN in attention


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("where", ["q", "k"])
def test_nan_poisons_the_sample_as_the_softmax_does(backend, causal, where, gen):
    """No masks: a NaN in q (or k) of sample 0 makes the scores of every key its row (rows)
    see NaN; sample 1 is untouched."""
    q, k = qk(gen)
    if where == "q":
        b_, h, i, c = rand_index(gen, 1, 4, 6, 16)
        q[b_, h, i, c] = NAN
    else:
        b_, h, j, c = rand_index(gen, 1, 2, 9, 16)
        k[b_, h, j, c] = NAN
    ref = reference.attn_scores(q, k, causal=causal)
    assert torch.isnan(ref[0]).any() and torch.isfinite(ref[1]).all()
    assert_same_nan_pattern(attn_of(backend, q, k, causal=causal), ref, ATTN_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lse_from", [None, "clean", "poisoned"])
def test_nan_pattern_matches_reference_with_masks_gqa_and_lse(backend, causal, lse_from, gen):
    """NaNs at random places of q and k (some in masked keys or invalid queries, which the
    reference never reads), random masks, GQA; with no lse, the lse of the clean inputs, or
    the lse of the poisoned inputs (whose NaN rows contribute nothing, as documented)."""
    b, hq, hkv, nq, nk, d = 3, 4, 2, 6, 9, 16
    q, k = qk(gen, b, hq, hkv, nq, nk, d)
    m = masks(gen, b, nq, nk)
    clean_lse = reference.attn_lse(q, k, key_mask=m["key_mask"], causal=causal).float()
    for _ in range(3):
        q[rand_index(gen, b, hq, nq, d)] = NAN
        k[rand_index(gen, b, hkv, nk, d)] = NAN
    kw = dict(causal=causal, **m)
    if lse_from == "clean":
        kw["lse"] = clean_lse
    elif lse_from == "poisoned":
        kw["lse"] = reference.attn_lse(q, k, key_mask=m["key_mask"], causal=causal).float()
    for reduce in ("mean", "sum"):
        ref = reference.attn_scores(q, k, reduce=reduce, **kw)
        assert_same_nan_pattern(attn_of(backend, q, k, reduce=reduce, **kw), ref, ATTN_TOL, reduce)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_nan_in_masked_key_or_invalid_query_does_not_propagate(backend, causal, gen):
    q, k = qk(gen)
    km = torch.ones(2, 9, dtype=torch.bool)
    qm = torch.ones(2, 6, dtype=torch.bool)
    km[0, 2] = False
    k[0, :, 2, 5] = NAN  # a masked-out key
    qm[1, 3] = False
    q[1, 1, 3, 0] = NAN  # an invalid query
    out = attn_of(backend, q, k, causal=causal, key_mask=km, query_mask=qm)
    ref = reference.attn_scores(q, k, causal=causal, key_mask=km, query_mask=qm)
    assert torch.isfinite(ref).all() and torch.isfinite(out).all()
    assert_rel_close(out, ref, ATTN_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_nan_poisons_only_the_keys_its_row_sees(backend, gen):
    """Causal, Nq = Nk: a NaN in query i's q reaches keys 0..i only."""
    q, k = qk(gen, 1, 2, 2, 8, 8, 16)
    i = int(torch.randint(0, 7, (1,), generator=gen))
    q[0, 1, i, 3] = NAN
    out = attn_of(backend, q, k, causal=True)
    assert torch.isnan(out[0, : i + 1]).all() and torch.isfinite(out[0, i + 1 :]).all()
    assert_same_nan_pattern(out, reference.attn_scores(q, k, causal=True), ATTN_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attn_topk_of_a_poisoned_sample_keeps_the_first_tokens(backend, gen):
    """All scores NaN (ranked as -inf, ties to the lower index): the first n_keep tokens."""
    q, k = qk(gen, 2, 4, 2, 3, 20, 16)
    q[0, 2, 1, 7] = NAN
    x = torch.randn(2, 15, 8, generator=gen)
    kept, idx, scores = attn_topk_of(backend, q, k, x, 6, key_start=5)
    ref = reference.attn_scores(q, k, key_start=5)
    assert_same_nan_pattern(scores, ref, ATTN_TOL)
    assert torch.isnan(scores[0]).all()
    assert idx[0].tolist() == list(range(6)) and torch.equal(kept[0], x[0, :6])
    ref_kept, ref_idx = reference.topk_gather(scores, x, 6)
    assert torch.equal(idx, ref_idx) and torch.equal(kept, ref_kept)


# ---------------------------------------------------------------- attention at large scale


def one_hot_logits(gen, b, h, nq, nk):
    """q, k whose logits q.k are a permutation of 1..nk per query row (k rows are unit vectors):
    at any large scale every softmax row is one-hot at its largest visible logit."""
    k = torch.eye(nk, 16)[None, None].expand(b, h, nk, 16).contiguous()
    q = torch.zeros(b, h, nq, 16)
    q[..., :nk] = torch.argsort(torch.rand(b, h, nq, nk, generator=gen), dim=-1).float() + 1
    return q / nk, k  # logits in (0, 1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e10, 1e20, 1e30, 1e37])
@pytest.mark.parametrize("causal", [False, True])
def test_large_scale_gives_the_hard_argmax(backend, scale, causal, gen):
    """scale * q.k up to 1e37 (documented bound: float32 range): finite, and the exact softmax
    (one-hot at the largest visible logit), with masks."""
    q, k = one_hot_logits(gen, 2, 2, 5, 7)
    m = masks(gen, 2, 5, 7)
    out = attn_of(backend, q, k, scale=scale, causal=causal, **m)
    ref = reference.attn_scores(q, k, scale=scale, causal=causal, **m)
    assert torch.isfinite(ref).all() and torch.isfinite(out).all()
    assert_rel_close(out, ref, ATTN_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e10, 1e-10])
def test_large_or_small_scale_with_moderate_logits(backend, scale, gen):
    """A large scale on small q (or the reverse): only scale * q.k matters."""
    q, k = qk(gen)
    q = q / scale
    out = attn_of(backend, q, k, scale=scale, causal=True)
    assert_rel_close(out, reference.attn_scores(q, k, scale=scale, causal=True), ATTN_TOL)


# ------------------------------------------------------- scale invariance: leverage and IPR

SCALES = [1e-30, 1e-20, 1e-12, 1e-5, 1.0, 1e8, 1e10, 1e20, 1e30]
# The interpreter runs the per-sample solvers slowly: under it, the scales that used to fail.
SOLVER_SCALES = {"cpu": SCALES, "triton": SCALES if HAS_CUDA else [1e-30, 1e-20, 1e-12, 1e10, 1e20, 1e30]}


def at_scales(x64, scales):
    """(N, D) float64 -> (len(scales), N, D) float32: x * s rounded to float32, one sample per s."""
    return torch.stack([(x64 * s).float() for s in scales])


leverage_of = functools.partial(on_backend, "leverage_scores")


ipr_of = functools.partial(on_backend, "spectral_ipr")


def unit_max(x64):
    return x64 / x64.abs().amax(dim=(-2, -1), keepdim=True)


# The sketch of width min(rank + 8, N, D) = D spans x's column space (no power iteration
# needed), so the scores are exact up to float32 rounding (2^-24) of CholeskyQR2 and Jacobi,
# amplified by the condition number of x (s_1 / s_min = 1e3 for the gapped matrix below):
# about 1e3 * 2^-24 times a small factor.
LEVERAGE_TOL = 1e-4
# IPR: float32 Gram entries over <= 24 products (Triton) or float64 (CPU), plus the float32
# rounding of x * s itself (2^-24 relative per entry): a few 2^-24 in the ratio.
IPR_TOL = 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_leverage_scores_are_scale_invariant(backend, gen):
    """One sample at every scale, in one batch: each is normalized on its own."""
    x64 = unit_max(gapped_matrix(1, 24, 12, rank=4, gen=gen)[0][0])
    ref = reference.leverage_scores(x64.float()[None], rank=4)[0]
    scales = SOLVER_SCALES[backend]
    out = leverage_of(backend, at_scales(x64, scales), rank=4, power_iters=0)
    for i, s in enumerate(scales):
        assert_rel_close(out[i], ref, LEVERAGE_TOL, f"leverage scores of x * {s:g}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rank", [-1, 3])
def test_spectral_ipr_is_scale_invariant(backend, rank, gen):
    x64 = torch.randn(24, 10, generator=gen, dtype=torch.float64)
    x64 = unit_max(x64 * torch.exp(torch.randn(1, 10, generator=gen, dtype=torch.float64)))
    ref = reference.spectral_ipr(x64.float()[None], rank)[0]
    scales = SCALES if rank == -1 else SOLVER_SCALES[backend]
    out = ipr_of(backend, at_scales(x64, scales), rank)
    for i, s in enumerate(scales):
        assert_rel_close(out[i], ref, IPR_TOL, f"IPR (rank {rank}) of x * {s:g}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_and_extreme_samples_side_by_side(backend, gen):
    """A zero sample keeps its result (IPR 0, the leverage scores it gets alone) next to
    samples at 1e-30 and 3e37."""
    x64 = unit_max(torch.randn(2, 20, 8, generator=gen, dtype=torch.float64))
    x = torch.stack([torch.zeros(20, 8), (x64[0] * 1e-30).float(), (x64[1] * 3e37).float()])
    ipr = ipr_of(backend, x)
    assert ipr[0] == 0
    assert_rel_close(ipr[1:], reference.spectral_ipr(x64.float()), IPR_TOL)
    lev = leverage_of(backend, x, rank=8, power_iters=0)
    assert torch.isfinite(lev).all()
    assert torch.equal(lev[0], leverage_of(backend, x[:1], rank=8, power_iters=0)[0])
    ref = reference.leverage_scores(x64.float(), rank=8)
    for i in range(2):
        assert_rel_close(lev[1 + i], ref[i], LEVERAGE_TOL, f"leverage scores of sample {1 + i}")


# ------------------------------------------------------------------------- launch grids


@triton.jit
def _grid_probe_kernel(out_ptr, n0, n1):
    pid = tl.program_id(0)
    i0, i1, i2 = unflatten3(pid, n0, n1)
    j0, j1 = unflatten2(pid, n0)
    tl.store(out_ptr + pid * 5, i0)
    tl.store(out_ptr + pid * 5 + 1, i1)
    tl.store(out_ptr + pid * 5 + 2, i2)
    tl.store(out_ptr + pid * 5 + 3, j0)
    tl.store(out_ptr + pid * 5 + 4, j1)


def test_flat_grid_covers_every_index_once():
    n0, n1, n2 = 3, 4, 5
    (total,) = flat_grid("probe", n0, n1, n2)
    assert total == n0 * n1 * n2
    out = torch.full((total, 5), -1, dtype=torch.int32, device=TRITON_DEVICE)
    _grid_probe_kernel[(total,)](out, n0, n1)
    got = out.cpu()
    want = torch.tensor([(a, b, c) for c in range(n2) for b in range(n1) for a in range(n0)], dtype=torch.int32)
    assert torch.equal(got[:, :3], want)
    assert torch.equal(got[:, 3], want[:, 0]) and torch.equal(got[:, 4], want[:, 1] + n1 * want[:, 2])


def test_flat_grid_takes_large_batches_and_refuses_overflow():
    assert flat_grid("attn_scores", 3, 32, 1_000_000) == (96_000_000,)
    with pytest.raises(ValueError, match=re.escape("tokenkern.attn_scores: the launch grid must have at most")):
        flat_grid("attn_scores", 2**16, 2**16)


def test_no_launcher_uses_grid_axes_1_or_2():
    """CUDA caps grid axes 1 and 2 at 65535: every kernel reads program_id(0) only."""
    root = pathlib.Path(triton_utils.__file__).parent
    for path in sorted(root.glob("*.py")):
        text = path.read_text()
        assert not re.search(r"program_id\(\s*[12]\s*\)", text), f"{path.name} uses grid axis 1 or 2"
