"""prune(positions=...) and the replayable random draw, on tiny random transformers VLMs.

positions="packed" must give exactly what the model computes when handed only the kept image
features: the reference here is a plain, unpruned run of the same model on inputs_embeds built
by hand (the kept features, taken from the prune handle's reducer, at k placeholders per image;
the text embedded by the model's own table), for prefill logits and greedy generate() with the
KV cache, on left-padded batches (samples with different numbers of images included). The
random method's draw is a function of (seed, the image's pixels): the same image draws the same
tokens wherever and whenever it is seen."""

from __future__ import annotations

import math

import pytest
import torch
from test_integrations import IMAGE, _left_pad, build
from testing import assert_rel_close, rel_error

import tokenkern
import tokenkern.methods as M
from tokenkern.integrations import resolve_positions
from tokenkern.methods.baselines import image_seed

STEPS = 4
# Float32 runs of the same math: per layer, every output sums at most hidden + intermediate
# products (gamma_n = n u, u = 2**-24), over the 4 decoder layers, for each of the two runs.
TOL = 2 * 4 * (64 + 128) * 2.0**-24
# Prompts as token ids, None marking an image; the first batch has one image per sample, the
# second gives its samples different numbers of images (they drop different token counts: the
# longer unpruned sample is the shorter pruned one).
BATCHES = {
    "one_image_each": [[1, 5, 6, None, 7, 8, 9, 10, 11], [1, 12, None, 13, 14]],
    "two_and_one": [[1, 5, None, 6, None, 7], [1, 12, 13, None, 14, 15, 16, 17, 18, 19]],
}
CASES = [("llava", "lofi", {"rank": 4}), ("llava", "fastervlm", {}), ("llava", "uniform", {}),
         ("llava_next", "lofi", {"rank": 8}), ("llava_next", "uniform", {})]  # fmt: skip
PACKED = ("fastervlm", "visionzip", "prumerge+", "ficoco-v", "mmr", "lofi", "random", "uniform", "divprune",
          "cdpruner", "dart-embeddings")  # fmt: skip
IN_DECODER = ("fastv", "sparsevlm", "ficoco-l", "dart")


@pytest.fixture(scope="module")
def models():
    return {name: build(name) for name in ("llava", "llava_next")}


def _ids(prompts, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask, the i-th image of the batch (row-major) as counts[i] placeholders."""
    it = iter(counts)
    return _left_pad([[t for tok in p for t in ([IMAGE] * next(it) if tok is None else [tok])] for p in prompts])


def _inputs(tiny, prompts, gen) -> dict:
    n = sum(tok is None for p in prompts for tok in p)
    ids, mask = _ids(prompts, [tiny.tokens_per_image] * n)
    if tiny.name == "llava":
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(n, 3, 28, 28, generator=gen)}
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(n, 3, 3, 28, 28, generator=gen),
            "image_sizes": torch.tensor([[28, 56]] * n)}  # fmt: skip


def _image_features(tiny, inputs) -> list[torch.Tensor]:
    """Each image's features as get_image_features (patched by prune(): reduced) returns them."""
    core = tiny.model.model
    sizes = () if tiny.name == "llava" else (inputs["image_sizes"],)
    with torch.no_grad():
        return list(core.get_image_features(inputs["pixel_values"], *sizes, vision_feature_layer=-2,
                                            vision_feature_select_strategy="default").pooler_output)  # fmt: skip


def _generate(model, **inputs):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)  # fmt: skip
    return out.sequences[:, -STEPS:], torch.stack(out.logits, dim=1)


def _by_hand(tiny, prompts, kept: list[torch.Tensor]) -> dict:
    """The unpruned model's inputs for the kept features alone: k_i placeholders for image i,
    its kept features scattered there in order, the text embedded by the model's table."""
    ids, mask = _ids(prompts, [k.shape[0] for k in kept])
    with torch.no_grad():
        embeds = tiny.model.get_input_embeddings()(ids)
        embeds[ids == IMAGE] = torch.cat(kept).to(embeds.dtype)
    return {"inputs_embeds": embeds, "attention_mask": mask}


