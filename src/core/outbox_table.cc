// Method: the application's table is staged, not published from directly. Each ingest
// takes one store-wide lock for the source (Tx::LockUntilCommit: a PostgreSQL advisory
// lock; SQLite's one writer already serialises), reads the rows that have no copy in
// outbox_events yet (an anti-join by (source, id): a row committed late is found on the
// next pass, whatever its position), and copies them with Outbox::Enqueue in the order
// they are read. Because ingests are serialised and each commits before the next reads,
// the copies' `seq` follows the order in which the application's rows became visible,
// and the library's Relay, which publishes per aggregate in `seq` order, publishes them in
// the application's commit order. The Relay's partitions, leases and fences apply
// unchanged; docs/design/outbox-table-relay.md says why staging won over reading the
// application's table in the relay itself.
#include "converge/outbox_table.h"

#include <set>

#include <nlohmann/json.hpp>

#include "converge/failpoint.h"

namespace converge {
namespace {

using json = nlohmann::json;

bool IsIdentifier(std::string_view s) {
  if (s.empty() || s.size() > 63) return false;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
    if (!alpha && !(i > 0 && c >= '0' && c <= '9')) return false;
  }
  return true;
}

// [schema.]table
bool IsTableName(std::string_view s) {
  const size_t dot = s.find('.');
  if (dot == std::string_view::npos) return IsIdentifier(s);
  return IsIdentifier(s.substr(0, dot)) && IsIdentifier(s.substr(dot + 1));
}

Status CheckOptions(const OutboxTableOptions& o) {
  if (!IsTableName(o.table)) {
    return InvalidArgumentError("outbox table name '" + o.table +
                                "' is not an SQL identifier ([schema.]name, letters, digits, _)");
  }
  const OutboxTableColumns& c = o.columns;
  const std::pair<const char*, const std::string*> columns[] = {
      {"id", &c.id},           {"aggregatetype", &c.aggregate_type},
      {"aggregateid", &c.aggregate_id}, {"type", &c.type},
      {"payload", &c.payload}, {"timestamp", &c.timestamp},
      {"order", &c.order},     {"published", &c.published}};
  for (const auto& [what, name] : columns) {
    const bool optional = name == &c.timestamp || name == &c.order || name == &c.published;
    if (optional && name->empty()) continue;
    if (!IsIdentifier(*name)) {
      return InvalidArgumentError(std::string("outbox table ") + what + " column '" + *name +
                                  "' is not an SQL identifier (letters, digits, _)");
    }
  }
  if (o.on_published == OnPublished::kMark && c.published.empty()) {
    return InvalidArgumentError(
        "outbox table: marking published rows needs a published column (a nullable "
        "timestamp), or delete them instead");
  }
  if (o.batch == 0) return InvalidArgumentError("outbox table: batch must be positive");
  return OkStatus();
}

// The event of one row, or why the row cannot be one. A payload that is not JSON goes as
// a JSON string; bytes that are not UTF-8 (in it, or in a field: SQLite hands text over as
// it was written) make no event, where nlohmann's dump() would throw.
Result<PreparedEvent> PrepareRow(const Outbox& outbox, Event e) {
  if (!json::accept(e.data)) {
    try {
      e.data = json(e.data).dump();
    } catch (const json::exception&) {
      return tl::unexpected(InvalidArgumentError("its payload is neither JSON nor UTF-8 text"));
    }
  }
  return outbox.Prepare(std::move(e));
}

}  // namespace

