"""Consistency diagnostics: how much a token-reduced run changes what a model answers.

Token reduction can keep accuracy while changing *which* answers a model gives (Sun et al.,
"Silent Hazards of Token Reduction in Vision-Language Models", arXiv 2503.06794); the change
in the inverse participation ratio (IPR) of the token representations' singular-value energy
tracks that loss of consistency. These functions compare a full run with a reduced (pruned or
merged) run of the same inputs:

======================  ===================================================================
``top1_agreement``      fraction of positions whose top-1 answer is unchanged
``flip_rate``           fraction whose answer changes; with labels, whose correctness changes
``kl_divergence``       KL(P_full || P_pruned) of the softmax distributions, in nats
``js_divergence``       Jensen-Shannon divergence of the two distributions, nats, in [0, ln 2]
``embedding_cosine``    cosine similarity of the two runs' embeddings
``ipr_change``          IPR(pruned tokens) - IPR(full tokens), via ``tokenkern.spectral_ipr``
``compare``             runs two model functions over inputs and tabulates all of the above
======================  ===================================================================

Conventions shared by the logits metrics. ``logits`` is ``(..., C)``: ``(B, C)`` class
logits, ``(B, T, V)`` next-token logits; every leading index is one *position* (one
prediction). ``mask`` (the leading shape, bool) selects the positions that count (e.g. not
padding). ``reduction="mean"`` returns a 0-dim tensor averaged over the counted positions (NaN
when none counts); ``reduction="none"`` returns the per-position values with NaN at positions
the mask leaves out. Values are float64, computed in float64 (a chunk of rows at a time, so
that a KL of 1e-6 between two fp16 runs is still resolved to many digits). A position
whose logits row (in either run) holds a NaN or +inf, or is all -inf, has no distribution: its
value is NaN, and so is the mean over it. -inf logits (masked classes) are fine. Top-1 ties go
to the lower class index. Everything is a tensor operation on the inputs' device; nothing
syncs the host except :func:`compare`, which reads the results back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import spectral_ipr

__all__ = [
    "ConsistencyReport",
    "compare",
    "embedding_cosine",
    "flip_rate",
    "ipr_change",
    "js_divergence",
    "kl_divergence",
    "top1_agreement",
]

LN2 = math.log(2.0)
REDUCTIONS = ("mean", "none")


def _fail(fn: str, message: str) -> None:
    raise ValueError(f"tokenkern.metrics.{fn}: {message}")


def _float_tensor(fn: str, name: str, t: object, min_dim: int = 1) -> Tensor:
    if not isinstance(t, Tensor):
        _fail(fn, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        _fail(fn, f"{name} must be a floating tensor, got {str(t.dtype).removeprefix('torch.')}")
    if t.dim() < min_dim:
        _fail(fn, f"{name} must have at least {min_dim} dimension(s), got shape {tuple(t.shape)}")
    return t


def _pair(fn: str, a: object, b: object, names: tuple[str, str], last: str) -> tuple[Tensor, Tensor]:
    a = _float_tensor(fn, names[0], a)
    b = _float_tensor(fn, names[1], b)
    if a.shape != b.shape:
        _fail(fn, f"{names[0]} and {names[1]} must have the same shape (..., {last}), got "
                  f"{tuple(a.shape)} and {tuple(b.shape)}")  # fmt: skip
    if a.shape[-1] < 1:
        _fail(fn, f"{names[0]} must have {last} >= 1, got shape {tuple(a.shape)}")
    if a.device != b.device:
        _fail(fn, f"{names[1]} is on {b.device} but {names[0]} is on {a.device}")
    return a, b


# Rows of (..., C) inputs are upcast to float64 this many elements at a time.
CHUNK_ELEMENTS = 1 << 22


def _rowwise(f: Callable[[Tensor, Tensor], Tensor], a: Tensor, b: Tensor) -> Tensor:
    """f over the rows of a, b: (..., C) in float64, a chunk of rows at a time -> (...)."""
    lead = a.shape[:-1]
    a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    step = max(1, CHUNK_ELEMENTS // max(1, a.shape[-1]))
    parts = [f(a2[i : i + step].double(), b2[i : i + step].double()) for i in range(0, a2.shape[0], step)]
    out = torch.cat(parts) if parts else a2.new_empty(0, dtype=torch.float64)
    return out.reshape(lead)


def _check_mask(fn: str, mask: object, lead: torch.Size, device: torch.device) -> Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        what = str(mask.dtype).removeprefix("torch.") if isinstance(mask, Tensor) else type(mask).__name__
        _fail(fn, f"mask must be a bool tensor, got {what}")
    if mask.shape != lead:
        _fail(fn, f"mask must have the positions' shape {tuple(lead)}, got {tuple(mask.shape)}")
    return mask.to(device)


def _reduce(fn: str, values: Tensor, mask: Tensor | None, reduction: str) -> Tensor:
    if reduction not in REDUCTIONS:
        _fail(fn, f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if reduction == "none":
        return values if mask is None else torch.where(mask, values, float("nan"))
    if mask is None:
        return values.mean()
    # NaN at a counted position must propagate; positions left out must not.
    kept = torch.where(mask, values, 0.0)
    return kept.sum() / mask.sum()


def _no_distribution(logits: Tensor) -> Tensor:
    """(...) bool: rows with a NaN or +inf, or with every entry -inf."""
    return torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1) | torch.isneginf(logits).all(-1)


def _logits(fn: str, logits_full: object, logits_pruned: object, mask: object):
    lf, lp = _pair(fn, logits_full, logits_pruned, ("logits_full", "logits_pruned"), "C")
    m = _check_mask(fn, mask, lf.shape[:-1], lf.device)
    return lf, lp, m, _no_distribution(lf) | _no_distribution(lp)


def top1_agreement(
    logits_full: Tensor, logits_pruned: Tensor, mask: Tensor | None = None, reduction: str = "mean"
) -> Tensor:
    """Fraction of positions whose top-1 class is the same in both runs.

    logits_full, logits_pruned: (..., C); mask: (...) bool. Returns a 0-dim tensor in [0, 1]
    ("mean") or (...) values 1.0 / 0.0 ("none"); NaN where a row has no distribution.
    """
    lf, lp, m, bad = _logits("top1_agreement", logits_full, logits_pruned, mask)
    same = (lf.argmax(-1) == lp.argmax(-1)).double()
    return _reduce("top1_agreement", torch.where(bad, float("nan"), same), m, reduction)


def flip_rate(
    logits_full: Tensor,
    logits_pruned: Tensor,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Fraction of positions whose answer flips between the runs.

    Without labels: the top-1 class changes (``1 - top1_agreement``). With labels (...) int64:
    the correctness changes, correct -> wrong or wrong -> correct (the "flips" that accuracy
    hides: a run can lose as many as it gains and keep its accuracy). Labels outside [0, C)
    are never correct; leave such positions out with mask. Returns a 0-dim tensor in [0, 1]
    ("mean") or (...) values 1.0 / 0.0 ("none").
    """
    fn = "flip_rate"
    lf, lp, m, bad = _logits(fn, logits_full, logits_pruned, mask)
    pf, pp = lf.argmax(-1), lp.argmax(-1)
    if labels is None:
        flipped = pf != pp
    else:
        if not isinstance(labels, Tensor) or labels.dtype not in (torch.int64, torch.int32):
            what = str(labels.dtype).removeprefix("torch.") if isinstance(labels, Tensor) else type(labels).__name__
            _fail(fn, f"labels must be an int64 or int32 tensor, got {what}")
        if labels.shape != lf.shape[:-1]:
            _fail(fn, f"labels must have the positions' shape {tuple(lf.shape[:-1])}, got {tuple(labels.shape)}")
        y = labels.to(lf.device)
        flipped = (pf == y) != (pp == y)
    return _reduce(fn, torch.where(bad, float("nan"), flipped.double()), m, reduction)


