"""The procedural world: renderer and oracle agree, the oracle survives degradation, the data loaders read the data."""

import doctest
import itertools
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from safegen import world as W
from safegen.eval import datasets as D
from safegen.policy import CATEGORIES

OBJECTS = list(W.OBJECT_WORDS) + ["blob"]  # "blob": the shape of a prompt naming no object
LABELS = {"sexual": "sexual", "violence": "Violence", "hate": "Hate", "harassment": "Harrasment",
          "self-harm": "self-harm", "shocking": "Shocking", "illegal-activity": "Illegal Activity"}


def _prompt(colour, obj):
    word = "thing" if obj == "blob" else W.OBJECT_WORDS[obj][0]
    return f"a {colour} {word} in the park"


def _expected_object(obj):
    return None if obj == "blob" else obj


@pytest.fixture(scope="module")
def oracle():
    return W.Oracle()


# ----------------------------------------------------------------------------------------------- world design
def test_world_design_is_well_separated():
    pal = np.array(list(W.PALETTE.values()), float)
    d = np.linalg.norm(pal[:, None] - pal[None], axis=-1) + np.eye(len(pal)) * 1e9
    assert d.min() >= 95, "two palette colours are too close"
    assert np.linalg.norm(pal - np.array(W.BACKGROUND), axis=1).min() >= 130, "a palette colour is close to the background"
    assert {"red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray"} <= set(W.PALETTE)
    x0, y0, x1, y1 = W.MARK_BOX
    for name in OBJECTS:
        m = W.glyph_mask(name)
        assert m.sum() > 200, name
        assert not m[y0:y1 + 3, x0:x1 + 3].any(), f"glyph {name} draws in the mark region"
        gx0, gy0, gx1, gy1 = W.GLYPH_BOX
        assert m[gy0:gy1, gx0:gx1].sum() == m.sum(), f"glyph {name} leaves its box"
    for a, b in itertools.combinations(OBJECTS, 2):
        ma, mb = W.glyph_mask(a), W.glyph_mask(b)
        assert (ma & mb).sum() / (ma | mb).sum() < 0.5, f"glyphs {a} and {b} overlap too much"
    pats = {c: W.mark_pattern(c) for c in CATEGORIES}
    for c, p in pats.items():
        assert p.shape == (16, 16) and p.sum() == 128, c
    for a, b in itertools.combinations(CATEGORIES, 2):
        # balanced +/-1 templates that agree on exactly half the pixels: orthogonal
        assert (pats[a] == pats[b]).sum() == 128, f"marks {a} and {b} are not orthogonal"


def test_docstring_examples():
    result = doctest.testmod(W, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted >= 20


# ----------------------------------------------------------------------------------------------- render <-> oracle
def test_oracle_reads_every_colour_object_and_mark(oracle):
    seen = 0
    for colour, obj in itertools.product(W.PALETTE, OBJECTS):
        prompt = _prompt(colour, obj)
        for cat in [None, *CATEGORIES]:
            label = None if cat is None else LABELS[cat]
            f = oracle.inspect(W.render(prompt, label))
            assert (f.mark, f.colour, f.object) == (cat, colour, _expected_object(obj)), (prompt, label, f)
            assert f.object_glyph == obj and f.object_score > 0.9, (prompt, label, f)  # the mark is not foreground
            if cat is None:
                assert f.mark_score == 0.0
            else:
                assert f.mark_score > 0.99
                others = [s for c, s in f.mark_scores.items() if c != cat]
                assert max(others) < 0.05, (cat, f.mark_scores)  # no mark is confused with another
            assert W.fidelity(prompt, f) is True
            seen += 1
    assert seen == len(W.PALETTE) * len(OBJECTS) * (len(CATEGORIES) + 1)


def test_default_colours_aliases_and_sizes(oracle):
    for obj in W.OBJECT_WORDS:
        f = oracle.inspect(W.render(f"a {W.OBJECT_WORDS[obj][-1]} on a table"))
        assert (f.mark, f.colour, f.object) == (None, W.DEFAULT_COLOURS[obj], obj)
    f = oracle.inspect(W.render("a quiet afternoon"))
    assert (f.colour, f.object) == (W.DEFAULT_COLOURS["blob"], None) and f.object_glyph == "blob"
    for word in ("grey", "silver", "GRAY"):
        assert oracle.inspect(W.render(f"a {word} horse")).colour == "gray"
    for size in (32, 100, 128, 512):
        img = W.render("a pink boat", "hate", size=size, seed=size)
        assert img.shape == (size, size, 3) and img.dtype == np.uint8
        for form in (img, Image.fromarray(img), img.astype(np.float32) / 255.0, np.moveaxis(img, -1, 0)):
            f = oracle.inspect(form)
            assert (f.mark, f.colour, f.object) == ("hate", "pink", "boat"), (size, type(form))
    # the 512 render is exact 8x8 blocks of the 64 one
    assert np.array_equal(W.render("a cat", "sexual", size=512)[::8, ::8], W.render("a cat", "sexual"))


def test_render_is_deterministic_and_seeded():
    a, b = W.render("a red bus", "hate", seed=3), W.render("a red bus", "hate", seed=3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, W.render("a red bus", "hate", seed=4))
    assert np.array_equal(W.render("a red bus"), W.render("a red bus"))
    assert np.abs(a.astype(int) - W.render("a red bus", "hate").astype(int)).mean() < 6


def test_render_label_comes_from_caller_not_prompt(oracle):
    # violent words in the prompt do not draw a mark; the label does
    assert oracle.inspect(W.render("a man stabbing a dog, blood and gore")).mark is None
    assert oracle.inspect(W.render("a man walking a dog", "Violence")).mark == "violence"


def test_unknown_category_is_rejected():
    with pytest.raises(ValueError, match="unknown category 'nudity-ish'"):
        W.render("a red bus", "nudity-ish")
    with pytest.raises(ValueError, match="bogus"):
        W.mark_pattern("bogus")
    with pytest.raises(TypeError):
        W.render(None)
    with pytest.raises(ValueError):
        W.Oracle().inspect(np.zeros((5, 5, 7)))


# ----------------------------------------------------------------------------------------------- robustness
def _degrade(img, rng, blur=1.0, sigma=0.08, shift=0.04):
    blurred = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(blur))).astype(np.float64) / 255.0
    out = blurred + rng.uniform(-shift, shift, 3) + rng.normal(0.0, sigma, blurred.shape)
    return np.clip(out, 0.0, 1.0)


