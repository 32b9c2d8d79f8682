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
    return {"regions": torch.randn(B, K, Dv, generator=g), "region_mask": rmask,
            "globals": torch.randn(B, Dv, generator=g), "words": w, "mask": m, "pos_words": pw, "pos_mask": pm}


@pytest.mark.parametrize("variant", ["paper", "acf-code"])
@pytest.mark.parametrize("kind", ["mixture", "shuffle"])
def test_blocks_match_separate_eager_scores(variant, kind):
    torch.manual_seed(0)
    model = ACF(variant, embed_dim=8, heads=2, region_dim=12, global_dim=12, text_dim=10)
    b = batch()
    obj = Objective(model, negatives=kind, positives=True, tau=0.1, lam=0.4, backend="torch")
    loss, blocks = obj(b, torch.Generator().manual_seed(7))
    # Independent recomputation: same draws in the same order, one eager call per block.
    g = torch.Generator().manual_seed(7)
    neg = make_negatives(b["words"], b["mask"], kind, g)
    pneg = make_negatives(b["pos_words"], b["pos_mask"], kind, g)
    V, G = model.encode_images(b["regions"], b["region_mask"], b["globals"])
    want = {}
    # A token cut out of cached features leaves the mask (see Objective._texts).
    nmask = b["mask"] & neg.ne(0).any(-1)
    pnmask = b["pos_mask"] & pneg.ne(0).any(-1)
    for name, w, m in (("Sa", b["words"], b["mask"]), ("Sn", neg, nmask),
                       ("Sp", b["pos_words"], b["pos_mask"]), ("Spn", pneg, pnmask)):
        want[name] = model.score(V, b["region_mask"], G, model.encode_texts(w, m), m, backend="eager")
    assert set(blocks) == set(want)
    for k in want:
        torch.testing.assert_close(blocks[k], want[k].float(), rtol=0, atol=1e-4)
    # The loss is the spec §6 loss of these blocks in this order. (Compared on the
    # step's own blocks: shuffled cached features leave the set-based ACF score
    # unchanged, so Sn[b,b] ties Sa[b,b] to rounding and α would flip on noise.)
    ref = acf_contrastive_loss(*(blocks[k].detach() for k in ("Sa", "Sn", "Sp", "Spn")), tau=0.1, lam=0.4)
    assert float(loss.detach()) == float(ref)
    if kind == "shuffle":
        torch.testing.assert_close(want["Sn"], want["Sa"], rtol=0, atol=1e-5)
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
    assert float(loss) == pytest.approx(float(triplet_loss(blocks["Sa"])), abs=1e-6)
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
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0]


def test_token_cutoff_on_cached_features_keeps_gradients_sane():
    # A zeroed feature row would become W = l2norm(bias ≈ 0): a 1e8-scale gradient.
    torch.manual_seed(0)
    model = ACF("paper", embed_dim=8, heads=2, region_dim=12, global_dim=12, text_dim=10)
    b = batch(B=6, L=9)
    b["mask"][:, :] = True  # every text has inner tokens to cut ...
    b["words"] = torch.randn(b["words"].shape, generator=torch.Generator().manual_seed(1))  # ... none zero
    loss, _ = Objective(model, negatives="token_cutoff", positives=False, backend="torch")(b, torch.Generator())
    loss.backward()
    assert max(float(p.grad.abs().max()) for p in model.parameters()) < 1e3
