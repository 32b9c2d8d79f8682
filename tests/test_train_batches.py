"""Training batches on real encoder output (a tiny random BERT, see test_train_trainer):
cached shuffled texts, positives redrawn per access, and where the negatives act.

Issue 12: shuffling rows of cached features left every score unchanged (max |Sn − Sa|
= 1.5e-8: ACF has no positional term after the encoder), so "shuffle" negatives were
the caption itself; cached negatives acted on Hb instead of the projected features."""
import numpy as np
import pytest
import torch

from acf_fast.data.encode import cache_path, load_encoded
from acf_fast.model import ACF
from acf_fast.train.batches import TrainData
from acf_fast.train.config import TrainConfig
from acf_fast.train.objective import Objective
from test_train_trainer import make_tiny_data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("tiny_batches"), train_images=8, dev_images=2)


def _encoder(bert):
    from acf_fast.text_encoder import load_text_encoder

    return load_text_encoder(bert)


def _data(tiny, **kw):
    data, bert = tiny
    cfg = TrainConfig(data=str(data), out="unused", encoder=bert, batch_size=8, progress=False, **kw).validate()
    enc = []
    return TrainData(cfg, lambda: enc[0] if enc else enc.append(_encoder(bert)) or enc[0], lambda msg: None)


def test_shuffled_caption_cache_is_the_encoder_on_shuffled_wordpieces(tiny):
    from safetensors.torch import load_file

    data, bert = tiny
    d = _data(tiny, negatives="shuffle", positives=None)
    enc = _encoder(bert)
    cached = load_file(str(cache_path(data, "train", shuffled=True)))
    ids, changed = cached["ids"], cached["changed"]
    tok = enc.tokenize(d.split.captions)
    for t in range(0, len(tok), 7):
        n = len(tok[t])
        got = ids[t, :n].tolist()
        assert got[0] == tok[t][0] and got[-1] == tok[t][-1] and sorted(got) == sorted(tok[t])
        assert bool(changed[t]) == (got != tok[t]) and bool(changed[t]) == (len(set(tok[t][1:-1])) > 1)
        # The cached rows are the encoder run on the shuffled ids, one text alone.
        with torch.no_grad():
            alone = enc.model(input_ids=torch.tensor([got])).last_hidden_state[0]
        torch.testing.assert_close(d.texts.shuf_words[t, :n].float(), alone, atol=2e-3, rtol=1e-3)  # float16 cache
    assert torch.equal(d.texts.mask, load_encoded(data, "train")[1])


@pytest.mark.parametrize("backend", ["torch", "eager"])
@pytest.mark.parametrize("variant", ["paper", "acf-code"])
def test_cached_shuffle_negatives_change_the_scores(tiny, variant, backend):
    d = _data(tiny, negatives="shuffle", positives="both")
    b = d.batch(np.arange(8), torch.Generator().manual_seed(0), "cpu")
    torch.manual_seed(0)
    model = ACF(variant, embed_dim=16, heads=2, region_dim=32, global_dim=32, text_dim=d.text_dim)
    _, blocks = Objective(model, negatives="shuffle", positives=True, backend=backend)(b, torch.Generator())
    for clean, neg, flags in (("Sa", "Sn", b["shuf_changed"]), ("Sp", "Spn", b["pos_shuf_changed"])):
        gap = (blocks[neg].diagonal() - blocks[clean].diagonal()).abs().detach()
        assert flags.sum() >= 6 and float(gap[flags].min()) > 1e-4, gap  # was 1.5e-8: the text itself
    # What the old path did: permuting the rows of cached features changes nothing.
    perm = torch.randperm(b["words"].shape[1] - 2) + 1
    rows = torch.cat([torch.tensor([0]), perm, torch.tensor([b["words"].shape[1] - 1])])
    full = b["mask"].all(1)
    with torch.no_grad():
        V, G = model.encode_images(b["regions"], b["region_mask"], b["globals"])
        S = model.score(V, b["region_mask"], G, model.encode_texts(b["words"][full], b["mask"][full]), b["mask"][full],
                        backend=backend)
        Sperm = model.score(V, b["region_mask"], G, model.encode_texts(b["words"][full][:, rows], b["mask"][full]),
                            b["mask"][full], backend=backend)
    torch.testing.assert_close(Sperm, S, atol=1e-5, rtol=0)


