"""`acf-fast data images`: a SCAN-layout set from image<TAB>caption lines, with any number
of captions per image; every bad line refused before anything is written. The images
are drawn here."""
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from acf_fast.cli import main
from acf_fast.data import load_split
from acf_fast.data.images import build_image_set, open_on_white, read_pairs, split_counts

COLOURS = ["red", "green", "blue", "orange", "purple", "black", "yellow"]


def draw(path, i, mode="RGB", size=(64, 48)):
    """Image i: a coloured disc at a position that depends on i, on white (or transparent)."""
    bg = (255, 255, 255, 0) if mode == "RGBA" else "white"
    im = Image.new("RGBA" if mode == "RGBA" else "RGB", size, bg)
    d = ImageDraw.Draw(im)
    x = 4 + 7 * i % (size[0] - 24)
    d.ellipse((x, 8, x + 20, 28), fill=COLOURS[i % len(COLOURS)])
    if mode == "P":
        im = im.convert("P")
    im.save(path)
    return path


def make_pairs(folder, captions_per_image=(1, 3, 2, 1, 2, 3, 1)):
    """pairs.tsv over drawn images: relative and absolute paths, RGBA / palette / odd
    shapes, captions per image as given, lines of one image not adjacent."""
    (folder / "pics").mkdir(parents=True)
    paths = []
    for i in range(len(captions_per_image)):
        mode = ("RGB", "RGBA", "P")[i % 3]
        paths.append(draw(folder / "pics" / f"im{i}.png", i, mode, size=(64 + 5 * i, 48)))
    lines = []
    for k in range(max(captions_per_image)):
        for i, n in enumerate(captions_per_image):
            if k < n:
                name = str(paths[i]) if i % 2 else f"pics/im{i}.png"
                lines.append(f"{name}\tA  {COLOURS[i % 7]} disc,\tcaption {k} of image {i}. ")
    tsv = folder / "pairs.tsv"
    tsv.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    return tsv, paths


def test_read_pairs_groups_captions_by_image(tmp_path):
    tsv, paths = make_pairs(tmp_path)
    p = read_pairs(tsv)
    assert [x.resolve() for x in p.images] == [x.resolve() for x in paths]
    assert len(p.captions) == 13 and np.bincount(p.txt2img).tolist() == [1, 3, 2, 1, 2, 3, 1]
    for c, i in zip(p.captions, p.txt2img):
        assert c.endswith(f"of image {i}.") and "\t" not in c and "  " not in c  # whitespace collapsed
    assert p.captions[0] == "A red disc, caption 0 of image 0."


def test_builds_layout_that_loads(tmp_path):
    tsv, paths = make_pairs(tmp_path)
    out = tmp_path / "set"
    summary = build_image_set(tsv, out, split_sizes="3,2,2", seed=5, progress=False)
    pairs = read_pairs(tsv)
    seen = set()
    for split, n in (("train", 3), ("dev", 2), ("test", 2)):
        s = load_split(out, split)
        ids = (out / f"{split}_ids.txt").read_text().splitlines()
        assert s.regions.shape == (n, 36, 1280) and s.regions.dtype == np.float32 and len(ids) == n
        assert summary[split] == {"images": n, "captions": s.num_captions}
        for t, cap in enumerate(s.captions):  # each caption sits with its own image
            img = pairs.names.index(ids[s.txt2img[t]])
            assert cap.endswith(f"of image {img}.")
            assert np.bincount(pairs.txt2img)[img] == np.bincount(s.txt2img)[s.txt2img[t]]
        seen |= set(ids)
    assert seen == set(pairs.names)  # a split of images: each exactly once
    meta = json.loads((out / "build.json").read_text())
    assert meta["regions"] == 36 and meta["input_px"] == 192 and meta["seed"] == 5
    # Same seed, same split; another seed, another split.
    again = tmp_path / "again"
    build_image_set(tsv, again, split_sizes="3,2,2", seed=5, progress=False)
    assert (again / "test_ids.txt").read_text() == (out / "test_ids.txt").read_text()
    assert np.array_equal(np.load(again / "test_ims.npy"), np.load(out / "test_ims.npy"))


def test_transparency_is_white(tmp_path):
    """A transparent RGBA image reads as the same picture drawn on white."""
    rgba = draw(tmp_path / "a.png", 2, "RGBA")
    im = Image.open(rgba)
    flat = Image.new("RGB", im.size, "white")
    flat.paste(im, mask=im.split()[3])
    flat.save(tmp_path / "b.png")
    a, b = np.asarray(open_on_white(rgba)), np.asarray(open_on_white(tmp_path / "b.png"))
    assert a.shape == (64, 64, 3) and np.array_equal(a, b)
    assert (a[:8] == 255).all()  # padded to a square with white, image centred


