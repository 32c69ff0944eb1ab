// End-to-end latency, embedded: from a producer's commit (Transact returned: the outbox
// event is durable) to a consumer's effect committing, through the whole path of the
// embedded shape: outbox -> relay (woken by the commit) -> SQL queue -> consumer (inbox row
// + effect in one transaction). SQLite WAL, synchronous=FULL, one store.
//
// Two phases on one store, in one run:
//   peak:  --callers closed-loop producers for --seconds, the runtime running, then until
//          the consumer caught up: the rate the whole path sustains (events through to
//          their effect per second);
//   half:  open-loop producers at half that rate for --seconds; every event's latency is
//          its effect's commit time minus its producer's commit time. Prints p50, p99 and
//          max, and waits (with a deadline) for every event to reach the consumer.
//
//   converge_e2e_bench [--seconds S] [--callers N] [--json FILE]
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "converge/database.h"
#include "converge/runtime.h"
#include "converge/sql_queue.h"

namespace {

using converge::Status;
using converge::Tx;
using Steady = std::chrono::steady_clock;

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "converge_e2e_bench: %s\n", what.c_str());
  std::exit(1);
}

// Commit and effect times per event number, from the producers' and the consumer's
// threads.
class Timeline {
 public:
  void Committed(int64_t n) { Put(committed_, n); }
  void Effected(int64_t n) { Put(effected_, n); }
  size_t effects() const {
    std::lock_guard<std::mutex> l(mu_);
    return effected_.size();
  }
  // Latencies in ms of the events numbered [from, to) that have both times.
  std::vector<double> LatenciesMs(int64_t from, int64_t to) const {
    std::lock_guard<std::mutex> l(mu_);
    std::vector<double> out;
    for (int64_t n = from; n < to; ++n) {
      auto c = committed_.find(n), e = effected_.find(n);
      if (c == committed_.end() || e == effected_.end()) continue;
      // The effect can commit before the producer's thread reads its clock after Transact
      // returned (the relay is woken by that same commit): then the latency is ~0.
      out.push_back(
          std::max(0.0, std::chrono::duration<double, std::milli>(e->second - c->second).count()));
    }
    std::sort(out.begin(), out.end());
    return out;
  }

 private:
  void Put(std::unordered_map<int64_t, Steady::time_point>& m, int64_t n) {
    auto now = Steady::now();
    std::lock_guard<std::mutex> l(mu_);
    m[n] = now;
  }
  mutable std::mutex mu_;
  std::unordered_map<int64_t, Steady::time_point> committed_, effected_;
};

struct Service {
  std::string dir;
  std::unique_ptr<converge::Database> db;
  std::unique_ptr<converge::SqlQueue> queue;
  std::unique_ptr<converge::Subscriber> sub;
  std::unique_ptr<converge::Runtime> runtime;
  Timeline timeline;

