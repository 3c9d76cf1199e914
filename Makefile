# Two entry points: `make demo` and `make test`. Each creates .venv and installs what it needs first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo_out

.PHONY: demo test test-fast install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, explicitly: the pinned CPU-capable wheels (CUDA builds run on CPU too)
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1" || $(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -e ".[test,local]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m dcv2_k8s demo --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest -q -ra --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(DEMO_OUT) runs .pytest_cache
