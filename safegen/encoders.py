"""Text-encoder adapters shared by every guard that reads prompts (SAFREE, Latent Guard, LVD).

An adapter hides what differs between text encoders behind one small interface:

* tokenisation facts: is there a BOS token, where does the content start, how many content tokens, which id
  masks a token out (CLIP: ``0`` as in SAFREE's code, BERT: ``[MASK]``, T5: the ``<extra_id_0>`` sentinel);
* token states at the layer the pipeline conditions on (last layer, or the penultimate one for SDXL);
* a *summary* vector in that same token space (CLIP: the EOS state; BERT/T5: mean over content tokens) and,
  where the encoder has one, its *projected* pooled vector (SDXL ``text_embeds``).

Encoders are bidirectional (BERT, T5) or causal (CLIP); causal ones get no attention mask, exactly as the
diffusers pipelines call them, so states computed here match the pipeline's bit for bit. A bidirectional
encoder that its pipeline runs *without* an attention mask (CogVideoX's T5 reads its 226 padded positions,
padding included) is wrapped the same way (``attention_mask=False``): then padding changes the states, so
every sequence, masked copies included, is encoded at the pipeline's full padded length.

T5 has no BOS token (the first content token is position 0, not 1) and no pooled output: its summary vector
is the mean of the content-token states (``</s>`` and padding excluded), in the space the pipeline conditions
on — not the authors' "token 0 with a +1 BOS offset", which never tests the first word and calls the first
word's state the prompt's summary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass
class TokenBatch:
    """Token ids of a batch of prompts, padded to a common length, with the facts guards need."""

    ids: torch.Tensor  # (B, L) long
    attention_mask: torch.Tensor  # (B, L) long, 1 on BOS/content/EOS
    n_content: torch.Tensor  # (B,) number of content tokens (no BOS/EOS/padding)
    first: int  # index of the first content token (1 when the tokenizer adds BOS, else 0)

    @property
    def last_pos(self) -> torch.Tensor:
        """Index of the last attended token (EOS for CLIP/BERT/T5)."""
        return self.attention_mask.sum(1) - 1


@dataclass
class Encoded:
    tokens: torch.Tensor  # (B, L, D) states at the adapter's layer
    summary: torch.Tensor  # (B, D) summary vector in the token space
    projected: torch.Tensor | None = None  # (B, P) projected pooled vector, when the encoder has one


class TextEncoderAdapter:
    """Wraps a (tokenizer, text encoder) pair.

    Args:
        tokenizer: a Hugging Face tokenizer.
        encoder: a Hugging Face text model (``CLIPTextModel``, ``CLIPTextModelWithProjection``, ``BertModel``,
            ``T5EncoderModel``...).
        layer (`int`, *optional*): index into ``hidden_states`` of the layer to read; ``None`` reads
            ``last_hidden_state``.
        final_norm (`bool`): apply the encoder's final layer norm to ``layer`` (diffusers does this for
            ``clip_skip`` on SD 1.x/2.x).
        summary (`str`): ``"eos"`` (state of the last attended token) or ``"mean"`` (mean of content tokens).
        mask_token_id (`int`, *optional*): the id that replaces a token in masked copies.
        max_length (`int`, *optional*): padding length; defaults to ``tokenizer.model_max_length``.

    Example:
        >>> from safegen.encoders import TextEncoderAdapter
        >>> from safegen.testing import tiny_sd_pipeline
        >>> pipe = tiny_sd_pipeline()
        >>> enc = TextEncoderAdapter.for_clip(pipe.tokenizer, pipe.text_encoder)
        >>> batch = enc.tokenize(["a red cat"])
        >>> enc.encode(batch).summary.shape[-1] == pipe.text_encoder.config.hidden_size
        True
    """

    def __init__(self, tokenizer, encoder, *, layer: int | None = None, final_norm: bool = False,
                 summary: str = "eos", mask_token_id: int | None = None, max_length: int | None = None,
                 causal: bool | None = None, attention_mask: bool | None = None, name: str | None = None):
        if summary not in ("eos", "mean"):
            raise ValueError(f"summary must be 'eos' or 'mean', got {summary!r}")
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.layer = layer
        self.final_norm = final_norm
        self.summary_kind = summary
        model_type = getattr(getattr(encoder, "config", None), "model_type", "")
        self.causal = ("clip" in model_type) if causal is None else causal
        # whether the encoder is given the attention mask (as its pipeline calls it): causal encoders are not
        self.use_attention_mask = (not self.causal) if attention_mask is None else bool(attention_mask)
        self.name = name or model_type or type(encoder).__name__
        limit = getattr(tokenizer, "model_max_length", None)
        if max_length is None:
            if limit is None or limit > 100_000:
                raise ValueError(
                    f"tokenizer {type(tokenizer).__name__} has no usable model_max_length ({limit}); pass "
                    "max_length= (77 for CLIP) — a tokenizer loaded from an incomplete folder looks like this"
                )
            max_length = int(limit)
        self.max_length = max_length
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        self.first = 1 if len(probe) > len(plain) and probe[0] != plain[0] else 0
        self.tail = 1  # closing tokens after the content (EOS)
        #: the pipeline pads its conditioning on the left (FLUX.2 [dev]'s Mistral); this adapter's token batches
        #: are padded on the right all the same, and :class:`ConditioningStream` moves rows between the two
        self.left_padded = False
        self.mask_token_id = self._default_mask_id() if mask_token_id is None else int(mask_token_id)
        self._cache: dict = {}

    # ------------------------------------------------------------------ constructors
    @classmethod
    def for_clip(cls, tokenizer, encoder, *, clip_skip: int | None = None, sdxl: bool = False, **kw) -> "TextEncoderAdapter":
        """The adapter for a CLIP text encoder as diffusers' SD (``sdxl=False``) or SDXL pipelines read it."""
        if sdxl:
            layer = -2 if clip_skip is None else -(clip_skip + 2)
            return cls(tokenizer, encoder, layer=layer, final_norm=False, summary="eos", causal=True, **kw)
        if clip_skip is None:
            return cls(tokenizer, encoder, layer=None, summary="eos", causal=True, **kw)
        return cls(tokenizer, encoder, layer=-(clip_skip + 1), final_norm=True, summary="eos", causal=True, **kw)

    @classmethod
    def for_t5(cls, tokenizer, encoder, *, max_length: int = 226, attention_mask: bool = False,
               **kw) -> "TextEncoderAdapter":
        """A T5 encoder as a diffusers video pipeline reads it: padded to ``max_length`` (the call's
        ``max_sequence_length``), last hidden state, mean summary over content tokens, masked copies use the
        ``<extra_id_0>`` sentinel. ``attention_mask=False`` matches CogVideoX (no mask: padding is attended)."""
        return cls(tokenizer, encoder, summary="mean", causal=False, attention_mask=attention_mask,
                   max_length=max_length, **kw)

    @property
    def padding_matters(self) -> bool:
        """True when padded positions change the states (a bidirectional encoder run without attention mask):
        sequences must then be encoded at the full padded length to land in the pipeline's space."""
        return not self.causal and not self.use_attention_mask

    @property
    def long_masked(self) -> bool:
        """True for a long sequence (over 128 positions) read with its attention mask (Wan's UMT5 at 512): padding
        a batch of texts only to its longest gives the same states, and a full-length pass per text is most of the
        cost, so batches of phrases and reference prompts are padded to their longest. (Short CLIP-length
        encoders keep the pipeline's exact padding.)"""
        return not self.padding_matters and not self.causal and self.max_length > 128

    @classmethod
    def from_pretrained(cls, path: str, *, subfolder: str | None = None, summary: str = "mean", **kw) -> "TextEncoderAdapter":
        """Load a generic transformers encoder (BERT-like, T5) and its tokenizer from a folder or hub id."""
        from transformers import AutoModel, AutoTokenizer

        from .hub import check_loadable

        check_loadable(path)
        sub = {"subfolder": subfolder} if subfolder else {}
        tok = AutoTokenizer.from_pretrained(path, **sub)
        model = AutoModel.from_pretrained(path, **sub)
        if hasattr(model, "get_encoder") and getattr(model.config, "is_encoder_decoder", False):
            model = model.get_encoder()
        model.eval()
        return cls(tok, model, summary=summary, causal=False, **kw)

    def _default_mask_id(self) -> int:
        tok = self.tokenizer
        if getattr(tok, "mask_token_id", None) is not None:
            return int(tok.mask_token_id)
        sentinel = tok.convert_tokens_to_ids("<extra_id_0>") if hasattr(tok, "convert_tokens_to_ids") else None
        if isinstance(sentinel, int) and sentinel != getattr(tok, "unk_token_id", None):
            return sentinel
        # CLIP has no mask token; SAFREE's code masks with id 0 ("!").
        return 0

    # ------------------------------------------------------------------ api
    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype

    def tokenize(self, texts: Sequence[str], *, max_length: int | None = None,
                 pad_to_longest: bool = False, approximate: bool = False) -> TokenBatch:
        """Tokenise and pad to ``max_length`` (default: the model's), truncating like the pipelines do; with
        ``pad_to_longest`` only to the longest text of the batch (same states for a masked, non-causal encoder,
        for a fraction of the work on short prompts). On an encoder whose states depend on the padding
        (:attr:`padding_matters`) that shortcut is refused unless ``approximate`` (the states then differ a little
        from the pipeline's: a caller that compares such texts only with each other may accept that)."""
        if isinstance(texts, str):
            texts = [texts]
        pad_to_longest = pad_to_longest and (approximate or not self.padding_matters)
        out = self.tokenizer(list(texts), padding="longest" if pad_to_longest else "max_length",
                             max_length=max_length or self.max_length, truncation=True, return_tensors="pt")
        mask = out["attention_mask"].long()
        n_special = self.first + self.tail  # BOS (if any) + EOS
        n_content = (mask.sum(1) - n_special).clamp(min=0)
        return TokenBatch(out["input_ids"].long(), mask, n_content, self.first)

    @property
    def window_tokens(self) -> int:
        """Content tokens one encoder pass reads (the length less BOS and EOS)."""
        return self.max_length - (self.first + self.tail)

    def _frame_ids(self) -> tuple[list[int], list[int]]:
        """The token ids a row puts before and after its content (BOS and EOS)."""
        specials = self.tokenizer("", add_special_tokens=True)["input_ids"]  # BOS (if any) and EOS around nothing
        return list(specials[:self.first]), list(specials[self.first:])

    def tokenize_windows(self, texts: Sequence[str], *, pad_to_longest: bool = False
                         ) -> tuple[TokenBatch, torch.Tensor]:
        """Every text whole, as windows the encoder can read: ``(batch, owner)`` where row r of ``batch`` is a
        window of text ``owner[r]``. A text that fits is one row, exactly as :meth:`tokenize` makes it; a longer
        one becomes windows of :attr:`window_tokens` content tokens, each starting half a window after the last
        (the last one ends at the text's end), so any phrase of up to half a window lies whole inside one of
        them. A check that reduces over a text's windows (max) reads all of it, however much the pipeline keeps.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        width = self.window_tokens
        content = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        if all(len(ids) <= width for ids in content):  # the common case: one row per text, the usual path
            return self.tokenize(texts, pad_to_longest=pad_to_longest), torch.arange(len(texts))
        step = max(1, width // 2)
        head, tail = self._frame_ids()
        rows: list[list[int]] = []
        owner: list[int] = []
        for i, ids in enumerate(content):  # per text (not per token): where its windows start
            starts = [0] if len(ids) <= width else [*range(0, len(ids) - width, step), len(ids) - width]
            for s0 in starts:
                rows.append(head + list(ids[s0:s0 + width]) + tail)
                owner.append(i)
        length = max(len(r) for r in rows) if pad_to_longest and not self.padding_matters else self.max_length
        pad = self.tokenizer.pad_token_id
        pad = 0 if pad is None else int(pad)
        ids_t = torch.full((len(rows), length), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for r, row in enumerate(rows):
            ids_t[r, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[r, :len(row)] = 1
        n_content = (mask.sum(1) - (self.first + self.tail)).clamp(min=0)
        return TokenBatch(ids_t, mask, n_content, self.first), torch.tensor(owner)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Readable strings for token ids (BPE end-of-word marks and ## pieces cleaned up)."""
        toks = self.tokenizer.convert_ids_to_tokens([int(i) for i in ids])
        return [t.replace("</w>", "").replace("Ġ", "").replace("▁", "") for t in toks]

    def _on_device(self, batch: TokenBatch | torch.Tensor, attention_mask: torch.Tensor | None):
        """``(ids, attention_mask)`` of a token batch (or of ids given with their mask) on the encoder's device."""
        if isinstance(batch, TokenBatch):
            ids, mask = batch.ids, batch.attention_mask
        else:
            ids, mask = batch, attention_mask
            if mask is None:
                raise ValueError("encode(ids) needs attention_mask= when ids are passed as a tensor")
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def encode(self, batch: TokenBatch | torch.Tensor, attention_mask: torch.Tensor | None = None) -> Encoded:
        """Token states, summary vector and (if any) projected pooled vector for a token batch."""
        ids, mask = self._on_device(batch, attention_mask)
        want_hidden = self.layer is not None
        out = self.encoder(ids, attention_mask=mask if self.use_attention_mask else None,
                           output_hidden_states=want_hidden)
        if want_hidden:
            tokens = out.hidden_states[self.layer]
            if self.final_norm:
                # transformers 5 drops CLIPTextModel's `text_model` wrapper: the norm sits on the model itself
                tokens = getattr(self.encoder, "text_model", self.encoder).final_layer_norm(tokens)
        else:
            tokens = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        projected = getattr(out, "text_embeds", None)
        return Encoded(tokens, self.summarize(tokens, mask), projected)

    def summarize(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The summary vector of token states already computed (e.g. the pipeline's ``prompt_embeds``)."""
        mask = attention_mask.to(tokens.device)[:, : tokens.shape[1]]
        if mask.shape[1] < tokens.shape[1]:  # states padded further than these texts (FLUX.2: to 512): not content
            mask = pad_tokens(mask, tokens.shape[1])
        last = mask.sum(1) - 1
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        if self.summary_kind == "eos":
            return tokens[rows, last]
        content = mask.to(tokens.dtype).clone()
        content[:, : self.first] = 0
        at = torch.arange(content.shape[1], device=tokens.device).view(1, -1)
        content[at > (last - self.tail).view(-1, 1)] = 0  # the closing tokens (EOS; a chat template's end)
        return (tokens * content.unsqueeze(-1)).sum(1) / content.sum(1, keepdim=True).clamp(min=1)

    def summaries(self, texts: Sequence[str], *, projected: bool = False, short: bool = False) -> torch.Tensor:
        """Summary (or projected pooled) vectors of texts, one encoder pass; cached per text list. ``short``: padded
        only to the longest text, even where the padding matters (see :meth:`tokenize`'s ``approximate``)."""
        key = (tuple(texts), projected, self.layer, self.final_norm, short)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        enc = self.encode(self.tokenize(list(texts), pad_to_longest=short or self.long_masked, approximate=short))
        vec = enc.projected if projected else enc.summary
        if vec is None:
            raise ValueError(f"text encoder {self.name} has no projected pooled output")
        if len(self._cache) > 256:
            self._cache.clear()
        self._cache[key] = vec
        return vec


class ChatTemplateAdapter(TextEncoderAdapter):
    """A decoder-only language model read the way an LLM-conditioned pipeline reads it (Qwen-Image, FLUX.2
    [klein]): each prompt is put into the pipeline's chat ``template`` (a string with one ``{}``, or the text
    before and after the prompt), the model runs with the attention mask,
    and the conditioning is the hidden states of ``layers`` side by side (Qwen-Image: the last layer; FLUX.2
    [klein]: layers 9, 18 and 27) from position ``drop`` on (Qwen-Image cuts the template's system tokens off),
    cut to ``max_length`` positions.

    FLUX.2 [dev] keeps its Mistral system prompt in the conditioning (``drop`` 0) and pads it on the *left* to
    ``max_sequence_length``: this adapter's batches are still padded on the right, so that content starts at
    ``first`` in every row, and :attr:`left_padded` tells :class:`ConditioningStream` to move the pipeline's rows
    into that layout and back. Rotary positions are relative and padding is masked, so a prompt's states do not
    depend on which side its padding is.

    Token batches live in that conditioning's positions: ``first`` counts the template's tokens left before the
    content (0 for Qwen-Image: its ``drop`` is exactly the system part; 3 for FLUX.2's ``<|im_start|>user``
    line), ``tail`` the template's closing tokens (``<|im_end|>``, ``<|im_start|>assistant``, newlines, an empty
    thinking block). :meth:`encode` puts dropped system tokens back in front, so states match the pipeline's. The
    model is causal, so a prompt's states do not depend on what follows it, and batches pad only to their longest
    prompt (the pipeline pads Qwen-Image's to the call's longest, FLUX.2's to ``max_sequence_length``): positions
    past a prompt's end are zero here. The summary vector is the mean of the content states; masked copies
    replace a token with the pad token (``<|endoftext|>``: an LLM vocabulary has no mask token).

    Example:
        >>> from safegen.encoders import pipeline_adapter
        >>> from safegen.testing import tiny_qwenimage_pipeline
        >>> pipe = tiny_qwenimage_pipeline()
        >>> ad = pipeline_adapter(pipe, max_sequence_length=512)
        >>> batch = ad.tokenize(["a red cat"])
        >>> ad.token_strings(batch.ids[0].tolist())
        ['a', 'red', 'cat', '<|im_end|>', 'Ċ', '<|im_start|>', 'assistant', 'Ċ']
        >>> bool((ad.encode(batch).tokens - pipe.encode_prompt("a red cat", device="cpu")[0]).abs().max() < 1e-5)
        True
    """

    def __init__(self, tokenizer, encoder, *, template: "str | tuple[str, str]", drop: int, max_length: int,
                 token_limit: int, layers: Sequence[int] = (-1,), mask_token_id: int | None = None,
                 name: str | None = None, left_padded: bool = False, remove: Sequence[str] = ()):
        if isinstance(template, str):
            if template.count("{}") != 1:
                raise ValueError("the chat template must hold exactly one '{}' where the prompt goes")
            template = tuple(template.split("{}"))
        layers = tuple(int(k) for k in layers)
        # ``layer`` records the layers read (it keys the phrase cache and the calibration's encoder fingerprint)
        super().__init__(tokenizer, encoder, layer=layers, summary="mean", causal=True, attention_mask=True,
                         max_length=int(max_length), name=name,
                         mask_token_id=tokenizer.pad_token_id if mask_token_id is None else mask_token_id)
        self.prefix, self.suffix = template  # the text before and after the prompt
        self.drop, self.token_limit = int(drop), int(token_limit)
        self.layers = layers
        self.prefix_ids = list(tokenizer(self.prefix, add_special_tokens=False)["input_ids"])
        self.suffix_ids = list(tokenizer(self.suffix, add_special_tokens=False)["input_ids"])
        if len(self.prefix_ids) < self.drop:
            raise ValueError(f"the template's system part is {len(self.prefix_ids)} tokens, fewer than the {drop} "
                             "the pipeline drops")
        self.first = len(self.prefix_ids) - self.drop
        self.tail = len(self.suffix_ids)
        self.left_padded = bool(left_padded)
        self.remove = tuple(remove)  # strings the pipeline deletes from a prompt before templating it
        self._cache_prefix, self._prefix_kv = True, {}

    @classmethod
    def for_pipeline(cls, pipe, *, max_length: int | None = None, layers: Sequence[int] | None = None,
                     **kw) -> "ChatTemplateAdapter":
        """The adapter of an LLM-conditioned pipeline at the call's ``max_sequence_length`` (default: the
        signature's): Qwen-Image (``prompt_template_encode``, ``prompt_template_encode_start_idx``, last layer) or
        FLUX.2 [klein] (the tokenizer's chat template with thinking off, ``text_encoder_out_layers``: ``layers``,
        default the signature's) or FLUX.2 [dev] (its processor's chat template with the pipeline's system message,
        padded on the left, ``[IMG]`` removed from prompts; its processor's tokenizer tokenises)."""
        import inspect

        params = inspect.signature(type(pipe).__call__).parameters
        if max_length is None:
            max_length = params["max_sequence_length"].default
        if hasattr(pipe, "prompt_template_encode_start_idx"):  # Qwen-Image
            drop = int(pipe.prompt_template_encode_start_idx)
            return cls(pipe.tokenizer, pipe.text_encoder, template=pipe.prompt_template_encode, drop=drop,
                       max_length=int(max_length), token_limit=int(pipe.tokenizer_max_length) + drop, **kw)
        mark = "\x00prompt\x00"
        layers = params["text_encoder_out_layers"].default if layers is None else layers
        if hasattr(pipe, "_get_mistral_3_small_prompt_embeds"):  # FLUX.2 [dev]
            from diffusers.pipelines.flux2.pipeline_flux2 import format_input

            messages = format_input(prompts=[mark], system_message=pipe.system_message)[0]
            text = pipe.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
            tok = getattr(pipe.tokenizer, "tokenizer", pipe.tokenizer)  # a processor tokenises with its tokenizer
            return cls(tok, pipe.text_encoder, template=tuple(text.split(mark)), drop=0, max_length=int(max_length),
                       token_limit=int(max_length), layers=layers, left_padded=True, remove=("[IMG]",), **kw)
        # FLUX.2 [klein]: one user message, generation prompt, thinking off; truncated at max_sequence_length
        text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": mark}], tokenize=False,
                                                  add_generation_prompt=True, enable_thinking=False)
        return cls(pipe.tokenizer, pipe.text_encoder, template=tuple(text.split(mark)), drop=0,
                   max_length=int(max_length), token_limit=int(max_length), layers=layers, **kw)

    def tokenize(self, texts: Sequence[str], *, max_length: int | None = None, pad_to_longest: bool = False,
                 approximate: bool = False) -> TokenBatch:
        """Each text in the template, tokenised as the pipeline does (one string), padded to the batch's longest,
        less the dropped system tokens and cut to ``max_length`` positions (default: the adapter's)."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        for r in self.remove:
            texts = [t.replace(r, "") for t in texts]
        # the template carries its own special tokens; padded on the right whatever side the pipeline pads on
        out = self.tokenizer([self.prefix + t + self.suffix for t in texts], max_length=self.token_limit,
                             padding="longest", truncation=True, return_tensors="pt", add_special_tokens=False,
                             padding_side="right")
        keep = max_length or self.max_length
        ids = out["input_ids"][:, self.drop:self.drop + keep].long()
        mask = out["attention_mask"][:, self.drop:self.drop + keep].long()
        n_content = (mask.sum(1) - (self.first + self.tail)).clamp(min=0)
        return TokenBatch(ids, mask, n_content, self.first)

    def _frame_ids(self) -> tuple[list[int], list[int]]:
        return self.prefix_ids[self.drop:], list(self.suffix_ids)

    @torch.no_grad()
    def encode(self, batch: TokenBatch | torch.Tensor, attention_mask: torch.Tensor | None = None) -> Encoded:
        """States of a token batch. The template's tokens before the prompt (dropped system tokens and kept ones
        alike) are the same in every row: their keys and values, and the states of the kept ones, are computed
        once (per device and dtype) and every batch runs on from them, so a masked copy costs its own tokens only
        (Qwen-Image: 34 system tokens fewer per copy; FLUX.2 [dev]: its whole system prompt). Where a model does
        not take a cache this way, or a row does not hold the whole prefix (cut short by ``max_length``), the whole
        template runs, with the same states."""
        ids, mask = self._on_device(batch, attention_mask)
        states = None
        if self.prefix_ids and self._cache_prefix:
            try:
                states = self._run_after_prefix(ids, mask)
            except Exception as e:  # the exact, slower path: the system tokens run again with every row
                import logging

                logging.getLogger("safegen").info("safegen: %s runs its system tokens with every row (%s: %s)",
                                                  self.name, type(e).__name__, e)
                self._cache_prefix = False
        if states is None:
            head = torch.tensor(self.prefix_ids[:self.drop], dtype=ids.dtype, device=ids.device)
            full_ids = torch.cat([head.expand(ids.shape[0], -1), ids], 1)
            full_mask = torch.cat([torch.ones_like(full_ids[:, :self.drop]), mask], 1)
            out = self.encoder(input_ids=full_ids, attention_mask=full_mask, output_hidden_states=True)
            states = self._read_layers(out)[:, self.drop:]
        tokens = states * mask.unsqueeze(-1).to(states.dtype)
        return Encoded(tokens, self.summarize(tokens, mask), None)

    def _run_after_prefix(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """The states of ``ids``: the kept template tokens' states as computed once, then the rest of each row run
        on from the cached keys and values of the whole prefix (dropped and kept tokens), at the positions they
        hold in the whole template (a vision-language model's rotary sections all get the text position, as for
        any text token). ``None`` when a row does not start with the whole kept prefix."""
        import inspect

        from transformers import DynamicCache

        first, whole = self.first, len(self.prefix_ids)
        kept = torch.tensor(self.prefix_ids[self.drop:], dtype=ids.dtype, device=ids.device)
        if ids.shape[1] <= first or not bool((ids[:, :first] == kept).all()) or not bool(mask[:, :first].all()):
            return None
        key = (str(ids.device), str(self.dtype))
        prefix = self._prefix_kv.get(key)
        if prefix is None:
            head = torch.tensor([self.prefix_ids], dtype=ids.dtype, device=ids.device)
            out = self.encoder(input_ids=head, attention_mask=torch.ones_like(head), use_cache=True,
                               output_hidden_states=True)
            past = out["cache"] if "cache" in out else out.past_key_values  # (the name transformers 5 moves to)
            # (the keyword the model takes a cache under: ``cache`` in newer transformers)
            name = "cache" if "cache" in inspect.signature(self.encoder.forward).parameters else "past_key_values"
            prefix = self._prefix_kv[key] = (name, [(layer.keys, layer.values) for layer in past.layers],
                                             self._read_layers(out)[:, self.drop:])
        name, prefix, kept_states = prefix
        rest, rest_mask = ids[:, first:], mask[:, first:]
        b, n = rest.shape
        cache = DynamicCache()
        for i, (k, v) in enumerate(prefix):
            cache.update(k.expand(b, -1, -1, -1).contiguous(), v.expand(b, -1, -1, -1).contiguous(), i)
        pos = (whole + torch.arange(n, device=ids.device)).view(1, n).expand(b, n)
        if self._multimodal_rope():  # Qwen2.5-VL's rotary sections all get the text position
            pos = pos.unsqueeze(0).expand(3, b, n)
        full_mask = torch.cat([torch.ones(b, whole, dtype=mask.dtype, device=mask.device), rest_mask], 1)
        out = self.encoder(input_ids=rest, attention_mask=full_mask, position_ids=pos, use_cache=True,
                           output_hidden_states=True, **{name: cache})
        return torch.cat([kept_states.expand(b, -1, -1), self._read_layers(out)], 1)

    def _multimodal_rope(self) -> bool:
        """Whether the language model's rotary embedding takes one position per section (``mrope_section``:
        Qwen2.5-VL), not one per token (Mistral 3, Qwen3)."""
        cfg = self.encoder.config
        text = getattr(cfg, "text_config", None) or cfg
        rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
        return isinstance(rope, dict) and "mrope_section" in rope

    def _read_layers(self, out) -> torch.Tensor:
        """The hidden states of :attr:`layers`, side by side, from a forward pass's output."""
        return torch.cat([out.hidden_states[k] for k in self.layers], -1)


