"""The ACF model (spec §1, §3): per-item encoders plus the fusion weights.

    model = ACF("paper")
    V, G = model.encode_images(regions, region_mask, globals)   # (N, K, D), (N, D)
    W = model.encode_texts(words, word_mask)                    # (M, L, D)
    S = model.score(V, region_mask, G, W, word_mask)            # (N, M)

Encoders: ``V = l2norm(F Wr + br)``, ``G = l2norm(g Wgl + bgl)`` (``region_fc``,
``global_fc``); words ``P = Hb Wt + bt`` (``project_texts``, ``text_fc``) then
``W = l2norm(P)`` in the paper variant and ``W = P`` in acf-code (``finish_texts``;
spec §1: the authors' words are unnormalised, ‖w‖ ≈ 10, which makes their smooth 4 / 9
attention sharp). Training perturbs P between the two steps (spec §6 negatives).
The paper variant owns z_x z_y z_o x_w x_v x_g (D, D) and gate (D,) under exactly
those names and hands them to :func:`acf_fast.acf_similarity` as ``weights``; the
acf-code variant owns none (identity projections, embeddings global score).

**[choice] acf-code global score.** The authors' ``encode_data`` builds each item's
global vector from attention with its OWN ground-truth partner, so their global scores
see the labels. We never do that: the acf-code variant uses ``global_emb = (G,
text_vectors(W))``, the encoded global image feature against the l2-normalised mean of
the text's valid word features, both label-free.

**Without cross-modal fusion** (``cmf=False``, the "w/o CMF" ablation of spec §6): the
paper variant's S_global becomes the partner-free cosine ``R(G, l2norm(mean_j w_j))``
[spec choice], the same ``global_emb`` path, so no attended feature enters the global
score; x_w, x_v, x_g and gate do not exist then. The local score keeps its attention.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from .notation import l2norm, masked_mean
from .similarity import VARIANTS, acf_similarity
from .validate import MATRIX_WEIGHTS

CONFIG_KEY = "acf_config"
FORMAT_KEY = "acf_format"
FORMAT = "acf-fast/1"
# Word normalisation per variant (spec §1): "l2" = l2norm(Hb Wt + bt), "none" = unnormalised.
WORD_NORMS = ("l2", "none")
DEFAULT_WORD_NORM = {"paper": "l2", "acf-code": "none"}
# Std of the noise added to the identity init of the fusion matrices (times 1/sqrt(D)).
FUSION_INIT_NOISE = 0.02


class ACF(nn.Module):
    """ACF / ACF-R+ image-text model.

    Args:
        variant: "paper" (learned z_x z_y z_o, scale 1/sqrt(d), pairwise global) or
            "acf-code" (identity projections, scales 4 / 9, embeddings global).
        embed_dim: D. heads: H (D % H == 0).
        region_dim: Dv of raw region features. global_dim: Dg of raw global features.
        text_dim: Db of the text encoder's features (384 for MiniLM).
        u1, u2: override the variant's local / global weights (spec eqs. 13, 15), in [0, 1].
        cmf: False removes the cross-modal fusion from the paper variant's global score
            (the "w/o CMF" ablation, see the module docstring). acf-code has no fusion
            to remove (its global score is already partner-free), so False is refused.
        word_norm: "l2" or "none"; None = the variant's (paper "l2", acf-code "none").
    """

    def __init__(self, variant: str = "paper", embed_dim: int = 1024, heads: int = 8, region_dim: int = 2048,
                 global_dim: int = 2048, text_dim: int = 384, u1: Optional[float] = None, u2: Optional[float] = None,
                 cmf: bool = True, word_norm: Optional[str] = None):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
        for name, v in (("embed_dim", embed_dim), ("heads", heads), ("region_dim", region_dim),
                        ("global_dim", global_dim), ("text_dim", text_dim)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if embed_dim % heads:
            raise ValueError(f"embed_dim = {embed_dim} is not divisible by heads = {heads}")
        spec = VARIANTS[variant]
        self.variant = spec
        self.u1 = float(spec.u1 if u1 is None else u1)
        self.u2 = float(spec.u2 if u2 is None else u2)
        for name, u in (("u1", self.u1), ("u2", self.u2)):
            if not 0.0 <= u <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {u}")
        if not isinstance(cmf, bool):
            raise ValueError(f"cmf must be a bool, got {cmf!r}")
        if not cmf and spec.global_mode != "pairwise":
            raise ValueError(f"cmf=False: the {variant} variant has no cross-modal fusion to remove (its global "
                             "score is already the partner-free G · l2norm(mean w)); use the paper variant")
        word_norm = DEFAULT_WORD_NORM[variant] if word_norm is None else word_norm
        if word_norm not in WORD_NORMS:
            raise ValueError(f"word_norm must be one of {WORD_NORMS} or None, got {word_norm!r}")
        self.cmf = cmf
        self.word_norm = word_norm
        self.heads = heads
        self.scale = spec.scale  # None -> 1/sqrt(d), resolved by acf_similarity
        self.config = dict(variant=variant, embed_dim=embed_dim, heads=heads, region_dim=region_dim,
                           global_dim=global_dim, text_dim=text_dim, u1=self.u1, u2=self.u2, cmf=cmf,
                           word_norm=word_norm)
        D = embed_dim
        self.region_fc = nn.Linear(region_dim, D)
        self.global_fc = nn.Linear(global_dim, D)
        self.text_fc = nn.Linear(text_dim, D)
        for name in self.fusion_names:
            shape = (D,) if name == "gate" else (D, D)
            self.register_parameter(name, nn.Parameter(torch.empty(shape)))
        self.reset_parameters()

    @property
    def fusion_names(self) -> Tuple[str, ...]:
        """The ``weights`` this model owns: all seven (paper), z_x z_y z_o (paper
        without CMF: the local attention keeps its projections), none (acf-code)."""
        if not self.variant.learned_projections:
            return ()
        return MATRIX_WEIGHTS + ("gate",) if self.cmf else MATRIX_WEIGHTS[:3]

    @property
    def pairwise_global(self) -> bool:
        """True when S_global is the paper's fused pairwise score (spec §3)."""
        return self.variant.global_mode == "pairwise" and self.cmf

    def reset_parameters(self) -> None:
        """Xavier-uniform linears with zero bias (as SCAN); fusion matrices identity plus
        small noise, gate 0.

        Identity start: with z = I the attention is the acf-code one (at the paper's
        scale), so an untrained paper model begins as a working cross-attention instead
        of a random projection of it, and the noise breaks the symmetry between heads
        so each can drift its own way. The gate 0 gives σ = 0.5, an even mix.
        """
        for fc in (self.region_fc, self.global_fc, self.text_fc):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        D = self.config["embed_dim"]
        with torch.no_grad():
            for name in self.fusion_names:
                w = getattr(self, name)
                if name == "gate":
                    w.zero_()
                else:
                    w.copy_(torch.eye(D) + torch.randn(D, D) * (FUSION_INIT_NOISE / D ** 0.5))

    # ------------------------------------------------------------------ encoders
    def _as_input(self, x, name: str, ndim: int, width: int) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            try:
                x = torch.as_tensor(x)
            except Exception:
                raise ValueError(f"{name} must be a tensor or array, got {type(x).__name__}") from None
        if x.dim() != ndim or x.shape[-1] != width:
            raise ValueError(f"{name} must be {ndim}-D with last dim {width}, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a float tensor, got {x.dtype}")
        p = self.region_fc.weight
        return x.to(device=p.device, dtype=p.dtype)

    def _as_mask(self, mask, name: str, shape) -> Optional[torch.Tensor]:
        if mask is None:
            return None
        mask = torch.as_tensor(mask)
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(shape):
            raise ValueError(f"{name} must be a bool tensor of shape {tuple(shape)}, got {mask.dtype} {tuple(mask.shape)}")
        return mask.to(self.region_fc.weight.device)

    def encode_images(self, regions, region_mask=None, globals=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Raw image features -> (V (N, K, D), G (N, D)), rows l2-normalised.

        Args:
            regions: (N, K, Dv) float. region_mask: (N, K) bool or None (all valid).
            globals: (N, Dg) float, or None: then g = mean of the valid raw regions
                (spec §1 [choice]; needs Dg == Dv).
        Invalid region rows of V are set to zero (scores ignore them through the mask).
        """
        F = self._as_input(regions, "regions", 3, self.config["region_dim"])
        mask = self._as_mask(region_mask, "region_mask", F.shape[:2])
        V = l2norm(self.region_fc(F))
        if mask is not None:
            V = V * mask[..., None].to(V.dtype)
        if globals is None:
            if self.config["global_dim"] != self.config["region_dim"]:
                raise ValueError(
                    f"globals is None, so the global feature would be the mean region, but global_dim = "
                    f"{self.config['global_dim']} differs from region_dim = {self.config['region_dim']}"
                )
            g = masked_mean(F, mask)
        else:
            g = self._as_input(globals, "globals", 2, self.config["global_dim"])
            if g.shape[0] != F.shape[0]:
                raise ValueError(f"globals has {g.shape[0]} rows but regions has {F.shape[0]} images")
        G = l2norm(self.global_fc(g))
        return V, G

    def project_texts(self, words) -> torch.Tensor:
        """Word features Hb (M, L, Db) float -> P = Hb Wt + bt (M, L, D), before any
        normalisation: where the cached-path negatives act (spec §6)."""
        return self.text_fc(self._as_input(words, "words", 3, self.config["text_dim"]))

    def finish_texts(self, P: torch.Tensor, word_mask) -> torch.Tensor:
        """Projected words P (M, L, D), word_mask (M, L) bool or None -> W (M, L, D):
        rows l2-normalised (word_norm "l2") or as they are ("none"); invalid rows zero."""
        mask = self._as_mask(word_mask, "word_mask", P.shape[:2])
        W = l2norm(P) if self.word_norm == "l2" else P
        if mask is not None:
            W = W * mask[..., None].to(W.dtype)
        return W

    def encode_texts(self, words, word_mask) -> torch.Tensor:
        """Word features Hb (M, L, Db) float, word_mask (M, L) bool -> W (M, L, D)
        (``finish_texts(project_texts(words))``), invalid rows zero."""
        return self.finish_texts(self.project_texts(words), word_mask)

    def text_vectors(self, W: torch.Tensor, word_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """(M, D): l2norm of the mean of W's valid rows (acf-code Gt; re-ranker neighbours)."""
        return l2norm(masked_mean(W, word_mask))

    def fusion_weights(self) -> Dict[str, torch.Tensor]:
        """The ``weights`` mapping for :func:`acf_similarity` (empty for acf-code)."""
        return {name: getattr(self, name) for name in self.fusion_names}

    def similarity_args(self, G, W, w_mask) -> dict:
        """The keyword arguments of :func:`acf_similarity` (and ``acf_similarity_pairs``)
        for encoded items, by the variant's settings (spec §3), backend aside."""
        kwargs = dict(heads=self.heads, scale=self.scale, u1=self.u1, u2=self.u2, weights=self.fusion_weights())
        if self.pairwise_global:
            return dict(kwargs, G=G)
        # acf-code [choice] label-free embeddings global score, or the paper variant
        # without CMF: both are the partner-free G · l2norm(mean w), see the module docstring.
        return dict(kwargs, global_emb=(G, self.text_vectors(W, w_mask)))

    def score(self, V, v_mask, G, W, w_mask, backend: str = "auto") -> torch.Tensor:
        """S (N, M) float32 for encoded items, by the variant's settings (spec §3)."""
        return acf_similarity(V, v_mask, W, w_mask, backend=backend, **self.similarity_args(G, W, w_mask))

    def score_pairs(self, V, v_mask, G, W, w_mask, pairs, backend: str = "auto") -> torch.Tensor:
        """(P,) float32: the entries ``score(...)[pairs[:, 0], pairs[:, 1]]`` of a (P, 2) int64
        list of (image, text) indices, scoring only those pairs (``acf_similarity_pairs``)."""
        from .pairs import acf_similarity_pairs

        return acf_similarity_pairs(V, v_mask, W, w_mask, pairs, backend=backend, **self.similarity_args(G, W, w_mask))

    def forward(self, regions, region_mask, globals, words, word_mask, backend: str = "auto") -> torch.Tensor:
        """Raw features in, S (N, M) out: encode both sides, then :meth:`score`."""
        V, G = self.encode_images(regions, region_mask, globals)
        W = self.encode_texts(words, word_mask)
        return self.score(V, region_mask, G, W, word_mask, backend=backend)

    # ---------------------------------------------------------------- checkpoints
    def save(self, path, metadata: Optional[Mapping[str, str]] = None) -> Path:
        """Write the state dict as safetensors with the config (JSON) in its metadata.

        Atomic: written to a temp file in the same folder, then renamed over ``path``.
        ``metadata``: extra str -> str entries (e.g. epoch, score) kept alongside.
        """
        from safetensors.torch import save_file

        from .atomic import atomic_path

        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        meta.update({CONFIG_KEY: json.dumps(self.config, sort_keys=True), FORMAT_KEY: FORMAT, "format": "pt"})
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        path = Path(path)
        with atomic_path(path) as tmp:
            save_file(state, str(tmp), metadata=meta)
        return path

    @staticmethod
    def read_metadata(path) -> Dict[str, str]:
        """The safetensors metadata of a checkpoint; ValueError naming the file if unreadable."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
        except Exception as err:
            raise ValueError(f"{path}: corrupt or truncated checkpoint ({err})") from None
        if CONFIG_KEY not in meta:
            raise ValueError(f"{path}: not an acf-fast checkpoint (no {CONFIG_KEY!r} in its metadata)")
        return meta

    @classmethod
    def load(cls, path, map_location="cpu", expect: Optional[Mapping] = None) -> "ACF":
        """Rebuild a model saved by :meth:`save`.

        Args:
            expect: optional config entries the checkpoint must have (e.g.
                ``{"variant": "paper", "text_dim": 384}``); a difference is an error.

        Raises:
            ValueError naming the file: corrupt/truncated file, bad config, tensors that
            do not match the config (names, shapes, or a dtype that is not floating
            point: checked from the file's header before the model is built), or a
            mismatch with ``expect``.
        """
        from safetensors.torch import load_file

        path = Path(path)
        meta = cls.read_metadata(path)
        try:
            config = json.loads(meta[CONFIG_KEY])
            if not isinstance(config, dict):
                raise TypeError("config is not an object")
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: unreadable model config in metadata ({err})") from None
        # Checkpoints written before word_norm existed l2-normalised the words in both variants.
        config.setdefault("word_norm", "l2")
        for k, v in (expect or {}).items():
            if config.get(k) != v:
                raise ValueError(f"{path}: config {k} = {config.get(k)!r} but {v!r} was expected")
        try:
            with torch.device("meta"):  # shapes only: a lying config allocates nothing
                skeleton = cls(**config)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: config {config} does not fit ACF ({err})") from None
        check_tensors_fit(path, config, {k: tuple(v.shape) for k, v in skeleton.state_dict().items()})
        model = cls(**config)
        try:
            state = load_file(str(path), device=str(map_location))
        except Exception as err:
            raise ValueError(f"{path}: corrupt or truncated checkpoint ({err})") from None
        for k, t in state.items():
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{path}: tensor {k} contains NaN or Inf")
        model.load_state_dict(state)
        return model.to(map_location)


# safetensors dtype codes of floating-point tensors (what weights may be stored as).
FLOAT_CODES = ("F16", "BF16", "F32", "F64")


def check_tensors_fit(path, config: dict, want: Mapping[str, tuple]) -> None:
    """ValueError naming ``path`` unless its tensors are exactly ``want`` {name: shape},
    each floating point. Reads only the safetensors header."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            have = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as err:
        raise ValueError(f"{path}: corrupt or truncated checkpoint ({err})") from None
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        raise ValueError(f"{path}: tensors do not match config {config}: missing {missing}, unexpected {extra}")
    for k, (shape, code) in sorted(have.items()):
        if shape != tuple(want[k]):
            raise ValueError(f"{path}: tensor {k} has shape {shape}, config {config} needs {tuple(want[k])}")
        if code not in FLOAT_CODES:
            raise ValueError(f"{path}: tensor {k} has dtype {code.lower()} (safetensors {code}); weights must be "
                             "floating point (float16, bfloat16, float32 or float64)")
