"""tokenkern.prune with the diversity methods (divprune, dart, dart-embeddings, mmr, cdpruner)
on tiny random transformers VLMs: the pruned model computes what running the recipe by hand
on the unpruned model's own tensors and feeding the kept tokens computes; kept counts, per-crop
selection on LLaVA-NeXT, padded batches and the CLIP text tower of CDPruner."""

from __future__ import annotations

import pytest
import torch
import transformers
from test_integrations import IMAGE, PROMPTS, _left_pad, build, tiny_clip
from testing import assert_rel_close
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import tokenkern
import tokenkern.methods as M
from tokenkern.integrations.sequence import image_ids, text_after_first_image

PROMPT = [1, 5, 6] + [IMAGE] * 16 + [7, 8, 9, 10, 11]
STEPS = 4
TOL = 1e-5  # float32 forward passes of identical math, summed in a different order at most


@pytest.fixture(scope="module")
def llava():
    return build("llava").model


def _inputs(gen, prompt=PROMPT, images=1):
    ids, mask = _left_pad([prompt])
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(images, 3, 28, 28, generator=gen)}


def _decoder_inputs(model, inputs) -> torch.Tensor:
    """(1, L, D) the input embeddings the unpruned model assembles (image features scattered)."""
    seen = []
    lm = model.model.language_model
    hook = lm.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["inputs_embeds"]), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    return seen[0]


def _run_by_hand(model, embeds, keep, start: int, tokens: torch.Tensor):
    """Decoder layers 0 .. start-1 on every position, the layers from start on the positions of
    keep (1, L) with their original positions, then greedy steps fed `tokens` (1, STEPS - 1);
    -> logits (1, STEPS, V) of the last prefill position and every step."""
    lm = model.model.language_model
    length = embeds.shape[1]
    pos = torch.arange(length)[None]
    kept = keep[0].nonzero().flatten()
    cache = transformers.DynamicCache()
    with torch.no_grad():
        h, pe = embeds, lm.rotary_emb(embeds, position_ids=pos)
        for i, layer in enumerate(lm.layers):
            if i == start:
                h, pe = h[:, kept], tuple(t[:, kept] for t in pe)
            h = layer(h, attention_mask=None, position_embeddings=pe, past_key_values=cache, use_cache=True)
        logits = [model.lm_head(lm.norm(h))[:, -1]]
        for t in range(tokens.shape[1]):
            step_pos = torch.tensor([[length + t]])
            out = lm(inputs_embeds=lm.embed_tokens(tokens[:, t : t + 1]), position_ids=step_pos,
                     past_key_values=cache, use_cache=True)  # fmt: skip
            logits.append(model.lm_head(out.last_hidden_state)[:, -1])
    return torch.stack(logits, dim=1)


def _pruned_generate(model, inputs, method, text=None, **options):
    with tokenkern.prune(model, method, **options) as handle, torch.no_grad():
        if text is not None:
            handle.set_text_embeds(text)
        out = model.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)  # fmt: skip
        kept = handle.decoder.gather.idx[0].clone()
    return torch.stack(out.logits, dim=1), out.sequences[:, -STEPS:-1], kept


def _mask(length: int, kept: torch.Tensor) -> torch.Tensor:
    return torch.zeros(1, length, dtype=torch.bool).index_fill_(1, kept, True)


