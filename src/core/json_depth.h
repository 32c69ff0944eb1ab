// Parsing JSON of bounded depth. Internal to converge.
#ifndef CONVERGE_CORE_JSON_DEPTH_H_
#define CONVERGE_CORE_JSON_DEPTH_H_

#include <algorithm>
#include <string_view>

#include <nlohmann/json.hpp>

namespace converge::internal {

// Event data nests at most this many levels of arrays and objects. json::dump(), which
// writes every envelope, recurses once per level: data 100,000 levels deep overflowed the
// stack of whichever thread encoded or decoded it, and a consumer would crash on the same
// message at every redelivery instead of dead-lettering it. Refused on both sides of the
// queue instead (kInvalidArgument).
inline constexpr int kMaxEventDataDepth = 256;

// Parses `text` (a discarded value when it is not JSON) and sets `depth` to how deeply it
// nests: 0 for a scalar or an empty container, 1 for [1], and so on. The parser itself is
// iterative, so any depth is safe to parse (but not to dump or destroy recursively: callers
// check `depth` before doing either with a deep value).
inline nlohmann::json ParseMeasuringDepth(std::string_view text, int* depth) {
  *depth = 0;
  return nlohmann::json::parse(
      text,
      [depth](int d, nlohmann::json::parse_event_t, nlohmann::json&) {
        *depth = std::max(*depth, d);
        return true;
      },
      /*allow_exceptions=*/false);
}

}  // namespace converge::internal

#endif  // CONVERGE_CORE_JSON_DEPTH_H_
