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

# Grafana's dashboard schema (@grafana/schema) and tsc, pinned by tests/grafana/package-lock.json, for
# tests/test_dashboard_schema.py; reinstalled only when the lock file changes
GRAFANA_SCHEMA := tests/grafana/node_modules/.installed

# The Kubernetes control plane of the end-to-end tests (tests/kube): kube-apiserver, kube-controller-manager and
# etcd pinned by controlplane/go.mod (k8s.io/kubernetes v1.36.3, etcd v3.6.8), the training operator at the
# release our manifests target. Built once into $(CP_DIR); rebuilt when a pin changes.
OPERATOR_MODULE := github.com/kubeflow/training-operator
OPERATOR_VERSION := v1.9.4
CP_DIR := build/controlplane
CP_STAMP := $(CP_DIR)/.built-$(OPERATOR_VERSION)
KUBE_LDFLAGS := -s -w -X k8s.io/component-base/version.gitVersion=v1.36.3 \
  -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=36
# The node of the end-to-end tests: kubelet, kube-scheduler and kubectl from the same pinned k8s.io/kubernetes
# (controlplane/go.mod), CoreDNS pinned by its own module controlplane/coredns/go.mod (keep COREDNS_VERSION equal).
COREDNS_VERSION := v1.15.0
NODE_STAMP := $(CP_DIR)/.built-node-v1.36.3-coredns-$(COREDNS_VERSION)
# Kubeflow Trainer v2's controller manager and JobSet at the version Trainer's go.mod requires, from one wrapper module
# (controlplane/trainer/go.mod), so both build against the dependency versions Trainer's go.mod selects; their CRDs
# and webhook configurations (kustomized by the kubectl built above) next to them in $(CP_DIR)/trainer.
TRAINER_VERSION := v2.3.0
JOBSET_VERSION := v0.12.0
TRAINER_STAMP := $(CP_DIR)/.built-trainer-$(TRAINER_VERSION)-jobset-$(JOBSET_VERSION)

.PHONY: demo test test-fast install clean controlplane node trainer image docs

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

$(GRAFANA_SCHEMA): tests/grafana/package.json tests/grafana/package-lock.json
	npm ci --prefix tests/grafana --no-audit --no-fund
	touch $@

