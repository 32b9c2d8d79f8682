"""``acf-fast ablation``: rows x seeds, mean ± std, the ordering verdicts, resume."""
import json
import statistics

import pytest

from acf_fast.commands.ablation import ORDERINGS, compare, summarise
from test_train_trainer import make_tiny_bert


def _run(row, seed, rsum, r1=10.0):
    m = {"r1": r1, "r5": 2 * r1, "r10": 3 * r1}
    return {"row": row, "seed": seed, "seconds": 1.0 + seed, "test": {"rsum": rsum, "i2t": m, "t2i": m}}


def test_summary_and_verdicts():
    runs = ([_run("full", s, v) for s, v in enumerate((300.0, 302.0, 304.0))]
            + [_run("w/o both", s, v) for s, v in enumerate((280.0, 281.0, 285.0))]
            + [_run("triplet loss", s, v) for s, v in enumerate((310.0, 309.0, 311.0))]
            + [_run("w/o CMF", s, v) for s, v in enumerate((299.0, 305.0, 302.0))])
    summary = summarise(runs)
    assert summary["full"]["rsum"]["mean"] == 302.0
    assert summary["full"]["rsum"]["std"] == pytest.approx(statistics.stdev([300.0, 302.0, 304.0]))
    assert summary["w/o both"]["seeds"] == [0, 1, 2] and summary["full"]["seconds"]["mean"] == 2.0
    verdicts = {(c["better"], c["worse"]): c["verdict"] for c in compare(summary)}
    # 302 - 282 = 20 > 3 x 2.65; 302 - 310 = -8 < -3 x 2; 302 - 302: within noise.
    assert verdicts == {("full", "w/o both"): "reproduced", ("full", "triplet loss"): "reversed",
                        ("full", "w/o CMF"): "not separated"}
    assert all(pair in ORDERINGS for pair in verdicts)


def test_ablation_end_to_end_and_resume(tmp_path, capsys):
    from acf_fast.cli import main

    bert = make_tiny_bert(tmp_path / "bert")
    argv = ["ablation", "--work", str(tmp_path / "work"), "--results", str(tmp_path / "res"), "--rows",
            "full,w-o-cmf", "--seeds", "0,1", "--train-images", "4", "--dev-images", "2", "--test-images",
            "3", "--epochs", "1", "--embed-dim", "16", "--heads", "2", "--batch-size", "8", "--encoder", bert,
            "--backend", "torch", "--quiet"]
    assert main(argv) == 0
    [js] = list((tmp_path / "res").glob("ablation-*.json"))
    res = json.loads(js.read_text())
    assert [(r["row"], r["seed"]) for r in res["runs"]] == [("full", 0), ("w/o CMF", 0), ("full", 1), ("w/o CMF", 1)]
    for name in ("full", "w/o CMF"):
        vals = [r["test"]["rsum"] for r in res["runs"] if r["row"] == name]
        assert res["summary"][name]["rsum"]["mean"] == pytest.approx(statistics.fmean(vals))
        assert res["summary"][name]["rsum"]["std"] == pytest.approx(statistics.stdev(vals))
    assert res["seeds"] == [0, 1] and res["load"]["start"] and res["load"]["end"]
    assert all("--seed" in r["command"] and "--eval-test test" in r["command"] for r in res["runs"])
    cmf = json.loads((tmp_path / "work" / "w-o-cmf-s1" / "config.json").read_text())
    assert cmf["no_cmf"] and cmf["seed"] == 1
    md = js.with_suffix(".md").read_text()
    assert "±" in md and "full > w/o CMF" in md and "acf-fast data synth" in md
    # A rerun reuses every finished cell.
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().out.count("done before, reusing") == 4


def test_ablation_refuses_bad_options(tmp_path, capsys):
    from acf_fast.cli import main

    assert main(["ablation", "--work", str(tmp_path), "--rows", "full,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main(["ablation", "--work", str(tmp_path), "--variant", "acf-code"]) == 2
    assert "w/o CMF" in capsys.readouterr().err
