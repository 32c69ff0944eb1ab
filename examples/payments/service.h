// The payments reference service: the producer side (POST /v1/payments with
// Idempotency-Key, multi-phase around the payment provider), webhook intake, the
// consumers (ledger, email receipts through a journalled effect, staged webhook work),
// the admin API and metrics. Everything shares one Database.
//
// Thread safety: Start/Stop from one owner thread; the HTTP handlers run on the server's
// worker pool.
#ifndef CONVERGE_EXAMPLES_PAYMENTS_SERVICE_H_
#define CONVERGE_EXAMPLES_PAYMENTS_SERVICE_H_

#include <memory>

#include "converge/http.h"
#include "converge/status.h"
#include "examples/payments/config.h"

namespace payments {

class Service {
 public:
  explicit Service(ServiceConfig config);
  ~Service();

  // Opens the store, creates the service's tables, starts relay, consumers, the effect
  // runner and the HTTP server. Errors name what failed (bad config, store, port).
  converge::Status Start();
  // The bound HTTP port (after Start).
  uint16_t port() const;
  // Answers one request as the HTTP server's workers do, on the calling thread and
  // without a socket (converge::http::Server::Handle): for running a route in-process, as
  // the fuzz target payment_body does. Between Start() and Stop(); before Start(), 503.
  converge::http::Response Handle(converge::http::Request& request);
  // Graceful: stop accepting, drain in-flight requests, let workers finish their batch.
  void Stop();

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace payments

#endif  // CONVERGE_EXAMPLES_PAYMENTS_SERVICE_H_
