#include "harness/providers.h"

#include <atomic>
#include <cstdio>
#include <charconv>
#include <mutex>
#include <optional>
#include <random>
#include <thread>

#include <nlohmann/json.hpp>

#include "converge/database.h"
#include "converge/http.h"
#include "converge/webhook.h"

namespace converge::harness {
namespace {

// "<prefix><16 random hex digits>", e.g. "ch_3f9c0a1b2c3d4e5f".
std::string RandomId(const char* prefix) {
  thread_local std::mt19937_64 rng(std::random_device{}());
  char buf[48];
  std::snprintf(buf, sizeof buf, "%s%016llx", prefix, static_cast<unsigned long long>(rng()));
  return buf;
}

using converge::Database;
using converge::Rows;
using converge::Status;
using converge::Tx;
using converge::http::Json;
using converge::http::Problem;
using converge::http::Request;
using converge::http::Response;
using json = nlohmann::json;

int64_t NowMs() { return converge::Clock::System()->NowMillis(); }

// Failure injection shared by both providers.
class Faults {
 public:
  // Applies a POST /faults body. Unknown keys and wrong types are refused.
  Response Configure(const std::string& body) {
    json j = json::parse(body, nullptr, false);
    if (!j.is_object()) return Problem(400, "Bad Request", "faults must be a JSON object");
    std::lock_guard<std::mutex> l(mu_);
    for (auto& [k, v] : j.items()) {
      if (k == "transient_rate" && v.is_number() && v.get<double>() >= 0 && v.get<double>() <= 1) {
        transient_rate_ = v.get<double>();
      } else if ((k == "fail_next" || k == "timeout_next" || k == "decline_next" ||
                  k == "in_use_next" || k == "refuse_refund_next" || k == "timeout_ms" ||
                  k == "refund_fail_next" || k == "list_delay_next") &&
                 v.is_number_integer() && v.get<int64_t>() >= 0) {
        (k == "fail_next"            ? fail_next_
         : k == "timeout_next"       ? timeout_next_
         : k == "decline_next"       ? decline_next_
         : k == "in_use_next"        ? in_use_next_
         : k == "refuse_refund_next" ? refuse_refund_next_
         : k == "refund_fail_next"   ? refund_fail_next_
         : k == "list_delay_next"    ? list_delay_next_
                                     : timeout_ms_) = v.get<int64_t>();
      } else {
        return Problem(400, "Bad Request", "unknown or malformed fault '" + k + "'");
      }
    }
    return Json(200, "{}");
  }
  bool TakeFail() {
    std::lock_guard<std::mutex> l(mu_);
    if (fail_next_ > 0) {
      --fail_next_;
      return true;
    }
    return transient_rate_ > 0 &&
           std::uniform_real_distribution<double>(0, 1)(rng_) < transient_rate_;
  }
  int64_t TakeTimeout() {
    std::lock_guard<std::mutex> l(mu_);
    if (timeout_next_ == 0) return 0;
    --timeout_next_;
    return timeout_ms_;
  }
  // A real provider answers 409 "idempotency key in use" while its first request with the
  // key still runs; that request may well charge.
  bool TakeInUse() {
    std::lock_guard<std::mutex> l(mu_);
    if (in_use_next_ == 0) return false;
    --in_use_next_;
    return true;
  }
  bool TakeDecline() { return Take(decline_next_); }
  // A refund refused for good (a closed account, an expired charge): 422.
  bool TakeRefuseRefund() { return Take(refuse_refund_next_); }
  // A provider that is down for refunds: 503.
  bool TakeRefundFail() { return Take(refund_fail_next_); }
  // A slow charge lookup: answered after timeout_ms.
  int64_t TakeListDelay() {
    if (!Take(list_delay_next_)) return 0;
    std::lock_guard<std::mutex> l(mu_);
    return timeout_ms_;
  }

 private:
  std::mutex mu_;
  std::mt19937_64 rng_{std::random_device{}()};
  bool Take(int64_t& counter) {
    std::lock_guard<std::mutex> l(mu_);
    if (counter == 0) return false;
    --counter;
    return true;
  }

