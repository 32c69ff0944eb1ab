// Runtime and PollingWorker: the machinery a service starts and stops as one.
#include "converge/runtime.h"

#include <atomic>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>

#include <gtest/gtest.h>

#include "converge/http.h"
#include "converge/sql_queue.h"
#include "tests/unit/test_util.h"

namespace converge {
namespace {

using namespace std::chrono_literals;

TEST(PollingWorker, LoopsWhileThereIsMoreWakesOnNotifyAndStopsAfterThePass) {
  std::atomic<int> passes{0};
  std::atomic<int> more{3};  // the first three passes report more work
  Wakeup wakeup;
  PollingWorker w("test", std::chrono::hours(1), [&] {
    ++passes;
    return more.fetch_sub(1) > 0;
  }, &wakeup);
  w.Start();
  ASSERT_TRUE(testing::WaitUntil([&] { return passes.load() == 4; }));
  // Idle now: the hour-long poll would never fire; a wake-up runs the next pass.
  wakeup.Notify();
  ASSERT_TRUE(testing::WaitUntil([&] { return passes.load() == 5; }));
  w.Wake();
  ASSERT_TRUE(testing::WaitUntil([&] { return passes.load() == 6; }));
  w.Stop();
  EXPECT_FALSE(w.running());
  const int after = passes.load();
  wakeup.Notify();
  w.Stop();  // idempotent
  EXPECT_EQ(passes.load(), after);
}

// The names of this process's threads (/proc/self/task/*/comm), each as often as it
// occurs.
std::multiset<std::string> ThreadNames() {
  std::multiset<std::string> names;
  for (const auto& task : std::filesystem::directory_iterator("/proc/self/task")) {
    std::ifstream comm(task.path() / "comm");
    std::string name;
    if (std::getline(comm, name)) names.insert(name);
  }
  return names;
}

// The threads converge starts are named ("cv-..."), so that top -H, perf and gdb tell the
// store's writer from an HTTP I/O thread from a worker's loop.
TEST(ThreadNames, EveryThreadConvergeStartsIsNamed) {
  testing::TempDir dir;
  auto db = testing::OpenSqlite(dir.File("names.db"));
  PollingWorker w("relay orders-relay-1", std::chrono::hours(1), [] { return false; });
  w.Start();
  http::Server server(http::ServerOptions{.io_threads = 2, .worker_threads = 1});
  server.Route("GET", "/blocking", [](http::Request&) { return http::Json(200, "{}"); });
  ASSERT_TRUE(server.Start().ok());
  auto r = http::Client().Send(
      {.url = "http://127.0.0.1:" + std::to_string(server.port()) + "/blocking"});
  ASSERT_TRUE(r && r->status == 200);
  // Each thread names itself when it starts to run, which may come after its starter
  // returned.
  std::multiset<std::string> names;
  EXPECT_TRUE(testing::WaitUntil([&] {
    names = ThreadNames();
    return names.count("cv-sqlite-write") > 0 && names.count("cv-sqlite-ckpt") > 0 &&
           names.count("cv-http-io") > 1 && names.count("cv-relay orders") > 0;
  }));
  EXPECT_EQ(names.count("cv-sqlite-write"), 1u);
  EXPECT_EQ(names.count("cv-sqlite-ckpt"), 1u);
  EXPECT_EQ(names.count("cv-http-io"), 2u);
  EXPECT_EQ(names.count("cv-http-work"), 1u);  // the one that answered
  EXPECT_EQ(names.count("cv-relay orders"), 1u) << "cut to Linux's 15 bytes";
  server.Stop(Millis(100));
  w.Stop();
}

class RuntimeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    db_ = testing::OpenSqlite(dir_.File("db.sqlite"));
    ASSERT_NE(db_, nullptr);
    testing::CreateEffectsTable(*db_);
  }
  testing::TempDir dir_;
  std::unique_ptr<Database> db_;
};

