#include "apps/converge/signed_delivery.h"

#include <algorithm>
#include <charconv>

#include "converge/webhook.h"

namespace converge::cli {
namespace {

// The Retry-After of `r` in milliseconds (delay-seconds form), 0 when absent.
int64_t RetryAfterMs(const http::Response& r) {
  const std::string* v = r.Header("Retry-After");
  int64_t seconds = 0;
  if (v == nullptr) return 0;
  auto res = std::from_chars(v->data(), v->data() + v->size(), seconds);
  return res.ec == std::errc() && seconds > 0 ? std::min<int64_t>(seconds, 86400) * 1000 : 0;
}

}  // namespace

SignedOutcome SignedPost(http::Client& client, const SignedTarget& t, const std::string& id,
                         const std::string& body, http::Headers headers) {
  SignedOutcome out;
  const int64_t ts = Clock::System()->NowMillis() / 1000;
  Result<std::string> signature = webhook::Sign(t.secret, id, ts, body);
  if (!signature) {
    out.status = signature.error();
    return out;
  }
  headers.emplace_back("webhook-id", id);
  headers.emplace_back("webhook-timestamp", std::to_string(ts));
  headers.emplace_back("webhook-signature", *signature);
  const auto start = std::chrono::steady_clock::now();
  auto r = client.Send({.method = "POST",
                        .url = t.url,
                        .headers = std::move(headers),
                        .body = body,
                        .timeout = t.timeout});
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (!r) {
    out.status = UnavailableError(t.name + ": " + r.error().message());
    return out;
  }
  const int s = out.http_status = r->status;
  if (s >= 200 && s < 300) return out;
  if (s == 410) {
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

}  // namespace converge::cli
