// Group commit benchmark against raw SQLite: single-phase idempotent creates (idempotency
// key row + business row + outbox row, one IdempotencyKeys::Execute each) on SQLite WAL,
// synchronous=FULL by default. Each round runs, one after the other on fresh files:
//
//   (a)  serial:  one caller, so every call is its own physical transaction and fsync;
//   (b)  group:   --callers concurrent callers; the writer batches them into commits;
//   (r1) raw, one transaction: the create's statements through the sqlite3 C API
//        (prepared once, the library's own schema, the same statement sequence and row
//        sizes), every call in one transaction: what SQLite itself can do;
//   (r2) raw, batched: the same, committing every B calls, where B is the average batch
//        (b) reached in the same round: what SQLite does with the batching (b) got;
//   (r3) raw behind the handoff: the same raw statements, run by one writer thread for
//        --callers threads that each hand it a call and block until its batch commits,
//        as (b)'s callers do (a queue under a mutex, batches that take the calls queued
//        meanwhile, callers woken in a chain, the first woken early as the commit
//        starts, the writer polling the queue before it sleeps), with no library code
//        at all: what the library's handoff costs by itself. (Its checkpoints are
//        SQLite's default, as r2's: inside COMMIT, where the library runs them on a
//        thread of their own.)
//
// It prints the median and the spread of each mode over --rounds rounds and the ratios
// b/r2, b/r1, b/r3 and r3/r2. With --sweep it also runs (b) at other caller counts, and
// with --json it writes every sample for bench/plot.sh. Run by `make bench`; see
// docs/benchmarks.md.
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "bench/raw_creates.h"
#include "converge/database.h"
#include "converge/idempotency.h"
#include "converge/outbox.h"
#include "src/store/sqlite/arrival_poll.h"
#include "src/store/sqlite/handoff.h"
#include "src/store/sqlite/sqlite_database.h"

namespace {

using converge::Database;
using converge::DatabaseStats;
using converge::IdempotencyKeys;
using converge::Result;
using converge::Status;
using converge::StoredResponse;
using converge::Tx;
using converge_bench::RawCreates;
using SteadyClock = std::chrono::steady_clock;

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "converge_bench: %s\n", what.c_str());
  std::exit(1);
}

// The event of create `n`: the payment "p<n>" captured.
converge::Event BenchEvent(int64_t n) {
  converge::Event e;
  e.type = "payment.captured";
  e.subject = "p" + std::to_string(n);
  e.data = "{\"amount\":" + std::to_string(n % 1000) + "}";
  return e;
}

// A fresh directory with an SQLite file migrated by the library and a payments table.
struct Fixture {
  std::string dir;
  std::string path;
  std::unique_ptr<Database> db;
  std::unique_ptr<IdempotencyKeys> keys;
  converge::Outbox outbox;

  explicit Fixture(bool full) {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base && *base ? base : "/tmp") + "/converge-bench-XXXXXX";
    if (mkdtemp(tmpl.data()) == nullptr) Die("mkdtemp failed");
    dir = tmpl;
    path = dir + "/bench.db";
    auto opened =
        Database::Open("sqlite:" + path + "?synchronous=" + (full ? "full" : "normal"));
    if (!opened) Die("open: " + opened.error().ToString());
    db = std::move(*opened);
    Status st = db->Transact([](Tx& tx) {
      return converge::StatusOf(tx.Exec(
          "CREATE TABLE payments (id TEXT PRIMARY KEY, amount INTEGER NOT NULL)"));
    });
    if (!st.ok()) Die("create table: " + st.ToString());
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
    // The event is prepared (id, checks, envelope) on this thread, not on the writer.
    auto event = outbox.Prepare(BenchEvent(n));
    if (!event) Die("prepare: " + event.error().ToString());
    auto r = keys->Execute({"bench", id, id}, [&](Tx& tx) -> Result<StoredResponse> {
      CONVERGE_RETURN_IF_ERROR(
          tx.Exec("INSERT INTO payments (id, amount) VALUES ($1, $2)", id, n % 1000));
      CONVERGE_RETURN_IF_ERROR(outbox.Enqueue(tx, *event));
      return StoredResponse{201, {}, "{\"id\":\"" + id + "\"}"};
    });
    if (!r) std::fprintf(stderr, "create: %s\n", r.error().ToString().c_str());
    return r.has_value();
  }
};

