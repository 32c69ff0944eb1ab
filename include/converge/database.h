// Database and Tx: the one transaction boundary that user code and converge share.
//
// The rule everything else rests on: a dedupe record and the effect it guards commit in
// the same transaction. So converge never owns "its" transaction: `Database::Transact`
// hands a `Tx` to a function, and business code, the idempotency store, the outbox, the
// consumer inbox and the dead-letter store all write through that same `Tx`.
//
// SQL is parameterised with one placeholder syntax on every backend: `$1, $2, ...`
// (PostgreSQL's own; SQLite binds them by name). Never build SQL from user data.
//
// Times are integers (milliseconds since the epoch, see clock.h); bytes that need not be
// text use `Blob`.
//
// Thread safety: `Database` is safe to use from many threads. A `Tx` belongs to the
// function it was handed to and must not escape it or be used from another thread.
#ifndef CONVERGE_DATABASE_H_
#define CONVERGE_DATABASE_H_

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <variant>
#include <vector>

#include "converge/clock.h"
#include "converge/dialect.h"
#include "converge/status.h"

namespace converge {

// Binary data, bound as BLOB (SQLite) or BYTEA (PostgreSQL).
struct Blob {
  std::string bytes;
  friend bool operator==(const Blob&, const Blob&) = default;
};

// Text and bytes a parameter borrows instead of owning. Tx::Exec, Query and ExecDeferred
// bind their string and Blob arguments this way, so that a payload or a stored response is
// not copied into a Value first (SQLite binds it where it lies; PostgreSQL copies text once,
// to end it with the NUL libpq needs). Valid only for the call that received them: a
// backend that keeps a parameter past the call copies it. Never in a result row. Code
// that builds Values to keep (ExecMany's parameter sets) holds std::string and Blob.
struct TextRef {
  std::string_view text;
  friend bool operator==(const TextRef&, const TextRef&) = default;
};
struct BlobRef {
  std::string_view bytes;
  friend bool operator==(const BlobRef&, const BlobRef&) = default;
};

// A bound parameter or a result column. std::monostate is SQL NULL.
using Value = std::variant<std::monostate, int64_t, double, std::string, Blob, TextRef, BlobRef>;

// One result row. Column accessors REQUIRE: i < size().
class Row {
 public:
  Row() = default;
  explicit Row(std::vector<Value> values) : values_(std::move(values)) {}

  size_t size() const { return values_.size(); }
  const Value& operator[](size_t i) const { return values_[i]; }
  bool IsNull(size_t i) const { return std::holds_alternative<std::monostate>(values_[i]); }
  // NULL reads as 0 / "" . Integers read as text and text as integers where they convert.
  int64_t Int(size_t i) const;
  double Double(size_t i) const;
  std::string Text(size_t i) const;

 private:
  std::vector<Value> values_;
};

using Rows = std::vector<Row>;

// One range partition of a time-partitioned table: rows whose partition column (ms since
// the epoch) is in [from, to).
struct TimePartition {
  std::string name;  // the partition's own table name
  int64_t from = 0;
  int64_t to = 0;
};

// Partition maintenance of a store opened with time-partitioned retention (PostgreSQL
// with `retention=partitioned`, Database::Open): idempotency_keys and outbox_events are
// partitioned by created_at, consumer_inbox by processed_at, each also with a DEFAULT
// partition for rows no range covers. Reached through Tx::time_partitions(); the Sweeper
// is its user (docs/design/retention.md). `table` is one of those three names; anything
// else is kInvalidArgument. Each call runs in the Tx it came from: give each its own
// Transact, since its locks are held until that transaction ends.
class TimePartitions {
 public:
  virtual ~TimePartitions() = default;
  // The range partitions of `table`, ordered by `from`.
  virtual Result<std::vector<TimePartition>> List(std::string_view table) = 0;
  // The name of `table`'s DEFAULT partition.
  virtual Result<std::string> DefaultPartition(std::string_view table) = 0;
  // Creates the partition [from, to) of `table` unless one exists. false (nothing
  // created) when the DEFAULT partition holds rows in that range: they would have to
  // move first, so the range stays in the DEFAULT partition.
  virtual Result<bool> Create(std::string_view table, int64_t from, int64_t to) = 0;
  // Locks `table` against every other reader and writer (waiting at most 1 s: else
  // kUnavailable, try again later), then drops `partition` unless a row of it satisfies
  // `keep`, an SQL condition on its columns with `params` as $1... true when dropped.
  // The check and the drop see the same rows: nothing can change in between.
  virtual Result<bool> DropUnless(std::string_view table, const TimePartition& partition,
                                  std::string_view keep, std::span<const Value> params) = 0;
};

// What a deferred statement (Tx::ExecDeferred) must have done for its transaction to
// commit: change exactly `rows` rows (when rows >= 0), else the transaction fails with
// `otherwise`, as the same check made at once would have.
struct DeferredCheck {
  int64_t rows = -1;  // -1: any number of rows is fine; only an error fails
  Status otherwise;

