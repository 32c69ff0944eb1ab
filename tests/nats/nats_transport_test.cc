// The NATS JetStream transport against real nats-server processes (label `nats`): broker
// dedupe, redelivery absorbed by the inbox, a worker killed mid-batch, poison messages,
// in-progress acks, and the retention check.
#include <gtest/gtest.h>

#include <atomic>
#include <string>
#include <vector>

#include "converge/consumer.h"
#include "converge/dead_letters.h"
#include "converge/failpoint.h"
#include "converge/nats.h"
#include "converge/outbox.h"
#include "converge/relay.h"
#include "tests/nats/nats_servers.h"
#include "tests/unit/test_util.h"

namespace converge {
namespace {

using namespace std::chrono_literals;
using testing::KilledBySigkill;
using testing::NatsServers;
using testing::OpenSqlite;
using testing::QueryInt;
using testing::RunInChild;
using testing::TempDir;
using testing::WaitUntil;

Event MakeEvent(const std::string& id, const std::string& type = "payment.captured") {
  Event e;
  e.id = id;
  e.source = "urn:test";
  e.type = type;
  e.subject = "agg-" + id;
  e.time = 1'700'000'000'000;
  e.aggregate_type = "payment";
  e.data = R"({"n":1})";
  e.envelope = EncodeEnvelope(e);
  return e;
}

ConsumerOptions LedgerOptions() {
  ConsumerOptions o;
  o.name = "ledger";
  o.max_attempts = 3;
  o.backoff_initial = 50ms;
  o.backoff_max = 200ms;
  o.visibility = 30s;
  o.batch = 10;
  return o;
}

NatsSubscription LedgerSubscription() {
  NatsSubscription s;
  s.consumer = "ledger";
  s.pattern = "payment.*";
  s.ack_wait = 1s;
  s.max_deliver = 6;
  s.fetch_wait = 100ms;
  return s;
}

// A business table without a key: an effect applied twice shows as two rows.
void CreateEffects(Database& db) {
  ASSERT_TRUE(db.Transact([](Tx& tx) {
                  return StatusOf(
                      tx.Exec("CREATE TABLE IF NOT EXISTS nats_effects "
                              "(event_id TEXT NOT NULL)"));
                }).ok());
}

Status RecordEffect(Tx& tx, const Event& e) {
  return StatusOf(tx.Exec("INSERT INTO nats_effects(event_id) VALUES ($1)", e.id));
}

Result<std::unique_ptr<NatsBroker>> Connect(const std::string& urls) {
  CONVERGE_ASSIGN_OR_RETURN(NatsOptions o, ParseNatsUri("nats://" + urls));
  return NatsBroker::Connect(std::move(o));
}

class NatsTransport : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(nats_.Start(1));
    db_ = OpenSqlite(dir_.File("db.sqlite"));
    ASSERT_NE(db_, nullptr);
    CreateEffects(*db_);
  }
  void TearDown() override { (void)failpoint::Configure(""); }

  // Runs `consumer` until `done` holds (deadline 60 s).
  static bool RunUntil(Consumer& consumer, const std::function<bool()>& done) {
    return WaitUntil(
        [&] {
          (void)consumer.RunOnce();
          return done();
        },
        60s);
  }

  NatsServers nats_;
  TempDir dir_;
  std::unique_ptr<Database> db_;
};