// What preparing one event (Outbox::Prepare: its id, its checks, its envelope) costs a
// caller, in microseconds of this thread's CPU: `n` of them, the benchmark's event shape.
double PrepareMicros(int n) {
  auto thread_cpu_us = [] {
    timespec ts{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
  };
  converge::Outbox outbox;
  size_t bytes = 0;
  const double t0 = thread_cpu_us();
  for (int i = 0; i < n; ++i) {
    auto event = outbox.Prepare(BenchEvent(i));
    if (!event) Die("prepare: " + event.error().ToString());
    bytes += event->event().envelope.size();
  }
  const double us = thread_cpu_us() - t0;
  if (bytes == 0) Die("prepare: empty envelopes");
  return us / n;
}

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

// CPU seconds this process has used, and what each of its live threads has used (the
// writer's, found by its name, is what the writer levers are judged by: CPU per call
// barely moves with the load other processes put on the machine, where rates do).
double ProcessCpuSeconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

std::map<std::string, double> ThreadCpuSeconds() {
  std::map<std::string, double> out;
  const double tick = static_cast<double>(sysconf(_SC_CLK_TCK));
  for (const auto& task : std::filesystem::directory_iterator("/proc/self/task")) {
    std::ifstream in(task.path() / "stat");
    std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    // Fields after the ")" that closes the thread name: state is 3rd, utime 14th, stime 15th.
    size_t close = stat.rfind(')');
    if (close == std::string::npos) continue;
    std::istringstream fields(stat.substr(close + 2));
    std::string f;
    double utime = 0, stime = 0;
    for (int i = 3; i <= 15 && fields >> f; ++i) {
      if (i == 14) utime = std::stod(f);
      if (i == 15) stime = std::stod(f);
    }
    out[task.path().filename().string()] = (utime + stime) / tick;
  }
  return out;
}

// The seconds a thread of this process has spent runnable but waiting for a CPU
// (/proc/self/task/TID/schedstat, its second field, in nanoseconds); 0 if unknown.
double RunnableWaitSeconds(const std::string& tid) {
  std::ifstream in("/proc/self/task/" + tid + "/schedstat");
  double run_ns = 0, wait_ns = 0;
  if (!(in >> run_ns >> wait_ns)) return 0;
  return wait_ns / 1e9;
}

// The live thread of this process named `name` (/proc/self/task/TID/comm: the name a
// thread gave itself, as SQLite's writer calls itself "cv-sqlite-write"), and the CPU it
// used since `before` (a thread absent then started at 0). The benchmark stops, naming
// the thread, when none or several have the name: a figure for the wrong thread would
// be worse than none.
std::pair<std::string, double> NamedThreadSince(const std::map<std::string, double>& before,
                                                const std::string& name) {
  std::pair<std::string, double> found{"", 0};
  int matches = 0;
  for (const auto& [tid, cpu] : ThreadCpuSeconds()) {
    std::ifstream in("/proc/self/task/" + tid + "/comm");
    std::string comm;
    if (!std::getline(in, comm) || comm != name) continue;
    auto it = before.find(tid);
    found = {tid, cpu - (it == before.end() ? 0 : it->second)};
    ++matches;
  }
  if (matches != 1) {
    Die("found " + std::to_string(matches) + " threads named '" + name + "', expected one");
  }
  return found;
}

struct GroupResult {
  double rate = 0;
  double avg_batch = 0;
  int64_t rolled_back = 0;  // batches a failing create rolled back whole (none expected)
  double writer_us = 0;   // CPU of the writer thread per create
  double writer_runnable_us = 0;  // time it was runnable but had no CPU, per create
  double process_us = 0;  // CPU of the whole process per create
  // The writer's own account of its time (DatabaseStats::writer), per create, and the
  // run's wall time per create.
  DatabaseStats::Writer writer_time_us;
  double wall_us = 0;
  std::vector<double> latency_ms;  // every create's, call to return, sorted
  std::string envelope;  // one outbox payload the run wrote: the raw runs copy its size
};

GroupResult Group(double seconds, int callers, bool full) {
  Fixture f(full);
  std::atomic<int64_t> next{0};
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  const auto threads0 = ThreadCpuSeconds();
  const double cpu0 = ProcessCpuSeconds();
  std::map<std::string, double> runnable0;  // every thread's, as the run starts
  for (const auto& [tid, cpu] : threads0) runnable0[tid] = RunnableWaitSeconds(tid);
  const DatabaseStats::Writer writer0 = *f.db->stats().writer;
  auto t0 = SteadyClock::now();
  std::vector<std::vector<double>> latencies(callers);
  for (int i = 0; i < callers; ++i) {
    threads.emplace_back([&, i] {
      while (!stop.load()) {
        auto start = SteadyClock::now();
        if (!f.Create(next.fetch_add(1))) std::exit(1);
        latencies[i].push_back(
            std::chrono::duration<double, std::milli>(SteadyClock::now() - start).count());
      }
    });
  }
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  stop = true;
  for (auto& t : threads) t.join();
  const auto t1 = SteadyClock::now();
  auto s = f.db->stats();  // the writer's account up to t1 (it waits from the last call on)
  GroupResult g;
  for (const auto& l : latencies) g.latency_ms.insert(g.latency_ms.end(), l.begin(), l.end());
  std::sort(g.latency_ms.begin(), g.latency_ms.end());
  g.rate = next.load() / std::chrono::duration<double>(t1 - t0).count();
  const auto [writer_tid, writer_cpu] = NamedThreadSince(threads0, "cv-sqlite-write");
  g.writer_us = writer_cpu * 1e6 / next.load();
  g.writer_runnable_us =
      (RunnableWaitSeconds(writer_tid) - runnable0[writer_tid]) * 1e6 / next.load();
  g.process_us = (ProcessCpuSeconds() - cpu0) * 1e6 / next.load();
  const double per_create = 1e6 / static_cast<double>(next.load());
  g.writer_time_us.calls = (s.writer->calls - writer0.calls) * per_create;
  g.writer_time_us.commits = (s.writer->commits - writer0.commits) * per_create;
  g.writer_time_us.waiting = (s.writer->waiting - writer0.waiting) * per_create;
  g.wall_us = 1e6 / g.rate;
  // The CREATE TABLE ran before the clock: leave it out of the batch average.
  g.avg_batch = s.commits > 1 ? static_cast<double>(s.transactions - 1) / (s.commits - 1) : 0;
  g.rolled_back = s.bare_batches_rolled_back;
  Status st = f.db->Read([&](Tx& tx) -> Status {
    CONVERGE_ASSIGN_OR_RETURN(auto rows, tx.Query("SELECT payload FROM outbox_events LIMIT 1"));
    if (!rows.empty()) g.envelope = rows[0].Text(0);
    return converge::OkStatus();
  });
  if (!st.ok() || g.envelope.empty()) Die("reading an envelope back failed");
  return g;
}

struct RawResult {
  double rate = 0;           // creates/s
  double cpu_us = 0;         // CPU per create
  double commit_us = 0;      // time in COMMIT per create
  double statements_us = 0;  // the rest of the wall time per create (BEGIN too)
};

// Create `n` through the raw statements, in the open transaction: the payment "p<n>" (the
// key Fixture::Create uses), an event id of a UUID's length and shape.
void RawCreate(RawCreates& raw, int64_t n) {
  char id[32], event_id[48];
  std::snprintf(id, sizeof id, "p%lld", static_cast<long long>(n));
  std::snprintf(event_id, sizeof event_id, "0190f3a2-0000-7000-8000-%012lld",
                static_cast<long long>(n));
  raw.Create(id, event_id, 1764288000000 + n, n % 1000);
}

// `calls` creates, committing every `batch` of them.
RawResult RawRun(RawCreates& raw, int64_t calls, int64_t batch) {
  const double cpu0 = ProcessCpuSeconds();
  auto t0 = SteadyClock::now();
  SteadyClock::duration committing{};
  for (int64_t done = 0; done < calls;) {
    raw.Exec("BEGIN IMMEDIATE");
    for (int64_t i = 0; i < batch && done < calls; ++i, ++done) RawCreate(raw, done);
    const auto commit_started = SteadyClock::now();
    raw.Exec("COMMIT");
    committing += SteadyClock::now() - commit_started;
  }
  const double wall = std::chrono::duration<double>(SteadyClock::now() - t0).count();
  RawResult r;
  r.rate = calls / wall;
  r.cpu_us = (ProcessCpuSeconds() - cpu0) * 1e6 / calls;
  r.commit_us = std::chrono::duration<double>(committing).count() * 1e6 / calls;
  r.statements_us = wall * 1e6 / calls - r.commit_us;
  return r;
}

RawResult Raw(int64_t calls, int64_t batch, bool full, const std::string& envelope) {
  Fixture f(full);  // the library's schema; closed before the raw connection writes
  f.db.reset();
  RawCreates raw(f.path, {.synchronous_full = full}, envelope);
  return RawRun(raw, calls, batch);
}

struct HandoffResult {
  double rate = 0;       // creates/s
  double avg_batch = 0;  // creates per commit
};

// (r3): `callers` threads hand creates to one writer thread running the raw statements,
// the way SqliteDatabase does (its Transact, WriterLoop and RunBatch): a call waits in a
// queue under a mutex; the writer takes what is queued (up to 512), runs it in one
// transaction with the calls queued meanwhile, commits, and wakes the batch's first
// caller, each caller waking the next; after a batch of several callers it may poll the
// queue for up to 50 µs before it sleeps, by the library's rule (ArrivalPoll; since
// 2026-12-03, as the library's writer); as a commit of several callers starts it wakes
// the first early (EarlyWake, Handoff; since 2026-12-03, night). Nothing else: no Status,
// no std::function, no parameters copied, no savepoints, no hooks, no event prepared or
// call timed on the callers.
HandoffResult RawHandoff(double seconds, int callers, bool full, const std::string& envelope) {
  Fixture f(full);  // the library's schema; closed before the raw connection writes
  f.db.reset();
  RawCreates raw(f.path, {.synchronous_full = full}, envelope);
  struct Call {
    int64_t n = 0;
    converge::internal::Handoff handoff;
    Call* next = nullptr;
  };
  constexpr size_t kMaxBatch = 512;  // SqliteDatabase's default max_batch
  const std::chrono::microseconds kSpin{converge::sqlite::Settings().early_wake_us};
  std::mutex mu;
  std::condition_variable work;
  std::deque<Call*> queue;
  std::atomic<size_t> queued{0};  // queue.size(), stored under mu
  bool writer_stop = false;
  int64_t commits = 0, committed = 0;
  std::thread writer([&] {
    std::vector<Call*> batch;
    auto take = [&] {  // mu held
      while (!queue.empty() && batch.size() < kMaxBatch) {
        batch.push_back(queue.front());
        queue.pop_front();
      }
      queued.store(queue.size(), std::memory_order_relaxed);
    };
    // The library's rules and loop (ArrivalPoll, SqliteDatabase::PollForArrivals; EarlyWake,
    // SqliteDatabase::WakeFirstCallerEarly).
    converge::internal::ArrivalPoll arrival_poll(converge::internal::CpusToRunOn());
    converge::internal::EarlyWake early_wake(converge::internal::CpusToRunOn(), kSpin);
    bool poll = false;
    for (;;) {
      if (poll) {
        const auto until = SteadyClock::now() + std::chrono::microseconds(50);
        bool found = false;
        while (!(found = queued.load(std::memory_order_relaxed) > 0) &&
               SteadyClock::now() < until) {
          for (int i = 0; i < 4; ++i) converge::internal::CpuRelax();
        }
        arrival_poll.Polled(found);
      }
      {
        std::unique_lock<std::mutex> l(mu);
        work.wait(l, [&] { return writer_stop || !queue.empty(); });
        if (queue.empty()) return;
        take();
      }
      raw.Exec("BEGIN IMMEDIATE");
      for (size_t i = 0;; ++i) {
        if (i == batch.size()) {
          std::lock_guard<std::mutex> l(mu);
          take();
          if (i == batch.size()) break;
        }
        RawCreate(raw, batch[i]->n);
      }
      const auto commit_started = SteadyClock::now();
      if (early_wake.ShouldWake(batch.size())) batch[0]->handoff.WakeEarly();
      raw.Exec("COMMIT");
      ++commits;
      committed += static_cast<int64_t>(batch.size());
      for (size_t i = 0; i < batch.size(); ++i) {
        batch[i]->next = i + 1 < batch.size() ? batch[i + 1] : nullptr;
      }
      poll = arrival_poll.ShouldPoll(batch.size() > 1);
      batch[0]->handoff.Done();
      if (batch.size() > 1) {
        early_wake.Waited(
            std::chrono::duration<double>(SteadyClock::now() - commit_started).count());
      }
      batch.clear();
    }
  });
  std::atomic<int64_t> next{0};
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  const auto t0 = SteadyClock::now();
  for (int i = 0; i < callers; ++i) {
    threads.emplace_back([&] {
      while (!stop.load()) {
        Call c;
        c.n = next.fetch_add(1);
        if (!c.handoff.ready()) Die("sem_init failed");
        {
          std::lock_guard<std::mutex> l(mu);
          queue.push_back(&c);
          queued.store(queue.size(), std::memory_order_relaxed);
          work.notify_one();
        }
        c.handoff.Wait(kSpin);
        if (c.next != nullptr) c.next->handoff.Done();
      }
    });
  }
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  stop = true;
  for (auto& t : threads) t.join();
  const auto t1 = SteadyClock::now();
  {
    std::lock_guard<std::mutex> l(mu);
    writer_stop = true;
  }
  work.notify_one();
  writer.join();
  HandoffResult h;
  h.rate = committed / std::chrono::duration<double>(t1 - t0).count();
  h.avg_batch = commits > 0 ? static_cast<double>(committed) / commits : 0;
  return h;
}

struct Summary {
  double median, min, max;
};

double Percentile(const std::vector<double>& sorted, double p) {
  if (sorted.empty()) return 0;
  return sorted[std::min(sorted.size() - 1, static_cast<size_t>(p * sorted.size()))];
}

Summary Summarize(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return {v[v.size() / 2], v.front(), v.back()};
}

}  // namespace

