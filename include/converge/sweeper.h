// Retention: deletes dedupe and bookkeeping rows that can no longer matter, in bounded
// batches so a sweep never holds the writer (SQLite) or long locks (PostgreSQL).
//
//   idempotency_keys  expires_at passed, and completed or no longer leased
//   consumer inbox    expires_at passed (Inbox::Sweep; Consumer::Validate guarantees
//                     that outlives every redelivery and the dead-letter replay window)
//   outbox_events     published longer ago than published_retention
//   effects           done longer ago than done_retention; a saga's journalled calls
//                     (saga_id set) only with their saga, below
//   dead_letters      replayed or discarded longer ago than settled_dead_letter_retention
//                     (parked letters stay until someone acts on them)
//   saga_instances    completed or compensated longer ago than settled_saga_retention,
//   + saga_steps      with their step log and their journalled calls (failed_to_compensate
//   + effects         and active ones stay, and so does their journal): picked once and
//                     locked, then all three deleted by those ids in one transaction, so a
//                     late call's reopen either keeps the saga or finds it gone (saga.h)
//
// On a time-partitioned store (PostgreSQL with retention=partitioned, Tx::time_partitions)
// idempotency_keys, consumer_inbox and outbox_events go a partition at a time instead:
// each pass creates the partition of the current period and `partitions_ahead` more, and
// drops a partition whose period has ended once none of its rows is one the batched
// DELETE would keep (an unexpired row, a key whose work is unfinished past its first
// phase, an event not yet published or published within published_retention: then the
// whole partition waits). Only their DEFAULT partitions, which hold rows no partition
// covered when they were written, are still swept row by row. docs/design/retention.md.
//
// Where the store sweeps in key order (Dialect::SweepsInKeyOrder: SQLite),
// idempotency_keys and consumer_inbox are not searched for expired rows but walked in
// primary-key order, a window of rows at a time, each window's expired rows deleted in one
// transaction, and the walk starts over at the end of the table. Deleting in key order
// dirties each leaf page once for all of its expired rows, where rows picked through an
// expiry index are scattered over the table, a page each. The walk is paced so that a
// whole one takes its table's pass (`key_order_pass`, `inbox_key_order_pass`): a window is
// walked only while the walk has examined fewer rows than the previous walk did in
// proportion to the pass's time gone, or is overdue; RunOnce says `more` while a walk
// still lags (and all through a first walk, which runs flat out). A table that fits in one
// window is walked whenever one row of it is due. A window with nothing to delete costs no
// write (but for where the walk stands, below). A row therefore outlives its expiry by up
// to about one pass; nothing reads an expired row as live meanwhile (idempotency.h: a
// finished key past expires_at is used afresh; an inbox row only dedupes longer). Where
// each walk stands is kept in the store (table sweep_walks), written with each window's
// deletions (and, for windows with nothing to delete, at a sweeper's first window, every
// 16th and at the end of a walk): a sweeper that starts again resumes the walk at its pace
// (`resume_walks`), so a process restarted often still walks each table through, and its
// start costs no walk flat out; only a walk that never ended yet (the store's first) runs
// flat out. Two sweepers on one store each keep their own walk, and the last to write is
// what a third resumes. docs/design/retention.md.
//
// Thread safety: safe to run from one thread while everything else runs; RunOnce is not
// to be called by two threads at once on one Sweeper.
#ifndef CONVERGE_SWEEPER_H_
#define CONVERGE_SWEEPER_H_

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "converge/clock.h"
#include "converge/database.h"
#include "converge/status.h"

