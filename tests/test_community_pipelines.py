"""The diffusers community-pipeline files in pipelines/: loaded through ``custom_pipeline=`` they return a
protected pipeline with the plain call signature and output, plus ``out.safety``."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import safegen

PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"
KW = dict(num_inference_steps=2, output_type="np")
BENIGN = "a photo of a red bus"
UNSAFE = "a photo of blood and gore"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from safegen.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

    out = {}
    from safegen.testing import (tiny_flux2_klein_pipeline, tiny_flux2_pipeline, tiny_flux_pipeline,
                                 tiny_qwenimage_pipeline, tiny_sd3_pipeline)

    for kind, build in (("sd", tiny_sd_pipeline), ("sdxl", tiny_sdxl_pipeline), ("sd3", tiny_sd3_pipeline),
                        ("flux", tiny_flux_pipeline), ("qwenimage", tiny_qwenimage_pipeline),
                        ("flux2klein", tiny_flux2_klein_pipeline), ("flux2", tiny_flux2_pipeline)):
        folder = tmp_path_factory.mktemp(f"tiny-{kind}")
        build().save_pretrained(folder)
        out[kind] = str(folder)
    return out


@pytest.fixture(autouse=True)
def modules_cache(tmp_path, monkeypatch):
    """Diffusers copies a custom pipeline file into its modules cache (bound at import time from HF_HOME):
    point it at a temporary folder, and undo the sys.path entry it adds."""
    from diffusers.utils import dynamic_modules_utils

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "hf" / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))


def load(folder, file, **kwargs):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=str(PIPELINES / file), trust_remote_code=True,
                                             **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plain(folder):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


CASES = [
    ("sd", "safegen_stable_diffusion.py", "SafegenStableDiffusionPipeline", "StableDiffusionPipeline"),
    ("sdxl", "safegen_stable_diffusion_xl.py", "SafegenStableDiffusionXLPipeline", "StableDiffusionXLPipeline"),
    ("sd3", "safegen_stable_diffusion_3.py", "SafegenStableDiffusion3Pipeline", "StableDiffusion3Pipeline"),
    ("flux", "safegen_flux.py", "SafegenFluxPipeline", "FluxPipeline"),
    ("qwenimage", "safegen_qwenimage.py", "SafegenQwenImagePipeline", "QwenImagePipeline"),
    ("flux2klein", "safegen_flux2_klein.py", "SafegenFlux2KleinPipeline", "Flux2KleinPipeline"),
    ("flux2", "safegen_flux2.py", "SafegenFlux2Pipeline", "Flux2Pipeline"),
]
#: what each case's calls add to KW (saved FLUX, Qwen-Image and FLUX.2 pipelines default to 1024×1024: ask for the
#: tiny size)
SIZE = {kind: {"height": 32, "width": 32} for kind in ("flux", "qwenimage", "flux2klein", "flux2")}


@pytest.mark.parametrize("kind,file,cls_name,parent", CASES, ids=[c[0] for c in CASES])
def test_loads_protected_and_matches_plain_pipeline(folders, lexical_policy, kind, file, cls_name, parent):
    pipe = load(folders[kind], file)
    assert type(pipe).__name__ == cls_name
    assert parent in [k.__name__ for k in type(pipe).__mro__]
    assert safegen.is_protected(pipe)
    assert pipe._safegen.policy.name == "default"  # the default policy until told otherwise

    pipe.set_safety(policy=lexical_policy)  # random tiny encoders: only literal concept phrases may fire
    assert safegen.is_protected(pipe) and pipe._safegen.policy is lexical_policy
    kw = {**KW, **SIZE.get(kind, {})}
    out = pipe(prompt=[BENIGN, UNSAFE], generator=gen(0), **kw)
    assert out.images.shape == (2, 32, 32, 3)
    assert len(out.safety) == 2
    assert [r.prompt for r in out.safety] == [BENIGN, UNSAFE]
    assert [r.verdict for r in out.safety] == ["pass", "steer"]

    ref = plain(folders[kind])
    assert type(ref).__name__ == parent
    expected = ref(prompt=[BENIGN, UNSAFE], generator=gen(0), **kw).images
    assert np.array_equal(out.images[0], expected[0])  # untouched prompt: bit for bit
    assert not np.array_equal(out.images[1], expected[1])  # flagged prompt: steered


@pytest.mark.parametrize("kind,file,cls_name,parent", CASES, ids=[c[0] for c in CASES])
def test_same_call_signature_and_output_type(folders, kind, file, cls_name, parent):
    import inspect

    pipe = load(folders[kind], file)
    ref = plain(folders[kind])
    assert inspect.signature(type(pipe).__call__) == inspect.signature(type(ref).__call__)
    kw = {**KW, **SIZE.get(kind, {})}
    out = pipe(prompt=BENIGN, num_images_per_prompt=2, generator=gen(1), **kw)
    assert type(out) is type(ref(prompt=BENIGN, generator=gen(1), **kw))
    assert out.images.shape == (2, 32, 32, 3) and len(out.safety) == 2
    images, *_ = pipe(prompt=BENIGN, generator=gen(1), return_dict=False, **kw)  # tuple output as usual
    assert images.shape == (1, 32, 32, 3)
    assert len(safegen.last_reports(pipe)) == 1


def test_load_time_options_and_set_safety(folders, lexical_policy):
    pipe = load(folders["sd"], "safegen_stable_diffusion.py", safegen_policy=lexical_policy,
                safegen_guards=["sld"], safegen_sensitivity=1.5)
    prot = pipe._safegen
    assert prot.policy.categories == lexical_policy.categories and prot.policy.sensitivity == 1.5
    assert lexical_policy.sensitivity == 1.0  # the caller's policy object is not changed
    assert [g.name for g in prot.guards] == ["sld"]
    assert "safegen_policy" not in pipe.config  # load-time options are not saved with the model

    pipe.set_safety(guards="safree,sld-strong")  # comma string or list; other settings kept
    assert sorted(g.name for g in pipe._safegen.guards) == ["safree", "sld"]
    assert pipe._safegen.policy.categories == lexical_policy.categories

    with pytest.raises(safegen.PolicyError, match="no-such-policy"):
        pipe.set_safety(policy="no-such-policy")
    with pytest.raises(ValueError, match="unknown guard"):
        pipe.set_safety(guards=["no-such-guard"])
    assert safegen.is_protected(pipe)  # a rejected setting leaves the previous protection on
    assert sorted(g.name for g in pipe._safegen.guards) == ["safree", "sld"]

    safegen.unprotect(pipe)
    assert not safegen.is_protected(pipe)
    pipe.set_safety()
    assert safegen.is_protected(pipe)
    out = pipe(UNSAFE, generator=gen(0), **KW)
    assert len(out.safety) == 1 and out.safety[0].verdict == "steer"


VIDEO_CASES = [
    ("animatediff", "tiny_animatediff_pipeline", "safegen_animatediff.py", "AnimateDiffPipeline", {"num_frames": 2}),
    ("cogvideox", "tiny_cogvideox_pipeline", "safegen_cogvideox.py", "CogVideoXPipeline", {}),
    ("text-to-video-sd", "tiny_text_to_video_pipeline", "safegen_text_to_video_sd.py", "TextToVideoSDPipeline",
     {"num_frames": 2}),
    ("wan", "tiny_wan_pipeline", "safegen_wan.py", "WanPipeline", {"height": 32, "width": 32, "num_frames": 5}),
]


@pytest.mark.parametrize("kind,builder,file,parent,extra", VIDEO_CASES, ids=[c[0] for c in VIDEO_CASES])
def test_video_pipeline_files(tmp_path, lexical_policy, kind, builder, file, parent, extra):
    from safegen import testing

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny video models: many small ops, a second thread only adds synchronisation
    try:
        _check_video_file(tmp_path, lexical_policy, kind, builder, file, parent, extra, testing)
    finally:
        torch.set_num_threads(threads)


def _check_video_file(tmp_path, lexical_policy, kind, builder, file, parent, extra, testing):
    folder = tmp_path / kind
    getattr(testing, builder)().save_pretrained(folder)
    pipe = load(str(folder), file, safegen_policy=lexical_policy)
    assert parent in [k.__name__ for k in type(pipe).__mro__] and safegen.is_protected(pipe)
    kw = dict(num_inference_steps=2, output_type="np", **extra)
    out = pipe([BENIGN, UNSAFE], generator=[gen(0), gen(1)], **kw)
    assert [r.verdict for r in out.safety] == ["pass", "steer"]
    ref = plain(str(folder))
    assert type(ref).__name__ == parent
    expected = ref([BENIGN, UNSAFE], generator=[gen(0), gen(1)], **kw).frames
    assert out.frames.shape == expected.shape
    assert np.array_equal(out.frames[0], expected[0]) and not np.array_equal(out.frames[1], expected[1])
