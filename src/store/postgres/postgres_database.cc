// PostgreSQL backend over libpq.
//
// Method: a pool of connections; Transact takes one, runs BEGIN (READ COMMITTED) / fn /
// COMMIT on it, and gives it back; Read does the same in a REPEATABLE READ READ ONLY
// snapshot. PostgreSQL's own group commit merges the WAL flushes of concurrent commits, so
// unlike SQLite no writer thread is needed: concurrency comes from the pool. Serialization
// failures and deadlocks (40001, 40P01) re-run fn; a broken connection is reset before its
// next use and the call fails with kUnavailable. A COMMIT whose connection broke has an
// unknown outcome and reports kUnavailable with reason kCommitOutcomeUnknown: callers
// retry, and every converge write is idempotent on retry (keys, inbox rows, ON CONFLICT).
//
// Round trips bound a client that waits for each answer, so a transaction sends without
// waiting whatever it does not need the answer of (libpq pipeline mode): BEGIN,
// Tx::ExecDeferred statements, advisory locks, NOTIFY. They are answered together with
// the next statement that waits (COMMIT at the latest): one round trip for the lot. A
// deferred statement's row-count check runs inside the statement on the server
// (kDeferredChecks), so that its failure aborts the transaction before the COMMIT
// queued behind it. A failure read back from the server for a statement queued before
// COMMIT is definite, even if the connection broke after: the server runs a pipeline in
// order and skips everything after an error. Every statement goes through pipeline mode
// (one that waits is sent behind the queued ones, then a sync); a connection leaves
// pipeline mode after every drain; one that cannot is discarded by Release.
//
// Parsing and planning once per connection: each pooled connection keeps server-side
// prepared statements (statement_cache.h), prepared lazily in the pipeline of their first
// use. A prepared statement gone stale under DDL (26000, or 0A000 "cached plan must not
// change result type") fails the transaction with kAborted and is prepared afresh when
// Transact re-runs fn (Drain).
//
// Parameters are sent as text with type OID 0 (the server infers them from the
// statement), except Blob, which is sent as binary bytea. Results come back as text and
// are converted by column type: integers, floats and numerics, booleans, bytea.
#include "src/store/postgres/postgres_database.h"
#include "src/store/postgres/statement_cache.h"

#include <libpq-fe.h>

#include <poll.h>

#include <algorithm>
#include <cctype>
#include <condition_variable>
#include <optional>
#include <map>
#include <set>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "converge/failpoint.h"
#include "src/core/schema/schema.h"
#include "src/core/store_uri.h"
#include "src/core/thread_name.h"

