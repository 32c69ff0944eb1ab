// Cost as tables grow: the create rate and the inbox claim rate on a store holding
// --rows idempotency keys and --rows inbox rows, against the same rates on an empty store
// measured in the same round, and the sweeper's deletion rate while creates run.
//
//   converge_scale_bench preload --uri URI --rows N [--expired F] [--inbox-expired F2]
//       fills the store's idempotency_keys and consumer_inbox with N rows each (completed
//       keys with a stored response; applied inbox rows), a fraction F of them expired (the
//       sweeper's supply; F2 of the inbox rows, F unless given), the rest expiring within
//       24 h. Keys and event ids spread evenly over the hex space the benchmark's random
//       keys fall into, so a new key lands between old ones as a client's UUID would;
//       expiry times are uncorrelated with the keys, so a sweep batch deletes from all over
//       the table, as it would in service. With --order random (the default) the keys go
//       in in no order, about as creates insert them; --order sorted inserts them in key
//       order, faster, leaving every leaf filled alike and the pages in key order in the
//       file (Order, below).
//       Chunks of one INSERT ... SELECT over a generated series (SQLite: a recursive CTE;
//       PostgreSQL: generate_series), the expiry indexes (where the store keeps them: not
//       on SQLite, which sweeps in key order) dropped during the load and rebuilt after it
//       with their own definitions read from the catalogue.
//   converge_scale_bench run --uri LOADED --empty-uri EMPTY [--seconds S] [--rounds R]
//       R rounds, each measuring, one after the other:
//         empty     creates on EMPTY (emptied first: a fresh file, or TRUNCATE), then
//                   inbox claims on it
//         raw empty (SQLite) the same creates through raw sqlite3 (bench/raw_creates.h: the
//                   same statements and rows, no library code, checkpoints beside the
//                   writer as the library's), committing every B calls, where B is the
//                   batch (empty) reached, on a fresh EMPTY
//         loaded    creates on LOADED, then inbox claims on it
//         raw loaded (SQLite) raw creates on LOADED at the batch (loaded) reached: raw
//                   loaded / raw empty is what the table size costs SQLite itself on this
//                   disk with the batches group commit got. It is a reference, not a
//                   bound on the library's loaded / empty: a library adding a fixed cost
//                   to every create would show a higher ratio. Library / raw on each
//                   store compares the library with SQLite itself (within the noise of a
//                   few seconds' run it comes out above 1 too), and how it moves from the
//                   empty store to the loaded one is the library's part of what grows
//                   with the table.
//         raw loaded at the empty batch (SQLite) raw creates on LOADED at the batch
//                   (empty) reached: raw sqlite3 at one batch on both stores, so that
//                   this over raw empty is what the table size costs SQLite itself,
//                   whatever batches group commit gathered on the loaded store
//         raw paced (SQLite) raw creates on LOADED at that batch while a raw sweep (the
//                   library's windows in key order and its DELETEs, no library code)
//                   deletes in their transactions at the raw loaded rate: what a sweeper
//                   keeping up costs SQLite itself, against paced below
//       Every run on LOADED starts, outside the clock, with its payments and outbox tables
//       emptied, as EMPTY's are (the runs before left their creates' rows there), and on
//       SQLite with the WAL checkpointed.
//         swept     creates on LOADED while a sweeper deletes flat out (Sweeper::RunOnce
//                   in a loop, as the Runtime does while it finds full batches: a backlog)
//         paced     creates on LOADED while a sweeper deletes at the rate the loaded
//                   creates reached (RunOnce calls spaced by the rows each deleted over
//                   that rate): the steady state of a 24 h TTL, where rows expire as fast
//                   as they were created
//       and prints medians, spreads and per-round ratios against the empty store.
//   converge_scale_bench walk --uri LOADED [--pass S] [--interval I] [--wraps W]
//       on a store that sweeps in key order (SQLite), preloaded and never swept: creates
//       alone, then creates while a sweeper runs as the Runtime runs it until the walk of
//       each table has reached the end of its table W times (the first walk flat out, the
//       later ones paced to take S seconds), a progress line every --report seconds, then
//       creates alone again. With --control, the same without a sweeper for --seconds: run
//       on a copy of the same store, it tells the walks' cost from the drift of creates as
//       the store grows.
//
// A create is the single-phase idempotent create of the other benchmarks
// (IdempotencyKeys::Execute: key row, business row, outbox row, stored response); an
// inbox claim is Inbox::Claim in its own transaction. Keys and event ids are random.
// bench/scale_bench.sh runs both stores; docs/design/retention.md has the figures.
#include <sqlite3.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "bench/raw_creates.h"
#include "converge/database.h"
#include "converge/idempotency.h"
#include "converge/inbox.h"
#include "converge/offset_clock.h"
#include "converge/outbox.h"
#include "converge/sweeper.h"
#include "src/core/idempotency_internal.h"
#include "src/store/sqlite/sqlite_database.h"

namespace {

using converge::Database;
using converge::Result;
using converge::Status;
using converge::Tx;
using Steady = std::chrono::steady_clock;

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "converge_scale_bench: %s\n", what.c_str());
  std::exit(1);
}

void Check(const Status& st, const std::string& what) {
  if (!st.ok()) Die(what + ": " + st.ToString());
}

bool IsPostgres(const std::string& uri) { return uri.rfind("postgres", 0) == 0; }

std::unique_ptr<Database> Open(const std::string& uri, int pool) {
  auto db = Database::Open(
      Database::WithDefaultParameter(uri, "pool_size", std::to_string(pool)));
  if (!db) Die("open " + uri + ": " + db.error().ToString());
  Check((*db)->Transact([](Tx& tx) {
    return converge::StatusOf(tx.Exec(
        "CREATE TABLE IF NOT EXISTS payments (id TEXT PRIMARY KEY, amount BIGINT NOT NULL)"));
  }),
        "create payments");
  return std::move(*db);
}

int64_t Count(Database& db, const std::string& table) {
  int64_t n = 0;
  Check(db.Read([&](Tx& tx) -> Status {
    CONVERGE_ASSIGN_OR_RETURN(auto rows, tx.Query("SELECT count(*) FROM " + table));
    n = rows[0].Int(0);
    return converge::OkStatus();
  }),
        "count " + table);
  return n;
}

int64_t NowMillis() { return converge::Clock::System()->NowMillis(); }

// ---- preload ----------------------------------------------------------------------

// 16^15: preloaded keys are 15 hex digits, k * (kSpace / rows) for k in [0, rows), so they
// spread evenly over the space the first 15 digits of a random 32-digit key fall into.
constexpr int64_t kSpace = int64_t{1} << 60;

// The order the preload inserts its keys in.
enum class Order {
  // In no order, about as a service's creates insert them: row i gets k = i * kPermute mod
  // rows (a permutation of [0, rows): kPermute is a prime above the --rows limit), and
  // each chunk of rows goes in shuffled. The leaves of SQLite's B-trees then come out
  // about as full as random inserts leave them (in a 200k-row test, 20.0-20.7 keys a leaf
  // for the permutation alone, 20.2 for a true shuffle, 21.0 in key order).
  kRandom,
  // In key order (k = i): faster, but every leaf of a key B-tree is filled alike, as full
  // as the engine packs an append (SQLite's: about 88%, room for two more of the
  // benchmark's keys). By the WAL pages they write, the first creates then split few
  // leaves, and once each leaf has taken its two, many split at once; SQLite's loaded
  // store ran far faster than one preloaded in no order (docs/design/retention.md, "A
  // preload in key order").
  kSorted,
};
constexpr int64_t kPermute = 3'037'000'493;  // prime; times rows < 2^63 for rows <= 1e9

// The rows [first, end) of `table`: the SELECT part over a series `i`, per backend.
std::string SeriesInsert(bool pg, const std::string& insert, const std::string& select,
                         Order order, int64_t rows) {
  // $1 first, $2 end, $3 key step, $4 now, $5 expired per mille; the rest are the
  // table's own. A row's expiry comes from a multiplicative hash of i, uncorrelated with
  // its key: expired ones up to an hour ago, the others over the next 24 h.
  std::string sql = select;
  auto replace = [&](const std::string& from, const std::string& to) {
    for (size_t p = 0; (p = sql.find(from, p)) != std::string::npos; p += to.size()) {
      sql.replace(p, from.size(), to);
    }
  };
  const std::string k = order == Order::kSorted
                            ? std::string("i")
                            : "((i * " + std::to_string(kPermute) + ") % " +
                                  std::to_string(rows) + ")";
  // k alone goes through the keys in a regular pattern (at 10M rows, ten interleaved
  // ascending runs, 4,930 keys apart): each chunk's rows go in shuffled as well.
  const std::string shuffle = order == Order::kSorted ? "" : " ORDER BY random()";
  replace("{key}", pg ? "lpad(to_hex(" + k + " * $3::bigint), 15, '0')"
                      : "printf('%015x', " + k + " * $3)");
  replace("{expires}",
          "CASE WHEN (i * 2654435761) % 1000 < $5 THEN $4 - 1000 - (i * 40503) % 3600000 "
          "ELSE $4 + 60000 + (i * 40503) % 86400000 END");
  if (pg) {
    // Each parameter typed once, as PostgreSQL cannot deduce one type from two uses.
    replace("$4", "$4::bigint");
    replace("$5", "$5::bigint");
    replace("$6", "$6::bytea");
    return insert + " " + sql + " FROM generate_series($1::bigint, $2::bigint - 1) AS s(i)" +
           shuffle;
  }
  return "WITH RECURSIVE s(i) AS (SELECT $1 UNION ALL SELECT i + 1 FROM s WHERE i + 1 < $2) " +
         insert + " " + sql + " FROM s" + shuffle;
}

