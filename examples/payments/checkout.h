// The checkout saga of the payments reference service, on the library's SagaRunner:
//
//   POST /v1/orders (Idempotency-Key)  one transaction: order row + saga row -> 202
//   saga "checkout":  reserve (inventory)  -> capture (payment provider) -> ship (shipping)
//   compensations:    release reservation <- refund at the provider     <- cancel shipment
//   GET  /v1/orders/{id}               the order, its saga state and step history
//   PUT  /admin/inventory/{sku}        set a SKU's available stock (admin token)
//   GET  /admin/inventory              every SKU's available and reserved units
//   POST /admin/shipping/faults        make the next shipments fail: {"fail_next": n}
//                                      (transient: retried), {"reject_next": n} (permanent)
//
// Inventory: `inventory.available` never goes below zero (a conditional decrement and a
// CHECK); a reservation row per order, released at most once. Money: `orders.captured`,
// `orders.refunded` and `orders.shipped` record what the saga did, so that captured ==
// (amount of shipped orders) + refunded holds once every saga has settled.
//
// Thread safety: the routes run on the server's workers, the saga on the Runtime's; the
// shipping faults are atomics.
#ifndef CONVERGE_EXAMPLES_PAYMENTS_CHECKOUT_H_
#define CONVERGE_EXAMPLES_PAYMENTS_CHECKOUT_H_

#include <atomic>
#include <functional>
#include <map>
#include <mutex>
#include <string>

#include "converge/database.h"
#include "converge/http.h"
#include "converge/idempotency.h"
#include "converge/metrics.h"
#include "converge/runtime.h"
#include "converge/saga.h"

namespace payments {

struct CheckoutOptions {
  converge::Database* db = nullptr;
  converge::Runtime* runtime = nullptr;
  converge::http::Client* client = nullptr;
  converge::Metrics* metrics = nullptr;
  converge::Clock* clock = nullptr;
  std::string psp_url;
  converge::Millis psp_timeout = std::chrono::seconds(5);
  converge::Millis lease = std::chrono::seconds(30);  // a saga runner's lease; > psp_timeout
  converge::Millis backoff_initial = std::chrono::milliseconds(200);
  converge::Millis backoff_max = std::chrono::seconds(30);
  int runners = 2;  // saga runner threads in this process
  // The tenant of a request's API key (nullptr: unknown) and the admin check.
  std::function<const std::string*(const converge::http::Request&)> tenant;
  std::function<bool(const converge::http::Request&)> is_admin;
};

class Checkout {
 public:
  explicit Checkout(CheckoutOptions options);

  // The orders, inventory, reservations and shipments tables (idempotent).
  static converge::Status CreateTables(converge::Database& db);
  // Adds the saga runners to the runtime. REQUIRES: the runtime is not started.
  void Register();
  // The routes above. REQUIRES: Register() was called.
  void Routes(converge::http::Server& server);
  // The orders' figures for /admin/stats: orders by saga state, and the money.
  converge::Result<std::string> Stats(converge::Tx& tx);

 private:
  converge::SagaDefinition Definition();
  converge::http::Server::Handler CreateOrderRoute();
  converge::http::Response GetOrder(converge::http::Request& req);
  converge::http::Response SetStock(converge::http::Request& req);
  converge::http::Response ListInventory(converge::http::Request& req);
  converge::http::Response ShippingFaults(converge::http::Request& req);

  // The steps' parts.
  converge::Status Reserve(converge::Tx& tx, converge::SagaStepContext& ctx);
  converge::Status Release(converge::Tx& tx, converge::SagaStepContext& ctx);
  converge::Result<std::string> Charge(const converge::SagaStepContext& ctx);
  converge::Status RecordCapture(converge::Tx& tx, converge::SagaStepContext& ctx,
                                 const std::string& charge_id);
  converge::Result<std::string> Refund(const converge::SagaStepContext& ctx);
  converge::Status RecordRefund(converge::Tx& tx, converge::SagaStepContext& ctx,
                                const std::string& refunded);
  converge::Status Ship(converge::Tx& tx, converge::SagaStepContext& ctx);
  converge::Status CancelShipment(converge::Tx& tx, converge::SagaStepContext& ctx);

  CheckoutOptions o_;
  converge::SagaRunner* first_runner_ = nullptr;
  std::atomic<int64_t> ship_fail_next_{0}, ship_reject_next_{0};
  // The fault each (saga, attempt) of the ship step took: a run of the step that runs
  // again (its transaction ran again, database.h) meets the same fault, not the next.
  std::mutex ship_faults_mu_;
  std::map<std::pair<std::string, int>, bool> ship_faults_;  // true: transient
};

}  // namespace payments

#endif  // CONVERGE_EXAMPLES_PAYMENTS_CHECKOUT_H_
