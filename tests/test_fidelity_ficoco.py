"""FiCoCo-V's and FiCoCo-L's defaults equal the released FiCoCo rules (the CLIP-encoder
Filter / Correlate / Compress of FiCoCo-V and the llama-decoder ones of FiCoCo-L), restated
below for one image in float64 with plain loops, one reduction step, with the released bugs
replaced as tokenkern.methods.ficoco documents (FiCoCo-V's compress accumulates into the picked
token itself, then keeps the kept patches, as FiCoCo-L's does).

The recipes compute in float64 on float64 inputs; only topk_gather's ranking rounds the scores
to float32, so each keep count is moved to the nearest one whose kept / discarded boundary
clears that rounding (testing.separated_k). Every other decision (window minima, target sets)
is taken in float64 by both sides.
"""

from __future__ import annotations

import math

import pytest
import torch
from testing import assert_rel_close, assert_valid_indices, separated_k

import tokenkern
import tokenkern.methods as M
from tokenkern.methods.ficoco import released_topk

U32 = 2.0**-24  # float32 unit roundoff
U64 = 2.0**-53


def head_mean_logits(q, k, scale):
    """(H, Nq, d), (Hkv, Nk, d) -> (Nq, Nk) float64 mean over heads of q . k * scale (GQA: the
    released code repeats each key head for its query heads)."""
    k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    return (q.double() @ k.double().mT * scale).mean(dim=0)


def quantile_count(rows):
    """The released correlate's k: most entries of a row above the row's 0.998 quantile."""
    threshold = torch.quantile(rows, 0.998, dim=-1, keepdim=True)
    return int((rows > threshold).sum(dim=-1).max())


