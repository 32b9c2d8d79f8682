"""``acf-fast evaluate``: recall metrics of any model's S, or of a checkpoint on a data split.

    acf-fast evaluate --sims S.npy [--txt2img T.npy] [--protocol coco5k] [--rerank] [--out r.json]
    acf-fast evaluate --data DIR --split test --checkpoint CKPT [--work DIR] [--rerank] [--out r.json]

The ``--data`` path scores in resumable chunks (see :mod:`acf_fast.scoring`): kill it
and run the same command again, it picks up where it stopped.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..evaluate import PROTOCOLS, evaluate_protocol, format_table
from ..rerank import NEIGHBOR_MODES
from ..train.distributed import env_world_size
from . import add_precision_arg


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="R@K / medr / meanr / rsum of a similarity matrix or a checkpoint, plain and ACF-R+ re-ranked",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--sims", type=Path, help="(N images, M captions) float .npy from ANY model (loaded without pickle)")
    src.add_argument("--data", type=Path, help="data folder in the SCAN layout (with encoded captions)")
    p.add_argument("--txt2img", type=Path, help="with --sims: (M,) integer .npy, image of each caption (default t // 5)")
    p.add_argument("--protocol", choices=tuple(PROTOCOLS), default="any",
                   help="coco5k (5000x25000), coco1k (5 folds of 1000x5000, averaged), f30k (1000x5000), "
                        "any (any shape; default)")
    p.add_argument("--split", default="test", help="with --data: the split to score (default test)")
    p.add_argument("--checkpoint", type=Path, help="with --data: model checkpoint (.safetensors from ACF.save)")
    p.add_argument("--backend", default="auto", choices=("auto", "eager", "torch", "triton"),
                   help="acf_similarity backend for --data (default auto: triton on a GPU, torch on a CPU)")
    p.add_argument("--device", default="auto",
                   help="where to score (--data) and rank: cpu, cuda, cuda:N or auto (default: cuda if present)")
    p.add_argument("--work", type=Path,
                   help="with --data: folder for the resumable chunks, one subfolder per checkpoint, data and settings "
                        "(default <checkpoint folder>/eval_<checkpoint name>_<split>); with --stream, for the saved "
                        "progress of the passes (default the same name + _stream)")
    p.add_argument("--chunk-images", type=_positive_int, default=256,
                   help="with --data: images per saved chunk (default 256)")
    p.add_argument("--save-sims", type=Path, help="with --data: also write the scored S to this .npy")
    p.add_argument("--stream", action="store_true",
                   help="with --data: never hold S; score tiles in passes (acf_fast.stream), memory O((N+M) k)")
    p.add_argument("--shortlist", type=_positive_int, metavar="K",
                   help="with --data: two-stage scoring (acf_fast.shortlist): the model's global embeddings rank "
                        "everything, ACF re-scores each image's top K texts and each text's top K images")
    add_precision_arg(p, "with --data, scoring precision")
    p.add_argument("--rerank", action="store_true", help="also re-rank both directions (ACF-R+, spec §5)")
    p.add_argument("--k-i2t", type=_positive_int, default=15, help="k̂ for image-to-text re-ranking (default 15)")
    p.add_argument("--k-t2i", type=_positive_int, default=20, help="k̂ for text-to-image re-ranking (default 20)")
    p.add_argument("--kprime", type=_positive_int, default=5, help="k', neighbours per text incl. itself (default 5)")
    p.add_argument("--n", type=_positive_int, default=None,
                   help="cap n̂ of the reverse positions (default: full ranking, as the authors)")
    p.add_argument("--neighbors", choices=NEIGHBOR_MODES, default=None,
                   help="text neighbours for T2I re-ranking: embedding (model's text vectors; default with --data), "
                        "profile (columns of S; default with --sims), siblings (ground-truth captions: ORACLE)")
    p.add_argument("--out", type=Path, help="write the results as JSON (atomic)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def load_sims(path: Path) -> np.ndarray:
    """A 2-D float .npy, never unpickled. ValueError naming the file otherwise."""
    from ..data.checks import load_npy

    arr = load_npy(path, "--sims", kind="f", what="the scores")
    if arr.ndim != 2:
        raise ValueError(f"--sims {path}: expected a 2-D (images, captions) array, got shape {arr.shape}")
    return arr


def load_txt2img(path: Path, M: int) -> np.ndarray:
    """A (M,) integer .npy of the image of each caption. ValueError naming the file otherwise."""
    from ..data.checks import load_npy

    arr = load_npy(path, "--txt2img", kind="iu", what="the caption -> image map")
    if arr.ndim != 1:
        raise ValueError(f"--txt2img {path}: expected a 1-D integer array, got shape {arr.shape}")
    if arr.shape[0] != M:
        raise ValueError(f"--txt2img {path}: has {arr.shape[0]} entries but --sims has {M} captions (columns)")
    return arr.astype(np.int64)


def run(args) -> int:
    from ..paths import check_outputs

    opts = dict(rerank=args.rerank, k_i2t=args.k_i2t, k_t2i=args.k_t2i, kprime=args.kprime, n=args.n,
                neighbors=args.neighbors)
    record = {"command": "evaluate"}
    if args.sims is not None:
        for flag in ("checkpoint", "work", "save_sims", "stream", "shortlist"):
            if getattr(args, flag) not in (None, False):
                raise ValueError(f"--{flag.replace('_', '-')} goes with --data, not --sims")
        from ..machine import resolve_device
        from ..ranking import check_scores
        from ..validate import check_txt2img

        check_outputs({"--out": args.out}, inputs={"--sims": args.sims, "--txt2img": args.txt2img})
        S = check_scores(load_sims(args.sims), name=f"--sims {args.sims}")
        txt2img = None if args.txt2img is None else load_txt2img(args.txt2img, S.shape[1])
        txt2img = check_txt2img(txt2img, *S.shape, name="--txt2img" + ("" if txt2img is None else f" {args.txt2img}"))
        try:
            result = evaluate_protocol(S.to(resolve_device(args.device)), args.protocol, txt2img, **opts)
        except ValueError as err:  # S does not fit the protocol
            raise ValueError(f"--sims {args.sims}: {err}") from None
        record["source"] = {"sims": str(args.sims), "txt2img": None if args.txt2img is None else str(args.txt2img)}
    else:
        if args.checkpoint is None:
            raise ValueError("--data needs --checkpoint (the model that scores the split)")
        if args.txt2img is not None:
            raise ValueError("--txt2img goes with --sims; with --data the split's captions define it")
        if args.stream and args.save_sims is not None:
            raise ValueError("--save-sims cannot go with --stream: a streaming evaluation never holds S")
        for flag in ("stream", "shortlist"):
            if getattr(args, flag) not in (None, False) and env_world_size() > 1:
                raise ValueError(f"--{flag} runs in one process: under torchrun drop --{flag} (the ranks then share "
                                 f"the scoring and rank 0 holds S), or run it alone")
        if args.shortlist is not None and args.work is not None:
            # --work is the full grid's resumable chunk cache: the shortlist would leave it unused
            raise ValueError("--work goes with the full grid's resumable chunks; --shortlist scores its pairs in one "
                             "pass and keeps no chunks: drop --work (or --shortlist)")
        if args.shortlist is not None and args.stream:
            raise ValueError("--stream and --shortlist do not go together: the shortlist builds one (N, M) S")
        from ..atomic import atomic_save_npy
        from ..paths import require_file, require_folder
        from ..scoring import score_split

        data_files = [p for p in require_folder(args.data, "--data").iterdir() if p.is_file()]
        check_outputs({"--out": args.out, "--save-sims": args.save_sims},
                      inputs={"--checkpoint": require_file(args.checkpoint, "--checkpoint"), "--data": data_files})
        if args.stream:  # the model is the block scorer: S is never held (acf_fast.stream)
            from ..stream import stream_split

            result, info = stream_split(args.checkpoint, args.data, args.split, args.protocol, backend=args.backend,
                                        device=args.device, precision=args.precision, chunk_images=args.chunk_images,
                                        progress=not args.quiet, work=args.work, **opts)
        else:
            if args.shortlist is not None:
                from ..shortlist import shortlist_split

                scored = shortlist_split(args.checkpoint, args.data, args.split, k=args.shortlist, backend=args.backend,
                                         device=args.device, precision=args.precision, chunk_images=args.chunk_images,
                                         progress=not args.quiet)
                record["shortlist"] = args.shortlist
            else:
                from ..sharded import ranks

                with ranks(args.device) as group:  # under torchrun: this rank's share of the chunks, S on rank 0
                    scored = score_split(args.checkpoint, args.data, args.split, work=args.work, backend=args.backend,
                                         device=group.device, precision=args.precision,
                                         chunk_images=args.chunk_images, progress=not args.quiet, group=group)
                if scored.S is None:
                    return 0  # another rank than 0: rank 0 ranks, re-ranks and writes
            if args.save_sims is not None:
                atomic_save_npy(args.save_sims, scored.S.numpy())
            result = evaluate_protocol(scored.S, args.protocol, scored.txt2img, text_vectors=scored.text_vectors,
                                       **opts)
            info = scored.info
        record["source"] = {"data": str(args.data), "split": args.split, "checkpoint": str(args.checkpoint),
                            "backend": args.backend, "precision": args.precision}
        record["scoring"] = info
    record.update(result)
    print(format_table(result))
    if args.out is not None:
        from ..atomic import atomic_write_json

        atomic_write_json(args.out, record)
        print(f"wrote {args.out}")
    return 0