def test_cli_images_check_train_evaluate(tmp_path, capsys):
    """Acceptance: data images -> data check -> data encode -> one-epoch train -> evaluate,
    on 1-3 captions per image."""
    from test_train_trainer import make_tiny_bert

    tsv, _ = make_pairs(tmp_path, captions_per_image=(1, 3, 2, 1, 2, 3, 1, 2, 1, 3, 2, 1))
    out = tmp_path / "set"
    assert main(["data", "images", "--pairs", str(tsv), "--out", str(out), "--split-sizes", "8,2,2",
                 "--region-grid", "2", "--quiet"]) == 0
    assert main(["data", "check", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "train: ok - 8 images (4, 1280)" in text and " per image" in text
    bert = make_tiny_bert(tmp_path / "bert")
    assert main(["data", "encode", str(out), "--encoder", bert, "--quiet"]) == 0
    run = tmp_path / "run"
    assert main(["train", "--data", str(out), "--encoder", bert, "--out", str(run), "--epochs", "1",
                 "--batch-size", "6", "--embed-dim", "16", "--heads", "2", "--backend", "torch", "--quiet"]) == 0
    res = tmp_path / "r.json"
    assert main(["evaluate", "--data", str(out), "--split", "test", "--checkpoint", str(run / "best.safetensors"),
                 "--backend", "torch", "--out", str(res), "--quiet", "--rerank", "--k-i2t", "2", "--k-t2i", "2",
                 "--kprime", "1"]) == 0
    r = json.loads(res.read_text())
    test = load_split(out, "test")
    assert r["images"] == 2 and r["texts"] == test.num_captions
    for block in ("plain", "reranked"):
        for d in ("i2t", "t2i"):
            assert 0 <= r[block][d]["r1"] <= 100 and r[block][d]["r10"] == 100.0  # 2 images: all within 10


def test_batches_carry_image_ids(tmp_path):
    """Trainer batches name each pair's image, so the loss can leave siblings out."""
    from test_train_trainer import make_tiny_bert

    from acf_fast.data import encode_split
    from acf_fast.text_encoder import load_text_encoder
    from acf_fast.train.config import TrainConfig
    from acf_fast.train.batches import TrainData

    tsv, _ = make_pairs(tmp_path)
    out = tmp_path / "set"
    build_image_set(tsv, out, split_sizes="7,0,0", grid=1, progress=False)
    bert = make_tiny_bert(tmp_path / "bert")
    encode_split(out, "train", load_text_encoder(bert), progress=False)
    data = TrainData(TrainConfig(data=str(out), out=str(tmp_path / "r"), batch_size=13, positives=None,
                                 encoder=bert, progress=False), lambda: load_text_encoder(bert), print)
    b = data.batch(np.arange(13), torch.Generator().manual_seed(0), torch.device("cpu"))
    split = load_split(out, "train")
    assert b["image_ids"].tolist() == split.txt2img.tolist()
    assert torch.equal(b["regions"], torch.from_numpy(np.asarray(split.regions)[split.txt2img]))


@pytest.mark.parametrize("case", ["no_tab", "empty_caption", "only_caption_empty", "missing", "unreadable",
                                  "empty_path", "empty_file"])
def test_bad_lines_name_the_line_and_write_nothing(tmp_path, case):
    tsv, paths = make_pairs(tmp_path)
    lines = tsv.read_text().splitlines()
    want = "line 3"
    if case == "no_tab":
        lines[2] = "pics/im2.png a caption with spaces but no tab"
        want += ": no tab"
    elif case == "empty_caption":
        lines[2] = "pics/im2.png\t  \t "
        want += ": empty caption"
    elif case == "only_caption_empty":  # image 0 has one caption; blanking it leaves the image captionless
        lines = [ln for ln in lines if "image 0." not in ln]
        lines.insert(2, "pics/im0.png\t")
        want += ": empty caption for pics/im0.png"
    elif case == "missing":
        lines[2] = "pics/nope.png\tA disc."
        want += ": image pics/nope.png not found"
    elif case == "unreadable":
        (tmp_path / "pics" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        lines[2] = "pics/bad.png\tA disc."
        want += ": cannot read image"
    elif case == "empty_path":
        lines[2] = "\tA disc."
        want += ": empty image path"
    elif case == "empty_file":
        lines = ["", "  "]
        want = "holds no image<TAB>caption line"
    tsv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "set"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises((ValueError, FileNotFoundError), match=want):
        build_image_set(tsv, out, split_sizes="0.5,0.25,0.25", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # nothing written, no temp file left


def test_cli_errors_are_one_line(tmp_path, capsys):
    tsv, _ = make_pairs(tmp_path)
    assert main(["data", "images", "--pairs", str(tmp_path / "none.tsv"), "--out", str(tmp_path / "o")]) == 2
    assert main(["data", "images", "--pairs", str(tsv), "--out", str(tmp_path / "o"), "--split-sizes", "5,5"]) == 2
    assert main(["data", "images", "--pairs", str(tsv), "--out", str(tmp_path / "o"), "--region-grid", "0"]) == 2
    err = capsys.readouterr().err
    assert "none.tsv does not exist" in err and "TRAIN,DEV,TEST" in err and "--region-grid" in err
    assert not (tmp_path / "o").exists()
    # An output that is the input is refused: here the TSV is called train_caps.txt.
    caps = tsv.rename(tsv.parent / "train_caps.txt")
    with pytest.raises(ValueError, match="overwrite the input"):
        build_image_set(caps, tsv.parent, split_sizes="7,0,0", progress=False)
    assert caps.read_text().count("\t") == 26


@pytest.mark.parametrize("spec,n,want", [
    ("0.8,0.1,0.1", 10, [8, 1, 1]), ("0.7,0.1,0.2", 774, [542, 77, 155]), ("3,2,2", 7, [3, 2, 2]),
    ("3,0,2", 9, [3, 0, 2]), ("0.5,0.2,0.2", 10, [5, 2, 2])])
def test_split_counts(spec, n, want):
    assert list(split_counts(spec, n).values()) == want


@pytest.mark.parametrize("spec", ["1,2", "a,b,c", "0.5,2,1", "8,8,8", "0,0,0", "0.9,0.2,0.1", "-1,2,3"])
def test_split_counts_refused(spec):
    with pytest.raises(ValueError, match="--split-sizes"):
        split_counts(spec, 10)
