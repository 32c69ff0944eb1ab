// End to end, the distributed deployment: PostgreSQL + NATS JetStream + the HTTP service
// (`converge serve --broker`) + two `converge relay` + two `converge worker --consumer
// ledger` processes, with every payment request sent twice. Each payment is charged and
// booked once. Needs the server from scripts/with-postgres.sh (CONVERGE_TEST_PG_DSN).
#include <gtest/gtest.h>
#include <libpq-fe.h>
#include <signal.h>
#include <sys/wait.h>

#include <atomic>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "converge/database.h"
#include "converge/http.h"
#include "converge/webhook.h"
#include "harness/providers.h"
#include "harness/serve_process.h"
#include "tests/nats/nats_servers.h"
#include "tests/unit/test_util.h"

namespace converge {
namespace {

using namespace std::chrono_literals;
using json = nlohmann::json;
using testing::Child;
using testing::NatsServers;
using testing::WaitUntil;

bool Admin(const std::string& dsn, const std::string& sql) {
  PGconn* c = PQconnectdb(dsn.c_str());
  PGresult* r = PQexec(c, sql.c_str());
  const bool ok = PQresultStatus(r) == PGRES_COMMAND_OK;
  if (!ok) ADD_FAILURE() << sql << ": " << PQerrorMessage(c);
  PQclear(r);
  PQfinish(c);
  return ok;
}

int64_t Count(Database& db, const std::string& sql) {
  int64_t n = -1;
  (void)db.Read([&](Tx& tx) -> Status {
    CONVERGE_ASSIGN_OR_RETURN(Rows rows, tx.Query(sql));
    n = rows[0].Int(0);
    return OkStatus();
  });
  return n;
}

TEST(NatsEndToEnd, PostgresNatsTwoRelaysTwoWorkersAndTheServiceChargeAndBookOnce) {
  const char* dsn = std::getenv("CONVERGE_TEST_PG_DSN");
  if (dsn == nullptr) GTEST_SKIP() << "needs CONVERGE_TEST_PG_DSN (scripts/with-postgres.sh)";
  const std::string admin = dsn;
  const std::string name = "converge_nats_" + std::to_string(std::random_device{}() % 1000000000);
  ASSERT_TRUE(Admin(admin, "CREATE DATABASE " + name));
  const std::string uri = admin.substr(0, admin.rfind('/') + 1) + name;

  NatsServers nats;
  ASSERT_TRUE(nats.Start(1));
  const std::string broker = "nats://" + nats.urls();
  testing::TempDir dir;
  harness::FakePsp psp(harness::ProviderOptions{.db_path = dir.File("psp.db")});
  harness::FakeMail mail(harness::ProviderOptions{.db_path = dir.File("mail.db")});
  ASSERT_TRUE(psp.Start().ok());
  ASSERT_TRUE(mail.Start().ok());
  const std::string config = dir.File("svc.toml");
  {
    std::ofstream c(config);
    c << "[store]\nuri = \"" << uri << "\"\nbroker = \"" << broker << "\"\n"
      << "[idempotency]\nlease_ms = 1500\n"
      << "[auth]\nadmin_token = \"nats-admin-token\"\napi_keys = { \"sk_n\" = \"n\" }\n"
      << "[psp]\nurl = \"http://127.0.0.1:" << psp.port() << "\"\ntimeout_ms = 1000\n"
      << "webhook_secrets = [\"" << webhook::NewSecret() << "\"]\n"
      << "[mail]\nurl = \"http://127.0.0.1:" << mail.port() << "\"\n"
      << "[consumers]\nvisibility_ms = 2000\nbackoff_initial_ms = 20\nbackoff_max_ms = 200\n";
  }
  harness::ServeProcess serve(
      {.binary = CONVERGE_BIN_PATH, .config_path = config, .dir = dir.path(), .name = "serve"});
  ASSERT_TRUE(serve.Start().ok());
  Child relay1({"relay", "--db", uri, "--broker", broker, "--name", "relay-1"});
  Child relay2({"relay", "--db", uri, "--broker", broker, "--name", "relay-2"});
  Child worker1(
      {"worker", "--db", uri, "--broker", broker, "--consumer", "ledger", "--config", config});
  Child worker2(
      {"worker", "--db", uri, "--broker", broker, "--consumer", "ledger", "--config", config});

  // Every payment twice, from 8 client threads: the second is a replay.
  constexpr int kPayments = 120;
  http::Client client;
  std::atomic<int> next{0}, created{0}, replayed{0}, other{0};
  std::vector<std::thread> clients;
  for (int t = 0; t < 8; ++t) {
    clients.emplace_back([&] {
      for (int k; (k = next.fetch_add(1)) < 2 * kPayments;) {
        const int p = k / 2;
        const std::string body = json{{"amount", 100 + p},
                                      {"currency", "EUR"},
                                      {"customer_id", "c"},
                                      {"order_id", "o-" + std::to_string(p)}}
                                     .dump();
        for (int attempt = 0;; ++attempt) {
          auto r = client.Send({.method = "POST",
                                .url = serve.Url("/v1/payments"),
                                .headers = {{"Authorization", "Bearer sk_n"},
                                            {"Idempotency-Key", "n-" + std::to_string(p)}},
                                .body = body,
                                .timeout = 10s});
          // 409: the first is still running; 503 or no answer: a provider call timed out
          // under load and the client retries, as a real one would (the lease is short).
          const bool retry = !r || r->status == 409 || r->status == 503;
          if (retry && attempt < 600) {
            std::this_thread::sleep_for(20ms);
            continue;
          }
          if (r && r->status == 201) {
            (r->Header("Idempotent-Replayed") ? replayed : created)++;
          } else {
            other++;
            ADD_FAILURE() << "payment " << p << ": "
                          << (r ? std::to_string(r->status) + " " + r->body : "no answer");
          }
          break;
        }
      }
    });
  }
  for (std::thread& t : clients) t.join();
  EXPECT_EQ(created.load(), kPayments);
  EXPECT_EQ(replayed.load(), kPayments);
  EXPECT_EQ(other.load(), 0);

  auto db = Database::Open(uri);
  ASSERT_TRUE(db.has_value());
  EXPECT_TRUE(WaitUntil(
      [&] {
        return Count(**db, "SELECT count(*) FROM outbox_events WHERE published_at IS NULL") == 0 &&
               Count(**db, "SELECT count(*) FROM ledger_entries") == 2 * kPayments;
      },
      120s))
      << Count(**db, "SELECT count(*) FROM ledger_entries");
  EXPECT_EQ(Count(**db, "SELECT count(*) FROM payments"), kPayments);
  EXPECT_EQ(Count(**db,
                  "SELECT count(*) FROM payments p WHERE (SELECT count(*) FROM "
                  "ledger_entries l WHERE l.payment_id = p.id) <> 2"),
            0);
  json st = json::parse(
      client.Send({.url = "http://127.0.0.1:" + std::to_string(psp.port()) + "/v1/stats"})->body);
  EXPECT_EQ(st["charges"]["succeeded"], kPayments);
  EXPECT_EQ(st["references_charged_twice"], 0);

  const std::pair<const char*, Child*> children[] = {
      {"relay-1", &relay1}, {"relay-2", &relay2}, {"worker-1", &worker1}, {"worker-2", &worker2}};
  for (const auto& [child, c] : children) {
    const int status = c->Signal(SIGTERM);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
        << child << " ended with wait status " << status;
  }
  serve.Stop();
  db->reset();
  Admin(admin, "DROP DATABASE IF EXISTS " + name + " WITH (FORCE)");
}

}  // namespace
}  // namespace converge
