// Encoding an event's envelope from data parsed once. Internal to converge.
#ifndef CONVERGE_CORE_ENVELOPE_H_
#define CONVERGE_CORE_ENVELOPE_H_

#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "converge/event.h"
#include "converge/status.h"

namespace converge::internal {

// ValidateEventData's check, keeping what it parsed: `data` as JSON, or kInvalidArgument.
Result<nlohmann::json> ParseEventData(std::string_view data);

// EncodeEnvelope(e) with `e.data` as ParseEventData returned it (Outbox::Prepare parses it
// once, to check it and to write it). Throws nlohmann::json::exception when a field is not
// UTF-8.
std::string EncodeEnvelope(const Event& e, const nlohmann::json& data);

}  // namespace converge::internal

#endif  // CONVERGE_CORE_ENVELOPE_H_
