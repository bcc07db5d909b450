# avobuild: `make demo` builds the demo product into ./out; `make test` runs the whole suite.
# Both start by installing what they need (Debian host tools, a Python venv).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT ?= out
DEMO_RECIPE := recipes/demo.toml
KEYRING := keys-example/insecure-example.pub.pem
export SOURCE_DATE_EPOCH ?= 1767225600

.PHONY: all setup host-tools venv demo test lint clean

all: demo

host-tools:
	./scripts/setup-host

$(BIN)/avobuild: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

venv: $(BIN)/avobuild

build/debian/vmlinuz:
	./scripts/fetch-kernel build/debian amd64

setup: host-tools venv build/debian/vmlinuz

demo: setup
	$(BIN)/avobuild image $(DEMO_RECIPE) -o $(OUT)
	$(BIN)/avobuild bundle create $(DEMO_RECIPE) -o $(OUT)/demo-full.avb
	$(BIN)/avobuild bundle verify $(OUT)/demo-full.avb --keyring $(KEYRING)
	$(BIN)/avobuild bundle info $(OUT)/demo-full.avb --keyring $(KEYRING)

lint: venv
	$(BIN)/ruff check avobuild tests
	$(BIN)/ruff format --check avobuild tests
	$(BIN)/mypy --strict avobuild

test: setup
	$(BIN)/pytest -q

clean:
	rm -rf $(OUT) build .pytest_cache .mypy_cache .ruff_cache
