"""A straightforward dense transcription of the paper's Algorithm 1/2 (test oracle only).

Masks are dense; top-k is a full sort; merges are written entry by entry with torch.where.
The DARE mask of each step is drawn with the same key as the optimizer, by
``bernoulli_indices`` (the tensor-op paths) or by the CPU kernels' draw
(``kernel_update_indices``, the batched OnDARE kernel), so the two can be compared step by step.
"""

from __future__ import annotations

import math

import torch

from omotool.merging import bernoulli_indices, key_seed, keyed_generator
from omotool.optim import kernels


def bernoulli_update_indices(numel, p, seed, step, name) -> torch.Tensor:
    """OnDARE's mask of ``Δθ`` as the tensor-op paths draw it."""
    return bernoulli_indices(numel, p, keyed_generator(seed, "update", step, name))


def kernel_update_indices(numel, p, seed, step, name) -> torch.Tensor:
    """OnDARE's mask of ``Δθ`` as the CPU kernel draws it (same key)."""
    return kernels.dare_kept_indices(numel, p, key_seed(seed, "update", step, name))


def dense_bernoulli(shape, p, seed, *key) -> torch.Tensor:
    numel = math.prod(shape)
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[bernoulli_indices(numel, p, keyed_generator(seed, *key))] = True
    return mask.view(shape)


def sorted_topk(x: torch.Tensor, p: float) -> torch.Tensor:
    k = max(1, int(p * x.numel())) if p < 1 else x.numel()
    order = torch.argsort(x.abs().flatten(), descending=True, stable=True)
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view(x.shape)


class ReferenceOptimizer:
    """Algorithm 1 (K = 1) / Algorithm 2 (K > 1) over a dict of named float32 tensors."""

    def __init__(
        self,
        params,
        tau,
        method,
        p,
        alpha,
        lr,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        seed=0,
        online_step=1,
        clip=1.0,
        election="unweighted",
        rescale=None,
        update_indices=bernoulli_update_indices,
    ):
        self.params, self.method, self.p, self.alpha = params, method, p, alpha
        self.lr, self.betas, self.eps, self.wd, self.seed = lr, betas, eps, weight_decay, seed
        self.k, self.election = online_step, election
        self.update_indices = update_indices
        self.rescale = rescale or {"dare": "inverse", "ties": "none"}[method]
        self.m = {n: torch.zeros_like(t) for n, t in params.items()}
        self.v = {n: torch.zeros_like(t) for n, t in params.items()}
        self.cache = {n: torch.zeros_like(t) for n, t in params.items()}
        self.t = 0
        self.T = {}
        for name, t in tau.items():
            if method == "dare":
                ref = t * dense_bernoulli(t.shape, p, seed, "tau", name)
                if self.rescale == "inverse":
                    ref = ref / p
                elif self.rescale == "l1":
                    ref = ref * t.abs().sum() / ref.abs().sum()
                self.T[name] = ref.clamp(-clip, clip) if clip else ref
            else:
                self.T[name] = t * sorted_topk(t, p)

    def step(self, grads):
        self.t += 1
        b1, b2 = self.betas
        for name, theta in self.params.items():
            g = grads[name]
            theta.mul_(1 - self.lr * self.wd)
            self.m[name] = b1 * self.m[name] + (1 - b1) * g
            self.v[name] = b2 * self.v[name] + (1 - b2) * g * g
            m_hat = self.m[name] / (1 - b1**self.t)
            v_hat = self.v[name] / (1 - b2**self.t)
            delta = -self.lr * m_hat / (v_hat.sqrt() + self.eps)
            if self.k > 1:
                if self.t % self.k != 0:
                    theta.add_(delta)
                    self.cache[name] += delta
                    continue
                theta.sub_(self.cache[name])
                delta = delta + self.cache[name]
                self.cache[name].zero_()
            theta.add_(self.merged(name, delta))

    def merged(self, name, delta):
        a, T = self.alpha, self.T[name]
        if self.method == "dare":
            mask = torch.zeros(delta.numel(), dtype=torch.bool)
            mask[self.update_indices(delta.numel(), self.p, self.seed, self.t, name)] = True
            mask = mask.view(delta.shape)
            kept = delta * mask
            if self.rescale == "inverse":
                kept = kept / self.p
            elif self.rescale == "l1":
                kept = kept * delta.abs().sum() / kept.abs().sum()
            return (1 - a) * kept + a * T
        kept = delta * sorted_topk(delta, self.p)
        basis = T + kept if self.election == "unweighted" else a * T + (1 - a) * kept
        sign = torch.where(basis >= 0, 1.0, -1.0)
        keep_t = torch.sign(T) == sign
        keep_d = torch.sign(kept) == sign
        return a * T * keep_t + (1 - a) * kept * keep_d