  Service() {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base && *base ? base : "/tmp") + "/converge-e2e-XXXXXX";
    if (mkdtemp(tmpl.data()) == nullptr) Die("mkdtemp failed");
    dir = tmpl;
    auto opened = converge::Database::Open("sqlite:" + dir + "/e2e.db");
    if (!opened) Die("open: " + opened.error().ToString());
    db = std::move(*opened);
    Status st = db->Transact([](Tx& tx) {
      return converge::StatusOf(
          tx.Exec("CREATE TABLE effects_seen (n INTEGER PRIMARY KEY, at INTEGER NOT NULL)"));
    });
    if (!st.ok()) Die("create table: " + st.ToString());
    queue = std::make_unique<converge::SqlQueue>(*db);
    if (st = queue->Subscribe("effects", "*"); !st.ok()) Die("subscribe: " + st.ToString());
    sub = queue->OpenSubscriber("effects");
    runtime = std::make_unique<converge::Runtime>(*db);
    runtime->AddRelay(*queue);
    runtime->AddConsumer(*sub, {.name = "effects"})
        .On("bench.created", [this](Tx& tx, const converge::Event& e) -> Status {
          const int64_t n = std::stoll(e.subject);
          CONVERGE_RETURN_IF_ERROR(
              tx.Exec("INSERT INTO effects_seen (n, at) VALUES ($1, $2)", n, int64_t{0}));
          tx.OnCommit([this, n] { timeline.Effected(n); });
          return converge::OkStatus();
        });
    if (st = runtime->Start(); !st.ok()) Die("start: " + st.ToString());
  }
  ~Service() {
    runtime->Stop();
    runtime.reset();
    sub.reset();
    queue.reset();
    db.reset();
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }

  // One producer transaction: a business row and its event; then its commit time.
  void Produce(int64_t n) {
    converge::Event e;
    e.type = "bench.created";
    e.subject = std::to_string(n);
    e.data = "{\"n\":" + e.subject + "}";
    auto prepared = runtime->outbox().Prepare(std::move(e));
    if (!prepared) Die("prepare: " + prepared.error().ToString());
    Status st = db->Transact([&](Tx& tx) { return converge::StatusOf(
                                              runtime->outbox().Enqueue(tx, *prepared)); });
    if (!st.ok()) Die("produce: " + st.ToString());
    timeline.Committed(n);
  }
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"converge end-to-end latency, embedded SQLite"};
  double seconds = 3;
  int callers = 64;
  std::string json_path;
  app.add_option("--seconds", seconds, "Duration of each phase")->check(CLI::Range(0.5, 600.0));
  app.add_option("--callers", callers, "Producers in the peak phase")
      ->check(CLI::Range(1, 1024));
  app.add_option("--json", json_path, "Write the results to this JSON file");
  CLI11_PARSE(app, argc, argv);

  Service svc;
  std::atomic<int64_t> next{0};
  std::atomic<bool> stop{false};

  std::fprintf(stderr, "  peak: %d closed-loop producers for %.1fs...\n", callers, seconds);
  std::vector<std::thread> threads;
  auto t0 = Steady::now();
  for (int i = 0; i < callers; ++i) {
    threads.emplace_back([&] {
      while (!stop.load()) svc.Produce(next.fetch_add(1));
    });
  }
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  stop = true;
  for (auto& t : threads) t.join();
  const int64_t peak_n = next.load();
  const double produced = peak_n / std::chrono::duration<double>(Steady::now() - t0).count();

  // Let the consumer catch up on the peak phase before measuring at half load.
  auto wait_all = [&](int64_t total, double limit_s) {
    auto deadline = Steady::now() + std::chrono::duration<double>(limit_s);
    while (static_cast<int64_t>(svc.timeline.effects()) < total && Steady::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return static_cast<int64_t>(svc.timeline.effects()) >= total;
  };
  std::fprintf(stderr, "  peak: producers committed %.0f/s; waiting for the consumer...\n",
               produced);
  if (!wait_all(peak_n, 120)) Die("the consumer did not catch up within 120 s");
  // The path's peak: events through to the consumer's effect, per second of the whole
  // phase (producing and catching up).
  const double peak = peak_n / std::chrono::duration<double>(Steady::now() - t0).count();

  // Open loop at half the peak: producers follow a schedule, so a slow commit does not
  // lower the offered load. Enough producers that the schedule never waits on them.
  const double rate = peak / 2;
  const int producers = callers;
  const int64_t half_from = next.load();
  const int64_t half_count = static_cast<int64_t>(rate * seconds);
  std::fprintf(stderr, "  half load: %.0f creates/s for %.1fs (%lld events)...\n", rate, seconds,
               static_cast<long long>(half_count));
  std::atomic<int64_t> issued{0};
  threads.clear();
  auto start = Steady::now();
  for (int i = 0; i < producers; ++i) {
    threads.emplace_back([&] {
      for (;;) {
        const int64_t k = issued.fetch_add(1);
        if (k >= half_count) return;
        std::this_thread::sleep_until(start + std::chrono::duration_cast<Steady::duration>(
                                                  std::chrono::duration<double>(k / rate)));
        svc.Produce(half_from + k);
      }
    });
  }
  for (auto& t : threads) t.join();
  if (!wait_all(half_from + half_count, 120)) Die("events did not reach the consumer in 120 s");
  std::vector<double> lat = svc.timeline.LatenciesMs(half_from, half_from + half_count);
  if (lat.empty()) Die("no latencies recorded");
  auto pct = [&](double p) {
    return lat[std::min(lat.size() - 1, static_cast<size_t>(p * lat.size()))];
  };
  std::printf("end to end, embedded SQLite (FULL): producer commit -> consumer effect commit\n");
  std::printf("  peak, %d closed-loop producers: %.0f events/s through to their effect "
              "(producers alone committed %.0f/s)\n",
              callers, peak, produced);
  std::printf("  at half of peak (%.0f/s, %zu events): p50 %.2f ms, p99 %.2f ms, max %.2f ms"
              "  (target p99 <= 5 ms: %s)\n",
              rate, lat.size(), pct(0.5), pct(0.99), lat.back(),
              pct(0.99) <= 5.0 ? "met" : "NOT met");
  if (!json_path.empty()) {
    nlohmann::json j = {{"benchmark", "e2e_latency"}, {"peak", peak}, {"produced", produced},
                        {"rate", rate},              {"events", lat.size()},
                        {"p50_ms", pct(0.5)},        {"p99_ms", pct(0.99)},
                        {"max_ms", lat.back()}};
    std::ofstream out(json_path);
    out << j.dump(2) << "\n";
    if (!out) Die("cannot write " + json_path);
  }
  return 0;
}
