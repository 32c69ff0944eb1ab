#include "examples/payments/service.h"

#include <unistd.h>

#include <atomic>
#include <charconv>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <set>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "converge/completer.h"
#include "converge/consumer.h"
#include "converge/database.h"
#include "converge/dead_letters.h"
#include "converge/effects.h"
#include "converge/failpoint.h"
#include "converge/http.h"
#include "converge/idempotency.h"
#include "converge/metrics.h"
#include "converge/outbox.h"
#include "converge/relay.h"
#include "converge/sql_queue.h"
#include "converge/sweeper.h"
#include "converge/webhook.h"
#include "examples/payments/ids.h"

namespace payments {
namespace {

using converge::Begun;
using converge::Database;
using converge::Event;
using converge::KeyLease;
using converge::Result;
using converge::Rows;
using converge::Status;
using converge::StatusCode;
using converge::StoredResponse;
using converge::Tx;
using converge::http::Json;
using converge::http::Problem;
using converge::http::Request;
using converge::http::Response;
using json = nlohmann::json;

const std::set<std::string> kCurrencies = {"EUR", "USD", "GBP", "CHF", "JPY"};
constexpr int64_t kMaxAmount = 100'000'000;  // minor units
constexpr const char* kPspSource = "urn:converge:psp";
// Webhook dedupe rows outlive any provider's retry schedule (Standard Webhooks senders
// retry for days, not weeks).
constexpr int64_t kWebhookDedupeMillis = 30LL * 24 * 3600 * 1000;

bool ValidId(const std::string& s) {
  if (s.empty() || s.size() > 64) return false;
  for (char c : s) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_')) return false;
  }
  return true;
}

std::string NowIso() { return converge::FormatRfc3339(converge::Clock::System()->NowMillis()); }

Response FromStored(const StoredResponse& s, bool replayed) {
  Response r;
  r.status = s.status;
  r.headers = s.headers;
  r.body = s.body;
  if (replayed) r.Set("Idempotent-Replayed", "true");
  return r;
}

StoredResponse ToStored(const Response& r) { return StoredResponse{r.status, r.headers, r.body}; }

Status NotPending(const std::string& payment_id) {
  return converge::FailedPreconditionError("payment " + payment_id + " is no longer pending");
}

Response StoreError(const Status& st) {
  Response r = Problem(converge::http::HttpStatusFor(st.code()),
                       st.transient() ? "Service Unavailable" : "Internal Server Error",
                       st.transient() ? "the store is unavailable; retry" : "unexpected store error",
                       st.transient() ? "unavailable" : "internal");
  if (st.transient()) r.Set("Retry-After", "1");
  return r;
}

// The body of POST /v1/payments, validated.
struct PaymentRequest {
  int64_t amount = 0;
  std::string currency, customer_id, order_id;
};

Result<PaymentRequest> ParsePayment(const std::string& body) {
  json j = json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return tl::unexpected(converge::InvalidArgumentError("body is not valid JSON"));
  if (!j.is_object()) return tl::unexpected(converge::InvalidArgumentError("body must be a JSON object"));
  PaymentRequest p;
  auto amount = j.find("amount");
  if (amount == j.end() || !amount->is_number_integer()) {
    return tl::unexpected(converge::InvalidArgumentError("amount must be an integer (minor units)"));
  }
  if (amount->is_number_unsigned() ? amount->get<uint64_t>() > static_cast<uint64_t>(kMaxAmount)
                                   : (amount->get<int64_t>() < 1 || amount->get<int64_t>() > kMaxAmount)) {
    return tl::unexpected(converge::InvalidArgumentError(
        "amount must be between 1 and " + std::to_string(kMaxAmount)));
  }
  p.amount = amount->get<int64_t>();
  if (p.amount < 1) {
    return tl::unexpected(converge::InvalidArgumentError(
        "amount must be between 1 and " + std::to_string(kMaxAmount)));
  }
  for (auto [name, out] : {std::pair{"currency", &p.currency}, {"customer_id", &p.customer_id},
                           {"order_id", &p.order_id}}) {
    auto it = j.find(name);
    if (it == j.end() || !it->is_string()) {
      return tl::unexpected(converge::InvalidArgumentError(std::string(name) + " must be a string"));
    }
    *out = it->get<std::string>();
  }
  if (!kCurrencies.count(p.currency)) {
    return tl::unexpected(converge::InvalidArgumentError("unknown currency '" + p.currency + "'"));
  }
  if (!ValidId(p.customer_id) || !ValidId(p.order_id)) {
    return tl::unexpected(converge::InvalidArgumentError(
        "customer_id and order_id must be 1-64 characters of [A-Za-z0-9_-]"));
  }
  return p;
}

}  // namespace

class Service::Impl {
 public:
  explicit Impl(ServiceConfig c) : cfg_(std::move(c)) {}

  Status Start();
  void Stop();
  uint16_t port() const { return server_ ? server_->port() : 0; }

 private:
  // --- HTTP handlers ---
  Response CreatePayment(Request& req);
  Response GetPayment(Request& req);
  Response PspWebhook(Request& req);
  Response AdminList(Request& req);
  Response AdminGet(Request& req);
  Response AdminReplay(Request& req);
  Response AdminDiscard(Request& req);
  Response AdminStats(Request& req);
  Response AdminFailpointsSet(Request& req);
  Response AdminFailpointGet(Request& req);
  Response AdminFailpointRelease(Request& req);
  Response Metrics(Request& req);
  Response Ready(Request& req);

  // Maps `Authorization: Bearer <key>` to a tenant; nullptr when unknown.
  const std::string* Tenant(const Request& req) const;
  bool IsAdmin(const Request& req) const;
  // Runs the phases from lease.recovery_point. `stored` (optional) tells whether the
  // answer is the request's stored outcome (else the lease was given back or lost).
  Response RunPayment(KeyLease lease, const std::string& tenant, const PaymentRequest& p,
                      bool* stored = nullptr);
  // The completer's resume: rebuilds the request from the payment row and runs it on.
  Status ResumeAbandoned(KeyLease& lease);
  Status CreateTables();
  void RegisterConsumers();
  void RefreshGauges();

  // --- consumers ---
  Status OnCapturedLedger(Tx& tx, const Event& e);
  Status OnRefundedLedger(Tx& tx, const Event& e);
  Status OnCapturedEmail(Tx& tx, const Event& e);
  Status OnPspWebhook(Tx& tx, const Event& e);
  Result<std::string> SendReceipt(const std::string& key, const std::string& payload);

