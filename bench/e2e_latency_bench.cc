// End-to-end latency, embedded: from a producer's commit (Transact returned: the outbox
// event is durable) to a consumer's effect committing, through the whole path of the
// embedded shape: outbox -> relay (woken by the commit) -> SQL queue -> consumer (inbox row
// + effect in one transaction). SQLite WAL, synchronous=FULL (or --synchronous normal:
// a commit is durable against a crash of the process, not of the machine), one store.
//
// Two phases on one store, in one run:
//   peak:  --callers closed-loop producers for --seconds, the runtime running, then until
//          the consumer caught up: the rate the whole path sustains (events through to
//          their effect per second);
//   half:  open-loop producers at half that rate for --seconds; every event's latency is
//          its effect's commit time minus its producer's commit time. Prints p50, p99 and
//          max, and waits (with a deadline) for every event to reach the consumer. Where
//          the time went, stage by stage, and how many transactions each event cost;
//   floor (run first, printed last): one caller alone, 300 one-row transactions back to
//          back on the fresh store, the path idle: a durable commit's latency on this
//          disk, the unit the path after a producer's commit is made of (the relay's
//          commit, the consumer's claim, the consumer's effects).
//
//   converge_e2e_bench [--seconds S] [--callers N] [--rate R] [--synchronous full|normal]
//                      [--publish-in-transaction] [--store-options K=V&...]
//                      [--relay-acquire-interval MS] [--timeline CSV] [--json FILE]
//   (--publish-in-transaction: the producer's transaction puts the event on the queue
//   itself, RuntimeOptions::publish_in_transaction: no relay pass between the producer's
//   commit and the consumer's claim)
//   (--store-options: more of the SQLite URI's settings, e.g. checkpoint_pages=4000)
//   (--rate: the half phase's events/s instead of half the measured peak, to compare two
//   builds at one load)
//   (--timeline: every event of the half phase with its stages' times, to see when the
//   slow ones came: a host freezing the VM shows as bursts at its period)
// It also prints the cores the process used in the half phase, the bytes it wrote per
// event, and the share of the machine's cpu time its hypervisor stole meanwhile.
#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include <sys/resource.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "converge/database.h"
#include "converge/runtime.h"
#include "converge/sql_queue.h"
#include "converge/tx_publisher.h"

namespace {

using converge::Status;
using converge::Tx;
using Steady = std::chrono::steady_clock;

// The machine's CPU time from /proc/stat's "cpu" line, in ticks: all of it, and what a
// hypervisor took from this VM's vCPUs (steal) while they had work. A host that throttles
// or overcommits its VMs freezes every thread of the process at once; the share of steal
// during a phase says how much of its latency was the host's. {-1, -1} when unreadable
// (not Linux, or a kernel without the column).
struct CpuTicks {
  int64_t total = -1, steal = -1;
};
CpuTicks ReadCpuTicks() {
  std::ifstream in("/proc/stat");
  std::string label;
  if (!(in >> label) || label != "cpu") return {};
  CpuTicks t{0, -1};
  int64_t v = 0;
  for (int i = 0; i < 8 && (in >> v); ++i) {  // user nice system idle iowait irq softirq steal
    t.total += v;
    if (i == 7) t.steal = v;
  }
  return t.steal < 0 ? CpuTicks{} : t;
}

// Bytes this process has passed to write(2) and friends (/proc/self/io's wchar), -1 when
// unreadable: what the store writes, WAL frames and checkpoints, the disk's work.
int64_t ProcessWrittenBytes() {
  std::ifstream in("/proc/self/io");
  std::string key;
  int64_t v = 0;
  while (in >> key >> v) {
    if (key == "wchar:") return v;
  }
  return -1;
}

// CPU seconds this process has used (all threads, user + system).
double ProcessCpuSeconds() {
  rusage u{};
  if (getrusage(RUSAGE_SELF, &u) != 0) return 0;
  auto s = [](const timeval& t) { return static_cast<double>(t.tv_sec) + t.tv_usec / 1e6; };
  return s(u.ru_utime) + s(u.ru_stime);
}

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "converge_e2e_bench: %s\n", what.c_str());
  std::exit(1);
}

