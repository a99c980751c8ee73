# Two set-up commands on a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Both build .venv/ first: pinned requirements, ComfyUI's comfy/ package (PyPI notcomfy, repaired), ondevice.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.ondevice-ready

.PHONY: demo test test-comfyui lint venv clean

$(STAMP): requirements/ci.txt pyproject.toml scripts/prepare_notcomfy.py
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements/ci.txt
	@if [ -z "$$COMFYUI_PATH" ]; then \
	  $(VENV)/bin/pip install -q --no-deps notcomfy==0.1.0 && $(VENV)/bin/python scripts/prepare_notcomfy.py; fi
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m ondevice demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

# Style and types: ruff (rules in pyproject.toml) and mypy --strict on ondevice/.
lint: $(STAMP)
	$(VENV)/bin/pip install -q ruff==0.17.6 mypy==2.4.1
	$(VENV)/bin/ruff check ondevice tests examples scripts
	$(VENV)/bin/ruff format --check ondevice tests examples scripts
	$(VENV)/bin/mypy

# The same suite against a ComfyUI checkout: make test-comfyui COMFYUI_PATH=/path/to/ComfyUI
# (uses a separate venv without notcomfy, whose comfy/ package would shadow the checkout's).
test-comfyui:
	@test -n "$(COMFYUI_PATH)" || { echo "set COMFYUI_PATH=/path/to/ComfyUI"; exit 2; }
	$(MAKE) VENV=.venv-comfyui STAMP=.venv-comfyui/.ondevice-ready COMFYUI_PATH=$(COMFYUI_PATH) test

clean:
	rm -rf $(VENV) .venv-comfyui
