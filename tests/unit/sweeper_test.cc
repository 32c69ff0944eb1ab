// The sweeper on a store that sweeps in key order (SQLite, Dialect::SweepsInKeyOrder):
// idempotency_keys and consumer_inbox walked a window at a time, the walk paced over its
// pass. What the sweeper deletes, and on which backends, is StoreContract's
// (tests/contract/); this is where and when, on SQLite.
#include "converge/sweeper.h"

#include <cstdio>
#include <string>

#include <gtest/gtest.h>

#include "converge/clock.h"
#include "tests/unit/test_util.h"

namespace converge {
namespace {

using namespace std::chrono_literals;
using testing::QueryInt;

class KeyOrderSweep : public ::testing::Test {
 protected:
  void SetUp() override {
    db_ = testing::OpenSqlite(dir_.File("db.sqlite"));
    ASSERT_NE(db_, nullptr);
  }
  // A key of scope "t", finished, expiring at `expires_at`; or, with `charged`, one whose
  // work went past its first phase and is unfinished: never forgotten (idempotency.h).
  void Key(const std::string& key, int64_t expires_at, bool charged = false) {
    ASSERT_TRUE(db_->Transact([&](Tx& tx) {
                     return StatusOf(tx.Exec(
                         "INSERT INTO idempotency_keys (scope, key, request_hash, status, "
                         "recovery_point, lease_until, fence, created_at, updated_at, "
                         "expires_at) VALUES ('t', $1, 'h', $2, $3, 0, 1, 0, 0, $4)",
                         key, charged ? "in_progress" : "completed",
                         charged ? "charged" : "finished", expires_at));
                   }).ok());
  }
  void InboxRow(const std::string& event, int64_t expires_at) {
    ASSERT_TRUE(db_->Transact([&](Tx& tx) {
                     return StatusOf(tx.Exec(
                         "INSERT INTO consumer_inbox (consumer, source, event_id, "
                         "processed_at, expires_at) VALUES ('c', 's', $1, 0, $2)",
                         event, expires_at));
                   }).ok());
  }
  bool HasKey(const std::string& key) {
    return QueryInt(*db_, "SELECT count(*) FROM idempotency_keys WHERE key = '" + key + "'") ==
           1;
  }
  int64_t Keys() { return QueryInt(*db_, "SELECT count(*) FROM idempotency_keys"); }

