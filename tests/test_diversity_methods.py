"""The diversity recipes (divprune, cdpruner, dart, dart_embeddings, mmr) against their released
rules, each written here as a plain float64 loop at batch 1 (as the released code runs), on
random inputs whose greedy choices are separated beyond float32 rounding; plus the released
counts, the pivot order, padding, the registry entries and the config checks."""

import importlib
import math
import random
import re

import pytest
import torch
import torch.nn.functional as F
from test_diversity import U, cos_err, dpp_bound

import tokenkern.methods as M
from tokenkern.methods import registry
from tokenkern.methods.dart import set_order

DRAWS = 50


def separated(make, check, what: str):
    """The first inputs from make() that check(*inputs) accepts (its greedy margins exceed the
    float32 rounding); a near-tie has two right answers."""
    for _ in range(DRAWS):
        inputs = make()
        if check(*inputs):
            return inputs
    pytest.fail(f"{what}: {DRAWS} draws in a row had a near-tie: the bound is wrong")


def unit64(t: torch.Tensor) -> torch.Tensor:
    t = t.double()
    return t / t.norm(dim=-1, keepdim=True)


# ---------------------------------------------------------------------------------- DivPrune


def released_divprune(x: torch.Tensor, k: int) -> tuple[list[int], float]:
    """x: (N, D). The released loop in float64: distance 1 - cos; first pick the argmax of each
    column's second-smallest distance, then the argmax of the min distance to the picks. Returns
    the picks and the smallest gap between a step's best and second-best unpicked token."""
    dist = 1.0 - unit64(x) @ unit64(x).T
    picks, gap = [], math.inf
    nearest = torch.full((x.shape[0],), math.inf, dtype=torch.float64)  # min over the picks so far
    for i in range(k):
        if i:
            nearest = torch.minimum(nearest, dist[picks[-1]])
        scores = torch.topk(dist, 2, dim=0, largest=False).values[1] if i == 0 else nearest
        j = int(scores.argmax())
        rest = torch.ones(x.shape[0], dtype=torch.bool)
        rest[[*picks, j]] = False
        if bool(rest.any()):
            gap = min(gap, float(scores[j] - scores[rest].max()))
        picks.append(j)
    return picks, gap


@pytest.mark.parametrize(("n", "keep", "d"), [(17, 5, 8), (64, 0.25, 32), (576, 0.1, 16)])
def test_divprune_matches_the_released_loop(n, keep, d, gen):
    k = M.divprune_count(keep, n)
    b = 2

    def make():
        return (torch.randn(b, n, d, generator=gen),)

    def check(x):
        return all(released_divprune(x[s], k)[1] > 2 * cos_err(d) for s in range(b))

    (x,) = separated(make, check, "divprune")
    red = M.divprune(x, M.DivPruneConfig(keep=keep))
    for s in range(b):  # every sample on its own (the released code reuses sample 0's picks)
        assert red.indices[s].tolist() == sorted(released_divprune(x[s], k)[0])
    assert torch.equal(red.tokens, x.gather(1, red.indices[..., None].expand(-1, -1, d)))


def test_divprune_count_is_the_released_round():
    # Python's round: halves to even (0.25 * 26 = 6.5 -> 6; 0.5 * 5 = 2.5 -> 2; 0.5 * 7 -> 4).
    assert M.divprune_count(0.25, 26) == 6 and M.divprune_count(0.25, 26, "half_up") == 7
    assert M.divprune_count(0.5, 5) == 2 and M.divprune_count(0.5, 7) == 4
    for n in (1, 7, 26, 576, 2880):
        for ratio in (0.01, 0.098, 0.1, 0.25, 0.5, 1.0):
            assert M.divprune_count(ratio, n) == max(1, min(n, round(ratio * n)))
            assert M.divprune_count(ratio, n, "half_up") == M.keep_count(ratio, n)
    assert M.divprune_count(30, 26) == 26 and M.divprune_count(64, 576) == 64
    x = torch.randn(1, 26, 8)
    assert M.divprune(x, M.DivPruneConfig(keep=0.25)).indices.shape == (1, 6)
    assert M.divprune(x, M.DivPruneConfig(keep=0.25, rounding="half_up")).indices.shape == (1, 7)


def test_divprune_repeated_and_zero_tokens_give_k_distinct_tokens_without_nan():
    a, b = torch.randn(8), torch.randn(8)
    x = torch.stack([a, b, a, b, torch.zeros(8), a])[None]
    red = M.divprune(x, M.DivPruneConfig(keep=5))
    assert red.indices.shape == (1, 5) and len(set(red.indices[0].tolist())) == 5
    assert bool(torch.isfinite(red.tokens).all())


