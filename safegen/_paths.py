"""Where the project's assets live (policies, small weights, the embedded default model)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=None)
def assets_dir() -> Path:
    """The ``assets/`` folder: ``$SAFEGEN_ASSETS`` if set, else the one beside the installed package."""
    env = os.environ.get("SAFEGEN_ASSETS")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for cand in (here / "assets", here.parent / "assets"):
        if cand.is_dir():
            return cand
    raise FileNotFoundError(
        "safegen could not find its assets/ folder; install the package from a checkout (pip install -e .) "
        "or set SAFEGEN_ASSETS to the folder"
    )
