// Time-partitioned retention (PostgreSQL, retention=partitioned; docs/design/retention.md):
// what only that store shape has. The rest of the contract runs on it as on every store
// (StoreContract/PostgresPartitioned.*): these tests add the dedupe across partitions, the
// sweeper's partitions ahead and behind, and the rule that keeps a partition alive.
#include <future>
#include <optional>
#include <thread>

#include <gtest/gtest.h>

#include "converge/failpoint.h"
#include "converge/idempotency.h"
#include "converge/inbox.h"
#include "converge/outbox.h"
#include "converge/sweeper.h"
#include "tests/contract/store_fixture.h"

namespace converge {
namespace {

using namespace std::chrono_literals;

constexpr int64_t kDay = 24 * 3600 * 1000;
constexpr int64_t kD0 = 19675 * kDay;  // a midnight (UTC) just before ManualClock's default

#if CONVERGE_WITH_POSTGRES
using PartitionedStores = ::testing::Types<PostgresPartitionedStore>;
#else
using PartitionedStores = ::testing::Types<>;
#endif

template <class Store>
class Partitions : public StoreContract<Store> {
 protected:
  void TearDown() override { ASSERT_TRUE(failpoint::Configure("").ok()); }

  // The partition that holds the rows of `table` matching `where` ("" when none does).
  std::string Where(const std::string& table, const std::string& where) {
    std::string out;
    EXPECT_TRUE(this->db_->Read([&](Tx& tx) -> Status {
                         CONVERGE_ASSIGN_OR_RETURN(
                             Rows rows, tx.Query("SELECT DISTINCT tableoid::regclass::text FROM " +
                                                 table + " WHERE " + where));
                         if (rows.size() == 1) out = rows[0].Text(0);
                         if (rows.size() > 1) out = "several";
                         return OkStatus();
                       }).ok());
    return out;
  }
  std::vector<TimePartition> List(const std::string& table) {
    std::vector<TimePartition> out;
    EXPECT_TRUE(this->db_->Transact([&](Tx& tx) -> Status {
                         EXPECT_NE(tx.time_partitions(), nullptr);
                         if (tx.time_partitions() == nullptr) return OkStatus();
                         CONVERGE_ASSIGN_OR_RETURN(out, tx.time_partitions()->List(table));
                         return OkStatus();
                       }).ok());
    return out;
  }
  static std::string Part(const std::string& table, int64_t from) {
    return table + "_p" + std::to_string(from);
  }
  // Enqueues the event `id` (source OutboxOptions' default) at the clock's time.
  Status Enqueue(Clock* clock, const std::string& id) {
    Outbox outbox({}, clock);  // its commit hook wakes it: it must outlive the commit
    return this->db_->Transact([&](Tx& tx) -> Status {
      return StatusOf(
          outbox.Enqueue(tx, Event{.id = id, .type = "order.created", .subject = "o-1"}));
    });
  }
  // Marks every unpublished event published at `at`, as the relay would.
  void PublishAll(int64_t at) {
    ASSERT_TRUE(this->db_->Transact([&](Tx& tx) {
                         return StatusOf(tx.Exec("UPDATE outbox_events SET published_at = $1 "
                                                 "WHERE published_at IS NULL", at));
                       }).ok());
  }
  // Turns the store back into one created partitioned before the outbox was (schema
  // version 11): outbox_events a plain table, as migrations 1 and 3 made it.
  void MakeOutboxPlain() {
    ASSERT_TRUE(this->db_->Transact([&](Tx& tx) -> Status {
                         for (const char* sql : {
                                  "DROP TABLE outbox_events",
                                  "DROP FUNCTION converge_outbox_events_unique()",
                                  "CREATE TABLE outbox_events (seq BIGSERIAL PRIMARY KEY, "
                                  "event_id TEXT NOT NULL, source TEXT NOT NULL, "
                                  "aggregate_type TEXT NOT NULL, aggregate_id TEXT NOT NULL, "
                                  "type TEXT NOT NULL, payload TEXT NOT NULL, headers TEXT NOT "
                                  "NULL DEFAULT '{}', created_at BIGINT NOT NULL, "
                                  "published_at BIGINT, publish_attempts INTEGER NOT NULL "
                                  "DEFAULT 0, last_error TEXT, UNIQUE (source, event_id))",
                                  "CREATE INDEX outbox_unpublished ON outbox_events (seq) "
                                  "WHERE published_at IS NULL",
                                  "CREATE INDEX outbox_published ON outbox_events "
                                  "(published_at) WHERE published_at IS NOT NULL",
                                  "ALTER TABLE outbox_events ADD COLUMN partition_no INTEGER "
                                  "NOT NULL DEFAULT 0",
                                  "CREATE INDEX outbox_unpublished_partition ON outbox_events "
                                  "(partition_no, seq) WHERE published_at IS NULL",
                                  // Migration 15's column, run again below.
                                  "ALTER TABLE saga_instances DROP COLUMN unsettled_starts",
                                  "DELETE FROM converge_schema WHERE version >= 12"}) {
                           CONVERGE_RETURN_IF_ERROR(StatusOf(tx.Exec(sql)));
                         }
                         return OkStatus();
                       }).ok());
  }
  // Inserts a completed key row straight into the table, created at `created_at`.
  Result<int64_t> InsertKey(Tx& tx, const std::string& key, int64_t created_at) {
    return tx.Exec("INSERT INTO idempotency_keys (scope, key, request_hash, status, "
                   "recovery_point, lease_until, fence, created_at, updated_at, expires_at) "
                   "VALUES ('t', $1, 'h', 'completed', 'finished', 0, 1, $2, $2, $3) "
                   "ON CONFLICT DO NOTHING",
                   key, created_at, created_at + 3 * kDay);
  }
};
TYPED_TEST_SUITE(Partitions, PartitionedStores, StoreNames);

TYPED_TEST(Partitions, AStoreCreatedPartitionedStaysPartitionedAndRefusesTheOtherMode) {
  auto plain = Database::Open(this->store_.libpq_uri + "?retention=delete");
  ASSERT_FALSE(plain);
  EXPECT_EQ(plain.error().code(), StatusCode::kFailedPrecondition);
  // Left out, the store's own shape decides.
  auto reopened = Database::Open(this->store_.libpq_uri);
  ASSERT_TRUE(reopened) << reopened.error().ToString();
  EXPECT_TRUE((*reopened)->Transact([](Tx& tx) -> Status {
                             return tx.time_partitions() != nullptr
                                        ? OkStatus()
                                        : InternalError("not partitioned");
                           }).ok());
}

// The crux: the primary key holds the partition column, so on its own it would let the
// same key in twice, once per period. The trigger catches the copy in a later partition.
TYPED_TEST(Partitions, TheSameKeyOrEventInALaterPartitionIsADuplicate) {
  ManualClock clock(kD0 + 12 * 3600 * 1000);
  Sweeper sweeper(*this->db_, {}, &clock);
  ASSERT_TRUE(sweeper.RunOnce());
  IdempotencyKeys keys(*this->db_, {.ttl = 48h, .lease = 5s}, &clock);
  int runs = 0;
  auto fn = [&](Tx& tx) -> Result<StoredResponse> {
    ++runs;
    CONVERGE_RETURN_IF_ERROR(TestFixture::Effect(tx, "e" + std::to_string(runs)));
    return StoredResponse{201, {}, "made"};
  };
  auto first = keys.Execute({"t", "k", "f"}, fn);
  ASSERT_TRUE(first) << first.error().ToString();
  EXPECT_EQ(this->Where("idempotency_keys", "key = 'k'"), this->Part("idempotency_keys", kD0));
  Inbox inbox(&clock);
  auto claim = [&]() -> InboxClaim {
    InboxClaim c = InboxClaim::kFirst;
    EXPECT_TRUE(this->db_->Transact([&](Tx& tx) -> Status {
                         CONVERGE_ASSIGN_OR_RETURN(
                             c, inbox.Claim(tx, "ledger", {"urn:src", "ev-1"}, 48h));
                         return OkStatus();
                       }).ok());
    return c;
  };
  EXPECT_EQ(claim(), InboxClaim::kFirst);
  ASSERT_TRUE(this->Enqueue(&clock, "ev-o").ok());
  EXPECT_EQ(this->Where("outbox_events", "event_id = 'ev-o'"), this->Part("outbox_events", kD0));

  clock.Advance(24h);  // the next day: new rows go to the next partition
  auto again = keys.Execute({"t", "k", "f"}, fn);
  ASSERT_TRUE(again) << again.error().ToString();
  EXPECT_TRUE(again->replayed);
  EXPECT_EQ(runs, 1);
  EXPECT_EQ(claim(), InboxClaim::kDuplicate);
  // An event's copy is refused as the table's UNIQUE constraint refuses it elsewhere.
  Status copy = this->Enqueue(&clock, "ev-o");
  EXPECT_EQ(copy.code(), StatusCode::kAlreadyExists) << copy.ToString();

  // Straight into the table too, with the copy's created_at in the next partition:
  // skipped, as ON CONFLICT DO NOTHING would skip a copy in the same one.
  int64_t inserted = -1;
  ASSERT_TRUE(this->db_->Transact([&](Tx& tx) -> Status {
                       CONVERGE_ASSIGN_OR_RETURN(inserted,
                                                 this->InsertKey(tx, "k", kD0 + kDay + 1000));
                       return OkStatus();
                     }).ok());
  EXPECT_EQ(inserted, 0);
  EXPECT_EQ(this->Count("SELECT count(*) FROM idempotency_keys WHERE key = 'k'"), 1);
  EXPECT_EQ(this->Count("SELECT count(*) FROM consumer_inbox WHERE event_id = 'ev-1'"), 1);
  EXPECT_EQ(this->Count("SELECT count(*) FROM outbox_events WHERE event_id = 'ev-o'"), 1);
  EXPECT_EQ(this->Count("SELECT count(*) FROM test_effects"), 1);
}

// Two claimers of one key in different periods at once: the second waits for the first
// (the trigger's lock), then finds its row. Without the lock both would find nothing and
// both insert, each into its own partition.
TYPED_TEST(Partitions, AConcurrentCopyInAnotherPartitionWaitsAndIsCaught) {
  ManualClock clock(kD0 + 12 * 3600 * 1000);
  ASSERT_TRUE(Sweeper(*this->db_, {}, &clock).RunOnce());
  std::promise<void> inserted_first, release_first;
  Status first;
  std::thread a([&] {
    first = this->db_->Transact([&](Tx& tx) -> Status {
      auto n = this->InsertKey(tx, "k", kD0 + 1000);
      inserted_first.set_value();
      if (!n || *n != 1) return InternalError("first insert failed or skipped");
      release_first.get_future().wait();  // hold the transaction open
      return OkStatus();
    });
  });
  inserted_first.get_future().wait();
  int64_t second = -1;
  std::thread b([&] {
    EXPECT_TRUE(this->db_->Transact([&](Tx& tx) -> Status {
                         CONVERGE_ASSIGN_OR_RETURN(second,
                                                   this->InsertKey(tx, "k", kD0 + kDay + 1000));
                         return OkStatus();
                       }).ok());
  });
  const bool waited =
      testing::WaitUntil([&] { return this->store_.SomeoneWaits(*this->db_); });
  release_first.set_value();
  a.join();
  b.join();
  EXPECT_TRUE(waited);
  ASSERT_TRUE(first.ok()) << first.ToString();
  EXPECT_EQ(second, 0);
  EXPECT_EQ(this->Count("SELECT count(*) FROM idempotency_keys WHERE key = 'k'"), 1);
}

// The same for an event: two producers enqueue one event (of two aggregates, so that
// Outbox::Enqueue's per-aggregate lock does not order them) on either side of a period
// boundary, one in each partition. The second waits for the first's commit and fails
// with kAlreadyExists.
TYPED_TEST(Partitions, AConcurrentEventCopyInAnotherPartitionFailsAsADuplicate) {
  ManualClock day0(kD0 + kDay - 1), day1(kD0 + kDay);
  ASSERT_TRUE(Sweeper(*this->db_, {}, &day0).RunOnce());
  Outbox outbox0({}, &day0), outbox1({}, &day1);
  std::promise<void> inserted_first, release_first;
  Status first, second;
  std::thread a([&] {
    first = this->db_->Transact([&](Tx& tx) -> Status {
      Status st = StatusOf(outbox0.Enqueue(tx, Event{.id = "ev-b", .type = "t", .subject = "a"}));
      if (st.ok()) st = StatusOf(tx.Query("SELECT 1"));  // the deferred INSERT has run
      inserted_first.set_value();
      CONVERGE_RETURN_IF_ERROR(st);
      release_first.get_future().wait();  // hold the transaction open
      return OkStatus();
    });
  });
  inserted_first.get_future().wait();
  std::thread b([&] {
    second = this->db_->Transact([&](Tx& tx) -> Status {
      return StatusOf(outbox1.Enqueue(tx, Event{.id = "ev-b", .type = "t", .subject = "b"}));
    });
  });
  const bool waited =
      testing::WaitUntil([&] { return this->store_.SomeoneWaits(*this->db_); });
  release_first.set_value();
  a.join();
  b.join();
  EXPECT_TRUE(waited);
  ASSERT_TRUE(first.ok()) << first.ToString();
  EXPECT_EQ(second.code(), StatusCode::kAlreadyExists) << second.ToString();
  EXPECT_EQ(this->Where("outbox_events", "event_id = 'ev-b'"), this->Part("outbox_events", kD0));
  EXPECT_EQ(this->Count("SELECT count(*) FROM outbox_events WHERE event_id = 'ev-b'"), 1);
}

TYPED_TEST(Partitions, TheSweeperCreatesAheadAndDropsAPartitionOnceEveryRowExpired) {
  ManualClock clock(kD0 + 12 * 3600 * 1000);
  Sweeper sweeper(*this->db_, {.partitions_ahead = 2}, &clock);
  auto s = sweeper.RunOnce();
  ASSERT_TRUE(s) << s.error().ToString();
  EXPECT_EQ(s->partitions_created, 9);  // days 0, 1, 2 of the three tables
  for (const std::string table : {"idempotency_keys", "consumer_inbox", "outbox_events"}) {
    auto parts = this->List(table);
    ASSERT_EQ(parts.size(), 3u) << table;
    for (int i = 0; i < 3; ++i) {
      EXPECT_EQ(parts[i].name, this->Part(table, kD0 + i * kDay));
      EXPECT_EQ(parts[i].from, kD0 + i * kDay);
      EXPECT_EQ(parts[i].to, kD0 + (i + 1) * kDay);
    }
  }
  s = sweeper.RunOnce();
  ASSERT_TRUE(s);
  EXPECT_EQ(s->partitions_created, 0);

  // A key that expires 30 h after its start, an inbox row after 1 h: both in day 0.
  IdempotencyKeys keys(*this->db_, {.ttl = 30h, .lease = 5s}, &clock);
  auto done = [](Tx&) -> Result<StoredResponse> { return StoredResponse{200, {}, "ok"}; };
  ASSERT_TRUE(keys.Execute({"t", "k", "f"}, done));
  ASSERT_TRUE(this->db_->Transact([&](Tx& tx) {
                     return StatusOf(Inbox(&clock).Claim(tx, "c", {"urn:s", "e"}, 1h));
                   }).ok());

  clock.Set(kD0 + kDay + 3600 * 1000);  // day 1, 01:00: day 0 has ended
  s = sweeper.RunOnce();
  ASSERT_TRUE(s) << s.error().ToString();
  EXPECT_EQ(s->partitions_created, 3);  // day 3
  // The inbox's and the (empty) outbox's day 0; the key lives until 18:00.
  EXPECT_EQ(s->partitions_dropped, 2);
  EXPECT_EQ(s->total(), 0);
  EXPECT_EQ(this->Count("SELECT count(*) FROM consumer_inbox"), 0);
  EXPECT_EQ(this->Count("SELECT count(*) FROM idempotency_keys"), 1);
  EXPECT_EQ(this->List("consumer_inbox").front().from, kD0 + kDay);
  EXPECT_EQ(this->List("idempotency_keys").front().from, kD0);

  clock.Set(kD0 + kDay + 18 * 3600 * 1000 + 1);  // the key has expired
  s = sweeper.RunOnce();
  ASSERT_TRUE(s);
  EXPECT_EQ(s->partitions_dropped, 1);
  EXPECT_EQ(this->Count("SELECT count(*) FROM idempotency_keys"), 0);
  EXPECT_EQ(this->List("idempotency_keys").front().from, kD0 + kDay);
  // The key is new again.
  auto fresh = keys.Execute({"t", "k", "f"}, done);
  ASSERT_TRUE(fresh);
  EXPECT_FALSE(fresh->replayed);
}

// Rows no partition covered when they were written (the sweeper had not run yet) go to
// the DEFAULT partition, which is swept row by row as a plain table would be.
TYPED_TEST(Partitions, RowsInTheDefaultPartitionAreSweptRowByRow) {
  ManualClock clock(kD0 + 12 * 3600 * 1000);
  IdempotencyKeys keys(*this->db_, {.ttl = 10s, .lease = 5s}, &clock);
  auto done = [](Tx&) -> Result<StoredResponse> { return StoredResponse{200, {}, "ok"}; };
  ASSERT_TRUE(keys.Execute({"t", "k", "f"}, done));
  EXPECT_EQ(this->Where("idempotency_keys", "key = 'k'"), "idempotency_keys_default");
  clock.Advance(11s);
  auto s = Sweeper(*this->db_, {}, &clock).RunOnce();
  ASSERT_TRUE(s) << s.error().ToString();
  EXPECT_EQ(s->keys, 1);
  // Day 0's range stayed in the DEFAULT partition while it held a row of it.
  EXPECT_EQ(this->List("idempotency_keys").front().from, kD0 + kDay);
  EXPECT_EQ(this->List("consumer_inbox").front().from, kD0);
}

// Unfinished work past its first phase never expires (http-idempotency.md): its whole
// partition waits, however long ago the period ended, and goes once the work finished
// and expired.
TYPED_TEST(Partitions, APartitionHoldingUnfinishedWorkPastItsFirstPhaseIsKept) {
  ManualClock clock(kD0 + 12 * 3600 * 1000);
  Sweeper sweeper(*this->db_, {}, &clock);
  ASSERT_TRUE(sweeper.RunOnce());
  IdempotencyKeys keys(*this->db_, {.ttl = 10s, .lease = 5s}, &clock);
  auto a = keys.Begin({"t", "k", "f"});
  ASSERT_TRUE(a);
  ASSERT_TRUE(keys.Advance(a->lease, "charged", "ch_1", [](Tx& tx) {
                    return TestFixture::Effect(tx, "pay");
                  }).ok());
  clock.Advance(72h);
  auto s = sweeper.RunOnce();
  ASSERT_TRUE(s) << s.error().ToString();
  // Days 1 and 2 of the keys, 0 to 2 of the inbox and of the (empty) outbox.
  EXPECT_EQ(s->partitions_dropped, 8);
  EXPECT_EQ(this->List("idempotency_keys").front().from, kD0);
  EXPECT_EQ(this->Where("idempotency_keys", "key = 'k'"), this->Part("idempotency_keys", kD0));
  auto b = keys.Begin({"t", "k", "f"});
  ASSERT_TRUE(b) << b.error().ToString();
  ASSERT_EQ(b->kind, Begun::Kind::kResumed);
  EXPECT_EQ(b->lease.recovery_point, "charged");
  ASSERT_TRUE(keys.Complete(b->lease, [](Tx&) -> Result<StoredResponse> {
                    return StoredResponse{201, {}, "paid"};
                  }));
  s = sweeper.RunOnce();
  ASSERT_TRUE(s);
  EXPECT_EQ(s->partitions_dropped, 1);  // the keys' day 0: finished, and long expired
  EXPECT_EQ(this->Count("SELECT count(*) FROM idempotency_keys"), 0);
}

// The sweeper looks at a partition without the lock first; a stalled attempt may advance
// past its first phase between that look and the drop. The drop checks again under its
// lock, and keeps the partition. (Without that check, the next retry would charge again.)
TYPED_TEST(Partitions, ThePartitionDropChecksAgainUnderItsLock) {
  ManualClock clock(kD0 + 12 * 3600 * 1000);
  Sweeper sweeper(*this->db_, {}, &clock);
  ASSERT_TRUE(sweeper.RunOnce());
  IdempotencyKeys keys(*this->db_, {.ttl = 10s, .lease = 5s}, &clock);
  auto a = keys.Begin({"t", "k", "f"});
  ASSERT_TRUE(a);
  KeyLease lease = a->lease;
  clock.Advance(48h);  // A stalled at "started": forgettable, and day 0 has ended
  ASSERT_TRUE(failpoint::Configure("sweeper.before_partition_drop=pause*1").ok());
  std::optional<Result<SweepStats>> swept;
  std::thread sweep([&] { swept = sweeper.RunOnce(); });
  ASSERT_TRUE(failpoint::WaitPaused("sweeper.before_partition_drop", 20s));
  ASSERT_TRUE(keys.Advance(lease, "charged", "ch_1", [](Tx& tx) {
                    return TestFixture::Effect(tx, "pay");
                  }).ok());
  failpoint::Release("sweeper.before_partition_drop");
  sweep.join();
  ASSERT_TRUE(swept.has_value() && *swept) << (*swept).error().ToString();
  EXPECT_EQ(this->Where("idempotency_keys", "key = 'k'"), this->Part("idempotency_keys", kD0));
  clock.Advance(6s);  // A's renewed lease lapses: a retry resumes where A got to
  auto b = keys.Begin({"t", "k", "f"});
  ASSERT_TRUE(b) << b.error().ToString();
  EXPECT_EQ(b->kind, Begun::Kind::kResumed);
  EXPECT_EQ(b->lease.recovery_point, "charged");
}

// An outbox partition waits for its last event to be published and then for
// published_retention, as the row-by-row sweep would keep each event: an event the relay
// has not published yet is never dropped, however old.
TYPED_TEST(Partitions, AnOutboxPartitionGoesOnceEveryEventIsPublishedPastRetention) {
  ManualClock clock(kD0 + 12 * 3600 * 1000);
  Sweeper sweeper(*this->db_, {.published_retention = 1h}, &clock);
  ASSERT_TRUE(sweeper.RunOnce());
  ASSERT_TRUE(this->Enqueue(&clock, "ev-1").ok());
  ASSERT_TRUE(this->Enqueue(&clock, "ev-2").ok());
  EXPECT_EQ(this->Where("outbox_events", "true"), this->Part("outbox_events", kD0));
  this->PublishAll(clock.NowMillis());
  clock.Set(kD0 + 3 * kDay);  // day 0 ended long ago; its events went out at once
  ASSERT_TRUE(this->db_->Transact([&](Tx& tx) {  // ... but for one, made unpublished again
                     return StatusOf(tx.Exec("UPDATE outbox_events SET published_at = NULL "
                                             "WHERE event_id = 'ev-2'"));
                   }).ok());
  auto s = sweeper.RunOnce();
  ASSERT_TRUE(s) << s.error().ToString();
  EXPECT_EQ(s->outbox, 0);
  EXPECT_EQ(this->List("outbox_events").front().from, kD0);
  EXPECT_EQ(this->Count("SELECT count(*) FROM outbox_events"), 2);

  this->PublishAll(clock.NowMillis());  // the relay publishes it now
  clock.Advance(1h - 1ms);
  s = sweeper.RunOnce();
  ASSERT_TRUE(s);
  EXPECT_EQ(this->List("outbox_events").front().from, kD0);  // published under 1 h ago
  clock.Advance(1ms);
  s = sweeper.RunOnce();
  ASSERT_TRUE(s);
  EXPECT_EQ(s->partitions_dropped, 1);
  EXPECT_EQ(s->outbox, 0);  // gone with its partition, not row by row
  EXPECT_EQ(this->Count("SELECT count(*) FROM outbox_events"), 0);
  EXPECT_EQ(this->List("outbox_events").front().from, kD0 + 3 * kDay);  // 1 and 2 were empty
}

// A dead letter's replay makes a published event unpublished again (OutboxRequeuer)
// between the sweeper's look at the partition and its drop: the drop checks again under
// its lock and keeps the event, which the relay then publishes again.
TYPED_TEST(Partitions, AnOutboxEventRequeuedBeforeThePartitionDropIsKept) {
  ManualClock clock(kD0 + 12 * 3600 * 1000);
  Sweeper sweeper(*this->db_, {.published_retention = 1h}, &clock);
  ASSERT_TRUE(sweeper.RunOnce());
  ASSERT_TRUE(this->Enqueue(&clock, "ev-1").ok());
  this->PublishAll(kD0 + kDay);
  clock.Set(kD0 + kDay + 1800 * 1000);  // day 0 is over: the other tables' day 0 go now
  auto s = sweeper.RunOnce();
  ASSERT_TRUE(s) << s.error().ToString();
  EXPECT_EQ(this->List("outbox_events").front().from, kD0);
  clock.Advance(1h);  // the event's retention is over: its partition is the only candidate
  ASSERT_TRUE(failpoint::Configure("sweeper.before_partition_drop=pause*1").ok());
  std::optional<Result<SweepStats>> swept;
  std::thread sweep([&] { swept = sweeper.RunOnce(); });
  ASSERT_TRUE(failpoint::WaitPaused("sweeper.before_partition_drop", 20s));
  ASSERT_TRUE(this->db_->Transact([&](Tx& tx) {
                     return StatusOf(tx.Exec("UPDATE outbox_events SET published_at = NULL "
                                             "WHERE event_id = 'ev-1'"));
                   }).ok());
  failpoint::Release("sweeper.before_partition_drop");
  sweep.join();
  ASSERT_TRUE(swept.has_value() && *swept) << (*swept).error().ToString();
  EXPECT_EQ((*swept)->partitions_dropped, 0);
  EXPECT_EQ(this->Where("outbox_events", "event_id = 'ev-1' AND published_at IS NULL"),
            this->Part("outbox_events", kD0));
}

// A store created partitioned before the outbox was (schema version 11) holds a plain
// outbox_events with rows: opening it converts the table and keeps every event, its seq
// and its uniqueness.
TYPED_TEST(Partitions, AnOlderPartitionedStoreGetsItsOutboxPartitionedWithItsEvents) {
  ManualClock clock(kD0 + 12 * 3600 * 1000);
  this->MakeOutboxPlain();
  for (const char* id : {"ev-1", "ev-2", "ev-3"}) ASSERT_TRUE(this->Enqueue(&clock, id).ok());
  this->PublishAll(clock.NowMillis());
  ASSERT_EQ(this->Count("SELECT count(*) FROM pg_partitioned_table "
                        "WHERE partrelid = to_regclass('outbox_events')"),
            0);
  const int64_t last = this->Count("SELECT max(seq) FROM outbox_events");

  auto reopened = Database::Open(this->store_.libpq_uri);
  ASSERT_TRUE(reopened) << reopened.error().ToString();
  EXPECT_EQ(this->Count("SELECT count(*) FROM pg_partitioned_table "
                        "WHERE partrelid = to_regclass('outbox_events')"),
            1);
  EXPECT_EQ(this->Count("SELECT count(*) FROM outbox_events_default "
                        "WHERE published_at IS NOT NULL"),
            3);
  EXPECT_EQ(this->Count("SELECT max(seq) FROM outbox_events"), last);
  EXPECT_EQ(this->Enqueue(&clock, "ev-2").code(), StatusCode::kAlreadyExists);
  ASSERT_TRUE(this->Enqueue(&clock, "ev-4").ok());
  // Past the old events (the refused copy drew a number too: a sequence has gaps).
  EXPECT_GT(this->Count("SELECT seq FROM outbox_events WHERE event_id = 'ev-4'"), last);
  // Rows of the DEFAULT partition go row by row; its range comes free for a partition.
  clock.Advance(24h * 7 + 1ms);
  this->PublishAll(clock.NowMillis() - 7 * kDay - 1);
  auto s = Sweeper(**reopened, {}, &clock).RunOnce();
  ASSERT_TRUE(s) << s.error().ToString();
  EXPECT_EQ(s->outbox, 4);
  EXPECT_EQ(this->Count("SELECT count(*) FROM outbox_events"), 0);
}

// The conversion copies an outbox of any size: the copy does not go through the
// uniqueness trigger, whose advisory lock per row would fill PostgreSQL's lock table
// ("out of shared memory") past a few thousand events; the plain table's UNIQUE
// constraint already made the copied events unique.
TYPED_TEST(Partitions, AnOlderPartitionedStoreWithALargeOutboxIsConverted) {
  ManualClock clock(kD0 + 12 * 3600 * 1000);
  this->MakeOutboxPlain();
  constexpr int64_t kEvents = 100000;  // several times the test server's lock table
  Status loaded = this->db_->Transact([&](Tx& tx) {
                       return StatusOf(tx.Exec(
                           "INSERT INTO outbox_events (event_id, source, aggregate_type, "
                           "aggregate_id, type, payload, created_at, published_at) SELECT "
                           "'ev-' || g, 's', 'order', 'o-' || (g % 100), 'order.created', "
                           "'{}', $1, CASE WHEN g % 2 = 0 THEN CAST($1 AS BIGINT) END "
                           "FROM generate_series(1, CAST($2 AS BIGINT)) g",
                           clock.NowMillis(), kEvents));
                     });
  ASSERT_TRUE(loaded.ok()) << loaded.ToString();
  const int64_t last = this->Count("SELECT max(seq) FROM outbox_events");

  auto reopened = Database::Open(this->store_.libpq_uri);
  ASSERT_TRUE(reopened) << reopened.error().ToString();
  EXPECT_EQ(this->Count("SELECT count(*) FROM pg_partitioned_table "
                        "WHERE partrelid = to_regclass('outbox_events')"),
            1);
  EXPECT_EQ(this->Count("SELECT count(*) FROM outbox_events_default"), kEvents);
  EXPECT_EQ(this->Count("SELECT count(*) FROM outbox_events WHERE published_at IS NULL"),
            kEvents / 2);
  EXPECT_EQ(this->Count("SELECT max(seq) FROM outbox_events"), last);
  // The trigger is in place for what comes after.
  Status copy = (*reopened)->Transact([&](Tx& tx) {
    return StatusOf(tx.Exec("INSERT INTO outbox_events (event_id, source, aggregate_type, "
                            "aggregate_id, type, payload, created_at) VALUES ('ev-7', 's', "
                            "'order', 'o-7', 'order.created', '{}', $1)",
                            clock.NowMillis() + kDay));
  });
  EXPECT_EQ(copy.code(), StatusCode::kAlreadyExists) << copy.ToString();
}

}  // namespace
}  // namespace converge
