"""Named prompt sets for ``safegen eval --benchmark NAME``, read from ``../shared/data`` (or ``$SAFEGEN_DATA``).

Every set becomes a list of :class:`PromptRecord` (prompt, the data's ``evaluation_seed`` when it has one, and a
label such as the harm category), in a fixed order, each prompt once:

=========  ======================================  ===========================================================
name       file                                    rules
=========  ======================================  ===========================================================
coprov2    ``CoProv2_test.csv``                    deduplicated against the training file and itself; seeded
                                                   shuffle (``random.Random(0)``, the file is sorted by
                                                   category) — the same draw as ``benchmarks/default_model.py``
i2p        ``i2p.csv``                             whitespace-normalised, each prompt once; optionally only rows
                                                   with ``inappropriate_percentage >= min_inappropriate``;
                                                   seeded shuffle (the file is sorted by category)
nudity     ``nudity.csv``                          the I2P nudity subset, file order
coco       ``coco_30k_10k.csv``                    the first 1,000 captions, held out from the embedded default
                                                   model's training (``HELDOUT_COCO``), file order
artists    ``big_artist_prompts.csv``              file order; label = the artist
t2v        ``t2v.json``                            ``[id, category, prompt]`` rows; seeded shuffle
=========  ======================================  ===========================================================

``limit`` keeps the first N records after these rules, so ``--limit 500`` on ``coprov2`` covers every category.

Example:
    >>> import pathlib, tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> _ = (pathlib.Path(tmp.name) / "big_artist_prompts.csv").write_text(
    ...     ",case_number,prompt,evaluation_seed,artist\\n0,0,a cubist woman,3721,Pablo Picasso\\n"
    ...     "1,1,a cubist woman,99,Pablo Picasso\\n2,2,starry sky,7,Van Gogh\\n")
    >>> load_benchmark("artists", tmp.name)
    [PromptRecord(prompt='a cubist woman', seed=3721, label='Pablo Picasso'), PromptRecord(prompt='starry sky', seed=7, label='Van Gogh')]
    >>> tmp.cleanup()
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

__all__ = ["PromptRecord", "BENCHMARKS", "load_benchmark", "load_prompt_records", "benchmark_file"]


@dataclass(frozen=True)
class PromptRecord:
    """One prompt of an evaluation set: the text, the data's ``evaluation_seed`` (None if the data has none) and
    a label (harm category, artist...; None if the data has none)."""

    prompt: str
    seed: int | None = None
    label: str | None = None


#: Named benchmarks and the data file each reads.
BENCHMARKS = {
    "coprov2": "CoProv2_test.csv",
    "i2p": "i2p.csv",
    "nudity": "nudity.csv",
    "coco": "coco_30k_10k.csv",
    "artists": "big_artist_prompts.csv",
    "t2v": "t2v.json",
}


def _data_dir(data_dir) -> Path:
    from .world import default_data_dir

    return Path(data_dir) if data_dir is not None else default_data_dir()


def benchmark_file(name: str, data_dir=None) -> Path:
    """The data file of benchmark ``name`` (``ValueError`` naming the known benchmarks otherwise)."""
    key = str(name).lower()
    if key not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)} (or give a file with --prompts)")
    return _data_dir(data_dir) / BENCHMARKS[key]


def _seed(path: Path, line: int, raw: str | None) -> int | None:
    text = (raw or "").strip()
    if not text:
        return None
    try:
        value = int(float(text))
    except ValueError:
        raise ValueError(f"{path}, line {line}: evaluation_seed {raw!r} is not an integer") from None
    if value < 0:
        raise ValueError(f"{path}, line {line}: evaluation_seed {value} is negative")
    return value


def _once(records: Iterable[PromptRecord]) -> list[PromptRecord]:
    seen: set[str] = set()
    return [r for r in records if r.prompt and not (r.prompt in seen or seen.add(r.prompt))]


def _shuffled(records: list[PromptRecord], seed: int = 0) -> list[PromptRecord]:
    out = list(records)
    random.Random(seed).shuffle(out)
    return out


def _text(path: Path) -> str:
    """The file's text, line endings kept for the csv module (a BOM dropped); a file that is not UTF-8 is a
    ValueError naming it."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        from .evaluate import not_utf8

        raise not_utf8(path, e) from None


def _csv_rows(path: Path, needed: Iterable[str]) -> list[tuple[int, dict[str, str]]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found; pass --data-dir (or set SAFEGEN_DATA) to the folder "
                                "holding it")
    reader = csv.DictReader(io.StringIO(_text(path), newline=""))
    fields = reader.fieldnames or []
    missing = [c for c in needed if c not in fields]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; the file has {fields}")
    return list(enumerate(reader, start=2))


def _i2p(path: Path, min_inappropriate: float | None) -> list[PromptRecord]:
    out = []
    for line, row in _csv_rows(path, ("prompt",)):
        if min_inappropriate is not None:
            try:
                share = float(row.get("inappropriate_percentage") or "nan")
            except ValueError:
                share = float("nan")
            if not share >= min_inappropriate:
                continue
        prompt = " ".join((row["prompt"] or "").split())
        out.append(PromptRecord(prompt, _seed(path, line, row.get("evaluation_seed")),
                                (row.get("categories") or "").strip() or None))
    return _once(out)