  ServiceConfig cfg_;
  std::unique_ptr<Database> db_;
  std::unique_ptr<converge::IdempotencyKeys> keys_;
  std::unique_ptr<converge::Completer> completer_;
  converge::Outbox outbox_{converge::OutboxOptions{.source = "urn:converge:payments"}};
  std::unique_ptr<converge::SqlQueue> queue_;
  std::unique_ptr<converge::Relay> relay_;
  std::vector<std::unique_ptr<converge::Subscriber>> subscribers_;
  std::vector<std::unique_ptr<converge::Consumer>> consumers_;
  std::vector<std::string> consumer_names_;
  std::unique_ptr<converge::EffectRunner> receipts_;
  std::unique_ptr<converge::DeadLetters> dead_letters_;
  std::unique_ptr<converge::http::Server> server_;
  converge::http::Client client_;
  converge::Metrics metrics_;
  std::atomic<bool> stopping_{false};
  std::mutex sweep_mu_;
  std::condition_variable sweep_cv_;
  std::thread sweeper_thread_;
};

Service::Service(ServiceConfig config) : impl_(std::make_unique<Impl>(std::move(config))) {}
Service::~Service() { Stop(); }
Status Service::Start() { return impl_->Start(); }
uint16_t Service::port() const { return impl_->port(); }
void Service::Stop() { impl_->Stop(); }

Status Service::Impl::CreateTables() {
  return db_->Transact([](Tx& tx) -> Status {
    CONVERGE_RETURN_IF_ERROR(tx.Exec(
        "CREATE TABLE IF NOT EXISTS payments (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, "
        "order_id TEXT NOT NULL, customer_id TEXT NOT NULL, amount BIGINT NOT NULL, "
        "currency TEXT NOT NULL, status TEXT NOT NULL, psp_charge_id TEXT, "
        "psp_confirmed_at BIGINT, created_at TEXT NOT NULL, updated_at TEXT NOT NULL)"));
    CONVERGE_RETURN_IF_ERROR(tx.Exec(
        "CREATE INDEX IF NOT EXISTS payments_charge ON payments (psp_charge_id)"));
    // No unique constraint on purpose: only the inbox keeps a redelivery from booking a
    // second pair of entries, and the demo's checks rely on seeing that.
    CONVERGE_RETURN_IF_ERROR(tx.Exec(
        "CREATE TABLE IF NOT EXISTS ledger_entries (id " +
        std::string(tx.dialect().AutoIncrementPrimaryKey()) + ", " +
        "payment_id TEXT NOT NULL, kind TEXT NOT NULL, account TEXT NOT NULL, "
        "amount BIGINT NOT NULL, currency TEXT NOT NULL, created_at TEXT NOT NULL)"));
    return converge::StatusOf(tx.Exec(
        "CREATE INDEX IF NOT EXISTS ledger_entries_payment ON ledger_entries (payment_id)"));
  });
}

