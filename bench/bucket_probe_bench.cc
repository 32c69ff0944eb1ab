// An experiment for #10's missed target (SQLite creates on a store of 10M keys at 0.8 of
// an empty store's rate; docs/design/retention.md, "Time buckets on SQLite: an
// experiment"): would idempotency keys kept in time buckets, where a create writes only
// the current bucket and probes the older ones for its key, keep creates near the empty
// store's rate? Raw sqlite3 alone, none of the library's code: only the key row (the
// library's `idempotency_keys` columns and its expiry index), WAL, synchronous=FULL,
// batches of 50 creates a transaction, SQLite's own checkpoint in the commit at 1,000
// pages. Per round, each shape for --seconds on a fresh process's connection:
//
//   empty    inserts into a key table of a new file (the reference of every ratio)
//   current  inserts into an empty table of the loaded file: a bucket with no probe
//   wide     probes the loaded `keys_wide` (the shipped WITHOUT ROWID shape, whole rows in
//            its B-tree), then inserts into the current bucket
//   narrow   probes the loaded `keys_narrow` (scope and key alone: the shape of a narrow
//            UNIQUE index on a bucket), then inserts into the current bucket
//   loaded   inserts into `keys_wide` itself: the shipped shape on a loaded store
//
//   converge_bucket_probe_bench preload --db F --rows 10000000 [--page-size 2048]
//   converge_bucket_probe_bench run --db F --seconds 10 --rounds 3 [--cache-mib 256]
//       [--page-size 2048]  (the new file's; use the preload's)
#include <sqlite3.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

namespace {

using Clock = std::chrono::steady_clock;

[[noreturn]] void Fail(sqlite3* db, const std::string& what) {
  std::fprintf(stderr, "bucket_probe_bench: %s: %s\n", what.c_str(),
               db != nullptr ? sqlite3_errmsg(db) : "out of memory");
  std::exit(1);
}

void Exec(sqlite3* db, const std::string& sql) {
  if (sqlite3_exec(db, sql.c_str(), nullptr, nullptr, nullptr) != SQLITE_OK) Fail(db, sql);
}

// `page_size` (0: SQLite's default) takes effect only on a new file.
sqlite3* Open(const std::string& path, int cache_mib, bool synchronous, int page_size) {
  sqlite3* db = nullptr;
  if (sqlite3_open(path.c_str(), &db) != SQLITE_OK) Fail(db, "open " + path);
  if (page_size > 0) Exec(db, "PRAGMA page_size=" + std::to_string(page_size) + ";");
  Exec(db, std::string("PRAGMA journal_mode=WAL; PRAGMA synchronous=") +
               (synchronous ? "FULL;" : "OFF;"));
  if (cache_mib > 0) Exec(db, "PRAGMA cache_size=-" + std::to_string(cache_mib * 1024) + ";");
  return db;
}

// The library's idempotency_keys (src/core/schema/migrations.cc), under another name.
std::string WideTable(const std::string& name) {
  return "CREATE TABLE IF NOT EXISTS " + name +
         " (scope TEXT NOT NULL, key TEXT NOT NULL, request_hash TEXT NOT NULL,"
         " status TEXT NOT NULL, recovery_point TEXT NOT NULL,"
         " recovery_data TEXT NOT NULL DEFAULT '', lease_until INTEGER NOT NULL,"
         " fence INTEGER NOT NULL, response_status INTEGER, response_headers TEXT,"
         " response_body BLOB, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL,"
         " expires_at INTEGER NOT NULL, PRIMARY KEY (scope, key)) WITHOUT ROWID;"
         " CREATE INDEX IF NOT EXISTS " + name + "_expires ON " + name + " (expires_at);";
}

class Keys {
 public:
  Keys() : rng_(std::random_device{}()) {}
  // A random UUID-shaped key, as clients send them.
  std::string Next() {
    static const char* kHex = "0123456789abcdef";
    std::string k(36, '-');
    for (int i = 0; i < 36; ++i) {
      if (i != 8 && i != 13 && i != 18 && i != 23) k[i] = kHex[rng_() % 16];
    }
    return k;
  }
  int64_t Jitter() { return static_cast<int64_t>(rng_() % 1000); }