  // Any outcome but an error (a unique violation, a lock timeout...) is fine.
  static DeferredCheck None() { return {}; }
  // Exactly `n` rows changed, else `otherwise` (a fence check: Fenced when 0 changed).
  static DeferredCheck Changes(int64_t n, Status otherwise) {
    return DeferredCheck{n, std::move(otherwise)};
  }
};

class Tx {
 public:
  Tx() = default;
  Tx(const Tx&) = delete;
  Tx& operator=(const Tx&) = delete;
  virtual ~Tx() = default;

  // Runs one statement; returns the number of rows it changed. `params` (and what a
  // TextRef or BlobRef among them points at) are valid for this call only.
  // Errors: kAlreadyExists (unique violation), kInvalidArgument (bad SQL or parameters),
  // kAborted (serialization failure: the whole transaction re-runs), kUnavailable.
  virtual Result<int64_t> ExecParams(std::string_view sql, std::span<const Value> params) = 0;
  // Runs one statement and returns every row it produced.
  virtual Result<Rows> QueryParams(std::string_view sql, std::span<const Value> params) = 0;

  // Runs one statement once per parameter set, in order; returns the total rows changed.
  // Stops at the first error. PostgreSQL sends them all in one pipeline (one round trip);
  // elsewhere it is a loop.
  virtual Result<int64_t> ExecMany(std::string_view sql,
                                   std::span<const std::vector<Value>> param_sets) {
    int64_t total = 0;
    for (const auto& params : param_sets) {
      CONVERGE_ASSIGN_OR_RETURN(int64_t n, ExecParams(sql, params));
      total += n;
    }
    return total;
  }

  // Queues a write whose result the caller does not need now: its errors, and `check`,
  // are settled before the transaction commits. PostgreSQL sends it in pipeline mode
  // without waiting for the answer, so that the deferred writes of a transaction and its
  // COMMIT travel in one round trip; elsewhere it runs at once (and returns its error, or
  // check.otherwise, right here).
  //
  // Where a deferred statement's failure surfaces (PostgreSQL): from the next call on
  // this Tx that waits for the server (ExecParams, QueryParams, ExecMany, NextFence, a
  // Savepoint's release) or else from the commit, which returns exactly the Status the
  // statement would have returned at once: kAlreadyExists for a unique violation,
  // kUnavailable with reason::kLockTimeout for a lock timeout, kAborted for a
  // serialization failure (Transact re-runs fn), kUnavailable for a broken connection,
  // check.otherwise when the row count differs. The statements run in the order they
  // were issued, interleaved with the immediate ones; a failure rolls the whole
  // transaction back (nothing after it runs, COMMIT included), so nothing is reported
  // committed that was not. The Status returned here only reports failures to queue.
  //
  // REQUIRES: `sql` is one INSERT, UPDATE or DELETE without RETURNING when check.rows
  // >= 0 (PostgreSQL counts its rows in the same statement); any one statement else.
  // Like every call here, it reads `params` before it returns (PostgreSQL has copied them
  // into the pipeline by then): they may be borrowed (TextRef, BlobRef).
  virtual Status ExecDeferredParams(std::string_view sql, std::span<const Value> params,
                                    const DeferredCheck& check) {
    CONVERGE_ASSIGN_OR_RETURN(int64_t n, ExecParams(sql, params));
    if (check.rows >= 0 && n != check.rows) return check.otherwise;
    return OkStatus();
  }
  // ExecDeferred, Exec and Query bind their arguments as $1, $2, ...: strings as TextRef
  // and Blobs as BlobRef, borrowed for the call rather than copied (a deferred statement's
  // parameters are read before ExecDeferredParams returns).
  template <class... Args>
  Status ExecDeferred(const DeferredCheck& check, std::string_view sql, Args&&... args) {
    const Value params[] = {Value(), ToValue(std::forward<Args>(args))...};
    return ExecDeferredParams(sql, std::span<const Value>(params + 1, sizeof...(Args)), check);
  }

