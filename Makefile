# mededge: one-command setup, demo, tests and benchmarks.
# `make install` is idempotent: it re-runs only when pyproject.toml changes.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch on this kind of machine; on a CUDA box set TORCH_SPEC to what you need.
TORCH_SPEC ?= torch==2.13.0
WORK ?= work
PYTEST_ARGS ?=

.PHONY: install demo test bench venv-triton proto lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[all]'
	touch $@

proto: install
	$(PY) proto/generate.py

lint: install
	$(VENV)/bin/ruff check edge trainer converters tests
	$(VENV)/bin/lint-imports

# pytest exits 5 when it collects no tests; that is not a failure.
test: install
	$(VENV)/bin/lint-imports
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

demo: install
	$(VENV)/bin/mededge synth --out $(WORK)/data --studies 60 --seed 7
	$(VENV)/bin/mededge train classify --data $(WORK)/data --repo $(WORK)/models --model nodule_cls
	$(VENV)/bin/mededge train segment --data $(WORK)/data --repo $(WORK)/models --model lung_seg
	$(VENV)/bin/mededge train detect --data $(WORK)/data --repo $(WORK)/models --model nodule_det
	$(PY) -m edge.tools.demo_detect --data $(WORK)/data --repo $(WORK)/models --out $(WORK)/demo
	$(VENV)/bin/mededge models --repo $(WORK)/models
	# serve the models: one inference per model over KServe v2 gRPC, then a study pushed with
	# C-STORE comes back as SEG + SR at a local Orthanc, with a PNG overlay of the SEG; where
	# Debian's prometheus is installed it scrapes the service and one figure is shown
	$(VENV)/bin/mededge demo-dicom --repo $(WORK)/models --study $(WORK)/data/study-0000/ct \
		--work $(WORK)/demo --png $(WORK)/demo/seg_overlay.png \
		$(if $(wildcard /usr/bin/prometheus),--prometheus)

# The Triton reference of `make bench`: nvidia-pytriton needs numpy<2 (under numpy 2 its Python
# backend answers with empty outputs), so it gets its own venv, with the same onnxruntime version
# as $(VENV) where pip has one for numpy 1 (else 1.20-1.22). A failed build does not stop
# `make bench`: it reports Triton as unavailable, with the reason.
TRITON_VENV ?= .venv-triton
TRITON_PKGS := "numpy<2" nvidia-pytriton onnx "tritonclient[grpc]"

venv-triton: $(TRITON_VENV)/.installed

$(TRITON_VENV)/.installed: | $(VENV)/.installed
	@ort=$$($(PY) -c 'import onnxruntime; print(onnxruntime.__version__)'); \
	tpy=$(TRITON_VENV)/bin/python; \
	{ test -x $$tpy || $(PYTHON) -m venv $(TRITON_VENV); } && \
	$$tpy -m pip install -q --upgrade pip && \
	{ $$tpy -m pip install -q $(TRITON_PKGS) "onnxruntime==$$ort" || \
	  $$tpy -m pip install -q $(TRITON_PKGS) "onnxruntime>=1.20,<1.23"; } && \
	$$tpy -c 'import numpy, onnxruntime, pytriton; assert numpy.__version__ < "2"' && \
	touch $@ || echo "venv-triton: could not build $(TRITON_VENV); make bench reports Triton as unavailable"

# Serving (raw ONNX Runtime, mededge, Triton), DICOM receive (storescp, Orthanc, pynetdicom,
# mededge), time to result, and the detector of `make demo` (throughput and sliding-window
# overhead) when it has been trained. Each prints its table and writes it under $(WORK).
bench: install venv-triton
	MEDEDGE_TRITON_VENV=$(TRITON_VENV) $(VENV)/bin/mededge bench serve --work $(WORK)/bench
	$(VENV)/bin/mededge bench dicom --work $(WORK)/bench-dicom
	$(VENV)/bin/mededge bench ttr --work $(WORK)/bench-ttr
	@if [ -f $(WORK)/models/nodule_det/mededge.yaml ]; then \
		$(VENV)/bin/mededge bench detect --repo $(WORK)/models --model nodule_det \
			--out $(WORK)/bench/bench_detect.json; \
	else echo "bench detect: no detector in $(WORK)/models (run make demo first)"; fi

clean:
	rm -rf $(WORK) .pytest_cache