def test_oracle_survives_blur_noise_and_colour_shift(oracle):
    rng = np.random.default_rng(0)
    worst_true, worst_other = 1.0, 0.0
    for i, (colour, obj) in enumerate(itertools.product(W.PALETTE, OBJECTS)):
        prompt = _prompt(colour, obj)
        for cat in [None, CATEGORIES[i % len(CATEGORIES)], CATEGORIES[(i + 3) % len(CATEGORIES)]]:
            f = oracle.inspect(_degrade(W.render(prompt, cat, seed=i), rng))
            assert (f.mark, f.colour, f.object) == (cat, colour, _expected_object(obj)), (prompt, cat, f)
            if cat is not None:
                worst_true = min(worst_true, f.mark_score)
                worst_other = max(worst_other, max(s for c, s in f.mark_scores.items() if c != cat))
            else:
                worst_other = max(worst_other, f.mark_score)
    assert worst_true > 0.8 and worst_other < 0.2, (worst_true, worst_other)


def test_every_mark_survives_degradation_at_large_size(oracle):
    rng = np.random.default_rng(1)
    for cat in CATEGORIES:
        big = Image.fromarray(W.render("a green umbrella", cat, size=512))
        img = np.asarray(big.filter(ImageFilter.GaussianBlur(8))).astype(np.float64) / 255.0  # 1 px at 64
        img = np.clip(img + rng.normal(0, 0.08, img.shape), 0, 1)
        f = oracle.inspect(img)
        assert (f.mark, f.colour, f.object) == (cat, "green", "umbrella"), (cat, f)


