# Two commands from a fresh clone: `make run` and `make test`. Each sets up .venv itself.
# Plain `make` lists the targets below (from their `##` comments).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-requirements

.DEFAULT_GOAL := help
.PHONY: help run console test lint bench soak clean

help:  ## list these targets
	@echo "make TARGET, where TARGET is one of:"
	@awk 'BEGIN { FS = ":.*##[ ]*" } /^[a-z][a-z-]*:.*##/ { printf "  %-9s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	@touch $(STAMP)

# When the bot stops with an error (for example exit status 2: no DISCORD_TOKEN), it has already
# printed what to do, and make then adds its own `make: *** [Makefile:NN: run] Error 2` line. GNU make
# prints that line for every failing command and offers no way to fail quietly: the only quiet way
# is to ignore the error, which would make `make run` succeed (exit 0) when the bot did not start.
# A non-zero exit matters more than one line of noise, so the line stays (the README says what it
# means). Make's own exit status is 2 for any failure; `.venv/bin/python -m bot` returns the bot's own.
run: $(STAMP)  ## start the Discord bot (reads .env)
	$(PY) -m bot

console: $(STAMP)  ## chat with the model in this terminal, no Discord needed
	$(PY) -m bot --console

test: $(STAMP)  ## the whole test suite (on a tiny model built at test time), then `make lint`
	$(PY) -m pytest
	@$(MAKE) --no-print-directory lint

lint: $(STAMP)  ## ruff (lint rules and formatting) and mypy; every check runs, any finding fails
	@status=0; \
	$(VENV)/bin/ruff check . || status=1; \
	$(VENV)/bin/ruff format --check . || status=1; \
	$(VENV)/bin/mypy || status=1; \
	exit $$status

bench: $(STAMP)  ## speed and memory benchmark on a full-size random BlenderBot-400M (several minutes)
	$(PY) -m pip install --quiet --disable-pip-version-check "matplotlib>=3.8"  # the chart only
	$(PY) -m bench

soak: $(STAMP)  ## long run through the fake Discord (not part of CI)
	$(PY) -m tests.soak

clean:  ## delete .venv, the tools' caches and the bench's model (bench/.cache, about 1.5 GB)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache bench/.cache
