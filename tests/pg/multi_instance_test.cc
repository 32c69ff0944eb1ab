// Several `converge serve` processes on one PostgreSQL database (label pg): they share
// the outbox, the queues and the keys; one is killed with SIGKILL mid-load and the other
// finishes the work; and the database itself restarts mid-load. Needs the server from
// scripts/with-postgres.sh (CONVERGE_TEST_PG_*); runs the converge binary built beside it
// (or $CONVERGE_BIN).
#include <fcntl.h>
#include <libpq-fe.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <fstream>
#include <map>
#include <random>
#include <thread>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "converge/database.h"
#include "converge/http.h"
#include "converge/webhook.h"
#include "harness/providers.h"
#include "harness/serve_process.h"
#include "tests/unit/test_util.h"

namespace payments {
namespace {

using converge::http::Client;
using converge::http::Response;
using json = nlohmann::json;
using Steady = std::chrono::steady_clock;

using converge::harness::ServeProcess;

class MultiInstance : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* dsn = std::getenv("CONVERGE_TEST_PG_DSN");
    if (dsn == nullptr) GTEST_SKIP() << "needs CONVERGE_TEST_PG_DSN (scripts/with-postgres.sh)";
    admin_ = dsn;
    name_ = "converge_mi_" + std::to_string(std::random_device{}() % 1000000000);
    Admin("CREATE DATABASE " + name_);
    uri_ = admin_.substr(0, admin_.rfind('/') + 1) + name_;
    secret_ = converge::webhook::NewSecret();
    psp_ = std::make_unique<converge::harness::FakePsp>(
        converge::harness::ProviderOptions{.db_path = dir_.File("psp.db")});
    mail_ = std::make_unique<converge::harness::FakeMail>(
        converge::harness::ProviderOptions{.db_path = dir_.File("mail.db")});
    ASSERT_TRUE(psp_->Start().ok());
    ASSERT_TRUE(mail_->Start().ok());
    config_ = dir_.File("svc.toml");
    std::ofstream c(config_);
    c << "[store]\nuri = \"" << uri_ << "\"\n"
      << "[idempotency]\nlease_ms = 1500\n"
      << "[auth]\nadmin_token = \"mi-admin-token\"\napi_keys = { \"sk_mi\" = \"mi\" }\n"
      << "[psp]\nurl = \"http://127.0.0.1:" << psp_->port() << "\"\ntimeout_ms = 1000\n"
      << "webhook_secrets = [\"" << secret_ << "\"]\n"
      << "[mail]\nurl = \"http://127.0.0.1:" << mail_->port() << "\"\ntimeout_ms = 1000\n"
      << "[consumers]\nvisibility_ms = 1000\nbackoff_initial_ms = 20\nbackoff_max_ms = 200\n"
      << "[effects]\nlease_ms = 1500\n";
  }
  void TearDown() override {
    instances_.clear();
    if (!name_.empty()) Admin("DROP DATABASE IF EXISTS " + name_ + " WITH (FORCE)");
  }
  void Admin(const std::string& sql) {
    PGconn* c = PQconnectdb(admin_.c_str());
    PGresult* r = PQexec(c, sql.c_str());
    EXPECT_EQ(PQresultStatus(r), PGRES_COMMAND_OK) << sql << ": " << PQerrorMessage(c);
    PQclear(r);
    PQfinish(c);
  }
  ServeProcess& AddInstance() {
    instances_.push_back(std::make_unique<ServeProcess>(
        ServeProcess::Options{.binary = CONVERGE_BIN_PATH,
                              .config_path = config_,
                              .dir = dir_.path(),
                              .name = "svc" + std::to_string(instances_.size())}));
    converge::Status started = instances_.back()->Start();
    EXPECT_TRUE(started.ok()) << started.ToString();
    return *instances_.back();
  }
  // Sends until a final answer, moving to a live instance when one does not answer.
  int Pay(int k, std::atomic<int64_t>* unavailable) {
    std::string body = json{{"amount", 100 + k}, {"currency", "EUR"}, {"customer_id", "c"},
                            {"order_id", "o-" + std::to_string(k)}}.dump();
    thread_local std::mt19937 rng(std::random_device{}());
    for (int attempt = 0; attempt < 400; ++attempt) {
      std::vector<ServeProcess*> live;
      for (auto& i : instances_) {
        if (i->alive()) live.push_back(i.get());
      }
      if (live.empty()) return -1;
      ServeProcess* target = live[rng() % live.size()];
      auto r = client_.Send({.method = "POST", .url = target->Url("/v1/payments"),
                             .headers = {{"Authorization", "Bearer sk_mi"},
                                         {"Idempotency-Key", "mi-" + std::to_string(k)}},
                             .body = body, .timeout = std::chrono::seconds(5)});
      if (r && r->status == 201) return 201;
      if (r && r->status != 409 && r->status != 503) return r->status;
      if (r && r->status == 503) {
        ++*unavailable;
        EXPECT_EQ(*r->Header("Content-Type"), "application/problem+json");
      }
      // The client's pause between retries, as any client of a busy service has (not a
      // wait for a condition: the loop above is the retry).
      std::this_thread::sleep_for(std::chrono::milliseconds(20 + rng() % 60));
    }
    return -2;
  }
  int64_t Count(const std::string& sql) {
    auto db = converge::Database::Open(uri_);
    if (!db) return -1;
    int64_t n = -1;
    (void)(*db)->Read([&](converge::Tx& tx) -> converge::Status {
      CONVERGE_ASSIGN_OR_RETURN(converge::Rows rows, tx.Query(sql));
      n = rows[0].Int(0);
      return converge::OkStatus();
    });
    return n;
  }
  bool Drained() {
    return converge::testing::WaitUntil([&] {
      return Count("SELECT count(*) FROM outbox_events WHERE published_at IS NULL") == 0 &&
             Count("SELECT count(*) FROM queue_messages WHERE queue <> 'audit'") == 0 &&
             Count("SELECT count(*) FROM effects WHERE state = 'pending'") == 0;
    }, std::chrono::seconds(60));
  }
  void CheckConverged(int keys) {
    EXPECT_EQ(Count("SELECT count(*) FROM payments"), keys);
    EXPECT_EQ(Count("SELECT count(*) FROM payments WHERE status <> 'captured'"), 0);
    json st = json::parse(
        client_.Send({.url = "http://127.0.0.1:" + std::to_string(psp_->port()) + "/v1/stats"})
            ->body);
    EXPECT_EQ(st["charges"]["succeeded"], keys);
    EXPECT_EQ(st["references_charged_twice"], 0);
    EXPECT_EQ(Count("SELECT count(*) FROM payments p WHERE (SELECT count(*) FROM ledger_entries l "
                    "WHERE l.payment_id = p.id) <> 2"), 0);
    EXPECT_EQ(Count("SELECT count(*) FROM effects WHERE state = 'done'"), keys);
    // Publish order per aggregate: the audit queue (never consumed) received each
    // aggregate's events in outbox order.
    EXPECT_EQ(Count("SELECT count(*) FROM (SELECT subject, array_agg(event_id ORDER BY id) a "
                    "FROM queue_messages WHERE queue = 'audit' GROUP BY subject) q JOIN "
                    "(SELECT aggregate_id, array_agg(event_id ORDER BY seq) b FROM outbox_events "
                    "GROUP BY aggregate_id) o ON o.aggregate_id = q.subject WHERE q.a <> o.b"), 0);
    EXPECT_EQ(Count("SELECT count(*) FROM queue_messages WHERE queue = 'audit'"),
              Count("SELECT count(*) FROM outbox_events"));
  }
  void Subscribe(const std::string& queue) {
    auto db = converge::Database::Open(uri_);
    ASSERT_TRUE(db);
    ASSERT_TRUE((*db)
                    ->Transact([&](converge::Tx& tx) {
                      return converge::StatusOf(
                          tx.Exec("INSERT INTO queue_subscriptions (queue, pattern, created_at) "
                                  "VALUES ($1, '*', 0) "
                                  "ON CONFLICT DO NOTHING",
                                  queue));
                    })
                    .ok());
  }