# ---------------------------------------------------------------------------------- CDPruner


def released_relevance(img: torch.Tensor, txt: torch.Tensor, theta: float | None = None) -> torch.Tensor:
    """img: (B, N, E), txt: (M, E). The released relevance in float64: mean negative cosine,
    min-max normalized over the whole batch, exp(alpha r) with theta."""
    rel = (-(unit64(img) @ unit64(txt).T)).mean(dim=-1)
    r = (rel - rel.min() + 1e-6) / (rel.max() - rel.min())
    return r if theta is None else torch.exp(theta / (2 * (1 - theta)) * r)


def relevance_eta(img: torch.Tensor, txt: torch.Tensor, theta: float | None) -> torch.Tensor:
    """(N,) float64: bound on the relative error of the float32 r of each token (img (N, E),
    txt (M, E)): each mean cosine is off by (E + 6 + M) u; the min-max normalization divides
    two differences of those; exp(alpha r) turns an absolute error of r into alpha times it."""
    e, m = img.shape[-1], txt.shape[0]
    d_rel = (e + 6 + m) * U
    rel = (-(unit64(img) @ unit64(txt).T)).mean(dim=-1)
    num = rel - rel.min() + 1e-6
    span = rel.max() - rel.min()
    eta = 2 * d_rel / num + 2 * d_rel / span + 6 * U
    if theta is not None:
        eta = theta / (2 * (1 - theta)) * (num / span) * eta + 4 * U
    return eta


def released_dpp(x: torch.Tensor, r: torch.Tensor, k: int, eta: torch.Tensor) -> tuple[list[int], float]:
    """x: (N, D), r: (N,) float64. The released fast greedy MAP in float64 on L = r S r. Returns
    the picks and the smallest margin of a step: the winner's d2 shrunk by (1 - eta)^2 minus the
    best other d2 grown by (1 + eta)^2 (a relative error eta_j of r_j scales every residual d2_j
    of L by (1 + eta_j)^2 exactly: it is a ratio of determinants)."""
    sim = unit64(x) @ unit64(x).T
    kern = r[:, None] * sim * r[None, :]
    d2 = kern.diagonal().clone()
    rows, picks, margin = [], [], math.inf
    for _ in range(k):
        j = int(d2.argmax())
        others = d2.clone()
        others[j] = -math.inf
        if bool(torch.isfinite(others).any()):
            margin = min(margin, float(d2[j] * (1 - eta[j]) ** 2 - (others * (1 + eta) ** 2).max()))
        c = torch.stack(rows) if rows else kern.new_zeros(0, x.shape[0])
        e = (kern[j] - c[:, j] @ c) / d2[j].sqrt()
        rows.append(e)
        d2 = d2 - e**2
        d2[j] = -math.inf
        picks.append(j)
    return picks, margin


@pytest.mark.parametrize(("n", "k", "d", "e", "m"), [(17, 5, 8, 8, 1), (64, 12, 32, 16, 2), (576, 8, 32, 32, 1)])
@pytest.mark.parametrize("theta", [None, 0.5])
def test_cdpruner_matches_the_released_loop(n, k, d, e, m, theta, gen):
    def make():
        return (torch.randn(1, n, d, generator=gen), torch.randn(1, n, e, generator=gen),
                torch.randn(1, m, e, generator=gen))  # fmt: skip

    def check(x, img, txt):
        r = released_relevance(img, txt[0], theta)[0]
        picks, margin = released_dpp(x[0], r, k, relevance_eta(img[0], txt[0], theta))
        bound = float(dpp_bound(x, r[None], torch.tensor([picks]))[0])
        return margin > 2 * bound

    x, img, txt = separated(make, check, "cdpruner")
    red = M.cdpruner(x, img, txt, M.CDPrunerConfig(keep=k, theta=theta))
    r = released_relevance(img, txt[0], theta)
    assert red.indices[0].tolist() == sorted(released_dpp(x[0], r[0], k, torch.zeros(n))[0])
    assert bool(((red.scores[0].double() - r[0]).abs() <= relevance_eta(img[0], txt[0], theta) * r[0]).all())


