"""The training step's wiring: four text sets -> four B×B blocks -> loss."""
import pytest
import torch

from acf_fast.model import ACF
from acf_fast.train.loss import acf_contrastive_loss, triplet_loss
from acf_fast.train.negatives import make_negatives
from acf_fast.train.objective import Objective


def batch(B=5, K=6, L=7, Lp=11, Dv=12, Db=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    rmask = torch.rand(B, K, generator=g) > 0.3
    rmask[:, 0] = True
    def words(n, L):
        lengths = torch.randint(2, L + 1, (n,), generator=g)
        lengths[0] = L
        mask = torch.arange(L)[None] < lengths[:, None]
        return torch.randn(n, L, Db, generator=g) * mask[..., None], mask
    w, m = words(B, L)
    pw, pm = words(B, Lp)
    # Stand-ins for the cached encodings of the shuffled texts (same masks).
    sw = torch.randn(B, L, Db, generator=g) * m[..., None]
    spw = torch.randn(B, Lp, Db, generator=g) * pm[..., None]
    return {"regions": torch.randn(B, K, Dv, generator=g), "region_mask": rmask,
            "globals": torch.randn(B, Dv, generator=g), "words": w, "mask": m, "pos_words": pw, "pos_mask": pm,
            "shuf_words": sw, "shuf_changed": torch.arange(B) != 1, "pos_shuf_words": spw,
            "pos_shuf_changed": torch.ones(B, dtype=torch.bool)}


@pytest.mark.parametrize("variant", ["paper", "acf-code"])
@pytest.mark.parametrize("kind", ["mixture", "shuffle"])
def test_blocks_match_separate_eager_scores(variant, kind):
    torch.manual_seed(0)
    model = ACF(variant, embed_dim=8, heads=2, region_dim=12, global_dim=12, text_dim=10)
    b = batch()
    obj = Objective(model, negatives=kind, positives=True, tau=0.1, lam=0.4, backend="torch")
    loss, blocks = obj(b, torch.Generator().manual_seed(7))
    # Independent recomputation: same draws in the same order, negatives on the
    # projected features P = Hb Wt + bt (float64 by hand), one eager call per block.
    g = torch.Generator().manual_seed(7)
    Wt, bt = model.text_fc.weight.double(), model.text_fc.bias.double()
    proj = lambda x: (x.double() @ Wt.T + bt).float()
    neg, changed = make_negatives(proj(b["words"]), b["mask"], kind, g, shuffled=proj(b["shuf_words"]),
                                  shuffled_changed=b["shuf_changed"])
    pneg, pchanged = make_negatives(proj(b["pos_words"]), b["pos_mask"], kind, g, shuffled=proj(b["pos_shuf_words"]),
                                    shuffled_changed=b["pos_shuf_changed"])
    V, G = model.encode_images(b["regions"], b["region_mask"], b["globals"])
    want = {}
    for name, P, m in (("Sa", proj(b["words"]), b["mask"]), ("Sn", neg, b["mask"]),
                       ("Sp", proj(b["pos_words"]), b["pos_mask"]), ("Spn", pneg, b["pos_mask"])):
        W = P / P.norm(dim=-1, keepdim=True).clamp(min=1e-8) if variant == "paper" else P
        want[name] = model.score(V, b["region_mask"], G, W * m[..., None], m, backend="eager")
    assert set(blocks) == set(want)
    for k in want:
        torch.testing.assert_close(blocks[k], want[k].float(), rtol=0, atol=1e-4)
    # The loss is the spec §6 loss of these blocks in this order, the unperturbed
    # texts' negatives left out (compared on the step's own blocks: α is decided on them).
    ref = acf_contrastive_loss(*(blocks[k].detach() for k in ("Sa", "Sn", "Sp", "Spn")), tau=0.1, lam=0.4,
                               Sn_valid=changed, Spn_valid=pchanged)
    assert float(loss.detach()) == float(ref)
    if kind == "shuffle":
        assert not changed[1] and float(loss.detach()) != float(acf_contrastive_loss(
            *(blocks[k].detach() for k in ("Sa", "Sn", "Sp", "Spn")), tau=0.1, lam=0.4))
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(x is not None and torch.isfinite(x).all() for x in grads)
    assert any(float(x.abs().sum()) > 0 for x in grads)


def test_switches_select_blocks():
    torch.manual_seed(0)
    model = ACF("acf-code", embed_dim=8, heads=2, region_dim=12, global_dim=12, text_dim=10)
    b = batch()
    _, blocks = Objective(model, negatives=None, positives=False, backend="torch")(b, torch.Generator())
    assert set(blocks) == {"Sa"}
    _, blocks = Objective(model, negatives="gaussian", positives=False, backend="torch")(b, torch.Generator())
    assert set(blocks) == {"Sa", "Sn"}
    _, blocks = Objective(model, negatives=None, positives=True, backend="torch")(b, torch.Generator())
    assert set(blocks) == {"Sa", "Sp"}
    loss, blocks = Objective(model, loss="triplet", backend="torch")(b, torch.Generator())
    assert set(blocks) == {"Sa"}
    assert float(loss.detach()) == pytest.approx(float(triplet_loss(blocks["Sa"]).detach()), abs=1e-6)
    with pytest.raises(ValueError, match="loss"):
        Objective(model, loss="hinge")


def test_score_items_matches_direct_score():
    from acf_fast.scoring import score_items

    torch.manual_seed(0)
    model = ACF("paper", embed_dim=8, heads=2, region_dim=12, global_dim=12, text_dim=10)
    b = batch(B=4, L=9)
    words = torch.cat([b["words"], b["pos_words"][:, :9]])
    mask = torch.cat([b["mask"], b["pos_mask"][:, :9]])
    mask[:, 0] = True
    words = words * mask[..., None]
    S, tv = score_items(model, b["regions"], b["region_mask"], b["globals"], words, mask, backend="torch",
                        text_chunk=3)
    V, G = model.encode_images(b["regions"], b["region_mask"], b["globals"])
    W = model.encode_texts(words, mask)
    want = model.score(V, b["region_mask"], G, W, mask, backend="eager")
    torch.testing.assert_close(S, want.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(tv, model.text_vectors(W, mask).detach(), rtol=0, atol=1e-6)
    assert model.training  # restored


def test_steps_on_a_fixed_batch_reduce_the_loss():
    torch.manual_seed(0)
    model = ACF("paper", embed_dim=8, heads=2, region_dim=12, global_dim=12, text_dim=10)
    obj = Objective(model, negatives="mixture", positives=True, backend="torch")
    opt = torch.optim.Adam(obj.parameters(), lr=1e-2)
    b = batch(B=6)
    losses = []
    for _ in range(12):
        loss, _ = obj(b, torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]


def test_token_cutoff_keeps_the_cut_token_as_a_zero_word_with_sane_gradients():
    # The cut acts on P, so the cut token is a zero row of W (paper: l2norm(0) = 0) that
    # stays in the mask, as the authors' zeroed W row; its gradient must stay modest.
    torch.manual_seed(0)
    model = ACF("paper", embed_dim=8, heads=2, region_dim=12, global_dim=12, text_dim=10)
    with torch.no_grad():
        model.text_fc.bias.normal_()  # a cut on Hb would give l2norm(bias) != 0 instead
    b = batch(B=6, L=9)
    b["mask"][:, :] = True  # every text has inner tokens to cut ...
    b["words"] = torch.randn(b["words"].shape, generator=torch.Generator().manual_seed(1))  # ... none zero
    seen = []
    real_finish = model.finish_texts
    model.finish_texts = lambda P, m: seen.append((P, m)) or real_finish(P, m)
    loss, _ = Objective(model, negatives="token_cutoff", positives=False, backend="torch")(b, torch.Generator())
    P, m = seen[0]
    assert m.all()  # nobody left the mask
    zero_rows = (P[6:] == 0).all(-1)  # the negatives' half of the group
    assert zero_rows.sum(1).tolist() == [1] * 6 and not zero_rows[:, [0, -1]].any()
    loss.backward()
    assert max(float(p.grad.abs().max()) for p in model.parameters()) < 1e3
