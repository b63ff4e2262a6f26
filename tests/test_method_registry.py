"""The method registry drives prune(), the demo and the CLI: every spec is complete, every
recipe called as its spec says returns a Reduction, prune()'s options are the config's fields,
calling a recipe directly gives what prune() applies (SparseVLM recycling, FiCoCo-L's per-image
loop), and there is one keep_count."""

import dataclasses
import inspect
import math
import re

import pytest
import torch
from testing import assert_rel_close

import tokenkern
import tokenkern.methods as M
import tokenkern.selectors
from tokenkern.methods import registry

INPUTS = {"features", "vision_layer", "decoder_layer", "raters", "keys_mean", "sizes", "image_emb", "text_emb",
          "importance", "normed_hidden"}  # fmt: skip
FIXED = {"lofi", "random", "uniform", "fastervlm", "visionzip", "ficoco-v", "divprune", "cdpruner", "dart-embeddings",
         "mmr"}  # fmt: skip
NOT_FIXED = {"fastv", "sparsevlm", "ficoco-l", "tome", "prumerge+", "dart"}
EPS32 = 2.0**-24


def test_every_spec_is_complete():
    from tokenkern.integrations.adapters import SUPPORTED

    assert set(registry.names()) == FIXED | NOT_FIXED
    for name in registry.names():
        spec = registry.get(name)
        assert spec.name == name and dataclasses.is_dataclass(spec.config), name
        assert spec.site in registry.SITES and spec.inputs and set(spec.inputs) <= INPUTS, name
        assert spec.count_reason and spec.summary, name
        assert set(spec.models) <= set(SUPPORTED), name
        assert (spec.site == "every_block") == (spec.models == ()), name  # only ToMe is not offered by prune()
        # The recipe takes the named inputs, then the config (further parameters have defaults).
        params = list(inspect.signature(spec.recipe).parameters.values())
        required = [p for p in params if p.default is inspect.Parameter.empty]
        assert len(required) == len(spec.inputs) + 1, name
        cfg = spec.config()
        assert spec.fixed_count == (name in FIXED) and spec.count_is_fixed(cfg) == (name in FIXED), name
        assert registry.options(name) == tuple(f.name for f in dataclasses.fields(spec.config) if f.name != "keep")
    prumerge = registry.get("prumerge+")
    assert prumerge.fixed_with_keep and prumerge.count_is_fixed(M.PruMergeConfig(keep=0.25))
    assert registry.names("llm_layer") == ("fastv", "sparsevlm", "ficoco-l", "dart")
    assert set(registry.names("vision_tower")) == {"fastervlm", "visionzip", "prumerge+", "ficoco-v", "mmr"}


def test_unknown_method_and_site_are_refused_naming_the_valid_ones():
    with pytest.raises(ValueError, match=r"^tokenkern\.methods\.get: unknown method 'nope': method must be one of "
                                         + re.escape(", ".join(registry.names())) + ", got 'nope'$"):  # fmt: skip
        registry.get("nope")
    with pytest.raises(ValueError, match=r"^tokenkern\.methods\.names: site must be one of"):
        registry.names("tower")


def test_methods_docstring_table_is_the_registry_table():
    assert registry.table() in M.__doc__


def decoder_layer(gen, b=2, hq=4, hkv=2, d=16, width=24):
    """Left-padded prompts [text 5 + 3 s][image 24][text 3][image 16][text 6] with hidden states."""
    prompts = [torch.cat([torch.full((n,), i) for i, n in [(-1, 5 + 3 * s), (0, 24), (-1, 3), (1, 16), (-1, 6)]])
               for s in range(b)]  # fmt: skip
    length = max(len(p) for p in prompts)
    image = torch.full((b, length), -1)
    valid = torch.zeros(b, length, dtype=torch.bool)
    text = torch.zeros(b, length, dtype=torch.bool)
    for s, p in enumerate(prompts):
        start = length - len(p)
        image[s, start:], valid[s, start:] = p, True
        after = start + (5 + 3 * s) + 24
        text[s, after:] = p[after - start :] < 0
    q = torch.randn(b, hq, length, d, generator=gen) * 2
    k = torch.randn(b, hkv, length, d, generator=gen)
    hidden = torch.randn(b, length, width, generator=gen)
    return M.DecoderLayer(q=q, k=k, scale=d**-0.5, valid=valid, image=image, text=text, hidden=hidden)


