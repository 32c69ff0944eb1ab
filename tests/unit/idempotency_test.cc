#include "converge/idempotency.h"

#include <atomic>
#include <future>
#include <optional>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "converge/failpoint.h"
#include "tests/unit/test_util.h"

namespace converge {
namespace {

using testing::OpenSqlite;
using testing::QueryInt;
using testing::TempDir;

constexpr IdempotencyOptions kOptions{.ttl = std::chrono::hours(24),
                                      .lease = std::chrono::seconds(30)};

class IdempotencyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    db_ = OpenSqlite(dir_.File("db.sqlite"));
    ASSERT_NE(db_, nullptr);
    testing::CreateEffectsTable(*db_);
    keys_ = std::make_unique<IdempotencyKeys>(*db_, kOptions, &clock_);
  }

  // A single-phase handler that applies one effect and answers 201.
  IdempotencyKeys::Fn Effect(const std::string& id) {
    return [this, id](Tx& tx) -> Result<StoredResponse> {
      ++runs_;
      CONVERGE_RETURN_IF_ERROR(tx.Exec("INSERT INTO test_effects (id) VALUES ($1)", id));
      return StoredResponse{201, {{"Location", "/things/" + id}}, "{\"id\":\"" + id + "\"}"};
    };
  }

  int64_t Keys() { return QueryInt(*db_, "SELECT count(*) FROM idempotency_keys"); }
  int64_t Effects() { return QueryInt(*db_, "SELECT count(*) FROM test_effects"); }

  // IdempotencyKeys::ExecuteAsync, waited for: its outcome, the thread `done` ran on,
  // whether `done` ran inline (here, before ExecuteAsync returned), and whether it used
  // `blocking` (which runs its work here: this thread may block).
  struct AsyncRun {
    std::optional<Result<Outcome>> out;
    std::thread::id done_on;
    bool done_inline = false;
    bool blocked = false;
  };
  static AsyncRun RunAsync(IdempotencyKeys& keys, KeyRequest req,
                           std::function<Status()> before, IdempotencyKeys::Fn fn) {
    AsyncRun run;
    std::promise<void> answered;
    std::atomic<bool> returned{false};
    const std::thread::id caller = std::this_thread::get_id();
    keys.ExecuteAsync(
        std::move(req), std::move(before), std::move(fn),
        [&](Result<Outcome> out) {
          run.out = std::move(out);
          run.done_on = std::this_thread::get_id();
          // Inline: on the calling thread, before ExecuteAsync returned. The
          // writer may answer before the caller gets back from ExecuteAsync, so
          // the thread tells the two apart, not the time.
          run.done_inline = std::this_thread::get_id() == caller && !returned.load();
          answered.set_value();
        },
        [&](std::function<void()> work) {
          run.blocked = true;
          work();
        });
    returned = true;
    answered.get_future().wait();
    return run;
  }

  TempDir dir_;
  ManualClock clock_;
  std::unique_ptr<Database> db_;
  std::unique_ptr<IdempotencyKeys> keys_;
  std::atomic<int> runs_{0};
};

TEST_F(IdempotencyTest, ClientErrorResponsesAreStoredAndReplayed) {
  auto fn = [&](Tx&) -> Result<StoredResponse> {
    ++runs_;
    return StoredResponse{402, {}, "card declined"};
  };
  ASSERT_EQ(keys_->Execute({"t", "k", "f"}, fn)->response.status, 402);
  auto again = keys_->Execute({"t", "k", "f"}, fn);
  EXPECT_TRUE(again->replayed);
  EXPECT_EQ(again->response.status, 402);
  EXPECT_EQ(runs_, 1);
}

TEST_F(IdempotencyTest, HandlerErrorStoresNothingAndARetryRunsAgain) {
  auto failing = [&](Tx& tx) -> Result<StoredResponse> {
    CONVERGE_RETURN_IF_ERROR(tx.Exec("INSERT INTO test_effects (id) VALUES ('x')"));
    return tl::unexpected(UnavailableError("downstream down"));
  };
  auto r = keys_->Execute({"t", "k", "f"}, failing);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code(), StatusCode::kUnavailable);
  EXPECT_EQ(Keys(), 0);
  EXPECT_EQ(Effects(), 0);
  auto retry = keys_->Execute({"t", "k", "f"}, Effect("x"));
  ASSERT_TRUE(retry);
  EXPECT_FALSE(retry->replayed);
  EXPECT_EQ(Effects(), 1);
}

TEST_F(IdempotencyTest, ExpiredKeyBehavesAsAbsent) {
  ASSERT_TRUE(keys_->Execute({"t", "k", "f1"}, Effect("old")));
  clock_.Advance(kOptions.ttl + Millis(1));
  // A different payload would be a mismatch while the key lives; now it is a new request.
  auto r = keys_->Execute({"t", "k", "f2"}, Effect("new"));
  ASSERT_TRUE(r) << r.error().ToString();
  EXPECT_FALSE(r->replayed);
  EXPECT_EQ(Effects(), 2);
  EXPECT_EQ(Keys(), 1);
}