  int64_t fail_next_ = 0, timeout_next_ = 0, decline_next_ = 0, in_use_next_ = 0,
          refuse_refund_next_ = 0, refund_fail_next_ = 0, list_delay_next_ = 0,
          timeout_ms_ = 3000;
  double transient_rate_ = 0;
};

Response Unavailable() {
  Response r = Problem(503, "Service Unavailable", "temporarily unavailable (injected)");
  r.Set("Retry-After", "1");
  return r;
}

std::unique_ptr<Database> OpenStore(const std::string& path, Status* st) {
  // A stand-in's own durability is not what is under test.
  auto db = Database::Open("sqlite:" + path + "?synchronous=normal");
  if (!db) {
    *st = db.error();
    return nullptr;
  }
  return std::move(*db);
}

}  // namespace

// --- payment provider --------------------------------------------------------------------

class FakePsp::Impl {
 public:
  explicit Impl(ProviderOptions o) : o_(std::move(o)) {}
  ~Impl() { Stop(); }

  Status Start() {
    Status st;
    db_ = OpenStore(o_.db_path, &st);
    if (!db_) return st;
    CONVERGE_RETURN_IF_ERROR(db_->Transact([](Tx& tx) -> Status {
      CONVERGE_RETURN_IF_ERROR(tx.Exec(
          "CREATE TABLE IF NOT EXISTS charges (id TEXT PRIMARY KEY, idempotency_key TEXT UNIQUE "
          "NOT NULL, amount INTEGER NOT NULL, currency TEXT NOT NULL, reference TEXT NOT NULL, "
          "status TEXT NOT NULL, created_at INTEGER NOT NULL)"));
      // Refunds refused by the refuse_refund_next fault, so a checker can tell them.
      CONVERGE_RETURN_IF_ERROR(tx.Exec(
          "CREATE TABLE IF NOT EXISTS refused_refunds (charge_id TEXT NOT NULL, "
          "reference TEXT NOT NULL, created_at INTEGER NOT NULL)"));
      return converge::StatusOf(tx.Exec(
          "CREATE TABLE IF NOT EXISTS webhook_deliveries (id INTEGER PRIMARY KEY AUTOINCREMENT, "
          "msg_id TEXT NOT NULL, body TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, "
          "next_attempt_at INTEGER NOT NULL, state TEXT NOT NULL DEFAULT 'pending', "
          "last_status INTEGER, last_error TEXT)"));
    }));
    if (!o_.webhook_url.empty() && !converge::webhook::DecodeSecret(o_.webhook_secret)) {
      return converge::InvalidArgumentError("fake-psp: the webhook secret is not whsec_<base64>");
    }
    server_ = std::make_unique<converge::http::Server>(converge::http::ServerOptions{
        .address = o_.address, .port = o_.port, .worker_threads = 32, .server_name = "fake-psp"});
    server_->Route("POST", "/v1/charges", [this](Request& r) { return Charge(r); });
    server_->Route("POST", "/v1/charges/{id}/refund", [this](Request& r) { return Refund(r); });
    server_->Route("GET", "/v1/charges", [this](Request& r) { return List(r); });
    server_->Route("GET", "/v1/stats", [this](Request&) { return Stats(); });
    server_->Route("POST", "/faults", [this](Request& r) { return faults_.Configure(r.body); });
    CONVERGE_RETURN_IF_ERROR(server_->Start());
    running_ = true;
    if (!o_.webhook_url.empty()) sender_ = std::thread([this] { SendLoop(); });
    return converge::OkStatus();
  }

  void Stop() {
    if (server_) server_->Stop(std::chrono::seconds(1));
    running_ = false;
    if (sender_.joinable()) sender_.join();
  }

  uint16_t port() const { return server_ ? server_->port() : 0; }

