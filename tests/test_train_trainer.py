"""Trainer, checkpoints and exact resume on a tiny synthetic set.

Captions are encoded by a tiny randomly initialised BERT saved as a local model
folder (MiniLM's tokenizer, 1 layer of width 32): the real encode / cache / load
path at a fraction of MiniLM's cost. It also serves the fine-tuning test."""
import json
import math

import numpy as np
import pytest
import torch

from acf_fast.train.config import TrainConfig
from acf_fast.train.trainer import LRFactor, lr_factor, train

TINY_KNOBS = dict(regions=8, region_dim=32, global_dim=32, objects_per_image=(1, 2), regions_per_object=(1, 2),
                  min_valid_regions=4, short_image_rate=0.3)


def make_tiny_bert(folder):
    """A 1-layer, width-32 BERT with MiniLM's tokenizer, saved as a local model folder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from acf_fast.text_encoder import default_model_path

    tok = AutoTokenizer.from_pretrained(str(default_model_path()), local_files_only=True)
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=128))
    bert.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return str(folder)


def make_tiny_data(folder, train_images=10, dev_images=4):
    """(data folder, encoder folder): tiny synthetic train/dev splits, captions encoded."""
    from acf_fast.data import encode_split, write_synthetic
    from acf_fast.text_encoder import load_text_encoder

    write_synthetic(folder, seed=0, splits=("train", "dev"), sizes={"train": train_images, "dev": dev_images},
                    progress=False, **TINY_KNOBS)
    bert = make_tiny_bert(folder / "bert")
    enc = load_text_encoder(bert)
    for split in ("train", "dev"):
        encode_split(folder, split, enc, progress=False)
    return folder, bert


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("tiny"))


def cfg(tiny, out, **kw):
    data, bert = tiny
    base = dict(data=str(data), out=str(out), encoder=bert, epochs=2, batch_size=16, embed_dim=16, heads=2, progress=False,
                backend="torch", seed=3)
    base.update(kw)
    return TrainConfig(**base)


def read_log(run):
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]


def step_losses(run):
    return [(r["step"], r["loss"]) for r in read_log(run) if r["event"] == "step"]


def test_resume_continues_exactly(tiny, tmp_path):
    from safetensors.torch import load_file

    full = train(cfg(tiny, tmp_path / "full"))
    part = tmp_path / "part"
    train(cfg(tiny, part, stop_after_epochs=1))
    first = step_losses(part)
    assert first and all(r["epoch"] == 0 for r in read_log(part) if r["event"] == "step")
    # The interrupted run left a weights_only-loadable state at the epoch boundary.
    state = torch.load(part / "last_state.pt", weights_only=True)
    assert state["epoch"] == 1 and state["step"] == len(first)
    train(cfg(tiny, part), resume=True)
    got, want = step_losses(part), step_losses(full)
    assert len(want) == 2 * len(first)
    assert got == want  # bit-identical losses after resuming
    a, b = load_file(str(full / "last.safetensors")), load_file(str(part / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    epochs = [r for r in read_log(part) if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1]
    assert epochs[-1]["best_rsum"] == max(r["rsum"] for r in epochs)


def test_variant_and_sample_kinds_are_stored(tiny, tmp_path):
    from acf_fast.model import ACF

    run = train(cfg(tiny, tmp_path / "r", epochs=1, negatives="gaussian", positives="short", variant="acf-code"))
    losses = [r["loss"] for r in read_log(run) if r["event"] == "step"]
    assert len(losses) == 50 // 16 and all(math.isfinite(x) for x in losses)
    best = ACF.load(run / "best.safetensors")
    assert best.config["variant"] == "acf-code" and best.config["embed_dim"] == 16
    stored = json.loads((run / "config.json").read_text())
    assert stored["negatives"] == "gaussian" and stored["positives"] == "short"


@pytest.mark.parametrize("extra", [["--no-positives", "--no-negatives", "--loss", "triplet"],
                                   ["--no-cmf", "--schedule", "cosine", "--negatives", "cutoff"]])
def test_cli_train_ablation_switches(tiny, tmp_path, extra):
    from acf_fast.cli import main

    out = tmp_path / "cli"
    code = main(["train", "--data", str(tiny[0]), "--encoder", tiny[1], "--out", str(out), "--epochs", "1", "--batch-size", "16",
                 "--embed-dim", "16", "--heads", "2", "--quiet", "--backend", "torch", "--eval-test", "dev"] + extra)
    assert code == 0
    stored = json.loads((out / "config.json").read_text())
    if "--no-positives" in extra:
        assert stored["positives"] is None and stored["negatives"] is None
    if "--no-cmf" in extra:
        from acf_fast.model import ACF

        best = ACF.load(out / "best.safetensors")
        # The fusion is removed (partner-free global score), not the local score.
        assert stored["no_cmf"] and not best.cmf and best.u2 == 0.8 and not hasattr(best, "x_v")
    assert (out / "best.safetensors").is_file() and (out / "last_state.pt").is_file()
    metrics = json.loads((out / "dev_metrics.json").read_text())  # --eval-test dev
    assert metrics["images"] == 4 and metrics["captions"] == 20 and 0 <= metrics["rsum"] <= 600
    if "--loss" in extra:  # resume from the CLI: stored config, one more epoch
        assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--quiet"]) == 0
        epochs = [r["epoch"] for r in read_log(out) if r["event"] == "epoch"]
        assert epochs == [0, 1]
        assert json.loads((out / "config.json").read_text())["loss"] == "triplet"


def test_cli_errors(tmp_path, capsys):
    from acf_fast.cli import main

    assert main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--epochs", "1"]) == 2
    assert main(["train", "--out", str(tmp_path / "o2"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "nothing to resume" in err


def test_config_validation():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(data="d", out="o", batch_size=1).validate()
    with pytest.raises(ValueError, match="negatives"):
        TrainConfig(data="d", out="o", negatives="blur").validate()
    with pytest.raises(ValueError, match="embed_dim"):
        TrainConfig(data="d", out="o", embed_dim=30, heads=4).validate()
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_dict({"data": "d", "out": "o", "bogus": 1})


def test_lr_schedules():
    step = LRFactor("step", steps_per_epoch=5, epochs=20, step_epochs=10, floor=1e-4)
    assert step(0) == 1.0 and step(49) == 1.0 and math.isclose(step(50), 0.1) and math.isclose(step(100), 0.01)
    cos = LRFactor("cosine", steps_per_epoch=5, epochs=4, step_epochs=10, floor=1e-4)
    assert cos(0) == 1.0 and math.isclose(cos(10), 0.5 * (1 + 1e-4)) and math.isclose(cos(20), 1e-4)
    assert all(cos(t) >= cos(t + 1) for t in range(25))


def test_cosine_floor_is_an_absolute_lr():
    # The authors' schedule: lr 5e-4 down to 1e-4 over 20 epochs; at epoch 15 it is
    # 1e-4 + 4e-4 * (1 + cos(0.75 pi)) / 2 = 1.586e-4 (a ratio floor gave 7.3e-5).
    c = TrainConfig(data="d", out="o", lr=5e-4, schedule="cosine", epochs=20).validate()
    f = lr_factor(c, steps_per_epoch=10)
    assert math.isclose(5e-4 * f(150), 1e-4 + 4e-4 * (1 + math.cos(0.75 * math.pi)) / 2, rel_tol=1e-9)
    assert math.isclose(5e-4 * f(200), 1e-4, rel_tol=1e-9) and math.isclose(5e-4 * f(0), 5e-4)
    with pytest.raises(ValueError, match="cosine_floor"):
        TrainConfig(data="d", out="o", lr=5e-5, schedule="cosine").validate()


def test_u2_is_trained_stored_and_used_by_evaluate(tiny, tmp_path, capsys):
    from acf_fast import acf_similarity
    from acf_fast.cli import main
    from acf_fast.data import encode_split
    from acf_fast.model import ACF
    from acf_fast.scoring import score_split
    from acf_fast.text_encoder import load_text_encoder

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--u1" in capsys.readouterr().out
    out = tmp_path / "u2"
    code = main(["train", "--data", str(tiny[0]), "--encoder", tiny[1], "--out", str(out), "--epochs", "1",
                 "--batch-size", "16", "--embed-dim", "16", "--heads", "2", "--quiet", "--backend", "torch",
                 "--u2", "0.6", "--u1", "0.4", "--no-negatives", "--no-positives"])
    assert code == 0 and json.loads((out / "config.json").read_text())["u2"] == 0.6
    m = ACF.load(out / "best.safetensors")
    assert (m.u1, m.u2) == (0.4, 0.6)
    # `acf-fast evaluate --checkpoint` scores with the stored weights, not the variant's 0.5 / 0.8.
    data = tiny[0]
    encode_split(data, "dev", load_text_encoder(tiny[1]), progress=False)
    got = score_split(out / "best.safetensors", data, "dev", work=tmp_path / "w", backend="eager", progress=False)
    from acf_fast.data import load_encoded, load_split

    sp = load_split(data, "dev")
    words, wmask = load_encoded(data, "dev")
    with torch.no_grad():
        rmask = None if sp.region_mask is None else torch.from_numpy(np.array(sp.region_mask))
        V, G = m.encode_images(torch.from_numpy(np.array(sp.regions)), rmask,
                               None if sp.globals is None else torch.from_numpy(np.array(sp.globals)))
        W = m.encode_texts(words, wmask)
        want = {u: acf_similarity(V, rmask, W, wmask, heads=2, u1=u1, u2=u, weights=m.fusion_weights(), G=G,
                                  backend="eager") for u1, u in ((0.4, 0.6), (0.5, 0.8))}
    torch.testing.assert_close(got.S, want[0.6], atol=1e-5, rtol=0)
    assert float((got.S - want[0.8]).abs().max()) > 1e-3


def test_finetune_updates_the_encoder(tiny, tmp_path):
    from safetensors.torch import load_file

    from acf_fast.text_encoder import load_text_encoder

    run = train(cfg(tiny, tmp_path / "ft", epochs=1, finetune=True, negatives="shuffle"))
    saved = load_file(str(run / "best_encoder.safetensors"))
    start = load_text_encoder(tiny[1]).model.state_dict()
    assert saved.keys() == start.keys()
    changed = [k for k in saved if not torch.equal(saved[k], start[k])]
    assert any("embeddings.word_embeddings" in k for k in changed) and any("encoder.layer" in k for k in changed)
    assert all(math.isfinite(r["loss"]) for r in read_log(run) if r["event"] == "step")
