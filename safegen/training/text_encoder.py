"""A CLIP-architecture text encoder for the embedded world, distilled offline from all-MiniLM-L6-v2.

Real Stable Diffusion 1.x/2.x, SDXL and SD3 condition on causal CLIP-style text encoders: a byte-level BPE
tokenizer with a 77-token window, causal self-attention, and a pooled vector read at the end-of-text (EOS) token.
The embedded default model used MiniLM (bidirectional, mean-pooled, 32 tokens), which is the wrong proxy for
guards that work in the text space (SAFREE's trigger masks and projections, SLD, prompt-window handling). This
module builds the replacement:

* **tokenizer** (:func:`train_bpe`, :func:`save_tokenizer`): byte-level BPE learnt by our own code from the
  training prompts, in CLIP's format and id layout: the 256 byte symbols in CLIP's byte order (id 0 is ``"!"``,
  the id SAFREE masks with), the same 256 with ``</w>``, one id per merge in merge order, then
  ``<|startoftext|>`` and ``<|endoftext|>`` as the last two ids; ``pad = <|endoftext|>``, ``model_max_length=77``.
  Text is NFC-normalised, whitespace-collapsed and lower-cased, split with CLIP's word regex; every byte has a
  symbol, so any text tokenizes. ``vocab.json`` + ``merges.txt`` load with :class:`transformers.CLIPTokenizer`;
  :class:`ReferenceBPE` re-implements CLIP's original pure-Python encoding to check the two agree.
* **student** (:func:`build_student`): a :class:`transformers.CLIPTextModel` with ``hidden_size`` 384 (the
  default model's UNet has ``cross_attention_dim`` 384), causal attention, EOS pooling, 77 positions, its
  ``bos/eos/pad_token_id`` set to the tokenizer's. Optionally warm-started from MiniLM (:func:`init_from_minilm`):
  same width, so the embedding table (each BPE token gets the mean MiniLM embedding of its WordPiece pieces),
  the position embeddings and the six layers' weights transfer (BERT is post-LN, CLIP pre-LN: each BERT
  LayerNorm becomes the pre-LN of the sub-layer it feeds).
* **distillation** (:func:`train`): the teacher's sentence embedding is MiniLM's mean of the last hidden state
  over attended tokens (as sentence-transformers computes it). The student's EOS state (``last_hidden_state`` at
  the EOS position after the final LayerNorm: what SD pipelines feed the UNet, and ``pooler_output``) is trained
  to it with

  - ``1 - cos(eos, teacher)`` (no learned map: the EOS states themselves carry MiniLM's geometry);
  - a relational term: mean squared difference between the batch's pairwise cosine matrices of student EOS
    states and teacher embeddings (what Spearman-of-cosines and guards like SAFREE see);
  - token states left to right: for a few sampled word prefixes of each prompt, the state at the prefix's last
    token is trained to MiniLM's embedding of that prefix (causal: it can only see the prefix);
  - padding states (after EOS; the UNet reads them too) trained to the sentence embedding, like CLIP's padding
    states which mirror its EOS state; every ``full_pad_every`` steps a batch is padded to all 77 positions.

  Training text: CoProV2 train (unsafe prompts and their safe twins, kept in the same batch), COCO captions
  after the first :data:`~safegen.default_model.HELDOUT_COCO` (evaluation rows), the artist prompts and the
  default policy's concept phrases. Never I2P, ``nudity.csv``, CoProV2 test or the held-out COCO rows.
* **fidelity** (:func:`fidelity_report` on :func:`fidelity_data`): on held-out text (the first 1000 COCO
  captions, CoProV2 test prompts) the Spearman correlation of pairwise cosines against MiniLM, the same on
  paraphrase pairs made by documented rewrites (:func:`paraphrase`), and unsafe-vs-benign separability
  (logistic probe ROC AUC) of the student's EOS vector next to MiniLM's embedding.

Command line (seeded; ``--resume`` continues from the last checkpoint)::

    python -m safegen.training.text_encoder --out DIR [--steps N] [--resume]

``DIR`` gets ``text_encoder/`` (config.json + model.safetensors) and ``tokenizer/`` (vocab.json, merges.txt,
tokenizer.json, tokenizer configs) in the layout of a diffusers ``StableDiffusionPipeline`` folder, plus
``distill_info.json`` (configuration, data counts, timings and the fidelity report). Checkpoints (safetensors:
weights + AdamW state, metadata in the header), the learnt tokenizer and the cached teacher targets go to
``<DIR>-checkpoints/``.

Example:
    >>> from transformers import CLIPTextModel, CLIPTokenizer
    >>> tok = CLIPTokenizer.from_pretrained("DIR/tokenizer")  # doctest: +SKIP
    >>> enc = CLIPTextModel.from_pretrained("DIR/text_encoder")  # doctest: +SKIP
    >>> ids = tok(["a red bus"], padding="max_length", max_length=77, return_tensors="pt").input_ids  # doctest: +SKIP
    >>> enc(ids).pooler_output.shape  # doctest: +SKIP
    torch.Size([1, 384])
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import math
import re
import sys
import time
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import regex
import torch
import torch.nn.functional as F

from .loop import Checkpoints, TrainingLoop, progress_bar

__all__ = [
    "MAX_LENGTH", "BOS", "EOS", "EOW", "DEFAULT_VOCAB_SIZE", "DEFAULT_MODEL", "byte_symbols", "normalize_text",
    "pretokenize", "train_bpe", "bpe_vocab", "save_tokenizer", "load_tokenizer", "ReferenceBPE",
    "tokenizer_agreement", "MiniLMTeacher", "training_texts", "build_student", "init_from_minilm",
    "eos_features", "distill_loss", "train", "export", "FidelityData", "fidelity_data", "paraphrase",
    "fidelity_report", "main",
]

#: CLIP's token window.
MAX_LENGTH = 77
BOS, EOS, EOW = "<|startoftext|>", "<|endoftext|>", "</w>"
#: Total vocabulary (512 byte symbols + merges + 2 specials): small enough for a <= 80 MB fp32 encoder.
DEFAULT_VOCAB_SIZE = 12288
#: The student's CLIPTextConfig (besides vocabulary and special ids). Same width, heads, MLP and depth as MiniLM,
#: so :func:`init_from_minilm` can transfer every weight; GELU as in BERT.
DEFAULT_MODEL: dict = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=12,
                           max_position_embeddings=MAX_LENGTH, hidden_act="gelu", projection_dim=384)

# CLIP's word regex (the one transformers' CLIPTokenizer splits with; text is lower-cased first).
_WORD = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
_SPACES = regex.compile(r"\s+")


# ============================================================================================== tokenizer
def byte_symbols() -> tuple[list[int], list[str]]:
    """CLIP's (and GPT-2's) byte-to-symbol table, in CLIP's vocabulary order.

    Printable bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for themselves and come first; the other 68
    bytes (space, control characters, ...) get the code points 256, 257, ... in byte order.

    Returns:
        ``(bytes_in_order, symbols)``: two lists of 256, ``symbols[i]`` stands for byte ``bytes_in_order[i]``.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    kept = set(printable)
    others = [b for b in range(256) if b not in kept]
    return printable + others, [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


_ORDER, _SYMBOLS = byte_symbols()
_BYTE_TO_SYMBOL = dict(zip(_ORDER, _SYMBOLS))
_SYMBOL_TO_BYTE = {s: b for b, s in _BYTE_TO_SYMBOL.items()}


def normalize_text(text: str) -> str:
    """What the CLIP tokenizer does before splitting: NFC, runs of whitespace to one space, lower case (per
    character, as the tokenizers library does: no context rule for a word-final sigma)."""
    return "".join(ch.lower() for ch in _SPACES.sub(" ", unicodedata.normalize("NFC", text)))


def _symbols(word: str) -> str:
    return "".join(_BYTE_TO_SYMBOL[b] for b in word.encode("utf-8"))


def pretokenize(text: str) -> list[str]:
    """The words BPE works on: CLIP's regex matches of the normalised text, each byte written as its symbol."""
    return [_symbols(w) for w in _WORD.findall(normalize_text(text))]


def _merge_word(symbols: list[str], a: str, b: str) -> list[str]:
    """Replace every non-overlapping (a, b), left to right, by a+b."""
    out, i, n = [], 0, len(symbols)
    while i < n:
        if i < n - 1 and symbols[i] == a and symbols[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def train_bpe(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, *, min_frequency: int = 2,
              progress: bool = False) -> list[tuple[str, str]]:
    """Learn byte-level BPE merges (CLIP format: the last symbol of a word carries ``</w>``) from ``texts``.

    Greedy: repeatedly merge the most frequent adjacent pair (weighted by word counts; ties go to the
    lexicographically smallest pair, so the result is deterministic) until the vocabulary has ``vocab_size``
    entries (``512 + merges + 2`` specials) or no pair occurs ``min_frequency`` times. A pair whose merged string
    is already a token is skipped, so every merge adds exactly one new id (CLIP's layout: id = 512 + merge rank).
    Pair counts are updated incrementally, only for the words that contain the merged pair.

    Example:
        >>> train_bpe(["low lower lowest"] * 3, 512 + 2 + 2)
        [('l', 'o'), ('lo', 'w')]
    """
    n_merges = int(vocab_size) - 2 * 256 - 2
    if n_merges < 0:
        raise ValueError(f"vocab_size must be at least 514 (512 byte symbols + 2 specials), got {vocab_size}")
    counts = Counter(w for t in texts for w in pretokenize(t))
    words = sorted(counts)
    freq = [counts[w] for w in words]
    syms = [list(w[:-1]) + [w[-1] + EOW] for w in words]
    pair_count: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, s in enumerate(syms):
        for p in zip(s, s[1:]):
            pair_count[p] += freq[i]
            where[p].add(i)
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    known = set(_SYMBOLS) | {s + EOW for s in _SYMBOLS}
    merges: list[tuple[str, str]] = []
    bar = None
    if progress:
        bar = progress_bar(total=n_merges, desc="BPE merges", unit="merge")
    while len(merges) < n_merges and heap:
        neg, pair = heapq.heappop(heap)
        count = pair_count.get(pair, 0)
        if count != -neg or count <= 0:
            continue  # stale entry: the pair's current count was pushed when it changed
        if count < min_frequency:
            break
        new = pair[0] + pair[1]
        if new in known:
            pair_count[pair] = 0  # never merge it: the id layout needs one new token per merge
            continue
        merges.append(pair)
        known.add(new)
        touched: set[tuple[str, str]] = set()
        for i in sorted(where.pop(pair, ())):
            old = syms[i]
            for p in zip(old, old[1:]):
                pair_count[p] -= freq[i]
                where[p].discard(i)
                touched.add(p)
            cur = _merge_word(old, *pair)
            for p in zip(cur, cur[1:]):
                pair_count[p] += freq[i]
                where[p].add(i)
                touched.add(p)
            syms[i] = cur
        for p in touched:
            if pair_count[p] > 0 and p != pair:
                heapq.heappush(heap, (-pair_count[p], p))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return merges


def bpe_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """CLIP's id layout: 256 byte symbols, the same with ``</w>``, one token per merge, then BOS and EOS."""
    tokens = list(_SYMBOLS) + [s + EOW for s in _SYMBOLS] + [a + b for a, b in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("merges produce duplicate tokens; CLIP's layout needs one new token per merge")
    return vocab


def save_tokenizer(folder: "str | Path", merges: Sequence[tuple[str, str]]):
    """Write ``vocab.json``, ``merges.txt`` (CLIP's files), ``tokenizer.json``, ``tokenizer_config.json`` and
    ``special_tokens_map.json`` to ``folder`` and return the loaded :class:`transformers.CLIPTokenizer`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = bpe_vocab(merges)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "do_lower_case": True,
              "errors": "replace", "clean_up_tokenization_spaces": False, **specials}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    tokenizer = _from_vocab_files(folder)
    tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
    return load_tokenizer(folder)


def _from_vocab_files(folder: Path):
    from transformers import CLIPTokenizer

    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)


def load_tokenizer(folder: "str | Path"):
    """:class:`transformers.CLIPTokenizer` of a folder written by :func:`save_tokenizer` (``model_max_length``
    77, pad = ``<|endoftext|>``)."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(folder), model_max_length=MAX_LENGTH)
    if tok.pad_token != EOS or tok.convert_tokens_to_ids(EOS) != len(tok) - 1:
        raise ValueError(f"{folder}: not a tokenizer in CLIP's layout (pad {tok.pad_token!r}, "
                         f"{EOS} id {tok.convert_tokens_to_ids(EOS)} of {len(tok)})")
    return tok


class ReferenceBPE:
    """CLIP's original tokenization re-implemented in plain Python (what the slow ``CLIPTokenizer`` did, without
    ftfy): normalise, split with CLIP's regex, write bytes as symbols, apply merges by rank inside each word,
    wrap in BOS/EOS, truncate to ``max_length`` keeping EOS. An independent check of the tokenizers-backed
    :class:`transformers.CLIPTokenizer` (in transformers 5 ``CLIPTokenizerFast`` is the same class).

    Example:
        >>> ref = ReferenceBPE({**bpe_vocab([("h", "i</w>")])}, [("h", "i</w>")])
        >>> ref.tokens("Hi!")
        ['<|startoftext|>', 'hi</w>', '!</w>', '<|endoftext|>']
    """

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], max_length: int = MAX_LENGTH):
        self.vocab = dict(vocab)
        self.ranks = {tuple(m): i for i, m in enumerate(merges)}
        self.max_length = int(max_length)
        self._cache: dict[str, list[str]] = {}

    @classmethod
    def from_folder(cls, folder: "str | Path") -> "ReferenceBPE":
        folder = Path(folder)
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        return cls(vocab, [tuple(x.split(" ")) for x in lines if x and not x.startswith("#version")])

    def bpe(self, word: str) -> list[str]:
        if word in self._cache:
            return self._cache[word]
        parts = list(word[:-1]) + [word[-1] + EOW]
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda p: self.ranks.get(p, math.inf))
            if best not in self.ranks:
                break
            parts = _merge_word(parts, *best)
        self._cache[word] = parts
        return parts

    def tokens(self, text: str) -> list[str]:
        words = _WORD.findall(normalize_text(text))  # the special tokens' spellings stay special, as in CLIP
        body = [t for w in words for t in ([w] if w in (BOS, EOS) else self.bpe(_symbols(w)))][: self.max_length - 2]
        return [BOS, *body, EOS]

    def encode(self, text: str) -> list[int]:
        return [self.vocab[t] for t in self.tokens(text)]


