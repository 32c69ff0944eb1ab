// The schema written once (src/core/schema/): rendering its templates, the migration
// runner's contract against a scripted store, and a version 4 SQLite file written before
// the schema was written once, opened by this binary.
#include "src/core/schema/schema.h"

#include <sqlite3.h>

#include <algorithm>
#include <map>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "converge/database.h"
#include "tests/unit/test_util.h"

namespace converge {
namespace {

using testing::TempDir;

// Distinct words for every token, so a test sees which fragment went where.
class FakeDialect : public schema::SchemaDialect {
 public:
  std::string_view TypeName(ColumnType type) const override {
    switch (type) {
      case ColumnType::kBigint:
        return "BIG";
      case ColumnType::kDouble:
        return "DBL";
      case ColumnType::kBlob:
        return "BYTES";
    }
    return "";
  }
  std::string_view AutoIncrementPrimaryKey() const override { return "SERIAL_PK"; }
  std::string_view ForUpdateSkipLocked() const override { return " SKIP"; }
  std::string_view WithoutRowid() const override { return " NOROWID"; }
  std::string_view CreateFenceSequence() const override { return "CREATE FENCES;"; }
};

TEST(SchemaRender, ReplacesEveryTokenWithTheDialectsFragment) {
  FakeDialect d;
  auto sql = schema::Render(
      "CREATE TABLE t (id {{autoincrement_pk}}, n {{bigint}}, x {{double}}, b {{blob}})"
      "{{without_rowid}};\n{{fence_sequence}}\nSELECT '{' || '}';",
      d);
  ASSERT_TRUE(sql) << sql.error().ToString();
  EXPECT_EQ(*sql,
            "CREATE TABLE t (id SERIAL_PK, n BIG, x DBL, b BYTES) NOROWID;\n"
            "CREATE FENCES;\nSELECT '{' || '}';");
}

TEST(SchemaRender, RefusesUnknownAndUnterminatedTokens) {
  FakeDialect d;
  auto unknown = schema::Render("CREATE TABLE t (n {{bigint}}, m {{int64}})", d);
  ASSERT_FALSE(unknown);
  EXPECT_EQ(unknown.error().code(), StatusCode::kInternal);
  EXPECT_NE(unknown.error().message().find("{{int64}}"), std::string::npos)
      << unknown.error().ToString();
  auto open = schema::Render("CREATE TABLE t (n {{bigint)", d);
  ASSERT_FALSE(open);
  EXPECT_EQ(open.error().code(), StatusCode::kInternal);
}

TEST(SchemaRender, EveryShippedMigrationRenders) {
  FakeDialect d;
  ASSERT_EQ(schema::SchemaVersion(), static_cast<int>(schema::MigrationTemplates().size()));
  for (size_t i = 0; i < schema::MigrationTemplates().size(); ++i) {
    auto sql = schema::Render(schema::MigrationTemplates()[i], d);
    ASSERT_TRUE(sql) << "migration " << i + 1 << ": " << sql.error().ToString();
    EXPECT_EQ(sql->find("{{"), std::string::npos) << "migration " << i + 1;
  }
}

// A store played from a script: its version, which statement fails, and a log of every
// call the runner made.
class ScriptedTarget : public schema::MigrationTarget {
 public:
  int64_t version = 0;
  std::string fail_on;  // ExecScript fails when its SQL contains this
  std::vector<std::string> log;

  const schema::SchemaDialect& dialect() const override { return dialect_; }
  Status BeginLocked() override {
    log.push_back("begin");
    return OkStatus();
  }
  Status ExecScript(const std::string& sql) override {
    log.push_back("exec " + sql);
    if (!fail_on.empty() && sql.find(fail_on) != std::string::npos) {
      return InvalidArgumentError("near \"" + fail_on + "\": syntax error");
    }
    return OkStatus();
  }
  Result<Rows> Query(std::string_view sql, std::span<const Value> params) override {
    std::string entry = "query " + std::string(sql);
    for (const Value& v : params) entry += " [" + Row({v}).Text(0) + "]";
    log.push_back(entry);
    if (sql.find("max(version)") != std::string_view::npos) return Rows{Row({Value(version)})};
    return Rows{};
  }
  Status Commit() override {
    log.push_back("commit");
    return OkStatus();
  }
  void Rollback() override { log.push_back("rollback"); }

