"""The CPU path of attn_scores (tokenkern._cpu.attention) against the float64 reference, on the
branches it takes: dropped masked keys and invalid queries (padding), causal blocks of rows
and their staircase, groups of key heads, GQA, queries skipped for the key range, the lse
given or not, NaN rows, Nq != Nk, fp16/bf16 inputs and reruns. Small slabs are forced so that
every case crosses several row blocks and head groups."""

import pytest
import torch
from testing import assert_rel_close

from tokenkern import reference
from tokenkern._cpu import attention as cpu_attention

# float32 logits of d-term dot products, exp'd and summed over at most Hq * Nq entries per key:
# a few 2^-24 relative per term (as in test_attention); fp16/bf16 inputs are converted exactly,
# so they meet the same bound against the float64 softmax of the same rounded inputs.
TOL = 1e-5
NAN = float("nan")


@pytest.fixture(params=["default", "small"])
def slabs(request, monkeypatch):
    """The shipped slab sizes, or tiny ones: 8-row blocks, one key head per slab."""
    if request.param == "small":
        monkeypatch.setattr(cpu_attention, "_BLOCK_ROWS", 8)
        monkeypatch.setattr(cpu_attention, "_SLAB_ELEMENTS", 512)
    return request.param


def make_qk(gen, b, hq, hkv, nq, nk, d, dtype=torch.float32):
    q = (torch.randn(b, hq, nq, d, generator=gen) * 2.0).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=gen).to(dtype)
    return q, k


def masks(gen, b, nq, nk, kind):
    """key_mask / query_mask of one kind; sample 0 always keeps its last key and query."""
    if kind == "none":
        return {}
    km = torch.ones(b, nk, dtype=torch.bool)
    qm = torch.ones(b, nq, dtype=torch.bool)
    for i in range(b):
        pad = (i * nk) // (2 * b) + 3 * i
        if kind == "left":  # the queries are the last Nq positions
            km[i, :pad] = False
            qm[i, : max(0, pad - (nk - nq))] = False
        elif kind == "right":
            km[i, nk - pad :] = False
        else:
            km[i] = torch.rand(nk, generator=gen) > 0.3
            qm[i] = torch.rand(nq, generator=gen) > 0.3
    km[:, -1] = True
    qm[:, -1] = True
    return {"key_mask": km, "query_mask": qm}


def scores(q, k, **kw):
    return torch.ops.tokenkern.attn_scores(q, k, **kw)


def with_lse(q, k, kw, lse):
    """kw plus the exact lse (float32) when lse is "given"."""
    if lse == "given":
        kmask = kw.get("key_mask")
        kw = dict(kw, lse=reference.attn_lse(q, k, key_mask=kmask, causal=kw.get("causal", False)).float())
    return kw


# (B, Hq, Hkv, Nq, Nk, d): MHA, GQA 4:1 and MQA, Nq = Nk (prefill), Nq < Nk, Nq > Nk.
SHAPES = [(2, 4, 4, 40, 40, 32), (2, 8, 2, 37, 53, 16), (1, 6, 1, 50, 23, 24), (1, 4, 2, 1, 67, 32)]