def tokenizer_agreement(tokenizer, reference: ReferenceBPE, texts: Sequence[str]) -> tuple[float, list[str]]:
    """Share of ``texts`` that ``tokenizer`` (truncating to 77) and ``reference`` encode to the same ids, and
    the texts where they differ."""
    ids = tokenizer(list(texts), truncation=True, max_length=reference.max_length).input_ids
    bad = [t for t, a in zip(texts, ids) if list(a) != reference.encode(t)]
    return 1.0 - len(bad) / max(1, len(texts)), bad


# ============================================================================================== teacher
def _sha(*parts: object) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, ensure_ascii=False, sort_keys=True).encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


class MiniLMTeacher:
    """all-MiniLM-L6-v2's sentence embedding: the mean of the last hidden state over the attended tokens
    ([CLS], the WordPieces, [SEP]), not normalised; prompts truncated to ``max_length`` WordPieces (128 covers
    every training prompt; MiniLM's own limit is 256).

    ``encode(texts)`` returns a float32 tensor (N, 384); with ``cache_dir`` results are cached on disk (keyed by
    the texts), so training targets are computed once.
    """

    name = "all-MiniLM-L6-v2/mean"
    dim = 384

    def __init__(self, max_length: int = 128, cache_dir: "str | Path | None" = None, batch_size: int = 128):
        from ..default_model import minilm_components

        self.model, self.tokenizer = minilm_components(max_length)
        self.max_length = int(max_length)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def _encode(self, texts: Sequence[str], progress: bool) -> torch.Tensor:
        out = torch.empty(len(texts), self.dim)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths: less padding
        for s in progress_bar(range(0, len(order), self.batch_size), desc="MiniLM targets", unit="batch",
                      disable=not progress):
            idx = order[s:s + self.batch_size]
            tok = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            h = self.model(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
            m = tok.attention_mask.unsqueeze(-1).to(h.dtype)
            out[idx] = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return out

    def encode(self, texts: Sequence[str], progress: bool = False) -> torch.Tensor:
        texts = list(texts)
        if self.cache_dir is None:
            return self._encode(texts, progress)
        from safetensors.torch import load_file, save_file

        path = self.cache_dir / f"teacher-{_sha(self.name, self.max_length, texts)}.safetensors"
        if path.is_file():
            return load_file(str(path))["embeddings"]
        emb = self._encode(texts, progress)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"embeddings": emb.contiguous()}, str(tmp), metadata={"n": str(len(texts)), "teacher": self.name})
        tmp.replace(path)
        return emb

    __call__ = encode


