// converge's schema, written once for every backend, and the one migration runner.
// Internal: backends call Migrate() when they open a store.
//
// Method: each migration is SQL text that reads the same on every backend except for a
// few tokens, which the backend's dialect fills in (Render):
//
//   {{bigint}}            64-bit integer column type     INTEGER / BIGINT
//   {{double}}            8-byte float column type       REAL / DOUBLE PRECISION
//   {{blob}}              bytes column type              BLOB / BYTEA
//   {{autoincrement_pk}}  "id" + this: numbered primary key
//                         INTEGER PRIMARY KEY AUTOINCREMENT / BIGSERIAL PRIMARY KEY
//   {{without_rowid}}     after CREATE TABLE's ")"       " WITHOUT ROWID" / ""
//   {{fence_sequence}}    the store-wide fence sequence (Tx::NextFence): a row of
//                         converge_sequences on SQLite, the SEQUENCE converge_fences on
//                         PostgreSQL
//   {{partitioned_retention}}  DDL replacing the (still empty) idempotency_keys and
//                         consumer_inbox with time-partitioned ones: "" except on
//                         PostgreSQL opened with retention=partitioned. A migration that
//                         renders to nothing but blanks only records its version.
//   {{partitioned_outbox}}  DDL converting outbox_events to a time-partitioned table on a
//                         store whose idempotency_keys are one: "" except on PostgreSQL,
//                         where the DDL itself looks at the store's shape.
//   {{drop_expiry_indexes}}  DDL dropping the expiry indexes of idempotency_keys and
//                         consumer_inbox where the sweeper walks them in key order
//                         (Dialect::SweepsInKeyOrder: SQLite); "" elsewhere.
//   {{drop_outbox_partition_index}}  DDL dropping outbox_unpublished_partition where
//                         it does not bound a relay's claim of several partitions
//                         (SQLite); "" elsewhere.
//
// Everything else — TEXT, INTEGER (32 bits on PostgreSQL: use {{bigint}} for times, ids
// and counters that may grow), CHECK, DEFAULT, partial indexes — is written as is.
// Migrations are append-only: a migration that has shipped is never edited, because a
// store at its version will never run it again. The rendered text of every shipped
// migration is what the backends ran before the schema was written once, so a store
// created by an older binary is at exactly the schema this one would create.
//
// Thread safety: everything here is immutable or runs on the caller's thread.
#ifndef CONVERGE_CORE_SCHEMA_SCHEMA_H_
#define CONVERGE_CORE_SCHEMA_SCHEMA_H_

#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "converge/database.h"
#include "converge/dialect.h"
#include "converge/status.h"

namespace converge::schema {

// What the schema needs from a backend beyond the public Dialect: the one schema object
// whose very shape differs between backends.
class SchemaDialect : public Dialect {
 public:
  // DDL (one or more statements) creating the sequence Tx::NextFence draws from, such
  // that its first draw is above every `fence` already stored in idempotency_keys.
  virtual std::string_view CreateFenceSequence() const = 0;
  // {{partitioned_retention}}: "" where the store keeps plain tables.
  virtual std::string_view PartitionedRetentionTables() const { return ""; }
  // {{deferred_checks}}: what the store needs to check a deferred statement's row count
  // inside the statement (Tx::ExecDeferred); "" where deferred statements run at once.
  virtual std::string_view DeferredCheckFunctions() const { return ""; }
  // {{partitioned_outbox}}: "" where the store keeps plain tables.
  virtual std::string_view PartitionedOutbox() const { return ""; }
  // {{drop_outbox_partition_index}}: DDL dropping outbox_unpublished_partition where it
  // does not bound a relay's claim of several partitions (SQLite, migrations.cc); ""
  // where the store keeps it.
  virtual std::string_view DropOutboxPartitionIndex() const { return ""; }
};

// The migrations in template form: MigrationTemplates()[i] takes a store from version i
// to i + 1.
const std::vector<std::string_view>& MigrationTemplates();

// The schema version this binary creates; a store with a higher one is refused.
int SchemaVersion();

// `tmpl` with every {{token}} replaced by `dialect`'s fragment. kInternal naming the
// token when one is unknown or unterminated (a mistake in converge, not in the store).
Result<std::string> Render(std::string_view tmpl, const SchemaDialect& dialect);

// What the migration runner needs from a backend: one connection, used by one thread.
class MigrationTarget {
 public:
  virtual ~MigrationTarget() = default;

  virtual const SchemaDialect& dialect() const = 0;
  // Begins the transaction that every pending migration runs in, holding the store's
  // migration lock until it ends, so that of several processes opening one store at
  // once, one migrates and the others wait and then find the work done.
  virtual Status BeginLocked() = 0;
  // Runs SQL text of one or more statements, without parameters, in that transaction.
  virtual Status ExecScript(const std::string& sql) = 0;
  // Runs one statement with $n parameters in that transaction; returns its rows.
  virtual Result<Rows> Query(std::string_view sql, std::span<const Value> params) = 0;
  virtual Status Commit() = 0;
  // Best effort: the caller is already returning the error that made it roll back.
  virtual void Rollback() = 0;
};

// Brings the store behind `target` to the version of `migrations` (by default converge's
// own: SchemaVersion()), applying every pending one and recording each in
// converge_schema(version), all in one transaction under the migration lock: a failure
// leaves the store as it was. `store` names the store in messages.
// Errors: kFailedPrecondition with reason::kSchemaTooNew when the store's version is
// higher than the list knows (the store is left untouched: upgrade converge); the
// store's own error, prefixed "migration N:", when migration N fails; kInternal when a
// template does not render.
Status Migrate(MigrationTarget& target, std::string_view store,
               std::span<const std::string_view> migrations = MigrationTemplates());

}  // namespace converge::schema

#endif  // CONVERGE_CORE_SCHEMA_SCHEMA_H_
