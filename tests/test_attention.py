"""attn_scores / attn_topk: the CPU kernel (torch, chunked) and the Triton kernels (on CPU via
the interpreter) against the materialized float64 softmax of reference.py."""

import functools
import re

import pytest
import torch
from testing import BACKENDS, HAS_CUDA, TRITON_DEVICE, assert_rel_close, assert_valid_indices, on_backend

import tokenkern
from tokenkern import reference
from tokenkern._triton import attention as triton_attention
from tokenkern.ops.attention import attn_scores_triton, attn_topk_triton, kernel_args

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


scores_of = functools.partial(on_backend, "attn_scores")


def make_qk(gen, b, hq, hkv, nq, nk, d, dtype=torch.float32):
    # Larger logits than unit Gaussians give peaked, realistic attention rows.
    q = (torch.randn(b, hq, nq, d, generator=gen) * 2.0).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=gen).to(dtype)
    return q, k


def random_masks(gen, b, nq, nk, kind):
    if kind == "none":
        return {}
    if kind == "random":
        km = torch.rand(b, nk, generator=gen) > 0.3
        qm = torch.rand(b, nq, generator=gen) > 0.3
        qm[0] = False  # a fully masked batch element: contributes nothing, scores 0
        km[-1, -1] = True
        return {"key_mask": km, "query_mask": qm}
    # left padding: sample i starts at position pad_i (keys) and queries are the last Nq positions
    km = torch.ones(b, nk, dtype=torch.bool)
    qm = torch.ones(b, nq, dtype=torch.bool)
    for i in range(b):
        pad = (i * nk) // (2 * b)
        km[i, :pad] = False
        qpad = max(0, pad - (nk - nq))
        qm[i, :qpad] = False
    return {"key_mask": km, "query_mask": qm}


# (B, Hq, Hkv, Nq, Nk, d): Nk in {1, 7, 577, 650, 2881}, Nq in {1, 5, 64, Nk}, d in {64, 80,
# 128}, GQA 28/4 and 32/32, covered without running the full product through the interpreter.
SHAPES = [
    (1, 2, 1, 1, 1, 64),
    (2, 2, 2, 5, 7, 80),
    (2, 4, 2, 7, 7, 128),
    (1, 4, 2, 64, 577, 128),
    (1, 28, 4, 64, 650, 128),
    (1, 32, 32, 5, 577, 64),
    (2, 2, 2, 650, 650, 80),
    (1, 2, 1, 1, 2881, 80),
    (1, 2, 1, 5, 2881, 64),
    (1, 2, 2, 64, 2881, 128),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masks", ["none", "random", "left_padding"])
@pytest.mark.parametrize(("b", "hq", "hkv", "nq", "nk", "d"), SHAPES)
def test_matches_reference(backend, causal, masks, b, hq, hkv, nq, nk, d, gen):
    q, k = make_qk(gen, b, hq, hkv, nq, nk, d)
    kw = dict(causal=causal, **random_masks(gen, b, nq, nk, masks))
    out = scores_of(backend, q, k, **kw)
    ref = reference.attn_scores(q, k, **kw)
    assert out.dtype == torch.float32 and out.shape == (b, nk)
    assert torch.isfinite(out).all()
    assert_rel_close(out, ref, TOL[torch.float32])
    if masks == "random":
        assert bool((out[0] == 0).all()), "a batch element with no valid query scores 0"


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_long_causal_prefill(backend, gen):
    """Nq = Nk = 2881 (LLaVA-NeXT-sized prefill), causal, with a key mask."""
    q, k = make_qk(gen, 1, 2, 1, 2881, 2881, 64)
    km = torch.rand(1, 2881, generator=gen) > 0.1
    out = scores_of(backend, q, k, causal=True, key_mask=km, key_start=35, key_end=2500)
    assert_rel_close(out, reference.attn_scores(q, k, causal=True, key_mask=km, key_start=35, key_end=2500), 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if HAS_CUDA else []))
def test_half_precision_inputs(backend, dtype, gen):
    q, k = make_qk(gen, 2, 4, 2, 64, 577, 128, dtype)
    kw = dict(causal=True, key_start=35, key_end=611 - 35)
    assert_rel_close(scores_of(backend, q, k, **kw), reference.attn_scores(q, k, **kw), TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("start", "end"), [(0, -1), (35, 611), (100, 101), (0, 1), (649, 650)])
