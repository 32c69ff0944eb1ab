// The single-phase idempotent create's statements through the sqlite3 C API, with none of
// the library's code: the baseline the benchmarks measure the library against
// (bench/idempotency_bench.cc's r1, r2 and r3; bench/scale_bench.cc's raw creates on an
// empty and on a loaded store). The statements are the library's SQL text, in the order
// IdempotencyKeys::Execute and Outbox::Enqueue run them on SQLite (so the same plans),
// prepared once on a plain connection to a store the library has migrated.
#ifndef CONVERGE_BENCH_RAW_CREATES_H_
#define CONVERGE_BENCH_RAW_CREATES_H_

#include <sqlite3.h>

#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "converge/outbox.h"

namespace converge_bench {

// Where a WAL's pages are copied back into the database file.
enum class Checkpoints {
  // SQLite's default: inside the COMMIT that takes the WAL past 1,000 pages. The r1-r3
  // of converge_bench keep it (their definition since they were written; the library
  // checkpoints beside its writer, and docs/benchmarks.md, "A WAL bounded at 16 MiB",
  // measures what that difference costs).
  kInCommit,
  // As SqliteDatabase does it (src/store/sqlite/sqlite_database.cc, OnWalCommit and
  // CheckpointLoop), without its RESTART for readers (a raw run has none): a thread of its
  // own on a second connection copies the pages after every `checkpoint_pages` new ones,
  // and past 4 times that the writing connection copies them itself between its commits.
  kBesideTheWriter,
};

// How the raw connection is set up: what a store's URI sets on the library's writer
// (src/store/sqlite/sqlite_database.h, Settings), and where checkpoints run.
struct RawSettings {
  bool synchronous_full = true;
  int cache_mib = 0;  // 0: SQLite's default page cache
  int mmap_mib = 0;   // 0: no memory map
  int checkpoint_pages = 1000;
  Checkpoints checkpoints = Checkpoints::kInCommit;
};

class RawCreates {
 public:
  // Opens `path` (a store the library has migrated, with a payments table) in WAL mode.
  // `envelope` is the outbox payload every create writes: one the library wrote in the
  // same run, so the rows have its size.
  RawCreates(const std::string& path, const RawSettings& settings, std::string envelope)
      : envelope_(std::move(envelope)), mark_(settings.checkpoint_pages) {
    Check(sqlite3_open_v2(path.c_str(), &db_, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX,
                          nullptr),
          "open");
    const std::string sync =
        std::string("PRAGMA synchronous=") + (settings.synchronous_full ? "FULL;" : "NORMAL;");
    std::string pragmas = "PRAGMA journal_mode=WAL; " + sync +
                          " PRAGMA foreign_keys=ON; PRAGMA temp_store=MEMORY;";
    // As the library's writer connection has them (SqliteDatabase::CachePragma).
    if (settings.cache_mib > 0) {
      pragmas += " PRAGMA cache_size=-" + std::to_string(int64_t{settings.cache_mib} * 1024) + ";";
    }
    if (settings.mmap_mib > 0) {
      pragmas += " PRAGMA mmap_size=" + std::to_string(int64_t{settings.mmap_mib} << 20) + ";";
    }
    Exec(pragmas);
    sqlite3_busy_timeout(db_, 5000);  // the library's default busy_timeout_ms
    if (settings.checkpoints == Checkpoints::kBesideTheWriter) {
      if (sqlite3_open_v2(path.c_str(), &checkpoint_db_,
                          SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, nullptr) != SQLITE_OK ||
          sqlite3_exec(checkpoint_db_, sync.c_str(), nullptr, nullptr, nullptr) != SQLITE_OK) {
        Fail(std::string("the checkpoint connection: ") +
             (checkpoint_db_ ? sqlite3_errmsg(checkpoint_db_) : "out of memory"));
      }
      sqlite3_wal_hook(db_, &RawCreates::OnWalCommit, this);  // autocheckpoint off too
      checkpointer_ = std::thread([this] { CheckpointLoop(); });
    }
    const char* sql[] = {
        "SELECT request_hash, status, lease_until, fence, recovery_point, recovery_data, "
        "response_status, response_headers, response_body, expires_at "
        "FROM idempotency_keys WHERE scope = $1 AND key = $2",
        "UPDATE converge_sequences SET value = value + 1 WHERE name = 'fence'",
        "SELECT value FROM converge_sequences WHERE name = 'fence'",
        "INSERT INTO idempotency_keys (scope, key, request_hash, status, "
        "recovery_point, lease_until, fence, created_at, updated_at, expires_at) "
        "VALUES ($1, $2, $3, 'in_progress', 'started', $4, $5, $6, $6, $7) "
        "ON CONFLICT DO NOTHING",
        "INSERT INTO payments (id, amount) VALUES ($1, $2)",
        "INSERT INTO outbox_events (event_id, source, aggregate_type, aggregate_id, "
        "type, payload, headers, created_at, partition_no) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        "UPDATE idempotency_keys SET status = 'completed', recovery_point = 'finished', "
        "response_status = $1, response_headers = $2, response_body = $3, "
        "lease_until = $4, updated_at = $4 "
        "WHERE scope = $5 AND key = $6 AND fence = $7 AND status = 'in_progress'",
    };
    for (const char* s : sql) {
      sqlite3_stmt* stmt = nullptr;
      Check(sqlite3_prepare_v3(db_, s, -1, SQLITE_PREPARE_PERSISTENT, &stmt, nullptr), s);
      stmts_.push_back(stmt);
    }
  }
  ~RawCreates() {
    if (checkpointer_.joinable()) {
      {
        std::lock_guard<std::mutex> l(mu_);
        stopping_ = true;
      }
      cv_.notify_one();
      checkpointer_.join();
      sqlite3_close_v2(checkpoint_db_);
    }
    for (sqlite3_stmt* s : stmts_) sqlite3_finalize(s);
    sqlite3_close_v2(db_);
  }
  RawCreates(const RawCreates&) = delete;
  RawCreates& operator=(const RawCreates&) = delete;