namespace converge {

struct SweepOptions {
  int64_t batch = 1000;  // rows deleted per table per transaction
  Millis published_retention = std::chrono::hours(24 * 7);
  Millis done_retention = std::chrono::hours(24 * 7);
  Millis settled_dead_letter_retention = std::chrono::hours(24 * 30);
  Millis settled_saga_retention = std::chrono::hours(24 * 30);
  // Time-partitioned stores only: the span of one partition (partitions start at
  // multiples of it since the epoch), and how many beyond the current one exist ahead
  // of time, so that an insert does not land in the DEFAULT partition while the sweeper
  // is not running. REQUIRES: partition_period > 0, partitions_ahead >= 0.
  Millis partition_period = std::chrono::hours(24);
  int partitions_ahead = 2;
  // Stores that sweep in key order: how long one walk over idempotency_keys, and one over
  // consumer_inbox, should take. A walk finds about pass / (TTL + pass) of a table's rows
  // expired (rows living TTL), so a longer pass deletes more rows per page written and
  // keeps more expired rows meanwhile (the table is about pass / 2 of inserts larger).
  // Each default is a quarter of its table's default TTL (24 h for keys, 14 days for
  // inbox rows: IdempotencyOptions, ConsumerOptions::inbox_ttl), so that a walk of either
  // finds a fifth of its rows expired; at the keys' pass the inbox walk would find 2% and
  // write a leaf page for every one or two rows it deletes (docs/design/retention.md).
  // REQUIRES: 0 < each <= kMaxKeyOrderPass.
  Millis key_order_pass = std::chrono::hours(6);
  Millis inbox_key_order_pass = std::chrono::hours(24 * 14 / 4);
  static constexpr Millis kMaxKeyOrderPass = std::chrono::hours(24 * 365);
  // Stores that sweep in key order: the rows a window examines at most (it ends sooner
  // at its `batch`-th forgettable row, so a transaction still deletes at most `batch`),
  // and the windows of each table one RunOnce walks at most while the walk lags its
  // schedule. REQUIRES: both >= 1.
  int64_t key_order_window = 10000;
  int key_order_windows = 16;
  // Stores that sweep in key order: resume where the store says the last walk stood
  // (header). false: walk each table through from its start, flat out, as a one-shot
  // sweep wants (`converge sweep`); where it gets to is still written.
  bool resume_walks = true;
};

struct SweepStats {
  int64_t keys = 0, inbox = 0, outbox = 0, effects = 0, dead_letters = 0, sagas = 0;
  // Rows deleted one by one (not those of dropped partitions, which are not counted).
  int64_t total() const { return keys + inbox + outbox + effects + dead_letters + sagas; }
  // Time-partitioned stores: partitions of idempotency_keys, consumer_inbox and
  // outbox_events created and dropped by this pass.
  int64_t partitions_created = 0, partitions_dropped = 0;
  // Call RunOnce again at once: a table's batch came back full, or a walk in key order
  // lags its schedule (or is a first walk). A loop that runs until this is false has
  // swept everything there was, and, without resume_walks, walked each key-order table
  // through once.
  bool more = false;
  // Walks in key order that reached the end of their table in this call.
  int walks_completed = 0;
};

class Sweeper {
 public:
  // `db` and `clock` must outlive the sweeper. clock nullptr = Clock::System().
  explicit Sweeper(Database& db, SweepOptions options = {}, Clock* clock = nullptr);

  // One bounded batch (or window, above) per table, each in its own transaction. Returns
  // what it deleted; call again while `more` to sweep everything.
  Result<SweepStats> RunOnce();

  // kInvalidArgument naming what is out of range (RunOnce and Runtime::Validate check).
  static Status ValidateOptions(const SweepOptions& options);

 private:
  // The tables the row-by-row sweeps delete from: on a time-partitioned store, the
  // DEFAULT partitions.
  struct RowTables {
    std::string keys = "idempotency_keys";
    std::string outbox = "outbox_events";
  };
  // Time-partitioned stores: creates ahead and drops what may go (above). Sets
  // `*row_tables`.
  Status MaintainPartitions(int64_t now, SweepStats* stats, RowTables* row_tables);

  // A table walked in key order, and where its walk stands.
  struct Walk {
    std::string table;
    std::string key_columns;  // its primary key's columns, "a, b"
    size_t key_size;          // how many
    std::string forgettable;  // SQL on the row, $1 = now: it may be deleted
    int64_t pass = 0;         // ms a walk after the first takes
    std::vector<Value> after;  // the last key of the previous window; empty: at the start
    int64_t pass_start = 0;    // when this walk began (the previous one ended)
    int64_t pass_rows = 0;     // rows examined by this walk so far
    int64_t last_pass_rows = -1;  // rows the previous whole walk examined; -1: none yet
    int unsaved = -1;  // windows walked since the above was written to sweep_walks; -1:
                       // not written by this sweeper yet
  };
  // Where the store says each walk stood (header); a walk it knows nothing of starts
  // afresh.
  Status LoadWalks(int64_t now);
  // Whether `walk` lags its schedule at `now` (or is the first, or overdue): it is due
  // another window. Moves the schedule back to `now` when the clock went back.
  bool Behind(Walk& walk, int64_t now) const;
  // One window of `walk`: deletes its forgettable rows and moves the walk on, counting a
  // walk that reached the end of its table in `*completed`. Returns the rows deleted.
  Result<int64_t> WalkOnce(Walk& walk, int64_t now, int* completed);

  Database& db_;
  const SweepOptions options_;
  Clock* clock_;
  std::optional<bool> key_order_;  // Dialect::SweepsInKeyOrder, once known
  bool walks_loaded_ = false;
  Walk keys_walk_, inbox_walk_;
};

}  // namespace converge

#endif  // CONVERGE_SWEEPER_H_
