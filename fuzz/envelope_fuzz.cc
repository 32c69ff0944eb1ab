// Fuzz target: CloudEvents envelopes as consumers read them from the queue
// (DecodeEnvelope). The whole input is the envelope.
//
// Properties:
//  - a rejected envelope is kInvalidArgument;
//  - an accepted one has a non-empty id, source and type, and its data is a JSON text that
//    nests at most 256 levels (deeper data overflowed json::dump()'s recursion);
//  - encode(decode(x)) decodes to the same event, field by field, and encoding that again
//    gives the same bytes (one decode normalises; after that the envelope is a fixed
//    point), so a consumer that re-publishes an event (dead letters, replays) never
//    changes it.
#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "converge/outbox.h"
#include "fuzz/fuzz_support.h"

namespace converge::fuzz {
namespace {

std::string Describe(const Event& e) {
  return "{id " + Quote(e.id) + ", source " + Quote(e.source) + ", type " + Quote(e.type) +
         ", subject " + Quote(e.subject) + ", aggregate_type " + Quote(e.aggregate_type) +
         ", time " + std::to_string(e.time) + ", data " + Quote(e.data) + ", traceparent " +
         Quote(e.traceparent) + "}";
}

// How deeply `j` nests (0 for a scalar or an empty container), counted without recursion.
size_t Depth(const nlohmann::json& j) {
  size_t deepest = 0;
  std::vector<std::pair<const nlohmann::json*, size_t>> stack = {{&j, 0}};
  while (!stack.empty()) {
    auto [v, d] = stack.back();
    stack.pop_back();
    deepest = std::max(deepest, d);
    if (v->is_structured()) {
      for (const auto& child : *v) stack.push_back({&child, d + 1});
    }
  }
  return deepest;
}

bool Same(const Event& a, const Event& b) {
  return a.id == b.id && a.source == b.source && a.type == b.type && a.subject == b.subject &&
         a.aggregate_type == b.aggregate_type && a.time == b.time && a.data == b.data &&
         a.traceparent == b.traceparent;
}

void CheckEnvelope(std::string_view envelope) {
  auto event = DecodeEnvelope(envelope);
  if (!event) {
    FUZZ_CHECK(event.error().code() == StatusCode::kInvalidArgument,
               event.error().ToString() + " for " + Quote(envelope));
    return;
  }
  FUZZ_CHECK(!event->id.empty() && !event->source.empty() && !event->type.empty(),
             "accepted without id, source or type: " + Describe(*event));
  const nlohmann::json data = nlohmann::json::parse(event->data, nullptr, false);
  FUZZ_CHECK(!data.is_discarded(), "data is not JSON: " + Describe(*event));
  FUZZ_CHECK(Depth(data) <= 256, "data nests " + std::to_string(Depth(data)) + " levels");

  const std::string encoded = EncodeEnvelope(*event);
  auto again = DecodeEnvelope(encoded);
  FUZZ_CHECK(again.has_value(), "the re-encoded envelope " + Quote(encoded) +
                                    " is rejected: " + again.error().ToString());
  FUZZ_CHECK(Same(*event, *again), "re-encoding changes " + Describe(*event) + " into " +
                                       Describe(*again) + " via " + Quote(encoded));
  FUZZ_CHECK(EncodeEnvelope(*again) == encoded,
             "encoding is not a fixed point for " + Quote(encoded));
}

}  // namespace
}  // namespace converge::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  converge::fuzz::CheckEnvelope(converge::fuzz::AsText(data, size));
  return 0;
}