# ============================================================================================== data
def _heldout_coco(data_dir) -> tuple[list[str], list[str]]:
    from ..default_model import HELDOUT_COCO
    from ..eval.datasets import load_coco

    coco = load_coco(data_dir)
    return coco[:HELDOUT_COCO], coco[HELDOUT_COCO:]


def training_texts(data_dir: "str | Path | None" = None) -> tuple[list[str], list[tuple[int, ...]], dict]:
    """The distillation text, each string once, in a fixed order, and how it is grouped into batches.

    Sources: CoProV2 train (every unsafe prompt and its safe twin), COCO captions after the first
    :data:`~safegen.default_model.HELDOUT_COCO` (minus any caption that also occurs among those held-out
    rows), the artist prompts (``big_artist_prompts.csv``) and the default policy's concept phrases. Never I2P,
    ``nudity.csv``, CoProV2 test, or the held-out COCO captions.

    Returns:
        ``(texts, units, counts)``: ``units`` are tuples of indices into ``texts`` that go into a batch together
        (a CoProV2 unsafe prompt with its safe twin; everything else alone); ``counts`` per source.
    """
    from ..eval.datasets import load_benchmark
    from ..policy import load_policy
    from ..eval.datasets import load_coprov2_pairs, load_coprov2_train

    held, coco_train = _heldout_coco(data_dir)
    held_set = set(held)
    index: dict[str, int] = {}
    texts: list[str] = []
    units: list[tuple[int, ...]] = []
    counts: Counter = Counter()

    def add(*items: str, source: str) -> None:
        new = []
        for t in items:
            t = t.strip()
            if not t or t in index or t in held_set:
                continue
            index[t] = len(texts)
            texts.append(t)
            new.append(index[t])
            counts[source] += 1
        if new:
            units.append(tuple(new))

    for unsafe, safe, _cat in load_coprov2_pairs(data_dir):
        add(unsafe, safe, source="coprov2_train")
    for prompt, _label in load_coprov2_train(data_dir):  # rows without a twin
        add(prompt, source="coprov2_train")
    for caption in coco_train:
        add(caption, source="coco_train")
    try:
        for rec in load_benchmark("artists", data_dir):
            add(rec.prompt, source="artists")
    except FileNotFoundError:
        pass
    for phrase in load_policy("default").concepts():
        add(phrase, source="concepts")
    return texts, units, dict(counts)


def _sample_prefixes(tokenizer, texts: Sequence[str], ids: Sequence[list[int]], per_prompt: int, seed: int):
    """Word prefixes (``per_prompt`` per prompt, seeded) and where each ends in the prompt's token ids.

    Returns ``(prefix_texts, rows, positions, prefix_index)``: the state of prompt ``rows[j]`` at token
    ``positions[j]`` is trained to the teacher's embedding of ``prefix_texts[prefix_index[j]]``."""
    rng = np.random.default_rng([int(seed), 17])
    chosen: list[tuple[int, str]] = []
    for i, t in enumerate(texts):
        words = t.split()
        if len(words) < 2 or per_prompt <= 0:
            continue
        ks = rng.choice(np.arange(1, len(words)), size=min(per_prompt, len(words) - 1), replace=False)
        chosen.extend((i, " ".join(words[:k])) for k in sorted(ks.tolist()))
    if not chosen:
        return [], np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    pids = tokenizer([p for _, p in chosen], truncation=True, max_length=MAX_LENGTH).input_ids
    uniq: dict[str, int] = {}
    rows, pos, pidx = [], [], []
    for (i, p), pi in zip(chosen, pids):
        last = len(pi) - 2  # [BOS, tokens..., EOS]: index of the prefix's last token
        # The prefix's tokens must be the prompt's first tokens (true for whitespace prefixes) and not truncated.
        if last < 1 or last >= len(ids[i]) - 1 or list(pi[:-1]) != list(ids[i][: last + 1]):
            continue
        rows.append(i)
        pos.append(last)
        pidx.append(uniq.setdefault(p, len(uniq)))
    return list(uniq), np.asarray(rows, np.int64), np.asarray(pos, np.int64), np.asarray(pidx, np.int64)


