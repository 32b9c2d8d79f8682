"""acf-fast: fast, faithful ACF / ACF-R+ image-text retrieval.

The functional entry point is :func:`acf_similarity` (spec §3), and
:func:`acf_similarity_pairs` for a list of (image, text) pairs; the model is
:class:`acf_fast.model.ACF`. Triton kernels live in ``acf_fast.kernels``.
"""
from ._source_tree import install as _install_source_tree

_install_source_tree()

from .similarity import BACKENDS, VARIANTS, Variant, acf_similarity  # noqa: E402
from .pairs import acf_similarity_pairs  # noqa: E402

__version__ = "0.1.0"
__all__ = ["acf_similarity", "acf_similarity_pairs", "BACKENDS", "VARIANTS", "Variant", "__version__"]