// Where an event's time goes: the moment it passes each stage of the path, per event
// number (its subject), from the producers', the relay's and the consumer's threads.
enum Stage : size_t {
  kCommitted,       // the producer's Transact returned: the outbox row is durable
  kRelayPublishing, // the relay's transaction reached the publish: woken, claimed
  kRelayCommitted,  // the relay's transaction (queue rows + mark) committed
  kFetched,         // its claim committed: the Fetch returned it, or the batch claiming it ahead
  kHandling,        // its handler started (inbox row claimed, in the batch transaction)
  kEffected,        // the consumer's transaction (inbox row + effect) committed
  kStages
};
constexpr const char* kStageNames[kStages] = {"producer commit", "relay publishing",
                                              "relay commit",    "consumer fetched",
                                              "handler start",   "effect commit"};

class Timeline {
 public:
  using Times = std::array<Steady::time_point, kStages>;
  void Mark(int64_t n, Stage s) {
    auto now = Steady::now();
    std::lock_guard<std::mutex> l(mu_);
    Times& t = times_[n];
    if (t[s] != Steady::time_point{}) return;  // the first time counts (a redelivery not)
    t[s] = now;
    if (s == kEffected) ++effects_;
  }
  // Room for `n` events without a rehash: a rehash of 100,000 entries under the mutex
  // held the writer thread (which marks effects in its commit hooks) for ~9 ms once a run.
  void Reserve(size_t n) {
    std::lock_guard<std::mutex> l(mu_);
    times_.reserve(n);
  }
  size_t effects() const {
    std::lock_guard<std::mutex> l(mu_);
    return effects_;
  }
  // The sorted ms between stages `a` and `b` of the events numbered [from, to) that have
  // both. The effect can commit before the producer's thread reads its clock after
  // Transact returned (the relay is woken by that same commit): then it is ~0.
  std::vector<double> Between(int64_t from, int64_t to, Stage a, Stage b) const {
    std::lock_guard<std::mutex> l(mu_);
    std::vector<double> out;
    for (int64_t n = from; n < to; ++n) {
      auto it = times_.find(n);
      if (it == times_.end()) continue;
      const Times& t = it->second;
      if (t[a] == Steady::time_point{} || t[b] == Steady::time_point{}) continue;
      out.push_back(std::max(0.0, std::chrono::duration<double, std::milli>(t[b] - t[a]).count()));
    }
    std::sort(out.begin(), out.end());
    return out;
  }

  // Writes the events numbered [from, to) as CSV: the event's number, then each stage's
  // time in ms after `origin` (empty when it has none).
  bool WriteCsv(const std::string& path, int64_t from, int64_t to,
                Steady::time_point origin) const {
    std::FILE* f = std::fopen(path.c_str(), "w");
    if (f == nullptr) return false;
    std::fprintf(f, "n");
    for (const char* name : kStageNames) std::fprintf(f, ",%s", name);
    std::fprintf(f, "\n");
    std::lock_guard<std::mutex> l(mu_);
    for (int64_t n = from; n < to; ++n) {
      auto it = times_.find(n);
      if (it == times_.end()) continue;
      std::fprintf(f, "%lld", static_cast<long long>(n));
      for (Steady::time_point t : it->second) {
        if (t == Steady::time_point{}) {
          std::fprintf(f, ",");
        } else {
          std::fprintf(f, ",%.3f", std::chrono::duration<double, std::milli>(t - origin).count());
        }
      }
      std::fprintf(f, "\n");
    }
    return std::fclose(f) == 0;
  }

 private:
  mutable std::mutex mu_;
  std::unordered_map<int64_t, Times> times_;
  size_t effects_ = 0;
};

// The SQL queue as the relay sees it, timing the relay's stages: the transactional face
// forwards to the queue (so the relay still publishes and marks in one transaction) and
// marks when the relay reached the publish and when its transaction committed.
class TimedQueue : public converge::Publisher, public converge::TxPublisher {
 public:
  TimedQueue(converge::SqlQueue& q, Timeline& t) : q_(q), t_(t) {}
  Status Publish(const converge::Event& e) override { return q_.Publish(e); }
  converge::TxPublisher* tx_publisher() override { return this; }
  converge::Database* database() override { return q_.database(); }
  Status PublishInTx(Tx& tx, std::span<const converge::Event> batch) override {
    std::vector<int64_t> ns;
    for (const converge::Event& e : batch) ns.push_back(std::stoll(e.subject));
    for (int64_t n : ns) t_.Mark(n, kRelayPublishing);
    // Counted at commit: a transaction may run again (its SQLite batch rolled back).
    tx.OnCommit([this, ns] {
      ++publishes;
      for (int64_t n : ns) t_.Mark(n, kRelayCommitted);
    });
    return q_.PublishInTx(tx, batch);
  }
  std::atomic<int64_t> publishes{0};  // relay transactions that published

