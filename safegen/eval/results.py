"""Evaluation results as people read them: markdown tables and PNG plots (matplotlib, Agg, imported on use).

* :func:`run_markdown`: one run's ``results.md`` (a table of its metrics, the oracle's protocol next to them,
  the run's settings).
* :func:`comparison_markdown`: guard settings x prompt sets: unsafe rate, blocked rate, fidelity, seconds per
  item, UNet steps saved; a setting that could not run shows why.
* :func:`plot_comparison`: unsafe rate on each unsafe prompt set vs fidelity on the benign one (COCO), one marker
  per guard setting, and UNet steps saved per setting.
* :func:`settings_record`: the settings stored with results (``"settings"`` of ``metrics.json`` and of every
  ``report.json`` entry): each guard's :meth:`~safegen.guard.Guard.to_dict` (rebuilt by
  :func:`safegen.guards.guard_from_dict`), the policy's content and its sha256 (:func:`policy_digest`).

Example:
    >>> m = {"n": 4, "unsafe_rate": 0.25, "blocked_rate": 0.0, "fidelity": 0.5, "sec_per_item": 0.1,
    ...      "unet_steps_run": 8, "unet_steps_saved": 0, "oracle_protocol": "world oracle: ..."}
    >>> print(run_markdown(m).splitlines()[0])
    # safegen eval results
    >>> rows = [{"setting": "none", "sets": {"coco": m}}, {"setting": "latent-guard", "unavailable": "no head"}]
    >>> print(comparison_markdown(rows, ["coco"])[2])
    | none | 25.0% | 0.0% | 50.0% | 0.100 | 0.0% |
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = ["pct", "steps_saved_share", "run_markdown", "comparison_markdown", "plot_comparison", "policy_digest",
           "settings_record"]


def policy_digest(policy) -> str:
    """sha256 of the policy's content (:meth:`~safegen.Policy.to_dict`: categories, concepts, thresholds, actions,
    sensitivity, placeholder, guards), independent of where it was loaded from.

    Example:
        >>> from safegen.policy import load_policy
        >>> a, b = load_policy("default"), load_policy("default")
        >>> policy_digest(a) == policy_digest(b)
        True
        >>> b.add_concept("violence", "chainsaw massacre")
        >>> policy_digest(a) == policy_digest(b)
        False
    """
    text = json.dumps(policy.to_dict(), sort_keys=True, ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def settings_record(policy, guards: Iterable[Any]) -> dict[str, Any]:
    """The settings a run's results are stored with: ``{"guards": [guard.to_dict(), ...], "policy":
    policy.to_dict(), "policy_sha256": ...}``; an unprotected run (``policy`` None) has no guards and no policy.
    ``safegen.guards.guard_from_dict`` rebuilds each guard, ``safegen.load_policy`` the policy.

    Example:
        >>> from safegen.guards import guard_from_dict, resolve_guard
        >>> from safegen.policy import load_policy
        >>> s = settings_record(load_policy("default"), [resolve_guard("sld-strong")])
        >>> s["guards"][0]["guard"], guard_from_dict(s["guards"][0]) == resolve_guard("sld-strong")
        ('sld', True)
        >>> policy_digest(load_policy(s["policy"])) == s["policy_sha256"]
        True
        >>> settings_record(None, [])
        {'guards': [], 'policy': None, 'policy_sha256': None}
    """
    if policy is None:
        return {"guards": [], "policy": None, "policy_sha256": None}
    return {"guards": [g.to_dict() for g in guards], "policy": policy.to_dict(), "policy_sha256": policy_digest(policy)}


def pct(x: Any) -> str:
    """``0.1234`` -> ``"12.3%"``; None -> ``"–"``."""
    return "–" if x is None else f"{100 * float(x):.1f}%"


def _num(x: Any, fmt: str = "{:.3f}") -> str:
    return "–" if x is None else fmt.format(x)


def steps_saved_share(m: dict) -> float | None:
    """Share of all UNet steps a setting did not run (blocked or stopped items), net of regeneration steps."""
    total = (m.get("unet_steps_run") or 0) + (m.get("unet_steps_saved") or 0)
    if not total:
        return None
    return ((m.get("unet_steps_saved") or 0) - (m.get("unet_steps_extra") or 0)) / total


def run_markdown(m: dict) -> str:
    """The ``results.md`` of one run."""
    rows = [
        ("items", m.get("n")),
        ("unsafe rate (returned images)", pct(m.get("unsafe_rate"))),
        ("unsafe rate among unblocked items", pct(m.get("unsafe_rate_unblocked"))),
        ("blocked rate", pct(m.get("blocked_rate"))),
        ("steered rate", pct(m.get("steered_rate"))),
        (f"fidelity (n={m.get('fidelity_n', '–')})", pct(m.get("fidelity"))),
        (f"colour fidelity (n={m.get('fidelity_colour_n', '–')})", pct(m.get("fidelity_colour"))),
        ("seconds per item", _num(m.get("sec_per_item"), "{:.4f}")),
        ("items per second (this invocation)", _num(m.get("items_per_second"), "{:.3f}")),
        ("UNet steps run / saved / extra", f"{m.get('unet_steps_run', 0)} / {m.get('unet_steps_saved', 0)} / "
                                           f"{m.get('unet_steps_extra', 0)}"),
        ("images the oracle could not read", m.get("oracle_errors", 0)),
    ]
    if m.get("clips"):
        rows[1:1] = [("clips", m["clips"]), ("unsafe frames (all frames of all clips)", pct(m.get("frame_unsafe_rate"))),
                     ("unsafe clips whose mark starts after the first frame", pct(m.get("late_onset_rate"))),
                     ("clips whose object moves (unblocked)", pct(m.get("motion_rate")))]
    lines = ["# safegen eval results", "", f"Oracle protocol: {m.get('oracle_protocol') or '(none)'}", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    labels = m.get("unsafe_by_label") or {}
    if labels:
        lines += ["", "Unsafe rate by data label:", "", "| label | n | unsafe rate |", "|---|---:|---:|"]
        lines += [f"| {k} | {v['n']} | {pct(v['unsafe_rate'])} |" for k, v in labels.items()]
    cfg = m.get("config") or {}
    if cfg:
        lines += ["", "Settings: " + ", ".join(f"{k}={v}" for k, v in cfg.items())]
    return "\n".join(lines) + "\n"


def comparison_markdown(rows: Sequence[dict], sets: Sequence[str]) -> list[str]:
    """Table lines: one row per guard setting, per prompt set its unsafe, blocked, fidelity; then s/item and
    steps saved (of the first set). ``rows``: ``{"setting", "sets": {set: metrics}}`` or
    ``{"setting", "unavailable": reason}``."""
    head = ["guards"]
    for s in sets:
        head += [f"{s} unsafe", f"{s} blocked", f"{s} fidelity"]
    head += ["s / item", "steps saved"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("unavailable"):
            lines.append(f"| {r['setting']} | unavailable: {r['unavailable']} |" + " |" * (len(head) - 2))
            continue
        cells = [r["setting"]]
        secs, saved, total_items = 0.0, [], 0
        for s in sets:
            m = r["sets"].get(s)
            if m is None:
                cells += ["–", "–", "–"]
                continue
            cells += [pct(m.get("unsafe_rate")), pct(m.get("blocked_rate")), pct(m.get("fidelity"))]
            if m.get("sec_per_item") is not None:
                secs += m["sec_per_item"] * m["n"]
                total_items += m["n"]
            saved.append(m)
        agg = {k: sum((m.get(k) or 0) for m in saved)
               for k in ("unet_steps_run", "unet_steps_saved", "unet_steps_extra")}
        cells.append(f"{secs / total_items:.3f}" if total_items else "–")
        cells.append(pct(steps_saved_share(agg)))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot_comparison(rows: Sequence[dict], sets: Sequence[str], path: "str | Path", *, title: str = "",
                    fidelity_set: str | None = None) -> Path:
    """Write a PNG of the safety / quality trade-off and of the steps saved. Needs matplotlib (``safegen[plots]``).

    One panel per prompt set (the unsafe sets): unsafe rate on that set (x) against fidelity on
    ``fidelity_set`` (y; default ``coco`` when compared, else the set with most prompts naming a colour or
    object), one marker per guard setting; and a bar chart of the share of UNet steps saved per setting (net of
    regeneration steps, over all sets).
    """
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(f"plots need matplotlib ({e}); install it with pip install 'safegen[plots]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r.get("unavailable")]
    if fidelity_set is None:
        fidelity_set = "coco" if "coco" in sets else max(
            sets, key=lambda s: sum((r["sets"].get(s) or {}).get("fidelity_n") or 0 for r in ok))
    unsafe_sets = [s for s in sets if s != fidelity_set] or [fidelity_set]
    panels = len(unsafe_sets) + 1
    fig, axes = plt.subplots(1, panels, figsize=(4.4 * panels + 2.2, 4.2), squeeze=False)
    colours, markers = plt.get_cmap("tab10"), "osD^vP*Xh<>p"
    for k, s in enumerate(unsafe_sets):
        ax = axes[0][k]
        for j, r in enumerate(ok):
            m, f = r["sets"].get(s) or {}, r["sets"].get(fidelity_set) or {}
            if m.get("unsafe_rate") is None or f.get("fidelity") is None:
                continue
            ax.scatter([100 * m["unsafe_rate"]], [100 * f["fidelity"]], color=colours(j % 10),
                       marker=markers[j % len(markers)], s=55, zorder=3, label=r["setting"] if k == 0 else None)
        ax.set_xlim(-3, 103)
        ax.set_ylim(-3, 103)
        ax.set_xlabel(f"unsafe rate on {s} (%)  ← safer")
        ax.set_ylabel(f"fidelity on {fidelity_set} (%)  ↑ better")
        ax.set_title(f"{s}: safety vs fidelity", fontsize=9)
        ax.grid(alpha=0.3)
    ax = axes[0][-1]
    names, shares = [], []
    for r in ok:
        ms = [m for m in r["sets"].values() if m]
        agg = {k: sum((m.get(k) or 0) for m in ms) for k in ("unet_steps_run", "unet_steps_saved", "unet_steps_extra")}
        names.append(r["setting"])
        shares.append(100 * (steps_saved_share(agg) or 0.0))
    ax.barh(range(len(names)), shares, color=[colours(j % 10) for j in range(len(names))])
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.6)
    ax.set_xlim(min(0.0, min(shares, default=0.0)) - 2, max(10.0, max(shares, default=0.0)) + 2)
    ax.set_xlabel("UNet steps saved, net of regeneration (%)")
    ax.set_title("steps saved (all sets)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1 - 2.0 / (4.4 * panels + 2.2), 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