def released_v_scores(s):
    """s: (1 + N, 1 + N) logits, [CLS] first -> (N,) filter scores with the 2x2 local penalty."""
    c, p = s[0, 1:], s[1:, 1:].mean(dim=1)
    score = 0.35 * c / c.norm() - 0.65 * p / p.norm()
    side = math.isqrt(score.shape[0])
    lowest = []
    for wy in range(side // 2):
        for wx in range(side // 2):
            cells = [(2 * wy + dy) * side + 2 * wx + dx for dy in (0, 1) for dx in (0, 1)]
            lowest.append(min(cells, key=lambda i: float(score[i])))
    out = score.clone()
    for i in lowest:
        out[i] = score[i] / 2 if score[i] > 0 else score[i] * 2
    return out


def released_v(s, x, keep):
    """One image: s (1 + N, 1 + N) logits, x (N, D) patches -> (kept ascending, merged (K, D))."""
    n = x.shape[0]
    score = released_v_scores(s)
    discarded = sorted(range(n), key=lambda i: float(score[i]))[: n - keep]
    k = quantile_count(s[[1 + i for i in discarded]])
    # Compress in the space of all 1 + N tokens ([CLS] included), then keep the kept patches.
    full = torch.cat([torch.zeros(1, x.shape[1], dtype=x.dtype), x])
    num, den = full.clone(), torch.ones(n + 1, dtype=x.dtype)
    for i in discarded:
        probs = torch.softmax(s[1 + i], dim=0)
        top = probs.argsort(descending=True)[:k]
        for j, w in zip(top.tolist(), (probs[top] / probs[top].sum()).tolist(), strict=True):
            num[j] += w * full[1 + i]
            den[j] += w
    kept = sorted(set(range(n)) - set(discarded))
    rows = [1 + t for t in kept]
    return kept, num[rows] / den[rows, None]


def released_l_redundancy(s, v):
    """s: (V + T, V + T) logits, visual block first -> (V,) filter scores, position 0 at -inf."""
    red = 0.6 * s[:v, :v].sum(dim=1) - 0.4 * s[:v, v:].mean(dim=1)
    red[0] = -math.inf
    return red


def released_l(s, x, keep):
    """One image: s (V + T, V + T) logits, x (V, D) visual hidden states -> (kept, merged)."""
    v = x.shape[0]
    red = released_l_redundancy(s, v)
    discarded = sorted(range(v), key=lambda i: -float(red[i]))[: v - keep]
    corr = 0.6 * s[:v, :v] + 0.4 * s[:v, v:] @ s[v:, :v]
    corr.fill_diagonal_(-math.inf)
    k = quantile_count(corr[discarded])
    out = x.clone()  # accumulates into every visual token; the sources keep their values x
    for i in discarded:
        probs = torch.softmax(corr[i], dim=0)
        top = probs.argsort(descending=True)[:k]
        for j, w in zip(top.tolist(), (probs[top] / probs[top].sum()).tolist(), strict=True):
            out[j] += w * x[i]
    kept = sorted(set(range(v)) - set(discarded))
    return kept, out[kept]


def logits_bound(q, k, scale, extra_terms):
    """Relative float64 error bound of a merged token: each logit is an H*d-term dot product
    (gamma_{Hd} sum |q k| scale / H), which a softmax weight inherits twice, plus the sums of at
    most extra_terms merged tokens."""
    kk = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    h, d = q.shape[1], q.shape[-1]
    dot = float((q.double().abs() @ kk.double().abs().mT).sum(dim=1).max()) * scale / h
    return 4 * h * d * U64 * dot + 4 * extra_terms * U64


def separated_keep(key, near):
    """The keep count nearest `near` whose boundary survives float32 rounding of `key`."""
    gap = 4 * U32 * float(key[torch.isfinite(key)].abs().max())
    keep = separated_k(key, gap, near)
    assert keep is not None
    return keep


@pytest.mark.parametrize("near", [534, 432, 144, 1])
def test_ficoco_v_default_is_the_released_rule(near, gen):
    b, h, n, d, dim = 2, 16, 576, 64, 256
    q = torch.randn(b, h, 1 + n, d, generator=gen, dtype=torch.float64) * 2
    k = torch.randn(b, h, 1 + n, d, generator=gen, dtype=torch.float64)
    x = torch.randn(b, n, dim, generator=gen, dtype=torch.float64)
    scale = d**-0.5
    logits = [head_mean_logits(q[s], k[s], scale) for s in range(b)]
    keeps = [separated_keep(released_v_scores(s_), near) for s_ in logits]
    tol = logits_bound(q, k, scale, n + 1)
    for s in range(b):
        layer = M.VisionLayer(q[s : s + 1], k[s : s + 1], scale)
        red = M.ficoco_v(x[s : s + 1], layer, M.FiCoCoVConfig(keep=keeps[s]))
        kept, merged = released_v(logits[s], x[s], keeps[s])
        assert_valid_indices(red.indices, n, keeps[s])
        assert red.indices[0].tolist() == kept
        assert_rel_close(red.tokens[0], merged, tol)
    # Batched call = per-sample calls when both samples keep the same count.
    batched = M.ficoco_v(x, M.VisionLayer(q, k, scale), M.FiCoCoVConfig(keep=keeps[0]))
    single = M.ficoco_v(x[:1], M.VisionLayer(q[:1], k[:1], scale), M.FiCoCoVConfig(keep=keeps[0]))
    assert torch.equal(batched.indices[:1], single.indices)
    assert_rel_close(batched.tokens[:1], single.tokens, tol)


def test_ficoco_v_variants_differ_from_the_released_rule(gen):
    """The documented variants are real differences: without the window penalty the kept set
    changes; with kept-only targets the merged tokens change (float32: the kept-targets variant
    runs on merge_tokens)."""
    h, n, d = 16, 576, 64
    q = torch.randn(1, h, 1 + n, d, generator=gen) * 2
    k = torch.randn(1, h, 1 + n, d, generator=gen)
    x = torch.randn(1, n, 64, generator=gen)
    scale = d**-0.5
    # At r = 42 many window minima sit just above the discard threshold, which the penalty
    # (doubling a negative score) pushes below it.
    base = M.ficoco_v(x, M.VisionLayer(q, k, scale), M.FiCoCoVConfig(keep=534))
    plain = M.ficoco_v(x, M.VisionLayer(q, k, scale), M.FiCoCoVConfig(keep=534, local_penalty=False))
    kept_only = M.ficoco_v(x, M.VisionLayer(q, k, scale), M.FiCoCoVConfig(keep=534, targets="kept"))
    assert not torch.equal(base.indices, plain.indices)
    assert torch.equal(base.indices, kept_only.indices)
    assert (base.tokens - kept_only.tokens).norm() > 1e-3 * base.tokens.norm()


@pytest.mark.parametrize(("heads", "kv_heads"), [(8, 8), (8, 2)])
@pytest.mark.parametrize("near", [534, 288, 64])
def test_ficoco_l_default_is_the_released_rule(near, heads, kv_heads, gen):
    b, v, t, d, dim = 2, 576, 40, 128, 256
    q = torch.randn(b, heads, v + t, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, kv_heads, v + t, d, generator=gen, dtype=torch.float64)
    x = torch.randn(b, v, dim, generator=gen, dtype=torch.float64)
    scale = d**-0.5
    tol = logits_bound(q, k, scale, v + t)
    for s in range(b):
        logits = head_mean_logits(q[s], k[s], scale)
        # Token 0 is always kept: separate the boundary among the other tokens.
        keep = 1 + separated_keep(-released_l_redundancy(logits, v)[1:], near - 1)
        red = M.ficoco_l_tokens(x[s : s + 1], q[s : s + 1, :, :v], k[s : s + 1, :, :v], q[s : s + 1, :, v:],
                                k[s : s + 1, :, v:], scale, M.FiCoCoLConfig(keep=keep))  # fmt: skip
        kept, merged = released_l(logits, x[s], keep)
        assert_valid_indices(red.indices, v, keep)
        assert red.indices[0].tolist() == kept
        assert_rel_close(red.tokens[0], merged, tol)


def test_ficoco_l_variants_differ_from_the_released_rule(gen):
    v, t, h, d = 576, 40, 8, 64
    q = torch.randn(1, h, v + t, d, generator=gen)
    k = torch.randn(1, h, v + t, d, generator=gen)
    x = torch.randn(1, v, 64, generator=gen)
    args = (x, q[:, :, :v], k[:, :, :v], q[:, :, v:], k[:, :, v:], d**-0.5)
    base = M.ficoco_l_tokens(*args, M.FiCoCoLConfig(keep=288))
    assert 0 in base.indices[0].tolist()
    for option in ({"correlate": "softmax"}, {"targets": "kept"}):
        other = M.ficoco_l_tokens(*args, M.FiCoCoLConfig(keep=288, **option))
        assert torch.equal(base.indices, other.indices), option
        assert (base.tokens - other.tokens).norm() > 1e-3 * base.tokens.norm(), option


def test_released_topk_is_the_quantile_count(gen):
    """released_topk(n) = the released count of a row's entries above its 0.998 quantile, for
    float32 rows as the released code computes them, with and without a -inf entry (FiCoCo-L's
    masked diagonal)."""
    lengths = [*range(3, 1300), 1500, 1501, 2000, 2001, 2880, 2881, 3000]
    for n in lengths:
        row = torch.randn(2, n, generator=gen)
        assert quantile_count(row) == released_topk(n), n
        row[:, 0] = -math.inf
        assert quantile_count(row) == released_topk(n), n
    assert released_topk(577) == released_topk(576) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ficoco_16_and_32_bit_inputs(dtype, gen):
    """The default paths keep the input dtype and stay finite (their rules are tested above)."""
    q = torch.randn(1, 4, 1 + 64, 16, generator=gen).to(dtype)
    k = torch.randn(1, 4, 1 + 64, 16, generator=gen).to(dtype)
    x = torch.randn(1, 64, 32, generator=gen).to(dtype)
    red = M.ficoco_v(x, M.VisionLayer(q, k, 0.25), M.FiCoCoVConfig(keep=20))
    assert red.tokens.dtype == dtype and torch.isfinite(red.tokens).all()
    assert_valid_indices(red.indices, 64, 20)
    red = M.ficoco_l_tokens(x, q[:, :, 1:], k[:, :, 1:], q[:, :, :9], k[:, :, :9], 0.25, M.FiCoCoLConfig(keep=20))
    assert red.tokens.dtype == dtype and torch.isfinite(red.tokens).all()
    assert_valid_indices(red.indices, 64, 20)


def test_ficoco_v_needs_a_square_grid_for_the_window_penalty(gen):
    q = torch.randn(1, 2, 1 + 50, 8, generator=gen)
    k = torch.randn(1, 2, 1 + 50, 8, generator=gen)
    x = torch.randn(1, 50, 8, generator=gen)
    with pytest.raises(ValueError, match=r"tokenkern\.ficoco_v: the patch count N of features must be a square"):
        M.ficoco_v(x, M.VisionLayer(q, k, 0.35), M.FiCoCoVConfig(keep=10))
    red = M.ficoco_v(x, M.VisionLayer(q, k, 0.35), M.FiCoCoVConfig(keep=10, local_penalty=False))
    assert_valid_indices(red.indices, 50, 10)


@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [
        (M.FiCoCoVConfig, "keep", 0),
        (M.FiCoCoVConfig, "keep", 1.5),
        (M.FiCoCoVConfig, "topk", 0),
        (M.FiCoCoVConfig, "topk", True),
        (M.FiCoCoVConfig, "topk", 2.0),
        (M.FiCoCoVConfig, "layer", "last"),
        (M.FiCoCoVConfig, "local_penalty", 1),
        (M.FiCoCoVConfig, "targets", "dropped"),
        (M.FiCoCoLConfig, "keep", -3),
        (M.FiCoCoLConfig, "topk", -1),
        (M.FiCoCoLConfig, "correlate", "cosine"),
        (M.FiCoCoLConfig, "targets", None),
        (M.FiCoCoLConfig, "protect_first", "yes"),
    ],
)
def test_ficoco_config_fields_are_checked(cls, field, value):
    method = "ficoco_v" if cls is M.FiCoCoVConfig else "ficoco_l"
    with pytest.raises(ValueError, match=rf"^tokenkern\.{method}: {field} must be .*, got {value!r}$"):
        cls(**{field: value})


def test_prune_passes_the_ficoco_options(gen):
    from test_integrations import PROMPTS, _forward, build

    tiny = build("llava")
    inputs = tiny.inputs(PROMPTS[:1], gen)
    full = _forward(tiny.model, inputs)
    cases = (
        ("ficoco-v", {"topk": 1, "local_penalty": False, "targets": "kept"}),
        ("ficoco-l", {"layer": 2, "topk": 1, "correlate": "softmax", "targets": "kept", "protect_first": False}),
    )
    for method, options in cases:
        with tokenkern.prune(tiny.model, method, keep=0.25, **options):
            logits = _forward(tiny.model, inputs)
        assert logits.shape[1] < full.shape[1] and torch.isfinite(logits).all(), method
    with pytest.raises(ValueError, match=r"^tokenkern\.ficoco_l: correlate must be one of"):
        tokenkern.prune(tiny.model, "ficoco-l", correlate="cosine")
    with pytest.raises(ValueError, match=r"^tokenkern\.ficoco_v: targets must be one of"):
        tokenkern.prune(tiny.model, "ficoco-v", targets="dropped")
