"""The evaluation harness behind ``safegen eval`` / ``python -m safegen.eval``: deterministic, resumable, sharded.

* **Plan.** A run is a fixed list of items: ``index``, ``prompt``, ``seed`` (``seed + index``, or the data's
  ``evaluation_seed``) and an optional data ``label``. Item ``i`` is generated with a CPU generator seeded with its
  own seed, so its image depends neither on the batch size nor on which process runs it.
* **Batches and shards.** Batch ``k`` is always plan items ``[k*B, (k+1)*B)``; under ``accelerate launch`` (or any
  launcher that sets ``WORLD_SIZE``/``RANK``) process ``r`` of ``W`` runs batches ``k % W == r``. Every item is
  computed in the same batch whatever the number of processes, so sharding changes no result.
* **Resume.** Each process appends its finished items to its own JSON-lines file after every batch (flushed):
  ``items.jsonl`` for process 0, ``items.rank{r}.jsonl`` for the others. A rerun with the same ``--out`` reads them
  all, skips the items that are done (a batch is redone only if one of its items is missing, and only the missing
  items are written) and ends with exactly the metrics of an uninterrupted run. ``run.json`` fingerprints the
  settings that decide results (``safegen eval`` adds the policy's content and the sha256 of the model's and the
  guards' weight files); a rerun with other settings is refused, naming what differs (``overwrite`` starts
  afresh). ``run.json`` also keeps the digests of the files it hashed, by size and modification time, so a resume
  does not read unchanged weights again.
* **Merge.** After a barrier, process 0 merges the files into one ``items.jsonl`` (sorted by index), and writes
  ``metrics.json`` (:func:`compute_metrics`, plus the run's config) and ``results.md`` (a markdown table with the
  oracle's protocol).

Metrics (:func:`compute_metrics`; :func:`evaluate` is the in-memory version):

* ``n``: prompts evaluated; ``blocked_rate`` / ``steered_rate``: share of items a guard blocked / steered.
* ``unsafe_rate``: share of items whose *returned* image the oracle finds unsafe. A blocked item returns the
  policy's placeholder, which the oracle judges like any other image (a flat placeholder is safe), so this is
  what a user of the service would see. ``unsafe_rate_unblocked`` is the same among items that were not blocked.
* ``fidelity``: share of prompts naming a colour or an object whose image shows it (:func:`safegen.world.fidelity`);
  ``fidelity_colour``: the same on prompts that name a colour; ``fidelity_n`` / ``fidelity_colour_n`` count them.
* ``sec_per_item``: wall time of the generation calls per prompt (model loading excluded).
* ``unet_steps_run`` / ``unet_steps_saved``: totals over all items, from the safety reports (an unprotected run
  runs every step); ``blocked_steps_saved_share``: the share of UNet steps skipped on blocked items.
* ``unsafe_by_category``: oracle findings per category; ``unsafe_by_label``: ``n`` and unsafe rate per data label
  (e.g. the CoProV2 category of the prompt).
* ``unet_steps_extra``: UNet steps spent regenerating (the output guard's ``regenerate`` action);
  ``oracle_errors``: items the oracle could not read (reported on the item as ``oracle_error``; rates leave them
  out). ``oracle_protocol`` says exactly how the oracle judged, next to every number.
* For videos judged by the world oracle (clips): ``clips``, ``frame_unsafe_rate`` (share of all frames with a
  mark), ``late_onset_rate`` (unsafe clips whose first marked frame is not the first) and ``motion_rate``; each
  item has ``frames``, ``frames_unsafe``, ``onset`` and ``motion``.

Example:
    >>> import tempfile
    >>> from safegen.testing import tiny_sd_pipeline
    >>> from safegen.eval.harness import make_plan, run_eval
    >>> out = tempfile.mkdtemp()
    >>> plan = make_plan(["a red bus", "a blue cat", "a green dog"], seed=5)
    >>> [(it["index"], it["seed"]) for it in plan]
    [(0, 5), (1, 6), (2, 7)]
    >>> m, items = run_eval(tiny_sd_pipeline(), plan, out, oracle="world", steps=2, batch_size=2, progress=False)
    >>> m["n"], m["unet_steps_run"], sorted(p.name for p in __import__("pathlib").Path(out).iterdir())
    (3, 6, ['items.jsonl', 'metrics.json', 'results.md', 'run.json'])
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .oracles import ImageOracle, get_oracle

__all__ = ["TIMING_FIELDS", "RUN_FIELDS", "Dist", "make_plan", "batches_for", "read_done", "run_items", "compute_metrics",
           "run_eval", "judge_files", "stored_digests"]

#: Metrics that measure time, not results.
TIMING_FIELDS = ("sec_per_item", "wall_seconds", "items_per_second")
#: Metrics that describe how a run went (time, processes, items found done): the only ones that may differ between
#: an uninterrupted run, a resumed one and a sharded one.
RUN_FIELDS = TIMING_FIELDS + ("processes", "resumed_items")
ITEMS = "items.jsonl"
RUN = "run.json"


# ---------------------------------------------------------------------- processes
@dataclass
class Dist:
    """Which process this is, of how many; ``barrier`` waits for all of them (accelerate's ``PartialState``)."""

    rank: int = 0
    world: int = 1
    state: Any = None

    @classmethod
    def detect(cls) -> "Dist":
        """One process unless a launcher set ``WORLD_SIZE`` > 1 (then accelerate's ``PartialState``)."""
        if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
            return cls()
        import torch
        from accelerate import PartialState

        # without a GPU, accelerate only forms a process group when told to use the CPU (gloo)
        state = PartialState(cpu=not torch.cuda.is_available())
        return cls(int(state.process_index), int(state.num_processes), state)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self):
        return None if self.state is None else self.state.device

    def barrier(self) -> None:
        if self.state is not None and self.world > 1:
            self.state.wait_for_everyone()


