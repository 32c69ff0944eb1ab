#include <strings.h>

#include <nlohmann/json.hpp>

#include "converge/http.h"
#include "src/core/crypto.h"

namespace converge::http {

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
  r.body = j.dump();
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
    : secret_(internal::RandomHex(32)) {
  for (const auto& [key, principal] : keys) {
    by_digest_.emplace(internal::HmacSha256(secret_, key), principal);
  }
}

const std::string* ApiKeyIndex::Find(std::string_view presented) const {
  // The HMAC takes time linear in the key's length only; the map then compares digests,
  // whose matching prefix an attacker cannot steer without the secret.
  auto it = by_digest_.find(internal::HmacSha256(secret_, presented));
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

}  // namespace converge::http
