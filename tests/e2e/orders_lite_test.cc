// orders-lite, the minimal second service example, over real sockets: the reusable
// middleware and Runtime give it the whole Idempotency-Key protocol and a consumer that
// applies each event once.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "converge/http.h"
#include "examples/orders-lite/orders.h"
#include "tests/unit/test_util.h"

namespace orders_lite {
namespace {

using converge::http::Client;
using converge::http::Response;
using json = nlohmann::json;

class OrdersLite : public ::testing::Test {
 protected:
  void SetUp() override {
    service_ = std::make_unique<OrdersService>(
        Options{.db = "sqlite:" + dir_.File("orders.db"),
                .api_keys = {{"sk_ann", "ann"}, {"sk_bob", "bob"}}});
    ASSERT_TRUE(service_->Start().ok());
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
  int64_t Reserved(const std::string& sku) {
    auto db = converge::Database::Open("sqlite:" + dir_.File("orders.db"));
    return db ? converge::testing::QueryInt(
                    **db, "SELECT coalesce(sum(reserved), 0) FROM stock_reservations "
                          "WHERE sku = '" + sku + "'")
              : -1;
  }

  converge::testing::TempDir dir_;
  std::unique_ptr<OrdersService> service_;
  Client client_;
};

TEST_F(OrdersLite, AnIdempotentOrderIsPlacedOnceAndReservedOnce) {
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
  const int64_t id = json::parse(first.body)["id"];
  auto get = client_.Send({.url = "http://127.0.0.1:" + std::to_string(service_->port()) +
                                  "/v1/orders/" + std::to_string(id),
                           .headers = {{"Authorization", "Bearer sk_ann"}}});
  ASSERT_TRUE(get);
  EXPECT_EQ(get->status, 200);
  EXPECT_EQ(json::parse(get->body)["sku"], "lamp");
  service_->Stop();
  EXPECT_EQ(Reserved("lamp"), 4);  // two orders of 2, each reserved once
}

}  // namespace
}  // namespace orders_lite
