"""Ground truth for tests: float64 finite differences of gradients, matrices with known spectra."""

from __future__ import annotations

import copy

import torch


def cast_batch(batch, dtype):
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: cast_batch(b, dtype) for k, b in batch.items()}
    return type(batch)(cast_batch(b, dtype) for b in batch)


def batch_size(batch):
    """Size of dim 0 of the first tensor of a tuple/list/dict batch."""
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return float(first.shape[0])


def flat_grads(grads, params):
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


def fd_hvp(model, loss_fn, batches, v, mode=lambda m: m.eval(), h=1e-4):
    """Richardson-extrapolated central difference of the float64 gradient along ``v``: O(h^4)."""
    ref = copy.deepcopy(model).double()
    mode(ref)
    params = [p for p in ref.parameters() if p.requires_grad]
    theta = [p.detach().clone() for p in params]
    sizes = [batch_size(b) for b in batches]
    parts = torch.split(v.double(), [p.numel() for p in params])

    def grad_at(step):
        with torch.no_grad():
            for p, t, d in zip(params, theta, parts):
                p.copy_(t + step * d.view_as(t))
        total = sum(n * loss_fn(ref, cast_batch(b, torch.float64)) for n, b in zip(sizes, batches)) / sum(sizes)
        return flat_grads(torch.autograd.grad(total, params, allow_unused=True), params)

    def central(step):
        return (grad_at(step) - grad_at(-step)) / (2 * step)

    return (4 * central(h / 2) - central(h)) / 3


def spectrum_matrix(eigenvalues: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A = Q diag(l) Q^T with a random orthogonal Q; returns (A, Q)."""
    n = eigenvalues.shape[0]
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    A = (Q * eigenvalues.double()) @ Q.T
    return (A + A.T) / 2, Q
