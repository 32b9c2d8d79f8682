"""The spec §6 loss and the VSE++ triplet loss against plain per-sample loops."""
import math

import pytest
import torch

from acf_fast.train.loss import acf_contrastive_loss, triplet_loss


def loop_term(Sa, Sn, tau):
    """L_I(b) for every b, one scalar at a time, float64; α decided by plain comparison."""
    B = Sa.shape[0]
    out = []
    for b in range(B):
        pos = Sa[b, b] / tau
        img_den = sum(torch.exp(Sa[n, b] / tau) for n in range(B))
        txt_den = sum(torch.exp(Sa[b, n] / tau) for n in range(B))
        if Sn is not None:
            for n in range(B):
                alpha = 0.0 if float(Sn[b, n].detach()) > float(Sa[b, b].detach()) else 1.0
                if alpha:
                    txt_den = txt_den + alpha * torch.exp(Sn[b, n] / tau)
        out.append(-(pos - torch.log(img_den)) - (pos - torch.log(txt_den)))
    return torch.stack(out)


def loop_loss(Sa, Sn, Sp, Spn, tau, lam):
    l1 = loop_term(Sa, Sn, tau)
    if Sp is None:
        return l1.mean()
    return (lam * l1 + (1 - lam) * loop_term(Sp, Spn, tau)).mean()


def blocks(B, seed, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(B, B, generator=g, dtype=torch.float64) * 2 - 1) * spread for _ in range(4)]


@pytest.mark.parametrize("B,tau,lam", [(5, 0.05, 0.5), (7, 0.1, 0.4), (3, 0.01, 1.0)])
@pytest.mark.parametrize("parts", ["all", "no_neg", "no_pos", "none"])
def test_contrastive_matches_loop_value_and_grad(B, tau, lam, parts):
    Sa, Sn, Sp, Spn = blocks(B, seed=B * 10 + int(tau * 100))
    use_neg = parts in ("all", "no_pos")
    use_pos = parts in ("all", "no_neg")
    args = [Sa, Sn if use_neg else None, Sp if use_pos else None, Spn if (use_pos and use_neg) else None]
    leaves = [a.clone().requires_grad_(True) if a is not None else None for a in args]
    ref_leaves = [a.clone().requires_grad_(True) if a is not None else None for a in args]
    got = acf_contrastive_loss(*leaves, tau=tau, lam=lam)
    ref = loop_loss(*ref_leaves, tau=tau, lam=lam)
    assert got.dtype == torch.float64
    assert abs(float(got.detach()) - float(ref.detach())) <= 1e-10 * max(1.0, abs(float(ref.detach())))
    got.backward()
    ref.backward()
    for a, r in zip(leaves, ref_leaves):
        if a is None:
            continue
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-9, atol=1e-10)
    # The float32 path (what training runs) agrees to float32 rounding.
    got32 = acf_contrastive_loss(*[x.float() if x is not None else None for x in args], tau=tau, lam=lam)
    assert got32.dtype == torch.float32
    assert abs(float(got32) - float(ref.detach())) <= 1e-5 * max(1.0, abs(float(ref.detach()))) / tau


def test_alpha_rule_drops_hard_negatives_without_gradient():
    B, tau = 6, 0.05
    Sa, Sn, _, _ = blocks(B, seed=3)
    # Push a few negatives above their row's positive score: α = 0 there.
    above = torch.zeros(B, B, dtype=torch.bool)
    above[0, 1] = above[2, 2] = above[5, 0] = True
    Sn = torch.where(above, Sa.diagonal()[:, None] + 0.05, Sn)
    Sn = torch.where(~above & (Sn > Sa.diagonal()[:, None]), Sa.diagonal()[:, None] - 0.01, Sn)
    Sa_ = Sa.float().requires_grad_(True)
    Sn_ = Sn.float().requires_grad_(True)
    loss = acf_contrastive_loss(Sa_, Sn_, tau=tau)
    loss.backward()
    assert torch.all(Sn_.grad[above] == 0)
    assert torch.all(Sn_.grad[~above] > 0)  # every kept negative pushes the loss up
    # Dropped negatives are absent from the loss: changing them changes nothing.
    Sn2 = torch.where(above, Sn + 0.5, Sn)
    assert float(acf_contrastive_loss(Sa.float(), Sn2.float(), tau=tau)) == float(loss.detach())
    # ... while the kept ones do count: pushing every negative far down lowers the loss.
    assert float(loop_term(Sa, Sn.clamp(max=-10), tau).mean()) < float(loss.detach())


def test_contrastive_rejects_bad_arguments():
    Sa = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="Sa"):
        acf_contrastive_loss(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="Sn"):
        acf_contrastive_loss(Sa, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="tau"):
        acf_contrastive_loss(Sa, tau=0.0)
    with pytest.raises(ValueError, match="lam"):
        acf_contrastive_loss(Sa, Sp=Sa, lam=1.5)
    with pytest.raises(ValueError, match="Spn"):
        acf_contrastive_loss(Sa, Spn=Sa)


def loop_triplet(S, margin):
    B = S.shape[0]
    total = 0.0
    for b in range(B):
        worst_txt = max(max(0.0, margin + float(S[b, n]) - float(S[b, b])) for n in range(B) if n != b)
        worst_img = max(max(0.0, margin + float(S[n, b]) - float(S[b, b])) for n in range(B) if n != b)
        total += worst_txt + worst_img
    return total / B


@pytest.mark.parametrize("B,margin", [(2, 0.2), (5, 0.2), (9, 0.05)])
def test_triplet_matches_loop(B, margin):
    S = blocks(B, seed=B)[0]
    S.diagonal().add_(0.1)
    got = triplet_loss(S.float(), margin)
    assert math.isclose(float(got), loop_triplet(S, margin), rel_tol=1e-5, abs_tol=1e-6)
    # Gradient only on the diagonal and the arg-max negatives.
    X = S.float().requires_grad_(True)
    triplet_loss(X, margin).backward()
    nz = X.grad != 0
    off = nz & ~torch.eye(B, dtype=torch.bool)
    assert int(off.sum()) <= 2 * B
