# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BASE := $(VENV)/.installed-base
DEV := $(VENV)/.installed-dev
PIP := $(PY) -m pip install --quiet -c constraints.txt

.PHONY: demo test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# The demo needs only the package; tests and lint also need the dev extra (pytest, ruff, mypy, flwr).
$(BASE): pyproject.toml constraints.txt | $(PY)
	$(PIP) -e .
	touch $(BASE)

$(DEV): $(BASE)
	$(PIP) -e ".[dev]"
	touch $(DEV)

demo: $(BASE)
	$(VENV)/bin/mmshield run mmshield/configs/demo.yaml

# pytest exits 5 when it collected no test: that must fail, not pass silently.
test: $(DEV)
	$(PY) -m pytest -q; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$status

lint: $(DEV)
	$(VENV)/bin/ruff check mmshield tests benchmarks scripts
	$(VENV)/bin/ruff format --check mmshield tests benchmarks scripts
	$(VENV)/bin/mypy

bench: $(DEV)
	$(PY) -m benchmarks.simulator

clean:
	rm -rf $(VENV) runs
