"""gruexp: character-level GRU language models on The Time Machine (d2l's GRU chapter)."""

import os
from pathlib import Path

from gruexp.errors import UserError  # the package's public error type

__all__ = ["UserError", "cache_dir"]

__version__ = "0.1.0"


def cache_dir() -> Path:
    """gruexp's user cache (the downloaded corpus, compiled kernels): $XDG_CACHE_HOME/gruexp or ~/.cache/gruexp."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gruexp"
