// The generic routes of a converge service: webhook intake, admin API, metrics, health.
#include <charconv>
#include <map>
#include <nlohmann/json.hpp>

#include "converge/failpoint.h"
#include "converge/http_idempotency.h"
#include "converge/http_service.h"
#include "converge/inbox.h"
#include "converge/offset_clock.h"
#include "converge/webhook.h"
#include "src/core/validate.h"

namespace converge::http {
namespace {

using json = nlohmann::json;

Response NoContent() {
  Response r;
  r.status = 204;
  return r;
}

bool ParseId(std::string_view s, int64_t* id) {
  auto r = std::from_chars(s.data(), s.data() + s.size(), *id);
  return r.ec == std::errc() && r.ptr == s.data() + s.size() && *id > 0;
}

// Constant time in the token's content; its length may show (it is not the secret).
bool TokenMatches(const Request& req, const std::string& token) {
  const auto given = BearerToken(req);
  if (!given || given->size() != token.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < token.size(); ++i) diff |= (*given)[i] ^ token[i];
  return diff == 0;
}

Response Unauthorized(const char* detail) {
  Response r = Problem(401, "Unauthorized", detail, "unauthorized");
  r.Set("WWW-Authenticate", "Bearer");
  return r;
}

// Counts per group of a `SELECT key, count(*) ... GROUP BY key`, onto `defaults`.
Status Counts(Tx& tx, const std::string& sql, json defaults, json* out) {
  CONVERGE_ASSIGN_OR_RETURN(Rows rows, tx.Query(sql));
  for (const Row& r : rows) defaults[r.Text(0)] = r.Int(1);
  *out = std::move(defaults);
  return OkStatus();
}

}  // namespace

std::optional<std::string> QueryParam(std::string_view query, std::string_view name) {
  while (!query.empty()) {
    const size_t amp = query.find('&');
    std::string_view part = query.substr(0, amp);
    query = amp == std::string_view::npos ? std::string_view() : query.substr(amp + 1);
    const size_t eq = part.find('=');
    if (part.substr(0, eq) != name) continue;
    const std::string_view raw =
        eq == std::string_view::npos ? std::string_view() : part.substr(eq + 1);
    std::string out;
    for (size_t i = 0; i < raw.size(); ++i) {
      if (raw[i] == '+') {
        out.push_back(' ');
      } else if (raw[i] == '%') {
        int v = 0;
        if (i + 2 >= raw.size()) return std::nullopt;
        auto r = std::from_chars(raw.data() + i + 1, raw.data() + i + 3, v, 16);
        if (r.ec != std::errc() || r.ptr != raw.data() + i + 3) return std::nullopt;
        out.push_back(static_cast<char>(v));
        i += 2;
      } else {
        out.push_back(raw[i]);
      }
    }
    return out;
  }
  return std::nullopt;
}

json SagaObject(const SagaInstance& s) {
  json j = {{"saga_id", s.saga_id},     {"type", s.type},
            {"state", s.state},         {"step", s.step},
            {"version", s.version},     {"created_at", FormatRfc3339(s.created_at)},
            {"updated_at", FormatRfc3339(s.updated_at)}};
  json data = json::parse(s.data, nullptr, false);
  j["data"] = data.is_discarded() ? json(s.data) : data;
  if (!s.error.empty()) j["error"] = s.error;
  if (!s.history.empty()) {
    json h = json::array();
    for (const SagaStepRecord& r : s.history) {
      json e = {{"seq", r.seq},         {"step", r.step},          {"phase", r.phase},
                {"outcome", r.outcome}, {"attempt", r.attempt},    {"fence", r.fence},
                {"at", FormatRfc3339(r.at)}};
      if (!r.result.empty()) e["result"] = r.result;
      if (!r.error.empty()) e["error"] = r.error;
      h.push_back(std::move(e));
    }
    j["history"] = std::move(h);
  }
  return j;
}

json SagaJson(const SagaInstance& s) { return SagaObject(s); }

std::string DeadLetterJson(const DeadLetter& d, bool with_envelope) {
  json j = {{"id", d.id},
            {"consumer", d.consumer},
            {"queue", d.queue},
            {"event_id", d.event_id},
            {"source", d.source},
            {"type", d.type},
            {"error_class", d.error_class},
            {"error_code", d.error_code},
            {"error", d.error},
            {"attempts", d.attempts},
            {"first_failure_at", FormatRfc3339(d.first_failure_at)},
            {"last_failure_at", FormatRfc3339(d.last_failure_at)},
            {"state", d.state},
            {"replay_count", d.replay_count}};
  if (with_envelope) {
    json e = json::parse(d.envelope, nullptr, false);
    j["envelope"] = e.is_discarded() ? json(d.envelope) : e;
  }
  return j.dump();
}

// --- webhooks in ---------------------------------------------------------------------

Server::Handler WebhookIntakeRoute(Database& db, WebhookIntakeOptions options, StageFn stage) {
  if (options.metrics != nullptr) {
    options.metrics->Describe("webhooks_received_total", "counter",
                              "Verified webhook deliveries stored, by whether a duplicate.");
    options.metrics->Describe("webhooks_rejected_total", "counter",
                              "Webhook deliveries refused, by reason.");
  }
  return [&db, o = std::move(options), stage = std::move(stage)](Request& req) -> Response {
    Clock* clock = o.clock ? o.clock : Clock::System();
    auto header = [&](const char* n) {
      const std::string* v = req.Header(n);
      return v ? *v : std::string();
    };
    auto labels = [&o](Metrics::Labels l) {
      if (!o.endpoint.empty()) l.emplace_back("endpoint", o.endpoint);
      return l;
    };
    VerifiedWebhook hook{"", 0, req.body};
    const int64_t now_s = clock->NowMillis() / 1000;
    const auto tolerance = std::chrono::duration_cast<std::chrono::seconds>(o.tolerance);
    // Verify before anything is stored or even parsed.
    Status v;
    switch (o.scheme) {
      case WebhookScheme::kStandard: {
        hook.id = header("webhook-id");
        const std::string timestamp = header("webhook-timestamp");
        v = webhook::Verify(o.secrets, hook.id, timestamp, header("webhook-signature"),
                            req.body, now_s, tolerance);
        std::from_chars(timestamp.data(), timestamp.data() + timestamp.size(), hook.timestamp);
        break;
      }
      case WebhookScheme::kStripe:
        v = webhook::VerifyStripe(o.secrets, header("Stripe-Signature"), req.body, now_s,
                                  tolerance, &hook.timestamp);
        if (v.ok()) {
          const json event = json::parse(req.body, nullptr, false);
          if (event.is_object() && event.contains("id") && event["id"].is_string()) {
            hook.id = event["id"].get<std::string>();
          }
        }
        break;
      case WebhookScheme::kGitHub:
        v = webhook::VerifyGitHub(o.secrets, header("X-Hub-Signature-256"), req.body);
        hook.id = header("X-GitHub-Delivery");
        hook.timestamp = now_s;
        break;
    }
    if (!v.ok()) {
      if (o.metrics) o.metrics->Add("webhooks_rejected_total", labels({{"reason", v.reason()}}));
      return Problem(401, "Unauthorized", "webhook signature verification failed: " + v.reason(),
                     "webhook-signature");
    }
    // The id keys the dedupe row and whatever the staged work derives from it (an
    // effect's key, a log line): 1-255 bytes without control characters.
    if (!internal::ValidateToken("the delivery id", hook.id, 255).ok()) {
      if (o.metrics) o.metrics->Add("webhooks_rejected_total", labels({{"reason", "bad_id"}}));
      return Problem(400, "Bad Request",
                     "the delivery id is missing, longer than 255 bytes or has control "
                     "characters",
                     "invalid-webhook");
    }
    if (o.validate) {
      if (std::optional<Response> early = o.validate(hook)) return std::move(*early);
    }
    bool duplicate = false;
    Inbox inbox(clock);
    Status st = db.Transact([&](Tx& tx) -> Status {
      // The inbox row keyed by the webhook id and the staged work commit together.
      CONVERGE_ASSIGN_OR_RETURN(
          InboxClaim claim, inbox.Claim(tx, o.consumer, {o.source, hook.id}, o.dedupe_ttl));
      duplicate = claim == InboxClaim::kDuplicate;
      if (duplicate) return OkStatus();
      return stage(tx, hook);
    });
    if (!st.ok()) return StoreProblem(st);
    if (o.metrics) {
      o.metrics->Add("webhooks_received_total",
                     labels({{"duplicate", duplicate ? "true" : "false"}}));
    }
    return NoContent();
  };
}

// --- admin ---------------------------------------------------------------------------

Status RegisterAdminRoutes(Server& server, AdminOptions options) {
  if (options.token.size() < 8) {
    return InvalidArgumentError("admin token must be at least 8 characters");
  }
  if (options.db == nullptr || options.dead_letters == nullptr) {
    return InvalidArgumentError("admin routes need the database and the dead letters");
  }
  auto o = std::make_shared<const AdminOptions>(std::move(options));
  auto route = [&server, o](const char* method, const char* pattern,
                            std::function<Response(Request&)> fn) {
    server.Route(method, pattern, [o, fn = std::move(fn)](Request& req) -> Response {
      if (!TokenMatches(req, o->token)) return Unauthorized("the admin token is required");
      return fn(req);
    });
  };
  auto letter_id = [](Request& req, int64_t* id) { return ParseId(req.params["id"], id); };
  auto bad_id = [] { return Problem(400, "Bad Request", "bad id", "invalid-request"); };

  route("GET", "/admin/dead-letters", [o](Request& req) -> Response {
    DeadLetterFilter f;
    const std::string state = QueryParam(req.query, "state").value_or("");
    if (state == "all") {
      f.state = "";
    } else if (!state.empty()) {
      if (state != "parked" && state != "replayed" && state != "discarded") {
        return Problem(400, "Bad Request", "state must be parked, replayed, discarded or all",
                       "invalid-request");
      }
      f.state = state;
    }
    f.consumer = QueryParam(req.query, "consumer").value_or("");
    const auto limit = QueryParam(req.query, "limit"), after = QueryParam(req.query, "after");
    if (limit && (!ParseId(*limit, &f.limit) || f.limit > 1000)) {
      return Problem(400, "Bad Request", "limit must be 1..1000", "invalid-request");
    }
    if (after && !ParseId(*after, &f.after_id)) {
      return Problem(400, "Bad Request", "after must be a positive id", "invalid-request");
    }
    auto list = o->dead_letters->List(f);
    if (!list) return StoreProblem(list.error());
    std::string body = "{\"dead_letters\":[";
    for (size_t i = 0; i < list->size(); ++i) {
      body += (i ? "," : "") + DeadLetterJson((*list)[i], false);
    }
    return Json(200, body + "]}");
  });
  route("GET", "/admin/dead-letters/{id}", [o, letter_id, bad_id](Request& req) -> Response {
    int64_t id = 0;
    if (!letter_id(req, &id)) return bad_id();
    auto d = o->dead_letters->Get(id);
    if (!d && d.error().code() == StatusCode::kNotFound) {
      return Problem(404, "Not Found", d.error().message(), "not-found");
    }
    if (!d) return StoreProblem(d.error());
    return Json(200, DeadLetterJson(*d, true));
  });
  // Replay and discard: a letter leaves `parked` once; the loser of a race (or a second
  // call) gets 409, never a second copy on a queue (DeadLetters).
  auto transition = [o, letter_id, bad_id](bool replay) {
    return [o, letter_id, bad_id, replay](Request& req) -> Response {
      int64_t id = 0;
      if (!letter_id(req, &id)) return bad_id();
      Status st = replay ? o->dead_letters->Replay(id) : o->dead_letters->Discard(id);
      if (st.code() == StatusCode::kNotFound) {
        return Problem(404, "Not Found", st.message(), "not-found");
      }
      if (st.reason() == reason::kNotParked) {
        return Problem(409, "Conflict", st.message(), "not-parked");
      }
      if (!st.ok()) return StoreProblem(st);
      if (replay && o->on_replay) {
        if (auto d = o->dead_letters->Get(id)) o->on_replay(*d);
      }
      return Json(200, json{{"id", id}, {"state", replay ? "replayed" : "discarded"}}.dump());
    };
  };
  route("GET", "/admin/sagas", [o](Request& req) -> Response {
    const std::string state = QueryParam(req.query, "state").value_or("");
    const std::string type = QueryParam(req.query, "type").value_or("");
    int64_t limit = 100;
    const auto given = QueryParam(req.query, "limit");
    if (given && (!ParseId(*given, &limit) || limit > 1000)) {
      return Problem(400, "Bad Request", "limit must be 1..1000", "invalid-request");
    }
    if (!state.empty() && !saga_state::Known(state)) {
      return Problem(400, "Bad Request",
                     "state must be running, compensating, completed, compensated or "
                     "failed_to_compensate",
                     "invalid-request");
    }
    json out = json::array();
    Status st = o->db->Read([&](Tx& tx) -> Status {
      CONVERGE_ASSIGN_OR_RETURN(auto list, SagaRunner::List(tx, state, type, limit));
      for (const SagaInstance& s : list) out.push_back(SagaJson(s));
      return OkStatus();
    });
    if (!st.ok()) return StoreProblem(st);
    return Json(200, json{{"sagas", out}}.dump());
  });
  route("GET", "/admin/sagas/{id}", [o](Request& req) -> Response {
    std::optional<SagaInstance> found;
    Status st = o->db->Read([&](Tx& tx) -> Status {
      CONVERGE_ASSIGN_OR_RETURN(found, SagaRunner::Load(tx, req.params["id"]));
      return OkStatus();
    });
    if (!st.ok()) return StoreProblem(st);
    if (!found) return Problem(404, "Not Found", "no such saga", "not-found");
    return Json(200, SagaJson(*found).dump());
  });
  route("POST", "/admin/dead-letters/{id}/replay", transition(true));
  route("DELETE", "/admin/dead-letters/{id}", transition(false));
  route("GET", "/admin/stats", [o](Request&) -> Response {
    json out;
    Status st = o->db->Read([&](Tx& tx) -> Status {
      const int64_t now = Clock::System()->NowMillis();
      CONVERGE_ASSIGN_OR_RETURN(
          Rows ob, tx.Query("SELECT count(*), min(created_at) FROM outbox_events "
                            "WHERE published_at IS NULL"));
      out["outbox"] = {{"backlog", ob[0].Int(0)},
                       {"oldest_unpublished_age_ms", ob[0].IsNull(1) ? 0 : now - ob[0].Int(1)}};
      CONVERGE_ASSIGN_OR_RETURN(auto inbox, Inbox().CountByConsumer(tx));
      out["inbox"] = json::object();
      for (const auto& [consumer, rows] : inbox) out["inbox"][consumer] = rows;
      CONVERGE_RETURN_IF_ERROR(Counts(
          tx, "SELECT queue, count(*) FROM queue_messages GROUP BY queue", json::object(),
          &out["queues"]));
      CONVERGE_RETURN_IF_ERROR(Counts(
          tx, "SELECT state, count(*) FROM dead_letters GROUP BY state",
          {{"parked", 0}, {"replayed", 0}, {"discarded", 0}}, &out["dead_letters"]));
      CONVERGE_RETURN_IF_ERROR(Counts(
          tx, "SELECT status, count(*) FROM idempotency_keys GROUP BY status",
          {{"in_progress", 0}, {"completed", 0}}, &out["idempotency_keys"]));
      CONVERGE_RETURN_IF_ERROR(Counts(tx, "SELECT state, count(*) FROM effects GROUP BY state",
                                      {{"pending", 0}, {"done", 0}, {"failed", 0}},
                                      &out["effects"]));
      if (o->extra_stats) {
        CONVERGE_ASSIGN_OR_RETURN(std::string extra, o->extra_stats(tx));
        json e = json::parse(extra, nullptr, false);
        if (!e.is_object()) return InternalError("extra_stats did not return a JSON object");
        out.update(e);
      }
      return OkStatus();
    });
    if (!st.ok()) return StoreProblem(st);
    return Json(200, out.dump());
  });
  if (o->failpoints) {
    route("PUT", "/admin/failpoints", [](Request& req) -> Response {
      Status st = failpoint::Configure(req.body);
      if (!st.ok()) return Problem(400, "Bad Request", st.message(), "invalid-request");
      return Json(200, json{{"spec", req.body}}.dump());
    });
    route("GET", "/admin/failpoints/{name}", [](Request& req) -> Response {
      const std::string& name = req.params["name"];
      return Json(200, json{{"name", name},
                            {"hits", failpoint::Hits(name)},
                            {"paused", failpoint::Paused(name)}}
                           .dump());
    });
    route("POST", "/admin/failpoints/{name}/release", [](Request& req) -> Response {
      const std::string& name = req.params["name"];
      return Json(200, json{{"name", name}, {"released", failpoint::Release(name)}}.dump());
    });
  }
  if (o->clock != nullptr) {
    OffsetClock* clock = o->clock;
    auto show = [clock] {
      return Json(200, json{{"offset_ms", clock->offset().count()},
                            {"now_ms", clock->NowMillis()}}
                           .dump());
    };
    route("GET", "/admin/clock", [show](Request&) -> Response { return show(); });
    route("PUT", "/admin/clock", [clock, show](Request& req) -> Response {
      constexpr int64_t kDay = 86400000;
      json j = json::parse(req.body, nullptr, false);
      if (!j.is_object() || !j["offset_ms"].is_number_integer() ||
          j["offset_ms"].get<int64_t>() < -kDay || j["offset_ms"].get<int64_t>() > kDay) {
        return Problem(400, "Bad Request", "body must be {\"offset_ms\": -86400000..86400000}",
                       "invalid-request");
      }
      clock->SetOffset(Millis(j["offset_ms"].get<int64_t>()));
      return show();
    });
  }
  return OkStatus();
}

namespace {

// The families RegisterMetricsRoute fills, with their help. Counters that the workers
// keep are copied into the registry at each scrape (Metrics::Set), so they keep their
// counter type: they only grow within a process.
struct Family {
  const char* name;
  const char* type;
  const char* help;
};
constexpr Family kRuntimeFamilies[] = {
    {"http_requests_total", "counter", "HTTP requests by route pattern, method and status class."},
    {"http_request_duration_seconds", "histogram", "HTTP request latency by route pattern."},
    {"relay_published_total", "counter", "Outbox events published and marked, by relay."},
    {"outbox_enqueued_total", "counter",
     "Outbox events committed, by the way they took: for a relay, or published in their "
     "producer's transaction."},
    {"relay_publish_failures_total", "counter", "Relay passes whose publish failed, by relay."},
    {"relay_partitions_owned", "gauge", "Outbox partitions the relay holds a lease on."},
    {"consumer_processed_total", "counter", "Deliveries whose handler ran and committed."},
    {"consumer_duplicates_total", "counter", "Redeliveries absorbed by the consumer's inbox."},
    {"consumer_retries_total", "counter", "Deliveries given back for a later attempt."},
    {"consumer_dead_lettered_total", "counter", "Deliveries parked as dead letters."},
    {"consumer_fetch_errors_total", "counter",
     "Fetches the transport failed (broker unreachable, its consumer deleted)."},
    {"effects_executed_total", "counter", "External calls that succeeded and were recorded."},
    {"effects_retries_total", "counter", "External calls that failed transiently."},
    {"effects_failed_total", "counter", "Effect intents parked as dead letters."},
    {"effects_lost_claims_total", "counter",
     "Effect calls skipped or outcomes dropped: another runner had claimed the intent."},
    {"completer_finished_total", "counter",
     "Abandoned multi-phase requests the completer drove to a stored outcome."},
    {"completer_failed_total", "counter",
     "Completer resumes that failed; the lease was given back."},
    {"completer_lost_total", "counter",
     "Abandoned requests another completer or a retry took first."},
    {"saga_steps_total", "counter",
     "Saga actions and compensations that succeeded and were recorded, by saga type."},
    {"saga_retries_total", "counter", "Saga steps that failed transiently and were rescheduled."},
    {"sagas_completed_total", "counter", "Sagas that finished every step."},
    {"sagas_compensated_total", "counter", "Sagas whose completed steps were all compensated."},
    {"sagas_parked_total", "counter",
     "Sagas parked as failed_to_compensate by this process (alert on any increase)."},
    {"saga_lost_fences_total", "counter",
     "Saga steps whose outcome was dropped: another runner had taken the saga over."},
    {"saga_late_calls_total", "counter",
     "Saga action calls that returned after their runner lost the saga, after the step's "
     "compensation had run: the compensation was run again (or, after a sweep, parked)."},
    {"saga_late_calls_after_sweep_total", "counter",
     "Late saga action calls whose saga had been settled and swept: parked as dead letters "
     "for a person to undo (alert on any increase)."},
    {"sagas", "gauge", "Sagas in the store by state (failed_to_compensate needs an operator)."},
    {"retention_swept_total", "counter", "Expired rows the sweeper deleted."},
    {"db_transactions_total", "counter", "Transact calls completed, ok or not."},
    {"db_commits_total", "counter", "Physical commits that succeeded."},
    {"db_commit_batch_size", "histogram",
     "Transact calls carried by one physical commit (stores that batch commits)."},
    {"db_checkpoints_total", "counter", "WAL checkpoints run (SQLite)."},
    {"db_checkpoint_failures_total", "counter",
     "WAL checkpoints ended by an error other than busy: the WAL keeps growing until one "
     "succeeds (SQLite; alert on any increase)."},
    {"db_checkpoints_busy_total", "counter",
     "WAL checkpoints stopped short because another checkpoint or a reader held the WAL "
     "(SQLite; tried again later)."},
    {"db_wal_forced_restarts_total", "counter",
     "Times the writer waited for readers so that an outgrown WAL could start over (SQLite)."},
    {"db_wal_pages", "gauge",
     "WAL frames, a database page each, after the last commit (SQLite; past 32 times "
     "checkpoint_pages the writer has it start over)."},
    {"db_writer_seconds_total", "counter",
     "Seconds SQLite's writer thread spent, by activity: calls (BEGIN and the Transact "
     "calls it runs), commits (COMMIT: the WAL's writes and fsync) and waiting (no call "
     "queued; after a batch of several callers it may first poll for the next call, on "
     "CPU, for up to 50 us). Little waiting means the writer is the store's bottleneck."},
    {"outbox_backlog", "gauge", "Outbox events not yet published."},
    {"relay_lag_seconds", "gauge", "Age of the oldest unpublished outbox event."},
};

void Refresh(const MetricsRouteOptions& o, Clock* clock) {
  Metrics& m = *o.metrics;
  auto set = [&m](const char* name, const Metrics::Labels& labels, int64_t v) {
    m.Set(name, labels, static_cast<double>(v));
  };
  if (o.runtime != nullptr) {
    const OutboxStats os = o.runtime->outbox().stats();
    set("outbox_enqueued_total", {{"way", "relay"}}, os.for_relay);
    set("outbox_enqueued_total", {{"way", "in_transaction"}}, os.published_in_transaction);
    for (const auto& relay : o.runtime->relays()) {
      const RelayStats s = relay->stats();
      const Metrics::Labels l = {{"relay", relay->name()}};
      set("relay_published_total", l, s.published);
      set("relay_publish_failures_total", l, s.publish_failures);
      set("relay_partitions_owned", l, s.partitions_owned);
    }
    for (const auto& consumer : o.runtime->consumers()) {
      const ConsumerStats s = consumer->stats();
      const Metrics::Labels l = {{"consumer", consumer->name()}};
      set("consumer_processed_total", l, s.processed);
      set("consumer_duplicates_total", l, s.duplicates);
      set("consumer_retries_total", l, s.retries);
      set("consumer_dead_lettered_total", l, s.dead_lettered);
      set("consumer_fetch_errors_total", l, s.fetch_errors);
    }
    // Several runners may share a kind (e.g. a gateway target's concurrency): one series.
    std::map<std::string, EffectStats> by_kind;
    for (const auto& runner : o.runtime->effect_runners()) {
      const EffectStats s = runner->stats();
      EffectStats& sum = by_kind[runner->kind()];
      sum.executed += s.executed;
      sum.retries += s.retries;
      sum.failed += s.failed;
      sum.lost_claims += s.lost_claims;
    }
    for (const auto& [kind, s] : by_kind) {
      const Metrics::Labels l = {{"kind", kind}};
      set("effects_executed_total", l, s.executed);
      set("effects_retries_total", l, s.retries);
      set("effects_failed_total", l, s.failed);
      set("effects_lost_claims_total", l, s.lost_claims);
    }
    // A process may run several runners of one type: their counts add up under its label.
    std::map<std::string, SagaStats> sagas;
    for (const auto& runner : o.runtime->saga_runners()) {
      const SagaStats s = runner->stats();
      SagaStats& sum = sagas[runner->definition().type];
      for (int64_t SagaStats::*f :
           {&SagaStats::steps, &SagaStats::retries, &SagaStats::completed, &SagaStats::compensated,
            &SagaStats::parked, &SagaStats::lost_fences, &SagaStats::late_calls,
            &SagaStats::late_calls_after_sweep}) {
        sum.*f += s.*f;
      }
    }
    for (const auto& [type, s] : sagas) {
      const Metrics::Labels l = {{"type", type}};
      set("saga_steps_total", l, s.steps);
      set("saga_retries_total", l, s.retries);
      set("sagas_completed_total", l, s.completed);
      set("sagas_compensated_total", l, s.compensated);
      set("sagas_parked_total", l, s.parked);
      set("saga_lost_fences_total", l, s.lost_fences);
      set("saga_late_calls_total", l, s.late_calls);
      set("saga_late_calls_after_sweep_total", l, s.late_calls_after_sweep);
    }
    const CompleterStats cs = o.runtime->completer().stats();
    set("completer_finished_total", {}, cs.finished);
    set("completer_failed_total", {}, cs.failed);
    set("completer_lost_total", {}, cs.lost);
    set("retention_swept_total", {}, o.runtime->stats().swept);
  }
  if (o.db != nullptr) {
    const DatabaseStats ds = o.db->stats();
    set("db_transactions_total", {}, ds.transactions);
    set("db_commits_total", {}, ds.commits);
    // The store's own histogram: commits that carried [2^i, 2^(i+1)) calls.
    if (!ds.batch_histogram.empty()) {
      std::vector<double> bounds;
      std::vector<uint64_t> cumulative;
      uint64_t sum = 0;
      for (size_t i = 0; i < ds.batch_histogram.size(); ++i) {
        sum += static_cast<uint64_t>(ds.batch_histogram[i]);
        bounds.push_back(static_cast<double>((int64_t{2} << i) - 1));
        cumulative.push_back(sum);
      }
      m.SetHistogram("db_commit_batch_size", {}, bounds, cumulative,
                     static_cast<double>(ds.transactions), static_cast<uint64_t>(ds.commits));
    }
    if (ds.wal) {
      set("db_checkpoints_total", {}, ds.wal->checkpoints);
      set("db_checkpoint_failures_total", {}, ds.wal->checkpoint_failures);
      set("db_checkpoints_busy_total", {}, ds.wal->checkpoints_busy);
      set("db_wal_forced_restarts_total", {}, ds.wal->restarts_forced);
      set("db_wal_pages", {}, ds.wal->pages);
    }
    if (ds.writer) {
      m.Set("db_writer_seconds_total", {{"activity", "calls"}}, ds.writer->calls);
      m.Set("db_writer_seconds_total", {{"activity", "commits"}}, ds.writer->commits);
      m.Set("db_writer_seconds_total", {{"activity", "waiting"}}, ds.writer->waiting);
    }
    const int64_t now = clock->NowMillis();
    (void)o.db->Read([&](Tx& tx) -> Status {
      CONVERGE_ASSIGN_OR_RETURN(Rows rows,
                                tx.Query("SELECT count(*), min(created_at) FROM outbox_events "
                                         "WHERE published_at IS NULL"));
      set("outbox_backlog", {}, rows[0].Int(0));
      m.Set("relay_lag_seconds", {}, rows[0].IsNull(1) ? 0.0 : (now - rows[0].Int(1)) / 1000.0);
      if (o.runtime != nullptr && !o.runtime->saga_runners().empty()) {
        // Every state, zeros included: an alert on failed_to_compensate > 0 needs the series.
        for (std::string_view state : {saga_state::kRunning, saga_state::kCompensating,
                                       saga_state::kCompleted, saga_state::kCompensated,
                                       saga_state::kFailedToCompensate}) {
          set("sagas", {{"state", std::string(state)}}, 0);
        }
        CONVERGE_ASSIGN_OR_RETURN(
            Rows sagas, tx.Query("SELECT state, count(*) FROM saga_instances GROUP BY state"));
        for (const Row& r : sagas) set("sagas", {{"state", r.Text(0)}}, r.Int(1));
      }
      return OkStatus();
    });
  }
}

}  // namespace

Status RegisterMetricsRoute(Server& server, MetricsRouteOptions options) {
  if (options.metrics == nullptr) {
    return InvalidArgumentError("RegisterMetricsRoute: no Metrics registry");
  }
  for (const Family& f : kRuntimeFamilies) options.metrics->Describe(f.name, f.type, f.help);
  Metrics* metrics = options.metrics;
  server.OnExchange([metrics](const Exchange& x) {
    metrics->Add("http_requests_total", {{"route", x.route},
                                         {"method", std::string(x.method)},
                                         {"status", std::string(StatusClass(x.status))}});
    metrics->Observe("http_request_duration_seconds", {{"route", x.route}}, x.seconds,
                     {0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5});
  });
  Clock* clock = options.clock != nullptr ? options.clock : Clock::System();
  server.Route("GET", "/metrics", [options, clock](Request&) {
    Refresh(options, clock);
    Response r;
    r.status = 200;
    r.headers = {{"Content-Type", "text/plain; version=0.0.4; charset=utf-8"}};
    r.body = options.metrics->Render();
    return r;
  });
  return OkStatus();
}

void RegisterHealthRoutes(Server& server, Database& db, std::function<bool()> stopping) {
  server.Route("GET", "/healthz", [](Request&) { return Json(200, "{\"status\":\"ok\"}"); });
  server.Route("GET", "/readyz", [&db, stopping = std::move(stopping)](Request&) -> Response {
    if (stopping && stopping()) {
      return Problem(503, "Service Unavailable", "shutting down", "unavailable");
    }
    Status st = db.Read([](Tx& tx) { return StatusOf(tx.Query("SELECT 1")); });
    if (!st.ok()) {
      return Problem(503, "Service Unavailable", "the store is unreachable", "unavailable");
    }
    return Json(200, "{\"status\":\"ready\"}");
  });
}

std::string SagaToJson(const SagaInstance& saga) { return SagaObject(saga).dump(); }

}  // namespace converge::http
