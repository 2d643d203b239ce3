"""The guard interface every safety method implements."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import GuardError, guarded  # noqa: F401  (re-exported: guards raise and wrap with these)

if TYPE_CHECKING:  # pragma: no cover
    from ..protection import Call, Protection

#: How strongly a policy action acts: when several flagged categories disagree, the strongest one applies.
ACTION_RANK = {"log": 0, "steer": 1, "block": 2}

#: Order in which guards run inside one call, whatever order the user lists them in.
STAGES = ("prompt", "conditioning", "loop", "weights", "output")


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


def has_text_encoder(pipe) -> bool:
    """Whether the pipeline has a text encoder with its tokenizer (a pipeline built with ``text_encoder=None``
    that is fed only ``prompt_embeds`` has none)."""
    pairs = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3"))
    return any(getattr(pipe, te, None) is not None and getattr(pipe, tok, None) is not None for te, tok in pairs)


def unreadable_call(call, guard: str, why: str) -> None:
    """What a guard does with a call it cannot read (embeddings only, and it needs text or a text encoder): the
    policy's ``embeddings_only`` setting decides. ``"block"`` (the default: fail closed) blocks every item;
    ``"allow"`` lets them through unchecked, the report saying so (verdict ``log``)."""
    mode = getattr(call.policy, "embeddings_only", "block")
    if mode == "allow":
        for item in range(call.n_items):
            res = call.result(item, guard)
            res.verdict = "log"
            res.reason = f"not checked: {why} (policy embeddings_only: allow)"
        return
    for b in range(call.batch_size):
        if not call.blocked_prompts[b]:
            call.block_prompt(b, guard, f"cannot check this call: {why}; blocked (policy embeddings_only: block)")
