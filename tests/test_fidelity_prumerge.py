"""PruMerge+'s default equals the released LLaVA-PruMerge+ rule (its CLIP tower's
token_prune_merge_advanced_plus), restated below for one image in float64 with plain loops.

Float32 rounding of tokenkern's attention and key similarities can flip a decision whose
margin is below that rounding, so each draw of random inputs is redrawn until every decision
(outlier threshold, neighbour sets, fill order) clears the rounding bound; the bounds come
from the length of the sums involved.
"""

from __future__ import annotations

import itertools
import math
import re
from typing import NamedTuple

import numpy as np
import pytest
import torch
from testing import HAS_CUDA
from torch import Tensor

import tokenkern
import tokenkern.methods as M

U = 2.0**-24  # float32 unit roundoff
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


class Released(NamedTuple):
    kept: list[int]  # the released order: outliers by attention, then samples
    merged: Tensor  # (count, D)
    extra: Tensor  # (D,)
    attn: Tensor  # (N,)
    threshold: float
    sim: Tensor  # (count, N) cosine of each kept patch's key with every patch's (-inf at itself)
    neighbours: int
    key_width: int  # C


def released_rule(q: Tensor, k: Tensor, x: Tensor, neighbours: int = 32) -> Released:
    """One image. q, k: (1 + N, C) the scoring layer's q_proj / k_proj outputs ([CLS] first),
    x: (N, D) patch features, float64. Samples run below N - 1 (the released 575 of 576
    patches) and at most N - 1 neighbours (the released 32 of 575)."""
    n, c = x.shape[0], q.shape[1]
    attn = torch.softmax(q[0] @ k.T / math.sqrt(c), dim=0)[1:]
    a = attn.numpy()
    q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
    threshold = float(q3 + 1.5 * (q3 - q1))
    ratio = int((a > threshold).sum()) / n
    assert ratio > 0, "the released rule divides by the outlier ratio"
    top = sorted(range(n), key=lambda i: -a[i])[: int(n * ratio)]
    stride = int(int(1 / ratio) / 3)
    assert stride >= 1, "the released rule needs a stride of at least 1"
    kept = top + [p for p in range(0, n - 1, stride) if p not in top]
    unit = k[1:] / k[1:].norm(dim=1, keepdim=True)
    sim = unit[kept] @ unit.T
    sim[range(len(kept)), kept] = -math.inf
    m = min(neighbours, n - 1)
    nbrs = sim.argsort(dim=1, descending=True)[:, :m]
    pull = torch.zeros(len(kept), n, dtype=x.dtype).scatter_(1, nbrs, attn[nbrs])
    merged = x[kept] + pull @ x
    pruned = torch.ones(n, dtype=torch.bool)
    pruned[kept] = False
    extra = (attn * pruned) @ x
    return Released(kept, merged, extra, attn, threshold, sim, m, k.shape[1])


def attention_bound(q: Tensor, k: Tensor) -> float:
    """Relative error bound of float32 full-width [CLS] attention: each logit is a C-term dot
    product (rounding ~ sqrt(C) u sum |q_i k_i|), the normalizer shifts all by at most the
    largest, plus the exp and division."""
    c = q.shape[1]
    logit = math.sqrt(c) * U * float((q[0].abs() @ k.abs().T).max()) / math.sqrt(c)
    return 2 * logit + 8 * U


def similarity_bound(c: int) -> float:
    """Absolute error bound of a float32 cosine of two C-wide rows (dot of unit vectors plus
    the normalization)."""
    return 2 * math.sqrt(c) * U + 8 * U


def threshold_clear(ref: Released, eps_a: float) -> bool:
    """No patch's attention is within rounding of the outlier threshold (each attention is off
    by eps_a relative at most, so each order statistic and quartile too)."""
    a = ref.attn.numpy()
    q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
    slack = eps_a * (a + 2.5 * q3 + 1.5 * q1) + 8 * U * ref.threshold
    return bool((np.abs(a - ref.threshold) > slack).all())


def draw(gen, n, heads, d, width, spread=1.0, tries=40):
    """Random q, k (1 + N, heads d) and features (N, width), float32, inside the released
    rule's domain, whose outlier decisions clear the rounding; spread scales the logits."""
    for _ in range(tries):
        q = torch.randn(1 + n, heads * d, generator=gen) * spread
        k = torch.randn(1 + n, heads * d, generator=gen)
        x = torch.randn(n, width, generator=gen)
        try:
            ref = released_rule(q.double(), k.double(), x.double())
        except AssertionError:  # outside the released rule's domain (no outlier, or stride 0)
            continue
        eps_a = attention_bound(q.double(), k.double())
        if threshold_clear(ref, eps_a):
            return q, k, x, ref, eps_a
    raise AssertionError(f"no draw in {tries} cleared the rounding bounds")


