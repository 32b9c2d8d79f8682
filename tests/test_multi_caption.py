"""Any number of captions per image: a training batch never makes two captions of one
image (or two copies of that image) each other's negatives, checked against plain
float64 loops that skip those entries."""
import numpy as np
import pytest
import torch

from acf_fast.train.loss import acf_contrastive_loss, triplet_loss


def loop_term(Sa, Sn, tau, img):
    """L_I(b) per b, float64, one scalar at a time; entries n != b of b's image left out."""
    B = Sa.shape[0]
    out = []
    for b in range(B):
        others = [n for n in range(B) if n == b or img[n] != img[b]]
        pos = Sa[b, b] / tau
        img_den = sum(torch.exp(Sa[n, b] / tau) for n in others)
        txt_den = sum(torch.exp(Sa[b, n] / tau) for n in others)
        if Sn is not None:  # noised texts are negatives whoever they came from (n = b included)
            for n in range(B):
                if float(Sn[b, n].detach()) <= float(Sa[b, b].detach()):
                    txt_den = txt_den + torch.exp(Sn[b, n] / tau)
        out.append(-(pos - torch.log(img_den)) - (pos - torch.log(txt_den)))
    return torch.stack(out)


def loop_triplet(S, margin, img):
    B = S.shape[0]
    total = 0.0
    for b in range(B):
        neg = [n for n in range(B) if img[n] != img[b]]
        ct = max([max(0.0, margin + float(S[b, n]) - float(S[b, b])) for n in neg], default=0.0)
        ci = max([max(0.0, margin + float(S[n, b]) - float(S[b, b])) for n in neg], default=0.0)
        total += ct + ci
    return total / B


# Batches with two and three captions of one image, and one where every image is distinct.
IMAGE_IDS = [[4, 9, 4, 2, 7, 9, 4], [0, 1, 2, 3, 4], [5, 5, 1, 8, 1, 3]]


@pytest.mark.parametrize("img", IMAGE_IDS)
@pytest.mark.parametrize("with_gen", [False, True])
def test_contrastive_skips_same_image_entries(img, with_gen):
    B, tau, lam = len(img), 0.05, 0.4
    g = torch.Generator().manual_seed(B)
    Sa, Sn, Sp, Spn = [(torch.rand(B, B, generator=g, dtype=torch.float64) * 2 - 1) * 0.3 for _ in range(4)]
    ids = torch.tensor(img)
    args = [Sa, Sn, Sp, Spn] if with_gen else [Sa, None, None, None]
    leaves = [a.clone().requires_grad_(True) if a is not None else None for a in args]
    refs = [a.clone().requires_grad_(True) if a is not None else None for a in args]
    got = acf_contrastive_loss(*leaves, tau=tau, lam=lam, image_ids=ids)
    l1 = loop_term(refs[0], refs[1], tau, img)
    ref = (lam * l1 + (1 - lam) * loop_term(refs[2], refs[3], tau, img)).mean() if with_gen else l1.mean()
    assert abs(float(got.detach()) - float(ref.detach())) <= 1e-10 * abs(float(ref.detach()))
    got.backward()
    ref.backward()
    for a, r in zip(leaves, refs):
        if a is not None:
            torch.testing.assert_close(a.grad, r.grad, rtol=1e-9, atol=1e-12)
    same = ids[:, None].eq(ids[None, :]) & ~torch.eye(B, dtype=torch.bool)
    assert torch.all(leaves[0].grad[same] == 0)  # a sibling caption is neither pushed nor pulled
    # Distinct images: exactly the plain loss.
    if len(set(img)) == B:
        assert float(got.detach()) == float(acf_contrastive_loss(*args, tau=tau, lam=lam))
    else:
        assert float(got.detach()) != float(acf_contrastive_loss(*args, tau=tau, lam=lam))


@pytest.mark.parametrize("img", IMAGE_IDS)
def test_triplet_skips_same_image_entries(img):
    B = len(img)
    S = torch.rand(B, B, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    got = triplet_loss(S, 0.2, image_ids=torch.tensor(img))
    assert abs(float(got) - loop_triplet(S, 0.2, img)) <= 1e-12


def test_image_ids_are_checked():
    S = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="image_ids"):
        acf_contrastive_loss(S, image_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="image_ids"):
        triplet_loss(S, image_ids=torch.tensor([0.0, 1.0, 2.0]))


def test_ranks_use_each_images_own_captions(tmp_path):
    """Planted: image 0 has 1 caption, image 1 has 3 (not adjacent), image 2 has 1. Image
    1's I2T rank is that of its BEST caption; a t // 5 reading would see other captions."""
    from acf_fast.data import load_split
    from acf_fast.evaluate import ranks_i2t, ranks_t2i, recall_metrics

    # captions:        0  1  2  3  4
    txt2img = np.array([1, 0, 1, 2, 1])
    S = torch.tensor([[0.9, 0.8, 0.1, 0.3, 0.2],    # image 0: its caption 1 is 2nd (0.9 is caption 0's)
                      [0.1, 0.7, 0.4, 0.6, 0.5],    # image 1: captions 0, 2, 4 -> best is 4 (0.5), 3rd in the row
                      [0.2, 0.1, 0.3, 0.95, 0.9]])  # image 2: its caption 3 is 1st
    assert ranks_i2t(S, txt2img).tolist() == [1, 2, 0]
    assert ranks_t2i(S, txt2img).tolist() == [2, 0, 0, 0, 1]
    # The same through the layout: the split's own map reaches the evaluator.
    np.save(tmp_path / "test_ims.npy", np.zeros((3, 2, 4), np.float32))
    (tmp_path / "test_caps.txt").write_text("".join(f"caption {t}\n" for t in range(5)))
    np.save(tmp_path / "test_txt2img.npy", txt2img)
    split = load_split(tmp_path, "test")
    assert split.txt2img.tolist() == txt2img.tolist() and split.num_images == 3
    m = recall_metrics(S, split.txt2img)
    assert m["i2t"]["r1"] == pytest.approx(100 / 3) and m["t2i"]["r1"] == pytest.approx(60.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_match_loop_on_ragged_captions(seed):
    from acf_fast.evaluate import recall_metrics
    from acf_fast.reference_ranking import recall_loop

    rng = np.random.default_rng(seed)
    N = 23
    txt2img = rng.permutation(np.repeat(np.arange(N), rng.integers(1, 5, N)))
    S = np.round(rng.normal(size=(N, len(txt2img))), 1)  # rounded: ties on purpose
    got, want = recall_metrics(torch.from_numpy(S), txt2img), recall_loop(S, txt2img)
    for d in ("i2t", "t2i"):
        for k in want[d]:
            assert got[d][k] == pytest.approx(want[d][k], abs=1e-9)


@pytest.mark.parametrize("bad,msg", [
    (np.array([0, 1, 1, 3]), "image rows in \\[0, 3\\]"),
    (np.array([0, 0, 2, 2]), "image 1 has no caption"),
    (np.array([0, 1, 2]), "has 3 entries but the split has 4 captions"),
    (np.array([0.0, 1.0, 2.0, 2.0]), "dtype kind"),
])
def test_txt2img_file_checked(tmp_path, bad, msg):
    np.save(tmp_path / "test_ims.npy", np.zeros((3, 2, 4), np.float32))
    (tmp_path / "test_caps.txt").write_text("a\nb\nc\nd\n")
    np.save(tmp_path / "test_txt2img.npy", bad)
    from acf_fast.data import load_split

    with pytest.raises(ValueError, match=f"test_txt2img.npy.*{msg}"):
        load_split(tmp_path, "test")