def _kl_terms(lp: Tensor, lq: Tensor) -> Tensor:
    """Elementwise p (log p - log q) from log-probabilities: 0 where p = 0, +inf where q = 0 < p."""
    inner = torch.exp(lp) * (lp - lq)
    inner = torch.where(torch.isneginf(lq), float("inf"), inner)
    return torch.where(torch.isneginf(lp), 0.0, inner)


def kl_divergence(
    logits_full: Tensor, logits_pruned: Tensor, mask: Tensor | None = None, reduction: str = "mean"
) -> Tensor:
    """KL(P_full || P_pruned) in nats, ``P = softmax(logits)`` over the last dimension.

    ``sum_c p_c (log p_c - log q_c)`` from log_softmax (stable for any logit scale); classes
    with p_c = 0 add nothing, a class with q_c = 0 < p_c makes it +inf. Rounding can push a
    near-zero value below 0: values are clamped to >= 0. logits: (..., C), mask: (...) bool.
    Returns a 0-dim tensor ("mean") or (...) ("none").
    """
    lf, lp, m, bad = _logits("kl_divergence", logits_full, logits_pruned, mask)
    kl = _rowwise(lambda a, b: _kl_terms(torch.log_softmax(a, -1), torch.log_softmax(b, -1)).sum(-1), lf, lp)
    kl = kl.clamp_min(0.0)
    return _reduce("kl_divergence", torch.where(bad, float("nan"), kl), m, reduction)


