// `converge relay` and `converge worker` as real processes against a real nats-server:
// a worker killed with SIGKILL mid-stream, another taking over, both processes stopped
// with SIGTERM. Every payment is booked exactly once (two ledger rows each).
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>

#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "converge/outbox.h"
#include "tests/nats/nats_servers.h"
#include "tests/unit/test_util.h"

namespace converge {
namespace {

using namespace std::chrono_literals;
using testing::Child;
using testing::NatsServers;
using testing::OpenSqlite;
using testing::QueryInt;
using testing::TempDir;
using testing::WaitUntil;

TEST(NatsProcesses, RelayAndWorkersKilledAndStoppedBookEachPaymentOnce) {
  NatsServers nats;
  ASSERT_TRUE(nats.Start(1));
  TempDir dir;
  const std::string db_uri = "sqlite:" + dir.File("db.sqlite");
  const std::string broker = "nats://" + nats.urls();
  constexpr int kPayments = 300;
  {
    auto db = OpenSqlite(dir.File("db.sqlite"));
    ASSERT_NE(db, nullptr);
    Outbox outbox;
    for (int i = 0; i < kPayments; ++i) {
      ASSERT_TRUE(db->Transact([&](Tx& tx) {
                      Event e;
                      e.type = "payment.captured";
                      e.subject = "pay_" + std::to_string(i);
                      e.data = R"({"payment_id":"pay_)" + std::to_string(i) +
                               R"(","amount":100,"currency":"EUR","customer_id":"c"})";
                      return StatusOf(outbox.Enqueue(tx, e));
                    }).ok());
    }
  }
  Child relay({"relay", "--db", db_uri, "--broker", broker, "--name", "r1"});
  Child worker1({"worker", "--db", db_uri, "--broker", broker, "--consumer", "ledger"});
  ASSERT_TRUE(relay.running() && worker1.running());

  auto db = OpenSqlite(dir.File("db.sqlite"));
  // The worker creates the service's tables as it starts (a sanitizer build on a loaded
  // host may take long to).
  ASSERT_TRUE(WaitUntil(
      [&] {
        return QueryInt(*db, "SELECT count(*) FROM sqlite_master WHERE name = 'ledger_entries'") ==
               1;
      },
      60s));
  auto rows = [&] { return QueryInt(*db, "SELECT count(*) FROM ledger_entries"); };
  // Kill the first worker once it has booked some and not all.
  ASSERT_TRUE(WaitUntil([&] { return rows() >= 20; }, 60s)) << rows();
  EXPECT_TRUE(WIFSIGNALED(worker1.Signal(SIGKILL)));
  Child worker2({"worker", "--db", db_uri, "--broker", broker, "--consumer", "ledger"});
  ASSERT_TRUE(WaitUntil([&] { return rows() >= 2 * kPayments; }, 120s)) << rows();

  // Clean stops: SIGTERM, exit 0.
  int rs = relay.Signal(SIGTERM);
  int ws = worker2.Signal(SIGTERM);
  EXPECT_TRUE(WIFEXITED(rs) && WEXITSTATUS(rs) == 0) << rs;
  EXPECT_TRUE(WIFEXITED(ws) && WEXITSTATUS(ws) == 0) << ws;

  EXPECT_EQ(rows(), 2 * kPayments);
  EXPECT_EQ(QueryInt(*db, "SELECT count(DISTINCT payment_id) FROM ledger_entries"), kPayments);
  EXPECT_EQ(QueryInt(*db, "SELECT count(*) FROM outbox_events WHERE published_at IS NULL"), 0);
}

// `converge relay --config` with a NATS target: an application's own outbox table (written
// by Python's sqlite3 module, as an application in any language would) reaches JetStream,
// and a `converge worker` books each payment once, although the relay is SIGKILLed
// mid-way and restarted. The application's rows are deleted once published.
TEST(NatsProcesses, TableRelayPublishesAnApplicationsOutboxToJetStream) {
  NatsServers nats;
  ASSERT_TRUE(nats.Start(1));
  TempDir dir;
  const std::string app_db = dir.File("app.db");
  const std::string broker = "nats://" + nats.urls();
  constexpr int kPayments = 200;
  const std::string app =
      std::string("python3 ") + CONVERGE_SOURCE_DIR + "/tests/outbox_table/app.py";
  ASSERT_EQ(std::system((app + " create-sqlite " + app_db).c_str()), 0);
  const std::string write =
      "python3 -c 'import json, sqlite3, sys, uuid\n"
      "c = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)\n"
      "for i in range(int(sys.argv[2])):\n"
      "    p = {\"payment_id\": \"pay_%d\" % i, \"amount\": 100, \"currency\": \"EUR\","
      " \"customer_id\": \"c\"}\n"
      "    c.execute(\"INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) "
      "VALUES (?, ?, ?, ?, ?)\", (str(uuid.uuid4()), \"payment\", p[\"payment_id\"],"
      " \"payment.captured\", json.dumps(p)))\n' " +
      app_db + " " + std::to_string(kPayments);
  ASSERT_EQ(std::system(write.c_str()), 0);
  const std::string config = dir.File("relay.toml");
  {
    std::ofstream f(config);
    f << "[relay]\nstore = \"sqlite:" << app_db << "\"\nname = \"t1\"\npoll_ms = 50\n"
      << "lease_ms = 1500\nlisten = \"127.0.0.1:0\"\n"
      << "[outbox_table]\ntable = \"outbox\"\nbatch = 20\npoll_ms = 20\norder_column = \"rowid\"\n"
      << "[target]\nkind = \"nats\"\nurl = \"" << broker << "\"\n";
  }
  auto db = OpenSqlite(app_db);
  ASSERT_NE(db, nullptr);
  auto left = [&] { return QueryInt(*db, "SELECT count(*) FROM outbox"); };
  {
    Child relay({"relay", "--config", config});
    ASSERT_TRUE(relay.running());
    ASSERT_TRUE(WaitUntil([&] { return left() < kPayments; }, 60s)) << left();
    EXPECT_TRUE(WIFSIGNALED(relay.Signal(SIGKILL)));
  }
  Child relay({"relay", "--config", config});
  Child worker({"worker", "--db", "sqlite:" + app_db, "--broker", broker, "--consumer",
                "ledger"});
  ASSERT_TRUE(relay.running() && worker.running());
  ASSERT_TRUE(WaitUntil(
      [&] {
        return QueryInt(*db, "SELECT count(*) FROM sqlite_master WHERE name = 'ledger_entries'") ==
               1;
      },
      60s));
  auto rows = [&] { return QueryInt(*db, "SELECT count(*) FROM ledger_entries"); };
  ASSERT_TRUE(WaitUntil([&] { return rows() >= 2 * kPayments && left() == 0; }, 120s))
      << rows() << " ledger rows, " << left() << " rows left in the application's table";
  int rs = relay.Signal(SIGTERM);
  int ws = worker.Signal(SIGTERM);
  EXPECT_TRUE(WIFEXITED(rs) && WEXITSTATUS(rs) == 0) << rs;
  EXPECT_TRUE(WIFEXITED(ws) && WEXITSTATUS(ws) == 0) << ws;
  EXPECT_EQ(rows(), 2 * kPayments);
  EXPECT_EQ(QueryInt(*db, "SELECT count(DISTINCT payment_id) FROM ledger_entries"), kPayments);
  EXPECT_EQ(QueryInt(*db, "SELECT count(*) FROM outbox_events WHERE published_at IS NULL"), 0);
}

}  // namespace
}  // namespace converge