 private:
  Response ChargeJson(const converge::Row& r, int status) {
    return Json(status, json{{"id", r.Text(0)}, {"amount", r.Int(1)}, {"currency", r.Text(2)},
                             {"reference", r.Text(3)}, {"status", r.Text(4)}}
                            .dump());
  }

  Response Charge(Request& req) {
    const std::string* key = req.Header("Idempotency-Key");
    if (key == nullptr || key->empty())
      return Problem(400, "Bad Request", "Idempotency-Key required");
    json j = json::parse(req.body, nullptr, false);
    if (!j.is_object() || !j["amount"].is_number_integer() || !j["currency"].is_string() ||
        !j["reference"].is_string()) {
      return Problem(400, "Bad Request", "amount, currency and reference are required");
    }
    // A key seen before answers with the first outcome, whatever happens now.
    Rows existing;
    Status st = db_->Read([&](Tx& tx) -> Status {
      CONVERGE_ASSIGN_OR_RETURN(existing, tx.Query("SELECT id, amount, currency, reference, status "
                                                   "FROM charges WHERE idempotency_key = $1",
                                                   *key));
      return converge::OkStatus();
    });
    if (!st.ok()) return Unavailable();
    if (!existing.empty()) {
      Response r = existing[0].Text(4) == "declined"
                       ? Problem(402, "Payment Required", "declined")
                       : ChargeJson(existing[0], 200);
      r.Set("Idempotent-Replayed", "true");
      return r;
    }
    if (faults_.TakeFail()) return Unavailable();
    const bool decline = faults_.TakeDecline();
    const std::string id = RandomId("ch_");
    const int64_t now = NowMs();
    bool raced = false;
    st = db_->Transact([&](Tx& tx) -> Status {
      auto n = tx.Exec("INSERT INTO charges (id, idempotency_key, amount, currency, reference, "
                       "status, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7) "
                       "ON CONFLICT (idempotency_key) DO NOTHING",
                       id, *key, j["amount"].get<int64_t>(), j["currency"].get<std::string>(),
                       j["reference"].get<std::string>(), decline ? "declined" : "succeeded", now);
      if (!n) return n.error();
      raced = *n == 0;
      if (raced || decline) return converge::OkStatus();
      return EnqueueWebhook(tx, "charge.succeeded",
                            {{"charge_id", id}, {"reference", j["reference"]},
                             {"amount", j["amount"]}, {"currency", j["currency"]}});
    });
    if (!st.ok()) return Unavailable();
    if (raced) return Charge(req);  // a concurrent request with the key won: replay it
    if (decline) return Problem(402, "Payment Required", "declined");
    if (faults_.TakeInUse()) {
      return Problem(409, "Conflict", "a request with this idempotency key is in progress");
    }
    // A timeout after the charge is made: the caller cannot know it succeeded.
    if (int64_t ms = faults_.TakeTimeout())
      std::this_thread::sleep_for(std::chrono::milliseconds(ms));
    return Json(201, json{{"id", id}, {"amount", j["amount"]}, {"currency", j["currency"]},
                          {"reference", j["reference"]}, {"status", "succeeded"}}
                         .dump());
  }

  Status EnqueueWebhook(Tx& tx, const std::string& type, const json& data) {
    json body = {{"type", type}, {"timestamp", converge::FormatRfc3339(NowMs())}, {"data", data}};
    return converge::StatusOf(tx.Exec(
        "INSERT INTO webhook_deliveries (msg_id, body, next_attempt_at) VALUES ($1, $2, $3)",
        RandomId("msg_"), body.dump(), NowMs()));
  }

