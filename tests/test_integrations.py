"""tokenkern.prune on real transformers VLM classes, built from tiny random configs (no
downloads): LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL. For each, a vision-side and an
LLM-side method: keep=100% changes nothing, keep=25% shortens what the layers after the
pruning point see, a left-padded batch equals its samples run alone, generate() works,
remove() restores the model exactly, and the attention implementation stays SDPA."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch
import transformers
from testing import assert_rel_close

import tokenkern
import tokenkern.methods as M
from tokenkern.integrations.adapters import clip_layers, parts_of
from tokenkern.methods.baselines import RandomConfig, image_seed, random_select

IMAGE = 127  # placeholder token id of the tiny LLaVA models
VOCAB = 128


@dataclass
class Tiny:
    name: str
    model: torch.nn.Module
    tokens_per_image: int
    vision_method: str
    vision_options: dict | None = None

    def inputs(self, prompts: list[list[int]], gen: torch.Generator) -> dict:
        """Left-padded batch; each prompt is a list of token ids with image placeholders
        expanded by the caller."""
        raise NotImplementedError


def _llama(hidden=64, layers=4):
    return transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )  # fmt: skip


def _clip():
    return transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28, patch_size=7
    )


def _left_pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, length - len(s) :] = torch.tensor(s)
        mask[i, length - len(s) :] = 1
    return ids, mask


class TinyLlava(Tiny):
    def inputs(self, prompts, gen):
        seqs = [p[:3] + [IMAGE] * 16 + p[3:] for p in prompts]
        ids, mask = _left_pad(seqs)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "pixel_values": torch.randn(len(prompts), 3, 28, 28, generator=gen),
        }


class TinyLlavaNext(Tiny):
    def inputs(self, prompts, gen):
        seqs = [p[:3] + [IMAGE] * self.tokens_per_image + p[3:] for p in prompts]
        ids, mask = _left_pad(seqs)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "pixel_values": torch.randn(len(prompts), 3, 3, 28, 28, generator=gen),
            "image_sizes": torch.tensor([[28, 56]] * len(prompts)),
        }


class TinyQwen(Tiny):
    def inputs(self, prompts, gen):
        cfg = self.model.config
        img = [cfg.vision_start_token_id] + [cfg.image_token_id] * 16 + [cfg.vision_end_token_id]
        seqs = [p[:3] + img + p[3:] for p in prompts]
        ids, mask = _left_pad(seqs)
        n = len(prompts)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "pixel_values": torch.randn(n * 64, 3 * 2 * 14 * 14, generator=gen),
            "image_grid_thw": torch.tensor([[1, 8, 8]] * n),
            # what the processor returns beside input_ids: 1 marks image tokens (M-RoPE)
            "mm_token_type_ids": (ids == cfg.image_token_id).int(),
        }


def build(name: str) -> Tiny:
    torch.manual_seed(0)
    if name == "llava":
        cfg = transformers.LlavaConfig(
            vision_config=_clip(), text_config=_llama(), image_token_index=IMAGE, vision_feature_layer=-2
        )
        return TinyLlava(name, transformers.LlavaForConditionalGeneration(cfg).eval(), 16, "fastervlm")
    if name == "llava_next":
        cfg = transformers.LlavaNextConfig(
            vision_config=_clip(), text_config=_llama(), image_token_index=IMAGE,
            image_grid_pinpoints=[[28, 56], [56, 28]], vision_feature_layer=-2,
        )  # fmt: skip
        model = transformers.LlavaNextForConditionalGeneration(cfg).eval()
        with torch.no_grad():
            feats = model.model.get_image_features(
                torch.zeros(1, 3, 3, 28, 28), torch.tensor([[28, 56]]), vision_feature_layer=-2,
                vision_feature_select_strategy="default",
            ).pooler_output  # fmt: skip
        return TinyLlavaNext(name, model, feats[0].shape[0], "lofi", {"rank": 8})
    cls_name = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}[name]
    cfg_name = {"qwen2_vl": "Qwen2VLConfig", "qwen2_5_vl": "Qwen2_5_VLConfig"}[name]
    if not hasattr(transformers, cls_name):
        pytest.skip(f"this transformers has no {cls_name}")
    vision = dict(depth=2, hidden_size=64, num_heads=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    vision.update(in_chans=3, in_channels=3, embed_dim=32, intermediate_size=64, out_hidden_size=64)
    text = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
    )
    text.update(vocab_size=VOCAB + 32, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    text["rope_parameters"] = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    cfg = getattr(transformers, cfg_name)(
        vision_config=vision, text_config=text, image_token_id=VOCAB + 1, video_token_id=VOCAB + 2,
        vision_start_token_id=VOCAB + 3, vision_end_token_id=VOCAB + 4,
    )  # fmt: skip
    # LoFi at rank 4 of 16 tokens: a full-rank sketch would give every token leverage 1 (all ties).
    return TinyQwen(name, getattr(transformers, cls_name)(cfg).eval(), 16, "lofi", {"rank": 4})


MODELS = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"]
PROMPTS = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 12, 13, 14, 15]]


@pytest.fixture(scope="module", params=MODELS)
def tiny(request):
    return build(request.param)


def _methods(tiny: Tiny):
    return [tiny.vision_method, "fastv"]


def _options(tiny: Tiny, method: str) -> dict:
    return dict(tiny.vision_options or {}) if method == tiny.vision_method else {}


def _forward(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _generate(model, inputs, n=6):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False, min_new_tokens=n)


def _layer_lengths(model) -> tuple[list[int], list]:
    seen: list[int] = []
    layers = model.model.language_model.layers

    def record(module, args, kwargs):
        seen.append(kwargs["hidden_states"].shape[1])

    handles = [layer.self_attn.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
    return seen, handles


def test_attention_implementation_is_sdpa(tiny):
    assert tiny.model.config._attn_implementation == "sdpa"
    with tokenkern.prune(tiny.model, "fastv", keep=0.25):
        assert tiny.model.config._attn_implementation == "sdpa"
        assert tiny.model.config.text_config._attn_implementation == "sdpa"


@pytest.mark.parametrize("which", [0, 1])
def test_keep_everything_changes_nothing(tiny, which, gen):
    method = _methods(tiny)[which]
    inputs = tiny.inputs(PROMPTS[:1], gen)
    ref_logits, ref_tokens = _forward(tiny.model, inputs), _generate(tiny.model, inputs)
    with tokenkern.prune(tiny.model, method, keep=1.0, **_options(tiny, method)):
        logits, tokens = _forward(tiny.model, inputs), _generate(tiny.model, inputs)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("which", [0, 1])
def test_quarter_keep_shortens_the_layers_after_the_pruning_point(tiny, which, gen):
    method = _methods(tiny)[which]
    inputs = tiny.inputs(PROMPTS[:1], gen)
    length = inputs["input_ids"].shape[1]
    kept = tokenkern.methods.keep_count(0.25, tiny.tokens_per_image)
    expected = length - (tiny.tokens_per_image - kept)
    seen, hooks = _layer_lengths(tiny.model)
    start = 0 if which == 0 else 2
    with tokenkern.prune(tiny.model, method, keep=0.25, **_options(tiny, method)):
        logits = _forward(tiny.model, inputs)
    for h in hooks:
        h.remove()
    n_layers = len(tiny.model.model.language_model.layers)
    assert seen == [length] * start + [expected] * (n_layers - start)
    assert logits.shape[1] == expected


@pytest.mark.parametrize("which", [0, 1])
def test_generate_after_pruning(tiny, which, gen):
    method = _methods(tiny)[which]
    inputs = tiny.inputs(PROMPTS[:1], gen)
    seen, hooks = _layer_lengths(tiny.model)
    with tokenkern.prune(tiny.model, method, keep=0.25, **_options(tiny, method)):
        tokens = _generate(tiny.model, inputs, n=4)
    for h in hooks:
        h.remove()
    assert tokens.shape == (1, inputs["input_ids"].shape[1] + 4)
    assert seen[-1] == 1  # decoding steps feed one token at a time through every layer


@pytest.mark.parametrize("which", [0, 1])
def test_hand_written_decoding_loop_matches_generate(tiny, which, gen):
    """A loop that feeds one token and the cache per step, with no attention mask and no
    position ids, computes the logits generate() does: each step keeps its place in the full
    sequence although the pruned cache is shorter (Qwen2-VL derives it from the cache length)."""
    method = _methods(tiny)[which]
    inputs = tiny.inputs(PROMPTS[:1], gen)
    with tokenkern.prune(tiny.model, method, keep=0.25, **_options(tiny, method)), torch.no_grad():
        ref = tiny.model.generate(**inputs, max_new_tokens=4, do_sample=False, min_new_tokens=4,
                                  output_logits=True, return_dict_in_generate=True)  # fmt: skip
        out = tiny.model(**inputs, use_cache=True)
        logits = [out.logits[:, -1]]
        # feed the tokens generate() chose: min_new_tokens masks EOS before its argmax, which the
        # raw logits it returns do not show
        chosen = ref.sequences[:, inputs["input_ids"].shape[1] :]
        for i in range(3):
            out = tiny.model(input_ids=chosen[:, i : i + 1], past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits[:, -1])
    assert_rel_close(torch.stack(logits, 1), torch.stack(ref.logits, 1), 1e-5)


@pytest.mark.parametrize("which", [0, 1])
def test_padded_batch_equals_single_samples(tiny, which, gen):
    method = _methods(tiny)[which]
    batch = tiny.inputs(PROMPTS, gen)
    singles = []
    for i in range(2):
        one = tiny.inputs(PROMPTS[i : i + 1], gen)
        for key in ("pixel_values",):  # the same image for the sample alone
            if tiny.name.startswith("qwen"):
                one[key] = batch[key][i * 64 : (i + 1) * 64]
            else:
                one[key] = batch[key][i : i + 1]
        singles.append(one)
    with tokenkern.prune(tiny.model, method, keep=0.25, **_options(tiny, method)):
        batched = _generate(tiny.model, batch, n=5)
        alone = [_generate(tiny.model, s, n=5) for s in singles]
    for i in range(2):
        assert torch.equal(batched[i, -5:], alone[i][0, -5:]), f"sample {i}"


@pytest.mark.parametrize("method", ["fastv", "sparsevlm", "ficoco-l"])
def test_batch_with_an_unpruned_sample_equals_singles(method, gen):
    """A text-only sample keeps every position, so the pruned batch is as long as the full
    one; the image sample's logits must still equal its own run (hidden states are gathered
    once, at the first pruned layer, whatever their length)."""
    tiny = build("llava")
    img_prompt = [1, 5, 6] + [IMAGE] * 16 + [7, 8, 9, 10]
    txt_prompt = [1, 12, 13, 14, 15, 16, 17]
    pixels = torch.randn(1, 3, 28, 28, generator=gen)

    def last_logits(prompts, row):
        ids, mask = _left_pad(prompts)
        with torch.no_grad():
            return tiny.model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits[row, -1]

    with tokenkern.prune(tiny.model, method, keep=0.25, layer=2):
        batched = last_logits([txt_prompt, img_prompt], 1)
        alone = last_logits([img_prompt], 0)
    assert_rel_close(batched, alone, 1e-5)


@pytest.mark.parametrize(("method", "options"), [("fastv", {}), ("sparsevlm", {"layer": 2}), ("ficoco-l", {"layer": 2}),
                                                 ("lofi", {"rank": 4}), ("fastervlm", {}), ("random", {})])  # fmt: skip
@pytest.mark.parametrize("keep", [4, 0.25])
def test_keep_is_per_image_with_two_images(method, options, keep, gen):
    tiny = build("llava")
    prompt = [1, 5, 6] + [IMAGE] * 16 + [7, 8] + [IMAGE] * 16 + [9, 10]
    ids, mask = _left_pad([prompt])
    image = ids[0] == IMAGE
    with tokenkern.prune(tiny.model, method, keep=keep, **options) as handle, torch.no_grad():
        tiny.model(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 3, 28, 28, generator=gen))
        kept = handle.decoder.gather.idx[0][handle.decoder.gather.valid[0]]
    kept_image = kept[image[kept]]
    first = kept_image < 19
    assert int(first.sum()) == 4 and int((~first).sum()) == 4, kept_image.tolist()


def test_random_draws_differ_per_image_and_replay_per_call(gen):
    """The draw is a function of (seed, the image's pixels): each image of a sample draws from
    the generator its own pixels seed, a second call and a new prune() with the same seed replay it (the replay at
    any batch position: tests/test_prune_positions.py)."""
    tiny = build("llava")
    prompt = [1, 5, 6] + [IMAGE] * 16 + [7, 8] + [IMAGE] * 16 + [9, 10]
    ids, mask = _left_pad([prompt])
    pixels = torch.randn(2, 3, 28, 28, generator=gen)

    def kept_positions(handle):
        with torch.no_grad():
            tiny.model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        kept = handle.decoder.gather.idx[0]
        return kept[(ids[0] == IMAGE)[kept]].tolist()

    with tokenkern.prune(tiny.model, "random", keep=4, seed=3) as handle:
        first, second = kept_positions(handle), kept_positions(handle)
    offsets = [[p - 3 for p in first[:4]], [p - 21 for p in first[4:]]]
    # Each image's draw is exactly random_select's with the generator its own pixels seed (two
    # images share a seed with probability 2^-63; their 4-of-16 draws may still coincide).
    seeds = [image_seed(3, pixels[i]) for i in range(2)]
    assert seeds[0] != seeds[1]
    for i in range(2):
        gen_i = torch.Generator().manual_seed(seeds[i])
        want = random_select(torch.zeros(1, 16, 1), RandomConfig(keep=4, seed=3), generator=gen_i).indices[0]
        assert offsets[i] == want.tolist(), f"image {i} did not draw from its own seed"
    assert first == second, "a second call on the same images drew other patches"
    with tokenkern.prune(tiny.model, "random", keep=4, seed=3) as handle:
        assert kept_positions(handle) == first


def test_a_failed_forward_leaves_no_stale_state(gen):
    tiny = build("llava")
    inputs = tiny.inputs(PROMPTS[:1], gen)
    text_only = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        want = tiny.model(input_ids=text_only).logits
    with tokenkern.prune(tiny.model, "fastv", keep=0.25, layer=2) as handle, torch.no_grad():
        handle.decoder.selector, selector = (lambda state: 1 / 0), handle.decoder.selector
        with pytest.raises(ZeroDivisionError):
            tiny.model(**inputs)
        handle.decoder.selector = selector
        assert torch.equal(tiny.model(input_ids=text_only).logits, want)
        assert torch.isfinite(tiny.model(**inputs).logits).all()


def test_remove_restores_bit_identical_outputs(tiny, gen):
    inputs = tiny.inputs(PROMPTS, gen)
    before = _forward(tiny.model, inputs)
    for method in _methods(tiny):
        handle = tokenkern.prune(tiny.model, method, keep=0.25, **_options(tiny, method))
        _forward(tiny.model, inputs)
        handle.remove()
    after = _forward(tiny.model, inputs)
    assert torch.equal(before, after)
    assert "get_image_features" not in tiny.model.model.__dict__


def tiny_clip(model) -> transformers.CLIPModel:
    """A random CLIPModel whose vision tower has the LLaVA tower's shape (the projection pairs
    with it); the LLaVA's own tower is what prune() runs."""
    torch.manual_seed(1)
    text = transformers.CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       vocab_size=99, max_position_embeddings=77, projection_dim=24, bos_token_id=97,
                                       eos_token_id=98, pad_token_id=0)  # fmt: skip
    cfg = transformers.CLIPConfig(text_config=text.to_dict(), vision_config=_clip().to_dict(), projection_dim=24)
    return transformers.CLIPModel(cfg).eval()


