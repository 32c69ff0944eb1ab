# converge: the two commands of the README, and the rest of the developer loop.
#   make demo               install deps, build, run `converge demo`
#   make test               install deps, build, run every CTest test
#   make check-sanitizers   unit and e2e tests under ASan+UBSan, then under TSan
#   make bench              benchmarks (not tests): prints rates and ratios
BUILD ?= build
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
CMAKE_FLAGS ?= -DCMAKE_BUILD_TYPE=RelWithDebInfo

.PHONY: all deps configure build demo test check-sanitizers bench clean

all: build

deps:
	@bash scripts/install-deps.sh

$(BUILD)/CMakeCache.txt:
	cmake -S . -B $(BUILD) $(CMAKE_FLAGS)

configure: deps $(BUILD)/CMakeCache.txt

build: configure
	cmake --build $(BUILD) -j $(JOBS)

demo: build
	$(BUILD)/converge demo $(DEMO_ARGS)

# PostgreSQL tests (label pg) run against a throwaway server that the script starts and
# stops around ctest.
test: build
	bash scripts/with-postgres.sh bash -c 'cd $(BUILD) && ctest --output-on-failure -j $(JOBS) --timeout 600'


check-sanitizers: deps
	cmake -S . -B $(BUILD)-asan -DCMAKE_BUILD_TYPE=Debug -DCONVERGE_SANITIZE=address -DCONVERGE_BUILD_BENCH=OFF
	cmake --build $(BUILD)-asan -j $(JOBS) --target converge_unit_tests converge_e2e_tests converge_contract_tests
	cd $(BUILD)-asan && ctest -L 'unit|e2e' -E 'e2e.demo' --output-on-failure -j $(JOBS)
	cmake -S . -B $(BUILD)-tsan -DCMAKE_BUILD_TYPE=Debug -DCONVERGE_SANITIZE=thread -DCONVERGE_BUILD_BENCH=OFF
	cmake --build $(BUILD)-tsan -j $(JOBS) --target converge_unit_tests converge_e2e_tests converge_contract_tests
	cd $(BUILD)-tsan && TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1" ctest -L 'unit|e2e' -E 'e2e.demo' --output-on-failure -j $(JOBS)

bench: build
	$(BUILD)/bench/converge_bench $(BENCH_ARGS)
	bash bench/http_bench.sh $(BUILD) $(HTTP_BENCH_SECONDS)
	bash bench/pg_bench.sh $(BUILD) $(PG_BENCH_SECONDS)

clean:
	rm -rf $(BUILD) $(BUILD)-asan $(BUILD)-tsan
