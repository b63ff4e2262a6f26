"""FLOPs and memory of one VLM request: vision tower, projector, LLM prefill, decode steps.

Conventions (every function here):

* **FLOPs count matrix products only**, a multiply-add being 2 FLOPs: ``(m x k) @ (k x n)``
  costs ``2 m k n``. Convolutions count as the matmul they are. This is exactly what
  ``torch.utils.flop_counter.FlopCounterMode`` counts (``mm``, ``addmm``, ``bmm``, ``baddbmm``,
  ``convolution``, fused attention on CUDA), which is how the model is checked
  (``tests/test_planner.py``, within 5% on small ``transformers`` models; the measured gap is
  the rotary-embedding frequency matmul of ``transformers``, which we leave out). In torch 2.13
  FlopCounterMode counts nothing for the CPU SDPA kernel, so the checks use eager attention.
* **Not counted** (neither here nor by FlopCounterMode): bias adds, norms, activations, the
  softmax, RoPE rotation, residual adds, attention scaling and masking. Each is
  ``O(tokens x width)`` per layer, against ``O(tokens x width^2)`` for the projections: well
  under 1% of a real (width >= 1024) model, more on toy models.
* **Attention is dense**: ``QK^T`` and ``PV`` each cost ``2 * Hq * q * k * d`` for ``q`` query
  rows and ``k`` visible keys, the full rectangle, as eager attention and SDPA's math path
  compute it. A causal FlashAttention kernel skips the masked half of a prefill's blocks, so
  it does about half of the prefill's quadratic term; pass ``causal_skip=True`` to count that.
* **LM head**: ``lm_head="last"`` computes logits for the last position only
  (``logits_to_keep=1``, what generation needs), ``"all"`` for every prefill position
  (``transformers``' default forward, or scoring a prompt).
* **Decode**: ``decode_tokens`` single-token forward passes after the prefill; step ``i``
  (0-based) attends to ``prompt + i + 1`` keys. Generating ``G`` answer tokens takes ``G - 1``
  of them (the prefill's logits give the first token).
* Everything scales linearly with ``batch`` (requests of the same shape).

Memory: weights ``params x bytes_per_param``; KV cache
``2 x layers x Hkv x d x tokens x batch x bytes_per_element`` (keys and values of every cached
position, what ``transformers``' ``DynamicCache`` holds); activations are not modeled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .specs import LLMSpec, ProjectorSpec, VisionSpec, VLMSpec

LMHead = Literal["last", "all"]


def _check_count(name: str, value: int, minimum: int = 0) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _lm_head_positions(lm_head: LMHead, tokens: int) -> int:
    if lm_head == "last":
        return 1 if tokens > 0 else 0
    if lm_head == "all":
        return tokens
    raise ValueError(f"lm_head must be 'last' or 'all', got {lm_head!r}")


def llm_linear_flops_per_token(llm: LLMSpec) -> int:
    """Projection FLOPs of one token through all decoder layers (q, k, v, o and the MLP), no
    attention scores, no LM head."""
    h = llm.hidden
    attn = 2 * h * (llm.q_dim + 2 * llm.kv_dim) + 2 * llm.q_dim * h
    mlp = (3 if llm.gated_mlp else 2) * 2 * h * llm.intermediate
    return llm.layers * (attn + mlp)


def llm_attention_flops(llm: LLMSpec, queries: int, keys: int) -> int:
    """``QK^T`` plus ``PV`` over all layers for a ``queries x keys`` score rectangle."""
    return _score_pair_flops(llm, queries * keys)


def _score_pair_flops(llm: LLMSpec, pairs: int) -> int:
    """``QK^T`` plus ``PV`` over all layers for ``pairs`` (query, key) scores."""
    return llm.layers * 2 * (2 * llm.heads * pairs * llm.dh)


def lm_head_flops(llm: LLMSpec, positions: int) -> int:
    """Logits for ``positions`` rows: ``2 * positions * hidden * vocab``."""
    return 2 * positions * llm.hidden * llm.vocab


def llm_forward_flops(
    llm: LLMSpec,
    new_tokens: int,
    past_tokens: int = 0,
    *,
    lm_head: LMHead = "last",
    causal_skip: bool = False,
) -> int:
    """FLOPs of one LLM forward over ``new_tokens`` positions appended to ``past_tokens`` cached
    ones (a prefill when ``past_tokens == 0``, a decode step when ``new_tokens == 1``).

    The score rectangle is ``new_tokens x (past_tokens + new_tokens)``; with ``causal_skip``
    only its causal part, ``new * past + new * (new + 1) / 2``, is counted.
    """
    _check_count("new_tokens", new_tokens)
    _check_count("past_tokens", past_tokens)
    linear = new_tokens * llm_linear_flops_per_token(llm)
    keys = past_tokens + new_tokens
    if causal_skip:
        # sum over query rows of the keys each one sees; exact integer arithmetic
        attn = _score_pair_flops(llm, new_tokens * past_tokens + new_tokens * (new_tokens + 1) // 2)
    else:
        attn = llm_attention_flops(llm, new_tokens, keys)
    return linear + attn + lm_head_flops(llm, _lm_head_positions(lm_head, new_tokens))


def llm_prefill_flops(llm: LLMSpec, tokens: int, *, lm_head: LMHead = "last", causal_skip: bool = False) -> int:
    """Prefill over ``tokens`` positions (text + visual), no cache."""
    return llm_forward_flops(llm, tokens, 0, lm_head=lm_head, causal_skip=causal_skip)


def llm_decode_step_flops(llm: LLMSpec, context: int) -> int:
    """One decode step: one new token attending to ``context`` cached tokens and itself."""
    return llm_forward_flops(llm, 1, context, lm_head="last")


def llm_decode_flops(llm: LLMSpec, prompt_tokens: int, decode_tokens: int) -> int:
    """``decode_tokens`` decode steps after a prompt of ``prompt_tokens`` (closed form of the
    sum of ``llm_decode_step_flops(llm, prompt_tokens + i)``, ``i < decode_tokens``)."""
    _check_count("prompt_tokens", prompt_tokens)
    _check_count("decode_tokens", decode_tokens)
    n = decode_tokens
    per_step = llm_linear_flops_per_token(llm) + lm_head_flops(llm, 1)
    # step i sees prompt + i + 1 keys: sum_i (prompt + 1 + i) = n (prompt + 1) + n (n - 1) / 2
    keys_total = n * (prompt_tokens + 1) + n * (n - 1) // 2
    return n * per_step + _score_pair_flops(llm, keys_total)


def vision_flops(vision: VisionSpec) -> int:
    """One image through the vision tower: every crop's patch stem and blocks (full attention
    over the crop's tokens, [CLS] included). Per image."""
    t = vision.tokens_per_crop
    h, i = vision.hidden, vision.intermediate
    stem = 2 * vision.patches * h * (vision.in_channels * vision.temporal_patch * vision.patch_size**2)
    block = 2 * t * h * 3 * h + 2 * t * h * h + 2 * (2 * t * t * h) + 2 * (2 * t * h * i)
    return vision.crops * (stem + vision.layers * block)