Status Service::Impl::Start() {
  if (cfg_.api_keys.empty()) {
    return converge::InvalidArgumentError("config: auth.api_keys is empty: no client could call");
  }
  if (cfg_.admin_token.size() < 8) {
    return converge::InvalidArgumentError("config: auth.admin_token must be at least 8 characters");
  }
  if (cfg_.webhook_secrets.empty()) {
    return converge::InvalidArgumentError("config: psp.webhook_secrets is empty");
  }
  for (const auto& s : cfg_.webhook_secrets) {
    if (!converge::webhook::DecodeSecret(s)) {
      return converge::InvalidArgumentError("config: psp.webhook_secrets holds a malformed secret");
    }
  }
  const converge::IdempotencyOptions key_options{.ttl = cfg_.key_ttl, .lease = cfg_.lease};
  if (Status st = converge::IdempotencyKeys::ValidateOptions(key_options); !st.ok()) {
    return converge::InvalidArgumentError("config: idempotency: " + st.message());
  }
  if (cfg_.lease <= cfg_.psp_timeout) {
    return converge::InvalidArgumentError(
        "config: idempotency.lease_ms (" + std::to_string(cfg_.lease.count()) +
        " ms) must exceed psp.timeout_ms (" + std::to_string(cfg_.psp_timeout.count()) +
        " ms): the charge phase must fit in its lease, or a retry takes over mid-call");
  }
  // [store] synchronous and notify, and a pool that fits the worker threads, are
  // defaults for the URI's parameters of the same names: the URI's own setting wins, and
  // a store without such a setting ignores them.
  std::string store_uri = cfg_.db;
  store_uri = Database::WithDefaultParameter(store_uri, "synchronous",
                                             cfg_.synchronous_full ? "full" : "normal");
  store_uri = Database::WithDefaultParameter(store_uri, "notify", cfg_.notify ? "true" : "false");
  store_uri = Database::WithDefaultParameter(
      store_uri, "pool_size", std::to_string(std::max(16, cfg_.worker_threads / 2)));
  auto db = Database::Open(store_uri);
  if (!db) return db.error();
  db_ = std::move(*db);
  CONVERGE_RETURN_IF_ERROR(CreateTables());

  keys_ = std::make_unique<converge::IdempotencyKeys>(*db_, key_options);
  completer_ = std::make_unique<converge::Completer>(
      *db_, *keys_,
      converge::CompleterOptions{.grace = cfg_.completer_grace,
                                 .poll = std::max<Millis>(Millis(200), cfg_.completer_grace / 4)});
  for (const char* point : {"created", "charged"}) {
    completer_->On(point, [this](KeyLease& lease) { return ResumeAbandoned(lease); });
  }
  queue_ = std::make_unique<converge::SqlQueue>(*db_);
  CONVERGE_RETURN_IF_ERROR(queue_->Subscribe("ledger", "payment.*"));
  CONVERGE_RETURN_IF_ERROR(queue_->Subscribe("email", "payment.captured"));
  // A stable relay name lets a restarted instance take its outbox partitions back at once
  // instead of waiting for the leases of its previous life to lapse.
  std::string instance = cfg_.instance_name;
  if (instance.empty() && cfg_.port != 0) {
    char host[256] = {0};
    gethostname(host, sizeof host - 1);
    instance = std::string(host) + ":" + std::to_string(cfg_.port);
  }
  relay_ = std::make_unique<converge::Relay>(*db_, outbox_, *queue_,
                                             converge::RelayOptions{.name = instance});
  dead_letters_ = std::make_unique<converge::DeadLetters>(*db_, queue_.get());
  converge::EffectRunnerOptions eo;
  eo.kind = "email.receipt";
  eo.max_attempts = cfg_.effect_max_attempts;
  eo.lease = cfg_.effect_lease;
  eo.backoff_initial = cfg_.backoff_initial;
  eo.backoff_max = cfg_.backoff_max;
  receipts_ = std::make_unique<converge::EffectRunner>(
      *db_, eo, [this](const std::string& k, const std::string& p) { return SendReceipt(k, p); });
  RegisterConsumers();
  for (auto& c : consumers_) CONVERGE_RETURN_IF_ERROR(c->Validate());

  converge::http::ServerOptions so;
  so.address = cfg_.address;
  so.port = cfg_.port;
  so.io_threads = cfg_.io_threads;
  so.worker_threads = cfg_.worker_threads;
  so.body_limit = cfg_.body_limit;
  so.header_timeout = cfg_.header_timeout;
  so.body_timeout = cfg_.body_timeout;
  server_ = std::make_unique<converge::http::Server>(so);
  auto route = [this](const char* method, const char* path, Response (Impl::*fn)(Request&)) {
    server_->Route(method, path, [this, fn](Request& r) { return (this->*fn)(r); });
  };
  route("POST", "/v1/payments", &Impl::CreatePayment);
  route("GET", "/v1/payments/{id}", &Impl::GetPayment);
  route("POST", "/webhooks/psp", &Impl::PspWebhook);
  route("GET", "/admin/dead-letters", &Impl::AdminList);
  route("GET", "/admin/dead-letters/{id}", &Impl::AdminGet);
  route("POST", "/admin/dead-letters/{id}/replay", &Impl::AdminReplay);
  route("DELETE", "/admin/dead-letters/{id}", &Impl::AdminDiscard);
  route("GET", "/admin/stats", &Impl::AdminStats);
  route("GET", "/metrics", &Impl::Metrics);
  route("GET", "/readyz", &Impl::Ready);
  if (cfg_.admin_failpoints) {
    route("PUT", "/admin/failpoints", &Impl::AdminFailpointsSet);
    route("GET", "/admin/failpoints/{name}", &Impl::AdminFailpointGet);
    route("POST", "/admin/failpoints/{name}/release", &Impl::AdminFailpointRelease);
  }
  server_->Route("GET", "/healthz", [](Request&) { return Json(200, "{\"status\":\"ok\"}"); });

  for (const char* c : {"idempotency_replays_total", "idempotency_conflicts_total",
                        "idempotency_mismatches_total", "idempotency_resumed_total",
                        "idempotency_completed_by_completer_total",
                        "payments_created_total", "psp_unavailable_total", "emails_sent_total",
                        "webhooks_received_total", "webhooks_rejected_total",
                        "relay_published_total", "relay_publish_failures_total",
                        "consumer_processed_total", "consumer_duplicates_total",
                        "consumer_retries_total", "consumer_dead_lettered_total",
                        "effects_executed_total", "effects_retries_total", "effects_failed_total",
                        "retention_swept_total"}) {
    metrics_.Describe(c, "counter", "");
  }
  metrics_.Describe("outbox_backlog", "gauge", "Unpublished outbox events.");
  metrics_.Describe("relay_lag_seconds", "gauge", "Age of the oldest unpublished outbox event.");
  metrics_.Describe("http_requests_total", "counter", "HTTP requests by route, method and status.");
  metrics_.Describe("http_request_duration_seconds", "histogram", "HTTP request latency.");
  server_->OnExchange([this](const converge::http::Exchange& x) {
    std::string method = x.request ? x.request->method : "-";
    metrics_.Add("http_requests_total",
                 {{"route", x.route}, {"method", method}, {"status", std::to_string(x.status)}});
    metrics_.Observe("http_request_duration_seconds", {{"route", x.route}}, x.seconds,
                     {0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5});
    // Access log: never the Authorization header, bodies or secrets.
    spdlog::debug("event=request method={} route={} status={} ms={:.1f}", method, x.route,
                  x.status, x.seconds * 1000);
  });

  relay_->Start();
  for (auto& c : consumers_) CONVERGE_RETURN_IF_ERROR(c->Start());
  receipts_->Start();
  completer_->Start();
  // Retention: a bounded sweep a minute (several instances sweeping at once only split
  // the work).
  sweeper_thread_ = std::thread([this] {
    converge::Sweeper sweeper(*db_);
    std::unique_lock<std::mutex> l(sweep_mu_);
    while (!sweep_cv_.wait_for(l, std::chrono::seconds(60), [&] { return stopping_.load(); })) {
      l.unlock();
      auto s = sweeper.RunOnce();
      if (s && s->total() > 0) {
        metrics_.Add("retention_swept_total", {}, static_cast<double>(s->total()));
      }
      l.lock();
    }
  });
  CONVERGE_RETURN_IF_ERROR(server_->Start());
  // The store's scheme only: a URI may carry a password.
  spdlog::info("event=listening address={}:{} store={} tenants={} notify={}", cfg_.address,
               server_->port(), cfg_.db.substr(0, cfg_.db.find(':')), cfg_.api_keys.size(),
               cfg_.notify);
  return converge::OkStatus();
}

void Service::Impl::Stop() {
  if (stopping_.exchange(true)) return;
  {
    std::lock_guard<std::mutex> l(sweep_mu_);
  }
  sweep_cv_.notify_all();
  if (sweeper_thread_.joinable()) sweeper_thread_.join();
  if (server_) server_->Stop(cfg_.shutdown_drain);
  if (relay_) relay_->Stop();
  for (auto& c : consumers_) c->Stop();
  if (receipts_) receipts_->Stop();
  if (completer_) completer_->Stop();
  spdlog::info("event=stopped");
}

void Service::Impl::RegisterConsumers() {
  auto make = [&](const std::string& name, const std::string& queue) -> converge::Consumer& {
    subscribers_.push_back(queue_->OpenSubscriber(queue));
    converge::ConsumerOptions o;
    o.name = name;
    o.max_attempts = cfg_.max_attempts;
    o.visibility = cfg_.visibility;
    o.backoff_initial = cfg_.backoff_initial;
    o.backoff_max = cfg_.backoff_max;
    consumers_.push_back(std::make_unique<converge::Consumer>(*db_, *subscribers_.back(), o));
    consumer_names_.push_back(name);
    return *consumers_.back();
  };
  converge::Consumer& ledger = make("ledger", "ledger");
  ledger.On("payment.captured", [this](Tx& tx, const Event& e) { return OnCapturedLedger(tx, e); });
  ledger.On("payment.refunded", [this](Tx& tx, const Event& e) { return OnRefundedLedger(tx, e); });
  converge::Consumer& email = make("email", "email");
  email.On("payment.captured", [this](Tx& tx, const Event& e) { return OnCapturedEmail(tx, e); });
  converge::Consumer& hooks = make("psp-webhooks", "psp-webhooks");
  hooks.On("*", [this](Tx& tx, const Event& e) { return OnPspWebhook(tx, e); });
}

const std::string* Service::Impl::Tenant(const Request& req) const {
  const std::string* auth = req.Header("Authorization");
  if (auth == nullptr || auth->rfind("Bearer ", 0) != 0) return nullptr;
  auto it = cfg_.api_keys.find(auth->substr(7));
  return it == cfg_.api_keys.end() ? nullptr : &it->second;
}

