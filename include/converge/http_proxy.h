// An Idempotency-Key reverse proxy: the middleware of http_idempotency.h in front of an
// upstream HTTP API written in any language (`converge proxy`).
//
// Configured routes (method + path pattern) require or accept an Idempotency-Key. With a
// key, the request is claimed in the key store under the caller's scope, forwarded
// upstream with the key in a header, and the upstream's answer is stored when it is an
// outcome (2xx, and the 3xx and 4xx statuses listed in `stored_statuses`) and small enough; a
// retry gets it back byte for byte with `Idempotent-Replayed: true`. A 5xx, a timeout or a
// connection error is not an outcome: nothing is stored and the lease is given back, so
// the retry goes upstream again. Everything else (no key on an optional route, routes not
// configured) passes straight through.
//
// What a proxy cannot promise: it does not share the upstream's transaction. If it dies
// after the upstream committed and before the answer was stored, the retry is forwarded
// again, with the same key: only an upstream that dedupes on that key closes the gap.
// See docs/design/proxy.md.
//
// Thread safety: the handlers are safe to run from many server workers at once.
#ifndef CONVERGE_HTTP_PROXY_H_
#define CONVERGE_HTTP_PROXY_H_

#include <chrono>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "converge/http.h"
#include "converge/idempotency.h"
#include "converge/metrics.h"
#include "converge/status.h"

namespace converge::http {

struct ProxyRoute {
  std::string method;   // e.g. "POST"
  std::string pattern;  // a server route pattern, e.g. "/v1/charges" or "/v1/orders/{id}"
  bool key_required = true;  // false: a request without a key passes through unclaimed
};

// How much longer than the upstream timeout a key's lease must be: the lease starts at
// the claim's commit, before the request goes upstream, and the answer is stored after it.
inline constexpr Millis kProxyLeaseMargin = std::chrono::seconds(1);

struct IdempotencyProxyOptions {
  std::string upstream;  // base URL, e.g. "http://127.0.0.1:9000" (no path)
  std::vector<ProxyRoute> routes;
  // The caller's scope: keys never meet across scopes. nullopt answers 401. Required.
  // ScopeFromBearer() and ScopeFromHeader() are the usual choices.
  std::function<std::optional<std::string>(const Request&)> scope;
  // The header that carries the key upstream (empty: not forwarded).
  std::string forward_key_header = "Idempotency-Key";
  // Statuses besides 2xx that are outcomes, stored and replayed: 3xx and 4xx only. List
  // 303 See Other when the upstream answers a create so (Post/Redirect/Get); it is not
  // listed by default, since a 303 to a login page would become the key's answer. A
  // listed 3xx needs Location in replay_headers.
  std::vector<int> stored_statuses = {400, 404, 409, 410, 422};
  // Response headers stored and replayed (case-insensitive); Content-Type and
  // Content-Encoding (the stored bytes are the upstream's, encoded as it sent them) always are.
  std::vector<std::string> replay_headers = {"Location", "ETag", "Cache-Control"};
  // A response body over this is answered but not stored; the key then answers 409
  // (problem type response-not-replayable) on a retry.
  size_t max_stored_body = 1 << 20;
  // An upstream answer with a longer body is not read (the proxy holds each answer whole):
  // the client gets 502 (upstream-answer-too-large), and a keyed request's key stores the
  // 409 above, since the upstream answered and may have acted. At least max_stored_body.
  size_t max_upstream_body = 64 << 20;
  // At most the keys' lease minus kProxyLeaseMargin.
  Millis upstream_timeout = std::chrono::seconds(10);
  // Requests of one scope under way at once, keyed or not; more: 429 + Retry-After.
  int max_in_flight_per_scope = 64;
  Metrics* metrics = nullptr;  // proxy_upstream_requests_total{outcome}, and the middleware's
};

// The scope of `Authorization: Bearer <token>`: the SHA-256 of the token (hex), so the
// store never holds the credential. nullopt without a bearer token.
std::optional<std::string> ScopeFromBearer(const Request& request);
// The value of header `name` as the scope; nullopt when absent or empty.
std::function<std::optional<std::string>(const Request&)> ScopeFromHeader(std::string name);

// kInvalidArgument naming the first bad option (with keys of `keys`), else OK: what
// RegisterIdempotencyProxy checks, for a caller to check before it opens anything.
Status ValidateIdempotencyProxyOptions(const IdempotencyProxyOptions& options,
                                       const IdempotencyOptions& keys);

// Registers the configured routes and a fallback that passes every other request through.
// `keys` must outlive the server; its lease must exceed options.upstream_timeout by
// kProxyLeaseMargin. kInvalidArgument names the first bad option.
Status RegisterIdempotencyProxy(Server& server, IdempotencyKeys& keys,
                                IdempotencyProxyOptions options);

}  // namespace converge::http

#endif  // CONVERGE_HTTP_PROXY_H_
