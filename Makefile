# Two entry points: `make demo` (the main job) and `make test`. Both create ./.venv on first use.
# torch is pinned first on purpose: a looser requirement resolved on its own may pull the CUDA build.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pt2q-installed

.PHONY: demo test test-avx2 install clean

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

clean:
	rm -rf $(VENV) build *.egg-info