namespace converge::postgres {
namespace {

constexpr Oid kBool = 16, kBytea = 17, kInt8 = 20, kInt2 = 21, kInt4 = 23, kOid = 26,
              kFloat4 = 700, kFloat8 = 701, kNumeric = 1700;

Status FromResult(const PGresult* res, PGconn* conn, std::string_view what) {
  const char* state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : nullptr;
  std::string msg(what);
  msg += ": ";
  const char* err = res ? PQresultErrorMessage(res) : nullptr;
  msg += (err && *err) ? err : PQerrorMessage(conn);
  while (!msg.empty() && (msg.back() == '\n' || msg.back() == ' ')) msg.pop_back();
  if (state == nullptr || PQstatus(conn) != CONNECTION_OK) return UnavailableError(std::move(msg));
  std::string_view s(state);
  if (s == "23505") return AlreadyExistsError(std::move(msg));
  if (s == "40001" || s == "40P01") return AbortedError(std::move(msg));
  if (s == "25006") return FailedPreconditionError(std::move(msg));
  if (s == "55P03") return Status(StatusCode::kUnavailable, std::move(msg), reason::kLockTimeout);
  if (s == "57014") return UnavailableError(std::move(msg));
  if (s.substr(0, 2) == "08" || s.substr(0, 2) == "57" || s.substr(0, 2) == "58") {
    return UnavailableError(std::move(msg));
  }
  if (s.substr(0, 2) == "53") return ResourceExhaustedError(std::move(msg));
  if (s.substr(0, 2) == "23" || s.substr(0, 2) == "42" || s.substr(0, 2) == "22") {
    return InvalidArgumentError(std::move(msg));
  }
  return InternalError(std::move(msg));
}

Value Decode(const PGresult* res, int row, int col) {
  if (PQgetisnull(res, row, col)) return Value();
  const char* v = PQgetvalue(res, row, col);
  int len = PQgetlength(res, row, col);
  switch (PQftype(res, col)) {
    case kInt2:
    case kInt4:
    case kInt8:
    case kOid:
      return Value(static_cast<int64_t>(std::strtoll(v, nullptr, 10)));
    case kFloat4:
    case kFloat8:
    case kNumeric:
      return Value(std::strtod(v, nullptr));
    case kBool:
      return Value(int64_t{v[0] == 't' ? 1 : 0});
    case kBytea: {
      size_t n = 0;
      unsigned char* raw = PQunescapeBytea(reinterpret_cast<const unsigned char*>(v), &n);
      Blob b{std::string(reinterpret_cast<char*>(raw), n)};
      PQfreemem(raw);
      return Value(std::move(b));
    }
    default:
      return Value(std::string(v, static_cast<size_t>(len)));
  }
}

// retention=partitioned (docs/design/retention.md, "Time-partitioned tables"): the two
// dedupe tables, partitioned by the time their row was created, with a DEFAULT partition
// for rows no range covers (the Sweeper creates the ranges ahead). A primary key must
// contain the partition key, so it cannot by itself keep (scope, key) or (consumer,
// source, event_id) unique across partitions; a BEFORE INSERT trigger does: it takes a
// transaction-level advisory lock on the row's identity, so that claims of one identity
// run one at a time, then looks the identity up in every partition (one index probe
// each) and skips the insert when it is there, as ON CONFLICT DO NOTHING would. Under
// READ COMMITTED the trigger's query takes a fresh snapshot after the lock is granted,
// so a second claimer sees the first one's committed row. The lock keys are the two-int
// form, a space of their own apart from Tx::LockUntilCommit's 64-bit keys. A row moved
// between partitions by an UPDATE of its partition column (an expired key claimed again)
// passes: its old version, deleted by the same statement, is no longer visible.
constexpr std::string_view kPartitionedTables = R"sql(
DO $$ BEGIN
  IF EXISTS (SELECT 1 FROM idempotency_keys) OR EXISTS (SELECT 1 FROM consumer_inbox) THEN
    RAISE EXCEPTION 'retention=partitioned: this store already holds idempotency keys or '
      'inbox rows; only a new store is created partitioned (docs/design/retention.md)';
  END IF;
END $$;
DROP TABLE idempotency_keys;
CREATE TABLE idempotency_keys (
  scope            TEXT    NOT NULL,
  key              TEXT    NOT NULL,
  request_hash     TEXT    NOT NULL,
  status           TEXT    NOT NULL CHECK (status IN ('in_progress', 'completed')),
  recovery_point   TEXT    NOT NULL,
  recovery_data    TEXT    NOT NULL DEFAULT '',
  lease_until       BIGINT NOT NULL,
  fence             BIGINT NOT NULL,
  response_status  INTEGER,
  response_headers TEXT,
  response_body    BYTEA,
  created_at       BIGINT NOT NULL,
  updated_at       BIGINT NOT NULL,
  expires_at       BIGINT NOT NULL,
  PRIMARY KEY (scope, key, created_at)
) PARTITION BY RANGE (created_at);
CREATE TABLE idempotency_keys_default PARTITION OF idempotency_keys DEFAULT;
CREATE INDEX idempotency_keys_expires ON idempotency_keys (expires_at);
CREATE INDEX idempotency_keys_in_progress ON idempotency_keys (lease_until)
  WHERE status = 'in_progress';
CREATE OR REPLACE FUNCTION converge_idempotency_keys_unique() RETURNS trigger
  LANGUAGE plpgsql AS $f$
BEGIN
  PERFORM pg_advisory_xact_lock(7324002, hashtext(NEW.scope || chr(1) || NEW.key));
  IF EXISTS (SELECT 1 FROM idempotency_keys WHERE scope = NEW.scope AND key = NEW.key) THEN
    RETURN NULL;
  END IF;
  RETURN NEW;
END $f$;
CREATE TRIGGER idempotency_keys_unique BEFORE INSERT ON idempotency_keys
  FOR EACH ROW EXECUTE FUNCTION converge_idempotency_keys_unique();
DROP TABLE consumer_inbox;
CREATE TABLE consumer_inbox (
  consumer     TEXT    NOT NULL,
  source       TEXT    NOT NULL,
  event_id     TEXT    NOT NULL,
  processed_at BIGINT NOT NULL,
  expires_at   BIGINT NOT NULL,
  outcome      TEXT    NOT NULL DEFAULT 'applied'
               CHECK (outcome IN ('applied', 'dead_lettered')),
  PRIMARY KEY (consumer, source, event_id, processed_at)
) PARTITION BY RANGE (processed_at);
CREATE TABLE consumer_inbox_default PARTITION OF consumer_inbox DEFAULT;
CREATE INDEX consumer_inbox_expires ON consumer_inbox (expires_at);
CREATE OR REPLACE FUNCTION converge_consumer_inbox_unique() RETURNS trigger
  LANGUAGE plpgsql AS $f$
BEGIN
  PERFORM pg_advisory_xact_lock(
    7324003, hashtext(NEW.consumer || chr(1) || NEW.source || chr(1) || NEW.event_id));
  IF EXISTS (SELECT 1 FROM consumer_inbox WHERE consumer = NEW.consumer
             AND source = NEW.source AND event_id = NEW.event_id) THEN
    RETURN NULL;
  END IF;
  RETURN NEW;
END $f$;
CREATE TRIGGER consumer_inbox_unique BEFORE INSERT ON consumer_inbox
  FOR EACH ROW EXECUTE FUNCTION converge_consumer_inbox_unique();
)sql";

// retention=partitioned, the outbox (docs/design/retention.md): outbox_events partitioned
// by created_at like the two dedupe tables above, so that published events past their
// retention go with their whole partition. A migration of its own, later than the others:
// it converts a store that was created partitioned before it, moving its events into the
// DEFAULT partition (and keeping their sequence), and does nothing to a store whose keys
// are a plain table, whatever the URI says (the store's shape decides, DetectRetention).
// The table's UNIQUE (source, event_id) becomes a trigger, as the dedupe tables' keys
// did, which raises a unique violation: a second copy of an event fails its transaction
// with kAlreadyExists (Outbox::Enqueue) in any partition.
constexpr std::string_view kPartitionedOutbox = R"sql(
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_partitioned_table
                 WHERE partrelid = to_regclass('idempotency_keys'))
     OR EXISTS (SELECT 1 FROM pg_partitioned_table
                WHERE partrelid = to_regclass('outbox_events')) THEN
    RETURN;  -- a plain store, or one converted already (the migrations run again)
  END IF;
  ALTER TABLE outbox_events RENAME TO outbox_events_plain;
  ALTER TABLE outbox_events_plain RENAME CONSTRAINT outbox_events_pkey
    TO outbox_events_plain_pkey;
  ALTER TABLE outbox_events_plain RENAME CONSTRAINT outbox_events_source_event_id_key
    TO outbox_events_plain_source_event_id_key;
  ALTER INDEX outbox_unpublished RENAME TO outbox_unpublished_plain;
  ALTER INDEX outbox_published RENAME TO outbox_published_plain;
  ALTER INDEX outbox_unpublished_partition RENAME TO outbox_unpublished_partition_plain;
  CREATE TABLE outbox_events (
    seq              BIGINT  NOT NULL DEFAULT nextval('outbox_events_seq_seq'),
    event_id         TEXT    NOT NULL,
    source           TEXT    NOT NULL,
    aggregate_type   TEXT    NOT NULL,
    aggregate_id     TEXT    NOT NULL,
    type             TEXT    NOT NULL,
    payload          TEXT    NOT NULL,
    headers          TEXT    NOT NULL DEFAULT '{}',
    created_at       BIGINT  NOT NULL,
    published_at     BIGINT,
    publish_attempts INTEGER NOT NULL DEFAULT 0,
    last_error       TEXT,
    partition_no     INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (seq, created_at)
  ) PARTITION BY RANGE (created_at);
  CREATE TABLE outbox_events_default PARTITION OF outbox_events DEFAULT;
  -- The trigger's lookup; named as the UNIQUE constraint it stands for.
  CREATE INDEX outbox_events_source_event_id_key ON outbox_events (source, event_id);
  CREATE INDEX outbox_unpublished ON outbox_events (seq) WHERE published_at IS NULL;
  CREATE INDEX outbox_published ON outbox_events (published_at)
    WHERE published_at IS NOT NULL;
  CREATE INDEX outbox_unpublished_partition ON outbox_events (partition_no, seq)
    WHERE published_at IS NULL;
  CREATE OR REPLACE FUNCTION converge_outbox_events_unique() RETURNS trigger
    LANGUAGE plpgsql AS $f$
  BEGIN
    PERFORM pg_advisory_xact_lock(7324004, hashtext(NEW.source || chr(1) || NEW.event_id));
    IF EXISTS (SELECT 1 FROM outbox_events WHERE source = NEW.source
               AND event_id = NEW.event_id) THEN
      RAISE unique_violation USING MESSAGE = 'duplicate key value violates unique ' ||
        'constraint "outbox_events_source_event_id_key"', DETAIL = 'Key (source, ' ||
        'event_id)=(' || NEW.source || ', ' || NEW.event_id || ') already exists.';
    END IF;
    RETURN NEW;
  END $f$;
  -- The copy before the trigger: the plain table's UNIQUE constraint made its events
  -- unique, and the trigger's advisory lock per row would fill the server's lock table
  -- ("out of shared memory") past a few thousand events. No other transaction sees the
  -- new table before this one commits.
  INSERT INTO outbox_events SELECT * FROM outbox_events_plain;
  CREATE TRIGGER outbox_events_unique BEFORE INSERT ON outbox_events
    FOR EACH ROW EXECUTE FUNCTION converge_outbox_events_unique();
  ALTER SEQUENCE outbox_events_seq_seq OWNED BY outbox_events.seq;
  DROP TABLE outbox_events_plain;