def test_cdpruner_relevance_sign_and_per_sample_normalization(gen):
    img = torch.randn(3, 40, 16, generator=gen)
    txt = torch.randn(3, 1, 16, generator=gen)
    r = M.cdpruner_relevance(img, txt)
    cos = (unit64(img) @ unit64(txt).mT)[..., 0]
    # The minus sign: the token most similar to the text is the least relevant (r = 1e-6 / span).
    assert torch.equal(r.argmin(dim=1), cos.argmax(dim=1)) and torch.equal(r.argmax(dim=1), cos.argmin(dim=1))
    for s in range(3):  # each sample on its own; at B = 1 the released whole-batch rule
        alone = M.cdpruner_relevance(img[s : s + 1], txt[s : s + 1])
        want = released_relevance(img[s : s + 1], txt[s, :])
        eta = relevance_eta(img[s], txt[s], None)
        assert bool(((r[s].double() - want[0]).abs() <= eta * want[0]).all())
        assert bool(((alone[0].double() - want[0]).abs() <= eta * want[0]).all())
    whole = torch.cat([released_relevance(img[s : s + 1], txt[s]) for s in range(3)])
    assert float(r.min(dim=1).values.max()) < 1e-5 and float(whole.min()) < 1e-5
    # Padded text rows: a mask gives what the sample gets with its valid rows only.
    txt2 = torch.randn(1, 3, 16, generator=gen)
    mask = torch.tensor([[True, False, True]])
    assert torch.allclose(M.cdpruner_relevance(img[:1], txt2, text_mask=mask),
                          M.cdpruner_relevance(img[:1], txt2[:, [0, 2]]), rtol=1e-5)  # fmt: skip


def test_cdpruner_theta_is_the_exp_variant(gen):
    img, txt = torch.randn(1, 30, 8, generator=gen), torch.randn(1, 2, 8, generator=gen)
    r = M.cdpruner_relevance(img, txt)
    assert torch.allclose(M.cdpruner_relevance(img, txt, theta=0.5), torch.exp(0.5 * r), rtol=4 * U)
    assert torch.allclose(M.cdpruner_relevance(img, txt, theta=0.8), torch.exp(2.0 * r), rtol=8 * U)
    assert torch.equal(M.cdpruner_relevance(img, txt, theta=0.0), torch.ones(1, 30))


# -------------------------------------------------------------------------------------- DART


def released_dart(keys, hidden, start, n, budget, order="released"):
    """keys: (H, L, d), hidden: (L, D) of one unpadded prompt, its image at [start, start + n).
    The released rule in float64: pivots by L1 key norm (4 image, 4 after the image), walked in
    list(set(...)) order (or ascending), per pivot the budget // 8 least cosine-similar
    candidates. Returns the kept image positions and the smallest gap where float32 decides
    (norm ranks relative to the largest norm, cosine ranks)."""
    h = hidden.double()
    norms = keys.double().transpose(0, 1).flatten(1).abs().sum(dim=-1)
    top = per = budget // 8
    img_top = torch.sort(norms[start : start + n], descending=True)
    txt_top = torch.sort(norms[start + n :], descending=True)
    gap = min(float(-img_top.values[:5].diff().max()), float(-txt_top.values[:5].diff().max())) / float(norms.max())
    image_pivots = (img_top.indices[:4] + start).tolist()
    text_pivots = (txt_top.indices[:4] + start + n).tolist()
    walk = list(set(image_pivots + text_pivots)) if order == "released" else sorted(image_pivots + text_pivots)
    kept, valid, cos_gap = set(image_pivots), set(range(start, start + n)) - set(image_pivots), math.inf
    for p in walk:
        cand = sorted(valid)
        cos = F.cosine_similarity(h[p][None], h[cand], dim=-1, eps=1e-8)
        srt = torch.sort(cos).values
        if len(cand) > top:
            cos_gap = min(cos_gap, float(srt[top] - srt[top - 1]))
        chosen = [cand[i] for i in torch.sort(cos).indices[:per].tolist()]
        kept.update(chosen)
        valid.difference_update(chosen)
    return sorted(kept), gap, cos_gap


