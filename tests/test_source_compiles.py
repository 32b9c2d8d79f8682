"""Every Python file of the checkout compiles without a warning. An invalid escape such as
"\\|" in a normal string is a DeprecationWarning on Python 3.11 (hidden), a SyntaxWarning on
3.12 (the GPU machine's, where bench/readme.py printed one) and meant to become an error."""
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_source_compiles_without_warnings():
    sources = [ROOT / "setup.py"] + [p for d in ("acf_fast", "kernels", "bench", "tests") for p in (ROOT / d).rglob("*.py")]
    assert len(sources) > 50 and ROOT / "kernels" / "tiles.py" in sources
    bad = []
    for path in sorted(sources):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                compile(path.read_text(encoding="utf-8"), str(path), "exec")
            except SyntaxError as e:  # what a warning becomes here
                bad.append(f"{path.relative_to(ROOT)}:{e.lineno}: {e.msg}")
    assert not bad, "\n".join(bad)
