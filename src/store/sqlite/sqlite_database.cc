// SQLite backend with group commit.
//
// Method: SQLite allows one writer at a time, and with synchronous=FULL every commit
// costs an fsync of the WAL. Instead of one physical transaction per Transact call, one
// writer thread owns the only read-write connection. Callers enqueue their function and
// block. The writer takes everything queued (up to max_batch), opens one transaction,
// runs each function in it, and the functions queued meanwhile, commits once, and only
// then wakes every caller of the batch. So a caller still returns only after its own work
// is durable, and N callers share one fsync. A failing function must take only its own
// work with it: the writer runs the batch straight, and when a function fails it rolls
// the whole transaction back and runs the others again, each inside its own SAVEPOINT,
// as it runs the next batches until failures stop (RunBatch). Savepoints cost every
// function of a batch that does not fail (SQLite copies each page the function touches
// into the statement journal).
//
// If a statement destroys the outer transaction (SQLite does that on some I/O and
// out-of-memory errors), the functions that had already run in it lost their work: they
// are re-run in a fresh transaction, which the Transact contract allows (fn may run more
// than once). The function that broke it fails with kUnavailable.
//
// Readers use their own read-only connections, which WAL lets run beside the writer.
#include "src/store/sqlite/sqlite_database.h"

#include <semaphore.h>
#include <sqlite3.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cassert>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <charconv>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <condition_variable>
#include <deque>
#include <limits>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>

#include "converge/failpoint.h"
#include "src/core/schema/schema.h"
#include "src/core/store_uri.h"
#include "src/core/thread_name.h"
#include "src/store/sqlite/arrival_poll.h"
#include "src/store/sqlite/handoff.h"

namespace converge::sqlite {
namespace {

Status FromSqlite(int rc, sqlite3* db, std::string_view what) {
  std::string msg(what);
  msg += ": ";
  msg += db != nullptr ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
  switch (rc & 0xff) {
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
      return UnavailableError(std::move(msg));
    case SQLITE_CONSTRAINT:
      if (rc == SQLITE_CONSTRAINT_UNIQUE || rc == SQLITE_CONSTRAINT_PRIMARYKEY) {
        return AlreadyExistsError(std::move(msg));
      }
      return InvalidArgumentError(std::move(msg));
    case SQLITE_NOMEM:
      return ResourceExhaustedError(std::move(msg));
    case SQLITE_FULL:
    case SQLITE_IOERR:
    case SQLITE_CANTOPEN:
    case SQLITE_PROTOCOL:
      return UnavailableError(std::move(msg));
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB:
      return DataLossError(std::move(msg));
    case SQLITE_READONLY:
      return FailedPreconditionError(std::move(msg));
    case SQLITE_ERROR:
    case SQLITE_RANGE:
    case SQLITE_MISMATCH:
    case SQLITE_TOOBIG:
      return InvalidArgumentError(std::move(msg));
    default:
      return InternalError(std::move(msg));
  }
}

// One sqlite3 connection with a cache of prepared statements. Used by one thread at a
// time.
class Connection {
 public:
  ~Connection() {
    for (auto& [sql, stmt] : cache_) sqlite3_finalize(stmt.stmt);
    if (db_ != nullptr) sqlite3_close_v2(db_);
  }

  Status Open(const std::string& path, bool read_only, Millis busy_timeout) {
    int flags = read_only ? SQLITE_OPEN_READONLY : (SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE);
    flags |= SQLITE_OPEN_NOMUTEX;
    int rc = sqlite3_open_v2(path.c_str(), &db_, flags, nullptr);
    if (rc != SQLITE_OK) {
      Status st = UnavailableError("cannot open sqlite database '" + path + "': " +
                                   (db_ ? sqlite3_errmsg(db_) : sqlite3_errstr(rc)));
      return st;
    }
    sqlite3_extended_result_codes(db_, 1);
    sqlite3_busy_timeout(db_, static_cast<int>(busy_timeout.count()));
    return OkStatus();
  }

  sqlite3* db() const { return db_; }

  // Runs SQL text that may hold several statements and takes no parameters.
  Status ExecScript(const std::string& sql) {
    char* err = nullptr;
    int rc = sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &err);
    if (rc != SQLITE_OK) {
      std::string msg = err ? err : sqlite3_errstr(rc);
      sqlite3_free(err);
      return FromSqlite(rc, nullptr, msg);
    }
    return OkStatus();
  }

  Status Run(std::string_view sql, std::span<const Value> params, Rows* rows,
             int64_t* changes) {
    CONVERGE_ASSIGN_OR_RETURN(Prepared * p, Prepare(sql));
    sqlite3_stmt* stmt = p->stmt;
    if (p->max_param > static_cast<int>(params.size())) {
      sqlite3_reset(stmt);
      return InvalidArgumentError("statement uses $" + std::to_string(p->max_param) +
                                  " but " + std::to_string(params.size()) +
                                  " parameters were given: " + std::string(sql));
    }
    for (size_t i = 0; i < p->index_to_param.size(); ++i) {
      int rc = Bind(stmt, static_cast<int>(i + 1), params[p->index_to_param[i]]);
      if (rc != SQLITE_OK) {
        sqlite3_reset(stmt);
        sqlite3_clear_bindings(stmt);
        return FromSqlite(rc, db_, "bind");
      }
    }
    int rc;
    while ((rc = sqlite3_step(stmt)) == SQLITE_ROW) {
      if (rows == nullptr) continue;
      int n = sqlite3_column_count(stmt);
      std::vector<Value> values;
      values.reserve(n);
      for (int c = 0; c < n; ++c) values.push_back(Column(stmt, c));
      rows->emplace_back(std::move(values));
    }
    Status st;
    if (rc != SQLITE_DONE) st = FromSqlite(sqlite3_extended_errcode(db_), db_, "step");
    if (changes != nullptr) *changes = sqlite3_changes64(db_);
    sqlite3_reset(stmt);
    sqlite3_clear_bindings(stmt);
    return st;
  }

 private:
  struct Prepared {
    sqlite3_stmt* stmt = nullptr;
    std::vector<int> index_to_param;  // sqlite parameter index - 1 -> params[] index
    int max_param = 0;
  };

