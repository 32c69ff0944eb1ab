// Standard Webhooks (standardwebhooks.com) signing and verification.
//
//   webhook-id         a unique message id (the dedupe key)
//   webhook-timestamp  integer seconds since the epoch
//   webhook-signature  space-separated "v1,<base64 HMAC-SHA256(key, id.timestamp.body)>"
//   secret             "whsec_<base64 key>"
//
// Verify accepts any of several secrets (key rotation) and any of several signatures,
// compares in constant time, and refuses timestamps outside a tolerance (replay window).
// Verification must happen before anything of the request is stored.
//
// Thread safety: pure functions.
#ifndef CONVERGE_WEBHOOK_H_
#define CONVERGE_WEBHOOK_H_

#include <chrono>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "converge/status.h"

namespace converge::webhook {

// A new random secret, "whsec_" + base64 of 32 random bytes.
std::string NewSecret();
// The key bytes of "whsec_<base64>" (the prefix is optional). kInvalidArgument if malformed.
Result<std::string> DecodeSecret(std::string_view secret);
// "v1,<base64 signature>" for the message.
Result<std::string> Sign(std::string_view secret, std::string_view id, int64_t timestamp,
                         std::string_view body);

// OK when one signature in `signature_header` matches one of `secrets`. Errors are all
// kUnauthenticated, with reason "missing_headers", "bad_timestamp", "stale_timestamp",
// "future_timestamp" or "bad_signature"; kInvalidArgument if a configured secret is
// malformed.
Status Verify(std::span<const std::string> secrets, std::string_view id,
              std::string_view timestamp, std::string_view signature_header,
              std::string_view body, int64_t now_seconds,
              std::chrono::seconds tolerance = std::chrono::minutes(5));

// Other providers' schemes, for gateways that take webhooks from them. Both compare in
// constant time, accept any of several secrets (rotation) and answer kUnauthenticated
// with reason "missing_headers", "bad_timestamp", "stale_timestamp", "future_timestamp" or
// "bad_signature".
//
// Stripe: `Stripe-Signature: t=<seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>[,v1=..]`
// with the endpoint secret ("whsec_...") itself as the HMAC key; `t` within `tolerance`.
// On success *timestamp (when given) is t.
Status VerifyStripe(std::span<const std::string> secrets, std::string_view signature_header,
                    std::string_view body, int64_t now_seconds,
                    std::chrono::seconds tolerance = std::chrono::minutes(5),
                    int64_t* timestamp = nullptr);
// GitHub: `X-Hub-Signature-256: sha256=<hex HMAC-SHA256(secret, body)>`. GitHub signs no
// timestamp: replays are caught only by deduping its delivery id (X-GitHub-Delivery).
Status VerifyGitHub(std::span<const std::string> secrets, std::string_view signature_header,
                    std::string_view body);
// Lower-case hex of HMAC-SHA256(key, message): what both schemes above sign with.
std::string HmacSha256Hex(std::string_view key, std::string_view message);

// Base64 (RFC 4648, padded) over OpenSSL's EVP encoder.
std::string Base64Encode(std::string_view bytes);
Result<std::string> Base64Decode(std::string_view text);

}  // namespace converge::webhook

#endif  // CONVERGE_WEBHOOK_H_
