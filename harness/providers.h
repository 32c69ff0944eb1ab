// Stand-ins for the external systems the payments service talks to, real over HTTP, each
// with its own SQLite store and port: a payment provider (`converge fake-psp`) and a mail
// provider (`converge fake-mail`). Both honour Idempotency-Key the way real providers
// do, and can be told to fail (POST /faults) so the service's retries, timeouts and
// declines can be exercised.
//
//   fake PSP:  POST /v1/charges (Idempotency-Key)      201 charge | replay | 402 | 503 | slow
//              POST /v1/charges/{id}/refund              200, sends charge.refunded | 503 | 422
//              GET  /v1/charges?reference=R              {"count": n, "charges": [...]}
//              GET  /v1/stats                            counters
//              POST /faults {"fail_next": n, "timeout_next": n, "decline_next": n,
//                            "in_use_next": n (charge, then answer 409 "key in use"),
//                            "refuse_refund_next": n (422, kept in refused_refunds),
//                            "refund_fail_next": n (503),
//                            "list_delay_next": n (a lookup answered after timeout_ms),
//                            "transient_rate": 0.05, "timeout_ms": 3000}
//              sends Standard-Webhooks-signed charge.succeeded / charge.refunded to
//              webhook_url, with retries, honouring Retry-After, disabled by 410
//   fake mail: POST /v1/messages (Idempotency-Key)      201 | replay | 503
//              GET  /v1/messages?key=K                   {"count": n}
//              GET  /v1/stats, POST /faults {"fail_next": n, "transient_rate": p}
#ifndef CONVERGE_HARNESS_PROVIDERS_H_
#define CONVERGE_HARNESS_PROVIDERS_H_

#include <memory>
#include <string>

#include "converge/status.h"

namespace converge::harness {

struct ProviderOptions {
  std::string db_path;  // its own SQLite file
  std::string address = "127.0.0.1";
  uint16_t port = 0;
  std::string webhook_url;     // PSP only: where to send webhooks ("" = none)
  std::string webhook_secret;  // PSP only: whsec_...
};

class FakePsp {
 public:
  explicit FakePsp(ProviderOptions options);
  ~FakePsp();
  converge::Status Start();
  uint16_t port() const;
  void Stop();

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

class FakeMail {
 public:
  explicit FakeMail(ProviderOptions options);
  ~FakeMail();
  converge::Status Start();
  uint16_t port() const;
  void Stop();

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace converge::harness

#endif  // CONVERGE_HARNESS_PROVIDERS_H_