// The relay publishes, "crashes" before marking, and publishes again: the stream drops
// the second copies (Nats-Msg-Id = event id) and reports them as duplicates.
TEST_F(NatsTransport, RelayRepublishInsideTheWindowIsDroppedByTheStream) {
  auto broker = Connect(nats_.urls());
  ASSERT_TRUE(broker.has_value()) << broker.error().ToString();
  Outbox outbox;
  constexpr int kEvents = 20;
  for (int i = 0; i < kEvents; ++i) {
    ASSERT_TRUE(db_->Transact([&](Tx& tx) {
                     Event e;
                     e.type = "payment.captured";
                     e.subject = "p" + std::to_string(i);
                     return StatusOf(outbox.Enqueue(tx, e));
                   })
                    .ok());
  }
  Relay relay(*db_, outbox, **broker);
  ASSERT_TRUE(failpoint::Configure("relay.after_publish_before_mark=error(unavailable)*1").ok());
  EXPECT_FALSE(relay.RunOnce().has_value());  // published, not marked
  EXPECT_EQ((*broker)->stats().published, kEvents);
  auto marked = relay.RunOnce();
  ASSERT_TRUE(marked.has_value()) << marked.error().ToString();
  EXPECT_EQ(*marked, size_t{kEvents});
  EXPECT_EQ((*broker)->stats().duplicates, kEvents);

  auto sub = (*broker)->Subscribe(LedgerSubscription());
  ASSERT_TRUE(sub.has_value()) << sub.error().ToString();
  std::vector<std::string> ids;
  ASSERT_TRUE(WaitUntil([&] {
    auto got = (*sub)->Fetch(100, 30s);
    if (got) {
      std::vector<Settlement> acks(got->size());
      EXPECT_TRUE((*sub)->Settle(*got, acks).ok());
      for (const Delivery& d : *got) ids.push_back(d.event.id);
    }
    return ids.size() >= kEvents && (*broker)->Unsettled("ledger").value_or(-1) == 0;
  }));
  EXPECT_EQ(ids.size(), size_t{kEvents});  // one message per event in the stream
}

// The consumer commits but its ack is lost: the server redelivers after AckWait and the
// inbox absorbs the copy; the effect stays single.
TEST_F(NatsTransport, RedeliveryAfterAckWaitIsAbsorbedByTheInbox) {
  auto broker = Connect(nats_.urls());
  ASSERT_TRUE(broker.has_value()) << broker.error().ToString();
  std::vector<Event> events;
  for (int i = 0; i < 5; ++i) events.push_back(MakeEvent("ev-" + std::to_string(i)));
  for (const Status& st : (*broker)->PublishBatch(events)) ASSERT_TRUE(st.ok()) << st.ToString();

  auto sub = (*broker)->Subscribe(LedgerSubscription());
  ASSERT_TRUE(sub.has_value()) << sub.error().ToString();
  struct LosesFirstSettle : SubscriberWrapper {
    using SubscriberWrapper::SubscriberWrapper;
    Status Settle(std::span<const Delivery> d, std::span<const Settlement> s) override {
      if (!lost_.exchange(true)) return OkStatus();  // the ack never reaches the server
      return SubscriberWrapper::Settle(d, s);
    }
    std::atomic<bool> lost_{false};
  } lossy(sub->get());
  ConsumerOptions o = LedgerOptions();
  o.visibility = 1s;  // no in-progress acks past AckWait: the server redelivers
  Consumer consumer(*db_, lossy, o);
  consumer.On("payment.captured", RecordEffect);
  ASSERT_TRUE(RunUntil(consumer, [&] {
    return consumer.stats().duplicates >= 1 && (*broker)->Unsettled("ledger").value_or(-1) == 0;
  })) << consumer.stats().last_error;
  EXPECT_EQ(QueryInt(*db_, "SELECT count(*) FROM nats_effects"), 5);
  EXPECT_EQ(QueryInt(*db_, "SELECT count(DISTINCT event_id) FROM nats_effects"), 5);
}