# ---------------------------------------------------------------------- the plan
def make_plan(prompts: Sequence[Any], *, seed: int = 0, seeds: Sequence[int] | None = None,
              labels: Sequence[str | None] | None = None, seed_from_data: bool = False) -> list[dict]:
    """One dict per prompt: ``index``, ``prompt``, ``seed`` and, when known, ``label``.

    ``prompts`` are strings or :class:`safegen.eval.datasets.PromptRecord` (whose ``label`` is kept, and whose ``seed``
    is used with ``seed_from_data``). Otherwise item ``i`` gets ``seeds[i]`` if given, else ``seed + i``.
    """
    plan = []
    for i, p in enumerate(prompts):
        text, data_seed, label = (p, None, None) if isinstance(p, str) else (p.prompt, p.seed, p.label)
        if labels is not None:
            label = labels[i]
        if seeds is not None:
            s = int(seeds[i])
        elif seed_from_data:
            if data_seed is None:
                raise ValueError(f"prompt {i} ({text[:60]!r}) has no evaluation_seed in the data; drop "
                                 "--seed-from-data or use data that has one")
            s = int(data_seed)
        else:
            s = int(seed) + i
        item = {"index": i, "prompt": text, "seed": s}
        if label is not None:
            item["label"] = label
        plan.append(item)
    if not plan:
        raise ValueError("no prompts to evaluate")
    return plan


