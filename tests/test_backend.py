"""Backend selection: forcing, errors for unavailable backends, the slow-path warning,
and that the native library and Triton really are present in the test environment."""

import warnings

import pytest
import torch

import pyoptk
from pyoptk import _backend, _native
from pyoptk.ops import adamw_


def small_adamw_args():
    return ([torch.randn(4)], [torch.randn(4)], [torch.zeros(4)], [torch.zeros(4)],
            [torch.zeros(())])


def test_native_and_triton_are_installed():
    """CI must exercise the fused CPU kernels and the Triton interpreter, not skip them."""
    assert _native.native_or_none() is not None, _native.native_load_error()
    assert pyoptk.available_backends("cpu") == ["triton", "cpu", "torch"]
    info = _native.native().build_info()
    assert set(info) >= {"cuda", "cuda_archs", "openmp", "omp_max_threads", "version"}


def test_auto_picks_native_on_cpu():
    assert _backend.resolve_backend("adamw_", "cpu") == "cpu"


def test_forcing_by_function_context_and_env(monkeypatch):
    pyoptk.set_backend("torch")
    assert _backend.resolve_backend("adamw_", "cpu") == "torch"
    with pyoptk.use_backend("cpu"):
        assert _backend.resolve_backend("adamw_", "cpu") == "cpu"
    pyoptk.set_backend(None)
    monkeypatch.setenv("PYOPTK_BACKEND", "torch")
    assert pyoptk.get_backend() == "torch"
    monkeypatch.setenv("PYOPTK_BACKEND", "fastest")
    with pytest.raises(ValueError, match="PYOPTK_BACKEND: backend must be one of"):
        pyoptk.get_backend()


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        pyoptk.set_backend("gpu")


def test_forced_backend_for_wrong_device_raises():
    with pyoptk.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="'cuda' backend runs CUDA tensors only"):
            adamw_(*small_adamw_args())


def test_forced_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pyoptk.use_backend("triton"):
        with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1"):
            adamw_(*small_adamw_args())


def test_missing_native_library(monkeypatch):
    monkeypatch.setattr(_native, "_load", lambda: (None, "ImportError: simulated"))
    monkeypatch.setattr(_backend, "native_or_none", lambda: None)
    monkeypatch.setattr(_backend, "native_load_error", lambda: "ImportError: simulated")
    monkeypatch.setattr(_backend, "_warned", set())
    with pyoptk.use_backend("cpu"):
        with pytest.raises(RuntimeError, match="native library pyoptk._C did not load"):
            adamw_(*small_adamw_args())
    with pytest.warns(_backend.SlowPathWarning, match="runs the PyTorch reference"):
        adamw_(*small_adamw_args())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adamw_(*small_adamw_args())  # warned once only
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation"):
        _native.native()


def test_ops_registered_with_torch_library():
    for name in ("adamw_", "lamb_", "clip_grad_norm_", "grad_norm", "centralize_gradients_"):
        assert hasattr(torch.ops.pyoptk, name)
