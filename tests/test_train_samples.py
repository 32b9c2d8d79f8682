"""Negatives (token-embedding noise) and positives (raw-text rewrites) of spec §6."""
import numpy as np
import pytest
import torch

from acf_fast.text_encoder import shuffle_wordpieces
from acf_fast.train.negatives import NEGATIVE_KINDS, make_negatives, perturbable_mask, uses_shuffle
from acf_fast.train.positives import LongPairs, long_positive, short_positive

LOCAL_KINDS = [k for k in NEGATIVE_KINDS if not uses_shuffle(k)]


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


@pytest.mark.parametrize("kind", LOCAL_KINDS)
@pytest.mark.parametrize("left", [False, True])
def test_only_valid_non_special_tokens_change(kind, left):
    x, mask = ragged(left=left)
    inner = inner_loop(mask)
    y, changed = make_negatives(x, mask, kind, torch.Generator().manual_seed(1))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y[~inner], x[~inner])  # [CLS], [SEP], padding untouched
    # changed: exactly the rows that differ (a row without inner tokens cannot).
    assert torch.equal(changed, torch.tensor([not torch.equal(y[b], x[b]) for b in range(x.shape[0])]))
    assert not changed[~inner.any(1)].any()
    # Same seed, same result; another seed, another one.
    y2, _ = make_negatives(x, mask, kind, torch.Generator().manual_seed(1))
    assert torch.equal(y, y2)
    y3, _ = make_negatives(x, mask, kind, torch.Generator().manual_seed(2))
    assert not torch.equal(y[inner], y3[inner])


def test_shuffle_takes_the_texts_shuffled_before_the_encoder():
    x, mask = ragged()
    shuffled = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(3))
    flags = torch.tensor([True, False, True, True, False, True])
    y, changed = make_negatives(x, mask, "shuffle", torch.Generator(), shuffled=shuffled, shuffled_changed=flags)
    assert torch.equal(y, shuffled) and torch.equal(changed, flags)
    # Shuffling rows of encoded features is a no-op for ACF: refused, not done.
    for kind in ("shuffle", "mixture"):
        with pytest.raises(ValueError, match="BEFORE the encoder"):
            make_negatives(x, mask, kind, torch.Generator())
    with pytest.raises(ValueError, match="shuffled"):
        make_negatives(x, mask, "shuffle", torch.Generator(), shuffled=shuffled[:, :3])


def test_each_kind_does_what_it_says():
    x, mask = ragged()
    inner = inner_loop(mask)
    gen = lambda: torch.Generator().manual_seed(5)
    # gaussian: small additive change on every inner element
    d = make_negatives(x, mask, "gaussian", gen())[0] - x
    assert torch.all(d[inner].abs() > 0) and 0.05 < float(d[inner].std()) < 0.2
    # token cutoff: exactly one inner row zeroed where a row has inner tokens
    y, _ = make_negatives(x, mask, "token_cutoff", gen())
    for b in range(x.shape[0]):
        zero_rows = (y[b] == 0).all(1)
        assert int(zero_rows.sum()) == (1 if inner[b].any() else 0)
        assert not (zero_rows & ~inner[b]).any()
    # feature cutoff: exactly one column zeroed on the inner rows, nothing else changed
    y, _ = make_negatives(x, mask, "feature_cutoff", gen())
    for b in range(x.shape[0]):
        if inner[b].any():
            cols = (y[b][inner[b]] == 0).all(0)
            assert int(cols.sum()) == 1
            assert int((y[b] != x[b]).sum()) == int(inner[b].sum())
    # dropout: elements are either zero or scaled by 1/(1-p)
    y, _ = make_negatives(x, mask, "dropout", gen())
    yi, xi = y[inner], x[inner]
    dropped = yi == 0
    assert dropped.any()
    torch.testing.assert_close(yi[~dropped], xi[~dropped] / 0.9)