def projector_flops(projector: ProjectorSpec, input_tokens: int) -> int:
    """The projector over ``input_tokens`` vision tokens (``input_tokens / merge`` outputs)."""
    _check_count("input_tokens", input_tokens)
    out = input_tokens // projector.merge
    return (
        2
        * out
        * (projector.in_features * projector.hidden_features + projector.hidden_features * projector.out_features)
    )


def kv_cache_bytes(llm: LLMSpec, tokens: int, *, batch: int = 1, bytes_per_element: int = 2) -> int:
    """Bytes of the keys and values of ``tokens`` cached positions over all layers."""
    _check_count("tokens", tokens)
    return 2 * llm.layers * llm.kv_dim * tokens * batch * bytes_per_element


@dataclass(frozen=True)
class FlopBreakdown:
    """FLOPs of one request (times ``batch``), by stage."""

    vision: int
    projector: int
    prefill: int
    decode: int

    @property
    def llm(self) -> int:
        return self.prefill + self.decode

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.prefill + self.decode


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes held during the request: weights and the KV cache at its largest (after the last
    decode step). Activations are not modeled."""

    weights: int
    kv_cache: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache


@dataclass(frozen=True)
class Cost:
    flops: FlopBreakdown
    memory: MemoryBreakdown


def vlm_cost(
    spec: VLMSpec | LLMSpec,
    visual_tokens: int,
    text_tokens: int,
    decode_tokens: int = 0,
    *,
    batch: int = 1,
    lm_head: LMHead = "last",
    include_vision: bool = True,
    causal_skip: bool = False,
    bytes_per_param: int = 2,
    kv_bytes_per_element: int = 2,
) -> Cost:
    """Cost of one request: one image reduced to ``visual_tokens`` LLM tokens, ``text_tokens``
    prompt tokens, ``decode_tokens`` decode steps; ``batch`` such requests.

    The vision tower and projector always run on the full image (token reduction acts on the
    projector's output, the cost of the reduction itself is not counted). With
    ``include_vision=False`` (or a spec without a vision tower) only the LLM is costed, as in
    the scaling-law paper's ``O(N (Q + V))`` compute. Weights always include every part of
    ``spec`` (they are resident either way).
    """
    if isinstance(spec, LLMSpec):
        spec = VLMSpec.from_llm(spec)
    _check_count("visual_tokens", visual_tokens)
    _check_count("text_tokens", text_tokens)
    _check_count("batch", batch, 1)
    prompt = visual_tokens + text_tokens
    vis = proj = 0
    if include_vision and spec.vision is not None and spec.projector is not None:
        vis = vision_flops(spec.vision)
        proj = projector_flops(spec.projector, spec.projector_input_tokens)
    prefill = llm_prefill_flops(spec.llm, prompt, lm_head=lm_head, causal_skip=causal_skip)
    decode = llm_decode_flops(spec.llm, prompt, decode_tokens)
    flops = FlopBreakdown(vision=batch * vis, projector=batch * proj, prefill=batch * prefill, decode=batch * decode)
    memory = MemoryBreakdown(
        weights=spec.params() * bytes_per_param,
        kv_cache=kv_cache_bytes(spec.llm, prompt + decode_tokens, batch=batch, bytes_per_element=kv_bytes_per_element),
    )
    return Cost(flops=flops, memory=memory)
