"""Library log noise safegen expects and hides (a leaf: any layer may use it)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


@contextmanager
def quiet_diffusers() -> Iterator[None]:
    """Diffusers' logger held at ERROR for the block, restored after: for the warnings safegen knows to be
    harmless where it uses this (a LoRA with no text-encoder keys, components passed in by the caller, a prompt
    longer than the encoder's window)."""
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