  Result<Prepared*> Prepare(std::string_view sql) {
    Recent& recent = recent_[(reinterpret_cast<uintptr_t>(sql.data()) >> 4) % kRecent];
    if (recent.data == sql.data() && *recent.text == sql) return recent.prepared;
    auto it = cache_.find(sql);  // no copy of the SQL text to look it up
    if (it != cache_.end()) {
      recent = {sql.data(), &it->first, &it->second};
      return &it->second;
    }
    if (cache_.size() >= kMaxCachedStatements) {
      for (auto& [text, stmt] : cache_) sqlite3_finalize(stmt.stmt);
      cache_.clear();
      recent_.fill({});
    }
    Prepared p;
    const char* tail = nullptr;
    int rc = sqlite3_prepare_v3(db_, sql.data(), static_cast<int>(sql.size()),
                                SQLITE_PREPARE_PERSISTENT, &p.stmt, &tail);
    if (rc != SQLITE_OK) {
      return tl::unexpected(FromSqlite(rc, db_, "prepare '" + std::string(sql) + "'"));
    }
    if (p.stmt == nullptr) return tl::unexpected(InvalidArgumentError("empty SQL statement"));
    int n = sqlite3_bind_parameter_count(p.stmt);
    for (int i = 1; i <= n; ++i) {
      const char* name = sqlite3_bind_parameter_name(p.stmt, i);
      int num = 0;
      if (name == nullptr || name[0] != '$' ||
          std::from_chars(name + 1, name + strlen(name), num).ec != std::errc() || num < 1) {
        sqlite3_finalize(p.stmt);
        return tl::unexpected(InvalidArgumentError(
            "placeholders must be $1, $2, ...; got '" + std::string(name ? name : "?") +
            "' in: " + std::string(sql)));
      }
      p.index_to_param.push_back(num - 1);
      p.max_param = std::max(p.max_param, num);
    }
    auto [pos, inserted] = cache_.emplace(std::string(sql), p);
    recent = {sql.data(), &pos->first, &pos->second};
    return &pos->second;
  }

  // SQLITE_STATIC: the values outlive the binding, which Run clears before it returns
  // (sqlite3_clear_bindings), so SQLite need not copy each string and blob.
  static int Bind(sqlite3_stmt* stmt, int i, const Value& v) {
    struct Binder {
      sqlite3_stmt* stmt;
      int i;
      int operator()(std::monostate) const { return sqlite3_bind_null(stmt, i); }
      int operator()(int64_t x) const { return sqlite3_bind_int64(stmt, i, x); }
      int operator()(double x) const { return sqlite3_bind_double(stmt, i, x); }
      int operator()(const std::string& s) const { return (*this)(TextRef{s}); }
      int operator()(const Blob& b) const { return (*this)(BlobRef{b.bytes}); }
      // Empty text and blobs are bound as such, not as NULL, which is what SQLite makes of
      // a null pointer (an empty string_view may have one).
      int operator()(TextRef t) const {
        return sqlite3_bind_text64(stmt, i, t.text.data() ? t.text.data() : "",
                                   t.text.size(), SQLITE_STATIC, SQLITE_UTF8);
      }
      int operator()(BlobRef b) const {
        return sqlite3_bind_blob64(stmt, i, b.bytes.data() ? b.bytes.data() : "",
                                   b.bytes.size(), SQLITE_STATIC);
      }
    };
    return std::visit(Binder{stmt, i}, v);
  }

  static Value Column(sqlite3_stmt* stmt, int c) {
    switch (sqlite3_column_type(stmt, c)) {
      case SQLITE_INTEGER:
        return Value(static_cast<int64_t>(sqlite3_column_int64(stmt, c)));
      case SQLITE_FLOAT:
        return Value(sqlite3_column_double(stmt, c));
      case SQLITE_TEXT: {
        auto p = reinterpret_cast<const char*>(sqlite3_column_text(stmt, c));
        return Value(std::string(p, sqlite3_column_bytes(stmt, c)));
      }
      case SQLITE_BLOB: {
        auto p = static_cast<const char*>(sqlite3_column_blob(stmt, c));
        return Value(Blob{std::string(p ? p : "", sqlite3_column_bytes(stmt, c))});
      }
      default:
        return Value();
    }
  }

  static constexpr size_t kMaxCachedStatements = 512;
  sqlite3* db_ = nullptr;
  struct TextHash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>()(s); }
  };
  std::unordered_map<std::string, Prepared, TextHash, std::equal_to<>> cache_;
  // The statement last looked up from each address of SQL text, by the address: a call
  // site passes the same string literal each time, whose address finds its statement
  // without hashing the text (profiled at 1.4% of the writer's CPU, 2026-12-03). The text
  // is still compared: another string may occupy that address later. Entries point into
  // cache_ (its nodes stay put until it is cleared, and recent_ with it).
  struct Recent {
    const char* data = nullptr;
    const std::string* text = nullptr;
    Prepared* prepared = nullptr;
  };
  static constexpr size_t kRecent = 64;
  std::array<Recent, kRecent> recent_{};
};

// SQLite's words for what differs between backends (dialect.h, src/core/schema/).
class SqliteDialect final : public schema::SchemaDialect {
 public:
  std::string_view TypeName(ColumnType type) const override {
    switch (type) {
      case ColumnType::kBigint:
        return "INTEGER";
      case ColumnType::kDouble:
        return "REAL";
      case ColumnType::kBlob:
        return "BLOB";
    }
    return "";
  }
  std::string_view AutoIncrementPrimaryKey() const override {
    return "INTEGER PRIMARY KEY AUTOINCREMENT";
  }
  std::string_view ForUpdateSkipLocked() const override { return ""; }
  std::string_view WithoutRowid() const override { return " WITHOUT ROWID"; }
  // One writer: a deletion's page writes land inside the commits creates wait for, so
  // each leaf page should be dirtied once for all of its expired rows.
  bool SweepsInKeyOrder() const override { return true; }
  // SQLite answers a claim of two or more partitions ("partition_no IN (...) ORDER BY
  // seq") through this index by reading every unpublished row of those partitions and
  // sorting them; without it the claim walks outbox_unpublished in seq order and stops
  // at its LIMIT (a relay holding one partition, or none with anything to publish, walks
  // further than it did: design/outbox-relay.md). Meanwhile each create wrote a leaf of
  // it per partition a commit touched: with a backlog, about 40 of the 72 WAL pages of a
  // 51-create commit (docs/benchmarks.md).
  std::string_view DropOutboxPartitionIndex() const override {
    return "DROP INDEX IF EXISTS outbox_unpublished_partition;";
  }
  // A row per sequence, raised by an UPDATE and read back (NextFence): with one writer at
  // a time that is all a sequence needs.
  std::string_view CreateFenceSequence() const override {
    return "CREATE TABLE converge_sequences (\n"
           "  name  TEXT    NOT NULL PRIMARY KEY,\n"
           "  value INTEGER NOT NULL\n"
           ") WITHOUT ROWID;\n"
           "INSERT INTO converge_sequences (name, value)\n"
           "  SELECT 'fence', coalesce(max(fence), 0) FROM idempotency_keys;";
  }
};

