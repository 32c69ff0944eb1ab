// A 3-node JetStream cluster (routes on loopback), the stream with 3 replicas: one node is
// killed (SIGKILL) during load and restarted. Every event whose publish was acknowledged
// reaches the consumer, and no effect is applied twice.
#include <gtest/gtest.h>

#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "converge/consumer.h"
#include "converge/nats.h"
#include "tests/nats/nats_servers.h"
#include "tests/unit/test_util.h"

namespace converge {
namespace {

using namespace std::chrono_literals;
using testing::NatsServers;
using testing::OpenSqlite;
using testing::QueryInt;
using testing::TempDir;
using testing::WaitUntil;

Event Numbered(int i) {
  Event e;
  e.id = "c-" + std::to_string(i);
  e.source = "urn:test";
  e.type = "payment.captured";
  e.subject = "pay_" + std::to_string(i % 50);
  e.time = 1'700'000'000'000;
  e.data = "{}";
  e.envelope = EncodeEnvelope(e);
  return e;
}

// A 3-node cluster, a stream with 3 replicas, and a "ledger" consumer writing one row per
// event into cluster_effects, run by Consume() on a thread of its own until the test ends.
class NatsCluster : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(nats_.Start(3));
    db_ = OpenSqlite(dir_.File("db.sqlite"));
    ASSERT_NE(db_, nullptr);
    ASSERT_TRUE(db_->Transact([](Tx& tx) {
                     return StatusOf(
                         tx.Exec("CREATE TABLE cluster_effects (event_id TEXT NOT NULL)"));
                   }).ok());
    auto options = ParseNatsUri("nats://" + nats_.urls() + "?replicas=3&publish_timeout_ms=3000");
    ASSERT_TRUE(options.has_value());
    auto broker = NatsBroker::Connect(*options);
    ASSERT_TRUE(broker.has_value()) << broker.error().ToString();
    broker_ = std::move(*broker);
    NatsSubscription s;
    s.consumer = "ledger";
    s.ack_wait = 2s;
    s.max_deliver = 20;
    auto sub = broker_->Subscribe(s);
    ASSERT_TRUE(sub.has_value()) << sub.error().ToString();
    sub_ = std::move(*sub);
    ConsumerOptions co;
    co.name = "ledger";
    co.max_attempts = 10;
    co.visibility = 2s;
    co.batch = 64;
    consumer_ = std::make_unique<Consumer>(*db_, *sub_, co);
    consumer_->On("payment.captured", [](Tx& tx, const Event& e) {
      return StatusOf(tx.Exec("INSERT INTO cluster_effects(event_id) VALUES ($1)", e.id));
    });
  }
  // A failed ASSERT returns early: the consumer stops and is joined, not left joinable.
  void TearDown() override { StopConsuming(); }

  // Runs the consumer's passes on a thread; `failed` (may be null) sees each failed pass.
  void Consume(std::function<void(const Status&)> failed = nullptr) {
    consuming_ = std::thread([this, failed = std::move(failed)] {
      while (!stop_.load()) {
        auto r = consumer_->RunOnce();
        if (!r && failed) failed(r.error());
      }
    });
  }

 public:
  void StopConsuming() {
    stop_ = true;
    if (consuming_.joinable()) consuming_.join();
  }

 protected:

  NatsServers nats_;
  TempDir dir_;
  std::unique_ptr<Database> db_;
  std::unique_ptr<NatsBroker> broker_;
  std::unique_ptr<Subscriber> sub_;
  std::unique_ptr<Consumer> consumer_;
  std::atomic<bool> stop_{false};
  std::thread consuming_;
};

// Processes that start together add the same replicated stream at once: on a cluster the
// one that loses may be told "stream not found" while the stream has no leader yet, and
// every one of them must connect all the same. Each round, a stream of its own.
TEST(NatsClusterStreams, ConnectionsAddingOneReplicatedStreamAtOnceAllConnect) {
  NatsServers nats;
  ASSERT_TRUE(nats.Start(3));
  constexpr int kRounds = 5;
  for (int round = 0; round < kRounds; ++round) {
    const std::string n = std::to_string(round);
    const std::vector<Status> results = testing::ConnectAtOnce(
        "nats://" + nats.urls() + "?replicas=3&stream=RACE" + n + "&prefix=race" + n, 8);
    for (size_t i = 0; i < results.size(); ++i) {
      EXPECT_TRUE(results[i].ok()) << "round " << round << ", connection " << i << ": "
                                   << results[i].ToString();
    }
  }
}