END $$;
)sql";

// The row-count check of a deferred statement (Tx::ExecDeferred), made by the server in
// the statement itself: PgTx wraps "WITH d AS (<stmt> RETURNING 1) SELECT
// converge_expect_changes(count(*), n) FROM d". Raising an error aborts the transaction,
// so the COMMIT pipelined behind it cannot commit; PgTx maps kDeferredCheckFailed back to
// the check's own Status.
constexpr std::string_view kDeferredCheckFailed = "CV001";
constexpr std::string_view kDeferredChecks = R"sql(
CREATE OR REPLACE FUNCTION converge_expect_changes(changed BIGINT, expected BIGINT)
  RETURNS BIGINT LANGUAGE plpgsql AS $f$
BEGIN
  IF changed <> expected THEN
    RAISE EXCEPTION 'converge: a deferred statement changed % rows, % expected',
      changed, expected USING ERRCODE = 'CV001';
  END IF;
  RETURN changed;
END $f$;
)sql";

// The time-partitioned tables and their partition columns (TimePartitions).
std::optional<std::string_view> PartitionColumn(std::string_view table) {
  if (table == "idempotency_keys") return "created_at";
  if (table == "consumer_inbox") return "processed_at";
  if (table == "outbox_events") return "created_at";
  return std::nullopt;
}

// PostgreSQL's words for what differs between backends (dialect.h, src/core/schema/).
class PgDialect final : public schema::SchemaDialect {
 public:
  explicit PgDialect(bool partitioned = false) : partitioned_(partitioned) {}
  std::string_view PartitionedRetentionTables() const override {
    return partitioned_ ? kPartitionedTables : "";
  }
  std::string_view TypeName(ColumnType type) const override {
    switch (type) {
      case ColumnType::kBigint:
        return "BIGINT";
      case ColumnType::kDouble:
        return "DOUBLE PRECISION";
      case ColumnType::kBlob:
        return "BYTEA";
    }
    return "";
  }
  std::string_view AutoIncrementPrimaryKey() const override { return "BIGSERIAL PRIMARY KEY"; }
  std::string_view ForUpdateSkipLocked() const override { return " FOR UPDATE SKIP LOCKED"; }
  std::string_view WithoutRowid() const override { return ""; }
  std::string_view NextFenceExpression() const override { return "nextval('converge_fences')"; }
  std::string LockAgainstReaders(std::string_view table) const override {
    return "LOCK TABLE " + std::string(table) + " IN ACCESS EXCLUSIVE MODE";
  }
  std::string_view DeferredCheckFunctions() const override { return kDeferredChecks; }
  std::string_view PartitionedOutbox() const override { return kPartitionedOutbox; }
  // A SEQUENCE: never rolled back, never hands out a value twice, and never makes
  // concurrent transactions wait for each other (a counter row would).
  std::string_view CreateFenceSequence() const override {
    return "CREATE SEQUENCE converge_fences;\n"
           "SELECT setval('converge_fences', "
           "coalesce((SELECT max(fence) FROM idempotency_keys), 0) + 1,\n"
           "              false);";
  }

 private:
  const bool partitioned_;
};

const PgDialect& TheDialect(bool partitioned = false) {
  static const PgDialect kDialect(false), kPartitioned(true);
  return partitioned ? kPartitioned : kDialect;
}

// TimePartitions over one transaction (database.h). Partitions are named
// "<table>_p<from>"; their bounds are read back from the catalog. Identifiers are built
// only from the table names PartitionColumn knows and from integers.
class PgTimePartitions final : public TimePartitions {
 public:
  explicit PgTimePartitions(Tx& tx) : tx_(tx) {}

  Result<std::vector<TimePartition>> List(std::string_view table) override {
    CONVERGE_RETURN_IF_ERROR(Check(table));
    CONVERGE_ASSIGN_OR_RETURN(
        Rows rows, tx_.Query("SELECT c.relname::text, pg_get_expr(c.relpartbound, c.oid) "
                             "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                             "WHERE i.inhparent = to_regclass($1)",
                             std::string(table)));
    std::vector<TimePartition> out;
    for (const Row& r : rows) {
      // "FOR VALUES FROM ('1764374400000') TO ('1764460800000')", or "DEFAULT".
      const std::string bound = r.Text(1);
      std::vector<int64_t> n;
      for (size_t i = 0; i < bound.size();) {
        const bool minus = bound[i] == '-' && i + 1 < bound.size() && std::isdigit(
            static_cast<unsigned char>(bound[i + 1]));
        if (!minus && !std::isdigit(static_cast<unsigned char>(bound[i]))) {
          ++i;
          continue;
        }
        size_t end = i + 1;
        while (end < bound.size() && std::isdigit(static_cast<unsigned char>(bound[end]))) ++end;
        n.push_back(std::strtoll(bound.c_str() + i, nullptr, 10));
        i = end;
      }
      if (n.size() == 2) out.push_back({r.Text(0), n[0], n[1]});
    }
    std::sort(out.begin(), out.end(),
              [](const TimePartition& a, const TimePartition& b) { return a.from < b.from; });
    return out;
  }

  Result<std::string> DefaultPartition(std::string_view table) override {
    CONVERGE_RETURN_IF_ERROR(Check(table));
    return std::string(table) + "_default";
  }

  Result<bool> Create(std::string_view table, int64_t from, int64_t to) override {
    CONVERGE_RETURN_IF_ERROR(Check(table));
    if (from >= to) return tl::unexpected(InvalidArgumentError("empty partition range"));
    CONVERGE_RETURN_IF_ERROR(LockWhole(table));
    const std::string t(table), col(*PartitionColumn(table));
    CONVERGE_ASSIGN_OR_RETURN(
        Rows stray, tx_.Query("SELECT 1 FROM " + t + "_default WHERE " + col + " >= $1 AND " +
                              col + " < $2 LIMIT 1", from, to));
    if (!stray.empty()) return false;
    CONVERGE_RETURN_IF_ERROR(StatusOf(tx_.Exec(
        "CREATE TABLE IF NOT EXISTS \"" + t + "_p" + std::to_string(from) + "\" PARTITION OF " +
        t + " FOR VALUES FROM (" + std::to_string(from) + ") TO (" + std::to_string(to) + ")")));
    return true;
  }

  Result<bool> DropUnless(std::string_view table, const TimePartition& partition,
                          std::string_view keep, std::span<const Value> params) override {
    CONVERGE_RETURN_IF_ERROR(Check(table));
    const std::string name = std::string(table) + "_p" + std::to_string(partition.from);
    if (partition.name != name) {
      return tl::unexpected(InvalidArgumentError("not a partition of " + std::string(table) +
                                                 ": " + partition.name));
    }
    CONVERGE_RETURN_IF_ERROR(LockWhole(table));
    CONVERGE_ASSIGN_OR_RETURN(
        Rows kept, tx_.QueryParams("SELECT 1 FROM ONLY \"" + name + "\" WHERE (" +
                                   std::string(keep) + ") LIMIT 1", params));
    if (!kept.empty()) return false;
    CONVERGE_RETURN_IF_ERROR(StatusOf(tx_.Exec("DROP TABLE \"" + name + "\"")));
    return true;
  }

