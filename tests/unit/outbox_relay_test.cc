#include <map>
#include <vector>

#include <gtest/gtest.h>

#include "converge/consumer.h"
#include "converge/failpoint.h"
#include "converge/outbox.h"
#include "converge/relay.h"
#include "converge/sql_queue.h"
#include "tests/unit/test_util.h"

namespace converge {
namespace {

using testing::OpenSqlite;
using testing::QueryInt;
using testing::TempDir;

Event MakeEvent(const std::string& subject, const std::string& type = "thing.happened",
                const std::string& data = "{}") {
  Event e;
  e.type = type;
  e.subject = subject;
  e.data = data;
  return e;
}

// A publisher that records what it sent, and can fail chosen events once. It never shares
// the outbox database, so the relay publishes and marks in two steps.
class RecordingPublisher : public PublisherWrapper {
 public:
  explicit RecordingPublisher(Publisher* target) : PublisherWrapper(target) {}
  Status Publish(const Message& m) override {
    if (fail_once_.erase(m.id)) return UnavailableError("broker hiccup");
    sent_.push_back(m);
    return target_->Publish(m);
  }
  std::set<std::string> fail_once_;
  std::vector<Message> sent_;
};

class OutboxRelayTest : public ::testing::Test {
 protected:
  void SetUp() override {
    db_ = OpenSqlite(dir_.File("db.sqlite"));
    ASSERT_NE(db_, nullptr);
    queue_ = std::make_unique<SqlQueue>(*db_);
    ASSERT_TRUE(queue_->Subscribe("all", "*").ok());
  }

  std::string Enqueue(Event e) {
    std::string id;
    Status st = db_->Transact([&](Tx& tx) -> Status {
      CONVERGE_ASSIGN_OR_RETURN(id, outbox_.Enqueue(tx, e));
      return OkStatus();
    });
    EXPECT_TRUE(st.ok()) << st.ToString();
    return id;
  }