@pytest.mark.parametrize("lse", ["none", "given"])
@pytest.mark.parametrize("kind", ["none", "left", "right", "random"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("b", "hq", "hkv", "nq", "nk", "d"), SHAPES)
def test_matches_reference(slabs, b, hq, hkv, nq, nk, d, causal, kind, lse, gen):
    q, k = make_qk(gen, b, hq, hkv, nq, nk, d)
    kw = with_lse(q, k, dict(causal=causal, key_start=3, key_end=nk - 2, **masks(gen, b, nq, nk, kind)), lse)
    out = scores(q, k, **kw)
    ref = reference.attn_scores(q, k, **kw)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert_rel_close(out, ref, TOL)
    if "key_mask" in kw:  # masked keys inside the range score exactly 0
        assert bool((out[~kw["key_mask"][:, 3 : nk - 2]] == 0).all())


@pytest.mark.parametrize("lse", ["none", "given"])
@pytest.mark.parametrize(("start", "end"), [(0, 60), (30, 60), (55, 60), (59, 60), (20, 21), (0, 1)])
def test_key_range_skips_the_queries_before_it(slabs, start, end, lse, gen):
    """Causal, Nq = Nk = 60: queries before key_start see no key of the range and are skipped,
    but still count in the mean; the columns equal those of the full range."""
    q, k = make_qk(gen, 2, 4, 2, 60, 60, 32)
    kw = with_lse(q, k, dict(causal=True, **masks(gen, 2, 60, 60, "left")), lse)
    part = scores(q, k, key_start=start, key_end=end, **kw)
    assert_rel_close(part, reference.attn_scores(q, k, key_start=start, key_end=end, **kw), TOL)
    assert torch.allclose(part, scores(q, k, **kw)[:, start:end], rtol=1e-6, atol=1e-8)
    total = scores(q, k, reduce="sum", **kw)
    assert torch.allclose(total.sum(-1), kw["query_mask"].sum(-1) * 4.0, rtol=1e-5)


@pytest.mark.parametrize("lse", ["none", "given"])
def test_range_of_masked_keys_scores_zero(slabs, lse, gen):
    q, k = make_qk(gen, 2, 4, 2, 30, 30, 16)
    km = torch.ones(2, 30, dtype=torch.bool)
    km[:, 10:20] = False
    kw = with_lse(q, k, dict(causal=True, key_mask=km), lse)
    out = scores(q, k, key_start=10, key_end=20, **kw)
    assert torch.equal(out, torch.zeros(2, 10))


def nan_inputs(gen, where):
    """Causal, Nq = Nk = 40, left padding of 5 in sample 1 and a masked query in sample 0."""
    q, k = make_qk(gen, 2, 4, 2, 40, 40, 16)
    m = masks(gen, 2, 40, 40, "left")
    m["query_mask"][0, 12] = False
    if where == "q_valid":  # query 25 of sample 0: its row is NaN, at masked entries too
        q[0, 1, 25, 3] = NAN
    elif where == "q_invalid":  # an invalid query: ignored
        q[0, 1, 12, 3] = NAN
    elif where == "k_visible":  # key 30 of sample 0: poisons queries 30.., not 0..29
        k[0, 1, 30, 2] = NAN
    elif where == "k_masked":  # a padding key of sample 1: ignored
        k[1, 0, 2, 2] = NAN
    return q, k, dict(causal=True, **m)


@pytest.mark.parametrize("lse", ["none", "given"])
@pytest.mark.parametrize("where", ["q_valid", "q_invalid", "k_visible", "k_masked"])
def test_nan_follows_the_softmax(slabs, where, lse, gen):
    q, k, kw = nan_inputs(gen, where)
    if lse == "given":  # the lse of the clean inputs: NaN reaches only the entries it touches
        q0, k0 = (t.nan_to_num(0.0) for t in (q, k))
        kw["lse"] = reference.attn_lse(q0, k0, key_mask=kw["key_mask"], causal=True).float()
    out = scores(q, k, key_start=5, key_end=38, **kw)
    ref = reference.attn_scores(q, k, key_start=5, key_end=38, **kw)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    if where in ("q_valid", "k_visible"):
        assert torch.isnan(ref[0]).any() and not torch.isnan(ref[1]).any()
    else:
        assert not torch.isnan(ref).any()
    keep = ~torch.isnan(ref)
    assert_rel_close(out[keep], ref[keep], TOL)


@pytest.mark.parametrize("fill", [float("inf"), float("-inf"), NAN])
def test_rows_with_a_non_finite_lse_contribute_nothing(slabs, fill, gen):
    """Valid queries (they see keys) whose lse is not finite: their rows are zero."""
    q, k = make_qk(gen, 2, 4, 2, 30, 30, 16)
    lse = reference.attn_lse(q, k, causal=True).float()
    lse[0, 1, 10:20] = fill
    lse[1, :, 25] = fill
    out = scores(q, k, lse=lse, causal=True, key_start=2)
    ref = reference.attn_scores(q, k, lse=lse, causal=True, key_start=2)
    assert torch.isfinite(out).all()
    assert_rel_close(out, ref, TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lse", ["none", "given"])
def test_half_precision_inputs_accumulate_in_float32(slabs, dtype, lse, gen):
    """fp16/bf16 q and k are converted exactly and their logits formed in float32: the float32
    bound holds against the float64 softmax of the same inputs."""
    q, k = make_qk(gen, 2, 8, 2, 45, 45, 64, dtype)
    kw = with_lse(q, k, dict(causal=True, key_start=4, key_end=41, **masks(gen, 2, 45, 45, "random")), lse)
    assert_rel_close(scores(q, k, **kw), reference.attn_scores(q, k, **kw), TOL)


@pytest.mark.parametrize("threads", [1, 2])
def test_reruns_are_bit_identical(slabs, threads, gen):
    q, k = make_qk(gen, 2, 8, 2, 70, 90, 32)
    kw = dict(causal=True, key_start=10, key_end=80, **masks(gen, 2, 70, 90, "random"))
    assert_reruns_identical(q, k, kw, threads)


def assert_reruns_identical(q, k, kw: dict, threads: int) -> None:
    """Three reruns at `threads` threads equal the first bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        first = scores(q, k, **kw)
        assert all(torch.equal(first, scores(q, k, **kw)) for _ in range(3))
    finally:
        torch.set_num_threads(before)


def test_shipped_slabs_match_small_slabs(monkeypatch, gen):
    """The slab layout changes only the grouping of the sums."""
    q, k = make_qk(gen, 1, 8, 4, 150, 150, 32)
    kw = dict(causal=True, key_start=20, key_end=140, **masks(gen, 1, 150, 150, "random"))
    shipped = scores(q, k, **kw)
    monkeypatch.setattr(cpu_attention, "_BLOCK_ROWS", 5)
    monkeypatch.setattr(cpu_attention, "_SLAB_ELEMENTS", 64)
    small = scores(q, k, **kw)
    assert_rel_close(shipped, reference.attn_scores(q, k, **kw), TOL)
    assert torch.allclose(small, shipped, rtol=1e-5, atol=1e-8)


@pytest.fixture(params=["kernel", "converted"])
def bf16_gemm(request, monkeypatch):
    """bf16 logits from the C++ kernel of few queries reading q and k in place (where the shape
    routes there), or, on every shape, from float32 copies in torch."""
    if request.param == "converted":
        monkeypatch.setattr(cpu_attention, "_KERNEL_ROWS", 0)
    return request.param


@pytest.mark.parametrize("lse", ["none", "given"])
@pytest.mark.parametrize("layout", ["contiguous", "bnhd"])
@pytest.mark.parametrize(("b", "hq", "hkv", "nq", "nk", "d"), SHAPES)
def test_bf16_logits_accumulate_in_float32(slabs, bf16_gemm, b, hq, hkv, nq, nk, d, layout, lse, gen):
    """Both bf16 paths meet the float32 bound; "bnhd": q and k are (B, N, H, d) tensors
    transposed, as attention layers hold them (rows of a head are H * d apart)."""
    q, k = make_qk(gen, b, hq, hkv, nq, nk, d, torch.bfloat16)
    if layout == "bnhd":
        q, k = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k))
    kw = with_lse(q, k, dict(causal=True, key_start=3, key_end=nk - 2, **masks(gen, b, nq, nk, "left")), lse)
    out = scores(q, k, **kw)
    assert torch.isfinite(out).all()
    assert_rel_close(out, reference.attn_scores(q, k, **kw), TOL)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("lse", ["none", "given"])
def test_bf16_reruns_are_bit_identical(slabs, bf16_gemm, threads, lse, gen):
    q, k = make_qk(gen, 2, 8, 2, 70, 90, 32, torch.bfloat16)
    kw = with_lse(q, k, dict(causal=True, key_start=10, key_end=80, **masks(gen, 2, 70, 90, "random")), lse)
    assert_reruns_identical(q, k, kw, threads)


def test_bf16_gemm_matches_the_converted_path(monkeypatch, gen):
    """The C++ kernel (bf16 read in place) and float32 copies in torch differ only in the order
    of the float32 sums."""
    q, k = make_qk(gen, 1, 8, 4, 1, 300, 64, torch.bfloat16)
    kw = with_lse(q, k, dict(causal=True, key_start=20, key_end=280), "given")
    direct = scores(q, k, **kw)
    monkeypatch.setattr(cpu_attention, "_KERNEL_ROWS", 0)
    assert torch.allclose(direct, scores(q, k, **kw), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("lse", ["none", "given"])
@pytest.mark.parametrize("where", ["q_valid", "q_invalid", "k_visible", "k_masked"])
def test_bf16_nan_follows_the_softmax(bf16_gemm, where, lse, gen):
    q, k, kw = nan_inputs(gen, where)
    q, k = q.bfloat16(), k.bfloat16()
    if lse == "given":
        q0, k0 = (t.nan_to_num(0.0) for t in (q, k))
        kw["lse"] = reference.attn_lse(q0, k0, key_mask=kw["key_mask"], causal=True).float()
    out = scores(q, k, key_start=5, key_end=38, **kw)
    ref = reference.attn_scores(q, k, key_start=5, key_end=38, **kw)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.isnan(ref).any() == (where in ("q_valid", "k_visible"))
    keep = ~torch.isnan(ref)
    assert_rel_close(out[keep], ref[keep], TOL)
