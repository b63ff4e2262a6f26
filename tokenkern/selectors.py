"""Learned token selection: keep the tokens from which the others can be reconstructed.

:class:`ReconstructionSelector` follows "When Less is Enough" (Allakhverdov et al., 2025): a
small scorer gives every token a logit; during training ``tokenkern.gumbel_topk`` samples k
tokens to keep (a hard mask in the forward, gradients through its relaxation), and a
masked-autoencoder decoder predicts every token from the kept ones (a dropped token starts as
a learned mask token plus a distance-weighted average of the kept embeddings; position
embeddings added; a few transformer layers). The loss is the mean squared error on the
dropped tokens, on features normalized per feature (so 1.0 is the error of predicting the
mean feature). The gradient reaching the scorer says which tokens, if kept, would make the
others easier to reconstruct. Training anneals the Gumbel noise towards 0 (``noise_scale``)
so that the sampled subsets end up chosen the way inference chooses them; the scorer's
per-position bias starts as an evenly spread ranking of the token grid.

At inference the scorer runs once and ``tokenkern.topk_gather`` keeps the k best tokens::

    sel = ReconstructionSelector.load("selector.safetensors")
    kept, indices, scores = sel.select(tokens, k=64)  # tokens: (B, N, D)

Training loop: :func:`train_step`; the script ``examples/train_selector.py`` fits a
selector on DINOv2 ViT-S/14 patch tokens of real photos.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from . import gumbel_topk, topk_gather
from .methods.base import keep_count  # the one keep rule (round half up, counts clamped to [1, n])


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Inference without dropout whatever mode the module is in; the mode is restored."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class ReconstructionSelector(nn.Module):
    """Scorer + reconstruction decoder over (B, N, d_model) tokens, N = num_tokens.

    d_model: token width. hidden: width of the scorer MLP and of the decoder. num_tokens: the
    number of tokens (positions get learned embeddings; e.g. 256 for a 16x16 patch grid).
    decoder_layers / heads: the decoder's pre-norm transformer layers (feed-forward 2 x hidden).
    scorer_layers: transformer layers giving the scorer context (0: a per-token MLP).
    dropout: in every transformer layer. interp_scale: length scale (in grid cells) of the
    decoder's interpolation prior, 0 to disable. spread_prior: the initial per-position bias
    spans [-spread_prior, spread_prior] in farthest-point order, 0 to start flat. The two
    priors need a square token grid (N a perfect square) and are off otherwise.
    """

    def __init__(
        self,
        d_model: int,
        hidden: int = 128,
        num_tokens: int = 256,
        decoder_layers: int = 2,
        heads: int = 4,
        scorer_layers: int = 1,
        dropout: float = 0.1,
        interp_scale: float = 1.0,
        spread_prior: float = 2.0,
    ):
        super().__init__()
        self.config = dict(
            d_model=d_model,
            hidden=hidden,
            num_tokens=num_tokens,
            decoder_layers=decoder_layers,
            heads=heads,
            scorer_layers=scorer_layers,
            dropout=dropout,
            interp_scale=interp_scale,
            spread_prior=spread_prior,
        )
        self.num_tokens = num_tokens

        def layers(count: int) -> nn.TransformerEncoder:
            layer = nn.TransformerEncoderLayer(
                hidden, heads, 2 * hidden, dropout, activation="gelu", batch_first=True, norm_first=True
            )
            return nn.TransformerEncoder(layer, count, enable_nested_tensor=False)

        # Per-feature statistics of the training tokens (see fit_normalization).
        self.register_buffer("feature_mean", torch.zeros(d_model))
        self.register_buffer("feature_std", torch.ones(d_model))
        # Scorer: LayerNorm -> Linear + position embedding -> scorer_layers transformer layers
        # (context: a token next to similar ones is less worth keeping) -> GELU -> one logit,
        # plus a learned per-position bias that starts as an evenly spread ranking of the grid
        # (farthest-point order: the top-k of an untrained scorer is spread over the image).
        self.score_bias = nn.Parameter(_spread_prior(num_tokens, spread_prior))
        self.score_norm = nn.LayerNorm(d_model)
        self.score_in = nn.Linear(d_model, hidden)
        self.score_pos = nn.Parameter(torch.randn(num_tokens, hidden) * 0.02)
        self.score_context = layers(scorer_layers) if scorer_layers else None
        self.score_out = nn.Linear(hidden, 1)
        # Decoder: kept tokens embedded; a dropped token starts as the mask token plus the
        # average of the kept embeddings weighted by exp(-grid distance / interp_scale) (a
        # local-interpolation prior, when the tokens form a square grid); positions added.
        self.embed = nn.Linear(d_model, hidden)
        self.mask_token = nn.Parameter(torch.zeros(hidden))
        self.pos = nn.Parameter(torch.randn(num_tokens, hidden) * 0.02)
        self.register_buffer("interp", _grid_kernel(num_tokens, interp_scale), persistent=False)
        self.decoder = layers(decoder_layers)
        self.head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, d_model))

    # ------------------------------------------------------------------------- pieces

    def _check(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise ValueError(f"x must be a (B, N, D) tensor, got {getattr(x, 'shape', type(x).__name__)}")
        if x.shape[1] != self.num_tokens or x.shape[2] != self.config["d_model"]:
            raise ValueError(
                f"x must be (B, {self.num_tokens}, {self.config['d_model']}) for this selector, got {tuple(x.shape)}"
            )

    @torch.no_grad()
    def fit_normalization(self, tokens: Tensor) -> None:
        """Set the per-feature mean and std from training tokens (..., d_model), at least two."""
        d = self.config["d_model"]
        if not isinstance(tokens, Tensor) or tokens.dim() < 2 or tokens.shape[-1] != d:
            raise ValueError(
                f"tokens must be a (..., {d}) tensor, got {getattr(tokens, 'shape', type(tokens).__name__)}"
            )
        flat = tokens.reshape(-1, d).double()
        if flat.shape[0] < 2 or not torch.isfinite(flat).all():
            raise ValueError(f"tokens must hold at least 2 finite rows, got {flat.shape[0]} rows")
        self.feature_mean.copy_(flat.mean(0))
        self.feature_std.copy_(flat.std(0).clamp_min(1e-6))

    def normalize(self, x: Tensor) -> Tensor:
        return (x.to(self.feature_mean.dtype) - self.feature_mean) / self.feature_std

    def scores(self, x: Tensor) -> Tensor:
        """(B, N, D) -> (B, N) float32 logits: higher = more worth keeping. Runs in the
        module's mode (dropout in training); select() runs in eval mode."""
        self._check(x)
        h = self.score_in(self.score_norm(self.normalize(x))) + self.score_pos
        if self.score_context is not None:
            h = self.score_context(h)
        return (self.score_out(nn.functional.gelu(h)).squeeze(-1) + self.score_bias).float()

    def reconstruct(self, x: Tensor, mask: Tensor) -> Tensor:
        """Predict every token (normalized features) from those where mask is 1.
        x: (B, N, D); mask: (B, N) in [0, 1] (a hard 0/1 mask at inference)."""
        self._check(x)
        m = mask.to(self.mask_token.dtype).unsqueeze(-1)
        e = self.embed(self.normalize(x))
        fill = self.mask_token
        if self.interp is not None:
            fill = fill + (self.interp @ (m * e)) / (self.interp @ m).clamp_min(1e-12)
        h = m * e + (1 - m) * fill + self.pos
        return self.head(self.decoder(h))

    def dropped_error(self, x: Tensor, mask: Tensor, pred: Tensor | None = None) -> Tensor:
        """(B,) mean squared error of the normalized features over the tokens mask drops
        (weights 1 - mask; a straight-through mask passes its gradient here too)."""
        pred = self.reconstruct(x, mask) if pred is None else pred
        err = (pred - self.normalize(x)).pow(2).mean(-1)
        w = 1 - mask.to(err.dtype)
        return (w * err).sum(-1) / w.detach().sum(-1).clamp_min(1.0)

    # ------------------------------------------------------------------------ training

    def forward_train(
        self, x: Tensor, keep: float | int, tau: float, seed: int, random_rows: int = 0, noise_scale: float = 1.0
    ) -> dict[str, Tensor]:
        """One training forward. Samples k = keep_count(keep, N) tokens per row: the k largest
        ``logits + noise_scale * g`` (g Gumbel noise from seed), as a hard mask in the forward
        with gradients through the relaxation at temperature tau (straight-through), i.e.
        ``gumbel_topk(logits / noise_scale, k, tau / noise_scale, seed)``. Annealing
        noise_scale towards 0 makes the training samples approach the deterministic top-k
        that select() uses, while tau keeps the relaxation's softness relative to the logits.
        Reconstructs and returns dict(loss, mask, logits). The first ``random_rows`` rows get
        a uniformly random k-subset instead (Gumbel top-k of zero logits), so that the decoder
        also learns to reconstruct from random tokens (the baseline a selector is compared
        with)."""
        self._check(x)
        if not (math.isfinite(noise_scale) and noise_scale > 0):
            raise ValueError(f"noise_scale must be finite and > 0, got {noise_scale}")
        k = keep_count(keep, x.shape[1])
        logits = self.scores(x)
        if random_rows:
            rows = torch.arange(x.shape[0], device=x.device)[:, None] < random_rows
            logits = torch.where(rows, torch.zeros_like(logits), logits)
        mask = gumbel_topk(logits / noise_scale, k, tau / noise_scale, seed, hard=True)
        loss = self.dropped_error(x, mask).mean()
        return {"loss": loss, "mask": mask, "logits": logits}

    # ----------------------------------------------------------------------- inference

    @torch.no_grad()
    def select(self, x: Tensor, k: float | int) -> tuple[Tensor, Tensor, Tensor]:
        """Keep the k best tokens: one scorer forward, then tokenkern.topk_gather.
        x: (B, N, D); k: a count (above N: all N) or a fraction of N (tokenkern.methods.keep_count).
        Returns kept (B, k, D) in x's dtype, indices (B, k) int64 ascending, scores (B, N) float32.
        Always in eval mode (no dropout)."""
        self._check(x)
        with _eval_mode(self):
            scores = self.scores(x)
        kept, indices = topk_gather(scores, x, keep_count(k, x.shape[1]))
        return kept, indices, scores

    @torch.no_grad()
    def reconstruction_error(self, x: Tensor, indices: Tensor) -> Tensor:
        """(B,) normalized MSE of the tokens not in indices (B, k) (distinct token indices),
        reconstructed from those in it. Always in eval mode (no dropout)."""
        self._check(x)
        b, n = x.shape[:2]
        if (
            not isinstance(indices, Tensor)
            or indices.dim() != 2
            or indices.shape[0] != b
            or indices.dtype != torch.int64
        ):
            raise ValueError(f"indices must be a (B={b}, k) int64 tensor, got {getattr(indices, 'shape', indices)!r}")
        indices = indices.to(x.device)
        if indices.numel() and (indices.min() < 0 or indices.max() >= n):
            raise ValueError(f"indices must be in [0, {n})")
        counts = torch.zeros(b, n, device=x.device).scatter_add_(1, indices, torch.ones(indices.shape, device=x.device))
        if (counts > 1).any():
            raise ValueError("indices must not repeat a token within a row")
        with _eval_mode(self):
            return self.dropped_error(x, counts)

    # --------------------------------------------------------------------- persistence

    def save(self, path: str, metadata: Mapping[str, str] | None = None) -> None:
        """safetensors file with the weights and the constructor arguments."""
        from safetensors.torch import save_file

        meta = {"tokenkern.selector": json.dumps(self.config), **(metadata or {})}
        save_file({n: t.detach().contiguous() for n, t in self.state_dict().items()}, path, metadata=meta)

    @classmethod
    def load(cls, path: str, device: str | torch.device = "cpu") -> ReconstructionSelector:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        if "tokenkern.selector" not in meta:
            raise ValueError(f"{path} is not a ReconstructionSelector file (no 'tokenkern.selector' metadata)")
        config = json.loads(meta["tokenkern.selector"])
        model = cls(**config)
        state = load_file(path)
        model.load_state_dict({n: t.float() for n, t in state.items()})
        return model.eval().to(device)


