// orders-lite: a minimal service on converge's reusable machinery: it keeps only its
// domain. One idempotent single-phase route (POST /v1/orders: an order row and its event,
// stored with the Idempotency-Key in one transaction), one read route, one consumer
// (`stock` reserves the quantity once per event) and one webhook intake (restocks, counted
// once per delivery), on the middleware, the intake and a Runtime from the library.
//
// Thread safety: Start/Stop from one owner thread; handlers run on the server's workers
// (the create's on its I/O threads, answered from the store's writer: async_create).
#ifndef CONVERGE_EXAMPLES_ORDERS_LITE_ORDERS_H_
#define CONVERGE_EXAMPLES_ORDERS_LITE_ORDERS_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "converge/idempotency.h"
#include "converge/status.h"

namespace orders_lite {

struct Options {
  std::string db = "sqlite:orders.db";
  std::string address = "127.0.0.1";
  uint16_t port = 0;  // 0: any free port
  int worker_threads = 16;  // handlers at once (on SQLite: the largest group commit)
  int io_threads = 1;       // the server's I/O threads (with async_create, the creates')
  std::map<std::string, std::string> api_keys;  // bearer key -> customer (the key scope)
  std::string warehouse_secret;  // whsec_...: signs the warehouse's restock webhooks
  // false: neither the relay nor the stock consumer runs in this process, and orders'
  // events stay in the outbox (bench/http_bench.sh measures the route alone with it).
  bool relay_and_consumer = true;
  converge::IdempotencyOptions keys;  // the create route's keys (TTL, lease, ...)
  // true: POST /v1/orders is answered from its commit (http::SinglePhaseAsyncRoute), and
  // no handler thread waits for it; false: a worker waits (SinglePhaseRoute).
  bool async_create = true;
};

class OrdersService {
 public:
  explicit OrdersService(Options options);
  ~OrdersService();
  converge::Status Start();
  uint16_t port() const;
  void Stop();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace orders_lite

#endif  // CONVERGE_EXAMPLES_ORDERS_LITE_ORDERS_H_