  // Pages the commits so far appended to the WAL (frames), counted where the checkpoints
  // run beside the writer (the WAL hook is then this class's); 0 otherwise.
  int64_t wal_pages_written() const { return wal_pages_written_; }

  // One create's statements, in the open transaction: key and payment `id`, its event
  // `event_id`, at `now` (milliseconds since the epoch).
  void Create(std::string_view id, std::string_view event_id, int64_t now, int64_t amount) {
    const char* hash = "a3f1c2d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
    sqlite3_stmt* s = stmts_[0];
    Text(s, 1, "bench");
    Text(s, 2, id);
    Step(s, SQLITE_DONE);
    Step(stmts_[1], SQLITE_DONE);
    s = stmts_[2];
    Step(s, SQLITE_ROW);
    const int64_t fence = sqlite3_column_int64(s, 0);
    Step(s, SQLITE_DONE);
    s = stmts_[3];
    Text(s, 1, "bench");
    Text(s, 2, id);
    Text(s, 3, hash);
    sqlite3_bind_int64(s, 4, now + 30000);
    sqlite3_bind_int64(s, 5, fence);
    sqlite3_bind_int64(s, 6, now);
    sqlite3_bind_int64(s, 7, now + 86400000);
    Step(s, SQLITE_DONE);
    s = stmts_[4];
    Text(s, 1, id);
    sqlite3_bind_int64(s, 2, amount);
    Step(s, SQLITE_DONE);
    s = stmts_[5];
    Text(s, 1, event_id);
    Text(s, 2, "urn:converge");
    Text(s, 3, "payment");
    Text(s, 4, id);
    Text(s, 5, "payment.captured");
    Text(s, 6, envelope_);
    Text(s, 7, "{}");
    sqlite3_bind_int64(s, 8, now);
    sqlite3_bind_int64(s, 9, converge::OutboxPartition(id));
    Step(s, SQLITE_DONE);
    s = stmts_[6];
    const std::string body = "{\"id\":\"" + std::string(id) + "\"}";
    sqlite3_bind_int64(s, 1, 201);
    Text(s, 2, "[]");
    sqlite3_bind_blob64(s, 3, body.data(), body.size(), SQLITE_STATIC);
    sqlite3_bind_int64(s, 4, now);
    Text(s, 5, "bench");
    Text(s, 6, id);
    sqlite3_bind_int64(s, 7, fence);
    Step(s, SQLITE_DONE);
  }

