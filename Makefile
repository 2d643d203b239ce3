# Quick start: `make run` (main job, offline) and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export GRADIO_ANALYTICS_ENABLED := False
export TOKENIZERS_PARALLELISM := false

.PHONY: venv chromium run test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: any unpinned torch requirement would pull a multi-GB CUDA build
	$(PY) -m pip install -q "$(TORCH_PIN)"
	# the dev extra has what `make test` needs beyond the package: pytest, gradio, playwright, nudenet, matplotlib,
	# and setuptools>=77 (tests/test_wheel.py builds the wheel offline, without build isolation)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

# Headless Chromium (Debian's package) for the demo's browser test; the test skips with a message if it is missing.
# No browser download: Playwright drives this binary (executable_path), `playwright install` is never run.
chromium:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian chromium for the browser test (apt-get)"; \
	    ( apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      chromium ) >/dev/null 2>&1 || echo "note: apt-get could not install chromium; the browser test will skip"; \
	  else echo "note: no apt-get here; the browser test will skip unless /usr/bin/chromium exists"; fi; \
	fi

run: venv
	$(PY) -m safegen.cli demo-run --out outputs

# Two pytest workers (pytest-xdist), one per core of the CI machine: the suite is mostly many small models that two
# torch threads barely speed up, so two processes finish it sooner (332 s of pytest on a clean clone, against 417-446 s
# in one process). `make test TEST_WORKERS=0` runs it in one process.
TEST_WORKERS ?= 2

test: venv chromium
	$(PY) -m pytest -n $(TEST_WORKERS)

bench: venv
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) outputs
