"""The inference-compute planner: FLOPs/memory model against counted references, scaling law,
planner properties and the CLI. CPU only, small random ``transformers`` models."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tokenkern.planner import (
    DEFAULT_LAW,
    LI2024_VISUAL_REASONING_POINTS,
    PAPER_FAMILY,
    PRESET_NAMES,
    AdditivePowerLaw,
    LLMSpec,
    PowerLaw,
    VLMSpec,
    fit_power_law,
    format_table,
    get_preset,
    kv_cache_bytes,
    llm_decode_flops,
    llm_decode_step_flops,
    llm_forward_flops,
    llm_prefill_flops,
    pareto_frontier,
    plan,
    projector_flops,
    vision_flops,
    vlm_cost,
)

transformers = pytest.importorskip("transformers")

# The model must be within this of FlopCounterMode (the bound).
FLOP_TOL = 0.05


# ----------------------------------------------------------------------------- helpers


def counted(fn) -> tuple[int, int, object]:
    """(all FLOPs FlopCounterMode counts, the part counted inside rotary-embedding modules,
    fn's output). ``transformers`` computes RoPE frequencies with a small matmul that the
    planner's model leaves out; everything else must match exactly."""
    with torch.no_grad(), FlopCounterMode(display=False) as mode:
        out = fn()
    counts = mode.get_flop_counts()
    rotary = sum(sum(ops.values()) for name, ops in counts.items() if name.endswith("rotary_emb"))
    return mode.get_total_flops(), rotary, out


def check_flops(total: int, rotary: int, model: int, what: str, report) -> None:
    rel = abs(model - total) / total
    report(f"planner FLOPs model vs FlopCounterMode, {what}: {model} vs {total} counted (rel. diff {rel:.2e})")
    assert rel <= FLOP_TOL, f"{what}: model {model} vs counted {total}: {rel:.3%} > {FLOP_TOL:.0%}"
    assert model == total - rotary, f"{what}: model {model} != counted {total} - rotary {rotary}"


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def llama_config(**kw):
    base = dict(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=101,
        attn_implementation="eager",  # FlopCounterMode does not count CPU SDPA kernels
    )
    base.update(kw)
    return transformers.LlamaConfig(**base)


def qwen2_config(**kw):
    base = dict(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=1,
        vocab_size=97,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )
    base.update(kw)
    return transformers.Qwen2Config(**base)


def tiny_clip():
    return transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        patch_size=8,
        image_size=32,
        projection_dim=16,
    )


TINY_TEXT = dict(
    model_type="llama",
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=120,
)


def tiny_llava():
    cfg = transformers.LlavaConfig(
        vision_config=tiny_clip(), text_config=TINY_TEXT, image_token_index=110, attn_implementation="eager"
    )
    return cfg, transformers.LlavaForConditionalGeneration(cfg).eval()


def tiny_qwen2_vl():
    cfg = transformers.Qwen2VLConfig(
        text_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=160,
            bos_token_id=0,
            eos_token_id=1,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=64, patch_size=4, temporal_patch_size=2
        ),
        image_token_id=150,
        video_token_id=151,
        vision_start_token_id=152,
        vision_end_token_id=153,
        attn_implementation="eager",
        tie_word_embeddings=True,
    )
    return cfg, transformers.Qwen2VLForConditionalGeneration(cfg).eval()


