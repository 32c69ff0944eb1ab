// Fuzz target: the failpoint spec (failpoint::Configure), as it arrives from
// CONVERGE_FAILPOINTS or the admin API. The whole input is the spec.
//
// A fuzzed spec may arm `crash` or `pause`, so no point a fuzzed spec may name is ever hit
// here: only the sentinel below, and only while the sentinel's own configuration is in
// force. The configuration is reset after every input.
//
// Properties:
//  - Configure answers OK or kInvalidArgument, and the same for the same spec;
//  - a rejected spec leaves the previous configuration in place (the sentinel still
//    fires its error) and releases nothing;
//  - an accepted spec replaces it (the sentinel's count restarts);
//  - Configure("") clears everything.
#include <cstdint>
#include <string>
#include <string_view>

#include "converge/failpoint.h"
#include "fuzz/fuzz_support.h"

namespace converge::fuzz {
namespace {

constexpr std::string_view kSentinel = "fuzz.sentinel";
constexpr std::string_view kSentinelSpec = "fuzz.sentinel=error(aborted, sentinel)";

void CheckSpec(std::string_view spec) {
  FUZZ_CHECK(failpoint::Configure(kSentinelSpec).ok(), std::string("the sentinel spec fails"));
  const Status first = failpoint::Configure(spec);
  if (!first.ok()) {
    FUZZ_CHECK(first.code() == StatusCode::kInvalidArgument,
               first.ToString() + " for " + Quote(spec));
    // Still the sentinel's configuration: hitting it is safe and must fire.
    const Status hit = failpoint::Hit(kSentinel);
    FUZZ_CHECK(hit.code() == StatusCode::kAborted && hit.message() == "sentinel",
               "a rejected spec " + Quote(spec) + " changed the configuration: " + hit.ToString());
    FUZZ_CHECK(failpoint::Hits(kSentinel) == 1, "the sentinel lost its hit count");
  } else {
    // The fuzzed configuration is in force now; nothing is hit.
    FUZZ_CHECK(failpoint::Hits(kSentinel) == 0,
               "an accepted spec kept the sentinel's count: " + Quote(spec));
  }
  const Status second = failpoint::Configure(spec);
  FUZZ_CHECK(
      second.code() == first.code() && second.message() == first.message(),
      "two answers for " + Quote(spec) + ": " + first.ToString() + " then " + second.ToString());
  FUZZ_CHECK(failpoint::Configure("").ok(), std::string("cannot clear the configuration"));
  FUZZ_CHECK(failpoint::Hit(kSentinel).ok() && failpoint::Hits(kSentinel) == 0,
             "Configure(\"\") left a point armed");
}

}  // namespace
}  // namespace converge::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  converge::fuzz::CheckSpec(converge::fuzz::AsText(data, size));
  return 0;
}
