// Fuzz target: the body of a provider webhook after its signature was verified
// (payments::ParsePspEvent, examples/payments/psp_event.cc), and the queued event its
// consumer reads back (PspQueueEvent, EncodeEnvelope, DecodeEnvelope, ParsePspQueueEvent).
// The whole input is the body.
//
// Properties:
//  - accepted exactly when valid by the documented rules (psp_event.h), read here from
//    nlohmann's DOM with a depth counted by hand; a refusal is kInvalidArgument (the route
//    answers it 400, never 5xx);
//  - an accepted event carries the body's type, its data as compact JSON and the data's
//    charge_id, id and reference; its subject is the first of charge_id and id that is
//    not empty, else "unknown";
//  - the queued event's envelope decodes, and the consumer reads back the very event the
//    route parsed.
#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "converge/event.h"
#include "examples/payments/psp_event.h"
#include "fuzz/fuzz_support.h"

namespace converge::fuzz {
namespace {

using json = nlohmann::json;

// Levels of arrays and objects: 0 for a scalar or an empty container, 1 for [1].
int Depth(const json& j) {
  if (!j.is_structured() || j.empty()) return 0;
  int deepest = 0;
  for (const json& child : j) deepest = std::max(deepest, Depth(child));
  return deepest + 1;
}

bool ShouldParse(const json& j) {
  if (j.is_discarded() || !j.is_object() || Depth(j) > 256) return false;
  if (!j.contains("type") || !j["type"].is_string()) return false;
  if (!j.contains("data") || !j["data"].is_object()) return false;
  for (const char* name : {"charge_id", "id", "reference"}) {
    if (j["data"].contains(name) && !j["data"][name].is_string()) return false;
  }
  return true;
}

std::string Member(const json& data, const char* name) {
  return data.contains(name) ? data[name].get<std::string>() : std::string();
}

void Check(std::string_view body) {
  auto parsed = payments::ParsePspEvent(body);
  // Inputs are at most a few KiB (libFuzzer's -max_len), so the DOM's own recursion is safe.
  const json j = json::parse(body, nullptr, /*allow_exceptions=*/false);
  const bool should = ShouldParse(j);
  FUZZ_CHECK(parsed.has_value() == should,
             Quote(body) + (should ? " was refused: " + parsed.error().ToString()
                                   : std::string(" was accepted")));
  if (!parsed) {
    FUZZ_CHECK(parsed.error().code() == StatusCode::kInvalidArgument,
               "a refusal is not kInvalidArgument: " + parsed.error().ToString());
    return;
  }
  const json& data = j["data"];
  payments::PspEvent expected;
  expected.type = j["type"].get<std::string>();
  expected.data = data.dump();
  expected.charge_id = Member(data, "charge_id");
  expected.id = Member(data, "id");
  expected.reference = Member(data, "reference");
  FUZZ_CHECK(*parsed == expected, "the event of " + Quote(body) + " is not the body's");
  const std::string subject = !expected.charge_id.empty() ? expected.charge_id
                              : !expected.id.empty()      ? expected.id
                                                          : "unknown";
  FUZZ_CHECK(parsed->Subject() == subject, "subject " + Quote(parsed->Subject()));

  const Event queued = payments::PspQueueEvent(*parsed, "msg_fuzz", 1700000000123);
  auto decoded = DecodeEnvelope(queued.envelope);
  FUZZ_CHECK(decoded.has_value(), "the queued envelope does not decode: " +
                                      decoded.error().ToString() + ": " + Quote(queued.envelope));
  FUZZ_CHECK(decoded->subject == subject && decoded->id == "msg_fuzz" &&
                 decoded->time == 1700000000123,
             "the envelope's routing fields changed: " + Quote(queued.envelope));
  auto back = payments::ParsePspQueueEvent(*decoded);
  FUZZ_CHECK(back.has_value(), "the consumer refuses what the route queued: " +
                                   back.error().ToString() + ": " + Quote(queued.envelope));
  FUZZ_CHECK(*back == *parsed, "the consumer reads another event than the route parsed: " +
                                   Quote(queued.envelope));
}

}  // namespace
}  // namespace converge::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  converge::fuzz::Check(converge::fuzz::AsText(data, size));
  return 0;
}
