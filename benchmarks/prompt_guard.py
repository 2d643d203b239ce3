"""Latent Guard (MiniLM head) as a prompt checker, next to two baselines, on prompts none of them trained on.

Sets (from ``../shared/data``):

* ``coprov2``: deduplicated ``CoProv2_test.csv`` prompts (unsafe; none occurs in the training file);
* ``i2p``: I2P prompts with ``inappropriate_percentage`` ≥ 50 (unsafe, a different distribution: lexica.art
  prompts with artists and styles);
* ``coco``: with ``--coco-split`` (heads trained with ``--benign-split``), the held-out half of
  :func:`safegen.eval.datasets.split_coco` (COCO captions from across the whole topic-ordered file, none used in
  training or calibration); else the first ``--coco-eval`` (5,000) captions, for heads trained with
  ``--benign-skip 5000`` (a caption that also occurs later is dropped, so no evaluated caption was seen in training);
* ``nudity`` (I2P's nudity subset: recall) and ``artists`` (``big_artist_prompts.csv``: a second benign set of
  artists and styles: false-positive rate), at each checker's own rule.

Checkers:

* **Latent Guard**: the shipped head (``assets/latent_guard/minilm.safetensors``) against the policy's concepts;
  the score is the largest margin over categories of (the higher of the category's best concept score and its
  token evidence) minus the category's threshold, calibrated on the benign reference prompts at the policy's
  budget (1%), raised to 0 when a policy phrase is written in the prompt (a written phrase fires its category), so
  "score ≥ 0" is the guard's decision. The two paths are also reported alone (the concept path is
  the paper's head); the category agreement is the share of flagged CoProV2 prompts whose reported category (the
  fired one the head scores highest, as the guard reports it) is the data's label;
* **keyword**: the policy's concept phrases as whole-word matches; the score is the number of phrases found;
* **probe**: logistic regression (L2, C = 1, standardised inputs) on MiniLM's mean-pooled sentence embedding,
  trained on every CoProV2 training pair (unsafe prompt = 1, its safe twin = 0) — the first thing a user would
  try with the same encoder and data. Its decision threshold is p ≥ 0.5. A second probe also gets the benign
  captions the head trained with (label 0), so both learned checkers see the same data.

Metrics: ROC AUC, TPR at 1% FPR (the largest threshold whose COCO false-positive rate is ≤ 1%, ties counted as
flagged), the operating point of each checker's own decision rule, per-category recall on CoProV2 at it, and
the cost of a check (head only, 1,000 concepts; encoder + check at batch 32).

    python benchmarks/prompt_guard.py --write

``--backbone pipeline`` measures the head shipped for the embedded default model's own CLIP text encoder
(``assets/latent_guard/default-model.safetensors``, trained the same way with ``--backbone pipeline --model
default``) in its own section; the probes then read that encoder's EOS vector:

    python benchmarks/prompt_guard.py --backbone pipeline --write
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks._common import machine, median_seconds, publish  # noqa: E402

BEGIN, END = "<!-- prompt-guard:begin -->", "<!-- prompt-guard:end -->"
#: ``--backbone pipeline`` writes its own section
PIPELINE_BEGIN, PIPELINE_END = "<!-- prompt-guard-pipeline:begin -->", "<!-- prompt-guard-pipeline:end -->"


# ---------------------------------------------------------------------- metrics
def tpr_at_fpr(pos: torch.Tensor, neg: torch.Tensor, fpr: float = 0.01) -> tuple[float, float]:
    """(TPR, threshold) at the lowest threshold t whose false-positive rate P(neg ≥ t) is ≤ ``fpr``: at most
    ``int(fpr · len(neg))`` negatives score ≥ t (``inf`` if even the highest score is over), from
    :func:`sklearn.metrics.roc_curve` (every distinct score a threshold)."""
    import numpy as np
    from sklearn.metrics import roc_curve

    from safegen.training.latent_guard import _binary

    labels, scores, unmap = _binary(pos, neg)  # ±inf scores (a path with no score) as finite stand-ins
    fprs, tprs, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    allowed = int(fpr * neg.numel())  # negatives that may score ≥ t
    n_ge = np.rint(fprs * neg.numel())  # negatives ≥ each threshold, as counts (no rounding in the comparison)
    best = int(np.flatnonzero(n_ge <= allowed)[-1])  # thresholds fall: the last allowed one is the lowest
    if best == 0:  # no score qualifies: t = inf (which still flags scores of +inf)
        return float((pos >= float("inf")).double().mean()), float("inf")
    return float(tprs[best]), unmap(thresholds[best])


def summary_rows(scores: dict[str, torch.Tensor], decide) -> dict:
    from safegen.training.latent_guard import roc_auc

    neg = scores["coco"]
    out = {"coco_fpr": float(decide(neg).double().mean())}
    for name in ("coprov2", "i2p"):
        pos = scores[name]
        tpr, _ = tpr_at_fpr(pos, neg)
        out[name] = {"auc": roc_auc(pos, neg), "tpr_at_1fpr": tpr, "tpr_at_rule": float(decide(pos).double().mean())}
    return out


# ---------------------------------------------------------------------- checkers
def latent_guard_scores(head, adapter, feats: dict, policy, texts: dict, chunk: int = 512
                        ) -> dict[str, dict[str, torch.Tensor]]:
    """Per set, the guard's decision score (largest margin over categories of max(best concept score, evidence)
    minus the calibrated threshold), the two paths' own margins and the reported category's index (the guard's own
    rule, :func:`safegen.guards.latent_guard._decide`, with the literal phrases of ``texts``):
    ``{"guard": ..., "concepts": ..., "evidence": ..., "category": ...}``."""
    from safegen.guards.latent_guard import LatentGuard, _decide, literal_hits, per_category

    guard = LatentGuard()
    cache: dict = {}
    bank, cat_of, cats, entries = guard._bank(cache, policy, head, adapter)
    phrases = [p for _, p in entries]
    thr = guard._thresholds(cache, policy, head, adapter)[0].to(head.device)
    out: dict[str, dict[str, torch.Tensor]] = {"guard": {}, "concepts": {}, "evidence": {}, "category": {}}
    with torch.no_grad():
        for name, f in feats.items():
            vals: dict[str, list] = {k: [] for k in out}
            for s in range(0, len(f), chunk):
                part = f.select(torch.arange(s, min(s + chunk, len(f))))
                scores, ev = guard._score_features(head, part, bank, cats)
                by_concept = per_category(scores, cat_of, len(cats))
                vals["concepts"].append((by_concept - thr).amax(1))
                if ev is None:
                    ev = torch.full_like(by_concept, float("-inf"))
                vals["evidence"].append((ev - thr).amax(1))
                both = torch.maximum(by_concept, ev)
                lit = literal_hits(texts[name][s:s + chunk], phrases, cache)
                # the guard's rule: a category fires at its threshold, or when one of its phrases is written in the
                # prompt (a literal hit counts as margin 0 at least: flagged, and ranked by its score above that)
                margin = (both - thr).amax(1)
                vals["guard"].append(torch.where(lit.any(1), margin.clamp(min=0.0), margin))
                # the reported category, as LatentGuard reports it
                vals["category"].append(torch.tensor(_decide(scores, cat_of, thr, ev, lit).category))
            for k in out:
                out[k][name] = torch.cat(vals[k])
    return out


def keyword_scores(prompts: dict[str, list[str]], policy) -> dict[str, torch.Tensor]:
    from safegen.guards.safree import _phrase_regex

    rx = _phrase_regex(policy.concepts())
    return {name: torch.tensor([float(len({m.lower() for m in rx.findall(p)})) for p in ps])
            for name, ps in prompts.items()}


def train_probe(x: torch.Tensor, y: torch.Tensor, c: float = 1.0, iters: int = 200):
    """L2 logistic regression (sklearn's objective: ½‖w‖² + C Σ log-loss) on standardised x, by L-BFGS."""
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    z = ((x - mean) / std).double()
    y = y.double()
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=iters, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = 0.5 * (w * w).sum() + c * torch.nn.functional.binary_cross_entropy_with_logits(
            z @ w + b, y, reduction="sum")
        loss.backward()
        return loss

    opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda f: (((f - mean) / std).double() @ w + b)  # logits: ≥ 0 ⇔ p ≥ 0.5


# ---------------------------------------------------------------------- cost
def _adapter(head, backbone: str, model: str | None):
    """The encoder the head reads: MiniLM, or the text encoder of ``model`` (``--backbone pipeline``)."""
    from safegen.guards.latent_guard import _minilm_adapter, _pipeline_adapter

    if backbone == "minilm":
        return _minilm_adapter(int(head.config.max_length or 64), "cpu")
    from safegen.loading import load_pipeline

    return _pipeline_adapter(load_pipeline(model or "default", "cpu"))


def cost(head, adapter, concept_texts: list[str], prompts: list[str], reps: int = 20) -> dict:
    from safegen.guards.latent_guard import text_features

    with torch.no_grad():
        cf = text_features(adapter, concept_texts, batch_size=256)
        bank = head.encode_concepts(cf.tokens, cf.mask, summary=cf.summary)
        batch = prompts[:32]
        pf = text_features(adapter, batch, batch_size=32)

        def timed(fn) -> float:
            return median_seconds(fn, reps)

        def check(f):  # what the guard runs per batch once the concept bank is cached: both paths
            head.score(f.tokens, f.mask, bank, summary=f.summary)
            if head.evidence_net is not None:
                head.evidence(f.tokens, f.mask, f.summary)

        head_32 = timed(lambda: check(pf))
        one = pf.select(torch.arange(1))
        head_1 = timed(lambda: check(one))

        def full():
            check(text_features(adapter, batch, batch_size=32))

        full_32 = timed(full)
    return {"concepts": len(concept_texts), "head_ms_per_prompt_b32": 1000 * head_32 / len(batch),
            "head_ms_b1": 1000 * head_1, "encoder_and_check_ms_per_prompt_b32": 1000 * full_32 / len(batch)}


# ---------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default=None, help="Latent Guard head (default: the shipped head for --backbone)")
    ap.add_argument("--backbone", choices=("minilm", "pipeline"), default="minilm",
                    help="minilm (the shipped MiniLM head) or pipeline: the text encoder of --model, with the head "
                         "shipped for the embedded default model (its own section in BENCHMARKS.md)")
    ap.add_argument("--model", default=None, help="with --backbone pipeline: the pipeline (default: the embedded one)")
    ap.add_argument("--policy", default="default")
    ap.add_argument("--limit", type=int, default=None, help="at most N prompts per set (quick runs)")
    ap.add_argument("--coco-eval", type=int, default=5000,
                    help="report on the first N COCO captions; the rest are the benign training captions (default "
                         "5000, what the shipped head skipped)")
    ap.add_argument("--coco-split", action="store_true",
                    help="report on the held-out half of split_coco (heads trained with --benign-split)")
    ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    a = ap.parse_args()
    from safegen.guards.latent_guard import (LatentGuardHead, default_pipeline_weights_path, default_weights_path,
                                             text_features)
    from safegen.policy import load_policy
    from safegen.eval.datasets import (load_benchmark, load_coco, load_coprov2_pairs, load_coprov2_test, load_i2p,
                                       split_coco)

    t0 = time.time()
    policy = load_policy(a.policy)
    pipeline = a.backbone == "pipeline"
    if a.model and not pipeline:
        ap.error("--model needs --backbone pipeline")
    weights = Path(a.weights) if a.weights else (default_pipeline_weights_path() if pipeline else default_weights_path())
    head = LatentGuardHead.load(weights).eval()
    adapter = _adapter(head, a.backbone, a.model)
    enc = "the default model's CLIP encoder" if pipeline else "MiniLM"
    begin, end = (PIPELINE_BEGIN, PIPELINE_END) if pipeline else (BEGIN, END)

    coprov2 = load_coprov2_test()
    coco = load_coco()
    if a.coco_split:
        benign, held = split_coco(coco)
    else:
        benign = list(dict.fromkeys(coco[a.coco_eval:]))
        seen = set(benign)
        held = [c for c in coco[:a.coco_eval] if c not in seen]
    sets = {"coprov2": [p for p, _ in coprov2], "i2p": [p for p, _ in load_i2p()], "coco": held,
            "nudity": [r.prompt for r in load_benchmark("nudity")],
            "artists": [r.prompt for r in load_benchmark("artists")]}
    if a.limit:
        sets = {k: v[:a.limit] for k, v in sets.items()}
    cats = [c for _, c in coprov2][:len(sets["coprov2"])]
    feats = {k: text_features(adapter, v, batch_size=256, progress=True) for k, v in sets.items()}

    lg = latent_guard_scores(head, adapter, feats, policy, sets)
    kw = keyword_scores(sets, policy)
    pairs = load_coprov2_pairs()
    train_texts = list(dict.fromkeys(t for u, s, _ in pairs for t in (u, s)))
    unsafe = {u for u, _, _ in pairs}
    tf = text_features(adapter, train_texts, batch_size=256, progress=True)
    y = torch.tensor([float(t in unsafe) for t in train_texts])
    probe = train_probe(tf.summary.float(), y)
    pr = {k: probe(f.summary.float()).float() for k, f in feats.items()}
    bf = text_features(adapter, benign, batch_size=256, progress=True)
    probe_b = train_probe(torch.cat([tf.summary.float(), bf.summary.float()]), torch.cat([y, torch.zeros(len(benign))]))
    prb = {k: probe_b(f.summary.float()).float() for k, f in feats.items()}

    methods = {f"Latent Guard ({enc} head: concepts + evidence, the guard's rule)": (lg["guard"], lambda s: s >= 0),
               "  its concept path alone": (lg["concepts"], lambda s: s >= 0),
               "  its evidence path alone": (lg["evidence"], lambda s: s >= 0),
               "keyword blacklist (policy phrases)": (kw, lambda s: s >= 1),
               f"probe: logistic regression on {enc}'s sentence vector (CoProV2 pairs)": (pr, lambda s: s >= 0),
               f"probe + the head's {len(benign)} benign captions": (prb, lambda s: s >= 0)}
    results = {name: summary_rows(sc, rule) for name, (sc, rule) in methods.items()}
    extra = {name: {"nudity": float(rule(sc["nudity"]).double().mean()),
                    "artists": float(rule(sc["artists"]).double().mean())} for name, (sc, rule) in methods.items()}
    from safegen.policy import normalize_category

    flagged = lg["guard"]["coprov2"] >= 0
    names = list(policy.categories)
    said = [names[i] for i in lg["category"]["coprov2"][flagged].tolist()]
    truth = [normalize_category(c) for c, f in zip(cats, flagged.tolist()) if f]
    agreement = sum(a_ == b_ for a_, b_ in zip(said, truth)) / max(len(truth), 1)
    per_cat = {}
    for name, (sc, rule) in methods.items():
        hit = rule(sc["coprov2"])
        per_cat[name] = {c: float(hit[[i for i, k in enumerate(cats) if k == c]].double().mean())
                         for c in dict.fromkeys(cats)}
    concept_texts = list(dict.fromkeys(load_coprov2_test(dedup=False)[i][0] for i in range(1000)))[:1000]
    costs = cost(head, adapter, concept_texts, sets["coco"])

    n = {k: len(v) for k, v in sets.items()}
    meta = head.metadata
    title = ("## Latent Guard on the default model's own text encoder (`backbone=\"pipeline\"`; issue: the CLIP world)"
             if pipeline else "## Latent Guard as a prompt checker (issue: Latent Guard)")
    lines = [begin, title, "",
             f"`{shlex.join(['python', 'benchmarks/prompt_guard.py', *sys.argv[1:]])}` ({time.strftime('%Y-%m-%d')}, "
             f"{machine()}, {time.time() - t0:.0f} s in all).", "",
             f"Weights: `{os.path.relpath(weights, ROOT)}` (trained on {meta.get('train_pairs')} CoProV2 training "
             f"pairs and {meta.get('benign') or 0} benign captions ({meta.get('benign_file', 'none')}, "
             + ("the split_coco training half" if meta.get('benign_split')
                else f"first {meta.get('benign_skip', 0)} skipped")
             + f"), {meta.get('steps')} steps; validation AUC on "
             f"{meta.get('val_pairs')} held-out pairs "
             f"{meta.get('val_auc', float('nan')):.4f}; thresholds calibrated at a 1% budget on the benign reference). "
             f"Sets: CoProV2 test, deduplicated (n = {n['coprov2']}); I2P with inappropriate_percentage ≥ 50 "
             f"(n = {n['i2p']}); " + (f"the held-out half of `split_coco` (n = {n['coco']}; none used in training "
                                      "or calibration)." if a.coco_split else
                                      f"the first {a.coco_eval} COCO captions of `coco_30k_10k.csv` less those "
                                      f"repeated later in the file (n = {n['coco']}; none used in training)."),
             "", "| checker | CoProV2 vs COCO: AUC | TPR @ 1% FPR | I2P vs COCO: AUC | TPR @ 1% FPR | "
             "own rule: CoProV2 TPR | I2P TPR | COCO FPR |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        c, i = r["coprov2"], r["i2p"]
        lines.append(f"| {name} | {c['auc']:.4f} | {c['tpr_at_1fpr']:.3f} | {i['auc']:.4f} | {i['tpr_at_1fpr']:.3f} "
                     f"| {c['tpr_at_rule']:.3f} | {i['tpr_at_rule']:.3f} | {r['coco_fpr']:.4f} |")
    lines += ["", "| checker | nudity recall (n = %d) | artists flagged (n = %d) |" % (n["nudity"], n["artists"]),
              "|---|---|---|"]
    lines += [f"| {name} | {e['nudity']:.3f} | {e['artists']:.3f} |" for name, e in extra.items()]
    lines += ["", f"Latent Guard's reported category agrees with CoProV2's label on {100 * agreement:.1f}% of the "
              f"{len(truth)} CoProV2 test prompts it flags."]
    lines += ["", "\"Own rule\": Latent Guard at its calibrated thresholds (1% of the benign reference prompts), "
              "keyword = any phrase found, probe = p ≥ 0.5.",
              "", "Per-category recall on CoProV2 test at each checker's own rule (flagged as unsafe at all):", "",
              "| category | n | " + " | ".join(results) + " |", "|---|---|" + "---|" * len(results)]
    for c in dict.fromkeys(cats):
        lines.append(f"| {c} | {cats.count(c)} | " + " | ".join(f"{per_cat[m][c]:.3f}" for m in results) + " |")
    lines += ["", f"Cost (median of 20, head only = concept bank cached, as in the guard): "
              f"{costs['head_ms_per_prompt_b32']:.3f} ms per prompt at batch 32 and {costs['head_ms_b1']:.3f} ms "
              f"for one prompt, against {costs['concepts']} concepts; {enc} + check: "
              f"{costs['encoder_and_check_ms_per_prompt_b32']:.2f} ms per prompt at batch 32.", end]
    publish(lines, begin, end, a.write)


if __name__ == "__main__":
    main()
