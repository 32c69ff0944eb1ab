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
// Thread safety: safe to run from one thread while everything else runs.
#ifndef CONVERGE_SWEEPER_H_
#define CONVERGE_SWEEPER_H_

#include <chrono>
#include <cstdint>
#include <string>

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
};

struct SweepStats {
  int64_t keys = 0, inbox = 0, outbox = 0, effects = 0, dead_letters = 0, sagas = 0;
  // Rows deleted one by one (not those of dropped partitions, which are not counted).
  int64_t total() const { return keys + inbox + outbox + effects + dead_letters + sagas; }
  // Time-partitioned stores: partitions of idempotency_keys, consumer_inbox and
  // outbox_events created and dropped by this pass.
  int64_t partitions_created = 0, partitions_dropped = 0;
};

class Sweeper {
 public:
  // `db` and `clock` must outlive the sweeper. clock nullptr = Clock::System().
  explicit Sweeper(Database& db, SweepOptions options = {}, Clock* clock = nullptr);

  // One bounded batch per table, each in its own transaction. Returns what it deleted;
  // call again while total() > 0 to sweep everything.
  Result<SweepStats> RunOnce();

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
  Database& db_;
  const SweepOptions options_;
  Clock* clock_;
};

}  // namespace converge

#endif  // CONVERGE_SWEEPER_H_
