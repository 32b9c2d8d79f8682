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
from acf_fast.train.trainer import LRFactor, train

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

        assert stored["no_cmf"] and ACF.load(out / "best.safetensors").config["u2"] == 0.0
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
