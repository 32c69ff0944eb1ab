#include "converge/database.h"

#include <atomic>
#include <fstream>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "tests/unit/test_util.h"

namespace converge {
namespace {

using testing::OpenSqlite;
using testing::QueryInt;
using testing::TempDir;

class DatabaseTest : public ::testing::Test {
 protected:
  void SetUp() override {
    db_ = OpenSqlite(dir_.File("db.sqlite"));
    ASSERT_NE(db_, nullptr);
    ASSERT_TRUE(db_->Transact([](Tx& tx) {
                     return StatusOf(tx.Exec("CREATE TABLE t (k TEXT PRIMARY KEY, v INTEGER)"));
                   }).ok());
  }
  TempDir dir_;
  std::unique_ptr<Database> db_;
};

TEST_F(DatabaseTest, AppliesMigrationsOnOpen) {
  EXPECT_EQ(QueryInt(*db_, "SELECT max(version) FROM converge_schema"), 5);
  EXPECT_EQ(QueryInt(*db_, "SELECT count(*) FROM idempotency_keys"), 0);
  EXPECT_EQ(QueryInt(*db_, "SELECT count(*) FROM outbox_events"), 0);
  EXPECT_EQ(QueryInt(*db_, "SELECT count(*) FROM dead_letters"), 0);
}

TEST_F(DatabaseTest, BindsDollarPlaceholdersOfEveryType) {
  ASSERT_TRUE(db_->Transact([](Tx& tx) -> Status {
                   CONVERGE_RETURN_IF_ERROR(tx.Exec(
                       "CREATE TABLE types (i INTEGER, d REAL, s TEXT, b BLOB, n TEXT)"));
                   return StatusOf(tx.Exec("INSERT INTO types VALUES ($1, $2, $3, $4, $5)",
                                           42, 2.5, "text", Blob{std::string("\0x", 2)},
                                           nullptr));
                 }).ok());
  Rows rows;
  ASSERT_TRUE(db_->Read([&](Tx& tx) -> Status {
                   CONVERGE_ASSIGN_OR_RETURN(rows, tx.Query("SELECT i, d, s, b, n FROM types"));
                   return OkStatus();
                 }).ok());
  ASSERT_EQ(rows.size(), 1u);
  EXPECT_EQ(rows[0].Int(0), 42);
  EXPECT_DOUBLE_EQ(rows[0].Double(1), 2.5);
  EXPECT_EQ(rows[0].Text(2), "text");
  EXPECT_EQ(std::get<Blob>(rows[0][3]).bytes, std::string("\0x", 2));
  EXPECT_TRUE(rows[0].IsNull(4));
}

TEST_F(DatabaseTest, ReusedPlaceholderBindsTheSameValue) {
  ASSERT_TRUE(db_->Transact([](Tx& tx) {
                   return StatusOf(tx.Exec("INSERT INTO t VALUES ($1, length($1))", "abcd"));
                 }).ok());
  EXPECT_EQ(QueryInt(*db_, "SELECT v FROM t WHERE k = 'abcd'"), 4);
}

TEST_F(DatabaseTest, ReportsMissingParametersAndOtherPlaceholders) {
  Status st =
      db_->Transact([](Tx& tx) { return StatusOf(tx.Exec("INSERT INTO t VALUES ($1, $2)", "x")); });
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st.ToString();
  st = db_->Transact(
      [](Tx& tx) { return StatusOf(tx.Exec("INSERT INTO t VALUES (?, ?)", "x", 1)); });
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st.ToString();
  st = db_->Transact([](Tx& tx) { return StatusOf(tx.Exec("INSERT INTO nowhere VALUES (1)")); });
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st.ToString();
}

TEST_F(DatabaseTest, UniqueViolationIsAlreadyExistsAndRollsBackTheCall) {
  ASSERT_TRUE(
      db_->Transact([](Tx& tx) { return StatusOf(tx.Exec("INSERT INTO t VALUES ('a', 1)")); })
          .ok());
  Status st = db_->Transact([](Tx& tx) -> Status {
    CONVERGE_RETURN_IF_ERROR(tx.Exec("INSERT INTO t VALUES ('b', 2)"));
    return StatusOf(tx.Exec("INSERT INTO t VALUES ('a', 3)"));
  });
  EXPECT_EQ(st.code(), StatusCode::kAlreadyExists);
  EXPECT_EQ(QueryInt(*db_, "SELECT count(*) FROM t"), 1);
}

TEST_F(DatabaseTest, AbortedRerunsTheFunction) {
  int runs = 0;
  Status st = db_->Transact([&](Tx& tx) -> Status {
    ++runs;
    CONVERGE_RETURN_IF_ERROR(tx.Exec("INSERT INTO t VALUES ('x', $1)", runs));
    if (runs < 3) return AbortedError("conflict");
    return OkStatus();
  });
  EXPECT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(runs, 3);
  EXPECT_EQ(QueryInt(*db_, "SELECT v FROM t WHERE k = 'x'"), 3);
}

TEST_F(DatabaseTest, AbortedGivesUpAfterMaxAttempts) {
  int runs = 0;
  Status st = db_->Transact([&](Tx&) {
    ++runs;
    return AbortedError("always");
  });
  EXPECT_EQ(st.code(), StatusCode::kAborted);
  EXPECT_EQ(runs, DatabaseOptions().max_attempts);
}

TEST_F(DatabaseTest, NestedTransactJoinsTheOuterTransaction) {
  Status st = db_->Transact([&](Tx& tx) -> Status {
    CONVERGE_RETURN_IF_ERROR(tx.Exec("INSERT INTO t VALUES ('outer', 1)"));
    Status inner = db_->Transact([](Tx& t2) -> Status {
      CONVERGE_RETURN_IF_ERROR(t2.Exec("INSERT INTO t VALUES ('inner', 1)"));
      return InvalidArgumentError("inner fails");
    });
    EXPECT_EQ(inner.code(), StatusCode::kInvalidArgument);
    return OkStatus();
  });
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(QueryInt(*db_, "SELECT count(*) FROM t WHERE k = 'outer'"), 1);
  EXPECT_EQ(QueryInt(*db_, "SELECT count(*) FROM t WHERE k = 'inner'"), 0);
}

TEST_F(DatabaseTest, CommitHooksRunOnlyForWhatCommitted) {
  int fired = 0;
  ASSERT_TRUE(db_->Transact([&](Tx& tx) -> Status {
                   tx.OnCommit([&] { fired += 1; });
                   Status inner = tx.Savepoint([&](Tx& t) {
                     t.OnCommit([&] { fired += 100; });
                     return InvalidArgumentError("roll me back");
                   });
                   EXPECT_FALSE(inner.ok());
                   return tx.Savepoint([&](Tx& t) {
                     t.OnCommit([&] { fired += 10; });
                     return OkStatus();
                   });
                 }).ok());
  EXPECT_EQ(fired, 11);
  (void)db_->Transact([&](Tx& tx) {
    tx.OnCommit([&] { fired += 1000; });
    return InvalidArgumentError("whole call fails");
  });
  EXPECT_EQ(fired, 11);
}

TEST_F(DatabaseTest, ReadCannotWrite) {
  Status st = db_->Read([](Tx& tx) { return StatusOf(tx.Exec("INSERT INTO t VALUES ('r', 1)")); });
  EXPECT_FALSE(st.ok());
  EXPECT_EQ(QueryInt(*db_, "SELECT count(*) FROM t"), 0);
}

TEST_F(DatabaseTest, ExceptionInFunctionBecomesInternalAndRollsBack) {
  Status st = db_->Transact([](Tx& tx) -> Status {
    (void)tx.Exec("INSERT INTO t VALUES ('e', 1)");
    throw std::runtime_error("boom");
  });
  EXPECT_EQ(st.code(), StatusCode::kInternal);
  EXPECT_EQ(QueryInt(*db_, "SELECT count(*) FROM t"), 0);
}

// The writer runs queued calls as one physical transaction with a savepoint each: a
// failing call rolls back alone and its neighbours commit.
TEST_F(DatabaseTest, GroupCommitFailingCallLeavesNeighboursCommitted) {
  constexpr int kCallers = 32;
  std::atomic<bool> release{false};
  std::atomic<bool> holding{false};
  std::thread blocker([&] {
    // Holds the writer so the callers below queue up behind it and land in one batch.
    Status st = db_->Transact([&](Tx& tx) -> Status {
      holding = true;
      testing::WaitUntil([&] { return release.load(); });
      return StatusOf(tx.Exec("INSERT INTO t VALUES ('blocker', 0)"));
    });
    EXPECT_TRUE(st.ok()) << st.ToString();
  });
  bool held = testing::WaitUntil([&] { return holding.load(); });
  std::vector<std::thread> callers;
  std::vector<Status> results(kCallers);
  for (int i = 0; i < kCallers; ++i) {
    callers.emplace_back([&, i] {
      results[i] = db_->Transact([i](Tx& tx) -> Status {
        CONVERGE_RETURN_IF_ERROR(
            tx.Exec("INSERT INTO t VALUES ($1, $2)", "k" + std::to_string(i), i));
        if (i == 7) return FailedPreconditionError("caller 7 fails after writing");
        return OkStatus();
      });
    });
  }
  bool all_queued = held && testing::WaitUntil([&] { return db_->stats().queued == kCallers; });
  release = true;
  blocker.join();
  for (auto& t : callers) t.join();
  ASSERT_TRUE(all_queued);
  for (int i = 0; i < kCallers; ++i) {
    if (i == 7) {
      EXPECT_EQ(results[i].code(), StatusCode::kFailedPrecondition);
    } else {
      EXPECT_TRUE(results[i].ok()) << i << ": " << results[i].ToString();
    }
  }
  EXPECT_EQ(QueryInt(*db_, "SELECT count(*) FROM t WHERE k LIKE 'k%'"), kCallers - 1);
  EXPECT_EQ(QueryInt(*db_, "SELECT count(*) FROM t WHERE k = 'k7'"), 0);
  DatabaseStats s = db_->stats();
  EXPECT_GE(s.largest_batch, kCallers);
  EXPECT_LT(s.commits, s.transactions);
}

TEST_F(DatabaseTest, CommittedWorkSurvivesReopen) {
  ASSERT_TRUE(
      db_->Transact([](Tx& tx) { return StatusOf(tx.Exec("INSERT INTO t VALUES ('d', 1)")); })
          .ok());
  db_.reset();
  db_ = OpenSqlite(dir_.File("db.sqlite"));
  EXPECT_EQ(QueryInt(*db_, "SELECT count(*) FROM t WHERE k = 'd'"), 1);
}

TEST(DatabaseOpen, RejectsUnknownSchemeAndBadPaths) {
  auto r = Database::Open("mysql://x");
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code(), StatusCode::kInvalidArgument);
  r = Database::Open("sqlite:");
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code(), StatusCode::kInvalidArgument);
  r = Database::Open("sqlite:/nonexistent-dir-for-converge/x/db.sqlite");
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code(), StatusCode::kUnavailable) << r.error().ToString();
}

