// orders-lite, the minimal second service example, over real sockets: the reusable
// middleware and Runtime give it the whole Idempotency-Key protocol and a consumer that
// applies each event once.
#include <ctime>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "converge/http.h"
#include "converge/webhook.h"
#include "examples/orders-lite/orders.h"
#include "tests/e2e/support.h"
#include "tests/unit/test_util.h"

namespace orders_lite {
namespace {

using converge::http::Client;
using converge::http::Response;
using json = nlohmann::json;

// A store for the service: SQLite, or (under scripts/with-postgres.sh) a PostgreSQL
// database of its own.
class OrdersLiteStore : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (GetParam() == "sqlite") {
      uri_ = "sqlite:" + dir_.File("orders.db");
      return;
    }
    if (!converge::testing::ScratchPgDatabase::Available()) {
      GTEST_SKIP() << "needs CONVERGE_TEST_PG_DSN (scripts/with-postgres.sh)";
    }
    pg_ = std::make_unique<converge::testing::ScratchPgDatabase>("converge_ol_");
    ASSERT_TRUE(pg_->ok()) << pg_->error();
    uri_ = pg_->uri();
  }
  void TearDown() override { pg_.reset(); }

  converge::testing::TempDir dir_;
  std::unique_ptr<converge::testing::ScratchPgDatabase> pg_;
  std::string uri_;
};

class OrdersLite : public OrdersLiteStore {
 protected:
  void SetUp() override {
    OrdersLiteStore::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    service_ = std::make_unique<OrdersService>(
        Options{.db = uri_,
                .api_keys = {{"sk_ann", "ann"}, {"sk_bob", "bob"}},
                .warehouse_secret = secret_});
    converge::Status st = service_->Start();
    ASSERT_TRUE(st.ok()) << st.ToString();
  }
  void TearDown() override {
    service_.reset();
    db_.reset();
    OrdersLiteStore::TearDown();
  }
  Response Order(const std::string& key, const std::string& body,
                 const std::string& api_key = "sk_ann") {
    auto r = client_.Send({.method = "POST",
                           .url = "http://127.0.0.1:" + std::to_string(service_->port()) +
                                  "/v1/orders",
                           .headers = {{"Authorization", "Bearer " + api_key},
                                       {"Idempotency-Key", key}},
                           .body = body});
    EXPECT_TRUE(r) << r.error().ToString();
    return r ? *r : Response{};
  }
  // A restock webhook from the warehouse, signed with `secret` at `timestamp`.
  Response Restock(const std::string& id, const std::string& body,
                   const std::string& secret, int64_t timestamp = std::time(nullptr)) {
    auto signature = converge::webhook::Sign(secret, id, timestamp, body);
    EXPECT_TRUE(signature);
    auto r = client_.Send({.method = "POST",
                           .url = "http://127.0.0.1:" + std::to_string(service_->port()) +
                                  "/webhooks/warehouse",
                           .headers = {{"webhook-id", id},
                                       {"webhook-timestamp", std::to_string(timestamp)},
                                       {"webhook-signature", signature ? *signature : ""}},
                           .body = body});
    EXPECT_TRUE(r) << r.error().ToString();
    return r ? *r : Response{};
  }
  int64_t Sum(const std::string& column, const std::string& table, const std::string& sku) {
    if (db_ == nullptr) {  // one connection for every poll, not one each
      auto db = converge::Database::Open(uri_);
      if (!db) return -1;
      db_ = std::move(*db);
    }
    return converge::testing::QueryInt(*db_, "SELECT coalesce(sum(" + column + "), 0) FROM " +
                                                 table + " WHERE sku = '" + sku + "'");
  }
  int64_t Reserved(const std::string& sku) { return Sum("reserved", "stock_reservations", sku); }

  const std::string secret_ = converge::webhook::NewSecret();
  std::unique_ptr<OrdersService> service_;
  std::unique_ptr<converge::Database> db_;  // the test's own, opened by Sum()
  Client client_;
};

TEST_P(OrdersLite, AnIdempotentOrderIsPlacedOnceAndReservedOnce) {
  Response first = Order("o-1", R"({"sku":"lamp","quantity":2})");
  ASSERT_EQ(first.status, 201) << first.body;
  Response again = Order("o-1", R"({ "quantity": 2, "sku": "lamp" })");  // same meaning
  EXPECT_EQ(again.status, 201);
  EXPECT_EQ(again.body, first.body);
  ASSERT_NE(again.Header("Idempotent-Replayed"), nullptr);
  Response other = Order("o-1", R"({"sku":"lamp","quantity":3})");
  EXPECT_EQ(other.status, 422);
  Response bob = Order("o-1", R"({"sku":"lamp","quantity":2})", "sk_bob");  // another scope
  EXPECT_EQ(bob.status, 201);
  EXPECT_EQ(bob.Header("Idempotent-Replayed"), nullptr);
  EXPECT_TRUE(converge::testing::WaitUntil([&] { return Reserved("lamp") == 4; }));
  EXPECT_EQ(Order("o-2", R"({"sku":"lamp"})").status, 400);
  EXPECT_EQ(Order("o-3", R"({"sku":"lamp","quantity":1})", "sk_nobody").status, 401);
  const std::string id = json::parse(first.body)["id"];  // a UUIDv7, drawn before the commit
  EXPECT_EQ(id.size(), size_t{36});
  EXPECT_NE(id, json::parse(bob.body)["id"]);
  auto get = client_.Send({.url = "http://127.0.0.1:" + std::to_string(service_->port()) +
                                  "/v1/orders/" + id,
                           .headers = {{"Authorization", "Bearer sk_ann"}}});
  ASSERT_TRUE(get);
  EXPECT_EQ(get->status, 200);
  EXPECT_EQ(json::parse(get->body)["id"], id);
  EXPECT_EQ(json::parse(get->body)["sku"], "lamp");
  service_->Stop();
  EXPECT_EQ(Reserved("lamp"), 4);  // two orders of 2, each reserved once
}

