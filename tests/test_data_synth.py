"""The synthetic generator of spec §7: determinism, captions that name a subset of the
image's objects, region features planted around the objects' prototypes, knobs."""
import json
import re

import numpy as np
import pytest

from acf_fast.data import load_split, write_synthetic
from acf_fast.data.synth import COLOURS, SIZES, PERSON_SIZES, SynthConfig, _World, default_sizes


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """Default knobs and dimensions (Dv = Dg = 2048, K = 36), a few images."""
    folder = tmp_path_factory.mktemp("full")
    write_synthetic(folder, seed=11, sizes={"test": 40}, splits=("test",), progress=False)
    return folder


def _mentions(caption, nouns):
    words = re.findall(r"[a-z]+", caption)
    return [w for w in words if w in nouns]


def test_captions_name_a_subset_with_true_attributes(full):
    meta = json.loads((full / "synthetic.json").read_text())
    nouns = set(meta["vocabulary"]["nouns"])
    desc = json.loads((full / "test_objects.json").read_text())
    s = load_split(full, "test")
    fewer = 0
    for t, cap in enumerate(s.captions):
        img = desc[s.txt2img[t]]
        objs = {o["noun"]: o for o in img["objects"]}
        named = _mentions(cap, nouns)
        assert 1 <= len(named) <= 3, cap
        assert set(named) <= set(objs), (cap, sorted(objs))
        fewer += len(set(named)) < len(objs)
        words = re.findall(r"[a-z]+", cap)
        for i, w in enumerate(words):  # every colour / size word belongs to a named object
            if w in COLOURS:
                owner = words[i + 1] if i + 1 < len(words) and words[i + 1] in objs else words[i - 2]
                assert objs[owner]["colour"] == w, cap
            if w in SIZES or w in PERSON_SIZES:
                size = SIZES[(SIZES + PERSON_SIZES).index(w) % 2]
                owner = next(x for x in words[i + 1:] if x in objs)
                assert objs[owner]["size"] == size, cap
        assert re.fullmatch(r"[a-z ,]+", cap), cap
        if len(objs) > 3:
            assert len(set(named)) < len(objs)
    # A caption holds less than its image: most name fewer objects than it has.
    assert fewer / len(s.captions) > 0.8


def test_regions_planted_around_prototypes(full):
    """With the world's prototypes, the objects an image holds outscore the absent ones:
    the structure a model must learn is really there (and lives in the features only)."""
    cfg = SynthConfig()
    world = _World(cfg, 11)
    protos = world.basis[: len(world.nouns)]
    protos = protos / np.linalg.norm(protos, axis=1, keepdims=True)
    desc = json.loads((full / "test_objects.json").read_text())
    s = load_split(full, "test")
    hits = total = 0
    for i, img in enumerate(desc):
        x = np.asarray(s.regions[i])
        if s.region_mask is not None:
            x = x[s.region_mask[i]]
        score = (x / np.linalg.norm(x, axis=1, keepdims=True) @ protos.T).max(0)
        present = {world.nouns.index(o["noun"]) for o in img["objects"]}
        top = set(np.argsort(-score)[: len(present)].tolist())
        hits += len(top & present)
        total += len(present)
    assert hits / total > 0.8
    # ... and absent nouns score like chance would: the mean region is not one object.
    assert total == sum(len(d["objects"]) for d in desc)


def test_deterministic_and_seed_sensitive(tmp_path):
    kw = dict(sizes={"train": 5, "test": 4}, splits=("train", "test"), progress=False, region_dim=16, global_dim=8)
    write_synthetic(tmp_path / "a", seed=1, **kw)
    write_synthetic(tmp_path / "b", seed=1, **kw)
    write_synthetic(tmp_path / "c", seed=2, **kw)
    for name in ("train_ims.npy", "test_caps.txt", "test_glob.npy", "train_objects.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "test_caps.txt").read_bytes() != (tmp_path / "c" / "test_caps.txt").read_bytes()
    assert not list((tmp_path / "a").glob("*.tmp*"))  # atomic writes leave nothing behind


def test_sizes_and_mask(tmp_path):
    assert default_sizes(6000, ("train", "dev", "test")) == {"train": 4500, "dev": 500, "test": 1000}
    assert sum(default_sizes(7, ("train", "dev", "test")).values()) == 7
    write_synthetic(tmp_path, images=14, seed=0, progress=False, region_dim=8, global_dim=8,
                    short_image_rate=1.0, min_valid_regions=25)
    for split, n in default_sizes(14, ("train", "dev", "test")).items():
        s = load_split(tmp_path, split)
        assert s.num_images == n and s.num_captions == 5 * n
        assert s.region_mask is not None and s.region_mask.sum(1).min() >= 25
    # No short images -> no mask file (and a stale one is removed).
    write_synthetic(tmp_path, images=14, seed=0, progress=False, region_dim=8, global_dim=8, short_image_rate=0.0)
    assert not (tmp_path / "test_ims_mask.npy").exists()
    assert load_split(tmp_path, "test").region_mask is None


def test_small_vocabulary_spans_categories(tmp_path):
    write_synthetic(tmp_path, sizes={"test": 6}, splits=("test",), seed=0, progress=False, region_dim=8,
                    global_dim=8, vocab_size=12, objects_per_image=(2, 3), regions=10, min_valid_regions=10,
                    regions_per_object=(1, 2))
    meta = json.loads((tmp_path / "synthetic.json").read_text())
    assert len(meta["vocabulary"]["nouns"]) == 12
    assert load_split(tmp_path, "test").regions.shape == (6, 10, 8)


@pytest.mark.parametrize("knobs, match", [
    ({"bogus": 1}, "unknown"),
    ({"vocab_size": 500}, "vocab_size"),
    ({"objects_per_image": (4, 2)}, "objects_per_image"),
    ({"objects_per_image": (6, 9), "regions_per_object": (3, 5)}, "fit"),
    ({"noise": -1.0}, "noise"),
    ({"attribute_rate": 1.5}, "attribute_rate"),
    ({"caption_objects": (0, 0, 0)}, "caption_objects"),
])
def test_bad_knobs(tmp_path, knobs, match):
    with pytest.raises(ValueError, match=match):
        write_synthetic(tmp_path, images=10, progress=False, **knobs)


def test_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="too few"):
        write_synthetic(tmp_path, images=2, progress=False)
    with pytest.raises(ValueError, match="not in splits"):
        write_synthetic(tmp_path, images=30, sizes={"valid": 3}, progress=False)
