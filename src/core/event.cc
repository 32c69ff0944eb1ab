// CloudEvents JSON envelopes: encoding and decoding.
#include "converge/event.h"

#include <algorithm>
#include <cstdio>
#include <ctime>
#include <tuple>

#include <nlohmann/json.hpp>

#include "converge/clock.h"
#include "src/core/crypto.h"
#include "src/core/envelope.h"
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

namespace internal {

Result<json> ParseEventData(std::string_view data) {
  int depth = 0;
  json parsed = ParseMeasuringDepth(data, &depth);
  if (parsed.is_discarded()) {
    return tl::unexpected(InvalidArgumentError("event data is not valid JSON"));
  }
  if (depth > kMaxEventDataDepth) {
    return tl::unexpected(InvalidArgumentError(
        "event data nests deeper than " + std::to_string(kMaxEventDataDepth) + " levels"));
  }
  return parsed;
}

// Written member by member, in the order an nlohmann object (a std::map) dumps them, which
// is how the envelope was written before: the same bytes, without building the object
// (building it took about 7 us an event, most of an event's preparation on the caller's
// thread; docs/benchmarks.md). Each text is quoted and escaped by nlohmann's serializer,
// which throws on text that is not UTF-8, as dumping the object did.
std::string EncodeEnvelope(const Event& e, const json& data) {
  auto text = [](std::string* out, std::string_view name, std::string_view value) {
    out->append(name);
    // Printable ASCII but for the quote and the backslash is written as it is by the
    // serializer too (ids, types, times, traceparents: nearly every value).
    const bool plain = std::all_of(value.begin(), value.end(), [](char c) {
      return c >= 0x20 && c < 0x7f && c != '"' && c != '\\';
    });
    if (!plain) {
      out->append(json(value).dump());
      return;
    }
    out->push_back('"');
    out->append(value);
    out->push_back('"');
  };
  std::string out;
  out.reserve(256 + e.data.size());
  text(&out, "{\"aggregatetype\":", e.aggregate_type);
  out.append(",\"data\":");
  out.append(data.dump());
  out.append(",\"datacontenttype\":\"application/json\"");
  text(&out, ",\"id\":", e.id);
  text(&out, ",\"source\":", e.source);
  out.append(",\"specversion\":\"1.0\"");
  text(&out, ",\"subject\":", e.subject);
  text(&out, ",\"time\":", FormatRfc3339(e.time));
  if (!e.traceparent.empty()) text(&out, ",\"traceparent\":", e.traceparent);
  text(&out, ",\"type\":", e.type);
  out.push_back('}');
  return out;
}

}  // namespace internal

Status ValidateEventData(std::string_view data) {
  return StatusOf(internal::ParseEventData(data));
}

std::string EncodeEnvelope(const Event& e) {
  return internal::EncodeEnvelope(e, json::parse(e.data, nullptr, false));
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
  // A consumer keys its inbox row and a dead letter by the id and source, and stores the
  // type: text a store refuses there (PostgreSQL a NUL, which an envelope's "\u0000"
  // decodes to; a key longer than its index takes) would make a name the consumer could
  // not even park the event under, so it would be fetched again for ever. The outbox
  // writes at most 255 bytes in each, and no control character.
  for (const auto& [what, value, max] :
       {std::tuple<const char*, const std::string&, size_t>{"event id", e.id, 255},
        {"event source", e.source, 255},
        {"event type", e.type, std::string::npos}}) {
    if (value.size() > max) {
      return tl::unexpected(InvalidArgumentError(std::string(what) + " is " +
                                                 std::to_string(value.size()) +
                                                 " bytes; the limit is " + std::to_string(max)));
    }
    if (value.find('\0') != std::string::npos) {
      return tl::unexpected(InvalidArgumentError(std::string(what) + " contains a NUL"));
    }
  }
  e.envelope = std::string(envelope);
  return e;
}

}  // namespace converge
