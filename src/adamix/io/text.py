"""Text that ships with gensim (the default calibration text and the held-out evaluation texts), and
reading a calibration file."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import AdamixError


def gensim_file(name: str, why: str, instead: str = "") -> Path:
    """gensim's test_data/<name> (the package is found, never imported). When gensim is missing the
    error reads "<why>: pip install gensim==4.4.0<instead>"."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise AdamixError(f"{why}: pip install gensim==4.4.0{instead}")
    return Path(spec.submodule_search_locations[0]) / "test" / "test_data" / name


def default_calibration_file() -> Path:
    """gensim's lee_background.cor (news text that ships inside the gensim package)."""
    path = gensim_file("lee_background.cor", "the default calibration text ships with gensim",
                       ", or pass --calib FILE (or --calib none for the data-free mode)")
    if not path.is_file():
        raise AdamixError(f"{path} is missing from the installed gensim; pass --calib FILE")
    return path


def read_text(path: Path) -> str:
    """A calibration file's text (one AdamixError if it cannot be read or is empty)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise AdamixError(f"calibration file {path}: {e.strerror}") from None
    if not text.strip():
        raise AdamixError(f"calibration file {path} is empty")
    return text