const SqliteDialect& TheDialect() {
  static const SqliteDialect kDialect;
  return kDialect;
}

class SqliteTx : public Tx {
 public:
  explicit SqliteTx(Connection* conn) : conn_(conn) {}
  using Tx::TakeCommitHooks;  // for SqliteDatabase, once the batch committed

  Result<int64_t> ExecParams(std::string_view sql, std::span<const Value> params) override {
    int64_t changes = 0;
    CONVERGE_RETURN_IF_ERROR(conn_->Run(sql, params, nullptr, &changes));
    return changes;
  }
  Result<Rows> QueryParams(std::string_view sql, std::span<const Value> params) override {
    Rows rows;
    CONVERGE_RETURN_IF_ERROR(conn_->Run(sql, params, &rows, nullptr));
    return rows;
  }
  const Dialect& dialect() const override { return TheDialect(); }

  // One writer at a time: the row update is the whole sequence. A rolled-back draw is
  // drawn again by the next transaction, which is fine: nobody saw it committed.
  // Two statements, not one UPDATE … RETURNING: SQLite runs a RETURNING statement into
  // an ephemeral table it opens and closes each time, which took most of the 12% of the
  // writer's time that drawing fences took (docs/benchmarks.md).
  Result<int64_t> NextFence() override {
    CONVERGE_ASSIGN_OR_RETURN(
        int64_t raised,
        ExecParams("UPDATE converge_sequences SET value = value + 1 WHERE name = 'fence'", {}));
    if (raised != 1) return tl::unexpected(InternalError("converge_sequences has no 'fence' row"));
    CONVERGE_ASSIGN_OR_RETURN(
        Rows rows, QueryParams("SELECT value FROM converge_sequences WHERE name = 'fence'", {}));
    if (rows.empty()) return tl::unexpected(InternalError("converge_sequences has no 'fence' row"));
    return rows[0].Int(0);
  }
  Status LockUntilCommit(std::string_view) override { return OkStatus(); }

 private:
  Connection* conn_;
};

// Everything SqliteDatabase is opened with: the URI's settings (defaults as in
// database.h) and the generic DatabaseOptions.
struct Options : Settings {
  int max_attempts = 8;
};

class SqliteDatabase : public Database {
 public:
  explicit SqliteDatabase(Options options) : path_(options.path), options_(std::move(options)) {
    stats_.batch_histogram.assign(16, 0);
    stats_.writer.emplace();
  }

  ~SqliteDatabase() override {
    {
      std::lock_guard<std::mutex> l(mu_);
      stopping_ = true;
    }
    work_cv_.notify_all();
    if (writer_.joinable()) writer_.join();
    {
      std::lock_guard<std::mutex> l(checkpoint_mu_);
      checkpoint_stopping_ = true;
    }
    checkpoint_cv_.notify_all();
    if (checkpointer_.joinable()) checkpointer_.join();
  }

  Status Init() {
    CONVERGE_RETURN_IF_ERROR(writer_conn_.Open(path_, false, options_.busy_timeout));
    // journal_mode=WAL answers with a row; run it as a query to see the mode it took.
    // Switching a file in a rollback-journal mode (an application's own database, which
    // `converge relay` opens beside the application writing to it) takes an exclusive
    // lock, and SQLite does not call the busy handler for it: while another process holds
    // the write lock, it fails at once with SQLITE_BUSY. So it is tried again, backing
    // off, until busy_timeout has passed, as any other wait for a lock.
    Rows rows;
    const auto deadline = std::chrono::steady_clock::now() + options_.busy_timeout;
    for (Millis backoff(1);; backoff = std::min(backoff * 2, Millis(50))) {
      rows.clear();
      Status st = writer_conn_.Run("PRAGMA journal_mode=WAL", {}, &rows, nullptr);
      if (st.ok()) break;
      const bool busy = (sqlite3_extended_errcode(writer_conn_.db()) & 0xff) == SQLITE_BUSY;
      if (!busy || std::chrono::steady_clock::now() + backoff > deadline) return st;
      std::this_thread::sleep_for(backoff);
    }
    if (rows.empty() || rows[0].Text(0) != "wal") {
      return UnavailableError("'" + path_ + "' cannot use WAL mode");
    }
    // temp_store=MEMORY keeps the statement journal (what ROLLBACK TO a job's savepoint
    // reads) in memory. On a file it spills once a transaction's journal passes 64 KiB
    // and is truncated only at commit, so a batch of many jobs paid pwrite calls for every
    // job's pages; in memory it is truncated whenever the outermost savepoint is released,
    // so it holds one job's pages at a time (docs/benchmarks.md, "Levers").
    CONVERGE_RETURN_IF_ERROR(writer_conn_.ExecScript(
        std::string("PRAGMA synchronous=") + (options_.synchronous_full ? "FULL" : "NORMAL") +
        "; PRAGMA foreign_keys=ON; PRAGMA temp_store=MEMORY;" + CachePragma()));
    CONVERGE_RETURN_IF_ERROR(Migrate());
    // Checkpoints: see OnWalCommit and CheckpointLoop. The hook replaces SQLite's
    // automatic checkpoint, which ran inside the commit that crossed its mark, on the
    // writer thread.
    CONVERGE_RETURN_IF_ERROR(checkpoint_conn_.Open(path_, false, options_.busy_timeout));
    CONVERGE_RETURN_IF_ERROR(checkpoint_conn_.ExecScript(
        std::string("PRAGMA synchronous=") + (options_.synchronous_full ? "FULL" : "NORMAL")));
    sqlite3_wal_hook(writer_conn_.db(), &SqliteDatabase::OnWalCommit, this);
    checkpointer_ = std::thread([this] {
      converge::internal::NameThisThread("cv-sqlite-ckpt");
      CheckpointLoop();
    });
    writer_ = std::thread([this] {
      converge::internal::NameThisThread("cv-sqlite-write");
      WriterLoop();
    });
    writer_id_ = writer_.get_id();
    return OkStatus();
  }

  Status Transact(const TxFn& fn) override {
    if (std::this_thread::get_id() == writer_id_ && current_tx_ != nullptr) {
      // Called from inside a function the writer is running: same transaction.
      return current_tx_->Savepoint(fn);
    }
    Job job;
    if (!job.handoff.ready()) return InternalError("sqlite: cannot make a semaphore to wait on");
    job.fn = &fn;
    {
      std::unique_lock<std::mutex> l(mu_);
      if (stopping_) return CancelledError("database is closing");
      queue_.push_back(&job);
      queued_.store(queue_.size(), std::memory_order_relaxed);
      work_cv_.notify_one();
    }
    job.handoff.Wait(early_wake_spin_);
    // The callers of a batch wake each other, each the next (WriterLoop).
    if (job.next != nullptr) job.next->handoff.Done();
    return std::move(job.status);
  }