bool Service::Impl::IsAdmin(const Request& req) const {
  const std::string* auth = req.Header("Authorization");
  if (auth == nullptr || auth->rfind("Bearer ", 0) != 0) return false;
  const std::string given = auth->substr(7);
  // Constant time in the token's content.
  if (given.size() != cfg_.admin_token.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < given.size(); ++i) diff |= given[i] ^ cfg_.admin_token[i];
  return diff == 0;
}

Response Unauthorized(const char* detail) {
  Response r = Problem(401, "Unauthorized", detail, "unauthorized");
  r.Set("WWW-Authenticate", "Bearer");
  return r;
}

// --- POST /v1/payments ----------------------------------------------------------------

Response Service::Impl::CreatePayment(Request& req) {
  const std::string* tenant = Tenant(req);
  if (tenant == nullptr) return Unauthorized("a valid API key is required (Authorization: Bearer ...)");
  const std::string* raw_key = req.Header("Idempotency-Key");
  if (raw_key == nullptr) {
    return Problem(400, "Bad Request", "the Idempotency-Key header is required",
                   "idempotency-key-missing");
  }
  std::string key = *raw_key;
  // The IETF draft sends the key as a structured-field string: "..." (quotes optional).
  if (key.size() >= 2 && key.front() == '"' && key.back() == '"') key = key.substr(1, key.size() - 2);
  bool bad_key = key.empty() || key.size() > 255;
  for (unsigned char c : key) bad_key = bad_key || c < 0x20 || c >= 0x7f;
  if (bad_key) {
    return Problem(400, "Bad Request",
                   "the Idempotency-Key must be 1-255 printable ASCII characters",
                   "idempotency-key-malformed");
  }
  auto parsed = ParsePayment(req.body);
  if (!parsed) return Problem(400, "Bad Request", parsed.error().message(), "invalid-request");

  converge::KeyRequest kr{*tenant, key,
                          converge::RequestFingerprint("POST", "/v1/payments", req.body)};
  auto begun = keys_->Begin(kr);
  if (!begun) {
    // Statuses (422, 409 + Retry-After, 400) come from the library's IETF-draft mapping.
    const Status& e = begun.error();
    if (e.reason() == converge::reason::kFingerprintMismatch) {
      metrics_.Add("idempotency_mismatches_total");
      return converge::http::ProblemFor(
          e, "idempotency-key-reused",
          "this Idempotency-Key was already used with a different request");
    }
    if (e.reason() == converge::reason::kInFlight) {
      metrics_.Add("idempotency_conflicts_total");
      return converge::http::ProblemFor(
          e, "request-in-progress", "a request with this Idempotency-Key is still being processed");
    }
    if (e.code() == StatusCode::kInvalidArgument) {
      return converge::http::ProblemFor(e, "idempotency-key-malformed");
    }
    return StoreError(e);
  }
  if (begun->kind == Begun::Kind::kReplayed) {
    metrics_.Add("idempotency_replays_total");
    return FromStored(begun->response, true);
  }
  if (begun->kind == Begun::Kind::kResumed) metrics_.Add("idempotency_resumed_total");
  return RunPayment(begun->lease, *tenant, *parsed);
}

// Runs the phases from the lease's recovery point: created -> charged -> completed.
Response Service::Impl::RunPayment(KeyLease lease, const std::string& tenant,
                                   const PaymentRequest& p, bool* stored) {
  if (stored != nullptr) *stored = false;
  // A phase failed. Fenced: another attempt owns the request now. Anything else (the
  // store was unavailable): give the lease back so the client's retry resumes at once
  // from the last recovery point instead of waiting for the lease to run out.
  auto fenced = [&](const Status& st) -> Response {
    if (st.reason() == converge::reason::kFenced) {
      metrics_.Add("idempotency_conflicts_total");
      Response r = Problem(409, "Conflict", "another attempt took this request over",
                           "request-in-progress");
      r.Set("Retry-After", "1");
      return r;
    }
    (void)keys_->Release(lease);
    return StoreError(st);
  };

  if (lease.recovery_point == "started") {
    const std::string id = RandomId("pay_");
    Status st = keys_->Advance(lease, "created", id, [&](Tx& tx) {
      const std::string now = NowIso();
      return converge::StatusOf(tx.Exec(
          "INSERT INTO payments (id, tenant, order_id, customer_id, amount, currency, status, "
          "created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $7)",
          id, tenant, p.order_id, p.customer_id, p.amount, p.currency, now));
    });
    if (!st.ok()) return fenced(st);
  }

  if (lease.recovery_point == "created") {
    const std::string payment_id = lease.recovery_data;
    // The provider's key is derived from the payment, so a resumed attempt repeating the
    // call gets the first charge back instead of a second one.
    json body = {{"amount", p.amount}, {"currency", p.currency}, {"reference", payment_id}};
    auto charge = client_.Send({.method = "POST",
                                .url = cfg_.psp_url + "/v1/charges",
                                .headers = {{"Content-Type", "application/json"},
                                            {"Idempotency-Key", "charge:" + payment_id}},
                                .body = body.dump(),
                                .timeout = cfg_.psp_timeout});
    // Only a definite answer is a decision. No answer, a 5xx, or a provider's "not decided
    // yet" (408 timeout, 409 key in use, 423 locked, 425 too early, 429 slow down) leaves
    // the outcome unknown: the charge may still happen.
    const int answer = charge ? charge->status : 0;
    const bool undecided = !charge || answer >= 500 || answer == 408 || answer == 409 ||
                           answer == 423 || answer == 425 || answer == 429;
    if (undecided) {
      // Give the lease back; the client's retry or the completer resumes here with the
      // same provider key.
      metrics_.Add("psp_unavailable_total");
      (void)keys_->Release(lease);
      Response r = Problem(503, "Service Unavailable",
                           "the payment provider did not answer; retry with the same "
                           "Idempotency-Key",
                           "provider-unavailable");
      r.Set("Retry-After", "1");
      return r;
    }
    if (answer >= 400) {
      // A decision, not an accident: store it, so retries get the same answer.
      const bool declined = charge->status == 402;
      Response decided = declined ? Problem(402, "Payment Required", "the payment was declined",
                                            "payment-declined")
                                  : Problem(502, "Bad Gateway", "the payment provider refused the request",
                                            "provider-rejected");
      auto out = keys_->Complete(lease, [&](Tx& tx) -> Result<StoredResponse> {
        CONVERGE_ASSIGN_OR_RETURN(
            int64_t n, tx.Exec("UPDATE payments SET status = $1, updated_at = $2 "
                               "WHERE id = $3 AND status = 'pending'",
                               declined ? "declined" : "failed", NowIso(), payment_id));
        if (n != 1) return tl::unexpected(NotPending(payment_id));
        return ToStored(decided);
      });
      if (!out) return fenced(out.error());
      if (stored != nullptr) *stored = true;
      return decided;
    }
    json cj = json::parse(charge->body, nullptr, false);
    if (!cj.is_object() || !cj["id"].is_string()) {
      (void)keys_->Release(lease);
      return Problem(502, "Bad Gateway", "the payment provider answered nonsense", "provider-garbled");
    }
    const std::string charge_id = cj["id"];
    // Failpoint: the provider has charged, nothing of it is committed here yet.
    if (Status fp = converge::failpoint::Hit("payments.after_charge_before_commit"); !fp.ok()) {
      (void)keys_->Release(lease);
      return StoreError(fp);
    }
    json data = {{"payment_id", payment_id}, {"charge_id", charge_id}};
    Status st = keys_->Advance(lease, "charged", data.dump(), [&](Tx& tx) {
      return converge::StatusOf(tx.Exec(
          "UPDATE payments SET psp_charge_id = $1, updated_at = $2 WHERE id = $3", charge_id,
          NowIso(), payment_id));
    });
    if (!st.ok()) return fenced(st);
  }

  if (lease.recovery_point != "charged") {
    return Problem(500, "Internal Server Error",
                   "unknown recovery point '" + lease.recovery_point + "'", "internal");
  }
  json saved = json::parse(lease.recovery_data, nullptr, false);
  const std::string payment_id = saved.value("payment_id", "");
  const std::string charge_id = saved.value("charge_id", "");
  auto out = keys_->Complete(lease, [&](Tx& tx) -> Result<StoredResponse> {
    const std::string now = NowIso();
    // Transitions are conditional: only a pending payment becomes captured.
    CONVERGE_ASSIGN_OR_RETURN(
        int64_t n, tx.Exec("UPDATE payments SET status = 'captured', updated_at = $1 "
                           "WHERE id = $2 AND status = 'pending'",
                           now, payment_id));
    if (n != 1) return tl::unexpected(NotPending(payment_id));
    CONVERGE_ASSIGN_OR_RETURN(
        Rows rows, tx.Query("SELECT customer_id, order_id, created_at FROM payments WHERE id = $1",
                            payment_id));
    if (rows.empty()) return tl::unexpected(converge::InternalError("payment row vanished"));
    json payment = {{"id", payment_id},           {"status", "captured"},
                    {"amount", p.amount},         {"currency", p.currency},
                    {"customer_id", rows[0].Text(0)}, {"order_id", rows[0].Text(1)},
                    {"charge_id", charge_id},     {"created_at", rows[0].Text(2)}};
    json event = payment;
    event["tenant"] = tenant;
    event["payment_id"] = payment_id;
    Event e;
    e.type = "payment.captured";
    e.subject = payment_id;
    e.data = event.dump();
    CONVERGE_RETURN_IF_ERROR(outbox_.Enqueue(tx, e));
    Response r = Json(201, payment.dump());
    r.Set("Location", "/v1/payments/" + payment_id);
    return ToStored(r);
  });
  if (!out) return fenced(out.error());
  metrics_.Add("payments_created_total");
  if (stored != nullptr) *stored = true;
  return FromStored(out->response, false);
}