def _after_images(prompts, kept: list[torch.Tensor]) -> torch.Tensor:
    """(B, L') bool: the text positions after the first image of each sample (by-hand layout)."""
    ids, mask = _ids(prompts, [k.shape[0] for k in kept])
    seen = torch.cumsum((ids == IMAGE).long(), dim=1) > 0
    return seen & (ids != IMAGE) & mask.bool()


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize(("name", "method", "options"), CASES)
def test_packed_equals_the_model_handed_only_the_kept_features(models, name, method, options, batch, gen):
    tiny = models[name]
    prompts = BATCHES[batch]
    inputs = _inputs(tiny, prompts, gen)
    with tokenkern.prune(tiny.model, method, keep=0.25, positions="packed", **options) as handle, torch.no_grad():
        logits = tiny.model(**inputs).logits
        layout = handle.decoder.gather.valid.clone()
        tokens, step_logits = _generate(tiny.model, **inputs)
        feats = _image_features(tiny, inputs)
        kept = [f[k] for f, k in zip(feats, handle.parts[0].keeps, strict=True)]
    assert [k.shape[0] for k in kept] == [M.keep_count(0.25, tiny.tokens_per_image)] * len(kept)
    ref = _by_hand(tiny, prompts, kept)
    with torch.no_grad():
        ref_logits = tiny.model(**ref).logits
    ref_tokens, ref_step_logits = _generate(tiny.model, **ref)
    valid = ref["attention_mask"].bool()
    assert torch.equal(layout, valid), "the kept sequences are not laid out as the processor pads them"
    assert logits.shape == ref_logits.shape
    print(
        f"{name} {method} {batch}: relative error prefill {rel_error(logits[valid], ref_logits[valid]):.1e}, "
        f"generate {rel_error(step_logits, ref_step_logits):.1e} (TOL {TOL:.1e})"
    )
    assert_rel_close(logits[valid], ref_logits[valid], TOL, f"{name} {method} prefill logits")
    assert_rel_close(step_logits, ref_step_logits, TOL, f"{name} {method} generate() logits")
    assert torch.equal(tokens, ref_tokens)


def test_original_positions_differ_from_the_packed_reference(models, gen):
    """The reference above can tell the two apart: with the original position ids the text
    after an image sits 12 positions later, which changes every logit after it."""
    tiny = models["llava"]
    prompts = BATCHES["one_image_each"]
    inputs = _inputs(tiny, prompts, gen)
    with tokenkern.prune(tiny.model, "uniform", keep=0.25, positions="original") as handle, torch.no_grad():
        logits = tiny.model(**inputs).logits
        kept = [f[k] for f, k in zip(_image_features(tiny, inputs), handle.parts[0].keeps, strict=True)]
    ref = _by_hand(tiny, prompts, kept)
    with torch.no_grad():
        ref_logits = tiny.model(**ref).logits
    after = _after_images(prompts, kept)
    err = rel_error(logits[after], ref_logits[after])
    print(f"original vs packed reference: relative error {err:.3e} (TOL {TOL:.1e})")
    assert err > TOL, "original positions pass the packed reference"


def test_packed_position_ids_continue_from_the_kept_length(models, gen):
    """What the decoder receives in generate(): per sample 0 .. n'-1 over its n' kept valid
    tokens at prefill (padding 0), then n' + t at decoding step t."""
    tiny = models["llava"]
    inputs = _inputs(tiny, BATCHES["two_and_one"], gen)
    seen = []
    lm = tiny.model.model.language_model
    with tokenkern.prune(tiny.model, "lofi", keep=4, rank=4) as handle:
        hook = lm.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["position_ids"].clone()), with_kwargs=True)
        _generate(tiny.model, **inputs)
        hook.remove()
        valid = handle.decoder.gather.valid
    kept = valid.sum(1)
    real = inputs["attention_mask"].sum(1)
    assert kept.tolist() == (real - torch.tensor([2 * 12, 12])).tolist()
    want = torch.where(valid, valid.long().cumsum(1) - 1, 0)
    assert torch.equal(seen[0], want)
    for t, pos in enumerate(seen[1:], start=1):
        assert torch.equal(pos, (kept + t - 1)[:, None]), t


def test_default_positions_follow_the_released_code():
    names = [n for n in M.registry.names() if M.registry.get(n).models]
    assert sorted(names) == sorted(PACKED + IN_DECODER)
    for name in names:
        for model in M.registry.ALL_VLMS:
            want = "packed" if name in PACKED and not model.startswith("Qwen") else "original"
            assert resolve_positions(name, model) == want, (name, model)
            assert resolve_positions(name, model, "original") == "original"


def test_prune_installs_the_resolved_positions(models, gen):
    tiny = models["llava"]
    inputs = _inputs(tiny, BATCHES["one_image_each"], gen)
    with tokenkern.prune(tiny.model, "fastv", keep=0.25) as handle:
        assert handle.positions == "original"
    outs = {}
    for positions in (None, "packed"):
        with tokenkern.prune(tiny.model, "uniform", keep=0.25, positions=positions) as handle, torch.no_grad():
            assert handle.positions == "packed"
            outs[positions] = tiny.model(**inputs).logits
    assert torch.equal(outs[None], outs["packed"])
    qwen = build("qwen2_vl")
    with tokenkern.prune(qwen.model, "lofi", keep=0.25, rank=4) as handle:
        assert handle.positions == "original"


