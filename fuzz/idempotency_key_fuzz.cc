// Fuzz target: the Idempotency-Key header (ParseIdempotencyKey), bare and as an RFC 8941
// structured-field string. The whole input is the header's value.
//
// Properties:
//  - an accepted key is 1-255 printable ASCII characters;
//  - a bare value (not starting with '"') is accepted exactly when it is 1-255 printable
//    ASCII characters, and the key is the value unchanged;
//  - every accepted key, written back as an sf-string, parses to the same key; written
//    bare (when it does not start with '"'), too;
//  - the header name is case-insensitive; a second copy is an error; no header is no key;
//  - every rejection is kInvalidArgument.
#include <cstdint>
#include <string>
#include <string_view>

#include "converge/http.h"
#include "converge/http_idempotency.h"
#include "fuzz/fuzz_support.h"

namespace converge::fuzz {
namespace {

using http::Request;

bool Printable(unsigned char c) { return c >= 0x20 && c < 0x7f; }

Result<std::optional<std::string>> Parse(std::string_view value,
                                         std::string_view name = "Idempotency-Key") {
  Request r;
  r.headers = {{"Content-Type", "application/json"}, {std::string(name), std::string(value)}};
  return http::ParseIdempotencyKey(r);
}

// RFC 8941 §4.1.6: an sf-string escapes '"' and '\' and nothing else.
std::string AsSfString(std::string_view key) {
  std::string out = "\"";
  for (char c : key) {
    if (c == '"' || c == '\\') out.push_back('\\');
    out.push_back(c);
  }
  return out + "\"";
}

void CheckKey(std::string_view value) {
  auto parsed = Parse(value);
  if (!parsed) {
    FUZZ_CHECK(parsed.error().code() == StatusCode::kInvalidArgument,
               parsed.error().ToString() + " for " + Quote(value));
  } else {
    FUZZ_CHECK(parsed->has_value(), "a present header parsed as absent: " + Quote(value));
  }

  bool bare_ok = !value.empty() && value.size() <= 255;
  for (unsigned char c : value) bare_ok = bare_ok && Printable(c);
  if (value.empty() || value.front() != '"') {
    FUZZ_CHECK(parsed.has_value() == bare_ok,
               "bare value " + Quote(value) + " was " + (parsed ? "accepted" : "rejected"));
    if (parsed) FUZZ_CHECK(**parsed == value, "bare key changed: " + Quote(**parsed));
  }
  if (!parsed) return;

  const std::string& key = **parsed;
  FUZZ_CHECK(!key.empty() && key.size() <= 255, "key length " + std::to_string(key.size()));
  for (unsigned char c : key) FUZZ_CHECK(Printable(c), "unprintable key " + Quote(key));

  auto again = Parse(AsSfString(key));
  FUZZ_CHECK(again && *again && **again == key,
             "sf-string " + Quote(AsSfString(key)) + " does not give back " + Quote(key));
  if (key.front() != '"') {
    auto bare = Parse(key);
    FUZZ_CHECK(bare && *bare && **bare == key, "bare " + Quote(key) + " does not round-trip");
  }
  auto lower = Parse(value, "idempotency-key");
  FUZZ_CHECK(lower && *lower && **lower == key, "header name case matters for " + Quote(value));

  Request twice;
  twice.headers = {{"Idempotency-Key", std::string(value)},
                   {"IDEMPOTENCY-KEY", std::string(value)}};
  auto dup = http::ParseIdempotencyKey(twice);
  FUZZ_CHECK(!dup && dup.error().code() == StatusCode::kInvalidArgument,
             "a repeated header was accepted: " + Quote(value));
}

}  // namespace
}  // namespace converge::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace converge;
  static const bool absent_is_no_key = [] {
    http::Request r;
    r.headers = {{"Idempotency-Keys", "k"}, {"Idempotency-Ke", "k"}};
    auto parsed = http::ParseIdempotencyKey(r);
    return parsed && !parsed->has_value();
  }();
  FUZZ_CHECK(absent_is_no_key, std::string("a near-miss header name was taken for the key"));
  fuzz::CheckKey(fuzz::AsText(data, size));
  return 0;
}
