"""Each published merge rule, written here from the method's own definition, equals
merge_tokens / bipartite_merge called with the documented arguments (see the docstring of
tokenkern.merge_tokens). Run on every available device."""

import math

import pytest
import torch
from testing import HAS_CUDA, assert_rel_close

import tokenkern  # noqa: F401  (registers the ops)

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def _on(device, *ts):
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in ts]


def _unit(t):
    return t / t.norm(dim=-1, keepdim=True)


# ------------------------------------------------------------------------------- ToMe


def tome_merge_wavg(x, metric, r, size, class_token):
    """ToMe: bipartite soft matching on even/odd tokens, the r best edges merge by
    size-weighted average; output [unmerged A, B]. Returns the output, its sizes and the
    source index (in x) of each unmerged-A row."""
    m = _unit(metric.double())
    a, b = m[:, ::2], m[:, 1::2]
    scores = a @ b.mT
    if class_token:
        scores[:, 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)
    unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
    if class_token:
        unm_idx = unm_idx.sort(dim=1).values
    dst_idx = node_idx.gather(1, src_idx)

    def merge(t):
        src, dst = t[:, ::2], t[:, 1::2]
        unm = src.gather(1, unm_idx[..., None].expand(-1, -1, t.shape[-1]))
        moved = src.gather(1, src_idx[..., None].expand(-1, -1, t.shape[-1]))
        dst = dst.scatter_reduce(1, dst_idx[..., None].expand(-1, -1, t.shape[-1]), moved, reduce="sum")
        return torch.cat([unm, dst], dim=1)

    s = size.double()[..., None]
    merged_x = merge(x.double() * s)
    merged_s = merge(s)
    return merged_x / merged_s, merged_s[..., 0], 2 * unm_idx


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("class_token", [True, False])
def test_tome_bipartite_soft_matching(device, class_token, gen):
    b, n, r = 2, 197, 16  # ViT-B/16 with [CLS]
    x = torch.randn(b, n, 64, generator=gen)
    keys = torch.randn(b, n, 32, generator=gen)
    size = torch.randint(1, 4, (b, n), generator=gen).float()
    ref, ref_size, unm_src = tome_merge_wavg(x, keys, r, size, class_token)
    out, out_size = (t.cpu() for t in torch.ops.tokenkern.bipartite_merge(*_on(device, x, keys, r, size, class_token)))
    if not class_token:  # ToMe leaves the unmerged A tokens in similarity order; ours are by position
        n_unm = unm_src.shape[1]
        order = unm_src.argsort(dim=1)
        ref = torch.cat([ref[:, :n_unm].gather(1, order[..., None].expand(-1, -1, 64)), ref[:, n_unm:]], dim=1)
        ref_size = torch.cat([ref_size[:, :n_unm].gather(1, order), ref_size[:, n_unm:]], dim=1)
    assert_rel_close(out, ref, 1e-5)
    assert_rel_close(out_size, ref_size, 1e-7)


# -------------------------------------------------------------------------- VisionZip