  template <class... Args>
  Result<int64_t> Exec(std::string_view sql, Args&&... args) {
    const Value params[] = {Value(), ToValue(std::forward<Args>(args))...};
    return ExecParams(sql, std::span<const Value>(params + 1, sizeof...(Args)));
  }
  template <class... Args>
  Result<Rows> Query(std::string_view sql, Args&&... args) {
    const Value params[] = {Value(), ToValue(std::forward<Args>(args))...};
    return QueryParams(sql, std::span<const Value>(params + 1, sizeof...(Args)));
  }

  // Runs `fn` inside a nested SAVEPOINT: when it fails, only its own writes roll back
  // and the enclosing transaction goes on. Returns fn's status.
  Status Savepoint(const std::function<Status(Tx&)>& fn);

  // Runs `hook` after this transaction commits (never if it rolls back, including when
  // the enclosing savepoint rolls back). Hooks run on the committing thread: keep them
  // cheap (signal a condition variable, bump a counter).
  void OnCommit(std::function<void()> hook) {
    hooks_.push_back(std::move(hook));
  }

  // The SQL fragments that differ between backends (dialect.h): ask it instead of asking
  // which backend this is. Lives as long as the Database.
  virtual const Dialect& dialect() const = 0;

  // The next number of a store-wide sequence that only grows: once a transaction that
  // drew a number commits, no transaction ever draws that number or a smaller one again,
  // whatever rows are deleted meanwhile. Fencing tokens come from it (idempotency.h).
  virtual Result<int64_t> NextFence() = 0;

  // Makes every other transaction that locks the same `key` wait until this one commits
  // or rolls back. Producers use it to serialise work on one aggregate, so that what they
  // insert becomes visible in the order it was inserted (outbox.h). PostgreSQL: a
  // transaction-level advisory lock on a 64-bit hash of the key (two keys may share a
  // hash: they then wait for each other, which is slower, never wrong), taken as a
  // deferred statement (ExecDeferred): every later statement of this transaction runs
  // only once the lock is held, and a lock timeout surfaces where ExecDeferred says.
  // SQLite: nothing to do, one write transaction runs at a time.
  virtual Status LockUntilCommit(std::string_view key) = 0;

  // Tells other processes on this store that `channel` has news, when this transaction
  // commits (PostgreSQL NOTIFY, when the store URI says notify=true). A no-op elsewhere:
  // callers need not know whether anyone listens.
  virtual Status Notify(std::string_view channel) {
    (void)channel;
    return OkStatus();
  }

  // Partition maintenance when the store keeps idempotency keys and inbox rows in
  // time-partitioned tables (TimePartitions); nullptr when it keeps plain tables (every
  // SQLite store; PostgreSQL by default). Lives as long as this Tx.
  virtual TimePartitions* time_partitions() { return nullptr; }

 protected:
  // For backends, once the transaction committed: the hooks of everything that was not
  // rolled back, in order. A backend's Tx makes it reachable to its Database (a
  // using-declaration); callers of Tx never see it.
  std::vector<std::function<void()>> TakeCommitHooks();

 private:
  template <class A>
  static Value ToValue(A&& a) {
    using D = std::remove_cvref_t<A>;
    if constexpr (std::is_same_v<D, Value> || std::is_same_v<D, TextRef> ||
                  std::is_same_v<D, BlobRef>) {
      return Value(std::forward<A>(a));
    } else if constexpr (std::is_same_v<D, Blob>) {
      return Value(BlobRef{a.bytes});  // the argument outlives the call
    } else if constexpr (std::is_same_v<D, bool>) {
      return Value(int64_t{a ? 1 : 0});
    } else if constexpr (std::is_integral_v<D>) {
      return Value(static_cast<int64_t>(a));
    } else if constexpr (std::is_floating_point_v<D>) {
      return Value(static_cast<double>(a));
    } else if constexpr (std::is_same_v<D, std::nullptr_t> || std::is_same_v<D, std::monostate>) {
      return Value();
    } else {
      static_assert(std::is_convertible_v<const D&, std::string_view>,
                    "Tx parameters are integers, doubles, strings, Blob, TextRef, BlobRef, "
                    "nullptr or Value");
      return Value(TextRef{std::string_view(a)});  // the argument outlives the call
    }
  }

