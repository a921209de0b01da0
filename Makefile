# The two commands a newcomer needs: `make demo` and `make test`.
# Both create .venv and install the pinned CPU stack on first use (about a minute).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test install

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-test.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-test.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

demo: install
	PYTHON=$(abspath $(PY)) bash tools/demo.sh

test: install
	$(PY) -m pytest -q --durations=15