def vision_layer(q, k, heads, device="cpu"):
    """(1 + N, C) q_proj / k_proj outputs -> VisionLayer with (1, H, 1 + N, d)."""
    length, c = q.shape

    def split(t):
        return t.reshape(1, length, heads, c // heads).transpose(1, 2).to(device)

    return M.VisionLayer(q=split(q), k=split(k), scale=(c // heads) ** -0.5)


def neighbour_sets(sim: Tensor, m: int, eps: float):
    """The m-neighbour sets a rounding of every similarity by up to eps can pick:
    (certain members, ambiguous candidates, how many of them are picked)."""
    s = sim.sort().values
    above_low = len(s) - torch.searchsorted(s, sim - 2 * eps, right=True)  # incl. itself
    above_high = len(s) - torch.searchsorted(s, sim + 2 * eps, right=True)
    finite = torch.isfinite(sim)
    certain = (finite & (above_low - 1 < m)).nonzero().flatten().tolist()
    out = ~finite | (above_high >= m)
    ambiguous = [j for j in (~out).nonzero().flatten().tolist() if j not in certain]
    return certain, ambiguous, m - len(certain)


def check_merged_row(out: Tensor, x: Tensor, ref: Released, row: int, eps_a: float) -> None:
    """out (D,) is x_i + sum a_j x_j over one neighbour set that the rounding allows."""
    i, m = ref.kept[row], ref.neighbours
    certain, ambiguous, t = neighbour_sets(ref.sim[row], m, similarity_bound(ref.key_width))
    choices = list(itertools.combinations(ambiguous, t))
    assert 1 <= len(choices) <= 10_000, (i, len(ambiguous), t)
    norms = x.norm(dim=1)
    best = math.inf
    for extra in choices:
        nbrs = certain + list(extra)
        value = x[i] + (ref.attn[nbrs, None] * x[nbrs]).sum(dim=0)
        pulled = float((ref.attn[nbrs] * norms[nbrs]).sum())
        bound = (eps_a + (m + 2) * U) * pulled + (m + 2) * U * float(norms[i])
        best = min(best, float((out - value).norm()) / bound)
    assert best <= 1.0, (i, best)


def check_against_released(red, extra, x, ref: Released, eps_a: float, row: int = 0) -> None:
    """red: tokenkern's Reduction, batch row `row`; x: (N, D) float64 features."""
    n, m = x.shape[0], ref.neighbours
    pruned = sorted(set(range(n)) - set(ref.kept))
    idx = red.indices[row].cpu()
    if not pruned:  # the released set covers every patch: no extra token (documented)
        assert extra is None and idx.tolist() == list(range(n))
        order = torch.tensor(ref.kept).argsort()  # released row of each position
        tokens = red.tokens[row].cpu().double()
        err = (tokens - ref.merged[order]).norm(dim=1)
        norms = x.norm(dim=1)
        nbrs = ref.sim.argsort(dim=1, descending=True)[:, :m]
        pulled = (ref.attn[nbrs] * norms[nbrs]).sum(dim=1)[order]
        bound = (eps_a + (m + 2) * U) * pulled + (m + 2) * U * norms
        for r in (err > bound).nonzero().flatten().tolist():  # a neighbour set within rounding of a tie
            check_merged_row(tokens[r], x, ref, int(order[r]), eps_a)
        return
    slot = pruned[-1]
    assert idx.tolist() == sorted([*ref.kept, slot])  # the released set plus the extra token's slot
    where = torch.searchsorted(idx, torch.tensor(ref.kept))
    tokens = red.tokens[row].cpu().double()
    at_kept = tokens[where]
    err = (at_kept - ref.merged).norm(dim=1)
    norms = x.norm(dim=1)
    nbrs = ref.sim.argsort(dim=1, descending=True)[:, :m]
    pulled = (ref.attn[nbrs] * norms[nbrs]).sum(dim=1)
    bound = (eps_a + (m + 2) * U) * pulled + (m + 2) * U * norms[ref.kept]
    for r in (err > bound).nonzero().flatten().tolist():  # a neighbour set within rounding of a tie
        check_merged_row(at_kept[r], x, ref, r, eps_a)
    slot_token = tokens[idx.tolist().index(slot)]
    err_extra = float((slot_token - ref.extra).norm())
    bound_extra = (eps_a + (len(pruned) + 2) * U) * float((ref.attn[pruned] * norms[pruned]).sum())
    assert err_extra <= bound_extra, (err_extra, bound_extra)
    assert torch.equal(extra[row, 0].cpu().double(), slot_token)


SHAPES = [  # N, heads, head dim, feature width
    (576, 16, 64, 1024),  # LLaVA-1.5's CLIP ViT-L/14-336: 576 patches + [CLS], 1024 wide, 16 heads
    (257, 5, 16, 96),
    (35, 3, 20, 48),
    (20, 4, 8, 40),  # fewer than 32 other patches: every other patch is a neighbour
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spread", [1.0, 2.0])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_default_is_the_released_rule(device, shape, spread, gen):
    n, heads, d, width = shape
    q, k, x, ref, eps_a = draw(gen, n, heads, d, width, spread)
    red = M.prumerge_plus(x[None].to(device), vision_layer(q, k, heads, device), M.PruMergeConfig())
    extra = red.extra
    check_against_released(red, extra, x.double(), ref, eps_a)
    assert red.indices.shape[1] == len(ref.kept) + (1 if len(ref.kept) < n else 0)
    assert int(M.adaptive_count(red.scores)[0]) == len(ref.kept)


def test_batch_rows_are_the_released_sets_filled_by_attention(gen):
    """A batch gets its largest count: each row holds its image's released set (merged as
    released), then its next patches by attention, then the extra token."""
    n, heads, d, width = 576, 16, 64, 1024
    draws = [draw(gen, n, heads, d, width, spread) for spread in (1.0, 1.5, 2.0)]
    q = torch.stack([dr[0] for dr in draws])
    k = torch.stack([dr[1] for dr in draws])
    x = torch.stack([dr[2] for dr in draws])
    split = lambda t: t.reshape(3, 1 + n, heads, d).transpose(1, 2)  # noqa: E731
    layer = M.VisionLayer(q=split(q), k=split(k), scale=d**-0.5)
    red = M.prumerge_plus(x, layer, M.PruMergeConfig())
    extra = red.extra
    counts = [len(dr[3].kept) for dr in draws]
    assert red.indices.shape[1] == max(counts) + 1
    for b, (_, _, xb, ref, eps_a) in enumerate(draws):
        kept, attn = ref.kept, ref.attn
        row = set(red.indices[b].tolist())
        assert set(kept) <= row
        slot = [int(i) for i, t in zip(red.indices[b], red.tokens[b], strict=True) if torch.equal(t, extra[b, 0])]
        assert len(slot) == 1
        fill = sorted(row - set(kept) - set(slot))
        assert len(fill) == max(counts) - counts[b]
        assert slot[0] == max(set(range(n)) - set(kept) - set(fill))
        if fill:  # the fill is the best-attended of the others, up to rounding
            rest = [j for j in range(n) if j not in row]
            lo, hi = float(attn[fill].min()), float(attn[rest].max())
            assert lo >= hi * (1 - 2 * eps_a), (lo, hi)
        if counts[b] == max(counts):
            check_against_released(red, extra, xb.double(), ref, eps_a, row=b)


def test_fixed_keep_takes_outliers_then_samples_then_attention(gen):
    """A fixed count (sync-free) with the released groups: at the released count plus one it is
    the default; smaller, the outliers come first, then the best-attended samples."""
    n, heads, d, width = 576, 16, 64, 1024
    q, k, x, ref, eps_a = draw(gen, n, heads, d, width)
    layer = vision_layer(q, k, heads)
    kept, attn = ref.kept, ref.attn
    red = M.prumerge_plus(x[None], layer, M.PruMergeConfig(keep=len(kept) + 1))
    extra = red.extra
    check_against_released(red, extra, x.double(), ref, eps_a)
    outliers = [i for i in kept if float(attn[i]) > ref.threshold]
    samples = [i for i in kept if i not in outliers]
    keep = len(outliers) + len(samples) // 2
    red = M.prumerge_plus(x[None], layer, M.PruMergeConfig(keep=keep + 1))
    row = red.indices[0].tolist()
    assert len(row) == keep + 1 and set(outliers) <= set(row)
    chosen = [i for i in row if i in samples]
    dropped = [i for i in samples if i not in row]
    assert len(chosen) == keep - len(outliers)
    assert float(attn[chosen].min()) >= float(attn[dropped].max()) * (1 - 2 * eps_a)


def test_keep_everything_still_merges(gen):
    """keep=1.0: every patch is kept and still adds its neighbours (no extra token);
    neighbours=0 returns the features unchanged."""
    n, heads, d, width = 35, 3, 20, 48
    q, k, x, _, _ = draw(gen, n, heads, d, width)
    layer = vision_layer(q, k, heads)
    red = M.prumerge_plus(x[None], layer, M.PruMergeConfig(keep=1.0))
    extra = red.extra
    assert extra is None and red.indices[0].tolist() == list(range(n))
    assert not torch.allclose(red.tokens, x[None])
    red = M.prumerge_plus(x[None], layer, M.PruMergeConfig(keep=1.0, neighbours=0))
    extra = red.extra
    assert extra is None and torch.equal(red.tokens, x[None])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("keep", 0, "keep must be a fraction in (0, 1] (float) or a token count >= 1 (int), got 0"),
        ("keep", 1.5, "keep must be a fraction in (0, 1] (float) or a token count >= 1 (int), got 1.5"),
        ("keep", True, "keep must be a fraction in (0, 1] (float) or a token count >= 1 (int), got True"),
        ("neighbours", -1, "neighbours must be an int >= 0, got -1"),
        ("neighbours", 2.0, "neighbours must be an int >= 0, got 2.0"),
        ("layer", "last", "layer must be an int, got 'last'"),
        ("extra_token", 1, "extra_token must be a bool, got 1"),
        ("samples", "grid", "samples must be one of ('stride', 'lattice'), got 'grid'"),
    ],
)
def test_bad_config_fields(field, value, message):
    with pytest.raises(ValueError, match=f"^{re.escape('tokenkern.prumerge+: ' + message)}$"):
        M.PruMergeConfig(**{field: value})


def test_prune_default_is_the_released_rule_per_image(gen):
    """tokenkern.prune(model, "prumerge+") on a LLaVA-1.5 model: each image of a batch gets its
    own released set and merged tokens (the extra token at its slot), from the q/k of the last
    CLIP layer and the projector's input."""
    import transformers

    from tokenkern.integrations.adapters import clip_layers, parts_of

    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=56, patch_size=7)  # fmt: skip
    text = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=128, bos_token_id=1, eos_token_id=2,
                                    pad_token_id=0)  # fmt: skip
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=127,
                                   vision_feature_layer=-2)  # fmt: skip
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    parts = parts_of(model)
    attn = clip_layers(parts.clip_tower)[-1].self_attn
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        attn.q_proj.register_forward_hook(lambda m, a, o: seen.__setitem__("q", o)),
        attn.k_proj.register_forward_hook(lambda m, a, o: seen.__setitem__("k", o)),
        parts.projector.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0])),
    ]
    n = 64
    for _ in range(40):  # pixels whose released decisions clear the rounding, for both images
        pixels = torch.randn(2, 3, 56, 56, generator=gen) * 3
        with torch.no_grad():
            model.model.get_image_features(pixel_values=pixels, vision_feature_layer=-2,
                                           vision_feature_select_strategy="default")  # fmt: skip
        refs = []
        for b in range(2):
            q, k, x = seen["q"][b].double(), seen["k"][b].double(), seen["x"][b].double()
            try:
                ref = released_rule(q, k, x)
            except AssertionError:
                break  # outside the released rule's domain (no outlier, or stride 0)
            eps_a = attention_bound(q, k)
            if not threshold_clear(ref, eps_a):
                break
            refs.append((x, ref, eps_a))
        if len(refs) == 2:
            break
    else:
        raise AssertionError("no pixel draw cleared the rounding bounds")
    for h in hooks:
        h.remove()
    got = {}
    ids = torch.tensor([[1, 5] + [127] * n + [6, 7]] * 2)
    with tokenkern.prune(model, "prumerge+") as handle, torch.no_grad():
        # registered after prune's own pre-hook, so it sees the reduced projector input
        after = parts.projector.register_forward_pre_hook(lambda m, a: got.__setitem__("x", a[0]))
        model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels)
        keeps = handle.parts[0].keeps
        after.remove()
    for b, (x, ref, eps_a) in enumerate(refs):
        kept = ref.kept
        slot = max(set(range(n)) - set(kept))
        assert keeps[b].nonzero().flatten().tolist() == sorted([*kept, slot])
        idx = torch.tensor(sorted([*kept, slot]))
        red = M.Reduction(idx[None], got["x"][b, idx][None])
        check_against_released(red, red.tokens[:, [idx.tolist().index(slot)]], x, ref, eps_a)
