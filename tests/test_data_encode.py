"""Caption-encoding cache: written once, reused, redone when captions or the encoder
change, refused when stale or corrupt. A counting stand-in encoder replaces BERT here
(the real one is exercised in test_text_encoder.py)."""
import pytest
import torch

from acf_fast.data import encode_split, load_encoded
from acf_fast.data.encode import cache_path
from acf_fast.text_encoder import TextEncoder


class CountingEncoder(TextEncoder):
    """Deterministic features from the characters; counts captions encoded."""

    def __init__(self, name="stand-in@1", dim=6):
        self.name, self.dim, self.calls, self.encoded = name, dim, 0, 0

    def encode(self, captions, batch_size=256, max_length=40, progress=True):
        self.calls += 1
        self.encoded += len(captions)
        lengths = [min(max_length, len(c.split()) + 2) for c in captions]
        L = max(lengths)
        H = torch.zeros(len(captions), L, self.dim)
        mask = torch.zeros(len(captions), L, dtype=torch.bool)
        for t, (c, n) in enumerate(zip(captions, lengths)):
            codes = torch.tensor([float(ord(ch)) for ch in (c * (n * self.dim))[: n * self.dim]]) / 100.0
            H[t, :n] = codes.view(n, self.dim)
            mask[t, :n] = True
        return H, mask


@pytest.fixture
def folder(tmp_path):
    caps = ["a dog", "a red car next to a bus", "there is a cat", "a man in blue", "a cup",
            "two", "a photo of a small green kite on a beach", "x", "a table and a chair", "a bird"]
    (tmp_path / "test_caps.txt").write_text("\n".join(caps) + "\n", encoding="utf-8")
    return tmp_path


def test_written_and_loaded(folder):
    enc = CountingEncoder()
    path = encode_split(folder, "test", enc, progress=False)
    assert path == cache_path(folder, "test") and path.is_file()
    words, mask = load_encoded(folder, "test")
    H, m = CountingEncoder().encode((folder / "test_caps.txt").read_text().splitlines())
    assert words.dtype == torch.float32 and mask.dtype == torch.bool
    assert torch.equal(words, H) and torch.equal(mask, m)
    assert not [p for p in folder.iterdir() if ".tmp" in p.name]


def test_reused_then_invalidated(folder):
    enc = CountingEncoder()
    encode_split(folder, "test", enc, progress=False)
    encode_split(folder, "test", enc, progress=False)
    assert enc.calls == 1 and enc.encoded == 10  # the second call reused the cache
    # Captions change -> stale: load refuses, encode redoes.
    p = folder / "test_caps.txt"
    p.write_text(p.read_text().replace("a dog", "a brown dog"))
    with pytest.raises(ValueError, match="stale"):
        load_encoded(folder, "test")
    encode_split(folder, "test", enc, progress=False)
    assert enc.calls == 2
    words, _ = load_encoded(folder, "test")
    H, _ = CountingEncoder().encode(p.read_text().splitlines())
    assert torch.equal(words, H)
    # Another encoder, another max_length, or force -> redone.
    encode_split(folder, "test", CountingEncoder(name="other@2"), progress=False)
    other = CountingEncoder(name="other@2")
    encode_split(folder, "test", other, progress=False)
    assert other.calls == 0
    encode_split(folder, "test", other, max_length=4, progress=False)
    encode_split(folder, "test", other, max_length=4, force=True, progress=False)
    assert other.calls == 2
    assert load_encoded(folder, "test")[1].shape[1] == 4


def test_fp16_storage(folder):
    encode_split(folder, "test", CountingEncoder(), dtype=torch.float16, progress=False)
    words, mask = load_encoded(folder, "test")
    H, _ = CountingEncoder().encode((folder / "test_caps.txt").read_text().splitlines())
    assert words.dtype == torch.float32
    torch.testing.assert_close(words, H.half().float(), atol=0, rtol=0)
    with pytest.raises(ValueError, match="dtype"):
        encode_split(folder, "test", CountingEncoder(), dtype=torch.int8, progress=False)


def test_corrupt_cache(folder):
    enc = CountingEncoder()
    path = encode_split(folder, "test", enc, progress=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 50])
    with pytest.raises(ValueError, match=str(path)):
        load_encoded(folder, "test")
    encode_split(folder, "test", enc, progress=False)  # unreadable cache -> redone
    assert enc.calls == 2
    load_encoded(folder, "test")


def test_missing(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="data encode"):
        load_encoded(folder, "test")
    with pytest.raises(FileNotFoundError, match="dev_caps.txt"):
        encode_split(folder, "dev", CountingEncoder(), progress=False)