TEST_F(IdempotencyTest, BadKeysAndScopesAreRejectedAndWriteNothing) {
  const std::vector<KeyRequest> bad = {
      {"", "k", "f"},
      {"t", "", "f"},
      {"t", std::string(256, 'k'), "f"},
      {std::string(256, 's'), "k", "f"},
      {"t", "key\nwith-newline", "f"},
      {"t", std::string("nul\0key", 7), "f"},
      {"t", "del\x7f", "f"},
  };
  for (const auto& req : bad) {
    auto r = keys_->Execute(req, Effect("never"));
    ASSERT_FALSE(r);
    EXPECT_EQ(r.error().code(), StatusCode::kInvalidArgument);
    auto b = keys_->Begin(req);
    ASSERT_FALSE(b);
    EXPECT_EQ(b.error().code(), StatusCode::kInvalidArgument);
  }
  EXPECT_TRUE(keys_->Execute({"t", std::string(255, 'k'), "f"}, Effect("edge")));
  EXPECT_EQ(Keys(), 1);
  EXPECT_EQ(runs_, 1);
}

// --- multi-phase ------------------------------------------------------------------

TEST_F(IdempotencyTest, MultiPhaseRunsPhasesThenReplays) {
  KeyRequest req{"t", "pay-1", "f"};
  auto b = keys_->Begin(req);
  ASSERT_TRUE(b);
  ASSERT_EQ(b->kind, Begun::Kind::kStarted);
  KeyLease lease = b->lease;
  ASSERT_TRUE(keys_->Advance(lease, "charged", "ch_1", [](Tx& tx) {
    return StatusOf(tx.Exec("INSERT INTO test_effects (id) VALUES ('charge')"));
  }).ok());
  EXPECT_EQ(lease.recovery_point, "charged");
  auto done = keys_->Complete(lease, [](Tx&) -> Result<StoredResponse> {
    return StoredResponse{201, {}, "paid"};
  });
  ASSERT_TRUE(done) << done.error().ToString();
  auto again = keys_->Begin(req);
  ASSERT_TRUE(again);
  EXPECT_EQ(again->kind, Begun::Kind::kReplayed);
  EXPECT_EQ(again->response.body, "paid");
}

// The points the library keeps for itself cannot be advanced to: "started" would let a
// key whose phase acted outside the database expire and start afresh on a retry. The
// refused call writes nothing, and the lease goes on to a real point.
TEST_F(IdempotencyTest, AdvanceRefusesThePointsTheLibraryKeeps) {
  auto b = keys_->Begin(KeyRequest{"t", "pay-1", "f"});
  ASSERT_TRUE(b);
  KeyLease lease = b->lease;
  for (const char* point : {"", "started", "finished"}) {
    bool ran = false;
    Status st = keys_->Advance(lease, point, "data", [&](Tx& tx) {
      ran = true;
      return StatusOf(tx.Exec("INSERT INTO test_effects (id) VALUES ('charge')"));
    });
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << point << ": " << st.ToString();
    EXPECT_FALSE(ran) << point;
    EXPECT_EQ(lease.recovery_point, "started") << point;
  }
  EXPECT_EQ(Effects(), 0);
  EXPECT_EQ(QueryInt(*db_, "SELECT count(*) FROM idempotency_keys WHERE "
                           "recovery_point = 'started' AND recovery_data = ''"),
            1);
  ASSERT_TRUE(keys_->Advance(lease, "created", "p1", [](Tx&) { return OkStatus(); }).ok());
  EXPECT_EQ(lease.recovery_point, "created");
}

// A replay of a completed multi-phase key is answered from a read snapshot: it needs no
// write, so it does not queue behind the one SQLite writer (held here by a transaction
// paused before its commit). A mismatch is answered the same way; a key past its TTL is
// not (it takes the write path, and waits for the writer).
TEST_F(IdempotencyTest, ReplaysOfCompletedKeysDoNotWaitForTheWriter) {
  for (const char* key : {"done", "expiring"}) {
    auto b = keys_->Begin({"t", key, "f"});
    ASSERT_TRUE(b);
    ASSERT_TRUE(keys_->Complete(b->lease, [](Tx&) -> Result<StoredResponse> {
      return StoredResponse{201, {}, "paid"};
    }));
    clock_.Advance(Millis(1));
  }
  ASSERT_TRUE(failpoint::Configure("test.writer_held=pause*1").ok());
  std::thread writer([&] {
    EXPECT_TRUE(db_->Transact([](Tx&) { return failpoint::Hit("test.writer_held"); }).ok());
  });
  ASSERT_TRUE(failpoint::WaitPaused("test.writer_held", std::chrono::seconds(20)));
  std::atomic<bool> replayed{false}, mismatched{false};
  std::thread reader([&] {
    auto again = keys_->Begin({"t", "done", "f"});
    replayed = again && again->kind == Begun::Kind::kReplayed && again->response.body == "paid";
    auto other = keys_->Begin({"t", "done", "another body"});
    mismatched = !other && other.error().reason() == reason::kFingerprintMismatch;
  });
  const bool answered = testing::WaitUntil([&] { return mismatched.load(); });
  failpoint::Release("test.writer_held");
  reader.join();
  writer.join();
  EXPECT_TRUE(answered) << "the replay waited for the writer";
  EXPECT_TRUE(replayed);
  // Past its TTL the key is forgotten and claimed afresh through the writer.
  clock_.Advance(kOptions.ttl);
  auto fresh = keys_->Begin({"t", "expiring", "f"});
  ASSERT_TRUE(fresh);
  EXPECT_EQ(fresh->kind, Begun::Kind::kStarted);
}

