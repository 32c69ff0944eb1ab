// Group commit benchmark: single-phase idempotent creates (idempotency key row + business
// row + outbox row, one IdempotencyKeys::Execute each) on SQLite with synchronous=FULL,
// measured three ways in one run:
//
//   (a) serial:  one caller, so every call is its own physical transaction and fsync;
//   (b) group:   64 concurrent callers; the writer batches them into shared commits;
//   (c) ceiling: the same Execute calls, all inside one Transact on one thread: the CPU
//                cost of the statements with one commit in total.
//
// It prints each rate (median of --repeats runs, each on a fresh file) and the ratios
// b/a (what group commit buys) and b/c (how close it gets to the CPU ceiling; target
// >= 0.5). Run by `make bench`; see docs/benchmarks.md.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>

#include "converge/database.h"
#include "converge/idempotency.h"
#include "converge/outbox.h"

namespace {

using converge::Database;
using converge::IdempotencyKeys;
using converge::Result;
using converge::Status;
using converge::StoredResponse;
using converge::Tx;
using SteadyClock = std::chrono::steady_clock;

struct Fixture {
  std::string dir;
  std::unique_ptr<Database> db;
  std::unique_ptr<IdempotencyKeys> keys;
  converge::Outbox outbox;

  explicit Fixture(bool full) {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base && *base ? base : "/tmp") + "/converge-bench-XXXXXX";
    if (mkdtemp(tmpl.data()) == nullptr) std::abort();
    dir = tmpl;
    auto opened = Database::Open("sqlite:" + dir + "/bench.db?synchronous=" +
                                 (full ? "full" : "normal"));
    if (!opened) {
      std::fprintf(stderr, "open: %s\n", opened.error().ToString().c_str());
      std::exit(1);
    }
    db = std::move(*opened);
    Status st = db->Transact([](Tx& tx) {
      return converge::StatusOf(tx.Exec(
          "CREATE TABLE payments (id TEXT PRIMARY KEY, amount INTEGER NOT NULL)"));
    });
    if (!st.ok()) std::exit(1);
    keys = std::make_unique<IdempotencyKeys>(*db);
  }
  ~Fixture() {
    db.reset();
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }

  // One idempotent create with a unique key.
  bool Create(int64_t n) {
    std::string id = "p" + std::to_string(n);
    auto r = keys->Execute({"bench", id, id}, [&](Tx& tx) -> Result<StoredResponse> {
      CONVERGE_RETURN_IF_ERROR(
          tx.Exec("INSERT INTO payments (id, amount) VALUES ($1, $2)", id, n % 1000));
      converge::Event e;
      e.type = "payment.captured";
      e.subject = id;
      e.data = "{\"amount\":" + std::to_string(n % 1000) + "}";
      CONVERGE_RETURN_IF_ERROR(outbox.Enqueue(tx, e));
      return StoredResponse{201, {}, "{\"id\":\"" + id + "\"}"};
    });
    if (!r) std::fprintf(stderr, "create: %s\n", r.error().ToString().c_str());
    return r.has_value();
  }
};

double Serial(double seconds, bool full) {
  Fixture f(full);
  auto t0 = SteadyClock::now();
  auto end = t0 + std::chrono::duration<double>(seconds);
  int64_t n = 0;
  while (SteadyClock::now() < end) {
    if (!f.Create(n)) std::exit(1);
    ++n;
  }
  return n / std::chrono::duration<double>(SteadyClock::now() - t0).count();
}

double Group(double seconds, int callers, bool full, double* avg_batch) {
  Fixture f(full);
  std::atomic<int64_t> next{0};
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  auto t0 = SteadyClock::now();
  for (int i = 0; i < callers; ++i) {
    threads.emplace_back([&] {
      while (!stop.load()) {
        if (!f.Create(next.fetch_add(1))) std::exit(1);
      }
    });
  }
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  stop = true;
  for (auto& t : threads) t.join();
  double secs = std::chrono::duration<double>(SteadyClock::now() - t0).count();
  auto s = f.db->stats();
  // The CREATE TABLE ran before the clock: leave it out of the batch average.
  *avg_batch = s.commits > 1 ? static_cast<double>(s.transactions - 1) / (s.commits - 1) : 0;
  return next.load() / secs;
}

double Ceiling(int64_t calls, bool full) {
  Fixture f(full);
  auto t0 = SteadyClock::now();
  Status st = f.db->Transact([&](Tx&) -> Status {
    // Execute inside Transact joins this one transaction (a savepoint each).
    for (int64_t n = 0; n < calls; ++n) {
      if (!f.Create(n)) return converge::InternalError("create failed");
    }
    return converge::OkStatus();
  });
  if (!st.ok()) std::exit(1);
  return calls / std::chrono::duration<double>(SteadyClock::now() - t0).count();
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"converge group-commit benchmark (SQLite)"};
  double seconds = 3;
  int repeats = 3;
  int callers = 64;
  int64_t ceiling_calls = 20000;
  bool normal = false;
  app.add_option("--seconds", seconds, "Duration of each serial and group run")
      ->check(CLI::Range(0.2, 600.0));
  app.add_option("--repeats", repeats, "Runs per mode; the median is reported")
      ->check(CLI::Range(1, 99));
  app.add_option("--callers", callers, "Concurrent callers for group commit")
      ->check(CLI::Range(1, 4096));
  app.add_option("--ceiling-calls", ceiling_calls, "Calls in the one-transaction run")
      ->check(CLI::Range(int64_t{100}, int64_t{10'000'000}));
  app.add_flag("--synchronous-normal", normal, "Use synchronous=NORMAL instead of FULL");
  CLI11_PARSE(app, argc, argv);
  const bool full = !normal;

  std::printf("idempotent creates (key + business row + outbox row), SQLite WAL synchronous=%s\n",
              full ? "FULL" : "NORMAL");
  std::printf("each mode: median of %d run(s) on a fresh file\n", repeats);
  std::vector<double> a, b, c, batches;
  for (int r = 0; r < repeats; ++r) {
    std::fprintf(stderr, "  run %d/%d: serial...", r + 1, repeats);
    a.push_back(Serial(seconds, full));
    std::fprintf(stderr, " group...");
    double batch = 0;
    b.push_back(Group(seconds, callers, full, &batch));
    batches.push_back(batch);
    std::fprintf(stderr, " ceiling...");
    c.push_back(Ceiling(ceiling_calls, full));
    std::fprintf(stderr, " done\n");
  }
  double ra = Median(a), rb = Median(b), rc = Median(c);
  std::printf("  (a) serial, one transaction per call      %10.0f creates/s\n", ra);
  std::printf(
      "  (b) group commit, %4d concurrent callers %10.0f creates/s  (avg %.1f calls/commit)\n",
      callers, rb, Median(batches));
  std::printf("  (c) ceiling, all calls in one transaction %10.0f creates/s\n", rc);
  std::printf("  b/a = %.1fx   b/c = %.2f  (target b/c >= 0.50: %s)\n", rb / ra, rb / rc,
              rb / rc >= 0.5 ? "met" : "NOT met");
  return 0;
}
