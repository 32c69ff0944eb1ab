# converge: the two commands of the README, and the rest of the developer loop.
#   make demo               install deps, build, run `converge demo`
#   make test               install deps, build, run every CTest test
#   make check-sanitizers   unit and e2e tests under ASan+UBSan, then under TSan; the NATS
#                           tests (without PostgreSQL and chaos) under ASan+UBSan too
#   make chaos              the chaos campaign: CHAOS_KILLS (default 1000) kills on SQLite,
#                           then on PostgreSQL (a throwaway server); CHAOS_SEED picks the seed
#   make chaos-nats         the same over NATS JetStream (--broker nats), on each store;
#                           CHAOS_NATS_NODES=3 on a 3-node cluster (default 1)
#   make bench              benchmarks (not tests): prints rates and ratios
#   make bench-scale        the scale benchmark alone: SCALE_ROWS (default 1000000) keys and
#                           inbox rows preloaded per store (the documented run: 10000000)
#   make fuzz               every fuzz target under libFuzzer with ASan+UBSan (clang), each
#                           for FUZZ_SECONDS (default 60); FUZZ_TARGETS picks some
BUILD ?= build
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
CMAKE_FLAGS ?= -DCMAKE_BUILD_TYPE=RelWithDebInfo

.PHONY: all deps configure build demo test chaos chaos-nats check-sanitizers bench bench-scale fuzz clean

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

# docs/design/chaos.md: the full campaign, on each store in turn (the PostgreSQL one with
# database restarts mid-load: the server is its own).
CHAOS_KILLS ?= 1000
CHAOS_SEED ?= 1
CHAOS_CLIENTS ?= 8
chaos: build
	$(BUILD)/converge chaos --store sqlite --kills $(CHAOS_KILLS) --seed $(CHAOS_SEED) \
	  --clients $(CHAOS_CLIENTS)
	CHAOS_DB_RESTARTS=1 bash scripts/with-postgres.sh bash tests/chaos/campaign_pg.sh \
	  $(BUILD)/converge --kills $(CHAOS_KILLS) --seed $(CHAOS_SEED) --clients $(CHAOS_CLIENTS)

# The same over NATS (docs/design/chaos.md, "With NATS"): the campaign starts its own
# nats-server (or cluster), relay and workers.
CHAOS_NATS_NODES ?= 1
chaos-nats: build
	$(BUILD)/converge chaos --store sqlite --broker nats --nats-nodes $(CHAOS_NATS_NODES) \
	  --kills $(CHAOS_KILLS) --seed $(CHAOS_SEED) --clients $(CHAOS_CLIENTS)
	CHAOS_DB_RESTARTS=1 bash scripts/with-postgres.sh bash tests/chaos/campaign_pg.sh \
	  $(BUILD)/converge --broker nats --nats-nodes $(CHAOS_NATS_NODES) \
	  --kills $(CHAOS_KILLS) --seed $(CHAOS_SEED) --clients $(CHAOS_CLIENTS)

check-sanitizers: deps
	cmake -S . -B $(BUILD)-asan -DCMAKE_BUILD_TYPE=Debug -DCONVERGE_SANITIZE=address -DCONVERGE_BUILD_BENCH=OFF -DCONVERGE_WITH_NATS=ON
	cmake --build $(BUILD)-asan -j $(JOBS) --target converge_unit_tests converge_e2e_tests converge_contract_tests converge_fuzzers converge_nats_tests
	cd $(BUILD)-asan && ctest -L 'unit|e2e' -E 'e2e.demo' --output-on-failure -j $(JOBS)
	cd $(BUILD)-asan && ctest -L nats -LE 'pg|chaos' --output-on-failure -j $(JOBS)
	cmake -S . -B $(BUILD)-tsan -DCMAKE_BUILD_TYPE=Debug -DCONVERGE_SANITIZE=thread -DCONVERGE_BUILD_BENCH=OFF
	cmake --build $(BUILD)-tsan -j $(JOBS) --target converge_unit_tests converge_e2e_tests converge_contract_tests converge_fuzzers
	cd $(BUILD)-tsan && TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1" ctest -L 'unit|e2e' -E 'e2e.demo' --output-on-failure -j $(JOBS)

# Results go to $(BENCH_OUT) as JSON, plots to docs/bench/ (docs/benchmarks.md).
BENCH_OUT ?= $(BUILD)/bench-results
bench: build
	mkdir -p $(BENCH_OUT)
	$(BUILD)/bench/converge_bench --sweep 1,4,16 --json $(BENCH_OUT)/sqlite.json $(BENCH_ARGS)
	$(BUILD)/bench/converge_e2e_bench --json $(BENCH_OUT)/e2e.json
	$(BUILD)/bench/converge_e2e_bench --synchronous normal --json $(BENCH_OUT)/e2e_normal.json
	$(BUILD)/bench/converge_e2e_bench --publish-in-transaction --json $(BENCH_OUT)/e2e_in_tx.json
	bash bench/http_bench.sh $(BUILD) $(HTTP_BENCH_SECONDS)
	bash bench/modes_bench.sh $(BUILD) $(HTTP_BENCH_SECONDS)
	bash bench/pg_bench.sh $(BUILD) "$(PG_BENCH_SECONDS)" "$(PG_BENCH_ROUNDS)" $(BENCH_OUT)/pg.json
	bash bench/scale_bench.sh $(BUILD) $(SCALE_ROWS) $(SCALE_SECONDS) $(SCALE_ROUNDS) $(BENCH_OUT)
	bash bench/plot.sh $(BENCH_OUT) docs/bench
	bash bench/nats_bench.sh $(BUILD) $(NATS_BENCH_EVENTS)

# Cost as tables grow (docs/design/retention.md): SCALE_ROWS keys and inbox rows per store.
SCALE_ROWS ?= 1000000
SCALE_SECONDS ?= 5
SCALE_ROUNDS ?= 3
bench-scale: build
	mkdir -p $(BENCH_OUT)
	bash bench/scale_bench.sh $(BUILD) $(SCALE_ROWS) $(SCALE_SECONDS) $(SCALE_ROUNDS) $(BENCH_OUT)

# A build of its own (clang, libFuzzer's coverage instrumentation, ASan+UBSan): the normal
# g++ build is untouched. New inputs collect in $(BUILD)-fuzz/corpus/<target>/, failing
# ones in $(BUILD)-fuzz/crashes/<target>/ (docs/design/chaos.md, "Fuzzing").
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?=
fuzz:
	@bash scripts/install-deps.sh --fuzz
	CC=clang CXX=clang++ cmake -S . -B $(BUILD)-fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	  -DCONVERGE_FUZZ=ON -DCONVERGE_SANITIZE=address -DCONVERGE_BUILD_BENCH=OFF \
	  -DCONVERGE_BUILD_TESTS=OFF
	cmake --build $(BUILD)-fuzz -j $(JOBS) --target converge_fuzzers
	bash scripts/run-fuzz.sh $(BUILD)-fuzz $(FUZZ_SECONDS) $(FUZZ_TARGETS)

clean:
	rm -rf $(BUILD) $(BUILD)-asan $(BUILD)-tsan $(BUILD)-fuzz
