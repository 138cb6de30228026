# pacs-agent: the two commands of the quick start are `make demo` and `make test`.
# Everything is installed into .venv; the Debian packages the tests need are
# installed with apt-get when they are missing.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.pacs-agent-installed
TORCH_VERSION := 2.13.0
# Two pytest workers; a module's tests stay on one worker (its shared node / Orthanc fixtures).
PYTEST_ARGS ?= -n 2 --dist loadscope
DEBIAN_PACKAGES := dcmtk:storescu dicom3tools:dciodvfy orthanc:Orthanc systemd:systemd-analyze \
  orthanc-dicomweb:/usr/share/orthanc/plugins/libOrthancDicomWeb.so chromium:chromium nodejs:node npm:npm

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
	$(BIN)/pip install --quiet -e ".[test,postgres]" "torch==$(TORCH_VERSION)"
	touch $(STAMP)

# Installs the DICOM tools the tests talk to (DCMTK, dicom3tools, Orthanc and its DICOMweb plugin)
# and, for the viewer test, Chromium and Node.js/npm (OHIF itself comes from npm at test time).
# Installing orthanc starts no daemon here: the tests start their own.
system-deps:
	@missing=""; \
	for pair in $(DEBIAN_PACKAGES); do \
	  pkg=$${pair%%:*}; cmd=$${pair##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || [ -x /usr/sbin/$$cmd ] || [ -e "$$cmd" ] || missing="$$missing $$pkg"; \
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
	$(BIN)/mypy pacs_agent inference dicom_sr
	$(BIN)/pytest $(PYTEST_ARGS)

demo: install
	$(BIN)/pacs-agent demo --out demo-output

benchmark-ingest: install
	$(BIN)/python benchmarks/ingest.py

# The benchmarks of the README's Benchmarks section, one after the other (each under ~10 min).
# Run them on an otherwise idle machine: each compares pacs-agent with a peer in the same run.
.PHONY: benchmarks
benchmarks: install
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/latency.py
	$(BIN)/python benchmarks/memory.py
	$(BIN)/python benchmarks/memory_receive.py
	$(BIN)/python benchmarks/ingest_under_load.py
	$(BIN)/python benchmarks/inference.py
	$(BIN)/python benchmarks/response.py

# The fault soak (not part of `make test`): ~10 min of studies from 4 senders while the worker, serve and
# Orthanc are SIGKILLed and the disk fills; then checks that nothing acknowledged was lost and every study
# and result went through exactly once. Mounts a tmpfs when run as root. Writes benchmarks/results/soak.json.
.PHONY: soak
soak: install
	$(BIN)/python benchmarks/soak.py

# Retrains the committed demo packages config/models/* from scratch (planted-label phantoms, fixed
# seeds, CPU, two trainings at a time) and copies their held-out ROC plots to docs/images/.
.PHONY: demo-models
demo-models: install
	$(BIN)/python -m inference.training.demo --jobs 2

clean:
	rm -rf $(VENV) demo-output pacs-agent-state .pytest_cache .ruff_cache .mypy_cache

# Production install on a Debian server with systemd, as root (docs/operations.md): a venv under
# $(PREFIX), the systemd units, the pacs-agent user, /var/lib/pacs-agent (0700) and a first
# /etc/pacs-agent/pacs-agent.toml (an existing one is kept). Nothing is enabled or started.
# Running it again upgrades the code in place; the schema is migrated when the service starts.
PREFIX ?= /opt/pacs-agent
UNIT_DIR ?= /etc/systemd/system

.PHONY: install-system
install-system:
	@test "$$(id -u)" = 0 || { echo "install-system must run as root"; exit 1; }
	$(PYTHON) -m venv $(PREFIX)/venv
	$(PREFIX)/venv/bin/pip install --quiet --upgrade pip setuptools wheel versioneer
	$(PREFIX)/venv/bin/pip install --quiet numpy "torch==$(TORCH_VERSION)"
	$(PREFIX)/venv/bin/pip install --quiet --no-build-isolation "pyradiomics>=3.0.1"
	$(PREFIX)/venv/bin/pip install --quiet ".[postgres]" "torch==$(TORCH_VERSION)"
	install -d -m 0755 $(PREFIX)/share/doc/pacs-agent
	install -m 0644 docs/operations.md config/pacs-agent.toml \
	  systemd/pacs-agent-scp.service.d/low-port.conf.example $(PREFIX)/share/doc/pacs-agent/
	install -d -m 0755 $(UNIT_DIR) /etc/sysusers.d /etc/tmpfiles.d
	install -m 0644 systemd/pacs-agent-scp.service systemd/pacs-agent-worker@.service systemd/pacs-agent-console.service \
	  systemd/pacs-agent.target $(UNIT_DIR)/
	install -m 0644 systemd/sysusers.d/pacs-agent.conf /etc/sysusers.d/pacs-agent.conf
	install -m 0644 systemd/tmpfiles.d/pacs-agent.conf /etc/tmpfiles.d/pacs-agent.conf
	systemd-sysusers /etc/sysusers.d/pacs-agent.conf
	systemd-tmpfiles --create /etc/tmpfiles.d/pacs-agent.conf
	@if [ -e /etc/pacs-agent/pacs-agent.toml ]; then \
	  echo "kept the existing /etc/pacs-agent/pacs-agent.toml"; \
	else \
	  sed 's|^state_dir = "pacs-agent-state"|state_dir = "/var/lib/pacs-agent"|' config/pacs-agent.toml \
	    > /etc/pacs-agent/pacs-agent.toml && \
	  chown root:pacs-agent /etc/pacs-agent/pacs-agent.toml && chmod 0640 /etc/pacs-agent/pacs-agent.toml && \
	  echo "wrote /etc/pacs-agent/pacs-agent.toml"; \
	fi
	systemctl daemon-reload || echo "systemctl daemon-reload failed: is systemd running?"
	@echo "next: edit /etc/pacs-agent/pacs-agent.toml, check it with"
	@echo "  runuser -u pacs-agent -- $(PREFIX)/venv/bin/pacs-agent config check --config /etc/pacs-agent/pacs-agent.toml"
	@echo "then: systemctl enable --now pacs-agent-scp.service pacs-agent-worker@cpu0.service pacs-agent.target"
