"""The training loop of spec §6: Adam, batch 64, gradient clip 2.0, step or cosine
schedule, bf16 autocast on GPU, frozen (default) or fine-tuned text encoder,
validation on the dev split every epoch (best checkpoint by rsum), JSON-lines log,
exact resume, DDP under torchrun.

    from acf_fast.train.config import TrainConfig
    from acf_fast.train.trainer import train
    run = train(TrainConfig(data="data/", out="runs/a", epochs=5))

Run folder: config.json, log.jsonl, best.safetensors, last.safetensors,
last_state.pt (see ``checkpoint``). One epoch = every training caption once,
paired with its image, in a seeded per-epoch order; the last partial batch is
dropped (a contrastive batch needs its negatives).

Nothing lost: every setting and input is checked, and the data loaded, before the
run folder is touched; a new run refuses a non-empty folder (``overwrite`` replaces
the run's own files). At the end of an epoch the files are written in the order best
-> last -> the epoch's log line -> ``last_state.pt``, and the state file is the commit:
it holds the weights (and the fine-tuned encoder's), the optimizer, schedule and RNG
state, and the data's content fingerprint, in one atomic file. A kill anywhere
leaves the previous commit whole, and resume restores from it alone (log lines past
it are dropped), so the resumed run equals the uninterrupted one. A resume refuses
data whose content changed, a state from another configuration, and a loss or
weights that turn non-finite stop the run with an error, keeping the last commit.

Randomness: model init from ``seed``; the epoch order from ``DistributedSampler``
(seed, epoch); the negatives, the positive kinds and the long positives' partners
from a ``torch.Generator`` seeded by (seed, epoch, rank) (see ``batches``). Everything a step draws is thus fixed by (seed, epoch,
step), so resuming at an epoch boundary reproduces the uninterrupted run exactly
on the CPU; the global RNG states are saved and restored as well.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from acf_fast.atomic import atomic_write_lines, atomic_write_text
from acf_fast.machine import resolve_device
from acf_fast.scoring import image_tensors, score_items

from . import checkpoint, distributed
from .config import TrainConfig
from .objective import Objective
from .batches import TrainData

# Settings a resumed run takes from the given config (None = keep the stored
# value); everything else comes from the run's stored config.json.
RESUME_OVERRIDES = ("epochs", "stop_after_epochs", "progress", "device", "backend")
# The files a run writes in its folder (``overwrite`` removes exactly these, plus the
# ``{split}_metrics.json`` of --eval-test and the default ``eval_*`` chunk folders).
RUN_FILES = ("config.json", "log.jsonl", "best.safetensors", "last.safetensors", checkpoint.STATE_NAME,
             "best_encoder.safetensors", "last_encoder.safetensors")
STATE_FORMAT = 2  # 2: the state holds the weights and the data fingerprint (the commit of an epoch)


class TrainingDiverged(ValueError):
    """The loss, the gradient or the weights became NaN or Inf (a ValueError, so every
    command reports it as one line); the run folder keeps its last commit."""


def read_stored_config(run_dir: Path) -> TrainConfig:
    """The run's ``config.json`` as a validated TrainConfig; errors name the file."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {path} not found; nothing to resume in {run_dir}")
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(stored, dict):
        raise ValueError(f"{path}: expected a JSON object of training settings, got {type(stored).__name__}")
    try:
        return TrainConfig.from_dict(stored).validate()
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its data folder (and a local encoder folder) made absolute, so that a
    resume from another working directory reads the same files."""
    from dataclasses import replace

    encoder = cfg.encoder
    if encoder is not None and Path(encoder).exists():
        encoder = str(Path(encoder).resolve())
    return replace(cfg, data=str(Path(cfg.data).resolve()), encoder=encoder)


def remove_run_files(run_dir: Path) -> None:
    """Delete what a run writes in ``run_dir`` (``RUN_FILES``, metrics, default chunk
    folders), nothing else."""
    import shutil

    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for p in run_dir.glob("*_metrics.json"):
        p.unlink()
    for p in run_dir.glob("eval_*"):
        if p.is_dir():
            shutil.rmtree(p)


def build_model(cfg: TrainConfig, region_dim: int, global_dim: int, text_dim: int):
    """A fresh ACF for ``cfg`` (seeded), with its u1 / u2 (None: the variant's) stored
    in the model config and so in every checkpoint. ``no_cmf`` removes the cross-modal
    fusion: S_global = R(G, l2norm(mean w)), partner-free (spec §6 [choice], ``ACF``)."""
    from acf_fast.model import ACF

    torch.manual_seed(cfg.seed)
    return ACF(variant=cfg.variant, embed_dim=cfg.embed_dim, heads=cfg.heads, region_dim=region_dim,
               global_dim=global_dim, text_dim=text_dim, u1=cfg.u1, u2=cfg.u2, cmf=not cfg.no_cmf)


class LRFactor:
    """Multiplier of the base lr at optimiser step ``t`` (a class so LambdaLR saves it).

    step:   0.1 ** (epoch // step_epochs)            (paper)
    cosine: floor + (1 - floor) · ½(1 + cos(π t / T)) (authors' code) with floor the
            RATIO final lr / base lr; ``lr_factor`` builds it from the config's
            absolute floor (1e-4 by default, as the authors').
    """

    def __init__(self, schedule: str, steps_per_epoch: int, epochs: int, step_epochs: int, floor: float):
        self.schedule, self.steps_per_epoch, self.epochs = schedule, steps_per_epoch, epochs
        self.step_epochs, self.floor = step_epochs, floor

    def __call__(self, t: int) -> float:
        if self.schedule == "step":
            return 0.1 ** ((t // max(1, self.steps_per_epoch)) // self.step_epochs)
        frac = min(1.0, t / max(1, self.steps_per_epoch * self.epochs))
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * frac))


class DevData:
    """The dev split (first ``dev_images`` images and their captions) for validation."""

    def __init__(self, cfg: TrainConfig, encoder_getter, device):
        from acf_fast.data import encode_split, load_encoded, load_split

        split = load_split(cfg.data, cfg.dev_split)
        n = split.regions.shape[0] if cfg.dev_images is None else min(cfg.dev_images, split.regions.shape[0])
        t2i = np.asarray(split.txt2img, dtype=np.int64)
        self.caps = np.flatnonzero(t2i < n)
        self.txt2img = t2i[self.caps]
        self.regions, self.region_mask, self.globals = image_tensors(split, np.arange(n), device)
        self.captions = [split.captions[c] for c in self.caps]
        if not cfg.finetune:
            folder = Path(cfg.data)
            if not (folder / f"{cfg.dev_split}_words.safetensors").is_file():
                encode_split(folder, cfg.dev_split, encoder_getter())
            words, mask = load_encoded(folder, cfg.dev_split)
            self.words, self.mask = words[self.caps], mask[self.caps]

    def evaluate(self, model, cfg: TrainConfig, encoder=None) -> dict:
        from acf_fast.evaluate import recall_metrics

        if encoder is not None:  # fine-tuned: re-encode with the current weights
            encoder.model.eval()
            words, mask = encoder.encode(self.captions, max_length=cfg.max_length, progress=False)
            encoder.model.train()
        else:
            words, mask = self.words, self.mask
        # The evaluation pipeline's default precision: the best checkpoint is chosen
        # by the same numerics that later score it on the test split.
        S, _ = score_items(model, self.regions, self.region_mask, self.globals, words, mask, backend=cfg.backend)
        return recall_metrics(S, torch.from_numpy(self.txt2img))


class Trainer:
    """Owns one run. ``Trainer(cfg, resume, overwrite).run()`` -> the run folder.

    ``on_write(name, epoch)``, when set, is called after each file of an epoch's commit
    is written (name "best", "last", "log", "state"; epoch 1-based): the hook the kill
    tests use to stop the process between two writes."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, overwrite: bool = False):
        from acf_fast.paths import require_empty_folder

        self.run_dir = Path(cfg.out)
        if resume and overwrite:
            raise ValueError("--resume continues the run in --out and --overwrite replaces it: give one")
        if resume:
            saved = read_stored_config(self.run_dir)
            for k in RESUME_OVERRIDES:
                if getattr(cfg, k) is not None or k == "stop_after_epochs":
                    setattr(saved, k, getattr(cfg, k))
            saved.out = str(self.run_dir)
            cfg = saved
        self.cfg = cfg.validate()
        self.resume = resume
        self.overwrite = overwrite
        self.on_write = None
        self.device = resolve_device(cfg.device)
        self.dist = distributed.setup(self.device)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        self._encoder = None
        if not resume:
            if not overwrite:
                require_empty_folder(self.run_dir, "--out", "pass --resume to continue the run in it, --overwrite "
                                                            "to replace it, or another --out")
            self.cfg = absolute_paths(self.cfg)
        distributed.barrier(self.dist)  # every rank has looked at the folder before rank 0 writes in it

    # -- helpers ---------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.dist.is_main and self.cfg.progress:
            from tqdm.auto import tqdm

            tqdm.write(msg)

    def encoder(self):
        if self._encoder is None:
            from acf_fast.text_encoder import load_text_encoder

            self._encoder = load_text_encoder(self.cfg.encoder, device=self.device)
        return self._encoder

    def _write_log(self, record: dict) -> None:
        if self.dist.is_main:
            with open(self.run_dir / "log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _truncate_log(self, step: int, epoch: int) -> None:
        """Drop log lines written after the commit we resume from (and a line cut short
        by a kill)."""
        path = self.run_dir / "log.jsonl"
        if not (self.dist.is_main and path.is_file()):
            return
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # half written when the process died
            if rec.get("event") == "step" and rec["step"] > step:
                continue
            if rec.get("event") == "epoch" and rec["epoch"] >= epoch:
                continue
            keep.append(line)
        atomic_write_lines(path, keep)

    def _wrote(self, name: str, epoch: int) -> None:
        if self.on_write is not None:
            self.on_write(name, epoch)

    def _save(self, model, name: str, epoch: int) -> None:
        model.save(self.run_dir / f"{name}.safetensors")
        if self.cfg.finetune:
            checkpoint.save_encoder(self.run_dir / f"{name}_encoder.safetensors", self._encoder.model)
        self._wrote(name, epoch)

    def _data_fingerprint(self) -> dict:
        """The training and dev splits' content (see ``scoring.data_fingerprint``)."""
        from acf_fast.scoring import data_fingerprint

        cfg = self.cfg
        splits = (cfg.train_split, cfg.dev_split)
        return {"folder": cfg.data, "splits": {s: data_fingerprint(cfg.data, s) for s in splits}}

    def _restore(self, model, encoder, optimizer, scheduler, fingerprint: dict):
        """Load the last commit into the model, encoder, optimizer and schedule after
        checking it belongs to this configuration and this data; returns (epoch, step,
        best rsum). Raises ValueError naming the files otherwise."""
        path = self.run_dir / checkpoint.STATE_NAME
        try:
            state = checkpoint.load_state(self.run_dir)
        except Exception as err:
            raise ValueError(f"{path}: unreadable training state ({err})") from None
        if state is None:
            raise FileNotFoundError(f"--resume: no {checkpoint.STATE_NAME} in {self.run_dir} (no epoch finished)")
        stored = state.get("data")
        if stored is not None and stored["splits"] != fingerprint["splits"]:
            raise ValueError(f"--resume: {changed_files(stored, fingerprint)} changed since this run started "
                             f"(content, not dates); resuming would train on other data. Restore the data, or "
                             "start a new run (another --out, or --overwrite)")
        weights = state.get("model")
        if weights is None:  # written before STATE_FORMAT 2: the weights are in last.safetensors
            from acf_fast.model import ACF

            self.log(f"{path} predates the one-file commit; taking the weights from last.safetensors")
            weights = ACF.load(self.run_dir / "last.safetensors", expect=model.config).state_dict()
        check_state_fits(weights, model.state_dict(), path, self.run_dir / "config.json")
        model.load_state_dict(weights)
        if self.cfg.finetune:
            if state.get("encoder") is not None:
                check_state_fits(state["encoder"], encoder.model.state_dict(), path, self.run_dir / "config.json")
                encoder.model.load_state_dict(state["encoder"])
            else:
                checkpoint.load_encoder(self.run_dir / "last_encoder.safetensors", encoder.model)
        try:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        except (KeyError, ValueError, RuntimeError) as err:
            raise ValueError(f"{path}: its optimizer state does not fit the run in {self.run_dir / 'config.json'} "
                             f"({err})") from None
        checkpoint.set_rng_state(state["rng"])
        return state["epoch"], state["step"], state["best_rsum"]

    # -- main ------------------------------------------------------------
    def run(self) -> Path:
        try:
            return self._run()
        finally:
            distributed.teardown(self.dist)

    def _run(self) -> Path:
        cfg, dev = self.cfg, self.device
        # Everything that can fail on bad input happens before the run folder is touched.
        # Rank 0 first: it writes the positives' encode cache that the others then read.
        if not self.dist.is_main:
            distributed.barrier(self.dist)
        data = TrainData(cfg, self.encoder, self.log)
        if self.dist.is_main:
            distributed.barrier(self.dist)
        devdata = DevData(cfg, self.encoder, dev) if self.dist.is_main else None
        split = data.split
        region_dim = split.regions.shape[2]
        global_dim = split.globals.shape[1] if split.globals is not None else region_dim
        model = build_model(cfg, region_dim, global_dim, data.text_dim).to(dev)
        self.model = model
        encoder = None
        if cfg.finetune:
            encoder = data.encoder
            for p in encoder.model.parameters():
                p.requires_grad_(True)
            encoder.model.train()
        objective = Objective(model, loss=cfg.loss, negatives=cfg.negatives, positives=cfg.positives is not None,
                              tau=cfg.tau, lam=cfg.lam, margin=cfg.margin, backend=cfg.backend, encoder=encoder)
        params = [p for p in objective.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=cfg.lr)
        sampler = torch.utils.data.DistributedSampler(range(len(data)), num_replicas=self.dist.world,
                                                      rank=self.dist.rank, shuffle=True, seed=cfg.seed)
        steps_per_epoch = len(sampler) // cfg.batch_size
        if steps_per_epoch < 1:
            raise ValueError(f"{len(sampler)} captions per process is less than one batch of {cfg.batch_size}")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps_per_epoch))
        fingerprint = self._data_fingerprint()
        start_epoch, step, best = 0, 0, -1.0
        if self.resume:
            start_epoch, step, best = self._restore(model, encoder, optimizer, scheduler, fingerprint)
            self._truncate_log(step, start_epoch)
            self.log(f"resumed {self.run_dir} at epoch {start_epoch}, step {step}")
        elif self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_run_files(self.run_dir)  # empty unless overwrite: the old run's own files only
            atomic_write_text(self.run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2))
        distributed.barrier(self.dist)
        wrapped = distributed.wrap(objective, self.dist, dev)
        use_bf16 = dev.type == "cuda"
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.time()
            sampler.set_epoch(epoch)
            order = list(sampler)
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 7_919 + self.dist.rank)
            from tqdm.auto import tqdm

            bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                       disable=not (cfg.progress and self.dist.is_main), leave=False)
            losses = []
            for s in bar:
                batch = data.batch(order[s * cfg.batch_size:(s + 1) * cfg.batch_size], gen, dev)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                    loss, _ = wrapped(batch, gen)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                lv = float(loss.detach())
                self._check_finite(lv, float(gnorm), None, epoch, step)
                optimizer.step()
                self._check_finite(lv, float(gnorm), params, epoch, step)
                lr = optimizer.param_groups[0]["lr"]
                scheduler.step()
                step += 1
                losses.append(lv)
                bar.set_postfix(loss=f"{lv:.4f}")
                self._write_log({"event": "step", "epoch": epoch, "step": step, "loss": lv, "lr": lr,
                                 "grad_norm": float(gnorm)})
            bar.close()
            record = {"event": "epoch", "epoch": epoch, "step": step, "loss": float(np.mean(losses)),
                      "train_seconds": round(time.time() - t0, 2)}
            if self.dist.is_main:
                metrics = devdata.evaluate(model, cfg, encoder)
                record["dev"] = metrics
                record["rsum"] = metrics["rsum"]
                if metrics["rsum"] > best:
                    best = metrics["rsum"]
                    self._save(model, "best", epoch + 1)
                record["best_rsum"] = best
                self._save(model, "last", epoch + 1)
                self._write_log(record)
                self._wrote("log", epoch + 1)
                checkpoint.save_state(self.run_dir, {  # the commit of this epoch (see the module docstring)
                    "format": STATE_FORMAT, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "epoch": epoch + 1, "step": step, "best_rsum": best, "rng": checkpoint.rng_state(),
                    "model": cpu_state(model), "encoder": cpu_state(encoder.model) if cfg.finetune else None,
                    "data": fingerprint,
                })
                self._wrote("state", epoch + 1)
                self.log(f"epoch {epoch + 1}: loss {record['loss']:.4f}  dev rsum {metrics['rsum']:.1f}  "
                         f"i2t R@1 {metrics['i2t']['r1']:.1f}  t2i R@1 {metrics['t2i']['r1']:.1f}  "
                         f"({record['train_seconds']:.0f} s)")
            distributed.barrier(self.dist)
            if cfg.stop_after_epochs is not None and epoch + 1 >= cfg.stop_after_epochs:
                break
        return self.run_dir

    def _check_finite(self, loss: float, gnorm: float, params, epoch: int, step: int) -> None:
        """TrainingDiverged when the loss or gradient norm (before the update) or the
        weights (``params``, after it) are not finite."""
        if params is None:
            if math.isfinite(loss) and math.isfinite(gnorm):
                return
            what = f"the loss is {loss} and the gradient norm {gnorm} (not finite); the weights were not updated"
        else:
            if all(bool(torch.isfinite(p).all()) for p in params):
                return
            what = f"the update made the weights not finite (loss {loss:.4g}, gradient norm {gnorm:.4g})"
        raise TrainingDiverged(
            f"training diverged at epoch {epoch + 1}, step {step + 1}: {what}. Nothing of this epoch was saved: "
            f"{self.run_dir} keeps the last finished epoch ({epoch} of {self.cfg.epochs}); lower --lr (now "
            f"{self.cfg.lr:g}) in a new run, or --resume to retry")