  TempDir dir_;
  std::unique_ptr<Database> db_;
  Outbox outbox_;
  std::unique_ptr<SqlQueue> queue_;
};

TEST_F(OutboxRelayTest, EnqueueWritesACloudEventsEnvelope) {
  Event e = MakeEvent("agg-1", "payment.captured", R"({"amount":5})");
  e.traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
  std::string id = Enqueue(e);
  Rows rows;
  ASSERT_TRUE(db_->Read([&](Tx& tx) -> Status {
                   CONVERGE_ASSIGN_OR_RETURN(rows, tx.Query("SELECT payload, aggregate_type FROM outbox_events"));
                   return OkStatus();
                 }).ok());
  ASSERT_EQ(rows.size(), 1u);
  EXPECT_EQ(rows[0].Text(1), "payment");
  auto decoded = DecodeEnvelope(rows[0].Text(0));
  ASSERT_TRUE(decoded) << decoded.error().ToString();
  EXPECT_EQ(decoded->id, id);
  EXPECT_EQ(decoded->source, "urn:converge");
  EXPECT_EQ(decoded->type, "payment.captured");
  EXPECT_EQ(decoded->subject, "agg-1");
  EXPECT_EQ(decoded->data, R"({"amount":5})");
  EXPECT_EQ(decoded->traceparent, e.traceparent);
  EXPECT_GT(decoded->time, 0);
}

// Found by fuzz/envelope_fuzz.cc: a time before 1970 was written as "...00.-500Z", which
// no decoder accepts, and the lenient parse took times that did not re-parse once encoded.
TEST(Envelope, TimesRoundTripBefore1970AndMalformedOnesAreRefused) {
  EXPECT_EQ(FormatRfc3339(-500), "1969-12-31T23:59:59.500Z");
  EXPECT_EQ(FormatRfc3339(-1000), "1969-12-31T23:59:59.000Z");
  EXPECT_EQ(FormatRfc3339(1500), "1970-01-01T00:00:01.500Z");
  auto envelope = [](const std::string& time) {
    return R"({"specversion":"1.0","id":"e","source":"s","type":"t","time":")" + time + "\"}";
  };
  for (const char* time : {"1969-12-31T23:59:59.5Z", "1588-05-01T12:00:01.123456Z",
                           "0000-01-01T00:00:00Z", "2024-02-29T23:59:59.999Z"}) {
    auto e = DecodeEnvelope(envelope(time));
    ASSERT_TRUE(e) << time << ": " << e.error().ToString();
    auto again = DecodeEnvelope(EncodeEnvelope(*e));
    ASSERT_TRUE(again) << time << ": " << again.error().ToString();
    EXPECT_EQ(again->time, e->time) << time;
  }
  EXPECT_EQ(DecodeEnvelope(envelope("1969-12-31T23:59:59.5Z"))->time, -500);
  for (const char* time : {"-123-01-01T00:00:00Z", " 2024-01-01T00:00:00Z",
                           "2024-1-01T00:00:00Z", "2024-13-01T00:00:00Z",
                           "2023-02-29T00:00:00Z", "2024-01-01T24:00:00Z",
                           "2024-01-01T00:00:60Z", "2024-01-01T00:00:00Z junk",
                           "2024-01-01T00:00:00.Z", "2024-01-01T00:00:00", "2024-01-01"}) {
    auto e = DecodeEnvelope(envelope(time));
    EXPECT_FALSE(e) << time;
  }
}

TEST_F(OutboxRelayTest, MalformedEventsAreRejectedAndWriteNothing) {
  std::vector<Event> bad = {MakeEvent("s", ""), MakeEvent("", "t.x"),
                            MakeEvent("s", "t.x", "{not json"),
                            MakeEvent(std::string(256, 's')), MakeEvent("s", "bad\ttype")};
  Event tp = MakeEvent("s");
  tp.traceparent = "01-xyz";
  bad.push_back(tp);
  for (const Event& e : bad) {
    Status st = db_->Transact([&](Tx& tx) { return StatusOf(outbox_.Enqueue(tx, e)); });
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << e.type << "/" << e.subject;
  }
  EXPECT_EQ(QueryInt(*db_, "SELECT count(*) FROM outbox_events"), 0);
}

TEST_F(OutboxRelayTest, EventRollsBackWithTheBusinessTransaction) {
  Status st = db_->Transact([&](Tx& tx) -> Status {
    CONVERGE_RETURN_IF_ERROR(outbox_.Enqueue(tx, MakeEvent("a")));
    return FailedPreconditionError("business rule failed");
  });
  EXPECT_FALSE(st.ok());
  EXPECT_EQ(QueryInt(*db_, "SELECT count(*) FROM outbox_events"), 0);
}

TEST_F(OutboxRelayTest, SharedDatabaseRelayPublishesAndMarksInOneTransaction) {
  for (int i = 0; i < 5; ++i) Enqueue(MakeEvent("a"));
  Relay relay(*db_, outbox_, *queue_);
  auto n = relay.RunOnce();
  ASSERT_TRUE(n) << n.error().ToString();
  EXPECT_EQ(*n, 5u);
  EXPECT_EQ(QueryInt(*db_, "SELECT count(*) FROM outbox_events WHERE published_at IS NULL"), 0);
  EXPECT_EQ(*queue_->Depth("all"), 5);
  EXPECT_EQ(*relay.RunOnce(), 0u);
}

TEST_F(OutboxRelayTest, RowCommittedLateWithALowerSeqIsNotSkipped) {
  Enqueue(MakeEvent("a"));
  Enqueue(MakeEvent("a"));
  Relay relay(*db_, outbox_, *queue_);
  ASSERT_EQ(*relay.RunOnce(), 2u);
  // On PostgreSQL a transaction can take seq 1 and commit after seqs 2 and 3 were
  // published. Reproduce that row: an unpublished event below everything published.
  ASSERT_TRUE(db_->Transact([](Tx& tx) {
                   return StatusOf(tx.Exec("UPDATE outbox_events SET published_at = NULL WHERE seq = 1"));
                 }).ok());
  ASSERT_TRUE(db_->Transact([](Tx& tx) { return StatusOf(tx.Exec("DELETE FROM queue_messages")); }).ok());
  EXPECT_EQ(*relay.RunOnce(), 1u);
  EXPECT_EQ(*queue_->Depth("all"), 1);
}

TEST_F(OutboxRelayTest, FailedPublishStopsOnlyThatAggregateAndKeepsOrder) {
  std::vector<std::string> a, b;
  for (int i = 0; i < 3; ++i) {
    a.push_back(Enqueue(MakeEvent("A")));
    b.push_back(Enqueue(MakeEvent("B")));
  }
  RecordingPublisher pub(queue_.get());
  pub.fail_once_ = {a[1]};
  Relay relay(*db_, outbox_, pub);
  ASSERT_EQ(*relay.RunOnce(), 4u);  // A1, B1, B2, B3; A2 failed, A3 waits behind it
  EXPECT_EQ(relay.stats().publish_failures, 1);
  ASSERT_EQ(*relay.RunOnce(), 2u);  // A2, A3
  std::map<std::string, std::vector<std::string>> order;
  for (const Message& m : pub.sent_) order[m.subject].push_back(m.id);
  EXPECT_EQ(order["A"], a);
  EXPECT_EQ(order["B"], b);
  EXPECT_EQ(QueryInt(*db_, "SELECT count(*) FROM outbox_events WHERE published_at IS NULL"), 0);
}

TEST_F(OutboxRelayTest, BackgroundRelayIsWokenByCommit) {
  Relay relay(*db_, outbox_, *queue_, RelayOptions{.batch = 16, .poll = std::chrono::hours(1)});
  relay.Start();
  Enqueue(MakeEvent("a"));
  EXPECT_TRUE(testing::WaitUntil([&] { return *queue_->Depth("all") == 1; }));
  relay.Stop();
}

TEST(SqlQueueRouting, PatternsMatchExactPrefixAndAll) {
  EXPECT_TRUE(SqlQueue::Matches("*", "a.b"));
  EXPECT_TRUE(SqlQueue::Matches("a.b", "a.b"));
  EXPECT_TRUE(SqlQueue::Matches("a.*", "a.b"));
  EXPECT_FALSE(SqlQueue::Matches("a.*", "a"));
  EXPECT_FALSE(SqlQueue::Matches("a.*", "ab.c"));
  EXPECT_FALSE(SqlQueue::Matches("a.b", "a.c"));
}

TEST_F(OutboxRelayTest, SubscribeRejectsBadPatterns) {
  EXPECT_EQ(queue_->Subscribe("", "x").code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(queue_->Subscribe("q", "a*b").code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(queue_->Subscribe("q", "*.a").code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(queue_->Subscribe("q", "payment.*").ok());
  EXPECT_TRUE(queue_->Subscribe("q", "payment.*").ok());  // idempotent
}

// The relay crashes after the broker took the events and before it marked them. On
// restart it publishes them again; the consumer's inbox absorbs the duplicates.
TEST(OutboxRelayCrash, RepublishesAfterCrashBetweenPublishAndMark) {
  TempDir dir;
  const std::string path = dir.File("db.sqlite");
  {
    auto db = OpenSqlite(path);
    testing::CreateEffectsTable(*db);
    SqlQueue queue(*db);
    ASSERT_TRUE(queue.Subscribe("ledger", "*").ok());
    Outbox outbox;
    ASSERT_TRUE(db->Transact([&](Tx& tx) { return StatusOf(outbox.Enqueue(tx, MakeEvent("p1"))); }).ok());
  }
  int status = testing::RunInChild([&] {
    auto db = OpenSqlite(path);
    SqlQueue queue(*db);
    RecordingPublisher external(&queue);  // publish and mark in two steps
    Outbox outbox;
    Relay relay(*db, outbox, external, RelayOptions{.name = "relay-1"});
    (void)failpoint::Configure("relay.after_publish_before_mark=crash");
    (void)relay.RunOnce();
    return false;
  });
  ASSERT_TRUE(testing::KilledBySigkill(status));

  auto db = OpenSqlite(path);
  SqlQueue queue(*db);
  EXPECT_EQ(*queue.Depth("ledger"), 1);  // published before the crash
  EXPECT_EQ(QueryInt(*db, "SELECT count(*) FROM outbox_events WHERE published_at IS NULL"), 1);
  RecordingPublisher external(&queue);
  Outbox outbox;
  Relay relay(*db, outbox, external, RelayOptions{.name = "relay-1"});
  ASSERT_EQ(*relay.RunOnce(), 1u);
  EXPECT_EQ(*queue.Depth("ledger"), 2);  // the at-least-once duplicate

  auto sub = queue.OpenSubscriber("ledger");
  Consumer consumer(*db, *sub, ConsumerOptions{.name = "ledger"});
  consumer.On("*", [](Tx& tx, const Event& e) {
    return StatusOf(tx.Exec("INSERT INTO test_effects (id) VALUES ($1)", e.id));
  });
  ASSERT_EQ(*consumer.RunOnce(), 2u);
  EXPECT_EQ(QueryInt(*db, "SELECT count(*) FROM test_effects"), 1);
  EXPECT_EQ(consumer.stats().processed, 1);
  EXPECT_EQ(consumer.stats().duplicates, 1);
  EXPECT_EQ(*queue.Depth("ledger"), 0);
}

}  // namespace
}  // namespace converge