 private:
  static Status Check(std::string_view table) {
    if (PartitionColumn(table)) return OkStatus();
    return InvalidArgumentError("not a time-partitioned table: " + std::string(table));
  }
  // Every other transaction on `table` waits for this one to end, and this one waits at
  // most 1 s for them (55P03 is kUnavailable): while an ACCESS EXCLUSIVE request waits,
  // the writers that come after it queue behind it.
  Status LockWhole(std::string_view table) {
    CONVERGE_RETURN_IF_ERROR(StatusOf(tx_.Exec("SET LOCAL lock_timeout = '1s'")));
    return StatusOf(
        tx_.Exec("LOCK TABLE " + std::string(table) + " IN ACCESS EXCLUSIVE MODE"));
  }

  Tx& tx_;
};

class PgTx : public Tx {
 public:
  // `statements`: the connection's prepared statements; nullptr runs every statement
  // unnamed (the migration runner, whose DDL changes what plans depend on).
  explicit PgTx(PGconn* conn, StatementCache* statements = nullptr, bool notify = false,
                bool partitioned = false)
      : conn_(conn),
        statements_(statements),
        notify_(notify),
        partitions_(partitioned ? &own_partitions_ : nullptr) {}
  TimePartitions* time_partitions() override { return partitions_; }
  using Tx::TakeCommitHooks;  // for PgDatabase, once COMMIT succeeded

  // NOTIFY is transactional: delivered at commit, never after a rollback, and identical
  // notifications of one transaction collapse into one.
  Status Notify(std::string_view channel) override {
    if (!notify_) return OkStatus();
    return ExecDeferred(DeferredCheck::None(), "SELECT pg_notify($1, '')", channel);
  }

  // Pipeline mode (Method above): the statement is sent now, its answer read by the next
  // call that waits for the server (Drain).
  Status ExecDeferredParams(std::string_view sql, std::span<const Value> params,
                            const DeferredCheck& check) override {
    Params p;
    CONVERGE_RETURN_IF_ERROR(Convert(params, &p));
    std::string stmt(sql);
    if (check.rows >= 0) {
      stmt = "WITH converge_deferred AS (" + stmt +
             " RETURNING 1) SELECT converge_expect_changes(count(*), " +
             std::to_string(check.rows) + ") FROM converge_deferred";
    }
    return Send(stmt, p, Sent::Kind::kDeferred, check);
  }

  // Starts the transaction as a deferred statement: BEGIN travels with the first
  // statement that waits for an answer.
  Status Begin(bool read_only) {
    return ExecDeferredParams(
        read_only ? "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY" : "BEGIN", {},
        DeferredCheck::None());
  }

  // Whether the last failure returned was a deferred statement's, reported by the server:
  // it ran, failed, and nothing queued behind it ran (COMMIT included), even if the
  // connection broke right after (Commit).
  bool last_failure_was_deferred() const { return last_failure_was_deferred_; }

  Result<int64_t> ExecParams(std::string_view sql, std::span<const Value> params) override {
    int64_t changed = 0;
    CONVERGE_RETURN_IF_ERROR(Run(sql, params, nullptr, &changed));
    return changed;
  }
  Result<Rows> QueryParams(std::string_view sql, std::span<const Value> params) override {
    Rows rows;
    CONVERGE_RETURN_IF_ERROR(Run(sql, params, &rows, nullptr));
    return rows;
  }
  const Dialect& dialect() const override { return TheDialect(); }

  // A SEQUENCE is never rolled back and never hands out a value twice.
  Result<int64_t> NextFence() override {
    CONVERGE_ASSIGN_OR_RETURN(Rows rows, QueryParams("SELECT nextval('converge_fences')", {}));
    if (rows.empty()) return tl::unexpected(InternalError("nextval returned no row"));
    return rows[0].Int(0);
  }

  Status LockUntilCommit(std::string_view key) override {
    uint64_t h = 14695981039346656037ull;  // FNV-1a, 64 bits
    for (unsigned char c : key) {
      h ^= c;
      h *= 1099511628211ull;
    }
    return ExecDeferred(DeferredCheck::None(), "SELECT pg_advisory_xact_lock($1)",
                        static_cast<int64_t>(h));
  }

  // Text (or binary bytea) parameters for libpq. `values` points into `text` (numbers, and
  // borrowed text made NUL-terminated) or at the caller's own Values: valid for the call
  // that converted them, and libpq copies them as it sends.
  struct Params {
    std::vector<std::string> text;
    std::vector<const char*> values;
    std::vector<int> lengths, formats;
    std::vector<Oid> types;
  };

  static Status NulInText() {
    return InvalidArgumentError("text parameters cannot contain NUL bytes; use Blob");
  }

  // A binary bytea parameter; libpq sends `bytes` as they are, `out` keeps no copy.
  static void Bytea(std::string_view bytes, Params* out, size_t i) {
    out->values[i] = bytes.data() != nullptr ? bytes.data() : "";  // not NULL when empty
    out->lengths[i] = static_cast<int>(bytes.size());
    out->formats[i] = 1;
    out->types[i] = kBytea;
  }

  static Status Convert(std::span<const Value> params, Params* out) {
    const size_t n = params.size();
    out->text.assign(n, {});
    out->values.assign(n, nullptr);
    out->lengths.assign(n, 0);
    out->formats.assign(n, 0);
    out->types.assign(n, 0);
    for (size_t i = 0; i < n; ++i) {
      const Value& v = params[i];
      if (auto p = std::get_if<int64_t>(&v)) {
        out->text[i] = std::to_string(*p);
        out->values[i] = out->text[i].c_str();
      } else if (auto p = std::get_if<double>(&v)) {
        char buf[40];
        std::snprintf(buf, sizeof buf, "%.17g", *p);
        out->text[i] = buf;
        out->values[i] = out->text[i].c_str();
      } else if (auto p = std::get_if<std::string>(&v)) {
        if (p->find('\0') != std::string::npos) return NulInText();
        out->values[i] = p->c_str();
      } else if (auto p = std::get_if<TextRef>(&v)) {
        // libpq reads a text parameter up to its NUL: a view needs a terminated copy.
        if (p->text.find('\0') != std::string_view::npos) return NulInText();
        out->text[i] = p->text;
        out->values[i] = out->text[i].c_str();
      } else if (auto p = std::get_if<Blob>(&v)) {
        Bytea(p->bytes, out, i);
      } else if (auto p = std::get_if<BlobRef>(&v)) {
        Bytea(p->bytes, out, i);
      }
    }
    return OkStatus();
  }