OutboxTable::OutboxTable(Database& db, Outbox& outbox, OutboxTableOptions options)
    : db_(db),
      outbox_(outbox),
      options_(std::move(options)),
      worker_("outbox table " + options_.table, options_.poll, [this] {
        Result<bool> r = RunOnce();
        return r && *r;
      }) {
  const OutboxTableColumns& c = options_.columns;
  const std::string& t = options_.table;
  // CAST(... AS TEXT): a PostgreSQL uuid id and jsonb payload read as text, and compare
  // with outbox_events.event_id.
  const std::string copied =
      "EXISTS (SELECT 1 FROM outbox_events e WHERE e.source = $1 AND e.event_id = "
      "CAST(a." + c.id + " AS TEXT)";
  const std::string unmarked =
      options_.on_published == OnPublished::kMark ? "a." + c.published + " IS NULL AND " : "";
  std::string order = "a." + c.id;
  if (!c.order.empty()) {
    order = "a." + c.order + ", " + order;
  } else if (!c.timestamp.empty()) {
    order = "a." + c.timestamp + ", " + order;
  }
  ingest_head_ = "SELECT CAST(a." + c.id + " AS TEXT), CAST(a." + c.aggregate_type +
                 " AS TEXT), CAST(a." + c.aggregate_id + " AS TEXT), CAST(a." + c.type +
                 " AS TEXT), CAST(a." + c.payload + " AS TEXT) FROM " + t + " a WHERE " +
                 unmarked + "NOT " + copied + ")";
  ingest_tail_ = " ORDER BY " + order + " LIMIT $2";
  aggregate_column_ = "CAST(a." + c.aggregate_id + " AS TEXT)";
  const std::string published = "SELECT a." + c.id + " FROM " + t + " a WHERE " + unmarked +
                                copied + " AND e.published_at IS NOT NULL) LIMIT $2";
  delete_sql_ = "DELETE FROM " + t + " WHERE " + c.id + " IN (" + published + ")";
  if (!c.published.empty()) {
    mark_sql_ = "UPDATE " + t + " SET " + c.published + " = CURRENT_TIMESTAMP WHERE " + c.id +
                " IN (" + published + ")";
  }
}

OutboxTable::~OutboxTable() { Stop(); }

Result<std::unique_ptr<OutboxTable>> OutboxTable::Open(Database& db, Outbox& outbox,
                                                       OutboxTableOptions options) {
  CONVERGE_RETURN_IF_ERROR(CheckOptions(options));
  if (options.source.empty()) options.source = "urn:converge:outbox-table:" + options.table;
  // Every configured column, read once from an empty result: an unknown table or column
  // is refused here, at start, not on the first row.
  const OutboxTableColumns& c = options.columns;
  std::string probe = "SELECT " + c.id + ", " + c.aggregate_type + ", " + c.aggregate_id +
                      ", " + c.type + ", " + c.payload;
  for (const std::string* col : {&c.timestamp, &c.order, &c.published}) {
    if (!col->empty()) probe += ", " + *col;
  }
  probe += " FROM " + options.table + " WHERE 1 = 0";
  Status st = db.Read([&](Tx& tx) { return StatusOf(tx.Query(probe)); });
  if (!st.ok()) {
    return tl::unexpected(InvalidArgumentError(
        "outbox table '" + options.table + "' cannot be read with the configured columns (" +
        probe.substr(7, probe.find(" FROM ") - 7) + "): " + st.message()));
  }
  return std::unique_ptr<OutboxTable>(new OutboxTable(db, outbox, std::move(options)));
}

