# callbridge: every target that needs Python makes .venv/ first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The test suite runs as this many pytest processes side by side (tests/shards.py).
TEST_PARTS ?= 3

.PHONY: venv demo test run bench lint typecheck standin clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

## The main job: stand-in switch + daemon + SQLite, one real call placed through the HTTP API.
demo: venv
	$(PY) -m scripts.demo

## The whole suite (lint, types, unit, integration, fault tests).
test: venv
	$(PY) -m ruff check daemon webapi freeswitch scripts bench tests
	$(PY) -m mypy daemon webapi freeswitch scripts bench
	$(PY) -m tests.shards $(TEST_PARTS) -q -p no:cacheprovider

## Run the service (config file: make run CONFIG=/etc/callbridge/callbridge.toml, or $CALLBRIDGE_CONFIG; neither: defaults, ./state).
run: venv
	$(PY) -m daemon run $(if $(CONFIG),--config $(CONFIG),)

## The FreeSWITCH stand-in on its own, at real speed.
standin: venv
	$(PY) -m freeswitch.standin --host 127.0.0.1 --port 8021 --password ClueCon --time-scale 1.0

bench: venv
	$(PY) -m bench

lint: venv
	$(PY) -m ruff check daemon webapi freeswitch scripts tests bench

clean:
	rm -rf $(VENV) .state build *.egg-info
