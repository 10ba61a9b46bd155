"""``pyoptk demo`` (and ``make demo``): train a small network on scikit-learn's bundled
digits with torch's AdamW and pyoptk's AdamW, LAMB, Lookahead(AdamW) and the shipped
meta-trained learned optimizer (``MLPOptimizer.from_pretrained("mlp-small")``); print a
table (final loss, test accuracy, time) and save a loss-curve plot.

Everything is seeded, so each optimizer sees the same initial weights and batches.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable, Dict, List, Optional

import torch
from torch import nn


def load_digits_split(seed: int = 0):
    """Digits (1,797 8×8 images, 10 classes), standardized, 75/25 train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    as_t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return (as_t((xtr - mean) / std), torch.tensor(ytr), as_t((xte - mean) / std),
            torch.tensor(yte))


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(),
                         nn.Linear(128, 10))


def optimizers(lr: float) -> Dict[str, Callable]:
    import pyoptk

    return {
        "torch.optim.AdamW": lambda ps: torch.optim.AdamW(ps, lr=lr),
        "pyoptk AdamW": lambda ps: pyoptk.optim.AdamW(ps, lr=lr),
        "pyoptk LAMB": lambda ps: pyoptk.optim.LAMB(ps, lr=lr * 10, weight_decay=0.01),
        "pyoptk Lookahead(AdamW)": lambda ps: pyoptk.optim.Lookahead(
            pyoptk.optim.AdamW(ps, lr=lr), k=5, alpha=0.5),
        # learned: no learning rate to pick (lr_mult=1 is what it was meta-trained with)
        "pyoptk MLPOptimizer (mlp-small)": lambda ps: pyoptk.optim.MLPOptimizer.from_pretrained(
            "mlp-small", ps),
    }


def train(make_opt: Callable, data, epochs: int, batch: int, seed: int):
    xtr, ytr, xte, yte = data
    model = make_model(seed)
    opt = make_opt(list(model.parameters()))
    gen = torch.Generator().manual_seed(seed)
    losses: List[float] = []
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(xtr), batch):
            idx = perm[i:i + batch]
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    elapsed = time.perf_counter() - t0
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
        train_loss = nn.functional.cross_entropy(model(xtr), ytr).item()
    return losses, train_loss, acc, elapsed


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="pyoptk demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="demo_out", help="folder for loss_curves.png")
    args = ap.parse_args(argv)

    from tqdm import tqdm

    import pyoptk
    from pyoptk._backend import resolve_backend

    data = load_digits_split(args.seed)
    print(f"pyoptk {pyoptk.__version__}: digits ({len(data[0])} train / {len(data[2])} test), "
          f"MLP 64-128-128-10, {args.epochs} epochs, batch {args.batch}; "
          f"pyoptk backend on CPU: {resolve_backend('adamw_', 'cpu')}")
    results = {}
    for name, make in tqdm(optimizers(args.lr).items(), desc="optimizers", unit="opt"):
        # One untimed epoch first, so no optimizer's time includes torch's first-call
        # set-up (allocator, thread pool, kernel selection).
        train(make, data, 1, args.batch, args.seed)
        results[name] = train(make, data, args.epochs, args.batch, args.seed)

    header = f"{'optimizer':<34}{'final train loss':>18}{'test accuracy':>15}{'train time (s)':>16}"
    print("\n" + header + "\n" + "-" * len(header))
    for name, (_, loss, acc, sec) in results.items():
        print(f"{name:<34}{loss:>18.4f}{acc:>15.2%}{sec:>16.2f}")
    print("train time: wall time on CPU of the timed epochs (forward, backward and step)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(args.out, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (losses, *_rest) in results.items():
        k = 10  # moving average over 10 steps for readability
        smooth = torch.tensor(losses).unfold(0, k, 1).mean(1) if len(losses) > k else losses
        # torch's AdamW dashed on top: pyoptk's AdamW follows it exactly.
        style = dict(linestyle="--", color="black", zorder=3) if name.startswith("torch") else {}
        ax.plot(list(smooth), label=name, **style)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (10-step mean)")
    ax.set_title("digits MLP: torch AdamW vs pyoptk optimizers (a learned one included)")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(args.out, "loss_curves.png")
    fig.savefig(path, dpi=120)
    print(f"\nloss curves saved to {path}")
    return 0
