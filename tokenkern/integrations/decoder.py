"""Pruning inside the decoder, with SDPA/FlashAttention untouched and generate() working.

Everything outside the decoder (generate's attention mask, position ids, cache bookkeeping)
keeps the full sequence length L. Inside, the layers from the pruning point on see only the
kept positions:

* prefill: a pruning step at layer K (``layer=K``: layers 0 .. K-1 see every token that the
  step before kept, the q/k of layer K-1 score, layers K, K+1, ... see what this step keeps)
  gathers, at its first layer, the hidden states, and at every layer from K on that layer's
  attention mask (rows and columns), the rotary position embeddings and the position ids at
  the kept positions (original position ids are kept). Several steps (SparseVLM's schedule)
  compose: each gather indexes the unpruned sequence. The KV cache of a layer therefore holds
  the tokens of its step only.
* decode: the mask of a pruned layer keeps the columns of the kept prefix plus the new
  tokens. When the pruning point is layer 0 (vision-side methods) the whole cache is pruned,
  so the decoder's own 2-D attention mask and position ids are translated once per step.
* positions: the kept tokens keep their original position ids, or, ``packed`` (a selection
  made before the decoder), get the ones the model computes when handed the kept tokens
  only: the position ids the decoder would derive itself stay underived (it numbers the
  shorter sequence), given ones (generate()'s, from the attention mask) move down by the
  tokens dropped before each kept token, and every decoding step by all that its sample
  dropped; the kept sequences are left-padded to the longest of them, as a processor pads.

One host synchronization per prefill sizes the pruned sequences: a single step syncs once; a
multi-step selector comes with a plan (the positions each step drops in each sample, known
before the first step) that sizes every step in one sync.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn

from .capture import QKCapture
from .sequence import Gather, text_after_first_image, transform_mask

# fn(state) -> (keep (B, L) bool, new hidden states (B, L, H) or None)
Selector = Callable[["PrefillState"], tuple[Tensor, Tensor | None]]
# fn(state at step 0) -> (steps, B) int64: the positions each step drops in each sample
Plan = Callable[["PrefillState"], Tensor]


@dataclass
class PrefillState:
    """What a selector sees at a pruning step. image, valid, text, hidden, q and k describe the
    sequence that the scoring layer saw (the unpruned one at step 0, what the step before kept
    later on); inputs_embeds is always the unpruned decoder input."""

    image: Tensor  # (B, L) image id per token, -1 elsewhere
    valid: Tensor  # (B, L) bool, False at padding
    text: Tensor  # (B, L) bool, instruction tokens after the first image
    inputs_embeds: Tensor  # (B, L0, H) decoder inputs (the unpruned sequence)
    hidden: Tensor | None = None  # (B, L, H) input of the step's first pruned layer
    q: Tensor | None = None  # (B, Hq, L, d) of the scoring layer (after RoPE)
    k: Tensor | None = None
    scale: float = 1.0
    step: int = 0  # which pruning step (0: the first)
    positions: Tensor | None = None  # (B, L) positions in the unpruned sequence (None at step 0)
    memo: dict = field(default_factory=dict)  # what a selector computes once per prefill

    def from_start(self, x: Tensor, fill=0) -> Tensor:
        """x: (B, L0, ...) over the unpruned sequence -> its rows at this step's positions (fill
        at padding added by earlier steps)."""
        if self.positions is None:
            return x
        idx = self.positions.view(*self.positions.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
        valid = self.valid.view(*self.valid.shape, *([1] * (x.dim() - 2)))
        return torch.where(valid, x.gather(1, idx), fill)

    def advance(self, g: Gather) -> None:
        """Move on to the positions g keeps (g indexes this step's sequence)."""
        self.image = torch.where(g.valid, self.image.gather(1, g.idx), -1)
        self.text = self.text.gather(1, g.idx) & g.valid
        self.positions = g.idx if self.positions is None else self.positions.gather(1, g.idx)
        self.valid = g.valid
        self.hidden = self.q = self.k = None
        self.step += 1


class DecoderPruner:
    """Installs the hooks on a decoder (its module and its layers). start: the pruning step's
    layer K (0 for a selection made before the decoder), or increasing layers K1 < K2 < ...
    for several steps; the selector is called once per step (state.step tells which). plan:
    for several steps, what they drop (sizes all of them with one host sync); without it each
    step syncs once. packed (start 0 only): consecutive position ids over the kept sequence
    instead of the original ones."""

    def __init__(
        self, language_model: nn.Module, layers: nn.ModuleList, start: int | Sequence[int], selector: Selector,
        rotary=None, plan: Plan | None = None, packed: bool = False,
    ):  # fmt: skip
        self.lm = language_model
        self.layers = layers
        self.starts = (start,) if isinstance(start, int) else tuple(start)
        self.start = self.starts[0]
        self.selector = selector
        self.plan = plan
        if packed and self.start != 0:
            raise ValueError("tokenkern.prune: positions must be 'original' for a pruning inside the decoder, "
                             "got 'packed'")  # fmt: skip
        self.packed = packed
        self.dropped: Tensor | None = None  # (B,) valid tokens each sample dropped in the last prefill
        self.sizes: list[tuple[int, bool]] | None = None  # every step's (kept length, padded), from the plan
        self.pending_image: Tensor | None = None  # set by the VLM for the next prefill
        self.prefill: PrefillState | None = None
        self.gathers: list[Gather] = []  # one per step of the last prefill, each into the unpruned sequence
        self.captures: list[QKCapture] = []
        self.scales: list[float] = []
        self.handles = [
            language_model.register_forward_pre_hook(self._lm_pre, with_kwargs=True),
            language_model.register_forward_hook(self._lm_post, with_kwargs=True),
        ]
        if self.start > 0:
            for k in self.starts:
                attn = layers[k - 1].self_attn
                self.captures.append(QKCapture(attn, attn.head_dim, rotary))
                self.scales.append(float(attn.scaling))
            for i in range(self.start, len(layers)):
                hook = partial(self._layer_pre, i)
                self.handles.append(layers[i].register_forward_pre_hook(hook, with_kwargs=True))

    @property
    def gather(self) -> Gather | None:
        """The positions the last step of the last prefill kept (into the unpruned sequence)."""
        return self.gathers[-1] if self.gathers else None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for c in self.captures:
            c.remove()
        self.handles = []
        self.captures = []

    def _disarm(self) -> None:
        for c in self.captures:
            c.armed = False

    # ------------------------------------------------------------------ decoder module

    def _lm_pre(self, module, args, kwargs):
        # A forward that raised midway never reached _lm_post: forget its prefill.
        self.prefill = None
        self.sizes = None
        self._disarm()
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            self.pending_image = None
            return None
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        b, length = embeds.shape[:2]
        image = self.pending_image
        self.pending_image = None
        if past == 0:
            self.gathers = []  # a new sequence: forget the last prefill
            if image is None or tuple(image.shape) != (b, length) or not bool((image >= 0).any()):
                return None
            mask = kwargs.get("attention_mask")
            valid = mask.bool() if (mask is not None and mask.dim() == 2) else torch.ones_like(image, dtype=torch.bool)
            state = PrefillState(image, valid, text_after_first_image(image, valid), embeds)
            if self.start == 0:
                return args, self._prune_inputs(state, kwargs)
            self.prefill = state
            for c in self.captures:
                c.arm()
            return None
        if self.gather is not None and self.start == 0:
            return args, self._translate_decode_inputs(kwargs, past, length)
        return None

    def _lm_post(self, module, args, kwargs, output):
        self.prefill = None
        self._disarm()
        return None

    def _prune_inputs(self, state: PrefillState, kwargs: dict) -> dict:
        keep, new_embeds = self.selector(state)
        embeds = new_embeds if new_embeds is not None else state.inputs_embeds
        if self.packed:  # padding too is re-made: the kept sequences left-padded to the longest, as a processor pads
            keep = keep & state.valid
        g = Gather.from_mask(keep, state.valid)
        self.gathers = [g]
        out = dict(kwargs)
        out["inputs_embeds"] = g.tokens(embeds)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            out["attention_mask"] = g.valid.to(mask.dtype)
        elif g.padded:
            out["attention_mask"] = g.valid.long()
        pos = kwargs.get("position_ids")
        if self.packed:
            dropped = torch.cumsum((state.valid & ~keep).long(), dim=1)  # (B, L) drops up to each position
            self.dropped = dropped[:, -1]
            if pos is not None:
                out["position_ids"] = _packed_positions(pos, dropped, g)
            return out
        if pos is None:
            pos = torch.arange(g.length, device=embeds.device)[None]
        out["position_ids"] = g.positions(pos)
        return out

    def _full_past(self, past: int) -> int:
        """The tokens before a decoding step in the unpruned sequence, for a whole-cache
        pruning (start 0) whose cache holds `past` tokens."""
        return past - self.gather.kept_length + self.gather.length

    def mrope_decode_positions(self, rope_deltas: Tensor, tokens: Tensor | None, kwargs: dict) -> dict | None:
        """Qwen2-VL and Qwen2.5-VL derive a decoding step's position ids from the cache length
        when the call passes neither position ids nor an attention mask (a hand-written decoding
        loop; generate() passes the mask). A whole-cache pruning makes the cache shorter than
        the sequence: the VLM core's pre-hook passes these kwargs instead, with the positions
        the unpruned cache would imply (the step's place in the full sequence plus the model's
        M-RoPE offset, on all three axes, as the model itself computes them); None to leave
        the call as it is. tokens: the step's input_ids (B, q) or inputs_embeds (B, q, H)."""
        cache = kwargs.get("past_key_values")
        if self.start != 0 or self.gather is None or cache is None or tokens is None:
            return None
        if kwargs.get("position_ids") is not None or kwargs.get("attention_mask") is not None:
            return None
        past = cache.get_seq_length()
        if past == 0:
            return None
        b, q_len = tokens.shape[:2]
        start = self._full_past(past)
        pos = torch.arange(start, start + q_len, device=rope_deltas.device).view(1, 1, -1).expand(3, b, -1)
        delta = rope_deltas.repeat_interleave(b // rope_deltas.shape[0], dim=0)
        return {**kwargs, "position_ids": pos + delta}

    def _translate_decode_inputs(self, kwargs: dict, past: int, q_len: int) -> dict:
        g = self.gather
        out = dict(kwargs)
        extra = past - g.kept_length + q_len  # tokens after the prefill, this step's included
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            out["attention_mask"] = torch.cat([g.valid.to(mask.dtype), mask[:, g.length :]], dim=1)[
                :, -(g.kept_length + extra) :
            ]
        pos = kwargs.get("position_ids")
        if self.packed:
            # Underived ones: the decoder numbers from its (pruned) cache length, as it would.
            if pos is not None:
                out["position_ids"] = pos - self.dropped.view(-1, *([1] * (pos.dim() - 1)))
            return out
        if pos is None:
            start = self._full_past(past)
            out["position_ids"] = torch.arange(start, start + q_len, device=g.idx.device)[None]
        return out

    # ---------------------------------------------------------------- pruned layers

    def _select(self, step: int, hidden: Tensor) -> Tensor:
        """Run pruning step `step` on the input of its first layer; -> the kept hidden states."""
        state = self.prefill
        state.q, state.k = self.captures[step].take()
        state.scale = self.scales[step]
        state.hidden = hidden
        if step == 0 and self.plan is not None and len(self.starts) > 1:
            self.sizes = self._plan_sizes(state)
        keep, new_hidden = self.selector(state)
        if new_hidden is not None:
            hidden = new_hidden
        g = Gather.from_mask(keep, state.valid, None if self.sizes is None else self.sizes[step])
        self.gathers.append(g if step == 0 else self.gathers[-1].then(g))
        state.advance(g)
        return g.tokens(hidden)

    def _plan_sizes(self, state: PrefillState) -> list[tuple[int, bool]]:
        """Every step's (kept length, padded), as Gather.from_mask would find them, in one host
        sync: each step keeps length - drops positions per sample, the longest sets the next
        length; padding, once there, stays (padding positions are never dropped)."""
        drops = self.plan(state)
        length = torch.tensor(state.valid.shape[1], device=drops.device)
        padded = (~state.valid).any()
        lengths, pads = [], []
        for d in drops:
            counts = length - d
            length = counts.max()
            padded = padded | (counts < length).any()
            lengths.append(length)
            pads.append(padded.long())
        values = torch.stack(lengths + pads).tolist()
        n = len(lengths)
        return [(values[i], bool(values[n + i])) for i in range(n)]

    def _layer_pre(self, index, layer, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        step = bisect.bisect_right(self.starts, index) - 1
        if self.prefill is not None:
            if index == self.starts[step] and len(self.gathers) == step:
                # the step's first layer: later layers receive the pruned hidden states (of any
                # length, even the unpruned one)
                hidden = self._select(step, hidden)
            g = self.gathers[step]
            out = dict(kwargs)
            out["attention_mask"] = transform_mask(kwargs.get("attention_mask"), g.idx, g.idx, g.valid, g.padded, True)
            pe = kwargs.get("position_embeddings")
            if pe is not None:
                out["position_embeddings"] = tuple(g.tokens(t, dim=t.dim() - 2) for t in pe)
            pos = kwargs.get("position_ids")
            if isinstance(pos, Tensor) and pos.shape[-1] == g.length:
                out["position_ids"] = g.positions(pos)
            return self._with_hidden(args, out, hidden)
        if step < len(self.gathers):
            g = self.gathers[step]
            mask = kwargs.get("attention_mask")
            cache = kwargs.get("past_key_values")
            if mask is not None:
                total = mask.shape[-1]
            else:
                total = cache.get_seq_length(0)
            extra = total - g.length
            out = dict(kwargs)
            out["attention_mask"] = transform_mask(
                mask, None, g.columns(extra, hidden.device), g.column_valid(extra), g.padded, False
            )
            return self._with_hidden(args, out, hidden)
        return None

    @staticmethod
    def _with_hidden(args, kwargs, hidden):
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs


def _packed_positions(pos: Tensor, dropped: Tensor, g: Gather) -> Tensor:
    """pos (B or 1, L) the position ids given for the unpruned sequence; dropped (B, L) the
    valid tokens dropped up to each position -> (B, L') for the kept sequence: each kept token's
    position less the tokens dropped before it (a kept token is not dropped itself), and at
    padding the position the sample's first slot had (generate() gives padding 0)."""
    shifted = g.positions(pos - dropped)
    first = pos[..., :1].expand(*pos.shape[:-2], g.idx.shape[0], 1)
    return torch.where(g.valid, shifted, first)
