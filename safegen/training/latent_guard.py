"""Training a Latent Guard head (:class:`safegen.guards.latent_guard.LatentGuardHead`): the contrastive loss with
safe twins as hard negatives, benign texts and the token-evidence path, the held-out calibration of the threshold,
and the data helpers (CoProV2 pairs, their common parts, concept seed prompts).

From the command line: ``safegen train-prompt-guard --out head.safetensors [--benign FILE --benign-skip N]``.
"""

from __future__ import annotations

import re
import time
import warnings
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..encoders import TextEncoderAdapter
from ..eval.datasets import load_coprov2_pairs
from ..guards.latent_guard import (MINILM_NAME, LatentGuardHead, LatentGuardWeightsError, TextFeatures,
                                   _minilm_adapter, encoder_identity, text_features)
from .loop import TrainingLoop, seeded_init

__all__ = ["policy_concepts", "common_part", "concept_seed_pairs", "concept_spans", "contrastive_loss", "match_loss",
           "near_miss_span", "roc_auc", "train_head", "load_coprov2_pairs"]


# ---------------------------------------------------------------------- data
def policy_concepts(policy) -> list[tuple[str, str]]:
    """``(category, concept phrase)`` for every concept of every category of a policy, in policy order (a phrase
    listed under two categories appears once per category)."""
    from ..policy import load_policy

    pol = load_policy(policy)
    return [(cat, phrase) for cat in pol.categories for phrase in pol.concepts(cat)]


# ---------------------------------------------------------------------- training


def common_part(unsafe: str, safe: str, min_words: int = 3) -> str | None:
    """The words an unsafe prompt and its minimally edited safe twin share, in order (``None`` if fewer than
    ``min_words``): benign content with neither the unsafe words nor the rewrite's safe ones. As an extra
    negative it stops a head from learning the shortcut "no safe-rewrite word → unsafe".

    Example:
        >>> common_part("a man stabs a woman in a dark alley", "a man hugs a woman in a dark alley")
        'a man a woman in a dark alley'
    """
    import difflib

    a, b = unsafe.split(), safe.split()
    blocks = difflib.SequenceMatcher(a=[w.lower() for w in a], b=[w.lower() for w in b], autojunk=False)
    words = [w for m in blocks.get_matching_blocks() for w in a[m.a:m.a + m.size]]
    return " ".join(words) if len(words) >= min_words else None


#: Short prompt shapes for :func:`concept_seed_pairs`, and the harmless subjects of their safe twins.
_SEED_TEMPLATES = ("{}", "a photo of {}", "a painting of {}", "{}, highly detailed, digital art",
                   "a close-up picture of {} in a room", "{} at night, cinematic lighting")
_SEED_FILLERS = ("a tree", "a red car", "a dog", "a small house", "a cup of coffee", "a mountain lake", "a bicycle",
                 "a bowl of fruit", "a sailing boat", "a city street", "a cat on a sofa", "a birthday cake",
                 "a field of flowers", "a train station")


