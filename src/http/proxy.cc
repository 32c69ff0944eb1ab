// The Idempotency-Key reverse proxy (http_proxy.h).
#include "converge/http_proxy.h"

#include <strings.h>

#include <algorithm>
#include <map>
#include <memory>
#include <mutex>

#include "converge/failpoint.h"
#include "converge/http_idempotency.h"
#include "src/core/crypto.h"

namespace converge::http {
namespace {

bool SameName(std::string_view a, std::string_view b) {
  return a.size() == b.size() && strncasecmp(a.data(), b.data(), a.size()) == 0;
}

bool Listed(const std::vector<std::string>& names, std::string_view name) {
  return std::any_of(names.begin(), names.end(),
                     [&](const std::string& n) { return SameName(n, name); });
}

// Hop-by-hop fields (RFC 9110 §7.6.1) and what the client library writes itself: never
// copied from one connection to the other.
bool HopByHop(std::string_view name) {
  static const std::vector<std::string> kFields = {
      "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE",
      "Trailer",    "Transfer-Encoding", "Upgrade",  "Host", "Content-Length", "Expect"};
  return Listed(kFields, name);
}

// The fields a message's Connection fields name: hop-by-hop too (RFC 9110 §7.6.1), for
// this connection only. Lower-cased; the list is comma-separated, case-insensitive.
std::vector<std::string> ConnectionOptions(const Headers& headers) {
  std::vector<std::string> names;
  for (const auto& [name, value] : headers) {
    if (!SameName(name, "Connection")) continue;
    size_t start = 0;
    while (start <= value.size()) {
      size_t comma = value.find(',', start);
      if (comma == std::string::npos) comma = value.size();
      std::string_view token(value.data() + start, comma - start);
      while (!token.empty() && (token.front() == ' ' || token.front() == '\t')) {
        token.remove_prefix(1);
      }
      while (!token.empty() && (token.back() == ' ' || token.back() == '\t')) {
        token.remove_suffix(1);
      }
      if (!token.empty()) names.emplace_back(token);
      start = comma + 1;
    }
  }
  return names;
}

// Whether a field must not cross the proxy: hop-by-hop by name, or named by `options`.
bool NotForwarded(std::string_view name, const std::vector<std::string>& options) {
  return HopByHop(name) || Listed(options, name);
}

// Requests of each scope under way; Enter() refuses past the bound.
class ScopeGate {
 public:
  explicit ScopeGate(int limit) : limit_(limit) {}
  bool Enter(const std::string& scope) {
    std::lock_guard<std::mutex> l(mu_);
    int& n = in_flight_[scope];
    if (n >= limit_) return false;
    ++n;
    return true;
  }
  void Leave(const std::string& scope) {
    std::lock_guard<std::mutex> l(mu_);
    auto it = in_flight_.find(scope);
    if (it != in_flight_.end() && --it->second == 0) in_flight_.erase(it);
  }

 private:
  const int limit_;
  std::mutex mu_;
  std::map<std::string, int> in_flight_;
};

struct Proxy {
  IdempotencyProxyOptions o;
  Client client;
  ScopeGate gate;

  explicit Proxy(IdempotencyProxyOptions options)
      : o(std::move(options)), gate(o.max_in_flight_per_scope) {}

  void Count(const char* outcome) {
    if (o.metrics != nullptr) {
      o.metrics->Add("proxy_upstream_requests_total", {{"outcome", outcome}});
    }
  }

  // Sends `req` upstream; `key` (when set) in forward_key_header. The client's own
  // Idempotency-Key field is not copied: the key goes as the proxy parsed it.
  Result<Response> Forward(const Request& req, const std::optional<std::string>& key) {
    ClientRequest up;
    up.method = req.method;
    up.url = o.upstream + req.target;
    up.body = req.body;
    up.timeout = o.upstream_timeout;
    up.max_response_body = o.max_upstream_body;
    const std::vector<std::string> options = ConnectionOptions(req.headers);
    for (const auto& [name, value] : req.headers) {
      if (NotForwarded(name, options) || SameName(name, "Idempotency-Key")) continue;
      if (!o.forward_key_header.empty() && SameName(name, o.forward_key_header)) continue;
      up.headers.emplace_back(name, value);
    }
    if (key && !o.forward_key_header.empty()) {
      up.headers.emplace_back(o.forward_key_header, *key);
    }
    if (!req.remote.empty()) up.headers.emplace_back("X-Forwarded-For", req.remote);
    auto r = client.Send(up);
    if (r) {
      // The server writes its own Server field; the upstream's would be a second one. A
      // HEAD answer keeps its Content-Length, the GET answer's length, for the server to
      // send on with no body; one without (the upstream would send the GET answer in
      // chunks) goes on without a length, not as 0.
      const std::vector<std::string> answer_options = ConnectionOptions(r->headers);
      const bool head = req.method == "HEAD";
      std::erase_if(r->headers, [&](const auto& h) {
        if (head && SameName(h.first, "Content-Length")) return false;
        return NotForwarded(h.first, answer_options) || SameName(h.first, "Server");
      });
    }
    return r;
  }