// Whether the store keeps keys and inbox rows in time-partitioned tables.
bool Partitioned(Database& db) {
  bool partitioned = false;
  Check(db.Transact([&](Tx& tx) {
    partitioned = tx.time_partitions() != nullptr;
    return converge::OkStatus();
  }),
        "ask the store");
  return partitioned;
}

// The memory this process may use, in MiB: the machine's, or its cgroup's limit where
// that is lower (cgroup v2's memory.max, v1's memory.limit_in_bytes).
int64_t UsableMemoryMib() {
  int64_t bytes = int64_t{sysconf(_SC_PHYS_PAGES)} * sysconf(_SC_PAGE_SIZE);
  for (const char* path :
       {"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"}) {
    std::ifstream in(path);
    int64_t limit = 0;
    if (in >> limit && limit > 0) bytes = std::min(bytes, limit);  // "max" fails to parse
  }
  return bytes >> 20;
}

void Preload(const std::string& uri, int64_t rows, double expired, double inbox_expired,
             int age_days, bool outbox, Order order) {
  const bool pg = IsPostgres(uri);
  // SQLite writes every page a transaction changed to the WAL at its commit, so keys in
  // no order go in one transaction a table, not one a chunk (each chunk would change most
  // leaves again), with a page cache that holds the table (400 bytes a row, about twice
  // a key row's pages), unless the URI sets one. At most a quarter of the memory this
  // process may use: each chunk's statement journal (temp_store=MEMORY) and the shuffle's
  // sort come on top. Past the cache SQLite writes pages to the WAL before the commit:
  // slower, not wrong. PostgreSQL commits chunk by chunk either way.
  const bool one_tx = !pg && order == Order::kRandom;
  const int64_t cache_mib = std::clamp<int64_t>(
      std::min<int64_t>(rows * 400 / (1 << 20), UsableMemoryMib() / 4), 16, 1 << 16);
  auto db = Open(
      one_tx ? Database::WithDefaultParameter(uri, "cache_mib", std::to_string(cache_mib)) : uri,
      2);
  const int64_t step = kSpace / rows;
  // Rows written `age_days` ago: with age_days >= 2 every one has expired by now, and on a
  // time-partitioned store they all sit in one partition whose day has ended.
  const int64_t now = NowMillis() - age_days * int64_t{86'400'000};
  const bool partitioned = Partitioned(*db);
  if (partitioned) {
    // The partitions of that day onwards, as a sweeper running then would have made them.
    converge::OffsetClock then;
    then.SetOffset(std::chrono::hours(-24 * age_days));
    converge::Sweeper sweeper(*db, {.partitions_ahead = age_days + 1}, &then);
    auto made = sweeper.RunOnce();
    if (!made) Die("create partitions: " + made.error().ToString());
  }
  const converge::Blob body{"{\"id\":\"pay_0000000000\"}"};
  struct Table {
    std::string name, index, insert, select;
    double expired = 0;  // the fraction of rows already expired ({expires})
  };
  std::vector<Table> tables = {
      {"idempotency_keys", "idempotency_keys_expires",
       "INSERT INTO idempotency_keys (scope, key, request_hash, status, recovery_point, "
       "lease_until, fence, response_status, response_headers, response_body, created_at, "
       "updated_at, expires_at)",
       "SELECT 'bench', {key}, "
       "'a3f1c2d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90', 'completed', "
       "'finished', $4, 1, 201, '[]', $6, $4, $4, {expires}", expired},
      {"consumer_inbox", "consumer_inbox_expires",
       "INSERT INTO consumer_inbox (consumer, source, event_id, processed_at, expires_at, "
       "outcome)",
       "SELECT 'bench', 'urn:converge', {key}, $4, {expires}, 'applied'", inbox_expired},
  };
  if (outbox) {
    // Events published when they were written, `age_days` ago.
    tables.push_back(
        {"outbox_events", "outbox_published",
         "INSERT INTO outbox_events (event_id, source, aggregate_type, aggregate_id, type, "
         "payload, created_at, published_at, publish_attempts)",
         "SELECT {key}, 'urn:converge', 'bench', {key}, 'bench.created', '{}', $4, $4, 1"});
  }
  const int64_t chunk = 250000;
  for (const Table& t : tables) {
    // The expiry index is rebuilt after the load (a sort) rather than grown row by row at
    // random places: its own definition, from the catalogue.
    std::string index_sql;
    Check(db->Transact([&](Tx& tx) -> Status {
      CONVERGE_ASSIGN_OR_RETURN(
          auto r, tx.Query(pg ? "SELECT pg_get_indexdef(oid) FROM pg_class WHERE relname = $1"
                              : "SELECT sql FROM sqlite_master WHERE type = 'index' AND "
                                "name = $1",
                           t.index));
      if (r.empty()) {
        // A store that sweeps in key order keeps no expiry index (migration 13).
        if (tx.dialect().SweepsInKeyOrder() && t.index.ends_with("_expires")) {
          return converge::OkStatus();
        }
        return converge::InternalError("no index " + t.index);
      }
      index_sql = r[0].Text(0);
      // A partitioned table's index reads "ON ONLY t": that would not build the
      // partitions' indexes.
      if (const size_t only = index_sql.find(" ON ONLY "); only != std::string::npos) {
        index_sql.erase(only + 3, 5);
      }
      if (partitioned) {
        // The preloaded ids are distinct by construction: the uniqueness trigger, which
        // would take one advisory lock per row, is off for the load only.
        CONVERGE_RETURN_IF_ERROR(converge::StatusOf(tx.Exec(
            "ALTER TABLE " + t.name + " DISABLE TRIGGER " + t.name + "_unique")));
      }
      if (index_sql.empty()) return converge::OkStatus();
      return converge::StatusOf(tx.Exec("DROP INDEX " + t.index));
    }),
          "drop " + t.index);
    const std::string sql = SeriesInsert(pg, t.insert, t.select, order, rows);
    const auto t0 = Steady::now();
    // The chunks from `first` on, in `tx`; all of them, or only the first.
    auto load = [&](Tx& tx, int64_t first, bool all) -> Status {
      for (; first < rows; first += chunk) {
        const int64_t end = std::min(rows, first + chunk);
        // The parameters the table's statement uses ($5 comes with {expires}).
        std::vector<converge::Value> params = {first, end, step, now};
        if (t.select.find("{expires}") != std::string::npos) {
          params.emplace_back(static_cast<int64_t>(t.expired * 1000));
        }
        if (t.select.find("$6") != std::string::npos) params.emplace_back(body);
        CONVERGE_RETURN_IF_ERROR(converge::StatusOf(tx.ExecParams(sql, params)));
        const double secs = std::chrono::duration<double>(Steady::now() - t0).count();
        std::fprintf(stderr, "\r  preload %-16s %11lld / %lld rows (%3.0f%%), %.0f rows/s   ",
                     t.name.c_str(), static_cast<long long>(end),
                     static_cast<long long>(rows), 100.0 * end / rows, end / secs);
        if (!all) break;
      }
      if (all) std::fprintf(stderr, "committing...");
      return converge::OkStatus();
    };
    if (one_tx) {
      Check(db->Transact([&](Tx& tx) { return load(tx, 0, true); }), "preload " + t.name);
      std::fprintf(stderr, " done");
    } else {
      for (int64_t first = 0; first < rows; first += chunk) {
        Check(db->Transact([&](Tx& tx) { return load(tx, first, false); }),
              "preload " + t.name);
      }
    }
    if (!index_sql.empty()) std::fprintf(stderr, "\n  rebuilding %s...", t.index.c_str());
    Check(db->Transact([&](Tx& tx) -> Status {
      if (partitioned) {
        CONVERGE_RETURN_IF_ERROR(converge::StatusOf(
            tx.Exec("ALTER TABLE " + t.name + " ENABLE TRIGGER " + t.name + "_unique")));
      }
      if (index_sql.empty()) return converge::OkStatus();
      return converge::StatusOf(tx.Exec(index_sql));
    }),
          "create " + t.index);
    std::fprintf(stderr, " %.0f s in all\n",
                 std::chrono::duration<double>(Steady::now() - t0).count());
  }
}

