#include "examples/payments/service.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <charconv>
#include <mutex>
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
#include "converge/http_idempotency.h"
#include "converge/http_service.h"
#include "converge/idempotency.h"
#include "converge/inbox.h"
#include "converge/metrics.h"
#include "converge/offset_clock.h"
#if CONVERGE_WITH_NATS
#include "converge/nats.h"
#endif
#include "converge/outbox.h"
#include "converge/relay.h"
#include "converge/runtime.h"
#include "converge/sql_queue.h"
#include "converge/webhook.h"
#include "examples/payments/checkout.h"
#include "examples/payments/ids.h"
#include "examples/payments/payment_request.h"
#include "examples/payments/psp_event.h"
#include "examples/payments/rules.h"

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
using converge::http::FromStored;
using converge::http::Json;
using converge::http::Problem;
using converge::http::Request;
using converge::http::Response;
using converge::http::ToStored;
using json = nlohmann::json;

// Webhook dedupe rows outlive any provider's retry schedule (Standard Webhooks senders
// retry for days, not weeks).
constexpr int64_t kWebhookDedupeMillis = 30LL * 24 * 3600 * 1000;

std::string NowIso(converge::Clock* clock) { return converge::FormatRfc3339(clock->NowMillis()); }

Status NotPending(const std::string& payment_id) {
  return converge::FailedPreconditionError("payment " + payment_id + " is no longer pending");
}

Response StoreError(const Status& st) {
  spdlog::warn("event=store_error error=\"{}\"", st.ToString());
  return converge::http::StoreProblem(st);
}

}  // namespace

class Service::Impl {
 public:
  explicit Impl(ServiceConfig c)
      : cfg_(std::move(c)), clock_(cfg_.clock ? cfg_.clock : converge::Clock::System()) {
    if (cfg_.admin_clock) {
      // Test-only: every component reads the shifted clock, /admin/clock moves it.
      offset_clock_ = std::make_unique<converge::OffsetClock>(clock_);
      clock_ = offset_clock_.get();
    }
  }
  // Each owner goes before what it uses, whatever the members' order: the server and the
  // saga, then the runtime's workers (a consumer's held deliveries must not outlive the
  // broker they came from: converge/nats.h), then the transports and the dead letters'
  // routes to them. The store, the clock and the metrics go last, as members.
  ~Impl() {
    Stop();
    server_.reset();
    checkout_.reset();
    runtime_.reset();
    dead_letters_.reset();
    subscribers_.clear();
#if CONVERGE_WITH_NATS
    nats_.reset();
#endif
    queue_.reset();
  }

  Status Start();
  void Stop();
  uint16_t port() const { return server_ ? server_->port() : 0; }
  Response Handle(Request& req) {
    if (!server_) return Problem(503, "Service Unavailable", "the service is not started");
    return server_->Handle(req);
  }

 private:
  // --- HTTP handlers ---
  converge::http::Server::Handler CreatePaymentRoute();
  Response GetPayment(Request& req);
  converge::http::Server::Handler PspWebhookRoute();
  // The payments' own figures for /admin/stats.
  Result<std::string> PaymentStats(Tx& tx);

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
  Status RegisterConsumers();

  // --- consumers ---
  Status OnCapturedLedger(Tx& tx, const Event& e);
  Status OnRefundedLedger(Tx& tx, const Event& e);
  Status OnCapturedEmail(Tx& tx, const Event& e);
  Status OnPspWebhook(Tx& tx, const Event& e);
  Result<std::string> SendReceipt(const std::string& key, const std::string& payload);

  ServiceConfig cfg_;
  std::unique_ptr<converge::OffsetClock> offset_clock_;  // [admin] clock = true only
  converge::Clock* clock_;  // every time the service reads, so tests can inject one
  std::unique_ptr<Database> db_;
  // The library's machinery (keys, completer, outbox, relay, consumers, effect runner,
  // sweeper), started and stopped as one; the pointers below are its workers.
  std::unique_ptr<converge::Runtime> runtime_;
  converge::IdempotencyKeys* keys_ = nullptr;
  converge::Completer* completer_ = nullptr;
  converge::Outbox* outbox_ = nullptr;
  std::unique_ptr<converge::SqlQueue> queue_;
#if CONVERGE_WITH_NATS
  std::unique_ptr<converge::NatsBroker> nats_;  // cfg_.broker, when it is NATS
#endif
  converge::Relay* relay_ = nullptr;
  std::vector<std::unique_ptr<converge::Subscriber>> subscribers_;
  std::vector<converge::Consumer*> consumers_;
  converge::EffectRunner* receipts_ = nullptr;
  converge::EffectRequeuer effect_requeuer_;  // replays of effects' dead letters
  converge::SagaRequeuer saga_requeuer_;      // replays of parked sagas
  converge::OutboxRequeuer outbox_requeuer_;  // replays of events the broker refused
  std::unique_ptr<Checkout> checkout_;        // the checkout saga (POST /v1/orders)
  std::unique_ptr<converge::DeadLetters> dead_letters_;
  std::unique_ptr<converge::http::Server> server_;
  std::unique_ptr<converge::http::ApiKeyIndex> api_keys_;  // bearer key -> tenant
  converge::http::Client client_;
  converge::Metrics metrics_;
  std::atomic<bool> stopping_{false};
};

