"""The queries and keys of one layer of vLLM's CLIP vision encoder
(``vllm.model_executor.models.clip.CLIPAttention``: ``qkv_proj`` -> ``attn(q, k, v)``), captured
by a forward pre-hook on its ``attn`` module; the layer's attention runs unchanged.

Under tensor parallelism each rank computes its share of the heads; the capture gathers all of
them, so every rank scores the same full-head q/k and selects the same tokens.
"""

from __future__ import annotations

from torch import Tensor, nn


def encoder_layers(tower: nn.Module) -> nn.ModuleList:
    """The encoder layers vLLM built (only up to the vision feature layer)."""
    return getattr(tower, "vision_model", tower).encoder.layers


class ClipQK:
    """Armed around one tower call; take() returns (q, k), each (B, H, L, d), all heads."""

    def __init__(self, attention: nn.Module):
        self.attention = attention
        self.heads_local = int(attention.num_heads_per_partition)
        self.head_dim = int(attention.head_dim)
        self.scale = float(attention.scale)
        self.tp_size = int(getattr(attention, "tp_size", 1))
        self.armed = False
        self._qk: tuple[Tensor, Tensor] | None = None
        self._hook = attention.attn.register_forward_pre_hook(self._grab, with_kwargs=True)

    def _grab(self, module, args, kwargs):
        if self.armed:
            q = args[0] if args else kwargs["query"]
            k = args[1] if len(args) > 1 else kwargs["key"]
            self._qk = (q, k)
        return None

    def arm(self) -> None:
        self.armed, self._qk = True, None

    def take(self) -> tuple[Tensor, Tensor]:
        self.armed = False
        if self._qk is None:
            raise RuntimeError("tokenkern.vllm: the scoring CLIP layer did not run")
        q, k = self._qk
        self._qk = None
        if self.tp_size > 1:
            from vllm.distributed import tensor_model_parallel_all_gather

            q, k = tensor_model_parallel_all_gather(q.contiguous()), tensor_model_parallel_all_gather(k.contiguous())
        return self._heads(q), self._heads(k)

    def _heads(self, x: Tensor) -> Tensor:
        """(B, L, H d) -> (B, H, L, d)."""
        b, length, _ = x.shape
        return x.view(b, length, -1, self.head_dim).transpose(1, 2)

    def remove(self) -> None:
        self._hook.remove()
