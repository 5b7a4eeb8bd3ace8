# The two commands of the README: `make demo` (the main job) and `make test` (the suite); beside them
# `make check` (the fast unit tests) and `make docs` (the documentation site).
# Each creates .venv, installs the package with its test extras and the real data when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test check docs results-pages install data bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST ships in Debian's dataset-fashion-mnist; elsewhere set SMI_FASHION_MNIST_DIR.
data:
	@if [ -n "$$SMI_FASHION_MNIST_DIR" ] || [ -f $(FASHION_MNIST) ]; then :; \
	elif command -v apt-get >/dev/null; then \
		$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist; \
	else echo "Fashion-MNIST missing: set SMI_FASHION_MNIST_DIR to a folder of its four IDX .gz files"; exit 1; fi

demo: install data
	OMP_WAIT_POLICY=PASSIVE $(PY) examples/demo.py --out outputs/demo

test: install data
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15

# The unit tests without the slow end-to-end ones: about a minute on 2 cores.
check: install data
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q -n 2 -m "not slow"

# The documentation site (mkdocs-material + mkdocstrings), built strictly: a broken link or reference fails.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d outputs/site

# The docs' results pages, from the JSON records in benchmarks/results/.
results-pages: install
	$(PY) benchmarks/results_pages.py

bench: install
	$(PY) benchmarks/inversion_speed.py --quick --json outputs/bench.json

clean:
	rm -rf outputs .pytest_cache