$(CP_STAMP): controlplane/go.mod controlplane/go.sum
	@echo "building the control plane (kube-apiserver, kube-controller-manager, etcd, training operator $(OPERATOR_VERSION)) into $(CP_DIR); once, a few minutes"
	mkdir -p $(CP_DIR)/bin $(CP_DIR)/operator
	cd controlplane && GOTOOLCHAIN=local GOFLAGS=-buildvcs=false $(GO) build -p 2 -trimpath -ldflags "$(KUBE_LDFLAGS)" \
	  -o ../$(CP_DIR)/bin/ k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager
	cd controlplane && GOTOOLCHAIN=local GOFLAGS=-buildvcs=false $(GO) build -p 2 -trimpath -ldflags "-s -w" \
	  -o ../$(CP_DIR)/bin/etcd go.etcd.io/etcd/server/v3
	GOBIN=$(abspath $(CP_DIR))/bin GOTOOLCHAIN=local GOFLAGS=-buildvcs=false $(GO) install -p 2 -trimpath -ldflags "-s -w" \
	  $(OPERATOR_MODULE)/cmd/training-operator.v1@$(OPERATOR_VERSION)
	dir=$$(GOTOOLCHAIN=local $(GO) mod download -json $(OPERATOR_MODULE)@$(OPERATOR_VERSION) | $(PYTHON) -c 'import json,sys; print(json.load(sys.stdin)["Dir"])') \
	  && cp $$dir/manifests/base/crds/kubeflow.org_pytorchjobs.yaml $(CP_DIR)/operator/ \
	  && cp $$dir/manifests/base/webhook/manifests.yaml $(CP_DIR)/operator/webhook.yaml \
	  && chmod u+w $(CP_DIR)/operator/*.yaml
	du -sh $(CP_DIR)/bin
	touch $@

controlplane: $(CP_STAMP)

$(NODE_STAMP): controlplane/go.mod controlplane/go.sum controlplane/coredns/go.mod controlplane/coredns/go.sum
	@echo "building the node (kubelet, kube-scheduler, kubectl v1.36.3, coredns $(COREDNS_VERSION)) into $(CP_DIR); once, a few minutes"
	grep -q '^require github.com/coredns/coredns $(COREDNS_VERSION)$$' controlplane/coredns/go.mod
	mkdir -p $(CP_DIR)/bin
	cd controlplane && GOTOOLCHAIN=local GOFLAGS=-buildvcs=false $(GO) build -p 2 -trimpath -ldflags "$(KUBE_LDFLAGS)" \
	  -o ../$(CP_DIR)/bin/ k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl
	cd controlplane/coredns && GOTOOLCHAIN=local GOFLAGS=-buildvcs=false $(GO) build -p 2 -trimpath -ldflags "-s -w" \
	  -o ../../$(CP_DIR)/bin/coredns github.com/coredns/coredns
	du -sh $(CP_DIR)/bin
	touch $@

node: $(NODE_STAMP)

$(TRAINER_STAMP): controlplane/trainer/go.mod controlplane/trainer/go.sum $(NODE_STAMP)
	@echo "building Kubeflow Trainer $(TRAINER_VERSION) and JobSet $(JOBSET_VERSION) into $(CP_DIR); once, a few minutes"
	grep -q 'github.com/kubeflow/trainer/v2 $(TRAINER_VERSION)$$' controlplane/trainer/go.mod
	grep -q 'sigs.k8s.io/jobset $(JOBSET_VERSION)$$' controlplane/trainer/go.mod
	mkdir -p $(CP_DIR)/bin $(CP_DIR)/trainer
	cd controlplane/trainer && GOTOOLCHAIN=local GOFLAGS=-buildvcs=false $(GO) build -p 2 -trimpath -ldflags "-s -w" \
	  -o ../../$(CP_DIR)/bin/ github.com/kubeflow/trainer/v2/cmd/trainer-controller-manager sigs.k8s.io/jobset
	cd controlplane/trainer && t=$$(GOTOOLCHAIN=local $(GO) list -m -f '{{.Dir}}' github.com/kubeflow/trainer/v2) \
	  && j=$$(GOTOOLCHAIN=local $(GO) list -m -f '{{.Dir}}' sigs.k8s.io/jobset) && out=../../$(CP_DIR)/trainer \
	  && cp $$t/manifests/base/crds/trainer.kubeflow.org_*.yaml $$j/config/components/crd/bases/jobset.x-k8s.io_jobsets.yaml $$out/ \
	  && ../../$(CP_DIR)/bin/kubectl kustomize $$t/manifests/base/webhook > $$out/trainer-webhooks.yaml \
	  && ../../$(CP_DIR)/bin/kubectl kustomize $$j/config/components/webhook > $$out/jobset-webhooks.yaml \
	  && chmod u+w $$out/*.yaml
	du -sh $(CP_DIR)/bin/trainer-controller-manager $(CP_DIR)/bin/jobset
	touch $@

trainer: $(TRAINER_STAMP)

# The images of the end-to-end tests' node (tests/node/image.sh): dcv2-k8s:test (docker/Dockerfile on a local
# debootstrap bookworm + torch base) and the pause image, built by a dockerd of its own and imported into the node's
# containerd store (/var/lib/dcv2-k8s-test); needs root. Cold a while; a second run only checks (seconds).
image:
	tests/node/image.sh

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m dcv2_k8s demo --out $(DEMO_OUT)

test: $(STAMP) $(COMPAT)/.installed $(TRAINER_CRDS)/.installed $(GRAFANA_SCHEMA) $(CP_STAMP) $(NODE_STAMP) $(TRAINER_STAMP) image
	$(PY) -m pytest -q -ra --durations=15

test-fast: $(STAMP) $(COMPAT)/.installed $(TRAINER_CRDS)/.installed $(GRAFANA_SCHEMA)
	$(PY) -m pytest -q -m "not slow"

# the documentation site (mkdocs.yml, docs/), strict: a broken link or anchor, or a page left out of the nav, fails it
docs: $(STAMP)
	$(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf $(DEMO_OUT) runs .pytest_cache site
