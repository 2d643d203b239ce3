"""Where safegen's data lives: the ``assets/`` folder (policies, small weights, the embedded default model) and the
demo app.

The repo keeps ``assets/`` and ``demos/`` at top level. The wheel carries them inside the package, as
``safegen/assets/`` and ``safegen/demos/`` (``package-dir`` in pyproject.toml); a checkout and an editable install
(``pip install -e .``) read the top-level folders beside ``safegen/``. Both layouts are found without configuration.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path


def _shipped(name: str) -> Path | None:
    """The folder ``name`` (``"assets"``, ``"demos"``) of this installation, or ``None``."""
    here = Path(__file__).resolve().parent
    # an installed wheel: safegen/<name>/; a checkout or an editable install: the top-level folder beside safegen/
    return next((c for c in (here / name, here.parent / name) if c.is_dir()), None)


@lru_cache(maxsize=None)
def assets_dir() -> Path:
    """The ``assets/`` folder: ``$SAFEGEN_ASSETS`` if set, else the one this installation carries."""
    env = os.environ.get("SAFEGEN_ASSETS")
    if env:
        return Path(env)
    found = _shipped("assets")
    if found is None:
        raise FileNotFoundError(
            f"safegen could not find its assets/ folder (looked in {Path(__file__).resolve().parent}/assets and "
            "beside the package); reinstall safegen (pip install safegen, or pip install -e . in a checkout) or "
            "set SAFEGEN_ASSETS to the folder"
        )
    return found


def demo_app_path() -> Path:
    """The Gradio app ``demos/app.py`` (``safegen/demos/app.py`` in an installed wheel). The path is returned even
    when the file is missing, so the caller can say which file it looked for."""
    folder = _shipped("demos")
    return (folder if folder is not None else Path(__file__).resolve().parent.parent / "demos") / "app.py"