Service::Service(ServiceConfig config) : impl_(std::make_unique<Impl>(std::move(config))) {}
Service::~Service() { Stop(); }
Status Service::Start() { return impl_->Start(); }
uint16_t Service::port() const { return impl_->port(); }
Response Service::Handle(Request& request) { return impl_->Handle(request); }
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
  if (cfg_.role != "serve" && cfg_.role != "worker") {
    return converge::InvalidArgumentError("role '" + cfg_.role + "': serve or worker");
  }
  const bool serving = cfg_.role == "serve";  // a worker needs no clients, keys or webhooks
  if (serving && cfg_.api_keys.empty()) {
    return converge::InvalidArgumentError("config: auth.api_keys is empty: no client could call");
  }
  if (serving && cfg_.admin_token.size() < 8) {
    return converge::InvalidArgumentError("config: auth.admin_token must be at least 8 characters");
  }
  if (serving && cfg_.webhook_secrets.empty()) {
    return converge::InvalidArgumentError("config: psp.webhook_secrets is empty");
  }
  for (const auto& s : cfg_.webhook_secrets) {
    if (!converge::webhook::DecodeSecret(s)) {
      return converge::InvalidArgumentError("config: psp.webhook_secrets holds a malformed secret");
    }
  }
  const converge::IdempotencyOptions key_options{
      .ttl = cfg_.key_ttl,
      .lease = cfg_.lease,
      .replay_cache_bytes = static_cast<size_t>(cfg_.replay_cache_mb) << 20,
      .max_clock_skew = cfg_.max_clock_skew};
  if (Status st = converge::IdempotencyKeys::ValidateOptions(key_options); !st.ok()) {
    return converge::InvalidArgumentError("config: idempotency: " + st.message());
  }
  if (cfg_.lease <= cfg_.psp_timeout) {
    return converge::InvalidArgumentError(
        "config: idempotency.lease_ms (" + std::to_string(cfg_.lease.count()) +
        " ms) must exceed psp.timeout_ms (" + std::to_string(cfg_.psp_timeout.count()) +
        " ms): the charge phase must fit in its lease, or a retry takes over mid-call");
  }
  if (cfg_.effect_lease <= cfg_.mail_timeout) {
    return converge::InvalidArgumentError(
        "config: effects.lease_ms (" + std::to_string(cfg_.effect_lease.count()) +
        " ms) must exceed mail.timeout_ms (" + std::to_string(cfg_.mail_timeout.count()) +
        " ms): a receipt's call must fit in its claim, or other runners claim it again "
        "while it runs, and each call's outcome is dropped");
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
  CONVERGE_RETURN_IF_ERROR(Checkout::CreateTables(*db_));

  // Retention: a bounded sweep every sweep_interval (a minute by default), at once again
  // while there is more (several instances sweeping at once only split the work).
  runtime_ = std::make_unique<converge::Runtime>(
      *db_, converge::RuntimeOptions{
                .keys = key_options,
                .outbox = {.source = "urn:converge:payments"},
                .completer = {.grace = cfg_.completer_grace,
                              .poll = std::max<Millis>(Millis(200), cfg_.completer_grace / 4)},
                .sweep = {.key_order_pass = cfg_.sweep_pass,
                          .inbox_key_order_pass = cfg_.inbox_sweep_pass},
                .sweep_interval = cfg_.sweep_interval,
                // Only where this process runs the relay (a worker runs none): a worker's
                // events wait in the outbox for a serving instance's relay.
                .publish_in_transaction = cfg_.publish_in_transaction && serving},
      clock_);
  keys_ = &runtime_->keys();
  completer_ = &runtime_->completer();
  outbox_ = &runtime_->outbox();
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
  converge::Publisher* publisher = queue_.get();
  if (!cfg_.broker.empty()) {
#if CONVERGE_WITH_NATS
    auto nats_options = converge::ParseNatsUri(cfg_.broker);
    if (!nats_options) return nats_options.error();
    auto nats = converge::NatsBroker::Connect(std::move(*nats_options), &metrics_);
    if (!nats) return nats.error();
    nats_ = std::move(*nats);
    publisher = nats_.get();
#else
    return converge::InvalidArgumentError("broker '" + cfg_.broker.substr(0, 7) +
                                          "...': this build has no NATS (CONVERGE_WITH_NATS)");
#endif
  }
  if (serving) relay_ = &runtime_->AddRelay(*publisher, converge::RelayOptions{.name = instance});
  std::vector<converge::ReplayRoute> routes = {
      {"", queue_.get()},
      {std::string(converge::kEffectQueuePrefix), &effect_requeuer_},
      {std::string(converge::kSagaQueuePrefix), &saga_requeuer_},
      {std::string(converge::kRelayDeadLetterQueue), &outbox_requeuer_}};
#if CONVERGE_WITH_NATS
  if (nats_) routes.push_back({std::string(converge::kNatsQueuePrefix), nats_.get()});
#endif
  dead_letters_ = std::make_unique<converge::DeadLetters>(*db_, std::move(routes));
  converge::EffectRunnerOptions eo;
  eo.kind = "email.receipt";
  eo.max_attempts = cfg_.effect_max_attempts;
  eo.lease = cfg_.effect_lease;
  eo.backoff_initial = cfg_.backoff_initial;
  eo.backoff_max = cfg_.backoff_max;
  receipts_ = &runtime_->AddEffectRunner(
      eo, [this](const std::string& k, const std::string& p) { return SendReceipt(k, p); });
  CONVERGE_RETURN_IF_ERROR(RegisterConsumers());
  checkout_ = std::make_unique<Checkout>(CheckoutOptions{
      .db = db_.get(),
      .runtime = runtime_.get(),
      .client = &client_,
      .metrics = &metrics_,
      .clock = clock_,
      .psp_url = cfg_.psp_url,
      .psp_timeout = cfg_.psp_timeout,
      .lease = cfg_.lease,
      .backoff_initial = cfg_.backoff_initial,
      .backoff_max = cfg_.backoff_max,
      .tenant = [this](const Request& r) { return Tenant(r); },
      .is_admin = [this](const Request& r) { return IsAdmin(r); }});
  checkout_->Register();
  CONVERGE_RETURN_IF_ERROR(runtime_->Validate());
  if (!serving) {
    CONVERGE_RETURN_IF_ERROR(runtime_->Start());
    spdlog::info("event=worker_started consumers={} broker={}", consumers_.size(),
                 cfg_.broker.empty() ? "sql" : "nats");
    return converge::OkStatus();
  }

  converge::http::ServerOptions so;
  so.address = cfg_.address;
  so.port = cfg_.port;
  so.io_threads = cfg_.io_threads;
  so.worker_threads = cfg_.worker_threads;
  so.body_limit = cfg_.body_limit;
  so.header_limit = cfg_.header_limit;
  so.max_header_fields = cfg_.max_header_fields;
  so.header_timeout = cfg_.header_timeout;
  so.body_timeout = cfg_.body_timeout;
  so.max_connections = cfg_.max_connections;
  server_ = std::make_unique<converge::http::Server>(so);
  api_keys_ = std::make_unique<converge::http::ApiKeyIndex>(cfg_.api_keys);
  auto route = [this](const char* method, const char* path, Response (Impl::*fn)(Request&)) {
    server_->Route(method, path, [this, fn](Request& r) { return (this->*fn)(r); });
  };
  server_->Route("POST", "/v1/payments", CreatePaymentRoute());
  route("GET", "/v1/payments/{id}", &Impl::GetPayment);
  server_->Route("POST", "/webhooks/psp", PspWebhookRoute());
  checkout_->Routes(*server_);
  converge::http::AdminOptions admin;
  admin.token = cfg_.admin_token;
  admin.db = db_.get();
  admin.dead_letters = dead_letters_.get();
  admin.failpoints = cfg_.admin_failpoints;
  admin.clock = offset_clock_.get();
  if (offset_clock_) spdlog::warn("event=clock_hook_enabled hint=\"test and chaos runs only\"");
  admin.on_replay = [this](const converge::DeadLetter&) { receipts_->wakeup().Notify(); };
  admin.extra_stats = [this](Tx& tx) -> Result<std::string> {
    CONVERGE_ASSIGN_OR_RETURN(std::string payments, PaymentStats(tx));
    CONVERGE_ASSIGN_OR_RETURN(std::string orders, checkout_->Stats(tx));
    json out = json::parse(payments);
    out.update(json::parse(orders));
    return out.dump();
  };
  CONVERGE_RETURN_IF_ERROR(converge::http::RegisterAdminRoutes(*server_, std::move(admin)));
  converge::http::RegisterHealthRoutes(*server_, *db_, [this] { return stopping_.load(); });

  metrics_.Describe("payments_created_total", "counter", "Payments created (first phase).");
  metrics_.Describe("psp_unavailable_total", "counter",
                    "Provider calls whose outcome was unknown or refused as unavailable.");
  metrics_.Describe("emails_sent_total", "counter", "Receipts the mail provider accepted.");
  metrics_.Describe("idempotency_completed_by_completer_total", "counter",
                    "Abandoned payment requests the completer finished.");
  CONVERGE_RETURN_IF_ERROR(converge::http::RegisterMetricsRoute(
      *server_, {.metrics = &metrics_, .runtime = runtime_.get(), .db = db_.get(),
                 .clock = clock_}));
  server_->OnExchange([](const converge::http::Exchange& x) {
    // Access log: never the Authorization header, bodies or secrets, and no field a client
    // can make long (the method is the bounded label, the route a pattern).
    spdlog::debug("event=request method={} route={} status={} ms={:.1f}", x.method, x.route,
                  x.status, x.seconds * 1000);
  });

  CONVERGE_RETURN_IF_ERROR(runtime_->Start());
  CONVERGE_RETURN_IF_ERROR(server_->Start());
  // The store's scheme only: a URI may carry a password.
  const converge::http::ServerStats ss = server_->stats();
  spdlog::info("event=listening address={}:{} store={} tenants={} notify={} "
               "max_connections={} fd_limit={}",
               cfg_.address, server_->port(), cfg_.db.substr(0, cfg_.db.find(':')),
               cfg_.api_keys.size(), cfg_.notify, cfg_.max_connections, ss.fd_limit);
  // Connections, the store, outbound calls and logs share the descriptors.
  if (ss.fd_limit < cfg_.max_connections + 256) {
    spdlog::warn("event=fd_limit_low fd_limit={} max_connections={} hint=\"raise the hard "
                 "RLIMIT_NOFILE or lower server.max_connections\"",
                 ss.fd_limit, cfg_.max_connections);
  }
  return converge::OkStatus();
}

