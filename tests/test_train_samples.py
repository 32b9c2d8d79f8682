"""Negatives (token-embedding noise) and positives (raw-text rewrites) of spec §6."""
import numpy as np
import pytest
import torch

from acf_fast.train.negatives import NEGATIVE_KINDS, make_negatives, perturbable_mask
from acf_fast.train.positives import build_positive_texts, long_partners, short_positive


def ragged(B=6, L=9, D=5, seed=0, left=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, D, generator=g, dtype=torch.float64) + 3.0  # no exact zeros
    lengths = [L, 2, 3, 5, 1, 7][:B]
    mask = torch.zeros(B, L, dtype=torch.bool)
    for b, n in enumerate(lengths):
        if left:
            mask[b, L - n:] = True
        else:
            mask[b, :n] = True
    return x, mask


def inner_loop(mask):
    """Valid positions minus the first and last valid one, by a plain loop."""
    out = torch.zeros_like(mask)
    for b in range(mask.shape[0]):
        pos = [i for i in range(mask.shape[1]) if mask[b, i]]
        for i in pos[1:-1]:
            out[b, i] = True
    return out


@pytest.mark.parametrize("left", [False, True])
def test_perturbable_mask(left):
    _, mask = ragged(left=left)
    assert torch.equal(perturbable_mask(mask), inner_loop(mask))


@pytest.mark.parametrize("kind", NEGATIVE_KINDS)
@pytest.mark.parametrize("left", [False, True])
def test_only_valid_non_special_tokens_change(kind, left):
    x, mask = ragged(left=left)
    inner = inner_loop(mask)
    y = make_negatives(x, mask, kind, torch.Generator().manual_seed(1))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y[~inner], x[~inner])  # [CLS], [SEP], padding untouched
    # Same seed, same result; another seed, another one.
    y2 = make_negatives(x, mask, kind, torch.Generator().manual_seed(1))
    assert torch.equal(y, y2)
    y3 = make_negatives(x, mask, kind, torch.Generator().manual_seed(2))
    assert not torch.equal(y[inner], y3[inner])


def test_each_kind_does_what_it_says():
    x, mask = ragged()
    inner = inner_loop(mask)
    gen = lambda: torch.Generator().manual_seed(5)
    # gaussian: small additive change on every inner element
    d = make_negatives(x, mask, "gaussian", gen()) - x
    assert torch.all(d[inner].abs() > 0) and 0.05 < float(d[inner].std()) < 0.2
    # shuffle: each row's inner token rows are a permutation of the originals
    y = make_negatives(x, mask, "shuffle", gen())
    for b in range(x.shape[0]):
        a = sorted(map(tuple, x[b][inner[b]].tolist()))
        c = sorted(map(tuple, y[b][inner[b]].tolist()))
        assert a == c
    assert not torch.equal(y, x)
    # token cutoff: exactly one inner row zeroed where a row has inner tokens
    y = make_negatives(x, mask, "token_cutoff", gen())
    for b in range(x.shape[0]):
        zero_rows = (y[b] == 0).all(1)
        assert int(zero_rows.sum()) == (1 if inner[b].any() else 0)
        assert not (zero_rows & ~inner[b]).any()
    # feature cutoff: exactly one column zeroed on the inner rows, nothing else changed
    y = make_negatives(x, mask, "feature_cutoff", gen())
    for b in range(x.shape[0]):
        if inner[b].any():
            cols = (y[b][inner[b]] == 0).all(0)
            assert int(cols.sum()) == 1
            assert int((y[b] != x[b]).sum()) == int(inner[b].sum())
    # dropout: elements are either zero or scaled by 1/(1-p)
    y = make_negatives(x, mask, "dropout", gen())
    yi, xi = y[inner], x[inner]
    dropped = yi == 0
    assert dropped.any()
    torch.testing.assert_close(yi[~dropped], xi[~dropped] / 0.9)


def test_mixture_rows_follow_one_family():
    x, mask = ragged(B=6)
    x = x.repeat(4, 1, 1)
    mask = mask.repeat(4, 1)
    inner = inner_loop(mask)
    y = make_negatives(x, mask, "mixture", torch.Generator().manual_seed(0))
    seen = set()
    for b in range(x.shape[0]):
        if not inner[b].any():
            continue
        d = (y[b] - x[b])[inner[b]]
        zeros = (y[b][inner[b]] == 0)
        if zeros.all(1).any() or zeros.all(0).any():
            seen.add("cutoff")
        elif zeros.any():
            seen.add("dropout")
        elif torch.all(d.abs() > 0) and float(d.abs().max()) < 1.0:
            seen.add("gaussian")
        else:
            seen.add("shuffle")
    assert len(seen) >= 3


def test_negatives_keep_gradient():
    x, mask = ragged()
    x = x.requires_grad_(True)
    make_negatives(x, mask, "mixture", torch.Generator().manual_seed(0)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_negatives_reject_bad_input():
    x, mask = ragged()
    with pytest.raises(ValueError, match="kind"):
        make_negatives(x, mask, "blur", torch.Generator())
    with pytest.raises(ValueError, match="mask"):
        make_negatives(x, mask[:, :3], "gaussian", torch.Generator())


def test_positives():
    assert short_positive("a man riding a brown horse") == "a man riding"
    assert short_positive("dog") == "dog"
    t2i = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])
    caps = [f"c{i} w{i}" for i in range(len(t2i))]
    p = long_partners(t2i, seed=0)
    for t, q in enumerate(p):
        assert t2i[q] == t2i[t]
        assert (q != t) or (t2i == t2i[t]).sum() == 1
    assert np.array_equal(p, long_partners(t2i, seed=0))
    texts = build_positive_texts(caps, t2i, seed=0)
    assert texts["long"][0] == f"{caps[0]} {caps[p[0]]}"
    assert texts["short"][3] == "c3"
    with pytest.raises(ValueError, match="same length"):
        build_positive_texts(caps, t2i[:3], seed=0)