def test_key_slices_select_columns_of_the_full_normalization(backend, start, end, gen):
    q, k = make_qk(gen, 2, 4, 4, 9, 650, 64)
    full = scores_of(backend, q, k, causal=True)
    part = scores_of(backend, q, k, causal=True, key_start=start, key_end=end)
    stop = 650 if end == -1 else end
    assert part.shape == (2, stop - start)
    assert torch.allclose(part, full[:, start:stop], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_lse_path_equals_two_pass(backend, causal, gen):
    q, k = make_qk(gen, 2, 6, 2, 33, 300, 64)
    masks = random_masks(gen, 2, 33, 300, "random")
    lse = reference.attn_lse(q, k, key_mask=masks["key_mask"], causal=causal).float()
    two_pass = scores_of(backend, q, k, causal=causal, **masks)
    one_pass = scores_of(backend, q, k, lse=lse, causal=causal, **masks)
    assert_rel_close(one_pass, two_pass.double(), 1e-5)


def test_kernel_lse_equals_reference(gen):
    q, k = make_qk(gen, 2, 4, 2, 40, 200, 80)
    km = torch.rand(2, 200, generator=gen) > 0.5
    a = kernel_args("attn_scores", q, k, scale=80**-0.5, key_mask=km, causal=True)
    lse = triton_attention.attention_lse(
        q.to(TRITON_DEVICE), k.to(TRITON_DEVICE), a.scale, km.to(TRITON_DEVICE), a.causal_offset
    )
    ref = reference.attn_lse(q, k, key_mask=km, causal=True)
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    assert_rel_close(lse.cpu()[finite], ref[finite], 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_from_scaled_dot_product_attention(backend, gen):
    """lse as returned by torch's flash SDPA kernel (natural log of the scaled logits)."""
    q, k = make_qk(gen, 2, 4, 4, 50, 50, 64)
    v = torch.randn_like(k)
    _, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)[:2]
    out = scores_of(backend, q, k, lse=lse.float(), causal=True)
    assert_rel_close(out, reference.attn_scores(q, k, causal=True), 1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_from_flex_attention(backend, gen):
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

    q, k = make_qk(gen, 1, 2, 2, 40, 40, 64)
    v = torch.randn_like(k)
    mask = create_block_mask(lambda b, h, i, j: j <= i, None, None, 40, 40, device="cpu")
    _, aux = flex_attention(q, k, v, block_mask=mask, return_aux=AuxRequest(lse=True))
    out = scores_of(backend, q, k, lse=aux.lse.float(), causal=True)
    assert_rel_close(out, reference.attn_scores(q, k, causal=True), 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_queries_that_see_no_key_contribute_nothing(backend, gen):
    q, k = make_qk(gen, 1, 2, 2, 8, 8, 64)
    km = torch.ones(1, 8, dtype=torch.bool)
    km[0, :3] = False  # with causal, queries 0..2 see no key at all
    out = scores_of(backend, q, k, causal=True, key_mask=km)
    ref = reference.attn_scores(q, k, causal=True, key_mask=km)
    assert torch.isfinite(out).all() and bool((out[0, :3] == 0).all())
    assert_rel_close(out, ref, 1e-5)
    # Mean over the 5 valid queries and 2 heads: the scores sum to 1.
    assert abs(out.sum().item() - 1.0) < 1e-5
    # An lse of +inf or -inf for such rows (FlashAttention uses +inf) is ignored too.
    lse = reference.attn_lse(q, k, key_mask=km, causal=True).float()
    for fill in (float("inf"), float("-inf"), float("nan")):
        lse[..., :3] = fill
        assert_rel_close(scores_of(backend, q, k, lse=lse, causal=True, key_mask=km), ref, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_sample_equals_the_sample_alone(backend, gen):
    """Left padding (causal, masked keys and queries) and right padding (masked keys) give the
    sample's own scores at its positions."""
    q, k = make_qk(gen, 1, 4, 2, 20, 20, 64)
    alone = scores_of(backend, q, k, causal=True)
    pad = 7
    ql = torch.cat([torch.randn(1, 4, pad, 64, generator=gen), q], dim=2)
    kl = torch.cat([torch.randn(1, 2, pad, 64, generator=gen), k], dim=2)
    mask = torch.arange(pad + 20)[None] >= pad
    left = scores_of(backend, ql, kl, causal=True, key_mask=mask, query_mask=mask)
    assert torch.allclose(left[:, pad:], alone, rtol=1e-5, atol=1e-7) and bool((left[:, :pad] == 0).all())
    kr = torch.cat([k, torch.randn(1, 2, pad, 64, generator=gen)], dim=2)
    right = scores_of(backend, q, kr, key_mask=torch.arange(20 + pad)[None] < 20)
    assert torch.allclose(right[:, :20], scores_of(backend, q, k), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sum_is_mean_times_count(backend, gen):
    q, k = make_qk(gen, 2, 4, 2, 10, 30, 64)
    qm = torch.ones(2, 10, dtype=torch.bool)
    qm[1, :4] = False
    s = scores_of(backend, q, k, query_mask=qm, reduce="sum")
    m = scores_of(backend, q, k, query_mask=qm, reduce="mean")
    assert torch.allclose(s, m * torch.tensor([[40.0], [24.0]]), rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_equal_scores_tie_to_lower_indices(backend, gen):
    q = torch.zeros(2, 2, 3, 64)  # uniform attention: every key gets the same mass
    k = torch.randn(2, 2, 40, 64, generator=gen)
    x = torch.randn(2, 30, 16, generator=gen)
    fn = torch.ops.tokenkern.attn_topk if backend == "cpu" else attn_topk_triton
    if backend == "triton" and HAS_CUDA:
        kept, idx, scores = (t.cpu() for t in fn(q.cuda(), k.cuda(), x.cuda(), 7, key_start=10))
    else:
        kept, idx, scores = fn(q, k, x, 7, key_start=10)
    assert torch.allclose(scores, torch.full_like(scores, 1 / 40))
    # Exactly equal in float32, so ties break by index.
    assert idx.tolist() == [list(range(7))] * 2
    assert torch.equal(kept, x[:, :7])


@pytest.mark.parametrize("backend", BACKENDS)
def test_attn_topk_matches_reference(backend, gen):
    q, k = make_qk(gen, 2, 8, 2, 1, 650, 128)
    x = torch.randn(2, 576, 64, generator=gen)
    kw = dict(key_start=35, key_end=611, causal=True)
    fn = torch.ops.tokenkern.attn_topk if backend == "cpu" else attn_topk_triton
    if backend == "triton" and HAS_CUDA:
        kept, idx, scores = (t.cpu() for t in fn(q.cuda(), k.cuda(), x.cuda(), 144, **kw))
    else:
        kept, idx, scores = fn(q, k, x, 144, **kw)
    assert_rel_close(scores, reference.attn_scores(q, k, **kw), 1e-5)
    assert_valid_indices(idx, 576, 144)
    ref_kept, ref_idx = reference.topk_gather(scores, x, 144)
    assert torch.equal(idx, ref_idx) and torch.equal(kept, ref_kept)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend, gen):
    q, k = make_qk(gen, 2, 8, 4, 70, 300, 64)
    kw = random_masks(gen, 2, 70, 300, "random")
    assert torch.equal(scores_of(backend, q, k, causal=True, **kw), scores_of(backend, q, k, causal=True, **kw))


@pytest.mark.parametrize("with_lse", [False, True])
def test_attn_topk_launches_and_grid(with_lse, gen):
    """The head reduction runs inside the column-sum kernel: lse (without a caller's lse),
    column sums, topk_gather; the column sums' grid is (key block, batch)."""
    from tokenkern.kernel_report.triton_report import record_launches

    q, k = make_qk(gen, 3, 4, 2, 9, 40, 16)
    x = torch.randn(3, 30, 8, generator=gen)
    lse = reference.attn_lse(q, k, causal=True).float() if with_lse else None
    qd, kd, xd = q.to(TRITON_DEVICE), k.to(TRITON_DEVICE), x.to(TRITON_DEVICE)
    lsed = lse.to(TRITON_DEVICE) if with_lse else None
    with record_launches(execute=True, torch_ops=False) as launches:
        kept, idx, scores = attn_topk_triton(qd, kd, xd, 5, lse=lsed, key_start=10, key_end=40, causal=True)
    names = [launch.name for launch in launches]
    assert names == ([] if with_lse else ["_lse_kernel"]) + ["_colsum_kernel", "_topk_gather_kernel"]
    colsum = launches[names.index("_colsum_kernel")]
    block_n = colsum.kwargs["BLOCK_N"]
    assert colsum.grid == (-(-30 // block_n) * 3, 1, 1)
    ref = reference.attn_scores(q, k, lse=lse, key_start=10, key_end=40, causal=True)
    assert_rel_close(scores.cpu(), ref, 1e-5)
    ref_kept, ref_idx = reference.topk_gather(scores.cpu(), x, 5)
    assert torch.equal(idx.cpu(), ref_idx) and torch.equal(kept.cpu(), ref_kept.to(x.dtype))


@pytest.mark.parametrize("blocks", [(16, 16), (64, 64), (32, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_block_sizes_under_any_runner(blocks, causal, gen):
    """The GPU's block sizes (many programs per row and column) on whatever runs Triton."""
    q, k = make_qk(gen, 2, 4, 2, 45, 150, 80)
    masks = random_masks(gen, 2, 45, 150, "left_padding")
    qd, kd = q.to(TRITON_DEVICE), k.to(TRITON_DEVICE)
    dev = {n: v.to(TRITON_DEVICE) for n, v in masks.items()}
    args = kernel_args("attn_scores", qd, kd, scale=80**-0.5, key_start=20, key_end=140, causal=causal, **dev)
    out = triton_attention.attention_scores(qd, kd, **args._asdict(), blocks=(*blocks, 128))
    ref = reference.attn_scores(q, k, key_start=20, key_end=140, causal=causal, **masks)
    assert_rel_close(out.cpu(), ref, 1e-5)


def test_wrappers():
    q, k = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 9, 16)
    assert torch.equal(tokenkern.attn_scores(q, k, causal=True), torch.ops.tokenkern.attn_scores(q, k, causal=True))
    x = torch.randn(1, 9, 4)
    assert torch.equal(tokenkern.attn_topk(q, k, x, 3)[1], torch.ops.tokenkern.attn_topk(q, k, x, 3)[1])


def _bad_calls():
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 9, 16)
    x = torch.randn(2, 9, 8)
    yes_q, yes_k = torch.ones(2, 5, dtype=torch.bool), torch.ones(2, 9, dtype=torch.bool)
    return [
        ("q must be (B, Hq, Nq, d)", (q[0], k), {}),
        ("k must be (B, Hkv, Nk, d)", (q, k[0]), {}),
        ("k has batch size 1 but q has 2", (q, k[:1]), {}),
        ("k has head dim 8 but q has 16", (q, k[..., :8]), {}),
        ("must be a multiple of key heads Hkv=3", (q, torch.randn(2, 3, 9, 16)), {}),
        ("q must have dtype", (q.double(), k), {}),
        ("k must have q's dtype float32, got float16", (q, k.half()), {}),
        ("head dim d must be in [1, 256]", (torch.randn(1, 1, 2, 300), torch.randn(1, 1, 2, 300)), {}),
        ("key_start must be in [0, 8]", (q, k), {"key_start": 9}),
        ("key_start must be in [0, 8]", (q, k), {"key_start": -1}),
        ("key_end must be -1 or in (3, 9]", (q, k), {"key_start": 3, "key_end": 3}),
        ("key_end must be -1 or in (0, 9]", (q, k), {"key_end": 10}),
        ("query_mask must be (B, Nq)", (q, k), {"query_mask": yes_k}),
        ("key_mask must be (B, Nk)", (q, k), {"key_mask": yes_q}),
        ("key_mask must have dtype bool, got int64", (q, k), {"key_mask": yes_k.long()}),
        ("query_mask must have dtype bool, got float32", (q, k), {"query_mask": yes_q.float()}),
        ("lse must be (B, Hq, Nq) = (2, 4, 5)", (q, k), {"lse": torch.zeros(2, 2, 5)}),
        ("lse must have dtype float32", (q, k), {"lse": torch.zeros(2, 4, 5, dtype=torch.float64)}),
        ("reduce must be one of ('mean', 'sum')", (q, k), {"reduce": "max"}),
        ("scale must be a finite number", (q, k), {"scale": float("nan")}),
        ("x must be (B, key_end - key_start, D) = (2, 9, D)", (q, k, x[:, :5], 2), {}),
        ("n_keep must be in [1, 9]", (q, k, x, 0), {}),
        ("n_keep must be in [1, 4]", (q, k, x[:, 5:], 5), {"key_start": 5}),
        ("x must be a floating tensor", (q, k, x.long(), 2), {}),
    ]


@pytest.mark.parametrize("face", ["cpu", "triton", "fake"])
@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input(face, case):
    message, args, kwargs = _bad_calls()[case]
    topk = len(args) == 4
    if face == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode

        op = torch.ops.tokenkern.attn_topk if topk else torch.ops.tokenkern.attn_scores
        with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(ValueError, match=re.escape(message)):
            op(*args, **kwargs)
        return
    if face == "cpu":
        op = torch.ops.tokenkern.attn_topk if topk else torch.ops.tokenkern.attn_scores
    else:
        op = attn_topk_triton if topk else attn_scores_triton
    with pytest.raises(ValueError, match=re.escape(message)):
        op(*args, **kwargs)
    if not topk:  # attn_topk validates the same attention arguments
        x = torch.randn(2, 9, 8)
        fn = torch.ops.tokenkern.attn_topk if face == "cpu" else attn_topk_triton
        with pytest.raises(ValueError):
            fn(args[0], args[1], x, 1, **kwargs)


# ------------------------------------------------------------------ head groups (attn_topk)


def _group_args(q, k, **kw):
    qd, kd = q.to(TRITON_DEVICE), k.to(TRITON_DEVICE)
    dev = {n: (v.to(TRITON_DEVICE) if isinstance(v, torch.Tensor) else v) for n, v in kw.items()}
    return qd, kd, kernel_args("attn_scores", qd, kd, **dev)._asdict()


def _in_part_order(parts: torch.Tensor) -> torch.Tensor:
    """parts (B, P, N) added in float32 in part order 0, 1, ... (the kernel's order)."""
    out = parts[:, 0].clone()
    for p in range(1, parts.shape[1]):
        out += parts[:, p]
    return out


def _order_bound(n_terms: int, groups: int) -> float:
    """Relative bound, per score, on the difference of two float32 sums of the same
    nonnegative exp terms in different orders: each order is within (n - 1) u of the exact
    sum; the mean's division (per group) and the sum of the groups add (groups + 1) u."""
    return (2 * n_terms + groups + 2) * 2.0**-24


# (B, Hq, Hkv, Nq, Nk, groups): uneven groups (Hq % groups != 0), groups crossing key heads
# (GQA 6/2 and 28/4), one head per group, a single query.
GROUP_CASES = [
    (2, 6, 2, 20, 150, 4),
    (1, 6, 6, 9, 77, 5),
    (2, 4, 1, 1, 140, 4),
    (1, 28, 4, 3, 130, 12),
    (1, 5, 5, 33, 70, 2),
]


@pytest.mark.parametrize(("b", "hq", "hkv", "nq", "nk", "groups"), GROUP_CASES)
@pytest.mark.parametrize("variant", ["causal-random", "lse-left_padding", "sum"])
def test_head_groups_equal_one_group(b, hq, hkv, nq, nk, groups, variant, gen):
    """Column sums split over head groups: their sum in group order is the scores of one
    group up to the float32 summation order, attn_topk's scores are that sum bit for bit, and
    its selection is topk_gather's of those scores."""
    q, k = make_qk(gen, b, hq, hkv, nq, nk, 32)
    x = torch.randn(b, nk - 10, 8, generator=gen)
    kind = variant.split("-")[-1] if "-" in variant else "none"
    kw = dict(key_start=10, causal=variant != "sum", reduce="sum" if variant == "sum" else "mean")
    kw.update(random_masks(gen, b, nq, nk, kind))
    if variant.startswith("lse"):
        kw["lse"] = reference.attn_lse(q, k, key_mask=kw["key_mask"], causal=True).float()
    qd, kd, args = _group_args(q, k, **kw)
    one = triton_attention.column_sums(qd, kd, **args, groups=1).cpu()
    parts = triton_attention.column_sums(qd, kd, **args, groups=groups).cpu()
    assert one.shape == (b, 1, nk - 10) and parts.shape == (b, groups, nk - 10)
    assert torch.isfinite(parts).all()
    total = _in_part_order(parts)
    bound = _order_bound(hq * nq, groups) * torch.maximum(total.abs(), one[:, 0].abs())
    assert bool(((total - one[:, 0]).abs() <= bound).all()), float((total - one[:, 0]).abs().max())
    assert_rel_close(total, reference.attn_scores(q, k, **kw), 1e-5)
    kept, idx, scores = triton_attention.attention_topk(qd, kd, x.to(TRITON_DEVICE), 7, **args, groups=groups)
    assert torch.equal(scores.cpu(), total)
    ref_kept, ref_idx = reference.topk_gather(total, x, 7)
    assert torch.equal(idx.cpu(), ref_idx) and torch.equal(kept.cpu(), ref_kept)


def test_one_group_is_attn_scores_bit_for_bit(gen):
    q, k = make_qk(gen, 2, 6, 2, 20, 150, 32)
    x = torch.randn(2, 150, 8, generator=gen)
    qd, kd, args = _group_args(q, k, causal=True, **random_masks(gen, 2, 20, 150, "random"))
    scores = triton_attention.attention_scores(qd, kd, **args)
    _, _, topk_scores = triton_attention.attention_topk(qd, kd, x.to(TRITON_DEVICE), 9, **args, groups=1)
    assert torch.equal(scores, topk_scores)
    assert torch.equal(scores, triton_attention.column_sums(qd, kd, **args, groups=1)[:, 0])


def test_head_groups_out_of_range_raise(gen):
    q, k = make_qk(gen, 1, 4, 2, 3, 20, 16)
    qd, kd, args = _group_args(q, k)
    for groups in (0, 5):
        with pytest.raises(ValueError, match=re.escape("groups must be in [1, Hq=4]")):
            triton_attention.column_sums(qd, kd, **args, groups=groups)


def test_head_groups_fill_the_gpu_at_b1():
    """The launcher's head groups at the headline shapes (LLaVA-NeXT, 2880 image keys in
    128-wide tiles: 23 key blocks): >= 2 x 132 programs at B=1 prefill, >= 132 at B=1 decode
    (each program keeps >= MIN_TILES tiles), B=8 stays >= 132 and no group split once the
    key blocks alone fill the GPU twice."""
    groups = triton_attention.head_groups
    sms = triton_attention.SMS
    assert groups(1, 23, 32, 2950, 64) * 23 >= 2 * sms
    assert groups(1, 23, 32, 1, 16) == 32 // triton_attention.MIN_TILES and 23 * 8 >= sms
    assert groups(1, 23, 28, 2950, 64) * 23 >= 2 * sms  # GQA 28 query heads
    assert groups(8, 23, 32, 2950, 64) * 23 * 8 >= 2 * sms
    assert groups(16, 23, 32, 2950, 64) == 1
    assert groups(1, 1, 4, 9, 64) == 1  # too little work to split


@pytest.mark.parametrize("with_lse", [False, True])
def test_attn_topk_b1_head_group_launches(with_lse, gen):
    """At B=1 attn_topk splits the heads: the column sums' grid is (key block, head group,
    batch), topk_gather's kernel adds the partials; still 3 launches (2 with lse)."""
    from tokenkern.kernel_report.triton_report import record_launches

    q, k = make_qk(gen, 1, 8, 2, 40, 300, 16)
    x = torch.randn(1, 280, 8, generator=gen)
    lse = reference.attn_lse(q, k, causal=True).float() if with_lse else None
    qd, kd, xd = q.to(TRITON_DEVICE), k.to(TRITON_DEVICE), x.to(TRITON_DEVICE)
    lsed = lse.to(TRITON_DEVICE) if with_lse else None
    with record_launches(execute=True, torch_ops=False) as launches:
        kept, idx, scores = attn_topk_triton(qd, kd, xd, 50, lse=lsed, key_start=20, causal=True)
    names = [launch.name for launch in launches]
    assert names == ([] if with_lse else ["_lse_kernel"]) + ["_colsum_kernel", "_topk_gather_kernel"]
    colsum, gather = launches[-2], launches[-1]
    n_blocks = -(-280 // colsum.kwargs["BLOCK_N"])
    groups = triton_attention.head_groups(1, n_blocks, 8, 40, colsum.kwargs["BLOCK_M"])
    assert groups > 1 and colsum.grid == (n_blocks * groups, 1, 1)
    assert gather.kwargs["WRITE_SCORES"] and gather.args[gather.fn.arg_names.index("n_parts")] == groups
    ref = reference.attn_scores(q, k, lse=lse, key_start=20, causal=True)
    assert_rel_close(scores.cpu(), ref, 1e-5)
    ref_kept, ref_idx = reference.topk_gather(scores.cpu(), x, 50)
    assert torch.equal(idx.cpu(), ref_idx) and torch.equal(kept.cpu(), ref_kept)
