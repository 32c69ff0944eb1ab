// End-to-end tests of the checkout saga (examples/payments/checkout.h) over real sockets:
// the service and the payment provider in this process on port 0, and, for the crashes,
// a real `converge serve` child that a failpoint SIGKILLs at every step boundary.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <thread>

#include "converge/database.h"
#include "converge/failpoint.h"
#include "converge/http.h"
#include "converge/webhook.h"
#include "examples/payments/service.h"
#include "harness/providers.h"
#include "harness/serve_process.h"
#include "tests/unit/test_util.h"

namespace payments {
namespace {

using converge::http::Client;
using converge::http::Headers;
using converge::http::Response;
using json = nlohmann::json;

constexpr const char* kAcme = "Bearer sk_test_acme";
constexpr const char* kAdmin = "Bearer e2e-admin-token";

bool Settled(const std::string& state) {
  return state == "completed" || state == "compensated" || state == "failed_to_compensate";
}

// What every order and the provider must agree on once every saga has settled: no money
// kept without goods, no stock held without an order, no stock below zero.
void ExpectBalanced(converge::Database& db, int64_t psp_succeeded_amount) {
  ASSERT_TRUE(db.Read([&](converge::Tx& tx) -> converge::Status {
                  CONVERGE_ASSIGN_OR_RETURN(
                      converge::Rows m,
                      tx.Query("SELECT coalesce(sum(captured), 0), coalesce(sum(refunded), 0), "
                               "coalesce(sum(CASE WHEN shipped = 1 THEN amount ELSE 0 END), 0) "
                               "FROM orders"));
                  EXPECT_EQ(m[0].Int(0), m[0].Int(1) + m[0].Int(2))
                      << "captured != refunded + shipped";
                  EXPECT_EQ(m[0].Int(2), psp_succeeded_amount)
                      << "money kept at the provider != shipped orders";
                  CONVERGE_ASSIGN_OR_RETURN(
                      converge::Rows bad,
                      tx.Query("SELECT count(*) FROM orders o JOIN saga_instances s ON "
                               "s.saga_id = o.id WHERE s.state = 'compensated' AND "
                               "(o.captured <> o.refunded OR o.shipped = 1 OR EXISTS (SELECT 1 "
                               "FROM reservations r WHERE r.order_id = o.id AND "
                               "r.state = 'reserved'))"));
                  EXPECT_EQ(bad[0].Int(0), 0) << "compensated orders not fully undone";
                  CONVERGE_ASSIGN_OR_RETURN(
                      converge::Rows stock,
                      tx.Query("SELECT count(*) FROM inventory WHERE available < 0 OR "
                               "reserved <> 0"));
                  EXPECT_EQ(stock[0].Int(0), 0) << "stock negative or still reserved";
                  return converge::OkStatus();
                }).ok());
}

// The provider's view: the sum of amounts of charges still succeeded (not refunded).
int64_t PspKept(Client& client, uint16_t psp_port) {
  auto r = client.Send({.url = "http://127.0.0.1:" + std::to_string(psp_port) + "/v1/charges"});
  if (!r || r->status != 200) return -1;
  int64_t kept = 0;
  const json listing = json::parse(r->body);
  for (const json& c : listing["charges"]) {
    if (c.value("status", "") == "succeeded") kept += c.value("amount", int64_t{0});
  }
  return kept;
}

std::string OrderBody(const std::string& sku = "sku-1", int64_t qty = 1, int64_t amount = 500) {
  return json{
      {"customer_id", "c-1"}, {"sku", sku}, {"qty", qty}, {"amount", amount}, {"currency", "EUR"}}
      .dump();
}

class CheckoutE2E : public ::testing::Test {
 protected:
  void SetUp() override {
    psp_ = std::make_unique<converge::harness::FakePsp>(
        converge::harness::ProviderOptions{.db_path = dir_.File("psp.db")});
    ASSERT_TRUE(psp_->Start().ok());
    ServiceConfig c;
    c.port = 0;
    c.db = "sqlite:" + dir_.File("service.db");
    c.admin_token = "e2e-admin-token";
    c.api_keys = {{"sk_test_acme", "acme"}, {"sk_test_globex", "globex"}};
    c.psp_url = "http://127.0.0.1:" + std::to_string(psp_->port());
    // Seconds: a call that a loaded machine stalls past the timeout is retried, and the
    // tests compare the saga's history step by step.
    c.psp_timeout = std::chrono::seconds(3);
    c.mail_url = "http://127.0.0.1:1";
    c.webhook_secrets = {converge::webhook::NewSecret()};
    c.lease = std::chrono::seconds(6);
    c.backoff_initial = std::chrono::milliseconds(10);
    c.backoff_max = std::chrono::milliseconds(50);
    config_ = c;
    service_ = std::make_unique<Service>(c);
    ASSERT_TRUE(service_->Start().ok());
    auto db = converge::Database::Open(c.db);
    ASSERT_TRUE(db);
    db_ = std::move(*db);
  }
  void TearDown() override {
    ASSERT_TRUE(converge::failpoint::Configure("").ok());
    service_.reset();
    db_.reset();
    psp_.reset();
  }

