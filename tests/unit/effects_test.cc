#include "converge/effects.h"

#include <map>

#include <gtest/gtest.h>

#include "converge/dead_letters.h"
#include "converge/failpoint.h"
#include "tests/unit/test_util.h"

namespace converge {
namespace {

using testing::OpenSqlite;
using testing::QueryInt;
using testing::TempDir;

EffectRunnerOptions Options() {
  EffectRunnerOptions o;
  o.kind = "email.receipt";
  o.max_attempts = 3;
  o.backoff_initial = Millis(100);
  o.backoff_max = Millis(1000);
  o.lease = Millis(5000);
  return o;
}

// A provider that dedupes by key, as a real one does with Idempotency-Key.
struct Provider {
  std::map<std::string, int> sends;  // key -> times acted
  Status fail_with;
  Result<std::string> Send(const std::string& key, const std::string&) {
    if (!fail_with.ok()) return tl::unexpected(fail_with);
    if (sends[key]++ == 0) return "msg-" + key;
    return "msg-" + key;  // replayed: same result, no second send
  }
};

class EffectsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    db_ = OpenSqlite(dir_.File("db.sqlite"));
    runner_ = std::make_unique<EffectRunner>(
        *db_, Options(),
        [this](const std::string& k, const std::string& p) {
          ++calls_;
          return provider_.Send(k, p);
        },
        &clock_);
  }
  bool Record(const std::string& key) {
    bool created = false;
    EXPECT_TRUE(db_->Transact([&](Tx& tx) -> Status {
                   CONVERGE_ASSIGN_OR_RETURN(created, runner_->Record(tx, key, "{}"));
                   return OkStatus();
                 }).ok());
    return created;
  }

  TempDir dir_;
  ManualClock clock_;
  std::unique_ptr<Database> db_;
  Provider provider_;
  int calls_ = 0;
  std::unique_ptr<EffectRunner> runner_;
};

TEST_F(EffectsTest, RecordsOnceExecutesOnceAndStoresTheResult) {
  EXPECT_TRUE(Record("receipt:p1"));
  EXPECT_FALSE(Record("receipt:p1"));  // a redelivered event records nothing new
  ASSERT_EQ(*runner_->RunOnce(), 1u);
  EXPECT_EQ(*runner_->RunOnce(), 0u);
  EXPECT_EQ(calls_, 1);
  EXPECT_EQ(
      QueryInt(*db_,
               "SELECT count(*) FROM effects WHERE state = 'done' AND result = 'msg-receipt:p1'"),
      1);
}

TEST_F(EffectsTest, IntentRollsBackWithItsTransaction) {
  (void)db_->Transact([&](Tx& tx) -> Status {
    CONVERGE_RETURN_IF_ERROR(runner_->Record(tx, "receipt:p1", "{}"));
    return InvalidArgumentError("business failed");
  });
  EXPECT_EQ(*runner_->RunOnce(), 0u);
  EXPECT_EQ(calls_, 0);
}

TEST_F(EffectsTest, TransientFailuresRetryThenParkAndReplayExecutesAgain) {
  Record("receipt:p1");
  provider_.fail_with = UnavailableError("mail provider down");
  for (int i = 0; i < 10; ++i) {
    (void)runner_->RunOnce();
    clock_.Advance(Millis(1000));
  }
  EXPECT_EQ(calls_, 3);
  EXPECT_EQ(runner_->stats().retries, 2);
  EXPECT_EQ(runner_->stats().failed, 1);
  EffectRequeuer requeuer(&clock_);
  DeadLetters dlq(*db_, {{std::string(kEffectQueuePrefix), &requeuer}}, &clock_);
  auto list = *dlq.List();
  ASSERT_EQ(list.size(), 1u);
  EXPECT_EQ(list[0].queue, "effect:email.receipt");
  EXPECT_EQ(list[0].event_id, "receipt:p1");
  EXPECT_EQ(list[0].error_class, "exhausted");

  provider_.fail_with = Status();  // the provider recovered
  ASSERT_TRUE(dlq.Replay(list[0].id).ok());
  ASSERT_EQ(*runner_->RunOnce(), 1u);
  EXPECT_EQ(provider_.sends["receipt:p1"], 1);
  EXPECT_EQ(QueryInt(*db_, "SELECT count(*) FROM effects WHERE state = 'done'"), 1);
}

