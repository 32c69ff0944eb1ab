#include "converge/http_idempotency.h"

#include <strings.h>

#include <algorithm>

namespace converge::http {
namespace {

constexpr size_t kMaxKey = 255;

bool Printable(unsigned char c) { return c >= 0x20 && c < 0x7f; }

Status Malformed(std::string_view why) {
  return InvalidArgumentError("the Idempotency-Key " + std::string(why) +
                              " (1-255 printable ASCII characters, bare or as a "
                              "structured-field string)");
}

void Count(Metrics* metrics, const char* name) {
  if (metrics != nullptr) metrics->Add(name);
}

// The families Count() fills, declared when a route is made.
void DescribeFamilies(Metrics* metrics) {
  if (metrics == nullptr) return;
  metrics->Describe("idempotency_replays_total", "counter",
                    "Requests answered from a stored response (Idempotent-Replayed).");
  metrics->Describe("idempotency_conflicts_total", "counter",
                    "Requests refused with 409 while the same key was in flight.");
  metrics->Describe("idempotency_mismatches_total", "counter",
                    "Requests refused with 422: a key reused with a different request.");
  metrics->Describe("idempotency_resumed_total", "counter",
                    "Multi-phase requests resumed from a recovery point.");
}

// Claims failed: the IETF mapping (422, 409 + Retry-After, 400) or a store problem.
Response ClaimProblem(const Status& e, Metrics* metrics) {
  if (e.reason() == reason::kFingerprintMismatch) {
    Count(metrics, "idempotency_mismatches_total");
    return ProblemFor(e, "idempotency-key-reused",
                      "this Idempotency-Key was already used with a different request");
  }
  if (e.reason() == reason::kInFlight || e.reason() == reason::kMultiPhase) {
    Count(metrics, "idempotency_conflicts_total");
    return ProblemFor(Status(StatusCode::kUnavailable, e.message(), reason::kInFlight)
                          .WithRetryAfter(std::max<int64_t>(e.retry_after_ms(), 1000)),
                      "request-in-progress",
                      "a request with this Idempotency-Key is still being processed");
  }
  if (e.code() == StatusCode::kInvalidArgument) return ProblemFor(e, "idempotency-key-malformed");
  return StoreProblem(e);
}

// What every route does before the key is claimed: principal, key, validation.
struct Prepared {
  std::optional<Response> answer;  // answer this at once
  KeyRequest key;
};

Prepared Prepare(Request& req, const IdempotencyRouteOptions& o) {
  Prepared p;
  std::optional<std::string> scope = o.scope ? o.scope(req) : std::nullopt;
  if (!scope) {
    Response r = Problem(401, "Unauthorized", "valid credentials are required", "unauthorized");
    r.Set("WWW-Authenticate", "Bearer");
    p.answer = std::move(r);
    return p;
  }
  auto key = ParseIdempotencyKey(req);
  if (!key) {
    p.answer = ProblemFor(key.error(), "idempotency-key-malformed");
    return p;
  }
  if (!*key) {
    p.answer = Problem(400, "Bad Request", "the Idempotency-Key header is required",
                       "idempotency-key-missing");
    return p;
  }
  if (o.validate) {
    if (std::optional<Response> early = o.validate(req)) {
      p.answer = std::move(*early);
      return p;
    }
  }
  // The path with its query, as sent: `?amount=5` and `?amount=500` are two requests. A
  // request without a query keeps the fingerprint it had before queries counted.
  const std::string target = req.query.empty() ? req.path : req.path + "?" + req.query;
  p.key = KeyRequest{std::move(*scope), std::move(**key),
                     RequestFingerprint(req.method, target, req.body)};
  return p;
}

}  // namespace

Result<std::optional<std::string>> ParseIdempotencyKey(const Request& request) {
  const std::string* raw = nullptr;
  for (const auto& [name, value] : request.headers) {
    if (name.size() != 15 || strncasecmp(name.c_str(), "Idempotency-Key", 15) != 0) continue;
    if (raw != nullptr) return tl::unexpected(Malformed("header was sent more than once"));
    raw = &value;
  }
  if (raw == nullptr) return std::optional<std::string>();
  std::string_view v = *raw;
  std::string key;
  if (!v.empty() && v.front() == '"') {
    // RFC 8941 sf-string: printable ASCII, with \" and \\ as the only escapes.
    size_t i = 1;
    bool closed = false;
    for (; i < v.size(); ++i) {
      const unsigned char c = static_cast<unsigned char>(v[i]);
      if (c == '"') {
        closed = true;
        ++i;
        break;
      }
      if (c == '\\') {
        if (i + 1 >= v.size() || (v[i + 1] != '"' && v[i + 1] != '\\')) {
          return tl::unexpected(Malformed("has a bad escape"));
        }
        key.push_back(v[++i]);
        continue;
      }
      if (!Printable(c)) return tl::unexpected(Malformed("is not printable ASCII"));
      key.push_back(static_cast<char>(c));
    }
    if (!closed || i != v.size()) return tl::unexpected(Malformed("is an unterminated string"));
  } else {
    for (unsigned char c : v) {
      if (!Printable(c)) return tl::unexpected(Malformed("is not printable ASCII"));
    }
    key = std::string(v);
  }
  if (key.empty()) return tl::unexpected(Malformed("is empty"));
  if (key.size() > kMaxKey) return tl::unexpected(Malformed("is too long"));
  return std::optional<std::string>(std::move(key));
}

StoredResponse ToStored(const Response& r) { return StoredResponse{r.status, r.headers, r.body}; }

Response FromStored(const StoredResponse& s, bool replayed) {
  Response r;
  r.status = s.status;
  r.headers = s.headers;
  r.body = s.body;
  if (replayed) r.Set("Idempotent-Replayed", "true");
  return r;
}

Response StoreProblem(const Status& st) {
  Response r = st.transient()
                   ? Problem(503, "Service Unavailable", "the store is unavailable; retry",
                             "unavailable")
                   : Problem(500, "Internal Server Error", "unexpected store error", "internal");
  if (st.transient()) r.Set("Retry-After", "1");
  return r;
}

// A transient error of the route's own (its prepare or its body): the handler may have
// failed on anything, a downstream call as well as the store, so the answer names neither;
// what the client needs to know is that nothing was stored for its key.
Response HandlerRetryProblem(const Status& st) {
  Response r = Problem(503, "Service Unavailable",
                       "the request could not be completed now and nothing was stored for "
                       "its key; retry with the same key",
                       "unavailable");
  r.Set("Retry-After", std::to_string(std::max<int64_t>(1, (st.retry_after_ms() + 999) / 1000)));
  return r;
}

Server::Handler SinglePhaseRoute(IdempotencyKeys& keys, IdempotencyRouteOptions options,
                                 SinglePhaseFn fn) {
  return SinglePhaseRoute(keys, std::move(options),
                          [fn = std::move(fn)](Request& req) -> Result<PreparedTxFn> {
                            return PreparedTxFn([&fn, &req](Tx& tx) { return fn(tx, req); });
                          });
}

namespace {

// One single-phase request, from its prepare through the transaction to its answer.
struct SinglePhaseCall {
  // A handler's own error response is stored like any answer; its Status error is not.
  std::optional<Status> handler_error;
  PreparedTxFn body;