def test_llava_all_methods_run_and_prune(gen):
    tiny = build("llava")
    inputs = tiny.inputs(PROMPTS, gen)
    full = inputs["input_ids"].shape[1]
    offered = [n for n in M.registry.names() if type(tiny.model).__name__ in M.registry.get(n).models]
    for method in offered:
        options = {"layer": 2} if method in ("ficoco-l", "sparsevlm") else {}  # defaults need deeper decoders
        if method == "cdpruner":  # conditioned on CLIP text embeddings: the paired CLIP model
            options = {"text_encoder": tiny_clip(tiny.model)}
        with tokenkern.prune(tiny.model, method, keep=0.25, **options) as handle:
            if method == "cdpruner":
                handle.set_text_embeds(torch.randn(2, 1, 24, generator=gen))
            logits = _forward(tiny.model, inputs)
            if method == "cdpruner":
                handle.set_text_embeds(torch.randn(2, 1, 24, generator=gen))
            tokens = _generate(tiny.model, inputs, n=3)
        assert logits.shape[1] == full - 12, method
        assert torch.isfinite(logits).all(), method
        assert tokens.shape[1] == full + 3, method


def test_layer_defaults_come_from_the_method_configs(gen):
    """prune()'s default layer is the config's: K for the LLM-side methods; for the CLIP
    methods the layer feeding the projector (vision_feature_layer=-2 here) or prumerge+'s last.
    (sparsevlm's and ficoco-l's defaults need deeper decoders: tests/test_layer_convention.py.)"""
    tiny = build("llava")
    clip = clip_layers(parts_of(tiny.model).clip_tower)
    expected = {"fastervlm": len(clip) - 2, "visionzip": len(clip) - 2, "ficoco-v": len(clip) - 2,
                "prumerge+": len(clip) - 1}  # fmt: skip
    for method, idx in expected.items():
        with tokenkern.prune(tiny.model, method, keep=0.5) as handle:
            assert handle.parts[0].capture.attn is clip[idx].self_attn, method
        with tokenkern.prune(tiny.model, method, keep=0.5, layer=0) as handle:
            assert handle.parts[0].capture.attn is clip[0].self_attn, method
    inputs = tiny.inputs(PROMPTS[:1], gen)
    length = inputs["input_ids"].shape[1]
    for method, cfg in (("fastv", M.FastVConfig),):
        seen, hooks = _layer_lengths(tiny.model)
        with tokenkern.prune(tiny.model, method, keep=0.25):
            _forward(tiny.model, inputs)
        for h in hooks:
            h.remove()
        assert seen[: cfg.layer] == [length] * cfg.layer and seen[cfg.layer] < length, (method, seen)


