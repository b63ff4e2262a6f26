"""The C++ CPU kernel of attn_scores for few queries per key head (tokenkern::_attn_scores_kernel,
which tokenkern._cpu.attention routes decode and last-token calls to) against the float64
reference: fp32/fp16/bf16, MHA/GQA/MQA, Nq of 1 to a few, lse or not, causal or not, masks,
key ranges, mean or sum, batches; non-finite inputs; strided inputs; reruns and thread counts;
and a direct call with bad input raises instead of reading out of bounds."""

import math
import re

import pytest
import torch
from test_attention_cpu import NAN, masks, with_lse
from testing import assert_rel_close

from tokenkern import reference
from tokenkern._cpu import attention as cpu_attention

U = 2.0**-24  # float32 unit roundoff
INVARIANT = "kernel invariant violated"


def kernel(q, k, lse=None, scale=None, key_start=0, key_end=-1, query_mask=None, key_mask=None, causal=False,
           reduce="mean"):  # fmt: skip
    """The private op, called as tokenkern._cpu.attention calls it."""
    nq, nk = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    key_end = nk if key_end == -1 else key_end
    offset = nk - nq if causal else None
    return torch.ops.tokenkern._attn_scores_kernel(
        q, k, lse, scale, key_start, key_end, query_mask, key_mask, offset, reduce == "mean"
    )