def test_mixture_rows_follow_one_family():
    x, mask = ragged(B=6)
    x = x.repeat(4, 1, 1)
    mask = mask.repeat(4, 1)
    inner = inner_loop(mask)
    shuffled = -x  # stands in for the encoded shuffles: recognisable, never equal to x
    flags = torch.arange(x.shape[0]) % 3 != 0
    y, changed = make_negatives(x, mask, "mixture", torch.Generator().manual_seed(0), shuffled=shuffled,
                                shuffled_changed=flags)
    seen = set()
    for b in range(x.shape[0]):
        if torch.equal(y[b], shuffled[b]):
            seen.add("shuffle")
            assert bool(changed[b]) == bool(flags[b])
            continue
        assert torch.equal(y[b][~inner[b]], x[b][~inner[b]])
        assert bool(changed[b]) == (not torch.equal(y[b], x[b]))
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
    assert seen == {"shuffle", "cutoff", "dropout", "gaussian"}


def test_negatives_keep_gradient():
    x, mask = ragged()
    x = x.requires_grad_(True)
    shuffled = x.detach().flip(1).requires_grad_(True)
    y, _ = make_negatives(x, mask, "mixture", torch.Generator().manual_seed(0), shuffled=shuffled)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and shuffled.grad is not None


def test_negatives_reject_bad_input():
    x, mask = ragged()
    with pytest.raises(ValueError, match="kind"):
        make_negatives(x, mask, "blur", torch.Generator())
    with pytest.raises(ValueError, match="mask"):
        make_negatives(x, mask[:, :3], "gaussian", torch.Generator())


def test_short_positive():
    assert short_positive("a man riding a brown horse") == "a man riding"
    assert short_positive("dog") == "dog"
    assert long_positive("a dog ", " on grass") == "a dog on grass"


def test_long_pairs_cover_every_partner_and_draw_uniformly():
    t2i = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])
    caps = [f"c{i} w{i}" for i in range(len(t2i))]
    lp = LongPairs.build(t2i)
    for t in range(len(t2i)):
        rows = lp.pairs[lp.start[t]: lp.start[t] + lp.count[t]]
        assert (rows[:, 0] == t).all()
        others = [p for p in range(len(t2i)) if t2i[p] == t2i[t] and p != t]
        assert rows[:, 1].tolist() == (others or [t])  # every partner once; alone -> itself
    assert len(lp.pairs) == 2 * 3 + 2 * 1 + 1 + 4 * 3
    texts = lp.texts(caps)
    assert texts[lp.start[7]] == f"{caps[7]} {caps[6]}"
    # Redrawn per access: caption 6's draws hit each of its 3 partners about equally.
    gen = torch.Generator().manual_seed(0)
    drawn = np.concatenate([lp.draw(np.array([6] * 10), gen) for _ in range(60)])
    counts = np.bincount(lp.pairs[drawn, 1], minlength=10)[[7, 8, 9]]
    assert counts.sum() == 600 and counts.min() > 150
    again = lp.draw(np.array([6, 0, 5]), torch.Generator().manual_seed(4))
    assert np.array_equal(again, lp.draw(np.array([6, 0, 5]), torch.Generator().manual_seed(4)))
    assert lp.pairs[again[2], 1] == 5  # image 2 has one caption


def test_shuffle_wordpieces_changes_the_text_whenever_it_can():
    gen = torch.Generator().manual_seed(0)
    for n in range(2, 7):
        ids = [101] + list(range(1000, 1000 + n)) + [102]
        for _ in range(20):
            out, changed = shuffle_wordpieces(ids, gen)
            assert changed and out != ids and out[0] == 101 and out[-1] == 102
            assert sorted(out[1:-1]) == sorted(ids[1:-1])
    for ids in ([101, 102], [101, 7, 102], [101, 7, 7, 7, 102]):
        assert shuffle_wordpieces(ids, gen) == (ids, False)
    assert shuffle_wordpieces([101, 7, 7, 8, 102], gen)[1]