  int savepoint_depth_ = 0;
  std::vector<std::function<void()>> hooks_;  // in order; Savepoint drops its own on rollback
};

using TxFn = std::function<Status(Tx&)>;

// SQLite counts the memory it holds (sqlite3_memory_used, the soft and hard heap limits)
// under a process-wide mutex that every allocation and free of every connection takes:
// about 7% of the SQLite writer's time (docs/benchmarks.md). A process whose SQLite
// serves no such limit can switch the count off: call this first thing in main, before
// any thread uses SQLite (sqlite3_config is not thread-safe). The converge binaries do.
// kFailedPrecondition once SQLite has initialized (nothing changes then). Defined by the
// SQLite backend (link converge::converge), not by core.
Status DisableSqliteMemoryAccounting();

// What every backend understands. A backend's own settings travel in its URI's query
// (Database::Open), so a setting the chosen store does not have cannot be given.
struct DatabaseOptions {
  // How often Transact runs fn when it keeps failing with kAborted (a serialization
  // failure or deadlock, or fn's own kAborted) before returning kAborted. At least 1.
  int max_attempts = 8;
};

// What a store reports about its work so far. Every backend fills `transactions` and
// `commits`; the rest describe SQLite's group commit (one writer thread carrying many
// Transact calls per physical commit) and stay 0 and empty on backends without one
// (PostgreSQL, where every Transact is its own commit).
struct DatabaseStats {
  int64_t transactions = 0;  // Transact calls completed, ok or not (not Read; a nested
                             // Transact joins its outer transaction and is not counted)
  int64_t commits = 0;       // physical commits that succeeded
  // SQLite only:
  int64_t largest_batch = 0;  // most calls carried by one physical commit
  int64_t queued = 0;         // calls waiting for the writer right now
  // Batches run without a savepoint per call that a failing call rolled back whole: its
  // neighbours ran again, each in a savepoint (design/transaction-boundary.md).
  int64_t bare_batches_rolled_back = 0;
  // batch_histogram[i] counts commits that carried [2^i, 2^(i+1)) calls; empty where the
  // store has no batches.
  std::vector<int64_t> batch_histogram;
  // SQLite's WAL and its checkpoints (docs/design/transaction-boundary.md, item 7); empty
  // on PostgreSQL.
  struct Wal {
    int64_t checkpoints = 0;          // checkpoints run, by the checkpointer or the writer
    int64_t checkpoint_failures = 0;  // of those, ended by an error other than SQLITE_BUSY
    int64_t checkpoints_busy = 0;     // of those, stopped short by SQLITE_BUSY
    int64_t restarts_forced = 0;      // RESTART checkpoints by the writer that completed
    int64_t pages = 0;                // the WAL's size in pages after the last commit
  };
  std::optional<Wal> wal;
  // SQLite only: where its writer thread's time went since it started (once the store
  // was open), in seconds; a wait still going on counts up to now (a poll, up to 50 µs,
  // once it ends). What the three leave of that time went to waking callers and the
  // writer's bookkeeping. `waiting` near zero means the writer is the store's
  // bottleneck: calls queue behind it.
  struct Writer {
    double waiting = 0;  // no call queued: waiting for one (polling the queue for up
                         // to 50 µs after a batch of several callers, then asleep)
    double calls = 0;    // running calls: BEGIN (waiting, if need be, for another
                         // process's write lock), their functions, savepoints,
                         // rollbacks, commit hooks
    double commits = 0;  // COMMIT: the WAL's writes and fsync (and a checkpoint the writer
                         // ran itself)
  };
  std::optional<Writer> writer;
};

class Database {
 public:
  Database() = default;
  Database(const Database&) = delete;
  Database& operator=(const Database&) = delete;
  virtual ~Database() = default;