def scores(q, k, **kw):
    """The public op; asserts that the call takes the kernel (bit for bit the same output)."""
    assert q.shape[2] * (q.shape[1] // k.shape[1]) <= cpu_attention._KERNEL_ROWS
    out = torch.ops.tokenkern.attn_scores(q, k, **kw)
    direct = kernel(q, k, **kw)
    assert torch.equal(torch.isnan(out), torch.isnan(direct))
    assert torch.equal(out.nan_to_num(0.0), direct.nan_to_num(0.0))
    return out


def tolerance(q, k, kw) -> float:
    """First-order bound on the relative error of every score, from the float32 operations.

    Logits: a dot product over 16 lanes of ceil(d / 16) products each, added pairwise (depth
    log2 16), then scaled: |error| <= (ceil(d/16) + 6) u scale sum_t |q_t k_t|. A logit error e
    moves a probability by a factor within exp(+-2e); the softmax itself adds u |s - max| (the
    subtraction), a few u (exp, the division) and Nk u (the sum of its exps). The column sums
    add Hq Nq u (positive terms) and the mean one u.
    """
    _, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    scale = kw.get("scale") or d**-0.5
    qa = q.double().abs()
    ka = k.double().abs().repeat_interleave(hq // hkv, dim=1)
    dots = (qa @ ka.mT) * scale  # scale sum_t |q_t k_t| >= |logit|
    dots = dots[torch.isfinite(dots)]
    top = float(dots.max()) if dots.numel() else 0.0
    e = (math.ceil(d / 16) + 6) * U * top
    return 2 * e + U * (2 * top + nk + hq * nq + 8)


# (B, Hq, Hkv, Nq, Nk, d): MHA, GQA 4:1 and 7:1 (Qwen2-VL's 28/4), MQA; Nq of 1 to a few; d not
# a multiple of 16; one key.
SHAPES = [
    (2, 4, 4, 1, 67, 32),
    (3, 8, 2, 2, 45, 16),
    (2, 7, 1, 2, 90, 40),
    (1, 28, 4, 1, 130, 64),
    (2, 4, 2, 5, 31, 24),
    (2, 3, 3, 3, 1, 8),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_qk(gen, b, hq, hkv, nq, nk, d, dtype=torch.float32):
    q = (torch.randn(b, hq, nq, d, generator=gen) * 2.0).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=gen).to(dtype)
    return q, k


def key_range(nk: int) -> tuple[int, int]:
    return (min(3, nk - 1), max(min(3, nk - 1) + 1, nk - 2))


@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("lse", ["none", "given"])
@pytest.mark.parametrize("kind", ["none", "left", "right", "random"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("b", "hq", "hkv", "nq", "nk", "d"), SHAPES)
def test_matches_reference(b, hq, hkv, nq, nk, d, dtype, causal, kind, lse, reduce, gen):
    q, k = make_qk(gen, b, hq, hkv, nq, nk, d, dtype)
    start, end = key_range(nk)
    kw = dict(causal=causal, key_start=start, key_end=end, reduce=reduce, **masks(gen, b, nq, nk, kind))
    kw = with_lse(q, k, kw, lse)
    out = scores(q, k, **kw)
    ref = reference.attn_scores(q, k, **kw)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert_rel_close(out, ref, tolerance(q, k, kw))
    if "key_mask" in kw:  # masked keys inside the range score exactly 0
        assert bool((out[~kw["key_mask"][:, start:end]] == 0).all())


@pytest.mark.parametrize("lse", ["none", "given"])
@pytest.mark.parametrize(("start", "end"), [(0, 40), (20, 40), (39, 40), (0, 1), (10, 11), (5, 30)])
def test_key_ranges(start, end, lse, gen):
    """Causal, Nq = 3 of Nk = 40, padding: every range gives the reference and the columns of
    the full range."""
    q, k = make_qk(gen, 2, 8, 2, 3, 40, 32)
    kw = with_lse(q, k, dict(causal=True, **masks(gen, 2, 3, 40, "random")), lse)
    part = scores(q, k, key_start=start, key_end=end, **kw)
    assert_rel_close(part, reference.attn_scores(q, k, key_start=start, key_end=end, **kw), tolerance(q, k, kw))
    assert torch.equal(part, scores(q, k, **kw)[:, start:end])


def test_queries_that_see_no_key(gen):
    """Causal with Nq > Nk: the first queries see no key and do not count in the mean; a sample
    without a valid query scores 0; a range of masked keys scores 0."""
    q, k = make_qk(gen, 2, 4, 2, 6, 3, 16)
    qm = torch.ones(2, 6, dtype=torch.bool)
    qm[1, 3:] = False  # sample 1: its only queries that see keys are masked
    for kw in (dict(causal=True), dict(causal=True, query_mask=qm), dict(causal=True, reduce="sum")):
        out = scores(q, k, **kw)
        assert_rel_close(out, reference.attn_scores(q, k, **kw), tolerance(q, k, kw))
    assert torch.equal(scores(q, k, causal=True, query_mask=qm)[1], torch.zeros(3))
    km = torch.ones(2, 3, dtype=torch.bool)
    km[:, 1] = False
    assert torch.equal(scores(q, k, key_mask=km, key_start=1, key_end=2), torch.zeros(2, 1))


def nan_inputs(gen, where, dtype):
    """Causal, Nq = 3, Nk = 40; sample 1 left-padded by 5 keys; sample 0's query 0 masked."""
    q, k = make_qk(gen, 2, 4, 2, 3, 40, 16)
    m = masks(gen, 2, 3, 40, "left")
    m["query_mask"][0, 0] = False
    if where == "q_valid":
        q[0, 1, 2, 3] = NAN
    elif where == "q_invalid":
        q[0, 1, 0, 3] = NAN
    elif where == "k_visible":  # key 38 of sample 0: seen by query 1 (and 2), not by query 0
        k[0, 1, 38, 2] = NAN
    elif where == "k_inf":  # an infinite logit: the float64 softmax row is NaN
        k[0, 0, 20, :] = float("inf")
    elif where == "k_future":  # key 39: only query 2 sees it
        k[0, 1, 39, 2] = NAN
    elif where == "k_masked":
        k[1, 0, 2, 2] = NAN
    return q.to(dtype), k.to(dtype), dict(causal=True, **m)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lse", ["none", "given"])
@pytest.mark.parametrize("where", ["q_valid", "q_invalid", "k_visible", "k_inf", "k_future", "k_masked"])
def test_nan_follows_the_softmax(where, lse, dtype, gen):
    q, k, kw = nan_inputs(gen, where, dtype)
    if lse == "given":  # the lse of the clean inputs: NaN reaches only the entries it touches
        q0, k0 = (t.nan_to_num(0.0, posinf=0.0) for t in (q, k))
        kw["lse"] = reference.attn_lse(q0, k0, key_mask=kw["key_mask"], causal=True).float()
    out = scores(q, k, key_start=5, key_end=40, **kw)
    ref = reference.attn_scores(q, k, key_start=5, key_end=40, **kw)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.isnan(ref).any() == (where not in ("q_invalid", "k_masked"))
    keep = torch.isfinite(ref)
    assert torch.equal(torch.isinf(out), torch.isinf(ref)) and torch.equal(out[torch.isinf(ref)], ref[torch.isinf(ref)])
    q0, k0 = (t.nan_to_num(0.0, posinf=0.0) for t in (q, k))
    assert_rel_close(out[keep], ref[keep], tolerance(q0, k0, kw))


@pytest.mark.parametrize("fill", [float("inf"), float("-inf"), NAN])
def test_rows_with_a_non_finite_lse_contribute_nothing(fill, gen):
    q, k = make_qk(gen, 2, 8, 2, 2, 30, 16)
    lse = reference.attn_lse(q, k, causal=True).float()
    lse[0, 1, 1] = fill
    lse[1, :, 0] = fill
    out = scores(q, k, lse=lse, causal=True, key_start=2)
    ref = reference.attn_scores(q, k, lse=lse, causal=True, key_start=2)
    assert torch.isfinite(out).all()
    assert_rel_close(out, ref, tolerance(q, k, {}))


def test_extreme_logits_give_the_exact_softmax(gen):
    """Logits of 1e10 x q.k: one-hot rows without lse (no overflow, no NaN)."""
    q, k = make_qk(gen, 2, 4, 2, 2, 50, 16)
    kw = dict(scale=1e10, causal=True, key_start=4)
    out = scores(q, k, **kw)
    ref = reference.attn_scores(q, k, **kw)
    assert torch.isfinite(out).all()
    assert_rel_close(out, ref, 1e-6)


def strided(q, k, layout):
    if layout == "bnhd":  # (B, N, H, d) tensors transposed, as attention layers hold them
        return tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k))
    if layout == "sliced":  # views into larger buffers: padded head dim, every other key
        qb = torch.zeros(*q.shape[:3], q.shape[3] + 5, dtype=q.dtype)
        qb[..., 2 : 2 + q.shape[3]] = q
        kb = torch.zeros(k.shape[0], k.shape[1], 2 * k.shape[2], k.shape[3] + 3, dtype=k.dtype)
        kb[:, :, ::2, 1 : 1 + k.shape[3]] = k
        return qb[..., 2 : 2 + q.shape[3]], kb[:, :, ::2, 1 : 1 + k.shape[3]]
    if layout == "inner":  # a non-unit inner stride (read through a contiguous copy)
        return tuple(t.mT.contiguous().mT for t in (q, k))
    return q, k


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["bnhd", "sliced", "inner"])
def test_strided_inputs_are_read_in_place(layout, dtype, gen):
    """Any strides give the values of the contiguous tensors, bit for bit."""
    q, k = make_qk(gen, 2, 8, 2, 2, 70, 32, dtype)
    kw = with_lse(q, k, dict(causal=True, key_start=5, key_end=60, **masks(gen, 2, 2, 70, "random")), "given")
    qs, ks = strided(q, k, layout)
    assert not qs.is_contiguous() and not ks.is_contiguous()
    assert torch.equal(scores(qs, ks, **kw), scores(q, k, **kw))
    kw.pop("lse")
    assert torch.equal(scores(qs, ks, **kw), scores(q, k, **kw))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lse", ["none", "given"])