  // IdempotencyKeys::Execute's `before`.
  Status Before(const SinglePhasePrepareFn& prepare, Request& req) {
    Result<PreparedTxFn> prepared = prepare(req);
    if (!prepared) {
      handler_error = prepared.error();
      return prepared.error();
    }
    if (!*prepared) {
      handler_error = InternalError("the route's prepare returned no transaction body");
      return *handler_error;
    }
    body = std::move(*prepared);
    return OkStatus();
  }

  // IdempotencyKeys::Execute's fn.
  Result<StoredResponse> Run(Tx& tx) {
    handler_error.reset();
    Result<Response> r = body(tx);
    if (!r) {
      handler_error = r.error();
      return tl::unexpected(r.error());
    }
    return ToStored(*r);
  }

  Response Answer(const Result<Outcome>& out, Metrics* metrics) const {
    if (out) {
      if (out->replayed) Count(metrics, "idempotency_replays_total");
      return FromStored(out->response, out->replayed);
    }
    // The handler's (or prepare's) own error, unless the key answered instead (prepare
    // failed, and the key had been completed or claimed meanwhile: Execute says so).
    if (handler_error && *handler_error == out.error()) {
      const Status& e = *handler_error;
      return e.transient() ? HandlerRetryProblem(e) : ProblemFor(e, "invalid-request");
    }
    return ClaimProblem(out.error(), metrics);
  }
};

}  // namespace

Server::Handler SinglePhaseRoute(IdempotencyKeys& keys, IdempotencyRouteOptions options,
                                 SinglePhasePrepareFn prepare) {
  DescribeFamilies(options.metrics);
  return [&keys, o = std::move(options), prepare = std::move(prepare)](Request& req) -> Response {
    Prepared p = Prepare(req, o);
    if (p.answer) return std::move(*p.answer);
    SinglePhaseCall call;
    auto out = keys.Execute(
        p.key, [&] { return call.Before(prepare, req); },
        [&](Tx& tx) { return call.Run(tx); });
    return call.Answer(out, o.metrics);
  };
}

Server::AsyncHandler SinglePhaseAsyncRoute(IdempotencyKeys& keys,
                                           IdempotencyRouteOptions options,
                                           SinglePhasePrepareFn prepare) {
  DescribeFamilies(options.metrics);
  auto o = std::make_shared<const IdempotencyRouteOptions>(std::move(options));
  auto prep = std::make_shared<const SinglePhasePrepareFn>(std::move(prepare));
  return [&keys, o, prep](Request& req, Responder respond) {
    Prepared p = Prepare(req, *o);
    if (p.answer) return respond(std::move(*p.answer));
    auto call = std::make_shared<SinglePhaseCall>();
    // `req` lives until the request is answered (Server::RouteAsync), and `before` runs
    // before that.
    keys.ExecuteAsync(
        std::move(p.key), [call, prep, &req] { return call->Before(*prep, req); },
        [call](Tx& tx) { return call->Run(tx); },
        [call, o, respond](Result<Outcome> out) { respond(call->Answer(out, o->metrics)); },
        [respond](std::function<void()> work) { respond.Block(std::move(work)); });
  };
}

Server::Handler MultiPhaseRoute(IdempotencyKeys& keys, IdempotencyRouteOptions options,
                                MultiPhaseFn fn) {
  DescribeFamilies(options.metrics);
  return [&keys, o = std::move(options), fn = std::move(fn)](Request& req) -> Response {
    Prepared p = Prepare(req, o);
    if (p.answer) return std::move(*p.answer);
    auto begun = keys.Begin(p.key);
    if (!begun) return ClaimProblem(begun.error(), o.metrics);
    if (begun->kind == Begun::Kind::kReplayed) {
      Count(o.metrics, "idempotency_replays_total");
      return FromStored(begun->response, true);
    }
    if (begun->kind == Begun::Kind::kResumed) Count(o.metrics, "idempotency_resumed_total");
    return fn(begun->lease, begun->kind, req);
  };
}

}  // namespace converge::http
