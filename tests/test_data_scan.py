"""The SCAN-layout loader: round trip of the synthetic set, the 5N-row layout, and every
bad input refused with a message naming the file."""
import json
import shutil

import numpy as np
import pytest

from acf_fast.data import check_finite_chunks, load_split, write_synthetic

SMALL = dict(region_dim=40, global_dim=24, short_image_rate=0.5)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth")
    write_synthetic(folder, seed=3, sizes={"train": 7, "dev": 3, "test": 11}, progress=False, **SMALL)
    return folder


@pytest.fixture
def copy(synth, tmp_path):
    """A private copy of the synthetic folder that a test may damage."""
    dst = tmp_path / "data"
    shutil.copytree(synth, dst)
    return dst


def test_round_trip_equals_files(synth):
    for split, n in (("train", 7), ("dev", 3), ("test", 11)):
        s = load_split(synth, split)
        raw = np.load(synth / f"{split}_ims.npy", allow_pickle=False)
        assert isinstance(s.regions, np.memmap) and s.regions.dtype == np.float32
        assert s.regions.shape == (n, 36, 40) and np.array_equal(np.asarray(s.regions), raw)
        assert s.globals.shape == (n, 24)
        assert np.array_equal(s.globals, np.load(synth / f"{split}_glob.npy"))
        lines = (synth / f"{split}_caps.txt").read_text(encoding="utf-8").splitlines()
        assert s.captions == lines and len(lines) == 5 * n
        assert s.txt2img.dtype == np.int64 and s.txt2img.tolist() == [t // 5 for t in range(5 * n)]
        assert s.ids == [f"synth-{split}-{i:06d}" for i in range(n)]
        assert s.name == split and s.folder == synth and s.global_source == "file"
        if s.region_mask is not None:
            assert s.region_mask.dtype == bool and s.region_mask.shape == (n, 36)
            assert (raw[~s.region_mask] == 0).all()  # invalid rows are blank
            assert (np.abs(raw[s.region_mask]).sum(-1) > 0).all()
    assert load_split(synth, "train").region_mask is not None  # half the images are short here


def test_generator_output_is_what_load_returns(synth, tmp_path):
    """Re-running the generator with the same seed writes identical arrays and text,
    and the loader hands back exactly those values."""
    again = tmp_path / "again"
    write_synthetic(again, seed=3, sizes={"train": 7, "dev": 3, "test": 11}, progress=False, **SMALL)
    for split in ("train", "dev", "test"):
        a, b = load_split(synth, split), load_split(again, split)
        assert np.array_equal(a.regions, b.regions) and np.array_equal(a.globals, b.globals)
        assert a.captions == b.captions
        assert (a.region_mask is None) == (b.region_mask is None)


def test_five_rows_per_image_layout(synth, tmp_path):
    folder = tmp_path / "rep"
    folder.mkdir()
    s = load_split(synth, "test")
    np.save(folder / "test_ims.npy", np.repeat(np.asarray(s.regions), 5, axis=0))
    np.save(folder / "test_ims_mask.npy", np.repeat(s.region_mask, 5, axis=0))
    np.save(folder / "test_glob.npy", np.repeat(s.globals, 5, axis=0))
    shutil.copy(synth / "test_caps.txt", folder / "test_caps.txt")
    r = load_split(folder, "test")
    assert r.regions.shape == s.regions.shape
    assert np.array_equal(r.regions, s.regions)
    assert np.array_equal(r.region_mask, s.region_mask) and np.array_equal(r.globals, s.globals)
    # A strided view of the memory map, not a copy of it.
    assert isinstance(r.regions, np.memmap)
    assert r.regions.strides[0] == 5 * 36 * 40 * 4
    assert r.txt2img.tolist() == [t // 5 for t in range(55)]
    assert r.globals is not None and r.ids is None


def test_no_globals_means_region_mean(copy):
    (copy / "dev_glob.npy").unlink()
    s = load_split(copy, "dev")
    assert s.globals is None and s.global_source == "region-mean"


def _expect(folder, split, match):
    with pytest.raises(ValueError, match=match) as info:
        load_split(folder, split)
    return str(info.value)


def test_truncated_npy(copy):
    p = copy / "test_ims.npy"
    data = p.read_bytes()
    p.write_bytes(data[:-100])
    msg = _expect(copy, "test", "truncated")
    assert str(p) in msg


def test_truncated_header(copy):
    p = copy / "test_ims.npy"
    p.write_bytes(p.read_bytes()[:20])
    assert str(p) in _expect(copy, "test", "npy")


def test_object_dtype_npy(copy):
    p = copy / "test_ims.npy"
    arr = np.empty((11, 36), dtype=object)
    np.save(p, arr, allow_pickle=True)
    msg = _expect(copy, "test", "Python objects")
    assert str(p) in msg


def test_object_dtype_globals(copy):
    p = copy / "test_glob.npy"
    np.save(p, np.array([[1.0, "x"]] * 11, dtype=object), allow_pickle=True)
    assert str(p) in _expect(copy, "test", "Python objects")


@pytest.mark.parametrize("row", [0, 6, 10])
def test_nan_in_regions(copy, row):
    p = copy / "test_ims.npy"
    arr = np.load(p)
    arr[row, 35, 7] = np.nan
    np.save(p, arr)
    msg = _expect(copy, "test", "NaN")
    assert str(p) in msg and f"row {row}" in msg


def test_inf_in_globals(copy):
    p = copy / "dev_glob.npy"
    arr = np.load(p)
    arr[2, 0] = np.inf
    np.save(p, arr)
    assert str(p) in _expect(copy, "dev", "NaN or Inf")


def test_check_finite_chunks_streams_by_rows(tmp_path):
    p = tmp_path / "a.npy"
    arr = np.zeros((50, 3, 4), dtype=np.float32)
    arr[37, 2, 3] = np.nan
    np.save(p, arr)
    mm = np.load(p, mmap_mode="r", allow_pickle=False)
    for chunk in (1, 48, 48 * 7, 10**9):  # one row, several rows, everything
        with pytest.raises(ValueError, match="row 37"):
            check_finite_chunks(mm, p, chunk_bytes=chunk)
    check_finite_chunks(mm[:37], p, chunk_bytes=48)  # clean part passes


def test_caption_count_mismatch(copy):
    p = copy / "dev_caps.txt"
    lines = p.read_text().splitlines()
    p.write_text("\n".join(lines[:-1]) + "\n")
    msg = _expect(copy, "dev", "do not match")
    assert str(p) in msg and "14 captions" in msg


def test_wrong_ndim(copy):
    p = copy / "dev_ims.npy"
    np.save(p, np.zeros((3, 40), dtype=np.float32))
    msg = _expect(copy, "dev", "3-D")
    assert str(p) in msg


def test_integer_features_refused(copy):
    p = copy / "dev_ims.npy"
    np.save(p, np.zeros((3, 36, 40), dtype=np.int32))
    assert str(p) in _expect(copy, "dev", "dtype")


def test_mask_shape_mismatch(copy):
    p = copy / "test_ims_mask.npy"
    np.save(p, np.ones((11, 35), dtype=bool))
    assert str(p) in _expect(copy, "test", "columns")
    np.save(p, np.ones((10, 36), dtype=bool))
    assert str(p) in _expect(copy, "test", "rows")
    np.save(p, np.ones((11, 36, 1), dtype=bool))
    assert str(p) in _expect(copy, "test", "2-D")


def test_mask_with_empty_image(copy):
    p = copy / "test_ims_mask.npy"
    m = np.ones((11, 36), dtype=bool)
    m[4] = False
    np.save(p, m)
    assert str(p) in _expect(copy, "test", "image 4 has no valid region")


def test_glob_rows_mismatch(copy):
    p = copy / "test_glob.npy"
    np.save(p, np.zeros((12, 24), dtype=np.float32))
    assert str(p) in _expect(copy, "test", "rows")


def test_ids_count_mismatch(copy):
    p = copy / "test_ids.txt"
    p.write_text("a\nb\n")
    assert str(p) in _expect(copy, "test", "ids")


def test_empty_caption_line(copy):
    p = copy / "test_caps.txt"
    lines = p.read_text().splitlines()
    lines[3] = "  "
    p.write_text("\n".join(lines) + "\n")
    assert str(p) in _expect(copy, "test", "line 4")


def test_missing_files(copy, tmp_path):
    with pytest.raises(FileNotFoundError, match="valid_ims.npy"):
        load_split(copy, "valid")
    (copy / "test_caps.txt").unlink()
    with pytest.raises(FileNotFoundError, match="test_caps.txt"):
        load_split(copy, "test")
    with pytest.raises(FileNotFoundError):
        load_split(tmp_path / "nowhere", "test")


def test_objects_json_written(synth):
    desc = json.loads((synth / "test_objects.json").read_text())
    assert len(desc) == 11 and all(3 <= len(d["objects"]) <= 6 for d in desc)
