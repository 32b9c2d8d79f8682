"""Training configuration: one dataclass, saved as ``config.json`` in the run folder."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

from .negatives import NEGATIVE_KINDS
from .positives import POSITIVE_KINDS

SCHEDULES = ("step", "cosine")


@dataclass
class TrainConfig:
    """Every knob of a training run (spec §6 defaults for COCO).

    negatives / positives = None switch the generated samples off (the ablations
    "w/o negatives" / "w/o positives"); ``no_cmf`` removes the cross-modal fusion from
    the global score (partner-free R(G, l2norm(mean w)), paper variant only, see
    ``acf_fast.model``); ``loss="triplet"`` is the VSE++ ablation. u1 / u2 (None: the
    variant's 0.5 / 0.8; the paper uses u2 = 0.6 on Flickr30K) go into the model
    config, so every checkpoint carries them and evaluation uses them.
    """

    data: str
    out: str
    train_split: str = "train"
    dev_split: str = "dev"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 5e-4
    schedule: str = "step"  # step: x0.1 every step_epochs epochs; cosine: down to cosine_floor
    step_epochs: int = 10
    cosine_floor: float = 1e-4  # ABSOLUTE final lr of the cosine schedule (authors' code)
    grad_clip: float = 2.0
    variant: str = "paper"
    u1: Optional[float] = None
    u2: Optional[float] = None
    embed_dim: int = 1024
    heads: int = 8
    loss: str = "contrastive"
    tau: float = 0.05
    lam: float = 0.5
    margin: float = 0.2
    negatives: Optional[str] = "mixture"
    positives: Optional[str] = "both"
    no_cmf: bool = False
    finetune: bool = False
    encoder: Optional[str] = None  # local BERT folder; None = bundled MiniLM
    max_length: int = 40
    seed: int = 0
    device: str = "auto"
    backend: str = "auto"
    dev_images: Optional[int] = None  # validate on the first n dev images only (their captions)
    train_images: Optional[int] = None  # train on the first n images only
    progress: bool = True
    stop_after_epochs: Optional[int] = None  # stop (as if interrupted) after this epoch; for resume tests

    def validate(self) -> "TrainConfig":
        """Check every field's type and range; ValueError naming the first bad one.
        Run before anything is read or written."""
        def bad(name, want):
            raise ValueError(f"{name} must be {want}, got {getattr(self, name)!r}")

        def count(name, low, optional=False):
            v = getattr(self, name)
            if optional and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                bad(name, f"an int >= {low}" + (" or None" if optional else ""))

        def real(name, optional=False):
            v = getattr(self, name)
            if optional and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(name, "a finite number" + (" or None" if optional else ""))

        for name in ("data", "out", "train_split", "dev_split", "device", "backend"):
            if not isinstance(getattr(self, name), str):
                bad(name, "a str")
        for name, low in (("epochs", 1), ("step_epochs", 1), ("embed_dim", 1), ("heads", 1), ("max_length", 3),
                          ("seed", 0)):
            count(name, low)
        count("batch_size", 2)  # a contrastive batch needs negatives
        for name in ("dev_images", "train_images", "stop_after_epochs"):
            count(name, 1, optional=True)
        for name in ("lr", "cosine_floor", "grad_clip", "tau", "lam", "margin"):
            real(name)
        for name in ("u1", "u2"):
            real(name, optional=True)
        for name in ("no_cmf", "finetune", "progress"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "a bool")
        if self.embed_dim % self.heads:
            bad("embed_dim", f"divisible by heads={self.heads}")
        if not self.lr > 0:
            bad("lr", "> 0")
        if not self.grad_clip > 0:
            bad("grad_clip", "> 0")
        if self.schedule not in SCHEDULES:
            bad("schedule", f"one of {SCHEDULES}")
        if self.loss not in ("contrastive", "triplet"):
            bad("loss", "'contrastive' or 'triplet'")
        if self.negatives is not None and self.negatives not in NEGATIVE_KINDS:
            bad("negatives", f"None or one of {NEGATIVE_KINDS}")
        if self.positives is not None and self.positives not in POSITIVE_KINDS:
            bad("positives", f"None or one of {POSITIVE_KINDS}")
        if self.variant not in ("paper", "acf-code"):
            bad("variant", "'paper' or 'acf-code'")
        if not self.tau > 0:
            bad("tau", "> 0")
        if not 0 <= self.lam <= 1:
            bad("lam", "in [0, 1]")
        if not self.margin >= 0:
            bad("margin", ">= 0")
        if self.schedule == "cosine" and not 0 <= self.cosine_floor <= self.lr:
            bad("cosine_floor", f"an absolute lr in [0, lr = {self.lr}] (the cosine schedule ends there)")
        for name in ("u1", "u2"):
            if getattr(self, name) is not None and not 0 <= getattr(self, name) <= 1:
                bad(name, "None (the variant's) or in [0, 1]")
        if self.no_cmf and self.variant != "paper":
            bad("no_cmf", "False with the acf-code variant: its global score is already the partner-free "
                          "G · l2norm(mean w), there is no cross-modal fusion to remove")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown training config keys: {sorted(unknown)}")
        return cls(**d)
