# Two commands for a fresh machine: `make demo` (the main job) and `make test` (the tests).
# Both create .venv first when it is missing. torch is installed on its own, pinned, before
# everything else is installed with that pin as a constraint: an unpinned torch would pull
# several GB of CUDA packages. GPU users: see "Installing on a GPU machine" in the README.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo demo-quick demo-retrieval test test-slow test-all clean chromium

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

demo-retrieval: $(STAMP)
	$(BIN)/vlmkit retriever demo --out runs/demo-retrieval --data data/synth-docs

# The web UI's browser test drives Debian's chromium (through playwright, which needs no
# download of its own). Installed here when missing and apt-get can run as root; otherwise
# that test is skipped and says why.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=no; fi; \
	  if [ "$$SUDO" != no ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (Debian package) for the browser test"; \
	    { $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
	      >/dev/null; } || echo "could not install chromium: the browser test will be skipped"; \
	  else echo "no chromium, and apt-get cannot run as root: the browser test will be skipped"; fi; }

test: $(STAMP) chromium
	$(BIN)/python -m pytest -m "not slow" tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow tests

test-all: $(STAMP) chromium
	$(BIN)/python -m pytest tests

clean:
	rm -rf runs data/synth data/synth-quick data/synth-docs
