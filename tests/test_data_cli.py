"""``acf-fast data``: synth / check / encode through the CLI entry point."""
import numpy as np
import pytest

from acf_fast.cli import main
from acf_fast.data import load_split

SMALL = ["--knob", "region_dim=16", "--knob", "global_dim=8", "--quiet"]


@pytest.mark.parametrize("argv", [["data", "--help"], ["data", "synth", "--help"], ["data", "encode", "--help"],
                                  ["data", "check", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    assert "usage: acf-fast data" in capsys.readouterr().out


def test_synth_then_check(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["data", "synth", "--out", str(out), "--images", "24", "--seed", "5", "--test", "3", *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "train 18 images" in printed and "test 3 images / 15 captions" in printed
    s = load_split(out, "test")
    assert s.regions.shape == (3, 36, 16) and s.globals.shape == (3, 8)
    assert main(["data", "check", str(out), "--quiet"]) == 0
    assert "test: ok - 3 images" in capsys.readouterr().out
    # Same seed, same bytes; the knob reached the generator.
    again = tmp_path / "e"
    main(["data", "synth", "--out", str(again), "--images", "24", "--seed", "5", "--test", "3", *SMALL])
    assert np.array_equal(np.load(out / "train_ims.npy"), np.load(again / "train_ims.npy"))


def test_check_reports_bad_file(tmp_path, capsys):
    out = tmp_path / "d"
    main(["data", "synth", "--out", str(out), "--images", "6", *SMALL])
    p = out / "dev_ims.npy"
    p.write_bytes(p.read_bytes()[:-10])
    assert main(["data", "check", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "dev_ims.npy" in err and "truncated" in err


def test_bad_knob_and_hub_encoder(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path), "--images", "6", "--knob", "nois=1", "--quiet"]) == 2
    assert "unknown synthetic-data knob" in capsys.readouterr().err
    (tmp_path / "test_caps.txt").write_text("a dog\n")
    assert main(["data", "encode", str(tmp_path), "--encoder", "bert-base-uncased", "--quiet"]) == 2
    assert "hub" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "synth", "--out", str(tmp_path), "--knob", "novalue"])
