# Two commands do all the set-up on a fresh machine:
#   make run    create .venv, install, start the app on http://localhost:8501
#   make test   install the test tools and Chromium too, then run the whole suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test install install-test chromium lint gpu-test

$(BIN)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

$(BIN)/.installed-test: requirements-test.txt $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -r requirements-test.txt
	touch $@

install: $(BIN)/.installed

install-test: $(BIN)/.installed-test chromium

# The emoji font makes page icons render in screenshots as they do in a user's browser.
chromium:
	@command -v chromium >/dev/null && [ -d /usr/share/fonts/truetype/noto ] || \
		($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium chromium-driver fonts-noto-color-emoji)

run: install
	$(BIN)/streamlit run Home.py --server.port 8501

lint: $(BIN)/.installed-test
	$(BIN)/ruff check .

# pytest exits 5 when it collected nothing: that is a failure too.
test: install-test lint
	HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

# On a CUDA machine (the device tool runs this there): only the GPU tests, only from the files that have them,
# so that the GPU machine needs no streamlit (page tests import it).
GPU_TEST_FILES = $(shell grep -l "pytest.mark.gpu" tests/test_*.py)
gpu-test:
	HF_HUB_OFFLINE=1 python3 -m pytest -m gpu -p no:cacheprovider -s $(GPU_TEST_FILES) $(PYTEST_ARGS)