 private:
  converge::SqlQueue& q_;
  Timeline& t_;
};

// The consumer's subscriber, marking when a Fetch (its claim committed) handed an event
// out, or when the claim made ahead in a batch's transaction (TxSettler::FetchInTx)
// committed, and counting fetches, claims ahead and separate settles (one transaction
// each; none when the consumer settles inside its effects' transaction).
class TimedSubscriber : public converge::SubscriberWrapper, public converge::TxSettler {
 public:
  TimedSubscriber(converge::Subscriber* target, Timeline& t)
      : SubscriberWrapper(target), t_(t), inner_(target->tx_settler()) {}
  converge::Result<std::vector<converge::Delivery>> Fetch(size_t max,
                                                          converge::Millis visibility) override {
    auto r = target_->Fetch(max, visibility);
    ++fetches;
    if (r) {
      for (const converge::Delivery& d : *r) t_.Mark(std::stoll(d.event.subject), kFetched);
    }
    return r;
  }
  Status Settle(std::span<const converge::Delivery> d,
                std::span<const converge::Settlement> s) override {
    ++settles;
    return target_->Settle(d, s);
  }
  // The queue's transactional face, so the consumer settles (and claims ahead) in its
  // effects' transaction as it would without this wrapper.
  converge::TxSettler* tx_settler() override { return inner_ != nullptr ? this : nullptr; }
  converge::Database* database() override { return inner_->database(); }
  Status SettleInTx(Tx& tx, std::span<const converge::Delivery> d,
                    std::span<const converge::Settlement> s) override {
    return inner_->SettleInTx(tx, d, s);
  }
  converge::Result<std::vector<converge::Delivery>> FetchInTx(
      Tx& tx, size_t max, converge::Millis visibility) override {
    auto r = inner_->FetchInTx(tx, max, visibility);
    if (r && !r->empty()) {
      std::vector<int64_t> ns;
      for (const converge::Delivery& d : *r) ns.push_back(std::stoll(d.event.subject));
      tx.OnCommit([this, ns] {
        ++claims_ahead;
        for (int64_t n : ns) t_.Mark(n, kFetched);
      });
    }
    return r;
  }
  Status ReleaseInTx(Tx& tx, std::span<const converge::Delivery> d) override {
    return inner_->ReleaseInTx(tx, d);
  }
  std::atomic<int64_t> fetches{0}, claims_ahead{0}, settles{0};

 private:
  Timeline& t_;
  converge::TxSettler* const inner_;
};

struct Service {
  std::string dir;
  std::unique_ptr<converge::Database> db;
  std::unique_ptr<converge::SqlQueue> queue;
  std::unique_ptr<converge::Subscriber> sub;
  Timeline timeline;
  std::unique_ptr<TimedQueue> timed_queue;
  std::unique_ptr<TimedSubscriber> timed_sub;
  std::unique_ptr<converge::Runtime> runtime;
  converge::Relay* relay = nullptr;
  converge::Consumer* consumer = nullptr;