def spec_inputs(gen, b=2, n=16, c=8, heads=2, d=4) -> dict:
    q = torch.randn(b, heads, 1 + n, d, generator=gen)
    k = torch.randn(b, heads, 1 + n, d, generator=gen)
    layer = decoder_layer(gen)
    return {
        "features": torch.randn(b, n, c, generator=gen),
        "vision_layer": M.VisionLayer(q=q, k=k, scale=d**-0.5),
        "decoder_layer": layer,
        "raters": layer.text & (torch.rand(layer.text.shape, generator=gen) < 0.5),
        "keys_mean": torch.randn(b, n, d, generator=gen),
        "sizes": torch.ones(b, n),
        "image_emb": torch.randn(b, n, 6, generator=gen),
        "text_emb": torch.randn(b, 2, 6, generator=gen),
        "importance": torch.rand(b, n, generator=gen),
        "normed_hidden": layer.hidden,
    }


@pytest.mark.parametrize("name", registry.names())
def test_every_recipe_called_as_its_spec_says_returns_a_reduction(name, gen):
    spec = registry.get(name)
    inputs = spec_inputs(gen)
    cfg = spec.config(layer=2) if name == "sparsevlm" else spec.config()
    red = spec.recipe(*(inputs[i] for i in spec.inputs), cfg)
    assert isinstance(red, M.Reduction)
    if spec.site == "llm_layer":
        layer = inputs["decoder_layer"]
        assert red.indices is None and red.keep_mask.shape == layer.valid.shape and red.keep_mask.dtype == torch.bool
        assert bool(red.keep_mask[layer.image < 0].all())  # text and padding are always kept
        assert red.tokens is None or red.tokens.shape == layer.hidden.shape
    elif spec.site == "every_block":
        assert red.indices is None and red.tokens.shape[0] == 2 and red.sizes.shape == red.tokens.shape[:2]
    else:
        n = inputs["features"].shape[1]
        assert red.indices.dtype == torch.int64 and red.tokens.shape[:2] == red.indices.shape
        assert bool((red.indices[:, 1:] > red.indices[:, :-1]).all()) and 0 <= int(red.indices.min())
        assert int(red.indices.max()) < n
        if spec.count_is_fixed(cfg):
            assert red.indices.shape[1] == M.keep_count(cfg.keep, n)


# ---------------------------------------------------------------------------- prune() and the CLI


@pytest.fixture(scope="module")
def llava():
    pytest.importorskip("transformers")
    from test_integrations import build

    return build("llava").model


@pytest.mark.parametrize("name", [n for n in registry.names() if registry.get(n).models])
def test_prune_refuses_unknown_options_listing_exactly_the_config_fields(llava, name):
    with pytest.raises(ValueError, match=re.escape("unknown options ['bogus']")) as info:
        tokenkern.prune(llava, name, bogus=1)
    listed = str(info.value).split(" are: ")[1]
    fields = [f.name for f in dataclasses.fields(registry.get(name).config) if f.name != "keep"]
    assert listed == (", ".join(fields) if fields else "none besides keep")
    assert getattr(llava, "_tokenkern_prune_handle", None) is None


def test_prune_refuses_an_unknown_method_naming_the_registry(llava):
    with pytest.raises(ValueError, match=r"^tokenkern\.prune: unknown method 'nope'") as info:
        tokenkern.prune(llava, "nope")
    assert str(info.value).endswith(f"one of {', '.join(registry.names())}, got 'nope'")
    with pytest.raises(ValueError, match=r"^tokenkern\.prune: method must be one of .*got 'tome'$"):
        tokenkern.prune(llava, "tome")


def test_demo_and_cli_method_choices_are_the_registry_names(capsys):
    from tokenkern.__main__ import demo_methods, main
    from tokenkern.demo import vit_pruning

    vision = tuple(n for n in registry.names() if registry.get(n).site != "llm_layer")
    assert vit_pruning.VISION_METHODS == vision == demo_methods() == registry.vision_names()
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--method", "nope"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--method" in err
    assert all(repr(n) in err for n in vision) and "'fastv'" not in err
    assert main(["info"]) == 0
    methods_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("methods: "))
    assert methods_line == "methods: " + ", ".join(f"{n} ({registry.get(n).site})" for n in registry.names())
    with pytest.raises(ValueError, match=r"^tokenkern\.demo: unknown method 'nope'"):
        vit_pruning._reduce("nope", *([None] * 5))


# ----------------------------------------------------------------- a recipe gives what prune() gives