def test_cls_methods_refuse_a_tower_without_cls():
    """A SigLIP tower has no [CLS]: the [CLS]-attention methods refuse it when installed, naming
    the tower; the other methods still prune."""
    torch.manual_seed(0)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                             num_attention_heads=4, image_size=28, patch_size=7)  # fmt: skip
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=_llama(), image_token_index=IMAGE,
                                   vision_feature_layer=-2, vision_feature_select_strategy="full")  # fmt: skip
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    for method in ("fastervlm", "visionzip", "prumerge+", "ficoco-v"):
        with pytest.raises(ValueError, match=f"{re.escape(method)} reads a CLIP tower.*SiglipVisionModel tower"):
            tokenkern.prune(model, method)
    ids = torch.tensor([[1] + [IMAGE] * 16 + [5, 6, 7]])
    with tokenkern.prune(model, "lofi", keep=0.25, rank=4), torch.no_grad():
        logits = model(
            input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(1, 3, 28, 28)
        ).logits
    assert logits.shape[1] == ids.shape[1] - 12


def test_bad_calls():
    tiny = build("llava")
    with pytest.raises(ValueError, match="unknown method"):
        tokenkern.prune(tiny.model, "nope")
    with pytest.raises(ValueError, match="keep as a fraction"):
        tokenkern.prune(tiny.model, "fastv", keep=1.5)
    with pytest.raises(ValueError, match="layer must be in"):
        tokenkern.prune(tiny.model, "fastv", layer=9)
    with pytest.raises(ValueError, match="unknown options"):
        tokenkern.prune(tiny.model, "fastv", colour="blue")
    with pytest.raises(ValueError, match="query must be 'last' or 'text'"):
        tokenkern.prune(tiny.model, "fastv", query="txt")
    with pytest.raises(ValueError, match=re.escape("layer for fastervlm must be in [-3, 3)")):
        tokenkern.prune(tiny.model, "fastervlm", layer=7)
    with pytest.raises(ValueError, match="unsupported model class"):
        tokenkern.prune(torch.nn.Linear(2, 2), "fastv")
    qwen = build("qwen2_vl")
    with pytest.raises(ValueError, match="CLIP tower"):
        tokenkern.prune(qwen.model, "visionzip")
    # A failed call leaves nothing installed.
    assert not tiny.model.model.language_model._forward_pre_hooks
    # One method at a time: a second prune() is refused until the first handle is removed.
    handle = tokenkern.prune(tiny.model, "visionzip", keep=0.5)
    with pytest.raises(ValueError, match="already prunes with 'visionzip'"):
        tokenkern.prune(tiny.model, "fastv")
    handle.remove()
    handle.remove()  # idempotent
    with tokenkern.prune(tiny.model, "fastv", keep=0.5):
        pass
    assert not tiny.model.model.language_model._forward_pre_hooks
    assert "_tokenkern_prune_handle" not in vars(tiny.model)