// A callee that says when to come back (Retry-After) is not called sooner, however short
// the backoff would have been.
TEST_F(EffectsTest, ATransientErrorsRetryAfterIsHonoured) {
  Record("receipt:p1");
  provider_.fail_with = UnavailableError("busy").WithRetryAfter(30'000);
  ASSERT_EQ(*runner_->RunOnce(), 1u);
  provider_.fail_with = Status();
  clock_.Advance(Millis(29'000));
  EXPECT_EQ(*runner_->RunOnce(), 0u);  // not due yet
  EXPECT_EQ(calls_, 1);
  clock_.Advance(Millis(1'000));
  EXPECT_EQ(*runner_->RunOnce(), 1u);
  EXPECT_EQ(calls_, 2);
}

TEST_F(EffectsTest, PermanentFailureParksAtOnce) {
  Record("receipt:p1");
  provider_.fail_with = InvalidArgumentError("bad address");
  ASSERT_EQ(*runner_->RunOnce(), 1u);
  EXPECT_EQ(runner_->stats().failed, 1);
  EXPECT_EQ(calls_, 1);
}

// An executor that appends each call's key to the file `log`, which outlives the process
// the call ran in, and succeeds.
EffectRunner::Executor LoggingExecutor(const std::string& log) {
  return [log](const std::string& key, const std::string&) -> Result<std::string> {
    FILE* f = std::fopen(log.c_str(), "a");
    std::fprintf(f, "%s\n", key.c_str());
    std::fclose(f);
    return std::string("ok");
  };
}

// Records the intent "receipt:p1" in the store at `path`.
void RecordReceipt(const std::string& path, const EffectRunner::Executor& executor) {
  auto db = OpenSqlite(path);
  EffectRunner r(*db, Options(), executor);
  ASSERT_TRUE(
      db->Transact([&](Tx& tx) { return StatusOf(r.Record(tx, "receipt:p1", "{}")); }).ok());
}

// A crash between the provider call and the recorded result: after the claim lease, the
// intent is executed again with the same key and the provider does not act twice.
TEST(EffectsCrash, CrashAfterCallBeforeRecordReexecutesWithTheSameKey) {
  TempDir dir;
  const std::string path = dir.File("db.sqlite");
  const std::string sent_log = dir.File("sent.log");
  const EffectRunner::Executor executor = LoggingExecutor(sent_log);
  RecordReceipt(path, executor);
  int status = testing::RunInChild([&] {
    auto db = OpenSqlite(path);
    EffectRunner r(*db, Options(), executor);
    (void)failpoint::Configure("effects.after_call_before_record=crash");
    (void)r.RunOnce();
    return false;
  });
  ASSERT_TRUE(testing::KilledBySigkill(status));
  ManualClock clock;
  clock.Set(Clock::System()->NowMillis() + Options().lease.count() + 1000);
  auto db = OpenSqlite(path);
  EffectRunner r(*db, Options(), executor, &clock);
  ASSERT_EQ(*r.RunOnce(), 1u);
  EXPECT_EQ(QueryInt(*db, "SELECT count(*) FROM effects WHERE state = 'done'"), 1);
  // Called twice with the same key: the provider's Idempotency-Key makes that one effect.
  FILE* f = std::fopen(sent_log.c_str(), "r");
  char line[64];
  int n = 0;
  while (std::fgets(line, sizeof line, f)) {
    EXPECT_STREQ(line, "receipt:p1\n");
    ++n;
  }
  std::fclose(f);
  EXPECT_EQ(n, 2);
}

int Lines(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "r");
  if (f == nullptr) return 0;
  char line[64];
  int n = 0;
  while (std::fgets(line, sizeof line, f)) ++n;
  std::fclose(f);
  return n;
}

// Found by review: a call that kills its process every time was claimed again after each
// lease, for ever, since only a recorded failure counted against max_attempts. Each claim
// counts now: after max_attempts calls that never recorded an outcome, the next claim
// parks the intent without calling it; a replay calls it again.
TEST(EffectsCrash, ACallThatKillsItsProcessEveryTimeIsParkedAfterMaxAttempts) {
  TempDir dir;
  const std::string path = dir.File("db.sqlite");
  const std::string sent_log = dir.File("sent.log");
  const EffectRunner::Executor executor = LoggingExecutor(sent_log);
  RecordReceipt(path, executor);
  const int64_t start = Clock::System()->NowMillis();
  const int64_t past_lease = Options().lease.count() + 1000;
  for (int i = 0; i < Options().max_attempts; ++i) {
    int status = testing::RunInChild([&] {
      ManualClock clock;
      clock.Set(start + i * past_lease);
      auto db = OpenSqlite(path);
      EffectRunner r(*db, Options(), executor, &clock);
      (void)failpoint::Configure("effects.after_call_before_record=crash");
      (void)r.RunOnce();
      return false;
    });
    ASSERT_TRUE(testing::KilledBySigkill(status)) << "attempt " << i + 1;
  }
  ASSERT_EQ(Lines(sent_log), Options().max_attempts);
  ManualClock clock;
  clock.Set(start + Options().max_attempts * past_lease);
  auto db = OpenSqlite(path);
  EffectRunner r(*db, Options(), executor, &clock);
  ASSERT_EQ(*r.RunOnce(), 1u);
  EXPECT_EQ(Lines(sent_log), Options().max_attempts);  // not called again
  EXPECT_EQ(r.stats().failed, 1);
  EXPECT_EQ(QueryInt(*db, "SELECT count(*) FROM effects WHERE state = 'failed'"), 1);
  EffectRequeuer requeuer(&clock);
  DeadLetters dlq(*db, {{std::string(kEffectQueuePrefix), &requeuer}}, &clock);
  auto list = *dlq.List();
  ASSERT_EQ(list.size(), 1u);
  EXPECT_EQ(list[0].error_class, "exhausted");
  EXPECT_EQ(list[0].attempts, Options().max_attempts + 1);
  EXPECT_NE(list[0].error.find("none recorded an outcome"), std::string::npos) << list[0].error;
  // Replayed (the cause fixed), it is called once more and done.
  ASSERT_TRUE(dlq.Replay(list[0].id).ok());
  ASSERT_EQ(*r.RunOnce(), 1u);
  EXPECT_EQ(Lines(sent_log), Options().max_attempts + 1);
  EXPECT_EQ(QueryInt(*db, "SELECT count(*) FROM effects WHERE state = 'done'"), 1);
}

}  // namespace
}  // namespace converge