def grid_side(n: int) -> int | None:
    side = math.isqrt(n)
    return side if side * side == n else None


def spread_order(side: int) -> Tensor:
    """A fixed order of the cells of a side x side grid whose every prefix is spread evenly
    over the grid: greedy farthest-point sampling from the center (ties to the lower index)."""
    rc = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    dist = torch.cdist(rc.double(), rc.double())
    order = [(side // 2) * side + side // 2]
    nearest = dist[order[0]].clone()
    for _ in range(side * side - 1):
        order.append(int(torch.argmax(nearest)))
        nearest = torch.minimum(nearest, dist[order[-1]])
    return torch.tensor(order)


def _spread_prior(n: int, scale: float) -> Tensor:
    """(n,) from +scale (first in spread_order) down to -scale (last); zeros when n is not a
    square or scale is 0."""
    side = grid_side(n)
    prior = torch.zeros(n)
    if side is not None and scale != 0 and n > 1:
        prior[spread_order(side)] = torch.linspace(scale, -scale, n)
    return prior


def _grid_kernel(n: int, scale: float) -> Tensor | None:
    """(n, n) weights exp(-distance / scale) between the cells of a square token grid; None
    when n is not a square (no interpolation prior) or scale <= 0."""
    side = grid_side(n)
    if side is None or scale <= 0:
        return None
    rc = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(n, 2)
    return torch.exp(-torch.cdist(rc.double(), rc.double()) / scale).float()


def train_step(
    model: ReconstructionSelector,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    keep: float | int,
    tau: float,
    seed: int,
    random_rows: int = 0,
    noise_scale: float = 1.0,
) -> float:
    """One optimizer step on the batch x (see forward_train); returns the loss before the step."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    out = model.forward_train(x, keep, tau, seed, random_rows, noise_scale)
    out["loss"].backward()
    optimizer.step()
    return float(out["loss"].detach())


def cosine_tau(step: int, steps: int, start: float = 1.0, end: float = 0.2) -> float:
    """Cosine schedule from start (step 0) to end (step steps - 1): temperatures, noise scales."""
    t = min(max(step / max(steps - 1, 1), 0.0), 1.0)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * t))