// ---- workloads --------------------------------------------------------------------

// Writes the file system's dirty pages out before any clock starts. A store just preloaded
// or copied leaves gigabytes of them, and the kernel writing them back during the first
// round made its loaded creates run at 0.14-0.45 of the next round's rate (all 4 runs of
// 2026-12-02 without it; docs/design/retention.md).
void FlushDirtyPages() {
  std::fprintf(stderr, "  sync: writing the file system's dirty pages out first...");
  const auto t0 = Steady::now();
  ::sync();
  std::fprintf(stderr, " %.1f s\n", std::chrono::duration<double>(Steady::now() - t0).count());
}

// A random 32-hex-digit id, like a client's UUID.
std::string RandomId(std::mt19937_64& rng) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "%016llx%016llx", static_cast<unsigned long long>(rng()),
                static_cast<unsigned long long>(rng()));
  return buf;
}

// `callers` threads running `op` (shared; it must be safe to call from all of them) until
// Stop(); done() counts the calls that succeeded. A call that fails ends the benchmark.
template <class Op>
class Load {
 public:
  Load(int callers, Op& op) {
    for (int i = 0; i < callers; ++i) {
      threads_.emplace_back([this, &op, i] {
        std::mt19937_64 rng(std::random_device{}() ^ (static_cast<uint64_t>(i) << 32));
        while (!stop_.load()) {
          if (!op(rng)) std::exit(1);
          done_.fetch_add(1);
        }
      });
    }
  }
  ~Load() { Stop(); }
  int64_t done() const { return done_.load(); }
  void Stop() {
    stop_ = true;
    for (auto& t : threads_) t.join();
    threads_.clear();
  }

 private:
  std::atomic<int64_t> done_{0};
  std::atomic<bool> stop_{false};
  std::vector<std::thread> threads_;
};

// Runs `op` from `callers` threads for `seconds`; returns successful ops per second.
template <class Op>
double Drive(int callers, double seconds, Op&& op) {
  const auto t0 = Steady::now();
  Load<std::remove_reference_t<Op>> load(callers, op);
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  load.Stop();
  return load.done() / std::chrono::duration<double>(Steady::now() - t0).count();
}

// One create: the single-phase idempotent create of the other benchmarks, with a random
// key. Returns false when it failed.
class Creator {
 public:
  explicit Creator(Database& db) : keys_(db) {}
  bool operator()(std::mt19937_64& rng) {
    const std::string id = RandomId(rng);
    converge::Event e;
    e.type = "payment.captured";
    e.subject = id;
    e.data = "{\"amount\":5}";
    auto event = outbox_.Prepare(std::move(e));
    if (!event) Die("prepare: " + event.error().ToString());
    auto r = keys_.Execute({"bench", id, id}, [&](Tx& tx) -> Result<converge::StoredResponse> {
      CONVERGE_RETURN_IF_ERROR(
          tx.Exec("INSERT INTO payments (id, amount) VALUES ($1, $2)", id, 5));
      CONVERGE_RETURN_IF_ERROR(outbox_.Enqueue(tx, *event));
      return converge::StoredResponse{201, {}, "{\"id\":\"" + id + "\"}"};
    });
    if (!r) std::fprintf(stderr, "create: %s\n", r.error().ToString().c_str());
    return r.has_value();
  }

 private:
  converge::IdempotencyKeys keys_;
  converge::Outbox outbox_;
};

double Creates(Database& db, int callers, double seconds) {
  return Drive(callers, seconds, Creator(db));
}

double Claims(Database& db, int callers, double seconds) {
  converge::Inbox inbox;
  return Drive(callers, seconds, [&](std::mt19937_64& rng) {
    const std::string id = RandomId(rng);
    Status st = db.Transact([&](Tx& tx) -> Status {
      CONVERGE_ASSIGN_OR_RETURN(auto claim, inbox.Claim(tx, "bench", {"urn:converge", id},
                                                        std::chrono::hours(24 * 14)));
      (void)claim;
      return converge::OkStatus();
    });
    if (!st.ok()) std::fprintf(stderr, "claim: %s\n", st.ToString().c_str());
    return st.ok();
  });
}

struct SweptRun {
  double creates = 0;
  double keys_deleted = 0;   // per second
  double inbox_deleted = 0;  // per second
  bool ran_dry = false;  // a batch came back short, or a walk ended: expired rows ran out
};

// Creates while a sweeper deletes: flat out when `pace` is 0, else RunOnce calls spaced
// so that the rows each deleted (a batch per table, or a window's expired rows where the
// store sweeps in key order) take rows / pace seconds.
// `sweeper` sweeps `db`; one serves every run, so that a walk in key order goes on where
// the last run left it, as it would in service (a new one would start at the table's
// beginning, which earlier runs have swept).
SweptRun CreatesWhileSweeping(Database& db, converge::Sweeper& sweeper, int callers,
                              double seconds, double pace) {
  std::atomic<bool> stop{false};
  int64_t keys = 0, inbox = 0;
  bool dry = false;
  const auto t0 = Steady::now();
  std::thread sweep([&] {
    auto next = Steady::now();
    while (!stop.load()) {
      if (pace > 0) {  // the next call once the last one's rows' worth of time has passed
        while (!stop.load() && Steady::now() < next) {
          std::this_thread::sleep_for(std::chrono::milliseconds(5));
        }
        if (stop.load()) break;
      }
      auto s = sweeper.RunOnce();
      if (!s) Die("sweep: " + s.error().ToString());
      keys += s->keys;
      inbox += s->inbox;
      next += std::chrono::duration_cast<Steady::duration>(
          std::chrono::duration<double>(std::max(s->keys, s->inbox) / std::max(pace, 1.0)));
      // A batch came back short, or a walk in key order reached the end of its table.
      if (!s->more || s->walks_completed > 0) dry = true;
    }
  });
  SweptRun r;
  r.creates = Creates(db, callers, seconds);
  stop = true;
  sweep.join();
  const double secs = std::chrono::duration<double>(Steady::now() - t0).count();
  r.keys_deleted = keys / secs;
  r.inbox_deleted = inbox / secs;
  r.ran_dry = dry;
  return r;
}

// What an SQLite store's URI asks for: its file and its settings.
converge::sqlite::Settings SqliteSettings(const std::string& uri) {
  std::string location = uri.substr(uri.find(':') + 1);
  if (location.rfind("//", 0) == 0) location = location.substr(2);
  auto settings = converge::sqlite::ParseLocation(location);
  if (!settings) Die(uri + ": " + settings.error().ToString());
  return *settings;
}
std::string SqlitePath(const std::string& uri) { return SqliteSettings(uri).path; }

// Copies every page of an idle SQLite store's WAL into its file and empties the WAL,
// outside any clock, so that each timed run on the loaded store starts as the others do,
// not with the frames the run before left (up to 16 MiB of random writes into the file).
// The library's checkpointer may still be in a pass the last commits woke: a checkpoint
// finding the checkpoint lock taken fails at once with SQLITE_BUSY (the busy handler
// covers only the writer and readers), so it tries again until a deadline.
void SettleWal(const std::string& uri) {
  sqlite3* db = nullptr;
  const std::string path = SqlitePath(uri);
  int rc = sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READWRITE, nullptr);
  if (rc == SQLITE_OK) rc = sqlite3_busy_timeout(db, 10000);
  const auto deadline = Steady::now() + std::chrono::seconds(60);
  while (rc == SQLITE_OK) {
    rc = sqlite3_wal_checkpoint_v2(db, nullptr, SQLITE_CHECKPOINT_TRUNCATE, nullptr, nullptr);
    if (rc != SQLITE_BUSY || Steady::now() > deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    rc = SQLITE_OK;
  }
  if (rc != SQLITE_OK) {
    Die("checkpoint " + path + " before a loaded run" +
        (rc == SQLITE_BUSY ? " (another checkpoint or a reader held it for 60 s)" : "") + ": " +
        (db ? sqlite3_errmsg(db) : "out of memory"));
  }
  sqlite3_close_v2(db);
}

// Readies the loaded store for a timed run, outside the clock. The run before left its
// creates' payments rows and outbox events there (no relay publishes them, no sweep
// removes them), while each run on the empty store starts with those tables empty; carried
// from run to run they slowed the loaded creates (loaded / empty 0.66 and 0.67 with them,
// 0.84 and 1.03 without, one round each: docs/design/retention.md).
// The table size measured is the library's dedupe tables', so both are emptied: the
// application's own table is not the library's cost, and a service's relay publishes its
// events as they come and the sweeper removes them later. On SQLite the WAL is then
// checkpointed (SettleWal).
void Ready(Database& db, const std::string& uri) {
  Check(db.Transact([&](Tx& tx) -> Status {
    if (IsPostgres(uri)) return converge::StatusOf(tx.Exec("TRUNCATE payments, outbox_events"));
    CONVERGE_RETURN_IF_ERROR(tx.Exec("DELETE FROM payments"));
    return converge::StatusOf(tx.Exec("DELETE FROM outbox_events"));
  }),
        "empty the loaded store's payments and outbox events");
  if (!IsPostgres(uri)) SettleWal(uri);
}