TEST_F(RuntimeTest, RunsTheWholePathAndStopsItTogether) {
  Runtime rt(*db_, {.sweep_interval = 50ms});
  SqlQueue queue(*db_);
  ASSERT_TRUE(queue.Subscribe("ledger", "thing.*").ok());
  auto sub = queue.OpenSubscriber("ledger");
  rt.AddRelay(queue, {.poll = 20ms});
  rt.AddConsumer(*sub, {.name = "ledger", .poll = 20ms})
      .On("thing.done", [](Tx& tx, const Event& e) {
        return StatusOf(tx.Exec("INSERT INTO test_effects (id) VALUES ($1)", e.subject));
      });
  ASSERT_TRUE(rt.Start().ok());
  auto out = rt.keys().Execute({"t", "k", "f"}, [&](Tx& tx) -> Result<StoredResponse> {
    Event e;
    e.type = "thing.done";
    e.subject = "thing-1";
    e.data = "{}";
    CONVERGE_RETURN_IF_ERROR(rt.outbox().Enqueue(tx, e));
    return StoredResponse{201, {}, "ok"};
  });
  ASSERT_TRUE(out) << out.error().ToString();
  EXPECT_TRUE(testing::WaitUntil(
      [&] { return testing::QueryInt(*db_, "SELECT count(*) FROM test_effects") == 1; }));
  rt.Stop();
  EXPECT_EQ(rt.consumers()[0]->stats().processed, 1);
  rt.Stop();  // idempotent
}

TEST_F(RuntimeTest, RefusesUnsafeOptionsAndStartsNothing) {
  Runtime bad_keys(*db_, {.keys = {.ttl = 5s, .lease = 5s}});
  Status st = bad_keys.Start();
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("ttl"), std::string::npos) << st.message();

  Runtime bad_consumer(*db_);
  SqlQueue queue(*db_);
  auto sub = queue.OpenSubscriber("q");
  bad_consumer.AddRelay(queue);
  bad_consumer.AddConsumer(*sub, {.name = "short", .inbox_ttl = 60s});
  st = bad_consumer.Start();
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("inbox_ttl"), std::string::npos) << st.message();
  // Nothing runs: the relay was not started, so it owns no partitions.
  EXPECT_EQ(testing::QueryInt(*db_, "SELECT count(*) FROM relay_partitions"), 0);

  // The sweeper's options: each refused by name before anything starts
  // (Sweeper::ValidateOptions), not by every sweep failing afterwards.
  const std::vector<std::pair<SweepOptions, std::string>> sweeps = {
      {{.batch = 0}, "batch"},
      {{.done_retention = -1ms}, "done_retention"},
      {{.partition_period = 0ms}, "partition_period"},
      {{.partitions_ahead = -1}, "partitions_ahead"},
      {{.key_order_pass = 0ms}, "key_order_pass"},
      {{.inbox_key_order_pass = SweepOptions::kMaxKeyOrderPass + 1ms}, "inbox_key_order_pass"},
      {{.key_order_windows = 0}, "key_order_windows"},
  };
  for (const auto& [sweep, name] : sweeps) {
    Runtime bad_sweep(*db_, {.sweep = sweep});
    st = bad_sweep.Start();
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << name;
    EXPECT_NE(st.message().find(name), std::string::npos) << st.message();
  }
}

