// Server-side prepared statements (PostgreSQL: src/store/postgres/statement_cache.h,
// docs/design/postgresql.md, "Prepared statements"). Every test runs on every store: what
// a caller sees (each statement's rows and errors, on the first attempt) must not depend
// on whether the store prepared it. On PostgreSQL the tests also read the session's own
// pg_prepared_statements, to show the cache was in play: prepared once, reused, forgotten
// after a failure, rebuilt on a new connection. pool_size=1 makes every transaction of a
// test reuse the one connection (and so the one cache) that the one before it used.
#if CONVERGE_WITH_POSTGRES
#include <libpq-fe.h>
#endif

#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "tests/contract/store_fixture.h"
#include "tests/unit/test_util.h"

namespace converge {
namespace {

constexpr const char* kCount = "SELECT count(*) FROM test_effects WHERE id <> $1";

template <class Store>
class StatementCacheTest : public StoreContract<Store> {
 protected:
  std::unique_ptr<Database> OpenWith(const std::string& name, const std::string& value) {
    auto db = Database::Open(Database::WithDefaultParameter(this->store_.uri, name, value));
    EXPECT_TRUE(db) << db.error().ToString();
    return db ? std::move(*db) : nullptr;
  }
  // Runs kCount in a transaction of its own; `attempts` counts how often fn ran.
  static Status CountEffects(Database& db, int* attempts, int64_t* n = nullptr) {
    *attempts = 0;
    return db.Transact([&](Tx& tx) -> Status {
      ++*attempts;
      CONVERGE_ASSIGN_OR_RETURN(Rows rows, tx.Query(kCount, "none"));
      if (n != nullptr) *n = rows[0].Int(0);
      return OkStatus();
    });
  }
  // On PostgreSQL, how many statements with text `sql` this session has prepared and how
  // often they ran (-1, -1 elsewhere). Read on the pooled connection itself, by a
  // statement that starts with a comment: its first word is no plannable keyword, so it
  // is sent unnamed (StatementCache::Preparable) and leaves the cache as it found it.
  std::pair<int64_t, int64_t> Prepared(Database& db, const std::string& sql) {
    std::pair<int64_t, int64_t> out{-1, -1};
    if (!this->IsPostgres()) return out;
    Status st = db.Transact([&](Tx& tx) -> Status {
      CONVERGE_ASSIGN_OR_RETURN(
          Rows rows,
          tx.Query("/* unnamed */ SELECT count(*), coalesce(sum(generic_plans + custom_plans), "
                   "0) FROM pg_prepared_statements WHERE statement = $1",
                   sql));
      out = {rows[0].Int(0), rows[0].Int(1)};
      return OkStatus();
    });
    EXPECT_TRUE(st.ok()) << st.ToString();
    return out;
  }
  // What Prepared should read: (n, runs) on PostgreSQL, (-1, -1) elsewhere.
  std::pair<int64_t, int64_t> OnPostgres(int64_t n, int64_t runs) {
    return this->IsPostgres() ? std::make_pair(n, runs) : std::make_pair(int64_t{-1}, int64_t{-1});
  }
};

TYPED_TEST_SUITE(StatementCacheTest, Stores, StoreNames);

// A caller may hold its SQL in a buffer it rewrites: a statement found by the text's
// address (SQLite's writer looks there before it hashes the text) must still be the
// text's own.
TYPED_TEST(StatementCacheTest, TextRewrittenAtTheSameAddressRunsAsWritten) {
  auto db = this->OpenWith("pool_size", "1");
  ASSERT_NE(db, nullptr);
  std::string sql = "SELECT 1 AS n";
  const char* const at = sql.data();
  auto run = [&]() -> int64_t {
    int64_t n = -1;
    Status st = db->Transact([&](Tx& tx) -> Status {
      CONVERGE_ASSIGN_OR_RETURN(Rows rows, tx.Query(sql));
      n = rows.at(0).Int(0);
      return OkStatus();
    });
    EXPECT_TRUE(st.ok()) << st.ToString();
    return n;
  };
  EXPECT_EQ(run(), 1);
  sql[7] = '2';
  ASSERT_EQ(sql.data(), at);
  EXPECT_EQ(run(), 2);
  sql[7] = '1';
  EXPECT_EQ(run(), 1);
}

TYPED_TEST(StatementCacheTest, AStatementIsPreparedOncePerConnectionAndReused) {
  auto db = this->OpenWith("pool_size", "1");
  ASSERT_NE(db, nullptr);
  for (int i = 0; i < 3; ++i) {
    int attempts = 0;
    int64_t n = -1;
    Status st = TestFixture::CountEffects(*db, &attempts, &n);
    ASSERT_TRUE(st.ok()) << st.ToString();
    EXPECT_EQ(n, 0);
  }
  EXPECT_EQ(this->Prepared(*db, kCount), this->OnPostgres(1, 3));

  // statement_cache=0 prepares nothing (a pooler that cannot keep session state).
  auto unprepared = this->OpenWith("statement_cache", "0&pool_size=1");
  ASSERT_NE(unprepared, nullptr);
  int attempts = 0;
  ASSERT_TRUE(TestFixture::CountEffects(*unprepared, &attempts).ok());
  EXPECT_EQ(this->Prepared(*unprepared, kCount), this->OnPostgres(0, 0));
}

// A statement first used behind one that fails in the same pipeline: the server skips
// its prepare, so the cache must not believe it prepared. The next use prepares it and
// runs on its first attempt.
TYPED_TEST(StatementCacheTest, AStatementFirstUsedBehindAFailureIsPreparedAgain) {
  auto db = this->OpenWith("pool_size", "1");
  ASSERT_NE(db, nullptr);
  ASSERT_TRUE(db->Transact([](Tx& tx) { return TestFixture::Effect(tx, "a"); }).ok());
  Status st = db->Transact([](Tx& tx) -> Status {
    CONVERGE_RETURN_IF_ERROR(tx.ExecDeferred(DeferredCheck::None(),
                                             "INSERT INTO test_effects (id) VALUES ($1)", "a"));
    return StatusOf(tx.Query(kCount, "none"));  // sent behind the duplicate
  });
  EXPECT_EQ(st.code(), StatusCode::kAlreadyExists) << st.ToString();
  EXPECT_EQ(this->Prepared(*db, kCount), this->OnPostgres(0, 0));
  int attempts = 0;
  int64_t n = -1;
  st = TestFixture::CountEffects(*db, &attempts, &n);
  EXPECT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(attempts, 1);
  EXPECT_EQ(n, 1);
  EXPECT_EQ(this->Prepared(*db, kCount), this->OnPostgres(1, 1));
}

// A statement that cannot be prepared (its table does not exist yet) fails with its own
// error every time it is tried, as unprepared; once the table exists it runs.
TYPED_TEST(StatementCacheTest, AStatementThatFailsToPrepareKeepsItsOwnErrorAndWorksLater) {
  auto db = this->OpenWith("pool_size", "1");
  ASSERT_NE(db, nullptr);
  const std::string sql = "SELECT count(*) FROM later_table WHERE id <> $1";
  auto run = [&](int* attempts) {
    *attempts = 0;
    return db->Transact([&](Tx& tx) -> Status {
      ++*attempts;
      return StatusOf(tx.Query(sql, "x"));
    });
  };
  int attempts = 0;
  for (int i = 0; i < 2; ++i) {
    Status st = run(&attempts);
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << i << ": " << st.ToString();
    EXPECT_EQ(attempts, 1);
  }
  ASSERT_TRUE(db->Transact([](Tx& tx) {
                  return StatusOf(tx.Exec("CREATE TABLE later_table (id TEXT)"));
                }).ok());
  Status st = run(&attempts);
  EXPECT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(attempts, 1);
}

// Two uses of one new statement in one pipeline: the first carries the prepare, the
// second names what the first prepared; both run, in order.
TYPED_TEST(StatementCacheTest, TwoUsesOfOneNewStatementInOnePipelineBothRun) {
  auto db = this->OpenWith("pool_size", "1");
  ASSERT_NE(db, nullptr);
  const std::string insert = "INSERT INTO test_effects (id) VALUES ($1)";
  int attempts = 0;
  Status st = db->Transact([&](Tx& tx) -> Status {
    ++attempts;
    CONVERGE_RETURN_IF_ERROR(tx.ExecDeferred(DeferredCheck::None(), insert, "p1"));
    CONVERGE_RETURN_IF_ERROR(tx.ExecDeferred(DeferredCheck::None(), insert, "p2"));
    return StatusOf(tx.Exec(insert, "p3"));  // a third use, waiting: one pipeline
  });
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(attempts, 1);
  EXPECT_EQ(this->Count(*db, "SELECT count(*) FROM test_effects"), 3);
  EXPECT_EQ(this->Prepared(*db, insert), this->OnPostgres(1, 3));
}

// DEALLOCATE ALL through the Tx drops what the session prepared: the statements after
// it, in the same pipeline and later, prepare afresh and run on their first attempt.
TYPED_TEST(StatementCacheTest, DeallocateAllThroughTheTxIsFollowed) {
  if (!this->IsPostgres()) GTEST_SKIP() << "DEALLOCATE is PostgreSQL's";
  auto db = this->OpenWith("pool_size", "1");
  ASSERT_NE(db, nullptr);
  int attempts = 0;
  ASSERT_TRUE(TestFixture::CountEffects(*db, &attempts).ok());
  attempts = 0;
  Status st = db->Transact([&](Tx& tx) -> Status {
    ++attempts;
    CONVERGE_RETURN_IF_ERROR(StatusOf(tx.Query(kCount, "x")));
    CONVERGE_RETURN_IF_ERROR(StatusOf(tx.Exec("DEALLOCATE ALL")));
    return StatusOf(tx.Query(kCount, "x"));
  });
  EXPECT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(attempts, 1);
  ASSERT_TRUE(TestFixture::CountEffects(*db, &attempts).ok());
  EXPECT_EQ(attempts, 1);
}

// A cache of two: a third statement evicts the least recently used, which is deallocated
// on the server in the same pipeline; the evicted one, used again, is prepared afresh.
TYPED_TEST(StatementCacheTest, AFullCacheEvictsTheLeastRecentlyUsedStatement) {
  auto db = this->OpenWith("statement_cache", "2&pool_size=1");
  ASSERT_NE(db, nullptr);
  const std::string a = "SELECT count(*) FROM test_effects WHERE id = $1";
  const std::string b = "SELECT count(*) FROM test_effects WHERE id < $1";
  const std::string c = "SELECT count(*) FROM test_effects WHERE id > $1";
  auto use = [&](const std::vector<std::string>& sqls) {
    int attempts = 0;
    Status st = db->Transact([&](Tx& tx) -> Status {
      ++attempts;
      for (const std::string& sql : sqls) CONVERGE_RETURN_IF_ERROR(StatusOf(tx.Query(sql, "m")));
      return OkStatus();
    });
    EXPECT_TRUE(st.ok()) << st.ToString();
    EXPECT_EQ(attempts, 1);
  };
  use({a, b, a});  // b is now the least recently used
  use({c});
  EXPECT_EQ(this->Prepared(*db, a), this->OnPostgres(1, 2));
  EXPECT_EQ(this->Prepared(*db, b), this->OnPostgres(0, 0));
  EXPECT_EQ(this->Prepared(*db, c), this->OnPostgres(1, 1));
  use({b, b});
  EXPECT_EQ(this->Prepared(*db, b), this->OnPostgres(1, 2));
}

#if CONVERGE_WITH_POSTGRES  // the test needs a libpq connection of its own
// A pooled connection that broke is replaced, and its prepared statements go with it:
// the new connection prepares afresh instead of naming statements it never had.
TYPED_TEST(StatementCacheTest, ANewConnectionAfterABrokenOnePreparesAfresh) {
  if (!this->IsPostgres()) GTEST_SKIP() << "SQLite has no connection to break";
  auto db = this->OpenWith("pool_size", "1");
  ASSERT_NE(db, nullptr);
  int attempts = 0;
  ASSERT_TRUE(TestFixture::CountEffects(*db, &attempts).ok());
  ASSERT_EQ(this->Prepared(*db, kCount), this->OnPostgres(1, 1));
  int64_t pid = 0;
  ASSERT_TRUE(db->Transact([&](Tx& tx) -> Status {
                  CONVERGE_ASSIGN_OR_RETURN(Rows rows, tx.Query("SELECT pg_backend_pid()"));
                  pid = rows[0].Int(0);
                  return OkStatus();
                }).ok());
  PGconn* c = PQconnectdb(this->store_.libpq_uri.c_str());
  const std::string kill = "SELECT pg_terminate_backend(" + std::to_string(pid) + ", 20000)";
  PGresult* r = PQexec(c, kill.c_str());
  EXPECT_EQ(PQresultStatus(r), PGRES_TUPLES_OK) << PQerrorMessage(c);
  if (PQresultStatus(r) == PGRES_TUPLES_OK) {
    EXPECT_STREQ(PQgetvalue(r, 0, 0), "t");
  }
  PQclear(r);
  PQfinish(c);
  // The first use finds the connection dead (kUnavailable, not retried); the pool
  // replaces it for the next.
  Status st = TestFixture::CountEffects(*db, &attempts);
  EXPECT_EQ(st.code(), StatusCode::kUnavailable) << st.ToString();
  st = TestFixture::CountEffects(*db, &attempts);
  EXPECT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(attempts, 1);
  EXPECT_EQ(this->Prepared(*db, kCount), this->OnPostgres(1, 1));
}
#endif  // CONVERGE_WITH_POSTGRES

// Another process migrates a table under a statement this connection prepared. A plan
// whose result type is unchanged is re-planned by the server; one whose result type
// changed (SELECT * gains a column) is answered "cached plan must not change result
// type": the transaction runs again, prepares afresh and sees the new column.
TYPED_TEST(StatementCacheTest, AMigrationThatChangesATableIsFollowed) {
  auto db = this->OpenWith("pool_size", "1");
  ASSERT_NE(db, nullptr);
  ASSERT_TRUE(db->Transact([](Tx& tx) -> Status {
                  CONVERGE_RETURN_IF_ERROR(tx.Exec("CREATE TABLE migrated (a TEXT)"));
                  return StatusOf(tx.Exec("INSERT INTO migrated (a) VALUES ('one')"));
                }).ok());
  const std::string select = "SELECT * FROM migrated WHERE a <> $1";
  const std::string insert = "INSERT INTO migrated (a) VALUES ($1)";
  auto run = [&](int* attempts, size_t* columns) {
    *attempts = 0;
    return db->Transact([&](Tx& tx) -> Status {
      ++*attempts;
      CONVERGE_RETURN_IF_ERROR(StatusOf(tx.Exec(insert, "more")));
      CONVERGE_ASSIGN_OR_RETURN(Rows rows, tx.Query(select, "none"));
      *columns = rows.empty() ? 0 : rows[0].size();
      return OkStatus();
    });
  };
  int attempts = 0;
  size_t columns = 0;
  ASSERT_TRUE(run(&attempts, &columns).ok());
  EXPECT_EQ(columns, 1u);
  EXPECT_EQ(this->Prepared(*db, select), this->OnPostgres(1, 1));

  auto other = this->Open();  // another pool: the migrating process
  ASSERT_NE(other, nullptr);
  ASSERT_TRUE(other->Transact([](Tx& tx) {
                     return StatusOf(
                         tx.Exec("ALTER TABLE migrated ADD COLUMN b TEXT NOT NULL DEFAULT 'x'"));
                   }).ok());
  Status st = run(&attempts, &columns);
  EXPECT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(columns, 2u);
  // PostgreSQL ran fn twice: once into the stale plan, once prepared afresh.
  EXPECT_EQ(attempts, this->IsPostgres() ? 2 : 1);
  EXPECT_EQ(this->Count(*db, "SELECT count(*) FROM migrated"), 3);  // one insert per commit
  st = run(&attempts, &columns);
  EXPECT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(attempts, 1);
}

}  // namespace
}  // namespace converge
