// `converge relay` and `converge worker` as real processes against a real nats-server:
// a worker killed with SIGKILL mid-stream, another taking over, both processes stopped
// with SIGTERM. Every payment is booked exactly once (two ledger rows each).
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>

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
  // The worker creates the service's tables as it starts.
  ASSERT_TRUE(WaitUntil([&] {
    return QueryInt(*db, "SELECT count(*) FROM sqlite_master WHERE name = 'ledger_entries'") == 1;
  }));
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

}  // namespace
}  // namespace converge