  // Rows replace what `rows` held (a statement that waits is the last of its pipeline);
  // changed rows add up (ExecMany).
  static void Collect(PGresult* res, Rows* rows, int64_t* changed) {
    if (rows != nullptr) {
      int nrows = PQntuples(res), ncols = PQnfields(res);
      rows->clear();
      rows->reserve(static_cast<size_t>(nrows));
      for (int r = 0; r < nrows; ++r) {
        std::vector<Value> vals;
        vals.reserve(static_cast<size_t>(ncols));
        for (int c = 0; c < ncols; ++c) vals.push_back(Decode(res, r, c));
        rows->emplace_back(std::move(vals));
      }
    }
    if (changed != nullptr) {
      const char* t = PQcmdTuples(res);
      *changed += (t && *t) ? std::strtoll(t, nullptr, 10) : 0;
    }
  }

  // A statement that waits: sent behind the deferred ones, answered with them (Drain).
  Status Run(std::string_view sql, std::span<const Value> params, Rows* rows, int64_t* changed) {
    Params p;
    CONVERGE_RETURN_IF_ERROR(Convert(params, &p));
    const Status sent = Send(std::string(sql), p, Sent::Kind::kWait, DeferredCheck::None());
    const Status drained = Drain(rows, changed);
    return sent.ok() ? drained : sent;
  }

  // Pipeline mode: every statement sent, one sync, then every result read. One round trip
  // for the lot instead of one per statement.
  Result<int64_t> ExecMany(std::string_view sql,
                           std::span<const std::vector<Value>> param_sets) override {
    if (param_sets.size() < 2) return Tx::ExecMany(sql, param_sets);
    const std::string stmt(sql);
    Status sent;
    for (const auto& params : param_sets) {
      Params p;
      sent = Convert(params, &p);
      if (sent.ok()) sent = Send(stmt, p, Sent::Kind::kWait, DeferredCheck::None());
      if (!sent.ok()) break;
    }
    int64_t total = 0;
    const Status drained = Drain(nullptr, &total);
    if (!sent.ok()) return tl::unexpected(sent);
    if (!drained.ok()) return tl::unexpected(drained);
    return total;
  }

  Status Simple(const char* sql) { return StatusOf(ExecParams(sql, {})); }

 private:
  // What the pipeline holds, in the order sent; each gets one answer from the server.
  struct Sent {
    enum class Kind {
      kPrepare,     // the prepare of a statement's first use on this connection
      kDeallocate,  // a statement evicted from the cache
      kDeferred,    // Tx::ExecDeferred's: its `check` decides
      kWait,        // a statement whose caller waits for its rows or count
    };
    Kind kind;
    DeferredCheck check;
    std::string key, name;  // the cache's key and the prepared statement's name, if any
    bool confirmed = false; // named, and prepared in an earlier pipeline
    bool deferred = false;  // a kPrepare's statement is kDeferred
  };

  // Sends one statement in pipeline mode, named from the connection's statement cache
  // when it is worth preparing: a first use on this connection sends its prepare first,
  // in the same pipeline. The answer is read by Drain.
  Status Send(const std::string& stmt, const Params& p, Sent::Kind kind,
              const DeferredCheck& check) {
    if (PQpipelineStatus(conn_) == PQ_PIPELINE_OFF && PQenterPipelineMode(conn_) != 1) {
      return UnavailableError(std::string("postgres: cannot enter pipeline mode: ") +
                              PQerrorMessage(conn_));
    }
    const int n = static_cast<int>(p.values.size());
    std::optional<StatementCache::Use> use;
    std::string key;
    if (statements_ != nullptr && StatementCache::Preparable(stmt)) {
      // The declared parameter types are part of what the server prepared: a statement
      // sent once with a Blob (bytea) and once with text is two statements.
      key.reserve(stmt.size() + p.types.size() + 1);
      key = stmt;
      key += '\0';
      for (Oid t : p.types) key += t == kBytea ? 'b' : '-';
      use = statements_->Lookup(key);
    } else if (statements_ != nullptr && StatementCache::Drops(stmt)) {
      // DISCARD ALL or DEALLOCATE: whatever this session prepared is gone once it ran,
      // and the statements sent behind it must not name any of it.
      statements_->Clear();
    }
    auto failed = [&] {
      if (use && use->prepare) statements_->Forget(key, use->name);
      return UnavailableError(std::string("postgres pipeline: ") + PQerrorMessage(conn_));
    };
    if (use && use->evicted) {
      const std::string sql = "DEALLOCATE " + *use->evicted;
      if (PQsendQueryParams(conn_, sql.c_str(), 0, nullptr, nullptr, nullptr, nullptr, 0) !=
          1) {
        return failed();
      }
      sent_.push_back({Sent::Kind::kDeallocate, {}, {}, *use->evicted});
    }
    if (use && use->prepare) {
      if (PQsendPrepare(conn_, use->name.c_str(), stmt.c_str(), n, p.types.data()) != 1) {
        return failed();
      }
      sent_.push_back({Sent::Kind::kPrepare, {}, key, use->name, false,
                       kind == Sent::Kind::kDeferred});
    }
    const int ok =
        use ? PQsendQueryPrepared(conn_, use->name.c_str(), n, p.values.data(), p.lengths.data(),
                                  p.formats.data(), 0)
            : PQsendQueryParams(conn_, stmt.c_str(), n, p.types.data(), p.values.data(),
                                p.lengths.data(), p.formats.data(), 0);
    if (ok != 1) return failed();
    sent_.push_back({kind, check, use ? key : std::string(), use ? use->name : std::string(),
                     use && use->confirmed});
    return OkStatus();
  }

  // Sends a sync behind everything sent, reads every answer and leaves pipeline mode.
  // Returns the first failure: a deferred statement's own Status (its check's `otherwise`
  // when the server raised kDeferredCheckFailed), or a waiting statement's. Statements
  // behind a failure do not run (the server skips the rest of a pipeline after an error).
  // The waiting statements' rows go to rows/changed.
  //
  // A prepared statement the server no longer has as it was prepared (dropped behind the
  // cache's back: 26000; or a cached plan whose result type a migration changed: 0A000)
  // fails the transaction with kAborted, so that Transact runs fn again, preparing it
  // afresh: nothing ran after the failure, so nothing can be reported committed. Only a
  // statement prepared in an earlier pipeline is taken for stale: a fresh one's 0A000 is
  // the statement's own error, and stays what it is.
  Status Drain(Rows* rows, int64_t* changed) {
    if (PQpipelineStatus(conn_) == PQ_PIPELINE_OFF) return OkStatus();
    std::vector<Sent> items = std::move(sent_);
    sent_.clear();
    last_failure_was_deferred_ = false;
    const size_t n = items.size();
    Status first;
    const bool synced = PQpipelineSync(conn_) == 1;
    if (!synced) {
      first = UnavailableError(std::string("postgres pipeline sync: ") + PQerrorMessage(conn_));
    }
    // Each item's result, followed by a null; then the sync's.
    size_t idx = 0;
    for (;;) {
      PGresult* res = PQgetResult(conn_);
      if (res == nullptr) {
        if (PQstatus(conn_) != CONNECTION_OK) {
          if (first.ok()) first = UnavailableError("postgres pipeline: connection lost");
          break;
        }
        if (++idx > n && !synced) break;  // no sync is coming
        continue;
      }
      const ExecStatusType st = PQresultStatus(res);
      if (st == PGRES_PIPELINE_SYNC) {
        PQclear(res);
        break;
      }
      // Past the last item only the sync's own failure can come (the connection broke
      // after the last answer): that answer stands.
      if (idx < n) Settle(items[idx], res, &first, rows, changed);
      PQclear(res);
    }
    // Prepares never answered (the connection broke) are not known to the server.
    for (size_t i = idx; i < n; ++i) {
      if (items[i].kind == Sent::Kind::kPrepare) statements_->Forget(items[i].key, items[i].name);
    }
    if (PQexitPipelineMode(conn_) != 1 && first.ok()) {
      first = UnavailableError(std::string("postgres pipeline: ") + PQerrorMessage(conn_));
    }
    return first;
  }

