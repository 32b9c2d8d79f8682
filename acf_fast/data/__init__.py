"""Data layer: the SCAN precomputed layout, the embedded synthetic set, caption encoding.

    split = load_split(folder, "test")            # memory-mapped, validated
    write_synthetic(folder, images=6000, seed=0)  # spec §7, SCAN layout
    encode_split(folder, "test", encoder)         # {split}_words.safetensors, cached
    words, mask = load_encoded(folder, "test")
"""
from .checks import check_finite_chunks
from .encode import encode_split, load_encoded
from .scan import Split, check_folder, load_split
from .synth import SynthConfig, write_synthetic

__all__ = [
    "Split",
    "load_split",
    "check_folder",
    "check_finite_chunks",
    "write_synthetic",
    "SynthConfig",
    "encode_split",
    "load_encoded",
]
