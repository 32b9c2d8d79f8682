"""The text encoder: offline only (sockets blocked while loading and encoding), hub
names refused, features equal to encoding each caption alone, the embeds path."""
import socket

import pytest
import torch

from acf_fast.text_encoder import load_text_encoder

CAPTIONS = [
    "a dog",
    "a small red car next to a large bus on a street",
    "there is a cat",
    "a photo of a man in blue, a green kite and an umbrella on a beach",
    "unaffable zebras",  # rare wordpieces
    "a cup",
    "two",
    "A Dog",  # same wordpieces as "a dog" for an uncased tokenizer: encoded once, copied
]


def _no_network(*args, **kwargs):
    raise OSError("network access attempted during an offline test")


@pytest.fixture(scope="module")
def encoder():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _no_network)
        mp.setattr(socket.socket, "connect_ex", _no_network)
        mp.setattr(socket, "create_connection", _no_network)
        yield load_text_encoder()


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    monkeypatch.setattr(socket, "create_connection", _no_network)


def test_hub_name_refused():
    with pytest.raises(ValueError, match="path='bert-base-uncased'.*hub"):
        load_text_encoder("bert-base-uncased")
    with pytest.raises(ValueError, match="hub"):
        load_text_encoder("sentence-transformers/all-MiniLM-L6-v2")


def test_folder_without_config_refused(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_text_encoder(tmp_path)


def test_offline_encode_shapes_and_masks(encoder, offline):
    H, mask = encoder.encode(CAPTIONS, batch_size=3, progress=False)
    lengths = [len(encoder.tokenizer(c)["input_ids"]) for c in CAPTIONS]
    assert encoder.dim == 384
    assert H.shape == (len(CAPTIONS), max(lengths), 384) and H.dtype == torch.float32
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == lengths
    assert (H[~mask] == 0).all() and (H[mask].abs().sum(-1) > 0).all()
    # Tokens are real wordpieces ([CLS] ... [SEP]), not [UNK]: the tokenizer loaded right.
    ids = encoder.tokenize(CAPTIONS)
    assert ids[0][0] == encoder.tokenizer.cls_token_id and ids[0][-1] == encoder.tokenizer.sep_token_id
    assert encoder.tokenizer.unk_token_id not in ids[1]
    assert torch.equal(H[-1], H[0]) and torch.equal(mask[-1], mask[0])


def test_batched_equals_one_by_one(encoder, offline):
    """Sorting by length and padding inside batches must not change any feature."""
    H, mask = encoder.encode(CAPTIONS, batch_size=4, progress=False)
    for t, c in enumerate(CAPTIONS):
        h1, m1 = encoder.encode([c], progress=False)
        n = int(m1.sum())
        torch.testing.assert_close(H[t, :n], h1[0, :n], atol=2e-5, rtol=1e-4)


def test_max_length_cuts(encoder):
    H, mask = encoder.encode(CAPTIONS, max_length=5, progress=False)
    assert H.shape[1] == 5 and mask.sum(1).max() == 5
    assert all(len(x) <= 5 for x in encoder.tokenize(CAPTIONS, max_length=5))
    with pytest.raises(ValueError, match="list of str"):
        encoder.encode("a single string", progress=False)


def test_from_embeds_equals_encode(encoder):
    ids = encoder.tokenize(CAPTIONS[:2])
    L = max(len(x) for x in ids)
    input_ids = torch.zeros(2, L, dtype=torch.long)
    attn = torch.zeros(2, L, dtype=torch.bool)
    for r, x in enumerate(ids):
        input_ids[r, : len(x)] = torch.tensor(x)
        attn[r, : len(x)] = True
    emb = encoder.input_embeddings(input_ids).clone().requires_grad_(True)
    out = encoder.from_embeds(emb, attn)
    H, mask = encoder.encode(CAPTIONS[:2], progress=False)
    torch.testing.assert_close(out[attn], H[mask], atol=2e-5, rtol=1e-4)
    out[attn].sum().backward()  # differentiable in the embeddings (perturbed negatives)
    assert emb.grad is not None and torch.isfinite(emb.grad).all()


def test_encode_split_with_real_encoder(encoder, offline, tmp_path):
    from acf_fast.data import encode_split, load_encoded

    (tmp_path / "test_caps.txt").write_text("\n".join(CAPTIONS[:5]) + "\n")
    encode_split(tmp_path, "test", encoder, batch_size=2, progress=False)
    words, mask = load_encoded(tmp_path, "test")
    H, m = encoder.encode(CAPTIONS[:5], progress=False)
    assert torch.equal(mask, m)
    torch.testing.assert_close(words, H, atol=2e-5, rtol=1e-4)