  // The job lives on the heap until the writer has called `done` (WriterLoop).
  void TransactAsync(TxFn fn, std::function<void(Status)> done) override {
    if (!done) done = [](Status) {};
    if (std::this_thread::get_id() == writer_id_ && current_tx_ != nullptr) {
      done(FailedPreconditionError(
          "TransactAsync called inside a transaction, whose commit its done would wait "
          "for; use Transact"));
      return;
    }
    auto job = std::make_unique<Job>();
    job->owned_fn = std::move(fn);
    job->fn = &job->owned_fn;
    job->async = true;
    job->on_done = std::move(done);
    {
      std::unique_lock<std::mutex> l(mu_);
      if (!stopping_) {
        queue_.push_back(job.release());
        queued_.store(queue_.size(), std::memory_order_relaxed);
        work_cv_.notify_one();
        return;
      }
    }
    job->on_done(CancelledError("database is closing"));
  }

  bool transacts_async() const override { return true; }

  Status Read(const TxFn& fn) override {
    std::unique_ptr<Connection> conn;
    {
      std::unique_lock<std::mutex> l(readers_mu_);
      readers_cv_.wait(l,
                       [&] { return !idle_readers_.empty() || open_readers_ < options_.readers; });
      if (!idle_readers_.empty()) {
        conn = std::move(idle_readers_.back());
        idle_readers_.pop_back();
      } else {
        ++open_readers_;
      }
    }
    if (conn == nullptr) {
      conn = std::make_unique<Connection>();
      Status st = conn->Open(path_, true, options_.busy_timeout);
      if (st.ok() && !CachePragma().empty()) st = conn->ExecScript(CachePragma());
      if (!st.ok()) {
        std::lock_guard<std::mutex> l(readers_mu_);
        --open_readers_;
        readers_cv_.notify_one();
        return st;
      }
    }
    // Prepared once per connection (Run caches them), where ExecScript would parse the
    // text on every call: a read is on the hot path of every replayed request.
    Status st = conn->Run("BEGIN", {}, nullptr, nullptr);
    if (st.ok()) {
      SqliteTx tx(conn.get());
      st = RunGuarded(fn, tx);
      // Read-only: nothing to keep.
      Status end = conn->Run("ROLLBACK", {}, nullptr, nullptr);
      if (st.ok()) st = end;
    }
    {
      std::lock_guard<std::mutex> l(readers_mu_);
      idle_readers_.push_back(std::move(conn));
    }
    readers_cv_.notify_one();
    return st;
  }

  DatabaseStats stats() const override {
    DatabaseStats s;
    {
      std::lock_guard<std::mutex> l(mu_);
      s = stats_;
      s.queued = static_cast<int64_t>(queue_.size());
      // A wait still going on counts up to now: an idle writer is seen waiting.
      if (waiting_since_) s.writer->waiting += SecondsSince(*waiting_since_);
    }
    std::lock_guard<std::mutex> l(checkpoint_mu_);
    s.wal = checkpoint_stats_;
    return s;
  }

 private:
  struct Job {
    const TxFn* fn = nullptr;
    Status status;
    std::vector<std::function<void()>> hooks;
    int attempts = 0;  // attempts already made, for RunJob (a bare one that was kAborted)
    // Its caller's wake-up (handoff.h: a semaphore, and a state that lets the writer wake
    // the caller early, before the commit). A batch wakes exactly its callers, never
    // those whose jobs wait for the next batch.
    converge::internal::Handoff handoff;
    Job* next = nullptr;  // the caller this one wakes once it is woken (WriterLoop)
    // TransactAsync's: its function, and what the writer calls instead of waking a caller.
    bool async = false;
    TxFn owned_fn;
    std::function<void(Status)> on_done;
  };

  static Status RunGuarded(const TxFn& fn, Tx& tx) {
    try {
      return fn(tx);
    } catch (const std::exception& e) {
      return InternalError(std::string("transaction function threw: ") + e.what());
    } catch (...) {
      return InternalError("transaction function threw a non-standard exception");
    }
  }

  // The migration runner's view of the writer connection (src/core/schema/schema.h).
  // SQLite's write lock is the migration lock: BEGIN IMMEDIATE takes it, waiting up to
  // busy_timeout for another process that holds it, so two processes opening one new
  // file migrate it once.
  class MigrationTarget : public schema::MigrationTarget {
   public:
    explicit MigrationTarget(Connection* conn) : conn_(conn) {}
    const schema::SchemaDialect& dialect() const override { return TheDialect(); }
    Status BeginLocked() override { return conn_->ExecScript("BEGIN IMMEDIATE"); }
    Status ExecScript(const std::string& sql) override { return conn_->ExecScript(sql); }
    Result<Rows> Query(std::string_view sql, std::span<const Value> params) override {
      Rows rows;
      CONVERGE_RETURN_IF_ERROR(conn_->Run(sql, params, &rows, nullptr));
      return rows;
    }
    Status Commit() override { return conn_->ExecScript("COMMIT"); }
    void Rollback() override { (void)conn_->ExecScript("ROLLBACK"); }

   private:
    Connection* conn_;
  };

  Status Migrate() {
    MigrationTarget target(&writer_conn_);
    return schema::Migrate(target, "'" + path_ + "'");
  }

