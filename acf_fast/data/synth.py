"""The embedded synthetic data set of spec §7, written in the SCAN layout.

A COCO-shaped set with planted structure, deterministic by seed, any size:

* a vocabulary of nouns in categories (animals, vehicles, food, ...), colours and
  sizes, and scenes (street, kitchen, park, ...) that favour some categories;
* each image holds several objects (3-6 by default). Each object owns a few of the
  K = 36 regions, drawn around its noun's prototype plus its colour and size
  directions, with per-region noise (Dv = 2048). The other regions are background:
  the scene's background prototypes, some of them "distractors" that faintly look
  like an object that is not there. Some images have fewer valid regions; then
  ``{split}_ims_mask.npy`` is written and the invalid rows are zero;
* a global feature (Dg = 2048) mixing the objects' global prototypes (weighted by
  their region share) and the scene's, plus noise;
* five captions per image in plain English naming a SUBSET of its objects (the
  salient ones more often), with their colour / size only sometimes, and the scene
  sometimes: a caption holds less than its image, the asymmetry ACF is about.

An untrained model scores at chance (its random encoders see no link between the
modalities); a trained one must learn which region directions match which words.
Difficulty knobs are the keyword arguments of :func:`write_synthetic` (see
``SynthConfig``).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..atomic import atomic_path, atomic_save_npy, atomic_write_lines

FORMAT_VERSION = 1

CATEGORIES: Dict[str, Tuple[str, ...]] = {
    "animal": ("dog", "cat", "horse", "cow", "sheep", "bird", "elephant", "zebra", "giraffe", "bear"),
    "vehicle": ("car", "bus", "truck", "bicycle", "motorcycle", "train", "boat", "airplane"),
    "food": ("pizza", "sandwich", "banana", "apple", "orange", "cake", "donut", "broccoli"),
    "furniture": ("chair", "couch", "bed", "table", "bench", "lamp"),
    "person": ("man", "woman", "child", "boy", "girl"),
    "thing": ("umbrella", "kite", "ball", "bottle", "cup", "book", "laptop", "phone", "clock", "vase",
              "bag", "hat", "surfboard", "skateboard"),
}
COLOURS = ("red", "blue", "green", "yellow", "white", "black", "brown", "purple", "gray", "pink")
SIZES = ("small", "large")
PERSON_SIZES = ("young", "tall")
CATEGORY_NAMES = tuple(CATEGORIES)
# scene -> (phrase, favoured categories)
SCENES = {
    "street": ("on a street", ("vehicle", "person")),
    "kitchen": ("in a kitchen", ("food", "thing")),
    "park": ("in a park", ("animal", "person")),
    "living room": ("in a living room", ("furniture", "thing")),
    "farm": ("on a farm", ("animal", "vehicle")),
    "beach": ("on a beach", ("thing", "person")),
}
TEMPLATES = {
    1: ("a {0}", "a photo of {0}", "a close up of {0}", "there is {0}", "{0} in the picture"),
    2: ("{0} next to {1}", "{0} and {1}", "{0} near {1}", "a picture of {0} with {1}", "{0} beside {1}",
        "{0} in front of {1}"),
    3: ("{0}, {1} and {2}", "{0} with {1} and {2}", "{0} next to {1} and {2}", "a photo of {0}, {1} and {2}"),
}
BACKGROUNDS_PER_SCENE = 4


@dataclass(frozen=True)
class SynthConfig:
    """Difficulty knobs of the synthetic set (all have defaults).

    Structure: ``vocab_size`` nouns (<= 51), ``colours`` (<= 10) colour words,
    ``objects_per_image`` (min, max), ``regions_per_object`` (min, max) (large objects
    get one more, small one fewer), ``caption_objects`` weights of naming 1, 2, 3
    objects, ``attribute_rate`` / ``size_rate`` chance a named object's colour / size
    is said, ``scene_rate`` chance the scene is said, ``scene_bias`` chance an object
    comes from the scene's favoured categories.
    Features: prototypes have unit per-dimension std; ``noise`` per-dimension std of
    each region's noise, ``part_noise`` std of a per-region "which part of the object"
    variation inside the prototype subspace, ``attribute_strength`` scale of colour and
    size directions, ``category_similarity`` share of a noun prototype common to its
    category (confusable nouns), ``distractor_rate`` chance a background region carries
    ``distractor_strength`` of an absent object's prototype, ``global_noise``.
    Layout: ``regions`` K, ``region_dim`` Dv, ``global_dim`` Dg, ``short_image_rate``
    fraction of images with fewer valid regions, down to ``min_valid_regions``
    (never fewer than their objects need).
    """

    vocab_size: int = 51
    colours: int = 10
    objects_per_image: Tuple[int, int] = (3, 6)
    regions_per_object: Tuple[int, int] = (2, 4)
    caption_objects: Tuple[float, float, float] = (0.2, 0.5, 0.3)
    attribute_rate: float = 0.5
    size_rate: float = 0.5
    scene_rate: float = 0.4
    scene_bias: float = 0.7
    noise: float = 1.5
    part_noise: float = 0.3
    attribute_strength: float = 0.7
    category_similarity: float = 0.3
    distractor_rate: float = 0.2
    distractor_strength: float = 0.5
    global_noise: float = 0.5
    regions: int = 36
    region_dim: int = 2048
    global_dim: int = 2048
    short_image_rate: float = 0.2
    min_valid_regions: int = 20

    def validate(self) -> None:
        nouns = sum(len(v) for v in CATEGORIES.values())
        if not 2 <= self.vocab_size <= nouns:
            raise ValueError(f"vocab_size must be in [2, {nouns}], got {self.vocab_size}")
        if not 1 <= self.colours <= len(COLOURS):
            raise ValueError(f"colours must be in [1, {len(COLOURS)}], got {self.colours}")
        lo, hi = self.objects_per_image
        if not 1 <= lo <= hi or hi > self.vocab_size:
            raise ValueError(f"objects_per_image must be (min, max) with 1 <= min <= max <= vocab_size, got {self.objects_per_image}")
        rlo, rhi = self.regions_per_object
        if not 1 <= rlo <= rhi:
            raise ValueError(f"regions_per_object must be (min, max) with 1 <= min <= max, got {self.regions_per_object}")
        if hi * (rhi + 1) > self.regions:
            raise ValueError(
                f"objects_per_image max {hi} x (regions_per_object max {rhi} + 1) exceeds "
                f"regions = {self.regions}; the objects would not fit"
            )
        if not 1 <= self.min_valid_regions <= self.regions:
            raise ValueError(f"min_valid_regions must be in [1, regions={self.regions}], got {self.min_valid_regions}")
        w = np.asarray(self.caption_objects, dtype=float)
        if w.shape != (3,) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"caption_objects must be 3 non-negative weights (1, 2, 3 objects), got {self.caption_objects}")
        for name in ("attribute_rate", "size_rate", "scene_rate", "scene_bias", "distractor_rate", "short_image_rate",
                     "category_similarity"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        for name in ("noise", "part_noise", "attribute_strength", "distractor_strength", "global_noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.region_dim < 1 or self.global_dim < 1:
            raise ValueError("region_dim and global_dim must be >= 1")


class _World:
    """Vocabulary and prototypes shared by every split of one seed."""

    def __init__(self, cfg: SynthConfig, seed: int):
        rng = np.random.default_rng([seed, 0xACF])
        # Round-robin over categories so a small vocabulary still spans them all.
        pools = [list(v) for v in CATEGORIES.values()]
        cats = list(CATEGORIES)
        self.nouns: List[str] = []
        self.noun_cat: List[int] = []
        i = 0
        while len(self.nouns) < cfg.vocab_size:
            c = i % len(pools)
            if pools[c]:
                self.nouns.append(pools[c].pop(0))
                self.noun_cat.append(c)
            i += 1
        self.noun_cat = np.asarray(self.noun_cat)
        self.colours = COLOURS[: cfg.colours]
        self.scenes = list(SCENES)
        scene_cats = [SCENES[s][1] for s in self.scenes]
        self.scene_fav = [np.flatnonzero(np.isin(self.noun_cat, [cats.index(c) for c in fav])) for fav in scene_cats]
        Dv, Dg = cfg.region_dim, cfg.global_dim
        n, nc = len(self.nouns), len(self.colours)
        cat_dirs = rng.standard_normal((len(cats), Dv))
        own = rng.standard_normal((n, Dv))
        a = cfg.category_similarity
        protos = np.sqrt(1 - a) * own + np.sqrt(a) * cat_dirs[self.noun_cat]
        colour = rng.standard_normal((nc, Dv)) * cfg.attribute_strength
        size = rng.standard_normal((len(SIZES), Dv)) * cfg.attribute_strength
        bg = rng.standard_normal((len(self.scenes) * BACKGROUNDS_PER_SCENE, Dv))
        # One basis; each region is a sparse combination of its rows plus noise.
        self.basis = np.concatenate([protos, colour, size, bg]).astype(np.float32)
        self.off_colour = n
        self.off_size = n + nc
        self.off_bg = n + nc + len(SIZES)
        self.gbasis = np.concatenate(
            [rng.standard_normal((n, Dg)), rng.standard_normal((len(self.scenes), Dg))]
        ).astype(np.float32)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _image_layout(rng, cfg: SynthConfig, world: _World):
    """Scene, objects (noun, colour, size, n_regions) and valid region count of one image."""
    scene = int(rng.integers(len(world.scenes)))
    n_obj = int(rng.integers(cfg.objects_per_image[0], cfg.objects_per_image[1] + 1))
    fav = world.scene_fav[scene]
    chosen: List[int] = []
    while len(chosen) < n_obj:
        pool = fav if (len(fav) and rng.random() < cfg.scene_bias) else np.arange(len(world.nouns))
        o = int(pool[rng.integers(len(pool))])
        if o not in chosen:
            chosen.append(o)
    objects = []
    for o in chosen:
        size = int(rng.integers(3))  # 0 small, 1 large, 2 unremarkable
        r = int(rng.integers(cfg.regions_per_object[0], cfg.regions_per_object[1] + 1))
        r = max(1, r + (1 if size == 1 else -1 if size == 0 else 0))
        objects.append((o, int(rng.integers(len(world.colours))), size, r))
    valid = cfg.regions
    if rng.random() < cfg.short_image_rate:
        # Never fewer rows than the objects need (+1 background where room allows).
        need = min(cfg.regions, sum(r for (_, _, _, r) in objects) + 1)
        valid = int(rng.integers(max(cfg.min_valid_regions, need), cfg.regions + 1))
    return scene, objects, valid


def _caption(rng, cfg: SynthConfig, world: _World, scene: int, objects) -> str:
    weights = np.asarray(cfg.caption_objects, dtype=float)
    k = int(rng.choice(3, p=weights / weights.sum())) + 1
    k = min(k, len(objects))
    salience = np.asarray([r for (_, _, _, r) in objects], dtype=float)
    picked = rng.choice(len(objects), size=k, replace=False, p=salience / salience.sum())
    phrases = []
    for j in picked:
        o, c, s, _ = objects[j]
        person = CATEGORY_NAMES[world.noun_cat[o]] == "person"
        words = []
        if s < 2 and rng.random() < cfg.size_rate:
            words.append((PERSON_SIZES if person else SIZES)[s])
        coloured = rng.random() < cfg.attribute_rate
        if coloured and not person:
            words.append(world.colours[c])
        words.append(world.nouns[o])
        if coloured and person:  # "a man in red", not "a red man"
            words.append("in " + world.colours[c])
        phrases.append(_article(" ".join(words)))
    templates = TEMPLATES[k]
    text = templates[int(rng.integers(len(templates)))]
    if k == 1 and text == "a {0}":
        text = "{0}"
    text = text.format(*phrases)
    if rng.random() < cfg.scene_rate:
        text += " " + SCENES[world.scenes[scene]][0]
    return text


def _chunk(rng, cfg: SynthConfig, world: _World, n: int):
    """Generate n images: regions (n, K, Dv) f32, valid (n, K) bool, globals (n, Dg) f32,
    captions (5n), and a JSON-able description of each image."""
    K, nb = cfg.regions, world.basis.shape[0]
    coef = np.zeros((n, K, nb), dtype=np.float32)
    valid = np.zeros((n, K), dtype=bool)
    gcoef = np.zeros((n, world.gbasis.shape[0]), dtype=np.float32)
    part = np.zeros((n, K), dtype=np.float32)
    captions, described = [], []
    n_nouns = len(world.nouns)
    for i in range(n):
        scene, objects, n_valid = _image_layout(rng, cfg, world)
        valid[i, :n_valid] = True
        slots = rng.permutation(n_valid)  # object regions sit anywhere among the valid rows
        pos = 0
        total = sum(r for (_, _, _, r) in objects)
        present = {o for (o, _, _, _) in objects}
        for o, c, s, r in objects:
            rows = slots[pos : pos + r]
            pos += r
            coef[i, rows, o] = 1.0
            coef[i, rows, world.off_colour + c] = 1.0
            if s < 2:
                coef[i, rows, world.off_size + s] = 1.0
            gcoef[i, o] = r / total
        part[i, slots[:pos]] = 1.0
        for row in slots[pos:]:
            coef[i, row, world.off_bg + scene * BACKGROUNDS_PER_SCENE + int(rng.integers(BACKGROUNDS_PER_SCENE))] = 1.0
            if rng.random() < cfg.distractor_rate:
                absent = int(rng.integers(n_nouns))
                if absent not in present:
                    coef[i, row, absent] = cfg.distractor_strength
        gcoef[i, n_nouns + scene] = 0.5
        captions.extend(_caption(rng, cfg, world, scene, objects) for _ in range(5))
        described.append(
            {
                "scene": world.scenes[scene],
                "objects": [
                    {"noun": world.nouns[o], "colour": world.colours[c], "size": (SIZES + ("",))[s], "regions": r}
                    for (o, c, s, r) in objects
                ],
                "valid_regions": n_valid,
            }
        )
    feats = coef.reshape(n * K, nb) @ world.basis
    feats = feats.reshape(n, K, -1)
    # Part noise: each object region shows its object a little differently, along its
    # own prototype (a scale change), so no two regions of an object are identical.
    if cfg.part_noise:
        feats *= (1.0 + cfg.part_noise * rng.standard_normal((n, K, 1)).astype(np.float32) * part[..., None])
    feats += cfg.noise * rng.standard_normal(feats.shape, dtype=np.float32)
    feats *= valid[..., None]
    glob = gcoef @ world.gbasis
    glob += cfg.global_noise * rng.standard_normal(glob.shape, dtype=np.float32)
    return feats, valid, glob.astype(np.float32), captions, described


_SPLIT_CODES = {"train": 1, "dev": 2, "test": 3, "testall": 4, "val": 5}


def _split_code(name: str) -> int:
    return _SPLIT_CODES.get(name, 100 + sum((i + 1) * ord(ch) for i, ch in enumerate(name)))


def default_sizes(images: int, splits: Sequence[str]) -> Dict[str, int]:
    """Split sizes from a total: test 1/6, dev 1/12, train the rest (6000 -> 4500/500/1000);
    other split names share the total equally."""
    if images < len(splits):
        raise ValueError(f"images = {images} is too few for {len(splits)} splits; need at least one image each")
    if tuple(splits) == ("train", "dev", "test"):
        test = max(1, round(images / 6))
        dev = max(1, round(images / 12))
        return {"train": images - test - dev, "dev": dev, "test": test}
    base, extra = divmod(images, len(splits))
    return {s: base + (1 if i < extra else 0) for i, s in enumerate(splits)}


CHUNK_IMAGES = 128


def write_synthetic(
    folder,
    images: int = 6000,
    seed: int = 0,
    splits: Sequence[str] = ("train", "dev", "test"),
    sizes: Optional[Mapping[str, int]] = None,
    progress: bool = True,
    **knobs,
) -> Path:
    """Write the synthetic set into ``folder`` in the SCAN layout; returns the folder.

    Files per split: ``{split}_ims.npy`` (N, K, Dv) float32, ``{split}_caps.txt`` (5N
    lines), ``{split}_ids.txt`` (N ids), ``{split}_glob.npy`` (N, Dg) float32,
    ``{split}_ims_mask.npy`` (N, K) bool when some image has fewer valid regions, and
    ``{split}_objects.json`` (what each image holds); ``synthetic.json`` records the
    seed, sizes and knobs. Every file is written atomically.

    Args:
        images: total images, divided by :func:`default_sizes` unless ``sizes`` is given.
        seed: same seed and knobs -> identical files.
        sizes: {split: images}, overrides ``images`` for the splits it names.
        **knobs: fields of :class:`SynthConfig` (difficulty), e.g. ``noise=2.0``.
    """
    names = {f.name for f in fields(SynthConfig)}
    unknown = sorted(set(knobs) - names)
    if unknown:
        raise ValueError(f"unknown synthetic-data knob(s) {unknown}; known: {sorted(names)}")
    cfg = SynthConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in knobs.items()})
    cfg.validate()
    if not splits:
        raise ValueError("splits must name at least one split")
    plan = default_sizes(int(images), splits) if sizes is None or set(sizes) != set(splits) else {}
    for s, v in (sizes or {}).items():
        if s not in splits:
            raise ValueError(f"sizes names split {s!r}, which is not in splits {tuple(splits)}")
        plan[s] = int(v)
    for s, v in plan.items():
        if v < 1:
            raise ValueError(f"split {s!r} needs at least 1 image, got {v}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    world = _World(cfg, seed)
    from tqdm.auto import tqdm

    for split in splits:
        N = plan[split]
        K, Dv, Dg = cfg.regions, cfg.region_dim, cfg.global_dim
        captions: List[str] = []
        described: list = []
        mask = np.zeros((N, K), dtype=bool)
        glob = np.zeros((N, Dg), dtype=np.float32)
        with atomic_path(folder / f"{split}_ims.npy", suffix=".npy") as tmp:
            ims = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(N, K, Dv))
            bar = tqdm(total=N, desc=f"synth {split}", unit="img", disable=not progress)
            for c, start in enumerate(range(0, N, CHUNK_IMAGES)):
                n = min(CHUNK_IMAGES, N - start)
                # One generator per (seed, split, chunk): chunks are independent streams.
                rng = np.random.default_rng([seed, _split_code(split), c])
                feats, valid, g, caps, desc = _chunk(rng, cfg, world, n)
                ims[start : start + n] = feats
                mask[start : start + n] = valid
                glob[start : start + n] = g
                captions.extend(caps)
                described.extend(desc)
                bar.update(n)
            bar.close()
            ims.flush()
            del ims
        atomic_save_npy(folder / f"{split}_glob.npy", glob)
        mask_path = folder / f"{split}_ims_mask.npy"
        if not mask.all():
            atomic_save_npy(mask_path, mask)
        elif mask_path.exists():
            mask_path.unlink()  # a stale mask from an earlier run would lie
        (folder / f"{split}_txt2img.npy").unlink(missing_ok=True)  # so would another set's caption map
        atomic_write_lines(folder / f"{split}_caps.txt", captions)
        atomic_write_lines(folder / f"{split}_ids.txt", [f"synth-{split}-{i:06d}" for i in range(N)])
        with atomic_path(folder / f"{split}_objects.json") as tmp:
            tmp.write_text(json.dumps(described, separators=(",", ":")), encoding="utf-8")
    meta = {
        "format_version": FORMAT_VERSION,
        "generator": "acf_fast.data.synth",
        "seed": seed,
        "sizes": {s: plan[s] for s in splits},
        "config": asdict(cfg),
        "vocabulary": {"nouns": world.nouns, "colours": list(world.colours), "sizes": list(SIZES),
                       "scenes": world.scenes},
    }
    with atomic_path(folder / "synthetic.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return folder