def _rotary_seen(model, layer_idx):
    seen = []
    attn = model.model.language_model.layers[layer_idx].self_attn
    handle = attn.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["position_embeddings"][0].detach().clone()), with_kwargs=True
    )
    return seen, handle


@pytest.mark.parametrize("which", [0, 1])
def test_kept_tokens_keep_their_original_positions(tiny, which, gen):
    """With positions="original", the rotary embedding a pruned layer applies to each kept token
    is the one of that token's original position (for Qwen2-VL: its 3-D M-RoPE position)."""
    method = _methods(tiny)[which]
    layer_idx = 0 if which == 0 else 3
    inputs = tiny.inputs(PROMPTS[:1], gen)
    full, h = _rotary_seen(tiny.model, layer_idx)
    _forward(tiny.model, inputs)
    h.remove()
    pruned, h = _rotary_seen(tiny.model, layer_idx)
    with tokenkern.prune(tiny.model, method, keep=0.25, positions="original", **_options(tiny, method)) as handle:
        _forward(tiny.model, inputs)
        kept = handle.decoder.gather.idx[0]
    h.remove()
    table, got = full[0][0], pruned[0][0]  # (L, d) and (L', d)
    assert got.shape[0] == kept.numel() < table.shape[0]
    assert torch.equal(got, table[kept])
    assert bool((kept[1:] > kept[:-1]).all()) and int(kept[-1]) == table.shape[0] - 1


def test_fastv_cache_holds_only_what_later_layers_see(gen):
    tiny = build("llava")
    inputs = tiny.inputs(PROMPTS[:1], gen)
    length = inputs["input_ids"].shape[1]
    with tokenkern.prune(tiny.model, "fastv", keep=0.25, layer=2), torch.no_grad():
        out = tiny.model(**inputs, use_cache=True)
        cache = out.past_key_values
        sizes = [cache.layers[i].keys.shape[-2] for i in range(4)]
        assert sizes == [length, length, length - 12, length - 12]
        step = tiny.model(
            input_ids=torch.tensor([[9]]), attention_mask=torch.ones(1, length + 1, dtype=torch.long),
            past_key_values=cache, position_ids=torch.tensor([[length]]), use_cache=True,
        )  # fmt: skip
        sizes = [cache.layers[i].keys.shape[-2] for i in range(4)]
        assert sizes == [length + 1, length + 1, length - 11, length - 11]
        assert torch.isfinite(step.logits).all()
