# Every target installs what a fresh Debian/Ubuntu machine lacks before building.
# A persistent target directory keeps RocksDB's C++ build (8-14 min) across runs.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/idem-target
CARGO ?= cargo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Debian packages the build and the tests need.
# prometheus brings promtool, which checks the alert rules and the dashboard's queries.
APT_PACKAGES := libclang-dev clang pkg-config build-essential prometheus

.PHONY: deps build release test demo lint fmt clean

deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust from rustup.rs"; exit 1; }

build: deps
	$(CARGO) build --workspace --all-targets

# The test suite: unit, property and storage tests, and integration tests that start
# real `idem server` processes on loopback.
# Every target builds with the same workspace-wide feature set (`--workspace` with test
# targets), so RocksDB's C++ is compiled once, not once per cargo invocation.
test: deps
	$(CARGO) test --workspace -- --test-threads=2

# A 3-node local cluster with a short example; serves until Ctrl-C.
demo: deps
	$(CARGO) build --workspace --all-targets
	$(CARGO_TARGET_DIR)/debug/idem demo

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all
