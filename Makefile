# Two entry points: `make demo` (the main job) and `make test`. Both create ./.venv on first use.
# torch is pinned first on purpose: a looser requirement resolved on its own may pull the CUDA build.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pt2q-installed

.PHONY: demo test test-avx2 test-ipex install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,demo]'
	$(PY) -m pip install --quiet torchao==0.18.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/pt2q demo

# int8 numerics depend on the CPU (pt2q/isa.py): `make test` runs the suite, then runs it again as if on
# an AVX2-only CPU (saturating int8 kernels) unless this CPU already is one. ONEDNN_MAX_CPU_ISA=AVX2 caps
# oneDNN, which runs the int8 kernels. (ATEN_CPU_CAPABILITY=avx2 is not used: on torch 2.13 it makes
# plain Inductor's fp32 output wrong on an AVX-512 machine, unrelated to pt2q.)
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests
	@if HF_HUB_OFFLINE=1 $(PY) -c "import sys, pt2q; sys.exit(pt2q.isa.detect().int8_saturates)"; then \
		$(MAKE) --no-print-directory test-avx2; \
	else echo "test-avx2 skipped: this CPU's int8 kernels already saturate, the run above used them"; fi

test-avx2: $(STAMP)
	HF_HUB_OFFLINE=1 ONEDNN_MAX_CPU_ISA=AVX2 $(PY) -m pytest -q tests

# The IPEX backend (legacy, pt2q/backends/ipex), not part of `make test` or CI: IPEX's last release line (2.8)
# needs torch 2.8, so it gets a venv of its own, outside the checkout (IPEX_VENV=... to move it; from PyPI,
# torch 2.8 is the CUDA build, a few GB: IPEX_PIP_ARGS can name a CPU-only wheel index). pt2q's half runs in
# .venv (torch 2.13) and writes its scales; IPEX's half runs in that venv with pt2q on PYTHONPATH (pt2q imports
# there with torch 2.8's torchao, 0.13, but its pipeline needs torch 2.13). tools/ipex_run.py prints the figures.
IPEX_VENV ?= $(HOME)/.cache/pt2q/ipex-venv-2.8
IPEX_PY := $(IPEX_VENV)/bin/python
IPEX_STAMP := $(IPEX_VENV)/.pt2q-ipex-installed
IPEX_PIP_ARGS ?=
IPEX_RUN_DIR ?= build/ipex-run

$(IPEX_STAMP):
	test -x $(IPEX_PY) || $(PYTHON) -m venv $(IPEX_VENV)
	$(IPEX_PY) -m pip install --quiet $(IPEX_PIP_ARGS) torch==2.8.0
	$(IPEX_PY) -m pip install --quiet torch==2.8.0 intel-extension-for-pytorch==2.8.0 torchao==0.13.0 tqdm networkx sympy pytest
	touch $(IPEX_STAMP)

test-ipex: $(STAMP) $(IPEX_STAMP)
	mkdir -p $(IPEX_RUN_DIR)
	HF_HUB_OFFLINE=1 $(PY) tools/ipex_run.py export --dir $(IPEX_RUN_DIR)
	PYTHONPATH=$(CURDIR) $(IPEX_PY) tools/ipex_run.py run --dir $(IPEX_RUN_DIR)
	PYTHONPATH=$(CURDIR) $(IPEX_PY) -m pytest -q --noconftest -p no:cacheprovider tests/backends/test_ipex.py -k real_ipex

clean:
	rm -rf $(VENV) build *.egg-info