Status Service::Impl::ResumeAbandoned(KeyLease& lease) {
  // "created" saved the payment id; "charged" saved {payment_id, charge_id}.
  std::string payment_id = lease.recovery_data;
  if (lease.recovery_point == "charged") {
    json saved = json::parse(lease.recovery_data, nullptr, false);
    payment_id = saved.is_object() ? saved.value("payment_id", "") : "";
  }
  PaymentRequest p;
  Status st = db_->Read([&](Tx& tx) -> Status {
    CONVERGE_ASSIGN_OR_RETURN(
        Rows rows, tx.Query("SELECT amount, currency, customer_id, order_id FROM payments "
                            "WHERE id = $1 AND tenant = $2",
                            payment_id, lease.scope));
    if (rows.empty()) {
      return converge::NotFoundError("no payment '" + payment_id + "' for an abandoned request");
    }
    p.amount = rows[0].Int(0);
    p.currency = rows[0].Text(1);
    p.customer_id = rows[0].Text(2);
    p.order_id = rows[0].Text(3);
    return converge::OkStatus();
  });
  if (!st.ok()) return st;
  bool stored = false;
  Response r = RunPayment(lease, lease.scope, p, &stored);
  if (!stored) return converge::UnavailableError("resume answered " + std::to_string(r.status));
  metrics_.Add("idempotency_completed_by_completer_total");
  spdlog::info("event=completed_abandoned tenant={} payment={} status={}", lease.scope,
               payment_id, r.status);
  return converge::OkStatus();
}

Response Service::Impl::GetPayment(Request& req) {
  const std::string* tenant = Tenant(req);
  if (tenant == nullptr) return Unauthorized("a valid API key is required");
  std::optional<json> found;
  Status st = db_->Read([&](Tx& tx) -> Status {
    CONVERGE_ASSIGN_OR_RETURN(
        Rows rows, tx.Query("SELECT id, status, amount, currency, customer_id, order_id, "
                            "psp_charge_id, created_at, updated_at FROM payments "
                            "WHERE id = $1 AND tenant = $2",
                            req.params["id"], *tenant));
    if (!rows.empty()) {
      const auto& r = rows[0];
      found = json{{"id", r.Text(0)},          {"status", r.Text(1)},
                   {"amount", r.Int(2)},       {"currency", r.Text(3)},
                   {"customer_id", r.Text(4)}, {"order_id", r.Text(5)},
                   {"charge_id", r.Text(6)},   {"created_at", r.Text(7)},
                   {"updated_at", r.Text(8)}};
    }
    return converge::OkStatus();
  });
  if (!st.ok()) return StoreError(st);
  if (!found) return Problem(404, "Not Found", "no such payment", "not-found");
  return Json(200, found->dump());
}

// --- POST /webhooks/psp ---------------------------------------------------------------

