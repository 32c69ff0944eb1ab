// The schema, written once (src/core/schema/), on every backend: each ends up with the
// same tables, columns, keys and indexes, migrates once when several processes open it
// together, and refuses a schema newer than the binary.
#include <algorithm>
#include <atomic>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "converge/database.h"
#include "src/core/schema/schema.h"
#include "tests/contract/store_fixture.h"

namespace converge {
namespace {

template <class Store>
class SchemaContract : public StoreContract<Store> {};
TYPED_TEST_SUITE(SchemaContract, Stores, StoreNames);

// What a declared or catalogued column type is, whatever a backend calls it.
std::string TypeClass(std::string type) {
  std::transform(type.begin(), type.end(), type.begin(), ::tolower);
  if (type.find("int") != std::string::npos) return "integer";
  if (type.find("char") != std::string::npos || type == "text") return "text";
  if (type == "blob" || type == "bytea") return "blob";
  if (type == "real" || type == "double precision" || type == "numeric") return "real";
  return "unknown type '" + type + "'";
}

// A PostgreSQL default without its cast ("'{}'::text" -> "'{}'").
std::string PlainDefault(std::string d) {
  const size_t cast = d.rfind("::");
  if (cast != std::string::npos && d.find('\'', cast) == std::string::npos) d.resize(cast);
  return d;
}

// The column list of a pg_indexes definition: "... USING btree (a, b) WHERE ..." -> "a, b".
std::string IndexColumns(const std::string& def) {
  const size_t open = def.find(" USING btree (");
  if (open == std::string::npos) return "? " + def;
  const size_t from = open + std::string(" USING btree (").size();
  return def.substr(from, def.find(')', from) - from);
}

std::string Join(const Rows& rows, size_t col = 0) {
  std::string out;
  for (const Row& r : rows) out += (out.empty() ? "" : ", ") + r.Text(col);
  return out;
}

// A normalised description of the converge schema of `tx`'s store, one line per fact:
// tables, and in each its columns in order (name, type class, nullability, default),
// primary key, unique constraints and indexes (name, columns, partial or not); then
// whether the fence sequence exists. Constraint-backing indexes are named by each
// backend in its own way and are described as the constraint. The business tables the
// fixture creates are left out.
Result<std::string> DescribeSqlite(Tx& tx) {
  std::string out;
  CONVERGE_ASSIGN_OR_RETURN(
      Rows tables, tx.Query("SELECT name, sql FROM sqlite_schema WHERE type = 'table' AND "
                            "name NOT LIKE 'sqlite_%' AND name NOT IN ('test_effects', "
                            "'converge_sequences') ORDER BY name"));
  for (const Row& t : tables) {
    const std::string table = t.Text(0);
    const bool autoincrement = t.Text(1).find("AUTOINCREMENT") != std::string::npos;
    out += "table " + table + "\n";
    CONVERGE_ASSIGN_OR_RETURN(
        Rows cols, tx.Query("SELECT name, type, \"notnull\", dflt_value, pk "
                            "FROM pragma_table_info($1) ORDER BY cid",
                            table));
    for (const Row& c : cols) {
      // A primary key column is never null: the rowid alias by nature, the others by
      // their NOT NULL (SQLite alone would allow a NULL key without it).
      const bool pk = c.Int(4) > 0;
      std::string dflt = c.IsNull(3) ? "" : " default " + c.Text(3);
      if (pk && autoincrement) dflt = " default autoincrement";
      out += "  column " + c.Text(0) + " " + TypeClass(c.Text(1)) +
             (c.Int(2) != 0 || pk ? " not null" : " null") + dflt + "\n";
    }
    CONVERGE_ASSIGN_OR_RETURN(
        Rows pk, tx.Query("SELECT name FROM pragma_table_info($1) WHERE pk > 0 ORDER BY pk",
                          table));
    out += "  primary key (" + Join(pk) + ")\n";
    CONVERGE_ASSIGN_OR_RETURN(
        Rows indexes, tx.Query("SELECT name, origin, partial FROM pragma_index_list($1) "
                               "WHERE origin != 'pk' ORDER BY origin DESC, name",
                               table));
    std::vector<std::string> lines;
    for (const Row& i : indexes) {
      CONVERGE_ASSIGN_OR_RETURN(
          Rows ic, tx.Query("SELECT name FROM pragma_index_info($1) ORDER BY seqno", i.Text(0)));
      if (i.Text(1) == "u") {
        lines.push_back("  unique (" + Join(ic) + ")\n");
      } else {
        lines.push_back("  index " + i.Text(0) + " (" + Join(ic) + ")" +
                        (i.Int(2) != 0 ? " partial" : "") + "\n");
      }
    }
    std::sort(lines.begin(), lines.end());
    for (const std::string& l : lines) out += l;
  }
  CONVERGE_ASSIGN_OR_RETURN(
      Rows fence, tx.Query("SELECT count(*) FROM converge_sequences WHERE name = 'fence'"));
  out += fence[0].Int(0) == 1 ? "fence sequence\n" : "no fence sequence\n";
  return out;
}

Result<std::string> DescribePostgres(Tx& tx) {
  std::string out;
  CONVERGE_ASSIGN_OR_RETURN(
      Rows tables, tx.Query("SELECT table_name FROM information_schema.tables "
                            "WHERE table_schema = current_schema() AND table_type = 'BASE TABLE' "
                            "AND table_name NOT IN ('test_effects') AND NOT EXISTS (SELECT 1 "
                            "FROM pg_class WHERE oid = to_regclass(table_name) AND "
                            "relispartition) ORDER BY table_name"));
  for (const Row& t : tables) {
    const std::string table = t.Text(0);
    out += "table " + table + "\n";
    CONVERGE_ASSIGN_OR_RETURN(
        Rows cols, tx.Query("SELECT column_name, data_type, is_nullable, column_default "
                            "FROM information_schema.columns WHERE table_schema = "
                            "current_schema() AND table_name = $1 ORDER BY ordinal_position",
                            table));
    for (const Row& c : cols) {
      std::string dflt = c.IsNull(3) ? "" : " default " + PlainDefault(c.Text(3));
      if (c.Text(3).rfind("nextval(", 0) == 0) dflt = " default autoincrement";
      out += "  column " + c.Text(0) + " " + TypeClass(c.Text(1)) +
             (c.Text(2) == "NO" ? " not null" : " null") + dflt + "\n";
    }
    const std::string constraint_columns =
        "SELECT k.column_name FROM information_schema.table_constraints c "
        "JOIN information_schema.key_column_usage k ON k.constraint_schema = "
        "c.constraint_schema AND k.constraint_name = c.constraint_name "
        "WHERE c.table_schema = current_schema() AND c.table_name = $1 ";
    CONVERGE_ASSIGN_OR_RETURN(
        Rows pk, tx.Query(constraint_columns +
                              "AND c.constraint_type = 'PRIMARY KEY' ORDER BY k.ordinal_position",
                          table));
    // A time-partitioned table (retention=partitioned) has its partition column in its
    // primary key, and keeps the key proper unique with a trigger: described as the key.
    CONVERGE_ASSIGN_OR_RETURN(
        Rows part, tx.Query("SELECT a.attname::text, (SELECT count(*) FROM pg_trigger g "
                            "WHERE g.tgrelid = p.partrelid AND g.tgname = $1 || '_unique') "
                            "FROM pg_partitioned_table p JOIN pg_attribute a ON a.attrelid = "
                            "p.partrelid AND a.attnum = p.partattrs[0] "
                            "WHERE p.partrelid = to_regclass($1)",
                            table));
    const bool unique_by_trigger = !part.empty() && part[0].Int(1) == 1;
    if (unique_by_trigger && !pk.empty() && pk.back().Text(0) == part[0].Text(0)) {
      pk.pop_back();
    }
    out += "  primary key (" + Join(pk) + ")\n";
    std::vector<std::string> lines;
    CONVERGE_ASSIGN_OR_RETURN(
        Rows uniques, tx.Query("SELECT constraint_name FROM information_schema.table_constraints "
                               "WHERE table_schema = current_schema() AND table_name = $1 AND "
                               "constraint_type = 'UNIQUE'",
                               table));
    for (const Row& u : uniques) {
      CONVERGE_ASSIGN_OR_RETURN(
          Rows uc, tx.Query(constraint_columns + "AND c.constraint_name = $2 "
                                                 "ORDER BY k.ordinal_position",
                            table, u.Text(0)));
      lines.push_back("  unique (" + Join(uc) + ")\n");
    }
    CONVERGE_ASSIGN_OR_RETURN(
        Rows indexes, tx.Query("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = "
                               "current_schema() AND tablename = $1 AND indexname NOT IN ("
                               "SELECT constraint_name FROM information_schema.table_constraints "
                               "WHERE table_schema = current_schema() AND table_name = $1)",
                               table));
    for (const Row& i : indexes) {
      const std::string def = i.Text(1);
      // ... and a UNIQUE constraint of such a table becomes that trigger's lookup, a plain
      // index named as the constraint would be (outbox_events, "<table>_<columns>_key").
      const std::string name = i.Text(0);
      if (unique_by_trigger && name.size() > 4 && name.ends_with("_key") &&
          def.find(" UNIQUE ") == std::string::npos) {
        lines.push_back("  unique (" + IndexColumns(def) + ")\n");
        continue;
      }
      lines.push_back("  index " + i.Text(0) + " (" + IndexColumns(def) + ")" +
                      (def.find(" WHERE ") != std::string::npos ? " partial" : "") + "\n");
    }
    std::sort(lines.begin(), lines.end());
    for (const std::string& l : lines) out += l;
  }
  CONVERGE_ASSIGN_OR_RETURN(
      Rows fence, tx.Query("SELECT count(*) FROM information_schema.sequences WHERE "
                           "sequence_schema = current_schema() AND "
                           "sequence_name = 'converge_fences'"));
  out += fence[0].Int(0) == 1 ? "fence sequence\n" : "no fence sequence\n";
  return out;
}

template <class Store>
std::string Describe(Database& db) {
  std::string out;
  Status st = db.Read([&](Tx& tx) -> Status {
    CONVERGE_ASSIGN_OR_RETURN(out, Store::kPostgres ? DescribePostgres(tx) : DescribeSqlite(tx));
    return OkStatus();
  });
  EXPECT_TRUE(st.ok()) << st.ToString();
  return out;
}

// The versions recorded in converge_schema, in order.
std::string Versions(Database& db) {
  std::string out;
  Status st = db.Read([&](Tx& tx) -> Status {
    CONVERGE_ASSIGN_OR_RETURN(Rows rows,
                              tx.Query("SELECT version FROM converge_schema ORDER BY version"));
    out = Join(rows);
    return OkStatus();
  });
  EXPECT_TRUE(st.ok()) << st.ToString();
  return out;
}

std::string VersionsUpTo(int n) {
  std::string out;
  for (int v = 1; v <= n; ++v) out += (v > 1 ? ", " : "") + std::to_string(v);
  return out;
}

// The description of a store, less the indexes only stores that sweep through them keep
// (Dialect::SweepsInKeyOrder, migration 13): an index changes no query's meaning.
std::string WithoutIndexesSqliteDrops(std::string description) {
  for (const char* line : {"  index idempotency_keys_expires (expires_at)\n",
                           "  index consumer_inbox_expires (expires_at)\n",
                           "  index outbox_unpublished_partition (partition_no, seq) partial\n"}) {
    const size_t at = description.find(line);
    if (at != std::string::npos) description.erase(at, std::string_view(line).size());
  }
  return description;
}

// The embedded store is the reference: every backend must hold what it holds, so that
// core SQL written once means the same everywhere, except for the two expiry indexes,
// which a store keeps exactly when its sweeper searches them, and the index of unpublished
// events by partition, which SQLite's planner would not use to bound a relay's claim
// (SqliteDialect::DropOutboxPartitionIndex). (On SQLite this compares two SQLite files:
// it checks the description itself.)
TYPED_TEST(SchemaContract, SameTablesColumnsKeysAndIndexesAsTheEmbeddedStore) {
  SqliteStore reference_store;
  auto reference = Database::Open(reference_store.uri);
  ASSERT_TRUE(reference) << reference.error().ToString();
  const std::string want = Describe<SqliteStore>(**reference);
  for (const char* table : {"idempotency_keys", "outbox_events", "consumer_inbox",
                            "queue_messages", "dead_letters", "effects", "converge_schema"}) {
    EXPECT_NE(want.find(std::string("table ") + table + "\n"), std::string::npos) << table;
  }
  EXPECT_NE(want.find("  index outbox_unpublished (seq) partial\n"), std::string::npos) << want;
  EXPECT_NE(want.find("  unique (source, event_id)\n"), std::string::npos) << want;
  EXPECT_NE(want.find("\nfence sequence\n"), std::string::npos) << want;
  EXPECT_EQ(want.find("_expires"), std::string::npos) << "SQLite sweeps in key order\n" << want;
  EXPECT_EQ(want.find("outbox_unpublished_partition"), std::string::npos) << want;
  const std::string got = Describe<TypeParam>(*this->db_);
  if (TypeParam::kPostgres) {
    EXPECT_NE(got.find("  index idempotency_keys_expires (expires_at)\n"), std::string::npos)
        << got;
    EXPECT_NE(got.find("  index consumer_inbox_expires (expires_at)\n"), std::string::npos)
        << got;
    EXPECT_NE(got.find("  index outbox_unpublished_partition (partition_no, seq) partial\n"),
              std::string::npos)
        << got;
  }
  EXPECT_EQ(WithoutIndexesSqliteDrops(got), want);
}

// Of several processes opening a new store at once, one migrates, under the store's
// migration lock; the others wait for it and find the work done.
TYPED_TEST(SchemaContract, StoresOpenedConcurrentlyMigrateOnce) {
  TypeParam fresh;
  constexpr int kOpeners = 4;
  std::vector<Status> results(kOpeners);
  std::vector<std::thread> openers;
  std::atomic<int> ready{0};
  for (int i = 0; i < kOpeners; ++i) {
    openers.emplace_back([&, i] {
      ++ready;
      while (ready.load() < kOpeners) std::this_thread::yield();
      auto db = Database::Open(fresh.uri);
      results[i] = db ? OkStatus() : db.error();
    });
  }
  for (auto& t : openers) t.join();
  for (const Status& st : results) EXPECT_TRUE(st.ok()) << st.ToString();
  auto db = Database::Open(fresh.uri);
  ASSERT_TRUE(db) << db.error().ToString();
  EXPECT_EQ(Versions(**db), VersionsUpTo(schema::SchemaVersion()));
}

TYPED_TEST(SchemaContract, ReopeningACurrentStoreChangesNothing) {
  const std::string before = Describe<TypeParam>(*this->db_);
  auto again = Database::Open(this->store_.uri);
  ASSERT_TRUE(again) << again.error().ToString();
  EXPECT_EQ(Describe<TypeParam>(**again), before);
  EXPECT_EQ(Versions(**again), VersionsUpTo(schema::SchemaVersion()));
}

TYPED_TEST(SchemaContract, NewerSchemaIsRefusedAndLeftUntouched) {
  ASSERT_TRUE(this->db_->Transact([](Tx& tx) {
                     return StatusOf(tx.Exec("INSERT INTO converge_schema (version) VALUES (999)"));
                   }).ok());
  const std::string before = Describe<TypeParam>(*this->db_);
  auto refused = Database::Open(this->store_.uri);
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code(), StatusCode::kFailedPrecondition) << refused.error().ToString();
  EXPECT_EQ(refused.error().reason(), reason::kSchemaTooNew);
  EXPECT_NE(refused.error().message().find("schema version 999"), std::string::npos)
      << refused.error().ToString();
  EXPECT_EQ(Describe<TypeParam>(*this->db_), before);
  EXPECT_EQ(Versions(*this->db_), VersionsUpTo(schema::SchemaVersion()) + ", 999");
}

}  // namespace
}  // namespace converge