def decoder_inputs(gen, pads, start=35, n=576, after=40, hkv=2, d=16, width=32):
    """One prompt [text start][image n][text after] per sample, left-padded by pads[s], with the
    same content in every sample (float32 keys and normed hidden states)."""
    size = start + n + after
    length = max(pads) + size
    k1 = torch.randn(1, hkv, size, d, generator=gen) * torch.rand(1, 1, size, 1, generator=gen)
    h1 = torch.randn(size, width, generator=gen)
    b = len(pads)
    k = torch.zeros(b, hkv, length, d)
    hidden = torch.zeros(b, length, width)
    image = torch.full((b, length), -1)
    valid = torch.zeros(b, length, dtype=torch.bool)
    for s, p in enumerate(pads):
        lo = p  # sample s starts at p (padding before it; the others' after it)
        k[s, :, lo : lo + size] = k1[0]
        hidden[s, lo : lo + size] = h1
        image[s, lo + start : lo + start + n] = 0
        valid[s, lo : lo + size] = True
    q = torch.randn(b, 4, length, d, generator=gen)
    layer = M.DecoderLayer(q=q, k=k, scale=d**-0.5, valid=valid, image=image)
    return layer, hidden, (k1[0], h1)


def dart_check(budget, order, d=16, width=32):
    def check(layer, hidden, one):
        _, gap, cos_gap = released_dart(*one, 35, 576, budget, order)
        return gap > 4 * 2 * d * U and cos_gap > 2 * cos_err(width)

    return check


