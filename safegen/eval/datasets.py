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
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..policy import CATEGORIES, normalize_category

__all__ = ["PromptRecord", "BENCHMARKS", "load_benchmark", "load_prompt_records", "benchmark_file", "read_prompts",
           "read_text", "not_utf8", "default_data_dir", "load_coprov2_train", "load_coprov2_pairs", "load_coprov2_test",
           "load_coco", "load_i2p", "split_coco", "HARNESS_COCO_ROWS"]


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

        pairs = load_coprov2_test(path.parent)
        records = _shuffled([PromptRecord(p, None, c) for p, c in pairs])  # already each prompt once
    elif key == "i2p":
        records = _shuffled(_i2p(path, min_inappropriate))
    elif key == "nudity":
        records = _i2p(path, min_inappropriate)
    elif key == "coco":
        from ..default_model import HELDOUT_COCO

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
    kept with each prompt; other files go through :func:`safegen.eval.datasets.read_prompts` (no seeds, no labels).
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


# ---------------------------------------------------------------------- prompt files
def not_utf8(path: "str | Path", error: UnicodeDecodeError) -> ValueError:
    """The error for a prompt file that is not UTF-8 text (a binary file, another encoding): it names the file and
    what to do, not the undecodable bytes."""
    return ValueError(f"{path}: not a UTF-8 text file (undecodable byte at offset {error.start}); give a text, "
                      ".csv or .json file saved as UTF-8")


