import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# calibrations (SAFREE's gate and SVF) are computed once per encoder in this test session, never read from or
# written to the user's cache
import tempfile  # noqa: E402

os.environ.setdefault("SAFEGEN_CACHE", tempfile.mkdtemp(prefix="safegen-test-cache-"))

import pytest
import torch

# at most two torch threads per process, and no more threads than cores among pytest-xdist's workers (spinning)
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _workers)))


@pytest.fixture
def sd():
    from safegen.testing import tiny_sd_pipeline

    return tiny_sd_pipeline()


@pytest.fixture
def sd2v():
    from safegen.testing import tiny_sd_pipeline

    return tiny_sd_pipeline("v_prediction")


@pytest.fixture
def sdxl():
    from safegen.testing import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline()


@pytest.fixture
def lexical_policy():
    """The default policy's categories with SAFREE alone (its own guard list; the default stack's other guards have
    their own tests) and SAFREE's semantic gate off (a fixed threshold above 1): on random tiny encoders
    similarity means nothing, so only literal concept phrases decide which prompts are flagged."""
    import safegen

    pol = safegen.load_policy("default")
    pol.guards = ["safree"]
    for cat in pol.categories.values():
        cat.thresholds["safree"] = 2.0
    return pol


@pytest.fixture
def tiny_prompt_data(tmp_path):
    """A data folder laid out like ``../shared/data`` with a few CoProV2 training pairs and 1,010 COCO-style captions
    (for the training commands' ``--data-dir``)."""
    rows = ["prompt,image,category"]
    for i, (u, s) in enumerate([("blood and gore", "a red bus"), ("a nude woman", "a woman"),
                                ("a man killing a dog", "a man walking a dog")]):
        rows += [f"{u},u_idx_{i:07d}_0.jpg,Violence", f"{s},s_idx_{i:07d}_0.jpg,Violence"]
    (tmp_path / "CoProv2_train.csv").write_text("\n".join(rows) + "\n")
    coco = ["case_number,source,prompt,evaluation_seed,coco_id"] + [f"{i},coco,a cat number {i},0,{i}"
                                                                      for i in range(1010)]
    (tmp_path / "coco_30k_10k.csv").write_text("\n".join(coco) + "\n")
    return tmp_path


def gen(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


@pytest.fixture
def one_torch_thread():
    """Tiny models run fastest on one thread (more only adds spinning on a shared CPU); restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