def test_packed_is_refused_where_it_is_not_defined(models):
    tiny = models["llava"]
    hooks = dict(tiny.model.model.language_model._forward_pre_hooks)
    for method, options in (("fastv", {}), ("sparsevlm", {"layer": 2}), ("ficoco-l", {"layer": 2}), ("dart", {})):
        with pytest.raises(ValueError, match=f"positions must be 'original' .* for {method}, which prunes inside"):
            tokenkern.prune(tiny.model, method, positions="packed", **options)
    qwen = build("qwen2_vl")
    for method in ("lofi", "random", "fastv"):
        with pytest.raises(ValueError, match="positions must be 'original'"):
            tokenkern.prune(qwen.model, method, positions="packed")
    with pytest.raises(ValueError, match="M-RoPE"):
        tokenkern.prune(qwen.model, "uniform", positions="packed")
    for bad in ("consecutive", "", True, 0):
        with pytest.raises(ValueError, match=r"positions must be 'packed', 'original' or None, got"):
            tokenkern.prune(tiny.model, "lofi", positions=bad)
    assert dict(tiny.model.model.language_model._forward_pre_hooks) == hooks  # nothing left installed
    assert "_tokenkern_prune_handle" not in vars(tiny.model)


# ----------------------------------------------------------------------------- random's draw


def test_image_seed_is_a_function_of_the_seed_and_the_content(gen):
    x = torch.randn(3, 28, 28, generator=gen)
    seed = image_seed(7, x)
    assert 0 <= seed < 2**63
    assert image_seed(7, x.clone()) == seed
    assert image_seed(7, x.bfloat16()) == seed  # what a bf16 model receives
    assert image_seed(7, x.double()) == seed
    assert image_seed(7, x.transpose(1, 2).contiguous().transpose(1, 2)) == seed  # memory layout does not count
    # 64-bit digests: another seed, another image or another shape collide with probability 2**-63.
    assert image_seed(8, x) != seed
    assert image_seed(7, x + 1) != seed
    assert image_seed(7, x.reshape(3, 784)) != seed
    with pytest.raises(ValueError, match=r"tokenkern.image_seed: seed must be in \[0, "):
        image_seed(-1, x)
    with pytest.raises(TypeError, match=r"tokenkern\.image_seed: pixels must be a floating-point tensor"):
        image_seed(0, x.long())
    with pytest.raises(TypeError, match=r"tokenkern\.image_seed: pixels must be a torch\.Tensor"):
        image_seed(0, [1.0])


def _random_keeps(tiny, pixels: list[torch.Tensor], gen, seed=3) -> list[torch.Tensor]:
    """The keep mask of each image when all of them go in one batch (a sample each)."""
    n = len(pixels)
    prompts = [[1, 5 + i] + [None] + [7] * (i + 1) for i in range(n)]
    inputs = _inputs(tiny, prompts, gen) if not tiny.name.startswith("qwen") else tiny.inputs([[1, 5, 6]] * n, gen)
    inputs["pixel_values"] = torch.cat(pixels) if tiny.name.startswith("qwen") else torch.stack(pixels)
    with tokenkern.prune(tiny.model, "random", keep=0.25, seed=seed) as handle, torch.no_grad():
        tiny.model(**inputs)
        return [k.clone() for k in handle.parts[0].keeps]


@pytest.mark.parametrize("name", ["llava", "llava_next", "qwen2_vl"])
def test_random_draws_the_same_tokens_for_the_same_image_anywhere(name, gen):
    """Alone, first or second in a batch with other images, in a second call and after a new
    prune() with the same seed: the same image keeps the same tokens (LLaVA: its pixel_values
    row; LLaVA-NeXT: its crops; Qwen2-VL: its rows of pixel_values)."""
    tiny = build(name)
    shape = {"llava": (3, 28, 28), "llava_next": (3, 3, 28, 28), "qwen2_vl": (64, 3 * 2 * 14 * 14)}[name]
    a, b, c = (torch.randn(*shape, generator=gen) for _ in range(3))
    alone = _random_keeps(tiny, [a], gen)[0]
    assert int(alone.sum()) == M.keep_count(0.25, tiny.tokens_per_image)
    assert torch.equal(_random_keeps(tiny, [b, a], gen)[1], alone)
    assert torch.equal(_random_keeps(tiny, [a, c], gen)[0], alone)
    assert torch.equal(_random_keeps(tiny, [c, b, a], gen)[2], alone)
    assert torch.equal(_random_keeps(tiny, [a], gen)[0], alone)


def test_random_draws_differently_for_different_images(gen):
    """LLaVA-NeXT images have 52 tokens and keep 13: two images get distinct generator seeds
    (64-bit digests of different pixels: equal with probability 2**-63) and hence two
    independent uniform 13-subsets of 52, equal with probability 1 / C(52, 13) < 2e-12; and a
    different seed changes the draw of the same image with the same probability."""
    assert 1 / math.comb(52, 13) < 2e-12
    tiny = build("llava_next")
    a, b = (torch.randn(3, 3, 28, 28, generator=gen) for _ in range(2))
    keeps = _random_keeps(tiny, [a, b], gen)
    assert not torch.equal(keeps[0], keeps[1])
    assert not torch.equal(_random_keeps(tiny, [a], gen, seed=4)[0], keeps[0])