  static Response UpstreamProblem(const Status& st) {
    if (st.code() == StatusCode::kResourceExhausted) {
      return Problem(502, "Bad Gateway",
                     "the upstream's answer was too large for this proxy to relay",
                     "upstream-answer-too-large");
    }
    if (st.code() == StatusCode::kDeadlineExceeded) {
      return Problem(504, "Gateway Timeout", "the upstream did not answer in time",
                     "upstream-timeout");
    }
    return Problem(502, "Bad Gateway", "the upstream could not be reached",
                   "upstream-unavailable");
  }

  // 2xx, and the listed 3xx and 4xx (a 303 after a create is its outcome: the client
  // library follows no redirect, so the client gets the 303 itself).
  bool IsOutcome(int status) const {
    if (status >= 200 && status < 300) return true;
    return std::find(o.stored_statuses.begin(), o.stored_statuses.end(), status) !=
           o.stored_statuses.end();
  }

  // The multi-phase body of a keyed request: forward, then store the outcome or give the
  // lease back.
  // What the key stores when the upstream's answer cannot be: the request ran, its answer
  // cannot be replayed.
  static StoredResponse NotReplayable() {
    Response p = Problem(409, "Conflict",
                         "the response to the first request with this key was too large to "
                         "store; it cannot be replayed",
                         "response-not-replayable");
    return StoredResponse{.status = 409, .headers = p.headers, .body = p.body};
  }

