#include <strings.h>

#include <algorithm>
#include <cassert>
#include <charconv>

#include <nlohmann/json.hpp>

#include "converge/http.h"
#include "src/core/crypto.h"

namespace converge::http {
namespace {

// The reason phrases of the statuses HttpStatusFor returns (RFC 9110; 499 is nginx's).
std::string_view ReasonPhrase(int status) {
  switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 409: return "Conflict";
    case 422: return "Unprocessable Content";
    case 429: return "Too Many Requests";
    case 499: return "Client Closed Request";
    case 501: return "Not Implemented";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    default: return "Internal Server Error";
  }
}

}  // namespace

const std::string* FindHeader(const Headers& headers, std::string_view name) {
  for (const auto& [k, v] : headers) {
    if (k.size() == name.size() && strncasecmp(k.data(), name.data(), k.size()) == 0) return &v;
  }
  return nullptr;
}

Response& Response::Set(std::string name, std::string value) {
  for (auto& [k, v] : headers) {
    if (k.size() == name.size() && strncasecmp(k.data(), name.data(), k.size()) == 0) {
      v = std::move(value);
      return *this;
    }
  }
  headers.emplace_back(std::move(name), std::move(value));
  return *this;
}

bool IsUtf8(std::string_view text) {
  try {
    (void)nlohmann::json(text).dump();  // strict: throws on bytes that are not UTF-8
    return true;
  } catch (const nlohmann::json::exception&) {
    return false;
  }
}

Response Problem(int status, std::string_view title, std::string_view detail,
                 std::string_view slug) {
  nlohmann::json j = {
      {"type", slug.empty() ? std::string("about:blank")
                            : "urn:converge:problem:" + std::string(slug)},
      {"title", title},
      {"status", status},
      {"detail", detail},
  };
  Response r;
  r.status = status;
  r.headers.emplace_back("Content-Type", "application/problem+json");
  // A detail often quotes what the client sent (a path, a header), which need not be
  // UTF-8: replace such bytes rather than throw. The throw escaped the 404 for a path with
  // a byte >= 0x80 and terminated the server (found by fuzz/http_request_fuzz.cc).
  r.body = j.dump(-1, ' ', /*ensure_ascii=*/false, nlohmann::json::error_handler_t::replace);
  return r;
}

Response Json(int status, std::string body) {
  Response r;
  r.status = status;
  r.headers.emplace_back("Content-Type", "application/json");
  r.body = std::move(body);
  return r;
}

std::string_view StatusClass(int status) {
  switch (status / 100) {
    case 1: return "1xx";
    case 2: return "2xx";
    case 3: return "3xx";
    case 4: return "4xx";
    default: return "5xx";
  }
}

std::optional<std::string_view> BearerToken(const Request& request) {
  const std::string* auth = request.Header("Authorization");
  if (auth == nullptr) return std::nullopt;
  std::string_view v = *auth;
  constexpr std::string_view kScheme = "bearer";
  if (v.size() <= kScheme.size() || strncasecmp(v.data(), kScheme.data(), kScheme.size()) != 0 ||
      v[kScheme.size()] != ' ') {
    return std::nullopt;
  }
  v.remove_prefix(kScheme.size());
  while (!v.empty() && v.front() == ' ') v.remove_prefix(1);
  if (v.empty() || v.find_first_of(" \t") != std::string_view::npos) return std::nullopt;
  return v;
}

ApiKeyIndex::ApiKeyIndex(const std::map<std::string, std::string>& keys)
    : secret_(std::make_shared<internal::HmacSha256Key>(internal::RandomHex(32))) {
  for (const auto& [key, principal] : keys) by_digest_.emplace(secret_->Sign(key), principal);
}

const std::string* ApiKeyIndex::Find(std::string_view presented) const {
  // The HMAC takes time linear in the key's length only; the map then compares digests,
  // whose matching prefix an attacker cannot steer without the secret.
  auto it = by_digest_.find(secret_->Sign(presented));
  return it == by_digest_.end() ? nullptr : &it->second;
}

int HttpStatusFor(StatusCode code) {
  switch (code) {
    case StatusCode::kOk: return 200;
    case StatusCode::kInvalidArgument:
    case StatusCode::kOutOfRange: return 400;
    case StatusCode::kUnauthenticated: return 401;
    case StatusCode::kPermissionDenied: return 403;
    case StatusCode::kNotFound: return 404;
    case StatusCode::kAlreadyExists:
    case StatusCode::kFailedPrecondition:
    case StatusCode::kAborted: return 409;
    case StatusCode::kResourceExhausted: return 429;
    case StatusCode::kCancelled: return 499;
    case StatusCode::kUnimplemented: return 501;
    case StatusCode::kUnavailable: return 503;
    case StatusCode::kDeadlineExceeded: return 504;
    default: return 500;
  }
}

int HttpStatusFor(const Status& status) {
  if (status.reason() == reason::kFingerprintMismatch) return 422;
  if (status.reason() == reason::kInFlight) return 409;
  return HttpStatusFor(status.code());
}

Response ProblemFor(const Status& status, std::string_view slug, std::string_view detail) {
  assert(!status.ok());
  const int code = HttpStatusFor(status);
  Response r = Problem(code, ReasonPhrase(code), detail.empty() ? status.message() : detail, slug);
  if (status.transient() && (code == 409 || code == 429 || code == 503)) {
    const int64_t seconds = std::max<int64_t>(1, (status.retry_after_ms() + 999) / 1000);
    r.Set("Retry-After", std::to_string(seconds));
  }
  return r;
}

Status ParseHostPort(const std::string& listen, std::string* host, uint16_t* port) {
  const auto colon = listen.rfind(':');
  if (colon == std::string::npos || colon == 0) {
    return InvalidArgumentError("listen address '" + listen + "' is not host:port");
  }
  unsigned p = 0;
  auto r = std::from_chars(listen.data() + colon + 1, listen.data() + listen.size(), p);
  if (r.ec != std::errc() || r.ptr != listen.data() + listen.size() || p > 65535) {
    return InvalidArgumentError("listen address '" + listen + "' has a bad port");
  }
  *host = listen.substr(0, colon);
  *port = static_cast<uint16_t>(p);
  return OkStatus();
}

}  // namespace converge::http