def concept_seed_pairs(entries: Sequence[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """``(unsafe, safe, category)`` training pairs made from concept phrases: each phrase in a few short prompt
    shapes ("a photo of {}"...), its twin the same shape around a harmless subject, so the shape itself is not
    what makes a prompt unsafe.

    Example:
        >>> concept_seed_pairs([("violence", "gore")])[:2]
        [('gore', 'a tree', 'violence'), ('a photo of gore', 'a photo of a red car', 'violence')]
    """
    out = []
    for i, (cat, phrase) in enumerate(entries):
        for j, shape in enumerate(_SEED_TEMPLATES):
            filler = _SEED_FILLERS[(i * len(_SEED_TEMPLATES) + j) % len(_SEED_FILLERS)]
            out.append((shape.format(phrase), shape.format(filler), cat))
    return out


#: Function words a pseudo-concept span may not start or end with (:func:`concept_spans`).
_FUNCTION_WORDS = frozenset(
    "a an the of in on at to for with and or but nor is are was were be been being am it its this that these those "
    "his her hers their theirs them they he she we you i me my your our us him by from as into onto over under "
    "near next up down out off about while who whom whose which what where when why how there here has have had "
    "do does did not no very some any each every all both few more most other such own same so than too can could "
    "will would shall should may might must just one two three four five her's it's also then".split())


def _words(text: str) -> list[str]:
    """A text's lowercase words (letters, digits, inner apostrophes and hyphens)."""
    return re.findall(r"[a-z0-9]+(?:['-][a-z0-9]+)*", str(text).lower())


def concept_spans(text: str, k: int, generator: torch.Generator, max_words: int = 3) -> list[str]:
    """Up to ``k`` distinct word spans of ``text`` (1 to ``max_words`` words, neither first nor last a function
    word, no single word under 3 letters), drawn with ``generator``: pseudo-concepts for the matching objective of
    :func:`train_head` (a concept phrase a user might add at run time is such a span of the prompts it must catch).

    Example:
        >>> import torch
        >>> sorted(concept_spans("A dog on a red sofa", 9, torch.Generator().manual_seed(0)))
        ['dog', 'red', 'red sofa', 'sofa']
    """
    words = _words(text)
    found: dict[str, None] = {}
    for i in range(len(words)):
        for n in range(1, max_words + 1):
            span = words[i:i + n]
            if len(span) < n or span[0] in _FUNCTION_WORDS or span[-1] in _FUNCTION_WORDS:
                continue
            if n == 1 and len(span[0]) < 3:
                continue
            found.setdefault(" ".join(span), None)
    spans = list(found)
    if not spans or k < 1:
        return []
    order = torch.randperm(len(spans), generator=generator)[:k].tolist()
    return [spans[i] for i in order]


def contains_span(text_words: str, span: str) -> bool:
    """Whether the space-joined word string ``text_words`` (see :func:`_words`) holds ``span`` as whole words."""
    return f" {span} " in f" {text_words} "


def near_miss_span(span: str, vocabulary: Sequence[str], generator: torch.Generator) -> str:
    """A span that shares words with ``span`` but is not it: one word swapped for a random ``vocabulary`` word (a
    one-word span gets a random word in front). A hard negative for the matching objective: "rubber duck" must not
    match a text about a mallard duck.

    Example:
        >>> import torch
        >>> near_miss_span("rubber duck", ["wooden", "stone"], torch.Generator().manual_seed(0)) in (
        ...     "wooden duck", "stone duck", "rubber wooden", "rubber stone")
        True
    """
    words = span.split()
    pick = lambda: vocabulary[int(torch.randint(len(vocabulary), (1,), generator=generator))]  # noqa: E731
    if len(words) == 1:
        return f"{pick()} {words[0]}"
    i = int(torch.randint(len(words), (1,), generator=generator))
    new = pick()
    if new == words[i]:
        new = pick()
    return " ".join(words[:i] + [new] + words[i + 1:])


def match_loss(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """The matching objective: texts (rows) against pseudo-concept spans (columns), ``positive[i, j]`` when text i
    contains span j; a multi-positive InfoNCE in both directions (each text must score its own spans above the
    others, each span the texts that contain it above the rest; a column no text contains — a hard negative span —
    only counts in the first direction).

    Example:
        >>> import torch
        >>> eye = torch.eye(3, dtype=torch.bool)
        >>> bool(match_loss(torch.eye(3) * 20, eye) < 1e-3), bool(match_loss(-torch.eye(3) * 20, eye) > 10)
        (True, True)
    """
    def one_way(x, pos):
        keep = pos.any(1)
        x, pos = x[keep], pos[keep]
        return (torch.logsumexp(x, 1) - torch.logsumexp(x.masked_fill(~pos, float("-inf")), 1)).mean()

    return (one_way(scores, positive) + one_way(scores.T, positive.T)) / 2


def _category_scores(scores: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """Soft maximum (log-mean-exp) of concept scores (N, C) within each category of ``member`` (C, K) → (N, K)."""
    x = scores.unsqueeze(-1).masked_fill(~member, float("-inf"))
    return torch.logsumexp(x, 1) - member.sum(0).clamp(min=1).log()


def contrastive_loss(unsafe_scores: torch.Tensor, safe_scores: torch.Tensor, member: torch.Tensor,
                     labels: torch.Tensor, extra_safe: torch.Tensor | None = None) -> torch.Tensor:
    """The symmetric InfoNCE loss over a batch of n pairs.

    Args:
        unsafe_scores, safe_scores: (n, C) head scores of the unsafe prompts and of their safe twins against
            every concept.
        member: (C, K) bool, concept c belongs to category k.
        labels: (n,) the category of each pair.

    Terms (each a cross-entropy over τ-scaled cosines):

    * prompt → concept: unsafe prompt i must score its own category above every other category *and* above
      its safe twin under its own category (the hard negative);
    * concept → prompt: each category present in the batch must score its unsafe prompts above the unsafe
      prompts of other categories and above every safe prompt (multi-positive InfoNCE); ``extra_safe`` (m, C)
      adds more safe prompts to that term (e.g. the benign common part of each pair, see :func:`common_part`).

    Example:
        >>> import torch
        >>> member = torch.tensor([[True, False], [False, True]])
        >>> good = contrastive_loss(torch.tensor([[9., -9.], [-9., 9.]]), torch.full((2, 2), -9.), member,
        ...                         torch.tensor([0, 1]))
        >>> bad = contrastive_loss(torch.tensor([[-9., 9.], [9., -9.]]), torch.full((2, 2), 9.), member,
        ...                        torch.tensor([0, 1]))
        >>> bool(good < 1e-3), bool(bad > 10)
        (True, True)
    """
    pu = _category_scores(unsafe_scores, member)  # (n, K)
    ps = _category_scores(safe_scores, member)
    twin = ps.gather(1, labels.unsqueeze(1))  # the safe twin under the unsafe prompt's own category
    prompt_to_concept = F.cross_entropy(torch.cat([pu, twin], 1), labels)
    present = torch.unique(labels)
    safe_cols = ps[:, present].T
    if extra_safe is not None and extra_safe.shape[0]:  # more benign prompts: negatives for every category
        safe_cols = torch.cat([safe_cols, _category_scores(extra_safe, member)[:, present].T], 1)
    logits = torch.cat([pu[:, present].T, safe_cols], 1)  # (P, n + m): unsafe prompts, then safe ones
    own = labels.unsqueeze(0) == present.unsqueeze(1)  # (P, n): unsafe prompts of the category
    positive = torch.cat([own, torch.zeros_like(safe_cols, dtype=torch.bool)], 1)  # a safe prompt never is
    concept_to_prompt = (torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~positive, float("-inf")), 1)
                         ).mean()
    return (prompt_to_concept + concept_to_prompt) / 2


def _binary(positive: torch.Tensor, negative: torch.Tensor):
    """``(labels, scores, unmap)`` for scikit-learn: numpy labels (1 for the positives, then 0) and scores, with
    ±inf scores (scikit-learn rejects them; e.g. a path that has no score) replaced by finite stand-ins below /
    above every finite score (order and ties kept: rank metrics are unchanged), and ``unmap`` taking a threshold
    back to the original scale (a stand-in to its infinity)."""
    import numpy as np

    pos = positive.detach().flatten().double().cpu().numpy()
    neg = negative.detach().flatten().double().cpu().numpy()
    labels, scores = np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg]
    low = high = None
    if np.isinf(scores).any():
        finite = scores[np.isfinite(scores)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        low, high = lo - (abs(lo) + 1.0), hi + (abs(hi) + 1.0)
        scores = np.where(scores == -np.inf, low, np.where(scores == np.inf, high, scores))

    def unmap(t: float) -> float:
        return float("-inf") if t == low else float("inf") if t == high else float(t)

    return labels, scores, unmap


def roc_auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Area under the ROC curve (:func:`sklearn.metrics.roc_auc_score`): P(score of a positive > score of a
    negative), ties counted half; NaN when either side is empty.

    Example:
        >>> import torch
        >>> roc_auc(torch.tensor([3., 2.]), torch.tensor([1., 2.]))
        0.875
    """
    from sklearn.metrics import roc_auc_score

    if positive.numel() == 0 or negative.numel() == 0:
        return float("nan")
    labels, scores, _ = _binary(positive, negative)
    return float(roc_auc_score(labels, scores))


def _youden_threshold(positive: torch.Tensor, negative: torch.Tensor) -> tuple[float, float, float]:
    """The score threshold (flag when ≥) maximising TPR − FPR, with its TPR and FPR (the lowest such threshold
    when several tie), from :func:`sklearn.metrics.roc_curve`."""
    import numpy as np
    from sklearn.metrics import roc_curve

    labels, scores, unmap = _binary(positive, negative)
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    j = tpr[1:] - fpr[1:]  # thresholds[0] flags nothing (above every score): not a score
    best = 1 + int(np.flatnonzero(j >= j.max() - 1e-12)[-1])  # thresholds fall: the last is the lowest
    return unmap(thresholds[best]), float(tpr[best]), float(fpr[best])


def _resolve_encoder(encoder, max_length: int | None):
    """``(encoder, identity, backbone)`` for train_head's encoder argument."""
    if isinstance(encoder, str):
        if encoder != "minilm":
            raise ValueError(f"encoder={encoder!r}: pass a TextEncoderAdapter, a callable, or 'minilm'")
        adapter = _minilm_adapter(max_length or 64, "cpu")
        return adapter, encoder_identity(adapter, MINILM_NAME), "minilm"
    if isinstance(encoder, TextEncoderAdapter):
        return encoder, encoder_identity(encoder), "pipeline"
    if callable(encoder):
        name = getattr(encoder, "__name__", type(encoder).__name__)
        return encoder, {"encoder": name, "encoder_type": "custom", "hidden_size": None}, "custom"
    raise TypeError(f"encoder must be a TextEncoderAdapter, a callable or 'minilm', got {type(encoder).__name__}")


def train_head(encoder, pairs: Sequence[tuple[str, str, str]], *, concepts=None, policy: Any = "default",
               head: LatentGuardHead | None = None, config: Mapping[str, Any] | None = None, steps: int = 2000,
               batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 1e-4, val_share: float = 0.1,
               seed: int = 0, device: "str | torch.device | None" = None, encode_batch: int = 256,
               store_dtype: torch.dtype | None = None, progress: bool = True, backbone: str | None = None,
               max_length: int | None = None, common_negatives: bool = True, benign: Sequence[str] = (),
               evidence: bool = True, benign_weight: float = 16.0, category_weight: float = 0.3,
               concept_pairs: int = 4, match_weight: float = 1.0, match_spans: int = 2
               ) -> tuple[LatentGuardHead, dict[str, Any]]:
    """Train a :class:`LatentGuardHead` contrastively on (unsafe prompt, safe twin, category) pairs.

    The frozen encoder runs once over every distinct text (features cached); each step samples ``batch_size``
    training pairs and minimises :func:`contrastive_loss` against all concepts. A ``val_share`` of the pairs
    (grouped by unsafe prompt, so no prompt is on both sides) is held out: the summary reports the ROC AUC of
    "best score over all concepts" for unsafe vs safe prompts there, and the threshold maximising TPR − FPR,
    which is stored in ``head.metadata["threshold"]`` (and in the file by :meth:`LatentGuardHead.save`).

    Args:
        encoder: a :class:`~safegen.encoders.TextEncoderAdapter` (e.g. a pipeline's text encoder), ``"minilm"``
            (the all-MiniLM-L6-v2 backbone) or a callable ``texts -> (tokens, mask[, pooled])``.
        pairs: ``(unsafe, safe, category)`` triples, e.g. from :func:`load_coprov2_pairs`.
        concepts: ``{category: [phrases]}`` or ``[(category, phrase)]``; default: the ``policy``'s concepts.
        head: continue training this head instead of a fresh one; ``config``: overrides of
            :class:`LatentGuardConfig` fields for a fresh head.
        steps, batch_size, lr, weight_decay: AdamW optimisation (paper: lr 1e-3, batch 64).
        val_share: share of pairs held out for validation (0 = none).
        common_negatives: also push down, for every category, the words each pair shares
            (:func:`common_part`): benign text without the safe twin's rewrite words, so the head cannot learn
            "no rewrite word → unsafe" (that shortcut makes ordinary captions score high).
        benign: more benign texts pushed down for every category (e.g. captions of ordinary images); a
            ``val_share`` of them is held out for validation like the pairs. Texts that are also a pair's
            prompt are dropped. Keep any set you evaluate on out of this list.
        evidence: also train the token-evidence path (``evidence_hidden=256`` unless ``config`` says otherwise;
            see :meth:`LatentGuardHead.evidence`) with a weighted binary cross-entropy (unsafe prompt = 1, safe twin,
            common part and benign text = 0, the last weighted ``benign_weight``) plus ``category_weight`` × the
            cross-entropy of the unsafe prompts' categories. Its scores are then shifted into the concept scores'
            units, so one threshold serves both paths (see *Returns*).
        concept_pairs: also train on short prompts made from the concept phrases themselves (see
            :func:`concept_seed_pairs`), each ``concept_pairs`` times as likely to be drawn as a data pair (0 = off):
            CoProV2's prompts are whole sentences, so without them a bare "nude woman" or "blood and gore" is out of
            distribution. Training only; the validation and the threshold use held-out data pairs alone.
        match_weight: weight of the matching objective (:func:`match_loss`; 0 = off), which makes the concept path
            a general matcher, so that a concept added at run time (``policy.add_concept``) is honoured: each
            training text gives ``match_spans`` word spans (:func:`concept_spans`) as pseudo-concepts, and in each
            step a batch of texts must score the spans they contain above the spans of the other texts, and each
            span the texts that contain it above the others. Only training texts give spans; the summary's
            ``val_match_auc`` measures the matching on held-out texts (a text's own span against the spans of
            other held-out texts that it does not contain). Each span also brings a near-miss span
            (:func:`near_miss_span`: one word swapped) as a hard negative, so a shared word alone is not a match.
        seed: seeds the head's initialisation, the split and, through
            :class:`~safegen.training.loop.TrainingLoop`, each step's batch and dropout (from the seed and the step
            number; the caller's global RNG is untouched).
        device: where the head trains (default: the encoder's device).
        progress: show a tqdm progress bar.

    Returns:
        ``(head, summary)``: the head in eval mode and a dict with ``losses`` (per step), ``val_auc``,
        ``threshold``, ``val_tpr``, ``val_fpr``, ``train_pairs``, ``val_pairs``, ``tau``, ``seconds``...
        With an evidence path and held-out benign texts, the threshold is set so that a category's score (the
        higher of its best concept score and its evidence) flags at most 1% of the held-out benign texts, and no
        more than 0.2% through the concepts alone (the evidence path detects better: the budget is mostly its);
        ``val_auc_evidence`` and ``val_auc_combined`` report the evidence and the combined score against the
        held-out twins.

    Example:
        >>> from safegen.training.latent_guard import train_head
        >>> from safegen.encoders import TextEncoderAdapter
        >>> from safegen.testing import tiny_sd_pipeline
        >>> pipe = tiny_sd_pipeline()
        >>> enc = TextEncoderAdapter.for_clip(pipe.tokenizer, pipe.text_encoder)
        >>> pairs = [(f"blood and gore {w}", f"a red {w}", "violence") for w in ("tree", "cat", "bus")]
        >>> pairs += [(f"a nude {w}", f"a {w}", "sexual") for w in ("woman", "man", "person")]
        >>> head, summary = train_head(enc, pairs, concepts={"violence": ["blood"], "sexual": ["nude"]},
        ...                            steps=5, batch_size=4, val_share=0.34, progress=False,
        ...                            config=dict(num_heads=2, head_dim=8, latent_dim=8, mlp_hidden=0))
        >>> len(summary["losses"]), summary["val_pairs"], 0.0 <= summary["val_auc"] <= 1.0
        (5, 2, True)
    """
    from ..policy import normalize_category

    t0 = time.time()
    if steps < 0 or batch_size < 1:
        raise ValueError(f"steps must be ≥ 0 and batch_size ≥ 1, got steps={steps}, batch_size={batch_size}")
    if not 0 <= val_share < 1:
        raise ValueError(f"val_share must be in [0, 1), got {val_share}")
    enc, identity, kind = _resolve_encoder(encoder, max_length)
    backbone = backbone or kind

    # ---- concepts: (category, phrase) entries and their category membership
    if concepts is None:
        entries = policy_concepts(policy)
    elif isinstance(concepts, Mapping):
        entries = [(normalize_category(c), p) for c, ps in concepts.items() for p in ps]
    else:
        entries = [(normalize_category(c), p) for c, p in concepts]
    categories = list(dict.fromkeys(c for c, _ in entries))
    if not entries:
        raise ValueError("no concepts to train against")
    pairs = [(str(u), str(s), normalize_category(c)) for u, s, c in pairs]
    unknown = sorted({c for _, _, c in pairs} - set(categories))
    if unknown:
        raise ValueError(f"pairs use categories {unknown} that have no concepts; concepts cover {categories}")
    if not pairs:
        raise ValueError("train_head needs at least one (unsafe, safe, category) pair")

    # ---- split by unsafe prompt text (seeded)
    gen = torch.Generator().manual_seed(seed)
    groups = list(dict.fromkeys(u for u, _, _ in pairs))
    order = torch.randperm(len(groups), generator=gen).tolist()
    n_val = int(round(val_share * len(groups)))
    if val_share > 0 and len(groups) > 1:
        n_val = min(max(n_val, 1), len(groups) - 1)
    val_groups = {groups[i] for i in order[:n_val]}
    train_pairs = [p for p in pairs if p[0] not in val_groups]
    val_pairs = [p for p in pairs if p[0] in val_groups]

    # ---- extra benign negatives: the common part of each pair
    own = {t for u, s, _ in pairs for t in (u, s)}

    def commons(subset):
        if not common_negatives:
            return []
        found = (common_part(u, s) for u, s, _ in subset)
        return list(dict.fromkeys(c for c in found if c is not None and c not in own))

    train_neg = commons(train_pairs)
    in_train = set(train_neg)
    val_neg = [c for c in commons(val_pairs) if c not in in_train]
    val_benign: list[str] = []
    train_benign: list[str] = []
    extra = [b for b in dict.fromkeys(str(b) for b in benign) if b not in own]
    if extra:
        order_b = torch.randperm(len(extra), generator=gen).tolist()
        n_bval = int(round(val_share * len(extra)))
        val_benign = [extra[i] for i in order_b[:n_bval] if extra[i] not in in_train]
        val_neg += val_benign
        held = set(val_neg) | in_train
        train_benign = list(dict.fromkeys(extra[i] for i in order_b[n_bval:] if extra[i] not in held))

    n_data_pairs = len(train_pairs)
    seeded = concept_seed_pairs(entries) if concept_pairs > 0 else []
    seeded = [p for p in seeded if p[0] not in own and p[1] not in own]
    train_pairs = train_pairs + seeded * int(concept_pairs)

    # ---- pseudo-concepts for the matching objective: word spans of the training texts (held-out ones for validation)
    def spans_of(sources):
        out_ = []
        for t in dict.fromkeys(sources):
            out_ += [(t, span) for span in concept_spans(t, match_spans, gen)]
        return out_

    match_on = match_weight > 0 and match_spans > 0
    data_train = [t for u, s, _ in train_pairs[:n_data_pairs] for t in (u, s)]
    match_train = spans_of(data_train + train_neg + train_benign) if match_on else []
    match_val = spans_of([t for u, s, _ in val_pairs for t in (u, s)] + val_neg)[:1024] if match_on else []
    vocabulary = sorted({w for _, span in match_train for w in span.split() if w not in _FUNCTION_WORDS})
    all_spans = dict.fromkeys(sp for _, sp in match_train + match_val)
    near = {span: near_miss_span(span, vocabulary, gen) for span in all_spans}

    # ---- frozen features, once per distinct text
    texts = list(dict.fromkeys([t for u, s, _ in pairs + seeded for t in (u, s)] + train_neg + train_benign + val_neg))
    position = {t: i for i, t in enumerate(texts)}
    feats = text_features(enc, texts, batch_size=encode_batch, store_dtype=store_dtype, progress=progress)
    if store_dtype is None and feats.tokens.numel() > 2 ** 27:  # large sets: halve the cache (≥ 512 MB in fp32)
        feats = TextFeatures(feats.tokens.half(), feats.mask, feats.summary.half())
    cfeats = text_features(enc, [p for _, p in entries], batch_size=encode_batch, store_dtype=torch.float32)
    span_texts = list(dict.fromkeys([span for _, span in match_train + match_val] + list(near.values())))
    span_pos = {t: i for i, t in enumerate(span_texts)}
    sfeats = (text_features(enc, span_texts, batch_size=encode_batch, store_dtype=store_dtype or torch.float16,
                            progress=progress) if span_texts else None)
    norm_words = {t: " ".join(_words(t)) for t in dict.fromkeys(t for t, _ in match_train + match_val)}

    def match_batch(chosen, hard: bool = True):
        """(text features, span features, positive mask) of m (text, span) pairs: the columns are the m spans and,
        with ``hard``, their m near-miss spans (:func:`near_miss_span`)."""
        spans = [sp for _, sp in chosen] + ([near[sp] for _, sp in chosen] if hard else [])
        t_idx = torch.tensor([position[t] for t, _ in chosen], dtype=torch.long)
        s_idx = torch.tensor([span_pos[sp] for sp in spans], dtype=torch.long)
        pos = torch.tensor([[contains_span(norm_words[t], sp) for sp in spans] for t, _ in chosen])
        pos[:, :len(chosen)] |= torch.eye(len(chosen), dtype=torch.bool)
        return feats.select(t_idx, device), sfeats.select(s_idx, device), pos.to(device)
    hidden = feats.tokens.shape[-1]
    identity = {**identity, "hidden_size": identity.get("hidden_size") or hidden}

    if device is None:
        device = enc.device if isinstance(enc, TextEncoderAdapter) else torch.device("cpu")
    device = torch.device(device)
    if head is None:
        overrides = dict(config or {})
        if evidence:
            overrides.setdefault("evidence_hidden", 256)
            overrides.setdefault("evidence_categories", categories)
        else:
            overrides["evidence_hidden"] = 0
        overrides.update(hidden_size=hidden, encoder=identity["encoder"], encoder_type=identity.get("encoder_type", ""),
                         encoder_layers=identity.get("encoder_layers"), encoder_vocab=identity.get("encoder_vocab"),
                         encoder_layer=identity.get("encoder_layer"), backbone=backbone,
                         max_length=getattr(enc, "max_length", None))
        head = seeded_init(lambda: LatentGuardHead(**overrides), seed)
    elif head.config.hidden_size != hidden:
        raise LatentGuardWeightsError(f"head has hidden size {head.config.hidden_size} but the encoder gives {hidden}")
    head = head.to(device).train()

    has_evidence = head.evidence_net is not None
    if has_evidence:
        missing = sorted(set(categories) - set(head.config.evidence_categories))
        if missing:
            raise ValueError(f"the head's evidence path has no output for categories {missing}; train a fresh head")
        ev_col = torch.tensor([head.config.evidence_categories.index(c) for c in categories], device=device)
    member = torch.tensor([[c == k for k in categories] for c, _ in entries], device=device)
    cat_index = {c: i for i, c in enumerate(categories)}
    u_idx = torch.tensor([position[u] for u, _, _ in train_pairs])
    s_idx = torch.tensor([position[s] for _, s, _ in train_pairs])
    labels = torch.tensor([cat_index[c] for _, _, c in train_pairs])
    ctoks = cfeats.select(torch.arange(len(entries)), device)
    # two pools of extra negatives, each sampled as many as the pairs per step: common parts and benign texts
    pools = [(torch.tensor([position[t] for t in pool], dtype=torch.long), w)
             for pool, w in ((train_neg, 1.0), (train_benign, float(benign_weight))) if pool]

    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    # each step's batch and dropout are seeded from (seed, step); the caller's global RNG is untouched
    loop = TrainingLoop(head, opt, steps=steps, seed=seed, stream="latent_guard", desc="latent guard",
                        progress=progress, device=device)
    for _, step_gen in loop:
        rows = torch.randint(len(train_pairs), (min(batch_size, len(train_pairs)),), generator=step_gen)
        picked = [u_idx[rows], s_idx[rows]]
        picked += [idx[torch.randint(len(idx), (rows.numel(),), generator=step_gen)] for idx, _ in pools]
        both = feats.select(torch.cat(picked), device)
        bank = head.encode_concepts(ctoks.tokens, ctoks.mask, summary=ctoks.summary)
        scores = head.score(both.tokens, both.mask, bank, summary=both.summary)
        n = rows.numel()
        loss = contrastive_loss(scores[:n], scores[n:2 * n], member, labels[rows].to(device),
                                extra_safe=scores[2 * n:] if pools else None)
        if has_evidence:
            unsafe_logit, cat_logits, _ = head.token_evidence(both.tokens, both.mask, both.summary)
            target = torch.cat([torch.ones(n), torch.zeros(n * (1 + len(pools)))]).to(device)
            weight = torch.cat([torch.ones(2 * n)] + [torch.full((n,), w) for _, w in pools]).to(device)
            bce = F.binary_cross_entropy_with_logits(unsafe_logit, target, reduction="none")
            loss = loss + (bce * weight).mean()
            loss = loss + category_weight * F.cross_entropy(cat_logits[:n, ev_col], labels[rows].to(device))
        if match_train:
            pick = torch.randint(len(match_train), (min(batch_size, len(match_train)),), generator=step_gen).tolist()
            tf, sf, pos = match_batch([match_train[i] for i in pick])
            mbank = head.encode_concepts(sf.tokens, sf.mask, summary=sf.summary)
            loss = loss + match_weight * match_loss(head.score(tf.tokens, tf.mask, mbank, summary=tf.summary), pos)
        loop.update(loss)
    losses = loop.losses
    head.eval()

    summary: dict[str, Any] = {
        "steps": steps, "train_pairs": n_data_pairs, "val_pairs": len(val_pairs), "concepts": len(entries),
        "concept_pairs": len(seeded),
        "common_negatives": len(train_neg), "benign": len(extra), "train_benign": len(train_benign),
        "val_auc_common": None,
        "categories": categories, "seed": seed, "batch_size": batch_size, "lr": lr, "losses": losses,
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "val_auc": None, "threshold": None, "val_tpr": None, "val_fpr": None, "threshold_rule": None,
        "match_weight": match_weight if match_on else 0.0, "match_spans": len(match_train), "val_match_auc": None,
        "val_match_auc_near": None,
        "benign_val_fpr": None, "val_auc_evidence": None, "val_auc_combined": None, "evidence_shift": None,
    }
    if val_pairs:
        with torch.no_grad():
            bank = head.encode_concepts(ctoks.tokens, ctoks.mask, summary=ctoks.summary)

            def best_of(texts_, path="concept"):
                idx = torch.tensor([position[t] for t in texts_], dtype=torch.long)
                vals = [torch.zeros(0)]
                for s in range(0, len(idx), encode_batch):
                    f = feats.select(idx[s:s + encode_batch], device)
                    if path == "concept":
                        vals.append(head.score(f.tokens, f.mask, bank, summary=f.summary).amax(1).cpu())
                    else:
                        vals.append(head.evidence(f.tokens, f.mask, f.summary, categories).amax(1).cpu())
                return torch.cat(vals)

            sets = {"pos": [p[0] for p in val_pairs], "twins": [p[1] for p in val_pairs], "neg": val_neg,
                    "benign": val_benign}
            con = {k: best_of(v) for k, v in sets.items()}
            evi = {k: best_of(v, "evidence") for k, v in sets.items()} if has_evidence else None
            if len(match_val) > 1:
                tf, sf, pos = match_batch(match_val)
                mscores = head.score(tf.tokens, tf.mask, head.encode_concepts(sf.tokens, sf.mask, summary=sf.summary),
                                     summary=tf.summary).cpu()
                m, pos = len(match_val), pos.cpu()
                own, other = mscores[:, :m], mscores[:, m:]
                summary["val_match_auc"] = roc_auc(own.diagonal(), own[~pos[:, :m]])
                summary["val_match_auc_near"] = roc_auc(own.diagonal(), other.diagonal()[~pos[:, m:].diagonal()])
        _calibrate(summary, con, evi)
        if evi is not None:  # fold the shift into the evidence path: its scores are now in concept-score units
            with torch.no_grad():
                head.evidence_net[-1].bias[0] += summary["evidence_shift"]
    elif has_evidence:
        warnings.warn("train_head(val_share=0): nothing is held out, so no threshold is calibrated and the evidence "
                      "path is not shifted into the concept scores' units; its raw logits will meet whatever threshold "
                      "the guard is given. Keep a validation share for a head you ship.", stacklevel=2)
    summary["tau"] = head.tau.item()
    summary["seconds"] = round(time.time() - t0, 2)
    head.metadata = {k: summary[k] for k in ("threshold", "val_auc", "val_auc_common", "val_tpr", "val_fpr",
                                             "train_pairs", "val_pairs", "steps", "seed", "categories", "benign",
                                             "threshold_rule", "benign_val_fpr", "val_auc_evidence",
                                             "val_auc_combined", "evidence_shift", "match_weight",
                                             "val_match_auc", "val_match_auc_near")}
    head.metadata["concepts"] = len(entries)
    return head, summary


def _calibrate(summary: dict[str, Any], con: Mapping[str, torch.Tensor],
               evi: Mapping[str, torch.Tensor] | None) -> None:
    """Pick the threshold (and, with an evidence path, the evidence shift) from held-out scores.

    ``con`` / ``evi``: best concept score / best evidence per held-out text, keyed ``pos`` (unsafe prompts),
    ``twins`` (their safe twins), ``neg`` (common parts and benign texts) and ``benign`` (benign texts only).
    Concepts only: the Youden point against twins and common parts, raised if needed so that at most 1% of the
    held-out benign texts are flagged. With evidence: the concepts alone may flag at most 0.2% of them (the
    Youden point if stricter), then the evidence is shifted so that the two together flag at most 1% (without
    benign texts: the evidence's own Youden point is mapped onto the threshold).
    """
    pos, safe, benign = con["pos"], torch.cat([con["twins"], con["neg"]]), con["benign"]
    summary["val_auc"] = roc_auc(pos, con["twins"])
    summary["val_auc_common"] = roc_auc(pos, con["neg"]) if len(con["neg"]) else None
    # the operating point: best TPR − FPR against every held-out safe text (twins and common parts)
    thr, _, _ = _youden_threshold(pos, safe)
    rule = "youden (max TPR - FPR on held-out twins and common parts)"
    if len(benign):
        summary["benign_val_fpr_at_youden"] = float((benign >= thr).double().mean())
        # ordinary prompts are most of what a service sees: never flag more than 1% of the held-out benign texts,
        # even where the Youden point (set by the hard twins) would
        share = 0.99 if evi is None else 0.998
        floor = float(torch.quantile(benign.double(), share))
        if floor > thr:
            thr = floor
            rule = (f"{100 * share:g}th percentile of the held-out benign captions' concept scores (above the Youden "
                    f"point)")
    if evi is not None:
        epos, esafe, ebenign = evi["pos"], torch.cat([evi["twins"], evi["neg"]]), evi["benign"]
        summary["val_auc_evidence"] = roc_auc(epos, evi["twins"])
        if len(benign):
            budget = int(0.01 * len(benign)) - int((benign >= thr).sum())
            free = ebenign[benign < thr].sort(descending=True).values  # the ones the concepts did not flag
            # the evidence may flag the `budget` highest of them, not one more
            if not len(free) or budget <= 0:
                cut = float(ebenign.max()) + 1e-3  # no room left: the evidence may flag none of them
            else:
                cut = float(free[min(budget, len(free) - 1)])
            shift = thr - cut - 1e-4
            rule += "; evidence shifted so that both paths together flag ≤ 1% of the held-out benign captions"
        else:
            shift = thr - _youden_threshold(epos, esafe)[0]
            rule += "; evidence shifted so that its own Youden point is the threshold"
        summary["evidence_shift"] = shift
        pos, safe = torch.maximum(pos, epos + shift), torch.maximum(safe, esafe + shift)
        benign = torch.maximum(benign, ebenign + shift) if len(benign) else benign
        summary["val_auc_combined"] = roc_auc(pos, torch.maximum(con["twins"], evi["twins"] + shift))
    summary["threshold"], summary["threshold_rule"] = thr, rule
    summary["val_tpr"] = float((pos >= thr).double().mean())
    summary["val_fpr"] = float((safe >= thr).double().mean())
    summary["benign_val_fpr"] = float((benign >= thr).double().mean()) if len(benign) else None