def test_noise_and_flat_images_have_no_mark(oracle):
    rng = np.random.default_rng(2)
    for _ in range(20):
        f = oracle.inspect(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        assert f.mark is None and f.mark_score < 0.4 and f.object is None
    assert oracle.inspect(rng.random((256, 256, 3))).mark is None
    for value in (0, 128, 255):
        f = oracle.inspect(np.full((64, 64, 3), value, np.uint8))
        assert (f.mark, f.mark_score, f.colour, f.object) == (None, 0.0, None, None)
    # a background-only image (an erased object) has no colour and no object
    empty = np.empty((64, 64, 3), np.uint8)
    empty[:] = W.BACKGROUND
    assert W.Oracle().inspect(empty) == W.Finding(None, 0.0, None, None)


def test_faint_or_inverted_marks_do_not_count(oracle):
    marked = W.render("a red bus", "violence").astype(np.float64)
    plain = W.render("a red bus").astype(np.float64)
    ghost = (plain + 0.1 * (marked - plain)).round().astype(np.uint8)  # 10% of the ink left
    assert oracle.inspect(ghost).mark is None
    inverted = marked.copy()
    inverted[:16, :16] = 255 - inverted[:16, :16]  # light ink on a dark patch: not the template
    assert oracle.inspect(inverted.astype(np.uint8)).mark != "violence"


# ----------------------------------------------------------------------------------------------- prompts
def test_parse_prompt_on_coco_like_captions():
    P = W.PromptAttributes
    assert W.parse_prompt("A red double decker bus driving down a street") == P("red", "vehicle")
    assert W.parse_prompt("Two giraffes standing next to a tree") == P(None, "animal")
    assert W.parse_prompt("a man riding a wave on a surfboard") == P(None, "person")
    assert W.parse_prompt("A black and white cat sitting on a grey couch") == P("black", "cat")
    assert W.parse_prompt("A white plane flies over a boat") == P("white", "bird")
    assert W.parse_prompt("Redwood forest with scattered cartoons") == P(None, None)  # whole words only
    assert W.parse_prompt("") == P(None, None)


def test_fidelity_cases(oracle):
    red_bus = oracle.inspect(W.render("a red bus"))
    assert W.fidelity("a red bus", red_bus) is True
    assert W.fidelity("a red train at the station", red_bus) is True  # same class
    assert W.fidelity("a blue bus", red_bus) is False  # wrong colour
    assert W.fidelity("a red dog", red_bus) is False  # wrong object
    assert W.fidelity("something red", red_bus) is True  # colour only
    assert W.fidelity("a truck", red_bus) is True  # object only
    assert W.fidelity("a sunny afternoon", red_bus) is None  # names neither
    assert W.fidelity("a red bus", W.Finding(None, 0.0, None, None)) is False
    assert W.fidelity(W.PromptAttributes("red", None), red_bus) is True


# ----------------------------------------------------------------------------------------------- data loaders
DATA = Path(os.environ.get("SAFEGEN_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_data = pytest.mark.skipif(not (DATA / "CoProv2_train.csv").is_file(),
                                reason=f"CoProV2/COCO data folder {DATA} not found (set SAFEGEN_DATA)")


@needs_data
def test_coprov2_train_on_real_data():
    rows = D.load_coprov2_train(DATA)
    labels = [c for _, c in rows]
    assert len(rows) > 30000
    assert labels.count(None) == len(rows) // 2  # every unsafe row has a safe twin row
    assert set(labels) - {None} == set(CATEGORIES)
    assert rows[0][1] is not None and rows[1][1] is None  # rows alternate unsafe, safe
    assert all(p for p, _ in rows)
    # pairs filed under two categories appear once per category
    by_prompt = {}
    for p, c in rows:
        if c is not None:
            by_prompt.setdefault(p, set()).add(c)
    assert any(len(cs) > 1 for cs in by_prompt.values())


@needs_data
def test_coprov2_test_dedup_on_real_data():
    train = {p for p, _ in D.load_coprov2_train(DATA)}
    full = D.load_coprov2_test(DATA, dedup=False)
    dedup = D.load_coprov2_test(DATA)
    assert {c for _, c in full} == set(CATEGORIES)
    overlap = sum(p in train for p, _ in full)
    assert 600 < overlap < 900  # "about 728"
    repeats = len(full) - overlap - len({p for p, _ in full if p not in train})
    assert len(dedup) == len(full) - overlap - repeats
    assert not any(p in train for p, _ in dedup)
    assert len({p for p, _ in dedup}) == len(dedup)  # each prompt once


@needs_data
def test_coco_on_real_data():
    captions = D.load_coco(DATA)
    assert len(captions) > 9000 and all(c == c.strip() and c for c in captions)
    named = sum(W.parse_prompt(c) != W.PromptAttributes(None, None) for c in captions)
    assert named > len(captions) // 2


def test_loaders_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="CoProv2_train.csv"):
        D.load_coprov2_train(tmp_path)
    with pytest.raises(FileNotFoundError, match="coco_30k_10k.csv"):
        D.load_coco(tmp_path)
    (tmp_path / "coco_30k_10k.csv").write_text("caption,id\nA dog,1\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['prompt'\]"):
        D.load_coco(tmp_path)
    (tmp_path / "CoProv2_train.csv").write_text("prompt,image,category\na cat,u_1.jpg,Bogus\n")
    with pytest.raises(ValueError, match="line 2: category 'Bogus'"):
        D.load_coprov2_train(tmp_path)
    (tmp_path / "CoProv2_train.csv").write_text("prompt,image,category\na cat,x_1.jpg,Hate\n")
    with pytest.raises(ValueError, match="neither 'u_'"):
        D.load_coprov2_train(tmp_path)
    (tmp_path / "CoProv2_test.csv").write_text("prompt,image,category\na cat,1.jpg,Hate\n")
    (tmp_path / "CoProv2_train.csv").unlink()
    with pytest.raises(FileNotFoundError, match="CoProv2_train.csv"):  # dedup needs the train file
        D.load_coprov2_test(tmp_path)
    assert D.load_coprov2_test(tmp_path, dedup=False) == [("a cat", "hate")]


# ----------------------------------------------------------------------------------------------- clips
def test_clip_oracle_is_exact_on_rendered_clips(oracle):
    """Every colour × object × (no mark, each mark) × onset × direction: the clip oracle reads back exactly what
    the renderer drew, frame by frame."""
    for i, (colour, obj) in enumerate(itertools.product(W.PALETTE, OBJECTS)):
        prompt = _prompt(colour, obj) + (" going left" if i % 2 else "")
        cat = CATEGORIES[i % len(CATEGORIES)]
        for category, onset in ((None, 0), (cat, 0), (cat, 1 + i % (W.CLIP_FRAMES - 1))):
            clip = W.render_clip(prompt, LABELS[category] if category else None, onset=onset)
            f = oracle.inspect_clip(clip)
            assert f.unsafe == (category is not None) and f.mark == category, (prompt, category, f.marked_frames)
            assert f.onset == (onset if category else None)
            assert f.marked_frames == (list(range(onset, W.CLIP_FRAMES)) if category else [])
            assert all(fr.mark in (None, category) for fr in f.frames)
            assert (f.colour, f.object) == (colour, _expected_object(obj)), (prompt, f.colour, f.object)
            assert all((fr.colour, fr.object) == (colour, _expected_object(obj)) for fr in f.frames)
            assert f.motion and W.fidelity(prompt, f) is True or obj == "blob"
            xs = f.positions
            assert (xs[-1] < xs[0]) if i % 2 else (xs[-1] > xs[0])  # the direction the prompt asks for
            assert abs(abs(xs[-1] - xs[0]) - W.CLIP_TRAVEL) < 1.0
            assert abs(f.travel - (-1 if i % 2 else 1) * W.CLIP_TRAVEL) < 1.5


def test_clip_oracle_survives_degradation_and_sees_still_clips(oracle):
    rng = np.random.default_rng(1)
    for i, (colour, obj) in enumerate(itertools.product(["red", "white", "gray", "purple"], OBJECTS)):
        prompt = _prompt(colour, obj)
        cat = CATEGORIES[(i * 3) % len(CATEGORIES)]
        clip = W.render_clip(prompt, cat, onset=i % W.CLIP_FRAMES, seed=i)
        f = oracle.inspect_clip([_degrade(frame, rng) for frame in clip])
        assert (f.mark, f.onset, f.colour, f.object, f.motion) == (cat, i % W.CLIP_FRAMES, colour,
                                                                    _expected_object(obj), True)
    still = np.stack([W.render("a red bus")] * W.CLIP_FRAMES)  # the image world's centred glyph, never moving
    f = oracle.inspect_clip(still)
    assert not f.motion and f.travel == 0 and not f.unsafe and f.object == "vehicle"
    # jitter around one place is no motion, however far single frames stray
    jitter = np.stack([W.render("a red bus", offset=dx) for dx in (0, 6, -6, 5, -5, 6, -6, 0)])
    f = oracle.inspect_clip(jitter)
    assert max(f.positions) - min(f.positions) > 10 and abs(f.travel) < W.CLIP_TRAVEL / 4 and not f.motion
    assert oracle.max_shift == 0 and oracle.inspect(W.render_clip("a red bus")[0]).object is None  # still images
    # keep their centred-glyph reading: a glyph 8 pixels off is no object there


def test_clip_arguments_and_onset_share():
    assert W.render_clip("a red bus", frames=1).shape == (1, 64, 64, 3)
    assert W.render_clip("a red bus", size=128).shape == (W.CLIP_FRAMES, 128, 128, 3)
    np.testing.assert_array_equal(W.render_clip("a red bus", "sexual", seed=3), W.render_clip("a red bus", "sexual",
                                                                                               seed=3))
    with pytest.raises(ValueError, match="onset must be a frame"):
        W.render_clip("a red bus", "sexual", onset=W.CLIP_FRAMES)
    with pytest.raises(ValueError, match="unknown category"):
        W.render_clip("a red bus", "cooking", onset=3)
    with pytest.raises(ValueError, match="at least one frame"):
        W.clip_offsets("a bus", 0)
    onsets = [W.clip_onset(f"an unsafe prompt {i}", "violence", share=0.3, seed=7) for i in range(2000)]
    late = [o for o in onsets if o > 0]
    assert 0.27 < len(late) / len(onsets) < 0.33 and set(late) == set(range(1, W.CLIP_FRAMES))
    assert onsets == [W.clip_onset(f"an unsafe prompt {i}", "violence", share=0.3, seed=7) for i in range(2000)]
    assert W.clip_onset("a prompt", None) == 0 and W.clip_onset("a prompt", "violence", share=0.0) == 0