 private:
  FakeDialect dialect_;
};

const std::vector<std::string_view> kThree = {"ONE {{bigint}};", "TWO;", "THREE {{blob}};"};

TEST(SchemaMigrate, AppliesOnlyPendingMigrationsInOneLockedTransaction) {
  ScriptedTarget t;
  t.version = 1;
  ASSERT_TRUE(schema::Migrate(t, "store", kThree).ok());
  const std::vector<std::string> want = {
      "begin",
      "exec CREATE TABLE IF NOT EXISTS converge_schema (version BIG NOT NULL)",
      "query SELECT coalesce(max(version), 0) FROM converge_schema",
      "exec TWO;",
      "query INSERT INTO converge_schema (version) VALUES ($1) [2]",
      "exec THREE BYTES;",
      "query INSERT INTO converge_schema (version) VALUES ($1) [3]",
      "commit",
  };
  EXPECT_EQ(t.log, want);
}

TEST(SchemaMigrate, CurrentStoreRunsNoMigration) {
  ScriptedTarget t;
  t.version = 3;
  ASSERT_TRUE(schema::Migrate(t, "store", kThree).ok());
  EXPECT_EQ(t.log.size(), 4u);  // begin, version table, version query, commit
  EXPECT_EQ(t.log.back(), "commit");
}

TEST(SchemaMigrate, NewerStoreIsRefusedAndRolledBack) {
  ScriptedTarget t;
  t.version = 4;
  Status st = schema::Migrate(t, "'app.db'", kThree);
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition) << st.ToString();
  EXPECT_EQ(st.reason(), reason::kSchemaTooNew);
  EXPECT_NE(st.message().find("'app.db' has schema version 4, newer than this binary's 3"),
            std::string::npos)
      << st.ToString();
  EXPECT_EQ(t.log.back(), "rollback");
  for (const std::string& entry : t.log) EXPECT_EQ(entry.find("INSERT"), std::string::npos);
}

TEST(SchemaMigrate, FailingMigrationIsNamedAndRollsBackEverything) {
  ScriptedTarget t;
  t.fail_on = "THREE";
  Status st = schema::Migrate(t, "store", kThree);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st.ToString();
  EXPECT_EQ(st.message().rfind("migration 3: ", 0), 0u) << st.ToString();
  EXPECT_EQ(t.log.back(), "rollback");
  EXPECT_EQ(std::count(t.log.begin(), t.log.end(), "commit"), 0);
}

TEST(SchemaMigrate, BrokenTemplateTouchesNothing) {
  ScriptedTarget t;
  const std::vector<std::string_view> broken = {"ONE;", "TWO {{nope}};"};
  Status st = schema::Migrate(t, "store", broken);
  EXPECT_EQ(st.code(), StatusCode::kInternal) << st.ToString();
  EXPECT_NE(st.message().find("migration 2"), std::string::npos) << st.ToString();
  EXPECT_TRUE(t.log.empty()) << "the runner began a transaction for a schema it cannot render";
}

// sqlite_schema of a file, as "type name tbl_name: sql" lines sorted by name (internal
// sqlite_ objects included: AUTOINCREMENT's sqlite_sequence, the autoindexes).
std::vector<std::string> SqliteSchemaOf(Database& db) {
  std::vector<std::string> out;
  Status st = db.Read([&](Tx& tx) -> Status {
    CONVERGE_ASSIGN_OR_RETURN(
        Rows rows,
        tx.Query("SELECT type, name, tbl_name, sql FROM sqlite_schema ORDER BY name, type"));
    for (const Row& r : rows) {
      out.push_back(r.Text(0) + " " + r.Text(1) + " " + r.Text(2) + ": " + r.Text(3));
    }
    return OkStatus();
  });
  EXPECT_TRUE(st.ok()) << st.ToString();
  return out;
}

// The schema a file at version 4 holds when the binary before the schema was written
// once (two copies, one per backend) created it: its sqlite_schema, as `sqlite3 FILE
// .schema` prints it (sqlite_sequence left out: SQLite creates it by itself).
constexpr std::string_view kVersion4Schema = R"sql(
CREATE TABLE converge_schema (version INTEGER NOT NULL);
CREATE TABLE idempotency_keys (
  scope            TEXT    NOT NULL,
  key              TEXT    NOT NULL,
  request_hash     TEXT    NOT NULL,
  status           TEXT    NOT NULL CHECK (status IN ('in_progress', 'completed')),
  recovery_point   TEXT    NOT NULL,
  recovery_data    TEXT    NOT NULL DEFAULT '',
  lease_until       INTEGER NOT NULL,
  fence             INTEGER NOT NULL,
  response_status  INTEGER,
  response_headers TEXT,
  response_body    BLOB,
  created_at       INTEGER NOT NULL,
  updated_at       INTEGER NOT NULL,
  expires_at       INTEGER NOT NULL,
  PRIMARY KEY (scope, key)
) WITHOUT ROWID;
CREATE INDEX idempotency_keys_expires ON idempotency_keys (expires_at);
CREATE TABLE outbox_events (
  seq              INTEGER PRIMARY KEY AUTOINCREMENT,
  event_id         TEXT    NOT NULL,
  source           TEXT    NOT NULL,
  aggregate_type   TEXT    NOT NULL,
  aggregate_id     TEXT    NOT NULL,
  type             TEXT    NOT NULL,
  payload          TEXT    NOT NULL,
  headers          TEXT    NOT NULL DEFAULT '{}',
  created_at       INTEGER NOT NULL,
  published_at     INTEGER,
  publish_attempts INTEGER NOT NULL DEFAULT 0,
  last_error       TEXT, partition_no INTEGER NOT NULL DEFAULT 0,
  UNIQUE (source, event_id)
);
CREATE INDEX outbox_unpublished ON outbox_events (seq) WHERE published_at IS NULL;
CREATE INDEX outbox_published ON outbox_events (published_at) WHERE published_at IS NOT NULL;
CREATE TABLE consumer_inbox (
  consumer     TEXT    NOT NULL,
  source       TEXT    NOT NULL,
  event_id     TEXT    NOT NULL,
  processed_at INTEGER NOT NULL,
  expires_at   INTEGER NOT NULL,
  outcome      TEXT    NOT NULL DEFAULT 'applied'
               CHECK (outcome IN ('applied', 'dead_lettered')),
  PRIMARY KEY (consumer, source, event_id)
) WITHOUT ROWID;
CREATE INDEX consumer_inbox_expires ON consumer_inbox (expires_at);
CREATE TABLE queue_subscriptions (
  queue      TEXT    NOT NULL,
  pattern    TEXT    NOT NULL,
  created_at INTEGER NOT NULL,
  PRIMARY KEY (queue, pattern)
) WITHOUT ROWID;
CREATE TABLE queue_messages (
  id               INTEGER PRIMARY KEY AUTOINCREMENT,
  queue            TEXT    NOT NULL,
  event_id         TEXT    NOT NULL,
  source           TEXT    NOT NULL,
  type             TEXT    NOT NULL,
  subject          TEXT    NOT NULL,
  envelope         TEXT    NOT NULL,
  enqueued_at      INTEGER NOT NULL,
  visible_at       INTEGER NOT NULL,
  attempts         INTEGER NOT NULL DEFAULT 0,
  claim_token      TEXT,
  first_failure_at INTEGER,
  last_error       TEXT
);
CREATE INDEX queue_messages_ready ON queue_messages (queue, visible_at, id);
CREATE TABLE dead_letters (
  id               INTEGER PRIMARY KEY AUTOINCREMENT,
  consumer         TEXT    NOT NULL,
  queue            TEXT    NOT NULL,
  event_id         TEXT    NOT NULL,
  source           TEXT    NOT NULL,
  type             TEXT    NOT NULL,
  envelope         TEXT    NOT NULL,
  error_class      TEXT    NOT NULL,
  error_code       TEXT    NOT NULL,
  error            TEXT    NOT NULL,
  attempts         INTEGER NOT NULL,
  first_failure_at INTEGER NOT NULL,
  last_failure_at  INTEGER NOT NULL,
  state            TEXT    NOT NULL DEFAULT 'parked'
                   CHECK (state IN ('parked', 'replayed', 'discarded')),
  replay_count     INTEGER NOT NULL DEFAULT 0,
  updated_at       INTEGER NOT NULL
);
CREATE INDEX dead_letters_state ON dead_letters (state, id);
CREATE TABLE effects (
  effect_key      TEXT    NOT NULL PRIMARY KEY,
  kind            TEXT    NOT NULL,
  payload         TEXT    NOT NULL,
  state           TEXT    NOT NULL CHECK (state IN ('pending', 'done', 'failed')),
  attempts        INTEGER NOT NULL DEFAULT 0,
  next_attempt_at INTEGER NOT NULL,
  result          TEXT,
  last_error      TEXT,
  created_at      INTEGER NOT NULL,
  updated_at      INTEGER NOT NULL
, claim_token TEXT) WITHOUT ROWID;
CREATE INDEX effects_due ON effects (kind, state, next_attempt_at);
CREATE INDEX outbox_unpublished_partition ON outbox_events (partition_no, seq)
  WHERE published_at IS NULL;
CREATE TABLE relay_partitions (
  partition_no INTEGER NOT NULL PRIMARY KEY,
  owner        TEXT    NOT NULL,
  fence        INTEGER  NOT NULL,
  lease_until  INTEGER  NOT NULL
);
CREATE TABLE relay_members (
  owner        TEXT    NOT NULL PRIMARY KEY,
  lease_until  INTEGER  NOT NULL
, incarnation INTEGER NOT NULL DEFAULT 0);
CREATE TABLE converge_sequences (
  name  TEXT    NOT NULL PRIMARY KEY,
  value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX idempotency_keys_in_progress ON idempotency_keys (lease_until)
  WHERE status = 'in_progress';
CREATE TABLE consumer_starts (
  consumer   TEXT    NOT NULL,
  source     TEXT    NOT NULL,
  event_id   TEXT    NOT NULL,
  starts     INTEGER NOT NULL,
  PRIMARY KEY (consumer, source, event_id)
) WITHOUT ROWID;
)sql";

// Regression (#8, one schema source): a store created before the schema was written once
// must open without change, and this binary must create exactly the same schema.
TEST(SchemaUpgrade, Version4FileFromBeforeTheOneSchemaOpensAsIfCreatedByThisBinary) {
  TempDir dir;
  const std::string old_file = dir.File("v4.sqlite");
  {
    sqlite3* raw = nullptr;
    ASSERT_EQ(sqlite3_open(old_file.c_str(), &raw), SQLITE_OK);
    const std::string setup =
        std::string(kVersion4Schema) +
        "INSERT INTO converge_schema (version) VALUES (1), (2), (3), (4);"
        "INSERT INTO converge_sequences (name, value) VALUES ('fence', 41);"
        "INSERT INTO idempotency_keys VALUES ('t', 'k', 'h', 'completed', 'done', '', 0, 41,"
        " 201, '{}', x'00ff', 1, 1, 9000000000000);";
    char* err = nullptr;
    const int rc = sqlite3_exec(raw, setup.c_str(), nullptr, nullptr, &err);
    EXPECT_EQ(rc, SQLITE_OK) << (err ? err : "");
    sqlite3_free(err);
    sqlite3_close(raw);
    ASSERT_EQ(rc, SQLITE_OK);
  }
  auto old_db = testing::OpenSqlite(old_file);
  ASSERT_NE(old_db, nullptr);
  auto fresh_db = testing::OpenSqlite(dir.File("fresh.sqlite"));
  ASSERT_NE(fresh_db, nullptr);

  // While SchemaVersion() is 4 this says: opening changed nothing, and a new file gets
  // byte for byte the schema the old binary wrote. After a migration 5 it says that the
  // upgrade path and a new file end at the same schema.
  EXPECT_EQ(SqliteSchemaOf(*old_db), SqliteSchemaOf(*fresh_db));
  EXPECT_EQ(testing::QueryInt(*old_db, "SELECT count(*) FROM converge_schema"),
            schema::SchemaVersion());
  EXPECT_EQ(testing::QueryInt(*old_db, "SELECT max(version) FROM converge_schema"),
            schema::SchemaVersion());
  // The data is the old file's: its key, and its fence sequence goes on from 41.
  EXPECT_EQ(testing::QueryInt(*old_db, "SELECT fence FROM idempotency_keys WHERE key = 'k'"), 41);
  auto fence = TransactValue<int64_t>(*old_db, [](Tx& tx) { return tx.NextFence(); });
  ASSERT_TRUE(fence) << fence.error().ToString();
  EXPECT_EQ(*fence, 42);
}

}  // namespace
}  // namespace converge
