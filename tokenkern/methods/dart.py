"""DART (Wen et al., "Stop Looking for Important Tokens"): duplication-aware token reduction.
Attention-free: a few pivot tokens, and for each pivot the image tokens least similar to it.

LLM-side (:func:`dart`, the released form): ``layer=K`` (default 2) means that decoder layers
0 .. K-1 see every token and layers K, K+1, ... see the kept ones (FastV's convention). From
layer K-1: ``h`` = the final RMSNorm (with its weight) applied to layer K-1's output hidden
states, and its post-RoPE keys flattened to (L, H * d). Pivots: the ``image_pivots`` (4) image
positions with the largest L1 key norm, and the ``text_pivots`` (4) largest among the tokens
after the image. Budget M = ``keep`` (the released ``max_num_trunction``, default 128),
``per_pivot = M // (image_pivots + text_pivots)``; candidates = the image positions minus the
image pivots; for each pivot p in order, the per_pivot candidates least cosine-similar to
``h[p]`` (eps 1e-8) are kept and leave the candidates (tokenkern.pivot_select). Kept image
tokens: the image pivots and the selected ones, ``4 + 8 (M // 8)`` (68 / 132 / 196 for M = 64
/ 128 / 192); text is always kept and kept tokens keep their position ids.

Pivot order: the released code walks ``list(set(image_pivots + text_pivots))``, the image
pivots by descending norm, then the text ones, as positions counted from the prompt's first
token. That order is deterministic (a small int hashes to itself) and changes the result, so
``pivot_order="released"`` (default) takes it from Python's set on the CPU and, on other
devices, from :func:`set_order`, which reproduces CPython's set layout with tensor ops (no host
sync): the table of 8 slots, its growth to 32 on the fifth insertion, linear probing over 10
slots and the perturbed probe sequence. ``pivot_order="ascending"`` walks them by position.
Positions are counted from each sample's first valid token: left padding changes nothing.

Batches and several images: a sample's image tokens are all positions with an image id (every
image together, as one budget), its text pivots come from the valid tokens after its last
image token. Its L1 norms are those of the layer's (B, Hkv, L, d) keys: the released code reads
the keys repeated to Hq heads, whose L1 norm is Hq / Hkv times this one (the same ranking up
to float32 rounding). A sample with fewer than ``4 + 8 (M // 8)`` image tokens keeps them all;
fewer than 4 image tokens or tokens after the image (not a released case) fill the remaining
pivot slots with the lowest other positions.

Embeddings (:func:`dart_embeddings`, the fixed-count form serving engines use): the same rule on
the assembled input embeddings before the LLM (layer 0): pivots by the L1 norm of the
embeddings, similarity on the embeddings. It reduces one image's tokens x (B, N, D), with
M = keep_count(keep, N); the text pivots come from the embeddings of the tokens after the
image when given. Without them (a vision-only model), the image pivots share the whole budget:
``per_pivot = M // image_pivots``, kept ``image_pivots + image_pivots (M // image_pivots)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

import tokenkern

from . import fields
from .base import Reduction, gather_tokens, keep_count, mask_to_indices, token_matrix
from .inputs import DecoderLayer

# CPython's set: the first table has 8 slots; a probe looks at 10 consecutive slots where they
# fit in the table; the perturbation shifts by 5 bits per step.
_SET_MINSIZE = 8
_LINEAR_PROBES = 9
_PERTURB_SHIFT = 5


@dataclass
class DARTConfig:
    """keep: the budget M (a count; dart_embeddings also takes a fraction of the image's N);
    layer: K >= 1 (layers 0 .. K-1 see every token); pivot_order: "released" (the set order of
    the released code) or "ascending"; image_pivots / text_pivots: the pivots of each kind."""

    keep: float | int = 128
    layer: int = 2
    pivot_order: str = "released"
    image_pivots: int = 4
    text_pivots: int = 4

    def __post_init__(self) -> None:
        fields.keep("dart", self.keep)
        fields.integer("dart", "layer", self.layer, lo=1)
        fields.choice("dart", "pivot_order", self.pivot_order, ("released", "ascending"))
        fields.integer("dart", "image_pivots", self.image_pivots, lo=1, hi=64)
        fields.integer("dart", "text_pivots", self.text_pivots, lo=0, hi=64)

    @property
    def layers(self) -> tuple[int, ...]:
        """The pruning steps: (K,)."""
        return (self.layer,)


def dart_kept(budget: int, image_pivots: int = 4, text_pivots: int = 4) -> int:
    """Image tokens DART keeps with budget M (when the image has that many): the image pivots
    plus ``per_pivot`` per pivot, ``per_pivot = M // (image_pivots + text_pivots)``."""
    pivots = image_pivots + text_pivots
    return image_pivots + pivots * (budget // pivots)


# ------------------------------------------------------------------------- CPython set order


def _probe_slots(h: Tensor, size: int, bits: int) -> Tensor:
    """h: (...) int64 keys >= 0 below 2**bits -> (..., S) the slots CPython's set probes for h in
    a table of `size` slots, in probe order (-1 where a probe round has no linear run)."""
    mask = size - 1
    i = h & mask
    rounds = [i]
    perturb = h
    for _ in range(bits // _PERTURB_SHIFT + 1):  # until perturb is 0
        perturb = perturb >> _PERTURB_SHIFT
        i = (i * 5 + 1 + perturb) & mask
        rounds.append(i)
    # perturb = 0 from here: i -> 5 i + 1 (mod size), a full-period sequence, in closed form.
    powers = [pow(5, s, 4 * size) for s in range(1, size + 1)]
    a = torch.tensor([p % size for p in powers], device=h.device)
    c = torch.tensor([((p - 1) // 4) % size for p in powers], device=h.device)
    starts = torch.cat([torch.stack(rounds, dim=-1), (i[..., None] * a + c) & mask], dim=-1)  # (..., R)
    run = torch.arange(_LINEAR_PROBES + 1, device=h.device)
    slots = starts[..., None] + run
    slots = torch.where((run == 0) | (starts[..., None] + _LINEAR_PROBES <= mask), slots, -1)
    return slots.flatten(-2)


def _insert(table: Tensor, slots: Tensor, item: Tensor) -> Tensor:
    """table: (B, size) int64 key numbers (-1 = empty); writes item (B,) (-1: nothing) into the
    first free slot of its probe sequence slots (B, S). The keys are distinct."""
    occupied = table.gather(1, slots.clamp(min=0)) >= 0
    free = (slots >= 0) & ~occupied
    slot = slots.gather(1, free.int().argmax(dim=1, keepdim=True))  # the first free one
    current = table.gather(1, slot)
    return table.scatter(1, slot, torch.where(item[:, None] >= 0, item[:, None], current))


def set_order(keys: Tensor, bits: int) -> Tensor:
    """keys: (B, P) distinct int64 in [0, 2**bits), in insertion order -> (B, P) the same keys in
    the order ``list(set(keys))`` gives on CPython 3.x (int keys hash to themselves), sync-free.
    The table holds key numbers 0 .. P-1; each table size's probe sequences are computed once."""
    b, p = keys.shape
    size, fill = _SET_MINSIZE, 0
    table = keys.new_full((b, size), -1)
    probes = _probe_slots(keys, size, bits)  # (B, P, S)
    for j in range(p):
        table = _insert(table, probes[:, j], keys.new_full((b,), j))
        fill += 1
        if fill * 5 >= (size - 1) * 3:  # CPython grows the table to hold 4x the keys
            new = _SET_MINSIZE
            while new <= fill * 4:
                new <<= 1
            old, table = table, keys.new_full((b, new), -1)
            probes = _probe_slots(keys, new, bits)
            for s in range(size):  # re-inserted in the old table's slot order
                item = old[:, s]
                at = item.clamp(min=0)[:, None, None].expand(-1, 1, probes.shape[2])
                table = _insert(table, probes.gather(1, at)[:, 0], item)
            size = new
    order = table.gather(1, mask_to_indices(table >= 0, p))  # key numbers in slot order
    return keys.gather(1, order)


# ------------------------------------------------------------------------------- the rule


def _top_positions(score: Tensor, allowed: Tensor, count: int, fallback: Tensor) -> Tensor:
    """(B, count) int64: the positions with the largest score where allowed (ties to the lower
    position), then, where fewer are allowed, the lowest positions of fallback."""
    key = torch.where(allowed, score.float(), -1.0)  # L1 norms are >= 0
    key = torch.where(~allowed & ~fallback, -2.0, key)
    return torch.sort(key, dim=1, descending=True, stable=True).indices[:, :count]


def _pivots(
    score: Tensor, image: Tensor, after: Tensor, valid: Tensor, first: Tensor, cfg: DARTConfig, bits: int
) -> tuple[Tensor, Tensor]:
    """score: (B, L) L1 norms; image / after / valid: (B, L) bool; first: (B,) the first valid
    position -> (pivots (B, P) in walking order, image pivots (B, Pi))."""
    img = _top_positions(score, image, cfg.image_pivots, valid & ~image)
    taken = torch.zeros_like(image).scatter(1, img, True)
    txt = _top_positions(score, after & ~taken, cfg.text_pivots, valid & ~taken)
    pivots = torch.cat([img, txt], dim=1)
    if cfg.pivot_order == "ascending":
        return pivots.sort(dim=1).values, img
    rel = (pivots - first[:, None]).clamp(min=0)  # positions counted from the prompt's first token
    rows = None if _sync_free(rel) else [list(set(row)) for row in rel.tolist()]
    if rows is None or any(len(row) != rel.shape[1] for row in rows):  # repeats: only L < P pivots
        return set_order(rel, bits) + first[:, None], img
    # The CPU reads values: Python's own set (set_order is its sync-free twin).
    return torch.tensor(rows, dtype=torch.long).view_as(rel) + first[:, None], img


def _select(h: Tensor, score: Tensor, image: Tensor, after: Tensor, valid: Tensor, cfg: DARTConfig,
            budget: int) -> Tensor:  # fmt: skip
    """h: (B, L, D) the similarity features, score: (B, L) the pivot scores, image / after /
    valid: (B, L) bool -> (B, L) bool, True at the kept image positions."""
    b, length, _ = h.shape
    pos = torch.arange(length, device=h.device).expand(b, length)
    first = torch.where(valid, pos, length).min(dim=1).values.clamp(max=length - 1)
    pivots, img = _pivots(score, image, after, valid, first, cfg, max(1, length.bit_length()))
    n_piv = pivots.shape[1]
    per_pivot = budget // n_piv
    kept = torch.zeros_like(image).scatter(1, img, True) & image
    candidates = image & ~kept
    if per_pivot == 0:
        return kept
    need = n_piv * per_pivot
    if need > length:
        return image
    if _sync_free(h):  # the op pads a short sample with non-candidates: all its image tokens kept
        return kept | _scatter(image, tokenkern.pivot_select(h, pivots, candidates, per_pivot)) & image
    short = candidates.sum(dim=1) < need  # the CPU branches on values: a short sample keeps every image token
    out = image.clone()
    ok = ~short
    if bool(ok.any()):
        sel = tokenkern.pivot_select(h[ok], pivots[ok], candidates[ok], per_pivot)
        out[ok] = kept[ok] | _scatter(image[ok], sel) & image[ok]
    return out


def _sync_free(t: Tensor) -> bool:
    """Whether the selection must not read values on the host (every device but the CPU)."""
    return t.device.type != "cpu"


def _scatter(like: Tensor, indices: Tensor) -> Tensor:
    return torch.zeros_like(like).scatter(1, indices, True)


def dart(layer: DecoderLayer, hidden: Tensor, cfg: DARTConfig) -> Reduction:
    """layer: decoder layer K-1 (its post-RoPE keys, image ids, padding); hidden: (B, L, D) its
    output after the final RMSNorm -> a sequence Reduction: keep_mask (B, L) bool (every
    non-image position plus each sample's kept image tokens), scores (B, L) float32 the L1 key
    norms (the pivot score). keep must be a count (the budget M)."""
    if not isinstance(cfg.keep, int):
        raise ValueError(f"tokenkern.dart: keep must be a token count >= 1 (the budget M) in the decoder, "
                         f"got {cfg.keep!r}")  # fmt: skip
    if not isinstance(hidden, Tensor) or hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(layer.valid.shape):
        got = tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__
        raise ValueError(f"tokenkern.dart: hidden must be (B, L, D) with (B, L) = layer.valid.shape "
                         f"{tuple(layer.valid.shape)}, got {got}")  # fmt: skip
    b, h, length, d = layer.k.shape
    keys = layer.k.detach().float().transpose(1, 2).reshape(b, length, h * d)
    score = keys.abs().sum(dim=-1)
    image = layer.image_mask & layer.valid
    pos = torch.arange(length, device=image.device).expand(b, length)
    last_image = torch.where(image, pos, -1).max(dim=1).values
    after = layer.valid & ~image & (pos > last_image[:, None])
    kept = _select(hidden.detach(), score, image, after, layer.valid, cfg, cfg.keep)
    return Reduction(None, None, scores=score, keep_mask=kept | ~image)


def _sequence(x: Tensor, text: object, text_mask: object) -> tuple[Tensor, Tensor]:
    """x: (B, N, D) image tokens, text: (B, T, D) or None, text_mask: (B, T) bool or None ->
    (the sequence [x; text] (B, N + T, D), its valid positions (B, N + T) bool)."""
    b, n, d = x.shape
    if text is None:
        if text_mask is not None:
            raise ValueError("tokenkern.dart_embeddings: text_mask must be None without text, got a mask")
        return x.detach(), torch.ones(b, n, dtype=torch.bool, device=x.device)
    if not isinstance(text, Tensor) or text.dim() != 3 or text.shape[0] != b or text.shape[2] != d:
        got = tuple(text.shape) if isinstance(text, Tensor) else type(text).__name__
        raise ValueError(f"tokenkern.dart_embeddings: text must be (B, T, D) with the B, D of x {tuple(x.shape)}, "
                         f"got {got}")  # fmt: skip
    valid = torch.ones(b, n + text.shape[1], dtype=torch.bool, device=x.device)
    if text_mask is not None:
        if not isinstance(text_mask, Tensor) or text_mask.dtype != torch.bool or text_mask.shape != text.shape[:2]:
            got = (tuple(text_mask.shape), text_mask.dtype) if isinstance(text_mask, Tensor) else text_mask
            raise ValueError(f"tokenkern.dart_embeddings: text_mask must be (B, T) bool matching text, got {got}")
        valid[:, n:] = text_mask
    return torch.cat([x.detach(), text.detach().to(x.dtype)], dim=1), valid


def dart_embeddings(
    x: Tensor, cfg: DARTConfig, text: Tensor | None = None, text_mask: Tensor | None = None
) -> Reduction:
    """DART on input embeddings (layer 0). x: (B, N, D) one image's tokens as the LLM receives
    them; text: optional (B, T, D) the embeddings of the tokens after the image, text_mask (B, T)
    bool its valid rows (None: all) -> Reduction: indices (B, k) ascending with k =
    dart_kept(M) (all N when fewer), M = keep_count(keep, N); tokens (B, k, D); scores (B, N)
    the L1 norms."""
    _, n, _ = token_matrix("dart_embeddings", x)
    budget = keep_count(cfg.keep, n)
    seq, valid = _sequence(x, text, text_mask)
    image = torch.zeros_like(valid)
    image[:, :n] = True
    use = cfg if text is not None else dataclasses.replace(cfg, text_pivots=0)
    score = seq.float().abs().sum(dim=-1)
    kept = _select(seq, score, image, valid & ~image, valid, use, budget)[:, :n]
    idx = mask_to_indices(kept, min(n, dart_kept(budget, use.image_pivots, use.text_pivots)))
    return Reduction(idx, gather_tokens(x, idx), scores=score[:, :n])
