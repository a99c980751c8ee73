# Developing ondevice. Two set-up commands on a fresh machine: `make demo` (the main job) and `make test`
# (the suite on every ComfyUI version of the matrix; what CI runs). Users install with pip (see README.md).
#
# Venvs (git-ignored, built on first use):
#   .venv          torch (CPU) + ComfyUI's comfy/ from PyPI's notcomfy (ComfyUI 2024-11), repaired
#   .venv-comfyui  the same without notcomfy, plus what newer ComfyUI imports; used with COMFYUI_PATH
# Both get tests/standins/ (torchvision and torchaudio stand-ins) on their path through a .pth file.
# ComfyUI snapshots from ../shared/comfyui/ are extracted into .cache/comfyui/ (git-ignored).
PY ?= python3
SHARED ?= $(CURDIR)/../shared
SNAPSHOTS := 0.3.64 0.3.75 0.33.0
STANDINS := $(CURDIR)/tests/standins
PYTEST_ARGS ?= -q

.PHONY: demo test test-fast test-notcomfy test-comfyui $(addprefix test-,$(SNAPSHOTS)) lint venv clean

define make_venv
	rm -rf $(1)
	$(PY) -m venv $(1)
	$(1)/bin/pip install -q -r $(2)
	echo "$(STANDINS)" > "$$($(1)/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/ondevice-test-standins.pth"
endef

.venv/.ondevice-ready: requirements/ci.txt pyproject.toml scripts/prepare_notcomfy.py
	$(call make_venv,.venv,requirements/ci.txt)
	.venv/bin/pip install -q --no-deps notcomfy==0.1.0
	.venv/bin/python scripts/prepare_notcomfy.py
	.venv/bin/pip install -q --no-deps -e .
	touch $@

.venv-comfyui/.ondevice-ready: requirements/ci.txt requirements/comfyui.txt requirements/server.txt pyproject.toml
	$(call make_venv,.venv-comfyui,requirements/comfyui.txt)
	.venv-comfyui/bin/pip install -q --no-deps -e .
	touch $@

.cache/comfyui/comfyui-%/.extracted: $(SHARED)/comfyui/comfyui-%.tar.gz
	mkdir -p .cache/comfyui
	rm -rf .cache/comfyui/comfyui-$*
	tar -xzf $< -C .cache/comfyui
	touch $@

venv: .venv/.ondevice-ready

demo: .venv/.ondevice-ready
	.venv/bin/python -m ondevice demo

# The whole matrix, one suite per ComfyUI version, then a table of the results.
test: .venv/.ondevice-ready .venv-comfyui/.ondevice-ready $(foreach v,$(SNAPSHOTS),.cache/comfyui/comfyui-$(v)/.extracted)
	.venv/bin/python scripts/test_matrix.py --pytest-args="$(PYTEST_ARGS)" \
	  notcomfy=.venv/bin/python \
	  $(foreach v,$(SNAPSHOTS),$(v)=.venv-comfyui/bin/python@.cache/comfyui/comfyui-$(v))

# The fast tier: no ComfyUI, no fake GPU (the residency table on stub parts, input checks); seconds.
test-fast: .venv/.ondevice-ready
	.venv/bin/python -m pytest $(PYTEST_ARGS) tests/fast

test-notcomfy: .venv/.ondevice-ready
	.venv/bin/python -m pytest $(PYTEST_ARGS)

$(addprefix test-,$(SNAPSHOTS)): test-%: .venv-comfyui/.ondevice-ready .cache/comfyui/comfyui-%/.extracted
	COMFYUI_PATH=$(CURDIR)/.cache/comfyui/comfyui-$* .venv-comfyui/bin/python -m pytest $(PYTEST_ARGS)

# The suite against your own ComfyUI checkout: make test-comfyui COMFYUI_PATH=/path/to/ComfyUI
test-comfyui: .venv-comfyui/.ondevice-ready
	@test -n "$(COMFYUI_PATH)" || { echo "set COMFYUI_PATH=/path/to/ComfyUI"; exit 2; }
	COMFYUI_PATH=$(COMFYUI_PATH) .venv-comfyui/bin/python -m pytest $(PYTEST_ARGS)

# Style and types: ruff (rules in pyproject.toml) and mypy --strict on ondevice/.
lint: .venv/.ondevice-ready
	.venv/bin/pip install -q ruff==0.17.6 mypy==2.4.1
	.venv/bin/ruff check ondevice tests examples scripts
	.venv/bin/ruff format --check ondevice tests examples scripts
	.venv/bin/mypy

clean:
	rm -rf .venv .venv-comfyui .cache/comfyui .cache/install-test
