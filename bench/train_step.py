"""One ACF training step (spec §6) as a benchmark workload: forward, backward, optimiser.

The forward is the trainer's own ``acf_fast.train.objective.Objective`` around
``acf_fast.model.ACF`` (encoders, the four B×B score blocks S(I,T), S(I,T⁻), S(I,T⁺),
S(I,T̃⁻) from ``acf_similarity`` with the chosen backend, the spec §6 loss with
``mixture`` negatives and positives); then backward, gradient clipping at 2.0 and one
Adam update. The batch is ``bench.train_step_cpu.make_batch`` (seeded random features
of the real shapes: K = 36 regions of 2048, MiniLM features of 384, captions of up to
``words`` wordpieces, positives up to twice that), the same one the training
engineer's side-by-side script uses.
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch


def make_train_step(variant: str, backend: str, *, batch: int = 16, embed_dim: int = 1024, heads: int = 8,
                    K: int = 36, words: int = 32, device="cpu", seed: int = 0) -> Tuple[Callable[[], float], dict]:
    """A closure running one full step on a fixed batch, and a dict describing it.

    Returns (step, info); ``step()`` returns the loss as a float. Every backend gets the
    same initial weights (seeded) and the same batch, so their steps do the same work.
    """
    from acf_fast.model import ACF
    from acf_fast.train.objective import Objective

    from .train_step_cpu import make_batch

    device = torch.device(device)
    torch.manual_seed(seed)
    model = ACF(variant, embed_dim=embed_dim, heads=heads).to(device)
    obj = Objective(model, negatives="mixture", positives=True, backend=backend)
    opt = torch.optim.Adam(obj.parameters(), lr=5e-4)
    data = make_batch(batch, K, words, 2048, 384, seed, device)

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