def read_text(path: "str | Path") -> str:
    """A prompt file's text, or :func:`not_utf8`'s ``ValueError`` naming the file."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise not_utf8(path, e) from None


def _json_prompts(path: Path, column: str | None) -> list[str]:
    """Prompts of a JSON list: strings; objects (their ``column`` key, default ``prompt``); or rows such as
    SAFREE's T2V set, ``[id, category, prompt]`` (the row's element ``column`` if it is an index, else the
    last element)."""
    text = read_text(path)
    try:
        rows = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of prompts, got a {type(rows).__name__}")
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, str):
            out.append(row)
        elif isinstance(row, dict):
            key = column or "prompt"
            if key not in row:
                raise ValueError(f"{path}: entry {i} has no key {key!r}; its keys are: {', '.join(map(str, row))} "
                                 "(choose one with --column)")
            out.append(str(row[key]))
        elif isinstance(row, list) and row:
            at = -1 if column is None else (int(column) if str(column).lstrip("-").isdigit() else None)
            if at is None or not -len(row) <= at < len(row):
                raise ValueError(f"{path}: entry {i} is a list of {len(row)}; --column must be an index into it")
            out.append(str(row[at]))
        else:
            raise ValueError(f"{path}: entry {i} is neither a prompt, an object nor a list")
    return [" ".join(p.split()) for p in out]


def read_prompts(path: "str | Path", column: str | None = None, *, limit: int | None = None,
                 dedup: bool = True) -> list[str]:
    """Prompts from a file: a CSV (``.csv``; ``column`` names the prompt column, default ``prompt``), a JSON list
    (``.json``: strings, objects or rows such as ``../shared/data/t2v.json``'s ``[id, category, prompt]``) or plain
    text (one prompt a line; blank lines skipped). With ``dedup`` (default) a prompt seen before is dropped; then the
    first ``limit`` are kept. Errors name the file and what to do.

    Example:
        >>> import pathlib, tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> f = pathlib.Path(tmp.name) / "p.csv"
        >>> _ = f.write_text("text,category\\na red bus,none\\na red bus,none\\na blue cat,none\\n")
        >>> read_prompts(f, "text")
        ['a red bus', 'a blue cat']
        >>> read_prompts(f)
        Traceback (most recent call last):
        ...
        ValueError: .../p.csv has no column 'prompt'; its columns are: text, category (choose one with --column)
        >>> tmp.cleanup()
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prompt file not found")
    if limit is not None and int(limit) < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if path.suffix.lower() == ".json":
        prompts = _json_prompts(path, column)
    elif path.suffix.lower() == ".csv":
        text = read_text(path)
        reader = csv.DictReader(io.StringIO(text, newline=""))
        fields = reader.fieldnames or []
        col = column or "prompt"
        if col not in fields:
            raise ValueError(f"{path} has no column {col!r}; its columns are: {', '.join(fields) or '(none)'} "
                             f"(choose one with --column)")
        raw: Iterable[str] = ((row.get(col) or "") for row in reader)
        prompts = [p.strip() for p in raw]
    else:
        if column is not None:
            raise ValueError(f"{path} is not a .csv file, so --column {column!r} cannot apply; plain-text files "
                             f"hold one prompt a line")
        prompts = [line.strip() for line in read_text(path).splitlines()]
    prompts = [p for p in prompts if p]
    if dedup:
        seen: set[str] = set()
        prompts = [p for p in prompts if not (p in seen or seen.add(p))]
    if limit is not None:
        prompts = prompts[: int(limit)]
    if not prompts:
        raise ValueError(f"{path}: no prompts found")
    return prompts


# ---------------------------------------------------------------------- the shared data files
def default_data_dir() -> Path:
    """``$SAFEGEN_DATA`` if set, else ``../shared/data`` relative to the repository root."""
    env = os.environ.get("SAFEGEN_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def _read_csv(data_dir: "str | Path | None", name: str, columns: Iterable[str]) -> tuple[Path, list[dict[str, str]]]:
    path = Path(data_dir if data_dir is not None else default_data_dir()) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file {name!r} not found; pass data_dir= the folder holding it "
                                f"(or set SAFEGEN_DATA)")
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        found = reader.fieldnames or []
        missing = [c for c in columns if c not in found]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; the file has {found}")
        return path, list(reader)


def _category(path: Path, line: int, raw: str) -> str:
    key = normalize_category(raw)
    if key not in CATEGORIES:
        raise ValueError(f"{path}, line {line}: category {raw!r} is not a policy category {list(CATEGORIES)}")
    return key


def load_coprov2_train(data_dir: "str | Path | None" = None) -> list[tuple[str, str | None]]:
    r"""CoProV2 training pairs as ``(prompt, label)``: unsafe rows (``u_`` images) labelled with their normalised
    category, their safe twins (``s_`` images) with None, in file order.

    A pair filed under two categories appears once per category (its unsafe prompt with each label, its safe twin
    twice with None).

    Raises ``FileNotFoundError`` naming the missing file, ``ValueError`` naming a missing column, an image name
    that is neither ``u_`` nor ``s_``, or a category that is not a policy category.

    Example:
        >>> import pathlib, tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> _ = (pathlib.Path(tmp.name) / "CoProv2_train.csv").write_text(
        ...     "prompt,image,category\n"
        ...     "a man smashes a red car,u_idx_0_0.jpg,Illegal Activity\n"
        ...     "a man washes a red car,s_idx_0_0.jpg,Illegal Activity\n")
        >>> load_coprov2_train(tmp.name)
        [('a man smashes a red car', 'illegal-activity'), ('a man washes a red car', None)]
        >>> tmp.cleanup()
    """
    path, rows = _read_csv(data_dir, "CoProv2_train.csv", ("prompt", "image", "category"))
    out: list[tuple[str, str | None]] = []
    for i, row in enumerate(rows, start=2):
        image = os.path.basename((row["image"] or "").strip())
        prompt = (row["prompt"] or "").strip()
        if image.startswith("u_"):
            out.append((prompt, _category(path, i, row["category"] or "")))
        elif image.startswith("s_"):
            out.append((prompt, None))
        else:
            raise ValueError(f"{path}, line {i}: image {row['image']!r} starts with neither 'u_' (unsafe) nor 's_' (safe)")
    return out


_PAIR_IMAGE = re.compile(r"^([us])_idx_(\d+)_")


def load_coprov2_pairs(data_dir: "str | os.PathLike | None" = None, *, limit: int | None = None
                       ) -> list[tuple[str, str, str]]:
    r"""CoProV2 training pairs as ``(unsafe prompt, safe twin, category)``, in file order.

    Rows are paired by the number in their image names (``u_idx_N_*`` unsafe, ``s_idx_N_*`` its minimally edited
    safe twin). A pair filed under several categories gives one triple per category. Unsafe rows without a twin
    are skipped. ``limit`` keeps the first ``limit`` triples.

    Raises ``FileNotFoundError`` naming the missing file, ``ValueError`` naming a missing column, an image name
    that is neither ``u_idx_N`` nor ``s_idx_N``, or an unknown category.

    Example:
        >>> import pathlib, tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> _ = (pathlib.Path(tmp.name) / "CoProv2_train.csv").write_text(
        ...     "prompt,image,category\n"
        ...     "a man smashes a red car,u_idx_0000007_0.jpg,Illegal Activity\n"
        ...     "a man washes a red car,s_idx_0000007_0.jpg,Illegal Activity\n")
        >>> load_coprov2_pairs(tmp.name)
        [('a man smashes a red car', 'a man washes a red car', 'illegal-activity')]
        >>> tmp.cleanup()
    """
    path, rows = _read_csv(data_dir, "CoProv2_train.csv", ("prompt", "image", "category"))
    unsafe: list[tuple[int, str, str]] = []
    safe: dict[int, str] = {}
    for line, row in enumerate(rows, start=2):
        image = os.path.basename((row["image"] or "").strip())
        m = _PAIR_IMAGE.match(image)
        if m is None:
            raise ValueError(f"{path}, line {line}: image {row['image']!r} is neither 'u_idx_N_…' (unsafe) nor "
                             "'s_idx_N_…' (safe twin)")
        prompt = (row["prompt"] or "").strip()
        if m.group(1) == "u":
            unsafe.append((int(m.group(2)), prompt, _category(path, line, row["category"] or "")))
        else:
            safe.setdefault(int(m.group(2)), prompt)
    out: list[tuple[str, str, str]] = []
    seen: set[tuple[str, str, str]] = set()
    for idx, prompt, cat in unsafe:
        twin = safe.get(idx)
        triple = (prompt, twin, cat)
        if twin is None or triple in seen:
            continue
        seen.add(triple)
        out.append(triple)
        if limit is not None and len(out) >= limit:
            break
    return out


def load_i2p(data_dir: "str | Path | None" = None, *, min_inappropriate: float = 50.0,
             max_inappropriate: float | None = None) -> list[tuple[str, list[str]]]:
    r"""I2P prompts whose ``inappropriate_percentage`` is at least ``min_inappropriate`` (the share of the
    original SD images judged inappropriate; and at most ``max_inappropriate`` if given), as ``(prompt, [I2P
    categories])``, in file order, each prompt once.

    Example:
        >>> import pathlib, tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> _ = (pathlib.Path(tmp.name) / "i2p.csv").write_text(
        ...     ",prompt,categories,inappropriate_percentage\n"
        ...     '0,a bloody knife,"violence, shocking",80.0\n1,a calm lake,violence,10.0\n')
        >>> load_i2p(tmp.name)
        [('a bloody knife', ['violence', 'shocking'])]
        >>> tmp.cleanup()
    """
    path, rows = _read_csv(data_dir, "i2p.csv", ("prompt", "categories", "inappropriate_percentage"))
    out: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    for i, row in enumerate(rows, start=2):
        try:
            share = float(row["inappropriate_percentage"] or "nan")
        except ValueError:
            raise ValueError(f"{path}, line {i}: inappropriate_percentage {row['inappropriate_percentage']!r} is "
                             "not a number") from None
        prompt = " ".join((row["prompt"] or "").split())
        if not share >= min_inappropriate or not prompt or prompt in seen:
            continue
        if max_inappropriate is not None and not share <= max_inappropriate:
            continue
        seen.add(prompt)
        out.append((prompt, [c.strip() for c in (row["categories"] or "").split(",") if c.strip()]))
    return out


def i2p_benign(data_dir: "str | Path | None" = None, *, max_inappropriate: float = 5.0) -> list[str]:
    r"""Benign prompts in the style people write for image models (artists, styles, "trending on artstation"): the
    I2P prompts whose SD images were judged inappropriate at most ``max_inappropriate`` percent of the time, leaving
    out the ones I2P files under ``sexual`` and every prompt of ``nudity.csv`` (both stay evaluation data). Disjoint
    from the I2P evaluation set (``inappropriate_percentage`` ≥ 50). Meant as training negatives for a prompt
    checker, so that an artist's name or a style tail is not read as unsafe; measured for the MiniLM Latent Guard
    head it did that (artist prompts flagged 19% → 2%) but unsafe I2P prompts look the same and their recall
    collapsed (BENCHMARKS.md), so the shipped head does not use it.

    Example:
        >>> import pathlib, tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> _ = (pathlib.Path(tmp.name) / "i2p.csv").write_text(
        ...     ",prompt,categories,inappropriate_percentage\n0,a calm lake by monet,violence,2.0\n"
        ...     "1,a bloody knife,violence,80.0\n2,a pinup by vargas,sexual,1.0\n")
        >>> i2p_benign(tmp.name)
        ['a calm lake by monet']
        >>> tmp.cleanup()
    """
    nudity: set[str] = set()
    try:
        nudity = {" ".join(p.split()) for p in read_prompts(Path(_data_dir(data_dir)) / "nudity.csv", dedup=False)}
    except (FileNotFoundError, ValueError):
        pass  # no nudity set next to it: nothing to keep out
    return [p for p, cats in load_i2p(data_dir, min_inappropriate=0.0, max_inappropriate=max_inappropriate)
            if "sexual" not in cats and p not in nudity]


def load_coprov2_test(data_dir: "str | Path | None" = None, dedup: bool = True) -> list[tuple[str, str]]:
    r"""CoProV2 test prompts (all unsafe) as ``(prompt, category)``; with ``dedup`` (default), rows whose prompt
    occurs verbatim in the training file, or earlier in the test file, are dropped.

    Example:
        >>> import pathlib, tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> d = pathlib.Path(tmp.name)
        >>> _ = (d / "CoProv2_train.csv").write_text("prompt,image,category\n"
        ...     "a man kicks a dog,u_idx_0_0.jpg,Violence\na man walks a dog,s_idx_0_0.jpg,Violence\n")
        >>> _ = (d / "CoProv2_test.csv").write_text("prompt,image,category\n"
        ...     "a man kicks a dog,0_0.jpg,Violence\na boy mocks a girl,1_0.jpg,Harrasment\n")
        >>> load_coprov2_test(d)
        [('a boy mocks a girl', 'harassment')]
        >>> len(load_coprov2_test(d, dedup=False))
        2
        >>> tmp.cleanup()
    """
    path, rows = _read_csv(data_dir, "CoProv2_test.csv", ("prompt", "category"))
    out = [((r["prompt"] or "").strip(), _category(path, i, r["category"] or "")) for i, r in enumerate(rows, start=2)]
    if dedup:
        seen = {p for p, _ in load_coprov2_train(data_dir)}
        kept = []
        for p, c in out:
            if p not in seen:
                seen.add(p)
                kept.append((p, c))
        out = kept
    return out


def load_coco(data_dir: "str | Path | None" = None) -> list[str]:
    r"""Benign COCO captions (the ``prompt`` column of ``coco_30k_10k.csv``), stripped; empty ones dropped.

    Example:
        >>> import pathlib, tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> _ = (pathlib.Path(tmp.name) / "coco_30k_10k.csv").write_text(
        ...     "case_number,source,prompt,evaluation_seed,coco_id\n1,coco-30k,Two trains near railway stops. ,5,7\n")
        >>> from safegen.world import parse_prompt
        >>> captions = load_coco(tmp.name)
        >>> captions, parse_prompt(captions[0])
        (['Two trains near railway stops.'], PromptAttributes(colour=None, object='vehicle'))
        >>> load_coco(pathlib.Path(tmp.name) / "nowhere")
        Traceback (most recent call last):
        ...
        FileNotFoundError: .../nowhere/coco_30k_10k.csv: data file 'coco_30k_10k.csv' not found; ...
        >>> tmp.cleanup()
    """
    _, rows = _read_csv(data_dir, "coco_30k_10k.csv", ("prompt",))
    return [p for p in ((r["prompt"] or "").strip() for r in rows) if p]


#: The COCO rows the evaluation harness reads (``coco`` benchmark, in file order): never used for training.
HARNESS_COCO_ROWS = 1000


def _heldout_half(caption: str) -> bool:
    import hashlib

    return hashlib.blake2b(caption.encode("utf-8"), digest_size=8).digest()[0] % 2 == 0


def split_coco(captions: "list[str]", *, skip: int = HARNESS_COCO_ROWS) -> tuple[list[str], list[str]]:
    """Split COCO captions into ``(train, heldout)`` across the whole file.

    The file is ordered by topic (giraffes sit in its first half), so a block of rows is no fair split: a head
    trained on the back half never sees a giraffe and flags them. Here the first ``skip`` rows (what the
    evaluation harness reads) and the packaged benign reference set (:func:`safegen.calibration.reference_prompts`,
    the calibration set) are left out of both; every other distinct caption goes to ``heldout`` or ``train`` by a
    hash of its text (about half each), so both halves span every topic and a caption repeated in the file always
    lands on the same side.

    Example:
        >>> train, heldout = split_coco([f"a photo of dog number {i}" for i in range(2000)], skip=1000)
        >>> len(train) + len(heldout), 400 < len(heldout) < 600, set(train).isdisjoint(heldout)
        (1000, True, True)
    """
    from ..calibration import reference_prompts

    out = set(captions[:skip]) | set(reference_prompts())
    train: list[str] = []
    heldout: list[str] = []
    for c in dict.fromkeys(captions[skip:]):
        if c not in out:
            (heldout if _heldout_half(c) else train).append(c)
    return train, heldout
