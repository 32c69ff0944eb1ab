// The generic routes every converge service serves, for any service built on the HTTP
// server: Standard Webhooks intake, the admin API (dead letters, stats, failpoint hooks)
// and health. A service registers them beside its own routes; it keeps only its domain.
//
// Thread safety: the registered handlers are safe to run from many server workers.
#ifndef CONVERGE_HTTP_SERVICE_H_
#define CONVERGE_HTTP_SERVICE_H_

#include <chrono>
#include <functional>
#include <string>
#include <vector>

#include "converge/clock.h"
#include "converge/database.h"
#include "converge/dead_letters.h"
#include "converge/event.h"
#include "converge/http.h"
#include "converge/metrics.h"
#include "converge/runtime.h"
#include "converge/saga.h"
#include "converge/status.h"

namespace converge {
class OffsetClock;  // converge/offset_clock.h
}  // namespace converge

namespace converge::http {

// --- webhooks in ---------------------------------------------------------------------

struct VerifiedWebhook {
  std::string id;         // webhook-id: its dedupe identity with the source
  int64_t timestamp = 0;  // webhook-timestamp, seconds
  std::string body;
};

// How a sender signs, and where its delivery id is:
//   kStandard  Standard Webhooks: webhook-id, webhook-timestamp, webhook-signature
//   kStripe    Stripe-Signature (t=..,v1=..); the id is the event's "id" in the JSON body
//   kGitHub    X-Hub-Signature-256 (sha256=..); the id is X-GitHub-Delivery (GitHub signs
//              no timestamp: the dedupe row is the only replay protection)
enum class WebhookScheme { kStandard, kStripe, kGitHub };

struct WebhookIntakeOptions {
  WebhookScheme scheme = WebhookScheme::kStandard;
  std::string consumer;  // the inbox that dedupes deliveries, e.g. "webhook:psp"
  std::string source;    // the sender, e.g. "urn:converge:psp": (source, id) is the identity
  std::vector<std::string> secrets;  // "whsec_..."; several while a key rotates
  Millis tolerance = std::chrono::minutes(5);  // accepted clock skew of webhook-timestamp
  // How long a delivery's dedupe row lives: longer than the sender's retry schedule.
  Millis dedupe_ttl = std::chrono::hours(24 * 30);
  // Runs after the signature was verified and before anything is stored: a Response here
  // (e.g. 400 for a body the service cannot use) is answered and nothing is stored.
  std::function<std::optional<Response>(const VerifiedWebhook&)> validate;
  // When set: webhooks_received_total{duplicate}, webhooks_rejected_total{reason}, each
  // also labelled {endpoint} when `endpoint` is set.
  Metrics* metrics = nullptr;
  std::string endpoint;
  Clock* clock = nullptr;  // nullptr: Clock::System()
};

// Stages the work a verified, first-seen delivery asks for, in the same transaction as
// its inbox row (e.g. enqueue an event for a consumer). An error rolls both back. It may
// run more than once (Database::Transact).
using StageFn = std::function<Status(Tx&, const VerifiedWebhook&)>;

// POST handler: verify the signature (of `scheme`) before anything else (401 problem on
// failure, nothing stored); 400 for a delivery id that is missing, over 255 bytes or has
// control characters; then in one transaction the inbox row keyed by (source,
// webhook-id) and the staged work; commit; only then 204. A duplicate delivery gets 204
// and stages nothing. Store failures: 503 + Retry-After (the sender retries) or 500.
Server::Handler WebhookIntakeRoute(Database& db, WebhookIntakeOptions options, StageFn stage);

// --- metrics -------------------------------------------------------------------------

struct MetricsRouteOptions {
  Metrics* metrics = nullptr;  // required: the service's own families; the rest join them
  Runtime* runtime = nullptr;  // its relays, consumers, effect runners, completer, sweeper
  Database* db = nullptr;      // transactions, commits, group-commit batch sizes, outbox
                               // backlog and lag (one read per scrape)
  Clock* clock = nullptr;      // for the lag; nullptr: Clock::System()
};

// Registers GET /metrics (Prometheus text exposition format 0.0.4; every family with
// # HELP and # TYPE) and an exchange observer that counts every request of `server` as
// http_requests_total{route,method,status} (status as "2xx".."5xx") and
// http_request_duration_seconds{route}: labels only from bounded sets, so a client cannot
// mint series. Each scrape refreshes the figures of `runtime` and `db` first. Call before
// server.Start(). kInvalidArgument without `metrics`.
Status RegisterMetricsRoute(Server& server, MetricsRouteOptions options);

// --- admin ---------------------------------------------------------------------------

struct AdminOptions {
  std::string token;  // the admin bearer token (at least 8 characters)
  Database* db = nullptr;
  DeadLetters* dead_letters = nullptr;
  // Called after a replay succeeded (e.g. to wake the worker that will pick it up).
  std::function<void(const DeadLetter&)> on_replay;
  // Adds the service's own figures to GET /admin/stats: a JSON object whose members are
  // merged into the answer, read in the same snapshot.
  std::function<Result<std::string>(Tx&)> extra_stats;
  // Serve the failpoint hooks (PUT /admin/failpoints, GET /admin/failpoints/{name},
  // POST /admin/failpoints/{name}/release): tests, the demo and chaos runs only.
  bool failpoints = false;
  // Serve the clock hook (GET /admin/clock, PUT /admin/clock with {"offset_ms": n}: the
  // offset of this clock from its base, |n| <= 1 day) when set: chaos runs only. Must
  // outlive the server.
  OffsetClock* clock = nullptr;
};

// Registers, all behind the admin token (401 otherwise):
//   GET    /admin/dead-letters[?state=parked|replayed|discarded|all&consumer=C&limit=N&after=ID]
//   GET    /admin/dead-letters/{id}         (with the envelope)
//   POST   /admin/dead-letters/{id}/replay  (409 not-parked when it is no longer parked)
//   DELETE /admin/dead-letters/{id}         (discard; 409 likewise)
//   GET    /admin/stats                     (outbox, inbox, queues, dead letters, keys,
//                                            effects, plus extra_stats)
//   GET    /admin/sagas[?state=S&type=T&limit=N]  (newest first; 400 for an unknown state)
//   GET    /admin/sagas/{id}                (with its step log)
// and the failpoint and clock hooks when enabled. kInvalidArgument for missing pieces.
Status RegisterAdminRoutes(Server& server, AdminOptions options);

// A saga as the admin API shows it: a JSON object with saga_id, type, state, step, data
// (as JSON when it parses), error, times, and its step log under "history" when loaded.
std::string SagaToJson(const SagaInstance& saga);

// GET /healthz (the process answers) and GET /readyz (the store answers and the service
// is not stopping; 503 problem otherwise).
void RegisterHealthRoutes(Server& server, Database& db, std::function<bool()> stopping);

// A dead letter as JSON, the same for the admin API and `converge dlq --json`; with the
// envelope (parsed when it is JSON) when asked.
std::string DeadLetterJson(const DeadLetter& letter, bool with_envelope);

// The value of `name` in a query string ("a=1&b=x%20y"), %-escapes and '+' decoded;
// nullopt when absent or when an escape is malformed.
std::optional<std::string> QueryParam(std::string_view query, std::string_view name);

}  // namespace converge::http

#endif  // CONVERGE_HTTP_SERVICE_H_
