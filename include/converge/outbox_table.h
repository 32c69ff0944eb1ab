// OutboxTable: an application's own outbox table (written by a program in any language, in
// its own transactions) as a source of converge outbox events. See
// docs/design/outbox-table-relay.md.
//
// The table follows the outbox event router convention (Debezium's column names): `id`
// (the event id), `aggregatetype`, `aggregateid`, `type`, `payload` (JSON), plus a
// timestamp; every name can be mapped. A pass:
//
//   1. Ingest: under one store-wide lock per source, copies rows not yet copied (an
//      anti-join on outbox_events by (source, id), never "newer than the last one seen")
//      into outbox_events through Outbox::Enqueue, in the order they became visible; rows
//      first seen together are ordered by the order column (or timestamp, then id).
//      outbox_events' `seq` is drawn at that copy, under the lock, so per aggregate it
//      follows the application's commit order, and a row that commits late (a smaller
//      sequence value committing after a larger one was published) is copied late,
//      never skipped. From there the library's Relay publishes: partitions, leases,
//      fencing, publish-and-mark, unchanged.
//   2. Finalize: rows whose copy the relay has marked published are deleted from the
//      application's table, or their published column set, as configured.
//
// A row that cannot be an event (empty type or aggregate id, a field over 255 bytes, with
// a control character or not UTF-8) holds back the rows after it of its aggregate (order)
// and is reported in stats().last_error each pass until it is fixed or removed; other
// aggregates go on: an ingest reads on past a page its held-back rows filled, leaving
// the stopped aggregates out (up to kMaxIngestPages pages and kMaxStoppedAggregates
// aggregates; held-back rows are read again on every pass). A payload that is not JSON
// is published as a JSON string (when it is UTF-8 text).
//
// Thread safety: RunOnce must not run concurrently with itself; Start/Stop are for one
// owner thread; stats() is safe from any thread.
#ifndef CONVERGE_OUTBOX_TABLE_H_
#define CONVERGE_OUTBOX_TABLE_H_

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include "converge/clock.h"
#include "converge/database.h"
#include "converge/outbox.h"
#include "converge/status.h"
#include "converge/worker.h"

namespace converge {

// Column names of the application's table. Each is an SQL identifier
// ([A-Za-z_][A-Za-z0-9_]*); `order` and `timestamp` may be empty (not used).
struct OutboxTableColumns {
  std::string id = "id";
  std::string aggregate_type = "aggregatetype";
  std::string aggregate_id = "aggregateid";
  std::string type = "type";
  std::string payload = "payload";
  std::string timestamp = "created_at";
  // Optional: a column that orders the rows one transaction writes (a bigserial/identity
  // column on PostgreSQL, `rowid` on SQLite). Without it, rows first seen together are
  // ordered by timestamp, then id.
  std::string order;
  // The published marker, for OnPublished::kMark (a timestamp column, NULL until the relay
  // sets it to CURRENT_TIMESTAMP).
  std::string published;
};

enum class OnPublished {
  kDelete,  // delete the row once published
  kMark,    // set columns.published once published (rows with it set are never read)
};

struct OutboxTableOptions {
  std::string table;  // required: [schema.]table
  OutboxTableColumns columns;
  OnPublished on_published = OnPublished::kDelete;
  // The CloudEvents source of the published events; (source, id) is their identity end to
  // end. Empty: "urn:converge:outbox-table:<table>".
  std::string source;
  size_t batch = 500;                            // rows copied (and finalized) per pass
  Millis poll = std::chrono::milliseconds(200);  // the application does not wake us
};

struct OutboxTableStats {
  int64_t ingested = 0;   // rows copied into outbox_events
  int64_t finalized = 0;  // rows deleted or marked after they were published
  int64_t held_back = 0;  // rows held back behind one that cannot be an event (last pass)
  int64_t passes = 0;
  std::string last_error;
};

class OutboxTable {
 public:
  // Checks the options and that `options.table` exists with every configured column.
  // kInvalidArgument naming what is wrong (a bad identifier, kMark without a published
  // column, an unknown table or column). `db` and `outbox` (whose Enqueue wakes a relay in
  // this process) must outlive the result.
  static Result<std::unique_ptr<OutboxTable>> Open(Database& db, Outbox& outbox,
                                                   OutboxTableOptions options);
  ~OutboxTable();  // stops the background thread if running

  // One ingest: returns how many rows were copied into outbox_events.
  Result<size_t> Ingest();
  // One finalize: returns how many published rows were deleted or marked.
  Result<size_t> Finalize();
  // Ingest, then Finalize; true when a batch came back full (more is waiting).
  Result<bool> RunOnce();

  // Runs passes on a background thread (every `poll`, straight on while batches are full).
  void Start();
  void Stop();

  OutboxTableStats stats() const;
  const OutboxTableOptions& options() const { return options_; }

 private:
  OutboxTable(Database& db, Outbox& outbox, OutboxTableOptions options);

  Database& db_;
  Outbox& outbox_;
  const OutboxTableOptions options_;
  // An ingest reads pages while held-back rows fill them: at most this many, and stops
  // once this many aggregates are held back (each is a parameter of the next page).
  static constexpr size_t kMaxIngestPages = 8;
  static constexpr size_t kMaxStoppedAggregates = 256;

  // The ingest's query, split where the stopped aggregates are left out.
  std::string ingest_head_, ingest_tail_, aggregate_column_;
  std::string delete_sql_, mark_sql_;
  mutable std::mutex stats_mu_;
  OutboxTableStats stats_;
  PollingWorker worker_;  // last: stopped before what its passes use
};

}  // namespace converge

#endif  // CONVERGE_OUTBOX_TABLE_H_