// With publish_in_transaction the producer's commit puts the event on the queue: the
// consumer applies it with no relay pass in between (the relay polls once an hour here,
// and it is never woken: nothing waits in the outbox).
TEST_F(RuntimeTest, PublishedInTheProducersTransactionTheEventNeedsNoRelayPass) {
  Runtime rt(*db_, {.sweep_interval = 0ms, .publish_in_transaction = true});
  SqlQueue queue(*db_);
  ASSERT_TRUE(queue.Subscribe("ledger", "thing.*").ok());
  auto sub = queue.OpenSubscriber("ledger");
  // Polls at most every lease / 3: an hour here.
  rt.AddRelay(queue, {.poll = std::chrono::hours(1), .lease = std::chrono::hours(3)});
  rt.AddConsumer(*sub, {.name = "ledger", .poll = 20ms})
      .On("thing.done", [](Tx& tx, const Event& e) {
        return StatusOf(tx.Exec("INSERT INTO test_effects (id) VALUES ($1)", e.subject));
      });
  EXPECT_EQ(rt.outbox().publishes_in_transaction(), nullptr);  // from Start on
  ASSERT_TRUE(rt.Start().ok());
  EXPECT_EQ(rt.outbox().publishes_in_transaction(), queue.tx_publisher());
  // The relay's first pass, at Start; then it sleeps.
  ASSERT_TRUE(testing::WaitUntil([&] { return rt.relays()[0]->stats().passes >= 1; }));
  const int64_t passes = rt.relays()[0]->stats().passes;
  Status st = db_->Transact([&](Tx& tx) {
    Event e;
    e.type = "thing.done";
    e.subject = "thing-1";
    e.data = "{}";
    return StatusOf(rt.outbox().Enqueue(tx, e));
  });
  ASSERT_TRUE(st.ok()) << st.ToString();
  // Marked published in the producer's commit (the consumer, running, may have taken
  // the queue's row already).
  EXPECT_EQ(testing::QueryInt(*db_, "SELECT count(*) FROM outbox_events WHERE published_at "
                                    "= created_at AND publish_attempts = 1"),
            1);
  EXPECT_TRUE(testing::WaitUntil(
      [&] { return testing::QueryInt(*db_, "SELECT count(*) FROM test_effects") == 1; }));
  EXPECT_EQ(rt.relays()[0]->stats().passes, passes);
  rt.Stop();
}

// An event published in its producer's transaction is never seen by a relay: every relay
// must publish to that one transport, in this database.
TEST_F(RuntimeTest, PublishInTransactionNeedsOneTransportInTheStoreBehindEveryRelay) {
  auto refused = [&](Runtime& rt, const std::string& what) {
    Status st = rt.Start();
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << what;
    EXPECT_NE(st.message().find("publish_in_transaction"), std::string::npos) << st.message();
    EXPECT_EQ(rt.outbox().publishes_in_transaction(), nullptr) << what;
  };
  SqlQueue queue(*db_), other_queue(*db_);
  {
    Runtime rt(*db_, {.publish_in_transaction = true});
    refused(rt, "no relay");
  }
  {
    Runtime rt(*db_, {.publish_in_transaction = true});
    rt.AddRelay(queue);
    rt.AddRelay(other_queue);
    refused(rt, "two transports");
  }
  {
    // A transport outside the store: a queue in another database.
    auto elsewhere = testing::OpenSqlite(dir_.File("other.sqlite"));
    ASSERT_NE(elsewhere, nullptr);
    SqlQueue remote(*elsewhere);
    Runtime rt(*db_, {.publish_in_transaction = true});
    rt.AddRelay(queue);
    rt.AddRelay(remote);
    refused(rt, "a queue in another database");
  }
  {
    // A publisher with no transactional face (a broker such as NATS).
    struct Broker : Publisher {
      Status Publish(const Event&) override { return OkStatus(); }
    } broker;
    Runtime rt(*db_, {.publish_in_transaction = true});
    rt.AddRelay(broker);
    refused(rt, "a broker outside the database");
  }
  Runtime rt(*db_, {.sweep_interval = 0ms, .publish_in_transaction = true});
  rt.AddRelay(queue);
  rt.AddRelay(queue, {.name = "relay-2"});  // two relays, one transport: fine
  ASSERT_TRUE(rt.Start().ok());
  EXPECT_EQ(rt.outbox().publishes_in_transaction(), queue.tx_publisher());
  rt.Stop();
}

}  // namespace
}  // namespace converge