def load_benchmark(name: str, data_dir=None, *, limit: int | None = None,
                   min_inappropriate: float | None = None) -> list[PromptRecord]:
    """The records of a named benchmark (module docstring), first ``limit`` of them.

    ``min_inappropriate`` (I2P and nudity only) keeps rows whose ``inappropriate_percentage`` reaches it.
    """
    key = str(name).lower()
    path = benchmark_file(key, data_dir)
    if min_inappropriate is not None and key not in ("i2p", "nudity"):
        raise ValueError(f"min_inappropriate applies to the I2P sets (i2p, nudity), not {name!r}")
    if key == "coprov2":
        from .world import load_coprov2_test

        pairs = load_coprov2_test(path.parent)
        records = _shuffled([PromptRecord(p, None, c) for p, c in pairs])  # already each prompt once
    elif key == "i2p":
        records = _shuffled(_i2p(path, min_inappropriate))
    elif key == "nudity":
        records = _i2p(path, min_inappropriate)
    elif key == "coco":
        from .default_model import HELDOUT_COCO

        rows = [(line, r) for line, r in _csv_rows(path, ("prompt",)) if (r["prompt"] or "").strip()]
        records = _once(PromptRecord((r["prompt"] or "").strip(), _seed(path, line, r.get("evaluation_seed")), None)
                        for line, r in rows[:HELDOUT_COCO])
    elif key == "artists":
        records = _once(PromptRecord((r["prompt"] or "").strip(), _seed(path, line, r.get("evaluation_seed")),
                                     (r.get("artist") or "").strip() or None)
                        for line, r in _csv_rows(path, ("prompt",)))
    else:  # t2v
        if not path.is_file():
            raise FileNotFoundError(f"{path}: data file not found; pass --data-dir (or set SAFEGEN_DATA)")
        try:
            rows = json.loads(_text(path))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        bad = [i for i, r in enumerate(rows) if not (isinstance(r, list) and len(r) == 3)]
        if bad:
            raise ValueError(f"{path}: row {bad[0]} is not [id, category, prompt]")
        records = _shuffled(_once(PromptRecord(" ".join(str(p).split()), None, str(c)) for _, c, p in rows))
    if limit is not None:
        records = records[: int(limit)]
    if not records:
        raise ValueError(f"benchmark {name!r}: no prompts left ({path})")
    return records


def load_prompt_records(path, column: str | None = None, *, limit: int | None = None, dedup: bool = True,
                        seed_column: str | None = None, label_column: str | None = None) -> list[PromptRecord]:
    """Records from any prompt file.

    A ``.csv`` file is read here, so that ``seed_column`` (e.g. ``evaluation_seed``) and ``label_column`` can be
    kept with each prompt; other files go through :func:`safegen.evaluate.read_prompts` (no seeds, no labels).
    Deduplication keeps the first occurrence (and its seed); ``limit`` applies after it.

    Example:
        >>> import pathlib, tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> f = pathlib.Path(tmp.name) / "p.csv"
        >>> _ = f.write_text("prompt,evaluation_seed\\na red bus,5\\na red bus,6\\na cat,7\\n")
        >>> [(r.prompt, r.seed) for r in load_prompt_records(f, seed_column="evaluation_seed")]
        [('a red bus', 5), ('a cat', 7)]
        >>> tmp.cleanup()
    """
    path = Path(path)
    if path.suffix.lower() != ".csv":
        if seed_column is not None or label_column is not None:
            raise ValueError(f"{path} is not a .csv file, so it has no {seed_column or label_column!r} column "
                             "(seeds from the data need a CSV)")
        from .evaluate import read_prompts

        return [PromptRecord(p) for p in read_prompts(path, column, limit=limit, dedup=dedup)]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prompt file not found")
    if limit is not None and int(limit) < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    col = column or "prompt"
    reader = csv.DictReader(io.StringIO(_text(path), newline=""))
    fields = reader.fieldnames or []
    for what, c in (("column", col), ("seed column", seed_column), ("label column", label_column)):
        if c is not None and c not in fields:
            hint = " (choose one with --column)" if what == "column" else ""
            raise ValueError(f"{path} has no {what} {c!r}; its columns are: {', '.join(fields) or '(none)'}{hint}")
    rows = list(enumerate(reader, start=2))
    records = [PromptRecord((r.get(col) or "").strip(), _seed(path, line, r.get(seed_column)) if seed_column else None,
                            ((r.get(label_column) or "").strip() or None) if label_column else None)
               for line, r in rows]
    records = [r for r in records if r.prompt]
    if seed_column is not None:
        unseeded = [r.prompt for r in records if r.seed is None]
        if unseeded:
            raise ValueError(f"{path}: {len(unseeded)} row(s) have no {seed_column} (e.g. {unseeded[0][:60]!r})")
    if dedup:
        records = _once(records)
    if limit is not None:
        records = records[: int(limit)]
    if not records:
        raise ValueError(f"{path}: no prompts found")
    return records
