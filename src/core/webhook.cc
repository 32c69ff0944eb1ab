#include "converge/webhook.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include <cctype>
#include <charconv>
#include <vector>

namespace converge::webhook {
namespace {

constexpr std::string_view kPrefix = "whsec_";

Status Unauthenticated(std::string message, std::string reason) {
  return Status(StatusCode::kUnauthenticated, std::move(message), std::move(reason));
}

std::string Hmac(std::string_view key, std::string_view id, std::string_view ts,
                 std::string_view body) {
  std::string msg;
  msg.reserve(id.size() + ts.size() + body.size() + 2);
  msg.append(id).append(".").append(ts).append(".").append(body);
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()),
       reinterpret_cast<const unsigned char*>(msg.data()), msg.size(), md, &len);
  return std::string(reinterpret_cast<char*>(md), len);
}

}  // namespace

std::string Base64Encode(std::string_view bytes) {
  std::string out(4 * ((bytes.size() + 2) / 3), '\0');
  int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                          reinterpret_cast<const unsigned char*>(bytes.data()),
                          static_cast<int>(bytes.size()));
  out.resize(static_cast<size_t>(n));
  return out;
}

Result<std::string> Base64Decode(std::string_view text) {
  if (text.size() % 4 != 0) {
    return tl::unexpected(InvalidArgumentError("base64 length is not a multiple of 4"));
  }
  for (size_t i = 0; i < text.size(); ++i) {
    char c = text[i];
    // '=' only as padding: the last character, or the last two. OpenSSL decodes an '='
    // anywhere as zero bits, so "AB=C" would otherwise pass as two made-up bytes.
    const bool padding =
        c == '=' && (i + 1 == text.size() || (i + 2 == text.size() && text.back() == '='));
    bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '+' || c == '/' || padding;
    if (!ok) return tl::unexpected(InvalidArgumentError("invalid base64 character"));
  }
  std::string out(3 * text.size() / 4, '\0');
  int n = EVP_DecodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                          reinterpret_cast<const unsigned char*>(text.data()),
                          static_cast<int>(text.size()));
  if (n < 0) return tl::unexpected(InvalidArgumentError("invalid base64"));
  size_t pad = 0;
  if (!text.empty() && text.back() == '=') ++pad;
  if (text.size() > 1 && text[text.size() - 2] == '=') ++pad;
  out.resize(static_cast<size_t>(n) - pad);
  return out;
}

std::string NewSecret() {
  unsigned char key[32];
  RAND_bytes(key, sizeof key);
  return std::string(kPrefix) +
         Base64Encode(std::string_view(reinterpret_cast<char*>(key), sizeof key));
}

Result<std::string> DecodeSecret(std::string_view secret) {
  if (secret.substr(0, kPrefix.size()) == kPrefix) secret.remove_prefix(kPrefix.size());
  auto key = Base64Decode(secret);
  if (!key || key->empty()) {
    return tl::unexpected(InvalidArgumentError("webhook secret is not whsec_<base64>"));
  }
  return key;
}

Result<std::string> Sign(std::string_view secret, std::string_view id, int64_t timestamp,
                         std::string_view body) {
  CONVERGE_ASSIGN_OR_RETURN(std::string key, DecodeSecret(secret));
  return "v1," + Base64Encode(Hmac(key, id, std::to_string(timestamp), body));
}

Status Verify(std::span<const std::string> secrets, std::string_view id,
              std::string_view timestamp, std::string_view signature_header,
              std::string_view body, int64_t now_seconds, std::chrono::seconds tolerance) {
  if (id.empty() || timestamp.empty() || signature_header.empty()) {
    return Unauthenticated("webhook-id, webhook-timestamp and webhook-signature are required",
                           "missing_headers");
  }
  int64_t ts = 0;
  auto r = std::from_chars(timestamp.data(), timestamp.data() + timestamp.size(), ts);
  if (r.ec != std::errc() || r.ptr != timestamp.data() + timestamp.size()) {
    return Unauthenticated("webhook-timestamp is not an integer", "bad_timestamp");
  }
  if (ts < now_seconds - tolerance.count()) {
    return Unauthenticated("webhook-timestamp is too old", "stale_timestamp");
  }
  if (ts > now_seconds + tolerance.count()) {
    return Unauthenticated("webhook-timestamp is in the future", "future_timestamp");
  }
  std::vector<std::string> keys;
  for (const std::string& s : secrets) {
    CONVERGE_ASSIGN_OR_RETURN(std::string k, DecodeSecret(s));
    keys.push_back(std::move(k));
  }
  std::vector<std::string> expected;
  for (const std::string& k : keys) expected.push_back(Hmac(k, id, timestamp, body));

  bool matched = false;
  std::string_view rest = signature_header;
  while (!rest.empty()) {
    size_t sp = rest.find(' ');
    std::string_view sig = rest.substr(0, sp);
    rest = sp == std::string_view::npos ? std::string_view() : rest.substr(sp + 1);
    if (sig.substr(0, 3) != "v1,") continue;  // other schemes are not ours to judge
    auto raw = Base64Decode(sig.substr(3));
    if (!raw) continue;
    for (const std::string& e : expected) {
      // Constant time over the signature bytes; lengths are public (SHA-256: 32).
      if (raw->size() == e.size() && CRYPTO_memcmp(raw->data(), e.data(), e.size()) == 0) {
        matched = true;
      }
    }
  }
  if (!matched) return Unauthenticated("no webhook signature matches", "bad_signature");
  return OkStatus();
}