# ----------------------------------------------------------------------------- FLOPs vs FlopCounterMode


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2-mqa-tied"])
@pytest.mark.parametrize("lm_head", ["all", "last"])
def test_llm_prefill_and_decode_flops_match_flop_counter(family, lm_head, gen, report):
    cfg = llama_config() if family == "llama-gqa" else qwen2_config()
    model = (transformers.LlamaForCausalLM if family == "llama-gqa" else transformers.Qwen2ForCausalLM)(cfg).eval()
    spec = LLMSpec.from_config(cfg)
    s = int(torch.randint(5, 60, (), generator=gen))
    ids = torch.randint(0, cfg.vocab_size, (1, s), generator=gen)
    keep = 1 if lm_head == "last" else 0  # transformers: logits_to_keep=0 means every position
    total, rotary, out = counted(lambda: model(ids, logits_to_keep=keep, use_cache=True))
    check_flops(
        total, rotary, llm_prefill_flops(spec, s, lm_head=lm_head), f"{family} prefill S={s} lm_head={lm_head}", report
    )
    # two decode steps, the second one attends to one more cached token
    cache = out.past_key_values
    for step in range(2):
        nxt = torch.randint(0, cfg.vocab_size, (1, 1), generator=gen)
        total, rotary, out = counted(lambda nxt=nxt, cache=cache: model(nxt, past_key_values=cache, use_cache=True))
        check_flops(total, rotary, llm_decode_step_flops(spec, s + step), f"{family} decode step {step}", report)
        cache = out.past_key_values


def test_llava_vlm_flops_match_flop_counter(gen, report):
    cfg, model = tiny_llava()
    spec = VLMSpec.from_config(cfg)
    v = spec.native_visual_tokens
    assert v == 16  # 32x32 px, patch 8, [CLS] dropped
    n_text = 12
    ids = torch.cat(
        [
            torch.randint(0, 100, (1, 5), generator=gen),
            torch.full((1, v), cfg.image_token_id),
            torch.randint(0, 100, (1, n_text - 5), generator=gen),
        ],
        1,
    )
    pixels = torch.randn(1, 3, 32, 32, generator=gen)
    total, rotary, out = counted(lambda: model(input_ids=ids, pixel_values=pixels, use_cache=True))
    cost = vlm_cost(spec, v, n_text, lm_head="all")
    assert cost.flops.vision > 0 and cost.flops.projector > 0
    check_flops(total, rotary, cost.flops.total, "LLaVA prefill (vision + projector + LLM)", report)
    nxt = torch.randint(0, 100, (1, 1), generator=gen)
    total, rotary, _ = counted(lambda: model(input_ids=nxt, past_key_values=out.past_key_values))
    check_flops(total, rotary, llm_decode_step_flops(spec.llm, v + n_text), "LLaVA decode step", report)
    # the decode part of vlm_cost is the sum of such steps
    with_decode = vlm_cost(spec, v, n_text, decode_tokens=1, lm_head="all")
    assert with_decode.flops.decode == llm_decode_step_flops(spec.llm, v + n_text)


def test_qwen2_vl_flops_match_flop_counter(gen, report):
    cfg, model = tiny_qwen2_vl()
    hh, ww = 24, 32  # pixels; patch 4, 2x2 merge -> 6x8 patches -> 12 visual tokens
    spec = VLMSpec.from_config(cfg, image_size=(hh, ww))
    v = spec.native_visual_tokens
    assert v == 12
    gh, gw = hh // 4, ww // 4
    pixels = torch.randn(gh * gw, 3 * 2 * 4 * 4, generator=gen)
    ids = torch.cat(
        [
            torch.randint(0, 140, (1, 3), generator=gen),
            torch.tensor([[cfg.vision_start_token_id]]),
            torch.full((1, v), cfg.image_token_id),
            torch.tensor([[cfg.vision_end_token_id]]),
            torch.randint(0, 140, (1, 6), generator=gen),
        ],
        1,
    )
    total, rotary, out = counted(
        lambda: model(
            input_ids=ids,
            pixel_values=pixels,
            image_grid_thw=torch.tensor([[1, gh, gw]]),
            mm_token_type_ids=(ids == cfg.image_token_id).int(),
        )
    )
    cost = vlm_cost(spec, v, ids.shape[1] - v, lm_head="all")
    check_flops(total, rotary, cost.flops.total, "Qwen2-VL prefill (Conv3d stem, ViT, patch merger, LLM)", report)
    total, rotary, _ = counted(lambda: model(input_ids=ids[:, -1:], past_key_values=out.past_key_values))
    check_flops(total, rotary, llm_decode_step_flops(spec.llm, ids.shape[1]), "Qwen2-VL decode step", report)