void Service::Impl::Stop() {
  if (stopping_.exchange(true)) return;
  if (server_) server_->Stop(cfg_.shutdown_drain);
  if (runtime_) runtime_->Stop();  // each worker finishes its pass
  spdlog::info("event=stopped");
}

Status Service::Impl::RegisterConsumers() {
  // `pattern`: the event types it reads from a broker (the SQL queue routes by its
  // subscriptions instead); "" = always the store's queue (staged webhook work).
  auto make = [&](const std::string& name, const std::string& pattern,
                  const std::function<void(converge::Consumer&)>& handlers) -> Status {
    if (cfg_.role == "worker" && !cfg_.consumers.empty() &&
        std::find(cfg_.consumers.begin(), cfg_.consumers.end(), name) == cfg_.consumers.end()) {
      return converge::OkStatus();
    }
    converge::ConsumerOptions o;
    o.name = name;
    o.max_attempts = cfg_.max_attempts;
    o.visibility = cfg_.visibility;
    o.backoff_initial = cfg_.backoff_initial;
    o.backoff_max = cfg_.backoff_max;
#if CONVERGE_WITH_NATS
    if (nats_ && !pattern.empty()) {
      converge::NatsSubscription ns;
      ns.consumer = name;
      ns.pattern = pattern;
      // A crashed worker's messages come back after AckWait; in-progress acks keep a
      // slow handler's for up to the visibility.
      ns.ack_wait = std::min<Millis>(cfg_.visibility, std::chrono::seconds(10));
      ns.max_deliver = cfg_.max_attempts + 4;
      o.poll = std::chrono::milliseconds(20);  // Fetch itself waits for messages
      CONVERGE_RETURN_IF_ERROR(converge::ValidateNatsRetention(ns, o));
      auto sub = nats_->Subscribe(ns);
      if (!sub) return sub.error();
      subscribers_.push_back(std::move(*sub));
    } else {
      subscribers_.push_back(queue_->OpenSubscriber(name));
    }
#else
    (void)pattern;
    subscribers_.push_back(queue_->OpenSubscriber(name));
#endif
    consumers_.push_back(&runtime_->AddConsumer(*subscribers_.back(), o));
    handlers(*consumers_.back());
    return converge::OkStatus();
  };
  CONVERGE_RETURN_IF_ERROR(make("ledger", "payment.*", [this](converge::Consumer& c) {
    c.On("payment.captured", [this](Tx& tx, const Event& e) { return OnCapturedLedger(tx, e); });
    c.On("payment.refunded", [this](Tx& tx, const Event& e) { return OnRefundedLedger(tx, e); });
  }));
  CONVERGE_RETURN_IF_ERROR(make("email", "payment.captured", [this](converge::Consumer& c) {
    c.On("payment.captured", [this](Tx& tx, const Event& e) { return OnCapturedEmail(tx, e); });
  }));
  return make("psp-webhooks", "", [this](converge::Consumer& c) {
    c.On("*", [this](Tx& tx, const Event& e) { return OnPspWebhook(tx, e); });
  });
}

