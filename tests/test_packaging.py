"""What an installed wheel promises: pyoptk needs only torch at run time.

`make wheel-check` installs the wheel into a venv holding only torch; this test checks
the same promise inside the test venv (where numpy, scikit-learn, ... are installed) by
making the optional packages unimportable in a fresh interpreter."""

import subprocess
import sys
import textwrap

OPTIONAL = ["numpy", "sklearn", "matplotlib", "tqdm", "triton", "nvtx", "safetensors",
            "pytorch_optimizer", "yaml", "tensorboard", "higher"]


def test_import_and_fused_step_need_only_torch(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        for name in {OPTIONAL!r}:
            sys.modules[name] = None          # import raises ImportError
        import torch
        import pyoptk
        from pyoptk.info import report
        report()
        p = torch.nn.Parameter(torch.ones(5))
        p.grad = torch.ones(5)
        pyoptk.optim.AdamW([p], lr=0.1).step()
        assert torch.all(p < 1), p
        opt = pyoptk.optim.MLPOptimizer([p])
        opt.step()
        opt.load_state_dict(opt.state_dict())           # the rule's identity hash
        path = opt.save_pretrained({str(tmp_path / "rule.pt")!r})
        pyoptk.optim.MLPOptimizer.from_pretrained(path, [p]).step()
        from pyoptk.learned.pretrained import available
        for name in available():                        # shipped rules load with torch only
            pyoptk.optim.MLPOptimizer.from_pretrained(name, [p]).step()
        import pyoptk.tasks, pyoptk.meta.trainer, pyoptk.meta.evaluation
        task = pyoptk.tasks.build_task(pyoptk.tasks.TaskSpec("quadratic", 0))
        task.loss(task.init_params(), task.batch(0))
        print("ok")
    """)
    # torch itself imports numpy lazily and warns when it is missing; that is torch's.
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("ok")