  // One answer of Drain's, for `item`.
  void Settle(const Sent& item, PGresult* res, Status* first, Rows* rows, int64_t* changed) {
    const ExecStatusType st = PQresultStatus(res);
    const bool ok = st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK;
    if (item.kind == Sent::Kind::kPrepare) {
      if (ok) {
        statements_->Prepared(item.key, item.name);
        return;
      }
      statements_->Forget(item.key, item.name);  // failed, or skipped behind a failure
      if (st == PGRES_PIPELINE_ABORTED || !first->ok()) return;
      // The statement's own error (bad SQL, a missing table): what it gives unprepared.
      *first = FromResult(res, conn_, "postgres");
      last_failure_was_deferred_ =
          item.deferred && PQresultErrorField(res, PG_DIAG_SQLSTATE) != nullptr;
      return;
    }
    if (!first->ok()) return;
    if (ok) {
      if (item.kind == Sent::Kind::kWait) Collect(res, rows, changed);
      return;
    }
    if (st == PGRES_PIPELINE_ABORTED) {
      *first = InternalError("postgres pipeline aborted without an error");
      return;
    }
    const char* state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
    const std::string_view s = state != nullptr ? state : "";
    last_failure_was_deferred_ = item.kind != Sent::Kind::kWait && state != nullptr;
    if ((item.confirmed && (s == "0A000" || s == "26000")) ||
        (item.kind == Sent::Kind::kDeallocate && s == "26000")) {
      if (s == "26000") {
        statements_->Clear();
      } else {
        statements_->Forget(item.key, item.name);
      }
      std::string why = PQresultErrorMessage(res);
      while (!why.empty() && (why.back() == '\n' || why.back() == ' ')) why.pop_back();
      *first = AbortedError("postgres: a prepared statement went stale (" + why +
                            "); the transaction runs again and prepares it afresh");
      return;
    }
    *first = item.kind == Sent::Kind::kDeferred && s == kDeferredCheckFailed
                 ? item.check.otherwise
                 : FromResult(res, conn_, "postgres");
  }

  PGconn* conn_;
  StatementCache* statements_;
  bool notify_;
  // Everything sent in pipeline mode and not yet answered, in order.
  std::vector<Sent> sent_;
  bool last_failure_was_deferred_ = false;
  PgTimePartitions own_partitions_{*this};
  TimePartitions* partitions_;  // &own_partitions_ when the store is time-partitioned
};

class PgDatabase;

// The transaction a thread is inside, per database: nested Transact joins it.
thread_local std::unordered_map<const PgDatabase*, PgTx*> t_current;

// A pooled connection and the statements the server keeps prepared for it: both end
// together, so a connection that broke, was reset or was discarded takes its cache along.
struct Conn {
  Conn(PGconn* c, size_t statement_cache) : pg(c), statements(statement_cache) {}
  Conn(const Conn&) = delete;
  Conn& operator=(const Conn&) = delete;
  ~Conn() { PQfinish(pg); }
  PGconn* const pg;
  StatementCache statements;
};

// Everything PgDatabase is opened with: converge's URI parameters (defaults as in
// database.h) and the generic DatabaseOptions.
struct Options : Settings {
  int max_attempts = 8;
};

class PgDatabase : public Database {
 public:
  // `uri`: for libpq, converge's own parameters taken out.
  explicit PgDatabase(Options options) : uri_(options.libpq_uri), options_(std::move(options)) {}

  ~PgDatabase() override {
    {
      std::lock_guard<std::mutex> l(listen_mu_);
      listening_ = false;
    }
    if (listener_.joinable()) listener_.join();
  }

  int64_t AddListener(const std::string& channel, std::function<void()> callback) override {
    if (!options_.notify) return 0;
    std::lock_guard<std::mutex> l(listen_mu_);
    const int64_t id = ++next_listener_;
    listeners_[id] = {channel, std::move(callback)};
    if (!listening_) {
      listening_ = true;
      listener_ = std::thread([this] {
        converge::internal::NameThisThread("cv-pg-listen");
        ListenLoop();
      });
    }
    return id;
  }

  void RemoveListener(int64_t id) override {
    std::lock_guard<std::mutex> l(listen_mu_);  // also waits out a running callback
    listeners_.erase(id);
  }

  Status Init() {
    CONVERGE_ASSIGN_OR_RETURN(std::unique_ptr<Conn> c, Acquire());  // counted in the pool
    Status st = Migrate(c->pg);
    if (st.ok()) st = DetectRetention(c->pg);
    Release(std::move(c));
    return st;
  }

  // The store's own shape decides whether it is time-partitioned: a URI that does not
  // say so still gets its partitions maintained; one that says the opposite is refused
  // (the migration created the shape it asked for only if the store was new).
  Status DetectRetention(PGconn* c) {
    PgTx tx(c);
    CONVERGE_ASSIGN_OR_RETURN(
        Rows rows, tx.Query("SELECT count(*) FROM pg_partitioned_table "
                            "WHERE partrelid = to_regclass('idempotency_keys')"));
    partitioned_ = !rows.empty() && rows[0].Int(0) > 0;
    if (options_.partitioned && *options_.partitioned != partitioned_) {
      return FailedPreconditionError(
          std::string("postgresql URI says retention=") +
          (*options_.partitioned ? "partitioned" : "delete") + " but the store was created " +
          (partitioned_ ? "time-partitioned" : "with plain tables") +
          "; converting a store is a manual step (docs/design/retention.md)");
    }
    return OkStatus();
  }

  Status Transact(const TxFn& fn) override { return Run(fn, /*read_only=*/false); }
  Status Read(const TxFn& fn) override { return Run(fn, /*read_only=*/true); }
  DatabaseStats stats() const override {
    std::lock_guard<std::mutex> l(mu_);
    return stats_;
  }