const std::string* Service::Impl::Tenant(const Request& req) const {
  const auto token = converge::http::BearerToken(req);
  return token && api_keys_ ? api_keys_->Find(*token) : nullptr;
}

bool Service::Impl::IsAdmin(const Request& req) const {
  const auto token = converge::http::BearerToken(req);
  if (!token) return false;
  const std::string_view given = *token;
  // Constant time in the token's content (its length may show; it is not the secret).
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

converge::http::Server::Handler Service::Impl::CreatePaymentRoute() {
  // The Idempotency-Key middleware does the protocol (key, tenant scope, fingerprint, 400,
  // 401, 409 + Retry-After, 422, replays); this route keeps only the payment's phases.
  converge::http::IdempotencyRouteOptions o;
  o.scope = [this](const Request& req) -> std::optional<std::string> {
    const std::string* tenant = Tenant(req);
    return tenant ? std::optional<std::string>(*tenant) : std::nullopt;
  };
  o.validate = [](Request& req) -> std::optional<Response> {
    auto parsed = ParsePayment(req.body);
    if (!parsed) return Problem(400, "Bad Request", parsed.error().message(), "invalid-request");
    return std::nullopt;
  };
  o.metrics = &metrics_;
  return converge::http::MultiPhaseRoute(
      *keys_, std::move(o), [this](KeyLease& lease, Begun::Kind, Request& req) {
        return RunPayment(lease, lease.scope, *ParsePayment(req.body));
      });
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
      const std::string now = NowIso(clock_);
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
    const bool undecided = !charge || ProviderUndecided(charge->status);
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
    if (charge->status >= 400) {
      // A decision, not an accident: store it, so retries get the same answer.
      const bool declined = charge->status == 402;
      Response decided =
          declined
              ? Problem(402, "Payment Required", "the payment was declined", "payment-declined")
              : Problem(502, "Bad Gateway", "the payment provider refused the request",
                        "provider-rejected");
      auto out = keys_->Complete(lease, [&](Tx& tx) -> Result<StoredResponse> {
        CONVERGE_ASSIGN_OR_RETURN(
            int64_t n, tx.Exec("UPDATE payments SET status = $1, updated_at = $2 "
                               "WHERE id = $3 AND status = 'pending'",
                               declined ? "declined" : "failed", NowIso(clock_), payment_id));
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
      return Problem(502, "Bad Gateway", "the payment provider answered nonsense",
                     "provider-garbled");
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
          NowIso(clock_), payment_id));
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
    const std::string now = NowIso(clock_);
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
    CONVERGE_RETURN_IF_ERROR(outbox_->Enqueue(tx, e));
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

converge::http::Server::Handler Service::Impl::PspWebhookRoute() {
  // Verification, the dedupe row and the 204 come from the library's intake; this service
  // only says what a provider event is and stages it for its consumer.
  converge::http::WebhookIntakeOptions o;
  o.consumer = "webhook:psp";
  o.source = kPspSource;
  o.secrets = cfg_.webhook_secrets;
  o.tolerance = cfg_.webhook_tolerance;
  o.dedupe_ttl = Millis(kWebhookDedupeMillis);
  o.metrics = &metrics_;
  o.clock = clock_;
  o.validate = [](const converge::http::VerifiedWebhook& hook) -> std::optional<Response> {
    auto event = ParsePspEvent(hook.body);
    if (!event) return Problem(400, "Bad Request", event.error().message(), "invalid-webhook");
    return std::nullopt;
  };
  return converge::http::WebhookIntakeRoute(
      *db_, std::move(o), [this](Tx& tx, const converge::http::VerifiedWebhook& hook) -> Status {
        // `validate` accepted the body: it parses.
        CONVERGE_ASSIGN_OR_RETURN(PspEvent event, ParsePspEvent(hook.body));
        return queue_->EnqueueInTx(tx, "psp-webhooks",
                                   PspQueueEvent(event, hook.id, clock_->NowMillis()));
      });
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
    return tl::unexpected(
        converge::InvalidArgumentError(e.type + " " + e.id + " has malformed data"));
  }
  return Money{d["payment_id"], d["currency"], d["amount"]};
}

Status Book(Tx& tx, const Money& m, const char* kind, int64_t sign, const std::string& now) {
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
  return Book(tx, m, "capture", 1, NowIso(clock_));
}

Status Service::Impl::OnRefundedLedger(Tx& tx, const Event& e) {
  CONVERGE_ASSIGN_OR_RETURN(Money m, ParseMoney(e));
  return Book(tx, m, "refund", -1, NowIso(clock_));
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
  auto r =
      client_.Send({.method = "POST",
                    .url = cfg_.mail_url + "/v1/messages",
                    .headers = {{"Content-Type", "application/json"}, {"Idempotency-Key", key}},
                    .body = payload,
                    .timeout = cfg_.mail_timeout});
  if (!r) return tl::unexpected(r.error());
  if (r->status >= 500 || r->status == 429) {
    return tl::unexpected(
        converge::UnavailableError("mail provider answered " + std::to_string(r->status)));
  }
  if (r->status >= 400) {
    return tl::unexpected(
        converge::InvalidArgumentError("mail provider refused: " + std::to_string(r->status)));
  }
  json j = json::parse(r->body, nullptr, false);
  metrics_.Add("emails_sent_total");
  return j.is_object() && j["id"].is_string() ? j["id"].get<std::string>() : std::string("sent");
}

Status Service::Impl::OnPspWebhook(Tx& tx, const Event& e) {
  CONVERGE_ASSIGN_OR_RETURN(PspEvent event, ParsePspQueueEvent(e));
  if (event.type == "charge.succeeded") {
    const std::string& ref = event.reference;
    CONVERGE_ASSIGN_OR_RETURN(
        int64_t n, tx.Exec("UPDATE payments SET psp_confirmed_at = $1 WHERE id = $2",
                           clock_->NowMillis(), ref));
    // The provider may report the charge before our own commit of it: wait and retry.
    if (n == 0)
      return converge::UnavailableError("charge.succeeded for unknown payment '" + ref + "'");
    return converge::OkStatus();
  }
  if (event.type == "charge.refunded") {
    const std::string& charge = event.charge_id;
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
                           NowIso(clock_), payment_id));
    if (n != 1) return converge::AbortedError("payment " + payment_id + " changed meanwhile");
    Event out;
    out.type = "payment.refunded";
    out.subject = payment_id;
    out.data = json{{"payment_id", payment_id}, {"amount", rows[0].Int(1)},
                    {"currency", rows[0].Text(2)}, {"charge_id", charge}}.dump();
    return converge::StatusOf(outbox_->Enqueue(tx, out));
  }
  return converge::OkStatus();  // other provider events: nothing to do
}

Result<std::string> Service::Impl::PaymentStats(Tx& tx) {
  json out;
  CONVERGE_ASSIGN_OR_RETURN(Rows p,
                            tx.Query("SELECT status, count(*) FROM payments GROUP BY status"));
  out["payments"] = json::object();
  for (const auto& r : p) out["payments"][r.Text(0)] = r.Int(1);
  CONVERGE_ASSIGN_OR_RETURN(Rows le, tx.Query("SELECT count(*) FROM ledger_entries"));
  out["ledger_entries"] = le[0].Int(0);
  const auto cs = completer_->stats();
  out["completer"] = {{"finished", cs.finished}, {"failed", cs.failed}, {"lost", cs.lost}};
  return out.dump();
}

}  // namespace payments
