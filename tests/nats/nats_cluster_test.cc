// A 3-node JetStream cluster (routes on loopback), the stream with 3 replicas: one node is
// killed (SIGKILL) during load and restarted. Every event whose publish was acknowledged
// reaches the consumer, and no effect is applied twice.
#include <gtest/gtest.h>

#include <atomic>
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

TEST(NatsCluster, NodeKilledDuringLoadLosesNoAcknowledgedEventAndDoublesNoEffect) {
  NatsServers nats;
  ASSERT_TRUE(nats.Start(3));
  TempDir dir;
  auto db = OpenSqlite(dir.File("db.sqlite"));
  ASSERT_NE(db, nullptr);
  ASSERT_TRUE(db->Transact([](Tx& tx) {
                  return StatusOf(tx.Exec("CREATE TABLE cluster_effects (event_id TEXT NOT NULL)"));
                }).ok());
  auto options = ParseNatsUri("nats://" + nats.urls() + "?replicas=3&publish_timeout_ms=3000");
  ASSERT_TRUE(options.has_value());
  auto broker = NatsBroker::Connect(*options);
  ASSERT_TRUE(broker.has_value()) << broker.error().ToString();

  NatsSubscription s;
  s.consumer = "ledger";
  s.ack_wait = 2s;
  s.max_deliver = 20;
  auto sub = (*broker)->Subscribe(s);
  ASSERT_TRUE(sub.has_value()) << sub.error().ToString();
  ConsumerOptions co;
  co.name = "ledger";
  co.max_attempts = 10;
  co.visibility = 2s;
  co.batch = 64;
  Consumer consumer(*db, **sub, co);
  consumer.On("payment.captured", [](Tx& tx, const Event& e) {
    return StatusOf(tx.Exec("INSERT INTO cluster_effects(event_id) VALUES ($1)", e.id));
  });
  std::atomic<bool> stop{false};
  std::thread consuming([&] {
    while (!stop.load()) (void)consumer.RunOnce();
  });
  // A failed ASSERT returns early: the consumer stops and is joined, not left joinable.
  struct Joiner {
    std::atomic<bool>& stop;
    std::thread& thread;
    ~Joiner() {
      stop = true;
      if (thread.joinable()) thread.join();
    }
  } joiner{stop, consuming};

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
    std::vector<Status> results = (*broker)->PublishBatch(batch);
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
      ASSERT_TRUE(nats.Kill(2));
      killed = true;
    }
    if (killed && !restarted && acked.size() >= 2 * kEvents / 3) {
      ASSERT_TRUE(nats.Restart(2));
      restarted = true;
    }
  }
  EXPECT_TRUE(killed && restarted);
  EXPECT_EQ(acked.size(), size_t{kEvents});

  EXPECT_TRUE(WaitUntil(
      [&] {
        return QueryInt(*db, "SELECT count(DISTINCT event_id) FROM cluster_effects") == kEvents;
      },
      120s));
  stop = true;
  consuming.join();
  EXPECT_EQ(QueryInt(*db, "SELECT count(*) FROM cluster_effects"), kEvents);  // none doubled
  EXPECT_EQ(QueryInt(*db, "SELECT count(DISTINCT event_id) FROM cluster_effects"), kEvents);
  const NatsStats ns = (*broker)->stats();
  std::printf(
      "cluster: %lld acked publishes, %lld duplicates dropped by the stream, %lld "
      "publish errors retried; consumer: %lld processed, %lld duplicates absorbed\n",
      static_cast<long long>(ns.published), static_cast<long long>(ns.duplicates),
      static_cast<long long>(ns.publish_errors), static_cast<long long>(consumer.stats().processed),
      static_cast<long long>(consumer.stats().duplicates));
}

// Session 9 review: the presence check (CheckConsumerExists) asks js_GetConsumerInfo after an
// unanswered pull request. While nodes die and come back (consumer and meta leaders move,
// the connection fails over) the durable consumer exists throughout: no Fetch may report it
// missing. Each node in turn is killed and restarted; after each step the consumer must
// apply a fresh event (the cluster recovered) before the next.
TEST(NatsCluster, NoConsumerIsReportedMissingWhileNodesDieAndComeBack) {
  NatsServers nats;
  ASSERT_TRUE(nats.Start(3));
  TempDir dir;
  auto db = OpenSqlite(dir.File("db.sqlite"));
  ASSERT_NE(db, nullptr);
  ASSERT_TRUE(db->Transact([](Tx& tx) {
                  return StatusOf(tx.Exec("CREATE TABLE cluster_effects (event_id TEXT NOT NULL)"));
                }).ok());
  auto options = ParseNatsUri("nats://" + nats.urls() + "?replicas=3&publish_timeout_ms=3000");
  ASSERT_TRUE(options.has_value());
  auto broker = NatsBroker::Connect(*options);
  ASSERT_TRUE(broker.has_value()) << broker.error().ToString();
  NatsSubscription s;
  s.consumer = "ledger";
  s.ack_wait = 2s;
  s.max_deliver = 20;
  auto sub = (*broker)->Subscribe(s);
  ASSERT_TRUE(sub.has_value()) << sub.error().ToString();
  ConsumerOptions co;
  co.name = "ledger";
  co.max_attempts = 10;
  co.visibility = 2s;
  Consumer consumer(*db, **sub, co);
  consumer.On("payment.captured", [](Tx& tx, const Event& e) {
    return StatusOf(tx.Exec("INSERT INTO cluster_effects(event_id) VALUES ($1)", e.id));
  });
  std::atomic<bool> stop{false};
  std::mutex mu;
  std::vector<std::string> missing;
  std::thread consuming([&] {
    while (!stop.load()) {
      auto r = consumer.RunOnce();
      if (!r && r.error().code() == StatusCode::kFailedPrecondition) {
        std::lock_guard<std::mutex> l(mu);
        missing.push_back(r.error().ToString());
      }
    }
  });
  struct Joiner {
    std::atomic<bool>& stop;
    std::thread& thread;
    ~Joiner() {
      stop = true;
      if (thread.joinable()) thread.join();
    }
  } joiner{stop, consuming};
  int next = 0;
  auto applied_fresh = [&] {
    const int i = next++;
    return WaitUntil(
        [&] {
          (void)(*broker)->Publish(Numbered(i));  // again until acknowledged and applied
          return QueryInt(*db, "SELECT count(*) FROM cluster_effects WHERE event_id = 'c-" +
                                   std::to_string(i) + "'") > 0;
        },
        120s);
  };
  ASSERT_TRUE(applied_fresh());
  for (int node = 1; node <= 3; ++node) {
    ASSERT_TRUE(nats.Kill(node));
    EXPECT_TRUE(applied_fresh()) << "node " << node << " down";
    ASSERT_TRUE(nats.Restart(node));
    EXPECT_TRUE(applied_fresh()) << "node " << node << " back";
  }
  stop = true;
  consuming.join();
  EXPECT_EQ((*broker)->stats().consumers_missing, 0);
  std::lock_guard<std::mutex> l(mu);
  for (const std::string& m : missing) ADD_FAILURE() << "reported missing: " << m;
}

}  // namespace
}  // namespace converge
