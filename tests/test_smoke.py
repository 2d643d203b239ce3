import subprocess
import sys

import numpy as np
import torch

import safegen


def test_import_is_light():
    code = "import sys, safegen; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_protect_roundtrip_bit_identical(sd, lexical_policy):
    kw = dict(num_inference_steps=2, output_type="np")
    prompts = ["a photo of a red bus", "a photo of blood and gore"]
    ref = sd(prompts, generator=torch.Generator().manual_seed(0), **kw).images
    safegen.protect(sd, policy=lexical_policy)
    out = sd(prompts, generator=torch.Generator().manual_seed(0), **kw)
    assert np.array_equal(out.images[0], ref[0])
    assert not np.array_equal(out.images[1], ref[1])
    assert [r.verdict for r in out.safety] == ["pass", "steer"]
    safegen.unprotect(sd)
    again = sd(prompts, generator=torch.Generator().manual_seed(0), **kw).images
    assert np.array_equal(again, ref)


def test_lazy_names_are_not_shadowed_by_submodules():
    code = ("import safegen; safegen.unprotect; safegen.load_policy; "
            "import types; assert not isinstance(safegen.protect, types.ModuleType), safegen.protect; "
            "assert callable(safegen.protect) and callable(safegen.Safree)")
    subprocess.run([sys.executable, "-c", code], check=True)