// A handler that fails for good: parked in dead_letters, then Term: the server never
// delivers it again (nothing left unsettled), and its neighbours are applied.
TEST_F(NatsTransport, PoisonMessageIsDeadLetteredThenTerminated) {
  auto broker = Connect(nats_.urls());
  ASSERT_TRUE(broker.has_value()) << broker.error().ToString();
  std::vector<Event> events = {MakeEvent("good-1"), MakeEvent("poison"), MakeEvent("good-2")};
  for (const Status& st : (*broker)->PublishBatch(events)) ASSERT_TRUE(st.ok()) << st.ToString();
  auto sub = (*broker)->Subscribe(LedgerSubscription());
  ASSERT_TRUE(sub.has_value()) << sub.error().ToString();
  std::atomic<int> poison_runs{0};
  Consumer consumer(*db_, **sub, LedgerOptions());
  consumer.On("payment.captured", [&](Tx& tx, const Event& e) -> Status {
    if (e.id == "poison") {
      ++poison_runs;
      return InvalidArgumentError("cannot apply this payment");
    }
    return RecordEffect(tx, e);
  });
  ASSERT_TRUE(RunUntil(consumer, [&] {
    return (*broker)->stats().terminated == 1 && (*broker)->Unsettled("ledger").value_or(-1) == 0;
  })) << consumer.stats().last_error;
  EXPECT_EQ(poison_runs.load(), 1);
  EXPECT_EQ(QueryInt(*db_, "SELECT count(*) FROM nats_effects"), 2);
  DeadLetters letters(*db_);
  auto parked = letters.List();
  ASSERT_TRUE(parked.has_value());
  ASSERT_EQ(parked->size(), 1u);
  EXPECT_EQ((*parked)[0].event_id, "poison");
  EXPECT_EQ((*parked)[0].error_class, "permanent");
  EXPECT_EQ((*parked)[0].queue, "nats:ledger");
}

// The poison message's cause is fixed and its dead letter replayed: it goes back through
// NATS under a fresh message id and the consumer applies it, once.
TEST_F(NatsTransport, ReplayedDeadLetterIsAppliedOnceThroughTheStream) {
  auto broker = Connect(nats_.urls());
  ASSERT_TRUE(broker.has_value()) << broker.error().ToString();
  ASSERT_TRUE((*broker)->Publish(MakeEvent("poison")).ok());
  auto sub = (*broker)->Subscribe(LedgerSubscription());
  ASSERT_TRUE(sub.has_value()) << sub.error().ToString();
  std::atomic<bool> fixed{false};
  Consumer consumer(*db_, **sub, LedgerOptions());
  consumer.On("payment.captured", [&](Tx& tx, const Event& e) -> Status {
    if (!fixed) return InvalidArgumentError("cannot apply this payment yet");
    return RecordEffect(tx, e);
  });
  DeadLetters letters(*db_, {{"nats:", broker->get()}});
  ASSERT_TRUE(RunUntil(consumer, [&] { return letters.Count().value_or(0) == 1; }));
  fixed = true;
  auto parked = letters.List();
  ASSERT_TRUE(parked.has_value() && parked->size() == 1);
  ASSERT_TRUE(letters.Replay((*parked)[0].id).ok());
  ASSERT_TRUE(RunUntil(consumer, [&] {
    return QueryInt(*db_, "SELECT count(*) FROM nats_effects") == 1 &&
           (*broker)->Unsettled("ledger").value_or(-1) == 0;
  })) << consumer.stats().last_error;
  EXPECT_EQ(QueryInt(*db_, "SELECT count(*) FROM nats_effects WHERE event_id = 'poison'"), 1);
  EXPECT_EQ(letters.Count().value_or(-1), 0);
}

// A transient failure naks with a delay (the consumer's backoff): the server redelivers
// the message and the second run applies it.
TEST_F(NatsTransport, TransientFailureIsNakkedAndRedeliveredThenAppliedOnce) {
  auto broker = Connect(nats_.urls());
  ASSERT_TRUE(broker.has_value()) << broker.error().ToString();
  ASSERT_TRUE((*broker)->Publish(MakeEvent("flaky")).ok());
  auto sub = (*broker)->Subscribe(LedgerSubscription());
  ASSERT_TRUE(sub.has_value()) << sub.error().ToString();
  std::atomic<int> runs{0};
  Consumer consumer(*db_, **sub, LedgerOptions());
  consumer.On("payment.captured", [&](Tx& tx, const Event& e) -> Status {
    if (++runs == 1) return UnavailableError("provider busy");
    return RecordEffect(tx, e);
  });
  ASSERT_TRUE(RunUntil(consumer, [&] {
    return QueryInt(*db_, "SELECT count(*) FROM nats_effects") == 1 &&
           (*broker)->Unsettled("ledger").value_or(-1) == 0;
  })) << consumer.stats().last_error;
  EXPECT_EQ(runs.load(), 2);
  EXPECT_EQ(consumer.stats().retries, 1);
  EXPECT_EQ(consumer.stats().processed, 1);
}

