# Two commands from a fresh clone: `make run` and `make test`. Each sets up .venv itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-requirements

.PHONY: run console test bench soak clean

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	@touch $(STAMP)

run: $(STAMP)  ## start the Discord bot (reads .env)
	$(PY) -m bot

console: $(STAMP)  ## chat with the model in this terminal, no Discord needed
	$(PY) -m bot --console

test: $(STAMP)  ## the whole test suite, on a tiny model built at test time
	$(PY) -m pytest

bench: $(STAMP)  ## speed and memory benchmark on a full-size random BlenderBot-400M
	$(PY) -m pip install --quiet --disable-pip-version-check "matplotlib>=3.8"  # the chart only
	$(PY) -m bench

soak: $(STAMP)  ## long run through the fake Discord (not part of CI)
	$(PY) -m tests.soak

clean:
	rm -rf $(VENV) .pytest_cache bench/.cache