  std::string Url(const std::string& path) {
    return "http://127.0.0.1:" + std::to_string(service_->port()) + path;
  }
  Response Send(const std::string& method, const std::string& path, Headers headers,
                const std::string& body = "") {
    Client client;
    auto r = client.Send({.method = method,
                          .url = Url(path),
                          .headers = std::move(headers),
                          .body = body,
                          .timeout = std::chrono::seconds(10)});
    EXPECT_TRUE(r) << r.error().ToString();
    return r ? *r : Response{0, {}, {}};
  }
  void Stock(const std::string& sku, int64_t available) {
    Response r = Send("PUT", "/admin/inventory/" + sku, {{"Authorization", kAdmin}},
                      json{{"available", available}}.dump());
    ASSERT_EQ(r.status, 200) << r.body;
  }
  void PspFaults(const json& f) {
    Client client;
    auto r = client.Send({.method = "POST",
                          .url = "http://127.0.0.1:" + std::to_string(psp_->port()) + "/faults",
                          .body = f.dump()});
    ASSERT_TRUE(r && r->status == 200);
  }
  // Stops the service and starts it again with `change` applied to its configuration.
  void Restart(const std::function<void(ServiceConfig&)>& change) {
    service_.reset();
    change(config_);
    service_ = std::make_unique<Service>(config_);
    ASSERT_TRUE(service_->Start().ok());
  }
  void ShippingFaults(const json& f) {
    ASSERT_EQ(Send("POST", "/admin/shipping/faults", {{"Authorization", kAdmin}}, f.dump()).status,
              200);
  }
  // POST /v1/orders; returns the order id (empty on failure).
  std::string Order(const std::string& key, const std::string& body = OrderBody()) {
    Response r =
        Send("POST", "/v1/orders", {{"Authorization", kAcme}, {"Idempotency-Key", key}}, body);
    EXPECT_EQ(r.status, 202) << r.body;
    json j = json::parse(r.body, nullptr, false);
    return j.is_object() ? j.value("id", "") : "";
  }
  // Waits until the order's saga settled; returns the order as GET shows it.
  json Await(const std::string& id) {
    json out;
    EXPECT_TRUE(converge::testing::WaitUntil([&] {
      Response r = Send("GET", "/v1/orders/" + id, {{"Authorization", kAcme}});
      out = json::parse(r.body, nullptr, false);
      return r.status == 200 && Settled(out.value("state", ""));
    })) << out.dump();
    return out;
  }
  // Steps() without the retries (a loaded machine may time a call out once more).
  static std::vector<std::string> Outcomes(const json& order) {
    std::vector<std::string> out;
    for (std::string& s : Steps(order)) {
      if (s.size() < 6 || s.compare(s.size() - 6, 6, " retry") != 0) out.push_back(std::move(s));
    }
    return out;
  }
  static std::vector<std::string> Steps(const json& order) {
    std::vector<std::string> out;
    for (const json& h : order["saga"]["history"]) {
      out.push_back(h["phase"].get<std::string>() + " " + h["step"].get<std::string>() + " " +
                    h["outcome"].get<std::string>());
    }
    return out;
  }
  int64_t Available(const std::string& sku) {
    return converge::testing::QueryInt(*db_,
                                       "SELECT available FROM inventory WHERE sku = '" + sku + "'");
  }

