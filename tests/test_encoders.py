"""Text-encoder adapters: CLIP (SD, SDXL), BERT-like and T5 encoders behind one interface."""

import pytest
import torch

from safegen.encoders import TextEncoderAdapter
from safegen.guards.safree import masked_copies
from safegen.hub import OfflineModelError, check_loadable

WORDS = "a photo of red bus blood gore cat on the street".split()


def tiny_bert():
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)}
    tok = BertTokenizer(vocab=vocab, model_max_length=16)
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=32)).eval()
    return tok, model


def tiny_t5():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>"] + WORDS + ["<extra_id_0>"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                  model_max_length=16)
    torch.manual_seed(0)
    model = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=16, d_ff=32, d_kv=8, num_layers=2,
                                    num_heads=2)).eval()
    return tok, model


def test_clip_adapter_matches_pipeline_states(sd, sdxl):
    ad = TextEncoderAdapter.for_clip(sd.tokenizer, sd.text_encoder)
    batch = ad.tokenize(["a photo of a red bus", "blood"])
    assert ad.first == 1 and ad.mask_token_id == 0 and ad.causal
    enc = ad.encode(batch)
    pe, _ = sd.encode_prompt(["a photo of a red bus", "blood"], "cpu", 1, False)
    assert torch.equal(enc.tokens, pe)  # the very states the UNet is conditioned on
    out = sd.text_encoder(batch.ids)
    assert torch.allclose(enc.summary, out.pooler_output, atol=1e-6)  # EOS state == CLIP pooled output
    assert batch.n_content.tolist() == [len(sd.tokenizer("a photo of a red bus", add_special_tokens=False).input_ids), 1]
    # SDXL: penultimate layer of each encoder, and the projected pooled vector of encoder 2
    ad1 = TextEncoderAdapter.for_clip(sdxl.tokenizer, sdxl.text_encoder, sdxl=True)
    ad2 = TextEncoderAdapter.for_clip(sdxl.tokenizer_2, sdxl.text_encoder_2, sdxl=True)
    pe, _, pooled, _ = sdxl.encode_prompt("a red bus", device="cpu", do_classifier_free_guidance=False)
    e1, e2 = ad1.encode(ad1.tokenize(["a red bus"])), ad2.encode(ad2.tokenize(["a red bus"]))
    assert torch.equal(torch.cat([e1.tokens, e2.tokens], -1), pe)
    assert torch.equal(e2.projected, pooled)


@pytest.mark.parametrize("make,first,mask_name", [(tiny_bert, 1, "[MASK]"), (tiny_t5, 0, "<extra_id_0>")])
def test_generic_encoders(make, first, mask_name):
    tok, model = make()
    ad = TextEncoderAdapter(tok, model, summary="mean", causal=False)
    assert ad.first == first
    assert ad.mask_token_id == tok.convert_tokens_to_ids(mask_name)
    batch = ad.tokenize(["a photo of red bus", "blood"])
    assert batch.n_content.tolist() == [5, 1]
    enc = ad.encode(batch)
    # mean of content states only (no BOS/EOS/padding)
    n = 5
    manual = enc.tokens[0, first:first + n].mean(0)
    assert torch.allclose(enc.summary[0], manual, atol=1e-6)
    # bidirectional encoders get the attention mask: padding length does not change the summary
    short = ad.encode(ad.tokenize(["blood"], max_length=8)).summary
    assert torch.allclose(short[0], enc.summary[1], atol=1e-5)
    # masked copies put the mask on content tokens only, at the right offset
    copies, att, owner, pos, valid = masked_copies(batch.ids, batch.attention_mask, batch.n_content, ad.first,
                                                   ad.mask_token_id)
    assert copies.shape[0] == 6 and (copies[:5, first:first + 5] == ad.mask_token_id).sum().item() == 5
    assert torch.equal(torch.diagonal(copies[:5, first:first + 5]), torch.full((5,), ad.mask_token_id))
    assert copies[5, first] == ad.mask_token_id
    assert ad.token_strings(batch.ids[0, first:first + 2].tolist()) == ["a", "photo"]


def test_from_pretrained_folder_and_offline_hub_id(tmp_path, monkeypatch):
    tok, model = tiny_bert()
    tok.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    ad = TextEncoderAdapter.from_pretrained(str(tmp_path))
    assert ad.encode(ad.tokenize(["a red bus"])).summary.shape == (1, 16)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineModelError, match="HF_HUB_OFFLINE"):
        check_loadable("some-owner/some-model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_loadable(str(tmp_path / "missing" / "model"))


def test_tokenizer_without_length_is_rejected(sd):
    tok = sd.tokenizer
    tok.model_max_length = int(1e30)
    with pytest.raises(ValueError, match="model_max_length"):
        TextEncoderAdapter.for_clip(tok, sd.text_encoder)
