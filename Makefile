# Two entry points: `make demo` and `make test`. Each creates .venv and installs what it needs first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo_out
# kfp-kubernetes releases whose platform protos the tests parse the compiled pipeline with: the oldest supported
# backend's (2.15.0) and the one before it (2.14.6, which must reject the pipeline). Installed apart, not imported.
COMPAT := $(VENV)/compat
KFPK_PROTOS := 2.15.0 2.14.6
# Kubeflow Trainer's CRDs and torch runtime, from its Go module at the release the TrainJob manifests target
TRAINER_MODULE := github.com/kubeflow/trainer/v2@v2.3.0
TRAINER_CRDS := $(COMPAT)/trainer-v2.3.0
GO ?= $(shell command -v go 2>/dev/null || echo /usr/local/go/bin/go)
# the module cache stays in .venv (writable, removed with it); no toolchain download
GOENV_VARS := GOMODCACHE=$(abspath $(COMPAT))/gomod GOPATH=$(abspath $(COMPAT))/gopath GOFLAGS=-modcacherw GOTOOLCHAIN=local

.PHONY: demo test test-fast install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, explicitly: the pinned CPU-capable wheels (CUDA builds run on CPU too)
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1" || $(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -e ".[test,local]"
	touch $(STAMP)

$(COMPAT)/.installed: $(STAMP) Makefile
	for v in $(KFPK_PROTOS); do \
	  $(PY) -m pip install -q --no-deps --upgrade --target $(COMPAT)/kfp-kubernetes-$$v "kfp-kubernetes==$$v" || exit 1; \
	done
	touch $@

$(TRAINER_CRDS)/.installed: Makefile
	mkdir -p $(TRAINER_CRDS)
	dir=$$(cd $(TRAINER_CRDS) && $(GOENV_VARS) $(GO) mod download -json $(TRAINER_MODULE) | $(PYTHON) -c 'import json,sys; print(json.load(sys.stdin)["Dir"])') \
	  && cp $$dir/manifests/base/crds/trainer.kubeflow.org_*.yaml $$dir/manifests/base/runtimes/torch_distributed.yaml $(TRAINER_CRDS)/ \
	  && chmod u+w $(TRAINER_CRDS)/*.yaml
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m dcv2_k8s demo --out $(DEMO_OUT)

test: $(STAMP) $(COMPAT)/.installed $(TRAINER_CRDS)/.installed
	$(PY) -m pytest -q -ra --durations=15

test-fast: $(STAMP) $(COMPAT)/.installed $(TRAINER_CRDS)/.installed
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(DEMO_OUT) runs .pytest_cache