def batches_for(n: int, batch_size: int, rank: int = 0, world: int = 1) -> list[range]:
    """The batches process ``rank`` of ``world`` runs: batch ``k`` = items ``[k*B, (k+1)*B)``, ``k % world == rank``.

    Example:
        >>> batches_for(7, 2, rank=1, world=2)
        [range(2, 4), range(6, 7)]
    """
    all_batches = [range(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]
    return all_batches[rank::world]


# ---------------------------------------------------------------------- item files
def _item_files(out_dir: Path) -> list[Path]:
    return [p for p in [out_dir / ITEMS, *sorted(out_dir.glob("items.rank*.jsonl"))] if p.is_file()]


def read_done(out_dir: "str | Path", plan: Sequence[dict] | None = None) -> dict[int, dict]:
    """Items already written to ``out_dir`` by any process, by index (a torn last line is ignored).

    With ``plan``, every item must be the plan's item of that index (same prompt and seed), else ``ValueError``.
    """
    out_dir = Path(out_dir)
    done: dict[int, dict] = {}
    for path in _item_files(out_dir):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                item = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if isinstance(item, dict) and isinstance(item.get("index"), int):
                done[item["index"]] = item
    if plan is not None:
        for i, item in done.items():
            want = plan[i] if 0 <= i < len(plan) else None
            if want is None or want["prompt"] != item.get("prompt") or want["seed"] != item.get("seed"):
                raise ValueError(f"{out_dir} holds item {i} of another run (different prompt or seed); use another "
                                 "--out, or --overwrite to start afresh")
    return done


class _Appender:
    """Appends JSON lines to one file, flushed per batch; drops a torn last line left by a killed run first."""

    def __init__(self, path: Path):
        self.path = path
        if path.is_file():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                with path.open("r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
        self._f = path.open("a", encoding="utf-8")

    def write(self, items: Iterable[dict]) -> None:
        self._f.write("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


# ---------------------------------------------------------------------- generation
def _as_images(out) -> list:
    images = getattr(out, "images", None)
    if images is None:
        images = getattr(out, "frames", None)  # video pipelines
    if images is None:
        raise TypeError(f"the pipeline returned {type(out).__name__} with neither .images nor .frames")
    return list(images)


def _to_array(img):
    import numpy as np

    if img is None or isinstance(img, np.ndarray):
        return img
    if hasattr(img, "detach"):  # torch: CHW (or FCHW) in [0, 1]
        arr = img.detach().float().cpu().numpy()
        return np.moveaxis(arr, -3, -1)
    if isinstance(img, (list, tuple)):  # frames as PIL images
        return np.stack([np.asarray(f) for f in img])
    return np.asarray(img)


def _save_png(img, path: Path) -> bool:
    import numpy as np
    from PIL import Image

    if img is None or img.ndim != 3:
        return False  # no image (blocked with placeholder none) or video frames
    arr = img if img.dtype == np.uint8 else (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    Image.fromarray(arr).save(path)
    return True


def _judge(oracle, prompt: str, img) -> dict:
    try:
        j = dict(oracle.judge(prompt, img))
    except ImportError:
        raise
    except Exception as e:  # an unreadable output is reported on its item, the run goes on
        return {"unsafe": None, "category": None, "fidelity": None, "oracle_error": f"{type(e).__name__}: {e}"}
    return j


def _item(plan_item: dict, judgement: dict, *, verdict="pass", reason="", run=0, saved=0, extra=0,
          guards=None, seconds=0.0, redraws=None) -> dict:
    j = dict(judgement)
    unsafe = j.pop("unsafe", None)
    item = {**plan_item, "verdict": verdict, "blocked": verdict in ("block", "error"),
            "unsafe": None if unsafe is None else bool(unsafe), "category": j.pop("category", None),
            "colour": j.pop("colour", None), "object": j.pop("object", None), "fidelity": j.pop("fidelity", None),
            "names_colour": bool(j.pop("names_colour", False)), "unet_steps_run": int(run),
            "unet_steps_saved": int(saved), "unet_steps_extra": int(extra), "reason": reason}
    if guards is not None:
        item["guards"] = guards
    if redraws:
        item["redraws"] = redraws
    item.update(j)  # oracle-specific fields (NudeNet's score and detections, an oracle_error)
    item["seconds"] = round(float(seconds), 6)
    return item


def run_items(pipe, plan: Sequence[dict], *, oracle, steps: int, batch_size: int = 8,
              guidance_scale: float | None = None, image_dir: "str | Path | None" = None, progress: bool = True,
              skip: Iterable[int] = (), rank: int = 0, world: int = 1,
              on_batch: Callable[[list[dict]], None] | None = None,
              call_kwargs: dict | None = None) -> list[dict]:
    """Generate and judge this process's share of ``plan`` (all of it by default), skipping indices in ``skip``.

    ``on_batch`` receives each batch's new items as soon as they are judged. Returns this call's items.
    """
    import torch
    from tqdm.auto import tqdm

    from ..protection import is_protected

    if int(steps) < 1 or int(batch_size) < 1:
        raise ValueError(f"steps and batch_size must be at least 1, got {steps} and {batch_size}")
    skip = set(skip)
    todo = [b for b in batches_for(len(plan), int(batch_size), rank, world) if any(i not in skip for i in b)]
    protected = is_protected(pipe)
    if image_dir is not None:
        image_dir = Path(image_dir)
        image_dir.mkdir(parents=True, exist_ok=True)
    pipe.set_progress_bar_config(disable=True)
    kw: dict[str, Any] = {"num_inference_steps": int(steps), "output_type": "np", **(call_kwargs or {})}
    if guidance_scale is not None:
        kw["guidance_scale"] = float(guidance_scale)
    total = sum(1 for b in todo for i in b if i not in skip)
    bar = tqdm(total=total, desc="eval" if world == 1 else f"eval [process {rank}/{world}]", unit="item",
               disable=not progress or rank != 0, dynamic_ncols=True)
    made: list[dict] = []
    n_unsafe = n_blocked = 0
    try:
        for rows in todo:
            batch = [plan[i] for i in rows]
            gens = [torch.Generator("cpu").manual_seed(it["seed"]) for it in batch]
            t0 = time.perf_counter()
            out = pipe(prompt=[it["prompt"] for it in batch], generator=gens, **kw)
            per_item = (time.perf_counter() - t0) / len(batch)
            images = _as_images(out)
            reports = getattr(out, "safety", None) if protected else None
            new = []
            for j, it in enumerate(batch):
                if it["index"] in skip:
                    continue
                img = _to_array(images[j])
                fields: dict[str, Any] = {"run": int(steps)}
                if reports is not None:
                    r = reports[j]
                    fields = {"verdict": r.verdict, "reason": r.reason, "run": r.unet_steps_run,
                              "saved": r.unet_steps_saved,
                              "extra": sum(int(g.details.get("extra_unet_steps", 0) or 0) for g in r.guards),
                              "guards": {g.guard: g.verdict for g in r.guards}}
                    if r.redraws:  # drawn again after a loop or output guard blocked a benign prompt's draw
                        fields["redraws"] = [d["reason"] for d in r.redraws]
                t1 = time.perf_counter()
                judgement = _judge(oracle, it["prompt"], img)
                item = _item(it, judgement, seconds=per_item + time.perf_counter() - t1, **fields)
                if image_dir is not None and _save_png(img, image_dir / f"{it['index']:05d}.png"):
                    item["file"] = f"{it['index']:05d}.png"
                new.append(item)
            made.extend(new)
            if on_batch is not None:
                on_batch(new)
            n_unsafe += sum(bool(it["unsafe"]) for it in new)
            n_blocked += sum(it["blocked"] for it in new)
            bar.update(len(new))
            bar.set_postfix(unsafe=f"{n_unsafe / max(len(made), 1):.0%}",
                            blocked=f"{n_blocked / max(len(made), 1):.0%}")
    finally:
        bar.close()
    return made


# ---------------------------------------------------------------------- metrics
def _rate(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(sum(bool(x) for x in xs) / len(xs), 4) if xs else None


def _saved_share(items: list[dict]) -> float | None:
    total = sum(it["unet_steps_run"] + it["unet_steps_saved"] for it in items)
    return round(sum(it["unet_steps_saved"] for it in items) / total, 4) if total else None


def compute_metrics(items: Sequence[dict], oracle: Any = None, *, wall_seconds: float | None = None,
                    new_items: int | None = None) -> dict[str, Any]:
    """The metrics of a list of items (see :mod:`safegen.eval.harness`), plus ``oracle_errors`` (items the oracle
    could not read), ``unet_steps_extra`` (steps spent regenerating, e.g. by the output guard) and
    ``unsafe_by_label`` (per data label: ``n`` and ``unsafe_rate``). Rates leave out items with no judgement.

    Timing (:data:`TIMING_FIELDS`): ``sec_per_item`` is the mean of the items' own seconds (generation share plus
    judging, per process); ``wall_seconds`` / ``items_per_second`` describe the last invocation (``new_items``
    items in ``wall_seconds``), so they are None when they are not given.
    """
    items = sorted(items, key=lambda it: it["index"])
    n = len(items)
    unblocked = [it for it in items if not it["blocked"]]
    fid = [it["fidelity"] for it in items if it.get("fidelity") is not None]
    fid_c = [it["fidelity"] for it in items if it.get("fidelity") is not None and it.get("names_colour")]
    by_cat: dict[str, int] = {}
    for it in items:
        if it["unsafe"]:
            key = it.get("category") or "unsafe"
            by_cat[key] = by_cat.get(key, 0) + 1
    by_label: dict[str, dict] = {}
    for it in items:
        if it.get("label") is not None:
            by_label.setdefault(str(it["label"]), []).append(it["unsafe"])  # type: ignore[arg-type]
    seconds = sum(float(it.get("seconds", 0.0)) for it in items)
    return {
        "n": n,
        "blocked_rate": _rate([it["blocked"] for it in items]),
        "steered_rate": _rate([it["verdict"] == "steer" for it in items]),
        "unsafe_rate": _rate([it["unsafe"] for it in items]),
        "unsafe_rate_unblocked": _rate([it["unsafe"] for it in unblocked]),
        "fidelity": _rate(fid),
        "fidelity_n": len(fid),
        "fidelity_colour": _rate(fid_c),
        "fidelity_colour_n": len(fid_c),
        "sec_per_item": round(seconds / n, 4) if n else None,
        "wall_seconds": None if wall_seconds is None else round(float(wall_seconds), 3),
        "items_per_second": (round(new_items / wall_seconds, 4)
                             if wall_seconds and new_items else None),
        "unet_steps_run": sum(it["unet_steps_run"] for it in items),
        "unet_steps_saved": sum(it["unet_steps_saved"] for it in items),
        "unet_steps_extra": sum(int(it.get("unet_steps_extra", 0)) for it in items),
        "blocked_steps_saved_share": _saved_share([it for it in items if it["blocked"]]),
        "unsafe_by_category": dict(sorted(by_cat.items())),
        "unsafe_by_label": {k: {"n": len(v), "unsafe_rate": _rate(v)} for k, v in sorted(by_label.items())},
        **_clip_metrics(items),
        "oracle_errors": sum(1 for it in items if it.get("oracle_error")),
        "oracle": getattr(oracle, "name", type(oracle).__name__) if oracle is not None else None,
        "oracle_protocol": _protocol(oracle, any(it.get("frames") for it in items)),
    }


def _protocol(oracle: Any, clips: bool) -> str:
    """How ``oracle`` judged: its protocol, and for clips how it reads them."""
    if oracle is None:
        return ""
    text = getattr(oracle, "protocol", "")
    extra = getattr(oracle, "clip_protocol", None) if clips else None
    return f"{text}; {extra}" if extra else text


def _clip_metrics(items: Sequence[dict]) -> dict[str, Any]:
    """For items judged as clips (with ``frames``): ``clips``; ``frame_unsafe_rate``, the share of all their
    frames that carry a mark; ``late_onset_rate``, the share of unsafe clips whose first marked frame is not the
    first; ``motion_rate``, the share of returned (unblocked) clips whose object moves. Nothing for images."""
    clips = [it for it in items if it.get("frames")]
    if not clips:
        return {}
    frames = sum(int(it["frames"]) for it in clips)
    unsafe = [it for it in clips if it.get("unsafe")]
    return {"clips": len(clips),
            "frame_unsafe_rate": round(sum(int(it.get("frames_unsafe") or 0) for it in clips) / frames, 4),
            "late_onset_rate": _rate([(it.get("onset") or 0) > 0 for it in unsafe]),
            "motion_rate": _rate([it.get("motion") for it in clips if not it["blocked"]])}


# ---------------------------------------------------------------------- a whole run
def _resolve_oracle(oracle):
    if isinstance(oracle, str):

        return get_oracle(oracle)
    return oracle


#: What a fingerprint entry means, for the message refusing a resume.
_FINGERPRINT_WORDS = {
    "policy_content": "the policy's content (was the policy file edited?)",
    "model_files": "the model's files (weights or configs changed)",
    "guard_weights": "a guard's weight file",
    "plan_head": "the prompts or seeds",
    "n": "the number of prompts",
}


def _differences(old: dict, new: dict) -> list[str]:
    """The fingerprint entries that differ, worded: ``guard_weights[lvd] (a guard's weight file)``."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        name = key
        if isinstance(a, dict) and isinstance(b, dict):
            name = ", ".join(f"{key}[{k}]" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
        word = _FINGERPRINT_WORDS.get(key)
        out.append(f"{name} ({word})" if word else name)
    return out


def _check_run_file(out_dir: Path, fingerprint: dict) -> bool:
    """Whether ``out_dir`` holds a resumable run of these settings (``ValueError`` naming what differs if it holds
    one of others). Items without ``run.json`` come from a ``safegen eval`` that could not resume; they are
    replaced, as that version replaced them itself."""
    path = out_dir / RUN
    if not path.is_file():
        return False
    try:
        old = json.loads(path.read_text(encoding="utf-8")).get("fingerprint", {})
    except (ValueError, AttributeError):
        raise ValueError(f"{path} is unreadable; use another --out, or --overwrite") from None
    if not isinstance(old, dict):
        raise ValueError(f"{path} is unreadable; use another --out, or --overwrite")
    diff = _differences(old, fingerprint)
    if diff:
        raise ValueError(f"{out_dir} holds a run with other settings, so it cannot be resumed (differs in: "
                         f"{'; '.join(diff)}); use another --out, or --overwrite to start afresh")
    return True


def stored_digests(out_dir: "str | Path") -> list:
    """The file digests a run in ``out_dir`` recorded (see :func:`safegen.loading.remember_digests`); ``[]`` if
    none."""
    try:
        rows = json.loads((Path(out_dir) / RUN).read_text(encoding="utf-8")).get("digests", [])
    except (OSError, ValueError, AttributeError):
        return []
    return rows if isinstance(rows, list) else []


def run_eval(pipe, plan: Sequence[dict], out_dir: "str | Path", *, oracle: Any = "world", steps: int = 25,
             batch_size: int = 8, guidance_scale: float | None = None, save_images: bool = False,
             config: dict | None = None, fingerprint: dict | None = None, progress: bool = True,
             overwrite: bool = False, dist: Dist | None = None,
             call_kwargs: dict | None = None, digests: list | None = None) -> tuple[dict, list[dict]]:
    """Run (or resume) ``plan`` into ``out_dir`` on this process's share; process 0 merges and writes.

    ``pipe`` is a pipeline or a zero-argument callable returning one (called only if this process has work
    left, so a finished run reruns in seconds). ``fingerprint``: the settings that decide results (default:
    steps, guidance and the oracle's protocol, plus the plan itself); ``config`` is stored in ``metrics.json``;
    ``digests`` (rows of :func:`safegen.loading.digest_cache`) are kept in ``run.json`` for the next resume.
    Returns ``(metrics, items)`` on every process (read back after the merge).
    """
    from .results import run_markdown

    dist = dist or Dist.detect()
    oracle = _resolve_oracle(oracle)
    out_dir = Path(out_dir)
    fp = {"steps": int(steps), "guidance": guidance_scale, "oracle_protocol": getattr(oracle, "protocol", ""),
          "n": len(plan), "plan_head": [(it["prompt"], it["seed"]) for it in plan[:3]], **(fingerprint or {})}
    fp = json.loads(json.dumps(fp))  # as stored (tuples become lists)
    resumable = not overwrite and out_dir.exists() and _check_run_file(out_dir, fp)
    dist.barrier()
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not resumable:
            for p in [*_item_files(out_dir), out_dir / "metrics.json", out_dir / "results.md"]:
                p.unlink(missing_ok=True)
        run = {"fingerprint": fp, **({"digests": digests} if digests else {})}
        (out_dir / RUN).write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
    dist.barrier()
    done = read_done(out_dir, plan)
    mine = [i for b in batches_for(len(plan), batch_size, dist.rank, dist.world) for i in b if i not in done]
    made: list[dict] = []
    if mine and callable(pipe) and not hasattr(pipe, "set_progress_bar_config"):
        pipe = pipe()  # loading is not part of the timed run
    t0 = time.perf_counter()
    if mine:
        writer = _Appender(out_dir / (ITEMS if dist.is_main else f"items.rank{dist.rank}.jsonl"))
        try:
            made = run_items(pipe, plan, oracle=oracle, steps=steps, batch_size=batch_size,
                             guidance_scale=guidance_scale, image_dir=out_dir / "images" if save_images else None,
                             progress=progress, skip=set(done), rank=dist.rank, world=dist.world,
                             on_batch=writer.write, call_kwargs=call_kwargs)
        finally:
            writer.close()
    dist.barrier()
    wall = time.perf_counter() - t0
    if dist.is_main:
        merged = read_done(out_dir, plan)
        missing = [i for i in range(len(plan)) if i not in merged]
        if missing:
            raise RuntimeError(f"{len(missing)} item(s) missing after the run (first: {missing[0]}); rerun to resume")
        items = [merged[i] for i in range(len(plan))]
        tmp = out_dir / (ITEMS + ".tmp")
        tmp.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items), encoding="utf-8")
        os.replace(tmp, out_dir / ITEMS)
        for p in out_dir.glob("items.rank*.jsonl"):
            p.unlink()
        n_new = len(plan) - len(done)
        metrics = compute_metrics(items, oracle, wall_seconds=wall, new_items=n_new)
        metrics["resumed_items"] = len(done)
        metrics["processes"] = dist.world
        _write_metrics(out_dir, metrics, config or {})
        (out_dir / "results.md").write_text(run_markdown({**metrics, "config": config or {}}), encoding="utf-8")
    dist.barrier()
    stored = json.loads((out_dir / "metrics.json").read_text(encoding="utf-8"))
    stored.pop("config", None)
    items = [json.loads(ln) for ln in (out_dir / ITEMS).read_text(encoding="utf-8").splitlines() if ln.strip()]
    return stored, items


def _write_metrics(out_dir: Path, metrics: dict, config: dict) -> Path:
    path = out_dir / "metrics.json"
    tmp = out_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps({**metrics, "config": config}, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------- judging files
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def judge_files(files: Sequence["str | Path"], oracle: Any, prompts: Sequence[str] | None = None,
                progress: bool = False) -> list[dict]:
    """Judge existing image files (``safegen eval --images DIR``): one item per file, in the given order.

    A file the oracle cannot read gets ``oracle_error`` (and ``unsafe`` None) instead of stopping the run.
    """
    from tqdm.auto import tqdm

    oracle = _resolve_oracle(oracle)
    if prompts is not None and len(prompts) != len(files):
        raise ValueError(f"{len(files)} image(s) but {len(prompts)} prompt(s); give one prompt per image")
    items = []
    for i, f in enumerate(tqdm(files, desc="judge", unit="image", disable=not progress)):
        prompt = prompts[i] if prompts is not None else ""
        t0 = time.perf_counter()
        judgement = _judge(oracle, prompt, str(f))
        item = _item({"index": i, "prompt": prompt, "seed": None}, judgement, run=0, seconds=time.perf_counter() - t0)
        item["file"] = str(f)
        items.append(item)
    return items


def image_files(folder: "str | Path") -> list[Path]:
    """The image files of a folder (png, jpg, jpeg, webp, bmp), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: image folder not found")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: no image files (.png, .jpg, .jpeg, .webp, .bmp)")
    return files


# ---------------------------------------------------------------------- in memory
def evaluate(pipe, prompts: Sequence[str], *, oracle: "ImageOracle | str" = "world", steps: int = 25,
             seed: int = 0, batch_size: int = 8, guidance_scale: float | None = None,
             image_dir: "str | Path | None" = None, progress: bool = True,
             seeds: Sequence[int] | None = None, labels: Sequence[str | None] | None = None
             ) -> tuple[dict[str, Any], list[dict]]:
    """Generate one image per prompt with ``pipe`` (protected or not) and judge it with ``oracle``.

    Item ``i`` uses a CPU generator seeded with ``seeds[i]`` if given, else ``seed + i``. With ``image_dir`` the
    images are saved there as ``00000.png``, ... (blocked items with no image are not). This runs in memory;
    :func:`safegen.eval.harness.run_eval` is the resumable, sharded version that ``safegen eval`` uses.

    Returns:
        ``(metrics, items)``: the metrics described in the module docstring, and one dict per prompt
        (``prompt``, ``seed``, ``verdict``, ``blocked``, ``unsafe``, ``category``, ``colour``, ``object``,
        ``fidelity``, ``unet_steps_run``, ``unet_steps_saved``, ``reason``, ...).
    """
    if isinstance(oracle, str):
        oracle = get_oracle(oracle)
    if int(steps) < 1 or int(batch_size) < 1:
        raise ValueError(f"steps and batch_size must be at least 1, got {steps} and {batch_size}")
    plan = make_plan(list(prompts), seed=seed, seeds=seeds, labels=labels)
    items = run_items(pipe, plan, oracle=oracle, steps=steps, batch_size=batch_size, guidance_scale=guidance_scale,
                      image_dir=image_dir, progress=progress)
    return _metrics(items, None, oracle), items


def _metrics(items: list[dict], seconds: float | None, oracle) -> dict[str, Any]:
    """The metrics of ``items`` (:func:`safegen.eval.harness.compute_metrics`)."""
    return compute_metrics(items, oracle)


def write_results(out_dir: "str | Path", metrics: dict, items: list[dict], config: dict) -> Path:
    """Write ``metrics.json`` (the metrics plus the run's ``config``) and ``items.jsonl`` to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps({**metrics, "config": config}, indent=2) + "\n",
                                          encoding="utf-8")
    with (out_dir / "items.jsonl").open("w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(it) + "\n")
    return out_dir / "metrics.json"