  // The connection the creates run on: for more statements in their transactions.
  sqlite3* connection() const { return db_; }

  void Exec(const std::string& sql) {
    char* err = nullptr;
    if (sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &err) != SQLITE_OK) {
      Fail("raw '" + sql + "': " + (err ? err : "?"));
    }
  }

 private:
  static constexpr int kWriterFactor = 4;  // SqliteDatabase's kWriterCheckpointFactor

  static int OnWalCommit(void* self, sqlite3* db, const char* name, int pages) {
    auto* r = static_cast<RawCreates*>(self);
    const int mark = r->mark_;
    // `pages` is the WAL's length after this commit; shorter than before, it started over
    // (a restart goes unseen only where the WAL ended shorter than this commit's frames,
    // which the checkpoints, every `checkpoint_pages`, make rare).
    r->wal_pages_written_ += pages >= r->wal_pages_ ? pages - r->wal_pages_ : pages;
    r->wal_pages_ = pages;
    std::unique_lock<std::mutex> l(r->mu_);
    if (pages < r->requested_at_) r->requested_at_ = 0;  // the WAL started over
    if (pages < r->writer_at_) r->writer_at_ = 0;
    if (pages >= mark * kWriterFactor && pages - r->writer_at_ >= mark) {
      r->writer_at_ = pages;
      l.unlock();
      sqlite3_wal_checkpoint_v2(db, name, SQLITE_CHECKPOINT_PASSIVE, nullptr, nullptr);
    } else if (pages - r->requested_at_ >= mark) {
      r->requested_at_ = pages;
      r->wanted_ = true;
      r->cv_.notify_one();
    }
    return SQLITE_OK;
  }

  void CheckpointLoop() {
    for (;;) {
      {
        std::unique_lock<std::mutex> l(mu_);
        cv_.wait(l, [&] { return stopping_ || wanted_; });
        if (stopping_) return;
        wanted_ = false;
      }
      // SQLITE_BUSY while the writer checkpoints: the pages wait for the next pass.
      sqlite3_wal_checkpoint_v2(checkpoint_db_, "main", SQLITE_CHECKPOINT_PASSIVE, nullptr,
                                nullptr);
    }
  }

  [[noreturn]] static void Fail(const std::string& what) {
    std::fprintf(stderr, "raw sqlite3: %s\n", what.c_str());
    std::exit(1);
  }
  static void Text(sqlite3_stmt* s, int i, std::string_view v) {
    sqlite3_bind_text64(s, i, v.data(), v.size(), SQLITE_STATIC, SQLITE_UTF8);
  }
  void Step(sqlite3_stmt* s, int want) {
    int rc = sqlite3_step(s);
    if (rc != want) Fail(std::string("step: ") + sqlite3_errmsg(db_));
    if (rc == SQLITE_DONE) {
      sqlite3_reset(s);
      sqlite3_clear_bindings(s);
    }
  }
  void Check(int rc, const std::string& what) {
    if (rc != SQLITE_OK) Fail(what + ": " + (db_ ? sqlite3_errmsg(db_) : "?"));
  }

  sqlite3* db_ = nullptr;
  std::vector<sqlite3_stmt*> stmts_;
  std::string envelope_;
  const int mark_;  // RawSettings::checkpoint_pages

  // Checkpoints::kBesideTheWriter
  sqlite3* checkpoint_db_ = nullptr;
  std::thread checkpointer_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool wanted_ = false, stopping_ = false;
  int requested_at_ = 0, writer_at_ = 0;  // the WAL's pages at the last pass of each
  // On the writer's thread only (the WAL hook runs inside its COMMIT).
  int wal_pages_ = 0;
  int64_t wal_pages_written_ = 0;
};

}  // namespace converge_bench

#endif  // CONVERGE_BENCH_RAW_CREATES_H_
