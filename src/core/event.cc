// CloudEvents JSON envelopes: encoding and decoding.
#include "converge/event.h"

#include <cstdio>
#include <ctime>

#include <nlohmann/json.hpp>

#include "converge/clock.h"

namespace converge {
namespace {

using json = nlohmann::json;

// Parses "YYYY-MM-DDTHH:MM:SS[.fff]Z" into milliseconds; false when malformed.
bool ParseRfc3339(const std::string& s, int64_t* out) {
  int y, mo, d, h, mi, sec;
  char tail[16] = {0};
  if (std::sscanf(s.c_str(), "%4d-%2d-%2dT%2d:%2d:%2d%15s", &y, &mo, &d, &h, &mi, &sec,
                  tail) < 7) {
    return false;
  }
  std::tm tm{};
  tm.tm_year = y - 1900;
  tm.tm_mon = mo - 1;
  tm.tm_mday = d;
  tm.tm_hour = h;
  tm.tm_min = mi;
  tm.tm_sec = sec;
  int64_t ms = 0;
  std::string_view t(tail);
  if (!t.empty() && t[0] == '.') {
    int digits = 0;
    size_t i = 1;
    for (; i < t.size() && t[i] >= '0' && t[i] <= '9'; ++i) {
      if (digits < 3) ms = ms * 10 + (t[i] - '0');
      ++digits;
    }
    if (digits == 0) return false;
    for (; digits < 3; ++digits) ms *= 10;
    t.remove_prefix(i);
  }
  if (t != "Z") return false;
  *out = static_cast<int64_t>(timegm(&tm)) * 1000 + ms;
  return true;
}

}  // namespace

std::string EncodeEnvelope(const Event& e) {
  json j = {
      {"specversion", "1.0"},
      {"id", e.id},
      {"source", e.source},
      {"type", e.type},
      {"subject", e.subject},
      {"time", FormatRfc3339(e.time)},
      {"datacontenttype", "application/json"},
      {"aggregatetype", e.aggregate_type},
      {"data", json::parse(e.data, nullptr, false)},
  };
  if (!e.traceparent.empty()) j["traceparent"] = e.traceparent;
  return j.dump();
}

Result<Event> DecodeEnvelope(std::string_view envelope) {
  json j = json::parse(envelope, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return tl::unexpected(InvalidArgumentError("event envelope is not a JSON object"));
  }
  auto text = [&](const char* name, bool required, std::string* out) -> Status {
    auto it = j.find(name);
    if (it == j.end()) {
      return required ? InvalidArgumentError(std::string("event envelope lacks '") + name + "'")
                      : OkStatus();
    }
    if (!it->is_string()) {
      return InvalidArgumentError(std::string("event envelope '") + name + "' is not a string");
    }
    *out = it->get<std::string>();
    return OkStatus();
  };
  Event e;
  std::string specversion, time;
  CONVERGE_RETURN_IF_ERROR(text("specversion", true, &specversion));
  if (specversion != "1.0") {
    return tl::unexpected(InvalidArgumentError("unsupported CloudEvents specversion '" +
                                               specversion + "'"));
  }
  CONVERGE_RETURN_IF_ERROR(text("id", true, &e.id));
  CONVERGE_RETURN_IF_ERROR(text("source", true, &e.source));
  CONVERGE_RETURN_IF_ERROR(text("type", true, &e.type));
  CONVERGE_RETURN_IF_ERROR(text("subject", false, &e.subject));
  CONVERGE_RETURN_IF_ERROR(text("aggregatetype", false, &e.aggregate_type));
  CONVERGE_RETURN_IF_ERROR(text("traceparent", false, &e.traceparent));
  CONVERGE_RETURN_IF_ERROR(text("time", false, &time));
  if (!time.empty() && !ParseRfc3339(time, &e.time)) {
    return tl::unexpected(InvalidArgumentError("event time '" + time + "' is not RFC 3339"));
  }
  auto data = j.find("data");
  e.data = data == j.end() ? "null" : data->dump();
  if (e.id.empty() || e.source.empty() || e.type.empty()) {
    return tl::unexpected(InvalidArgumentError("event id, source and type must be non-empty"));
  }
  e.envelope = std::string(envelope);
  return e;
}

}  // namespace converge
