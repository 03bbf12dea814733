# The two commands a newcomer needs:  make run  (whole pipeline)   make test  (test suite)
# Both create .venv and install into it first.  DATA_DIR=../shared/data make run  uses local MNIST files.
PYTHON ?= python3
VENV ?= .venv
DATA_DIR ?= data
SAVE_DIR ?= lightning_logs
BIN := $(VENV)/bin
# Debian packages the tests use: chromium for tests/test_tensorboard.py's browser, postgresql for the studies'
# throw-away database server. Without them (and not root to install them) those tests are skipped.
SYSTEM_PACKAGES := chromium postgresql

.PHONY: install system-deps run test test-fast lint tensorboard clean

# torch/torchvision pinned to the builds this project is tested with; the rest comes from setup.cfg (the extras
# too: the tests run studies on PostgreSQL and the dashboard).
$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev,postgres,dashboard]'
	touch $@

install: $(BIN)/.installed

system-deps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ] || ! command -v apt-get >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	else echo "not installed: $$missing (sudo make system-deps); the tests that need them are skipped"; fi

run: install
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/run_all.sh "$(DATA_DIR)" "$(SAVE_DIR)"

test: install system-deps
	$(BIN)/python -m pytest

test-fast: install system-deps
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

tensorboard: install
	$(BIN)/tensorboard --logdir "$(SAVE_DIR)"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
