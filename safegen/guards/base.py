"""The guard interface every safety method implements."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable, ClassVar

if TYPE_CHECKING:  # pragma: no cover
    from ..protection import Call, Protection

#: Order in which guards run inside one call, whatever order the user lists them in.
STAGES = ("prompt", "conditioning", "loop", "weights", "output")


class GuardError(RuntimeError):
    """Raised (and caught by the orchestrator) when a guard fails; the call then fails closed."""

    def __init__(self, guard: str, error: BaseException):
        super().__init__(f"guard {guard!r} failed: {type(error).__name__}: {error}")
        self.guard = guard
        self.error = error


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


class Guard:
    """Base class of all guards.

    A guard is a small config (its dataclass fields) plus the code that hooks it in. Lifecycle:

    * :meth:`attach` once at :func:`safegen.protect` time: check the pipeline is supported, cache what does
      not depend on the prompt (concept bases);
    * per pipeline call: :meth:`prepare` before the loop (may change conditioning, register per-call module
      hooks, or block items), :meth:`step_end` after each denoising step (only if ``tensor_inputs`` is
      not ``None``), :meth:`finish` after the loop (fills reports, removes per-call hooks);
    * :meth:`detach` at :func:`safegen.unprotect` time: restore anything :meth:`attach` changed.

    Anything a guard raises is turned into a fail-closed block of the affected items.
    """

    name: ClassVar[str] = "guard"
    stage: ClassVar[str] = "conditioning"
    #: Callback tensors the guard needs in :meth:`step_end`; ``None`` means it has no step hook.
    tensor_inputs: ClassVar[tuple[str, ...] | None] = None
    #: Whether :meth:`prepare` reads ``call.conditioning()`` (computed before any guard runs).
    needs_conditioning: ClassVar[bool] = False

    def attach(self, protection: "Protection") -> None:
        pass

    def detach(self, protection: "Protection") -> None:
        pass

    def prepare(self, call: "Call") -> None:
        pass

    def step_end(self, call: "Call", step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any] | None:
        return None

    def finish(self, call: "Call") -> None:
        pass

    def config_dict(self) -> dict[str, Any]:
        from dataclasses import asdict, is_dataclass

        return asdict(self) if is_dataclass(self) else {}

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.config_dict().items())
        return f"{type(self).__name__}({fields})"
