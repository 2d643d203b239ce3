"""Safe Latent Diffusion (placeholder: being written)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Guard


@dataclass(repr=False)
class SLD(Guard):
    name: ClassVar[str] = "sld"

    @classmethod
    def weak(cls): return cls()
    @classmethod
    def medium(cls): return cls()
    @classmethod
    def strong(cls): return cls()
    @classmethod
    def max(cls): return cls()