// The warehouse's restock webhooks go through the library's Standard Webhooks intake:
// verified before anything is stored, counted once per webhook-id however often the
// warehouse redelivers, and a bad signature, a stale timestamp or an unusable body stores
// nothing.
TEST_P(OrdersLite, ARestockWebhookIsVerifiedAndCountedOncePerDelivery) {
  const std::string body = R"({"sku":"lamp","quantity":5})";
  EXPECT_EQ(Restock("wh-1", body, secret_).status, 204);
  EXPECT_EQ(Restock("wh-1", body, secret_).status, 204);  // a redelivery
  EXPECT_EQ(Sum("received", "restocks", "lamp"), 5);
  EXPECT_EQ(Restock("wh-2", body, converge::webhook::NewSecret()).status, 401);
  EXPECT_EQ(Restock("wh-3", body, secret_, std::time(nullptr) - 3600).status, 401);
  EXPECT_EQ(Restock("wh-4", R"({"sku":"lamp"})", secret_).status, 400);
  EXPECT_EQ(Sum("received", "restocks", "lamp"), 5);
  EXPECT_EQ(Restock("wh-5", body, secret_).status, 204);
  EXPECT_EQ(Sum("received", "restocks", "lamp"), 10);
}

// Session 9 review: the order's id is drawn in prepare, before the key's transaction, so racing
// first requests with one key each draw their own id. Exactly one order is written and
// reserved; every 201 names that order (a loser replays it) and nothing else is a 2xx.
TEST_P(OrdersLite, RacingFirstRequestsOfOneKeyPlaceOneOrder) {
  constexpr int kRacers = 8;
  std::vector<Response> answers(kRacers);
  std::vector<std::thread> racers;
  for (int i = 0; i < kRacers; ++i) {
    racers.emplace_back([&, i] {
      Client own;
      auto r = own.Send({.method = "POST",
                         .url = "http://127.0.0.1:" + std::to_string(service_->port()) +
                                "/v1/orders",
                         .headers = {{"Authorization", "Bearer sk_ann"},
                                     {"Idempotency-Key", "race-1"}},
                         .body = R"({"sku":"desk","quantity":3})"});
      if (r) answers[i] = *r;
    });
  }
  for (std::thread& t : racers) t.join();
  std::set<std::string> bodies;
  for (const Response& a : answers) {
    EXPECT_TRUE(a.status == 201 || a.status == 409) << a.status << " " << a.body;
    if (a.status == 201) bodies.insert(a.body);
  }
  EXPECT_EQ(bodies.size(), size_t{1});
  EXPECT_TRUE(converge::testing::WaitUntil([&] { return Reserved("desk") == 3; }));
  service_->Stop();
  EXPECT_EQ(Sum("quantity", "orders", "desk"), 3);  // one order
  EXPECT_EQ(Reserved("desk"), 3);                   // reserved once
}

// Order ids became UUIDv7 text, drawn before the transaction: a store an earlier version
// made (integer ids) is refused at start with what to do, not failed at each order.
TEST_P(OrdersLiteStore, AStoreWithIntegerOrderIdsIsRefusedAtStart) {
  {
    auto db = converge::Database::Open(uri_);
    ASSERT_TRUE(db.has_value()) << db.error().ToString();
    ASSERT_TRUE((*db)->Transact([](converge::Tx& tx) {
                       return converge::StatusOf(tx.Exec(
                           "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer TEXT NOT NULL, "
                           "sku TEXT NOT NULL, quantity INTEGER NOT NULL)"));
                     })
                    .ok());
  }
  OrdersService service(Options{.db = uri_, .api_keys = {{"sk_ann", "ann"}}});
  converge::Status st = service.Start();
  EXPECT_EQ(st.code(), converge::StatusCode::kFailedPrecondition) << st.ToString();
  EXPECT_NE(st.message().find("use a new store"), std::string::npos) << st.ToString();
}

INSTANTIATE_TEST_SUITE_P(Stores, OrdersLite, ::testing::Values("sqlite", "postgres"),
                         [](const auto& info) { return info.param; });
INSTANTIATE_TEST_SUITE_P(Stores, OrdersLiteStore, ::testing::Values("sqlite", "postgres"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace orders_lite