  testing::TempDir dir_;
  std::unique_ptr<Database> db_;
  ManualClock clock_;
};

TEST_F(KeyOrderSweep, TheStoreKeepsNoExpiryIndex) {
  EXPECT_EQ(QueryInt(*db_, "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name "
                           "IN ('idempotency_keys_expires', 'consumer_inbox_expires')"),
            0);
}

// Each call deletes the forgettable rows of the next `batch` rows in key order, and of
// no other; the walk starts over after the end of its table.
TEST_F(KeyOrderSweep, EachCallDeletesTheExpiredRowsOfOneWindowInKeyOrder) {
  const int64_t now = clock_.NowMillis();
  // k0..k9, the even ones expired, and k5 expired but unfinished past its first phase.
  for (int i = 0; i < 10; ++i) {
    Key("k" + std::to_string(i), i % 2 == 0 || i == 5 ? now - 1 : now + 3600'000, i == 5);
  }
  // e0..e6, the odd ones expired.
  for (int i = 0; i < 7; ++i) InboxRow("e" + std::to_string(i), i % 2 ? now : now + 1);

  Sweeper sweeper(*db_,
                  {.batch = 4, .inbox_key_order_pass = 6h, .key_order_window = 4,
                   .key_order_windows = 1},
                  &clock_);  // both walks at the keys' default pass, 6 h
  auto first = sweeper.RunOnce();  // k0..k3, e0..e3
  ASSERT_TRUE(first) << first.error().ToString();
  EXPECT_EQ(first->keys, 2);
  EXPECT_EQ(first->inbox, 2);
  EXPECT_FALSE(HasKey("k0"));
  EXPECT_FALSE(HasKey("k2"));
  EXPECT_TRUE(HasKey("k4"));  // expired, beyond the window
  EXPECT_TRUE(HasKey("k8"));
  EXPECT_EQ(first->walks_completed, 0);
  EXPECT_TRUE(first->more);  // the sweeper's first walk runs flat out

  auto second = sweeper.RunOnce();  // k4..k7 (k5 stays); e4..e6, the end of the inbox
  ASSERT_TRUE(second) << second.error().ToString();
  EXPECT_EQ(second->keys, 2);
  EXPECT_EQ(second->inbox, 1);
  EXPECT_TRUE(HasKey("k5"));
  EXPECT_TRUE(HasKey("k8"));
  EXPECT_EQ(second->walks_completed, 1);
  EXPECT_TRUE(second->more);  // the keys' first walk is not over

  auto third = sweeper.RunOnce();  // k8, k9: the end of the keys (the inbox is not due)
  ASSERT_TRUE(third) << third.error().ToString();
  EXPECT_EQ(third->keys, 1);
  EXPECT_EQ(third->inbox, 0);
  EXPECT_EQ(third->walks_completed, 1);
  EXPECT_FALSE(third->more);  // both walked through; the next walks are not due yet
  EXPECT_EQ(Keys(), 5);       // k1, k3, k5, k7, k9
  EXPECT_EQ(QueryInt(*db_, "SELECT count(*) FROM consumer_inbox"), 4);

  // Everything expires now. A third of the 6 h pass later, a third of each table's last
  // walk is due: one window of each, from the start.
  clock_.Advance(2h);
  auto again = sweeper.RunOnce();  // k1..k7 (k1, k3, k7 go); e0..e6
  ASSERT_TRUE(again) << again.error().ToString();
  EXPECT_EQ(again->keys, 3);
  EXPECT_EQ(again->inbox, 4);
  EXPECT_FALSE(again->more);
  auto idle = sweeper.RunOnce();  // on schedule: no window, whatever has expired
  ASSERT_TRUE(idle) << idle.error().ToString();
  EXPECT_EQ(idle->keys, 0);
  EXPECT_TRUE(HasKey("k9"));
  // Overdue: the walk goes on to its end.
  clock_.Advance(6h);
  auto last = sweeper.RunOnce();  // k9
  ASSERT_TRUE(last) << last.error().ToString();
  EXPECT_EQ(last->keys, 1);
  EXPECT_EQ(Keys(), 1);  // k5, unfinished past its first phase
}

// A transaction deletes at most `batch`: the window ends at its batch-th forgettable row,
// however many rows key_order_window would allow. While a walk lags, one call walks up to
// key_order_windows windows of it.
TEST_F(KeyOrderSweep, AWindowEndsAtItsBatchthForgettableRowAndACallWalksSeveral) {
  const int64_t now = clock_.NowMillis();
  for (int i = 0; i < 10; ++i) Key("k" + std::to_string(i), i % 2 == 0 ? now : now + 1);
  Sweeper one(*db_, {.batch = 2, .key_order_window = 100, .key_order_windows = 1}, &clock_);
  auto first = one.RunOnce();  // k0..k2
  ASSERT_TRUE(first) << first.error().ToString();
  EXPECT_EQ(first->keys, 2);
  EXPECT_TRUE(HasKey("k3"));
  EXPECT_TRUE(HasKey("k4"));
  EXPECT_TRUE(first->more);

  // Three windows in one call: k1..k5 (k4), k6..k8 (cut at its second forgettable row),
  // k9 (the end of the table: the walk completed, and the next is not due yet).
  Sweeper several(*db_, {.batch = 2, .key_order_window = 4, .key_order_windows = 3},
                  &clock_);
  auto s = several.RunOnce();
  ASSERT_TRUE(s) << s.error().ToString();
  EXPECT_EQ(s->keys, 3);  // k4, k6, k8
  EXPECT_EQ(Keys(), 5);
  EXPECT_GE(s->walks_completed, 1);
  EXPECT_FALSE(s->more);
}

// A walk after the first takes key_order_pass: a window is walked, and a call says
// `more`, while the walk has examined fewer rows than the previous walk did in proportion
// to the pass's time gone, or is overdue.
TEST_F(KeyOrderSweep, AWalkIsPacedOverItsPass) {
  const int64_t far = clock_.NowMillis() + 24 * 3600'000;
  for (int i = 0; i < 100; ++i) {
    Key("k" + std::string(i < 10 ? "0" : "") + std::to_string(i), far);
  }
  Sweeper sweeper(*db_,
                  {.batch = 10, .key_order_pass = 100s, .key_order_window = 10,
                   .key_order_windows = 1},
                  &clock_);
  auto calls_until_settled = [&]() -> int {
    for (int calls = 1; calls <= 100; ++calls) {
      auto s = sweeper.RunOnce();
      EXPECT_TRUE(s) << s.error().ToString();
      if (!s || !s->more) return calls;
    }
    return -1;
  };
  // The first walk, flat out: ten windows of ten. It ends at its eleventh call (the keys
  // run out at the tenth window's last row, so the walk learns of the end only in the
  // eleventh, empty, window).
  const int64_t before = db_->stats().transactions;
  EXPECT_EQ(calls_until_settled(), 11);
  // Nothing had expired, so no window deleted: each call's transactions are the sweeps of
  // the outbox, the effects, the dead letters and the sagas, and three that wrote where a
  // walk stood: the keys' walk at its first window and at its end, the inbox's (an empty
  // table: one window) at its end.
  EXPECT_EQ(db_->stats().transactions - before, 11 * 4 + 3);
  // The second walk begins: nothing is due yet, and no window is walked.
  auto idle = sweeper.RunOnce();
  ASSERT_TRUE(idle) << idle.error().ToString();
  EXPECT_FALSE(idle->more);
  // Half the pass later, half the rows are due.
  clock_.Advance(50s);
  EXPECT_EQ(calls_until_settled(), 5);  // 10, 20, 30, 40, 50
  // Past the pass: overdue, the walk goes on to its end.
  clock_.Advance(60s);
  EXPECT_EQ(calls_until_settled(), 6);  // 60 .. 100, then the empty window
  EXPECT_EQ(Keys(), 100);  // nothing had expired
  // A clock that went back restarts the schedule from there: nothing is due.
  clock_.Advance(-1000s);
  auto back = sweeper.RunOnce();
  ASSERT_TRUE(back) << back.error().ToString();
  EXPECT_FALSE(back->more);
  clock_.Advance(50s);
  EXPECT_EQ(calls_until_settled(), 5);
}

// Where a walk stands is in the store: a sweeper that starts again (a process restarted)
// resumes the walk at its pace, instead of walking flat out from the start; a one-shot
// sweep (resume_walks = false) walks from the start.
TEST_F(KeyOrderSweep, ASweeperThatStartsAgainResumesTheWalkAndItsPace) {
  const int64_t t0 = clock_.NowMillis();
  for (int i = 0; i < 100; ++i) {
    Key("k" + std::string(i < 10 ? "0" : "") + std::to_string(i), t0 + 24 * 3600'000);
  }
  const SweepOptions options = {
      .batch = 10, .key_order_pass = 100s, .key_order_window = 10, .key_order_windows = 1};
  auto calls_until_settled = [&](Sweeper& sweeper) -> int {
    for (int calls = 1; calls <= 100; ++calls) {
      auto s = sweeper.RunOnce();
      EXPECT_TRUE(s) << s.error().ToString();
      if (!s || !s->more) return calls;
    }
    return -1;
  };
  {
    Sweeper first(*db_, options, &clock_);
    EXPECT_EQ(calls_until_settled(first), 11);  // its first walk, flat out
    // Every key expires; half the pass later half the second walk is due: 5 windows,
    // each deleting its 10 keys and writing where the walk stands.
    ASSERT_TRUE(db_->Transact([&](Tx& tx) {
                     return StatusOf(tx.Exec("UPDATE idempotency_keys SET expires_at = $1",
                                             t0 + 1));
                   }).ok());
    clock_.Advance(50s);
    EXPECT_EQ(calls_until_settled(first), 5);
    EXPECT_EQ(Keys(), 50);
  }
  // The process starts again at once: the walk is on schedule, and nothing is walked.
  Sweeper second(*db_, options, &clock_);
  auto idle = second.RunOnce();
  ASSERT_TRUE(idle) << idle.error().ToString();
  EXPECT_FALSE(idle->more);
  EXPECT_EQ(idle->keys, 0);
  // 30 s later, three windows are due, after the last one walked: k50 to k79.
  clock_.Advance(30s);
  EXPECT_EQ(calls_until_settled(second), 3);
  EXPECT_EQ(Keys(), 20);
  EXPECT_FALSE(HasKey("k79"));
  EXPECT_TRUE(HasKey("k80"));
  // A one-shot sweep walks every table through from its start, flat out: the 20 left,
  // then the empty window that ends the walk.
  Sweeper once(*db_,
               {.batch = 10, .key_order_window = 10, .key_order_windows = 1, .resume_walks = false},
               &clock_);
  EXPECT_EQ(calls_until_settled(once), 3);
  EXPECT_EQ(Keys(), 0);
}

// A walk over windows with nothing to delete writes where it stands at its first window
// and at every 16th after: a process that dies after 20 windows (a crash loop) resumes
// after the 17th, not at the start.
TEST_F(KeyOrderSweep, AWalkOverNothingToDeleteStillWritesWhereItStands) {
  for (int i = 0; i < 600; ++i) {
    char key[8];
    std::snprintf(key, sizeof key, "k%03d", i);
    Key(key, clock_.NowMillis() + 24 * 3600'000);
  }
  const SweepOptions options = {.batch = 10, .key_order_window = 10, .key_order_windows = 1};
  auto stored = [&] {
    Rows rows;
    EXPECT_TRUE(db_->Read([&](Tx& tx) -> Status {
                     CONVERGE_ASSIGN_OR_RETURN(
                         rows, tx.Query("SELECT after_key, pass_rows FROM sweep_walks WHERE "
                                        "walk = 'idempotency_keys'"));
                     return OkStatus();
                   }).ok());
    return rows.empty() ? std::string("none")
                        : rows[0].Text(0) + " " + std::to_string(rows[0].Int(1));
  };
  for (int life = 1; life <= 2; ++life) {
    Sweeper sweeper(*db_, options, &clock_);
    for (int i = 0; i < 20; ++i) {
      auto s = sweeper.RunOnce();
      ASSERT_TRUE(s) << s.error().ToString();
      ASSERT_TRUE(s->more);  // a first walk: flat out
    }
    // Saved at its first window and its 17th: after the 17th (each column as its length,
    // ':' and its bytes). The second life starts after the first's k169.
    EXPECT_EQ(stored(), life == 1 ? "1:t4:k169 170" : "1:t4:k339 340") << life;
  }
}

TEST_F(KeyOrderSweep, AWalkWhoseStoredKeyIsUnreadableStartsAfresh) {
  const int64_t now = clock_.NowMillis();
  for (const char* k : {"a", "b", "c"}) Key(k, now - 1);
  ASSERT_TRUE(db_->Transact([&](Tx& tx) {
                   return StatusOf(tx.Exec(
                       "INSERT INTO sweep_walks (walk, after_key, pass_start, pass_rows, "
                       "last_pass_rows) VALUES ('idempotency_keys', x'39393a62', $1, 2, 3)",
                       now));
                 }).ok());
  Sweeper sweeper(*db_, {.key_order_pass = 100s}, &clock_);
  auto s = sweeper.RunOnce();
  ASSERT_TRUE(s) << s.error().ToString();
  // From the start and flat out (a first walk): all three, the walk ended.
  EXPECT_EQ(s->keys, 3);
  EXPECT_EQ(Keys(), 0);
}

// Each table's walk keeps its own pass (SweepOptions::key_order_pass for the keys,
// inbox_key_order_pass for the inbox): the inbox's rows live longer, and walked at the
// keys' pace a walk would find few of them expired.
TEST_F(KeyOrderSweep, EachTableIsWalkedAtItsOwnPace) {
  const int64_t t0 = clock_.NowMillis();
  for (int i = 0; i < 100; ++i) {
    const std::string n = (i < 10 ? "0" : "") + std::to_string(i);
    Key("k" + n, t0 + 24 * 3600'000);
    InboxRow("e" + n, t0 + 24 * 3600'000);
  }
  Sweeper sweeper(*db_,
                  {.batch = 10, .key_order_pass = 100s, .inbox_key_order_pass = 1000s,
                   .key_order_window = 10, .key_order_windows = 1},
                  &clock_);
  auto settle = [&] {
    for (int calls = 1; calls <= 100; ++calls) {
      auto s = sweeper.RunOnce();
      ASSERT_TRUE(s) << s.error().ToString();
      if (!s->more) return;
    }
    ADD_FAILURE() << "the sweeper still says more after 100 calls";
  };
  settle();  // the first walks, flat out
  // Everything expires; each walk deletes what it walks from now on.
  ASSERT_TRUE(db_->Transact([&](Tx& tx) -> Status {
                   CONVERGE_RETURN_IF_ERROR(
                       tx.Exec("UPDATE idempotency_keys SET expires_at = $1", t0 + 1));
                   return StatusOf(tx.Exec("UPDATE consumer_inbox SET expires_at = $1", t0 + 1));
                 }).ok());
  auto inbox_rows = [&] { return QueryInt(*db_, "SELECT count(*) FROM consumer_inbox"); };
  // 50 s: half the keys' pass (5 windows), a twentieth of the inbox's (5 rows: 1 window).
  clock_.Advance(50s);
  settle();
  EXPECT_EQ(Keys(), 50);
  EXPECT_EQ(inbox_rows(), 90);
  // 100 s: the keys' walk is overdue and goes to its end; the inbox's is on schedule.
  clock_.Advance(50s);
  settle();
  EXPECT_EQ(Keys(), 0);
  EXPECT_EQ(inbox_rows(), 90);
  // 500 s: half the inbox's pass.
  clock_.Advance(400s);
  settle();
  EXPECT_EQ(inbox_rows(), 50);
}

// A sweeper that starts again resumes the inbox's walk at the inbox's pace: its walk began
// 200 s ago, twice the keys' pass but a fifth of its own, so it is on schedule (a fifth of
// the last walk's rows due), not overdue.
TEST_F(KeyOrderSweep, TheInboxWalkResumesAtItsOwnPass) {
  const int64_t now = clock_.NowMillis();
  for (int i = 0; i < 100; ++i) {
    InboxRow("e" + std::string(i < 10 ? "0" : "") + std::to_string(i), now);
  }
  ASSERT_TRUE(db_->Transact([&](Tx& tx) {
                   return StatusOf(tx.Exec(
                       "INSERT INTO sweep_walks (walk, after_key, pass_start, pass_rows, "
                       "last_pass_rows) VALUES ('consumer_inbox', NULL, $1, 0, 100)",
                       now - 200'000));
                 }).ok());
  Sweeper sweeper(*db_,
                  {.batch = 10, .key_order_pass = 100s, .inbox_key_order_pass = 1000s,
                   .key_order_window = 10, .key_order_windows = 1},
                  &clock_);
  for (int calls = 1;; ++calls) {
    ASSERT_LE(calls, 100) << "the sweeper still says more";
    auto s = sweeper.RunOnce();
    ASSERT_TRUE(s) << s.error().ToString();
    if (!s->more) break;
  }
  // 20 rows due: two windows of ten. At the keys' pass the walk would have resumed 100 s
  // in (one window); overdue, it would have walked all 100.
  EXPECT_EQ(QueryInt(*db_, "SELECT count(*) FROM consumer_inbox"), 80);
}

TEST_F(KeyOrderSweep, RefusesAPassOutOfRange) {
  for (Millis pass : {Millis(0), SweepOptions::kMaxKeyOrderPass + Millis(1)}) {
    for (bool inbox : {false, true}) {
      SweepOptions options;
      (inbox ? options.inbox_key_order_pass : options.key_order_pass) = pass;
      auto s = Sweeper(*db_, options, &clock_).RunOnce();
      ASSERT_FALSE(s);
      EXPECT_EQ(s.error().code(), StatusCode::kInvalidArgument);
      EXPECT_NE(s.error().message().find(inbox ? "inbox_key_order_pass" : "sweep key_order_pass"),
                std::string::npos)
          << s.error().ToString();
    }
  }
}

}  // namespace
}  // namespace converge