  // Opens the store named by `uri` and applies pending migrations. The store's own
  // settings are the URI's query parameters (`name=value`, joined by `&`):
  //
  //   sqlite:PATH[?...]        an SQLite file (created if absent; sqlite://PATH too), WAL
  //                            mode. PATH cannot contain '?'.
  //     synchronous=full|normal  PRAGMA synchronous (default full: the WAL is fsynced at
  //                              every commit, which group commit shares among a batch)
  //     max_batch=N              most Transact calls in one physical commit (512)
  //     busy_timeout_ms=N        how long to wait for another process's write lock (5000)
  //     readers=N                read-only connections kept for Read() (4)
  //     checkpoint_pages=N       WAL pages that start a checkpoint, copied back into the
  //                              file on a thread of its own, not the writer's (1000);
  //                              the writer checkpoints itself past 4 times that (about
  //                              16 MiB by default). A larger mark made creates on a
  //                              store of 10M keys faster (16000: +24%, the writer's own
  //                              checkpoint at 250 MiB of WAL; docs/design/retention.md)
  //     cache_mib=N              page cache of the writer's and each reader's connection,
  //                              in MiB, 0..65536 (0: SQLite's default, 2 MiB)
  //     mmap_mib=N               how much of the file each connection reads through a
  //                              memory map (PRAGMA mmap_size), in MiB, 0..65536 (0:
  //                              SQLite's default, none in Debian's build; SQLite caps it
  //                              at its build's limit, 2 GiB in Debian's). An I/O error on
  //                              a mapped page reaches the process as SIGBUS, not an error
  //     early_wake_us=N          how long the first caller of a batch of several, woken
  //                              as its commit starts (so that its CPU is not idle when
  //                              the commit ends), spins for its result before it sleeps
  //                              again, in µs, 0..1000000 (0: woken after the commit;
  //                              2000). With 2 CPUs or more, and while a commit and its
  //                              hooks take half of it or less on average: a CPU's time
  //                              spent a batch, for a wake-up tens of µs sooner
  //   postgresql://...[?...]   a PostgreSQL database (postgres:// too): a libpq URI,
  //                            whose own parameters (sslmode, connect_timeout, ...) pass
  //                            through to libpq; converge takes out its own first:
  //     pool_size=N              connections in the pool, shared by Transact and Read (16)
  //     notify=true|false        wake relays and consumers in other processes with
  //                              LISTEN/NOTIFY instead of waiting for their poll (false:
  //                              NOTIFY takes a global lock at commit and serialises
  //                              committing transactions under heavy write concurrency)
  //     lock_timeout_ms=N        longest wait for a lock another transaction holds, then
  //                              kUnavailable with reason::kLockTimeout (5000; 0: none).
  //                              An idempotency key's claim answers such a wait as "in
  //                              flight" (409), so a stuck transaction cannot take the pool
  //     retention=delete|partitioned  how expired idempotency keys and inbox rows go
  //                              (docs/design/retention.md): `delete`, plain tables swept
  //                              by batched DELETEs; `partitioned`, time-partitioned
  //                              tables whose partitions the Sweeper creates ahead and
  //                              drops whole. Chosen when the store is created; later
  //                              the store's own shape decides (a value that contradicts
  //                              it is kFailedPrecondition), so it may be left out.
  //     statement_cache=N        server-side prepared statements kept per connection
  //                              (256): each statement is parsed and planned once per
  //                              connection. 0 sends every statement unnamed, for a
  //                              pooler in front that cannot keep a session's statements
  //
  // Errors: kInvalidArgument (unknown scheme; a scheme this build has no backend for; a
  // parameter the store does not take, given twice or with a bad value, named in the
  // message; bad options), kUnavailable (cannot open or connect), kFailedPrecondition
  // with reason::kSchemaTooNew (the store's schema is newer than this binary knows; the
  // store is left untouched). Defined by the store registry (link converge::converge),
  // not by core.
  static Result<std::unique_ptr<Database>> Open(std::string_view uri,
                                                const DatabaseOptions& options = {});

  // `uri` with `name=value` added to its query, unless the query sets `name` already or
  // the store `uri` names does not take a parameter `name` (then, and for a URI Open
  // would refuse, `uri` comes back unchanged). For applications whose own configuration
  // supplies defaults for store settings: the URI's own setting wins.
  static std::string WithDefaultParameter(std::string_view uri, std::string_view name,
                                          std::string_view value);

