"""The LLM-side layer convention of fastv, sparsevlm and ficoco-l, on tiny transformers LLaVA
models with random weights: ``layer=K`` means decoder layers 0 .. K-1 see every token, the
attention of layer K-1 scores, layers K, K+1, ... see the kept tokens. Scores are checked
against the eager attention weights that the same model returns (output_attentions) for the
layer the convention names, the pruning point against hidden-state lengths seen by hooks, and
SparseVLM's three-step schedule against its released layers and counts."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
import transformers
from test_integrations import _left_pad
from testing import assert_rel_close, rel_error

import tokenkern
import tokenkern.methods as M
from tokenkern.methods.sparsevlm import RELEASED_STEPS, step_counts

IMAGE = 127
VOCAB = 128
F32 = torch.finfo(torch.float32).eps


def tiny_llava(gen: torch.Generator, layers: int = 4, image_size: int = 28) -> torch.nn.Module:
    """A LLaVA-1.5-shaped model with fresh random weights: (image_size / 7)^2 image tokens,
    head_dim 16, GQA 4/2; weights large enough that attention is far from uniform."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    text = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, initializer_range=0.1,
    )  # fmt: skip
    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=image_size,
        patch_size=7,
    )  # fmt: skip
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE,
                                   vision_feature_layer=-2)  # fmt: skip
    return transformers.LlavaForConditionalGeneration(cfg).eval()


def batch(gen: torch.Generator, prompts: list[list[int]], n_image: int, image_size: int = 28) -> dict:
    """Left-padded prompts, each with one image of n_image placeholders after its 3rd token."""
    ids, mask = _left_pad([p[:3] + [IMAGE] * n_image + p[3:] for p in prompts])
    pixels = torch.randn(len(prompts), 3, image_size, image_size, generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


PROMPTS = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 12, 13, 14, 15]]


def record_steps(handle) -> list[SimpleNamespace]:
    """Wrap the handle's selector: every pruning step records what it scored with."""
    steps: list[SimpleNamespace] = []
    select = handle.decoder.selector

    def wrapped(state):
        out = select(state)
        raters = state.from_start(state.memo["raters"], False) if "raters" in state.memo else None
        steps.append(SimpleNamespace(step=state.step, q=state.q, k=state.k, scale=state.scale, valid=state.valid,
                                     image=state.image, text=state.text, raters=raters, keep=out[0]))  # fmt: skip
        return out

    handle.decoder.selector = wrapped
    return steps


def lengths_seen(model) -> tuple[list[int], list]:
    seen: list[int] = []

    def record(module, args, kwargs):
        seen.append(kwargs["hidden_states"].shape[1])

    layers = model.model.language_model.layers
    return seen, [layer.self_attn.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]


def softmax_of(rec: SimpleNamespace) -> torch.Tensor:
    """(B, Hq, L, L) float64 causal softmax attention of the recorded q/k over the valid keys."""
    k = rec.k.repeat_interleave(rec.q.shape[1] // rec.k.shape[1], dim=1)
    logits = (rec.q.double() @ k.double().mT) * rec.scale
    length = logits.shape[-1]
    allowed = rec.valid[:, None, None, :] & torch.ones(length, length, dtype=torch.bool).tril()
    return torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)


def attention_tol(length: int, head_dim: int = 16) -> float:
    """float32 eager attention vs float64: dot products of head_dim terms and a softmax sum of
    `length` terms, each rounding at most eps per term, with a factor 4 of headroom."""
    return 4 * (length + head_dim) * F32


