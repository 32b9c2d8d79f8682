"""``acf-fast train --data DIR --out RUN``: train ACF (spec §6) with the paper's
Table 2 ablation switches."""
from __future__ import annotations

import argparse

from ..train.negatives import CLI_NEGATIVE_KINDS
from ..train.positives import POSITIVE_KINDS
from . import add_precision_arg


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Options shared by train, demo and ablation (model and optimiser)."""
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs (spec: 20; with --resume: the stored run's unless given)")
    p.add_argument("--batch-size", type=int, default=64, help="pairs per batch, per process (spec: 64)")
    p.add_argument("--lr", type=float, default=5e-4, help="Adam learning rate (spec: 5e-4 COCO, 2e-4 F30K)")
    p.add_argument("--schedule", choices=("step", "cosine"), default="step",
                   help="step: x0.1 every --step-epochs epochs (paper); cosine: down to the lr --cosine-floor (authors)")
    p.add_argument("--step-epochs", type=int, default=10, help="epochs between x0.1 steps of the step schedule")
    p.add_argument("--cosine-floor", type=float, default=1e-4,
                   help="absolute final lr of the cosine schedule (authors' code: 1e-4); must be <= --lr")
    p.add_argument("--variant", choices=("paper", "acf-code"), default="paper", help="model variant (spec §3)")
    p.add_argument("--embed-dim", type=int, default=1024, help="shared width D")
    p.add_argument("--heads", type=int, default=8, help="attention heads H (D divisible by H)")
    p.add_argument("--seed", type=int, default=0, help="seed of init, data order and sample generation")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1 ...")
    p.add_argument("--backend", choices=("auto", "eager", "torch", "triton"), default="auto",
                   help="acf_similarity backend (auto: triton on CUDA, torch on CPU)")
    add_precision_arg(p, "precision of the test-split scoring (dev validation always uses the default)")


def add_score_weight_args(p: argparse.ArgumentParser) -> None:
    """--u1 / --u2 (train and ablation; the demo keeps the variant's)."""
    p.add_argument("--u1", type=float, default=None,
                   help="weight of region->word in the local score, eq. 13 (default: the variant's, 0.5)")
    p.add_argument("--u2", type=float, default=None,
                   help="weight of the local score against the global one, eq. 15 (default: the variant's, 0.8; "
                        "paper: 0.8 COCO, 0.6 Flickr30K); stored in the checkpoint and used by evaluate")


def add_ablation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-positives", action="store_true", help="w/o Asymmetry-II positives")
    p.add_argument("--no-negatives", action="store_true", help="w/o Asymmetry-I negatives")
    p.add_argument("--no-cmf", action="store_true",
                   help="w/o cross-modal fusion (paper variant): S_global = R(G, l2norm(mean of the words)), "
                        "partner-free, so no attended feature enters it; the local score is kept")
    p.add_argument("--loss", choices=("contrastive", "triplet"), default="contrastive",
                   help="spec §6 contrastive loss, or the VSE++ max-violation triplet loss (margin 0.2)")
    p.add_argument("--negatives", choices=CLI_NEGATIVE_KINDS, default="mixture", help="kind of negatives")
    p.add_argument("--positives", choices=POSITIVE_KINDS, default="both", help="kind of positives")
    p.add_argument("--tau", type=float, default=0.05, help="softmax temperature (0.05 COCO, 0.01 F30K)")
    p.add_argument("--lam", type=float, default=0.5, help="λ: weight of L_I against L_II")


def config_from_args(args) -> "TrainConfig":
    from ..train.config import TrainConfig

    return TrainConfig(
        data=args.data, out=args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        schedule=args.schedule, step_epochs=args.step_epochs, cosine_floor=args.cosine_floor,
        variant=args.variant, u1=getattr(args, "u1", None), u2=getattr(args, "u2", None), embed_dim=args.embed_dim, heads=args.heads, seed=args.seed, device=args.device,
        backend=args.backend, loss=args.loss, tau=args.tau, lam=args.lam,
        negatives=None if args.no_negatives else args.negatives,
        positives=None if args.no_positives else args.positives,
        no_cmf=args.no_cmf, finetune=getattr(args, "finetune", False), encoder=getattr(args, "encoder", None),
        dev_images=getattr(args, "dev_images", None), train_images=getattr(args, "train_images", None),
        progress=not getattr(args, "quiet", False),
    )


# Options a resumed run may be given with another value than it started with.
RESUME_MAY_CHANGE = {"out", "resume", "epochs", "device", "backend", "quiet", "eval_test", "precision"}
# Options whose TrainConfig field has another name (or is derived from them).
OPTION_FIELD = {"no_positives": "positives", "no_negatives": "negatives", "positives": "positives",
                "negatives": "negatives"}


def explicit_options(argv) -> set:
    """The dests of the train options given on the command line ``argv`` (everything
    after the ``train`` word), as opposed to those left at their defaults."""
    unset = object()
    p = argparse.ArgumentParser(add_help=False)
    add_train_args(p)
    p.set_defaults(**{dest: unset for dest in vars(p.parse_args([]))})
    return {dest for dest, v in vars(p.parse_args(argv)).items() if v is not unset}


def check_resume_options(args, stored) -> None:
    """With --resume, refuse an explicit option whose value differs from the run's
    stored setting (it would be ignored silently otherwise)."""
    from pathlib import Path

    argv = list(getattr(args, "argv", None) or [])
    given = explicit_options(argv[argv.index("train") + 1:] if "train" in argv else argv) - RESUME_MAY_CHANGE
    if not given:
        return
    wanted = config_from_args(argparse.Namespace(**{**vars(args), "data": args.data or stored.data,
                                                    "epochs": args.epochs or stored.epochs}))
    for dest in sorted(given):
        field = OPTION_FIELD.get(dest, dest)
        have, want = getattr(stored, field), getattr(wanted, field)
        if field in ("data", "encoder") and have is not None and want is not None:
            same = Path(have).resolve() == Path(want).resolve()
        else:
            same = have == want
        if not same:
            flag = "--" + dest.replace("_", "-")
            raise ValueError(f"--resume continues {args.out} with its stored settings, but {flag} asks "
                             f"{field} = {want!r} where the run has stored {field} = {have!r} (in "
                             f"{Path(args.out) / 'config.json'}): drop {flag}, or start a new run (another --out, "
                             "or --overwrite)")


def check_eval_split(folder, split: str) -> None:
    """FileNotFoundError before training when --eval-test names a split that cannot be scored."""
    from pathlib import Path

    from ..data.encode import cache_path

    for p in (Path(folder) / f"{split}_ims.npy", Path(folder) / f"{split}_caps.txt", cache_path(folder, split)):
        if not p.is_file():
            raise FileNotFoundError(f"--eval-test {split}: {p} is missing (encode the split with `acf-fast data "
                                    f"encode {folder} --split {split}`)")


def run(args) -> int:
    from ..train.trainer import read_stored_config, train

    if args.out is None:
        raise ValueError("--out RUN is required")
    if args.data is None and not args.resume:
        raise ValueError("--data DIR is required (the SCAN-layout folder with train and dev splits)")
    stored = None
    if args.resume:
        stored = read_stored_config(args.out)
        check_resume_options(args, stored)
    if args.eval_test:
        from ..machine import resolve_device
        from ..scoring import check_precision

        check_precision(args.precision, resolve_device(args.device))  # before training, not after
        check_eval_split(stored.data if stored is not None else args.data, args.eval_test)
    epochs = args.epochs if args.epochs is not None else (None if args.resume else 20)
    cfg = config_from_args(argparse.Namespace(**{**vars(args), "data": args.data or "", "epochs": epochs}))

    import json
    from contextlib import nullcontext
    from pathlib import Path

    from ..atomic import atomic_write_json
    from ..evaluate import recall_metrics
    from ..scoring import score_split
    from ..sharded import ranks

    # With --eval-test under torchrun the ranks train and then score the split in ONE
    # process group (the trainer uses the group it finds): each rank scores its share of
    # the chunks and rank 0 gets S. Joining a second group after the trainer had left its
    # own could hang.
    with ranks(args.device) if args.eval_test else nullcontext() as group:
        run_dir = train(cfg, resume=args.resume, overwrite=args.overwrite)
        if group is None or group.is_main:
            print(f"run folder: {run_dir} (best.safetensors = best dev rsum; log.jsonl)")
        if not args.eval_test:
            return 0
        stored = json.loads((Path(run_dir) / "config.json").read_text())
        scored = score_split(Path(run_dir) / "best.safetensors", stored["data"], args.eval_test, backend=args.backend,
                             device=group.device, precision=args.precision, progress=not args.quiet, group=group)
    if scored.S is None:
        return 0  # another rank than 0: rank 0 ranks and writes
    m = recall_metrics(scored.S, scored.txt2img)
    m.update(images=int(scored.S.shape[0]), captions=int(scored.S.shape[1]), scoring=scored.info)
    atomic_write_json(Path(run_dir) / f"{args.eval_test}_metrics.json", m, indent=1)
    print(f"{args.eval_test} ({m['images']} images x {m['captions']} captions): "
          f"I2T R@1 {m['i2t']['r1']:.1f} R@5 {m['i2t']['r5']:.1f} R@10 {m['i2t']['r10']:.1f} | "
          f"T2I R@1 {m['t2i']['r1']:.1f} R@5 {m['t2i']['r5']:.1f} R@10 {m['t2i']['r10']:.1f} | rsum {m['rsum']:.1f}")
    return 0


def main_train(argv) -> int:
    """Run ``acf-fast train`` with these arguments in this process (used by ablation)."""
    from ..cli import main

    return main(argv)


def add_train_args(p: argparse.ArgumentParser) -> None:
    """Every option of ``acf-fast train``."""
    p.add_argument("--data", help="SCAN-layout folder with {train,dev}_ims.npy / _caps.txt (see `acf-fast data`)")
    p.add_argument("--out", help="run folder (config.json, log.jsonl, best/last checkpoints); must be empty or new "
                                 "unless --resume or --overwrite")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last finished epoch (its stored config is used; "
                        "--epochs, --device and --backend may change, other options must agree with it)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in a non-empty --out (its config, log and checkpoints; other files stay)")
    p.add_argument("--finetune", action="store_true",
                   help="fine-tune the text encoder in the loop (negatives on its input embeddings); "
                        "default: frozen encoder, cached features")
    p.add_argument("--encoder", default=None, help="local BERT folder (default: the bundled MiniLM)")
    p.add_argument("--dev-images", type=int, default=None, help="validate on the first N dev images only")
    p.add_argument("--train-images", type=int, default=None, help="train on the first N images only")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--eval-test", metavar="SPLIT", default=None,
                   help="after training, evaluate best.safetensors on this split (e.g. test) and write "
                        "RUN/SPLIT_metrics.json")
    add_model_args(p)
    add_score_weight_args(p)
    add_ablation_args(p)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train ACF on a SCAN-layout folder (spec §6)",
        description="Train ACF with the asymmetry-sensitive contrastive loss (spec §6). One epoch = every "
                    "training caption once. Validates on the dev split each epoch; best.safetensors keeps the "
                    "best dev rsum. Multi-GPU: torchrun --nproc_per_node=G -m acf_fast train ...",
    )
    add_train_args(p)
    p.set_defaults(func=run)