 private:
  Result<std::unique_ptr<Conn>> Connect() {
    PGconn* c = PQconnectdb(uri_.c_str());
    if (PQstatus(c) != CONNECTION_OK) {
      std::string msg = PQerrorMessage(c);
      PQfinish(c);
      while (!msg.empty() && msg.back() == '\n') msg.pop_back();
      return tl::unexpected(UnavailableError("cannot connect to PostgreSQL: " + msg));
    }
    // lock_timeout bounds every lock wait: a stuck transaction makes the ones queued
    // behind it fail with kLockTimeout instead of holding pooled connections until the
    // pool is gone (docs/design/postgresql.md).
    const std::string setup =
        "SET application_name = 'converge'; SET client_min_messages = warning; "
        "SET lock_timeout = " + std::to_string(options_.lock_timeout_ms);
    PGresult* r = PQexec(c, setup.c_str());
    const bool ok = PQresultStatus(r) == PGRES_COMMAND_OK;
    PQclear(r);
    if (!ok) {
      std::string msg = PQerrorMessage(c);
      PQfinish(c);
      while (!msg.empty() && msg.back() == '\n') msg.pop_back();
      return tl::unexpected(UnavailableError("cannot set up a PostgreSQL connection: " + msg));
    }
    return std::make_unique<Conn>(c, options_.statement_cache);
  }

  // A pooled connection, reset if it broke.
  Result<std::unique_ptr<Conn>> Acquire() {
    std::unique_ptr<Conn> c;
    {
      std::unique_lock<std::mutex> l(mu_);
      pool_cv_.wait(l, [&] { return !idle_.empty() || open_ < options_.pool_size; });
      if (!idle_.empty()) {
        c = std::move(idle_.back());
        idle_.pop_back();
      } else {
        ++open_;
      }
    }
    if (c != nullptr && PQstatus(c->pg) == CONNECTION_OK) return c;
    c.reset();  // and its statements: a new connection prepares afresh
    auto fresh = Connect();
    if (!fresh) {
      std::lock_guard<std::mutex> l(mu_);
      --open_;
      pool_cv_.notify_one();
    }
    return fresh;
  }

  void Release(std::unique_ptr<Conn> c) {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (PQstatus(c->pg) == CONNECTION_OK && PQtransactionStatus(c->pg) == PQTRANS_IDLE &&
          PQpipelineStatus(c->pg) == PQ_PIPELINE_OFF) {
        idle_.push_back(std::move(c));
      } else {
        c.reset();
        --open_;
      }
    }
    pool_cv_.notify_one();
  }

  Status Run(const TxFn& fn, bool read_only) {
    auto it = t_current.find(this);
    if (it != t_current.end() && it->second != nullptr) return it->second->Savepoint(fn);
    Status st;
    for (int attempt = 1; attempt <= options_.max_attempts; ++attempt) {
      st = RunOnce(fn, read_only);
      if (st.code() != StatusCode::kAborted) break;
    }
    if (!read_only) {
      std::lock_guard<std::mutex> l(mu_);
      ++stats_.transactions;
    }
    return st;
  }

  // A dedicated connection LISTENs on every channel that has listeners and calls them on
  // each notification. Right after it starts listening on a channel (first time, or after
  // a reconnect) it calls that channel's listeners once, for whatever committed before
  // LISTEN took effect (polling remains the safety net either way).
  void ListenLoop() {
    PGconn* conn = nullptr;
    std::set<std::string> listened;
    for (;;) {
      std::vector<std::string> wanted;
      {
        std::lock_guard<std::mutex> l(listen_mu_);
        if (!listening_) break;
        for (const auto& [id, entry] : listeners_) wanted.push_back(entry.first);
      }
      if (conn == nullptr || PQstatus(conn) != CONNECTION_OK) {
        if (conn != nullptr) PQfinish(conn);
        conn = PQconnectdb(uri_.c_str());
        listened.clear();
        if (PQstatus(conn) != CONNECTION_OK) {
          std::this_thread::sleep_for(std::chrono::milliseconds(500));
          continue;
        }
      }
      for (const std::string& ch : wanted) {
        if (listened.count(ch)) continue;
        char* ident = PQescapeIdentifier(conn, ch.data(), ch.size());
        PGresult* r = PQexec(conn, ("LISTEN " + std::string(ident ? ident : "")).c_str());
        if (ident) PQfreemem(ident);
        if (PQresultStatus(r) == PGRES_COMMAND_OK) {
          listened.insert(ch);
          // Whatever committed before LISTEN took effect was not notified: wake once.
          Fire(ch);
        }
        PQclear(r);
      }
      pollfd pfd{PQsocket(conn), POLLIN, 0};
      if (poll(&pfd, 1, 200) > 0 && PQconsumeInput(conn) == 0) continue;  // reconnect
      while (PGnotify* n = PQnotifies(conn)) {
        Fire(n->relname);
        PQfreemem(n);
      }
    }
    if (conn != nullptr) PQfinish(conn);
  }

  void Fire(const std::string& channel) {
    std::lock_guard<std::mutex> l(listen_mu_);
    for (auto& [id, entry] : listeners_) {
      if (channel.empty() || entry.first == channel) entry.second();
    }
  }

  // Sends COMMIT and says what its failure means. A COMMIT the server answered is
  // definite: it committed, or it failed and rolled back with the server's code (a
  // serialization failure stays kAborted, a deferred constraint kAlreadyExists...). A
  // COMMIT whose connection broke before the answer arrived may have committed or not:
  // kUnavailable with reason kCommitOutcomeUnknown, which callers must not mistake for
  // "nothing happened" (database.h). A connection already broken before COMMIT was sent
  // cannot have committed: plain kUnavailable.
  Status Commit(PgTx& tx, PGconn* c, bool read_only) {
    if (PQstatus(c) != CONNECTION_OK) {
      return UnavailableError(std::string("postgres: connection lost before COMMIT: ") +
                              PQerrorMessage(c));
    }
    // COMMIT carries the deferred statements still unanswered (one round trip for all);
    // a failure of one of them, reported by the server, means COMMIT did not run.
    Status st = tx.Simple("COMMIT");
    if (st.ok() || read_only || PQstatus(c) == CONNECTION_OK || tx.last_failure_was_deferred()) {
      return st;
    }
    return Status(StatusCode::kUnavailable,
                  "postgres: connection lost during COMMIT, so the transaction may or may not "
                  "have committed: " + st.message(),
                  reason::kCommitOutcomeUnknown);
  }

  Status RunOnce(const TxFn& fn, bool read_only) {
    CONVERGE_ASSIGN_OR_RETURN(std::unique_ptr<Conn> conn, Acquire());
    PGconn* const c = conn->pg;
    PgTx tx(c, &conn->statements, options_.notify, partitioned_);
    // Read() promises a snapshot: REPEATABLE READ takes one at the first statement and
    // keeps it to the end (READ COMMITTED would take one per statement). A read-only
    // transaction never fails to serialize at this level, so this costs no retries.
    Status st = tx.Begin(read_only);
    if (st.ok()) {
      t_current[this] = &tx;
      try {
        st = fn(tx);
      } catch (const std::exception& e) {
        st = InternalError(std::string("transaction function threw: ") + e.what());
      } catch (...) {
        st = InternalError("transaction function threw");
      }
      t_current.erase(this);
      if (st.ok() && PQtransactionStatus(c) == PQTRANS_INERROR) {
        st = InternalError("a statement failed inside the transaction but fn returned OK");
      }
      // A test parks a writer here to break its connection right before COMMIT.
      if (st.ok() && !read_only) st = failpoint::Hit("postgres.before_commit");
      if (st.ok()) st = Commit(tx, c, read_only);
      // A ROLLBACK (or COMMIT) pipelined behind a failed deferred statement was skipped:
      // the transaction is aborted, not ended, until a ROLLBACK of its own.
      for (int i = 0; i < 2 && !st.ok() && PQstatus(c) == CONNECTION_OK &&
                      PQtransactionStatus(c) != PQTRANS_IDLE;
           ++i) {
        (void)tx.Simple("ROLLBACK");
      }
    }
    if (st.ok() && !read_only) {
      {
        // No batches here: every Transact is its own commit, and the group-commit
        // fields of DatabaseStats stay empty.
        std::lock_guard<std::mutex> l(mu_);
        ++stats_.commits;
      }
      for (auto& hook : tx.TakeCommitHooks()) hook();
    }
    Release(std::move(conn));
    return st;
  }

  // The migration runner's view of one pooled connection (src/core/schema/schema.h). One
  // migrator at a time across processes: a transaction-level advisory lock, released by
  // the COMMIT or ROLLBACK that ends the migration.
  class MigrationTarget : public schema::MigrationTarget {
   public:
    MigrationTarget(PGconn* conn, bool partitioned)
        : conn_(conn), tx_(conn), partitioned_(partitioned) {}
    const schema::SchemaDialect& dialect() const override { return TheDialect(partitioned_); }
    Status BeginLocked() override {
      CONVERGE_RETURN_IF_ERROR(tx_.Simple("BEGIN"));
      // Another process may be migrating: wait for it however long it takes.
      Status st = tx_.Simple("SET LOCAL lock_timeout = 0");
      if (st.ok()) st = tx_.Simple("SELECT pg_advisory_xact_lock(7324001)");
      if (!st.ok()) (void)tx_.Simple("ROLLBACK");
      return st;
    }
    // PQexec, unlike PQexecParams, runs several statements in one call.
    Status ExecScript(const std::string& sql) override {
      PGresult* res = PQexec(conn_, sql.c_str());
      Status st;
      if (PQresultStatus(res) != PGRES_COMMAND_OK && PQresultStatus(res) != PGRES_TUPLES_OK) {
        st = FromResult(res, conn_, "postgres");
      }
      PQclear(res);
      return st;
    }
    Result<Rows> Query(std::string_view sql, std::span<const Value> params) override {
      return tx_.QueryParams(sql, params);
    }
    Status Commit() override { return tx_.Simple("COMMIT"); }
    void Rollback() override { (void)tx_.Simple("ROLLBACK"); }

   private:
    PGconn* conn_;
    PgTx tx_;
    const bool partitioned_;
  };

  Status Migrate(PGconn* c) {
    MigrationTarget target(c, options_.partitioned.value_or(false));
    return schema::Migrate(target, "the database");
  }

  const std::string uri_;
  const Options options_;
  bool partitioned_ = false;  // set by Init, before any Transact
  mutable std::mutex mu_;
  std::condition_variable pool_cv_;
  std::vector<std::unique_ptr<Conn>> idle_;
  size_t open_ = 0;
  DatabaseStats stats_;

  std::mutex listen_mu_;
  std::map<int64_t, std::pair<std::string, std::function<void()>>> listeners_;
  int64_t next_listener_ = 0;
  bool listening_ = false;
  std::thread listener_;
};

}  // namespace

