"""The README's Python examples run as written (each block in a fresh namespace, in a
temporary working directory, on CPU)."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
# Sections whose ```python blocks must run as they are.
SECTIONS = ["Quick start: replace `torch.optim.AdamW`", "Learned optimizers",
            "Meta-training your own optimizer", "Calling the fused ops from your own loop",
            "Few-shot meta-learning: MAML, Reptile, ProtoNets"]


def _blocks():
    text = README.read_text()
    out = []
    for title in SECTIONS:
        m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, re.S | re.M)
        assert m, f"README has no section '## {title}'"
        for i, code in enumerate(re.findall(r"^```python\n(.*?)^```", m.group(1), re.S | re.M)):
            out.append(pytest.param(code, id=f"{title}-{i}"))
    assert out, "no python blocks found"
    return out


@pytest.mark.parametrize("code", _blocks())
def test_readme_block_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
