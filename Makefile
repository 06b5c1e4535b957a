# Two commands: `make run` (install if needed, then the whole app on 127.0.0.1:8000)
# and `make test` (install what the tests need, then the whole suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: run test install install-dev lint benchmarks clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# torch/torchvision: pip on Python 3.11 takes 2.14.1/0.29.1 from this machine's disk (see README).
$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[embedded,prod]'
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -e '.[embedded,prod,dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

run: install
	$(VENV)/bin/distill serve

test: install-dev
	$(VENV)/bin/ruff check ml_core distill_app tests benchmarks
	DISTILL_DATA_DIR=$(CURDIR)/var/test $(PY) -m pytest -q

lint: install-dev
	$(VENV)/bin/ruff check ml_core distill_app tests benchmarks

clean:
	rm -rf var/test .pytest_cache