  void WriterLoop() {
    std::vector<Job*> batch;
    bool poll = false;  // PollForArrivals before the next wait
    for (;;) {
      const double polled = poll ? PollForArrivals() : 0;
      {
        std::unique_lock<std::mutex> l(mu_);
        stats_.writer->waiting += polled;
        if (queue_.empty()) {
          waiting_since_ = std::chrono::steady_clock::now();
          work_cv_.wait(l, [&] { return stopping_ || !queue_.empty(); });
          stats_.writer->waiting += SecondsSince(*waiting_since_);
          waiting_since_.reset();
        }
        if (queue_.empty()) return;  // stopping, and everything queued has run
        TakeQueuedLocked(&batch);
      }
      RunBatch(batch);
      // The writer wakes the batch's first caller, and each caller woken wakes the next
      // (a chain). Waking each of a batch's callers itself took the writer about a tenth
      // of its time, in system calls and the hypervisor's wake-ups of the other CPU
      // (docs/benchmarks.md). A chain makes callers runnable one after another, where a
      // binary tree (each caller waking two) made the whole batch runnable within a few
      // steps, all of it competing with the writer for the CPUs: on 2 CPUs the writer
      // waited for one 2-3 times as long per call once the callers' own work got cheaper
      // (Outbox::Prepare, 2026-12-01). A caller slow to be scheduled holds up the rest of
      // the chain, and the last of a batch of n waits n wake-ups where a tree took log2 n;
      // the writer meanwhile runs the calls already queued.
      // TransactAsync's jobs have no caller waiting: the writer calls their `done`, after
      // the chain is started (its callers' jobs may be gone once the first is woken).
      Job* first = nullptr;
      Job* last = nullptr;
      for (Job* job : batch) {
        if (job->async) {
          async_done_.push_back(job);
          continue;
        }
        job->next = nullptr;
        (last != nullptr ? last->next : first) = job;
        last = job;
      }
      poll = arrival_poll_.ShouldPoll(first != last);
      if (first != nullptr) first->handoff.Done();
      if (commit_started_) {
        early_wake_.Waited(SecondsSince(*commit_started_));
        commit_started_.reset();
      }
      for (Job* job : async_done_) {
        try {
          job->on_done(std::move(job->status));
        } catch (const std::exception& e) {
          std::fprintf(stderr, "converge sqlite: a TransactAsync done threw (ignored): %s\n",
                       e.what());
        } catch (...) {
          std::fprintf(stderr, "converge sqlite: a TransactAsync done threw (ignored)\n");
        }
        delete job;
      }
      async_done_.clear();
      batch.clear();
    }
  }

  // The writer's poll of its queue before it sleeps: when, arrival_poll.h; how long, up
  // to kArrivalPoll (docs/benchmarks.md, "The writer polls for the next call"). The time
  // polled counts as waiting.
  static constexpr std::chrono::microseconds kArrivalPoll{50};

  // Polls the queue's length for up to kArrivalPoll, tells arrival_poll_ whether a call
  // came, and returns the seconds it took.
  double PollForArrivals() {
    const auto start = std::chrono::steady_clock::now();
    const auto until = start + kArrivalPoll;
    auto now = start;
    bool found = false;
    while (!(found = queued_.load(std::memory_order_relaxed) > 0) && now < until) {
      for (int i = 0; i < 4; ++i) converge::internal::CpuRelax();
      now = std::chrono::steady_clock::now();
    }
    arrival_poll_.Polled(found);
    return std::chrono::duration<double>(now - start).count();
  }

  // What running one job did to the open transaction.
  enum class Ran {
    kKept,    // the job's work, or its rollback, is in the transaction: go on
    kFailed,  // the job failed without a savepoint of its own: roll the transaction back
    kLost,    // the transaction is gone (SQLite rolled it back while the job ran)
  };

  // Runs one job straight in the open transaction, without a savepoint: a batch without
  // failures pays nothing for being able to undo one call alone. When the job fails, its
  // writes are mixed with its neighbours', and only a rollback of the whole transaction
  // undoes them (RunBatch).
  Ran RunBareJob(Job* job) {
    job->hooks.clear();
    SqliteTx tx(&writer_conn_);
    current_tx_ = &tx;
    Status st = RunGuarded(*job->fn, tx);
    current_tx_ = nullptr;
    if (sqlite3_get_autocommit(writer_conn_.db())) {
      job->status = st.ok() ? UnavailableError("sqlite rolled the transaction back") : st;
      return Ran::kLost;
    }
    if (st.ok()) job->hooks = tx.TakeCommitHooks();
    job->status = std::move(st);
    return job->status.ok() ? Ran::kKept : Ran::kFailed;
  }

  // Runs one job inside the open transaction, in a savepoint of its own, so that a
  // failure rolls back only its work. kAborted runs it again, up to max_attempts in all
  // (counting an attempt RunBareJob made).
  Ran RunJob(Job* job) {
    job->hooks.clear();
    const int first_attempt = job->attempts + 1;
    job->attempts = 0;  // a re-run after a lost transaction starts over
    for (int attempt = first_attempt;; ++attempt) {
      // Prepared once (Run caches it), where ExecScript would parse it every call.
      Status st = writer_conn_.Run("SAVEPOINT cv_job", {}, nullptr, nullptr);
      if (!st.ok()) {
        job->status = st;
        return sqlite3_get_autocommit(writer_conn_.db()) ? Ran::kLost : Ran::kKept;
      }
      SqliteTx tx(&writer_conn_);
      current_tx_ = &tx;
      st = RunGuarded(*job->fn, tx);
      current_tx_ = nullptr;
      if (sqlite3_get_autocommit(writer_conn_.db())) {
        job->status = st.ok() ? UnavailableError("sqlite rolled the transaction back") : st;
        return Ran::kLost;
      }
      if (st.ok()) {
        st = writer_conn_.Run("RELEASE cv_job", {}, nullptr, nullptr);
        if (st.ok()) job->hooks = tx.TakeCommitHooks();
        job->status = st;
        return Ran::kKept;
      }
      Status undo = writer_conn_.ExecScript("ROLLBACK TO cv_job; RELEASE cv_job");
      if (!undo.ok()) {
        job->status = undo;
        return sqlite3_get_autocommit(writer_conn_.db()) ? Ran::kLost : Ran::kKept;
      }
      if (st.code() == StatusCode::kAborted && attempt < options_.max_attempts) continue;
      job->status = st;
      return Ran::kKept;
    }
  }

  // A batch runs its jobs without savepoints (RunBareJob) unless a failing job made an
  // earlier batch roll back: then batches run with a savepoint per job until this many in
  // a row had no failing job, and the writer tries again without. A failing job costs a
  // bare batch the work of every job that ran before it (they run again); under a steady
  // stream of failures batches keep their savepoints and nothing runs twice. A job alone
  // in its batch when it fails has no neighbours to cost, and its failure does not count
  // (nor do calls that join the batch after it make it count).
  static constexpr int kBatchesWithSavepointsAfterAFailure = 16;

  // Moves queued calls to the end of `batch`, up to max_batch calls in it. mu_ is held.
  void TakeQueuedLocked(std::vector<Job*>* batch) {
    while (!queue_.empty() && batch->size() < options_.max_batch) {
      batch->push_back(queue_.front());
      queue_.pop_front();
    }
    queued_.store(queue_.size(), std::memory_order_relaxed);
  }

  // Calls queued while the batch ran join it, at the end of `batch` and of `pending`;
  // false when none did.
  bool TakeArrivals(std::vector<Job*>* batch, std::vector<Job*>* pending) {
    const size_t before = batch->size();
    {
      std::lock_guard<std::mutex> l(mu_);
      TakeQueuedLocked(batch);
    }
    pending->insert(pending->end(), batch->begin() + static_cast<ptrdiff_t>(before),
                    batch->end());
    return batch->size() > before;
  }