def join_rows(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Conditioning rows of different lengths (an LLM encoder's, as long as each prompt: Qwen-Image) as one batch:
    each zero-padded along the token axis (dim 1) to the longest, then stacked along dim 0. Zeros are what the
    pipeline itself pads embeddings and their masks with."""
    length = max(t.shape[1] for t in tensors)
    return torch.cat([pad_tokens(t, length) for t in tensors])


def pad_tokens(t: torch.Tensor, length: int) -> torch.Tensor:
    """``t`` (B, L, ...) zero-padded along the token axis to ``length`` (≥ L)."""
    return torch.nn.functional.pad(t, (0, 0) * (t.ndim - 2) + (0, length - t.shape[1]))


def pipeline_adapter(pipe, *, clip_skip: int | None = None, max_sequence_length: int | None = None,
                     mask_token_id: int | None = None, attention_mask: bool = False,
                     layers: Sequence[int] | None = None) -> TextEncoderAdapter:
    """The adapter of a pipeline's (first) text encoder, reading the states the pipeline conditions on.

    Duck-typed by the encoder, not the pipeline class: CLIP (SD 1.x/2.x, AnimateDiff, ZeroScope) → the EOS
    state of the layer ``clip_skip`` selects; T5 (CogVideoX) → :meth:`TextEncoderAdapter.for_t5` at
    ``max_sequence_length`` (default 226), without attention mask as CogVideoX calls it (``attention_mask=True``:
    with it, as Wan calls it); an LLM read through a chat template (Qwen-Image; FLUX.2 [klein], whose hidden
    ``layers`` default to the call signature's ``text_encoder_out_layers``) → :class:`ChatTemplateAdapter`;
    anything else
    (a BERT-like sentence encoder) → mean summary with its attention mask. SDXL's two encoders are wrapped by
    the guards themselves (:meth:`TextEncoderAdapter.for_clip` with ``sdxl=True``).

    Example:
        >>> from safegen.encoders import pipeline_adapter
        >>> from safegen.testing import tiny_cogvideox_pipeline
        >>> ad = pipeline_adapter(tiny_cogvideox_pipeline())
        >>> ad.first, ad.summary_kind, ad.max_length, ad.token_strings([ad.mask_token_id])
        (0, 'mean', 226, ['<extra_id_0>'])
    """
    te, tok = getattr(pipe, "text_encoder", None), getattr(pipe, "tokenizer", None)
    if te is not None and tok is not None and any(hasattr(pipe, a) for a in (
            "prompt_template_encode_start_idx", "_get_qwen3_prompt_embeds",
            "_get_mistral_3_small_prompt_embeds")):  # an LLM encoder
        kw = {} if mask_token_id is None else {"mask_token_id": mask_token_id}
        return ChatTemplateAdapter.for_pipeline(pipe, max_length=max_sequence_length, layers=layers,
                                                name="text_encoder", **kw)
    if te is None or tok is None:  # e.g. an SDXL refiner: only the second encoder
        te, tok = getattr(pipe, "text_encoder_2", None), getattr(pipe, "tokenizer_2", None)
    if te is None or tok is None:
        raise TypeError(f"{type(pipe).__name__} has no text encoder and tokenizer")
    model_type = getattr(te.config, "model_type", "") or ""
    kw = {} if mask_token_id is None else {"mask_token_id": mask_token_id}
    if "clip" in model_type:
        return TextEncoderAdapter.for_clip(tok, te, clip_skip=clip_skip, **kw)
    if "t5" in model_type:  # t5, umt5, mt5
        return TextEncoderAdapter.for_t5(tok, te, max_length=int(max_sequence_length or 226),
                                         attention_mask=attention_mask, **kw)
    return TextEncoderAdapter(tok, te, summary="mean", causal=False, **kw)


# ---------------------------------------------------------------------- each family's conditioning layout
@dataclass
class ConditioningStream:
    """One text-conditioning stream of a pipeline: its encoder adapter, the block of ``prompt_embeds`` it fills
    (its channels ``dims`` of the token positions ``tokens``; ``None``: no token states, FLUX's CLIP encoder), the
    channels of the pooled vector it fills (``pooled``; ``None``: it gives none; ``pooled_projected``: the
    encoder's projected pooled output, else its summary vector) and the call argument whose text it encodes
    (``prompt_2`` / ``prompt_3`` fall back to ``prompt`` when not given)."""

    name: str
    adapter: TextEncoderAdapter
    dims: slice
    text_arg: str = "prompt"
    tokens: slice | None = field(default_factory=lambda: slice(None))
    pooled: slice | None = None
    pooled_projected: bool = True

    def block(self, embeds: torch.Tensor, batch: TokenBatch | None = None) -> torch.Tensor:
        """This stream's part of ``prompt_embeds`` (B, L, D), in the positions of the adapter's token ``batch`` of
        the same texts: where the pipeline pads on the left (:attr:`TextEncoderAdapter.left_padded`), each row is
        rolled so that its content starts at ``batch.first`` (its padding then follows it). Without a ``batch``
        the rows are as the pipeline lays them out."""
        part = embeds[:, self.tokens, self.dims]
        index = self._index(part, batch)
        return part if index is None else part.gather(1, index.unsqueeze(-1).expand_as(part))

    def put(self, target: torch.Tensor, rows: torch.Tensor, new: torch.Tensor,
            batch: TokenBatch | None = None) -> None:
        """Write ``new`` (rows ``rows`` of this stream's part, laid out as :meth:`block` gave them with the same
        ``batch``) into ``target`` (the pipeline's ``prompt_embeds``) in place."""
        index = self._index(new, batch)
        if index is None:
            target[rows, self.tokens, self.dims] = new
            return
        part = target[rows][:, self.tokens, self.dims].clone()
        part.scatter_(1, index.unsqueeze(-1).expand_as(new), new)
        target[rows, self.tokens, self.dims] = part

    def _index(self, part: torch.Tensor, batch: TokenBatch | None) -> torch.Tensor | None:
        """Per row, the pipeline position of each adapter position (``None``: the same positions)."""
        if batch is None or not getattr(self.adapter, "left_padded", False):
            return None
        length = part.shape[1]
        shift = (length - batch.attention_mask.sum(1)).clamp(min=0).to(part.device)  # the row's left padding
        return (torch.arange(length, device=part.device).view(1, -1) + shift.view(-1, 1)) % length


#: :attr:`~safegen.specs.PipelineSpec.encode` kinds whose length is the call's ``max_sequence_length``.
SEQUENCE_ENCODES = ("t5", "sd3", "flux", "llm", "flux2")


def conditioning_streams(pipe, encode: str, *, clip_skip: int | None = None, max_len: int | None = None,
                         layers: Sequence[int] | None = None, text_mask: bool = False) -> list[ConditioningStream]:
    """How a pipeline's text encoders fill its conditioning (``encode``: its spec's
    :attr:`~safegen.specs.PipelineSpec.encode`), the primary stream (the one a guard gates on) last:

    * SDXL: two CLIP encoders side by side (penultimate layer), the second one's projected pooled vector;
    * SD3: the two CLIP encoders side by side on the first 77 positions (zero-padded to T5's width), then the T5
      encoder's positions (the primary, when the pipeline has one); the pooled vector joins both CLIP projections;
    * FLUX.1: its CLIP encoder gives the pooled vector only (from ``prompt``), its T5 encoder every token position
      (from ``prompt_2``: the primary);
    * anything else: its one encoder (:func:`pipeline_adapter`: CLIP, T5, a BERT-like encoder, an LLM through its
      chat template), at ``max_len``, for FLUX.2 the hidden ``layers``, and a T5 read with its attention mask
      where the spec's ``text_mask`` says the pipeline does (Wan).

    Example:
        >>> from safegen.encoders import conditioning_streams
        >>> from safegen.testing import tiny_sd3_pipeline
        >>> streams = conditioning_streams(tiny_sd3_pipeline(), "sd3", max_len=256)
        >>> [(s.name, s.text_arg, s.tokens.start) for s in streams]
        [('text_encoder', 'prompt', 0), ('text_encoder_2', 'prompt_2', 0), ('text_encoder_3', 'prompt_3', 77)]
    """
    if encode in ("sdxl", "sd3"):
        s = []
        start = pooled = 0
        clip_len = int(getattr(pipe, "tokenizer_max_length", 77) or 77) if encode == "sd3" else None
        for name, arg in (("text_encoder", "prompt"), ("text_encoder_2", "prompt_2")):
            te, tok = getattr(pipe, name, None), getattr(pipe, name.replace("text_encoder", "tokenizer"), None)
            if te is None:
                continue
            width = te.config.hidden_size
            # SDXL's pooled vector is the second encoder's alone; SD3's joins both encoders' projections
            proj = te.config.projection_dim if encode == "sd3" or name == "text_encoder_2" else None
            s.append(ConditioningStream(
                name, TextEncoderAdapter.for_clip(tok, te, clip_skip=clip_skip, sdxl=True, mask_token_id=0,
                                                  name=name),
                slice(start, start + width), arg, tokens=slice(0, clip_len),
                pooled=None if proj is None else (slice(None) if encode == "sdxl" else slice(pooled, pooled + proj))))
            start += width
            pooled += proj or 0
        te3 = getattr(pipe, "text_encoder_3", None) if encode == "sd3" else None
        if te3 is not None:
            ad = TextEncoderAdapter.for_t5(pipe.tokenizer_3, te3, max_length=int(max_len or 256))
            s.append(ConditioningStream("text_encoder_3", ad, slice(None), "prompt_3", tokens=slice(clip_len, None)))
        return s
    if encode == "flux":
        s = []
        if getattr(pipe, "text_encoder", None) is not None:  # pooler_output: the last layer's EOS state
            s.append(ConditioningStream("text_encoder", TextEncoderAdapter.for_clip(
                pipe.tokenizer, pipe.text_encoder, mask_token_id=0, name="text_encoder"), slice(None), "prompt",
                tokens=None, pooled=slice(None), pooled_projected=False))
        s.append(ConditioningStream("text_encoder_2", TextEncoderAdapter.for_t5(
            pipe.tokenizer_2, pipe.text_encoder_2, max_length=int(max_len or 512)), slice(None), "prompt_2"))
        return s
    # CLIP (SD, AnimateDiff, ZeroScope): EOS state, id 0 masks as in SAFREE's code; T5 (CogVideoX, Wan): no BOS,
    # content-token mean, <extra_id_0> masks, at the call's max_sequence_length; a BERT-like encoder (the embedded
    # default model): mean summary, [MASK] masking; an LLM through its chat template (Qwen-Image, FLUX.2)
    is_clip = "clip" in (getattr(pipe.text_encoder.config, "model_type", "") or "")
    ad = pipeline_adapter(pipe, clip_skip=clip_skip, max_sequence_length=max_len,
                          mask_token_id=0 if is_clip else None, attention_mask=text_mask, layers=layers)
    return [ConditioningStream("text_encoder", ad, slice(None))]