Response Service::Impl::PspWebhook(Request& req) {
  auto header = [&](const char* n) {
    const std::string* v = req.Header(n);
    return v ? *v : std::string();
  };
  const std::string id = header("webhook-id");
  // Verify before anything is stored or even parsed.
  Status v = converge::webhook::Verify(
      cfg_.webhook_secrets, id, header("webhook-timestamp"), header("webhook-signature"),
      req.body, converge::Clock::System()->NowMillis() / 1000,
      std::chrono::duration_cast<std::chrono::seconds>(cfg_.webhook_tolerance));
  if (!v.ok()) {
    metrics_.Add("webhooks_rejected_total", {{"reason", v.reason()}});
    return Problem(401, "Unauthorized", "webhook signature verification failed: " + v.reason(),
                   "webhook-signature");
  }
  if (id.size() > 255) return Problem(400, "Bad Request", "webhook-id is too long", "invalid-webhook");
  json j = json::parse(req.body, nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j["type"].is_string() || !j["data"].is_object()) {
    return Problem(400, "Bad Request", "webhook body must be {\"type\": string, \"data\": object}",
                   "invalid-webhook");
  }
  bool duplicate = false;
  Status st = db_->Transact([&](Tx& tx) -> Status {
    // The inbox row keyed by the webhook id and the staged work commit together.
    const int64_t now = converge::Clock::System()->NowMillis();
    CONVERGE_ASSIGN_OR_RETURN(
        int64_t n, tx.Exec("INSERT INTO consumer_inbox (consumer, source, event_id, "
                           "processed_at, expires_at) VALUES ('webhook:psp', $1, $2, $3, $4) "
                           "ON CONFLICT (consumer, source, event_id) DO NOTHING",
                           kPspSource, id, now, now + kWebhookDedupeMillis));
    duplicate = n == 0;
    if (duplicate) return converge::OkStatus();
    Event e;
    e.id = id;
    e.source = kPspSource;
    e.type = "psp." + j["type"].get<std::string>();
    e.subject = j["data"].value("charge_id", j["data"].value("id", "unknown"));
    e.aggregate_type = "psp";
    e.time = now;
    e.data = j["data"].dump();
    return queue_->EnqueueInTx(tx, "psp-webhooks",
                               converge::Message{e.id, e.source, e.type, e.subject,
                                                 converge::EncodeEnvelope(e)});
  });
  if (!st.ok()) return StoreError(st);
  metrics_.Add("webhooks_received_total", {{"duplicate", duplicate ? "true" : "false"}});
  Response r;
  r.status = 204;
  return r;
}

// --- consumers -------------------------------------------------------------------------

namespace {

struct Money {
  std::string payment_id, currency;
  int64_t amount = 0;
};

Result<Money> ParseMoney(const Event& e) {
  json d = json::parse(e.data, nullptr, false);
  if (!d.is_object() || !d["payment_id"].is_string() || !d["amount"].is_number_integer() ||
      !d["currency"].is_string()) {
    return tl::unexpected(converge::InvalidArgumentError(e.type + " " + e.id + " has malformed data"));
  }
  return Money{d["payment_id"], d["currency"], d["amount"]};
}

Status Book(Tx& tx, const Money& m, const char* kind, int64_t sign) {
  const std::string now = NowIso();
  CONVERGE_RETURN_IF_ERROR(tx.Exec(
      "INSERT INTO ledger_entries (payment_id, kind, account, amount, currency, created_at) "
      "VALUES ($1, $2, 'customer', $3, $4, $5)",
      m.payment_id, kind, -sign * m.amount, m.currency, now));
  return converge::StatusOf(tx.Exec(
      "INSERT INTO ledger_entries (payment_id, kind, account, amount, currency, created_at) "
      "VALUES ($1, $2, 'merchant', $3, $4, $5)",
      m.payment_id, kind, sign * m.amount, m.currency, now));
}

}  // namespace

Status Service::Impl::OnCapturedLedger(Tx& tx, const Event& e) {
  CONVERGE_ASSIGN_OR_RETURN(Money m, ParseMoney(e));
  return Book(tx, m, "capture", 1);
}

Status Service::Impl::OnRefundedLedger(Tx& tx, const Event& e) {
  CONVERGE_ASSIGN_OR_RETURN(Money m, ParseMoney(e));
  return Book(tx, m, "refund", -1);
}

Status Service::Impl::OnCapturedEmail(Tx& tx, const Event& e) {
  json d = json::parse(e.data, nullptr, false);
  if (!d.is_object() || !d["payment_id"].is_string() || !d["customer_id"].is_string() ||
      !d["amount"].is_number_integer() || !d["currency"].is_string()) {
    return converge::InvalidArgumentError("payment.captured " + e.id + " has malformed data");
  }
  const std::string payment_id = d["payment_id"];
  json mail = {{"to", d["customer_id"].get<std::string>() + "@customers.example"},
               {"subject", "Your receipt for " + payment_id},
               {"body", "We received " + std::to_string(d["amount"].get<int64_t>()) + " " +
                            d["currency"].get<std::string>() + ". Thank you."}};
  // The effect key is the receipt's identity, not the client's payment key: one receipt
  // per payment however often the event or the effect runs.
  return converge::StatusOf(receipts_->Record(tx, "receipt:" + payment_id, mail.dump()));
}

Result<std::string> Service::Impl::SendReceipt(const std::string& key, const std::string& payload) {
  auto r = client_.Send({.method = "POST",
                         .url = cfg_.mail_url + "/v1/messages",
                         .headers = {{"Content-Type", "application/json"}, {"Idempotency-Key", key}},
                         .body = payload,
                         .timeout = cfg_.mail_timeout});
  if (!r) return tl::unexpected(r.error());
  if (r->status >= 500 || r->status == 429) {
    return tl::unexpected(converge::UnavailableError("mail provider answered " + std::to_string(r->status)));
  }
  if (r->status >= 400) {
    return tl::unexpected(converge::InvalidArgumentError("mail provider refused: " + std::to_string(r->status)));
  }
  json j = json::parse(r->body, nullptr, false);
  metrics_.Add("emails_sent_total");
  return j.is_object() && j["id"].is_string() ? j["id"].get<std::string>() : std::string("sent");
}

Status Service::Impl::OnPspWebhook(Tx& tx, const Event& e) {
  json d = json::parse(e.data, nullptr, false);
  if (e.type == "psp.charge.succeeded") {
    const std::string ref = d.value("reference", "");
    CONVERGE_ASSIGN_OR_RETURN(
        int64_t n, tx.Exec("UPDATE payments SET psp_confirmed_at = $1 WHERE id = $2",
                           converge::Clock::System()->NowMillis(), ref));
    // The provider may report the charge before our own commit of it: wait and retry.
    if (n == 0) return converge::UnavailableError("charge.succeeded for unknown payment '" + ref + "'");
    return converge::OkStatus();
  }
  if (e.type == "psp.charge.refunded") {
    const std::string charge = d.value("charge_id", "");
    CONVERGE_ASSIGN_OR_RETURN(
        Rows rows, tx.Query("SELECT id, amount, currency, status FROM payments "
                            "WHERE psp_charge_id = $1", charge));
    // The provider may report the refund before our own commit of the charge (or of its
    // capture): a transient condition, retried with backoff, not a poison message.
    if (rows.empty()) {
      return converge::UnavailableError("refund for a charge not recorded yet: '" + charge + "'");
    }
    const std::string state = rows[0].Text(3);
    if (state == "refunded") return converge::OkStatus();
    if (state == "pending") {
      return converge::UnavailableError("refund for charge '" + charge +
                                        "' before its capture is recorded");
    }
    if (state != "captured") {
      return converge::FailedPreconditionError("refund for charge '" + charge +
                                               "' of a payment that is " + state);
    }
    const std::string payment_id = rows[0].Text(0);
    CONVERGE_ASSIGN_OR_RETURN(
        int64_t n, tx.Exec("UPDATE payments SET status = 'refunded', updated_at = $1 "
                           "WHERE id = $2 AND status = 'captured'",
                           NowIso(), payment_id));
    if (n != 1) return converge::AbortedError("payment " + payment_id + " changed meanwhile");
    Event out;
    out.type = "payment.refunded";
    out.subject = payment_id;
    out.data = json{{"payment_id", payment_id}, {"amount", rows[0].Int(1)},
                    {"currency", rows[0].Text(2)}, {"charge_id", charge}}.dump();
    return converge::StatusOf(outbox_.Enqueue(tx, out));
  }
  return converge::OkStatus();  // other provider events: nothing to do
}