  converge::testing::TempDir dir_;
  std::string admin_, name_, uri_, secret_, config_;
  std::unique_ptr<converge::harness::FakePsp> psp_;
  std::unique_ptr<converge::harness::FakeMail> mail_;
  std::vector<std::unique_ptr<ServeProcess>> instances_;
  Client client_;
};

TEST_F(MultiInstance, TwoServicesShareTheWorkAndOneSurvivesTheOthersKill) {
  ServeProcess& a = AddInstance();
  AddInstance();
  Subscribe("audit");
  constexpr int kKeys = 300;
  std::vector<int> plan;
  for (int k = 0; k < kKeys; ++k) {
    plan.push_back(k);
    if (k % 3 == 0) plan.push_back(k);  // a third of the keys sent twice
  }
  std::shuffle(plan.begin(), plan.end(), std::mt19937(7));
  std::atomic<size_t> next{0};
  std::atomic<int64_t> bad{0}, unavailable{0};
  std::vector<std::thread> clients;
  for (int c = 0; c < 12; ++c) {
    clients.emplace_back([&] {
      for (size_t i; (i = next.fetch_add(1)) < plan.size();) {
        if (Pay(plan[i], &unavailable) != 201) ++bad;
      }
    });
  }
  ASSERT_TRUE(converge::testing::WaitUntil([&] { return next.load() > plan.size() / 2; }));
  a.Kill(SIGKILL);  // mid-load, whatever it was doing
  for (auto& t : clients) t.join();
  EXPECT_EQ(bad, 0);
  ASSERT_TRUE(Drained());
  CheckConverged(kKeys);
}

