// Fuzz target: Standard Webhooks verification (the webhook-id, webhook-timestamp and
// webhook-signature headers, the signature list, the secret) and base64.
//
// Input, one field per line: secret, webhook-id, webhook-timestamp, webhook-signature,
// then the body (the rest, newlines included).
//
// Properties:
//  - Verify of the fuzzed headers answers OK, kUnauthenticated with one of the documented
//    reasons, or kInvalidArgument only when the secret is malformed;
//  - when it answers OK, one "v1," entry of the list decodes to the HMAC-SHA256 of
//    "id.timestamp.body" (computed here independently), and another body or id fails;
//  - sign-then-verify round-trips for every valid secret, id and body: alone, appended to
//    the fuzzed signature list, next to a second (rotated) secret; one changed byte of the
//    body, the id or the signature, or a clock past the tolerance, fails it;
//  - a decoded secret re-encodes to one that decodes to the same key;
//  - base64: decode(encode(x)) == x; an accepted text has '=' only as final padding, and
//    decodes to 3/4 of its length less the padding.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "converge/webhook.h"
#include "fuzz/fuzz_support.h"
#include "src/core/crypto.h"

namespace converge::fuzz {
namespace {

constexpr int64_t kNow = 1700000000;
constexpr int64_t kTolerance = 300;
// A second, valid secret: verification under key rotation.
constexpr const char* kOtherSecret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

bool DocumentedReason(const std::string& reason) {
  return reason == "missing_headers" || reason == "bad_timestamp" || reason == "stale_timestamp" ||
         reason == "future_timestamp" || reason == "bad_signature";
}

void CheckBase64(std::string_view text, std::string_view bytes) {
  auto round = webhook::Base64Decode(webhook::Base64Encode(bytes));
  FUZZ_CHECK(round && *round == bytes, "base64 does not round-trip " + Quote(bytes));
  auto decoded = webhook::Base64Decode(text);
  if (!decoded) {
    FUZZ_CHECK(decoded.error().code() == StatusCode::kInvalidArgument, decoded.error().ToString());
    return;
  }
  const size_t first_pad = text.find('=');
  const size_t pad = first_pad == std::string_view::npos ? 0 : text.size() - first_pad;
  FUZZ_CHECK(pad <= 2 && text.find_first_not_of('=', first_pad) == std::string_view::npos,
             "base64 with '=' inside was accepted: " + Quote(text));
  FUZZ_CHECK(decoded->size() == text.size() / 4 * 3 - pad,
             "base64 " + Quote(text) + " decoded to " + std::to_string(decoded->size()) + " bytes");
  auto again = webhook::Base64Decode(webhook::Base64Encode(*decoded));
  FUZZ_CHECK(again && *again == *decoded, "re-encoding changes " + Quote(text));
}

// Verify of whatever arrived.
void CheckVerifyAsSent(const std::string& secret, std::string_view id, std::string_view ts,
                       std::string_view header, std::string_view body) {
  const std::vector<std::string> secrets = {secret};
  const Status st = webhook::Verify(secrets, id, ts, header, body, kNow);
  const bool secret_ok = webhook::DecodeSecret(secret).has_value();
  if (st.ok()) {
    FUZZ_CHECK(secret_ok, "verified under a malformed secret " + Quote(secret));
    const std::string key = *webhook::DecodeSecret(secret);
    const std::string expected = internal::HmacSha256(
        key, std::string(id) + "." + std::string(ts) + "." + std::string(body));
    bool found = false;
    std::string_view rest = header;
    while (!rest.empty()) {
      const size_t sp = rest.find(' ');
      const std::string_view entry = rest.substr(0, sp);
      rest = sp == std::string_view::npos ? std::string_view() : rest.substr(sp + 1);
      if (entry.substr(0, 3) != "v1,") continue;
      auto raw = webhook::Base64Decode(entry.substr(3));
      found = found || (raw && *raw == expected);
    }
    FUZZ_CHECK(found, "verified without a matching signature: " + Quote(header));
    FUZZ_CHECK(!webhook::Verify(secrets, id, ts, header, std::string(body) + "x", kNow).ok(),
               "the signature does not cover the body");
    FUZZ_CHECK(!webhook::Verify(secrets, std::string(id) + "x", ts, header, body, kNow).ok(),
               "the signature does not cover the id");
    return;
  }
  if (st.code() == StatusCode::kInvalidArgument) {
    FUZZ_CHECK(!secret_ok, "kInvalidArgument with a valid secret: " + st.ToString());
    return;
  }
  FUZZ_CHECK(st.code() == StatusCode::kUnauthenticated && DocumentedReason(st.reason()),
             "undocumented answer " + st.ToString() + " reason " + Quote(st.reason()));
}

// Sign, then verify what was signed.
void CheckRoundTrip(const std::string& secret, std::string_view id, std::string_view ts_field,
                    std::string_view header, std::string_view body) {
  auto key = webhook::DecodeSecret(secret);
  if (!key) return;
  auto recoded = webhook::DecodeSecret("whsec_" + webhook::Base64Encode(*key));
  FUZZ_CHECK(recoded && *recoded == *key, "secret " + Quote(secret) + " does not re-encode");
  if (id.empty()) return;

  // A timestamp inside the window, steered by the input.
  int64_t skew = 0;
  for (unsigned char c : ts_field) skew = (skew * 31 + c) % (2 * kTolerance + 1);
  const int64_t ts = kNow - kTolerance + skew;
  const std::string ts_text = std::to_string(ts);

  auto sig = webhook::Sign(secret, id, ts, body);
  FUZZ_CHECK(sig.has_value(), "cannot sign under a valid secret " + Quote(secret));
  FUZZ_CHECK(sig->size() == 47 && sig->substr(0, 3) == "v1,", "malformed signature " + *sig);
  const std::vector<std::string> one = {secret};
  const std::vector<std::string> rotated = {kOtherSecret, secret};
  auto verify = [&](const std::vector<std::string>& secrets, std::string_view i,
                    std::string_view header_value, std::string_view b, int64_t now) {
    return webhook::Verify(secrets, i, ts_text, header_value, b, now);
  };
  const Status alone = verify(one, id, *sig, body, kNow);
  FUZZ_CHECK(alone.ok(), "a fresh signature fails: " + alone.ToString());
  const std::string listed = std::string(header) + " " + *sig;
  FUZZ_CHECK(verify(one, id, listed, body, kNow).ok(), "a signature in a list fails");
  FUZZ_CHECK(verify(rotated, id, *sig, body, kNow).ok(), "rotation breaks verification");
  FUZZ_CHECK(verify(one, id, *sig, body, ts + kTolerance).ok(), "the window is short");
  FUZZ_CHECK(verify(one, id, *sig, body, ts + kTolerance + 1).reason() == "stale_timestamp",
             "a stale timestamp passes");
  FUZZ_CHECK(verify(one, id, *sig, body, ts - kTolerance - 1).reason() == "future_timestamp",
             "a future timestamp passes");

  const size_t at = body.empty() ? 0 : skew % body.size();
  std::string other_body(body);
  if (other_body.empty()) {
    other_body = "x";
  } else {
    other_body[at] = static_cast<char>(other_body[at] ^ 1);
  }
  FUZZ_CHECK(verify(one, id, *sig, other_body, kNow).reason() == "bad_signature",
             "a changed body passes");
  std::string other_id(id);
  other_id[skew % other_id.size()] ^= 1;
  FUZZ_CHECK(verify(one, other_id, *sig, body, kNow).reason() == "bad_signature",
             "a changed id passes");
  std::string other_sig = *sig;
  char& c = other_sig[3 + static_cast<size_t>(skew) % 42];  // the 42 unpadded base64 digits
  c = c == 'A' ? 'B' : 'A';
  FUZZ_CHECK(verify(one, id, other_sig, body, kNow).reason() == "bad_signature",
             "a changed signature passes");
}

}  // namespace
}  // namespace converge::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace converge::fuzz;
  const auto f = SplitFields(AsText(data, size), 5);
  const std::string secret(f[0]);
  for (std::string_view rest = f[3]; !rest.empty();) {
    const size_t sp = rest.find(' ');
    const std::string_view entry = rest.substr(0, sp);
    rest = sp == std::string_view::npos ? std::string_view() : rest.substr(sp + 1);
    CheckBase64(entry.substr(0, 3) == "v1," ? entry.substr(3) : entry, f[4]);
  }
  CheckBase64(f[0].substr(0, 6) == "whsec_" ? f[0].substr(6) : f[0], f[1]);
  CheckVerifyAsSent(secret, f[1], f[2], f[3], f[4]);
  CheckRoundTrip(secret, f[1], f[2], f[3], f[4]);
  return 0;
}
