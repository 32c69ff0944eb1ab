// PostgreSQL benchmarks, the converge side (bench/pg_bench.sh runs the baselines):
//
//   creates  single-phase idempotent creates (IdempotencyKeys::Execute: key row, business
//            row, outbox row, stored response) from --callers concurrent threads for
//            --seconds; prints creates/s.
//   relay    --events unpublished outbox events drained by one Relay into the SQL queue
//            (publish and mark in one transaction per batch); prints events/s.
//   table-relay  --events rows of an application's outbox table (outbox_table.h, the
//            README's PostgreSQL table) copied, published into the SQL queue by one Relay
//            and deleted; prints rows/s from the first copy to the last delete.
//
//   converge_pg_bench --uri postgresql://... creates|relay|table-relay [flags]
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>

#include "converge/database.h"
#include "converge/idempotency.h"
#include "converge/outbox.h"
#include "converge/outbox_table.h"
#include "converge/relay.h"
#include "converge/sql_queue.h"

namespace {

using converge::Result;
using converge::Status;
using converge::StoredResponse;
using converge::Tx;
using Steady = std::chrono::steady_clock;

int Creates(converge::Database& db, int callers, double seconds) {
  Status st = db.Transact([](Tx& tx) {
    return converge::StatusOf(tx.Exec(
        "CREATE TABLE IF NOT EXISTS payments (id TEXT PRIMARY KEY, amount BIGINT NOT NULL)"));
  });
  if (!st.ok()) {
    std::fprintf(stderr, "setup: %s\n", st.ToString().c_str());
    return 1;
  }
  converge::IdempotencyKeys keys(db);
  converge::Outbox outbox;
  std::atomic<int64_t> next{0}, failed{0};
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  // Runs share a database: a prefix of their own keeps every key fresh (a repeated key
  // would be a cheap replay, not a create).
  const std::string prefix = "cv-" + std::to_string(getpid()) + "-";
  const auto t0 = Steady::now();
  for (int i = 0; i < callers; ++i) {
    threads.emplace_back([&] {
      while (!stop.load()) {
        int64_t n = next.fetch_add(1);
        std::string id = prefix + std::to_string(n);
        converge::Event e;
        e.type = "payment.captured";
        e.subject = id;
        e.data = "{\"amount\":" + std::to_string(n % 1000) + "}";
        auto event = outbox.Prepare(std::move(e));  // before the transaction: shorter
        if (!event) std::abort();                   // a bench bug, not an input error
        auto r = keys.Execute({"bench", id, id}, [&](Tx& tx) -> Result<StoredResponse> {
          // Deferred (Tx::ExecDeferred): nothing here reads its answer, and a failure
          // (a duplicate id) still fails the transaction, from its commit.
          CONVERGE_RETURN_IF_ERROR(
              tx.ExecDeferred(converge::DeferredCheck::None(),
                              "INSERT INTO payments (id, amount) VALUES ($1, $2)", id, n % 1000));
          CONVERGE_RETURN_IF_ERROR(outbox.Enqueue(tx, *event));
          return StoredResponse{201, {}, "{\"id\":\"" + id + "\"}"};
        });
        if (!r) ++failed;
      }
    });
  }
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  stop = true;
  for (auto& t : threads) t.join();
  const double secs = std::chrono::duration<double>(Steady::now() - t0).count();
  std::printf("creates %.1f %lld\n", static_cast<double>(next.load() - failed.load()) / secs,
              static_cast<long long>(failed.load()));
  return failed.load() == 0 ? 0 : 1;
}

int Drain(converge::Database& db) {
  converge::SqlQueue queue(db);
  if (Status st = queue.Subscribe("drain", "*"); !st.ok()) {
    std::fprintf(stderr, "subscribe: %s\n", st.ToString().c_str());
    return 1;
  }
  converge::Outbox outbox;
  converge::Relay relay(db, outbox, queue, converge::RelayOptions{.batch = 256, .name = "bench"});
  int64_t total = 0;
  const auto t0 = Steady::now();
  for (;;) {
    auto n = relay.RunOnce();
    if (!n) {
      std::fprintf(stderr, "relay: %s\n", n.error().ToString().c_str());
      return 1;
    }
    if (*n == 0) break;
    total += static_cast<int64_t>(*n);
  }
  const double secs = std::chrono::duration<double>(Steady::now() - t0).count();
  std::printf("relay %.1f %lld\n", static_cast<double>(total) / secs,
              static_cast<long long>(total));
  return 0;
}

int TableDrain(converge::Database& db, int64_t events) {
  Status st = db.Transact([&](Tx& tx) -> Status {
    CONVERGE_RETURN_IF_ERROR(tx.Exec("DROP TABLE IF EXISTS app_outbox"));
    CONVERGE_RETURN_IF_ERROR(tx.Exec(
        "CREATE TABLE app_outbox (id uuid PRIMARY KEY, aggregatetype text NOT NULL, "
        "aggregateid text NOT NULL, type text NOT NULL, payload jsonb NOT NULL, "
        "created_at timestamptz NOT NULL DEFAULT now(), seq bigint GENERATED ALWAYS AS "
        "IDENTITY)"));
    return converge::StatusOf(tx.Exec(
        "INSERT INTO app_outbox (id, aggregatetype, aggregateid, type, payload) "
        "SELECT gen_random_uuid(), 'payment', 'pay_' || (g % 10000), 'payment.captured', "
        "jsonb_build_object('amount', g % 1000) FROM generate_series(1, $1) g",
        events));
  });
  converge::SqlQueue queue(db);
  if (st.ok()) st = queue.Subscribe("table-drain", "*");
  converge::Outbox outbox;
  auto table = converge::OutboxTable::Open(
      db, outbox, {.table = "app_outbox", .columns = {.order = "seq"}, .batch = 256});
  if (!st.ok() || !table) {
    std::fprintf(stderr, "setup: %s\n", (st.ok() ? table.error() : st).ToString().c_str());
    return 1;
  }
  converge::Relay relay(db, outbox, queue,
                        converge::RelayOptions{.batch = 256, .name = "bench"});  // the drain's own
  const auto t0 = Steady::now();
  for (;;) {
    auto copied = (*table)->Ingest();
    auto published = relay.RunOnce();
    auto deleted = (*table)->Finalize();
    if (!copied || !published || !deleted) {
      std::fprintf(stderr, "table relay: %s\n", (*table)->stats().last_error.c_str());
      return 1;
    }
    if (*copied == 0 && *published == 0 && *deleted == 0) break;
  }
  const double secs = std::chrono::duration<double>(Steady::now() - t0).count();
  const int64_t done = (*table)->stats().finalized;
  std::printf("table-relay %.1f %lld\n", static_cast<double>(done) / secs,
              static_cast<long long>(done));
  return done == events ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"converge PostgreSQL benchmark (converge side)"};
  std::string uri, mode;
  int callers = 64;
  double seconds = 10;
  app.add_option("--uri", uri, "postgresql://...")->required();
  int64_t events = 20000;
  app.add_option("mode", mode, "creates, relay or table-relay")
      ->required()
      ->check(CLI::IsMember({"creates", "relay", "table-relay"}));
  app.add_option("--events", events, "Rows of the table-relay run")
      ->check(CLI::Range(int64_t{1}, int64_t{10'000'000}));
  app.add_option("--callers", callers, "Concurrent callers")->check(CLI::Range(1, 1024));
  app.add_option("--seconds", seconds, "Duration of the creates run")
      ->check(CLI::Range(0.5, 600.0));
  CLI11_PARSE(app, argc, argv);
  auto db = converge::Database::Open(
      converge::Database::WithDefaultParameter(uri, "pool_size", std::to_string(callers)));
  if (!db) {
    std::fprintf(stderr, "open: %s\n", db.error().ToString().c_str());
    return 1;
  }
  if (mode == "table-relay") return TableDrain(**db, events);
  return mode == "creates" ? Creates(**db, callers, seconds) : Drain(**db);
}
