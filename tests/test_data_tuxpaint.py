"""`acf-fast data tuxpaint` on a stamps tree drawn here (no download): which stamps are
kept, SVGs rendered, one image per distinct description, and the whole command on a
.deb built locally with dpkg-deb."""
import json
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image, ImageDraw

from acf_fast.cli import main
from acf_fast.data import load_split
from acf_fast.data.tuxpaint import COPYRIGHT, PACKAGE, STAMPS, description_key, find_stamps, write_pairs

SVG = ('<?xml version="1.0"?>\n<!DOCTYPE svg [<!ENTITY fill "#2060c0">]>\n'
       '<svg xmlns="http://www.w3.org/2000/svg" width="40" height="20">'
       '<rect x="5" y="5" width="30" height="10" style="fill:&fill;"/></svg>\n')


def stamp(root, name, desc, kind="png", colour="red"):
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind in ("png", "both"):
        im = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
        ImageDraw.Draw(im).ellipse((5, 5, 30, 25), fill=colour)
        im.save(path.with_suffix(".png"))
    if kind in ("svg", "both"):
        path.with_suffix(".svg").write_text(SVG)
    if desc is not None:
        path.with_suffix(".txt").write_text(f"{desc}\nfr.utf8=Une traduction.\n", encoding="utf-8")


def make_tree(root):
    stamp(root, "animals/cat", "A cat.")
    stamp(root, "animals/zoo/cat", "a  cat")                # same description: dropped (later by path)
    stamp(root, "animals/dog", "A dog.", "svg", "blue")
    stamp(root, "food/apple", "An apple.", "both", "green")  # PNG and SVG: the PNG is kept
    stamp(root, "food/apple_mirror", None)                  # mirror image without a .txt: skipped
    (root / "food/gift.txt").write_text("A gift.\n")        # description without an image: skipped
    stamp(root, "food/pear", "   ")                          # empty description: skipped
    stamp(root, "town/bus", "A red bus.", colour="orange")
    stamp(root, "town/tram", "A tram.", "svg")


def test_find_stamps_keeps_one_per_description(tmp_path):
    make_tree(tmp_path)
    kept, counts = find_stamps(tmp_path)
    assert [n for _, _, n in kept] == ["animals/cat.png", "animals/dog.svg", "food/apple.png", "town/bus.png",
                                       "town/tram.svg"]
    assert [d for _, d, _ in kept] == ["A cat.", "A dog.", "An apple.", "A red bus.", "A tram."]
    assert counts == {"stamps": 6, "png": 3, "svg": 2, "duplicates": 1}
    assert description_key("A  Cat. ") == description_key("a cat") != description_key("A cat and a dog.")


def test_write_pairs_renders_svgs(tmp_path):
    make_tree(tmp_path / "stamps")
    kept, _ = find_stamps(tmp_path / "stamps")
    tsv = write_pairs(kept, tmp_path / "images", progress=False)
    lines = tsv.read_text().splitlines()
    assert lines[1] == "animals/dog.svg.png\tA dog."
    dog = Image.open(tmp_path / "images/animals/dog.svg.png")
    assert dog.size == (400, 200)  # rendered 400 px wide, aspect kept
    rgba = np.asarray(dog.convert("RGBA"))
    assert rgba[100, 200, 3] == 255 and tuple(rgba[100, 200, :3]) == (0x20, 0x60, 0xC0)  # the entity's colour
    assert rgba[5, 5, 3] == 0  # transparent outside: composited on white by the builder


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian/Ubuntu) to build a test .deb")
def test_cli_on_a_local_deb(tmp_path, capsys):
    pkg = tmp_path / "pkg"
    make_tree(pkg / STAMPS)
    (pkg / COPYRIGHT).parent.mkdir(parents=True)
    (pkg / COPYRIGHT).write_text("License: GPL-2\n")
    (pkg / "DEBIAN").mkdir()
    (pkg / "DEBIAN/control").write_text(f"Package: {PACKAGE}\nVersion: 9.9-1\nArchitecture: all\n"
                                        "Maintainer: test <t@example.org>\nDescription: test stamps\n")
    deb = tmp_path / f"{PACKAGE}_9.9-1_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(pkg), str(deb)], check=True, capture_output=True)
    out = tmp_path / "set"
    assert main(["data", "tuxpaint", "--deb", str(deb), "--out", str(out), "--split-sizes", "3,1,1", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "6 stamps, 1 with a repeated description dropped, 5 kept (3 PNG, 2 SVG)" in text
    caps, ids = [], []
    for split in ("train", "dev", "test"):
        s = load_split(out, split)
        assert s.regions.shape[1:] == (36, 1280) and s.num_captions == s.num_images
        caps += s.captions
        ids += s.ids
    assert sorted(caps) == sorted(["A cat.", "A dog.", "An apple.", "A red bus.", "A tram."])
    assert sorted(ids) == ["animals/cat.png", "animals/dog.svg.png", "food/apple.png", "town/bus.png",
                           "town/tram.svg.png"]
    meta = json.loads((out / "build.json").read_text())
    assert meta["source"]["version"] == "9.9-1" and meta["source"]["kept"] == 5
    assert (out / "COPYRIGHT-tuxpaint-stamps").read_text() == "License: GPL-2\n"
    assert not any(p.suffix in (".png", ".svg") for p in out.rglob("*"))  # no image is kept


def test_cli_missing_deb(tmp_path, capsys):
    assert main(["data", "tuxpaint", "--deb", str(tmp_path / "none.deb"), "--out", str(tmp_path / "o")]) == 2
    assert "none.deb does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