def test_reruns_and_thread_counts_are_bit_identical(lse, dtype, gen):
    """Reruns at 1 and 2 threads equal the first call bit for bit (a batch and key count that
    split over many tasks)."""
    q, k = make_qk(gen, 3, 8, 2, 2, 700, 64, dtype)
    kw = with_lse(q, k, dict(causal=True, key_start=10, key_end=650, **masks(gen, 3, 2, 700, "random")), lse)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        first = scores(q, k, **kw)
        for threads in (1, 2, 1, 2):
            torch.set_num_threads(threads)
            assert torch.equal(first, scores(q, k, **kw))
    finally:
        torch.set_num_threads(before)


def test_the_kernel_matches_the_torch_path(monkeypatch, gen):
    """The kernel and the torch path (float32 copies, torch.baddbmm) differ only in the order of
    the float32 sums."""
    q, k = make_qk(gen, 2, 8, 2, 2, 300, 64, torch.bfloat16)
    kw = with_lse(q, k, dict(causal=True, key_start=20, key_end=280, **masks(gen, 2, 2, 300, "random")), "given")
    direct = scores(q, k, **kw)
    monkeypatch.setattr(cpu_attention, "_KERNEL_ROWS", 0)
    torch_path = torch.ops.tokenkern.attn_scores(q, k, **kw)
    assert torch.allclose(direct, torch_path, rtol=1e-5, atol=1e-8)