  // Runs `batch` as one transaction, and with it the calls queued while it runs (before
  // its commit, up to max_batch in all: they share its fsync rather than wait for the
  // next one), which it appends to `batch`.
  void RunBatch(std::vector<Job*>& batch) {
    const auto started = std::chrono::steady_clock::now();
    double committing = 0;  // of the time since `started`, in COMMIT
    std::vector<Job*> pending = batch;
    bool bare = batches_with_savepoints_ == 0;
    // A job's own function failed (not a lost transaction) with others in the batch by
    // then; calls that join after it do not make a lone call's failure count.
    bool failed = false;
    while (!pending.empty()) {
      // After a rollback (a bare job failed, or SQLite lost the transaction) the write
      // lock was let go, and another process on the file may take it first: then BEGIN
      // waits for it (busy_timeout) or fails, and so does every job still pending.
      Status begin = writer_conn_.ExecScript("BEGIN IMMEDIATE");
      if (!begin.ok()) {
        for (Job* j : pending) j->status = begin;
        CountTransactions(pending.size());
        break;
      }
      std::vector<Job*> ran;
      std::vector<Job*> rerun;
      for (size_t i = 0;; ++i) {
        if (i == pending.size() && !TakeArrivals(&batch, &pending)) break;
        Job* job = pending[i];
        const Ran r = bare ? RunBareJob(job) : RunJob(job);
        if (r == Ran::kKept) {
          if (!job->status.ok()) failed = failed || batch.size() > 1;
          ran.push_back(job);
          continue;
        }
        rerun = ran;
        if (r == Ran::kLost) {
          // The transaction is gone: what ran before must run again; this job failed.
          CountTransactions(1);
        } else {
          // A bare job failed: nothing but a rollback of everything takes its writes
          // out. What ran before it runs again, with a savepoint each, as does what
          // comes after it; so does the job itself when it failed with kAborted (its
          // next attempt). Otherwise it keeps its error, got against the first runs of
          // the jobs before it. (Running it again too would make a failure's own side
          // effects, a failpoint's count or a fault injected, happen twice.)
          failed = failed || batch.size() > 1;
          (void)writer_conn_.ExecScript("ROLLBACK");
          // A test takes SQLite's write lock here from another connection, as another
          // process on the file may, to see the next BEGIN fail.
          (void)failpoint::Hit("sqlite.after_bare_rollback");
          if (pending.size() > 1) CountBareBatchRolledBack();
          if (job->status.code() == StatusCode::kAborted && options_.max_attempts > 1) {
            job->attempts = 1;
            rerun.push_back(job);
          } else {
            CountTransactions(1);
          }
        }
        rerun.insert(rerun.end(), pending.begin() + static_cast<ptrdiff_t>(i) + 1,
                     pending.end());
        break;
      }
      if (!rerun.empty() || ran.size() < pending.size()) {
        pending = std::move(rerun);
        bare = false;
        continue;
      }
      const auto commit_started = std::chrono::steady_clock::now();
      WakeFirstCallerEarly(batch, commit_started);
      Status commit = writer_conn_.ExecScript("COMMIT");
      committing = SecondsSince(commit_started);
      if (!commit.ok()) {
        (void)writer_conn_.ExecScript("ROLLBACK");
        for (Job* j : ran) {
          if (j->status.ok())
            j->status = Status(commit.code(), "commit failed: " + commit.message());
        }
      }
      {
        std::lock_guard<std::mutex> l(mu_);
        stats_.transactions += static_cast<int64_t>(ran.size());
        if (commit.ok()) {
          ++stats_.commits;
          stats_.largest_batch = std::max<int64_t>(stats_.largest_batch, ran.size());
          size_t bucket = 0;
          for (size_t n = ran.size(); n > 1; n >>= 1) ++bucket;
          stats_.batch_histogram[std::min(bucket, stats_.batch_histogram.size() - 1)]++;
        }
      }
      if (commit.ok()) {
        for (Job* j : ran) {
          for (auto& hook : j->hooks) hook();
        }
      }
      break;
    }
    if (failed) {
      batches_with_savepoints_ = kBatchesWithSavepointsAfterAFailure;
    } else if (batches_with_savepoints_ > 0) {
      --batches_with_savepoints_;
    }
    const double took = SecondsSince(started);
    std::lock_guard<std::mutex> l(mu_);
    stats_.writer->calls += took - committing;
    stats_.writer->commits += committing;
  }

  // As a commit starts: wakes the caller that WriterLoop will wake first once it is done,
  // so that its CPU runs when the commit ends (handoff.h; when: EarlyWake, which counts
  // how long that caller waits from here, commit_started_ to WriterLoop's Done).
  void WakeFirstCallerEarly(const std::vector<Job*>& batch,
                            std::chrono::steady_clock::time_point now) {
    Job* first = nullptr;
    size_t callers = 0;
    for (Job* job : batch) {
      if (job->async) continue;
      if (first == nullptr) first = job;
      ++callers;
    }
    if (callers < 2) return;
    commit_started_ = now;
    if (early_wake_.ShouldWake(callers)) first->handoff.WakeEarly();
  }

