"""The ``pyoptk`` command.

    pyoptk info                 build, backends, which backend each op uses
    pyoptk demo [--out DIR]     digits: torch AdamW vs pyoptk AdamW / LAMB / Lookahead / mlp-small
    pyoptk eval [...]           optimizers over a task split vs AdamW (default and tuned lr)
    pyoptk compare [...]        one task, several optimizers, one loss-curve plot
    pyoptk bench optim [...]    optimizer step benchmarks (``pyoptk bench optim -h``)
    pyoptk bench learned [...]  learned-optimizer step, memory and meta-gradient costs
    pyoptk bench meta [...]     meta-training throughput: TBPTT and PES vs plain PyTorch
    pyoptk bench maml [...]     MAML meta-gradient time and memory vs higher / autograd
    pyoptk meta-train --config CFG [--resume] [--out DIR]   meta-train a learned optimizer
    pyoptk meta-init train|finetune [...]   meta-learned initialization (MAML/Reptile)
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _info(argv: List[str]) -> int:
    argparse.ArgumentParser(prog="pyoptk info").parse_args(argv)
    from pyoptk.info import report

    print(report())
    return 0


def _demo(argv: List[str]) -> int:
    from pyoptk.demo import main

    return main(argv)


def _bench(argv: List[str]) -> int:
    suites = {"optim": "pyoptk.bench.optim", "learned": "pyoptk.bench.learned",
              "meta": "pyoptk.bench.meta", "maml": "pyoptk.bench.maml"}
    if not argv or argv[0] not in suites:
        print(f"usage: pyoptk bench {{{','.join(suites)}}} [options]", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(suites[argv[0]]).main(argv[1:])


def _eval(argv: List[str]) -> int:
    from pyoptk.meta.evaluation import main

    return main(argv)


def _compare(argv: List[str]) -> int:
    from pyoptk.meta.evaluation import main

    return main(argv, compare=True)


def _meta_train(argv: List[str]) -> int:
    from pyoptk.meta.trainer import main

    return main(argv)


def _meta_init(argv: List[str]) -> int:
    from pyoptk.meta.universal_init import main

    return main(argv)


COMMANDS = {"info": _info, "demo": _demo, "eval": _eval, "compare": _compare,
            "meta-train": _meta_train, "bench": _bench, "meta-init": _meta_init}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
