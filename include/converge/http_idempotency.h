// The Idempotency-Key middleware: the HTTP half of idempotency keys (idempotency.h), for
// any route of any service built on converge's HTTP server.
//
// It implements the IETF draft draft-ietf-httpapi-idempotency-key-header:
//   - the key comes from the `Idempotency-Key` header, as a structured-field string
//     ("...") or bare; 1-255 printable ASCII characters. Missing where required -> 400
//     (problem type idempotency-key-missing); malformed -> 400 (idempotency-key-malformed);
//   - its scope is the caller's principal (`IdempotencyRouteOptions::scope`): a tenant can
//     never read another tenant's stored response. No principal -> 401;
//   - the fingerprint covers method, path with its query, and the canonical body
//     (RequestFingerprint);
//   - the same key with another fingerprint -> 422 (idempotency-key-reused); while the
//     first request still runs -> 409 with Retry-After (request-in-progress); a completed
//     key -> the stored status, headers and body, byte for byte, with
//     `Idempotent-Replayed: true`;
//   - store failures -> 503 with Retry-After (transient) or 500, as problem+json.
//
// Two shapes, as in idempotency.h. A single-phase handler writes only to the database: it
// runs inside IdempotencyKeys::Execute, and its response is stored in the same
// transaction. A multi-phase handler (an external call between phases) receives the
// KeyLease and drives Advance/Complete itself; only what it Completes is stored.
//
// Thread safety: the returned handlers are safe to run from many server workers at once.
#ifndef CONVERGE_HTTP_IDEMPOTENCY_H_
#define CONVERGE_HTTP_IDEMPOTENCY_H_

#include <functional>
#include <optional>
#include <string>

#include "converge/database.h"
#include "converge/http.h"
#include "converge/idempotency.h"
#include "converge/metrics.h"
#include "converge/status.h"

namespace converge::http {

// The key of `Idempotency-Key`: nullopt when the header is absent; kInvalidArgument when
// it is malformed (empty, over 255 characters, not printable ASCII, an unterminated or
// escaped structured-field string) or sent twice.
Result<std::optional<std::string>> ParseIdempotencyKey(const Request& request);

struct IdempotencyRouteOptions {
  // The caller's principal, the key's scope (e.g. the tenant of the API key); nullopt
  // answers 401. Required.
  std::function<std::optional<std::string>(const Request&)> scope;
  // Runs before the key is claimed; a Response here (e.g. 400 for a malformed body) is
  // answered as is and nothing is stored, so a corrected retry may reuse the key.
  std::function<std::optional<Response>(Request&)> validate;
  // When set: idempotency_replays_total, idempotency_conflicts_total,
  // idempotency_mismatches_total, idempotency_resumed_total.
  Metrics* metrics = nullptr;
};

// fn(tx, request): the route's effects through `tx`, and its answer. A Response of any
// status is stored and replayed; an error stores nothing (a retry runs again) and is
// answered as problem+json. It may run more than once (a transaction run again,
// Database::Transact): changes it makes to `request` must give the same result twice.
using SinglePhaseFn = std::function<Result<Response>(Tx&, Request&)>;
// The prepared shape of a single-phase route: prepare(request) runs on the handler's
// thread before the key's transaction (for a completed key its replay or 422 comes first,
// without prepare, unless IdempotencyOptions::snapshot_first skips that read: then prepare
// runs and the write path replays) and returns the transaction's body, which holds what it
// prepared; so prepare must do nothing outside the process that a replay must not. Work that
// needs no transaction (parsing, ids drawn ahead, Outbox::Prepare) then stays off the
// thread that runs every transaction on SQLite. prepare's error is answered as fn's would
// be, and nothing is stored, unless the key was completed or claimed meanwhile: then its
// answer. The body may run more than once (a retried transaction).
using PreparedTxFn = std::function<Result<Response>(Tx&)>;
using SinglePhasePrepareFn = std::function<Result<PreparedTxFn>(Request&)>;
// fn(lease, kind, request): kind is kStarted or kResumed (from lease.recovery_point).
// Returns the answer; what it stored through IdempotencyKeys::Complete is what replays.
using MultiPhaseFn = std::function<Response(KeyLease&, Begun::Kind, Request&)>;

// Route handlers. `keys` must outlive them.
Server::Handler SinglePhaseRoute(IdempotencyKeys& keys, IdempotencyRouteOptions options,
                                 SinglePhaseFn fn);
Server::Handler SinglePhaseRoute(IdempotencyKeys& keys, IdempotencyRouteOptions options,
                                 SinglePhasePrepareFn prepare);
// The prepared single-phase route as an asynchronous handler (Server::RouteAsync): it
// answers as the one above, but nothing waits for the key's transaction. `scope`,
// `validate` and `prepare` run on the connection's I/O thread, so they must not block
// (an API key looked up in memory, a body parsed, ids drawn, Outbox::Prepare); the key's
// write path goes to the store's writer through IdempotencyKeys::ExecuteAsync, and its
// commit answers. What needs a read of the store, and every request on a store without
// Database::transacts_async() (PostgreSQL), runs on the server's worker pool instead,
// as the blocking route would. On SQLite the writer builds the answer: a route whose
// transaction body returns a large response costs the writer its copy.
Server::AsyncHandler SinglePhaseAsyncRoute(IdempotencyKeys& keys,
                                           IdempotencyRouteOptions options,
                                           SinglePhasePrepareFn prepare);
Server::Handler MultiPhaseRoute(IdempotencyKeys& keys, IdempotencyRouteOptions options,
                                MultiPhaseFn fn);

// The stored form of a response and back; replays carry Idempotent-Replayed: true.
StoredResponse ToStored(const Response& response);
Response FromStored(const StoredResponse& stored, bool replayed);

// A store failure as problem+json: 503 + Retry-After when transient, else 500. The
// message stays in the logs, never in the answer (it may carry SQL).
Response StoreProblem(const Status& status);

}  // namespace converge::http

#endif  // CONVERGE_HTTP_IDEMPOTENCY_H_
