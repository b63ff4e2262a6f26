"""`python -m tokenkern demo` (`make demo`): the main job.

1. LoFi on real tokens: leverage_topk on DINOv2 ViT-S/14 patch tokens of four photos.
2. Every vision-side method inside the real DINOv2 at 25% and 10% keep: tokens kept, time,
   and the cosine similarity of the final [CLS] embedding and of the saliency map to the
   unpruned model; a PNG of each method's kept patches over the photos.
3. A small random LLaVA pruned end to end (vision-side and LLM-side), generate() included.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

import tokenkern
from tokenkern import reference

from . import figures, tiny_vlm, vit_pruning
from .dinov2 import load_dinov2_saliency
from .photos import SKIMAGE_PHOTOS, load_rgb, photo_batch


def _median_time(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def leverage_section(model, pixels: torch.Tensor, keep: float) -> None:
    with torch.no_grad():
        tokens = model.backbone(pixels)[:, 1:].contiguous()  # (B, 256, 384) patch tokens
    b, n, _ = tokens.shape
    k = max(1, round(keep * n))
    print(f"[1] LoFi: leverage_topk(x, k={k}) on DINOv2 ViT-S/14 patch tokens x = {tuple(tokens.shape)}")
    _, idx, scores = tokenkern.leverage_topk(tokens, k)
    exact_idx = reference.leverage_topk(tokens, k)[1]
    t_ours = _median_time(lambda: tokenkern.leverage_topk(tokens, k))
    t_exact = _median_time(lambda: reference.leverage_topk(tokens, k), repeats=3)
    for i, name in enumerate(SKIMAGE_PHOTOS):
        overlap = len(set(idx[i].tolist()) & set(exact_idx[i].tolist())) / k
        print(f"    {name:10s} kept {k}/{n}, top-k overlap with the exact SVD {overlap:.2f}, "
              f"scores sum {scores[i].sum().item():.2f} (= rank 32)")  # fmt: skip
    print(f"    batch of {b}: tokenkern {t_ours * 1e3:.1f} ms, exact float64 SVD {t_exact * 1e3:.1f} ms (median)\n")


def vision_section(
    model,
    pixels: torch.Tensor,
    keeps: tuple[float, ...],
    out_dir: Path,
    layer: int = 4,
    methods: tuple[str, ...] = vit_pruning.VISION_METHODS,
) -> Path | None:
    full = vit_pruning.full_forward(model, pixels)
    print(f"[2] Vision-side methods inside DINOv2 ViT-S/14 (pruned after block {layer} of 12), {len(pixels)} photos")
    print(f"    unpruned: {full.tokens} patch tokens, {full.seconds * 1e3:.0f} ms")
    header = f"    {'method':10s} {'keep':>5s} {'tokens':>6s} {'time':>9s} {'cos [CLS]':>10s} {'cos saliency':>13s}"
    print(header)
    print("    " + "-" * (len(header) - 4))
    kept_for_png: dict[str, torch.Tensor] = {}
    for keep in keeps:
        for method in methods:
            run = vit_pruning.run_method(model, pixels, method, keep, layer)
            cos_cls = F.cosine_similarity(run.cls, full.cls).mean().item()
            cos_sal = F.cosine_similarity(run.saliency.flatten(1), full.saliency.flatten(1)).mean().item()
            ms = run.seconds * 1e3
            print(f"    {method:10s} {keep:5.0%} {run.tokens:6d} {ms:7.0f}ms {cos_cls:10.3f} {cos_sal:13.3f}")
            if keep == keeps[0] and run.kept is not None:
                kept_for_png[method] = run.kept
    print(f"    (time: median of 3 forward passes on {pixels.device}; ToMe merges instead of keeping patches)")
    if not kept_for_png:  # only ToMe ran: no kept patches to draw
        print()
        return None
    photos = {name: load_rgb(name) for name in SKIMAGE_PHOTOS}
    grid = model.backbone.grid(pixels)[0]
    path = figures.kept_patches(photos, kept_for_png, grid, out_dir / "kept_patches.png")
    print(f"    kept patches at {keeps[0]:.0%}: {path}\n")
    return path


def llava_section() -> None:
    model = tiny_vlm.tiny_llava()
    inputs = tiny_vlm.prompt_batch(torch.Generator().manual_seed(0))
    length = inputs["input_ids"].shape[1]
    layers = model.model.language_model.layers
    print(f"[3] A small random LLaVA (CLIP tower, {len(layers)}-layer Llama decoder, SDPA), 2 left-padded prompts of "
          f"{length} tokens with 64 image tokens each")  # fmt: skip
    seen: list[int] = []

    def record(module, args, kwargs):
        seen.append(kwargs["hidden_states"].shape[1])

    hooks = [layer.self_attn.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
    with torch.no_grad():
        base = model.generate(**inputs, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    print(f"    unpruned          generate -> {base[:, length:].tolist()}")
    for method, options in (("fastervlm", {}), ("visionzip", {}), ("divprune", {}), ("fastv", {"layer": 2}),
                            ("dart", {"layer": 2})):  # fmt: skip
        seen.clear()
        with tokenkern.prune(model, method, keep=0.25, **options), torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=8, do_sample=False, min_new_tokens=8)
        prefill = seen[: len(layers)]
        print(f"    {method:9s} 25%    generate -> {out[:, length:].tolist()}   prefill lengths per layer {prefill}")
    for h in hooks:
        h.remove()
    with torch.no_grad():
        again = model.generate(**inputs, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    print(f"    after remove()    generate -> {again[:, length:].tolist()} (identical: {torch.equal(again, base)})")


def main(
    keep: float = 0.25, device: str | None = None, out_dir: str = "demo-output", methods: tuple[str, ...] | None = None
) -> None:
    """methods: the vision methods of section 2 (default: every one, vit_pruning.VISION_METHODS)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"tokenkern {tokenkern.__version__} | torch {torch.__version__} | device {device}\n")
    model = load_dinov2_saliency(device)
    pixels = photo_batch().to(device)
    leverage_section(model, pixels, keep)
    vision_section(model, pixels, (0.25, 0.10), Path(out_dir), methods=methods or vit_pruning.VISION_METHODS)
    llava_section()