 private:
  std::mt19937_64 rng_;
};

// An insert of a completed key's row into `table` (the sizes of a small JSON answer).
class Inserter {
 public:
  Inserter(sqlite3* db, const std::string& table) : db_(db) {
    const std::string sql =
        "INSERT INTO " + table +
        " (scope, key, request_hash, status, recovery_point, lease_until, fence,"
        " response_status, response_headers, response_body, created_at, updated_at,"
        " expires_at) VALUES (?1, ?2, ?3, 'completed', 'finished', 0, 1, 201,"
        " '{\"Content-Type\":\"application/json\"}', ?4, ?5, ?5, ?6)";
    if (sqlite3_prepare_v2(db, sql.c_str(), -1, &st_, nullptr) != SQLITE_OK) {
      Fail(db, "prepare " + sql);
    }
  }
  ~Inserter() { sqlite3_finalize(st_); }
  void Insert(const std::string& key, int64_t now, int64_t jitter) {
    static const std::string kHash(64, 'a');
    static const std::string kBody(120, 'b');
    sqlite3_bind_text(st_, 1, "tenant-1", -1, SQLITE_STATIC);
    sqlite3_bind_text(st_, 2, key.c_str(), -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(st_, 3, kHash.c_str(), -1, SQLITE_STATIC);
    sqlite3_bind_blob(st_, 4, kBody.data(), static_cast<int>(kBody.size()), SQLITE_STATIC);
    sqlite3_bind_int64(st_, 5, now);
    sqlite3_bind_int64(st_, 6, now + 86'400'000 + jitter);
    if (sqlite3_step(st_) != SQLITE_DONE) Fail(db_, "insert");
    sqlite3_reset(st_);
  }

 private:
  sqlite3* db_;
  sqlite3_stmt* st_ = nullptr;
};

int Preload(const std::string& path, int64_t rows, int page_size) {
  sqlite3* db = Open(path, /*cache_mib=*/6000, /*synchronous=*/false, page_size);
  Exec(db, WideTable("keys_wide") +
               " CREATE TABLE IF NOT EXISTS keys_narrow (scope TEXT NOT NULL,"
               " key TEXT NOT NULL, PRIMARY KEY (scope, key)) WITHOUT ROWID;");
  Inserter wide(db, "keys_wide");
  sqlite3_stmt* narrow = nullptr;
  if (sqlite3_prepare_v2(db, "INSERT INTO keys_narrow (scope, key) VALUES ('tenant-1', ?1)",
                         -1, &narrow, nullptr) != SQLITE_OK) {
    Fail(db, "prepare");
  }
  Keys keys;
  const int64_t now = 1'700'000'000'000;
  const auto start = Clock::now();
  // In no order, as creates arrive (a preload in key order packs every leaf full:
  // docs/design/retention.md, "A preload in key order").
  for (int64_t i = 0; i < rows;) {
    Exec(db, "BEGIN");
    for (int j = 0; j < 100'000 && i < rows; ++j, ++i) {
      const std::string key = keys.Next();
      wide.Insert(key, now + i / 1000, keys.Jitter());
      sqlite3_bind_text(narrow, 1, key.c_str(), -1, SQLITE_TRANSIENT);
      if (sqlite3_step(narrow) != SQLITE_DONE) Fail(db, "insert");
      sqlite3_reset(narrow);
    }
    Exec(db, "COMMIT");
    if (i % 1'000'000 == 0 || i == rows) {
      std::fprintf(stderr, "preloaded %lld of %lld keys (%.0f s)\n", static_cast<long long>(i),
                   static_cast<long long>(rows),
                   std::chrono::duration<double>(Clock::now() - start).count());
    }
  }
  sqlite3_finalize(narrow);
  Exec(db, "PRAGMA wal_checkpoint(TRUNCATE)");
  sqlite3_close(db);
  return 0;
}

// One shape for `seconds`: creates a second.
double RunShape(const std::string& shape, const std::string& path, double seconds,
                int cache_mib, int page_size) {
  sqlite3* db = Open(path, cache_mib, /*synchronous=*/true, page_size);
  Exec(db, WideTable("keys_wide") + " DROP TABLE IF EXISTS keys_current;" +
               WideTable("keys_current") + " PRAGMA wal_checkpoint(TRUNCATE);");
  const bool into_wide = shape == "empty" || shape == "loaded";
  Inserter insert(db, into_wide ? "keys_wide" : "keys_current");
  sqlite3_stmt* probe = nullptr;
  if (shape == "wide" || shape == "narrow") {
    const std::string sql =
        "SELECT 1 FROM keys_" + shape + " WHERE scope = 'tenant-1' AND key = ?1";
    if (sqlite3_prepare_v2(db, sql.c_str(), -1, &probe, nullptr) != SQLITE_OK) {
      Fail(db, "prepare " + sql);
    }
  }
  Keys keys;
  const int64_t now = 1'800'000'000'000;
  int64_t n = 0;
  const auto start = Clock::now();
  while (std::chrono::duration<double>(Clock::now() - start).count() < seconds) {
    Exec(db, "BEGIN");
    for (int j = 0; j < 50; ++j, ++n) {
      const std::string key = keys.Next();
      if (probe != nullptr) {
        sqlite3_bind_text(probe, 1, key.c_str(), -1, SQLITE_TRANSIENT);
        const bool found = sqlite3_step(probe) == SQLITE_ROW;
        sqlite3_reset(probe);
        if (found) continue;  // a replay: nothing to insert
      }
      insert.Insert(key, now, keys.Jitter());
    }
    Exec(db, "COMMIT");
  }
  const double took = std::chrono::duration<double>(Clock::now() - start).count();
  sqlite3_finalize(probe);
  Exec(db, "DROP TABLE IF EXISTS keys_current; PRAGMA wal_checkpoint(TRUNCATE);");
  sqlite3_close(db);
  return static_cast<double>(n) / took;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 == 1 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}

int Run(const std::string& path, double seconds, int rounds, int cache_mib, int page_size) {
  if (!std::filesystem::exists(path)) {
    std::fprintf(stderr, "bucket_probe_bench: no %s (run preload first)\n", path.c_str());
    return 2;
  }
  const std::string empty = path + ".empty";
  const std::vector<std::string> shapes = {"empty", "current", "wide", "narrow", "loaded"};
  std::map<std::string, std::vector<double>> ratios;
  for (int r = 1; r <= rounds; ++r) {
    double reference = 0;
    for (const std::string& shape : shapes) {
      for (const char* suffix : {"", "-wal", "-shm"}) std::filesystem::remove(empty + suffix);
      sync();  // the previous shape's writes are not this one's to wait for
      const double rate =
          RunShape(shape, shape == "empty" ? empty : path, seconds, cache_mib, page_size);
      if (shape == "empty") reference = rate;
      ratios[shape].push_back(rate / reference);
      std::printf("round %d of %d: %-8s %7.0f creates/s, %.2f of empty\n", r, rounds,
                  shape.c_str(), rate, rate / reference);
      std::fflush(stdout);
    }
  }
  for (const char* suffix : {"", "-wal", "-shm"}) std::filesystem::remove(empty + suffix);
  std::printf("medians of %d rounds, over empty:", rounds);
  for (const std::string& shape : shapes) {
    if (shape != "empty") std::printf(" %s %.2f", shape.c_str(), Median(ratios[shape]));
  }
  std::printf("\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Time buckets for idempotency keys on SQLite: raw sqlite3 creates"};
  app.require_subcommand(1);
  std::string db;
  int64_t rows = 10'000'000;
  double seconds = 10;
  int rounds = 3;
  int cache_mib = 0;
  int page_size = 0;
  auto* preload = app.add_subcommand("preload", "fill keys_wide and keys_narrow, in no order");
  preload->add_option("--db", db, "the store's file")->required();
  preload->add_option("--rows", rows, "keys")->check(CLI::PositiveNumber);
  preload->add_option("--page-size", page_size, "bytes (0: SQLite's default)")
      ->check(CLI::IsMember({0, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536}));
  auto* run = app.add_subcommand("run", "each shape per round, against a new file's rate");
  run->add_option("--db", db, "a preloaded store's file")->required();
  run->add_option("--seconds", seconds, "per shape")->check(CLI::PositiveNumber);
  run->add_option("--rounds", rounds)->check(CLI::PositiveNumber);
  run->add_option("--cache-mib", cache_mib, "page cache (0: SQLite's default)")
      ->check(CLI::NonNegativeNumber);
  run->add_option("--page-size", page_size, "the empty store's (the preload's own stays)")
      ->check(CLI::IsMember({0, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536}));
  CLI11_PARSE(app, argc, argv);
  if (preload->parsed()) return Preload(db, rows, page_size);
  return Run(db, seconds, rounds, cache_mib, page_size);
}