  converge::testing::TempDir dir_;
  std::unique_ptr<converge::harness::FakePsp> psp_;
  ServiceConfig config_;
  std::unique_ptr<Service> service_;
  std::unique_ptr<converge::Database> db_;
  Client client_;
};

TEST_F(CheckoutE2E, CompletesAnOrderReserveCaptureShip) {
  Stock("sku-1", 3);
  const std::string id = Order("k-1");
  ASSERT_FALSE(id.empty());
  json o = Await(id);
  EXPECT_EQ(o["state"], "completed");
  EXPECT_EQ(Steps(o), (std::vector<std::string>{"action reserve done", "action capture done",
                                                "action ship done"}));
  EXPECT_EQ(o["captured"], 500);
  EXPECT_EQ(o["shipped"], true);
  EXPECT_EQ(Available("sku-1"), 2);
  ExpectBalanced(*db_, PspKept(client_, psp_->port()));
}

TEST_F(CheckoutE2E, DuplicateOrderRequestsStartOneSaga) {
  Stock("sku-1", 10);
  std::vector<std::string> ids(8);
  std::vector<std::thread> threads;
  for (size_t i = 0; i < ids.size(); ++i) {
    threads.emplace_back([&, i] {
      Client client;
      for (int attempt = 0; attempt < 50; ++attempt) {
        auto r = client.Send({.method = "POST",
                              .url = Url("/v1/orders"),
                              .headers = {{"Authorization", kAcme}, {"Idempotency-Key", "dup"}},
                              .body = OrderBody()});
        if (r && r->status == 202) {
          ids[i] = json::parse(r->body).value("id", "");
          return;
        }
        // 409: the first is still committing; retry as a client would.
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
    });
  }
  for (auto& t : threads) t.join();
  for (const auto& id : ids) EXPECT_EQ(id, ids[0]);
  Await(ids[0]);
  EXPECT_EQ(converge::testing::QueryInt(*db_, "SELECT count(*) FROM saga_instances"), 1);
  EXPECT_EQ(converge::testing::QueryInt(*db_, "SELECT count(*) FROM orders"), 1);
  EXPECT_EQ(Available("sku-1"), 9);
  // Same key, different body: 422, nothing started.
  Response r = Send("POST", "/v1/orders", {{"Authorization", kAcme}, {"Idempotency-Key", "dup"}},
                    OrderBody("sku-1", 2));
  EXPECT_EQ(r.status, 422);
}

TEST_F(CheckoutE2E, OutOfStockFailsAtTheFirstStepAndChargesNothing) {
  Stock("sku-1", 1);
  json o = Await(Order("k-oos", OrderBody("sku-1", 2)));
  EXPECT_EQ(o["state"], "compensated");
  EXPECT_EQ(Steps(o), (std::vector<std::string>{"action reserve failed"}));
  EXPECT_NE(o["saga"]["error"].get<std::string>().find("out of stock"), std::string::npos);
  EXPECT_EQ(o["captured"], 0);
  EXPECT_EQ(Available("sku-1"), 1);
  EXPECT_EQ(PspKept(client_, psp_->port()), 0);
}

TEST_F(CheckoutE2E, ADeclinedPaymentReleasesTheReservation) {
  Stock("sku-1", 1);
  PspFaults({{"decline_next", 1}});
  json o = Await(Order("k-decl"));
  EXPECT_EQ(o["state"], "compensated");
  EXPECT_EQ(Steps(o), (std::vector<std::string>{"action reserve done", "action capture failed",
                                                "compensation reserve done"}));
  EXPECT_EQ(Available("sku-1"), 1);
  ExpectBalanced(*db_, PspKept(client_, psp_->port()));
}

TEST_F(CheckoutE2E, AShippingFailureRefundsAndReleasesInReverseOrder) {
  Stock("sku-1", 1);
  ShippingFaults({{"reject_next", 1}});
  json o = Await(Order("k-ship"));
  EXPECT_EQ(o["state"], "compensated");
  EXPECT_EQ(Steps(o), (std::vector<std::string>{"action reserve done", "action capture done",
                                                "action ship failed", "compensation capture done",
                                                "compensation reserve done"}));
  EXPECT_EQ(o["captured"], 500);
  EXPECT_EQ(o["refunded"], 500);
  EXPECT_EQ(o["shipped"], false);
  EXPECT_EQ(Available("sku-1"), 1);
  EXPECT_EQ(PspKept(client_, psp_->port()), 0);  // the provider holds no money for it
  ExpectBalanced(*db_, 0);
}

TEST_F(CheckoutE2E, TransientFailuresOfEachStepAreRetriedAndTheOrderCompletes) {
  Stock("sku-1", 1);
  // The reservation's transaction fails twice (as a busy store would make it), the
  // provider answers 503 twice, the carrier is down twice.
  ASSERT_TRUE(converge::failpoint::Configure("saga.before_local=error(unavailable)*2").ok());
  PspFaults({{"fail_next", 2}});
  ShippingFaults({{"fail_next", 2}});
  json o = Await(Order("k-flaky"));
  EXPECT_EQ(o["state"], "completed");
  EXPECT_EQ(Steps(o), (std::vector<std::string>{
                          "action reserve retry", "action reserve retry", "action reserve done",
                          "action capture retry", "action capture retry", "action capture done",
                          "action ship retry", "action ship retry", "action ship done"}));
  EXPECT_EQ(Available("sku-1"), 0);
  ExpectBalanced(*db_, PspKept(client_, psp_->port()));
}

TEST_F(CheckoutE2E, ARefundFailingTransientlyIsRetriedUntilItGoesThrough) {
  Stock("sku-1", 1);
  ShippingFaults({{"reject_next", 1}});
  PspFaults({{"refund_fail_next", 3}});
  json o = Await(Order("k-refund-flaky"));
  EXPECT_EQ(o["state"], "compensated");
  EXPECT_EQ(Outcomes(o), (std::vector<std::string>{
                             "action reserve done", "action capture done", "action ship failed",
                             "compensation capture done", "compensation reserve done"}));
  const std::vector<std::string> steps = Steps(o);
  EXPECT_GE(std::count(steps.begin(), steps.end(), "compensation capture retry"), 3);
  EXPECT_EQ(o["refunded"], 500);
  EXPECT_EQ(Available("sku-1"), 1);
  EXPECT_EQ(PspKept(client_, psp_->port()), 0);
  ExpectBalanced(*db_, 0);
}

// Found by review: a refund makes a lookup, then a call per charge, each up to the PSP
// timeout, and only one call was known to fit in the runner's lease: with two charges (a
// late one) and a slow lookup, the second refund could run past the lease, when another
// runner may start the same refund. Past the lookup and one refund, a call that could
// end past the lease now waits for the next attempt, which counts the first as done.
TEST_F(CheckoutE2E, ARefundCallThatCouldOutlastTheLeaseWaitsForTheNextAttempt) {
  Restart([](ServiceConfig& c) {
    c.psp_timeout = std::chrono::milliseconds(1000);
    c.lease = std::chrono::milliseconds(1500);
  });
  Stock("sku-1", 1);
  ShippingFaults({{"reject_next", 1}});
  // Hold every saga call until the compensation's, then charge the order's reference a
  // second time, as a late capture would.
  ASSERT_TRUE(converge::failpoint::Configure("saga.before_call=pause").ok());
  const std::string id = Order("k-refund-two-charges");
  ASSERT_FALSE(id.empty());
  bool compensating = false;
  for (int call = 0; call < 5 && !compensating; ++call) {
    ASSERT_TRUE(converge::failpoint::WaitPaused("saga.before_call", std::chrono::seconds(20)));
    Response r = Send("GET", "/v1/orders/" + id, {{"Authorization", kAcme}});
    compensating = json::parse(r.body, nullptr, false).value("state", "") == "compensating";
    if (!compensating) converge::failpoint::Release("saga.before_call");
  }
  ASSERT_TRUE(compensating);
  auto late = client_.Send(
      {.method = "POST",
       .url = "http://127.0.0.1:" + std::to_string(psp_->port()) + "/v1/charges",
       .headers = {{"Idempotency-Key", "late-capture"}},
       .body = json{{"amount", 500}, {"currency", "EUR"}, {"reference", "pay_" + id.substr(4)}}
                   .dump()});
  ASSERT_TRUE(late && late->status == 201) << (late ? late->body : late.error().ToString());
  // Two lookups of 700 ms: after one, 700 + 1000 > 1500, so an attempt sends one refund.
  PspFaults({{"list_delay_next", 2}, {"timeout_ms", 700}});
  ASSERT_TRUE(converge::failpoint::Configure("").ok());  // lets the compensation go
  json o = Await(id);
  EXPECT_EQ(o["state"], "compensated") << o.dump();
  const std::vector<std::string> steps = Steps(o);
  EXPECT_GE(std::count(steps.begin(), steps.end(), "compensation capture retry"), 1)
      << o.dump();
  EXPECT_EQ(o["refunded"], 1000);  // both charges
  EXPECT_EQ(PspKept(client_, psp_->port()), 0);
}

// The provider refuses the refund for good: the saga parks with a dead letter, the parked
// gauge and counter show it, the reservation is still held (the compensations below the
// failed one wait for the operator). Replayed once the cause is fixed, it ends compensated.
TEST_F(CheckoutE2E, ARefundRefusedForGoodParksTheSagaWithADeadLetterAndAnAlert) {
  Stock("sku-1", 1);
  ShippingFaults({{"reject_next", 1}});
  PspFaults({{"refuse_refund_next", 1}});
  const std::string id = Order("k-refund-refused");
  json o = Await(id);
  EXPECT_EQ(o["state"], "failed_to_compensate");
  EXPECT_EQ(Outcomes(o),
            (std::vector<std::string>{"action reserve done", "action capture done",
                                      "action ship failed", "compensation capture failed"}));
  EXPECT_EQ(PspKept(client_, psp_->port()), 500);  // the money is still taken: an alert
  EXPECT_EQ(Available("sku-1"), 0);
  Response letters = Send("GET", "/admin/dead-letters", {{"Authorization", kAdmin}});
  ASSERT_EQ(letters.status, 200);
  json parked = json::parse(letters.body)["dead_letters"];
  ASSERT_EQ(parked.size(), 1u);
  EXPECT_EQ(parked[0]["queue"], "saga:checkout");
  EXPECT_EQ(parked[0]["event_id"], id);
  EXPECT_NE(parked[0]["error"].get<std::string>().find("refused the refund"), std::string::npos)
      << parked[0].dump();
  // The runner counts the parking just after its transaction committed: wait for it.
  std::string metrics;
  EXPECT_TRUE(converge::testing::WaitUntil([&] {
    metrics = Send("GET", "/metrics", {}).body;
    return metrics.find("\nsagas_parked_total{type=\"checkout\"} 1\n") != std::string::npos;
  })) << "the parking is counted whichever of the process's runners parked it";
  EXPECT_NE(metrics.find("\nsagas{state=\"failed_to_compensate\"} 1\n"), std::string::npos);
  // The counter an alert watches for late calls whose saga was swept (sagas.md) is there.
  EXPECT_NE(metrics.find("\nsaga_late_calls_after_sweep_total{type=\"checkout\"} 0\n"),
            std::string::npos);
  // The operator replays it: the refund runs again with its key, then the release.
  const std::string letter = std::to_string(parked[0]["id"].get<int64_t>());
  Response replay =
      Send("POST", "/admin/dead-letters/" + letter + "/replay", {{"Authorization", kAdmin}});
  ASSERT_EQ(replay.status, 200) << replay.body;
  o = Await(id);
  EXPECT_EQ(o["state"], "compensated");
  EXPECT_EQ(Outcomes(o),
            (std::vector<std::string>{"action reserve done", "action capture done",
                                      "action ship failed", "compensation capture failed",
                                      "compensation capture done", "compensation reserve done"}));
  EXPECT_EQ(o["refunded"], 500);
  EXPECT_EQ(Available("sku-1"), 1);
  EXPECT_EQ(PspKept(client_, psp_->port()), 0);
  ExpectBalanced(*db_, 0);
}

TEST_F(CheckoutE2E, ConcurrentOrdersForTheLastUnitsNeverOversell) {
  Stock("sku-last", 5);
  ShippingFaults({{"reject_next", 2}});  // two orders that got stock fail later: refunded
  constexpr int kOrders = 24;
  std::vector<std::string> ids(kOrders);
  std::vector<std::thread> threads;
  for (int i = 0; i < kOrders; ++i) {
    threads.emplace_back([&, i] {
      Client client;
      auto r = client.Send(
          {.method = "POST",
           .url = Url("/v1/orders"),
           .headers = {{"Authorization", kAcme}, {"Idempotency-Key", "last-" + std::to_string(i)}},
           .body = OrderBody("sku-last", 1, 100 + i)});
      if (r && r->status == 202) ids[static_cast<size_t>(i)] = json::parse(r->body).value("id", "");
    });
  }
  for (auto& t : threads) t.join();
  int completed = 0, compensated = 0;
  for (const auto& id : ids) {
    ASSERT_FALSE(id.empty());
    const std::string state = Await(id)["state"];
    completed += state == "completed";
    compensated += state == "compensated";
  }
  // Five units; two refused shipments give theirs back, which later orders may take. Every
  // order settled, and units shipped plus units left make exactly five.
  EXPECT_EQ(completed + compensated, kOrders);
  EXPECT_GE(completed, 3);
  EXPECT_EQ(converge::testing::QueryInt(*db_, "SELECT count(*) FROM shipments"), completed);
  EXPECT_EQ(Available("sku-last") + completed, 5);
  ExpectBalanced(*db_, PspKept(client_, psp_->port()));
}

TEST_F(CheckoutE2E, RefusesBadRequestsAndListsSagasForOperators) {
  Stock("sku-1", 5);
  EXPECT_EQ(Send("POST", "/v1/orders", {{"Authorization", kAcme}}, OrderBody()).status, 400);
  EXPECT_EQ(Send("POST", "/v1/orders", {{"Authorization", kAcme}, {"Idempotency-Key", "b"}},
                 R"({"sku":"x"})")
                .status,
            400);
  EXPECT_EQ(Send("POST", "/v1/orders", {{"Idempotency-Key", "c"}}, OrderBody()).status, 401);
  EXPECT_EQ(Send("GET", "/v1/orders/ord_missing", {{"Authorization", kAcme}}).status, 404);
  const std::string id = Order("k-list");
  Await(id);
  // Another tenant cannot see it.
  EXPECT_EQ(Send("GET", "/v1/orders/" + id, {{"Authorization", "Bearer sk_test_globex"}}).status,
            404);
  Response list = Send("GET", "/admin/sagas?state=completed", {{"Authorization", kAdmin}});
  ASSERT_EQ(list.status, 200);
  json sagas = json::parse(list.body)["sagas"];
  ASSERT_EQ(sagas.size(), 1u);
  EXPECT_EQ(sagas[0]["saga_id"], id);
  EXPECT_EQ(Send("GET", "/admin/sagas?state=bogus", {{"Authorization", kAdmin}}).status, 400);
  EXPECT_EQ(Send("GET", "/admin/sagas", {}).status, 401);
  Response one = Send("GET", "/admin/sagas/" + id, {{"Authorization", kAdmin}});
  ASSERT_EQ(one.status, 200);
  EXPECT_EQ(json::parse(one.body)["history"].size(), 3u);
  EXPECT_EQ(Send("PUT", "/admin/inventory/sku-1", {{"Authorization", kAdmin}}, "{}").status, 400);
  Response metrics = Send("GET", "/metrics", {});
  EXPECT_NE(metrics.body.find("\nsagas{state=\"completed\"} 1"), std::string::npos)
      << metrics.body.substr(0, 300);
}

// A real `converge serve` is SIGKILLed by a failpoint at each step boundary of the
// checkout (and of its compensations, when shipping refuses); a restarted one resumes
// the saga from the database to a correct end state.
TEST(CheckoutCrash, ResumesAfterAKillAtEveryStepBoundary) {
  converge::testing::TempDir dir;
  converge::harness::FakePsp psp({.db_path = dir.File("psp.db")});
  ASSERT_TRUE(psp.Start().ok());
  const std::string config = dir.File("serve.toml");
  {
    std::ofstream c(config);
    c << "[store]\nuri = \"sqlite:" << dir.File("serve.db") << "\"\n"
      << "[auth]\nadmin_token = \"e2e-admin-token\"\n"
      << "api_keys = { \"sk_test_acme\" = \"acme\" }\n"
      << "[idempotency]\nlease_ms = 1500\n"
      << "[psp]\nurl = \"http://127.0.0.1:" << psp.port() << "\"\ntimeout_ms = 1000\n"
      << "webhook_secrets = [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]\n"
      << "[mail]\nurl = \"http://127.0.0.1:1\"\n[log]\nlevel = \"warn\"\n";
  }
  struct Case {
    const char* failpoint;
    bool ship_refused;
    const char* end;
  };
  // reserve has no call; capture calls the provider; ship is local. With shipping refused,
  // the second call is the refund.
  const Case cases[] = {
      {"saga.after_step=crash", false, "completed"},
      {"saga.before_call=crash", false, "completed"},
      {"saga.after_call_before_record=crash", false, "completed"},
      {"saga.after_step=crash@2", false, "completed"},
      {"saga.after_step=crash@3", false, "completed"},
      {"saga.after_step=crash@3", true, "compensated"},
      {"saga.before_call=crash@2", true, "compensated"},
      {"saga.after_call_before_record=crash@2", true, "compensated"},
      {"saga.after_step=crash@4", true, "compensated"},
  };
  Client client;
  int n = 0;
  for (const Case& c : cases) {
    SCOPED_TRACE(std::string(c.failpoint) + (c.ship_refused ? " (ship refused)" : ""));
    const std::string key = "crash-" + std::to_string(n++);
    converge::harness::ServeProcess serve(
        {.binary = CONVERGE_BIN_PATH, .config_path = config, .dir = dir.path(), .name = key});
    ASSERT_TRUE(serve.Start(c.failpoint).ok());
    auto admin = [&](const std::string& method, const std::string& path, const json& body) {
      auto r = client.Send({.method = method,
                            .url = serve.Url(path),
                            .headers = {{"Authorization", kAdmin}},
                            .body = body.dump()});
      ASSERT_TRUE(r && r->status == 200);
    };
    admin("PUT", "/admin/inventory/sku-c", {{"available", 1}});
    if (c.ship_refused) admin("POST", "/admin/shipping/faults", {{"reject_next", 1}});
    const std::string body = OrderBody("sku-c");
    (void)client.Send({.method = "POST",
                       .url = serve.Url("/v1/orders"),
                       .headers = {{"Authorization", kAcme}, {"Idempotency-Key", key}},
                       .body = body});
    ASSERT_TRUE(serve.KilledWithin(std::chrono::seconds(20)));
    ASSERT_TRUE(serve.Start().ok());
    // The client retries with its key: the same order, never a second one.
    auto again = client.Send({.method = "POST",
                              .url = serve.Url("/v1/orders"),
                              .headers = {{"Authorization", kAcme}, {"Idempotency-Key", key}},
                              .body = body});
    ASSERT_TRUE(again && again->status == 202) << (again ? again->body : "");
    const std::string id = json::parse(again->body)["id"];
    json o;
    ASSERT_TRUE(converge::testing::WaitUntil([&] {
      auto r = client.Send(
          {.url = serve.Url("/v1/orders/" + id), .headers = {{"Authorization", kAcme}}});
      o = r ? json::parse(r->body, nullptr, false) : json();
      return o.is_object() && Settled(o.value("state", ""));
    })) << o.dump();
    EXPECT_EQ(o["state"], c.end);
    serve.Stop();
    auto db = converge::Database::Open("sqlite:" + dir.File("serve.db"));
    ASSERT_TRUE(db);
    EXPECT_EQ(converge::testing::QueryInt(**db, "SELECT count(*) FROM orders"), n);
    // One charge per order at the provider, however often the step ran.
    Client pc;
    auto charges = pc.Send({.url = "http://127.0.0.1:" + std::to_string(psp.port()) +
                                   "/v1/charges?reference=pay_" + id.substr(4)});
    ASSERT_TRUE(charges);
    EXPECT_LE(json::parse(charges->body)["count"].get<int64_t>(), 1);
    ExpectBalanced(**db, PspKept(client, psp.port()));
  }
}

}  // namespace
}  // namespace payments
