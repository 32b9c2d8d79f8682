"""Training of ACF (spec §6): sample generation, loss, trainer, checkpoints, DDP.

    negatives.py    Asymmetry-I: noised token embeddings (projected features or BERT inputs)
    positives.py    Asymmetry-II: long / short positive texts
    batches.py      training batches: cached captions, positives, shuffled texts
    loss.py         acf_contrastive_loss (α rule, λ), triplet_loss (VSE++ ablation)
    objective.py    one step's forward: four text sets, one fused score call, loss
    trainer.py      the loop: Adam, schedules, validation, best checkpoint, resume
    checkpoint.py   safetensors model + weights_only training state, atomic writes
    distributed.py  DDP under torchrun / gloo
"""
from .config import TrainConfig
from .loss import acf_contrastive_loss, triplet_loss

__all__ = ["TrainConfig", "acf_contrastive_loss", "triplet_loss", "train"]


def train(config, resume: bool = False):
    """See :func:`acf_fast.train.trainer.train`."""
    from .trainer import train as _train

    return _train(config, resume=resume)
