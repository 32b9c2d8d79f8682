"""One ACF training step (spec §6) as a benchmark workload: forward, backward, optimiser.

The forward is the trainer's own ``acf_fast.train.objective.Objective`` around
``acf_fast.model.ACF`` (encoders, the four B×B score blocks S(I,T), S(I,T⁻), S(I,T⁺),
S(I,T̃⁻) from ``acf_similarity`` with the chosen backend, the spec §6 loss with
``mixture`` negatives and positives); then backward, gradient clipping at 2.0 and one
Adam update. The batch is ``bench.workloads.train_batch`` (seeded random features of
the real shapes: K regions of 2048, MiniLM features of 384, captions of up to
``words`` wordpieces, positives up to twice that).
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch

from .workloads import train_batch


def _objective_and_batch(variant: str, backend: str, *, batch: int, embed_dim: int, heads: int, K: int, words: int,
                         device, seed: int):
    from acf_fast.model import ACF
    from acf_fast.train.objective import Objective

    torch.manual_seed(seed)
    model = ACF(variant, embed_dim=embed_dim, heads=heads).to(device)
    obj = Objective(model, negatives="mixture", positives=True, backend=backend)
    return obj, train_batch(batch, K=K, words=words, device=device, seed=seed)


def make_train_step(variant: str, backend: str, *, batch: int = 16, embed_dim: int = 1024, heads: int = 8,
                    K: int = 36, words: int = 32, device="cpu", seed: int = 0) -> Tuple[Callable[[], float], dict]:
    """A closure running one full step on a fixed batch, and a dict describing it.

    Returns (step, info); ``step()`` returns the loss as a float. Every backend gets the
    same initial weights (seeded) and the same batch, so their steps do the same work.
    """
    device = torch.device(device)
    obj, data = _objective_and_batch(variant, backend, batch=batch, embed_dim=embed_dim, heads=heads, K=K, words=words,
                                     device=device, seed=seed)
    opt = torch.optim.Adam(obj.parameters(), lr=5e-4)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss, _ = obj(data, torch.Generator().manual_seed(seed + 1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(obj.parameters(), 2.0)
        opt.step()
        return float(loss.detach())

    info = {"model": "acf_fast.model.ACF + acf_fast.train.objective.Objective", "pairs_per_step": 4 * batch * batch,
            "K": K, "words_max": words, "D": embed_dim, "H": heads}
    return step, info


def first_step_gradient(variant: str, backend: str, *, batch: int = 16, embed_dim: int = 1024, heads: int = 8,
                        K: int = 36, words: int = 32, device="cpu", seed: int = 0) -> Tuple[float, torch.Tensor]:
    """(loss, gradient of every model weight flattened, float32 CPU) of the first step of
    :func:`make_train_step`'s workload: backends must agree on it before they are timed."""
    obj, data = _objective_and_batch(variant, backend, batch=batch, embed_dim=embed_dim, heads=heads, K=K, words=words,
                                     device=torch.device(device), seed=seed)
    loss, _ = obj(data, torch.Generator().manual_seed(seed + 1))
    loss.backward()
    grads = torch.cat([p.grad.reshape(-1).float().cpu() for p in obj.model.parameters() if p.grad is not None])
    return float(loss.detach()), grads