  Response Keyed(IdempotencyKeys& keys, KeyLease& lease, Request& req) {
    auto up = Forward(req, lease.key);
    if (!up && up.error().code() == StatusCode::kResourceExhausted) {
      // The upstream answered, and may have acted: a retry must not go upstream again.
      const StoredResponse stored = NotReplayable();
      auto done = keys.Complete(lease, [&](Tx&) -> Result<StoredResponse> { return stored; });
      Count(done ? "too_large" : "store_failed");
      return UpstreamProblem(up.error());
    }
    if (!up || !IsOutcome(up->status)) {
      // Not an outcome (5xx, an unlisted status, a timeout, no connection): store nothing,
      // and let the retry go upstream again at once.
      // (Should the release fail, the lease runs out instead: the retry waits for it.)
      (void)keys.Release(lease);
      Count(up ? "not_stored" : "error");
      return up ? std::move(*up) : UpstreamProblem(up.error());
    }
    // Failpoint: the upstream has answered (and may have committed); nothing is stored.
    if (Status fp = failpoint::Hit("proxy.after_upstream_before_store"); !fp.ok()) {
      (void)keys.Release(lease);
      return StoreProblem(fp);
    }
    StoredResponse stored;
    const bool too_large = up->body.size() > o.max_stored_body;
    if (too_large) {
      stored = NotReplayable();
    } else {
      stored.status = up->status;
      stored.body = up->body;
      for (const auto& [name, value] : up->headers) {
        // The body's bytes are stored as sent: their type and encoding go with them. A
        // value that is not UTF-8 (obs-text, legal in HTTP) cannot be stored, and would fail
        // the whole store, sending every retry upstream again: it is left out of the replay.
        if (!SameName(name, "Content-Type") && !SameName(name, "Content-Encoding") &&
            !Listed(o.replay_headers, name)) {
          continue;
        }
        if (IsUtf8(value)) {
          stored.headers.emplace_back(name, value);
        } else if (o.metrics != nullptr) {
          o.metrics->Add("proxy_headers_not_stored_total");
        }
      }
    }
    auto done = keys.Complete(lease, [&](Tx&) -> Result<StoredResponse> { return stored; });
    // The upstream answered; the client gets that answer. When the store failed, a retry
    // finds the key still held, then resumes it and goes upstream again with the same key
    // (proxy.md).
    if (!done) {
      Count("store_failed");
    } else {
      Count(too_large ? "too_large" : "stored");
    }
    return std::move(*up);
  }
};

}  // namespace

std::optional<std::string> ScopeFromBearer(const Request& request) {
  auto token = BearerToken(request);
  if (!token) return std::nullopt;
  return internal::Sha256Hex(*token);
}

std::function<std::optional<std::string>(const Request&)> ScopeFromHeader(std::string name) {
  return [name = std::move(name)](const Request& r) -> std::optional<std::string> {
    const std::string* v = r.Header(name);
    if (v == nullptr || v->empty()) return std::nullopt;
    return *v;
  };
}

Status ValidateIdempotencyProxyOptions(const IdempotencyProxyOptions& options,
                                       const IdempotencyOptions& keys) {
  CONVERGE_RETURN_IF_ERROR(IdempotencyKeys::ValidateOptions(keys));
  if (options.upstream.rfind("http://", 0) != 0 && options.upstream.rfind("https://", 0) != 0) {
    return InvalidArgumentError("proxy: upstream must be an http:// or https:// URL, not '" +
                                options.upstream + "'");
  }
  if (!options.scope) return InvalidArgumentError("proxy: no scope function");
  if (options.max_in_flight_per_scope < 1) {
    return InvalidArgumentError("proxy: max_in_flight_per_scope must be at least 1");
  }
  if (options.max_upstream_body == 0 || options.max_upstream_body < options.max_stored_body) {
    return InvalidArgumentError("proxy: max_upstream_body (" +
                                std::to_string(options.max_upstream_body) +
                                ") must be positive and at least max_stored_body (" +
                                std::to_string(options.max_stored_body) + ")");
  }
  if (options.upstream_timeout <= Millis(0)) {
    return InvalidArgumentError("proxy: upstream_timeout must be positive");
  }
  // The lease starts at the claim's commit, before the request goes upstream, and the
  // answer is stored after it, perhaps behind other commits: the margin covers those.
  if (keys.lease < options.upstream_timeout + kProxyLeaseMargin) {
    return InvalidArgumentError(
        "proxy: the keys' lease (" + std::to_string(keys.lease.count()) +
        " ms) must exceed the upstream timeout (" +
        std::to_string(options.upstream_timeout.count()) + " ms) by at least " +
        std::to_string(kProxyLeaseMargin.count()) +
        " ms: else a retry could take a key over while the first request still waits");
  }
  for (int s : options.stored_statuses) {
    if (s < 300 || s > 499) {
      return InvalidArgumentError("proxy: stored_statuses lists " + std::to_string(s) +
                                  "; only 3xx and 4xx statuses may be stored besides 2xx");
    }
    if (s < 400 && !Listed(options.replay_headers, "Location")) {
      return InvalidArgumentError("proxy: stored_statuses lists " + std::to_string(s) +
                                  ", a redirect: replay_headers must list Location, or "
                                  "its replay points nowhere");
    }
  }
  for (const ProxyRoute& r : options.routes) {
    if (r.method.empty() || r.pattern.empty() || r.pattern.front() != '/') {
      return InvalidArgumentError("proxy: a route needs a method and a path starting with '/'");
    }
  }
  return OkStatus();
}

Status RegisterIdempotencyProxy(Server& server, IdempotencyKeys& keys,
                                IdempotencyProxyOptions options) {
  CONVERGE_RETURN_IF_ERROR(ValidateIdempotencyProxyOptions(options, keys.options()));
  while (options.upstream.back() == '/') options.upstream.pop_back();
  if (options.metrics != nullptr) {
    options.metrics->Describe("proxy_upstream_requests_total", "counter",
                              "Keyed requests forwarded upstream, by what became of the "
                              "answer (stored, not_stored, too_large, store_failed, "
                              "error).");
  }
  auto proxy = std::make_shared<Proxy>(std::move(options));

  // Every request holds a place of its scope while it is under way.
  auto gated = [proxy](Request& req, const std::function<Response(Request&)>& next) {
    const std::string scope = proxy->o.scope(req).value_or("");
    if (!proxy->gate.Enter(scope)) {
      Response r = Problem(429, "Too Many Requests",
                           "too many requests of this caller are under way", "rate-limited");
      r.Set("Retry-After", "1");
      return r;
    }
    struct Leave {
      Proxy* proxy;
      const std::string& scope;
      ~Leave() { proxy->gate.Leave(scope); }
    } leave{proxy.get(), scope};
    return next(req);
  };
  auto pass = [proxy](Request& req) -> Response {
    auto up = proxy->Forward(req, std::nullopt);
    return up ? std::move(*up) : Proxy::UpstreamProblem(up.error());
  };

  IdempotencyRouteOptions route;
  route.scope = proxy->o.scope;
  route.metrics = proxy->o.metrics;
  Server::Handler keyed = MultiPhaseRoute(
      keys, std::move(route), [proxy, &keys](KeyLease& lease, Begun::Kind, Request& req) {
        return proxy->Keyed(keys, lease, req);
      });
  for (const ProxyRoute& r : proxy->o.routes) {
    const bool required = r.key_required;
    server.Route(r.method, r.pattern, [gated, pass, keyed, required](Request& req) {
      return gated(req, [&](Request& q) -> Response {
        // A HEAD (a GET route answers it) is safe: nothing to key, it passes through.
        if (q.method == "HEAD") return pass(q);
        auto key = ParseIdempotencyKey(q);
        if (key && !key->has_value() && !required) return pass(q);
        return keyed(q);  // which answers a missing or malformed key with 400
      });
    });
  }
  server.Fallback([gated, pass](Request& req) { return gated(req, pass); });
  return OkStatus();
}

}  // namespace converge::http