def test_llava_next_crops_flops_match_flop_counter(gen, report):
    cfg = transformers.LlavaNextConfig(
        vision_config=tiny_clip(),
        text_config=TINY_TEXT,
        image_token_index=110,
        image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]],
        attn_implementation="eager",
    )
    model = transformers.LlavaNextForConditionalGeneration(cfg).eval()
    spec = VLMSpec.from_config(cfg)
    assert spec.vision.crops == 5  # base image + 2x2 tiles of the largest pinpoint
    pixels = torch.randn(1, 5, 3, 32, 32, generator=gen)
    total, rotary, _ = counted(
        lambda: model.model.get_image_features(pixel_values=pixels, image_sizes=torch.tensor([[64, 64]]))
    )
    expected = vision_flops(spec.vision) + projector_flops(spec.projector, spec.projector_input_tokens)
    check_flops(total, rotary, expected, "LLaVA-NeXT vision tower + projector, 5 crops", report)
    assert n_params(model) == spec.params()


# ----------------------------------------------------------------------------- parameters and memory


@pytest.mark.parametrize(
    "make",
    [
        lambda: (llama_config(), transformers.LlamaForCausalLM),
        lambda: (
            llama_config(attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
            transformers.LlamaForCausalLM,
        ),
        lambda: (llama_config(head_dim=24), transformers.LlamaForCausalLM),
        lambda: (qwen2_config(), transformers.Qwen2ForCausalLM),
        lambda: (qwen2_config(tie_word_embeddings=False), transformers.Qwen2ForCausalLM),
    ],
    ids=["llama", "llama-biases-tied", "llama-head-dim", "qwen2-tied", "qwen2"],
)
def test_llm_param_count_exact(make):
    cfg, cls = make()
    assert LLMSpec.from_config(cfg).params() == n_params(cls(cfg))


def test_vlm_param_counts_exact():
    cfg, model = tiny_llava()
    assert VLMSpec.from_config(cfg).params() == n_params(model)
    cfg, model = tiny_qwen2_vl()
    assert VLMSpec.from_config(cfg, image_size=(24, 32)).params() == n_params(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_and_weight_bytes_exact(dtype, gen):
    cfg = llama_config(num_key_value_heads=1, num_hidden_layers=3)
    model = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    spec = LLMSpec.from_config(cfg)
    elem = torch.finfo(dtype).bits // 8
    s, steps = 29, 3
    ids = torch.randint(0, cfg.vocab_size, (2, s), generator=gen)  # batch 2
    with torch.no_grad():
        out = model(ids, use_cache=True)
        for _ in range(steps):
            out = model(ids[:, :1], past_key_values=out.past_key_values, use_cache=True)
    cache = out.past_key_values
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    assert len(tensors) == 2 * spec.layers and all(t.shape[-2] == s + steps for t in tensors)
    real = sum(t.numel() * t.element_size() for t in tensors)
    assert kv_cache_bytes(spec, s + steps, batch=2, bytes_per_element=elem) == real
    # vlm_cost: text-only prompt of s tokens, `steps` decode steps, batch 2
    cost = vlm_cost(spec, 0, s, steps, batch=2, bytes_per_param=elem, kv_bytes_per_element=elem)
    assert cost.memory.kv_cache == real
    assert cost.memory.weights == sum(p.numel() * p.element_size() for p in model.parameters())


# ----------------------------------------------------------------------------- the FLOPs model itself


def test_decode_closed_form_and_batch_linearity():
    spec = get_preset("qwen2-vl-7b")
    llm = spec.llm
    assert llm_decode_flops(llm, 300, 17) == sum(llm_decode_step_flops(llm, 300 + i) for i in range(17))
    assert llm_decode_flops(llm, 300, 0) == 0
    one = vlm_cost(spec, 64, 50, 10).flops
    four = vlm_cost(spec, 64, 50, 10, batch=4).flops
    assert four == dataclasses.replace(
        one, vision=4 * one.vision, projector=4 * one.projector, prefill=4 * one.prefill, decode=4 * one.decode
    )


def test_attention_quadratic_term_and_causal_skip():
    llm = get_preset("llava-1.5-7b").llm
    # the quadratic term: second differences of the prefill cost in S are constant, 2 * 4 * L * H * d
    f = [llm_prefill_flops(llm, s) for s in (1000, 1001, 1002)]
    assert f[2] - 2 * f[1] + f[0] == 2 * 4 * llm.layers * llm.heads * llm.dh
    dense, causal = llm_prefill_flops(llm, 4096), llm_prefill_flops(llm, 4096, causal_skip=True)
    attn_dense = 4 * llm.layers * llm.heads * llm.dh * 4096 * 4096
    assert dense - causal == attn_dense // 2 - 4 * llm.layers * llm.heads * llm.dh * 4096 // 2
    # a decode step is the same computation with or without causal_skip (one query row)
    assert llm_forward_flops(llm, 1, 500, causal_skip=True) == llm_decode_step_flops(llm, 500)
    # per-token cost is close to 2 * N (the usual rule of thumb) for short contexts
    per_token = llm_decode_step_flops(llm, 0)
    assert 0.95 < per_token / (2 * llm.params()) < 1.0


def test_lm_head_all_vs_last():
    llm = get_preset("qwen2-vl-2b").llm
    s = 333
    diff = llm_prefill_flops(llm, s, lm_head="all") - llm_prefill_flops(llm, s, lm_head="last")
    assert diff == 2 * (s - 1) * llm.hidden * llm.vocab
    with pytest.raises(ValueError, match="lm_head"):
        llm_prefill_flops(llm, s, lm_head="first")


# ----------------------------------------------------------------------------- presets and configs


# Totals printed on the models' hub pages (safetensors parameter counts).
PUBLISHED_PARAMS = {"llava-1.5-7b": 7.06e9, "llava-1.5-13b": 13.4e9, "qwen2-vl-2b": 2.21e9, "qwen2-vl-7b": 8.29e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_presets_match_published_totals(name):
    assert get_preset(name).params() == pytest.approx(PUBLISHED_PARAMS[name], rel=5e-3)


def unnamed(spec: VLMSpec) -> VLMSpec:
    vision = spec.vision and dataclasses.replace(spec.vision, name="")
    return dataclasses.replace(spec, name="", llm=dataclasses.replace(spec.llm, name=""), vision=vision)


def test_presets_match_transformers_configs():
    # LLaVA-1.5-7B = LlavaConfig's defaults (CLIP ViT-L/14-336 + Llama-2-7B sizes) with llava-hf's vocab
    cfg = transformers.LlavaConfig(text_config={"model_type": "llama", "vocab_size": 32064})
    assert unnamed(VLMSpec.from_config(cfg)) == unnamed(get_preset("llava-1.5-7b"))
    # Qwen2-VL-2B sizes written as a Qwen2VLConfig
    cfg = transformers.Qwen2VLConfig(
        text_config=dict(
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            vocab_size=151936,
        ),
        vision_config=dict(hidden_size=1536),
        tie_word_embeddings=True,
    )
    got = VLMSpec.from_config(cfg, image_size=448)
    want = get_preset("qwen2-vl-2b")
    assert got.llm.params() == want.llm.params() and got.params() == want.params()
    assert vlm_cost(got, 64, 50, 20).flops == vlm_cost(want, 64, 50, 20).flops
    assert want.native_visual_tokens == 256 and get_preset("qwen2-vl-2b", image_size=672).native_visual_tokens == 576
    with pytest.raises(ValueError, match="merge"):
        get_preset("qwen2-vl-2b", image_size=434)  # 31x31 patches cannot be merged 2x2
    # a plain LLM config gives an LLM-only spec
    assert VLMSpec.from_config(llama_config()).vision is None
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("gpt-5")


# ----------------------------------------------------------------------------- scaling law


def test_default_law_reproduces_from_the_published_points(report):
    n = [p[0] * 1e9 for p in LI2024_VISUAL_REASONING_POINTS]
    v = [p[1] for p in LI2024_VISUAL_REASONING_POINTS]
    e = [1 - p[2] for p in LI2024_VISUAL_REASONING_POINTS]
    assert len(n) == 28
    fixed, rms_fixed = fit_power_law(n, v, e, alpha=DEFAULT_LAW.alpha, beta=DEFAULT_LAW.beta)
    assert fixed.A == pytest.approx(DEFAULT_LAW.A, abs=1e-3) and fixed.D == pytest.approx(DEFAULT_LAW.D, abs=1e-3)
    free, rms_free = fit_power_law(n, v, e)
    report(
        f"scaling law refit to the paper's 28 points: alpha {free.alpha:.4f}, beta {free.beta:.4f}, "
        f"A {free.A:.4f}, D {free.D:.4f}, rms {rms_free:.4f} (fixed exponents: rms {rms_fixed:.4f})"
    )
    assert 0.06 < free.alpha < 0.09 and 0.01 < free.beta < 0.02  # reported: 0.077, 0.015
    assert rms_free <= rms_fixed < 0.006


def test_fit_recovers_a_known_law(gen):
    true = PowerLaw(A=0.4, alpha=0.21, beta=0.047, D=0.12)
    n = [float(x) for x in torch.logspace(8, 11, 6).tolist()]
    v = [1, 3, 10, 50, 200, 700]
    pts = [(a, b) for a in n for b in v]
    law, rms = fit_power_law([a for a, _ in pts], [b for _, b in pts], [true(a, b) for a, b in pts])
    assert rms < 1e-4
    assert law.alpha == pytest.approx(true.alpha, abs=0.01) and law.beta == pytest.approx(true.beta, abs=0.005)


def test_laws_decrease_in_params_and_tokens():
    additive = AdditivePowerLaw(E=0.2, A=0.3, alpha=0.3, B=0.4, beta=0.2)
    for law in (DEFAULT_LAW, additive):
        assert law(1e9, 10) > law(2e9, 10) and law(1e9, 10) > law(1e9, 20)
        with pytest.raises(ValueError):
            law(1e9, 0)
    assert additive(1e9, 1) == pytest.approx(0.2 + 0.3 + 0.4)


# ----------------------------------------------------------------------------- planner properties


def brute_force_optimum(result):
    fits = [c for c in result.candidates if c.total_flops <= result.budget_flops]
    return min(fits, key=lambda c: (c.error, c.total_flops, c.name, c.visual_tokens)) if fits else None


def test_optimum_is_the_best_candidate_within_budget():
    for budget in (5e11, 1e12, 3e12, 2e13):
        r = plan(budget, PRESET_NAMES, text_tokens=50, decode_tokens=20)
        assert r.optimum is not None and r.optimum.within_budget and r.optimum.total_flops <= budget
        assert r.optimum is brute_force_optimum(r)
        assert all(c.within_budget == (c.total_flops <= budget) for c in r.candidates)


def test_more_budget_never_worsens_the_optimum():
    errors = []
    for budget in torch.logspace(11, 13.5, 40).tolist():  # starts below any vision tower's cost
        r = plan(budget, PRESET_NAMES, text_tokens=30, decode_tokens=8)
        errors.append(math.inf if r.optimum is None else r.optimum.error)
    assert all(b <= a for a, b in itertools.pairwise(errors))
    assert errors[0] == math.inf and errors[-1] == min(errors)
    assert len(set(errors)) > 10


def test_law_ignoring_tokens_picks_the_fewest_tokens():
    grid = (3, 9, 27, 81)
    r = plan(5e12, PRESET_NAMES, visual_tokens=grid, law=lambda n, v: 1.0 / n)
    assert r.optimum.visual_tokens == min(grid)
    # and the largest LLM that fits
    fitting = [c for c in r.candidates if c.within_budget]
    assert r.optimum.n_params == max(c.n_params for c in fitting)


def test_law_ignoring_the_llm_picks_the_cheapest_model_with_most_tokens():
    r = plan(2e12, PAPER_FAMILY, law=lambda n, v: 1.0 / v)
    best_v = max(c.visual_tokens for c in r.candidates if c.within_budget)
    assert r.optimum.visual_tokens == best_v
    same_v = [c for c in r.candidates if c.visual_tokens == best_v]
    assert r.optimum.total_flops == min(c.total_flops for c in same_v)


def test_paper_headline_one_token_and_the_largest_llm():
    """With cached text (Q = 0) and LLM compute only, the paper's law picks one visual token and
    the largest LLM that fits, at every budget that just admits the next larger model."""
    family = [get_preset(n) for n in PAPER_FAMILY]
    for spec in family:
        budget = vlm_cost(spec, 1, 0, include_vision=False).flops.total
        r = plan(budget, PAPER_FAMILY, text_tokens=0, include_vision=False)
        assert (r.optimum.name, r.optimum.visual_tokens) == (spec.name, 1)


def test_pareto_frontier_properties():
    r = plan(3e12, PRESET_NAMES, text_tokens=50)
    front = r.frontier
    assert all(a.total_flops <= b.total_flops and a.error > b.error for a, b in itertools.pairwise(front))
    assert r.optimum in front
    for f in front:  # nothing dominates a frontier point
        assert not any(
            c.total_flops <= f.total_flops
            and c.error <= f.error
            and (c.total_flops, c.error) != (f.total_flops, f.error)
            for c in r.candidates
        )
    for c in r.candidates:  # every other point is dominated by a frontier point
        assert c in front or any(f.total_flops <= c.total_flops and f.error <= c.error for f in front)
    assert pareto_frontier(reversed(r.candidates)) == front


def test_plan_is_deterministic_and_order_independent():
    names = list(PRESET_NAMES)
    a = plan(2e12, names, visual_tokens=[64, 1, 16, 4], text_tokens=20, decode_tokens=5)
    random.Random(0).shuffle(names)
    b = plan(2e12, names, visual_tokens=[16, 4, 1, 64, 64], text_tokens=20, decode_tokens=5)
    assert a.candidates == b.candidates and a.frontier == b.frontier and a.optimum == b.optimum


def test_candidates_respect_native_tokens_and_accept_specs():
    llm_only = LLMSpec("toy-llm", 4, 256, 512, 4, 4, vocab=1000)
    r = plan(
        1e13,
        ["qwen2-vl-2b", get_preset("llava-1.5-7b"), llm_only, transformers.LlavaConfig()],
        visual_tokens=(1, 256, 300, 576, 4096),
    )
    by_name = {}
    for c in r.candidates:
        by_name.setdefault(c.name, set()).add(c.visual_tokens)
    assert by_name["qwen2-vl-2b"] == {1, 256}  # 448 px -> 256 native tokens
    assert by_name["llava-1.5-7b"] == {1, 256, 300, 576}
    assert by_name["toy-llm"] == {1, 256, 300, 576, 4096}  # no vision tower: no cap
    assert len(by_name) == 4


def test_nothing_fits_and_memory_budget():
    r = plan(1e9, PAPER_FAMILY)
    assert r.optimum is None and not r.feasible() and "nothing fits" in format_table(r)
    unlimited = plan(1e13, PAPER_FAMILY)
    assert unlimited.optimum.name == "llava-qwen1.5-14b"
    limited = plan(1e13, PAPER_FAMILY, memory_budget_bytes=16 * 2**30)  # 14B weights are ~27 GiB in bf16
    assert limited.optimum.name == "llava-qwen1.5-7b" and limited.optimum.memory.total <= 16 * 2**30
    for bad in (0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="budget"):
            plan(bad)
    with pytest.raises(ValueError, match="visual_tokens"):
        plan(1e12, visual_tokens=[0, 4])
    with pytest.raises(ValueError, match="visual_tokens"):
        plan(1e12, visual_tokens=[4, "16"])
    with pytest.raises(ValueError, match="visual_tokens is empty"):
        plan(1e12, visual_tokens=[])


def test_budget_is_per_request_and_batch_scales_memory():
    """A batch of identical requests needs the same FLOPs per request; only its KV cache grows."""
    one = plan(2e12, "llava-qwen1.5-7b", visual_tokens=[1, 16, 64, 144])
    four = plan(2e12, ["llava-qwen1.5-7b"], visual_tokens=[1, 16, 64, 144], batch=4)
    assert one.optimum is not None and four.optimum is not None
    assert (four.optimum.visual_tokens, four.optimum.flops) == (one.optimum.visual_tokens, one.optimum.flops)
    spec = get_preset("llava-qwen1.5-7b")
    c = four.optimum
    assert c.flops == vlm_cost(spec, c.visual_tokens, 50, 0).flops
    assert c.memory == vlm_cost(spec, c.visual_tokens, 50, 0, batch=4).memory
    assert c.memory.kv_cache == 4 * one.optimum.memory.kv_cache
    # ... and a memory budget sees the batch's KV cache.
    mem = c.memory.weights + 200 * 2**20  # KV cache at V = 64: ~57 MiB per request
    assert plan(2e12, "llava-qwen1.5-7b", visual_tokens=64, memory_budget_bytes=mem).optimum is not None
    assert plan(2e12, "llava-qwen1.5-7b", visual_tokens=64, batch=4, memory_budget_bytes=mem).optimum is None


def test_fit_rejects_non_finite_measurements():
    with pytest.raises(ValueError, match="finite"):
        fit_power_law([1e9, 2e9, 4e9], [1, 4, 16], [0.5, math.nan, 0.4])


# ----------------------------------------------------------------------------- CLI


def test_cli_prints_frontier_and_writes_png(tmp_path, capsys):
    from tokenkern.__main__ import main

    png = tmp_path / "plots" / "frontier.png"
    assert main(["plan", "--budget", "2T", "--text-tokens", "50", "--decode-tokens", "16", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    expected = plan(2e12, PAPER_FAMILY, text_tokens=50, decode_tokens=16)
    best = expected.optimum
    assert "Pareto frontier" in out and "pred. error" in out
    assert f"optimum: {best.name} with {best.visual_tokens} visual tokens" in out
    rows = [line for line in out.splitlines() if "llava-qwen1.5-" in line and not line.startswith("optimum")]
    assert len(rows) == len(expected.frontier)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000

    assert main(["plan", "--budget", "800G", "--models", "qwen2-vl-2b,llava-1.5-7b", "--all", "--llm-only"]) == 0
    out = capsys.readouterr().out
    assert "all candidates" in out and "without vision tower" in out and "qwen2-vl-2b" in out

    # a custom law that ignores the LLM: the cheapest model with the most tokens that fit wins
    assert main(["plan", "--budget", "2T", "--law", "1,0,0.5,0", "--visual-tokens", "1,16,144"]) == 0
    assert "optimum: llava-qwen1.5-0.5b with 144 visual tokens" in capsys.readouterr().out

    assert main(["plan", "--budget", "1e6"]) == 1
    assert "nothing fits" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["plan", "--budget", "lots"])
    with pytest.raises(SystemExit):
        main(["plan", "--budget", "1T", "--models", "nope"])
    with pytest.raises(SystemExit):
        main(["plan", "--budget", "1T", "--text-tokens", "-5"])
    assert main(["plan", "--budget", "1T", "--models", "qwen2-vl-2b", "--image-size", "434"]) == 2
    assert "merge" in capsys.readouterr().err


def test_cli_module_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "tokenkern", "plan", "--budget", "3e12", "--models", "all"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "optimum:" in proc.stdout and "budget 3 TF per request" in proc.stdout


def test_cli_parse_flops():
    from tokenkern.planner.cli import parse_flops

    assert parse_flops("2e12") == 2e12 and parse_flops("2T") == 2e12 and parse_flops("800 GFLOPs") == 8e11
    assert parse_flops("1.5p") == 1.5e15
    import argparse

    for bad in ("", "T", "1.2.3T", "2X", "-1T", "0"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"FLOPs count|must be > 0"):
            parse_flops(bad)
