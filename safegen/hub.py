"""Loading models by local path or hub id, failing fast and clearly when the hub is out of reach."""

from __future__ import annotations

import os
from pathlib import Path


class OfflineModelError(OSError):
    """A hub id was given while ``HF_HUB_OFFLINE=1`` and the model is not in the local cache."""


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def check_loadable(name_or_path: str | os.PathLike) -> None:
    """Raise a clear error *before* a load that could only fail (or hang for minutes on retries).

    A local folder must exist. A hub id is allowed online; offline it must already be in the local cache.

    Example:
        >>> import os; os.environ["HF_HUB_OFFLINE"] = "1"
        >>> check_loadable("no-such-user/no-such-model")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        OfflineModelError: ...
    """
    s = str(name_or_path)
    p = Path(s).expanduser()
    if p.exists():
        if not p.is_dir():
            raise FileNotFoundError(f"{s} is a file; pass the model *folder* (the one with model_index.json/config.json)")
        return
    if s.startswith((".", "/", "~")) or s.count("/") > 1:
        raise FileNotFoundError(f"model folder {s} does not exist")
    if s.count("/") != 1:
        raise FileNotFoundError(f"{s!r} is neither an existing folder nor a hub id of the form 'owner/name'")
    if is_offline():
        try:
            from huggingface_hub import scan_cache_dir

            cached = {r.repo_id for r in scan_cache_dir().repos}
        except Exception:  # no cache folder at all
            cached = set()
        if s not in cached:
            raise OfflineModelError(
                f"{s!r} looks like a Hugging Face hub id, but HF_HUB_OFFLINE=1 and it is not in the local cache. "
                "Pass a local folder, or `export HF_HUB_OFFLINE=0` on a machine with internet access to download it."
            )
