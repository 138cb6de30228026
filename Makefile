# pacs-agent: the two commands of the quick start are `make demo` and `make test`.
# Everything is installed into .venv; the Debian packages the tests need are
# installed with apt-get when they are missing.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.pacs-agent-installed
TORCH_VERSION := 2.13.0
PYTEST_ARGS ?=
DEBIAN_PACKAGES := dcmtk:storescu dicom3tools:dciodvfy orthanc:Orthanc

.PHONY: install system-deps test lint demo clean benchmark-ingest

install: system-deps $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# pyradiomics 3.x has no wheel for Python 3.11: it is built here without build
# isolation, after numpy and its build helpers are in the venv.  torch is pinned
# to the local CPU build so that pip does not fetch several GB of CUDA wheels.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel versioneer
	$(BIN)/pip install --quiet numpy "torch==$(TORCH_VERSION)"
	$(BIN)/pip install --quiet --no-build-isolation "pyradiomics>=3.0.1"
	$(BIN)/pip install --quiet -e ".[test]" "torch==$(TORCH_VERSION)"
	touch $(STAMP)

# Installs the DICOM tools the tests talk to (DCMTK, dicom3tools, Orthanc).
# Installing orthanc starts no daemon here: the tests start their own.
system-deps:
	@missing=""; \
	for pair in $(DEBIAN_PACKAGES); do \
	  pkg=$${pair%%:*}; cmd=$${pair##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || [ -x /usr/sbin/$$cmd ] || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

lint: install
	$(BIN)/ruff check .

test: install
	$(BIN)/ruff check .
	$(BIN)/pytest $(PYTEST_ARGS)

demo: install
	$(BIN)/pacs-agent demo --out demo-output

benchmark-ingest: install
	$(BIN)/python benchmarks/ingest.py

clean:
	rm -rf $(VENV) demo-output pacs-agent-state .pytest_cache .ruff_cache