// --- admin -----------------------------------------------------------------------------

namespace {

json LetterJson(const converge::DeadLetter& d, bool envelope) {
  json j = {{"id", d.id},
            {"consumer", d.consumer},
            {"queue", d.queue},
            {"event_id", d.event_id},
            {"type", d.type},
            {"error_class", d.error_class},
            {"error_code", d.error_code},
            {"error", d.error},
            {"attempts", d.attempts},
            {"first_failure_at", converge::FormatRfc3339(d.first_failure_at)},
            {"last_failure_at", converge::FormatRfc3339(d.last_failure_at)},
            {"state", d.state},
            {"replay_count", d.replay_count}};
  if (envelope) {
    json e = json::parse(d.envelope, nullptr, false);
    j["envelope"] = e.is_discarded() ? json(d.envelope) : e;
  }
  return j;
}

bool ParseId(const std::string& s, int64_t* id) {
  auto r = std::from_chars(s.data(), s.data() + s.size(), *id);
  return r.ec == std::errc() && r.ptr == s.data() + s.size() && *id > 0;
}

std::string QueryParam(const std::string& query, const std::string& name) {
  size_t i = 0;
  while (i <= query.size()) {
    size_t amp = query.find('&', i);
    if (amp == std::string::npos) amp = query.size();
    std::string part = query.substr(i, amp - i);
    if (part.rfind(name + "=", 0) == 0) return part.substr(name.size() + 1);
    i = amp + 1;
  }
  return {};
}

}  // namespace

#define REQUIRE_ADMIN(req)                                                 \
  do {                                                                     \
    if (!IsAdmin(req)) return Unauthorized("the admin token is required"); \
  } while (0)

Response Service::Impl::AdminList(Request& req) {
  REQUIRE_ADMIN(req);
  converge::DeadLetterFilter f;
  std::string state = QueryParam(req.query, "state");
  if (state == "all") {
    f.state = "";
  } else if (!state.empty()) {
    if (state != "parked" && state != "replayed" && state != "discarded") {
      return Problem(400, "Bad Request", "state must be parked, replayed, discarded or all",
                     "invalid-request");
    }
    f.state = state;
  }
  f.consumer = QueryParam(req.query, "consumer");
  std::string limit = QueryParam(req.query, "limit"), after = QueryParam(req.query, "after");
  if (!limit.empty() && (!ParseId(limit, &f.limit) || f.limit > 1000)) {
    return Problem(400, "Bad Request", "limit must be 1..1000", "invalid-request");
  }
  if (!after.empty() && !ParseId(after, &f.after_id)) {
    return Problem(400, "Bad Request", "after must be a positive id", "invalid-request");
  }
  auto list = dead_letters_->List(f);
  if (!list) return StoreError(list.error());
  json a = json::array();
  for (const auto& d : *list) a.push_back(LetterJson(d, false));
  return Json(200, json{{"dead_letters", a}}.dump());
}

Response Service::Impl::AdminGet(Request& req) {
  REQUIRE_ADMIN(req);
  int64_t id = 0;
  if (!ParseId(req.params["id"], &id)) return Problem(400, "Bad Request", "bad id", "invalid-request");
  auto d = dead_letters_->Get(id);
  if (!d) {
    if (d.error().code() == StatusCode::kNotFound) return Problem(404, "Not Found", d.error().message(), "not-found");
    return StoreError(d.error());
  }
  return Json(200, LetterJson(*d, true).dump());
}

Response Service::Impl::AdminReplay(Request& req) {
  REQUIRE_ADMIN(req);
  int64_t id = 0;
  if (!ParseId(req.params["id"], &id)) return Problem(400, "Bad Request", "bad id", "invalid-request");
  Status st = dead_letters_->Replay(id);
  if (st.code() == StatusCode::kNotFound) return Problem(404, "Not Found", st.message(), "not-found");
  // Already replayed or discarded, maybe by a concurrent call that won: a conflict with
  // the letter's state, not a store failure (DeadLetters::Replay).
  if (st.reason() == converge::reason::kNotParked) {
    return Problem(409, "Conflict", st.message(), "not-parked");
  }
  if (!st.ok()) return StoreError(st);
  receipts_->wakeup().Notify();
  return Json(200, json{{"id", id}, {"state", "replayed"}}.dump());
}

Response Service::Impl::AdminDiscard(Request& req) {
  REQUIRE_ADMIN(req);
  int64_t id = 0;
  if (!ParseId(req.params["id"], &id)) return Problem(400, "Bad Request", "bad id", "invalid-request");
  Status st = dead_letters_->Discard(id);
  if (st.code() == StatusCode::kNotFound) return Problem(404, "Not Found", st.message(), "not-found");
  if (st.reason() == converge::reason::kNotParked) {
    return Problem(409, "Conflict", st.message(), "not-parked");
  }
  if (!st.ok()) return StoreError(st);
  return Json(200, json{{"id", id}, {"state", "discarded"}}.dump());
}