// A handler slower than AckWait keeps its message: the subscriber sends in-progress acks
// while it runs, so the server does not redeliver it to anyone.
TEST_F(NatsTransport, LongHandlerKeepsItsMessageWithInProgressAcks) {
  auto broker = Connect(nats_.urls());
  ASSERT_TRUE(broker.has_value()) << broker.error().ToString();
  ASSERT_TRUE((*broker)->Publish(MakeEvent("slow")).ok());
  NatsSubscription s = LedgerSubscription();
  s.ack_wait = 300ms;
  auto sub = (*broker)->Subscribe(s);
  ASSERT_TRUE(sub.has_value()) << sub.error().ToString();
  Consumer consumer(*db_, **sub, LedgerOptions());
  consumer.On("payment.captured", RecordEffect);
  ASSERT_TRUE(failpoint::Configure("consumer.before_commit=pause").ok());
  std::thread runner([&] {
    while (QueryInt(*db_, "SELECT count(*) FROM nats_effects") < 1) (void)consumer.RunOnce();
  });
  ASSERT_TRUE(failpoint::WaitPaused("consumer.before_commit", 30s));
  // Held past several AckWaits: each in-progress ack restarts the server's timer.
  const int64_t sent = (*broker)->stats().in_progress_sent;
  EXPECT_TRUE(WaitUntil([&] { return (*broker)->stats().in_progress_sent >= sent + 4; }));
  // No other fetch gets the message while it is held.
  auto other = (*sub)->Fetch(10, 30s);
  ASSERT_TRUE(other.has_value());
  EXPECT_TRUE(other->empty());
  ASSERT_TRUE(failpoint::Configure("").ok());  // releases the handler's transaction
  runner.join();
  EXPECT_TRUE(WaitUntil([&] { return (*broker)->Unsettled("ledger").value_or(-1) == 0; }));
  EXPECT_EQ(QueryInt(*db_, "SELECT count(*) FROM nats_effects"), 1);
  EXPECT_EQ(consumer.stats().duplicates, 0);
}

// Real processes: a worker killed (SIGKILL) before its batch committed, another killed
// after committing and before acking; a third worker finishes. Every event's effect is
// applied exactly once.
TEST_F(NatsTransport, WorkerKilledMidBatchLosesNothingAndDoublesNothing) {
  constexpr int kEvents = 60;
  const std::string db_path = dir_.File("db.sqlite");
  db_.reset();  // forked children need a parent without threads
  const std::string urls = nats_.urls();

  auto publish = [&] {
    auto broker = Connect(urls);
    if (!broker) return false;
    std::vector<Event> events;
    for (int i = 0; i < kEvents; ++i) events.push_back(MakeEvent("k-" + std::to_string(i)));
    for (const Status& st : (*broker)->PublishBatch(events)) {
      if (!st.ok()) return false;
    }
    return true;
  };
  ASSERT_TRUE(testing::ExitedCleanly(RunInChild(publish)));

  // Runs a worker in this (child) process until every effect is in, or a failpoint kills it.
  auto worker = [&](const char* failpoints) {
    return [&, failpoints] {
      if (!failpoint::Configure(failpoints).ok()) return false;
      auto db = OpenSqlite(db_path);
      auto broker = Connect(urls);
      if (!db || !broker) return false;
      auto sub = (*broker)->Subscribe(LedgerSubscription());
      if (!sub) return false;
      Consumer consumer(*db, **sub, LedgerOptions());
      consumer.On("payment.captured", RecordEffect);
      return RunUntil(consumer, [&] {
        return QueryInt(*db, "SELECT count(DISTINCT event_id) FROM nats_effects") == kEvents &&
               (*broker)->Unsettled("ledger").value_or(-1) == 0;
      });
    };
  };
  EXPECT_TRUE(KilledBySigkill(RunInChild(worker("consumer.before_commit=crash@2"))));
  EXPECT_TRUE(KilledBySigkill(RunInChild(worker("consumer.after_commit_before_ack=crash@2"))));
  EXPECT_TRUE(testing::ExitedCleanly(RunInChild(worker(""))));

  db_ = OpenSqlite(db_path);
  EXPECT_EQ(QueryInt(*db_, "SELECT count(*) FROM nats_effects"), kEvents);
  EXPECT_EQ(QueryInt(*db_, "SELECT count(DISTINCT event_id) FROM nats_effects"), kEvents);
  EXPECT_EQ(QueryInt(*db_, "SELECT count(*) FROM consumer_inbox WHERE consumer = 'ledger'"),
            kEvents);
}