def visionzip_contextual(hidden, keys, contextual):
    """VisionZip: among the non-dominant tokens, `contextual` targets at a uniform step; every
    other token joins its most key-similar target; a contextual token is the target plus the
    mean of the tokens that joined it."""
    b, r, _ = hidden.shape
    step = max(1, r // contextual)
    targets = torch.arange(0, r, step)[:contextual]
    is_target = torch.zeros(r, dtype=torch.bool)
    is_target[targets] = True
    sources = (~is_target).nonzero().flatten()
    k = _unit(keys.double())
    out = []
    for i in range(b):
        sim = k[i, sources] @ k[i, targets].T
        assign = sim.argmax(dim=-1)
        onehot = torch.nn.functional.one_hot(assign, len(targets)).double()
        counts = onehot.sum(0).clamp(min=1)
        agg = (onehot.T @ hidden[i, sources].double()) / counts[:, None]
        out.append(hidden[i, targets].double() + agg)
    return torch.stack(out), targets


@pytest.mark.parametrize("device", DEVICES)
def test_visionzip_contextual_tokens(device, gen):
    b, remaining, contextual = 2, 576 - 53, 10  # 54 dominant (incl. [CLS]) of 577
    hidden = torch.randn(b, remaining, 1024, generator=gen)
    keys = torch.randn(b, remaining, 64, generator=gen)
    ref, targets = visionzip_contextual(hidden, keys, contextual)
    keep = targets.expand(b, -1).contiguous()
    merged, _ = torch.ops.tokenkern.merge_tokens(*_on(device, hidden, keep, keys), combine="add_mean")
    assert_rel_close(merged.cpu(), ref, 1e-5)


# ------------------------------------------------------------------------- PruMerge+


def prumerge_knn(x, keys, attn, keep, k):
    """PruMerge: every kept token adds its k most key-similar other tokens (kept or pruned),
    each weighted by its [CLS] attention: x_i + sum_j attn_j x_j."""
    kk = _unit(keys.double())
    out = []
    for s in range(x.shape[0]):
        rows = []
        for i in keep[s].tolist():
            sim = kk[s] @ kk[s, i]
            sim[i] = -math.inf
            nbrs = sim.argsort(descending=True, stable=True)[:k]
            rows.append(x[s, i].double() + (attn[s, nbrs].double()[:, None] * x[s, nbrs].double()).sum(0))
        out.append(torch.stack(rows))
    return torch.stack(out)


@pytest.mark.parametrize("device", DEVICES)
def test_prumerge_plus_knn_merge(device, gen):
    b, n, k = 2, 576, 32
    x = torch.randn(b, n, 128, generator=gen)
    keys = torch.randn(b, n, 64, generator=gen)
    attn = torch.softmax(torch.randn(b, n, generator=gen) * 3, dim=-1)
    keep = torch.stack([torch.randperm(n, generator=gen)[:40].sort().values for _ in range(b)])
    ref = prumerge_knn(x, keys, attn, keep, k)
    # a = 1/k (uniform), so weight = k * attn gives coefficients attn_j.
    merged, _ = torch.ops.tokenkern.merge_tokens(
        *_on(device, x, keep, keys, k * attn), topm=k, combine="sum", assign="kept"
    )
    assert_rel_close(merged.cpu(), ref, 1e-5)


# ----------------------------------------------------------------------------- FiCoCo


def ficoco_compress(x, corr, keep, k, combine):
    """FiCoCo: each discarded token spreads over its k most correlated kept tokens with
    weights softmax(corr) renormalized over those k; compress: (x_t + sum w x_s) / (1 + sum w)
    (FiCoCo-V) or x_t + sum w x_s (FiCoCo-L)."""
    out = []
    for s in range(x.shape[0]):
        n = x.shape[1]
        kept = keep[s]
        dropped = [i for i in range(n) if i not in set(kept.tolist())]
        p = torch.softmax(corr[s].double(), dim=-1)
        acc = torch.zeros(len(kept), x.shape[2], dtype=torch.float64)
        wsum = torch.zeros(len(kept), dtype=torch.float64)
        for i in dropped:
            row = p[i, kept]
            top = row.argsort(descending=True, stable=True)[:k]
            w = row[top] / row[top].sum()
            acc[top] += w[:, None] * x[s, i].double()
            wsum[top] += w
        xt = x[s, kept].double()
        out.append((xt + acc) / (1 + wsum)[:, None] if combine == "mean" else xt + acc)
    return torch.stack(out)


@pytest.mark.parametrize("device", DEVICES)
def test_ficoco_v_correlate_compress(device, gen):
    b, n, heads, hd, k = 2, 145, 4, 16, 2
    x = torch.randn(b, n, 96, generator=gen)
    q = torch.randn(b, heads, n, hd, generator=gen)
    kk = torch.randn(b, heads, n, hd, generator=gen)
    scale = hd**-0.5
    corr = (q @ kk.mT * scale).mean(1)  # head-mean attention logits
    keep = torch.stack([torch.randperm(n, generator=gen)[:103].sort().values for _ in range(b)])
    ref = ficoco_compress(x, corr, keep, k, "mean")
    # Logits as a dot product: query_metric = concat_h(q_h) * scale / H, metric = concat_h(k_h).
    qm = q.transpose(1, 2).flatten(2) * scale / heads
    km = kk.transpose(1, 2).flatten(2)
    merged, _ = torch.ops.tokenkern.merge_tokens(
        *_on(device, x, keep, km), query_metric=qm.to(device), topm=k, temperature=1.0, combine="mean"
    )
    assert_rel_close(merged.cpu(), ref, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_ficoco_l_correlate_compress(device, gen):
    b, v, t, heads, hd, k = 1, 64, 12, 4, 16, 3
    x = torch.randn(b, v, 80, generator=gen)
    q = torch.randn(b, heads, v + t, hd, generator=gen)
    kk = torch.randn(b, heads, v + t, hd, generator=gen)
    logits = (q @ kk.mT * hd**-0.5).mean(1)
    a_vv = logits[:, :v, :v]
    a_vt = torch.softmax(logits, dim=-1)[:, :v, v:]
    a_tv = torch.softmax(logits, dim=-1)[:, v:, :v]
    corr = 0.6 * a_vv + 0.4 * (a_vt @ a_tv)
    keep = torch.stack([torch.randperm(v, generator=gen)[:50].sort().values for _ in range(b)])
    ref = ficoco_compress(x, corr, keep, k, "sum")
    qv = q[:, :, :v].transpose(1, 2).flatten(2) * hd**-0.5 / heads
    kv = kk[:, :, :v].transpose(1, 2).flatten(2)
    qm = torch.cat([0.6 * qv, 0.4 * a_vt], dim=-1)  # corr[i, j] = qm[i] . km[j]
    km = torch.cat([kv, a_tv.mT], dim=-1)
    merged, _ = torch.ops.tokenkern.merge_tokens(
        *_on(device, x, keep, km), query_metric=qm.to(device), topm=k, temperature=1.0, combine="sum"
    )
    assert_rel_close(merged.cpu(), ref, 1e-5)
