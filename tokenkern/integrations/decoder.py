"""Pruning inside the decoder, with SDPA/FlashAttention untouched and generate() working.

Everything outside the decoder (generate's attention mask, position ids, cache bookkeeping)
keeps the full sequence length L. Inside, the layers from the pruning point on see only the
kept positions:

* prefill: at the first pruned layer the hidden states, that layer's attention mask (rows and
  columns), the rotary position embeddings and the position ids are gathered at the kept
  positions (original position ids are kept); later pruned layers gather the mask and
  positions the same way. The KV cache of a pruned layer therefore holds only kept tokens.
* decode: the mask of a pruned layer keeps the columns of the kept prefix plus the new
  tokens. When the pruning point is layer 0 (vision-side methods) the whole cache is pruned,
  so the decoder's own 2-D attention mask and position ids are translated once per step.

One host synchronization per prefill sizes the pruned sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .capture import QKCapture
from .sequence import Gather, text_after_first_image, transform_mask

# fn(state) -> (keep (B, L) bool, new hidden states (B, L, H) or None)
Selector = Callable[["PrefillState"], tuple[Tensor, Tensor | None]]


@dataclass
class PrefillState:
    image: Tensor  # (B, L) image id per token, -1 elsewhere
    valid: Tensor  # (B, L) bool, False at padding
    text: Tensor  # (B, L) bool, instruction tokens after the first image
    inputs_embeds: Tensor  # (B, L, H) decoder inputs
    hidden: Tensor | None = None  # (B, L, H) input of the first pruned layer
    q: Tensor | None = None  # (B, Hq, L, d) of the scoring layer (after RoPE)
    k: Tensor | None = None
    scale: float = 1.0


class DecoderPruner:
    """Installs the hooks on a decoder (its module and its layers); `start` is the first
    pruned layer (0 for a selection made before the decoder)."""

    def __init__(self, language_model: nn.Module, layers: nn.ModuleList, start: int, selector: Selector, rotary=None):
        self.lm = language_model
        self.layers = layers
        self.start = start
        self.selector = selector
        self.pending_image: Tensor | None = None  # set by the VLM for the next prefill
        self.prefill: PrefillState | None = None
        self.gather: Gather | None = None
        self.capture: QKCapture | None = None
        self.handles = [
            language_model.register_forward_pre_hook(self._lm_pre, with_kwargs=True),
            language_model.register_forward_hook(self._lm_post, with_kwargs=True),
        ]
        if start > 0:
            attn = layers[start - 1].self_attn
            self.capture = QKCapture(attn, attn.head_dim, rotary)
            self.scale = float(attn.scaling)
            for layer in layers[start:]:
                self.handles.append(layer.register_forward_pre_hook(self._layer_pre, with_kwargs=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        if self.capture is not None:
            self.capture.remove()
        self.handles = []

    # ------------------------------------------------------------------ decoder module

    def _lm_pre(self, module, args, kwargs):
        # A forward that raised midway never reached _lm_post: forget its prefill.
        self.prefill = None
        if self.capture is not None:
            self.capture.armed = False
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
            self.gather = None  # a new sequence: forget the last prefill
            if image is None or tuple(image.shape) != (b, length) or not bool((image >= 0).any()):
                return None
            mask = kwargs.get("attention_mask")
            valid = mask.bool() if (mask is not None and mask.dim() == 2) else torch.ones_like(image, dtype=torch.bool)
            state = PrefillState(image, valid, text_after_first_image(image, valid), embeds)
            if self.start == 0:
                return args, self._prune_inputs(state, kwargs)
            self.prefill = state
            self.capture.arm()
            return None
        if self.gather is not None and self.start == 0:
            return args, self._translate_decode_inputs(kwargs, past, length)
        return None

    def _lm_post(self, module, args, kwargs, output):
        self.prefill = None
        if self.capture is not None:
            self.capture.armed = False
        return None

    def _prune_inputs(self, state: PrefillState, kwargs: dict) -> dict:
        keep, new_embeds = self.selector(state)
        embeds = new_embeds if new_embeds is not None else state.inputs_embeds
        g = Gather.from_mask(keep, state.valid)
        self.gather = g
        out = dict(kwargs)
        out["inputs_embeds"] = g.tokens(embeds)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            out["attention_mask"] = g.valid.to(mask.dtype)
        elif g.padded:
            out["attention_mask"] = g.valid.long()
        pos = kwargs.get("position_ids")
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
        if kwargs.get("position_ids") is None:
            start = self._full_past(past)
            out["position_ids"] = torch.arange(start, start + q_len, device=g.idx.device)[None]
        return out

    # ---------------------------------------------------------------- pruned layers

    def _layer_pre(self, layer, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.prefill is not None:
            first = self.gather is None  # the first pruned layer: hidden is still full length
            if first:
                state = self.prefill
                state.q, state.k = self.capture.take()
                state.scale = self.scale
                state.hidden = hidden
                keep, new_hidden = self.selector(state)
                state.q = state.k = None
                if new_hidden is not None:
                    hidden = new_hidden
                self.gather = Gather.from_mask(keep, state.valid)
            g = self.gather
            if first:  # later layers receive the pruned hidden states (of any length, even g.length)
                hidden = g.tokens(hidden)
            out = dict(kwargs)
            out["attention_mask"] = transform_mask(kwargs.get("attention_mask"), g.idx, g.idx, g.valid, g.padded, True)
            pe = kwargs.get("position_embeddings")
            if pe is not None:
                out["position_embeddings"] = tuple(g.tokens(t, dim=t.dim() - 2) for t in pe)
            pos = kwargs.get("position_ids")
            if isinstance(pos, Tensor) and pos.shape[-1] == g.length:
                out["position_ids"] = g.positions(pos)
            return self._with_hidden(args, out, hidden)
        if self.gather is not None:
            g = self.gather
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
