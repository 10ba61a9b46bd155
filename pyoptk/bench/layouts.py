"""Parameter layouts for optimizer benchmarks: the tensor shapes of real models.

Only shapes are listed (no model code): an optimizer's cost depends on the number of
tensors and their sizes, which is what these reproduce.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

Shape = Tuple[int, ...]


def gpt2_124m() -> List[Shape]:
    """GPT-2 small (124M): tied embeddings, 12 blocks of width 768, Conv1D layouts."""
    d, shapes = 768, [(50257, 768), (1024, 768)]
    for _ in range(12):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),
                   (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def vit_b16() -> List[Shape]:
    """ViT-B/16 at 224² with a 1000-class head (86M)."""
    d, shapes = 768, [(d, 3, 16, 16), (d,), (1, 1, d), (1, 197, d)]
    for _ in range(12):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,),
                   (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,), (1000, d), (1000,)]


def resnet50() -> List[Shape]:
    """ResNet-50 (25.6M): convs without bias, batch-norm weight and bias per conv."""
    shapes: List[Shape] = [(64, 3, 7, 7), (64,), (64,)]
    in_ch = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            out = width * 4
            shapes += [(width, in_ch, 1, 1), (width,), (width,),
                       (width, width, 3, 3), (width,), (width,),
                       (out, width, 1, 1), (out,), (out,)]
            if b == 0:
                shapes += [(out, in_ch, 1, 1), (out,), (out,)]
            in_ch = out
    return shapes + [(1000, 2048), (1000,)]


def flat(n: int) -> List[Shape]:
    return [(n,)]


LAYOUTS: Dict[str, callable] = {
    "gpt2-124m": gpt2_124m,
    "vit-b16": vit_b16,
    "resnet50": resnet50,
    "flat-1m": lambda: flat(1_000_000),
    "flat-10m": lambda: flat(10_000_000),
    "flat-100m": lambda: flat(100_000_000),
}


def numel(shapes: List[Shape]) -> int:
    total = 0
    for s in shapes:
        n = 1
        for d in s:
            n *= d
        total += n
    return total


# Not real models: for the suites' smoke tests (a matrix, a conv, a vector, a scalar).
SMOKE_LAYOUTS: Dict[str, callable] = {
    "tiny": lambda: [(7, 5), (3, 2, 4), (5,), ()],
}
