"""Triton kernels of pyoptk's fused ops, shipped as ``pyoptk.kernels``.

One module per op family (``adamw``, ``lamb``, ``grad_norm``, ``centralize``), each
laid out as private ``@triton.jit`` kernels → plain launchers → the public function
that ``pyoptk.ops`` calls with already validated inputs (see docs/kernel-contract.md).
Multi-tensor kernels cover every tensor of a call in one launch through cached
chunk tables (``_multi_tensor``). This package imports only torch and triton.
"""
