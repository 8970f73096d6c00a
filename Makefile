# The two commands of the README: `make run` and `make test`. Everything else is a helper of theirs.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEBIAN_TOOLS := storescu:dcmtk echoscu:dcmtk storescp:dcmtk dciodvfy:dicom3tools Orthanc:orthanc gdcmscu:libgdcm-tools
# files (not commands) the tests need, as path:package; a path may be a glob. PostgreSQL's
# server binaries are off PATH on Debian (/usr/lib/postgresql/<version>/bin): the tests start
# their own throw-away servers with them (tests/helpers/postgres.py), never the package's cluster
DEBIAN_FILES := /usr/share/orthanc/plugins/libOrthancDicomWeb.so:orthanc-dicomweb \
	/usr/lib/postgresql/*/bin/initdb:postgresql
PYTEST_ARGS ?= -n 2

.PHONY: run test install test-deps lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	# torch==2.13.0 (CPU build) comes from this machine's wheel cache; nothing may pull a newer one.
	$(BIN)/pip install --quiet -e '.[training,dev]'
	touch $(STAMP)

install: $(STAMP)

## make run: install into .venv and start the node on the embedded defaults (port 11112, metrics 9100).
run: $(STAMP)
	$(BIN)/dicom-node serve

## make test: install what the tests need (Debian peers too), run the linters (ruff, mypy, the
## import contracts of pyproject.toml) and then the whole suite.
test: $(STAMP) test-deps lint
	$(BIN)/dicom-node rules test --rules rules
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-deps:
	@missing=""; for pair in $(DEBIAN_TOOLS); do \
	  tool=$${pair%%:*}; pkg=$${pair##*:}; \
	  if ! command -v $$tool >/dev/null && ! test -x /usr/sbin/$$tool; then missing="$$missing $$pkg"; fi; \
	done; \
	for pair in $(DEBIAN_FILES); do \
	  file=$${pair%%:*}; pkg=$${pair##*:}; \
	  if ! compgen -G "$$file" >/dev/null; then missing="$$missing $$pkg"; fi; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$(echo $$missing | tr ' ' '\n' | sort -u); \
	fi

## make lint: what `make test` runs before the tests; the import contracts are DESIGN.md's rooms.
lint: $(STAMP)
	$(BIN)/ruff check dicom_node training tests bench
	$(BIN)/mypy dicom_node training
	$(BIN)/lint-imports

bench: $(STAMP) test-deps
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) var .pytest_cache
