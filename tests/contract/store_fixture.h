// The store contract's fixture: one typed test per backend. Sqlite runs everywhere
// (label unit); Postgres needs a server, handed over in CONVERGE_TEST_PG_DSN by
// scripts/with-postgres.sh (label pg), and each test gets a fresh database of its own.
#ifndef CONVERGE_TESTS_CONTRACT_STORE_FIXTURE_H_
#define CONVERGE_TESTS_CONTRACT_STORE_FIXTURE_H_

#if CONVERGE_WITH_POSTGRES
#include <libpq-fe.h>
#endif

#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "converge/database.h"
#include "converge/outbox.h"
#include "tests/unit/test_util.h"

namespace converge {

using testing::TempDir;

struct SqliteStore {
  static constexpr bool kPostgres = false;
  static constexpr bool kPartitioned = false;
  TempDir dir;
  std::string uri = "sqlite:" + dir.File("db.sqlite");
  std::string libpq_uri;  // none: not a PostgreSQL store
  static bool Available() { return true; }
  // Whether a transaction is waiting for another: on SQLite, a call queued behind the
  // one writer.
  bool SomeoneWaits(Database& db) { return db.stats().queued > 0; }
};

#if CONVERGE_WITH_POSTGRES
// A fresh database on the test server, dropped afterwards.
struct PostgresStore {
  static constexpr bool kPostgres = true;
  static constexpr bool kPartitioned = false;
  std::string admin, name, uri;
  std::string libpq_uri;  // `uri` without converge's own parameters
  PostgresStore() {
    const char* dsn = std::getenv("CONVERGE_TEST_PG_DSN");
    if (dsn == nullptr) return;
    admin = dsn;
    std::mt19937_64 rng(std::random_device{}());
    name = "converge_t_" + std::to_string(rng() % 1000000000);
    Admin("CREATE DATABASE " + name);
    uri = admin.substr(0, admin.rfind('/') + 1) + name;
    libpq_uri = uri;
  }
  ~PostgresStore() {
    if (!name.empty()) Admin("DROP DATABASE IF EXISTS " + name + " WITH (FORCE)");
  }
  void Admin(const std::string& sql) {
    PGconn* c = PQconnectdb(admin.c_str());
    PGresult* r = PQexec(c, sql.c_str());
    if (PQresultStatus(r) != PGRES_COMMAND_OK) ADD_FAILURE() << sql << ": " << PQerrorMessage(c);
    PQclear(r);
    PQfinish(c);
  }
  static bool Available() { return std::getenv("CONVERGE_TEST_PG_DSN") != nullptr; }
  // Whether a transaction is waiting for another: a lock not yet granted in this database.
  bool SomeoneWaits(Database&) {
    PGconn* c = PQconnectdb(libpq_uri.c_str());
    // A row-lock wait is a wait on a transaction id, which has no database: join on the
    // waiting session instead.
    PGresult* r = PQexec(c, "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON "
                            "a.pid = l.pid WHERE NOT l.granted AND a.datname = current_database()");
    bool waits = PQresultStatus(r) == PGRES_TUPLES_OK && std::atoi(PQgetvalue(r, 0, 0)) > 0;
    PQclear(r);
    PQfinish(c);
    return waits;
  }
};

// The same, created with time-partitioned retention (docs/design/retention.md): the whole
// contract holds there too.
struct PostgresPartitionedStore : PostgresStore {
  static constexpr bool kPartitioned = true;
  PostgresPartitionedStore() {
    if (!uri.empty()) uri += "?retention=partitioned";
  }
};
#endif  // CONVERGE_WITH_POSTGRES

template <class Store>
class StoreContract : public ::testing::Test {
 protected:
  // Which store this instance runs on, for the few tests that exercise what only one of
  // them has (a connection to break, a second writer). Behaviour under test asks
  // tx.dialect() instead.
  static constexpr bool IsPostgres() { return Store::kPostgres; }
  // Whether the store keeps keys and inbox rows in time-partitioned tables.
  static constexpr bool IsPartitioned() { return Store::kPartitioned; }

  void SetUp() override {
    if (!Store::Available())
      GTEST_SKIP() << "CONVERGE_TEST_PG_DSN is not set (run under scripts/with-postgres.sh)";
    db_ = Open();
    ASSERT_NE(db_, nullptr);
    ASSERT_TRUE(db_->Transact([](Tx& tx) {
                     return StatusOf(tx.Exec("CREATE TABLE test_effects (id TEXT PRIMARY KEY)"));
                   }).ok());
  }
  std::unique_ptr<Database> Open() {
    auto db = Database::Open(store_.uri);
    EXPECT_TRUE(db) << db.error().ToString();
    return db ? std::move(*db) : nullptr;
  }
  int64_t Count(Database& db, const std::string& sql) {
    int64_t n = -1;
    EXPECT_TRUE(db.Read([&](Tx& tx) -> Status {
                   CONVERGE_ASSIGN_OR_RETURN(Rows rows, tx.Query(sql));
                   n = rows[0].Int(0);
                   return OkStatus();
                 }).ok());
    return n;
  }
  int64_t Count(const std::string& sql) { return Count(*db_, sql); }
  static Status Effect(Tx& tx, const std::string& id) {
    return StatusOf(tx.Exec("INSERT INTO test_effects (id) VALUES ($1)", id));
  }
  static Event MakeEvent(const std::string& subject, const std::string& type = "thing.done") {
    Event e;
    e.type = type;
    e.subject = subject;
    e.data = R"({"n":1})";
    return e;
  }
  // The event ids on the SQL queue, in queue order (every queue).
  std::vector<std::string> QueuedEventIds() {
    std::vector<std::string> ids;
    EXPECT_TRUE(db_->Read([&](Tx& tx) -> Status {
                   CONVERGE_ASSIGN_OR_RETURN(
                       Rows rows, tx.Query("SELECT event_id FROM queue_messages ORDER BY id"));
                   for (const Row& r : rows) ids.push_back(r.Text(0));
                   return OkStatus();
                 }).ok());
    return ids;
  }

  Store store_;
  std::unique_ptr<Database> db_;
};

struct StoreNames {
  template <class T>
  static std::string GetName(int) {
    if (std::is_same_v<T, SqliteStore>) return "Sqlite";
    return T::kPartitioned ? "PostgresPartitioned" : "Postgres";
  }
};

// A build without PostgreSQL (CONVERGE_WITH_POSTGRES=OFF) runs the contract on SQLite.
#if CONVERGE_WITH_POSTGRES
using Stores = ::testing::Types<SqliteStore, PostgresStore, PostgresPartitionedStore>;
#else
using Stores = ::testing::Types<SqliteStore>;
#endif

}  // namespace converge

#endif  // CONVERGE_TESTS_CONTRACT_STORE_FIXTURE_H_