Response Service::Impl::AdminStats(Request& req) {
  REQUIRE_ADMIN(req);
  json out;
  Status st = db_->Read([&](Tx& tx) -> Status {
    const int64_t now = converge::Clock::System()->NowMillis();
    CONVERGE_ASSIGN_OR_RETURN(
        Rows ob, tx.Query("SELECT count(*), min(created_at) FROM outbox_events WHERE published_at IS NULL"));
    out["outbox"] = {{"backlog", ob[0].Int(0)},
                     {"oldest_unpublished_age_ms", ob[0].IsNull(1) ? 0 : now - ob[0].Int(1)}};
    CONVERGE_ASSIGN_OR_RETURN(Rows inbox, tx.Query("SELECT consumer, count(*) FROM consumer_inbox GROUP BY consumer"));
    for (const auto& r : inbox) out["inbox"][r.Text(0)] = r.Int(1);
    CONVERGE_ASSIGN_OR_RETURN(Rows q, tx.Query("SELECT queue, count(*) FROM queue_messages GROUP BY queue"));
    out["queues"] = json::object();
    for (const auto& r : q) out["queues"][r.Text(0)] = r.Int(1);
    CONVERGE_ASSIGN_OR_RETURN(Rows dl, tx.Query("SELECT state, count(*) FROM dead_letters GROUP BY state"));
    out["dead_letters"] = {{"parked", 0}, {"replayed", 0}, {"discarded", 0}};
    for (const auto& r : dl) out["dead_letters"][r.Text(0)] = r.Int(1);
    CONVERGE_ASSIGN_OR_RETURN(Rows k, tx.Query("SELECT status, count(*) FROM idempotency_keys GROUP BY status"));
    out["idempotency_keys"] = {{"in_progress", 0}, {"completed", 0}};
    for (const auto& r : k) out["idempotency_keys"][r.Text(0)] = r.Int(1);
    CONVERGE_ASSIGN_OR_RETURN(Rows ef, tx.Query("SELECT state, count(*) FROM effects GROUP BY state"));
    out["effects"] = {{"pending", 0}, {"done", 0}, {"failed", 0}};
    for (const auto& r : ef) out["effects"][r.Text(0)] = r.Int(1);
    CONVERGE_ASSIGN_OR_RETURN(Rows p, tx.Query("SELECT status, count(*) FROM payments GROUP BY status"));
    out["payments"] = json::object();
    for (const auto& r : p) out["payments"][r.Text(0)] = r.Int(1);
    CONVERGE_ASSIGN_OR_RETURN(Rows le, tx.Query("SELECT count(*) FROM ledger_entries"));
    out["ledger_entries"] = le[0].Int(0);
    const auto cs = completer_->stats();
    out["completer"] = {{"finished", cs.finished}, {"failed", cs.failed}, {"lost", cs.lost}};
    return converge::OkStatus();
  });
  if (!st.ok()) return StoreError(st);
  return Json(200, out.dump());
}

// Test and chaos hooks (only when [admin] failpoints = true): the environment spec of a
// child process, plus pausing and releasing from outside.
Response Service::Impl::AdminFailpointsSet(Request& req) {
  REQUIRE_ADMIN(req);
  Status st = converge::failpoint::Configure(req.body);
  if (!st.ok()) return Problem(400, "Bad Request", st.message(), "invalid-request");
  return Json(200, json{{"spec", req.body}}.dump());
}

Response Service::Impl::AdminFailpointGet(Request& req) {
  REQUIRE_ADMIN(req);
  const std::string& name = req.params["name"];
  return Json(200, json{{"name", name},
                        {"hits", converge::failpoint::Hits(name)},
                        {"paused", converge::failpoint::Paused(name)}}
                       .dump());
}

Response Service::Impl::AdminFailpointRelease(Request& req) {
  REQUIRE_ADMIN(req);
  const std::string& name = req.params["name"];
  return Json(200, json{{"name", name}, {"released", converge::failpoint::Release(name)}}.dump());
}

void Service::Impl::RefreshGauges() {
  const auto rs = relay_->stats();
  metrics_.Set("relay_published_total", {}, static_cast<double>(rs.published));
  metrics_.Set("relay_publish_failures_total", {}, static_cast<double>(rs.publish_failures));
  for (size_t i = 0; i < consumers_.size(); ++i) {
    const auto s = consumers_[i]->stats();
    converge::Metrics::Labels l = {{"consumer", consumer_names_[i]}};
    metrics_.Set("consumer_processed_total", l, static_cast<double>(s.processed));
    metrics_.Set("consumer_duplicates_total", l, static_cast<double>(s.duplicates));
    metrics_.Set("consumer_retries_total", l, static_cast<double>(s.retries));
    metrics_.Set("consumer_dead_lettered_total", l, static_cast<double>(s.dead_lettered));
  }
  const auto es = receipts_->stats();
  metrics_.Set("effects_executed_total", {{"kind", "email.receipt"}}, static_cast<double>(es.executed));
  metrics_.Set("effects_retries_total", {{"kind", "email.receipt"}}, static_cast<double>(es.retries));
  metrics_.Set("effects_failed_total", {{"kind", "email.receipt"}}, static_cast<double>(es.failed));
  (void)db_->Read([&](Tx& tx) -> Status {
    const int64_t now = converge::Clock::System()->NowMillis();
    CONVERGE_ASSIGN_OR_RETURN(
        Rows ob, tx.Query("SELECT count(*), min(created_at) FROM outbox_events WHERE published_at IS NULL"));
    metrics_.Set("outbox_backlog", {}, static_cast<double>(ob[0].Int(0)));
    metrics_.Set("relay_lag_seconds", {}, ob[0].IsNull(1) ? 0.0 : (now - ob[0].Int(1)) / 1000.0);
    return converge::OkStatus();
  });
}

Response Service::Impl::Metrics(Request&) {
  RefreshGauges();
  std::string out = metrics_.Render();
  const auto ds = db_->stats();
  out += "# HELP db_transactions_total Transact calls completed, ok or not.\n";
  out += "# TYPE db_transactions_total counter\n";
  out += "db_transactions_total " + std::to_string(ds.transactions) + "\n";
  out += "# HELP db_commits_total Physical commits.\n";
  out += "# TYPE db_commits_total counter\n";
  out += "db_commits_total " + std::to_string(ds.commits) + "\n";
  // Group-commit batch sizes, from the store's own histogram (buckets of powers of two).
  // Only a store that batches has one (SQLite); elsewhere every call is its own commit.
  if (!ds.batch_histogram.empty()) {
    out += "# HELP db_commit_batch_size Transact calls carried by one physical commit.\n";
    out += "# TYPE db_commit_batch_size histogram\n";
    int64_t cumulative = 0;
    for (size_t i = 0; i < ds.batch_histogram.size(); ++i) {
      cumulative += ds.batch_histogram[i];
      out += "db_commit_batch_size_bucket{le=\"" + std::to_string((int64_t{2} << i) - 1) +
             "\"} " + std::to_string(cumulative) + "\n";
    }
    out += "db_commit_batch_size_bucket{le=\"+Inf\"} " + std::to_string(ds.commits) + "\n";
    out += "db_commit_batch_size_sum " + std::to_string(ds.transactions) + "\n";
    out += "db_commit_batch_size_count " + std::to_string(ds.commits) + "\n";
  }
  Response r;
  r.status = 200;
  r.headers = {{"Content-Type", "text/plain; version=0.0.4"}};
  r.body = std::move(out);
  return r;
}

Response Service::Impl::Ready(Request&) {
  if (stopping_.load()) return Problem(503, "Service Unavailable", "shutting down", "unavailable");
  Status st = db_->Read([](Tx& tx) { return converge::StatusOf(tx.Query("SELECT 1")); });
  if (!st.ok()) return Problem(503, "Service Unavailable", "the store is unreachable", "unavailable");
  return Json(200, "{\"status\":\"ready\"}");
}

}  // namespace payments
