# Single entry point: `make demo` and `make test` set themselves up on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CORE: the library and its data pipeline, enough for `make demo`;
# STAMP: everything `make test` needs: CORE, torch and the reference libraries.
CORE := $(VENV)/.installed-core
STAMP := $(VENV)/.installed
# pip byte-compiles what it installs file by file on one core (~50 s of the setup here);
# installing with --no-compile and compiling on every core afterwards gives the same .pyc
# files in ~25 s. Without them each process would compile TF, JAX and torch from source
# whenever PYTHONDONTWRITEBYTECODE is set. (compileall exits 1 on the few Python 2 files some
# packages ship as test data; pip skips those too.)
# The files no process of the project imports are left out of that pass (a third of its
# time, ~10 s): the packages' own test suites, pip, and the transformers models other than
# those the tests compare conversions with. A module left out still imports (compiled in
# memory each time).
NOT_IMPORTED := /tests?/|/site-packages/pip/|/transformers/models/(?!__init__|auto/|clip/|siglip|dinov2|encoder_decoder/|vit/)
COMPILE := $(BIN)/python -m compileall -q -j 0 -x '$(NOT_IMPORTED)' $(VENV)/lib > /dev/null 2>&1 || true
PIP := $(BIN)/pip install -q --no-compile
# The project itself, editable, built with the venv's own setuptools (installed first, in
# VENV_BOOTSTRAP) instead of in a fresh isolated build environment: 1.3 s instead of 3.4.
EDITABLE := --no-build-isolation -e
export TF_CPP_MIN_LOG_LEVEL := 3
export PYTHONUNBUFFERED := 1

.PHONY: setup test test-quick demo benchmark lint clean

setup: $(STAMP)

# The venv and its installer, shared by both stamps.
define VENV_BOOTSTRAP
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) -U pip "setuptools<81" wheel
endef

$(CORE): pyproject.toml Makefile
	$(VENV_BOOTSTRAP)
	$(PIP) $(EDITABLE) ".[data]"
	$(COMPILE)
	touch $(CORE)

# Everything in one go rather than on top of $(CORE): one byte-compilation pass over the
# venv instead of two (each pass re-reads every file it compiled before) and one install
# of the project: ~10 s less of a fresh `make test`. It leaves $(CORE) done as well.
$(STAMP): pyproject.toml Makefile
	$(VENV_BOOTSTRAP)
	# CPU torch for the conversion tools and their tests, never the CUDA build (an
	# unpinned or plain `torch==X` from the registry is the multi-GB CUDA one). Here the
	# CPU wheel exists for Python 3.11; elsewhere it is skipped, and so are the tests
	# that need it.
	-$(PIP) "torch==2.13.0+cpu"
	$(PIP) $(EDITABLE) ".[data,convert-notorch,test]"
	# open_clip / timm / clip declare torchvision (no CPU build here): reference
	# models for the conversion tests only need their model code.
	-$(PIP) --no-deps open_clip_torch timm clip-anytorch
	$(COMPILE)
	touch $(CORE) $(STAMP)

# Two workers (pytest-xdist; a module's tests stay on one worker, so its shared fixtures
# are built once); tests/conftest.py gives the run one XLA compilation cache.
PYTEST := $(BIN)/python -m pytest -q -ra -n 2 --dist loadfile

test: $(STAMP)
	$(PYTEST) --durations=15 tests

test-quick: $(STAMP)
	$(PYTEST) -m "not slow" tests

demo: $(CORE)
	$(BIN)/python -m projects.moving_digits.demo

benchmark: $(CORE)
	$(BIN)/python -m benchmarks.step_benchmark --config configs/tiny.py

lint: $(STAMP)
	$(BIN)/python -m ruff check aim_jax data_pipelines configs benchmarks projects launch tests

clean:
	rm -rf $(VENV) demo_workdir
