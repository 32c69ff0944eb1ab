#include "converge/webhook_publisher.h"

#include <algorithm>
#include <charconv>
#include <chrono>
#include <mutex>

#include "converge/webhook.h"

namespace converge {
namespace {

using SteadyClock = std::chrono::steady_clock;

// The Retry-After of `r` in milliseconds (delay-seconds form), 0 when absent.
int64_t RetryAfterMs(const http::Response& r) {
  const std::string* v = r.Header("Retry-After");
  int64_t seconds = 0;
  if (v == nullptr) return 0;
  auto res = std::from_chars(v->data(), v->data() + v->size(), seconds);
  return res.ec == std::errc() && seconds > 0 ? std::min<int64_t>(seconds, 86400) * 1000 : 0;
}

int64_t SteadyMs() {
  return std::chrono::duration_cast<Millis>(SteadyClock::now().time_since_epoch()).count();
}

}  // namespace

WebhookOutcome PostSignedWebhook(http::Client& client, const WebhookTarget& t,
                                 const std::string& id, const std::string& body,
                                 http::Headers headers) {
  WebhookOutcome out;
  const int64_t ts = Clock::System()->NowMillis() / 1000;
  Result<std::string> signature = webhook::Sign(t.secret, id, ts, body);
  if (!signature) {
    out.status = signature.error();
    return out;
  }
  headers.emplace_back("webhook-id", id);
  headers.emplace_back("webhook-timestamp", std::to_string(ts));
  headers.emplace_back("webhook-signature", *signature);
  const auto start = SteadyClock::now();
  auto r = client.Send({.method = "POST",
                        .url = t.url,
                        .headers = std::move(headers),
                        .body = body,
                        .timeout = t.timeout});
  out.seconds = std::chrono::duration<double>(SteadyClock::now() - start).count();
  if (!r) {
    out.status = UnavailableError(t.name + ": " + r.error().message());
    return out;
  }
  const int s = out.http_status = r->status;
  if (s >= 200 && s < 300) return out;
  if (s >= 300 && s < 400) {
    // Not followed: the URL is wrong (http for https, a moved path), and every delivery
    // would be refused the same way until it is fixed. Held, not parked.
    out.status = UnavailableError(t.name + " answered " + std::to_string(s) +
                                  " (a redirect, not followed): fix the URL");
  } else if (s == 410) {
    out.status = FailedPreconditionError(t.name + " answered 410 Gone");
  } else if (s == 408 || s == 425 || s == 429 || s >= 500) {
    out.status = UnavailableError(t.name + " answered " + std::to_string(s))
                     .WithRetryAfter(RetryAfterMs(*r));
  } else {
    out.status =
        FailedPreconditionError(t.name + " refused the delivery with " + std::to_string(s));
  }
  return out;
}

WebhookPublisher::WebhookPublisher(WebhookTarget target, Millis lease, Metrics* metrics)
    : target_(std::move(target)), budget_(lease / 2), metrics_(metrics) {
  // The first POST of a batch starts whatever the budget: it must end within half the
  // lease too.
  target_.timeout = std::min(target_.timeout, lease / 3);
  if (metrics_ != nullptr) {
    metrics_->Describe("relay_target_delivery_seconds", "histogram",
                       "Time a POST to the HTTP target took, by status class.");
  }
}

Status WebhookPublisher::Publish(const Event& e) {
  if (e.envelope.empty()) return InvalidArgumentError("event " + e.id + " has no envelope");
  const int64_t quiet_ms = quiet_until_ms_.load() - SteadyMs();
  if (quiet_ms > 0) {
    std::lock_guard<std::mutex> l(mu_);
    return UnavailableError(quiet_reason_ + "; not called again for " +
                            std::to_string((quiet_ms + 999) / 1000) + " s (Retry-After)")
        .WithRetryAfter(quiet_ms);
  }
  WebhookOutcome out = PostSignedWebhook(client_, target_, e.id, e.envelope,
                                         {{"Content-Type", "application/cloudevents+json"}});
  if (out.http_status == 0 && out.status.code() == StatusCode::kInvalidArgument) {
    // The secret cannot sign: a configuration error, the same for every event. Held (the
    // relay's last error says why), not parked one by one.
    return UnavailableError(target_.name + ": cannot sign the deliveries: " +
                            out.status.message());
  }
  if (metrics_ != nullptr) {
    metrics_->Observe("relay_target_delivery_seconds",
                      {{"status", out.http_status > 0
                                      ? std::string(http::StatusClass(out.http_status))
                                      : "error"}},
                      out.seconds, {0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30});
  }
  if (out.status.retry_after_ms() > 0) {
    const int64_t until = SteadyMs() + out.status.retry_after_ms();
    {
      std::lock_guard<std::mutex> l(mu_);
      quiet_reason_ = out.status.message();
    }
    int64_t seen = quiet_until_ms_.load();
    while (seen < until && !quiet_until_ms_.compare_exchange_weak(seen, until)) {
    }
  }
  return out.status;
}

std::vector<Status> WebhookPublisher::PublishBatch(std::span<const Event> batch) {
  const auto start = SteadyClock::now();
  return PublishWhile(batch, [&] {
    return SteadyClock::now() - start + target_.timeout <= budget_;
  });
}

}  // namespace converge