  static double SecondsSince(std::chrono::steady_clock::time_point t) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
  }

  // Checkpoints run on their own thread and connection. SQLite's automatic checkpoint
  // (every 1,000 WAL pages) ran inside the commit that crossed the mark: the writer
  // copied the WAL's pages into the database file and fsynced it before it could take
  // the next batch, and every caller queued behind that. On a large store whose commits
  // dirty pages scattered over the file (a sweeper deleting expired keys), those were
  // random writes of thousands of pages a batch (docs/design/retention.md).
  //
  // SQLite lets a checkpoint run beside the writer (it copies what no reader still needs,
  // up to the WAL's end when it started), but the WAL starts over from its beginning only
  // when a write transaction begins with every frame copied. Under a steady stream of
  // commits a checkpoint on another thread never catches up with the end, so the WAL
  // would grow without bound. Past kWriterCheckpointFactor times `checkpoint_pages`
  // (1,000 by default, SQLite's own mark) the writer therefore checkpoints itself,
  // between its commits, as SQLite's own mechanism did: what is left by then is what was
  // committed since the last background pass. The factor was 16 (64 MiB) until
  // 2026-12-02; group commit's commits then cost more than raw sqlite3's at the same
  // batch, whose WAL SQLite keeps near 4 MiB (docs/benchmarks.md, "A WAL bounded at 16
  // MiB"). The WAL grows to its bound once after each open, and a sync that extends a
  // file also commits the file system's journal.
  static constexpr int kWriterCheckpointFactor = 4;  // 16 MiB of WAL by default
  //
  // Even the writer's checkpoint, run between commits, lets the WAL start over only if no
  // reader is still on a snapshot older than its end: a write begins at the WAL's start
  // only when every frame is copied and no reader uses any of them. Readers whose
  // snapshots overlap without a gap (a steady stream of Read calls, a replay storm) leave
  // no such moment, and the WAL would grow by every page written. Past
  // kWriterRestartFactor times the writer's own mark, its checkpoint is therefore a
  // RESTART: it copies every frame, waiting for the readers of older snapshots to finish
  // (new ones read the file, all of it being copied), so that the next write starts the
  // WAL over (128 MiB by default). It waits for readers at most kWriterRestartWait, then
  // copies what is left and fsyncs the file as any checkpoint does; commits wait
  // meanwhile, the price of a bounded WAL. A reader longer than the wait leaves the WAL
  // to grow on (SQLITE_BUSY; the frames it does not need are still copied), and the
  // writer tries again twice `mark` pages later, twice as far after each further
  // failure, up to kWriterRestartGapFactor times the mark: a long reader costs a wait per
  // try, not one per commit. While a restart is wanted the background passes stand aside: a RESTART
  // finding the checkpoint lock taken fails at once, without waiting.
  static constexpr int kWriterRestartFactor = 8;  // 32 times the mark, 128 MiB
  static constexpr int kWriterRestartGapFactor = 16;
  static constexpr Millis kWriterRestartWait = Millis(100);

  // sqlite3_wal_hook: runs on the writer thread after each commit, `pages` being the
  // WAL's size. A background pass is started by `checkpoint_pages` new pages since the
  // last one, not by the WAL's size: between two restarts the WAL only grows, and waking
  // the checkpointer at every commit past the mark made it copy a few pages and fsync the
  // database file once a commit (group commit ran 20-30% slower on a small store).
  static int OnWalCommit(void* self, sqlite3* db, const char* name, int pages) {
    auto* d = static_cast<SqliteDatabase*>(self);
    const int mark = d->options_.checkpoint_pages;
    std::unique_lock<std::mutex> l(d->checkpoint_mu_);
    d->checkpoint_stats_.pages = pages;
    // A WAL smaller than at the last pass has started over from its beginning.
    if (pages < d->checkpoint_requested_at_) d->checkpoint_requested_at_ = 0;
    if (pages < d->writer_checkpointed_at_) {
      d->writer_checkpointed_at_ = 0;
      d->restart_wanted_ = false;
      d->restart_gap_ = 0;
    }
    const bool restart = pages >= mark * kWriterCheckpointFactor * kWriterRestartFactor;
    if (pages >= mark * kWriterCheckpointFactor &&
        pages - d->writer_checkpointed_at_ >= (restart ? std::max(mark, d->restart_gap_) : mark)) {
      d->writer_checkpointed_at_ = pages;
      if (restart) d->restart_wanted_ = true;
      l.unlock();
      // SQLITE_BUSY when the background pass holds the checkpoint lock, or (RESTART) when
      // a reader outlasted the wait: the writer tries again later, not at every commit.
      int rc;
      if (restart) {
        sqlite3_busy_timeout(db, static_cast<int>(kWriterRestartWait.count()));
        rc = sqlite3_wal_checkpoint_v2(db, name, SQLITE_CHECKPOINT_RESTART, nullptr, nullptr);
        sqlite3_busy_timeout(db, static_cast<int>(d->options_.busy_timeout.count()));
        l.lock();
        d->restart_gap_ = rc == SQLITE_BUSY
                              ? std::min(mark * kWriterRestartGapFactor,
                                         2 * std::max(mark, d->restart_gap_))
                              : 0;
        l.unlock();
      } else {
        rc = sqlite3_wal_checkpoint_v2(db, name, SQLITE_CHECKPOINT_PASSIVE, nullptr, nullptr);
      }
      d->CountCheckpoint(rc, restart);
    } else if (pages - d->checkpoint_requested_at_ >= mark) {
      d->checkpoint_requested_at_ = pages;
      d->checkpoint_wanted_ = true;
      d->checkpoint_cv_.notify_one();
    }
    return SQLITE_OK;
  }

  void CheckpointLoop() {
    for (;;) {
      {
        std::unique_lock<std::mutex> l(checkpoint_mu_);
        checkpoint_cv_.wait(l, [&] { return checkpoint_stopping_ || checkpoint_wanted_; });
        if (checkpoint_stopping_) return;
        checkpoint_wanted_ = false;
        if (restart_wanted_) continue;  // the writer's RESTART needs the checkpoint lock
      }
      // A test holds the background pass here to see the writer bound the WAL alone.
      if (!failpoint::Hit("sqlite.before_checkpoint").ok()) continue;
      // PASSIVE never waits for readers or the writer; a failure (an I/O error, another
      // process checkpointing) leaves the pages in the WAL for the next pass.
      const int rc = sqlite3_wal_checkpoint_v2(checkpoint_conn_.db(), "main",
                                               SQLITE_CHECKPOINT_PASSIVE, nullptr, nullptr);
      CountCheckpoint(rc, false);
    }
  }

  // Counted for the operator (DatabaseStats, `db_checkpoint_failures_total`): after a
  // failure the WAL keeps growing, and the next pass may succeed (its pages are still in
  // the WAL; nothing is lost).
  void CountCheckpoint(int rc, bool restart) {
    std::lock_guard<std::mutex> l(checkpoint_mu_);
    ++checkpoint_stats_.checkpoints;
    if (rc == SQLITE_BUSY) {
      ++checkpoint_stats_.checkpoints_busy;
    } else if (rc != SQLITE_OK) {
      ++checkpoint_stats_.checkpoint_failures;
    } else if (restart) {
      ++checkpoint_stats_.restarts_forced;
    }
  }

  // "PRAGMA cache_size=-KiB;" for the URI's cache_mib and "PRAGMA mmap_size=B;" for its
  // mmap_mib, or nothing.
  std::string CachePragma() const {
    std::string sql;
    if (options_.cache_mib > 0) {
      sql += " PRAGMA cache_size=-" + std::to_string(int64_t{options_.cache_mib} * 1024) + ";";
    }
    if (options_.mmap_mib > 0) {
      sql += " PRAGMA mmap_size=" + std::to_string(int64_t{options_.mmap_mib} << 20) + ";";
    }
    return sql;
  }

  void CountBareBatchRolledBack() {
    std::lock_guard<std::mutex> l(mu_);
    ++stats_.bare_batches_rolled_back;
  }

  void CountTransactions(size_t n) {
    std::lock_guard<std::mutex> l(mu_);
    stats_.transactions += static_cast<int64_t>(n);
  }

  const std::string path_;
  const Options options_;

  Connection writer_conn_;  // only the writer thread (and Init, before it starts)
  std::thread writer_;
  std::thread::id writer_id_;
  Tx* current_tx_ = nullptr;  // writer thread only
  int batches_with_savepoints_ = 0;  // writer thread only: RunBatch
  // Writer thread only; the CPUs counted are the opening thread's, which the writer
  // inherits.
  converge::internal::ArrivalPoll arrival_poll_{converge::internal::CpusToRunOn()};
  // How long a caller woken before its batch's commit spins for the commit's end.
  const std::chrono::microseconds early_wake_spin_{options_.early_wake_us};
  converge::internal::EarlyWake early_wake_{converge::internal::CpusToRunOn(),
                                            early_wake_spin_};
  // When the last batch began to commit, if it had several callers (early_wake_'s count).
  std::optional<std::chrono::steady_clock::time_point> commit_started_;

  mutable std::mutex mu_;
  std::condition_variable work_cv_;
  std::deque<Job*> queue_;
  std::atomic<size_t> queued_{0};  // queue_.size(), stored under mu_, read by PollForArrivals
  // When the writer began waiting for a call, while it waits.
  std::optional<std::chrono::steady_clock::time_point> waiting_since_;
  bool stopping_ = false;
  std::vector<Job*> async_done_;  // the writer's: a batch's TransactAsync jobs
  DatabaseStats stats_;

  Connection checkpoint_conn_;  // only the checkpointer thread (and Init)
  std::thread checkpointer_;
  mutable std::mutex checkpoint_mu_;
  std::condition_variable checkpoint_cv_;
  bool checkpoint_wanted_ = false;
  bool checkpoint_stopping_ = false;
  int checkpoint_requested_at_ = 0;  // the WAL's size when a pass was last asked for
  int writer_checkpointed_at_ = 0;   // the WAL's size when the writer last checkpointed
  bool restart_wanted_ = false;      // the writer restarts the WAL: background passes wait
  int restart_gap_ = 0;              // pages between the writer's tries to restart it
  DatabaseStats::Wal checkpoint_stats_;  // under checkpoint_mu_

  std::mutex readers_mu_;
  std::condition_variable readers_cv_;
  std::vector<std::unique_ptr<Connection>> idle_readers_;
  size_t open_readers_ = 0;
};

}  // namespace

