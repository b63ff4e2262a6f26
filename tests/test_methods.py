"""Each method recipe equals an eager reference written from the paper's rule: materialized
softmax attention, Python loops, float64. Small random inputs; fresh every session."""

import math

import numpy as np
import pytest
import torch
from testing import assert_rel_close

import tokenkern  # noqa: F401
from tokenkern import methods as M
from tokenkern import reference


def eager_attention(q, k, scale, key_mask=None, causal=False):
    """(B, Hq, Nq, Nk) float64 softmax attention, GQA by repeating key heads."""
    hq, hkv = q.shape[1], k.shape[1]
    logits = (q.double() @ k.double().repeat_interleave(hq // hkv, dim=1).mT) * scale
    nq, nk = q.shape[2], k.shape[2]
    vis = torch.ones(q.shape[0], 1, nq, nk, dtype=torch.bool)
    if key_mask is not None:
        vis = vis & key_mask[:, None, None, :]
    if causal:
        vis = vis & (torch.arange(nk)[None, :] <= nk - nq + torch.arange(nq)[:, None])
    return torch.softmax(logits.masked_fill(~vis, -math.inf), dim=-1).nan_to_num(0.0)


def topk_per_image(scores, image, keep):
    """Reference per-image selection: Python sort per image, ties to the lower position."""
    mask = torch.zeros_like(image, dtype=torch.bool)
    for b in range(image.shape[0]):
        for img in image[b].unique().tolist():
            if img < 0:
                continue
            pos = (image[b] == img).nonzero().flatten().tolist()
            k = M.keep_count(keep, len(pos))
            best = sorted(pos, key=lambda p: (-float(scores[b, p]), p))[:k]
            mask[b, best] = True
    return mask


def decoder_inputs(gen, b=2, hq=4, hkv=2, d=16):
    """Prompts [text][image 24][text 3][image 16][text 6], left-padded: sample s starts with
    5 + 3 s text tokens, so the shorter prompts carry padding in front."""
    prompts = []
    for s in range(b):
        layout = [(-1, 5 + 3 * s), (0, 24), (-1, 3), (1, 16), (-1, 6)]
        prompts.append(torch.cat([torch.full((n,), i) for i, n in layout]))
    length = max(len(p) for p in prompts)
    image = torch.full((b, length), -1)
    valid = torch.zeros(b, length, dtype=torch.bool)
    text = torch.zeros(b, length, dtype=torch.bool)
    for s, p in enumerate(prompts):
        start = length - len(p)
        image[s, start:] = p
        valid[s, start:] = True
        first_image_end = start + (5 + 3 * s) + 24
        text[s, first_image_end:] = p[first_image_end - start :] < 0  # the instruction after the first image
    q = torch.randn(b, hq, length, d, generator=gen) * 2
    k = torch.randn(b, hkv, length, d, generator=gen)
    return M.DecoderLayer(q=q, k=k, scale=d**-0.5, valid=valid, image=image, text=text)


def test_segment_topk_mask_matches_python_sort(gen):
    scores = torch.randint(0, 5, (3, 40), generator=gen).float()
    image = torch.randint(-1, 3, (3, 40), generator=gen)
    for keep in (0.25, 0.5, 3, 1.0):
        assert torch.equal(M.segment_topk_mask(scores, image, keep), topk_per_image(scores, image, keep))


@pytest.mark.parametrize("query", ["last", "text"])
def test_fastv(query, gen):
    layer = decoder_inputs(gen)
    red = M.fastv(layer, M.FastVConfig(keep=0.25, query=query))
    keep, scores = red.keep_mask, red.scores
    att = eager_attention(layer.q, layer.k, layer.scale, key_mask=layer.valid, causal=True)
    if query == "last":
        ref = att[:, :, -1].mean(dim=1)  # left padding: the last position is the last prompt token
    else:
        rows = layer.text & layer.valid
        ref = (att * rows[:, None, :, None]).sum(dim=(1, 2)) / (att.shape[1] * rows.sum(dim=1, keepdim=True))
    assert_rel_close(scores, ref, 1e-5)
    assert torch.equal(keep, topk_per_image(ref, layer.image, 0.25) | (layer.image < 0))
    # With the layer's lse (as FlashAttention returns it) the scores are the same, in one pass.
    layer.lse = reference.attn_lse(layer.q, layer.k, layer.scale, key_mask=layer.valid, causal=True).float()
    scores_lse = M.fastv(layer, M.FastVConfig(keep=0.25, query=query)).scores
    assert_rel_close(scores_lse, ref, 1e-5)


def test_sparsevlm(gen):
    layer = decoder_inputs(gen)
    embeds = torch.randn(2, layer.q.shape[2], 32, generator=gen)
    text_all = (layer.image < 0) & layer.valid
    rmask = M.raters(embeds, layer.image >= 0, text_all)
    for s in range(2):  # raters from their definition
        vis = (layer.image[s] >= 0).nonzero().flatten()
        txt = text_all[s].nonzero().flatten()
        m = torch.softmax(embeds[s, vis].double() @ embeds[s, txt].double().T, dim=-1).mean(dim=0)
        expected = torch.zeros_like(rmask[s])
        expected[txt[m > m.mean()]] = True
        assert torch.equal(rmask[s], expected)
    red = M.sparsevlm(layer, rmask, M.SparseVLMConfig(keep=0.5))
    keep, scores = red.keep_mask, red.scores
    att = eager_attention(layer.q, layer.k, layer.scale, key_mask=layer.valid, causal=True)
    rows = rmask & layer.valid
    ref = (att * rows[:, None, :, None]).sum(dim=(1, 2)) / (att.shape[1] * rows.sum(dim=1, keepdim=True))
    assert_rel_close(scores, ref, 1e-5)
    assert torch.equal(keep, topk_per_image(ref, layer.image, 0.5) | (layer.image < 0))


def vision_inputs(gen, b=2, heads=4, n=64, d=16, c=32):
    q = torch.randn(b, heads, 1 + n, d, generator=gen) * 2
    k = torch.randn(b, heads, 1 + n, d, generator=gen)
    feats = torch.randn(b, n, c, generator=gen)
    return M.VisionLayer(q=q, k=k, scale=d**-0.5), feats


def eager_cls_attention(layer):
    return eager_attention(layer.q[:, :, :1], layer.k, layer.scale)[:, :, 0, 1:].mean(dim=1)


def test_fastervlm(gen):
    layer, feats = vision_inputs(gen)
    red = M.fastervlm(feats, layer, M.FasterVLMConfig(keep=16))
    ref = eager_cls_attention(layer)
    assert_rel_close(red.scores, ref, 1e-5)
    idx = ref.argsort(dim=1, descending=True, stable=True)[:, :16].sort(dim=1).values
    assert torch.equal(red.indices, idx)
    assert torch.equal(red.tokens, feats.gather(1, idx[..., None].expand(-1, -1, feats.shape[-1])))


def test_visionzip(gen):
    layer, feats = vision_inputs(gen, n=100)
    cfg = M.VisionZipConfig(keep=20, contextual_fraction=0.25)
    red = M.visionzip(feats, layer, cfg)
    att = eager_cls_attention(layer) * layer.q.shape[1]  # VisionZip sums over heads
    keys = layer.k[:, :, 1:].double().mean(dim=1)
    for s in range(feats.shape[0]):
        dominant = att[s].argsort(descending=True, stable=True)[:15].sort().values
        rest = torch.tensor([i for i in range(100) if i not in set(dominant.tolist())])
        step = max(1, len(rest) // 5)
        targets = rest[torch.arange(0, len(rest), step)[:5]]
        sources = rest[~torch.isin(rest, targets)]
        kn = keys[s] / keys[s].norm(dim=-1, keepdim=True)
        assign = (kn[sources] @ kn[targets].T).argmax(dim=-1)
        ctx = []
        for t in range(5):
            joined = sources[assign == t]
            add = feats[s, joined].double().mean(dim=0) if len(joined) else 0.0
            ctx.append(feats[s, targets[t]].double() + add)
        idx = torch.cat([dominant, targets])
        tokens = torch.cat([feats[s, dominant].double(), torch.stack(ctx)])
        order = idx.argsort()
        assert torch.equal(red.indices[s], idx[order])
        assert_rel_close(red.tokens[s], tokens[order], 1e-5)


def test_prumerge_plus(gen):
    """The lattice option (the default, the released stride rule, is in test_fidelity_prumerge):
    keep=20 with the extra token is 19 merged patches plus the extra token at the last pruned
    position."""
    layer, feats = vision_inputs(gen, n=81)
    cfg = M.PruMergeConfig(keep=20, neighbours=6, extra_token=True, samples="lattice")
    red = M.prumerge_plus(feats, layer, cfg)
    extra = red.extra
    # PruMerge's attention: one softmax of full-width (all heads side by side) q.k / sqrt(C).
    q_full = layer.q.double().transpose(1, 2).flatten(2)  # (B, 1 + N, C)
    k_full = layer.k.double().transpose(1, 2).flatten(2)
    attn = torch.softmax(q_full[:, 0:1] @ k_full.mT / math.sqrt(k_full.shape[-1]), dim=-1)[:, 0, 1:]
    assert not torch.allclose(attn, eager_cls_attention(layer).double(), atol=1e-3)  # not the head mean
    keys = k_full[:, 1:]
    for s in range(feats.shape[0]):
        a = attn[s].numpy()
        q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
        outlier = a > q3 + 1.5 * (q3 - q1)
        uniform = set(M.baselines.uniform_positions(81, 19).tolist())
        tier = [2 if outlier[i] else (1 if i in uniform else 0) for i in range(81)]
        chosen = sorted(sorted(range(81), key=lambda i: (-tier[i], -a[i], i))[:19])
        pruned = [i for i in range(81) if i not in chosen]
        assert red.indices[s].tolist() == sorted([*chosen, pruned[-1]])
        kn = keys[s] / keys[s].norm(dim=-1, keepdim=True)
        rows = {}
        for i in chosen:
            sim = kn @ kn[i]
            sim[i] = -math.inf
            nbrs = sim.argsort(descending=True, stable=True)[:6]
            rows[i] = feats[s, i].double() + (attn[s, nbrs, None] * feats[s, nbrs].double()).sum(dim=0)
        rows[pruned[-1]] = (attn[s, pruned, None] * feats[s, pruned].double()).sum(dim=0)
        assert_rel_close(red.tokens[s], torch.stack([rows[i] for i in red.indices[s].tolist()]), 1e-5)
        assert_rel_close(extra[s, 0], rows[pruned[-1]], 1e-5)


def test_ficoco_v(gen):
    layer, feats = vision_inputs(gen, n=49)
    # The kept-targets variant without the window penalty (the released defaults: test_fidelity_ficoco.py).
    cfg = M.FiCoCoVConfig(keep=30, topk=2, local_penalty=False, targets="kept")
    red = M.ficoco_v(feats, layer, cfg)
    logits = ((layer.q.double() @ layer.k.double().mT) * layer.scale).mean(dim=1)  # (B, 50, 50)
    for s in range(feats.shape[0]):
        c, p = logits[s, 0, 1:], logits[s, 1:, 1:].mean(dim=-1)
        score = 0.35 * c / c.norm() - 0.65 * p / p.norm()
        kept = score.argsort(descending=True, stable=True)[:30].sort().values
        assert torch.equal(red.indices[s], kept)
        probs = torch.softmax(logits[s, 1:], dim=-1)[:, 1:]  # softmax over all keys, patch columns
        acc = feats[s, kept].double().clone()
        wsum = torch.ones(30, dtype=torch.float64)
        for i in sorted(set(range(49)) - set(kept.tolist())):
            row = probs[i, kept]
            top = row.argsort(descending=True, stable=True)[:2]
            w = row[top] / row[top].sum()
            acc[top] += w[:, None] * feats[s, i].double()
            wsum[top] += w
        assert_rel_close(red.tokens[s], acc / wsum[:, None], 1e-5)


def test_ficoco_l(gen):
    b, h, v, t, d = 2, 4, 40, 9, 16
    visual = torch.randn(b, v, 24, generator=gen)
    q, k = torch.randn(b, h, v, d, generator=gen), torch.randn(b, h, v, d, generator=gen)
    qt, kt = torch.randn(b, h, t, d, generator=gen), torch.randn(b, h, t, d, generator=gen)
    scale = d**-0.5
    # The softmax-correlate, kept-targets variant (the released defaults: test_fidelity_ficoco.py).
    cfg = M.FiCoCoLConfig(keep=25, topk=3, correlate="softmax", targets="kept", protect_first=False)
    red = M.ficoco_l_tokens(visual, q, k, qt, kt, scale, cfg)

    def logits(a, c):
        return ((a.double() @ c.double().mT) * scale).mean(dim=1)

    a_vv, a_vt, a_tv = logits(q, k), logits(q, kt), logits(qt, k)
    for s in range(b):
        score = 0.6 * a_vv[s].sum(dim=-1) - 0.4 * a_vt[s].mean(dim=-1)
        kept = score.argsort(stable=True)[:25].sort().values  # the least redundant
        assert torch.equal(red.indices[s], kept)
        corr = 0.6 * a_vv[s] + 0.4 * torch.softmax(a_vt[s], dim=-1) @ torch.softmax(a_tv[s], dim=-1)
        probs = torch.softmax(corr, dim=-1)
        out = visual[s, kept].double().clone()
        for i in sorted(set(range(v)) - set(kept.tolist())):
            row = probs[i, kept]
            top = row.argsort(descending=True, stable=True)[:3]
            out[top] += (row[top] / row[top].sum())[:, None] * visual[s, i].double()
        assert_rel_close(red.tokens[s], out, 1e-5)
    # GQA: keys with H/2 heads read as each key head repeated for its two query heads.
    k2, kt2 = k[:, ::2], kt[:, ::2]
    gqa = M.ficoco_l_tokens(visual, q, k2, qt, kt2, scale, M.FiCoCoLConfig(keep=25, topk=3))
    mha = M.ficoco_l_tokens(visual, q, k2.repeat_interleave(2, 1), qt, kt2.repeat_interleave(2, 1), scale,
                            M.FiCoCoLConfig(keep=25, topk=3))  # fmt: skip
    assert torch.equal(gqa.indices, mha.indices) and torch.equal(gqa.tokens, mha.tokens)


def test_lofi_keeps_the_exact_leverage_top_k(gen):
    from testing import gapped_matrix, same_sets, separated_k

    x64, exact = gapped_matrix(1, 200, 64, rank=32, gen=gen)
    k = separated_k(exact[0], 1e-3 * exact.max().item(), near=50)
    red = M.lofi(x64.float(), M.LoFiConfig(keep=k))
    assert same_sets(red.indices, reference.topk_gather(exact.float(), x64.float(), k)[1])


def test_tome_step_matches_bipartite_rule(gen):
    x = torch.randn(2, 65, 32, generator=gen)
    keys = torch.randn(2, 65, 16, generator=gen)
    size = torch.ones(2, 65)
    red = M.tome_merge(x, keys, size, M.ToMeConfig(r=10))
    out, new_size = red.tokens, red.sizes
    ref, ref_size = reference.bipartite_merge(x, keys, 10, size, protect_first=True)
    assert_rel_close(out, ref, 1e-5)
    assert_rel_close(new_size, ref_size, 1e-7)
    assert torch.equal(out[:, 0], x[:, 0])  # [CLS] protected


@pytest.mark.parametrize(
    ("n", "protect", "left"), [(5, False, 3), (6, False, 3), (5, True, 3), (6, True, 4), (1, False, 1)]
)
def test_tome_caps_r_at_half_of_the_unprotected_tokens(n, protect, left, gen):
    """ToMe's r = min(r, (N - protected) // 2): a large r leaves ceil((N - protected) / 2)
    tokens plus [CLS]."""
    x = torch.randn(2, n, 8, generator=gen)
    red = M.tome_merge(
        x, torch.randn(2, n, 4, generator=gen), torch.ones(2, n), M.ToMeConfig(r=50, protect_cls=protect)
    )
    out, size = red.tokens, red.sizes
    assert out.shape == (2, left, 8) and torch.equal(size.sum(-1), torch.full((2,), float(n)))


def test_baselines(gen):
    x = torch.randn(3, 100, 8, generator=gen)
    a = M.random_select(x, M.RandomConfig(keep=0.1, seed=4))
    b = M.random_select(x, M.RandomConfig(keep=0.1, seed=4))
    c = M.random_select(x, M.RandomConfig(keep=0.1, seed=5))
    assert torch.equal(a.indices, b.indices) and not torch.equal(a.indices, c.indices)
    gen4 = torch.Generator().manual_seed(4)
    d = M.random_select(x, M.RandomConfig(keep=0.1), generator=gen4)  # a caller's generator
    e = M.random_select(x, M.RandomConfig(keep=0.1), generator=gen4)  # advances: a new draw
    assert torch.equal(d.indices, a.indices) and not torch.equal(d.indices, e.indices)
    assert a.indices.shape == (3, 10) and bool((a.indices[:, 1:] > a.indices[:, :-1]).all())
    u = M.uniform_select(x, M.UniformConfig(keep=4))
    assert u.indices.tolist() == [[22, 27, 72, 77]] * 3  # a 2 x 2 lattice on the 10 x 10 grid
    line = M.uniform_select(x[:, :99], M.UniformConfig(keep=4))
    assert line.indices.tolist() == [[12, 37, 61, 86]] * 3  # not a grid: evenly spaced in order


def test_keep_count_rules():
    assert M.keep_count(0.25, 576) == 144 and M.keep_count(64, 576) == 64 and M.keep_count(1000, 576) == 576
    assert M.keep_count(0.001, 10) == 1
    for bad in (0.0, 1.5, 0, -3, True, "half"):
        with pytest.raises(ValueError, match="keep"):
            M.keep_count(bad, 10)