TEST(DatabaseOpen, RefusesASchemaNewerThanTheBinary) {
  TempDir dir;
  {
    auto db = OpenSqlite(dir.File("db.sqlite"));
    ASSERT_TRUE(db->Transact([](Tx& tx) {
                    return StatusOf(tx.Exec("INSERT INTO converge_schema (version) VALUES (999)"));
                  }).ok());
  }
  auto r = Database::Open("sqlite:" + dir.File("db.sqlite"));
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(r.error().reason(), reason::kSchemaTooNew);
}

TEST(DatabaseOpen, RefusesAFileThatIsNotADatabase) {
  TempDir dir;
  std::ofstream(dir.File("junk")) << std::string(4096, 'x');
  auto r = Database::Open("sqlite:" + dir.File("junk"));
  ASSERT_FALSE(r);
  EXPECT_FALSE(r.error().message().empty());
}

}  // namespace
}  // namespace converge

namespace converge {
namespace {

// Only a backend may take a transaction's commit hooks (#8): a caller that could would
// run or drop hooks of a transaction that has not committed.
template <class T>
concept CanTakeCommitHooks = requires(T& tx) { tx.TakeCommitHooks(); };
static_assert(!CanTakeCommitHooks<Tx>, "Tx::TakeCommitHooks must not be public");

}  // namespace
}  // namespace converge
