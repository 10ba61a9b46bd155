"""Calling pyoptk's fused ops from a hand-written training loop (no Optimizer class).

Run: python examples/custom_loop.py
"""

import torch

import pyoptk

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
params = [p for p in model.parameters()]
# Optimizer state is plain tensors: fp32 moments and a float32 step per parameter.
exp_avgs = [torch.zeros_like(p, dtype=torch.float32) for p in params]
exp_avg_sqs = [torch.zeros_like(p, dtype=torch.float32) for p in params]
steps = [torch.zeros((), dtype=torch.float32) for _ in params]
lr = torch.tensor(3e-3)  # a tensor lr can be changed in place with no host sync

x = torch.randn(256, 32)
y = x[:, :1] * 2 - x[:, 1:2]
for it in range(200):
    loss = torch.nn.functional.mse_loss(model(x), y)
    for p in params:
        p.grad = None
    loss.backward()
    grads = [p.grad for p in params]
    pyoptk.ops.centralize_gradients_(grads)                 # gradient centralization
    total_norm = pyoptk.ops.clip_grad_norm_(params, 1.0)    # fused, no .item()
    with torch.no_grad():
        pyoptk.ops.adamw_(params, grads, exp_avgs, exp_avg_sqs, steps,
                          lr=lr, weight_decay=0.01)
    if it % 50 == 0:
        print(f"step {it:3d}  loss {loss.item():.4f}  grad norm {total_norm.item():.3f}")
print(f"final loss {torch.nn.functional.mse_loss(model(x), y).item():.4f}")
