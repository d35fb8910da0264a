# Two commands from a fresh clone: `make run` and `make test`. Each sets up .venv itself.
# Plain `make` lists the targets below (from their `##` comments).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-requirements
SERVE_STAMP := $(VENV)/.installed-serve-requirements

.DEFAULT_GOAL := help
.PHONY: help run console serve test lint bench bench-models soak docker-test clean

help:  ## list these targets
	@echo "make TARGET, where TARGET is one of:"
	@awk 'BEGIN { FS = ":.*##[ ]*" } /^[a-z][a-z-]*:.*##/ { printf "  %-12s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	@touch $(STAMP)

# requirements-serve.txt (Ray Serve, for python -m bot.serve) is not needed to run the bot; the tests
# and the type checks install it, so the server's tests always run.
$(SERVE_STAMP): $(STAMP) requirements-serve.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-serve.txt
	@touch $(SERVE_STAMP)

# Exit status 2 is the bot's "a setting needs fixing" (no DISCORD_TOKEN, a bad value): it has printed
# what to do, so these targets end there quietly instead of adding make's `*** Error 2` line, which
# reads as a crash. Any other failure passes through. Scripts that need the exact status run
# `.venv/bin/python -m bot` themselves.
BOT_EXIT := status=$$?; [ $$status -eq 2 ] || exit $$status

run: $(STAMP)  ## start the Discord bot (reads .env)
	@$(PY) -m bot || { $(BOT_EXIT); }

console: $(STAMP)  ## chat with the model in this terminal, no Discord needed
	@$(PY) -m bot --console || { $(BOT_EXIT); }

serve: $(SERVE_STAMP)  ## serve the model to bots over HTTP (Ray Serve; see docs/deployment.md)
	@$(PY) -m bot.serve || { $(BOT_EXIT); }

test: $(SERVE_STAMP)  ## the whole test suite (on a tiny model built at test time), then `make lint`
	$(PY) -m pytest
	@$(MAKE) --no-print-directory lint

lint: $(SERVE_STAMP)  ## ruff (lint rules and formatting) and mypy; every check runs, any finding fails
	@status=0; \
	$(VENV)/bin/ruff check . || status=1; \
	$(VENV)/bin/ruff format --check . || status=1; \
	$(VENV)/bin/mypy || status=1; \
	exit $$status

bench: $(STAMP)  ## speed and memory: engine vs naive, full-size random BlenderBot and Qwen2.5 (about 12 min)
	$(PY) -m pip install --quiet --disable-pip-version-check "matplotlib>=3.8"  # the chart only
	$(PY) -m bench

bench-models: $(STAMP)  ## memory and reply speed of four models, for choosing one (about 17 min)
	$(PY) -m bench.choose_model

soak: $(SERVE_STAMP)  ## long runs through the fake Discord: one bot, then 2 shards+PostgreSQL+Ray Serve (not in CI)
	@status=0; \
	$(PY) -m tests.soak || status=1; \
	$(PY) -m tests.soak --topology scaled || status=1; \
	exit $$status

# Not part of `make test`, which must not need Docker. Starts dockerd itself when none runs (as root),
# and makes the debian:bookworm-slim base image with debootstrap when it cannot be pulled.
docker-test: $(STAMP)  ## build the Docker image, run the bot in it against the fake Discord, stop it (needs Docker)
	$(PY) -m tests.docker_check

clean:  ## delete .venv, the tools' caches and the bench's models (bench/.cache, up to 7.3 GB)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache bench/.cache