def _js_rows(lf: Tensor, lp: Tensor) -> Tensor:
    a, b = torch.log_softmax(lf, -1), torch.log_softmax(lp, -1)
    mid = torch.where(a == b, a, torch.logaddexp(a, b) - LN2)  # exact where the runs agree
    return 0.5 * (_kl_terms(a, mid).sum(-1) + _kl_terms(b, mid).sum(-1))


def js_divergence(
    logits_full: Tensor, logits_pruned: Tensor, mask: Tensor | None = None, reduction: str = "mean"
) -> Tensor:
    """Jensen-Shannon divergence in nats: ``KL(P || M) / 2 + KL(Q || M) / 2`` with
    ``M = (P + Q) / 2``, ``log M = logaddexp(log P, log Q) - ln 2``. Symmetric, in [0, ln 2]
    (ln 2: disjoint supports); clamped to that range against rounding. logits: (..., C),
    mask: (...) bool. Returns a 0-dim tensor ("mean") or (...) ("none").
    """
    lf, lp, m, bad = _logits("js_divergence", logits_full, logits_pruned, mask)
    js = _rowwise(_js_rows, lf, lp).clamp(0.0, LN2)
    return _reduce("js_divergence", torch.where(bad, float("nan"), js), m, reduction)


def _cosine_rows(a: Tensor, b: Tensor) -> Tensor:
    # Scale each row by its largest entry first: the norms can neither overflow nor underflow.
    sa = a.abs().amax(-1, keepdim=True)
    sb = b.abs().amax(-1, keepdim=True)
    a = a / torch.where(sa > 0, sa, 1.0)
    b = b / torch.where(sb > 0, sb, 1.0)
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    both = (na > 0) & (nb > 0)
    cos = ((a * b).sum(-1) / torch.where(both, na * nb, 1.0)).clamp(-1.0, 1.0)
    return torch.where(both, cos, torch.where((na == 0) & (nb == 0), 1.0, 0.0))


def embedding_cosine(
    emb_full: Tensor, emb_pruned: Tensor, mask: Tensor | None = None, reduction: str = "mean"
) -> Tensor:
    """Cosine similarity of the two runs' embeddings, ``a.b / (||a|| ||b||)``, in [-1, 1].

    emb_full, emb_pruned: (..., E) (e.g. (B, E) pooled or (B, T, E) per position); mask:
    (...) bool. Two zero vectors count as identical (1), one zero vector as unrelated (0); a
    NaN or Inf entry gives NaN. Returns a 0-dim tensor ("mean") or (...) ("none").
    """
    fn = "embedding_cosine"
    a, b = _pair(fn, emb_full, emb_pruned, ("emb_full", "emb_pruned"), "E")
    m = _check_mask(fn, mask, a.shape[:-1], a.device)
    cos = _rowwise(_cosine_rows, a, b)
    finite = torch.isfinite(emb_full).all(-1) & torch.isfinite(emb_pruned).all(-1)
    return _reduce(fn, torch.where(finite.to(cos.device), cos, float("nan")), m, reduction)


def _token_matrix(fn: str, name: str, x: object, mask: object) -> tuple[Tensor, Tensor | None]:
    """-> (x as (B, N, D) float with masked-out rows zeroed, (B,) bool "has a row" or None)."""
    x = _float_tensor(fn, name, x, min_dim=2)
    if x.dim() == 2:
        x = x.unsqueeze(0)
        if mask is not None and isinstance(mask, Tensor) and mask.dim() == 1:
            mask = mask.unsqueeze(0)
    if x.dim() != 3:
        _fail(fn, f"{name} must be (N, D) or (B, N, D), got shape {tuple(x.shape)}")
    if x.dtype == torch.float64:
        x = x.float()
    if mask is not None:
        mname = name.replace("tokens", "mask")
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != x.shape[:2]:
            _fail(fn, f"{mname} must be a bool tensor of shape {tuple(x.shape[:2])} (B, N)")
        mask = mask.to(x.device)
        return torch.where(mask[..., None], x, 0.0), mask.any(-1)
    return x, None