  Service(const std::string& synchronous, const std::string& options,
          bool publish_in_transaction, converge::RelayOptions relay_options) {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base && *base ? base : "/tmp") + "/converge-e2e-XXXXXX";
    if (mkdtemp(tmpl.data()) == nullptr) Die("mkdtemp failed");
    dir = tmpl;
    auto opened =
        converge::Database::Open("sqlite:" + dir + "/e2e.db?synchronous=" + synchronous +
                                 (options.empty() ? "" : "&" + options));
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
    timed_queue = std::make_unique<TimedQueue>(*queue, timeline);
    timed_sub = std::make_unique<TimedSubscriber>(sub.get(), timeline);
    runtime = std::make_unique<converge::Runtime>(
        *db, converge::RuntimeOptions{.publish_in_transaction = publish_in_transaction});
    relay = &runtime->AddRelay(*timed_queue, relay_options);
    consumer = &runtime->AddConsumer(*timed_sub, {.name = "effects"});
    consumer->On("bench.created", [this](Tx& tx, const converge::Event& e) -> Status {
      const int64_t n = std::stoll(e.subject);
      timeline.Mark(n, kHandling);
      CONVERGE_RETURN_IF_ERROR(
          tx.Exec("INSERT INTO effects_seen (n, at) VALUES ($1, $2)", n, int64_t{0}));
      tx.OnCommit([this, n] { timeline.Mark(n, kEffected); });
      return converge::OkStatus();
    });
    if (st = runtime->Start(); !st.ok()) Die("start: " + st.ToString());
  }
  ~Service() {
    runtime->Stop();
    runtime.reset();
    timed_sub.reset();
    timed_queue.reset();
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
    timeline.Mark(n, kCommitted);
  }
};

}  // namespace