int main(int argc, char** argv) {
  // Before any thread uses SQLite (database.h).
  (void)converge::DisableSqliteMemoryAccounting();
  CLI::App app{"converge group-commit benchmark against raw SQLite"};
  double seconds = 3;
  int rounds = 3;
  int callers = 64;
  int64_t raw_calls = 50000;
  bool normal = false;
  std::vector<int> sweep;
  std::string json_path;
  app.add_option("--seconds", seconds, "Duration of each serial and group run")
      ->check(CLI::Range(0.2, 600.0));
  app.add_option("--rounds,--repeats", rounds, "Rounds; each mode's median is reported")
      ->check(CLI::Range(1, 99));
  app.add_option("--callers", callers, "Concurrent callers for group commit")
      ->check(CLI::Range(1, 4096));
  app.add_option("--raw-calls", raw_calls, "Creates in each raw run")
      ->check(CLI::Range(int64_t{1000}, int64_t{10'000'000}));
  app.add_option("--sweep", sweep, "Also run group commit with these caller counts")
      ->delimiter(',')
      ->check(CLI::Range(1, 4096));
  app.add_option("--json", json_path, "Write every sample to this JSON file");
  app.add_flag("--synchronous-normal", normal, "Use synchronous=NORMAL instead of FULL");
  CLI11_PARSE(app, argc, argv);
  const bool full = !normal;
  std::erase(sweep, callers);

  std::printf("idempotent creates (key + business row + outbox row), SQLite WAL synchronous=%s\n",
              full ? "FULL" : "NORMAL");
  std::printf("%d round(s), modes interleaved in each, every run on a fresh file\n", rounds);
  std::vector<double> a, b, r1, r2, r3, r3_batches, batches, writer_us, process_us, r1_us, p50,
      p99;
  // Where the time per create went: (b)'s writer by its own account, and r2's.
  std::vector<double> w_calls, w_commits, w_waiting, w_other, w_runnable, r2_us, r2_statements,
      r2_commits;
  std::vector<double> last_latencies;  // the last round's, for the histogram
  int64_t rolled_back = 0;
  // What a caller of (b) does besides its call, measured alone once: r1 and r2 build no
  // events (they insert the envelope (b) wrote).
  const double prepare_us = PrepareMicros(100000);
  std::map<int, std::vector<double>> swept;
  for (int r = 0; r < rounds; ++r) {
    std::fprintf(stderr, "  round %d/%d: serial...", r + 1, rounds);
    a.push_back(Serial(seconds, full));
    std::fprintf(stderr, " group(%d)...", callers);
    GroupResult g = Group(seconds, callers, full);
    b.push_back(g.rate);
    batches.push_back(g.avg_batch);
    rolled_back += g.rolled_back;
    writer_us.push_back(g.writer_us);
    p50.push_back(Percentile(g.latency_ms, 0.50));
    p99.push_back(Percentile(g.latency_ms, 0.99));
    last_latencies = std::move(g.latency_ms);
    process_us.push_back(g.process_us);
    w_calls.push_back(g.writer_time_us.calls);
    w_runnable.push_back(g.writer_runnable_us);
    w_commits.push_back(g.writer_time_us.commits);
    w_waiting.push_back(g.writer_time_us.waiting);
    w_other.push_back(g.wall_us - g.writer_time_us.calls - g.writer_time_us.commits -
                      g.writer_time_us.waiting);
    std::fprintf(stderr, " raw r1...");
    const RawResult one = Raw(raw_calls, raw_calls, full, g.envelope);
    r1.push_back(one.rate);
    r1_us.push_back(one.cpu_us);
    const int64_t batch = std::max<int64_t>(1, std::llround(g.avg_batch));
    std::fprintf(stderr, " raw r2 (batch %lld)...", static_cast<long long>(batch));
    const RawResult batched = Raw(raw_calls, batch, full, g.envelope);
    r2.push_back(batched.rate);
    r2_us.push_back(batched.cpu_us);
    r2_statements.push_back(batched.statements_us);
    r2_commits.push_back(batched.commit_us);
    std::fprintf(stderr, " raw r3 (%d callers)...", callers);
    const HandoffResult handoff = RawHandoff(seconds, callers, full, g.envelope);
    r3.push_back(handoff.rate);
    r3_batches.push_back(handoff.avg_batch);
    for (int c : sweep) {
      std::fprintf(stderr, " group(%d)...", c);
      swept[c].push_back(Group(seconds, c, full).rate);
    }
    std::fprintf(stderr, " done\n");
  }
  Summary sa = Summarize(a), sb = Summarize(b), s1 = Summarize(r1), s2 = Summarize(r2);
  auto line = [](const char* name, const Summary& s, const std::string& note) {
    std::printf("  %-44s %9.0f creates/s  (min %.0f, max %.0f)%s\n", name, s.median, s.min,
                s.max, note.c_str());
  };
  char note[96];
  std::snprintf(note, sizeof note, "  avg %.1f calls/commit, %lld rolled back",
                Summarize(batches).median, static_cast<long long>(rolled_back));
  line("(a)  serial, one transaction per call", sa, "");
  line(("(b)  group commit, " + std::to_string(callers) + " callers").c_str(), sb, note);
  line("(r1) raw sqlite3, one transaction", s1, "");
  line("(r2) raw sqlite3, (b)'s batch per commit", s2, "");
  std::snprintf(note, sizeof note, "  avg %.1f calls/commit, %d callers",
                Summarize(r3_batches).median, callers);
  line("(r3) raw sqlite3 behind (b)'s handoff", Summarize(r3), note);
  for (const auto& [c, v] : swept) {
    line(("     group commit, " + std::to_string(c) + " callers").c_str(), Summarize(v), "");
  }
  // Ratios per round (both sides measured in the same round), then their median.
  std::vector<double> b_r2, b_r1, b_r3, r3_r2;
  for (int r = 0; r < rounds; ++r) {
    b_r2.push_back(b[r] / r2[r]);
    b_r1.push_back(b[r] / r1[r]);
    b_r3.push_back(b[r] / r3[r]);
    r3_r2.push_back(r3[r] / r2[r]);
  }
  Summary q2 = Summarize(b_r2), q1 = Summarize(b_r1), q3 = Summarize(b_r3),
          h2 = Summarize(r3_r2);
  std::printf("  b/a = %.1fx   b/r2 = %.2f (%.2f..%.2f, target >= 0.85)   "
              "b/r1 = %.2f (%.2f..%.2f, target >= 0.40)\n",
              sb.median / sa.median, q2.median, q2.min, q2.max, q1.median, q1.min, q1.max);
  std::printf("  b/r3 = %.2f (%.2f..%.2f): the library against the handoff alone   "
              "r3/r2 = %.2f (%.2f..%.2f): the handoff's own cost\n",
              q3.median, q3.min, q3.max, h2.median, h2.min, h2.max);

  Summary l50 = Summarize(p50), l99 = Summarize(p99);
  std::printf("  (b) latency per create: p50 %.2f ms (%.2f..%.2f), p99 %.2f ms (%.2f..%.2f)\n",
              l50.median, l50.min, l50.max, l99.median, l99.min, l99.max);
  Summary wu = Summarize(writer_us), pu = Summarize(process_us), ru = Summarize(r1_us);
  std::printf("  CPU per create: (b) writer thread %.1f us (%.1f..%.1f), whole process %.1f us "
              "(%.1f..%.1f); (r1) %.1f us (%.1f..%.1f)\n",
              wu.median, wu.min, wu.max, pu.median, pu.min, pu.max, ru.median, ru.min, ru.max);
  // Wall time per create, medians: (b)'s writer by what it did (DatabaseStats::writer;
  // "other" is what those leave: waking callers, bookkeeping) and how long of it the
  // thread was runnable without a CPU (the kernel's schedstat), r2's by where its thread
  // was.
  std::printf("  time per create: (b) writer %.1f us calls + %.1f commits + %.1f waiting for "
              "calls + %.1f other, of which %.1f runnable without a CPU; (r2) %.1f us "
              "statements + %.1f commits, %.1f us CPU\n",
              Summarize(w_calls).median, Summarize(w_commits).median,
              Summarize(w_waiting).median, Summarize(w_other).median,
              Summarize(w_runnable).median, Summarize(r2_statements).median,
              Summarize(r2_commits).median, Summarize(r2_us).median);

  std::printf("  a caller's event (Outbox::Prepare), alone on one thread: %.2f us of CPU\n",
              prepare_us);

  if (!json_path.empty()) {
    nlohmann::json j = {{"benchmark", "sqlite_creates"},
                        {"synchronous", full ? "FULL" : "NORMAL"},
                        {"seconds", seconds},
                        {"raw_calls", raw_calls},
                        {"callers", callers},
                        {"serial", a},
                        {"group", b},
                        {"avg_batch", batches},
                        {"batches_rolled_back", rolled_back},
                        {"raw_one_tx", r1},
                        {"raw_batched", r2},
                        {"raw_handoff", r3},
                        {"raw_handoff_avg_batch", r3_batches},
                        {"b_over_r3", b_r3},
                        {"r3_over_r2", r3_r2},
                        {"b_over_r2", b_r2},
                        {"b_over_r1", b_r1},
                        {"writer_cpu_us", writer_us},
                        {"process_cpu_us", process_us},
                        {"raw_one_tx_cpu_us", r1_us},
                        {"raw_batched_cpu_us", r2_us},
                        {"raw_batched_statements_us", r2_statements},
                        {"raw_batched_commit_us", r2_commits},
                        {"writer_calls_us", w_calls},
                        {"writer_commits_us", w_commits},
                        {"writer_waiting_us", w_waiting},
                        {"writer_other_us", w_other},
                        {"writer_runnable_us", w_runnable},
                        {"group_p50_ms", p50},
                        {"group_p99_ms", p99},
                        {"prepare_us", prepare_us}};
    // The last round's latencies in 0.25 ms buckets: bucket i counts [i/4, (i+1)/4) ms.
    std::vector<int64_t> histogram;
    for (double ms : last_latencies) {
      size_t i = static_cast<size_t>(ms * 4);
      if (histogram.size() <= i) histogram.resize(i + 1, 0);
      ++histogram[i];
    }
    j["group_latency_histogram_quarter_ms"] = histogram;
    nlohmann::json sw = nlohmann::json::object();
    for (const auto& [c, v] : swept) sw[std::to_string(c)] = v;
    j["group_by_callers"] = sw;
    std::ofstream out(json_path);
    out << j.dump(2) << "\n";
    if (!out) Die("cannot write " + json_path);
  }
  return 0;
}