def recycle_reference(hidden, image, keep_mask):
    """Float64 SparseVLM recycling: every dropped image token joins the kept token of its image
    with the largest cosine similarity (ties to the lower position); a kept token becomes the
    mean of itself and the tokens that joined it. Also returns the smallest gap between a
    dropped token's best and second-best cosine (where the rounding of the cosines decides)."""
    out = hidden.double().clone()
    gap = math.inf
    for s in range(image.shape[0]):
        for img in image[s].unique().tolist():
            if img < 0:
                continue
            pos = (image[s] == img).nonzero().flatten().tolist()
            kept = [p for p in pos if keep_mask[s, p]]
            dropped = [p for p in pos if not keep_mask[s, p]]
            x = hidden[s].double()
            xn = x / x.norm(dim=-1, keepdim=True)
            joined = {t: [t] for t in kept}
            for i in dropped:
                cos = [float(xn[i] @ xn[t]) for t in kept]
                best = max(range(len(kept)), key=lambda j: (cos[j], -j))
                if len(kept) > 1:
                    gap = min(gap, cos[best] - max(c for j, c in enumerate(cos) if j != best))
                joined[kept[best]].append(i)
            for t, members in joined.items():
                out[s, t] = x[members].mean(dim=0)
    return out, gap


def test_sparsevlm_recycle_in_the_recipe_matches_the_rule(gen):
    layer = decoder_layer(gen)
    raters = layer.text & (torch.rand(layer.text.shape, generator=gen) < 0.5)
    plain = M.sparsevlm(layer, raters, M.SparseVLMConfig(keep=0.25, layer=2))
    assert plain.tokens is None
    # Hidden states whose assignments the float32 cosines cannot flip (the keep mask does not
    # depend on them): a gap far above the cosines' rounding (a few EPS32).
    for _ in range(100):
        layer.hidden = torch.randn(layer.hidden.shape, generator=gen)
        ref, gap = recycle_reference(layer.hidden, layer.image, plain.keep_mask)
        if gap > 1e-4:
            break
    assert gap > 1e-4
    red = M.sparsevlm(layer, raters, M.SparseVLMConfig(keep=0.25, layer=2, recycle=True))
    assert torch.equal(red.keep_mask, plain.keep_mask) and torch.equal(red.scores, plain.scores)
    kept_image = red.keep_mask & (layer.image >= 0)
    assert torch.equal(red.tokens[~kept_image], layer.hidden[~kept_image])  # untouched elsewhere
    # Each merged token is a float32 mean of at most 24 tokens: a few rounding steps per term.
    assert_rel_close(red.tokens[kept_image], ref[kept_image], 24 * 4 * EPS32)
    assert not torch.equal(red.tokens, layer.hidden)  # something was recycled
    with pytest.raises(ValueError, match=r"^tokenkern\.sparsevlm: layer\.hidden must be"):
        M.sparsevlm(dataclasses.replace(layer, hidden=None), raters, M.SparseVLMConfig(recycle=True, layer=2))


def test_ficoco_l_recipe_reduces_every_image_on_its_own(gen):
    """The sequence recipe equals ficoco_l_tokens on each image with the sample's text tokens."""
    layer = decoder_layer(gen)
    cfg = M.FiCoCoLConfig(keep=0.25, layer=2)
    red = M.ficoco_l(layer, cfg)
    want_mask = torch.ones_like(layer.valid)
    want = layer.hidden.clone()
    for s in range(2):
        txt = layer.text[s].nonzero().flatten()
        for img in (0, 1):
            vis = (layer.image[s] == img).nonzero().flatten()
            q, k = layer.q[s : s + 1], layer.k[s : s + 1]
            one = M.ficoco_l_tokens(layer.hidden[s : s + 1, vis], q[:, :, vis], k[:, :, vis], q[:, :, txt],
                                    k[:, :, txt], layer.scale, cfg)  # fmt: skip
            want_mask[s, vis] = False
            want_mask[s, vis[one.indices[0]]] = True
            want[s, vis[one.indices[0]]] = one.tokens[0]
        assert int(red.keep_mask[s][layer.image[s] == 0].sum()) == M.keep_count(0.25, 24)
    assert torch.equal(red.keep_mask, want_mask) and torch.equal(red.tokens, want)
    with pytest.raises(ValueError, match=r"^tokenkern\.ficoco_l: layer\.hidden must be"):
        M.ficoco_l(dataclasses.replace(layer, hidden=None), cfg)


# ------------------------------------------------------------------------------ one keep_count


def test_one_keep_count_for_selectors_and_methods():
    assert tokenkern.selectors.keep_count is M.keep_count is M.base.keep_count
    assert M.keep_count(0.25, 26) == 7  # 6.5 rounds half up
    assert tokenkern.selectors.keep_count(0.25, 26) == 7
    assert M.keep_count(30, 26) == 26  # a count above n keeps all n (prune()'s semantics)