TEST_F(IdempotencyTest, InFlightDuplicateGetsRetryAfter) {
  ASSERT_TRUE(keys_->Begin({"t", "k", "f"}));
  clock_.Advance(Millis(10'000));
  auto dup = keys_->Begin({"t", "k", "f"});
  ASSERT_FALSE(dup);
  EXPECT_EQ(dup.error().code(), StatusCode::kUnavailable);
  EXPECT_EQ(dup.error().reason(), reason::kInFlight);
  // The remaining lease (20 s) caps the hint, itself capped low: most attempts finish fast.
  EXPECT_EQ(dup.error().retry_after_ms(), 2'000);
  clock_.Advance(Millis(19'500));
  EXPECT_EQ(keys_->Begin({"t", "k", "f"}).error().retry_after_ms(), 500);
  // A single-phase call on the same key is in flight too.
  auto single = keys_->Execute({"t", "k", "f"}, Effect("x"));
  ASSERT_FALSE(single);
  EXPECT_EQ(single.error().reason(), reason::kInFlight);
  // And a different payload is a mismatch even while in flight.
  EXPECT_EQ(keys_->Begin({"t", "k", "other"}).error().reason(), reason::kFingerprintMismatch);
}

TEST_F(IdempotencyTest, ReleaseLetsARetryResumeAtOnce) {
  KeyRequest req{"t", "k", "f"};
  KeyLease a = keys_->Begin(req)->lease;
  ASSERT_TRUE(keys_->Advance(a, "charged", "ch", [](Tx&) { return OkStatus(); }).ok());
  ASSERT_TRUE(keys_->Release(a).ok());
  auto b = keys_->Begin(req);
  ASSERT_TRUE(b);
  EXPECT_EQ(b->kind, Begun::Kind::kResumed);
  EXPECT_EQ(b->lease.recovery_point, "charged");
  EXPECT_EQ(keys_->Release(a).reason(), reason::kFenced);
}

// --- The replay cache (docs/design/idempotency.md, "The replay cache") -----------------

// Completes (scope, key) for `fingerprint` through Begin/Complete with `body`.
void CompleteKey(IdempotencyKeys& keys, const std::string& scope, const std::string& key,
                 const std::string& fingerprint, const std::string& body) {
  auto b = keys.Begin({scope, key, fingerprint});
  ASSERT_TRUE(b) << b.error().ToString();
  ASSERT_EQ(b->kind, Begun::Kind::kStarted);
  ASSERT_TRUE(keys.Complete(b->lease, [&](Tx&) -> Result<StoredResponse> {
    return StoredResponse{201, {{"Location", "/p/" + key}}, body};
  }));
}

// The first replay reads the store and fills the cache; later ones are answered from it,
// byte for byte, until expires_at less the clock skew. From that instant the store
// answers (still a replay until expires_at), and at expires_at the key is a new request.
TEST_F(IdempotencyTest, ReplayCacheAnswersUntilExpiryLessTheSkew) {
  const int64_t expires_at = clock_.NowMillis() + kOptions.ttl.count();
  CompleteKey(*keys_, "t", "k", "f", "paid");
  for (int i = 0; i < 3; ++i) {
    auto r = keys_->Begin({"t", "k", "f"});
    ASSERT_TRUE(r);
    ASSERT_EQ(r->kind, Begun::Kind::kReplayed);
    EXPECT_EQ(r->response, (StoredResponse{201, {{"Location", "/p/k"}}, "paid"}));
  }
  EXPECT_EQ(keys_->replay_cache_stats().hits, 2);
  EXPECT_EQ(keys_->replay_cache_stats().entries, 1);

  clock_.Set(expires_at - kOptions.max_clock_skew.count() - 1);
  ASSERT_EQ(keys_->Begin({"t", "k", "f"})->kind, Begun::Kind::kReplayed);
  EXPECT_EQ(keys_->replay_cache_stats().hits, 3);
  clock_.Set(expires_at - kOptions.max_clock_skew.count());
  auto late = keys_->Begin({"t", "k", "f"});
  ASSERT_TRUE(late);
  EXPECT_EQ(late->kind, Begun::Kind::kReplayed);  // from the store
  EXPECT_EQ(keys_->replay_cache_stats().hits, 3);
  EXPECT_EQ(keys_->replay_cache_stats().entries, 0);  // dropped, and not filled again
  clock_.Set(expires_at);
  auto fresh = keys_->Begin({"t", "k", "f"});
  ASSERT_TRUE(fresh);
  EXPECT_EQ(fresh->kind, Begun::Kind::kStarted);
}

// Another process sharing the store, its clock ahead by the whole allowed skew, forgets
// the key and gives it to a new request at its expires_at. By then this process's clock
// is at expires_at - skew: it must answer as the store does now (the key is another
// request's: 422), not replay what it cached.
TEST_F(IdempotencyTest, ReplayCacheNeverAnswersForAKeyAnotherProcessMayHaveForgotten) {
  const int64_t expires_at = clock_.NowMillis() + kOptions.ttl.count();
  CompleteKey(*keys_, "t", "k", "A", "one");
  ASSERT_EQ(keys_->Begin({"t", "k", "A"})->kind, Begun::Kind::kReplayed);  // fills
  ASSERT_EQ(keys_->replay_cache_stats().entries, 1);

  ManualClock ahead(expires_at);  // another process, max_clock_skew ahead of ours
  clock_.Set(expires_at - kOptions.max_clock_skew.count());
  IdempotencyKeys other(*db_, kOptions, &ahead);
  CompleteKey(other, "t", "k", "B", "two");

  auto mine = keys_->Begin({"t", "k", "A"});
  ASSERT_FALSE(mine) << "replayed " << mine->response.body;
  EXPECT_EQ(mine.error().reason(), reason::kFingerprintMismatch);
  auto theirs = keys_->Begin({"t", "k", "B"});
  ASSERT_TRUE(theirs);
  EXPECT_EQ(theirs->response.body, "two");
}

// Scope is part of the cache's key: another tenant's request under the same key is its
// own request, never the first tenant's replay.
TEST_F(IdempotencyTest, ReplayCacheKeepsTenantsApart) {
  CompleteKey(*keys_, "acme", "k", "f", "acme's");
  ASSERT_EQ(keys_->Begin({"acme", "k", "f"})->kind, Begun::Kind::kReplayed);  // fills
  ASSERT_EQ(keys_->Begin({"acme", "k", "f"})->kind, Begun::Kind::kReplayed);
  ASSERT_EQ(keys_->replay_cache_stats().hits, 1);
  auto globex = keys_->Begin({"globex", "k", "f"});
  ASSERT_TRUE(globex);
  EXPECT_EQ(globex->kind, Begun::Kind::kStarted);
  // Scope and key are not merely concatenated: ("ab", "c") is not ("a", "bc").
  CompleteKey(*keys_, "ab", "c", "f", "ab's");
  ASSERT_EQ(keys_->Begin({"ab", "c", "f"})->kind, Begun::Kind::kReplayed);  // fills
  auto a = keys_->Execute({"a", "bc", "f"}, Effect("a-bc"));
  ASSERT_TRUE(a);
  EXPECT_FALSE(a->replayed);
}

// A cached key under another request (another fingerprint) is a 422 from the cache too,
// through Begin and through Execute.
TEST_F(IdempotencyTest, ReplayCacheAnswersAnotherBodyWithAMismatch) {
  ASSERT_TRUE(keys_->Execute({"t", "k", "f"}, Effect("x")));
  auto replay = keys_->Execute({"t", "k", "f"}, Effect("x"));  // through the writer: fills
  ASSERT_TRUE(replay && replay->replayed);
  ASSERT_EQ(keys_->replay_cache_stats().entries, 1);
  auto other = keys_->Execute({"t", "k", "another body"}, Effect("y"));
  ASSERT_FALSE(other);
  EXPECT_EQ(other.error().reason(), reason::kFingerprintMismatch);
  auto begun = keys_->Begin({"t", "k", "another body"});
  ASSERT_FALSE(begun);
  EXPECT_EQ(begun.error().reason(), reason::kFingerprintMismatch);
  EXPECT_EQ(keys_->replay_cache_stats().hits, 2);
  auto same = keys_->Execute({"t", "k", "f"}, Effect("x"));
  ASSERT_TRUE(same && same->replayed);
  EXPECT_EQ(same->response.body, "{\"id\":\"x\"}");
  EXPECT_EQ(keys_->replay_cache_stats().hits, 3);
  EXPECT_EQ(runs_, 1);
}

// The cache holds at most replay_cache_bytes (its estimate) and replay_cache_entries,
// dropping the least recently used; a response too large for it is never kept. Evicted
// keys are answered from the store.
TEST_F(IdempotencyTest, ReplayCacheStaysWithinItsBounds) {
  IdempotencyOptions o = kOptions;
  o.replay_cache_bytes = 64 * 1024;
  o.replay_cache_entries = 1000;
  IdempotencyKeys keys(*db_, o, &clock_);
  const std::string body(1000, 'x');
  for (int i = 0; i < 120; ++i) {
    const std::string key = "k" + std::to_string(i);
    CompleteKey(keys, "t", key, "f", body);
    ASSERT_EQ(keys.Begin({"t", key, "f"})->kind, Begun::Kind::kReplayed);  // fills
    ASSERT_LE(keys.replay_cache_stats().bytes, 64 * 1024);
  }
  const ReplayCacheStats full = keys.replay_cache_stats();
  EXPECT_GT(full.entries, 16);
  EXPECT_LT(full.entries, 64);  // 1,000-byte bodies: well under 64 fit in 64 KiB
  auto first = keys.Begin({"t", "k0", "f"});  // evicted long ago: from the store
  ASSERT_TRUE(first);
  EXPECT_EQ(first->response.body, body);
  EXPECT_EQ(keys.replay_cache_stats().hits, full.hits);

  CompleteKey(keys, "t", "big", "f", std::string(8 * 1024, 'y'));  // > 64 KiB / 16 shards
  ASSERT_EQ(keys.Begin({"t", "big", "f"})->kind, Begun::Kind::kReplayed);
  ASSERT_EQ(keys.Begin({"t", "big", "f"})->response.body.size(), 8u * 1024);
  EXPECT_EQ(keys.replay_cache_stats().hits, full.hits);

  o.replay_cache_bytes = 1 << 20;
  o.replay_cache_entries = 32;
  IdempotencyKeys few(*db_, o, &clock_);
  for (int i = 0; i < 120; ++i) {
    ASSERT_EQ(few.Begin({"t", "k" + std::to_string(i), "f"})->kind, Begun::Kind::kReplayed);
    ASSERT_LE(few.replay_cache_stats().entries, 32);
  }
}

// Many threads replaying (and mismatching) keys at once through a cache too small for
// them all, so that fills, hits and evictions interleave (the TSan build runs this too):
// every answer is the key's own.
TEST_F(IdempotencyTest, ReplayCacheServesManyThreadsAtOnce) {
  IdempotencyOptions o = kOptions;
  o.replay_cache_entries = 32;
  IdempotencyKeys keys(*db_, o, &clock_);
  for (int i = 0; i < 48; ++i) {
    CompleteKey(keys, "t", "k" + std::to_string(i), "f", "body-" + std::to_string(i));
  }
  std::atomic<int> wrong{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 6; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 200; ++i) {
        const int k = (i * 7 + t * 13) % 48;
        const std::string key = "k" + std::to_string(k);
        if (i % 10 == 0) {
          auto r = keys.Begin({"t", key, "other"});
          if (r || r.error().reason() != reason::kFingerprintMismatch) ++wrong;
          continue;
        }
        auto r = keys.Begin({"t", key, "f"});
        if (!r || r->kind != Begun::Kind::kReplayed ||
            r->response.body != "body-" + std::to_string(k)) {
          ++wrong;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(wrong, 0);
  EXPECT_GT(keys.replay_cache_stats().hits, 0);
  EXPECT_LE(keys.replay_cache_stats().entries, 32);
}

// Execute's replays through the writer fill the cache only once their transaction
// commits: a replay run inside an enclosing transaction that rolls back read a row that
// never existed, and must leave nothing behind.
TEST_F(IdempotencyTest, ReplayCacheIsFilledOnlyFromCommittedRows) {
  Status st = db_->Transact([&](Tx&) -> Status {
    auto a = keys_->Execute({"t", "k", "f"}, Effect("a"));
    if (!a || a->replayed) return InternalError("expected a fresh run");
    auto b = keys_->Execute({"t", "k", "f"}, Effect("a"));
    if (!b || !b->replayed) return InternalError("expected a replay");
    return InternalError("roll it all back");
  });
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(keys_->replay_cache_stats().entries, 0);
  EXPECT_EQ(Keys(), 0);
  auto again = keys_->Execute({"t", "k", "f"}, Effect("a"));
  ASSERT_TRUE(again) << again.error().ToString();
  EXPECT_FALSE(again->replayed);
}

// SnapshotFirst::kAdaptive: on a stream of new keys Execute stops reading the key before
// `before` (a read that finds nothing), and a replay that comes meanwhile still gets its
// stored answer (or 422), from the write path; replays coming back turn the read on again.
// The replays here are of keys another process completed: not in this one's cache.
TEST_F(IdempotencyTest, ReadsFirstOnlyWhileReplaysCome) {
  constexpr int64_t kWindow = IdempotencyKeys::kSnapshotWindow;
  IdempotencyKeys other(*db_, kOptions, &clock_);  // completes the keys replayed below
  int befores = 0;
  auto before = [&] {
    ++befores;
    return OkStatus();
  };
  auto create = [&](IdempotencyKeys& keys, const std::string& key) {
    auto out = keys.Execute({"t", key, "f"}, before, Effect(key));
    ASSERT_TRUE(out) << out.error().ToString();
    EXPECT_FALSE(out->replayed) << key;
  };
  for (int i = 0; i < 40; ++i) create(other, "done-" + std::to_string(i));
  ASSERT_TRUE(keys_->snapshot_first());
  for (int64_t i = 0; i < kWindow; ++i) create(*keys_, "new-" + std::to_string(i));
  EXPECT_FALSE(keys_->snapshot_first()) << "a window of new keys left the read on";

  // Skipped: `before` runs for a replay, and the write path answers it as the read would.
  befores = 0;
  const int64_t effects = Effects();
  auto replay = keys_->Execute({"t", "done-0", "f"}, before, Effect("done-0"));
  ASSERT_TRUE(replay) << replay.error().ToString();
  EXPECT_TRUE(replay->replayed);
  EXPECT_EQ(replay->response.status, 201);
  EXPECT_EQ(befores, 1);
  auto mismatch = keys_->Execute({"t", "done-1", "other"}, before, Effect("done-1"));
  ASSERT_FALSE(mismatch);
  EXPECT_EQ(mismatch.error().reason(), reason::kFingerprintMismatch)
      << mismatch.error().ToString();
  EXPECT_EQ(Effects(), effects);

  // Replays at 1 in 16 of a window (the two above included) turn it on again.
  for (int64_t i = 2; i < kWindow / IdempotencyKeys::kSnapshotReplayShare; ++i) {
    auto r = keys_->Execute({"t", "done-" + std::to_string(i), "f"}, before, Effect("x"));
    ASSERT_TRUE(r && r->replayed);
  }
  for (int64_t i = kWindow / IdempotencyKeys::kSnapshotReplayShare; i < kWindow; ++i) {
    create(*keys_, "more-" + std::to_string(i));
  }
  EXPECT_TRUE(keys_->snapshot_first()) << "replays at 1 in 16 left the read off";
  befores = 0;
  auto read = keys_->Execute({"t", "done-30", "f"}, before, Effect("done-30"));
  ASSERT_TRUE(read && read->replayed);
  EXPECT_EQ(befores, 0) << "a replay ran `before` with the read on";
}

// While the read is skipped, a replay whose `before` fails (a dependency of it down) gets
// its stored answer from the second look, which counts it: such replays turn the read on
// again too. If that look fails, the read's error is the answer, not `before`'s: the
// stored answer may exist, and a permanent error in its place would tell the client its
// request failed.
TEST_F(IdempotencyTest, ReadsFirstAgainWhenReplaysComeWhosePrepareFails) {
  constexpr int64_t kWindow = IdempotencyKeys::kSnapshotWindow;
  constexpr int64_t kReplays = kWindow / IdempotencyKeys::kSnapshotReplayShare;
  IdempotencyKeys other(*db_, kOptions, &clock_);
  for (int64_t i = 0; i < kReplays + 1; ++i) {
    ASSERT_TRUE(other.Execute({"t", "done-" + std::to_string(i), "f"},
                              Effect("done-" + std::to_string(i))));
  }
  auto ok = [] { return OkStatus(); };
  auto refuse = [] { return InvalidArgumentError("the catalogue is down: unknown sku"); };
  for (int64_t i = 0; i < kWindow; ++i) {
    ASSERT_TRUE(keys_->Execute({"t", "new-" + std::to_string(i), "f"}, ok,
                               Effect("new-" + std::to_string(i))));
  }
  ASSERT_FALSE(keys_->snapshot_first());

  ASSERT_TRUE(failpoint::Configure("idempotency.after_replay_read=error(unavailable)").ok());
  auto unknown = keys_->Execute({"t", "done-" + std::to_string(kReplays), "f"}, refuse,
                                Effect("x"));
  ASSERT_TRUE(failpoint::Configure("").ok());
  ASSERT_FALSE(unknown);
  EXPECT_TRUE(unknown.error().transient())
      << "a failed look answered with before's error: " << unknown.error().ToString();

  for (int64_t i = 0; i < kReplays; ++i) {
    auto r = keys_->Execute({"t", "done-" + std::to_string(i), "f"}, refuse, Effect("x"));
    ASSERT_TRUE(r) << r.error().ToString();
    EXPECT_TRUE(r->replayed);
    EXPECT_EQ(r->response.status, 201);
  }
  // The failed look above is not counted: the window is the replays and these.
  for (int64_t i = kReplays; i < kWindow; ++i) {
    ASSERT_TRUE(keys_->Execute({"t", "more-" + std::to_string(i), "f"}, ok,
                               Effect("more-" + std::to_string(i))));
  }
  EXPECT_TRUE(keys_->snapshot_first()) << "replays whose before failed were not counted";
}

// SnapshotFirst::kAlways reads first whatever comes.
TEST_F(IdempotencyTest, ReadsFirstAlwaysWhenAskedTo) {
  IdempotencyOptions o = kOptions;
  o.snapshot_first = IdempotencyOptions::SnapshotFirst::kAlways;
  IdempotencyKeys keys(*db_, o, &clock_);
  IdempotencyKeys other(*db_, kOptions, &clock_);
  ASSERT_TRUE(other.Execute({"t", "done", "f"}, Effect("done")));
  int befores = 0;
  auto before = [&] {
    ++befores;
    return OkStatus();
  };
  for (int64_t i = 0; i < 2 * IdempotencyKeys::kSnapshotWindow; ++i) {
    ASSERT_TRUE(keys.Execute({"t", "k" + std::to_string(i), "f"}, before,
                             Effect("k" + std::to_string(i))));
  }
  EXPECT_TRUE(keys.snapshot_first());
  befores = 0;
  auto replay = keys.Execute({"t", "done", "f"}, before, Effect("done"));
  ASSERT_TRUE(replay && replay->replayed);
  EXPECT_EQ(befores, 0);
}

// ExecuteAsync: while the read first is on (the first window) every create goes through
// `blocking`, as Execute. Once it is off, `before` runs on the calling thread and the
// write path on the writer, whose commit answers; a replay of a key this process
// completed comes from the cache at once; a key completed elsewhere is answered by the
// write path (replay, or 422 for another request), with no effect.
TEST_F(IdempotencyTest, ExecuteAsyncAnswersFromTheWritersCommit) {
  IdempotencyKeys other(*db_, kOptions, &clock_);
  ASSERT_TRUE(other.Execute({"t", "done", "f"}, Effect("done")));
  std::thread::id before_on, fn_on;
  auto before = [&] {
    before_on = std::this_thread::get_id();
    return OkStatus();
  };
  auto effect = [&](const std::string& id) -> IdempotencyKeys::Fn {
    return [&, fn = Effect(id)](Tx& tx) {
      fn_on = std::this_thread::get_id();
      return fn(tx);
    };
  };
  for (int64_t i = 0; i < IdempotencyKeys::kSnapshotWindow; ++i) {
    const std::string key = "new-" + std::to_string(i);
    AsyncRun r = RunAsync(*keys_, {"t", key, "f"}, before, effect(key));
    ASSERT_TRUE(*r.out) << r.out->error().ToString();
    EXPECT_FALSE((*r.out)->replayed);
    EXPECT_TRUE(r.blocked) << i << ": the read first is on";
  }
  ASSERT_FALSE(keys_->snapshot_first());

  const int before_runs = runs_;
  AsyncRun created = RunAsync(*keys_, {"t", "k1", "f"}, before, effect("k1"));
  ASSERT_TRUE(*created.out) << created.out->error().ToString();
  EXPECT_FALSE((*created.out)->replayed);
  EXPECT_EQ((*created.out)->response.status, 201);
  EXPECT_FALSE(created.blocked);
  EXPECT_FALSE(created.done_inline);
  EXPECT_EQ(before_on, std::this_thread::get_id());
  EXPECT_NE(fn_on, std::this_thread::get_id());
  EXPECT_EQ(created.done_on, fn_on) << "done ran elsewhere than the writer";
  EXPECT_EQ(runs_, before_runs + 1);
  EXPECT_EQ(QueryInt(*db_, "SELECT count(*) FROM idempotency_keys WHERE key = 'k1' AND "
                           "status = 'completed'"),
            1);

  // The first replay is the write path's (the read is skipped), which caches the key;
  // the next comes from the cache, before ExecuteAsync returns.
  AsyncRun written = RunAsync(*keys_, {"t", "k1", "f"}, before, effect("k1"));
  ASSERT_TRUE(*written.out);
  EXPECT_TRUE((*written.out)->replayed);
  EXPECT_EQ((*written.out)->response, (*created.out)->response);
  EXPECT_FALSE(written.done_inline);
  EXPECT_FALSE(written.blocked);
  AsyncRun cached = RunAsync(*keys_, {"t", "k1", "f"}, before, effect("k1"));
  ASSERT_TRUE(*cached.out);
  EXPECT_TRUE((*cached.out)->replayed);
  EXPECT_EQ((*cached.out)->response, (*created.out)->response);
  EXPECT_TRUE(cached.done_inline);
  EXPECT_FALSE(cached.blocked);

  AsyncRun replay = RunAsync(*keys_, {"t", "done", "f"}, before, effect("done"));
  ASSERT_TRUE(*replay.out) << replay.out->error().ToString();
  EXPECT_TRUE((*replay.out)->replayed);
  EXPECT_EQ((*replay.out)->response.status, 201);
  EXPECT_FALSE(replay.blocked);
  AsyncRun reused = RunAsync(*keys_, {"t", "done", "another"}, before, effect("done"));
  ASSERT_FALSE(*reused.out);
  EXPECT_EQ(reused.out->error().reason(), reason::kFingerprintMismatch)
      << reused.out->error().ToString();
  EXPECT_EQ(runs_, before_runs + 1);
  EXPECT_EQ(Effects(), IdempotencyKeys::kSnapshotWindow + 2);
}

// Many first requests of one key at once, answered from commits: one runs, the others
// replay its answer.
TEST_F(IdempotencyTest, ExecuteAsyncOfOneKeyFromManyThreadsRunsItOnce) {
  auto ok = [] { return OkStatus(); };
  for (int64_t i = 0; i < IdempotencyKeys::kSnapshotWindow; ++i) {
    const std::string key = "new-" + std::to_string(i);
    ASSERT_TRUE(*RunAsync(*keys_, {"t", key, "f"}, ok, Effect(key)).out);
  }
  ASSERT_FALSE(keys_->snapshot_first());
  const int before_runs = runs_;
  constexpr int kThreads = 16;
  std::vector<std::optional<Result<Outcome>>> outs(kThreads);
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back(
        [&, i] { outs[i] = RunAsync(*keys_, {"t", "race", "f"}, ok, Effect("race")).out; });
  }
  for (auto& t : threads) t.join();
  int first = 0;
  for (const auto& out : outs) {
    ASSERT_TRUE(*out) << out->error().ToString();
    EXPECT_EQ((*out)->response.body, "{\"id\":\"race\"}");
    if (!(*out)->replayed) ++first;
  }
  EXPECT_EQ(first, 1);
  EXPECT_EQ(runs_, before_runs + 1);
}

// What needs a read goes through `blocking`: a `before` that fails (then its error, or
// the key's stored answer), every create with SnapshotFirst::kAlways, and every call on a
// store without a writer thread of its own.
TEST_F(IdempotencyTest, ExecuteAsyncHandsWhatMustReadOrWaitToBlocking) {
  IdempotencyKeys other(*db_, kOptions, &clock_);
  ASSERT_TRUE(other.Execute({"t", "done", "f"}, Effect("done")));
  auto ok = [] { return OkStatus(); };
  auto refuse = [] { return InvalidArgumentError("unknown sku"); };
  for (int64_t i = 0; i < IdempotencyKeys::kSnapshotWindow; ++i) {
    const std::string key = "new-" + std::to_string(i);
    ASSERT_TRUE(*RunAsync(*keys_, {"t", key, "f"}, ok, Effect(key)).out);
  }
  ASSERT_FALSE(keys_->snapshot_first());
  AsyncRun refused = RunAsync(*keys_, {"t", "k1", "f"}, refuse, Effect("k1"));
  EXPECT_TRUE(refused.blocked);
  ASSERT_FALSE(*refused.out);
  EXPECT_EQ(refused.out->error().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(QueryInt(*db_, "SELECT count(*) FROM idempotency_keys WHERE key = 'k1'"), 0);
  AsyncRun stored = RunAsync(*keys_, {"t", "done", "f"}, refuse, Effect("done"));
  EXPECT_TRUE(stored.blocked);
  ASSERT_TRUE(*stored.out) << "before's error hid a stored answer";
  EXPECT_TRUE((*stored.out)->replayed);

  IdempotencyOptions always = kOptions;
  always.snapshot_first = IdempotencyOptions::SnapshotFirst::kAlways;
  IdempotencyKeys reading(*db_, always, &clock_);
  AsyncRun read = RunAsync(reading, {"t", "k2", "f"}, ok, Effect("k2"));
  EXPECT_TRUE(read.blocked);
  ASSERT_TRUE(*read.out);
  EXPECT_FALSE((*read.out)->replayed);

  DatabaseWrapper wrapped(db_.get());
  IdempotencyKeys waiting(wrapped, kOptions, &clock_);
  AsyncRun waited = RunAsync(waiting, {"t", "k3", "f"}, nullptr, Effect("k3"));
  EXPECT_TRUE(waited.blocked);
  ASSERT_TRUE(*waited.out);
  EXPECT_FALSE((*waited.out)->replayed);
  EXPECT_EQ(Effects(), IdempotencyKeys::kSnapshotWindow + 3);
}

// A process crashes right after the phase that called the provider committed. The retry
// (another process, after the lease) resumes from that recovery point: the charge is not
// made twice.
TEST(IdempotencyCrash, RetryResumesFromRecoveryPointAfterCrash) {
  TempDir dir;
  const std::string path = dir.File("db.sqlite");
  {
    auto db = OpenSqlite(path);
    testing::CreateEffectsTable(*db);
  }
  int status = testing::RunInChild([&] {
    ManualClock clock;
    auto db = OpenSqlite(path);
    IdempotencyKeys keys(*db, kOptions, &clock);
    KeyLease lease = keys.Begin({"t", "pay", "f"})->lease;
    // The provider call, journalled as this phase's effect.
    (void)failpoint::Configure("idempotency.after_phase=crash");
    (void)keys.Advance(lease, "charged", "charge-1", [](Tx& tx) {
      return StatusOf(tx.Exec("INSERT INTO test_effects (id) VALUES ('charge:pay')"));
    });
    return false;  // not reached
  });
  ASSERT_TRUE(testing::KilledBySigkill(status)) << status;

  ManualClock clock;
  clock.Advance(kOptions.lease + Millis(1));
  auto db = OpenSqlite(path);
  IdempotencyKeys keys(*db, kOptions, &clock);
  auto b = keys.Begin({"t", "pay", "f"});
  ASSERT_TRUE(b) << b.error().ToString();
  ASSERT_EQ(b->kind, Begun::Kind::kResumed);
  ASSERT_EQ(b->lease.recovery_point, "charged");
  EXPECT_EQ(b->lease.recovery_data, "charge-1");
  KeyLease lease = b->lease;
  ASSERT_TRUE(keys.Complete(lease, [](Tx&) -> Result<StoredResponse> {
    return StoredResponse{201, {}, "captured"};
  }));
  EXPECT_EQ(QueryInt(*db, "SELECT count(*) FROM test_effects WHERE id = 'charge:pay'"), 1);
  EXPECT_EQ(keys.Begin({"t", "pay", "f"})->kind, Begun::Kind::kReplayed);
}

// A crash after the single-phase effect but before the response is stored loses the
// whole transaction: the retry runs once, fresh.
TEST(IdempotencyCrash, SinglePhaseCrashBeforeResponseLeavesNothingHalfDone) {
  TempDir dir;
  const std::string path = dir.File("db.sqlite");
  {
    auto db = OpenSqlite(path);
    testing::CreateEffectsTable(*db);
  }
  int status = testing::RunInChild([&] {
    auto db = OpenSqlite(path);
    IdempotencyKeys keys(*db);
    (void)failpoint::Configure("idempotency.after_effect_before_response=crash");
    (void)keys.Execute({"t", "k", "f"}, [](Tx& tx) -> Result<StoredResponse> {
      CONVERGE_RETURN_IF_ERROR(tx.Exec("INSERT INTO test_effects (id) VALUES ('e')"));
      return StoredResponse{201, {}, "ok"};
    });
    return false;
  });
  ASSERT_TRUE(testing::KilledBySigkill(status));
  auto db = OpenSqlite(path);
  EXPECT_EQ(QueryInt(*db, "SELECT count(*) FROM test_effects"), 0);
  EXPECT_EQ(QueryInt(*db, "SELECT count(*) FROM idempotency_keys"), 0);
  IdempotencyKeys keys(*db);
  auto r = keys.Execute({"t", "k", "f"}, [](Tx& tx) -> Result<StoredResponse> {
    CONVERGE_RETURN_IF_ERROR(tx.Exec("INSERT INTO test_effects (id) VALUES ('e')"));
    return StoredResponse{201, {}, "ok"};
  });
  ASSERT_TRUE(r);
  EXPECT_FALSE(r->replayed);
  EXPECT_EQ(QueryInt(*db, "SELECT count(*) FROM test_effects"), 1);
}

}  // namespace
}  // namespace converge