std::string HmacSha256Hex(std::string_view key, std::string_view message) {
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()),
       reinterpret_cast<const unsigned char*>(message.data()), message.size(), mac, &len);
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  for (unsigned int i = 0; i < len; ++i) {
    out.push_back(kHex[mac[i] >> 4]);
    out.push_back(kHex[mac[i] & 0xf]);
  }
  return out;
}

namespace {

// Whether `given` (hex, any case) is one of `expected` (lower-case hex), in constant time
// over the signature's bytes.
bool HexMatches(std::string_view given, const std::vector<std::string>& expected) {
  std::string lower(given);
  for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  bool matched = false;
  for (const std::string& e : expected) {
    if (lower.size() == e.size() && CRYPTO_memcmp(lower.data(), e.data(), e.size()) == 0) {
      matched = true;
    }
  }
  return matched;
}

}  // namespace

Status VerifyStripe(std::span<const std::string> secrets, std::string_view signature_header,
                    std::string_view body, int64_t now_seconds, std::chrono::seconds tolerance,
                    int64_t* timestamp) {
  if (signature_header.empty()) {
    return Unauthenticated("Stripe-Signature is required", "missing_headers");
  }
  std::string_view t;
  std::vector<std::string_view> v1;
  for (std::string_view rest = signature_header; !rest.empty();) {
    const size_t comma = rest.find(',');
    std::string_view item = rest.substr(0, comma);
    rest = comma == std::string_view::npos ? std::string_view() : rest.substr(comma + 1);
    if (item.substr(0, 2) == "t=") t = item.substr(2);
    if (item.substr(0, 3) == "v1=") v1.push_back(item.substr(3));
  }
  int64_t ts = 0;
  auto r = std::from_chars(t.data(), t.data() + t.size(), ts);
  if (t.empty() || r.ec != std::errc() || r.ptr != t.data() + t.size()) {
    return Unauthenticated("Stripe-Signature has no integer t=", "bad_timestamp");
  }
  if (ts < now_seconds - tolerance.count()) {
    return Unauthenticated("Stripe-Signature t= is too old", "stale_timestamp");
  }
  if (ts > now_seconds + tolerance.count()) {
    return Unauthenticated("Stripe-Signature t= is in the future", "future_timestamp");
  }
  std::vector<std::string> expected;
  const std::string signed_payload = std::string(t) + "." + std::string(body);
  for (const std::string& secret : secrets) {
    expected.push_back(HmacSha256Hex(secret, signed_payload));
  }
  bool matched = false;
  for (std::string_view sig : v1) matched = HexMatches(sig, expected) || matched;
  if (!matched) return Unauthenticated("no Stripe v1 signature matches", "bad_signature");
  if (timestamp != nullptr) *timestamp = ts;
  return OkStatus();
}

Status VerifyGitHub(std::span<const std::string> secrets, std::string_view signature_header,
                    std::string_view body) {
  if (signature_header.empty()) {
    return Unauthenticated("X-Hub-Signature-256 is required", "missing_headers");
  }
  if (signature_header.substr(0, 7) != "sha256=") {
    return Unauthenticated("X-Hub-Signature-256 is not sha256=<hex>", "bad_signature");
  }
  std::vector<std::string> expected;
  for (const std::string& secret : secrets) expected.push_back(HmacSha256Hex(secret, body));
  if (!HexMatches(signature_header.substr(7), expected)) {
    return Unauthenticated("the GitHub signature does not match", "bad_signature");
  }
  return OkStatus();
}

}  // namespace converge::webhook
