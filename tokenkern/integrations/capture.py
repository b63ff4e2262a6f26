"""Capture the queries and keys an attention layer computes, without changing its forward or
its attention implementation: hooks on its q_proj / k_proj outputs, plus its position
embeddings, and the model's own rotary function applied afterwards."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn


class QKCapture:
    """Install on an attention module; after it runs, `q` and `k` hold (B, H, L, d) tensors
    (after RoPE when `rotary` is given). Armed only between arm() and take()."""

    def __init__(self, attn: nn.Module, head_dim: int, rotary: Callable | None = None):
        self.attn = attn
        self.head_dim = head_dim
        self.rotary = rotary
        self.armed = False
        self._q: Tensor | None = None
        self._k: Tensor | None = None
        self._pos: tuple[Tensor, Tensor] | None = None
        self.handles = [
            attn.q_proj.register_forward_hook(self._grab("_q")),
            attn.k_proj.register_forward_hook(self._grab("_k")),
            attn.register_forward_pre_hook(self._grab_positions, with_kwargs=True),
        ]

    def _grab(self, name: str):
        def hook(module, args, output):
            if self.armed:
                setattr(self, name, output)

        return hook

    def _grab_positions(self, module, args, kwargs):
        if self.armed:
            self._pos = kwargs.get("position_embeddings")
        return None

    def arm(self) -> None:
        self.armed = True
        self._q = self._k = self._pos = None

    def take(self) -> tuple[Tensor, Tensor]:
        """The captured (q, k), (B, H, L, d); disarms and forgets them."""
        self.armed = False
        if self._q is None or self._k is None:
            raise RuntimeError("tokenkern.prune: the scoring attention layer did not run")
        b, length, _ = self._q.shape
        q = self._q.view(b, length, -1, self.head_dim).transpose(1, 2)
        k = self._k.view(b, length, -1, self.head_dim).transpose(1, 2)
        if hasattr(self.attn, "q_norm"):
            q, k = self.attn.q_norm(q), self.attn.k_norm(k)
        if self.rotary is not None and self._pos is not None:
            cos, sin = self._pos
            q, k = self.rotary(q, k, cos, sin)
        self._q = self._k = self._pos = None
        return q, k

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
