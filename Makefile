# microcosm developer commands.
CARGO ?= cargo

.PHONY: all build check fmt unit_test test bench bench-build demo clean

# `make` builds the release binary: target/release/microcosm
all: build

build:
	$(CARGO) build --release -p microcosm

check:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --no-deps --workspace

fmt:
	$(CARGO) fmt --all

# The whole test suite: unit tests beside the code and process-level tests in tests/.
# Uses cargo-nextest when installed (parallel, per-test timeouts), cargo test otherwise.
unit_test:
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --workspace --no-fail-fast; \
	else \
		$(CARGO) test --workspace --no-fail-fast; \
	fi

test: unit_test

bench:
	$(CARGO) bench -p microcosm-benches

bench-build:
	$(CARGO) bench -p microcosm-benches --no-run

demo: build
	./target/release/microcosm demo

clean:
	$(CARGO) clean
