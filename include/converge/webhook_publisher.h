// Outbound webhooks: events delivered to an HTTP endpoint, each one POST signed as
// Standard Webhooks (webhook.h), at least once.
//
//   PostSignedWebhook  one signed POST, and what its answer means for a retry
//   WebhookPublisher   a Publisher (transport.h): the relay's events, each one POST of its
//                      CloudEvents envelope (structured mode) with the event id as
//                      webhook-id, so the endpoint dedupes redeliveries on it
//
// The relay does the rest as with any broker (relay.h, docs/design/outbox-relay.md): it
// marks an event published only after a 2xx; a transient failure (no answer, 408, 425,
// 429, 5xx) stops the event's aggregate, which is tried again on the relay's next pass,
// for ever (order forbids skipping it); an event the endpoint refuses for good (another
// 4xx, 410 Gone included) is parked as a dead letter (class "refused") that
// OutboxRequeuer replays, and its aggregate goes on. A redirect (3xx, not followed) and a
// secret that cannot sign hold every aggregate instead, as transient failures: they are
// configuration errors, the same for every event. After an answer with Retry-After
// (delay-seconds, on 408, 425, 429 and 5xx) this publisher sends nothing to the endpoint
// until that time has passed: its publishes fail at once, transiently, with the answer
// that asked for it (other relay processes keep their own count). `converge relay
// --broker https://...` publishes the library's outbox through it, `converge relay
// --config` an application's outbox table (docs/design/webhooks.md, "Outbound"); the
// gateway's deliveries use PostSignedWebhook.
//
// Thread safety: PostSignedWebhook is safe from many threads when `client` is;
// WebhookPublisher is safe from many threads.
#ifndef CONVERGE_WEBHOOK_PUBLISHER_H_
#define CONVERGE_WEBHOOK_PUBLISHER_H_

#include <atomic>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "converge/clock.h"
#include "converge/event.h"
#include "converge/http.h"
#include "converge/metrics.h"
#include "converge/status.h"
#include "converge/transport.h"

namespace converge {

struct WebhookTarget {
  std::string name;    // in errors and logs
  std::string url;     // where each delivery is POSTed
  std::string secret;  // whsec_<base64>: every delivery is signed with it
  Millis timeout = std::chrono::seconds(10);
};

struct WebhookOutcome {
  Status status;        // OK on 2xx; see PostSignedWebhook
  int http_status = 0;  // 0: no answer (connection error, timeout)
  double seconds = 0;   // how long the call took
};

// POSTs `body` to `target.url` with webhook-id `id`, webhook-timestamp now and a v1
// signature of `target.secret`, plus `headers`. status: OK on 2xx; kUnavailable (with the
// endpoint's Retry-After in delay-seconds, at most a day) on no answer, 408, 425, 429 and
// 5xx; kFailedPrecondition on 410 Gone and any other answer (a retry would be refused the
// same way), but kUnavailable on a redirect (3xx, not followed: the URL is wrong, for
// every delivery alike); the signing error (kInvalidArgument) for a secret that is not
// whsec_<base64>, with nothing sent.
WebhookOutcome PostSignedWebhook(http::Client& client, const WebhookTarget& target,
                                 const std::string& id, const std::string& body,
                                 http::Headers headers);

class WebhookPublisher : public Publisher {
 public:
  // `lease`: the relay's partition lease (RelayOptions::lease). A batch is sent one POST
  // after another and the relay renews its leases only after it, so no POST starts that
  // could end past half the lease; the rest of the batch goes next pass (else a slow
  // endpoint would let the leases lapse mid-batch, and another relay would send the same
  // events again, concurrently). A `target.timeout` above a third of the lease is cut to
  // it (a batch's first POST starts whatever the time).
  // `metrics` (may be null) gets relay_target_delivery_seconds{status}. It must outlive
  // the publisher.
  WebhookPublisher(WebhookTarget target, Millis lease, Metrics* metrics = nullptr);

  // kInvalidArgument for an event without an envelope; kUnavailable without a call while
  // an earlier answer's Retry-After runs, and for a secret that cannot sign; else
  // PostSignedWebhook's status.
  Status Publish(const Event& event) override;
  // One POST after another while they fit half the lease; the rest answer kAborted
  // (kNotAttempted). A failure holds back its aggregate's later events (Publisher).
  std::vector<Status> PublishBatch(std::span<const Event> batch) override;

 private:
  WebhookTarget target_;
  const Millis budget_;
  Metrics* metrics_;
  http::Client client_;
  // Until when (steady clock, ms since its epoch) the endpoint asked not to be called, and
  // the answer that asked (guarded by mu_).
  std::atomic<int64_t> quiet_until_ms_{0};
  std::mutex mu_;
  std::string quiet_reason_;
};

}  // namespace converge

#endif  // CONVERGE_WEBHOOK_PUBLISHER_H_