// Checkout sagas (examples/payments/checkout.h) from two instances on one database, one
// killed mid-load: the survivor takes the dead one's sagas over once their leases lapse;
// the fence keeps the two from ever driving one saga at once, and the conditional
// decrement keeps many orders for the last units from overselling.
TEST_F(MultiInstance, TwoServicesShareCheckoutSagasAndOneSurvivesTheOthersKill) {
  ServeProcess& a = AddInstance();
  ServeProcess& b = AddInstance();
  constexpr int kOrders = 40, kStock = 12;
  auto r = client_.Send({.method = "PUT",
                         .url = b.Url("/admin/inventory/sku-pg"),
                         .headers = {{"Authorization", "Bearer mi-admin-token"}},
                         .body = json{{"available", kStock}}.dump()});
  ASSERT_TRUE(r && r->status == 200);
  std::atomic<int> next{0};
  std::atomic<int64_t> bad{0};
  std::vector<std::thread> clients;
  for (int c = 0; c < 8; ++c) {
    clients.emplace_back([&] {
      Client client;
      for (int k; (k = next.fetch_add(1)) < kOrders;) {
        const std::string body = json{
            {"customer_id", "c"},
            {"sku", "sku-pg"},
            {"qty", 1},
            {"amount", 100 + k},
            {"currency", "EUR"}}.dump();
        bool accepted = false;
        for (int attempt = 0; attempt < 200 && !accepted; ++attempt) {
          ServeProcess* target = a.alive() && k % 2 == 0 ? &a : &b;
          auto resp =
              client.Send({.method = "POST",
                           .url = target->Url("/v1/orders"),
                           .headers = {{"Authorization", "Bearer sk_mi"},
                                       {"Idempotency-Key", "pg-order-" + std::to_string(k)}},
                           .body = body,
                           .timeout = std::chrono::seconds(5)});
          accepted = resp && resp->status == 202;
          // A client's pause before it retries (409 while the first is in flight, or no
          // answer from the killed instance).
          if (!accepted) std::this_thread::sleep_for(std::chrono::milliseconds(50));
        }
        if (!accepted) ++bad;
      }
    });
  }
  ASSERT_TRUE(converge::testing::WaitUntil([&] { return next.load() > kOrders / 2; }));
  a.Kill(SIGKILL);  // mid-load, mid-saga perhaps
  for (auto& t : clients) t.join();
  EXPECT_EQ(bad, 0);
  ASSERT_TRUE(converge::testing::WaitUntil(
      [&] {
        return Count(
                   "SELECT count(*) FROM saga_instances WHERE state IN "
                   "('running', 'compensating')") == 0;
      },
      std::chrono::seconds(90)));
  EXPECT_EQ(Count("SELECT count(*) FROM saga_instances"), kOrders);
  EXPECT_EQ(Count("SELECT count(*) FROM saga_instances WHERE state = 'completed'"), kStock);
  EXPECT_EQ(Count("SELECT count(*) FROM shipments"), kStock);
  EXPECT_EQ(Count("SELECT available FROM inventory WHERE sku = 'sku-pg'"), 0);
  EXPECT_EQ(Count("SELECT count(*) FROM orders WHERE captured <> refunded + "
                  "(CASE WHEN shipped = 1 THEN amount ELSE 0 END)"),
            0);
  json st = json::parse(
      client_.Send({.url = "http://127.0.0.1:" + std::to_string(psp_->port()) + "/v1/stats"})
          ->body);
  EXPECT_EQ(st["charges"]["succeeded"], kStock);
  EXPECT_EQ(st["references_charged_twice"], 0);
}