def _image_keep(image: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """keep mask (1, L): every non-image position plus the image positions at indices (1, k)."""
    where = (image[0] >= 0).nonzero().flatten()
    keep = image < 0
    keep[0, where[indices[0]]] = True
    return keep


def _check(model, inputs, method, keep_by_hand, start=0, text=None, **options):
    """The by-hand run keeps the original position ids: so does the pruned model here."""
    embeds = _decoder_inputs(model, inputs)
    logits, tokens, kept = _pruned_generate(model, inputs, method, text, positions="original", **options)
    assert torch.equal(_mask(embeds.shape[1], kept), keep_by_hand), (kept.tolist(), keep_by_hand.nonzero().tolist())
    assert_rel_close(logits, _run_by_hand(model, embeds, keep_by_hand, start, tokens), TOL, f"{method} logits")


@pytest.mark.parametrize("keep", [0.25, 5, 0.5])
def test_divprune_equals_the_recipe_on_the_image_features(llava, keep, gen):
    inputs = _inputs(gen)
    embeds = _decoder_inputs(llava, inputs)
    image = image_ids(inputs["input_ids"], IMAGE)
    red = M.divprune(embeds[:, image[0] >= 0].float(), M.DivPruneConfig(keep=keep))
    assert red.indices.shape[1] == M.divprune_count(keep, 16)
    _check(llava, inputs, "divprune", _image_keep(image, red.indices), keep=keep)


def test_divprune_defaults_to_a_quarter_in_prune(llava, gen):
    inputs = _inputs(gen)
    _, _, kept = _pruned_generate(llava, inputs, "divprune")
    assert kept.numel() == inputs["input_ids"].shape[1] - 16 + round(0.25 * 16)


@pytest.mark.parametrize("keep", [0.25, 6])
def test_dart_embeddings_equals_the_recipe_on_the_input_embeddings(llava, keep, gen):
    inputs = _inputs(gen)
    embeds = _decoder_inputs(llava, inputs)
    image = image_ids(inputs["input_ids"], IMAGE)
    last = int((image[0] >= 0).nonzero().max())
    red = M.dart_embeddings(embeds[:, image[0] >= 0], M.DARTConfig(keep=keep), text=embeds[:, last + 1 :])
    _check(llava, inputs, "dart-embeddings", _image_keep(image, red.indices), keep=keep)


def _dart_by_hand(model, inputs, cfg: M.DARTConfig) -> torch.Tensor:
    """DART's keep mask from the unpruned model: layer K-1's post-RoPE keys and the final norm
    of its output, computed here from the layers' own modules."""
    lm = model.model.language_model
    embeds = _decoder_inputs(model, inputs)
    length = embeds.shape[1]
    pos = torch.arange(length)[None]
    image = image_ids(inputs["input_ids"], IMAGE)
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        # the unpruned model's own hidden states: hs[K-1] enters layer K-1, hs[K] leaves it
        hs = model(**inputs, output_hidden_states=True).hidden_states
        cos, sin = lm.rotary_emb(embeds, position_ids=pos)
        attn = lm.layers[cfg.layer - 1].self_attn
        x = lm.layers[cfg.layer - 1].input_layernorm(hs[cfg.layer - 1])
        q = attn.q_proj(x).view(1, length, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(1, length, -1, attn.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        layer = M.DecoderLayer(q, k, attn.scaling, valid, image, text_after_first_image(image, valid))
        return M.dart(layer, lm.norm(hs[cfg.layer]), cfg).keep_mask


@pytest.mark.parametrize(("keep", "budget"), [(8, 8), (16, 16), (0.5, 8)])
@pytest.mark.parametrize("pivot_order", ["released", "ascending"])
def test_dart_equals_the_recipe_on_layer_k_minus_1(llava, keep, budget, pivot_order, gen):
    """dart at layer K=2: the keys of layer 1 and the final norm of its output, by hand; a
    fraction keep is the budget keep_count(keep, image tokens)."""
    inputs = _inputs(gen)
    norm = llava.model.language_model.norm
    weight = norm.weight.detach().clone()
    try:
        with torch.no_grad():  # a non-uniform weight: cosine similarity sees whether the norm is applied
            norm.weight.copy_(0.25 + 2 * torch.rand(weight.shape, generator=gen))
        want = _dart_by_hand(llava, inputs, M.DARTConfig(keep=budget, pivot_order=pivot_order))
        n_image = int((want & (image_ids(inputs["input_ids"], IMAGE) >= 0)).sum())
        assert n_image == min(16, M.dart_kept(budget))
        _check(llava, inputs, "dart", want, start=2, keep=keep, pivot_order=pivot_order)
    finally:
        with torch.no_grad():
            norm.weight.copy_(weight)


def test_mmr_equals_the_recipe_on_the_cls_attention(llava, gen):
    """mmr (vision tower): importance = the [CLS] attention of the CLIP layer feeding the
    projector, similarity on the projector input, by hand from the tower's hidden states."""
    inputs = _inputs(gen)
    tower = llava.model.vision_tower
    with torch.no_grad():
        hs = tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
        layer = getattr(tower, "vision_model", tower).encoder.layers[-2]
        x = layer.layer_norm1(hs[-3])
        attn = layer.self_attn
        split = lambda t: t.view(1, t.shape[1], -1, attn.head_dim).transpose(1, 2)  # noqa: E731
        vl = M.VisionLayer(split(attn.q_proj(x)), split(attn.k_proj(x)), attn.scale)
        red = M.mmr(hs[-2][:, 1:], vl.cls_attention(), M.MMRConfig(keep=0.25))
    image = image_ids(inputs["input_ids"], IMAGE)
    _check(llava, inputs, "mmr", _image_keep(image, red.indices), keep=0.25)


# --------------------------------------------------------------------------------- CDPruner


class _Tokenizer:
    """A stand-in CLIP tokenizer: one id per character (BOS 97, EOS 98), no truncation."""

    pad_token_id = 0

    def __call__(self, text: str) -> dict:
        return {"input_ids": [97] + [1 + ord(c) % 90 for c in text] + [98]}


def _clip_image_emb(llava, clip, pixels):
    tower = llava.model.vision_tower
    with torch.no_grad():
        hs = tower(pixels, output_hidden_states=True).hidden_states
        return clip.visual_projection(getattr(tower, "vision_model", tower).post_layernorm(hs[-2][:, 1:]))


@pytest.mark.parametrize("keep", [0.25, 7])
def test_cdpruner_equals_the_recipe_with_the_clip_embeddings(llava, keep, gen):
    clip = tiny_clip(llava)
    inputs = _inputs(gen)
    text = torch.randn(1, 2, 24, generator=gen)
    embeds = _decoder_inputs(llava, inputs)
    image = image_ids(inputs["input_ids"], IMAGE)
    emb = _clip_image_emb(llava, clip, inputs["pixel_values"])
    red = M.cdpruner(embeds[:, image[0] >= 0].float(), emb, text, M.CDPrunerConfig(keep=keep))
    _check(llava, inputs, "cdpruner", _image_keep(image, red.indices), keep=keep, text_encoder=clip, text=text)


def test_cdpruner_set_text_splits_into_77_token_segments(llava, gen):
    clip = tiny_clip(llava)
    tok = _Tokenizer()
    question = "what is on the table next to the red cup? " * 3  # 131 characters: two segments
    ids = tok(question)["input_ids"]
    segments = torch.zeros(2, 77, dtype=torch.long)
    attn = torch.zeros(2, 77, dtype=torch.long)
    for i in range(2):
        part = ids[77 * i : 77 * (i + 1)]
        segments[i, : len(part)] = torch.tensor(part)
        attn[i, : len(part)] = 1
    with torch.no_grad():
        text = clip.get_text_features(input_ids=segments, attention_mask=attn).pooler_output[None]
    inputs = _inputs(gen)
    image = image_ids(inputs["input_ids"], IMAGE)
    embeds = _decoder_inputs(llava, inputs)
    emb = _clip_image_emb(llava, clip, inputs["pixel_values"])
    red = M.cdpruner(embeds[:, image[0] >= 0].float(), emb, text, M.CDPrunerConfig(keep=4))
    with tokenkern.prune(llava, "cdpruner", keep=4, text_encoder=clip, tokenizer=tok) as handle, torch.no_grad():
        handle.set_text(question)
        llava(**inputs)
        kept = handle.decoder.gather.idx[0]
        with pytest.raises(ValueError, match="needs the question of every sample"):
            llava(**inputs)  # the text is used once: a later call must bring its own
    assert torch.equal(_mask(embeds.shape[1], kept), _image_keep(image, red.indices))


def test_cdpruner_refuses_what_it_cannot_use(llava):
    clip = tiny_clip(llava)
    with pytest.raises(ValueError, match="text_encoder must be the CLIPModel"):
        tokenkern.prune(llava, "cdpruner")
    text_only = transformers.CLIPTextModelWithProjection(clip.config.text_config)
    with pytest.raises(ValueError, match="visual_projection must be"):
        tokenkern.prune(llava, "cdpruner", text_encoder=text_only)
    with tokenkern.prune(llava, "cdpruner", text_encoder=text_only, visual_projection=clip) as handle:
        with pytest.raises(ValueError, match=r"needs prune.*tokenizer"):
            handle.set_text("a question")
    qwen = build("qwen2_vl")
    with pytest.raises(ValueError, match="method must be one of"):
        tokenkern.prune(qwen.model, "cdpruner", text_encoder=clip)
    with tokenkern.prune(llava, "divprune") as handle, pytest.raises(ValueError, match="reads no text"):
        handle.set_text("a question")


# ------------------------------------------------------------------- other models, batches


@pytest.mark.parametrize("name", ["llava", "llava_next", "qwen2_vl"])
@pytest.mark.parametrize(("method", "keep"), [("divprune", 0.25), ("dart", 8), ("dart-embeddings", 0.25)])
def test_padded_batch_equals_single_samples(name, method, keep, gen):
    tiny = build(name)
    batch = tiny.inputs(PROMPTS, gen)
    per = 64 if name.startswith("qwen") else 1
    with tokenkern.prune(tiny.model, method, keep=keep), torch.no_grad():
        both = tiny.model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        for i in range(2):
            one = tiny.inputs(PROMPTS[i : i + 1], gen)
            one["pixel_values"] = batch["pixel_values"][i * per : (i + 1) * per]
            alone = tiny.model.generate(**one, max_new_tokens=3, min_new_tokens=3, do_sample=False)
            assert torch.equal(both[i, -3:], alone[0, -3:]), (name, method, i)


def test_cdpruner_batch_with_two_questions_equals_single_samples(gen):
    """Each image is reduced with its own sample's question in generate() (which, from
    transformers 5.19 on, encodes the images before the prefill sees the input_ids)."""
    tiny = build("llava")
    batch = tiny.inputs(PROMPTS, gen)
    text = torch.randn(2, 1, 24, generator=gen)
    with tokenkern.prune(tiny.model, "cdpruner", keep=4, text_encoder=tiny_clip(tiny.model)) as handle:
        reducer = next(p for p in handle.parts if hasattr(p, "keeps"))
        handle.set_text_embeds(text)
        with torch.no_grad():
            both = tiny.model.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        kept = [k.clone() for k in reducer.keeps]
        for i in range(2):
            one = tiny.inputs(PROMPTS[i : i + 1], gen)
            one["pixel_values"] = batch["pixel_values"][i : i + 1]
            handle.set_text_embeds(text[i : i + 1])
            with torch.no_grad():
                alone = tiny.model.generate(**one, max_new_tokens=5, min_new_tokens=5, do_sample=False)
            assert torch.equal(kept[i], reducer.keeps[0]), f"sample {i} kept"
            assert torch.equal(both[i, -5:], alone[0, -5:]), f"sample {i}"


def test_llava_next_divprune_runs_per_crop_and_keeps_the_newlines(gen):
    """The tiny LLaVA-NeXT image (28 x 56, crops 1 x 2) packs the base crop (16 tokens), then 4
    grid rows of 8 tokens + a newline: each crop keeps its own quarter, every newline stays."""
    tiny = build("llava_next")
    inputs = tiny.inputs(PROMPTS[:1], gen)
    with torch.no_grad():
        feats = tiny.model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output[0]
    assert feats.shape[0] == tiny.tokens_per_image == 16 + 4 * 9
    crops = torch.cat([torch.zeros(16, dtype=torch.long), (torch.tensor([1] * 4 + [2] * 4 + [-1])).repeat(4)])
    want = torch.zeros(feats.shape[0], dtype=torch.bool)
    want[crops < 0] = True
    for c in range(3):
        where = (crops == c).nonzero().flatten()
        want[where[M.divprune(feats[where][None].float(), M.DivPruneConfig(keep=0.25)).indices[0]]] = True
    with tokenkern.prune(tiny.model, "divprune", keep=0.25) as handle, torch.no_grad():
        tiny.model(**inputs)
        kept = handle.decoder.gather.idx[0]
    image = image_ids(inputs["input_ids"], tiny.model.config.image_token_index)[0]
    where = (image >= 0).nonzero().flatten()
    got = torch.zeros(where.numel(), dtype=torch.bool)
    got[(kept[image[kept] >= 0] - where[0])] = True
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["llava_next", "qwen2_vl"])
def test_dart_keeps_4_plus_8_per_8_of_the_budget(name, gen):
    tiny = build(name)
    inputs = tiny.inputs(PROMPTS[:1], gen)
    length = inputs["input_ids"].shape[1]
    with tokenkern.prune(tiny.model, "dart", keep=8) as handle, torch.no_grad():
        tiny.model(**inputs)
        kept = handle.decoder.gather.idx.shape[1]
    assert kept == length - tiny.tokens_per_image + M.dart_kept(8)