@pytest.mark.parametrize("budget", [64, 128, 192])
@pytest.mark.parametrize("order", ["released", "ascending"])
def test_dart_matches_the_released_loop_with_any_left_padding(budget, order, gen):
    pads = [0, 7]
    layer, hidden, one = separated(lambda: decoder_inputs(gen, pads), dart_check(budget, order), "dart")
    red = M.dart(layer, hidden, M.DARTConfig(keep=budget, pivot_order=order))
    want, _, _ = released_dart(*one, 35, 576, budget, order)
    assert len(want) == M.dart_kept(budget) == 4 + 8 * (budget // 8)  # 68 / 132 / 196
    for s, p in enumerate(pads):  # positions counted from the first valid token
        kept_image = (red.keep_mask[s] & (layer.image[s] >= 0)).nonzero().flatten() - p
        assert kept_image.tolist() == want
        assert bool(red.keep_mask[s][layer.image[s] < 0].all())  # text and padding kept
    assert red.scores.shape == layer.valid.shape and red.scores.dtype == torch.float32


def test_dart_pivot_order_changes_the_result(gen):
    """Low-dimensional hidden states make the pivots' least-similar sets overlap, so the order
    in which the pivots take their tokens matters."""
    for _ in range(DRAWS):
        layer, hidden, one = decoder_inputs(gen, [0], width=3)
        if not dart_check(64, "released", width=3)(layer, hidden, one):
            continue
        if not dart_check(64, "ascending", width=3)(layer, hidden, one):
            continue
        a = released_dart(*one, 35, 576, 64, "released")[0]
        b = released_dart(*one, 35, 576, 64, "ascending")[0]
        if a != b:
            break
    else:
        pytest.fail("the released and the ascending pivot orders never differed")
    got_a = M.dart(layer, hidden, M.DARTConfig(keep=64)).keep_mask[0] & (layer.image[0] >= 0)
    got_b = M.dart(layer, hidden, M.DARTConfig(keep=64, pivot_order="ascending")).keep_mask[0] & (layer.image[0] >= 0)
    assert got_a.nonzero().flatten().tolist() == a and got_b.nonzero().flatten().tolist() == b


def test_set_order_is_cpythons_set_iteration_order():
    rng = random.Random(1234)
    cases = [[40, 36, 700, 612, 611, 613, 47, 68], [35 + 32 * i for i in range(8)]]  # collisions mod 8 and 32
    for _ in range(150):
        length = rng.choice([20, 650, 3000, 70000])
        p = rng.choice([1, 4, 8, 8, 8, 12])
        base = rng.randrange(max(1, length - 64))
        pool = range(base, min(length, base + 64)) if rng.random() < 0.5 else range(length)
        cases.append(rng.sample(pool, min(p, len(pool))))
    for keys in cases:
        bits = max(keys).bit_length() + 1
        assert set_order(torch.tensor([keys]), bits)[0].tolist() == list(set(keys)), keys


def test_dart_short_images_keep_every_image_token_and_counts(gen):
    layer, hidden, _ = decoder_inputs(gen, [0, 3], n=100, after=10)
    red = M.dart(layer, hidden, M.DARTConfig(keep=128))  # 132 > 100 image tokens
    assert torch.equal(red.keep_mask, torch.ones_like(red.keep_mask))
    red = M.dart(layer, hidden, M.DARTConfig(keep=40))
    assert (red.keep_mask & (layer.image >= 0)).sum(dim=1).tolist() == [4 + 8 * 5] * 2
    with pytest.raises(ValueError, match=r"^tokenkern\.dart: keep must be a token count"):
        M.dart(layer, hidden, M.DARTConfig(keep=0.25))
    with pytest.raises(ValueError, match=r"^tokenkern\.dart: hidden must be \(B, L, D\)"):
        M.dart(layer, hidden[:, :5], M.DARTConfig())


def test_dart_sync_free_path_equals_the_cpu_path(gen, monkeypatch):
    """The device path (no value checks: the CUDA pivot_select pads a short sample with
    non-candidates) keeps what the CPU path keeps, short samples included; here the CUDA
    kernel runs through its Triton launcher (on the GPU when there is one)."""
    from testing import on_backend

    dart_module = importlib.import_module("tokenkern.methods.dart")

    layer, hidden, _ = decoder_inputs(gen, [0, 2], start=5, n=30, after=6, width=8)
    layer.image[0, 5 + 20 : 5 + 30] = -1  # sample 0: 20 image tokens, 16 candidates: short of 8 * 3
    want = M.dart(layer, hidden, M.DARTConfig(keep=24))
    assert (want.keep_mask & (layer.image >= 0)).sum(dim=1).tolist() == [20, 4 + 8 * 3]  # sample 0 keeps all 20
    monkeypatch.setattr(dart_module, "_sync_free", lambda h: True)
    monkeypatch.setattr(dart_module.tokenkern, "pivot_select", lambda *a: on_backend("pivot_select", "triton", *a))
    assert torch.equal(M.dart(layer, hidden, M.DARTConfig(keep=24)).keep_mask, want.keep_mask)


def test_dart_embeddings_is_the_rule_on_the_embeddings(gen):
    """With text: the released rule with L1 norms of the embeddings as the pivot score and the
    embeddings as the similarity features; without: the image pivots share the budget."""
    n, after, width = 576, 40, 32

    def make():
        seq = torch.randn(1, n + after, width, generator=gen) * torch.rand(1, n + after, 1, generator=gen)
        return (seq,)

    def check(seq):
        _, gap, cos_gap = released_dart(seq[0][None], seq[0], 0, n, 128)  # the embeddings as one "head"
        return gap > 4 * width * U and cos_gap > 2 * cos_err(width)

    (seq,) = separated(make, check, "dart_embeddings")
    x, text = seq[:, :n], seq[:, n:]
    red = M.dart_embeddings(x, M.DARTConfig(keep=128), text=text)
    want, _, _ = released_dart(seq[0][None], seq[0], 0, n, 128)
    assert red.indices[0].tolist() == want and red.indices.shape == (1, 132)
    alone = M.dart_embeddings(x, M.DARTConfig(keep=128))
    assert alone.indices.shape == (1, 4 + 4 * 32)
    assert M.dart_embeddings(x, M.DARTConfig(keep=0.25)).indices.shape == (1, M.dart_kept(144, 4, 0))
    assert torch.equal(red.tokens, x[0, red.indices[0]][None])


# --------------------------------------------------------------------------------------- MMR


def released_mmr(x, imp, k, lam):
    """x: (N, D), imp: (N,). Float64 MMR: importance min-max normalized, first pick its argmax,
    then argmax of lam imp - (1 - lam) max cos to the picks. Returns picks and smallest gap."""
    imp = imp.double()
    imp = (imp - imp.min()) / (imp.max() - imp.min())
    sim = unit64(x) @ unit64(x).T
    picks, gap = [], math.inf
    closest = torch.full_like(imp, -math.inf)  # max similarity to the picks so far
    for i in range(k):
        if i:
            closest = torch.maximum(closest, sim[picks[-1]])
        score = imp.clone() if i == 0 else lam * imp - (1 - lam) * closest
        score[picks] = -math.inf
        top = torch.sort(score, descending=True).values
        if top.numel() > 1 and math.isfinite(float(top[1])):
            gap = min(gap, float(top[0] - top[1]))
        picks.append(int(score.argmax()))
    return picks, gap


@pytest.mark.parametrize(("n", "k", "d"), [(17, 5, 8), (64, 16, 32), (576, 64, 16)])
@pytest.mark.parametrize("lam", [0.5, 0.8])
def test_mmr_matches_the_released_loop(n, k, d, lam, gen):
    bound = 2 * ((1 - lam) * cos_err(d) + lam * 4 * U + 2 * U)

    def make():
        return torch.randn(2, n, d, generator=gen), torch.randn(2, n, generator=gen)

    def check(x, imp):
        return all(released_mmr(x[s], imp[s], k, lam)[1] > bound for s in range(2))

    x, imp = separated(make, check, "mmr")
    red = M.mmr(x, imp, M.MMRConfig(keep=k, lam=lam))
    for s in range(2):
        assert red.indices[s].tolist() == sorted(released_mmr(x[s], imp[s], k, lam)[0])
    assert torch.equal(red.scores, imp)


# ------------------------------------------------------------------------ registry and configs


def test_registry_entries():
    want = {"divprune": ("post_projector", True, ("features",)),
            "cdpruner": ("post_projector", True, ("features", "image_emb", "text_emb")),
            "dart-embeddings": ("post_projector", True, ("features",)),
            "mmr": ("vision_tower", True, ("features", "importance")),
            "dart": ("llm_layer", False, ("decoder_layer", "normed_hidden"))}  # fmt: skip
    for name, (site, fixed, inputs) in want.items():
        spec = registry.get(name)
        assert (spec.site, spec.fixed_count, spec.inputs) == (site, fixed, inputs), name
        assert spec.count_is_fixed(spec.config()) == fixed and spec.count_reason and spec.summary
    assert registry.get("dart").models == registry.ALL_VLMS == registry.get("divprune").models
    assert registry.get("cdpruner").models == registry.CLIP_VLMS == registry.get("mmr").models
    assert registry.get("dart").recipe is M.dart and registry.get("dart-embeddings").recipe is M.dart_embeddings
    assert registry.get("dart").config is M.DARTConfig and M.DARTConfig().layers == (2,)
    assert "dart" in registry.names("llm_layer") and "dart" not in registry.vision_names()


@pytest.mark.parametrize(
    ("make", "field"),
    [(lambda: M.DivPruneConfig(keep=0), "keep"), (lambda: M.DivPruneConfig(rounding="floor"), "rounding"),
     (lambda: M.CDPrunerConfig(keep=1.5), "keep"), (lambda: M.CDPrunerConfig(theta=1.0), "theta"),
     (lambda: M.CDPrunerConfig(theta=True), "theta"), (lambda: M.DARTConfig(keep=True), "keep"),
     (lambda: M.DARTConfig(layer=0), "layer"), (lambda: M.DARTConfig(pivot_order="sorted"), "pivot_order"),
     (lambda: M.DARTConfig(image_pivots=0), "image_pivots"), (lambda: M.DARTConfig(text_pivots=-1), "text_pivots"),
     (lambda: M.MMRConfig(lam=1.5), "lam"), (lambda: M.MMRConfig(layer=1.0), "layer")],
)  # fmt: skip
def test_bad_config_values_name_the_field(make, field):
    with pytest.raises(ValueError, match=rf"^tokenkern\.\w+: {re.escape(field)} must be "):
        make()


def test_bad_tensor_inputs_name_the_argument(gen):
    x = torch.randn(1, 8, 4, generator=gen)
    cfg = M.CDPrunerConfig(keep=2)
    with pytest.raises(ValueError, match=r"^tokenkern\.cdpruner: image_emb must be \(B, N, E\)"):
        M.cdpruner(x, torch.randn(1, 7, 4), torch.randn(1, 1, 4), cfg)
    with pytest.raises(ValueError, match=r"^tokenkern\.cdpruner: text_emb must be \(B, M, E\)"):
        M.cdpruner(x, torch.randn(1, 8, 4), torch.randn(1, 1, 5), cfg)
    with pytest.raises(TypeError, match=r"^tokenkern\.cdpruner: text_emb must be a torch\.Tensor"):
        M.cdpruner(x, torch.randn(1, 8, 4), None, cfg)
    with pytest.raises(ValueError, match=r"^tokenkern\.cdpruner: text_mask must be \(B, M\) bool"):
        M.cdpruner(x, torch.randn(1, 8, 4), torch.randn(1, 2, 4), cfg, text_mask=torch.ones(1, 2))
    with pytest.raises(ValueError, match=r"^tokenkern\.dart_embeddings: text must be \(B, T, D\)"):
        M.dart_embeddings(x, M.DARTConfig(keep=4), text=torch.randn(1, 3, 5))
    with pytest.raises(ValueError, match=r"^tokenkern\.mmr_select: importance"):
        M.mmr(x, torch.randn(1, 7), M.MMRConfig())
    with pytest.raises(ValueError, match=r"^tokenkern\.divprune: x must be \(B, N, D\)"):
        M.divprune(x[0], M.DivPruneConfig())