  // Runs fn(tx) in one transaction and returns once its writes are durable (or rolled
  // back). fn returning non-OK rolls back everything fn wrote and returns that status;
  // kAborted re-runs fn (up to DatabaseOptions::max_attempts). fn may run more than once,
  // so it must not have effects outside the Tx: on SQLite a fn that succeeded runs again
  // whenever a later call in its batch fails (the batch rolls back whole, and its other
  // calls run again, design/transaction-boundary.md). Only the last run's writes and
  // OnCommit hooks count; state kept outside the Tx must be set afresh at the top of fn,
  // and counters belong in OnCommit. Calling Transact from inside fn runs the inner fn in
  // a savepoint of the same transaction.
  //
  // Where fn runs: on SQLite, on the store's one writer thread, inside a transaction it
  // shares with the other calls of its batch, while every other write in the process
  // waits behind it. Keep fn short: SQL and computation only, no network calls or other
  // blocking I/O (multi-phase idempotency keys exist for work with an external call in
  // the middle). On PostgreSQL fn runs on the calling thread, holding a pooled
  // connection for as long as it runs.
  //
  // Every error but one means nothing was committed. The exception: kUnavailable with
  // reason::kCommitOutcomeUnknown (PostgreSQL: the connection broke after COMMIT was sent
  // and before the server answered) means the transaction MAY HAVE COMMITTED. Retrying is
  // safe only for work that is idempotent on retry: converge's own writes are (idempotency
  // keys, inbox rows, ON CONFLICT, fenced updates), so a caller that retries a converge
  // operation, or answers 503 for the client to retry, needs nothing more. A caller's own
  // business write must be idempotent too (a natural key, ON CONFLICT DO NOTHING), or the
  // caller must look before retrying (in a new transaction) whether the write is there. A
  // plain kUnavailable without that reason is a definite failure: nothing committed.
  //
  // kCancelled: the Database is being destroyed (SQLite refuses calls that arrive after
  // its destructor began; the calls already queued still run). fn did not run.
  virtual Status Transact(const TxFn& fn) = 0;

  // Transact without waiting for it: fn runs as Transact runs it, and `done` (when set)
  // is called once with what Transact would have returned, after the commit and its
  // OnCommit hooks (or the failure). Where transacts_async() (SQLite), both run on the
  // writer thread and TransactAsync returns at once: `done` must be brief and must not
  // block or call Transact or Read (hand such work to another thread); it may call
  // TransactAsync. An exception out of it is printed to stderr and ignored. Elsewhere
  // (PostgreSQL, DatabaseWrapper) it runs Transact on the calling thread and then done,
  // before returning. Not from inside a transaction's fn (done would wait for a commit
  // its caller is part of): SQLite answers kFailedPrecondition; use Transact there.
  // kCancelled as Transact: the Database is being destroyed.
  virtual void TransactAsync(TxFn fn, std::function<void(Status)> done) {
    Status st = Transact(fn);
    if (done) done(std::move(st));
  }
  // Whether TransactAsync hands fn to a thread of the store's own and returns at once.
  virtual bool transacts_async() const { return false; }

  // Runs fn(tx) in a read-only snapshot: every statement in fn sees the database as of
  // one moment (the first statement on PostgreSQL, where it is REPEATABLE READ READ ONLY;
  // SQLite's WAL read transaction), whatever commits meanwhile. Writes fail.
  virtual Status Read(const TxFn& fn) = 0;

  virtual DatabaseStats stats() const = 0;

  // Calls `callback` (on a background thread) when any process commits a Tx::Notify on
  // `channel`. Returns an id for RemoveListener. Backends without cross-process
  // notifications never call it (0 is returned). The callback must be cheap.
  virtual int64_t AddListener(const std::string& channel, std::function<void()> callback) {
    (void)channel;
    (void)callback;
    return 0;
  }
  // After this returns, the listener's callback is not running and will not run again.
  virtual void RemoveListener(int64_t id) { (void)id; }
};

// Forwards every call to another Database. Subclass it to inject faults (fail the N-th
// Transact, delay commits) in tests. Does not own the target.
class DatabaseWrapper : public Database {
 public:
  explicit DatabaseWrapper(Database* target) : target_(target) {}
  Status Transact(const TxFn& fn) override { return target_->Transact(fn); }
  Status Read(const TxFn& fn) override { return target_->Read(fn); }
  DatabaseStats stats() const override { return target_->stats(); }
  int64_t AddListener(const std::string& channel, std::function<void()> cb) override {
    return target_->AddListener(channel, std::move(cb));
  }
  void RemoveListener(int64_t id) override { target_->RemoveListener(id); }
  Database* target() const { return target_; }

 private:
  Database* target_;
};

// Runs fn, which produces a T, in Transact and returns it.
template <class T>
Result<T> TransactValue(Database& db, const std::function<Result<T>(Tx&)>& fn) {
  std::optional<T> out;
  Status st = db.Transact([&](Tx& tx) -> Status {
    auto r = fn(tx);
    if (!r) return r.error();
    out = std::move(*r);
    return OkStatus();
  });
  if (!st.ok()) return tl::unexpected<Status>(std::move(st));
  return std::move(*out);
}

}  // namespace converge

#endif  // CONVERGE_DATABASE_H_