Result<Settings> ParseLocation(std::string_view location) {
  CONVERGE_ASSIGN_OR_RETURN(internal::StoreUri uri, internal::StoreUri::Parse(location));
  if (uri.base().empty()) {
    return tl::unexpected(InvalidArgumentError("sqlite: URI has an empty path"));
  }
  Settings s;
  s.path = uri.base();
  CONVERGE_ASSIGN_OR_RETURN(std::optional<std::string> sync, uri.Take("synchronous"));
  if (sync) {
    if (*sync != "full" && *sync != "normal") {
      return tl::unexpected(InvalidArgumentError("store URI: synchronous=" + *sync +
                                                 " must be full or normal"));
    }
    s.synchronous_full = *sync == "full";
  }
  CONVERGE_ASSIGN_OR_RETURN(std::optional<int64_t> max_batch, uri.TakeInt("max_batch", 1, 1 << 20));
  if (max_batch) s.max_batch = static_cast<size_t>(*max_batch);
  // sqlite3_busy_timeout takes an int.
  CONVERGE_ASSIGN_OR_RETURN(std::optional<int64_t> busy,
                            uri.TakeInt("busy_timeout_ms", 0, std::numeric_limits<int>::max()));
  if (busy) s.busy_timeout = Millis(*busy);
  CONVERGE_ASSIGN_OR_RETURN(std::optional<int64_t> readers, uri.TakeInt("readers", 1, 1024));
  if (readers) s.readers = static_cast<size_t>(*readers);
  CONVERGE_ASSIGN_OR_RETURN(std::optional<int64_t> checkpoint,
                            uri.TakeInt("checkpoint_pages", 1, 1 << 24));
  if (checkpoint) s.checkpoint_pages = static_cast<int>(*checkpoint);
  CONVERGE_ASSIGN_OR_RETURN(std::optional<int64_t> cache, uri.TakeInt("cache_mib", 0, 1 << 16));
  if (cache) s.cache_mib = static_cast<int>(*cache);
  CONVERGE_ASSIGN_OR_RETURN(std::optional<int64_t> mmap, uri.TakeInt("mmap_mib", 0, 1 << 16));
  if (mmap) s.mmap_mib = static_cast<int>(*mmap);
  CONVERGE_ASSIGN_OR_RETURN(std::optional<int64_t> early_wake,
                            uri.TakeInt("early_wake_us", 0, 1000000));
  if (early_wake) s.early_wake_us = static_cast<int>(*early_wake);
  CONVERGE_RETURN_IF_ERROR(uri.RefuseRest("sqlite", kUriParameters));
  return s;
}

std::string FormatLocation(const Settings& settings) {
  return settings.path + "?synchronous=" + (settings.synchronous_full ? "full" : "normal") +
         "&max_batch=" + std::to_string(settings.max_batch) +
         "&busy_timeout_ms=" + std::to_string(settings.busy_timeout.count()) +
         "&readers=" + std::to_string(settings.readers) +
         "&checkpoint_pages=" + std::to_string(settings.checkpoint_pages) +
         "&cache_mib=" + std::to_string(settings.cache_mib) +
         "&mmap_mib=" + std::to_string(settings.mmap_mib) +
         "&early_wake_us=" + std::to_string(settings.early_wake_us);
}

Result<std::unique_ptr<Database>> Open(std::string_view location, const DatabaseOptions& options) {
  CONVERGE_ASSIGN_OR_RETURN(Settings settings, ParseLocation(location));
  Options o;
  static_cast<Settings&>(o) = std::move(settings);
  o.max_attempts = options.max_attempts;
  auto db = std::make_unique<SqliteDatabase>(std::move(o));
  CONVERGE_RETURN_IF_ERROR(db->Init());
  return std::unique_ptr<Database>(std::move(db));
}

}  // namespace converge::sqlite

namespace converge {

Status DisableSqliteMemoryAccounting() {
  if (sqlite3_config(SQLITE_CONFIG_MEMSTATUS, 0) != SQLITE_OK) {
    return FailedPreconditionError(
        "SQLite is initialized already: its memory accounting stays as it was");
  }
  return OkStatus();
}

}  // namespace converge
