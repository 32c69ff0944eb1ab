#include "converge/sweeper.h"

#include <algorithm>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "converge/failpoint.h"
#include "converge/inbox.h"
#include "src/core/idempotency_internal.h"

namespace converge {

Sweeper::Sweeper(Database& db, SweepOptions options, Clock* clock)
    : db_(db), options_(options), clock_(clock ? clock : Clock::System()) {
  keys_walk_ = {.table = "idempotency_keys",
                .key_columns = "scope, key",
                .key_size = 2,
                .forgettable = internal::ForgettableKeyCondition("$1"),
                .pass = options_.key_order_pass.count()};
  inbox_walk_ = {.table = "consumer_inbox",
                 .key_columns = "consumer, source, event_id",
                 .key_size = 3,
                 .forgettable = "expires_at <= $1",  // Inbox::Sweep's
                 .pass = options_.inbox_key_order_pass.count()};
}

namespace {

// The time-partitioned tables, and the condition under which a row of theirs must stay.
struct PartitionedTable {
  std::string_view name;
  std::string keep;  // SQL on the row, with $1 = at
  int64_t at;
};

// "($first, $first+1, ...)": `n` placeholders for a row value.
std::string Placeholders(size_t first, size_t n) {
  std::string out = "(";
  for (size_t i = 0; i < n; ++i) out += (i ? ", $" : "$") + std::to_string(first + i);
  return out + ")";
}

// sweep_walks.after_key: each column of a key as its length, ':' and its bytes. Only text
// columns (every key walked is text); nullopt for any other.
std::optional<Blob> EncodeKey(const std::vector<Value>& key) {
  Blob out;
  for (const Value& v : key) {
    const auto* text = std::get_if<std::string>(&v);
    if (text == nullptr) return std::nullopt;
    out.bytes += std::to_string(text->size()) + ":" + *text;
  }
  return out;
}

// EncodeKey's inverse; nullopt unless `bytes` holds exactly `columns` columns.
std::optional<std::vector<Value>> DecodeKey(std::string_view bytes, size_t columns) {
  std::vector<Value> key;
  while (!bytes.empty()) {
    const size_t colon = bytes.find(':');
    if (colon == std::string_view::npos || colon == 0 || colon > 9) return std::nullopt;
    size_t n = 0;
    for (char c : bytes.substr(0, colon)) {
      if (c < '0' || c > '9') return std::nullopt;
      n = n * 10 + static_cast<size_t>(c - '0');
    }
    bytes.remove_prefix(colon + 1);
    if (n > bytes.size()) return std::nullopt;
    key.emplace_back(std::string(bytes.substr(0, n)));
    bytes.remove_prefix(n);
  }
  if (key.size() != columns) return std::nullopt;
  return key;
}

bool Overlaps(const std::vector<TimePartition>& parts, int64_t from, int64_t to) {
  for (const TimePartition& p : parts) {
    if (p.from < to && from < p.to) return true;
  }
  return false;
}

}  // namespace

Status Sweeper::MaintainPartitions(int64_t now, SweepStats* stats, RowTables* row_tables) {
  *row_tables = RowTables{};
  bool partitioned = false;
  const int64_t period = options_.partition_period.count();  // > 0: ValidateOptions
  // Each keeps what its row-by-row sweep keeps (that sweep's condition, negated).
  const PartitionedTable tables[] = {
      {"idempotency_keys", internal::UnforgettableKeyCondition("$1"), now},
      {"consumer_inbox", "expires_at > $1", now},  // Inbox::Sweep's
      // Unpublished events stay however old their partition is: the relay has yet to
      // publish them (or a dead letter's replay made them unpublished again).
      {"outbox_events", "published_at IS NULL OR published_at > $1",
       now - options_.published_retention.count()},
  };
  // Another transaction may hold the table a while (each DDL step waits at most 1 s for
  // it, then fails kUnavailable): that step is left to the next pass.
  auto busy = [](const Status& st) { return st.code() == StatusCode::kUnavailable; };
  for (const PartitionedTable& table : tables) {
    std::vector<TimePartition> parts;
    // A read: on a store without partitions (every SQLite one) this costs no write.
    CONVERGE_RETURN_IF_ERROR(db_.Read([&](Tx& tx) -> Status {
      TimePartitions* tp = tx.time_partitions();
      partitioned = tp != nullptr;
      if (tp == nullptr) return OkStatus();
      CONVERGE_ASSIGN_OR_RETURN(parts, tp->List(table.name));
      if (table.name == "idempotency_keys") {
        CONVERGE_ASSIGN_OR_RETURN(row_tables->keys, tp->DefaultPartition(table.name));
      } else if (table.name == "outbox_events") {
        CONVERGE_ASSIGN_OR_RETURN(row_tables->outbox, tp->DefaultPartition(table.name));
      }
      return OkStatus();
    }));
    if (!partitioned) return OkStatus();

    // Ahead: the current period and the next partitions_ahead ones.
    const int64_t current = (now >= 0 ? now / period : (now - period + 1) / period) * period;
    for (int i = 0; i <= options_.partitions_ahead; ++i) {
      const int64_t from = current + i * period, to = from + period;
      if (Overlaps(parts, from, to)) continue;
      bool created = false;
      Status st = db_.Transact([&](Tx& tx) -> Status {
        CONVERGE_ASSIGN_OR_RETURN(created, tx.time_partitions()->Create(table.name, from, to));
        return OkStatus();
      });
      if (busy(st)) continue;
      CONVERGE_RETURN_IF_ERROR(st);
      if (created) ++stats->partitions_created;
    }

    // Behind: partitions whose period has ended. A look without the lock first, so that
    // a partition that must wait does not lock the table at every pass; the drop itself
    // checks again under the lock, and only then drops.
    const Value params[] = {Value(table.at)};
    for (const TimePartition& p : parts) {
      if (p.to > now) continue;
      bool waits = false;
      CONVERGE_RETURN_IF_ERROR(db_.Read([&](Tx& tx) -> Status {
        CONVERGE_ASSIGN_OR_RETURN(
            Rows kept, tx.QueryParams("SELECT 1 FROM " + p.name + " WHERE (" + table.keep +
                                          ") LIMIT 1", params));
        waits = !kept.empty();
        return OkStatus();
      }));
      if (waits) continue;
      // A test pauses here to change the partition between the look and the drop.
      CONVERGE_RETURN_IF_ERROR(failpoint::Hit("sweeper.before_partition_drop"));
      bool dropped = false;
      Status st = db_.Transact([&](Tx& tx) -> Status {
        CONVERGE_ASSIGN_OR_RETURN(
            dropped, tx.time_partitions()->DropUnless(table.name, p, table.keep, params));
        return OkStatus();
      });
      if (busy(st)) continue;
      CONVERGE_RETURN_IF_ERROR(st);
      if (dropped) ++stats->partitions_dropped;
    }
  }
  return OkStatus();
}

// Windows with nothing to delete write where the walk stands once every this many (those
// with rows to delete write it in their own transaction, and so does a sweeper's first
// window): a sweeper that starts again reads again fewer windows than this, and one that
// walks more than this many before it stops (a process in a crash loop) gets further
// each time.
constexpr int kSaveEmptyWindowsEvery = 16;

Status Sweeper::LoadWalks(int64_t now) {
  return db_.Read([&](Tx& tx) -> Status {
    CONVERGE_ASSIGN_OR_RETURN(
        Rows rows,
        tx.Query("SELECT walk, after_key, pass_start, pass_rows, last_pass_rows FROM sweep_walks"));
    for (const Row& r : rows) {
      for (Walk* w : {&keys_walk_, &inbox_walk_}) {
        if (r.Text(0) != w->table) continue;
        std::vector<Value> after;
        if (!r.IsNull(1)) {
          std::optional<std::vector<Value>> key = DecodeKey(r.Text(1), w->key_size);
          if (!key) break;  // not written by this code: start afresh
          after = std::move(*key);
        }
        w->after = std::move(after);
        // Within the last pass: a time from the future (or a clock that went back)
        // starts the pass now; one from further back is as overdue as can be.
        w->pass_start = std::clamp(r.Int(2), now - w->pass, now);
        w->pass_rows = std::max<int64_t>(0, r.Int(3));
        w->last_pass_rows = std::max<int64_t>(-1, r.Int(4));
      }
    }
    return OkStatus();
  });
}

bool Sweeper::Behind(Walk& w, int64_t now) const {
  if (w.last_pass_rows < 0) return true;  // a first walk (none ended yet): flat out
  if (now < w.pass_start) w.pass_start = now;  // the clock went back
  const int64_t period = w.pass;
  const int64_t elapsed = now - w.pass_start;
  if (elapsed >= period) return true;  // overdue: finish it
  const auto due =
      static_cast<int64_t>(static_cast<__int128>(w.last_pass_rows) * elapsed / period);
  return w.pass_rows < due;
}

Result<int64_t> Sweeper::WalkOnce(Walk& w, int64_t now, int* completed) {
  const std::string key = "(" + w.key_columns + ")";
  // "key > after [AND key <= end]" with their values appended to `params`.
  auto range = [&](const std::vector<Value>& end, std::vector<Value>* params) {
    std::string sql = "1 = 1";
    for (const std::vector<Value>* bound : {&std::as_const(w.after), &end}) {
      if (bound->empty()) continue;
      sql += " AND " + key + (bound == &w.after ? " > " : " <= ") +
             Placeholders(params->size() + 1, w.key_size);
      params->insert(params->end(), bound->begin(), bound->end());
    }
    return sql;
  };
  auto first_key = [&](const Rows& rows, std::vector<Value>* out) {
    if (rows.empty()) return;
    for (size_t i = 0; i < w.key_size; ++i) out->push_back(rows[0][i]);
  };
  // The window, found by reads, off the writer: the next key_order_window rows after the
  // previous window, cut short after its batch-th forgettable row so that one transaction
  // deletes at most `batch` (plus any row that became forgettable in the range since).
  std::vector<Value> end;  // empty: to the end of the table
  int64_t examined = 0;
  bool forgettable = true;  // the window holds a row to delete
  CONVERGE_RETURN_IF_ERROR(db_.Read([&](Tx& tx) -> Status {
    std::vector<Value> params;
    std::string in_range = range({}, &params);
    CONVERGE_ASSIGN_OR_RETURN(
        Rows last, tx.QueryParams("SELECT " + w.key_columns + " FROM " + w.table + " WHERE " +
                                      in_range + " ORDER BY " + w.key_columns +
                                      " LIMIT 1 OFFSET " +
                                      std::to_string(options_.key_order_window - 1),
                                  params));
    first_key(last, &end);
    params = {Value(now)};
    in_range = range(end, &params);
    CONVERGE_ASSIGN_OR_RETURN(
        Rows cut, tx.QueryParams("SELECT " + w.key_columns + " FROM " + w.table + " WHERE " +
                                     in_range + " AND (" + w.forgettable + ") ORDER BY " +
                                     w.key_columns + " LIMIT 1 OFFSET " +
                                     std::to_string(options_.batch - 1),
                                 params));
    if (!cut.empty()) {
      end.clear();
      first_key(cut, &end);
    } else {
      CONVERGE_ASSIGN_OR_RETURN(
          Rows any, tx.QueryParams("SELECT 1 FROM " + w.table + " WHERE " + in_range +
                                       " AND (" + w.forgettable + ") LIMIT 1",
                                   params));
      forgettable = !any.empty();
      if (!end.empty()) {
        examined = options_.key_order_window;
        return OkStatus();
      }
    }
    // How many rows the window holds, for the schedule (at most key_order_window).
    params.clear();
    in_range = range(end, &params);
    CONVERGE_ASSIGN_OR_RETURN(
        Rows count, tx.QueryParams("SELECT count(*) FROM " + w.table + " WHERE " + in_range,
                                   params));
    examined = count.empty() ? 0 : count[0].Int(0);
    return OkStatus();
  }));
  // Where the walk stands after this window.
  Walk next = w;
  next.pass_rows += examined;
  if (end.empty()) {  // the walk reached the end of the table: the next one starts over
    next.last_pass_rows = next.pass_rows;
    next.pass_rows = 0;
    next.after.clear();
    next.pass_start = now;
  } else {
    next.after = end;
  }
  // A window with nothing to delete costs no write (a row that became forgettable since
  // the read waits for the next walk), but for where the walk stands: at the end of a
  // walk, at this sweeper's first window, and once every kSaveEmptyWindowsEvery.
  const bool save = forgettable || end.empty() || w.unsaved < 0 ||
                    w.unsaved + 1 >= kSaveEmptyWindowsEvery;
  int64_t deleted = 0;
  if (save) {
    std::vector<Value> params = {Value(now)};
    const std::string sql =
        "DELETE FROM " + w.table + " WHERE (" + w.forgettable + ") AND " + range(end, &params);
    const std::optional<Blob> after = EncodeKey(next.after);
    CONVERGE_RETURN_IF_ERROR(db_.Transact([&](Tx& tx) -> Status {
      deleted = 0;
      if (forgettable) {
        CONVERGE_ASSIGN_OR_RETURN(deleted, tx.ExecParams(sql, params));
      }
      // A key EncodeKey cannot write (none walked has one) is saved as the start.
      const bool at_start = next.after.empty() || !after;
      return StatusOf(tx.Exec(
          "INSERT INTO sweep_walks (walk, after_key, pass_start, pass_rows, last_pass_rows) "
          "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (walk) DO UPDATE SET after_key = "
          "excluded.after_key, pass_start = excluded.pass_start, pass_rows = "
          "excluded.pass_rows, last_pass_rows = excluded.last_pass_rows",
          w.table, at_start ? Value() : Value(*after), next.pass_start,
          at_start ? 0 : next.pass_rows, next.last_pass_rows));
    }));
    next.unsaved = 0;
  } else {
    ++next.unsaved;
  }
  if (end.empty()) ++*completed;
  w = std::move(next);
  return deleted;
}

Status Sweeper::ValidateOptions(const SweepOptions& o) {
  if (o.batch < 1) return InvalidArgumentError("sweep batch must be >= 1");
  for (auto [name, retention] :
       {std::pair{"published_retention", o.published_retention},
        std::pair{"done_retention", o.done_retention},
        std::pair{"settled_dead_letter_retention", o.settled_dead_letter_retention},
        std::pair{"settled_saga_retention", o.settled_saga_retention}}) {
    if (retention < Millis(0)) {
      return InvalidArgumentError(std::string("sweep ") + name + " must not be negative, not " +
                                  std::to_string(retention.count()) + " ms");
    }
  }
  if (o.partition_period <= Millis(0) || o.partitions_ahead < 0) {
    return InvalidArgumentError("sweep partition_period must be > 0 and partitions_ahead >= 0");
  }
  for (auto [name, pass] : {std::pair{"key_order_pass", o.key_order_pass},
                            std::pair{"inbox_key_order_pass", o.inbox_key_order_pass}}) {
    if (pass <= Millis(0) || pass > SweepOptions::kMaxKeyOrderPass) {
      return InvalidArgumentError(std::string("sweep ") + name +
                                  " must be within (0, 365 days], not " +
                                  std::to_string(pass.count()) + " ms");
    }
  }
  if (o.key_order_window < 1 || o.key_order_windows < 1) {
    return InvalidArgumentError("sweep key_order_window and key_order_windows must be >= 1");
  }
  return OkStatus();
}

Result<SweepStats> Sweeper::RunOnce() {
  CONVERGE_RETURN_IF_ERROR(ValidateOptions(options_));
  const int64_t now = clock_->NowMillis();
  SweepStats s;
  // Row by row, what no partition drop takes: on a time-partitioned store only the
  // DEFAULT partitions of the keys and the outbox (Inbox::Sweep does the same for its
  // table).
  RowTables tables;
  CONVERGE_RETURN_IF_ERROR(MaintainPartitions(now, &s, &tables));
  const std::string& keys = tables.keys;
  // Each DELETE picks its victims by primary key through a LIMITed subquery: bounded work
  // per transaction on both backends.
  auto sweep = [&](int64_t* out, std::string_view sql, int64_t cutoff) -> Status {
    return db_.Transact([&](Tx& tx) -> Status {
      CONVERGE_ASSIGN_OR_RETURN(*out, tx.Exec(sql, cutoff, options_.batch));
      return OkStatus();
    });
  };
  // Keys and inbox rows: walked in key order (header), or a batch through their expiry
  // indexes.
  bool behind = false;
  if (!key_order_) {  // the store's, asked once
    CONVERGE_RETURN_IF_ERROR(db_.Read([&](Tx& tx) -> Status {
      key_order_ = tx.dialect().SweepsInKeyOrder();
      return OkStatus();
    }));
  }
  const bool key_order = *key_order_;
  if (key_order && !walks_loaded_) {
    if (options_.resume_walks) CONVERGE_RETURN_IF_ERROR(LoadWalks(now));
    walks_loaded_ = true;
  }
  if (key_order) {
    // A window of each walk that lags its schedule, and more while it still does, up to
    // key_order_windows, before the other tables (each of which costs a commit).
    bool keys_behind = Behind(keys_walk_, now), inbox_behind = Behind(inbox_walk_, now);
    for (int i = 0; i < options_.key_order_windows && (keys_behind || inbox_behind); ++i) {
      if (keys_behind) {
        CONVERGE_ASSIGN_OR_RETURN(int64_t n, WalkOnce(keys_walk_, now, &s.walks_completed));
        s.keys += n;
        keys_behind = Behind(keys_walk_, now);
      }
      if (inbox_behind) {
        CONVERGE_ASSIGN_OR_RETURN(int64_t n, WalkOnce(inbox_walk_, now, &s.walks_completed));
        s.inbox += n;
        inbox_behind = Behind(inbox_walk_, now);
      }
    }
    behind = keys_behind || inbox_behind;
  } else {
    CONVERGE_RETURN_IF_ERROR(sweep(
        &s.keys,
        ("DELETE FROM " + keys + " WHERE (scope, key) IN (SELECT scope, key FROM " + keys +
         " WHERE " + internal::ForgettableKeyCondition("$1") + " LIMIT $2) AND " +
         // Again outside the subquery: on PostgreSQL a DELETE that waited for a row lock
         // re-checks only its own WHERE against the row's new version, and an attempt
         // that advanced the row meanwhile must keep it.
         internal::ForgettableKeyCondition("$1")),
        now));
    CONVERGE_RETURN_IF_ERROR(db_.Transact([&](Tx& tx) -> Status {
      CONVERGE_ASSIGN_OR_RETURN(s.inbox, Inbox(clock_).Sweep(tx, options_.batch));
      return OkStatus();
    }));
  }
  // Again outside the subquery: a replayed dead letter of a refused event makes its
  // published row unpublished again (OutboxRequeuer), and must not lose it to a DELETE
  // that waited for its row lock.
  CONVERGE_RETURN_IF_ERROR(sweep(
      &s.outbox,
      "DELETE FROM " + tables.outbox + " WHERE seq IN (SELECT seq FROM " + tables.outbox +
          " WHERE published_at IS NOT NULL AND published_at <= $1 LIMIT $2) AND "
          "published_at IS NOT NULL AND published_at <= $1",
      now - options_.published_retention.count()));
  // A saga's journalled calls are not swept here: a parked saga replayed later, or a
  // compensation run again after a late call, must find a call it made as done and not
  // make it again. They go with their saga, below. (Rows of kind "saga:..." that predate
  // the saga_id column and could not be matched to a saga stay.)
  CONVERGE_RETURN_IF_ERROR(
      sweep(&s.effects,
            "DELETE FROM effects WHERE effect_key IN (SELECT effect_key FROM effects WHERE "
            "state = 'done' AND updated_at <= $1 AND saga_id IS NULL AND kind NOT LIKE 'saga:%' "
            "LIMIT $2)",
            now - options_.done_retention.count()));
  CONVERGE_RETURN_IF_ERROR(sweep(
      &s.dead_letters,
      "DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters WHERE state IN "
      "('replayed', 'discarded') AND updated_at <= $1 LIMIT $2)",
      now - options_.settled_dead_letter_retention.count()));
  // Settled sagas with their step log and their journalled calls. Parked ones stay for an
  // operator. A settled saga is driven again only when a late call of a stalled runner
  // reopens its compensation (saga.cc, Lost), and that reopen must never meet half a
  // sweep. So the sagas are picked once and locked, then their log, their journal and
  // their rows go by those ids, in this one transaction. A SELECT FOR UPDATE's own WHERE
  // is what PostgreSQL re-checks on a row whose lock it waited for (or that changed after
  // the statement's snapshot), so "settled and past retention" holds on every row it
  // returns; SKIP LOCKED passes over a saga a reopen holds: it commits as compensating,
  // and a later pass finds it settled again. A reopen that comes second waits for this
  // transaction and finds no saga (a dead letter, saga.h). On SQLite the sweep holds the
  // one writer, which orders the two the same way. Separate DELETEs that each pick their
  // sagas by a subquery do not: under READ COMMITTED each sees what committed before it.
  int64_t journal = 0;
  CONVERGE_RETURN_IF_ERROR(db_.Transact([&](Tx& tx) -> Status {
    journal = s.sagas = 0;
    CONVERGE_ASSIGN_OR_RETURN(
        Rows rows,
        tx.Query("SELECT saga_id FROM saga_instances WHERE state IN ('completed', "
                 "'compensated') AND updated_at <= $1 ORDER BY saga_id LIMIT $2" +
                     std::string(tx.dialect().ForUpdateSkipLocked()),
                 now - options_.settled_saga_retention.count(), options_.batch));
    std::vector<std::vector<Value>> ids;
    for (const Row& r : rows) ids.push_back({Value(r.Text(0))});
    if (ids.empty()) return OkStatus();
    CONVERGE_RETURN_IF_ERROR(
        StatusOf(tx.ExecMany("DELETE FROM saga_steps WHERE saga_id = $1", ids)));
    CONVERGE_ASSIGN_OR_RETURN(journal, tx.ExecMany("DELETE FROM effects WHERE saga_id = $1", ids));
    // A test pauses here: the sagas' log and journal are gone, their rows not yet.
    CONVERGE_RETURN_IF_ERROR(failpoint::Hit("sweeper.before_saga_instances"));
    CONVERGE_ASSIGN_OR_RETURN(s.sagas,
                              tx.ExecMany("DELETE FROM saga_instances WHERE saga_id = $1", ids));
    return OkStatus();
  }));
  // A full batch: more may be waiting. (A walk's window deletes what it finds; its
  // schedule, not its count, says whether to go on.)
  const int64_t full = options_.batch;
  s.more = behind || (!key_order && (s.keys >= full || s.inbox >= full)) ||
           s.outbox >= full || s.effects >= full || s.dead_letters >= full || s.sagas >= full;
  s.effects += journal;
  return s;
}

}  // namespace converge