// A cluster without a meta leader (its nodes starting, or most of them down) answers every
// JetStream request "temporarily unavailable" (10008), and one with fewer nodes up than a
// new stream's replicas "no suitable peers" (10005). Connect and Subscribe wait for the
// cluster up to the startup wait, then give up, with kUnavailable when it had no leader:
// that is no refusal of the stream. Here the lone node of three, all killed and one
// restarted, leaves requests unanswered for its first 10 s, then answers 10008.
TEST(NatsClusterStreams, ConnectAndSubscribeWaitOutAClusterWithoutAMetaLeader) {
  NatsServers nats;
  ASSERT_TRUE(nats.Start(3));
  const std::string uri = "nats://" + nats.urls() + "?replicas=3";
  // Waits long enough for the cluster to form again below on a slow machine.
  auto options = ParseNatsUri(uri + "&startup_wait_ms=60000");
  ASSERT_TRUE(options.has_value());
  auto broker = NatsBroker::Connect(*options);  // the stream, while the cluster is whole
  ASSERT_TRUE(broker.has_value()) << broker.error().ToString();
  for (int n = 1; n <= 3; ++n) ASSERT_TRUE(nats.Kill(n));
  ASSERT_TRUE(nats.Restart(1, /*alone=*/true));

  // Gives up once its startup wait is over, as unavailable. The wait outlasts the node's
  // first 10 s (the first add times out and is made again), so the answers of 10008 are
  // waited out too.
  constexpr auto kImpatient = 12s;
  auto impatient = ParseNatsUri(uri + "&stream=LATE&prefix=late&startup_wait_ms=" +
                                std::to_string(Millis(kImpatient).count()));
  ASSERT_TRUE(impatient.has_value());
  const auto start = std::chrono::steady_clock::now();
  auto refused = NatsBroker::Connect(*impatient);
  ASSERT_FALSE(refused.has_value());
  EXPECT_EQ(refused.error().code(), StatusCode::kUnavailable) << refused.error().ToString();
  EXPECT_NE(refused.error().message().find("temporarily unavailable"), std::string::npos)
      << refused.error().ToString();
  EXPECT_GE(std::chrono::steady_clock::now() - start, kImpatient - 250ms);

  // The other nodes coming back in the meantime let both a new connection (a stream of
  // its own, three replicas) and a consumer of the first stream through.
  Status connected = UnavailableError("not yet");
  Status subscribed = UnavailableError("not yet");
  std::thread connecting([&] {
    auto late = ParseNatsUri(uri + "&stream=LATE&prefix=late&startup_wait_ms=60000");
    auto b = late ? NatsBroker::Connect(*late) : tl::unexpected(late.error());
    connected = b ? OkStatus() : b.error();
  });
  std::thread subscribing([&] {
    NatsSubscription s;
    s.consumer = "late";
    auto sub = (*broker)->Subscribe(s);
    subscribed = sub ? OkStatus() : sub.error();
  });
  std::this_thread::sleep_for(1s);
  const bool restarted = nats.Restart(2) && nats.Restart(3);
  connecting.join();
  subscribing.join();
  ASSERT_TRUE(restarted);
  EXPECT_TRUE(connected.ok()) << connected.ToString();
  EXPECT_TRUE(subscribed.ok()) << subscribed.ToString();
}