Result<size_t> OutboxTable::Ingest() {
  size_t copied = 0;
  int64_t held = 0;
  std::string bad;
  Status st = db_.Transact([&](Tx& tx) -> Status {
    copied = 0;
    held = 0;
    bad.clear();
    // One ingest at a time per source, store-wide: the next one reads only after this one
    // committed, so copies are drawn in visibility order (the Method above).
    CONVERGE_RETURN_IF_ERROR(tx.LockUntilCommit("converge.outbox-table:" + options_.source));
    std::set<std::string> stopped;  // aggregates held back behind a row that is no event
    // Pages, each the head of what is left with the aggregates stopped so far left out in
    // the query, so that a bad row with a batch of its aggregate behind it does not stop
    // the others. Each page reads what a new ingest after this one's copies would read,
    // less those aggregates: every aggregate's earliest row without a copy comes first, so
    // nothing is skipped within an aggregate. (Paging by OFFSET was tried and dropped:
    // under PostgreSQL's READ COMMITTED each page sees a fresh snapshot, so a row removed,
    // or an earlier row committed, between pages shifted the offset and a row was
    // skipped, out of its aggregate's order. docs/design/outbox-table-relay.md.)
    for (size_t page = 0; page < kMaxIngestPages; ++page) {
      if (page > 0) CONVERGE_RETURN_IF_ERROR(failpoint::Hit("outbox_table.between_pages"));
      // A page reads only what is left of the batch: one ingest copies at most `batch`.
      const size_t limit = options_.batch - copied;
      std::string sql = ingest_head_;
      std::vector<Value> params = {Value(options_.source), Value(static_cast<int64_t>(limit))};
      if (!stopped.empty()) {
        sql += " AND " + aggregate_column_ + " NOT IN (";
        for (const std::string& s : stopped) {
          if (params.size() > 2) sql += ", ";
          params.emplace_back(s);
          sql += "$" + std::to_string(params.size());
        }
        sql += ")";
      }
      sql += ingest_tail_;
      CONVERGE_ASSIGN_OR_RETURN(Rows rows, tx.QueryParams(sql, params));
      const size_t stopped_before = stopped.size();
      for (const Row& r : rows) {
        if (r.IsNull(0) || r.Text(0).empty()) {
          // No id to find its copy by: Prepare would draw one, and the row would be
          // copied again on every pass (found by review).
          stopped.insert(r.Text(2));
          ++held;
          if (bad.empty()) {
            bad = "a row of " + options_.table + " has no id; its aggregate waits until it "
                  "is fixed";
          }
          continue;
        }
        Event e;
        e.id = r.Text(0);
        e.source = options_.source;
        e.aggregate_type = r.Text(1);
        e.subject = r.Text(2);
        e.type = r.Text(3);
        e.data = r.IsNull(4) ? "null" : r.Text(4);
        if (stopped.count(e.subject)) {
          ++held;
          continue;
        }
        Result<PreparedEvent> prepared = PrepareRow(outbox_, std::move(e));
        if (!prepared) {
          stopped.insert(r.Text(2));
          ++held;
          if (bad.empty()) {
            bad = "row " + r.Text(0) + " of " + options_.table + " cannot be published (" +
                  prepared.error().message() + "); its aggregate waits until it is fixed";
          }
          continue;
        }
        CONVERGE_RETURN_IF_ERROR(StatusOf(outbox_.Enqueue(tx, *prepared)));
        ++copied;
      }
      // Another page only while this one was full, held some of its rows back, and has
      // left room in the batch; the list of stopped aggregates is bounded too.
      if (rows.size() < limit || stopped.size() == stopped_before || copied >= options_.batch ||
          stopped.size() >= kMaxStoppedAggregates) {
        break;
      }
    }
    return OkStatus();
  });
  std::lock_guard<std::mutex> l(stats_mu_);
  if (!st.ok()) {
    stats_.last_error = st.ToString();
    return tl::unexpected(st);
  }
  stats_.ingested += static_cast<int64_t>(copied);
  stats_.held_back = held;
  stats_.last_error = bad;  // empty again once the row that held its aggregate is fixed
  return copied + static_cast<size_t>(held);
}

Result<size_t> OutboxTable::Finalize() {
  int64_t n = 0;
  const std::string& sql = options_.on_published == OnPublished::kMark ? mark_sql_ : delete_sql_;
  Status st = db_.Transact([&](Tx& tx) -> Status {
    CONVERGE_ASSIGN_OR_RETURN(
        n, tx.Exec(sql, options_.source, static_cast<int64_t>(options_.batch)));
    // Published and marked, the application's rows deleted or marked but not committed.
    if (n > 0) CONVERGE_RETURN_IF_ERROR(failpoint::Hit("outbox_table.finalize_before_commit"));
    return OkStatus();
  });
  std::lock_guard<std::mutex> l(stats_mu_);
  if (!st.ok()) {
    stats_.last_error = st.ToString();
    return tl::unexpected(st);
  }
  stats_.finalized += n;
  return static_cast<size_t>(n);
}

Result<bool> OutboxTable::RunOnce() {
  {
    std::lock_guard<std::mutex> l(stats_mu_);
    ++stats_.passes;
  }
  CONVERGE_ASSIGN_OR_RETURN(size_t read, Ingest());
  CONVERGE_ASSIGN_OR_RETURN(size_t finalized, Finalize());
  // Held-back rows are read again on every pass: they alone do not make a batch "full".
  int64_t held = 0;
  {
    std::lock_guard<std::mutex> l(stats_mu_);
    held = stats_.held_back;
  }
  return read - static_cast<size_t>(held) >= options_.batch || finalized >= options_.batch;
}

void OutboxTable::Start() { worker_.Start(); }

void OutboxTable::Stop() { worker_.Stop(); }

OutboxTableStats OutboxTable::stats() const {
  std::lock_guard<std::mutex> l(stats_mu_);
  return stats_;
}

}  // namespace converge
