# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test fuzz lint protos install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, by its exact pin: on a CPU-only machine pip finds the local CPU build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m services.cli demo -o out/demo.wav

test: $(STAMP)
	$(PY) -m pytest -q

# Starts its own mesh (tiny model, fixed_frames allowed); exits non-zero if a requirement fails.
fuzz: $(STAMP)
	$(PY) -m services.fuzz --requests 20000

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/buf lint

protos: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH $(VENV)/bin/buf generate

clean:
	rm -rf $(VENV) out