TEST_F(NatsCluster, NodeKilledDuringLoadLosesNoAcknowledgedEventAndDoublesNoEffect) {
  Consume();

  // Publish in batches; an event whose batch failed is published again (as the relay
  // does) until acknowledged.
  constexpr int kEvents = 3000;
  std::set<std::string> acked;
  std::vector<int> todo;
  for (int i = 0; i < kEvents; ++i) todo.push_back(i);
  bool killed = false, restarted = false;
  const auto deadline = std::chrono::steady_clock::now() + 240s;
  while (!todo.empty() && std::chrono::steady_clock::now() < deadline) {
    const size_t n = std::min<size_t>(100, todo.size());
    std::vector<Event> batch;
    for (size_t i = 0; i < n; ++i) batch.push_back(Numbered(todo[i]));
    std::vector<Status> results = broker_->PublishBatch(batch);
    std::vector<int> again;
    for (size_t i = 0; i < n; ++i) {
      if (results[i].ok()) {
        acked.insert(batch[i].id);
      } else {
        again.push_back(todo[i]);
      }
    }
    again.insert(again.end(), todo.begin() + static_cast<long>(n), todo.end());
    const bool none_acked = again.size() == todo.size();
    todo.swap(again);
    // Paced retries while the cluster elects new leaders (the relay waits its poll
    // interval the same way).
    if (none_acked && !todo.empty()) std::this_thread::sleep_for(50ms);
    if (!killed && acked.size() >= kEvents / 3) {
      ASSERT_TRUE(nats_.Kill(2));
      killed = true;
    }
    if (killed && !restarted && acked.size() >= 2 * kEvents / 3) {
      ASSERT_TRUE(nats_.Restart(2));
      restarted = true;
    }
  }
  EXPECT_TRUE(killed && restarted);
  EXPECT_EQ(acked.size(), size_t{kEvents});

  EXPECT_TRUE(WaitUntil(
      [&] {
        return QueryInt(*db_, "SELECT count(DISTINCT event_id) FROM cluster_effects") == kEvents;
      },
      120s));
  StopConsuming();
  EXPECT_EQ(QueryInt(*db_, "SELECT count(*) FROM cluster_effects"), kEvents);  // none doubled
  EXPECT_EQ(QueryInt(*db_, "SELECT count(DISTINCT event_id) FROM cluster_effects"), kEvents);
  const NatsStats ns = broker_->stats();
  std::printf(
      "cluster: %lld acked publishes, %lld duplicates dropped by the stream, %lld "
      "publish errors retried; consumer: %lld processed, %lld duplicates absorbed\n",
      static_cast<long long>(ns.published), static_cast<long long>(ns.duplicates),
      static_cast<long long>(ns.publish_errors),
      static_cast<long long>(consumer_->stats().processed),
      static_cast<long long>(consumer_->stats().duplicates));
}

// Session 9 review: the presence check (CheckConsumerExists) asks js_GetConsumerInfo after an
// unanswered pull request. While nodes die and come back (consumer and meta leaders move,
// the connection fails over) the durable consumer exists throughout: no Fetch may report it
// missing. Each node in turn is killed and restarted; after each step the consumer must
// apply a fresh event (the cluster recovered) before the next.
TEST_F(NatsCluster, NoConsumerIsReportedMissingWhileNodesDieAndComeBack) {
  std::mutex mu;
  std::vector<std::string> missing;
  struct StopFirst {  // the consumer's thread uses mu and missing: stopped before they go
    NatsCluster* test;
    ~StopFirst() { test->StopConsuming(); }
  } stop_first{this};
  Consume([&](const Status& st) {
    if (st.code() != StatusCode::kFailedPrecondition) return;
    std::lock_guard<std::mutex> l(mu);
    missing.push_back(st.ToString());
  });
  int next = 0;
  auto applied_fresh = [&] {
    const int i = next++;
    return WaitUntil(
        [&] {
          (void)broker_->Publish(Numbered(i));  // again until acknowledged and applied
          return QueryInt(*db_, "SELECT count(*) FROM cluster_effects WHERE event_id = 'c-" +
                                   std::to_string(i) + "'") > 0;
        },
        120s);
  };
  ASSERT_TRUE(applied_fresh());
  for (int node = 1; node <= 3; ++node) {
    ASSERT_TRUE(nats_.Kill(node));
    EXPECT_TRUE(applied_fresh()) << "node " << node << " down";
    ASSERT_TRUE(nats_.Restart(node));
    EXPECT_TRUE(applied_fresh()) << "node " << node << " back";
  }
  StopConsuming();
  EXPECT_EQ(broker_->stats().consumers_missing, 0);
  std::lock_guard<std::mutex> l(mu);
  for (const std::string& m : missing) ADD_FAILURE() << "reported missing: " << m;
}

}  // namespace
}  // namespace converge