Result<Settings> ParseUri(std::string_view uri) {
  CONVERGE_ASSIGN_OR_RETURN(internal::StoreUri parsed, internal::StoreUri::Parse(uri));
  Settings s;
  CONVERGE_ASSIGN_OR_RETURN(std::optional<int64_t> pool, parsed.TakeInt("pool_size", 1, 10000));
  if (pool) s.pool_size = static_cast<size_t>(*pool);
  CONVERGE_ASSIGN_OR_RETURN(std::optional<bool> notify, parsed.TakeBool("notify"));
  if (notify) s.notify = *notify;
  CONVERGE_ASSIGN_OR_RETURN(std::optional<int64_t> lock_timeout,
                            parsed.TakeInt("lock_timeout_ms", 0, 86400000));
  if (lock_timeout) s.lock_timeout_ms = *lock_timeout;
  CONVERGE_ASSIGN_OR_RETURN(std::optional<int64_t> statements,
                            parsed.TakeInt("statement_cache", 0, 100000));
  if (statements) s.statement_cache = static_cast<size_t>(*statements);
  CONVERGE_ASSIGN_OR_RETURN(std::optional<std::string> retention, parsed.Take("retention"));
  if (retention) {
    if (*retention != "delete" && *retention != "partitioned") {
      return tl::unexpected(InvalidArgumentError(
          "postgresql URI: retention must be delete or partitioned, not " + *retention));
    }
    s.partitioned = *retention == "partitioned";
  }
  // What is left is libpq's. Ask libpq now, so that a misspelt parameter is a clear
  // kInvalidArgument naming it rather than a connection failure.
  const std::string rest = parsed.Rest();
  s.libpq_uri = parsed.base() + (rest.empty() ? "" : "?" + rest);
  char* err = nullptr;
  PQconninfoOption* info = PQconninfoParse(s.libpq_uri.c_str(), &err);
  if (info == nullptr) {
    std::string msg = err != nullptr ? err : "out of memory";
    PQfreemem(err);
    while (!msg.empty() && msg.back() == '\n') msg.pop_back();
    return tl::unexpected(InvalidArgumentError(
        "postgresql URI: " + msg +
        " (converge's own parameters are pool_size, notify, lock_timeout_ms, retention "
        "and statement_cache; the others are libpq's)"));
  }
  PQconninfoFree(info);
  return s;
}

std::string FormatUri(const Settings& settings) {
  const Settings defaults;
  std::string own;
  auto add = [&](std::string_view name, const std::string& value) {
    own += (own.empty() ? "" : "&") + std::string(name) + "=" + value;
  };
  if (settings.pool_size != defaults.pool_size) {
    add("pool_size", std::to_string(settings.pool_size));
  }
  if (settings.notify != defaults.notify) add("notify", settings.notify ? "true" : "false");
  if (settings.lock_timeout_ms != defaults.lock_timeout_ms) {
    add("lock_timeout_ms", std::to_string(settings.lock_timeout_ms));
  }
  if (settings.partitioned) add("retention", *settings.partitioned ? "partitioned" : "delete");
  if (settings.statement_cache != defaults.statement_cache) {
    add("statement_cache", std::to_string(settings.statement_cache));
  }
  if (own.empty()) return settings.libpq_uri;
  return settings.libpq_uri + (settings.libpq_uri.find('?') == std::string::npos ? "?" : "&") +
         own;
}

Result<std::unique_ptr<Database>> Open(std::string_view uri, const DatabaseOptions& options) {
  CONVERGE_ASSIGN_OR_RETURN(Settings settings, ParseUri(uri));
  Options o;
  static_cast<Settings&>(o) = std::move(settings);
  o.max_attempts = options.max_attempts;
  auto db = std::make_unique<PgDatabase>(std::move(o));
  CONVERGE_RETURN_IF_ERROR(db->Init());
  return std::unique_ptr<Database>(std::move(db));
}

}  // namespace converge::postgres