  Response Refund(Request& req) {
    const std::string id = req.params["id"];
    if (faults_.TakeRefundFail()) return Unavailable();
    int64_t changed = 0;
    bool refused = false;
    // Taken once: the function may run again (its SQLite batch rolled back for a failing
    // neighbour), and the fault then still belongs to this refund.
    std::optional<bool> refuse;
    Status st = db_->Transact([&](Tx& tx) -> Status {
      refused = false;
      CONVERGE_ASSIGN_OR_RETURN(
          Rows rows,
          tx.Query("SELECT amount, currency, status, reference FROM charges WHERE id = $1", id));
      if (rows.empty()) return converge::NotFoundError("no charge " + id);
      if (rows[0].Text(2) != "succeeded") return converge::OkStatus();
      if (!refuse) refuse = faults_.TakeRefuseRefund();
      if (*refuse) {
        refused = true;
        return converge::StatusOf(
            tx.Exec("INSERT INTO refused_refunds (charge_id, reference, created_at) "
                    "VALUES ($1, $2, $3)",
                    id, rows[0].Text(3), NowMs()));
      }
      CONVERGE_ASSIGN_OR_RETURN(
          changed, tx.Exec("UPDATE charges SET status = 'refunded' WHERE id = $1", id));
      return EnqueueWebhook(
          tx, "charge.refunded",
          {{"charge_id", id}, {"amount", rows[0].Int(0)}, {"currency", rows[0].Text(1)}});
    });
    if (st.code() == converge::StatusCode::kNotFound)
      return Problem(404, "Not Found", st.message());
    if (!st.ok()) return Unavailable();
    if (refused) {
      return Problem(422, "Unprocessable Content", "the charge cannot be refunded (injected)");
    }
    return Json(200, json{{"id", id}, {"status", "refunded"}, {"changed", changed > 0}}.dump());
  }

  Response List(Request& req) {
    if (int64_t ms = faults_.TakeListDelay()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(ms));
    }
    std::string ref;
    if (req.query.rfind("reference=", 0) == 0) ref = req.query.substr(10);
    json out = json::array();
    Status st = db_->Read([&](Tx& tx) -> Status {
      CONVERGE_ASSIGN_OR_RETURN(
          Rows rows, tx.Query("SELECT id, amount, currency, reference, status FROM charges "
                              "WHERE $1 = '' OR reference = $1 ORDER BY created_at", ref));
      for (const auto& r : rows) {
        out.push_back({{"id", r.Text(0)}, {"amount", r.Int(1)}, {"currency", r.Text(2)},
                       {"reference", r.Text(3)}, {"status", r.Text(4)}});
      }
      return converge::OkStatus();
    });
    if (!st.ok()) return Unavailable();
    return Json(200, json{{"count", out.size()}, {"charges", out}}.dump());
  }

  Response Stats() {
    json out;
    Status st = db_->Read([&](Tx& tx) -> Status {
      CONVERGE_ASSIGN_OR_RETURN(Rows c,
                                tx.Query("SELECT status, count(*) FROM charges GROUP BY status"));
      out["charges"] = {{"succeeded", 0}, {"declined", 0}, {"refunded", 0}};
      for (const auto& r : c) out["charges"][r.Text(0)] = r.Int(1);
      CONVERGE_ASSIGN_OR_RETURN(
          Rows d, tx.Query("SELECT state, count(*) FROM webhook_deliveries GROUP BY state"));
      out["webhooks"] = {{"pending", 0}, {"delivered", 0}, {"failed", 0}, {"disabled", 0}};
      for (const auto& r : d) out["webhooks"][r.Text(0)] = r.Int(1);
      CONVERGE_ASSIGN_OR_RETURN(
          Rows dup, tx.Query("SELECT count(*) FROM (SELECT reference FROM charges "
                             "GROUP BY reference HAVING count(*) > 1)"));
      out["references_charged_twice"] = dup[0].Int(0);
      return converge::OkStatus();
    });
    if (!st.ok()) return Unavailable();
    return Json(200, out.dump());
  }