def test_long_positive_partner_is_redrawn_per_access(tiny):
    d = _data(tiny, negatives=None, positives="long")
    caps = d.split.captions
    seen = set()
    for step in range(6):
        b = d.batch(np.zeros(8, dtype=np.int64), torch.Generator().manual_seed(step), "cpu")
        for r in range(8):
            n = int(b["pos_mask"][r].sum())
            row = b["pos_words"][r, :n]
            # Identify the partner by matching against every cached pair of caption 0.
            cands = [i for i in range(d.long_pairs.start[0], d.long_pairs.start[0] + d.long_pairs.count[0])
                     if int(d.pos["long"].mask[i].sum()) == n
                     and torch.equal(d.pos["long"].words[i, :n].float(), row)]
            assert len(cands) == 1
            seen.add(int(d.long_pairs.pairs[cands[0], 1]))
    assert seen == {p for p in range(len(caps)) if d.txt2img[p] == d.txt2img[0] and p != 0}


def test_negatives_act_on_projected_features_when_cached(tiny):
    # acf-code: W = P = Hb Wt + bt, so a gaussian negative moves W by exactly σ·noise
    # (std 0.1) whatever the projection's scale; acting on Hb would scale the noise.
    d = _data(tiny, negatives="gaussian", positives=None, variant="acf-code")
    b = d.batch(np.arange(8), torch.Generator().manual_seed(1), "cpu")
    torch.manual_seed(0)
    model = ACF("acf-code", embed_dim=16, heads=2, region_dim=32, global_dim=32, text_dim=d.text_dim)
    with torch.no_grad():
        model.text_fc.weight.mul_(10.0)
    seen = []
    real_finish = model.finish_texts
    model.finish_texts = lambda P, m: seen.append(P.detach()) or real_finish(P, m)
    Objective(model, negatives="gaussian", positives=False, backend="torch")(b, torch.Generator().manual_seed(2))
    P = seen[0]
    diff = P[8:] - P[:8]
    inner = b["mask"].clone()
    inner[:, 0] = False
    for r in range(8):
        inner[r, int(b["mask"][r].sum()) - 1] = False
    assert (diff[~inner] == 0).all()
    assert 0.08 < float(diff[inner].std()) < 0.12


def test_negatives_act_on_input_embeddings_in_the_loop(tiny):
    d = _data(tiny, negatives="mixture", positives="both", finetune=True)
    b = d.batch(np.arange(8), torch.Generator().manual_seed(3), "cpu")
    enc = d.encoder
    torch.manual_seed(0)
    model = ACF("paper", embed_dim=16, heads=2, region_dim=32, global_dim=32, text_dim=enc.dim)
    calls = []
    real = enc.from_embeds
    enc.from_embeds = lambda e, m: calls.append(e.detach()) or real(e, m)
    emb = enc.input_embeddings(b["input_ids"]).detach()
    shuf = enc.input_embeddings(b["shuf_input_ids"]).detach()
    kinds = set()
    obj = Objective(model, negatives="mixture", positives=True, backend="torch", encoder=enc)
    for seed in range(4, 8):
        calls.clear()
        obj(b, torch.Generator().manual_seed(seed))
        clean, neg = calls[0], calls[1]  # captions: clean input embeddings, then the negatives'
        assert torch.equal(clean, emb)
        for r in range(8):
            if torch.equal(neg[r], shuf[r]) and not torch.equal(neg[r], emb[r]):
                kinds.add("shuffle")  # the wordpieces shuffled before the encoder
            elif not torch.equal(neg[r], emb[r]):
                kinds.add("other")
                n = int(b["mask"][r].sum())
                assert torch.equal(neg[r, [0, n - 1]], emb[r, [0, n - 1]])  # [CLS] / [SEP] kept
    assert kinds == {"shuffle", "other"}