def _bad_kernel_calls():
    q, k = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 10, 8)
    lse, qm, km = torch.zeros(2, 4, 1), torch.ones(2, 1, dtype=torch.bool), torch.ones(2, 10, dtype=torch.bool)
    op = torch.ops.tokenkern._attn_scores_kernel

    def call(q=q, k=k, lse=None, start=0, end=10, qm=None, km=None, offset=None):
        return lambda: op(q, k, lse, 0.5, start, end, qm, km, offset, True)

    return [
        ("key_end > Nk", call(end=11)),
        ("key_start < 0", call(start=-1)),
        ("empty range", call(start=4, end=4)),
        ("q 3-D", call(q=q[0])),
        ("k dtype", call(k=k.double())),
        ("q float64", call(q=q.double(), k=k.double())),
        ("k batch", call(k=k[:1])),
        ("head dim", call(k=torch.randn(2, 2, 10, 9))),
        ("Hq % Hkv", call(k=torch.randn(2, 3, 10, 8))),
        ("head dim > 256", call(q=torch.randn(2, 4, 1, 257), k=torch.randn(2, 2, 10, 257))),
        ("lse shape", call(lse=lse[:, :2])),
        ("lse dtype", call(lse=lse.double())),
        ("query_mask shape", call(qm=torch.ones(2, 2, dtype=torch.bool))),
        ("query_mask dtype", call(qm=qm.int())),
        ("key_mask shape", call(km=km[:, :9])),
        ("key_mask dtype", call(km=km.float())),
    ]


@pytest.mark.parametrize("case", range(len(_bad_kernel_calls())), ids=[c[0] for c in _bad_kernel_calls()])
def test_a_direct_kernel_call_with_bad_input_raises(case):
    _, call = _bad_kernel_calls()[case]
    with pytest.raises(RuntimeError, match=re.escape(INVARIANT)) as info:
        call()
    assert not isinstance(info.value, ValueError) and "tokenkern::_attn_scores_kernel" in str(info.value)


@pytest.mark.parametrize("offset", [-100, -(2**62), 2**62, 50])
def test_any_causal_offset_stays_in_range(offset, gen):
    """Offsets beyond the keys mean no key or every key for every query (no overflow)."""
    q, k = make_qk(gen, 1, 4, 2, 2, 20, 8)
    out = torch.ops.tokenkern._attn_scores_kernel(q, k, None, 0.3, 0, 20, None, None, offset, True)
    if offset < 0:
        assert torch.equal(out, torch.zeros(1, 20))
    else:
        assert torch.equal(out, torch.ops.tokenkern._attn_scores_kernel(q, k, None, 0.3, 0, 20, None, None, None, True))


PORTABLE_SCRIPT = """
import torch, tokenkern
cases = torch.load({path!r})
torch.save([torch.ops.tokenkern.attn_scores(q, k, **kw) for q, k, kw in cases], {out!r})
"""


def test_the_portable_loop_matches_reference(tmp_path, gen):
    """TOKENKERN_PORTABLE_CPU=1 (read once per process) takes the loop CPUs without AVX-512 run."""
    import os
    import subprocess
    import sys

    cases = []
    for dtype in DTYPES:
        for b, hq, hkv, nq, nk, d in SHAPES:
            q, k = make_qk(gen, b, hq, hkv, nq, nk, d, dtype)
            start, end = key_range(nk)
            kw = dict(causal=True, key_start=start, key_end=end, **masks(gen, b, nq, nk, "random"))
            cases.append((q, k, with_lse(q, k, kw, "given" if len(cases) % 2 else "none")))
    path, out = str(tmp_path / "cases.pt"), str(tmp_path / "out.pt")
    torch.save(cases, path)
    env = {**os.environ, "TOKENKERN_PORTABLE_CPU": "1"}
    subprocess.run([sys.executable, "-c", PORTABLE_SCRIPT.format(path=path, out=out)], env=env, check=True)
    for (q, k, kw), got in zip(cases, torch.load(out), strict=True):
        assert torch.isfinite(got).all()
        assert_rel_close(got, reference.attn_scores(q, k, **kw), tolerance(q, k, kw))
