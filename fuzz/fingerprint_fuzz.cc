// Fuzz target: RequestFingerprint's body canonicalisation (a SAX parse of an untrusted
// request body). The whole input is the body; when it holds a blank line, the parts
// before and after it are also compared as two bodies.
//
// Properties:
//  - the fingerprint is 64 lower-case hex digits, and the same for the same request;
//  - a body nlohmann's DOM parser rejects is hashed as raw bytes (its fingerprint is the
//    SHA-256 of the raw-tagged material), and one it accepts never is: the SAX path that
//    canonicalises and the DOM path the handlers use agree on what is JSON;
//  - whitespace around a JSON body does not change its fingerprint;
//  - for JSON without fractions, exponents or integers past 64 bits, the fingerprint is
//    that of the DOM's compact and indented dumps (key order and whitespace do not
//    matter), and two such bodies share a fingerprint exactly when their DOMs are equal;
//  - method and path are separate fields: another path or method, another fingerprint.
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "converge/idempotency.h"
#include "fuzz/fuzz_support.h"
#include "src/core/crypto.h"

namespace converge::fuzz {
namespace {

using json = nlohmann::json;

constexpr std::string_view kMethod = "POST";
constexpr std::string_view kPath = "/v1/payments";
// json::dump() recurses once per level; deeper documents are left to the properties that
// do not dump them.
constexpr size_t kMaxDumpDepth = 200;

std::string Fingerprint(std::string_view body) { return RequestFingerprint(kMethod, kPath, body); }

// Whether `j` holds a number_float (a fraction, an exponent or an integer past 64 bits),
// whose canonical form is its source text rather than what dump() writes; and its depth.
// Iterative: the input controls the nesting.
std::pair<bool, size_t> FloatsAndDepth(const json& j) {
  bool floats = false;
  size_t depth = 0;
  std::vector<std::pair<const json*, size_t>> stack = {{&j, 1}};
  while (!stack.empty()) {
    auto [v, d] = stack.back();
    stack.pop_back();
    depth = std::max(depth, d);
    if (v->is_number_float()) floats = true;
    if (v->is_structured()) {
      for (const json& child : *v) stack.push_back({&child, d + 1});
    }
  }
  return {floats, depth};
}

void CheckBody(std::string_view body) {
  const std::string fp = Fingerprint(body);
  FUZZ_CHECK(fp.size() == 64 && fp.find_first_not_of("0123456789abcdef") == std::string::npos,
             "malformed fingerprint " + Quote(fp));
  FUZZ_CHECK(Fingerprint(body) == fp, "two fingerprints for " + Quote(body));
  FUZZ_CHECK(RequestFingerprint(kMethod, "/v1/payments/x", body) != fp,
             "the path does not count for " + Quote(body));
  FUZZ_CHECK(RequestFingerprint("PUT", kPath, body) != fp,
             "the method does not count for " + Quote(body));

  const json j = json::parse(body, nullptr, /*allow_exceptions=*/false);
  const std::string raw = std::string(kMethod) + "\n" + std::string(kPath) + "\n" +
                          std::string("\0raw\0", 5) + std::string(body);
  const bool raw_hashed = fp == internal::Sha256Hex(raw);
  FUZZ_CHECK(raw_hashed == j.is_discarded(),
             std::string(j.is_discarded() ? "a body the DOM rejects was canonicalised: "
                                          : "a JSON body was hashed raw: ") +
                 Quote(body));
  if (j.is_discarded()) return;

  // After a UTF-8 byte order mark, which the parser skips only at the very start.
  constexpr std::string_view kBom = "\xEF\xBB\xBF";
  const size_t bom = body.substr(0, 3) == kBom ? 3 : 0;
  const std::string spaced =
      std::string(body.substr(0, bom)) + " \n\t" + std::string(body.substr(bom)) + "\r\n ";
  FUZZ_CHECK(Fingerprint(spaced) == fp, "surrounding whitespace counts for " + Quote(body));

  const auto [floats, depth] = FloatsAndDepth(j);
  if (floats || depth > kMaxDumpDepth) return;
  FUZZ_CHECK(Fingerprint(j.dump()) == fp,
             "the compact dump " + Quote(j.dump()) + " differs from " + Quote(body));
  FUZZ_CHECK(Fingerprint(j.dump(2)) == fp, "the indented dump differs from " + Quote(body));
}

// Two bodies without floats: equal fingerprints exactly when equal documents. Equality is
// that of the dumps (sorted keys, exact integers), not json::operator==, which calls
// 18446744073709551615 and -1 equal.
void CheckPair(std::string_view a, std::string_view b) {
  const json ja = json::parse(a, nullptr, false);
  const json jb = json::parse(b, nullptr, false);
  if (ja.is_discarded() || jb.is_discarded()) return;
  const auto [floats_a, depth_a] = FloatsAndDepth(ja);
  const auto [floats_b, depth_b] = FloatsAndDepth(jb);
  if (floats_a || floats_b || depth_a > kMaxDumpDepth || depth_b > kMaxDumpDepth) return;
  const bool same_fp = Fingerprint(a) == Fingerprint(b);
  FUZZ_CHECK(same_fp == (ja.dump() == jb.dump()),
             std::string(same_fp ? "different documents share" : "equal documents differ in") +
                 " a fingerprint: " + Quote(a) + " and " + Quote(b));
}

}  // namespace
}  // namespace converge::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace converge::fuzz;
  const std::string_view input = AsText(data, size);
  CheckBody(input);
  if (const size_t blank = input.find("\n\n"); blank != std::string_view::npos) {
    CheckPair(input.substr(0, blank), input.substr(blank + 2));
  }
  return 0;
}
