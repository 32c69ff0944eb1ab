// CloudEvents JSON envelopes: encoding and decoding.
#include "converge/event.h"

#include <cstdio>
#include <ctime>

#include <nlohmann/json.hpp>

#include "converge/clock.h"
#include "src/core/crypto.h"
#include "src/core/json_depth.h"

namespace converge {
namespace {

using json = nlohmann::json;

// Parses "YYYY-MM-DDTHH:MM:SS[.f...]Z" (RFC 3339 in UTC) into milliseconds, the fraction
// cut to milliseconds; false when malformed or out of range. Strict: every field has its
// digits and range (no signs, no spaces, no February 30, no leap second, nothing after the
// Z), so what it accepts is the one instant FormatRfc3339 writes back. (sscanf("%4d") took
// "-123", " 12" and month 99, which timegm normalised into times that did not re-parse;
// found by fuzz/envelope_fuzz.cc.)
bool ParseRfc3339(std::string_view s, int64_t* out) {
  auto number = [&](size_t pos, size_t n, int* value) {
    if (pos + n > s.size()) return false;
    int v = 0;
    for (size_t i = pos; i < pos + n; ++i) {
      if (s[i] < '0' || s[i] > '9') return false;
      v = v * 10 + (s[i] - '0');
    }
    *value = v;
    return true;
  };
  int y, mo, d, h, mi, sec;
  if (!number(0, 4, &y) || !number(5, 2, &mo) || !number(8, 2, &d) || !number(11, 2, &h) ||
      !number(14, 2, &mi) || !number(17, 2, &sec) || s[4] != '-' || s[7] != '-' ||
      s[10] != 'T' || s[13] != ':' || s[16] != ':') {
    return false;
  }
  static constexpr int kDays[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
  const bool leap_year = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
  if (mo < 1 || mo > 12 || d < 1 || d > kDays[mo - 1] + (mo == 2 && leap_year ? 1 : 0) ||
      h > 23 || mi > 59 || sec > 59) {
    return false;
  }
  size_t i = 19;
  int64_t ms = 0;
  if (i < s.size() && s[i] == '.') {
    const size_t first = ++i;
    for (; i < s.size() && s[i] >= '0' && s[i] <= '9'; ++i) {
      if (i - first < 3) ms = ms * 10 + (s[i] - '0');
    }
    if (i == first) return false;
    for (size_t n = i - first; n < 3; ++n) ms *= 10;
  }
  if (s.substr(i) != "Z") return false;
  std::tm tm{};
  tm.tm_year = y - 1900;
  tm.tm_mon = mo - 1;
  tm.tm_mday = d;
  tm.tm_hour = h;
  tm.tm_min = mi;
  tm.tm_sec = sec;
  *out = static_cast<int64_t>(timegm(&tm)) * 1000 + ms;
  return true;
}

}  // namespace

std::string NewUuidV7() { return internal::NewUuidV7(Clock::System()->NowMillis()); }

Status ValidateEventData(std::string_view data) {
  int depth = 0;
  const json parsed = internal::ParseMeasuringDepth(data, &depth);
  if (parsed.is_discarded()) return InvalidArgumentError("event data is not valid JSON");
  if (depth > internal::kMaxEventDataDepth) {
    return InvalidArgumentError("event data nests deeper than " +
                                std::to_string(internal::kMaxEventDataDepth) + " levels");
  }
  return OkStatus();
}

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
  int depth = 0;
  json j = internal::ParseMeasuringDepth(envelope, &depth);
  if (j.is_discarded() || !j.is_object()) {
    return tl::unexpected(InvalidArgumentError("event envelope is not a JSON object"));
  }
  if (depth > internal::kMaxEventDataDepth + 1) {  // the data is one level below the envelope
    return tl::unexpected(InvalidArgumentError("event envelope nests deeper than " +
                                               std::to_string(internal::kMaxEventDataDepth) +
                                               " levels"));
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