// An empty store: a fresh SQLite file, or the tables emptied on PostgreSQL.
std::unique_ptr<Database> Emptied(const std::string& uri, int pool) {
  if (!IsPostgres(uri)) {
    const std::string path = SqlitePath(uri);
    for (const char* suffix : {"", "-wal", "-shm"}) std::filesystem::remove(path + suffix);
    return Open(uri, pool);
  }
  auto db = Open(uri, pool);
  Check(db->Transact([](Tx& tx) {
    return converge::StatusOf(
        tx.Exec("TRUNCATE idempotency_keys, consumer_inbox, outbox_events, payments"));
  }),
        "truncate");
  return db;
}

// Rows the benchmark's sweepers delete from a table in one transaction.
constexpr int64_t kSweepBatch = 1000;

// The library's sweep in key order (src/core/sweeper.cc, WalkOnce) with none of its code,
// paced as the benchmark paces the library's: the reference for creates with a sweeper
// keeping up. A thread on a connection of its own finds each table's windows ahead, as
// the library's sweeper reads them off the writer: the next `window` rows after the last
// window, cut after the `batch`-th forgettable one, by the library's statements. The
// writer deletes a window of each table in the transaction of a batch of creates, as the
// library's sweep joins a group commit, once the time the last pair's rows took at `pace`
// has passed; it keeps no walk position in the store (the library saves its own in
// sweep_walks) and counts no rows.
class RawSweep {
 public:
  struct Table {
    std::string name, key_columns, forgettable;  // forgettable: SQL with ?1 = now
    std::vector<std::string> after;              // where the walk starts: a key
  };
  RawSweep(const std::string& path, std::vector<Table> tables, int64_t window, int64_t batch,
           double pace)
      : tables_(std::move(tables)), window_(window), batch_(batch), pace_(pace) {
    if (sqlite3_open_v2(path.c_str(), &reader_, SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX,
                        nullptr) != SQLITE_OK) {
      Die("raw sweep: open " + path + ": " + sqlite3_errmsg(reader_));
    }
    sqlite3_busy_timeout(reader_, 5000);
    ready_.resize(tables_.size());
    deleted_.resize(tables_.size());
    finder_ = std::thread([this] { Find(); });
  }
  ~RawSweep() {
    {
      std::lock_guard<std::mutex> l(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    finder_.join();
    sqlite3_close_v2(reader_);
  }
  RawSweep(const RawSweep&) = delete;
  RawSweep& operator=(const RawSweep&) = delete;

  // In `writer`'s open transaction: one window of each table deleted when they are due
  // and found.
  void MaybeDelete(sqlite3* writer, int64_t now) {
    if (Steady::now() < next_) return;
    std::vector<Window> pair;
    {
      std::lock_guard<std::mutex> l(mu_);
      for (const auto& q : ready_) {
        if (q.empty()) return;
      }
      for (auto& q : ready_) {
        pair.push_back(std::move(q.front()));
        q.erase(q.begin());
      }
    }
    cv_.notify_all();
    int64_t most = 0;
    for (size_t t = 0; t < pair.size(); ++t) {
      const Table& table = tables_[t];
      std::vector<std::string> params;
      const std::string sql = "DELETE FROM " + table.name + " WHERE (" + table.forgettable +
                              ") AND " + Range(table, pair[t].after, pair[t].end, &params);
      sqlite3_stmt* stmt = Prepare(writer, sql);
      sqlite3_bind_int64(stmt, 1, now);
      Bind(stmt, params);
      if (sqlite3_step(stmt) != SQLITE_DONE) {
        Die("raw sweep: " + sql + ": " + sqlite3_errmsg(writer));
      }
      sqlite3_finalize(stmt);
      const int64_t n = sqlite3_changes64(writer);
      deleted_[t] += n;
      most = std::max(most, n);
    }
    next_ += std::chrono::duration_cast<Steady::duration>(
        std::chrono::duration<double>(most / std::max(pace_, 1.0)));
  }
  int64_t deleted(size_t table) const { return deleted_[table]; }

 private:
  struct Window {
    std::vector<std::string> after, end;  // end empty: to the end of the table
  };

  // "(key) > (?2, ...) [AND (key) <= (...)]", its values appended to `params` (?1 is now).
  static std::string Range(const Table& t, const std::vector<std::string>& after,
                           const std::vector<std::string>& end,
                           std::vector<std::string>* params) {
    std::string sql = "1 = 1";
    for (const auto* bound : {&after, &end}) {
      if (bound->empty()) continue;
      sql += " AND (" + t.key_columns + ")" + (bound == &after ? " > (" : " <= (");
      for (size_t i = 0; i < bound->size(); ++i) {
        sql += (i ? ", ?" : "?") + std::to_string(params->size() + 2);
        params->push_back((*bound)[i]);
      }
      sql += ")";
    }
    return sql;
  }
  static sqlite3_stmt* Prepare(sqlite3* db, const std::string& sql) {
    sqlite3_stmt* stmt = nullptr;
    if (sqlite3_prepare_v2(db, sql.c_str(), -1, &stmt, nullptr) != SQLITE_OK) {
      Die("raw sweep: " + sql + ": " + sqlite3_errmsg(db));
    }
    return stmt;
  }
  static void Bind(sqlite3_stmt* stmt, const std::vector<std::string>& params) {
    for (size_t i = 0; i < params.size(); ++i) {
      sqlite3_bind_text64(stmt, static_cast<int>(i) + 2, params[i].data(), params[i].size(),
                          SQLITE_TRANSIENT, SQLITE_UTF8);
    }
  }
  // The first key of the query's first row, or none.
  std::vector<std::string> FirstKey(const std::string& sql,
                                    const std::vector<std::string>& params, size_t key_size,
                                    int64_t now) {
    sqlite3_stmt* stmt = Prepare(reader_, sql);
    sqlite3_bind_int64(stmt, 1, now);
    Bind(stmt, params);
    std::vector<std::string> key;
    const int rc = sqlite3_step(stmt);
    if (rc == SQLITE_ROW) {
      for (size_t i = 0; i < key_size; ++i) {
        const auto* text =
            reinterpret_cast<const char*>(sqlite3_column_text(stmt, static_cast<int>(i)));
        key.emplace_back(text ? text : "");
      }
    } else if (rc != SQLITE_DONE) {
      Die("raw sweep: " + sql + ": " + sqlite3_errmsg(reader_));
    }
    sqlite3_finalize(stmt);
    return key;
  }
  // Keeps two windows of each table found ahead of the writer.
  void Find() {
    for (;;) {
      for (size_t t = 0; t < tables_.size(); ++t) {
        {
          std::unique_lock<std::mutex> l(mu_);
          cv_.wait(l, [&] { return stopping_ || ready_[t].size() < 2; });
          if (stopping_) return;
        }
        Table& table = tables_[t];
        const size_t key_size = table.after.size();
        const int64_t now = NowMillis();
        std::vector<std::string> params;
        const std::string order = " ORDER BY " + table.key_columns + " LIMIT 1 OFFSET ";
        std::vector<std::string> end = FirstKey(
            "SELECT " + table.key_columns + " FROM " + table.name + " WHERE " +
                Range(table, table.after, {}, &params) + order + std::to_string(window_ - 1),
            params, key_size, now);
        params.clear();
        std::vector<std::string> cut = FirstKey(
            "SELECT " + table.key_columns + " FROM " + table.name + " WHERE (" +
                table.forgettable + ") AND " + Range(table, table.after, end, &params) + order +
                std::to_string(batch_ - 1),
            params, key_size, now);
        if (!cut.empty()) end = cut;
        Window w{table.after, end};
        // At the end of the table the walk starts over (an empty key sorts before all).
        table.after = end.empty() ? std::vector<std::string>(key_size, "") : end;
        std::lock_guard<std::mutex> l(mu_);
        ready_[t].push_back(std::move(w));
      }
    }
  }

  std::vector<Table> tables_;
  const int64_t window_, batch_;
  const double pace_;
  sqlite3* reader_ = nullptr;
  std::thread finder_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::vector<Window>> ready_;  // per table, found and not yet deleted
  bool stopping_ = false;
  Steady::time_point next_ = Steady::now();
  std::vector<int64_t> deleted_;  // per table
};

// The two tables the library's sweep walks in key order, as its Sweeper names them, each
// walk starting at a random key (not where the library's walk is).
std::vector<RawSweep::Table> RawSweepTables(std::mt19937_64& rng) {
  return {{.name = "idempotency_keys",
           .key_columns = "scope, key",
           .forgettable = converge::internal::ForgettableKeyCondition("?1"),
           .after = {"bench", RandomId(rng)}},
          {.name = "consumer_inbox",
           .key_columns = "consumer, source, event_id",
           .forgettable = "expires_at <= ?1",
           .after = {"bench", "urn:converge", RandomId(rng)}}};
}

// Creates through raw sqlite3 on the SQLite store at `uri` (no library code; the Database
// objects open on it stay idle), `batch` a commit, for `seconds`: what SQLite itself does
// with the same statements and rows on that store, set up as the URI sets the library's
// writer. Keys are random, as Creator's are; event ids grow with time, as UUIDv7 ones do.
// Its checkpoints run as the library's do, beside the writer: on a loaded store they are
// random writes all over the file, part of what the table size costs, and SQLite's
// default (inside the COMMIT that crosses 1,000 pages) made raw creates slower than the
// library's on an empty store (5,926 against 7,213 a second in one run), on account of
// a policy the library does not have.
struct RawRun {
  double rate = 0;              // creates a second
  double pages_per_create = 0;  // pages the commits wrote to the WAL, per create
};
RawRun RawCreateRate(const std::string& uri, const std::string& envelope, int64_t batch,
                     double seconds, std::mt19937_64& rng, RawSweep* sweep = nullptr) {
  const converge::sqlite::Settings settings = SqliteSettings(uri);
  converge_bench::RawCreates raw(settings.path,
                                 {.synchronous_full = settings.synchronous_full,
                                  .cache_mib = settings.cache_mib,
                                  .mmap_mib = settings.mmap_mib,
                                  .checkpoint_pages = settings.checkpoint_pages,
                                  .checkpoints = converge_bench::Checkpoints::kBesideTheWriter},
                                 envelope);
  const auto t0 = Steady::now();
  const auto until = t0 + std::chrono::duration_cast<Steady::duration>(
                              std::chrono::duration<double>(seconds));
  int64_t done = 0;
  char event_id[48];
  while (Steady::now() < until) {
    raw.Exec("BEGIN IMMEDIATE");
    const int64_t now = NowMillis();
    const auto ms = static_cast<unsigned long long>(now);
    for (int64_t i = 0; i < batch; ++i, ++done) {
      // A UUIDv7's length and order: its first 48 bits the time in milliseconds.
      std::snprintf(event_id, sizeof event_id, "%08llx-%04llx-7000-8000-%012llx", ms >> 16,
                    ms & 0xffff, static_cast<unsigned long long>(done));
      raw.Create(RandomId(rng), event_id, now, 5);
    }
    if (sweep != nullptr) sweep->MaybeDelete(raw.connection(), now);
    raw.Exec("COMMIT");
  }
  return {done / std::chrono::duration<double>(Steady::now() - t0).count(),
          done > 0 ? static_cast<double>(raw.wal_pages_written()) / done : 0};
}

// Calls per commit between two of a store's stats.
double Batch(const converge::DatabaseStats& before, const converge::DatabaseStats& after) {
  const int64_t commits = after.commits - before.commits;
  return commits > 0 ? static_cast<double>(after.transactions - before.transactions) / commits
                     : 0;
}

// Where a store's writer thread spent its time between two of its stats, in microseconds
// per Transact call: running the calls (BEGIN, the statements, savepoints) and committing
// (the WAL's writes and fsync). Zero where the store has no writer thread (PostgreSQL).
struct WriterTime {
  double calls_us = 0, commits_us = 0;
};
WriterTime WriterTimePerCall(const converge::DatabaseStats& before,
                             const converge::DatabaseStats& after) {
  const int64_t n = after.transactions - before.transactions;
  if (!before.writer || !after.writer || n <= 0) return {};
  return {1e6 * (after.writer->calls - before.writer->calls) / n,
          1e6 * (after.writer->commits - before.writer->commits) / n};
}

// One outbox payload `db` holds: the raw creates write rows of its size.
std::string AnEnvelope(Database& db) {
  std::string envelope;
  Check(db.Read([&](Tx& tx) -> Status {
    CONVERGE_ASSIGN_OR_RETURN(auto rows, tx.Query("SELECT payload FROM outbox_events LIMIT 1"));
    if (!rows.empty()) envelope = rows[0].Text(0);
    return converge::OkStatus();
  }),
        "read an envelope");
  if (envelope.empty()) Die("no outbox event to copy the size of");
  return envelope;
}

struct Summary {
  double median, min, max;
};
Summary Summarize(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return {v[v.size() / 2], v.front(), v.back()};
}

int Run(const std::string& uri, const std::string& empty_uri, int callers, double seconds,
        int rounds, const std::string& json_path) {
  std::vector<double> ce, cl, qe, ql, cs, cp, sk, si, pk, pi, r_l, r_s, r_p, r_q;
  // SQLite: raw sqlite3 creates on a fresh empty store and on the loaded one, each at the
  // batch the library's creates reached on that store in the same round (batch_e,
  // batch_l), and the library's rates against them.
  const bool raw = !IsPostgres(uri);
  std::vector<double> batch_e, batch_l, raw_e, raw_l, r_raw, r_lib_raw_e, r_lib_raw_l;
  // SQLite: raw creates on the loaded store at the empty store's batch, and over raw_e.
  std::vector<double> raw_l1, r_raw1;
  std::vector<double> raw_p, raw_pk, raw_pi, r_raw_p, r_lib_raw_p;
  // SQLite: the writer thread's time per create, running the calls and committing.
  std::vector<double> calls_us_e, commits_us_e, calls_us_l, commits_us_l;
  // SQLite: the pages the raw creates' commits wrote to the WAL, per create.
  std::vector<double> raw_pages_e, raw_pages_l;
  std::mt19937_64 rng(std::random_device{}());
  int64_t loaded_keys = 0, loaded_inbox = 0;
  bool dry = false;
  {
    auto db = Open(uri, 2);
    loaded_keys = Count(*db, "idempotency_keys");
    loaded_inbox = Count(*db, "consumer_inbox");
  }
  std::printf("%s, %d callers, %.1f s per run, %d round(s), modes interleaved in each\n",
              IsPostgres(uri) ? "PostgreSQL" : "SQLite WAL synchronous=FULL", callers, seconds,
              rounds);
  std::printf("  loaded store at the start: %lld idempotency keys, %lld inbox rows\n",
              static_cast<long long>(loaded_keys), static_cast<long long>(loaded_inbox));
  auto db = Open(uri, callers + 2);
  // One window per table per call where the store sweeps in key order (the Runtime walks
  // up to 16 while a walk lags): the paced sweeper then deletes at a steady rate, not in
  // bursts of 16 windows.
  converge::Sweeper sweeper(*db, {.batch = kSweepBatch, .key_order_windows = 1});
  for (int r = 0; r < rounds; ++r) {
    std::fprintf(stderr, "  round %d/%d: empty...", r + 1, rounds);
    std::string envelope;
    {
      auto empty = Emptied(empty_uri, callers + 2);
      const converge::DatabaseStats s0 = empty->stats();
      ce.push_back(Creates(*empty, callers, seconds));
      const converge::DatabaseStats s1 = empty->stats();
      batch_e.push_back(Batch(s0, s1));
      const WriterTime w = WriterTimePerCall(s0, s1);
      calls_us_e.push_back(w.calls_us);
      commits_us_e.push_back(w.commits_us);
      qe.push_back(Claims(*empty, callers, seconds));
      if (raw) envelope = AnEnvelope(*empty);
    }
    if (raw) {
      const int64_t batch = std::max<int64_t>(1, std::llround(batch_e.back()));
      std::fprintf(stderr, " raw empty (batch %lld)...", static_cast<long long>(batch));
      Emptied(empty_uri, 2).reset();  // a fresh file the library migrated, then closed
      const RawRun run = RawCreateRate(empty_uri, envelope, batch, seconds, rng);
      raw_e.push_back(run.rate);
      raw_pages_e.push_back(run.pages_per_create);
    }
    std::fprintf(stderr, " loaded...");
    Ready(*db, uri);
    const converge::DatabaseStats s0 = db->stats();
    cl.push_back(Creates(*db, callers, seconds));
    {
      const converge::DatabaseStats s1 = db->stats();
      batch_l.push_back(Batch(s0, s1));
      const WriterTime w = WriterTimePerCall(s0, s1);
      calls_us_l.push_back(w.calls_us);
      commits_us_l.push_back(w.commits_us);
    }
    ql.push_back(Claims(*db, callers, seconds));
    if (raw) {
      const int64_t batch = std::max<int64_t>(1, std::llround(batch_l.back()));
      std::fprintf(stderr, " raw loaded (batch %lld)...", static_cast<long long>(batch));
      Ready(*db, uri);
      const RawRun run = RawCreateRate(uri, envelope, batch, seconds, rng);
      raw_l.push_back(run.rate);
      raw_pages_l.push_back(run.pages_per_create);
      r_raw.push_back(raw_l.back() / raw_e.back());
      r_lib_raw_e.push_back(ce.back() / raw_e.back());
      r_lib_raw_l.push_back(cl.back() / raw_l.back());
      const int64_t batch1 = std::max<int64_t>(1, std::llround(batch_e.back()));
      std::fprintf(stderr, " raw loaded (batch %lld)...", static_cast<long long>(batch1));
      Ready(*db, uri);
      raw_l1.push_back(RawCreateRate(uri, envelope, batch1, seconds, rng).rate);
      r_raw1.push_back(raw_l1.back() / raw_e.back());
      std::fprintf(stderr, " raw paced...");
      Ready(*db, uri);
      {
        RawSweep sweep(SqlitePath(uri), RawSweepTables(rng),
                       converge::SweepOptions{}.key_order_window, kSweepBatch, raw_l.back());
        raw_p.push_back(RawCreateRate(uri, envelope, batch, seconds, rng, &sweep).rate);
        raw_pk.push_back(sweep.deleted(0) / seconds);
        raw_pi.push_back(sweep.deleted(1) / seconds);
      }
      r_raw_p.push_back(raw_p.back() / raw_e.back());
    }
    std::fprintf(stderr, " swept...");
    Ready(*db, uri);
    SweptRun s = CreatesWhileSweeping(*db, sweeper, callers, seconds, 0);
    cs.push_back(s.creates);
    sk.push_back(s.keys_deleted);
    si.push_back(s.inbox_deleted);
    std::fprintf(stderr, " paced...");
    Ready(*db, uri);
    SweptRun p = CreatesWhileSweeping(*db, sweeper, callers, seconds, cl.back());
    cp.push_back(p.creates);
    pk.push_back(p.keys_deleted);
    pi.push_back(p.inbox_deleted);
    dry = dry || s.ran_dry || p.ran_dry;
    r_l.push_back(cl.back() / ce.back());
    r_s.push_back(cs.back() / ce.back());
    r_p.push_back(cp.back() / ce.back());
    if (raw) r_lib_raw_p.push_back(cp.back() / raw_p.back());
    r_q.push_back(ql.back() / qe.back());
    std::fprintf(stderr, " done\n");
  }
  loaded_keys = Count(*db, "idempotency_keys");
  loaded_inbox = Count(*db, "consumer_inbox");
  auto line = [](const char* name, const std::vector<double>& v, const char* unit) {
    Summary s = Summarize(v);
    std::printf("  %-54s %9.0f %s  (%.0f..%.0f)\n", name, s.median, unit, s.min, s.max);
  };
  auto ratio = [](const char* name, const std::vector<double>& v, const char* target) {
    Summary s = Summarize(v);
    std::printf("  %-54s %9.2f  (%.2f..%.2f)%s\n", name, s.median, s.min, s.max, target);
  };
  line("creates, empty store", ce, "creates/s");
  line("creates, loaded store", cl, "creates/s");
  if (raw) {  // on PostgreSQL every Transact is its own commit
    ratio("  calls per commit, empty store", batch_e, "");
    ratio("  calls per commit, loaded store", batch_l, "");
    line("  writer per create, running it: empty store", calls_us_e, "us");
    line("  writer per create, running it: loaded store", calls_us_l, "us");
    line("  writer per create, committing: empty store", commits_us_e, "us");
    line("  writer per create, committing: loaded store", commits_us_l, "us");
    line("raw sqlite3 creates at the empty store's batch, empty", raw_e, "creates/s");
    line("raw sqlite3 creates at the loaded store's batch, loaded", raw_l, "creates/s");
    line("raw sqlite3 creates at the empty store's batch, loaded", raw_l1, "creates/s");
    ratio("  raw: WAL pages written per create, empty store", raw_pages_e, "");
    ratio("  raw: WAL pages written per create, loaded store", raw_pages_l, "");
  }
  line("creates, loaded, sweeper flat out", cs, "creates/s");
  line("  sweeper flat out: keys deleted", sk, "rows/s   ");
  line("  sweeper flat out: inbox rows deleted", si, "rows/s   ");
  line("creates, loaded, sweeper paced at the loaded rate", cp, "creates/s");
  line("  sweeper paced: keys deleted", pk, "rows/s   ");
  line("  sweeper paced: inbox rows deleted", pi, "rows/s   ");
  line("inbox claims, empty store", qe, "claims/s ");
  line("inbox claims, loaded store", ql, "claims/s ");
  ratio("loaded/empty creates", r_l, "   target >= 0.8");
  ratio("loaded + paced sweeper / empty creates", r_p, "   target >= 0.8");
  ratio("loaded + flat-out sweeper / empty creates", r_s, "");
  ratio("loaded/empty inbox claims", r_q, "");
  if (raw) {
    ratio("raw sqlite3 at each store's batch: loaded/empty", r_raw, "");
    ratio("raw sqlite3 at one batch: loaded/empty (SQLite's own)", r_raw1, "");
    ratio("empty store: creates, library / raw sqlite3", r_lib_raw_e, "");
    ratio("loaded store: creates, library / raw sqlite3", r_lib_raw_l, "");
    line("raw creates, loaded, raw sweep paced at their rate", raw_p, "creates/s");
    line("  raw sweep: keys deleted", raw_pk, "rows/s   ");
    line("  raw sweep: inbox rows deleted", raw_pi, "rows/s   ");
    ratio("raw sqlite3: loaded + paced sweep / empty creates", r_raw_p, "");
    ratio("paced sweeper: creates, library / raw sqlite3", r_lib_raw_p, "");
  }
  // What a sweeper that keeps up would leave, derived per round: a create takes 1 / loaded
  // of a second; in the flat-out run the deletions took the rest of each second, so one
  // deletion per table (a key and an inbox row) costs (1 - swept creates / loaded) /
  // deletions. Keeping up means one deletion per create: creates at 1 / (create + deletion).
  std::vector<double> delete_us, keep_up;
  for (size_t i = 0; i < sk.size(); ++i) {
    const double create = 1 / cl[i];
    const double deletion = std::max(0.0, 1 - cs[i] * create) / std::min(sk[i], si[i]);
    delete_us.push_back(deletion * 1e6);
    keep_up.push_back(1 / (create + deletion) / ce[i]);
  }
  line("derived: one key + one inbox row deleted costs", delete_us, "us       ");
  ratio("derived: creates with a sweeper keeping up / empty", keep_up, "   target >= 0.8");
  std::printf("  loaded store at the end: %lld idempotency keys, %lld inbox rows%s\n",
              static_cast<long long>(loaded_keys), static_cast<long long>(loaded_inbox),
              dry ? "  (a sweep ran out of expired rows)" : "");
  if (!json_path.empty()) {
    nlohmann::json j = {{"benchmark", "scale"},
                        {"store", IsPostgres(uri) ? "postgresql" : "sqlite"},
                        {"callers", callers},
                        {"seconds", seconds},
                        {"loaded_keys_end", loaded_keys},
                        {"loaded_inbox_end", loaded_inbox},
                        {"creates_empty", ce},
                        {"creates_loaded", cl},
                        {"creates_swept", cs},
                        {"creates_paced", cp},
                        {"swept_keys_per_s", sk},
                        {"swept_inbox_per_s", si},
                        {"paced_keys_per_s", pk},
                        {"paced_inbox_per_s", pi},
                        {"claims_empty", qe},
                        {"claims_loaded", ql},
                        {"loaded_over_empty", r_l},
                        {"paced_over_empty", r_p},
                        {"swept_over_empty", r_s},
                        {"deletion_us", delete_us},
                        {"keep_up_over_empty", keep_up},
                        {"sweeper_ran_dry", dry}};
    if (raw) {
      j["batch_empty"] = batch_e;
      j["batch_loaded"] = batch_l;
      j["writer_calls_us_empty"] = calls_us_e;
      j["writer_calls_us_loaded"] = calls_us_l;
      j["writer_commits_us_empty"] = commits_us_e;
      j["writer_commits_us_loaded"] = commits_us_l;
      j["raw_creates_empty"] = raw_e;
      j["raw_creates_loaded"] = raw_l;
      j["raw_wal_pages_per_create_empty"] = raw_pages_e;
      j["raw_wal_pages_per_create_loaded"] = raw_pages_l;
      j["raw_loaded_over_empty"] = r_raw;
      j["raw_creates_loaded_empty_batch"] = raw_l1;
      j["raw_loaded_over_empty_one_batch"] = r_raw1;
      j["empty_over_raw_empty"] = r_lib_raw_e;
      j["loaded_over_raw_loaded"] = r_lib_raw_l;
      j["raw_creates_paced"] = raw_p;
      j["raw_paced_keys_per_s"] = raw_pk;
      j["raw_paced_inbox_per_s"] = raw_pi;
      j["raw_paced_over_empty"] = r_raw_p;
      j["paced_over_raw_paced"] = r_lib_raw_p;
    }
    std::ofstream out(json_path);
    out << j.dump(2) << "\n";
    if (!out) Die("cannot write " + json_path);
  }
  return 0;
}

// ---- retention: batched DELETE vs partition drops ---------------------------------

// On a store preloaded with --age-days 2 (every row expired): creates alone, then creates
// while a sweeper removes the expired rows flat out, by batched DELETEs or, on a
// time-partitioned store, by dropping the partition that holds them. The deletion rate is
// the rows gone over the time the sweeper spent in passes that removed any.
int Retention(const std::string& uri, int callers, double seconds, const std::string& json_path) {
  auto db = Open(uri, callers + 2);
  const bool partitioned = Partitioned(*db);
  const int64_t keys0 = Count(*db, "idempotency_keys"), inbox0 = Count(*db, "consumer_inbox");
  const int64_t outbox0 = Count(*db, "outbox_events");
  std::printf("PostgreSQL, retention=%s, %d callers, %.1f s per run\n",
              partitioned ? "partitioned" : "delete", callers, seconds);
  std::printf("  loaded store: %lld idempotency keys, %lld inbox rows, %lld outbox events\n",
              static_cast<long long>(keys0), static_cast<long long>(inbox0),
              static_cast<long long>(outbox0));
  const double alone = Creates(*db, callers, seconds);
  const int64_t keys1 = Count(*db, "idempotency_keys"), inbox1 = Count(*db, "consumer_inbox");
  const int64_t outbox1 = Count(*db, "outbox_events");

  // The preloaded events were published two days ago; the creates' own are not yet, or
  // only now (no relay runs), so a day's retention takes exactly the preloaded ones.
  converge::Sweeper sweeper(*db, {.batch = 1000, .published_retention = std::chrono::hours(24)});
  std::atomic<bool> stop{false};
  double busy = 0, drop_pass = 0;
  int64_t dropped = 0;
  std::thread sweep([&] {
    while (!stop.load()) {
      const auto t0 = Steady::now();
      auto s = sweeper.RunOnce();
      if (!s) Die("sweep: " + s.error().ToString());
      const double took = std::chrono::duration<double>(Steady::now() - t0).count();
      if (s->total() > 0 || s->partitions_dropped > 0) busy += took;
      if (s->partitions_dropped > 0) drop_pass += took;
      dropped += s->partitions_dropped;
      if (s->total() == 0 && s->partitions_dropped == 0 && partitioned) break;
    }
  });
  const double during = Creates(*db, callers, seconds);
  stop = true;
  sweep.join();
  const int64_t keys2 = Count(*db, "idempotency_keys"), inbox2 = Count(*db, "consumer_inbox");
  const int64_t outbox2 = Count(*db, "outbox_events");
  // Rows gone: what was there before the run, plus the keys and events the run created,
  // minus what is left (a create adds a key and an event).
  const int64_t made = static_cast<int64_t>(std::llround(during * seconds));
  const int64_t removed =
      (keys1 - keys2 + made) + (inbox1 - inbox2) + (outbox1 - outbox2 + made);
  const double rate = busy > 0 ? removed / busy : 0;
  std::printf("  %-54s %9.0f creates/s\n", "creates, loaded store", alone);
  std::printf("  %-54s %9.0f creates/s\n", "creates while the sweeper removes expired rows",
              during);
  std::printf("  %-54s %9lld rows in %.2f s of sweeping: %.0f rows/s%s\n",
              "sweeper: rows removed (keys + inbox + outbox)", static_cast<long long>(removed),
              busy,
              rate,
              partitioned ? (" (" + std::to_string(dropped) + " partitions dropped)").c_str()
                          : "");
  std::printf("  left: %lld keys, %lld inbox rows, %lld outbox events\n",
              static_cast<long long>(keys2), static_cast<long long>(inbox2),
              static_cast<long long>(outbox2));
  if (!json_path.empty()) {
    nlohmann::json j = {{"benchmark", "retention"},
                        {"retention", partitioned ? "partitioned" : "delete"},
                        {"callers", callers},
                        {"seconds", seconds},
                        {"loaded_keys", keys0},
                        {"loaded_inbox", inbox0},
                        {"loaded_outbox", outbox0},
                        {"creates_loaded", alone},
                        {"creates_while_sweeping", during},
                        {"rows_removed", removed},
                        {"sweeping_seconds", busy},
                        {"drop_pass_seconds", drop_pass},
                        {"rows_removed_per_s", rate},
                        {"partitions_dropped", dropped}};
    std::ofstream out(json_path);
    out << j.dump(2) << "\n";
    if (!out) Die("cannot write " + json_path);
  }
  return 0;
}

// ---- walk: a sweep in key order through its tables, and on -------------------------

// Where a walk in key order stands, as the sweeper last wrote it (sweep_walks).
struct WalkState {
  int64_t pass_start = 0;
  int64_t pass_rows = 0;       // rows the current walk has examined
  int64_t last_pass_rows = -1;  // rows the previous whole walk examined; -1: none ended
};

std::map<std::string, WalkState> Walks(Database& db) {
  std::map<std::string, WalkState> walks;
  Check(db.Read([&](Tx& tx) -> Status {
    CONVERGE_ASSIGN_OR_RETURN(
        auto rows, tx.Query("SELECT walk, pass_start, pass_rows, last_pass_rows FROM sweep_walks"));
    for (const auto& r : rows) walks[r.Text(0)] = {r.Int(1), r.Int(2), r.Int(3)};
    return converge::OkStatus();
  }),
        "read sweep_walks");
  return walks;
}

// On a store that sweeps in key order, preloaded and never swept: creates alone for
// `baseline` seconds; then creates while a sweeper runs as the Runtime runs it (RunOnce
// again at once while it says `more`, else after `interval`), with walks of `pass`
// seconds, until each table's walk has wrapped `wraps` times or `seconds` have passed; then
// creates alone again. The first walk of each table runs flat out, the later ones at
// their pace. A line every `report` seconds.
// With `control`, no sweeper runs: the same creates for `seconds`, to tell what the walks
// cost from how creates drift as the store grows.
int WalkRun(const std::string& uri, int callers, double baseline, double seconds, double pass,
            double interval, double report, int wraps, bool control,
            const std::string& json_path) {
  if (IsPostgres(uri)) Die("walk: PostgreSQL does not sweep in key order; use SQLite");
  auto db = Open(uri, callers + 2);
  if (!Walks(*db).empty()) Die(uri + " has been swept before: preload a fresh store");
  const int64_t keys0 = Count(*db, "idempotency_keys"), inbox0 = Count(*db, "consumer_inbox");
  std::printf("walk: %s, %d callers; %lld idempotency keys, %lld inbox rows; %s\n",
              IsPostgres(uri) ? "PostgreSQL" : "SQLite WAL synchronous=FULL", callers,
              static_cast<long long>(keys0), static_cast<long long>(inbox0),
              control ? "control: no sweeper"
                      : ("walks of " + std::to_string(std::lround(pass)) +
                         " s, the sweeper every " + std::to_string(std::lround(interval)) +
                         " s while it does not lag")
                            .c_str());
  std::fflush(stdout);
  const double before = Creates(*db, callers, baseline);
  std::printf("  creates alone: %.0f/s over %.0f s\n", before, baseline);
  std::fflush(stdout);

  converge::SweepOptions options;
  options.key_order_pass =
      std::chrono::duration_cast<converge::Millis>(std::chrono::duration<double>(pass));
  options.inbox_key_order_pass = options.key_order_pass;  // both tables wrap within the run
  converge::Sweeper sweeper(*db, options);
  std::atomic<bool> stop{false};
  std::atomic<int64_t> keys_deleted{0}, inbox_deleted{0};
  std::thread sweep([&] {
    while (!control && !stop.load()) {
      auto s = sweeper.RunOnce();
      if (!s) Die("sweep: " + s.error().ToString());
      keys_deleted += s->keys;
      inbox_deleted += s->inbox;
      if (s->more) continue;
      const auto until = Steady::now() + std::chrono::duration<double>(interval);
      while (!stop.load() && Steady::now() < until) {
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
    }
  });
  Creator creator(*db);
  Load<Creator> load(callers, creator);
  const auto t0 = Steady::now();
  auto last = t0;
  int64_t last_creates = 0, last_keys = 0, last_inbox = 0;
  std::map<std::string, WalkState> seen;  // as at the previous line
  std::map<std::string, int> wrapped;     // walks that reached the end of their table
  nlohmann::json samples = nlohmann::json::array(), ends = nlohmann::json::array();
  // Creates over the first walks (until both wrapped once) and over the rest.
  double first_creates = 0, first_secs = 0, later_creates = 0, later_secs = 0;
  auto all_wrapped = [&](int n) {
    return wrapped.size() == 2 &&
           std::all_of(wrapped.begin(), wrapped.end(), [&](auto& w) { return w.second >= n; });
  };
  for (;;) {
    std::this_thread::sleep_for(std::chrono::duration<double>(report));
    const auto now = Steady::now();
    const double dt = std::chrono::duration<double>(now - last).count();
    const double t = std::chrono::duration<double>(now - t0).count();
    const int64_t c = load.done(), k = keys_deleted.load(), i = inbox_deleted.load();
    const double creates = (c - last_creates) / dt;
    const bool first = !all_wrapped(1);
    (first ? first_creates : later_creates) += c - last_creates;
    (first ? first_secs : later_secs) += dt;
    std::string where;
    for (const auto& [name, w] : Walks(*db)) {
      // A walk ended since the previous line: its start moved, or (a walk not seen before)
      // one ended already. Two ending within one line's time count as one: --report
      // must be shorter than a walk.
      auto prev = seen.find(name);
      if (prev == seen.end() ? w.last_pass_rows >= 0
                             : w.pass_start != prev->second.pass_start) {
        ++wrapped[name];
        ends.push_back({{"walk", name}, {"t", t}, {"rows", w.last_pass_rows}});
        std::printf("  %6.0f s  walk %d of %s ended: %lld rows examined\n", t, wrapped[name],
                    name.c_str(), static_cast<long long>(w.last_pass_rows));
      }
      wrapped.emplace(name, 0);
      seen[name] = w;
      const int64_t of = name == "consumer_inbox" ? inbox0 : keys0;
      where += "  " + name + " " +
               std::to_string(static_cast<int>(100.0 * w.pass_rows / std::max<int64_t>(of, 1))) +
               "% (walk " + std::to_string(wrapped[name] + 1) + ")";
    }
    std::printf("  %6.0f s  creates %6.0f/s  deleted: keys %6.0f/s, inbox %6.0f/s %s\n", t,
                creates, (k - last_keys) / dt, (i - last_inbox) / dt, where.c_str());
    std::fflush(stdout);
    samples.push_back({{"t", t},
                       {"creates_per_s", creates},
                       {"keys_deleted_per_s", (k - last_keys) / dt},
                       {"inbox_deleted_per_s", (i - last_inbox) / dt}});
    last = now;
    last_creates = c;
    last_keys = k;
    last_inbox = i;
    if (all_wrapped(wraps) || t >= seconds) break;
  }
  load.Stop();
  stop = true;
  sweep.join();
  const double after = Creates(*db, callers, baseline);
  const double first_rate = first_secs > 0 ? first_creates / first_secs : 0;
  const double later_rate = later_secs > 0 ? later_creates / later_secs : 0;
  std::printf("  creates alone again: %.0f/s over %.0f s\n", after, baseline);
  std::printf("  creates %s: %.0f/s over %.0f s, %.2f of alone before\n",
              control ? "with no sweeper" : "during the first walks (flat out)", first_rate,
              first_secs, first_rate / before);
  if (later_secs > 0) {
    std::printf("  creates during the later walks (paced): %.0f/s over %.0f s, %.2f of alone "
                "before, %.2f of alone after\n",
                later_rate, later_secs, later_rate / before, later_rate / after);
  }
  std::printf("  walks ended: %s\n", ends.dump().c_str());
  if (!json_path.empty()) {
    nlohmann::json j = {{"benchmark", "walk"},
                        {"callers", callers},
                        {"control", control},
                        {"pass_seconds", pass},
                        {"interval_seconds", interval},
                        {"loaded_keys", keys0},
                        {"loaded_inbox", inbox0},
                        {"creates_alone_before", before},
                        {"creates_alone_after", after},
                        {"creates_first_walks", first_rate},
                        {"creates_later_walks", later_rate},
                        {"walks_ended", ends},
                        {"samples", samples}};
    std::ofstream out(json_path);
    out << j.dump(2) << "\n";
    if (!out) Die("cannot write " + json_path);
  }
  return control || all_wrapped(wraps) ? 0 : 3;
}

}  // namespace

int main(int argc, char** argv) {
  // Before any thread uses SQLite (database.h).
  (void)converge::DisableSqliteMemoryAccounting();
  CLI::App app{"converge scale benchmark: rates on a store with millions of rows"};
  app.require_subcommand(1);
  std::string uri, empty_uri, json_path;
  int64_t rows = 1'000'000;
  double expired = 0.8, seconds = 5;
  int rounds = 3, callers = 64;
  CLI::App* preload = app.add_subcommand("preload", "Fill a store with keys and inbox rows");
  preload->add_option("--uri", uri, "Store URI")->required();
  preload->add_option("--rows", rows, "Rows per table")
      ->check(CLI::Range(int64_t{1000}, int64_t{1'000'000'000}));
  preload->add_option("--expired", expired, "Fraction of the rows already expired")
      ->check(CLI::Range(0.0, 1.0));
  double inbox_expired = -1;
  preload->add_option("--inbox-expired", inbox_expired,
                      "Fraction of the inbox rows already expired (default: --expired)")
      ->check(CLI::Range(0.0, 1.0));
  int age_days = 0;
  preload->add_option("--age-days", age_days,
                      "Write the rows as if this many days ago (2: all expired by now)")
      ->check(CLI::Range(0, 365));
  bool outbox = false;
  preload->add_flag("--outbox", outbox, "Also as many outbox events, published when written");
  std::string order = "random";
  preload
      ->add_option("--order", order,
                   "random: keys in no order, as creates insert them (default); sorted: in "
                   "key order, faster, every leaf of a key B-tree filled alike")
      ->check(CLI::IsMember({"random", "sorted"}));
  CLI::App* retention = app.add_subcommand(
      "retention", "Creates, and the sweeper removing expired rows (DELETE or partition drop)");
  retention->add_option("--uri", uri, "A store preloaded with --age-days 2")->required();
  retention->add_option("--seconds", seconds, "Duration of each run")
      ->check(CLI::Range(0.5, 600.0));
  retention->add_option("--callers", callers, "Concurrent callers")->check(CLI::Range(1, 1024));
  retention->add_option("--json", json_path, "Write the figures to this JSON file");
  CLI::App* run = app.add_subcommand("run", "Measure against an empty store");
  run->add_option("--uri", uri, "The loaded store's URI")->required();
  run->add_option("--empty-uri", empty_uri, "A store to empty and measure each round")
      ->required();
  run->add_option("--seconds", seconds, "Duration of each run")->check(CLI::Range(0.5, 600.0));
  run->add_option("--rounds", rounds, "Rounds; medians are reported")->check(CLI::Range(1, 99));
  run->add_option("--callers", callers, "Concurrent callers")->check(CLI::Range(1, 1024));
  run->add_option("--json", json_path, "Write every sample to this JSON file");
  CLI::App* walk = app.add_subcommand(
      "walk", "SQLite: creates while the key-order sweep walks its tables through, and on");
  walk->add_option("--uri", uri, "A store preloaded and never swept")->required();
  walk->add_option("--callers", callers, "Concurrent callers")->check(CLI::Range(1, 1024));
  double baseline = 20, pass = 300, interval = 60, report = 10;
  double walk_seconds = 1200;
  int wraps = 2;
  walk->add_option("--baseline", baseline, "Seconds of creates alone, before and after")
      ->check(CLI::Range(1.0, 600.0));
  walk->add_option("--seconds", walk_seconds, "Give up after this many seconds of sweeping")
      ->check(CLI::Range(1.0, 86400.0));
  walk->add_option("--pass", pass, "Seconds a walk takes after the first (both tables)")
      ->check(CLI::Range(1.0, 86400.0));
  walk->add_option("--interval", interval,
                   "Seconds between sweeper passes that do not lag (the Runtime's "
                   "sweep_interval)")
      ->check(CLI::Range(0.01, 3600.0));
  walk->add_option("--report", report, "Seconds between progress lines")
      ->check(CLI::Range(0.5, 600.0));
  walk->add_option("--wraps", wraps, "Stop once each table's walk has ended this many times")
      ->check(CLI::Range(1, 100));
  bool control = false;
  walk->add_flag("--control", control,
                 "No sweeper: the same creates for --seconds, as a control for a walk run");
  walk->add_option("--json", json_path, "Write the figures to this JSON file");
  CLI11_PARSE(app, argc, argv);
  if (*preload) {
    Preload(uri, rows, expired, inbox_expired < 0 ? expired : inbox_expired, age_days, outbox,
            order == "sorted" ? Order::kSorted : Order::kRandom);
    return 0;
  }
  FlushDirtyPages();
  if (*retention) return Retention(uri, callers, seconds, json_path);
  if (*walk) {
    return WalkRun(uri, callers, baseline, walk_seconds, pass, interval, report, wraps, control,
                   json_path);
  }
  return Run(uri, empty_uri, callers, seconds, rounds, json_path);
}