int main(int argc, char** argv) {
  // Before any thread uses SQLite (database.h).
  (void)converge::DisableSqliteMemoryAccounting();
  CLI::App app{"converge end-to-end latency, embedded SQLite"};
  double seconds = 3;
  int callers = 64;
  std::string json_path;
  double fixed_rate = 0;
  app.add_option("--seconds", seconds, "Duration of each phase")->check(CLI::Range(0.5, 600.0));
  app.add_option("--callers", callers, "Producers in the peak phase")
      ->check(CLI::Range(1, 1024));
  app.add_option("--json", json_path, "Write the results to this JSON file");
  app.add_option("--rate", fixed_rate, "Events/s of the second phase (default: half the peak)")
      ->check(CLI::Range(0.0, 1e6));
  std::string synchronous = "full";
  app.add_option("--synchronous", synchronous, "The store's PRAGMA synchronous")
      ->check(CLI::IsMember({"full", "normal"}));
  bool in_tx = false;
  app.add_flag("--publish-in-transaction", in_tx,
               "Producers put their events on the queue in their own transactions");
  std::string store_options;
  app.add_option("--store-options", store_options,
                 "More settings of the store's URI, joined by '&' (e.g. checkpoint_pages=4000)");
  // The library's default: a tenth of the relay's lease.
  int64_t acquire_interval_ms = converge::RelayOptions{}.lease.count() / 10;
  app.add_option("--relay-acquire-interval", acquire_interval_ms,
                 "RelayOptions::acquire_interval in ms (0: every pass acquires)")
      ->capture_default_str()
      // The longest the relay honours (RelayOptions::acquire_interval): half the lease less
      // the idle wait.
      ->check(CLI::Range(int64_t{0},
                         converge::RelayOptions{}.lease.count() / 2 -
                             std::min(converge::RelayOptions{}.poll,
                                      converge::RelayOptions{}.lease / 3)
                                 .count()));
  std::string timeline_path;
  app.add_option("--timeline", timeline_path,
                 "Write each event of the second phase, with its stages' times, to this CSV");
  CLI11_PARSE(app, argc, argv);

  Service svc(synchronous, store_options, in_tx,
              {.acquire_interval = converge::Millis(acquire_interval_ms)});
  // The floor first, on the fresh store with the path idle: what one durable commit costs
  // here when nothing else is queued.
  Status made = svc.db->Transact([](Tx& tx) {
    return converge::StatusOf(tx.Exec("CREATE TABLE floor_rows (n INTEGER PRIMARY KEY)"));
  });
  if (!made.ok()) Die("create floor_rows: " + made.ToString());
  std::vector<double> floor;
  for (int64_t i = 0; i < 300; ++i) {
    auto t = Steady::now();
    Status st = svc.db->Transact([i](Tx& tx) {
      return converge::StatusOf(tx.Exec("INSERT INTO floor_rows (n) VALUES ($1)", i));
    });
    if (!st.ok()) Die("floor: " + st.ToString());
    floor.push_back(std::chrono::duration<double, std::milli>(Steady::now() - t).count());
  }
  std::sort(floor.begin(), floor.end());
  auto fq = [&](double p) {
    return floor[std::min(floor.size() - 1, static_cast<size_t>(p * floor.size()))];
  };

  std::atomic<int64_t> next{0};
  std::atomic<bool> stop{false};
  svc.timeline.Reserve(1 << 20);

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
  const double rate = fixed_rate > 0 ? fixed_rate : peak / 2;
  const int producers = callers;
  const int64_t half_from = next.load();
  const int64_t half_count = static_cast<int64_t>(rate * seconds);
  svc.timeline.Reserve(static_cast<size_t>(half_from + half_count));
  std::fprintf(stderr, "  half load: %.0f creates/s for %.1fs (%lld events)...\n", rate, seconds,
               static_cast<long long>(half_count));
  // Who committed how often during the half-load phase (one transaction each: a relay pass
  // that published, a consumer fetch, batch and settle).
  struct Counts {
    int64_t transactions, commits, relay_passes, relay_publishes, fetches, claims_ahead, batches,
        settles, checkpoints, restarts, wal_pages;
  };
  auto counts = [&] {
    converge::DatabaseStats ds = svc.db->stats();
    const converge::DatabaseStats::Wal wal = ds.wal.value_or(converge::DatabaseStats::Wal{});
    return Counts{ds.transactions,          ds.commits,
                  svc.relay->stats().passes, svc.timed_queue->publishes.load(),
                  svc.timed_sub->fetches.load(), svc.timed_sub->claims_ahead.load(),
                  svc.consumer->stats().batches,
                  svc.timed_sub->settles.load(), wal.checkpoints, wal.restarts_forced,
                  wal.pages};
  };
  const Counts before = counts();
  const CpuTicks cpu_before = ReadCpuTicks();
  const double process_cpu_before = ProcessCpuSeconds();
  const int64_t written_before = ProcessWrittenBytes();
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
  const Counts after = counts();
  const CpuTicks cpu_after = ReadCpuTicks();
  const double half_elapsed = std::chrono::duration<double>(Steady::now() - start).count();
  const double process_cpus = (ProcessCpuSeconds() - process_cpu_before) / half_elapsed;
  const int64_t written_after = ProcessWrittenBytes();
  const double written_per_event =
      written_before < 0 || written_after < 0
          ? -1
          : static_cast<double>(written_after - written_before) / static_cast<double>(half_count);
  const double steal_share =
      cpu_before.steal < 0 || cpu_after.steal < 0 || cpu_after.total <= cpu_before.total
          ? -1
          : static_cast<double>(cpu_after.steal - cpu_before.steal) /
                static_cast<double>(cpu_after.total - cpu_before.total);
  if (!timeline_path.empty() &&
      !svc.timeline.WriteCsv(timeline_path, half_from, half_from + half_count, start)) {
    Die("cannot write " + timeline_path);
  }
  std::vector<double> lat =
      svc.timeline.Between(half_from, half_from + half_count, kCommitted, kEffected);
  if (lat.empty()) Die("no latencies recorded");
  auto pct = [&](double p) {
    return lat[std::min(lat.size() - 1, static_cast<size_t>(p * lat.size()))];
  };
  const std::string acquire_note =
      acquire_interval_ms > 0
          ? ", the relay acquiring every " + std::to_string(acquire_interval_ms) + " ms"
          : ", the relay acquiring every pass";
  std::printf("end to end, embedded SQLite (%s%s%s%s%s): producer commit -> consumer effect "
              "commit\n",
              synchronous == "full" ? "FULL" : "NORMAL",
              in_tx ? ", published in the producer's transaction" : "",
              store_options.empty() ? "" : ", ", store_options.c_str(), acquire_note.c_str());
  std::printf("  peak, %d closed-loop producers: %.0f events/s through to their effect "
              "(producers alone committed %.0f/s)\n",
              callers, peak, produced);
  std::printf("  at %s (%.0f/s, %zu events): p50 %.2f ms, p99 %.2f ms, max %.2f ms"
              "  (target p99 <= 5 ms: %s)\n",
              fixed_rate > 0 ? "the rate asked" : "half of peak", rate, lat.size(), pct(0.5),
              pct(0.99), lat.back(), pct(0.99) <= 5.0 ? "met" : "NOT met");
  // Where the time goes: each stage's share, p50 and p99 over the same events.
  std::printf("  stages (ms from the previous stage: p50 / p99):\n");
  nlohmann::json stages = nlohmann::json::array();
  // Published in the producer's transaction, the relay's two stages are inside the
  // producer's: the next stage after its commit is the consumer's claim.
  std::vector<std::pair<Stage, Stage>> steps;
  if (in_tx) steps.emplace_back(kCommitted, kFetched);
  for (size_t st = in_tx ? kHandling : kRelayPublishing; st < kStages; ++st) {
    steps.emplace_back(static_cast<Stage>(st - 1), static_cast<Stage>(st));
  }
  for (auto [from, to] : steps) {
    std::vector<double> d = svc.timeline.Between(half_from, half_from + half_count, from, to);
    if (d.empty()) continue;
    auto q = [&](double p) { return d[std::min(d.size() - 1, static_cast<size_t>(p * d.size()))]; };
    std::printf("    %-16s -> %-16s %7.2f / %7.2f\n", kStageNames[from], kStageNames[to],
                q(0.5), q(0.99));
    stages.push_back({{"from", kStageNames[from]}, {"to", kStageNames[to]},
                      {"p50_ms", q(0.5)}, {"p99_ms", q(0.99)}});
  }
  const double ev = static_cast<double>(half_count);
  std::printf("  per event: %.3f store transactions, %.3f physical commits; "
              "relay %.3f passes (%.3f transactions publishing%s); consumer %.3f fetches, "
              "%.3f claims ahead, %.3f batches, %.3f settles\n",
              (after.transactions - before.transactions) / ev,
              (after.commits - before.commits) / ev,
              (after.relay_passes - before.relay_passes) / ev,
              (after.relay_publishes - before.relay_publishes) / ev,
              in_tx ? ": the producers'" : "", (after.fetches - before.fetches) / ev,
              (after.claims_ahead - before.claims_ahead) / ev,
              (after.batches - before.batches) / ev,
              (after.settles - before.settles) / ev);
  std::printf("  commit floor, one caller alone (300 commits): p50 %.2f ms, p99 %.2f ms; "
              "after a producer's commit the path needs %s (%sthe consumer's claim, made "
              "ahead in the batch before when the consumer is busy; effect)\n",
              fq(0.5), fq(0.99), in_tx ? "1 or 2" : "2 or 3", in_tx ? "" : "relay; ");
  std::printf("  wal: %lld checkpoints during that phase, %lld of them restarts forced by the "
              "writer; %lld pages at its end\n",
              static_cast<long long>(after.checkpoints - before.checkpoints),
              static_cast<long long>(after.restarts - before.restarts),
              static_cast<long long>(after.wal_pages));
  std::printf("  cpu: the process used %.2f cores during that phase", process_cpus);
  if (written_per_event >= 0) {
    std::printf(" and wrote %.1f KiB per event", written_per_event / 1024);
  }
  if (steal_share >= 0) {
    std::printf("; %.1f%% of the machine's cpu time was stolen by its host (/proc/stat: a "
                "hypervisor throttling this VM stalls every thread at once)",
                100 * steal_share);
  }
  std::printf("\n");
  if (!json_path.empty()) {
    nlohmann::json j = {{"benchmark", "e2e_latency"}, {"synchronous", synchronous},
                        {"publish_in_transaction", in_tx}, {"store_options", store_options},
                        {"relay_acquire_interval_ms", acquire_interval_ms},
                        {"peak", peak}, {"produced", produced},
                        {"rate", rate},              {"events", lat.size()},
                        {"p50_ms", pct(0.5)},        {"p99_ms", pct(0.99)},
                        {"max_ms", lat.back()},       {"stages", stages},
                        {"floor_p50_ms", fq(0.5)},   {"floor_p99_ms", fq(0.99)}};
    j["process_cpus"] = process_cpus;
    j["checkpoints"] = after.checkpoints - before.checkpoints;
    j["restarts_forced"] = after.restarts - before.restarts;
    if (written_per_event >= 0) j["written_bytes_per_event"] = written_per_event;
    if (steal_share >= 0) j["steal_share"] = steal_share;
    std::ofstream out(json_path);
    out << j.dump(2) << "\n";
    if (!out) Die("cannot write " + json_path);
  }
  return 0;
}