# ============================================================================================== student
def build_student(tokenizer, **overrides):
    """A randomly initialised :class:`transformers.CLIPTextModel` for ``tokenizer`` (vocabulary size and
    BOS/EOS/pad ids from it, so EOS pooling finds the first ``<|endoftext|>``); ``overrides`` change
    :data:`DEFAULT_MODEL`."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = {**DEFAULT_MODEL, **overrides}
    config = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **cfg)
    model = CLIPTextModel(config)
    return model


def _symbols_to_text(token: str) -> str | None:
    body = token[: -len(EOW)] if token.endswith(EOW) else token
    try:
        return bytes(_SYMBOL_TO_BYTE[c] for c in body).decode("utf-8")
    except (KeyError, UnicodeDecodeError):
        return None


@torch.no_grad()
def init_from_minilm(student, tokenizer, minilm, minilm_tokenizer) -> dict:
    """Warm-start ``student`` (a CLIPTextModel as wide as MiniLM) from MiniLM's weights.

    * token embeddings: each BPE token gets the mean of MiniLM's WordPiece embeddings of its text
      (``<|startoftext|>`` -> [CLS], ``<|endoftext|>`` -> [SEP]); tokens that are not whole UTF-8 text keep
      their random init;
    * position embeddings: MiniLM's first 77, plus its token-type-0 embedding (BERT adds it to every token);
    * layer ``l``: attention and MLP weights copied; BERT is post-LN (``x = LN(x + f(x))``), CLIP pre-LN
      (``x = x + f(LN(x))``), so the LayerNorm that produced a BERT sub-layer's input becomes the pre-LN of that
      sub-layer (the embedding LayerNorm before layer 0's attention), and the last layer's output LayerNorm
      becomes the final LayerNorm. Extra student layers keep their random init.

    Returns counts of what was copied.
    """
    bert = minilm
    cfg = student.config
    if cfg.hidden_size != bert.config.hidden_size or cfg.intermediate_size != bert.config.intermediate_size:
        raise ValueError(f"init_from_minilm needs hidden {bert.config.hidden_size} / MLP "
                         f"{bert.config.intermediate_size}, the student has {cfg.hidden_size} / {cfg.intermediate_size}")
    tm = getattr(student, "text_model", student)  # transformers 5 dropped the text_model wrapper
    wte = bert.embeddings.word_embeddings.weight
    vocab = tokenizer.get_vocab()
    copied = 0
    for token, i in vocab.items():
        if token == BOS:
            src = [minilm_tokenizer.cls_token_id]
        elif token == EOS:
            src = [minilm_tokenizer.sep_token_id]
        else:
            text = _symbols_to_text(token)
            if not text or not text.strip():
                continue
            src = minilm_tokenizer(text, add_special_tokens=False).input_ids
            if not src:
                continue
        tm.embeddings.token_embedding.weight[i] = wte[src].mean(0)
        copied += 1
    n_pos = tm.embeddings.position_embedding.weight.shape[0]
    tm.embeddings.position_embedding.weight.copy_(
        bert.embeddings.position_embeddings.weight[:n_pos] + bert.embeddings.token_type_embeddings.weight[0])
    layers = bert.encoder.layer
    n = min(len(tm.encoder.layers), len(layers))

    def copy_ln(dst, src):
        dst.weight.copy_(src.weight)
        dst.bias.copy_(src.bias)

    def copy_lin(dst, src):
        dst.weight.copy_(src.weight)
        dst.bias.copy_(src.bias)

    for li in range(n):
        dst, src = tm.encoder.layers[li], layers[li]
        copy_ln(dst.layer_norm1, bert.embeddings.LayerNorm if li == 0 else layers[li - 1].output.LayerNorm)
        copy_lin(dst.self_attn.q_proj, src.attention.self.query)
        copy_lin(dst.self_attn.k_proj, src.attention.self.key)
        copy_lin(dst.self_attn.v_proj, src.attention.self.value)
        copy_lin(dst.self_attn.out_proj, src.attention.output.dense)
        copy_ln(dst.layer_norm2, src.attention.output.LayerNorm)
        copy_lin(dst.mlp.fc1, src.intermediate.dense)
        copy_lin(dst.mlp.fc2, src.output.dense)
    if n:
        copy_ln(tm.final_layer_norm, layers[n - 1].output.LayerNorm)
    return {"token_embeddings": copied, "vocab": len(vocab), "layers": n}


def _pad_batch(ids: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token ids with ``pad_id`` (to the longest, or ``length``); returns (input_ids, eos_positions)."""
    L = max(len(x) for x in ids) if length is None else int(length)
    out = torch.full((len(ids), L), int(pad_id), dtype=torch.long)
    eos = torch.empty(len(ids), dtype=torch.long)
    for r, x in enumerate(ids):
        out[r, : len(x)] = torch.as_tensor(x, dtype=torch.long)
        eos[r] = len(x) - 1
    return out, eos


@torch.no_grad()
def eos_features(model, tokenizer, texts: Sequence[str], batch_size: int = 128, progress: bool = False) -> torch.Tensor:
    """The student's EOS vectors (``pooler_output``: final-LayerNorm state at the first ``<|endoftext|>``),
    float32 (N, hidden). Prompts are truncated to 77 tokens and padded to each batch's longest (causal
    attention: states up to EOS do not depend on the padding)."""
    was_training = model.training
    model.eval()
    ids = tokenizer(list(texts), truncation=True, max_length=MAX_LENGTH).input_ids
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = torch.empty(len(ids), model.config.hidden_size)
    for s in progress_bar(range(0, len(order), batch_size), desc="student EOS", unit="batch", disable=not progress):
        idx = order[s:s + batch_size]
        x, eos = _pad_batch([ids[i] for i in idx], tokenizer.pad_token_id)
        h = model(input_ids=x).last_hidden_state
        out[idx] = h[torch.arange(len(idx)), eos].float()
    model.train(was_training)
    return out


def distill_loss(hidden: torch.Tensor, eos_pos: torch.Tensor, target: torch.Tensor, *, w_rel: float = 5.0,
                 w_pad: float = 0.25, w_prefix: float = 0.5, prefix_rows: torch.Tensor | None = None,
                 prefix_pos: torch.Tensor | None = None, prefix_target: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """The distillation loss of one batch.

    Args:
        hidden: the student's ``last_hidden_state`` (B, T, D).
        eos_pos: position of each row's EOS (B,); positions after it are padding.
        target: the teacher's sentence embeddings (B, D).
        prefix_rows, prefix_pos, prefix_target: states ``hidden[rows, pos]`` trained to ``prefix_target``.

    Returns:
        ``(loss, parts)``: ``eos`` = mean ``1 - cos`` at EOS; ``rel`` = mean squared difference of the batch's
        pairwise cosine matrices (student EOS vs teacher); ``pad`` = mean ``1 - cos`` of padding states to the
        sentence target; ``prefix`` = mean ``1 - cos`` of prefix states to their targets.
    """
    B, T, _ = hidden.shape
    rows = torch.arange(B)
    eos = hidden[rows, eos_pos]
    l_eos = (1 - F.cosine_similarity(eos, target, dim=-1)).mean()
    se, te = F.normalize(eos, dim=-1), F.normalize(target, dim=-1)
    l_rel = (se @ se.T - te @ te.T).pow(2).mean()
    loss = l_eos + w_rel * l_rel
    parts = {"eos": l_eos.item(), "rel": l_rel.item()}
    pad = torch.arange(T).unsqueeze(0) > eos_pos.unsqueeze(1)
    if w_pad and bool(pad.any()):
        cos = F.cosine_similarity(hidden, target.unsqueeze(1), dim=-1)
        l_pad = ((1 - cos) * pad).sum() / pad.sum()
        loss = loss + w_pad * l_pad
        parts["pad"] = l_pad.item()
    if w_prefix and prefix_rows is not None and len(prefix_rows):
        l_pre = (1 - F.cosine_similarity(hidden[prefix_rows, prefix_pos], prefix_target, dim=-1)).mean()
        loss = loss + w_prefix * l_pre
        parts["prefix"] = l_pre.item()
    parts["loss"] = loss.item()
    return loss, parts


# ============================================================================================== training
def _epoch_batches(units: Sequence[tuple[int, ...]], lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                   bucket: int = 32) -> list[list[int]]:
    """One epoch's batches (lists of text indices), seeded by (seed, epoch): units shuffled, sorted by length
    inside chunks of ``bucket`` batches (less padding), cut into batches, batch order shuffled."""
    rng = np.random.default_rng([int(seed), int(epoch)])
    order = [units[i] for i in rng.permutation(len(units))]
    flat: list[int] = []
    chunk: list[tuple[int, ...]] = []
    budget = bucket * batch_size

    def flush():
        chunk.sort(key=lambda u: max(lengths[i] for i in u))
        flat.extend(i for u in chunk for i in u)
        chunk.clear()

    size = 0
    for u in order:
        chunk.append(u)
        size += len(u)
        if size >= budget:
            flush()
            size = 0
    flush()
    batches = [flat[s:s + batch_size] for s in range(0, len(flat), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def _spearman_of_cosines(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    def upper(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
        c = x @ x.T
        return c[np.triu_indices(len(x), k=1)]

    return float(spearmanr(upper(np.asarray(a, np.float64)), upper(np.asarray(b, np.float64))).statistic)


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim == 2 and "embedding" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _tokenizer_stage(ckpt_dir: Path, texts: Sequence[str], vocab_size: int, resume: bool, progress: bool):
    """Learn (or reuse, when built from the same texts and size) the BPE tokenizer in ``ckpt_dir/tokenizer``."""
    folder = ckpt_dir / "tokenizer"
    key = {"vocab_size": int(vocab_size), "texts": _sha(list(texts))}
    stamp = folder / "build.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == key:
        return load_tokenizer(folder), folder
    if resume and stamp.is_file():
        raise ValueError(f"{folder} was built from other texts or another vocabulary size than this run's; "
                         "resume with the original arguments or use a fresh --checkpoint-dir")
    merges = train_bpe(texts, vocab_size, progress=progress)
    tok = save_tokenizer(folder, merges)
    stamp.write_text(json.dumps(key) + "\n")
    return tok, folder


def train(out_dir: "str | Path", *, data_dir: "str | Path | None" = None, steps: int = 1500, batch_size: int = 64,
          lr: float = 3e-4, weight_decay: float = 0.01, warmup: int = 100, seed: int = 0,
          vocab_size: int = DEFAULT_VOCAB_SIZE, model_config: dict | None = None, init: str = "minilm",
          prefixes_per_prompt: int = 2, w_rel: float = 5.0, w_pad: float = 0.25, w_prefix: float = 0.5,
          full_pad_every: int = 16, resume: bool = False, checkpoint_every: int = 200,
          checkpoint_dir: "str | Path | None" = None, cache_dir: "str | Path | None" = None,
          eval_every: int = 250, log_every: int = 25,
          report: bool = True, progress: bool = True, texts: Sequence[str] | None = None,
          units: Sequence[tuple[int, ...]] | None = None, teacher=None, report_data: "FidelityData | None" = None,
          monitor_texts: Sequence[str] | None = None) -> dict:
    """Distil the CLIP-architecture student from MiniLM (see the module docstring) and export it to ``out_dir``.

    Args:
        out_dir: gets ``text_encoder/``, ``tokenizer/`` and ``distill_info.json``.
        steps: total optimizer steps (the cosine schedule spans them; ``resume`` continues up to them).
        init: ``"minilm"`` (warm start, :func:`init_from_minilm`) or ``"random"``.
        prefixes_per_prompt: word prefixes per prompt whose last-token states get prefix targets (0: none).
        w_rel, w_pad, w_prefix: weights of the relational, padding and prefix terms (:func:`distill_loss`).
        full_pad_every: every this-many steps the batch is padded to all 77 positions (0: never).
        resume: continue from the last checkpoint in ``checkpoint_dir`` (default ``<out_dir>-checkpoints``).
        cache_dir: where the teacher's targets are cached (default ``<checkpoint_dir>/cache``).
        texts, units, teacher, report_data, monitor_texts: overrides for tests (default: :func:`training_texts`,
            :class:`MiniLMTeacher` with a disk cache, :func:`fidelity_data`, 600 held-out prompts).

    Returns:
        The summary written to ``distill_info.json``.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else out_dir.parent / (out_dir.name + "-checkpoints")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if init not in ("minilm", "random"):
        raise ValueError(f"init must be 'minilm' or 'random', got {init!r}")
    if steps < 0 or batch_size < 1 or checkpoint_every < 1:
        raise ValueError("steps must be >= 0, batch_size and checkpoint_every >= 1")
    ckpts = Checkpoints(ckpt_dir, "step")
    existing = ckpts.paths()
    if existing and not resume:
        raise ValueError(f"{ckpt_dir} already holds checkpoints ({existing[-1].name}): pass resume=True (--resume) "
                         "to continue, or use another checkpoint folder")
    if resume and not existing:
        print(f"note: no checkpoint in {ckpt_dir}; starting from step 0", file=sys.stderr)

    # ---- data, tokenizer, teacher targets
    counts: dict = {}
    if texts is None:
        texts, units, counts = training_texts(data_dir)
    texts = list(texts)
    if units is None:
        units = [(i,) for i in range(len(texts))]
    tokenizer, tok_folder = _tokenizer_stage(ckpt_dir, texts, vocab_size, resume, progress)
    if teacher is None:
        teacher = MiniLMTeacher(cache_dir=Path(cache_dir) if cache_dir is not None else ckpt_dir / "cache")
    ids = tokenizer(texts, truncation=True, max_length=MAX_LENGTH).input_ids
    lengths = np.asarray([len(x) for x in ids])
    targets = torch.as_tensor(teacher.encode(texts, progress=progress), dtype=torch.float32)
    p_texts, p_rows, p_pos, p_idx = _sample_prefixes(tokenizer, texts, ids, prefixes_per_prompt, seed)
    p_targets = (torch.as_tensor(teacher.encode(p_texts, progress=progress), dtype=torch.float32) if p_texts
                 else torch.zeros(0, targets.shape[1]))
    order = np.argsort(p_rows, kind="stable")
    p_rows, p_pos, p_idx = p_rows[order], p_pos[order], p_idx[order]
    p_start = np.searchsorted(p_rows, np.arange(len(texts)), side="left")
    p_end = np.searchsorted(p_rows, np.arange(len(texts)), side="right")

    if monitor_texts is None:  # a quick held-out check logged during training
        try:
            from ..eval.datasets import load_coprov2_test

            held, _ = _heldout_coco(data_dir)
            test = [p for p, _ in load_coprov2_test(data_dir)]
            rng = np.random.default_rng([int(seed), 5])
            monitor_texts = held[:300] + [test[i] for i in rng.permutation(len(test))[:300]]
        except FileNotFoundError:
            monitor_texts = []
    monitor_texts = list(monitor_texts or [])
    monitor_t = teacher.encode(monitor_texts).numpy() if len(monitor_texts) > 2 else None

    # ---- model, optimizer, schedule
    torch.manual_seed(int(seed))
    mcfg = {**DEFAULT_MODEL, **(model_config or {})}
    model = build_student(tokenizer, **mcfg)
    if model.config.hidden_size != targets.shape[1]:
        raise ValueError(f"the student's hidden_size {model.config.hidden_size} must equal the teacher's "
                         f"dimension {targets.shape[1]}")
    init_info = {}
    opt = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    elapsed_before, history = 0.0, []
    run_args = {"steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "warmup": warmup,
                "seed": seed, "vocab_size": vocab_size, "init": init, "prefixes_per_prompt": prefixes_per_prompt,
                "w_rel": w_rel, "w_pad": w_pad, "w_prefix": w_prefix, "full_pad_every": full_pad_every}

    def meta(step: int) -> dict:  # read when a checkpoint is written (t0: the loop's start, below)
        return {"model_config": mcfg, "args": run_args, "seconds": elapsed_before + time.time() - t0,
                "history": history[-400:], "init_info": init_info}

    loop = TrainingLoop(model, opt, steps=steps, seed=seed, stream="text_encoder", schedule="cosine", warmup=warmup,
                        clip=1.0, checkpoints=ckpts, checkpoint_every=checkpoint_every, meta=meta,
                        desc="distil text encoder", progress=progress)
    if existing and resume:
        saved = Checkpoints.metadata(existing[-1])
        if saved.get("model_config") != json.loads(json.dumps(mcfg)):
            raise ValueError(f"{existing[-1]}: model config {saved.get('model_config')} differs from this run's {mcfg}")
        saved = loop.resume()
        elapsed_before = float(saved.get("seconds", 0.0))
        history = list(saved.get("history", []))
        init_info = saved.get("init_info", {})
        print(f"resuming from {existing[-1].name} (step {loop.start} of {steps})", file=sys.stderr)
    elif init == "minilm":
        from ..default_model import minilm_components

        bert, bert_tok = minilm_components(MAX_LENGTH)
        init_info = init_from_minilm(model, tokenizer, bert, bert_tok)
        del bert

    # ---- loop (the batches of a step depend only on seed and step: see _epoch_batches)
    model.train()
    t0 = time.time()
    epoch_cache: dict[int, list[list[int]]] = {}
    n_batches = math.ceil(len(texts) / batch_size)
    running: dict[str, list[float]] = defaultdict(list)
    for step, _ in loop:
        epoch, j = divmod(step, n_batches)
        if epoch not in epoch_cache:
            epoch_cache.clear()
            epoch_cache[epoch] = _epoch_batches(units, lengths, batch_size, seed, epoch)
        batch = epoch_cache[epoch][j]
        full = bool(full_pad_every) and step % full_pad_every == 0
        x, eos = _pad_batch([ids[i] for i in batch], tokenizer.pad_token_id, MAX_LENGTH if full else None)
        pr, pp, pt = [], [], []
        for r, i in enumerate(batch):
            for k in range(p_start[i], p_end[i]):
                pr.append(r)
                pp.append(int(p_pos[k]))
                pt.append(int(p_idx[k]))
        hidden = model(input_ids=x).last_hidden_state
        loss, parts = distill_loss(
            hidden, eos, targets[batch], w_rel=w_rel, w_pad=w_pad, w_prefix=w_prefix,
            prefix_rows=torch.as_tensor(pr, dtype=torch.long), prefix_pos=torch.as_tensor(pp, dtype=torch.long),
            prefix_target=p_targets[pt] if pt else None)
        loop.update(loss, **{k: v for k, v in parts.items() if k != "loss"})
        done = step + 1
        for k, v in parts.items():
            running[k].append(v)
        if done % log_every == 0 or done == steps:
            row = {"step": done, **{k: round(float(np.mean(v)), 5) for k, v in running.items()},
                   "lr": float(opt.param_groups[0]["lr"]), "seconds": round(elapsed_before + time.time() - t0, 1)}
            running.clear()
            if monitor_t is not None and eval_every and (done % eval_every == 0 or done == steps):
                row["monitor_spearman"] = round(_spearman_of_cosines(
                    eos_features(model, tokenizer, monitor_texts).numpy(), monitor_t), 4)
            history.append(row)
            tqdm.write(json.dumps(row), file=sys.stdout)
            sys.stdout.flush()
    seconds = elapsed_before + time.time() - t0

    # ---- export and report
    model.eval()
    export(model, tok_folder, out_dir)
    sample = texts[:: max(1, len(texts) // 3000)] + monitor_texts
    agreement, disagree = tokenizer_agreement(tokenizer, ReferenceBPE.from_folder(tok_folder), sample)
    n_params = sum(p.numel() for p in model.parameters())
    info = {
        "teacher": getattr(teacher, "name", type(teacher).__name__),
        "student": {"class": "CLIPTextModel", **mcfg, "vocab_size": len(tokenizer), "params": n_params,
                    "fp32_mb": round(n_params * 4 / 2**20, 2),
                    "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                    "pad_token_id": tokenizer.pad_token_id},
        "tokenizer": {"vocab_size": len(tokenizer), "merges": len(tokenizer) - 514, "model_max_length": MAX_LENGTH,
                      "agreement_with_reference_bpe": agreement, "agreement_sample": len(sample),
                      "disagreements": disagree[:5]},
        "data": {"texts": len(texts), "units": len(units), **counts, "prefix_targets": int(len(p_rows)),
                 "prefix_texts": len(p_texts)},
        "train": {**run_args, "final_step": loop.position, "seconds": round(seconds, 1),
                  "threads": torch.get_num_threads(), "init_info": init_info},
        "history": history,
    }
    if report:
        data = report_data if report_data is not None else fidelity_data(data_dir, seed=seed)
        info["fidelity"] = fidelity_report(
            lambda t: eos_features(model, tokenizer, t, progress=progress).numpy(),
            lambda t: np.asarray(teacher.encode(t, progress=progress)), data, seed=seed)
    (out_dir / "distill_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def export(model, tokenizer_folder: "str | Path", out_dir: "str | Path") -> Path:
    """Write ``out_dir/text_encoder`` (config.json + model.safetensors) and ``out_dir/tokenizer`` (the files of
    :func:`save_tokenizer`), the layout of a diffusers ``StableDiffusionPipeline`` folder."""
    import shutil

    out_dir = Path(out_dir)
    te = out_dir / "text_encoder"
    te.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(te))
    weights = te / "model.safetensors"
    if not weights.is_file():
        raise RuntimeError(f"{te}: save_pretrained wrote no model.safetensors")
    # transformers 5 saves CLIPTextModel's weights without the "text_model." prefix that transformers 4 (and the
    # hub's SD checkpoints) use; 5 strips that prefix on load, so writing it keeps the file loadable by both.
    from safetensors.torch import load_file, save_file

    state = load_file(str(weights))
    if not all(k.startswith("text_model.") for k in state):
        state = {(k if k.startswith("text_model.") else f"text_model.{k}"): v.contiguous() for k, v in state.items()}
        save_file(state, str(weights), metadata={"format": "pt"})
        weights.chmod(0o644)
    tk = out_dir / "tokenizer"
    tk.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(Path(tokenizer_folder) / name, tk / name)
    return out_dir


# ============================================================================================== fidelity
#: Paraphrase templates (rule "template": the caption, lower-cased without its final full stop, inside one).
PARAPHRASE_TEMPLATES = ("a photo of {}", "an image of {}", "a picture of {}")
#: Near-synonym swaps (rule "synonym"), whole words, applied everywhere they match.
PARAPHRASE_SYNONYMS = {
    "man": "guy", "men": "guys", "woman": "lady", "women": "ladies", "child": "kid", "children": "kids",
    "kid": "child", "kids": "children", "boy": "young man", "girl": "young woman", "people": "persons",
    "large": "big", "big": "large", "small": "little", "little": "small", "street": "road", "road": "street",
    "couch": "sofa", "sofa": "couch", "photo": "picture", "picture": "photo", "photograph": "photo",
    "tv": "television", "television": "tv", "bike": "bicycle", "bicycle": "bike", "motorcycle": "motorbike",
    "airplane": "plane", "plane": "airplane", "ocean": "sea", "sea": "ocean", "plate": "dish",
    "beside": "next to", "near": "close to", "several": "a few", "bathroom": "restroom", "puppy": "young dog",
    "sitting": "seated", "holding": "carrying", "looking": "gazing", "walking": "strolling", "cellphone": "mobile phone",
    "food": "meal", "field": "meadow", "grass": "lawn", "shore": "coast", "automobile": "car", "car": "automobile",
}
_SYN = re.compile(r"\b(" + "|".join(sorted(map(re.escape, PARAPHRASE_SYNONYMS), key=len, reverse=True)) + r")\b")


def paraphrase(caption: str, i: int = 0) -> tuple[str, str]:
    """A documented rewrite of ``caption`` that keeps its meaning, chosen by ``i``.

    Rules, in turn by ``i % 3``: ``template`` (the caption inside one of :data:`PARAPHRASE_TEMPLATES`),
    ``synonym`` (every word of :data:`PARAPHRASE_SYNONYMS` swapped), ``both``; a caption with no swappable word
    gets ``template``. Captions are lower-cased and lose a final full stop (both encoders are uncased).

    Example:
        >>> paraphrase("A man riding a big horse.", 0)
        ('a photo of a man riding a big horse', 'template')
        >>> paraphrase("A man riding a big horse.", 1)
        ('a guy riding a large horse', 'synonym')
    """
    base = " ".join(caption.strip().lower().split()).rstrip(".").strip()
    swapped = _SYN.sub(lambda m: PARAPHRASE_SYNONYMS[m.group(1)], base)
    template = PARAPHRASE_TEMPLATES[(i // 3) % len(PARAPHRASE_TEMPLATES)]
    rule = ("template", "synonym", "both")[i % 3] if swapped != base else "template"
    if rule == "template":
        return template.format(base), rule
    if rule == "synonym":
        return swapped, rule
    return template.format(swapped), rule


@dataclass
class FidelityData:
    """Held-out text for :func:`fidelity_report` (build it with :func:`fidelity_data`).

    ``heldout`` (with ``heldout_source`` per text) for Spearman of pairwise cosines; ``paraphrases`` as
    ``(original, rewrite, rule)``; a probe trained on ``probe_train`` (labels 1 = unsafe) and scored on
    ``probe_test``."""

    heldout: list[str]
    heldout_source: list[str]
    paraphrases: list[tuple[str, str, str]]
    probe_train: list[str]
    probe_train_labels: list[int]
    probe_test: list[str]
    probe_test_labels: list[int]
    notes: dict = field(default_factory=dict)


def fidelity_data(data_dir: "str | Path | None" = None, *, n_coprov2: int = 1000, n_probe_test: int = 2000,
                  n_probe_train: int = 3000, seed: int = 0) -> FidelityData:
    """The evaluation text of :func:`fidelity_report` (seeded samples):

    * held-out Spearman: the first :data:`~safegen.default_model.HELDOUT_COCO` (1000) COCO captions and
      ``n_coprov2`` CoProV2 *test* prompts (deduplicated against train);
    * paraphrases: one :func:`paraphrase` of each held-out COCO caption;
    * probe train (training split only): ``n_probe_train`` CoProV2 train pairs (unsafe = 1, safe twin = 0) and
      ``n_probe_train`` COCO training captions (0); probe test: ``n_probe_test`` CoProV2 test prompts (1, a
      superset of the Spearman sample) and the held-out COCO captions (0).
    """
    from ..eval.datasets import load_coprov2_pairs, load_coprov2_test

    rng = np.random.default_rng([int(seed), 11])
    held, coco_train = _heldout_coco(data_dir)
    test = [p for p, _ in load_coprov2_test(data_dir)]
    test = [test[i] for i in rng.permutation(len(test))[: max(n_coprov2, n_probe_test)]]
    pairs = load_coprov2_pairs(data_dir)
    pick = rng.permutation(len(pairs))[:n_probe_train]
    coco_pick = rng.permutation(len(coco_train))[:n_probe_train]
    probe_train = [pairs[i][0] for i in pick] + [pairs[i][1] for i in pick] + [coco_train[i] for i in coco_pick]
    labels = [1] * len(pick) + [0] * len(pick) + [0] * len(coco_pick)
    paras = [(c, *paraphrase(c, i)) for i, c in enumerate(held)]
    return FidelityData(
        heldout=held + test[:n_coprov2], heldout_source=["coco"] * len(held) + ["coprov2_test"] * min(n_coprov2, len(test)),
        paraphrases=paras, probe_train=probe_train, probe_train_labels=labels,
        probe_test=test[:n_probe_test] + held, probe_test_labels=[1] * min(n_probe_test, len(test)) + [0] * len(held),
        notes={"seed": seed, "coco_heldout": len(held), "coprov2_test_pool": len(test)})


def _rowcos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-12)
    b = b / np.linalg.norm(b, axis=1, keepdims=True).clip(1e-12)
    return (a * b).sum(1)


def fidelity_report(student: Callable[[list[str]], np.ndarray], teacher: Callable[[list[str]], np.ndarray],
                    data: FidelityData, *, seed: int = 0) -> dict:
    """How much of the teacher's (MiniLM's) semantics the student's vectors keep, on held-out text.

    Args:
        student, teacher: map a list of texts to an array (N, D) (the student's EOS vectors, MiniLM's sentence
            embeddings); each is called once, on every distinct text of ``data``.

    Returns:
        ``spearman_heldout`` (all pairs of ``data.heldout``) and per source (``spearman_heldout_<source>``);
        ``paraphrase``: ``spearman`` over paraphrase pairs and as many random (original, other rewrite) pairs,
        ``spearman_paraphrase_only``, and for student and teacher the mean paraphrase / random-pair cosine,
        ``auc_vs_random`` (how often a paraphrase pair is closer than a random pair) and ``top1`` (the share of
        originals whose nearest rewrite is their own); ``probe``: ROC AUC of a logistic probe (standardised
        features) trained on ``probe_train``, for both feature sets; ``n``: the sizes.
    """
    from scipy.stats import spearmanr
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    originals = [o for o, _, _ in data.paraphrases]
    rewrites = [p for _, p, _ in data.paraphrases]
    every = list(dict.fromkeys([*data.heldout, *originals, *rewrites, *data.probe_train, *data.probe_test]))
    where = {t: i for i, t in enumerate(every)}
    feats = {"student": np.asarray(student(every), np.float64), "teacher": np.asarray(teacher(every), np.float64)}

    def rows(name, texts):
        return feats[name][[where[t] for t in texts]]

    out: dict = {"spearman_heldout": _spearman_of_cosines(rows("student", data.heldout), rows("teacher", data.heldout))}
    for src in sorted(set(data.heldout_source)):
        sel = [t for t, s in zip(data.heldout, data.heldout_source) if s == src]
        if len(sel) > 2:
            out[f"spearman_heldout_{src}"] = _spearman_of_cosines(rows("student", sel), rows("teacher", sel))

    n = len(originals)
    para: dict = {"n": n, "rules": dict(Counter(r for _, _, r in data.paraphrases))}
    if n >= 3:
        shift = int(np.random.default_rng([int(seed), 3]).integers(1, n))
        other = [(i + shift) % n for i in range(n)]  # a random non-matching rewrite for each original
        cos = {}
        for name in ("student", "teacher"):
            o, p = rows(name, originals), rows(name, rewrites)
            pc, rc = _rowcos(o, p), _rowcos(o, p[other])
            cos[name] = (pc, rc)
            on = o / np.linalg.norm(o, axis=1, keepdims=True).clip(1e-12)
            pn = p / np.linalg.norm(p, axis=1, keepdims=True).clip(1e-12)
            top1 = float(np.mean((on @ pn.T).argmax(1) == np.arange(n)))
            # P(paraphrase cosine > random-pair cosine), ties half
            auc = float(roc_auc_score(np.r_[np.ones(n), np.zeros(n)], np.r_[pc, rc]))
            para[name] = {"paraphrase_cos_mean": float(pc.mean()), "random_cos_mean": float(rc.mean()),
                          "auc_vs_random": auc, "top1": top1}
        both_s = np.concatenate(cos["student"])
        both_t = np.concatenate(cos["teacher"])
        para["spearman"] = float(spearmanr(both_s, both_t).statistic)
        para["spearman_paraphrase_only"] = float(spearmanr(cos["student"][0], cos["teacher"][0]).statistic)
    out["paraphrase"] = para

    probe: dict = {"n_train": len(data.probe_train), "n_test": len(data.probe_test),
                   "train_unsafe": int(sum(data.probe_train_labels)), "test_unsafe": int(sum(data.probe_test_labels))}
    y_tr, y_te = np.asarray(data.probe_train_labels), np.asarray(data.probe_test_labels)
    if len(set(y_tr)) == 2 and len(set(y_te)) == 2:
        for name in ("student", "teacher"):
            clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=1.0))
            clf.fit(rows(name, data.probe_train), y_tr)
            probe[f"{name}_auc"] = float(roc_auc_score(y_te, clf.decision_function(rows(name, data.probe_test))))
    out["probe"] = probe
    out["n"] = {"heldout": len(data.heldout), "paraphrases": n, "texts_encoded": len(every)}
    return out


# ============================================================================================== CLI
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m safegen.training.text_encoder",
                                description="Distil a CLIP-architecture text encoder for the embedded world from "
                                            "all-MiniLM-L6-v2 (see the module docstring).")
    p.add_argument("--out", required=True, help="folder to export text_encoder/, tokenizer/, distill_info.json to")
    p.add_argument("--data-dir", default=None, help="prompt data (default: $SAFEGEN_DATA or ../shared/data)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    p.add_argument("--layers", type=int, default=DEFAULT_MODEL["num_hidden_layers"])
    p.add_argument("--init", choices=("minilm", "random"), default="minilm")
    p.add_argument("--prefixes-per-prompt", type=int, default=2)
    p.add_argument("--w-rel", type=float, default=5.0)
    p.add_argument("--w-pad", type=float, default=0.25)
    p.add_argument("--w-prefix", type=float, default=0.5)
    p.add_argument("--full-pad-every", type=int, default=16)
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--checkpoint-dir", default=None, help="default: <out>-checkpoints")
    p.add_argument("--cache-dir", default=None, help="teacher-target cache (default: <checkpoint-dir>/cache)")
    p.add_argument("--eval-every", type=int, default=250, help="log a quick held-out Spearman every N steps")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--no-report", action="store_true", help="skip the fidelity report at the end")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        info = train(a.out, data_dir=a.data_dir, steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup=a.warmup,
                     seed=a.seed, vocab_size=a.vocab_size, model_config={"num_hidden_layers": a.layers}, init=a.init,
                     prefixes_per_prompt=a.prefixes_per_prompt, w_rel=a.w_rel, w_pad=a.w_pad, w_prefix=a.w_prefix,
                     full_pad_every=a.full_pad_every, resume=a.resume, checkpoint_every=a.checkpoint_every,
                     checkpoint_dir=a.checkpoint_dir, cache_dir=a.cache_dir, eval_every=a.eval_every, report=not a.no_report,
                     progress=not a.no_progress)
    except (FileNotFoundError, ValueError, ImportError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: info[k] for k in ("student", "train") if k in info} | {"fidelity": info.get("fidelity")},
                     indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