  // Outbound webhooks: signed with the Standard Webhooks scheme, retried with exponential
  // backoff and jitter, Retry-After honoured, 410 Gone disables the endpoint.
  void SendLoop() {
    converge::http::Client client;
    std::mt19937_64 rng(std::random_device{}());
    while (running_.load()) {
      Rows due;
      (void)db_->Read([&](Tx& tx) -> Status {
        CONVERGE_ASSIGN_OR_RETURN(
            due, tx.Query("SELECT id, msg_id, body, attempts FROM webhook_deliveries "
                          "WHERE state = 'pending' AND next_attempt_at <= $1 ORDER BY id LIMIT 32",
                          NowMs()));
        return converge::OkStatus();
      });
      for (const auto& d : due) {
        if (!running_.load()) break;
        const int64_t ts = NowMs() / 1000;
        auto sig = converge::webhook::Sign(o_.webhook_secret, d.Text(1), ts, d.Text(2));
        auto r = client.Send({.method = "POST",
                              .url = o_.webhook_url,
                              .headers = {{"Content-Type", "application/json"},
                                          {"webhook-id", d.Text(1)},
                                          {"webhook-timestamp", std::to_string(ts)},
                                          {"webhook-signature", sig ? *sig : ""}},
                              .body = d.Text(2),
                              .timeout = std::chrono::seconds(5)});
        const int64_t attempts = d.Int(3) + 1;
        std::string state = "pending";
        int64_t delay = std::min<int64_t>(60'000, 100LL << std::min<int64_t>(attempts, 10));
        delay = std::uniform_int_distribution<int64_t>(delay / 2, delay)(rng);
        if (r && r->status >= 200 && r->status < 300) state = "delivered";
        if (r && r->status == 410) state = "disabled";
        if (r && r->Header("Retry-After")) {
          int64_t secs = 0;
          const std::string& ra = *r->Header("Retry-After");
          if (std::from_chars(ra.data(), ra.data() + ra.size(), secs).ec == std::errc()) {
            delay = std::max(delay, secs * 1000);
          }
        }
        // Real providers retry for days; 30 attempts with the 60 s cap span ~25 minutes,
        // longer than a chaos campaign's kill streaks keep the endpoint down.
        if (state == "pending" && attempts >= 30) state = "failed";
        // Without an answer, why (a refused connection, a timeout): a report of webhooks
        // left undelivered can then tell a dead endpoint from a stuck one.
        const std::string error = r ? "" : r.error().message();
        (void)db_->Transact([&](Tx& tx) {
          return converge::StatusOf(tx.Exec(
              "UPDATE webhook_deliveries SET attempts = $1, state = $2, next_attempt_at = $3, "
              "last_status = $4, last_error = $5 WHERE id = $6",
              attempts, state, NowMs() + delay, r ? r->status : 0, error, d.Int(0)));
        });
      }
      if (due.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }

  ProviderOptions o_;
  std::unique_ptr<Database> db_;
  std::unique_ptr<converge::http::Server> server_;
  Faults faults_;
  std::atomic<bool> running_{false};
  std::thread sender_;
};

FakePsp::FakePsp(ProviderOptions options) : impl_(std::make_unique<Impl>(std::move(options))) {}
FakePsp::~FakePsp() = default;
Status FakePsp::Start() { return impl_->Start(); }
uint16_t FakePsp::port() const { return impl_->port(); }
void FakePsp::Stop() { impl_->Stop(); }

// --- mail provider -------------------------------------------------------------------------

class FakeMail::Impl {
 public:
  explicit Impl(ProviderOptions o) : o_(std::move(o)) {}
  ~Impl() { Stop(); }

  Status Start() {
    Status st;
    db_ = OpenStore(o_.db_path, &st);
    if (!db_) return st;
    CONVERGE_RETURN_IF_ERROR(db_->Transact([](Tx& tx) {
      return converge::StatusOf(tx.Exec(
          "CREATE TABLE IF NOT EXISTS messages (id TEXT PRIMARY KEY, idempotency_key TEXT UNIQUE "
          "NOT NULL, recipient TEXT NOT NULL, subject TEXT NOT NULL, body TEXT NOT NULL, "
          "created_at INTEGER NOT NULL)"));
    }));
    server_ = std::make_unique<converge::http::Server>(converge::http::ServerOptions{
        .address = o_.address, .port = o_.port, .worker_threads = 16, .server_name = "fake-mail"});
    server_->Route("POST", "/v1/messages", [this](Request& r) { return Send(r); });
    server_->Route("GET", "/v1/stats", [this](Request&) { return Stats(); });
    server_->Route("GET", "/v1/messages", [this](Request& r) { return ByKey(r); });
    server_->Route("POST", "/faults", [this](Request& r) { return faults_.Configure(r.body); });
    return server_->Start();
  }
  void Stop() {
    if (server_) server_->Stop(std::chrono::seconds(1));
  }
  uint16_t port() const { return server_ ? server_->port() : 0; }

 private:
  Response Send(Request& req) {
    const std::string* key = req.Header("Idempotency-Key");
    if (key == nullptr || key->empty())
      return Problem(400, "Bad Request", "Idempotency-Key required");
    json j = json::parse(req.body, nullptr, false);
    if (!j.is_object() || !j["to"].is_string() || !j["subject"].is_string() ||
        !j["body"].is_string()) {
      return Problem(400, "Bad Request", "to, subject and body are required");
    }
    if (faults_.TakeFail()) return Unavailable();
    const std::string id = RandomId("msg_");
    std::string stored_id = id;
    bool replay = false;
    Status st = db_->Transact([&](Tx& tx) -> Status {
      CONVERGE_ASSIGN_OR_RETURN(
          int64_t n, tx.Exec("INSERT INTO messages (id, idempotency_key, recipient, subject, body, "
                             "created_at) VALUES ($1, $2, $3, $4, $5, $6) "
                             "ON CONFLICT (idempotency_key) DO NOTHING",
                             id, *key, j["to"].get<std::string>(), j["subject"].get<std::string>(),
                             j["body"].get<std::string>(), NowMs()));
      replay = n == 0;
      if (replay) {
        CONVERGE_ASSIGN_OR_RETURN(
            Rows rows, tx.Query("SELECT id FROM messages WHERE idempotency_key = $1", *key));
        if (!rows.empty()) stored_id = rows[0].Text(0);
      }
      return converge::OkStatus();
    });
    if (!st.ok()) return Unavailable();
    Response r = Json(replay ? 200 : 201, json{{"id", stored_id}}.dump());
    if (replay) r.Set("Idempotent-Replayed", "true");
    return r;
  }

  // GET /v1/messages?key=K: how many messages were sent for an idempotency key.
  Response ByKey(Request& req) {
    std::string key;
    if (req.query.rfind("key=", 0) == 0) key = req.query.substr(4);
    for (size_t i = 0; (i = key.find("%3A", i)) != std::string::npos;) key.replace(i, 3, ":");
    int64_t n = 0;
    Status st = db_->Read([&](Tx& tx) -> Status {
      CONVERGE_ASSIGN_OR_RETURN(
          Rows rows, tx.Query("SELECT count(*) FROM messages WHERE idempotency_key = $1", key));
      n = rows[0].Int(0);
      return converge::OkStatus();
    });
    if (!st.ok()) return Unavailable();
    return Json(200, json{{"key", key}, {"count", n}}.dump());
  }

  Response Stats() {
    int64_t n = 0;
    Status st = db_->Read([&](Tx& tx) -> Status {
      CONVERGE_ASSIGN_OR_RETURN(Rows rows, tx.Query("SELECT count(*) FROM messages"));
      n = rows[0].Int(0);
      return converge::OkStatus();
    });
    if (!st.ok()) return Unavailable();
    return Json(200, json{{"messages", n}}.dump());
  }

  ProviderOptions o_;
  std::unique_ptr<Database> db_;
  std::unique_ptr<converge::http::Server> server_;
  Faults faults_;
};

FakeMail::FakeMail(ProviderOptions options) : impl_(std::make_unique<Impl>(std::move(options))) {}
FakeMail::~FakeMail() = default;
Status FakeMail::Start() { return impl_->Start(); }
uint16_t FakeMail::port() const { return impl_->port(); }
void FakeMail::Stop() { impl_->Stop(); }

}  // namespace converge::harness