TEST(NatsRetention, RefusesAnInboxTtlShorterThanTheRedeliveryHorizonNamingTheNumbers) {
  NatsSubscription s = LedgerSubscription();  // AckWait 1 s, MaxDeliver 6
  s.backoff = {1s, 2s};
  ConsumerOptions c = LedgerOptions();  // visibility 30 s, nak delays <= 200 ms
  c.replay_window = 0ms;
  // 30 s x 6 + 200 ms x 5 = 181 s.
  EXPECT_EQ(NatsRedeliveryHorizon(s, c), Millis(181'000));
  c.inbox_ttl = 181s;
  Status st = ValidateNatsRetention(s, c);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  for (const char* number : {"181000", "AckWait 1000", "MaxDeliver 6", "backoff total 3000"}) {
    EXPECT_NE(st.message().find(number), std::string::npos) << st.message();
  }
  c.inbox_ttl = 182s;
  EXPECT_TRUE(ValidateNatsRetention(s, c).ok());
  c.replay_window = 1s;
  EXPECT_FALSE(ValidateNatsRetention(s, c).ok());  // the replay window counts too

  c.inbox_ttl = 24h;
  s.max_deliver = c.max_attempts;
  st = ValidateNatsRetention(s, c);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("MaxDeliver 3 must exceed"), std::string::npos) << st.message();
}

TEST(NatsUri, ParsesServersAndSettingsAndRefusesTheRest) {
  auto o = ParseNatsUri("nats://127.0.0.1:4222,h2:4223?replicas=3&stream=PAY&in_flight=64");
  ASSERT_TRUE(o.has_value()) << o.error().ToString();
  EXPECT_EQ(o->servers, (std::vector<std::string>{"nats://127.0.0.1:4222", "nats://h2:4223"}));
  EXPECT_EQ(o->replicas, 3);
  EXPECT_EQ(o->stream, "PAY");
  EXPECT_EQ(o->max_in_flight, 64);
  for (const char* bad : {"http://x:1", "nats://", "nats://h:1?replicas=0", "nats://h:1?colour=red",
                          "nats://h:1?stream=a.b"}) {
    auto r = ParseNatsUri(bad);
    ASSERT_FALSE(r.has_value()) << bad;
    EXPECT_EQ(r.error().code(), StatusCode::kInvalidArgument) << bad;
  }
}

TEST(NatsConnect, AnUnreachableServerIsUnavailable) {
  NatsOptions o;
  o.servers = {"nats://127.0.0.1:1"};
  auto b = NatsBroker::Connect(o);
  ASSERT_FALSE(b.has_value());
  EXPECT_EQ(b.error().code(), StatusCode::kUnavailable) << b.error().ToString();
}

}  // namespace
}  // namespace converge
