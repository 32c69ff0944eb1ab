// One Standard Webhooks-signed POST to an internal HTTP target, and what its answer means
// for a retry: shared by the gateway's deliveries and the outbox-table relay's HTTP target.
//
// Thread safety: SignedPost is safe from many threads when `client` is.
#ifndef CONVERGE_APPS_CONVERGE_SIGNED_DELIVERY_H_
#define CONVERGE_APPS_CONVERGE_SIGNED_DELIVERY_H_

#include <string>

#include "converge/clock.h"
#include "converge/http.h"
#include "converge/status.h"

namespace converge::cli {

struct SignedTarget {
  std::string name, url;
  std::string secret;  // whsec_...: the deliveries are signed with it
  Millis timeout = std::chrono::seconds(10);
};

struct SignedOutcome {
  Status status;        // OK on 2xx; see SignedPost
  int http_status = 0;  // 0: no answer (connection error, timeout)
  double seconds = 0;   // how long the call took
};

// POSTs `body` to `t.url` with webhook-id `id`, webhook-timestamp now and a v1 signature
// of `t.secret`, plus `headers`. status: OK on 2xx; kUnavailable (with the target's
// Retry-After) on no answer, 408, 425, 429 and 5xx; kFailedPrecondition on 410 Gone and
// any other answer (a retry would be refused the same way).
SignedOutcome SignedPost(http::Client& client, const SignedTarget& t, const std::string& id,
                         const std::string& body, http::Headers headers);

}  // namespace converge::cli

#endif  // CONVERGE_APPS_CONVERGE_SIGNED_DELIVERY_H_
