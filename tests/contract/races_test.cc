// Forced interleavings of the correctness issue (#7), run on every backend: each test
// pauses a thread at a failpoint (or stalls it past its lease with an injected clock),
// lets the other side run, and checks the invariant. Each failed on the code before the
// fix it guards.
#include <atomic>
#include <optional>
#include <thread>

#include <gtest/gtest.h>

#include "converge/completer.h"
#include "converge/failpoint.h"
#include "converge/idempotency.h"
#include "converge/sweeper.h"
#include "tests/contract/store_fixture.h"

namespace converge {
namespace {

using namespace std::chrono_literals;

template <class Store>
class Races : public StoreContract<Store> {
 protected:
  void TearDown() override { ASSERT_TRUE(failpoint::Configure("").ok()); }

  // Stands in for a phase's business write.
  static std::function<Status(Tx&)> Write(const std::string& id) {
    return [id](Tx& tx) { return StoreContract<Store>::Effect(tx, id); };
  }
  static IdempotencyKeys::Fn Answer(const std::string& body) {
    return [body](Tx&) -> Result<StoredResponse> { return StoredResponse{201, {}, body}; };
  }
};
TYPED_TEST_SUITE(Races, Stores, StoreNames);

// Expiry and the sweeper used to recreate a key with fence 1, so a request stalled past
// its TTL could still write after a retry had started the key afresh.
TYPED_TEST(Races, FenceNeverRepeatsAfterExpiryOrSweep) {
  ManualClock clock;
  IdempotencyKeys keys(*this->db_, {.ttl = 10s, .lease = 5s}, &clock);
  auto a = keys.Begin({"t", "k", "first"});
  ASSERT_TRUE(a) << a.error().ToString();
  ASSERT_EQ(a->kind, Begun::Kind::kStarted);
  clock.Advance(11s);  // A stalls at "started" past the key's TTL: the key may be reused
  auto b = keys.Begin({"t", "k", "second"});
  ASSERT_TRUE(b) << b.error().ToString();
  ASSERT_EQ(b->kind, Begun::Kind::kStarted);
  EXPECT_GT(b->lease.fence, a->lease.fence);
  EXPECT_EQ(keys.Advance(a->lease, "created", "", TestFixture::Write("from-a")).reason(),
            reason::kFenced);

  clock.Advance(11s);  // B stalls too, and the sweeper deletes its row
  Sweeper sweeper(*this->db_, {}, &clock);
  auto swept = sweeper.RunOnce();
  ASSERT_TRUE(swept);
  EXPECT_EQ(swept->keys, 1);
  auto c = keys.Begin({"t", "k", "third"});
  ASSERT_TRUE(c);
  ASSERT_EQ(c->kind, Begun::Kind::kStarted);
  EXPECT_GT(c->lease.fence, b->lease.fence);
  EXPECT_EQ(keys.Advance(b->lease, "created", "", TestFixture::Write("from-b")).reason(),
            reason::kFenced);
  ASSERT_TRUE(keys.Advance(c->lease, "created", "", TestFixture::Write("from-c")).ok());
  EXPECT_EQ(this->Count("SELECT count(*) FROM test_effects"), 1);
}

// Work that reached a later recovery point may have acted outside the database: it is
// resumed, never expired or swept while unfinished.
TYPED_TEST(Races, UnfinishedWorkPastItsFirstPhaseNeverExpires) {
  ManualClock clock;
  IdempotencyKeys keys(*this->db_, {.ttl = 10s, .lease = 5s}, &clock);
  auto a = keys.Begin({"t", "k", "f"});
  ASSERT_TRUE(a);
  ASSERT_TRUE(keys.Advance(a->lease, "charged", "ch_1", TestFixture::Write("pay")).ok());
  clock.Advance(1h);
  Sweeper sweeper(*this->db_, {}, &clock);
  auto swept = sweeper.RunOnce();
  ASSERT_TRUE(swept);
  EXPECT_EQ(swept->keys, 0);
  EXPECT_EQ(keys.Begin({"t", "k", "another body"}).error().reason(),
            reason::kFingerprintMismatch);
  auto b = keys.Begin({"t", "k", "f"});
  ASSERT_TRUE(b) << b.error().ToString();
  EXPECT_EQ(b->kind, Begun::Kind::kResumed);
  EXPECT_EQ(b->lease.recovery_point, "charged");
  EXPECT_EQ(b->lease.recovery_data, "ch_1");
}

TYPED_TEST(Races, TtlMustExceedTheLease) {
  IdempotencyKeys keys(*this->db_, {.ttl = 5s, .lease = 5s});
  auto r = keys.Begin({"t", "k", "f"});
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(r.error().message().find("5000 ms"), std::string::npos) << r.error().message();
  EXPECT_FALSE(keys.Execute({"t", "k", "f"}, TestFixture::Answer("x")));
  EXPECT_TRUE(IdempotencyKeys::ValidateOptions({.ttl = 6s, .lease = 5s}).ok());
}

// B reads A's lapsed lease at "started"; A then commits its next phase; B's takeover used
// to succeed anyway (fence unchanged) and resume from "started": a second payment and a
// second charge. The takeover must re-check the lease in the same statement.
TYPED_TEST(Races, TakeoverNeverResumesFromAStaleRecoveryPoint) {
  ManualClock clock;
  IdempotencyKeys keys(*this->db_, {.ttl = 1h, .lease = 10s}, &clock);
  auto a = keys.Begin({"t", "k", "f"});
  ASSERT_TRUE(a);
  KeyLease lease_a = a->lease;
  clock.Advance(11s);  // A stalled past its lease, and wakes up now
  ASSERT_TRUE(failpoint::Configure("idempotency.before_takeover=pause*1").ok());
  std::optional<Result<Begun>> b;
  std::thread tb([&] { b = keys.Begin({"t", "k", "f"}); });
  ASSERT_TRUE(failpoint::WaitPaused("idempotency.before_takeover", 20s));
  std::atomic<bool> a_done{false};
  Status a_st;
  std::thread ta([&] {
    a_st = keys.Advance(lease_a, "created", "pay_A", TestFixture::Write("pay_A"));
    a_done = true;
  });
  // A commits (PostgreSQL) or queues behind B's transaction (SQLite's one writer).
  EXPECT_TRUE(testing::WaitUntil([&] { return a_done.load() || this->store_.SomeoneWaits(*this->db_); }));
  failpoint::Release("idempotency.before_takeover");
  ta.join();
  tb.join();
  ASSERT_TRUE(b.has_value());
  if (a_st.ok()) {
    // A advanced first: B must not own the request.
    ASSERT_FALSE(*b) << "B resumed from '" << (*b)->lease.recovery_point << "' after A advanced";
    EXPECT_EQ(b->error().reason(), reason::kInFlight);
  } else {
    // B took over first: A is fenced, B resumes from what was committed.
    EXPECT_EQ(a_st.reason(), reason::kFenced);
    ASSERT_TRUE(*b) << b->error().ToString();
    EXPECT_EQ((*b)->kind, Begun::Kind::kResumed);
    EXPECT_EQ((*b)->lease.recovery_point, "started");
  }
  EXPECT_EQ(this->Count("SELECT count(*) FROM test_effects"), a_st.ok() ? 1 : 0);
}

// A request abandoned by its client after an external call is finished by the completer
// (after the grace period, not before), and the late retry gets the stored outcome.
TYPED_TEST(Races, CompleterFinishesAnAbandonedRequestAndTheLateRetryReplays) {
  ManualClock clock;
  IdempotencyKeys keys(*this->db_, {.ttl = 1h, .lease = 10s}, &clock);
  auto a = keys.Begin({"t", "k", "f"});
  ASSERT_TRUE(a);
  KeyLease lease_a = a->lease;
  ASSERT_TRUE(keys.Advance(lease_a, "charged", "ch_1", TestFixture::Write("pay")).ok());
  // The client saw an error and went away.
  Completer completer(*this->db_, keys, {.grace = 5s}, &clock);
  std::atomic<int> resumed{0};
  completer.On("charged", [&](KeyLease& l) -> Status {
    ++resumed;
    return StatusOf(keys.Complete(l, [&](Tx& tx) -> Result<StoredResponse> {
      CONVERGE_RETURN_IF_ERROR(TestFixture::Effect(tx, "captured-" + l.recovery_data));
      return StoredResponse{201, {}, "paid " + l.recovery_data};
    }));
  });
  clock.Advance(11s);  // the lease lapsed, but the client's own retry still has the grace
  auto early = completer.RunOnce();
  ASSERT_TRUE(early) << early.error().ToString();
  EXPECT_EQ(*early, 0u);
  clock.Advance(5s);
  auto n = completer.RunOnce();
  ASSERT_TRUE(n) << n.error().ToString();
  EXPECT_EQ(*n, 1u);
  EXPECT_EQ(resumed, 1);
  EXPECT_EQ(completer.stats().finished, 1);
  auto late = keys.Begin({"t", "k", "f"});
  ASSERT_TRUE(late);
  EXPECT_EQ(late->kind, Begun::Kind::kReplayed);
  EXPECT_EQ(late->response.body, "paid ch_1");
  EXPECT_EQ(keys.Complete(lease_a, TestFixture::Answer("stale")).error().reason(),
            reason::kFenced);
  EXPECT_EQ(this->Count("SELECT count(*) FROM test_effects"), 2);
}

// Two completers (two processes) race for one abandoned request: one resumes it; the
// other, paused between its read and its takeover, loses and resumes nothing.
TYPED_TEST(Races, TwoCompletersResumeARequestOnce) {
  ManualClock clock;
  IdempotencyKeys keys(*this->db_, {.ttl = 1h, .lease = 10s}, &clock);
  auto a = keys.Begin({"t", "k", "f"});
  ASSERT_TRUE(a);
  ASSERT_TRUE(keys.Advance(a->lease, "charged", "ch_1", TestFixture::Write("pay")).ok());
  clock.Advance(20s);
  std::atomic<int> resumed{0};
  auto resume = [&](KeyLease& l) -> Status {
    ++resumed;
    return StatusOf(keys.Complete(l, TestFixture::Answer("done")));
  };
  Completer first(*this->db_, keys, {.grace = 1s}, &clock);
  Completer second(*this->db_, keys, {.grace = 1s}, &clock);
  first.On("charged", resume);
  second.On("charged", resume);
  ASSERT_TRUE(failpoint::Configure("completer.before_takeover=pause*1").ok());
  std::thread t([&] { EXPECT_TRUE(first.RunOnce()); });
  ASSERT_TRUE(failpoint::WaitPaused("completer.before_takeover", 20s));
  auto n = second.RunOnce();
  ASSERT_TRUE(n) << n.error().ToString();
  EXPECT_EQ(*n, 1u);
  failpoint::Release("completer.before_takeover");
  t.join();
  EXPECT_EQ(resumed, 1);
  EXPECT_EQ(first.stats().lost, 1);
  EXPECT_EQ(keys.Begin({"t", "k", "f"})->kind, Begun::Kind::kReplayed);
}

}  // namespace
}  // namespace converge
