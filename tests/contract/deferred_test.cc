// Deferred statements (Tx::ExecDeferred, database.h): a write whose answer is read only
// when the transaction next waits for the server, or with its COMMIT (PostgreSQL pipeline
// mode; SQLite runs it at once). Every failure of a deferred statement must surface as
// the Status the same statement gives at once, roll the whole transaction back, and leave
// the pooled connection fit for the next transaction. Each store runs the contract; the
// tests of a lock wait, a takeover racing a paused writer and a broken connection need a
// second concurrent writer or a connection, which only PostgreSQL has.
#if CONVERGE_WITH_POSTGRES
#include <libpq-fe.h>
#endif

#include <atomic>
#include <optional>
#include <stdexcept>
#include <thread>

#include <gtest/gtest.h>

#include "converge/failpoint.h"
#include "converge/idempotency.h"
#include "converge/outbox.h"
#include "tests/contract/store_fixture.h"
#include "tests/unit/test_util.h"

namespace converge {
namespace {

using namespace std::chrono_literals;

template <class Store>
class DeferredWrites : public StoreContract<Store> {
 protected:
  void TearDown() override { ASSERT_TRUE(failpoint::Configure("").ok()); }

  // The store again with `param` added to its URI (a store that does not take it gets
  // the URI unchanged). pool_size=1 makes every transaction reuse the one connection
  // that the failure before it used.
  std::unique_ptr<Database> OpenWith(const std::string& name, const std::string& value) {
    auto db = Database::Open(Database::WithDefaultParameter(this->store_.uri, name, value));
    EXPECT_TRUE(db) << db.error().ToString();
    return db ? std::move(*db) : nullptr;
  }
  static Status DeferredEffect(Tx& tx, const std::string& id) {
    return tx.ExecDeferred(DeferredCheck::None(), "INSERT INTO test_effects (id) VALUES ($1)",
                           id);
  }
  // The pooled connection that just failed still works, and commits.
  void ExpectTheConnectionWorks(Database& db, const std::string& id) {
    Status st = db.Transact([&](Tx& tx) -> Status {
      CONVERGE_RETURN_IF_ERROR(DeferredEffect(tx, id));
      return StatusOf(tx.Exec("UPDATE test_effects SET id = id WHERE id = $1", id));
    });
    EXPECT_TRUE(st.ok()) << st.ToString();
    EXPECT_EQ(this->Count(db, "SELECT count(*) FROM test_effects WHERE id = '" + id + "'"), 1);
  }
};

TYPED_TEST_SUITE(DeferredWrites, Stores, StoreNames);

TYPED_TEST(DeferredWrites, AUniqueViolationFailsTheCommitAndNothingCommits) {
  auto db = this->OpenWith("pool_size", "1");
  ASSERT_NE(db, nullptr);
  Status st = db->Transact([](Tx& tx) -> Status {
    CONVERGE_RETURN_IF_ERROR(TestFixture::Effect(tx, "a"));
    CONVERGE_RETURN_IF_ERROR(TestFixture::DeferredEffect(tx, "b"));
    CONVERGE_RETURN_IF_ERROR(TestFixture::DeferredEffect(tx, "a"));  // the duplicate
    return TestFixture::DeferredEffect(tx, "c");
  });
  EXPECT_EQ(st.code(), StatusCode::kAlreadyExists) << st.ToString();
  EXPECT_EQ(this->Count(*db, "SELECT count(*) FROM test_effects"), 0);
  this->ExpectTheConnectionWorks(*db, "after");
}

// A statement that waits for the server answers the deferred ones before it first: their
// error comes back from it, never reordered behind its own or lost.
TYPED_TEST(DeferredWrites, TheNextWaitingStatementReturnsTheDeferredError) {
  auto db = this->OpenWith("pool_size", "1");
  ASSERT_NE(db, nullptr);
  ASSERT_TRUE(db->Transact([](Tx& tx) { return TestFixture::Effect(tx, "a"); }).ok());
  std::optional<Status> next;
  Status st = db->Transact([&](Tx& tx) -> Status {
    Status queued = TestFixture::DeferredEffect(tx, "a");
    if (!queued.ok()) return queued;  // SQLite: at once
    Result<Rows> rows = tx.Query("SELECT count(*) FROM test_effects");
    next = StatusOf(rows);
    return next->ok() ? OkStatus() : *next;
  });
  EXPECT_EQ(st.code(), StatusCode::kAlreadyExists) << st.ToString();
  if (next) {
    EXPECT_EQ(next->code(), StatusCode::kAlreadyExists) << next->ToString();
  }
  EXPECT_EQ(this->Count(*db, "SELECT count(*) FROM test_effects"), 1);
  this->ExpectTheConnectionWorks(*db, "after");
}

// A deferred statement changing another number of rows than its check wants fails the
// transaction with the check's own Status (code and reason), as the same check at once.
TYPED_TEST(DeferredWrites, AFailedRowCountCheckIsTheTransactionsStatus) {
  auto db = this->OpenWith("pool_size", "1");
  ASSERT_NE(db, nullptr);
  const Status gone(StatusCode::kFailedPrecondition, "the row is gone", reason::kFenced);
  Status st = db->Transact([&](Tx& tx) -> Status {
    CONVERGE_RETURN_IF_ERROR(TestFixture::Effect(tx, "a"));
    CONVERGE_RETURN_IF_ERROR(tx.ExecDeferred(DeferredCheck::Changes(1, gone),
                                             "UPDATE test_effects SET id = id WHERE id = $1",
                                             "missing"));
    return TestFixture::DeferredEffect(tx, "b");
  });
  EXPECT_EQ(st.code(), gone.code()) << st.ToString();
  EXPECT_EQ(st.reason(), gone.reason()) << st.ToString();
  EXPECT_EQ(this->Count(*db, "SELECT count(*) FROM test_effects"), 0);
  // The check passes when the count is right.
  EXPECT_TRUE(db->Transact([&](Tx& tx) -> Status {
                  CONVERGE_RETURN_IF_ERROR(TestFixture::Effect(tx, "a"));
                  return tx.ExecDeferred(DeferredCheck::Changes(1, gone),
                                         "UPDATE test_effects SET id = 'a2' WHERE id = $1", "a");
                }).ok());
  EXPECT_EQ(this->Count(*db, "SELECT count(*) FROM test_effects WHERE id = 'a2'"), 1);
  this->ExpectTheConnectionWorks(*db, "after");
}

// Inside a savepoint a deferred failure rolls back the savepoint only, with its Status.
TYPED_TEST(DeferredWrites, AFailureInsideASavepointRollsBackOnlyTheSavepoint) {
  Status inner;
  Status st = this->db_->Transact([&](Tx& tx) -> Status {
    CONVERGE_RETURN_IF_ERROR(TestFixture::Effect(tx, "outer"));
    inner = tx.Savepoint([](Tx& t) -> Status {
      CONVERGE_RETURN_IF_ERROR(TestFixture::DeferredEffect(t, "inner"));
      return TestFixture::DeferredEffect(t, "outer");  // the duplicate
    });
    return TestFixture::DeferredEffect(tx, "later");
  });
  EXPECT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(inner.code(), StatusCode::kAlreadyExists) << inner.ToString();
  EXPECT_EQ(this->Count("SELECT count(*) FROM test_effects"), 2);  // outer, later
}

// Review (issue 10): a savepoint whose fn returns its own error while one of its deferred
// statements failed must still roll back to the savepoint only, as on SQLite (where the
// statement fails at once and fn goes on to return its error): the enclosing transaction
// goes on and commits. On PostgreSQL the ROLLBACK TO SAVEPOINT is pipelined behind the
// failed statement, skipped, and the whole transaction is left aborted.
TYPED_TEST(DeferredWrites, ASavepointFailingWithAFailedDeferredStatementRollsBackOnlyItself) {
  Status inner;
  Status st = this->db_->Transact([&](Tx& tx) -> Status {
    CONVERGE_RETURN_IF_ERROR(TestFixture::Effect(tx, "outer"));
    inner = tx.Savepoint([](Tx& t) -> Status {
      CONVERGE_RETURN_IF_ERROR(TestFixture::DeferredEffect(t, "inner"));
      (void)TestFixture::DeferredEffect(t, "outer");  // the duplicate (SQLite: fails here)
      return InvalidArgumentError("fn's own failure");
    });
    return TestFixture::DeferredEffect(tx, "later");
  });
  EXPECT_FALSE(inner.ok());
  EXPECT_TRUE(st.ok()) << "the enclosing transaction failed: " << st.ToString()
                       << " (the savepoint returned " << inner.ToString() << ")";
  EXPECT_EQ(this->Count("SELECT count(*) FROM test_effects"), 2);  // outer, later
}

// Review (issue 10): fn throwing while deferred statements are queued (one of them
// failing, or none) leaves the pooled connection clean for the next transaction.
TYPED_TEST(DeferredWrites, AnExceptionWithStatementsQueuedLeavesTheConnectionClean) {
  auto db = this->OpenWith("pool_size", "1");
  ASSERT_NE(db, nullptr);
  ASSERT_TRUE(db->Transact([](Tx& tx) { return TestFixture::Effect(tx, "a"); }).ok());
  for (const char* dup : {"b", "a"}) {
    Status st = db->Transact([&](Tx& tx) -> Status {
      (void)TestFixture::DeferredEffect(tx, "b");
      (void)TestFixture::DeferredEffect(tx, dup);
      throw std::runtime_error("fn threw");
    });
    EXPECT_EQ(st.code(), StatusCode::kInternal) << st.ToString();
    EXPECT_EQ(this->Count(*db, "SELECT count(*) FROM test_effects"), 1);
  }
  this->ExpectTheConnectionWorks(*db, "after");
}

// A completion's fence check and stored response are deferred: a takeover that happens
// while the first holder is paused after its effect (nothing of its transaction sent yet)
// makes its commit fail with kFenced, and neither its effect nor its response commits.
// SQLite runs one writer at a time: the takeover could only queue behind the holder.
TYPED_TEST(DeferredWrites, ACompletionFencedWhilePausedFailsAtCommit) {
  if (!this->IsPostgres()) GTEST_SKIP() << "SQLite serialises writers";
  ManualClock clock;
  IdempotencyKeys keys(*this->db_, {.ttl = 60s, .lease = 5s}, &clock);
  auto begun = keys.Begin({"t", "k", "f"});
  ASSERT_TRUE(begun) << begun.error().ToString();
  KeyLease stale = begun->lease;
  ASSERT_TRUE(failpoint::Configure("idempotency.after_effect_before_response=pause*1").ok());
  std::optional<Result<Outcome>> completed;
  std::thread holder([&] {
    completed = keys.Complete(stale, [](Tx& tx) -> Result<StoredResponse> {
      CONVERGE_RETURN_IF_ERROR(TestFixture::DeferredEffect(tx, "stale-effect"));
      return StoredResponse{201, {}, "stale"};
    });
  });
  const bool paused = failpoint::WaitPaused("idempotency.after_effect_before_response", 20s);
  EXPECT_TRUE(paused);
  clock.Advance(6s);  // the holder's lease lapsed: a retry takes over
  auto taken = keys.Begin({"t", "k", "f"});
  failpoint::Release("idempotency.after_effect_before_response");
  holder.join();
  ASSERT_TRUE(taken) << taken.error().ToString();
  EXPECT_EQ(taken->kind, Begun::Kind::kResumed);
  EXPECT_GT(taken->lease.fence, stale.fence);
  ASSERT_TRUE(completed.has_value());
  ASSERT_FALSE(*completed) << "a completion under a stale fence committed";
  EXPECT_EQ(completed->error().reason(), reason::kFenced) << completed->error().ToString();
  EXPECT_EQ(this->Count("SELECT count(*) FROM test_effects"), 0);
  EXPECT_EQ(this->Count("SELECT count(*) FROM idempotency_keys WHERE status = 'in_progress' "
                        "AND fence = " + std::to_string(taken->lease.fence)),
            1);
  // The new holder completes; the connection the stale one used serves it.
  auto done = keys.Complete(taken->lease, [](Tx& tx) -> Result<StoredResponse> {
    CONVERGE_RETURN_IF_ERROR(TestFixture::DeferredEffect(tx, "effect"));
    return StoredResponse{201, {}, "fresh"};
  });
  ASSERT_TRUE(done) << done.error().ToString();
  EXPECT_EQ(this->Count("SELECT count(*) FROM test_effects"), 1);
}

// An outbox enqueue takes its aggregate's lock as a deferred statement: a lock timeout
// behind another producer surfaces from the commit as kUnavailable with kLockTimeout, and
// the transaction rolls back whole.
TYPED_TEST(DeferredWrites, ALockTimeoutOfADeferredEnqueueFailsTheCommit) {
  if (!this->IsPostgres()) GTEST_SKIP() << "SQLite serialises writers: no lock to wait for";
  auto db = Database::Open(this->store_.uri +
                           (this->store_.uri.find('?') == std::string::npos ? "?" : "&") +
                           "lock_timeout_ms=200&pool_size=2");
  ASSERT_TRUE(db) << db.error().ToString();
  Outbox outbox;
  ASSERT_TRUE(failpoint::Configure("test.holder=pause*1").ok());
  Status held;
  std::thread holder([&] {
    held = (*db)->Transact([&](Tx& tx) -> Status {
      CONVERGE_RETURN_IF_ERROR(StatusOf(outbox.Enqueue(tx, TestFixture::MakeEvent("agg-1"))));
      CONVERGE_RETURN_IF_ERROR(TestFixture::Effect(tx, "holder"));  // waits: the lock is held
      return failpoint::Hit("test.holder");
    });
  });
  const bool paused = failpoint::WaitPaused("test.holder", 20s);
  EXPECT_TRUE(paused);
  Status st = (*db)->Transact([&](Tx& tx) -> Status {
    CONVERGE_RETURN_IF_ERROR(TestFixture::Effect(tx, "second"));
    CONVERGE_RETURN_IF_ERROR(StatusOf(outbox.Enqueue(tx, TestFixture::MakeEvent("agg-1"))));
    return TestFixture::DeferredEffect(tx, "second-late");
  });
  failpoint::Release("test.holder");
  holder.join();
  EXPECT_TRUE(held.ok()) << held.ToString();
  EXPECT_EQ(st.code(), StatusCode::kUnavailable) << st.ToString();
  EXPECT_EQ(st.reason(), reason::kLockTimeout) << st.ToString();
  EXPECT_EQ(this->Count(**db, "SELECT count(*) FROM test_effects"), 1);  // the holder's
  EXPECT_EQ(this->Count(**db, "SELECT count(*) FROM outbox_events"), 1);
  this->ExpectTheConnectionWorks(**db, "after");
}

#if CONVERGE_WITH_POSTGRES  // the test needs a libpq connection of its own
// A connection killed after statements were queued and before the commit that carries
// them: the server's own answer to the first of them says it failed, so nothing after it
// ran (COMMIT included): a definite kUnavailable, as when the same statement runs at once
// on a killed connection, not an unknown outcome. The pool replaces the connection.
TYPED_TEST(DeferredWrites, AConnectionKilledBetweenQueueingAndCommitFailsDefinitely) {
  if (!this->IsPostgres()) GTEST_SKIP() << "SQLite has no connection to break";
  auto db = this->OpenWith("pool_size", "1");
  ASSERT_NE(db, nullptr);
  ASSERT_TRUE(failpoint::Configure("postgres.before_commit=pause*1").ok());
  Status st;
  std::thread writer([&] {
    st = db->Transact([](Tx& tx) -> Status {
      CONVERGE_RETURN_IF_ERROR(TestFixture::Effect(tx, "a"));
      return TestFixture::DeferredEffect(tx, "b");
    });
  });
  const bool paused = failpoint::WaitPaused("postgres.before_commit", 20s);
  EXPECT_TRUE(paused);
  if (paused) {
    PGconn* c = PQconnectdb(this->store_.libpq_uri.c_str());
    PGresult* r = PQexec(c, "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 20000)) "
                            "FROM pg_stat_activity WHERE datname = current_database() AND "
                            "application_name = 'converge' AND state = 'idle in transaction'");
    EXPECT_EQ(PQresultStatus(r), PGRES_TUPLES_OK) << PQerrorMessage(c);
    if (PQresultStatus(r) == PGRES_TUPLES_OK) {
      EXPECT_STREQ(PQgetvalue(r, 0, 0), "1");
    }
    PQclear(r);
    PQfinish(c);
  }
  failpoint::Release("postgres.before_commit");
  writer.join();
  EXPECT_EQ(st.code(), StatusCode::kUnavailable) << st.ToString();
  EXPECT_NE(st.reason(), reason::kCommitOutcomeUnknown) << st.ToString();
  EXPECT_EQ(this->Count(*db, "SELECT count(*) FROM test_effects"), 0);
  this->ExpectTheConnectionWorks(*db, "after");
}
#endif  // CONVERGE_WITH_POSTGRES

}  // namespace
}  // namespace converge
