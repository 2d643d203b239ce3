"""Exceptions shared across safegen's layers (a leaf module: it imports nothing of safegen)."""

from __future__ import annotations

import functools
from typing import Callable


class GuardError(RuntimeError):
    """Raised (and caught by the orchestrator) when a guard fails; the call then fails closed."""

    def __init__(self, guard: str, error: BaseException):
        super().__init__(f"guard {guard!r} failed: {type(error).__name__}: {error}")
        self.guard = guard
        self.error = error


class GuardUnavailable(ValueError):
    """A guard cannot run on this pipeline: it needs weights trained for this model (LVD's classifier, a
    pipeline-backbone Latent Guard head, the output classifier) or a package that is not installed (NudeNet).
    :func:`safegen.protect` with a policy whose ``skip_unavailable`` is true (the default policy) skips such a
    guard from the policy's own list and says so in every report; a guard asked for by name fails with this
    error, which says what to do."""


class NonFiniteError(ValueError):
    """A guard met a NaN or infinite number (a score, a threshold, a latent) where it must decide: the affected
    items are blocked with verdict ``"error"`` (``x >= t`` is false for NaN, so deciding on it would pass)."""


class TrainingDivergedError(RuntimeError):
    """A training run met a NaN or infinite loss: the step is not applied and the run stops (the last checkpoint
    is intact; resume it with a lower learning rate). The CLI reports it in one line, exit code 1."""


def guarded(guard: str, fn: Callable) -> Callable:
    """Wrap a hook that runs inside the pipeline (UNet/module hooks): its errors become :class:`GuardError`,
    so the orchestrator fails the call closed instead of passing a raw exception to the user."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GuardError:
            raise
        except Exception as e:
            raise GuardError(guard, e) from e

    return run