def cpu_state(module: torch.nn.Module) -> dict:
    """A module's state dict as CPU tensors (copies), for the training state file."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def check_state_fits(state: dict, own: dict, path: Path, config_path: Path) -> None:
    """ValueError naming both files unless ``state`` has exactly ``own``'s names and shapes."""
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise ValueError(f"{path} holds the weights of another model than {config_path} describes: missing "
                         f"{missing[:5]}, unexpected {extra[:5]}; the files come from different runs")
    for k in sorted(own):
        if tuple(state[k].shape) != tuple(own[k].shape):
            raise ValueError(f"{path}: tensor {k} has shape {tuple(state[k].shape)} but {config_path} gives "
                             f"{tuple(own[k].shape)}; the files come from different runs (start a new run, or "
                             "put back the run's own files)")


def changed_files(stored: dict, now: dict) -> str:
    """The data files whose fingerprint differs, named (for the resume refusal)."""
    names = []
    for split, files in now["splits"].items():
        before = {f[0]: f for f in stored["splits"].get(split, [])}
        after = {f[0]: f for f in files}
        names += [str(Path(now["folder"]) / n) for n in sorted(set(before) | set(after))
                  if before.get(n) != after.get(n)]
    return ", ".join(names) or f"the data in {now['folder']}"


def lr_factor(cfg: TrainConfig, steps_per_epoch: int) -> LRFactor:
    """The schedule of ``cfg``: for cosine, down to the absolute lr ``cfg.cosine_floor``."""
    return LRFactor(cfg.schedule, steps_per_epoch, cfg.epochs, cfg.step_epochs, cfg.cosine_floor / cfg.lr)


def train(config: TrainConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Train as ``config`` says; returns the run folder (holds best.safetensors).
    ``resume``: continue the run in ``config.out``; ``overwrite``: replace the run there
    (else a non-empty folder is refused)."""
    return Trainer(config, resume=resume, overwrite=overwrite).run()
