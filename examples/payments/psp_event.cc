#include "examples/payments/psp_event.h"

#include <nlohmann/json.hpp>

namespace payments {

using converge::InvalidArgumentError;
using json = nlohmann::json;

namespace {

constexpr std::string_view kTypePrefix = "psp.";

// `data`'s three identifying members, each a string where present.
converge::Status ReadData(const json& data, PspEvent* p) {
  for (auto [name, out] : {std::pair<const char*, std::string*>{"charge_id", &p->charge_id},
                           {"id", &p->id},
                           {"reference", &p->reference}}) {
    auto it = data.find(name);
    if (it == data.end()) continue;
    if (!it->is_string()) {
      return InvalidArgumentError(std::string("webhook data.") + name + " must be a string");
    }
    *out = it->get<std::string>();
  }
  return converge::OkStatus();
}

}  // namespace

std::string PspEvent::Subject() const {
  if (!charge_id.empty()) return charge_id;
  if (!id.empty()) return id;
  return "unknown";
}

converge::Result<PspEvent> ParsePspEvent(std::string_view body) {
  const json j = json::parse(body, nullptr, /*allow_exceptions=*/false);
  auto type = j.is_object() ? j.find("type") : j.end();
  auto data = j.is_object() ? j.find("data") : j.end();
  if (!j.is_object() || type == j.end() || !type->is_string() || data == j.end() ||
      !data->is_object()) {
    return tl::unexpected(
        InvalidArgumentError("webhook body must be {\"type\": string, \"data\": object}"));
  }
  // Before `data` is written out: json::dump recurses once per level.
  const converge::Status depth = converge::ValidateEventData(body);
  if (!depth.ok()) return tl::unexpected(InvalidArgumentError("webhook " + depth.message()));
  PspEvent p;
  p.type = type->get<std::string>();
  p.data = data->dump();
  CONVERGE_RETURN_IF_ERROR(ReadData(*data, &p));
  return p;
}

converge::Event PspQueueEvent(const PspEvent& p, const std::string& webhook_id, int64_t time) {
  converge::Event e;
  e.id = webhook_id;
  e.source = std::string(kPspSource);
  e.type = std::string(kTypePrefix) + p.type;
  e.subject = p.Subject();
  e.aggregate_type = "psp";
  e.time = time;
  e.data = p.data;
  e.envelope = converge::EncodeEnvelope(e);
  return e;
}

converge::Result<PspEvent> ParsePspQueueEvent(const converge::Event& e) {
  if (e.type.compare(0, kTypePrefix.size(), kTypePrefix) != 0) {
    return tl::unexpected(InvalidArgumentError("event " + e.id + " of type '" + e.type +
                                               "' is not a provider event"));
  }
  CONVERGE_RETURN_IF_ERROR(converge::ValidateEventData(e.data));
  const json data = json::parse(e.data, nullptr, /*allow_exceptions=*/false);
  if (!data.is_object()) {
    return tl::unexpected(InvalidArgumentError("event " + e.id + ": data is not an object"));
  }
  PspEvent p;
  p.type = e.type.substr(kTypePrefix.size());
  p.data = data.dump();
  CONVERGE_RETURN_IF_ERROR(ReadData(data, &p));
  return p;
}

}  // namespace payments