def valid_rows(p: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The rows of (B, H, L, L) attention whose query is valid, flattened."""
    return p.transpose(1, 2)[valid]


def eager_forward(model, inputs) -> tuple:
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    return out.attentions


def check_scoring_layer(rec: SimpleNamespace, attentions: tuple, k: int) -> torch.Tensor:
    """The q/k the step scored with give the attention layer k-1 computed (and not that of
    layer k-2 or k, where those ran on a sequence of the same length). -> that attention."""
    ours = softmax_of(rec)
    tol = attention_tol(ours.shape[-1])
    ref = attentions[k - 1].double()
    assert_rel_close(valid_rows(ours, rec.valid), valid_rows(ref, rec.valid), tol, f"attention of layer {k - 1}")
    for other in (k - 2, k):
        if 0 <= other < len(attentions) and attentions[other].shape == ref.shape:
            err = rel_error(valid_rows(ours, rec.valid), valid_rows(attentions[other].double(), rec.valid))
            assert err > 100 * tol, f"layer {other}'s attention matches too (error {err:.2e}): the test cannot tell"
    return ref


# ------------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    ("cls", "bad", "name"),
    [
        (M.FastVConfig, {"layer": 2.5}, "fastv: layer"),
        (M.FastVConfig, {"layer": 0}, "fastv: layer"),
        (M.FastVConfig, {"layer": True}, "fastv: layer"),
        (M.FastVConfig, {"keep": 0}, "fastv: keep"),
        (M.FastVConfig, {"keep": 1.5}, "fastv: keep"),
        (M.FastVConfig, {"query": "txt"}, "fastv: query"),
        (M.SparseVLMConfig, {"layer": 2.5}, "sparsevlm: layer"),
        (M.SparseVLMConfig, {"layer": (3, 7)}, "sparsevlm: layer"),
        (M.SparseVLMConfig, {"layer": (3, 3, 16)}, "sparsevlm: layer"),
        (M.SparseVLMConfig, {"layer": (0, 7, 16)}, "sparsevlm: layer"),
        (M.SparseVLMConfig, {"layer": (3, 7.0, 16)}, "sparsevlm: layer"),
        (M.SparseVLMConfig, {"keep": -1}, "sparsevlm: keep"),
        (M.SparseVLMConfig, {"recycle": 1}, "sparsevlm: recycle"),
        (M.FiCoCoLConfig, {"layer": 2.5}, "ficoco_l: layer"),
        (M.FiCoCoLConfig, {"layer": 0}, "ficoco_l: layer"),
    ],
)
def test_config_fields_are_checked_when_built(cls, bad, name):
    with pytest.raises(ValueError, match=re.escape(f"tokenkern.{name} must be")):
        cls(**bad)


def test_defaults_are_the_released_layers():
    assert M.FastVConfig().layer == 2 and M.FastVConfig().keep == 0.5 and M.FastVConfig().query == "last"
    assert M.SparseVLMConfig().layers == (3, 7, 16)  # released pruning_loc = [2, 6, 15]
    assert M.SparseVLMConfig(layer=[3, 7, 16]).layer == (3, 7, 16)
    assert M.FiCoCoLConfig().layer == 6  # released control_encoding_layer = 4: layer 5's attention


@pytest.mark.parametrize("method", ["fastv", "sparsevlm", "ficoco-l"])
def test_prune_refuses_a_fractional_layer(method, gen):
    model = tiny_llava(gen)
    with pytest.raises(ValueError, match="layer must be"):
        tokenkern.prune(model, method, keep=0.25, layer=2.5)
    with pytest.raises(ValueError, match=re.escape("layer must be in [1, 3]")):
        tokenkern.prune(model, method, keep=0.25, layer=4)
    assert not model.model.language_model._forward_pre_hooks


def test_sparsevlm_step_counts_are_the_released_ones():
    n = torch.tensor([576, 16, 1, 0])
    for budget, counts in RELEASED_STEPS.items():
        for keep in (budget, budget / 576):  # a count, or the same budget as a fraction
            cfg = M.SparseVLMConfig(keep=keep)
            got = [step_counts(cfg, s, n[:1]).item() for s in range(3)]
            assert got == list(counts), (keep, got)
    for keep in (1.0, 576, 0.25, 0.01, 200, 5):
        cfg = M.SparseVLMConfig(keep=keep)
        steps = torch.stack([step_counts(cfg, s, n) for s in range(3)])
        assert bool((steps[1:] <= steps[:-1]).all()), (keep, steps)  # never grows back
        assert bool((steps[:, :3] >= 1).all()) and bool((steps <= n).all()) and bool((steps[:, 3] == 0).all())
    assert step_counts(M.SparseVLMConfig(keep=1.0), 2, n).tolist() == n.tolist()  # keep 1.0 keeps all
    between = [step_counts(M.SparseVLMConfig(keep=160), s, n[:1]).item() for s in range(3)]
    assert between == [302, 155, 73]  # halfway between the 128 and 192 rows: (303+300)/2, (110+200)/2, (36+110)/2
    one = M.SparseVLMConfig(keep=0.25, layer=2)  # a single step keeps `keep`
    assert step_counts(one, 0, n).tolist() == [144, 4, 1, 0]


# --------------------------------------------------------------- scores and pruning point


@pytest.mark.parametrize(("method", "layer"), [("fastv", 1), ("fastv", 2), ("fastv", 3), ("sparsevlm", 2),
                                               ("ficoco-l", 3)])  # fmt: skip
def test_scores_come_from_layer_k_minus_1_and_pruning_starts_at_layer_k(method, layer, gen):
    model = tiny_llava(gen)
    model.set_attn_implementation("eager")
    inputs = batch(gen, PROMPTS, 16)
    length = inputs["input_ids"].shape[1]
    seen, hooks = lengths_seen(model)
    with tokenkern.prune(model, method, keep=0.25, layer=layer) as handle:
        steps = record_steps(handle)
        attentions = eager_forward(model, inputs)
        kept = handle.decoder.gather.kept_length
    for h in hooks:
        h.remove()
    assert len(steps) == 1
    assert seen == [length] * layer + [kept] * (4 - layer)
    assert kept == length - 12  # 16 image tokens -> 4 in each sample
    rec = steps[0]
    ref = check_scoring_layer(rec, attentions, layer)
    tol = attention_tol(length)
    decoder_layer = M.DecoderLayer(rec.q, rec.k, rec.scale, rec.valid, rec.image, rec.text)
    if method == "fastv":  # the last prompt token's attention (left padding: the last position)
        assert_rel_close(M.fastv_scores(decoder_layer, "last").double(), ref[:, :, -1].mean(dim=1), tol)
    if method == "sparsevlm":  # the raters' attention, averaged over raters and heads
        rows = rec.raters & rec.valid
        want = (ref * rows[:, None, :, None]).sum(dim=(1, 2)) / (ref.shape[1] * rows.sum(dim=1, keepdim=True))
        scores = M.sparsevlm(decoder_layer, rec.raters, M.SparseVLMConfig(keep=0.25, layer=layer)).scores
        assert_rel_close(scores.double(), want, tol)


def test_default_layers_prune_where_the_released_code_does(gen):
    """fastv's default K = 2, ficoco-l's 6 (layer 5's attention), sparsevlm's (3, 7, 16)."""
    model = tiny_llava(gen, layers=17)
    inputs = batch(gen, PROMPTS[:1], 16)
    length = inputs["input_ids"].shape[1]
    for method, starts in (("fastv", (2,)), ("ficoco-l", (6,)), ("sparsevlm", (3, 7, 16))):
        seen, hooks = lengths_seen(model)
        with tokenkern.prune(model, method, keep=0.25) as handle, torch.no_grad():
            model(**inputs)
            assert handle.decoder.starts == starts
        for h in hooks:
            h.remove()
        changes = [i for i in range(1, 17) if seen[i] != seen[i - 1]]
        assert seen[0] == length and changes == list(starts), (method, seen)


# ------------------------------------------------------------------ SparseVLM's schedule


@pytest.mark.parametrize("budget", [192, 64])
def test_sparsevlm_schedule_prunes_at_the_released_layers_with_the_released_counts(budget, gen):
    """576 image tokens (LLaVA-1.5's): the budget's released counts at layers 3, 7 and 16, each
    step scored by the attention of the layer before it, on the tokens the step before kept."""
    model = tiny_llava(gen, layers=17, image_size=168)
    model.set_attn_implementation("eager")
    inputs = batch(gen, PROMPTS[:1], 576, image_size=168)
    length = inputs["input_ids"].shape[1]
    seen, hooks = lengths_seen(model)
    with tokenkern.prune(model, "sparsevlm", keep=budget) as handle:
        steps = record_steps(handle)
        attentions = eager_forward(model, inputs)
        gather = handle.decoder.gather
    for h in hooks:
        h.remove()
    c1, c2, c3 = RELEASED_STEPS[budget]
    lens = [length - 576 + c for c in (576, c1, c2, c3)]
    assert seen == [lens[0]] * 3 + [lens[1]] * 4 + [lens[2]] * 9 + [lens[3]]
    image = inputs["input_ids"][0] == IMAGE
    assert int(image[gather.idx[0]].sum()) == c3
    assert [s.step for s in steps] == [0, 1, 2]
    for rec, k, before in zip(steps, (3, 7, 16), lens[:3], strict=True):
        assert rec.q.shape[2] == before
        assert int((rec.image >= 0).sum()) == before - (length - 576)
        ref = check_scoring_layer(rec, attentions, k)
        rows = rec.raters & rec.valid
        assert bool(rows.any()) and not bool((rows & (rec.image >= 0)).any())
        want = (ref * rows[:, None, :, None]).sum(dim=(1, 2)) / (ref.shape[1] * rows.sum(dim=1, keepdim=True))
        layer = M.DecoderLayer(rec.q, rec.k, rec.scale, rec.valid, rec.image, rec.text)
        scores = M.sparsevlm(layer, rec.raters, M.SparseVLMConfig(keep=budget)).scores
        assert_rel_close(scores.double(), want, attention_tol(before))


def test_sparsevlm_schedule_keeps_the_raters_of_the_unpruned_prompt(gen):
    model = tiny_llava(gen, layers=17)
    inputs = batch(gen, PROMPTS, 16)
    with tokenkern.prune(model, "sparsevlm", keep=0.25) as handle, torch.no_grad():
        steps = record_steps(handle)
        model(**inputs)
        gathers = list(handle.decoder.gathers)
    assert len(steps) == len(gathers) == 3
    first = steps[0].raters
    for rec in steps[1:]:
        # the later steps' raters are the first step's, carried to the positions still there
        positions = gathers[rec.step - 1].idx
        assert torch.equal(rec.raters, first.gather(1, positions) & rec.valid)


@pytest.mark.parametrize("recycle", [False, True])
def test_sparsevlm_schedule_generate_matches_a_decoding_loop_and_single_samples(recycle, gen):
    model = tiny_llava(gen, layers=17)
    inputs = batch(gen, PROMPTS, 16)
    with tokenkern.prune(model, "sparsevlm", keep=0.25, recycle=recycle), torch.no_grad():
        one = batch(gen, PROMPTS[:1], 16)  # the longest prompt: the batch's row 0 without padding
        one["pixel_values"] = inputs["pixel_values"][:1]
        ref = model.generate(**one, max_new_tokens=4, do_sample=False, min_new_tokens=4, output_logits=True,
                             return_dict_in_generate=True)  # fmt: skip
        out = model(**one, use_cache=True)
        logits = [out.logits[:, -1]]
        # feed the tokens generate() chose: min_new_tokens masks EOS before its argmax, which the
        # raw logits it returns do not show
        chosen = ref.sequences[:, one["input_ids"].shape[1] :]
        for i in range(3):
            out = model(input_ids=chosen[:, i : i + 1], past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits[:, -1])
        assert_rel_close(torch.stack(logits, 1), torch.stack(ref.logits, 1), 1e-5)
        batched = model(**inputs).logits[:, -1]
        second = batch(gen, PROMPTS[1:], 16)
        second["pixel_values"] = inputs["pixel_values"][1:]
        alone = model(**second).logits[:, -1]
    assert_rel_close(batched[1:], alone, 1e-5)
    assert_rel_close(batched[:1], logits[0], 1e-5)


# ----------------------------------------------------------------------- padding rows


@pytest.mark.parametrize("query", ["last", "text"])
def test_fastv_all_padding_row(query, gen):
    """A batch row that is all padding is valid input: it keeps its layout, nothing crashes,
    and the other row's logits are those of its run alone."""
    model = tiny_llava(gen)
    inputs = batch(gen, PROMPTS[:1], 16)
    length = inputs["input_ids"].shape[1]
    padded = {
        "input_ids": torch.cat([torch.zeros(1, length, dtype=torch.long), inputs["input_ids"]]),
        "attention_mask": torch.cat([torch.zeros(1, length, dtype=torch.long), inputs["attention_mask"]]),
        "pixel_values": inputs["pixel_values"],
    }
    with tokenkern.prune(model, "fastv", keep=0.25, query=query) as handle, torch.no_grad():
        both = model(**padded).logits
        g = handle.decoder.gather
        alone = model(**inputs).logits
    assert torch.equal(g.idx[0], torch.arange(length)) and not bool(g.valid[0].any())
    assert_rel_close(both[1, -1], alone[0, -1], 1e-5)
    assert both.shape[1] == length and alone.shape[1] == length - 12


def test_sparsevlm_schedule_sizes_every_step_with_one_sync(gen, monkeypatch):
    """The plan (what each step drops) gives the lengths and padding that each step's own
    keep mask gives, for a padded batch whose samples hold two images and one; the prefill
    syncs once (the plan's), not once per step."""
    from tokenkern.integrations import decoder as decoder_module
    from tokenkern.integrations.sequence import Gather

    model = tiny_llava(gen, layers=17)
    two = [1, 5, 6] + [IMAGE] * 16 + [7, 8] + [IMAGE] * 16 + [9, 10]
    one = [1, 12] + [IMAGE] * 16 + [13]
    length = len(two)
    ids = torch.zeros(2, length, dtype=torch.long)
    mask = torch.zeros(2, length, dtype=torch.long)
    ids[0], mask[0] = torch.tensor(two), 1
    ids[1, length - len(one) :], mask[1, length - len(one) :] = torch.tensor(one), 1
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(3, 3, 28, 28, generator=gen)}
    syncs = []
    real_from_mask, real_plan = Gather.from_mask, decoder_module.DecoderPruner._plan_sizes

    def from_mask(keep, valid, sizes=None):
        if sizes is None:
            syncs.append("step")
        return real_from_mask(keep, valid, sizes)

    def plan_sizes(self, state):
        syncs.append("plan")
        return real_plan(self, state)

    monkeypatch.setattr(decoder_module.Gather, "from_mask", staticmethod(from_mask))
    monkeypatch.setattr(decoder_module.DecoderPruner, "_plan_sizes", plan_sizes)
    for keep in (0.25, 5, 1.0):
        syncs.clear()
        with tokenkern.prune(model, "sparsevlm", keep=keep) as handle, torch.no_grad():
            steps = record_steps(handle)
            model(**inputs)
            gathers, sizes = list(handle.decoder.gathers), handle.decoder.sizes
        assert syncs == ["plan"], syncs
        for rec, g, planned in zip(steps, gathers, sizes, strict=True):
            alone = real_from_mask(rec.keep, rec.valid)  # what the step's keep mask says, with its own sync
            assert (alone.kept_length, alone.padded) == planned == (g.kept_length, g.padded), (keep, rec.step)
        final = step_counts(M.SparseVLMConfig(keep=keep), 2, torch.tensor(16)).item()
        kept = [gathers[-1].idx[b][gathers[-1].valid[b]] for b in range(2)]
        first, second = ((kept[0] >= 3) & (kept[0] < 19)).sum(), ((kept[0] >= 21) & (kept[0] < 37)).sum()
        assert int(first) == int(second) == final  # every image keeps the schedule's count
        assert int((ids[1, kept[1]] == IMAGE).sum()) == final