TEST_F(MultiInstance, DatabaseRestartMidLoadIsReportedThenRecovered) {
  const char* pg_bin = std::getenv("CONVERGE_TEST_PG_BIN");
  const char* pg_data = std::getenv("CONVERGE_TEST_PG_DATA");
  if (pg_bin == nullptr || pg_data == nullptr) GTEST_SKIP() << "needs CONVERGE_TEST_PG_BIN/DATA";
  ServeProcess& svc = AddInstance();
  Subscribe("audit");
  constexpr int kKeys = 150;
  std::atomic<int> next{0};
  std::atomic<int64_t> bad{0}, unavailable{0};
  std::atomic<bool> saw_not_ready{false};
  std::vector<std::thread> clients;
  for (int c = 0; c < 8; ++c) {
    clients.emplace_back([&] {
      for (int k; (k = next.fetch_add(1)) < kKeys;) {
        if (Pay(k, &unavailable) != 201) ++bad;
      }
    });
  }
  ASSERT_TRUE(converge::testing::WaitUntil([&] { return next.load() > kKeys / 3; }));
  const char* run_as = std::getenv("CONVERGE_TEST_PG_RUN_AS");
  std::string prefix = run_as && *run_as ? std::string(run_as) + " " : "";
  std::string stop = prefix + pg_bin + "/pg_ctl -D " + pg_data + " -m fast -w stop > /dev/null";
  std::string start = prefix + pg_bin + "/pg_ctl -D " + pg_data + " -w -l " + pg_data +
                      "/../restart.log start > /dev/null";
  const int64_t unavailable_before = unavailable.load();
  ASSERT_EQ(std::system(stop.c_str()), 0);
  // While the database is down the service says so: not ready, and 503 problem+json to
  // the clients (the database stays down until one of them has seen it).
  auto ready = client_.Send({.url = svc.Url("/readyz")});
  saw_not_ready = ready && ready->status == 503;
  EXPECT_TRUE(converge::testing::WaitUntil(
      [&] { return unavailable.load() > unavailable_before; }));
  ASSERT_EQ(std::system(start.c_str()), 0);
  for (auto& t : clients) t.join();
  EXPECT_TRUE(saw_not_ready.load());
  EXPECT_GT(unavailable.load(), 0);
  EXPECT_EQ(bad, 0);
  EXPECT_EQ(client_.Send({.url = svc.Url("/readyz")})->status, 200);
  ASSERT_TRUE(Drained());
  CheckConverged(kKeys);
}

}  // namespace
}  // namespace payments
