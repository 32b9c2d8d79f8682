"""`acf-fast real` end to end on a Tux Paint .deb built here from drawn stamps (no
download): table with chance, the probe and ACF; results.json and results.png."""
import json
import shutil
import subprocess

import pytest

from acf_fast.cli import main
from acf_fast.data.tuxpaint import PACKAGE, STAMPS

from test_data_tuxpaint import stamp

COLOURS = ["red", "green", "blue", "orange", "purple", "black", "yellow", "pink", "brown", "grey"]


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian/Ubuntu) to build a test .deb")
def test_real_end_to_end(tmp_path, capsys):
    from test_train_trainer import make_tiny_bert

    pkg = tmp_path / "pkg"
    for i in range(20):
        stamp(pkg / STAMPS, f"things/t{i:02d}", f"A {COLOURS[i % 10]} thing number {i}.", "svg" if i % 7 == 3 else "png",
              COLOURS[i % 10])
    (pkg / "DEBIAN").mkdir()
    (pkg / "DEBIAN/control").write_text(f"Package: {PACKAGE}\nVersion: 1.0-1\nArchitecture: all\n"
                                        "Maintainer: test <t@example.org>\nDescription: test stamps\n")
    deb = tmp_path / "stamps.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(pkg), str(deb)], check=True, capture_output=True)
    bert = make_tiny_bert(tmp_path / "bert")
    out = tmp_path / "real"
    args = ["real", "--deb", str(deb), "--out", str(out), "--encoder", bert, "--epochs", "1", "--batch-size", "4",
            "--embed-dim", "16", "--heads", "2", "--device", "cpu", "--backend", "torch"]
    assert main(args) == 0
    text = capsys.readouterr().out
    for row in ("chance", "probe", "untrained", "ACF ", "ACF w/o positives"):
        assert f"\n{row}" in text
    assert "linear probe: test rsum" in text and "95% interval" in text
    r = json.loads((out / "results.json").read_text())
    assert r["test"] == {"images": 4, "captions": 4}
    assert [row["model"] for row in r["rows"]][:6] == ["chance", "probe", "probe", "probe", "untrained", "ACF"]
    assert [row["rerank"] for row in r["rows"]][2:4] == ["ACF-R+ embedding (honest)", "ACF-R+ profile (honest)"]
    assert r["rows"][0]["metrics"]["t2i"]["r1"] == 25.0  # 1 of 4 images
    assert r["compared"] == max(r["runs"], key=lambda n: r["runs"][n]["dev_rsum"])
    assert r["runs"]["ACF w/o positives"]["config"]["positives"] is None
    assert r["probe"]["lambda"] > 0 and r["data"]["build"]["splits"]["train"]["images"] == 14
    assert (out / "results.png").stat().st_size > 1000
    # A second run would reuse the data set; other settings would rebuild it.
    from acf_fast.commands.real import _build_up_to_date
    from acf_fast.data.tuxpaint import DEFAULT_SPLIT_SIZES

    assert _build_up_to_date(out / "data", DEFAULT_SPLIT_SIZES, 0, 6)
    assert not _build_up_to_date(out / "data", DEFAULT_SPLIT_SIZES, 1, 6)
    assert not _build_up_to_date(out / "data", "0.5,0.25,0.25", 0, 6)