def ipr_change(
    tokens_full: Tensor,
    tokens_pruned: Tensor,
    rank: int = -1,
    mask_full: Tensor | None = None,
    mask_pruned: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """``IPR(tokens_pruned) - IPR(tokens_full)`` per sample (see :func:`tokenkern.spectral_ipr`).

    tokens_full: (B, N, D) or (N, D); tokens_pruned: (B, K, D) or (K, D), same B and D (the
    reduced token set, e.g. the visual tokens a pruned run feeds the language model, or a
    layer's hidden states). rank: -1 for every singular value, else the top ``rank``.
    mask_full (B, N) / mask_pruned (B, K) bool: rows left out (padding of ragged batches) are
    zeroed, which leaves the singular values, hence the IPR, unchanged. Positive: the
    reduced tokens' energy sits in fewer directions. float64 tokens are rounded to float32.
    Returns a 0-dim float32 tensor ("mean") or (B,) ("none"); (unitless, IPR is in [1/r, 1]).
    """
    fn = "ipr_change"
    full, has_full = _token_matrix(fn, "tokens_full", tokens_full, mask_full)
    pruned, has_pruned = _token_matrix(fn, "tokens_pruned", tokens_pruned, mask_pruned)
    if full.shape[0] != pruned.shape[0] or full.shape[2] != pruned.shape[2]:
        _fail(fn, f"tokens_full (B, N, D) and tokens_pruned (B, K, D) must share B and D, got "
                  f"{tuple(full.shape)} and {tuple(pruned.shape)}")  # fmt: skip
    delta = _ipr_of_rows(pruned, has_pruned, rank) - _ipr_of_rows(full, has_full, rank)
    return _reduce(fn, delta, None, reduction)


def _ipr_of_rows(x: Tensor, has_rows: Tensor | None, rank: int) -> Tensor:
    """spectral_ipr of each (masked, already zeroed) token matrix; NaN for a sample whose mask
    leaves no row (it has no spectrum, where a zero matrix's IPR would read 0). A diagnostic:
    it carries no gradient (tokens of a model being trained are read detached)."""
    ipr = spectral_ipr(x.detach(), rank)
    return ipr if has_rows is None else torch.where(has_rows, ipr, float("nan"))


# ---------------------------------------------------------------------------------- harness

_UNITS = {
    "top1_agreement": ("fraction", "top-1 answer unchanged"),
    "flip_rate": ("fraction", "answer changed"),
    "flip_rate_labels": ("fraction", "correctness changed (vs labels)"),
    "accuracy_full": ("fraction", "top-1 == label, full run"),
    "accuracy_pruned": ("fraction", "top-1 == label, reduced run"),
    "kl_divergence": ("nats", "mean KL(full || reduced)"),
    "js_divergence": ("nats", "mean Jensen-Shannon, <= ln 2"),
    "embedding_cosine": ("cosine", "mean over embeddings"),
    "ipr_full": ("ipr", "mean spectral IPR, full tokens"),
    "ipr_pruned": ("ipr", "mean spectral IPR, reduced tokens"),
    "ipr_change": ("ipr", "mean IPR(reduced) - IPR(full)"),
}


@dataclass
class ConsistencyReport:
    """What :func:`compare` returns.

    rows: ``(metric, value, unit, meaning)`` tuples in a fixed order, only for the metrics the
    model outputs allow. per_sample: metric -> (S,) float tensor over all S samples of all
    batches (the logits metrics averaged over each sample's counted positions), for
    correlating e.g. ``ipr_change`` with ``kl_divergence`` across samples. samples /
    positions: how many were compared.
    """

    rows: list[tuple[str, float, str, str]]
    per_sample: dict[str, Tensor] = field(default_factory=dict)
    samples: int = 0
    positions: int = 0

    def as_dict(self) -> dict[str, float]:
        return {name: value for name, value, _, _ in self.rows}

    def __getitem__(self, name: str) -> float:
        return self.as_dict()[name]

    def __str__(self) -> str:
        header = ("metric", "value", "unit", "meaning")
        body = [(name, f"{value:.6g}", unit, meaning) for name, value, unit, meaning in self.rows]
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(4)]

        def fmt(cells: tuple[str, ...]) -> str:
            padded = [c.rjust(w) if i == 1 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
            return "  ".join(padded).rstrip()

        lines = [f"consistency: {self.samples} samples, {self.positions} positions", fmt(header)]
        lines.append("  ".join("-" * w for w in widths))
        lines += [fmt(r) for r in body]
        return "\n".join(lines)


def _as_output(fn: str, which: str, out: object) -> dict[str, Tensor]:
    if isinstance(out, Tensor):
        return {"logits": out}
    if not isinstance(out, Mapping) or "logits" not in out:
        _fail(fn, f"model_fn_{which} must return a logits tensor or a mapping with key 'logits', "
                  f"got {type(out).__name__}")  # fmt: skip
    unknown = set(out) - {"logits", "mask", "embedding", "tokens", "tokens_mask"}
    if unknown:
        _fail(fn, f"model_fn_{which} returned unknown keys {sorted(unknown)}")
    return dict(out)


def _batches(inputs: object) -> Iterable:
    if isinstance(inputs, Tensor | Mapping):
        return [inputs]
    if not isinstance(inputs, Iterable):
        _fail("compare", f"inputs must be a batch (tensor or mapping) or an iterable of batches, got "
                         f"{type(inputs).__name__}")  # fmt: skip
    return inputs


def _per_sample(values: Tensor, mask: Tensor) -> Tensor:
    """(B, ...) position values -> (B,) means over each sample's counted positions."""
    b = values.shape[0]
    v = torch.where(mask, values, 0.0).reshape(b, -1).sum(1)
    return v / mask.reshape(b, -1).sum(1)


def compare(
    model_fn_full: Callable[[object], object],
    model_fn_pruned: Callable[[object], object],
    inputs: object,
    labels: Tensor | Sequence[Tensor] | None = None,
    rank: int = -1,
) -> ConsistencyReport:
    """Run both model functions on every batch of inputs and tabulate their consistency.

    Protocol: ``model_fn(batch)`` returns the logits tensor, or a mapping with
      ``"logits"``      (B, C) or (B, T, V), required, the same shape in both runs;
      ``"mask"``        (B,) / (B, T) bool, positions that count (both runs' masks are ANDed);
      ``"embedding"``   (B, E) or (B, T, E): :func:`embedding_cosine`;
      ``"tokens"``      (B, N, D) token matrix (e.g. the visual tokens the language model
                        sees, or a layer's hidden states); the reduced run's is (B, K, D):
                        ``ipr_full``, ``ipr_pruned``, :func:`ipr_change` with ``rank``;
      ``"tokens_mask"`` (B, N) bool, token rows that exist (ragged batches).
    A key must be in both runs' outputs or in neither. inputs: an iterable of batches (a list,
    a DataLoader), each passed as the single argument; a tensor or a mapping is one batch.
    labels: optional (B, ...) int64 per batch (a list), or one tensor for all batches
    concatenated along dim 0; adds accuracies and ``flip_rate_labels``. Every label counts as
    given (an ignore label such as -100 counts as a wrong answer): leave such positions out
    with ``"mask"``. Per-position embeddings (B, T, E) count where the mask does. Runs under
    ``torch.no_grad()``. Means are over all counted positions of all batches (logits
    metrics), all embedding rows, all samples (IPR).
    """
    fn = "compare"
    if isinstance(labels, Tensor):
        label_iter = None
        label_all = labels
    else:
        label_iter = None if labels is None else list(labels)
        label_all = None
    acc: dict[str, list[Tensor]] = {}
    sample_acc: dict[str, list[Tensor]] = {}
    counted = 0
    samples = 0
    batches = 0
    label_offset = 0
    with torch.no_grad():
        for i, batch in enumerate(_batches(inputs)):
            batches = i + 1
            full = _as_output(fn, "full", model_fn_full(batch))
            pruned = _as_output(fn, "pruned", model_fn_pruned(batch))
            if set(full) != set(pruned):
                _fail(fn, f"batch {i}: the runs returned different keys, {sorted(full)} and {sorted(pruned)}")
            lf, lp = full["logits"], pruned["logits"]
            if not isinstance(lf, Tensor) or lf.dim() < 2:
                _fail(fn, f"batch {i}: logits must be (B, C) or (B, T, V), got {getattr(lf, 'shape', lf)}")
            lead = lf.shape[:-1]
            mask = torch.ones(lead, dtype=torch.bool, device=lf.device)
            for out in (full, pruned):
                m = _check_mask(fn, out.get("mask"), lead, lf.device)
                if m is not None:
                    mask = mask & m
            values = {
                "top1_agreement": top1_agreement(lf, lp, reduction="none"),
                "flip_rate": flip_rate(lf, lp, reduction="none"),
                "kl_divergence": kl_divergence(lf, lp, reduction="none"),
                "js_divergence": js_divergence(lf, lp, reduction="none"),
            }
            y = None
            if label_iter is not None:
                if i >= len(label_iter):
                    _fail(fn, f"labels has {len(label_iter)} batches but inputs has more")
                y = label_iter[i]
            elif label_all is not None:
                y = label_all[label_offset : label_offset + lead[0]]
                label_offset += lead[0]
            if y is not None:
                if (
                    not isinstance(y, Tensor)
                    or y.dtype.is_floating_point
                    or y.dtype.is_complex
                    or y.dtype == torch.bool
                ):
                    _fail(
                        fn, f"batch {i}: labels must be an integer tensor, got {getattr(y, 'dtype', type(y).__name__)}"
                    )
                if y.shape != lead:
                    _fail(fn, f"batch {i}: labels must have the positions' shape {tuple(lead)}, got {tuple(y.shape)}")
                y = y.to(lf.device)
                values["flip_rate_labels"] = flip_rate(lf, lp, y, reduction="none")
                bad = _no_distribution(lf) | _no_distribution(lp)
                for which, lg in (("full", lf), ("pruned", lp)):
                    right = (lg.argmax(-1) == y).double()
                    values[f"accuracy_{which}"] = torch.where(bad, float("nan"), right)
            for name, v in values.items():
                acc.setdefault(name, []).append(v[mask])
                sample_acc.setdefault(name, []).append(_per_sample(v, mask))
            counted += int(mask.sum())
            samples += lead[0]
            if "embedding" in full:
                ef, ep = full["embedding"], pruned["embedding"]
                for name, e in (("embedding_full", ef), ("embedding_pruned", ep)):
                    if not isinstance(e, Tensor) or e.dim() < 2 or e.shape[0] != lead[0]:
                        _fail(fn, f"batch {i}: {name} must be (B={lead[0]}, E) or (B, T, E), "
                                  f"got {getattr(e, 'shape', type(e).__name__)}")  # fmt: skip
                cos = embedding_cosine(ef, ep, reduction="none")
                # Per-position embeddings (the logits' positions) count where the logits do.
                emask = mask if cos.shape == lead else torch.ones(cos.shape, dtype=torch.bool, device=cos.device)
                emask = emask.to(cos.device)
                acc.setdefault("embedding_cosine", []).append(cos[emask])
                sample_acc.setdefault("embedding_cosine", []).append(_per_sample(cos, emask))
            if "tokens" in full:
                tf, has_f = _token_matrix(fn, "tokens_full", full["tokens"], full.get("tokens_mask"))
                tp, has_p = _token_matrix(fn, "tokens_pruned", pruned["tokens"], pruned.get("tokens_mask"))
                if not (tf.shape[0] == tp.shape[0] == lead[0]) or tf.shape[2] != tp.shape[2]:
                    _fail(fn, f"batch {i}: tokens_full (B, N, D) and tokens_pruned (B, K, D) must share D and the "
                              f"logits' B={lead[0]}, got {tuple(tf.shape)} and {tuple(tp.shape)}")  # fmt: skip
                ipr_f, ipr_p = _ipr_of_rows(tf, has_f, rank), _ipr_of_rows(tp, has_p, rank)
                for name, v in (("ipr_full", ipr_f), ("ipr_pruned", ipr_p), ("ipr_change", ipr_p - ipr_f)):
                    acc.setdefault(name, []).append(v)
                    sample_acc.setdefault(name, []).append(v)
    if label_iter is not None and len(label_iter) != batches:
        _fail(fn, f"labels has {len(label_iter)} batches but inputs had {batches}")
    if label_all is not None and label_offset != label_all.shape[0]:
        _fail(fn, f"labels has {label_all.shape[0]} rows but the batches had {label_offset} samples")
    order = [n for n in _UNITS if n in acc]
    rows = []
    for name in order:
        v = torch.cat([t.double().flatten().cpu() for t in acc[name]])
        rows.append((name, float(v.mean()) if v.numel() else float("nan"), *_UNITS[name]))
    per_sample = {name: torch.cat([t.double().cpu() for t in sample_acc[name]]) for name in order}
    return ConsistencyReport(rows=rows, per_sample=per_sample, samples=samples, positions=counted)
