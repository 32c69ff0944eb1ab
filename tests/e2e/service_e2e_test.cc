// End-to-end tests of the payments service over real sockets: the service, the payment
// provider and the mail provider run in this process on port 0, each with its own SQLite
// file, and the tests speak HTTP to them. (The crash scenarios, which need a process to
// die, run in `converge demo`, registered as the e2e test `e2e.demo`.)
#include <sys/wait.h>

#include <atomic>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <regex>
#include <thread>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "converge/database.h"
#include "converge/failpoint.h"
#include "converge/http.h"
#include "converge/webhook.h"
#include "harness/providers.h"
#include "examples/payments/service.h"
#include "tests/e2e/support.h"
#include "tests/unit/test_util.h"

namespace payments {
namespace {

using converge::http::Client;
using converge::http::Headers;
using converge::http::Response;
using json = nlohmann::json;

constexpr const char* kAcme = "Bearer sk_test_acme";
constexpr const char* kGlobex = "Bearer sk_test_globex";
constexpr const char* kAdmin = "Bearer e2e-admin-token";

// The service the tests run: its files in `dir`, its providers `psp` and `mail`.
ServiceConfig Config(const converge::testing::TempDir& dir,
                     const converge::harness::FakePsp& psp,
                     const converge::harness::FakeMail& mail, const std::string& secret) {
  ServiceConfig c;
  c.port = 0;
  c.db = "sqlite:" + dir.File("service.db");
  c.admin_token = "e2e-admin-token";
  c.api_keys = {{"sk_test_acme", "acme"}, {"sk_test_globex", "globex"}};
  c.psp_url = "http://127.0.0.1:" + std::to_string(psp.port());
  // Seconds, not hundreds of ms: a provider call that a loaded machine stalls past the
  // timeout answers 503 where a test expects 201.
  c.psp_timeout = std::chrono::seconds(3);
  c.mail_url = "http://127.0.0.1:" + std::to_string(mail.port());
  c.webhook_secrets = {secret};
  c.lease = std::chrono::seconds(6);  // longer than the provider's timeout
  c.admin_failpoints = true;
  c.body_limit = 4096;
  c.visibility = std::chrono::seconds(1);
  c.max_attempts = 3;
  c.backoff_initial = std::chrono::milliseconds(10);
  c.backoff_max = std::chrono::milliseconds(100);
  return c;
}

class ServiceE2E : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new converge::testing::TempDir();
    secret_ = new std::string(converge::webhook::NewSecret());
    psp_ = new converge::harness::FakePsp({.db_path = dir_->File("psp.db")});
    mail_ = new converge::harness::FakeMail({.db_path = dir_->File("mail.db")});
    ASSERT_TRUE(psp_->Start().ok());
    ASSERT_TRUE(mail_->Start().ok());
    ServiceConfig c = Config(*dir_, *psp_, *mail_, *secret_);
    service_ = new Service(c);
    ASSERT_TRUE(service_->Start().ok());
    auto db = converge::Database::Open(c.db);
    ASSERT_TRUE(db);
    db_ = db->release();
  }
  static void TearDownTestSuite() {
    delete db_;
    delete service_;
    delete mail_;
    delete psp_;
    delete secret_;
    delete dir_;
  }

  static std::string Url(const std::string& path) {
    return "http://127.0.0.1:" + std::to_string(service_->port()) + path;
  }
  static std::string PspUrl(const std::string& path) {
    return "http://127.0.0.1:" + std::to_string(psp_->port()) + path;
  }

  Response Send(const std::string& method, const std::string& path, Headers headers,
                const std::string& body = "") {
    auto r = client_.Send({.method = method, .url = Url(path), .headers = std::move(headers),
                           .body = body, .timeout = std::chrono::seconds(10)});
    EXPECT_TRUE(r) << r.error().ToString();
    return r ? *r : Response{0, {}, {}};
  }
  Response Pay(const std::string& key, const std::string& body, const char* auth = kAcme) {
    return Send("POST", "/v1/payments", {{"Authorization", auth}, {"Idempotency-Key", key}}, body);
  }
  static std::string Body(int64_t amount, const std::string& order = "o-1") {
    return json{
        {"amount", amount}, {"currency", "EUR"}, {"customer_id", "c-1"}, {"order_id", order}}
        .dump();
  }
  void Faults(const json& f) {
    auto r = client_.Send({.method = "POST", .url = PspUrl("/faults"), .body = f.dump()});
    ASSERT_TRUE(r && r->status == 200);
  }
  int64_t ChargesFor(const std::string& ref) {
    auto r = client_.Send({.url = PspUrl("/v1/charges?reference=" + ref)});
    return r ? json::parse(r->body).value("count", int64_t{-1}) : -1;
  }
  Response Webhook(const std::string& id, const std::string& body, int64_t ts_offset = 0,
                   const std::string& secret = "") {
    const int64_t ts = converge::Clock::System()->NowMillis() / 1000 + ts_offset;
    auto sig = converge::webhook::Sign(secret.empty() ? *secret_ : secret, id, ts, body);
    return Send("POST", "/webhooks/psp",
                {{"webhook-id", id}, {"webhook-timestamp", std::to_string(ts)},
                 {"webhook-signature", *sig}},
                body);
  }
  static int64_t Count(const std::string& sql) {
    int64_t n = -1;
    (void)db_->Read([&](converge::Tx& tx) -> converge::Status {
      CONVERGE_ASSIGN_OR_RETURN(converge::Rows rows, tx.Query(sql));
      n = rows[0].Int(0);
      return converge::OkStatus();
    });
    return n;
  }
  // Every table a request could write to, as one comparable snapshot.
  static std::vector<int64_t> Footprint() { return converge::testing::PaymentsFootprint(*db_); }
  static std::string Problem(const Response& r) {
    return r.Header("Content-Type") ? *r.Header("Content-Type") : "";
  }

  static converge::testing::TempDir* dir_;
  static std::string* secret_;
  static converge::harness::FakePsp* psp_;
  static converge::harness::FakeMail* mail_;
  static Service* service_;
  static converge::Database* db_;
  Client client_;
};

converge::testing::TempDir* ServiceE2E::dir_ = nullptr;
std::string* ServiceE2E::secret_ = nullptr;
converge::harness::FakePsp* ServiceE2E::psp_ = nullptr;
converge::harness::FakeMail* ServiceE2E::mail_ = nullptr;
Service* ServiceE2E::service_ = nullptr;
converge::Database* ServiceE2E::db_ = nullptr;

TEST_F(ServiceE2E, CreateReturns201ThenReplaysWithTheHeader) {
  Response a = Pay("create-1", Body(1200));
  ASSERT_EQ(a.status, 201) << a.body;
  EXPECT_EQ(*a.Header("Content-Type"), "application/json");
  json p = json::parse(a.body);
  EXPECT_EQ(p["status"], "captured");
  EXPECT_EQ(*a.Header("Location"), "/v1/payments/" + p["id"].get<std::string>());
  EXPECT_EQ(a.Header("Idempotent-Replayed"), nullptr);
  Response b =
      Pay("create-1",
          R"({ "order_id": "o-1", "amount": 1200, "customer_id": "c-1", "currency": "EUR" })");
  EXPECT_EQ(b.status, 201);
  EXPECT_EQ(*b.Header("Idempotent-Replayed"), "true");
  EXPECT_EQ(b.body, a.body);
  EXPECT_EQ(ChargesFor(p["id"]), 1);
  Response get =
      Send("GET", "/v1/payments/" + p["id"].get<std::string>(), {{"Authorization", kAcme}});
  EXPECT_EQ(get.status, 200);
  EXPECT_EQ(json::parse(get.body)["amount"], 1200);
  // Tenant-scoped: another tenant cannot see it.
  EXPECT_EQ(Send("GET", "/v1/payments/" + p["id"].get<std::string>(), {{"Authorization", kGlobex}})
                .status,
            404);
  EXPECT_EQ(Send("GET", "/v1/payments/pay_nope", {{"Authorization", kAcme}}).status, 404);
}

TEST_F(ServiceE2E, SameKeyDifferentPayloadIs422) {
  ASSERT_EQ(Pay("mismatch-1", Body(100)).status, 201);
  Response r = Pay("mismatch-1", Body(101));
  EXPECT_EQ(r.status, 422);
  EXPECT_EQ(Problem(r), "application/problem+json");
  EXPECT_EQ(json::parse(r.body)["type"], "urn:converge:problem:idempotency-key-reused");
}

TEST_F(ServiceE2E, ConcurrentDuplicateIs409WithRetryAfterThenReplays) {
  // The first request holds the key, paused after the provider charged; the second
  // arrives while it is in flight.
  constexpr const char* kPoint = "payments.after_charge_before_commit";
  ASSERT_TRUE(converge::failpoint::Configure(std::string(kPoint) + "=pause*1").ok());
  Response first;
  std::thread t([&] { first = Pay("inflight-1", Body(300)); });
  ASSERT_TRUE(converge::failpoint::WaitPaused(kPoint, std::chrono::seconds(10)));
  Response second = Pay("inflight-1", Body(300));
  EXPECT_EQ(converge::failpoint::Release(kPoint), 1);
  t.join();
  ASSERT_TRUE(converge::failpoint::Configure("").ok());
  EXPECT_EQ(second.status, 409);
  ASSERT_NE(second.Header("Retry-After"), nullptr);
  EXPECT_EQ(Problem(second), "application/problem+json");
  ASSERT_EQ(first.status, 201);
  Response third = Pay("inflight-1", Body(300));
  EXPECT_EQ(third.status, 201);
  EXPECT_EQ(*third.Header("Idempotent-Replayed"), "true");
  EXPECT_EQ(ChargesFor(json::parse(first.body)["id"]), 1);
}

TEST_F(ServiceE2E, DeclineIs402AndIsStored) {
  Faults({{"decline_next", 1}});
  Response r = Pay("decline-1", Body(402));
  EXPECT_EQ(r.status, 402);
  EXPECT_EQ(json::parse(r.body)["type"], "urn:converge:problem:payment-declined");
  Response again = Pay("decline-1", Body(402));
  EXPECT_EQ(again.status, 402);
  EXPECT_EQ(*again.Header("Idempotent-Replayed"), "true");
  EXPECT_EQ(Count("SELECT count(*) FROM payments WHERE status = 'declined'"), 1);
}

TEST_F(ServiceE2E, ProviderOutageIs503AndTheRetryChargesOnce) {
  Faults({{"fail_next", 1}});
  Response r = Pay("outage-1", Body(503));
  EXPECT_EQ(r.status, 503);
  ASSERT_NE(r.Header("Retry-After"), nullptr);
  Response retry = Pay("outage-1", Body(503));
  ASSERT_EQ(retry.status, 201) << retry.body;
  EXPECT_EQ(retry.Header("Idempotent-Replayed"), nullptr);
  EXPECT_EQ(ChargesFor(json::parse(retry.body)["id"]), 1);
}

// The provider charged but answered too late: the outcome was unknown. The retry passes
// the same downstream key and gets that charge back.
TEST_F(ServiceE2E, ProviderTimeoutThenRetryConvergesOnOneCharge) {
  auto slow = client_.Send({.method = "POST", .url = PspUrl("/faults"),
                            .body = R"({"timeout_next": 1, "timeout_ms": 5000})"});
  ASSERT_TRUE(slow);
  Response r = Pay("timeout-1", Body(504));
  EXPECT_EQ(r.status, 503);
  Response retry = Pay("timeout-1", Body(504));
  ASSERT_EQ(retry.status, 201) << retry.body;
  EXPECT_EQ(ChargesFor(json::parse(retry.body)["id"]), 1);
}

TEST_F(ServiceE2E, CrossTenantKeyReuseGetsAFreshRequest) {
  Response a = Pay("shared-key", Body(700), kAcme);
  Response b = Pay("shared-key", Body(700), kGlobex);
  ASSERT_EQ(a.status, 201);
  ASSERT_EQ(b.status, 201);
  EXPECT_EQ(b.Header("Idempotent-Replayed"), nullptr);
  EXPECT_NE(json::parse(a.body)["id"], json::parse(b.body)["id"]);
}

TEST_F(ServiceE2E, EventsReachLedgerAndOneReceiptPerPayment) {
  Response a = Pay("effects-1", Body(880));
  ASSERT_EQ(a.status, 201);
  std::string id = json::parse(a.body)["id"];
  EXPECT_TRUE(converge::testing::WaitUntil([&] {
    return Count("SELECT count(*) FROM ledger_entries WHERE payment_id = '" + id + "'") == 2 &&
           Count("SELECT count(*) FROM effects WHERE effect_key = 'receipt:" + id +
                 "' AND state = 'done'") == 1;
  }));
  EXPECT_EQ(Count("SELECT sum(amount) FROM ledger_entries WHERE payment_id = '" + id + "'"), 0);
}

TEST_F(ServiceE2E, WebhookIsVerifiedStoredOnceAndProcessed) {
  Response a = Pay("refund-1", Body(990));
  ASSERT_EQ(a.status, 201);
  json p = json::parse(a.body);
  std::string body =
      json{{"type", "charge.refunded"},
           {"data", {{"charge_id", p["charge_id"]}, {"amount", 990}, {"currency", "EUR"}}}}
          .dump();
  EXPECT_EQ(Webhook("msg_refund_1", body).status, 204);
  EXPECT_EQ(Webhook("msg_refund_1", body).status, 204);  // duplicate: 2xx, no second effect
  std::string id = p["id"];
  EXPECT_TRUE(converge::testing::WaitUntil([&] {
    return Count("SELECT count(*) FROM ledger_entries WHERE payment_id = '" + id +
                 "' AND kind = 'refund'") == 2;
  }));
  EXPECT_EQ(Count("SELECT count(*) FROM payments WHERE id = '" + id + "' AND status = 'refunded'"),
            1);
  EXPECT_EQ(Count("SELECT count(*) FROM consumer_inbox WHERE consumer = 'webhook:psp' AND event_id "
                  "= 'msg_refund_1'"),
            1);
}

TEST_F(ServiceE2E, AdminApiListsShowsReplaysAndDiscardsDeadLetters) {
  // A refund for a charge nobody knows is retried (the charge may not be recorded yet)
  // until its attempts run out: then a dead letter.
  std::string body =
      json{{"type", "charge.refunded"}, {"data", {{"charge_id", "ch_ghost"}}}}.dump();
  ASSERT_EQ(Webhook("msg_ghost_1", body).status, 204);
  int64_t id = 0;
  ASSERT_TRUE(converge::testing::WaitUntil([&] {
    Response l =
        Send("GET", "/admin/dead-letters?consumer=psp-webhooks", {{"Authorization", kAdmin}});
    json list = json::parse(l.body);  // kept alive: the loop below walks into it
    for (auto& d : list["dead_letters"]) {
      if (d["event_id"] == "msg_ghost_1") id = d["id"];
    }
    return id != 0;
  }));
  Response one =
      Send("GET", "/admin/dead-letters/" + std::to_string(id), {{"Authorization", kAdmin}});
  EXPECT_EQ(one.status, 200);
  EXPECT_EQ(json::parse(one.body)["envelope"]["data"]["charge_id"], "ch_ghost");
  EXPECT_EQ(Send("POST", "/admin/dead-letters/" + std::to_string(id) + "/replay",
                 {{"Authorization", kAdmin}})
                .status,
            200);
  EXPECT_EQ(Send("POST", "/admin/dead-letters/" + std::to_string(id) + "/replay",
                 {{"Authorization", kAdmin}})
                .status,
            409);
  // The replay fails the same way and is parked again, once: no loop.
  int64_t again = 0;
  ASSERT_TRUE(converge::testing::WaitUntil([&] {
    again = Count(
        "SELECT count(*) FROM dead_letters WHERE event_id = 'msg_ghost_1' AND state = 'parked'");
    return again == 1;
  }));
  int64_t newest = Count("SELECT max(id) FROM dead_letters WHERE event_id = 'msg_ghost_1'");
  EXPECT_EQ(
      Send("DELETE", "/admin/dead-letters/" + std::to_string(newest), {{"Authorization", kAdmin}})
          .status,
      200);
  EXPECT_EQ(Send("DELETE", "/admin/dead-letters/999999", {{"Authorization", kAdmin}}).status, 404);
  Response stats = Send("GET", "/admin/stats", {{"Authorization", kAdmin}});
  ASSERT_EQ(stats.status, 200);
  json s = json::parse(stats.body);
  EXPECT_TRUE(s["outbox"].contains("oldest_unpublished_age_ms"));
  EXPECT_TRUE(s["inbox"].is_object());
  EXPECT_TRUE(s["idempotency_keys"].contains("completed"));
}

TEST_F(ServiceE2E, MetricsHealthAndReadiness) {
  ASSERT_EQ(Pay("metrics-1", Body(10)).status, 201);
  Response m = Send("GET", "/metrics", {});
  EXPECT_EQ(m.status, 200);
  for (const char* name :
       {"http_requests_total{", "consumer_processed_total", "relay_published_total",
        "db_commit_batch_size_bucket", "outbox_backlog", "relay_lag_seconds",
        "idempotency_replays_total", "consumer_duplicates_total", "db_checkpoints_total",
        "db_checkpoint_failures_total", "db_wal_pages",
        "db_writer_seconds_total{activity=\"waiting\"}"}) {
    EXPECT_NE(m.body.find(name), std::string::npos) << name;
  }
  EXPECT_EQ(Send("GET", "/healthz", {}).status, 200);
  EXPECT_EQ(Send("GET", "/readyz", {}).status, 200);
}

// /metrics passes Prometheus' own linter: every family has # HELP and # TYPE, counters end
// in _total, units are base units, the text parses. promtool comes with Debian's
// `prometheus` package (scripts/install-deps.sh).
TEST_F(ServiceE2E, MetricsPassPromtoolCheckMetrics) {
  ASSERT_EQ(Pay("promtool-1", Body(10)).status, 201);
  ASSERT_EQ(Pay("promtool-1", Body(10)).status, 201);  // a replay
  ASSERT_EQ(Pay("promtool-1", Body(11)).status, 422);  // a mismatch
  ASSERT_EQ(Webhook("msg_promtool", R"({"type":"charge.refunded","data":{}})", 0,
                    converge::webhook::NewSecret())
                .status,
            401);
  Response m = Send("GET", "/metrics", {});
  ASSERT_EQ(m.status, 200);
  for (const char* family : {"idempotency_replays_total", "idempotency_mismatches_total",
                             "webhooks_rejected_total", "completer_finished_total",
                             "effects_lost_claims_total", "relay_partitions_owned"}) {
    EXPECT_NE(m.body.find("# HELP " + std::string(family) + " "), std::string::npos) << family;
  }
  const std::string file = dir_->File("metrics.txt");
  {
    std::ofstream out(file);
    out << m.body;
  }
  const std::string output = dir_->File("promtool.out");
  const int rc =
      std::system(("promtool check metrics < " + file + " > " + output + " 2>&1").c_str());
  std::ifstream in(output);
  const std::string said((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  ASSERT_NE(rc, -1);
  EXPECT_EQ(WEXITSTATUS(rc), 0) << "promtool check metrics (is Debian's prometheus package "
                                   "installed? scripts/install-deps.sh) said:\n" << said;
  EXPECT_EQ(said, "") << said;
}

// Every bad input gets its status and leaves every table as it was.
TEST_F(ServiceE2E, BadInputTableWritesNothing) {
  // Settle the earlier tests' work first: an empty queue alone is not enough, the relay may
  // not have published their last event yet (it then lands in the middle of the table).
  ASSERT_TRUE(converge::testing::WaitUntil([&] {
    return Count("SELECT count(*) FROM outbox_events WHERE published_at IS NULL") == 0 &&
           Count("SELECT count(*) FROM queue_messages") == 0;
  }));
  const std::string ok = Body(100, "bad-input");
  const int64_t now = converge::Clock::System()->NowMillis() / 1000;
  auto signed_headers = [&](const std::string& id, const std::string& body, int64_t ts) {
    return Headers{{"webhook-id", id}, {"webhook-timestamp", std::to_string(ts)},
                   {"webhook-signature", *converge::webhook::Sign(*secret_, id, ts, body)}};
  };
  const std::string hook = R"({"type":"charge.refunded","data":{"charge_id":"ch_x"}})";
  const std::string numeric_charge_id = R"({"type":"charge.refunded","data":{"charge_id":7}})";
  const std::string deep_hook = R"({"type":"x","data":{"a":)" + std::string(300, '[') +
                                std::string(300, ']') + "}}";
  struct Case {
    std::string name, method, path;
    Headers headers;
    std::string body;
    int status;
  };
  auto pay = [&](Headers h, std::string body, int status, std::string name) {
    return Case{std::move(name), "POST", "/v1/payments", std::move(h), std::move(body), status};
  };
  Headers auth_key = {{"Authorization", kAcme}, {"Idempotency-Key", "bad-input-key"}};
  auto with_key = [&](const std::string& key) {
    return Headers{{"Authorization", kAcme}, {"Idempotency-Key", key}};
  };
  auto body_with = [&](const char* field, json v) {
    json j = json::parse(ok);
    j[field] = v;
    return j.dump();
  };
  auto body_without = [&](const char* field) {
    json j = json::parse(ok);
    j.erase(field);
    return j.dump();
  };
  std::vector<Case> cases = {
      pay({{"Authorization", kAcme}}, ok, 400, "missing Idempotency-Key"),
      pay(with_key("\"\""), ok, 400, "empty quoted key"),
      pay(with_key(std::string(256, 'k')), ok, 400, "key over 255 bytes"),
      pay(with_key("tab\there"), ok, 400, "key with a control character"),
      pay(with_key("del\x7f"), ok, 400, "key with DEL"),
      pay(with_key("caf\xc3\xa9"), ok, 400, "key with non-ASCII bytes"),
      pay(auth_key, "{not json", 400, "invalid JSON"),
      pay(auth_key, "[1,2]", 400, "JSON array body"),
      pay(auth_key, "", 400, "empty body"),
      pay(auth_key, body_without("amount"), 400, "missing amount"),
      pay(auth_key, body_with("amount", "100"), 400, "amount as a string"),
      pay(auth_key, body_with("amount", -5), 400, "negative amount"),
      pay(auth_key, body_with("amount", 0), 400, "zero amount"),
      pay(auth_key, body_with("amount", 1000000000000000LL), 400, "huge amount"),
      pay(auth_key, body_with("amount", 10.5), 400, "fractional amount"),
      pay(auth_key, body_with("currency", "XXX"), 400, "unknown currency"),
      pay(auth_key, body_with("currency", "eur"), 400, "lower-case currency"),
      pay(auth_key, body_with("currency", 978), 400, "currency as a number"),
      pay(auth_key, body_without("customer_id"), 400, "missing customer_id"),
      pay(auth_key, body_with("customer_id", std::string(65, 'c')), 400, "customer_id too long"),
      pay(auth_key, body_with("order_id", "has space"), 400, "order_id with a space"),
      pay(auth_key, std::string(8192, ' ') + ok, 413, "oversized body"),
      pay({{"Idempotency-Key", "k"}}, ok, 401, "missing Authorization"),
      pay({{"Authorization", "Basic c2s6"}, {"Idempotency-Key", "k"}}, ok, 401,
          "wrong auth scheme"),
      pay({{"Authorization", "Bearer sk_unknown"}, {"Idempotency-Key", "k"}}, ok, 401,
          "unknown API key"),
      {"webhook without signature headers", "POST", "/webhooks/psp", {}, hook, 401},
      {"webhook with a bad signature",
       "POST",
       "/webhooks/psp",
       {{"webhook-id", "msg_bad"},
        {"webhook-timestamp", std::to_string(now)},
        {"webhook-signature", "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}},
       hook,
       401},
      {"webhook signed with another secret",
       "POST",
       "/webhooks/psp",
       {{"webhook-id", "msg_other"},
        {"webhook-timestamp", std::to_string(now)},
        {"webhook-signature",
         *converge::webhook::Sign(converge::webhook::NewSecret(), "msg_other", now, hook)}},
       hook,
       401},
      {"webhook with a stale timestamp", "POST", "/webhooks/psp",
       signed_headers("msg_old", hook, now - 600), hook, 401},
      {"webhook with a future timestamp", "POST", "/webhooks/psp",
       signed_headers("msg_new", hook, now + 600), hook, 401},
      {"webhook body tampered after signing", "POST", "/webhooks/psp",
       signed_headers("msg_t", hook, now), hook + " ", 401},
      {"webhook body not JSON", "POST", "/webhooks/psp", signed_headers("msg_nj", "not json", now),
       "not json", 400},
      {"webhook JSON without type", "POST", "/webhooks/psp",
       signed_headers("msg_nt", R"({"data":{}})", now), R"({"data":{}})", 400},
      // Was a 500 at every retry of the provider: the route read the id with a
      // json::value that threw (found by fuzz/psp_event_fuzz.cc's rules).
      {"webhook whose charge_id is not a string", "POST", "/webhooks/psp",
       signed_headers("msg_ci", numeric_charge_id, now), numeric_charge_id, 400},
      {"webhook data nested too deep to encode", "POST", "/webhooks/psp",
       signed_headers("msg_dd", deep_hook, now), deep_hook, 400},
      {"admin with a wrong token",
       "GET",
       "/admin/dead-letters",
       {{"Authorization", "Bearer wrong"}},
       "",
       401},
      {"admin without a token", "GET", "/admin/stats", {}, "", 401},
      {"admin list with a bad state",
       "GET",
       "/admin/dead-letters?state=lost",
       {{"Authorization", kAdmin}},
       "",
       400},
      {"admin show with a non-numeric id",
       "GET",
       "/admin/dead-letters/abc",
       {{"Authorization", kAdmin}},
       "",
       400},
      {"admin replay of an unknown id",
       "POST",
       "/admin/dead-letters/999999/replay",
       {{"Authorization", kAdmin}},
       "",
       404},
      {"unknown route", "GET", "/v2/nothing", {}, "", 404},
      {"wrong method", "PUT", "/v1/payments", {{"Authorization", kAcme}}, ok, 405},
  };
  ASSERT_GE(cases.size(), 25u);
  const std::vector<int64_t> before = Footprint();
  for (const Case& c : cases) {
    Response r = Send(c.method, c.path, c.headers, c.body);
    EXPECT_EQ(r.status, c.status) << c.name << ": " << r.body;
    if (r.status >= 400 && r.status != 413) {
      EXPECT_EQ(Problem(r), "application/problem+json") << c.name;
    }
    EXPECT_EQ(Footprint(), before) << c.name << " wrote something";
  }
}

TEST_F(ServiceE2E, GracefulStopFinishesTheRequestInFlight) {
  // A second service on the same store, stopped while a slow request runs.
  ServiceConfig c;
  c.port = 0;
  c.db = "sqlite:" + dir_->File("graceful.db");
  c.admin_token = "e2e-admin-token";
  c.api_keys = {{"sk_test_acme", "acme"}};
  c.psp_url = "http://127.0.0.1:" + std::to_string(psp_->port());
  c.mail_url = "http://127.0.0.1:" + std::to_string(mail_->port());
  c.webhook_secrets = {*secret_};
  Service s(c);
  ASSERT_TRUE(s.Start().ok());
  // The request is held after the provider charged until the service has begun to stop.
  constexpr const char* kPoint = "payments.after_charge_before_commit";
  ASSERT_TRUE(converge::failpoint::Configure(std::string(kPoint) + "=pause*1").ok());
  std::atomic<int> status{0};
  std::thread t([&] {
    auto r = client_.Send({.method = "POST",
                           .url = "http://127.0.0.1:" + std::to_string(s.port()) + "/v1/payments",
                           .headers = {{"Authorization", kAcme}, {"Idempotency-Key", "graceful-1"}},
                           .body = Body(55)});
    status = r ? r->status : -1;
  });
  ASSERT_TRUE(converge::failpoint::WaitPaused(kPoint, std::chrono::seconds(10)));
  const uint16_t port = s.port();
  std::thread stopper([&] { s.Stop(); });
  // Stopping: the service no longer reports ready (or no longer accepts connections).
  EXPECT_TRUE(converge::testing::WaitUntil([&] {
    auto ready = client_.Send(
        {.url = "http://127.0.0.1:" + std::to_string(port) + "/readyz",
         .timeout = std::chrono::milliseconds(500)});
    return !ready || ready->status != 200;
  }));
  EXPECT_EQ(converge::failpoint::Release(kPoint), 1);
  stopper.join();
  t.join();
  ASSERT_TRUE(converge::failpoint::Configure("").ok());
  EXPECT_EQ(status.load(), 201);
}

// A letter that is no longer parked (replayed, by this call or a concurrent one that won):
// replaying or discarding it again is a 409 problem+json, not a store error; an unknown
// id stays 404. (#7, item 5)
TEST_F(ServiceE2E, AdminReplayOrDiscardOfALetterNoLongerParkedIs409) {
  std::string body =
      json{{"type", "charge.refunded"}, {"data", {{"charge_id", "ch_ghost_409"}}}}.dump();
  ASSERT_EQ(Webhook("msg_ghost_409", body).status, 204);
  int64_t id = 0;
  ASSERT_TRUE(converge::testing::WaitUntil([&] {
    id = Count(
        "SELECT coalesce(max(id), 0) FROM dead_letters "
        "WHERE event_id = 'msg_ghost_409' AND state = 'parked'");
    return id > 0;
  }));
  const std::string path = "/admin/dead-letters/" + std::to_string(id);
  ASSERT_EQ(Send("POST", path + "/replay", {{"Authorization", kAdmin}}).status, 200);
  for (const auto& [method, target] :
       {std::pair<std::string, std::string>{"POST", path + "/replay"}, {"DELETE", path}}) {
    Response r = Send(method, target, {{"Authorization", kAdmin}});
    EXPECT_EQ(r.status, 409) << method << " " << target;
    EXPECT_EQ(Problem(r), "application/problem+json");
    EXPECT_EQ(json::parse(r.body, nullptr, false)["type"], "urn:converge:problem:not-parked");
  }
  EXPECT_EQ(Send("POST", "/admin/dead-letters/999999/replay", {{"Authorization", kAdmin}}).status,
            404);
}

// Regression (correctness issue, fingerprints): the fingerprint went through a double, so
// two bodies differing only in a number past 64 bits were "the same request" and the
// second got the first's replay instead of 422.
TEST_F(ServiceE2E, SameKeyBodiesDifferingOnlyInAHugeNumberIs422) {
  auto body = [](const std::string& ref) {
    return R"({"amount": 700, "currency": "EUR", "customer_id": "c-1", "order_id": "o-huge",)"
           R"( "ref": )" + ref + "}";
  };
  ASSERT_EQ(Pay("huge-number-1", body("18446744073709551616")).status, 201);
  Response r = Pay("huge-number-1", body("18446744073709551617"));
  EXPECT_EQ(r.status, 422) << r.body;
  EXPECT_EQ(r.Header("Idempotent-Replayed"), nullptr);
  EXPECT_EQ(Problem(r), "application/problem+json");
  EXPECT_EQ(json::parse(r.body)["type"], "urn:converge:problem:idempotency-key-reused");
  // The same number again, spelt the same way: the replay.
  Response again = Pay("huge-number-1", body("18446744073709551616"));
  EXPECT_EQ(again.status, 201);
  EXPECT_NE(again.Header("Idempotent-Replayed"), nullptr);
}

// Issue #7: a provider's 409 "key in use" (like 408/423/425/429) is not a decision: the
// charge may still happen. The service used to store a permanent 502 and mark the payment
// failed while the provider had charged.
TEST_F(ServiceE2E, ProviderKeyInUseIsAnUnknownOutcomeNotAFailure) {
  Faults({{"in_use_next", 1}});  // the provider charges, then answers 409
  Response r = Pay("in-use-1", Body(409, "o-in-use"));
  EXPECT_EQ(r.status, 503) << r.body;
  ASSERT_NE(r.Header("Retry-After"), nullptr);
  Response retry = Pay("in-use-1", Body(409, "o-in-use"));
  ASSERT_EQ(retry.status, 201) << retry.body;
  const std::string id = json::parse(retry.body)["id"];
  EXPECT_EQ(ChargesFor(id), 1);
  EXPECT_EQ(Count("SELECT count(*) FROM payments WHERE id = '" + id + "' AND status = 'captured'"),
            1);
}

// store.publish_in_transaction: a payment's events go on the queue in the transaction that
// records it (their outbox rows published at their creation, by no relay pass), and the
// ledger and the receipt follow as before.
TEST(ServicePublishInTransaction, EventsReachTheLedgerAndOneReceiptWithNoRelayPass) {
  converge::testing::TempDir dir;
  converge::harness::FakePsp psp({.db_path = dir.File("psp.db")});
  converge::harness::FakeMail mail({.db_path = dir.File("mail.db")});
  ASSERT_TRUE(psp.Start().ok());
  ASSERT_TRUE(mail.Start().ok());
  ServiceConfig c = Config(dir, psp, mail, converge::webhook::NewSecret());
  c.publish_in_transaction = true;
  Service service(c);
  ASSERT_TRUE(service.Start().ok());
  auto db = converge::Database::Open(c.db);
  ASSERT_TRUE(db);
  auto count = [&](const std::string& sql) { return converge::testing::QueryInt(**db, sql); };
  Client client;
  auto r = client.Send({.method = "POST",
                        .url = "http://127.0.0.1:" + std::to_string(service.port()) +
                               "/v1/payments",
                        .headers = {{"Authorization", kAcme}, {"Idempotency-Key", "pit-1"}},
                        .body = json{{"amount", 700},
                                     {"currency", "EUR"},
                                     {"customer_id", "c-1"},
                                     {"order_id", "o-pit"}}
                                    .dump(),
                        .timeout = std::chrono::seconds(10)});
  ASSERT_TRUE(r) << r.error().ToString();
  ASSERT_EQ(r->status, 201) << r->body;
  const std::string id = json::parse(r->body)["id"];
  EXPECT_TRUE(converge::testing::WaitUntil([&] {
    return count("SELECT count(*) FROM ledger_entries WHERE payment_id = '" + id + "'") == 2 &&
           count("SELECT count(*) FROM effects WHERE effect_key = 'receipt:" + id +
                 "' AND state = 'done'") == 1;
  }));
  EXPECT_GT(count("SELECT count(*) FROM outbox_events"), 0);
  EXPECT_EQ(count("SELECT count(*) FROM outbox_events WHERE published_at IS NULL OR "
                  "published_at <> created_at"),
            0);
  // The relay runs, and published none of them.
  auto m = client.Send({.method = "GET",
                        .url = "http://127.0.0.1:" + std::to_string(service.port()) + "/metrics",
                        .timeout = std::chrono::seconds(10)});
  ASSERT_TRUE(m) << m.error().ToString();
  std::smatch published, for_relay;
  ASSERT_TRUE(std::regex_search(m->body, published,
                                std::regex(R"(relay_published_total\{[^}]*\} (\d+))")))
      << m->body;
  EXPECT_EQ(published[1], "0");
  ASSERT_TRUE(std::regex_search(
      m->body, for_relay, std::regex(R"(outbox_enqueued_total\{way="relay"\} (\d+))")))
      << m->body;
  EXPECT_EQ(for_relay[1], "0");
  EXPECT_TRUE(std::regex_search(
      m->body, std::regex(R"(outbox_enqueued_total\{way="in_transaction"\} [1-9])")))
      << m->body;
}

// Issue #7: a refund webhook for a charge this service has not recorded yet is transient
// (retried with backoff), not a poison message. The test pauses the service right after
// the provider charged, through the admin failpoint hook, so the refund arrives first.
// It runs on a service of its own: it also pauses the consumers once the first refund
// attempt has committed its failure, so the retry budget (3 deliveries, 10-100 ms apart)
// does not depend on how fast the test lets the charge go. The shared service's other
// consumers could reach that pause first.
TEST(ServiceEarlyRefund, RefundBeforeTheChargeIsRecordedIsRetriedThenApplied) {
  converge::testing::TempDir dir;
  converge::harness::FakePsp psp({.db_path = dir.File("psp.db")});
  converge::harness::FakeMail mail({.db_path = dir.File("mail.db")});
  ASSERT_TRUE(psp.Start().ok());
  ASSERT_TRUE(mail.Start().ok());
  const std::string secret = converge::webhook::NewSecret();
  const ServiceConfig c = Config(dir, psp, mail, secret);
  Service service(c);
  ASSERT_TRUE(service.Start().ok());
  auto db = converge::Database::Open(c.db);
  ASSERT_TRUE(db);
  Client client;
  auto send = [&](const std::string& method, const std::string& path, Headers headers,
                  const std::string& body) {
    auto r = client.Send({.method = method,
                          .url = "http://127.0.0.1:" + std::to_string(service.port()) + path,
                          .headers = std::move(headers),
                          .body = body,
                          .timeout = std::chrono::seconds(10)});
    EXPECT_TRUE(r) << r.error().ToString();
    return r ? *r : Response{0, {}, {}};
  };
  auto admin = [&](const std::string& method, const std::string& path, const std::string& body) {
    return send(method, path, {{"Authorization", kAdmin}}, body);
  };
  auto paused = [&](const std::string& name) {
    Response fp = admin("GET", "/admin/failpoints/" + name, "");
    return fp.status == 200 ? json::parse(fp.body).value("paused", 0) : -1;
  };
  auto count = [&](const std::string& sql) { return converge::testing::QueryInt(**db, sql); };
  Response paid;  // written by `payer`, so it outlives it
  std::thread payer;
  struct Join {
    std::thread& t;
    ~Join() {
      if (t.joinable()) t.join();
    }
  } join{payer};
  struct ClearFailpoints {  // also when an assertion ends the test early (before `join`)
    ~ClearFailpoints() { (void)converge::failpoint::Configure(""); }
  } clear;
  // The completer is held too: on a loaded machine the pause may outlast the lease, and
  // a completer taking the request over would record the charge before the refund comes.
  // Until the charge is let go, the refund is the only message any consumer sees, so the
  // first consumer to settle something is the refund's.
  ASSERT_EQ(admin("PUT", "/admin/failpoints",
                  "payments.after_charge_before_commit=pause*1;completer.before_takeover=pause;"
                  "consumer.after_commit_before_ack=pause*1")
                .status,
            200);
  payer = std::thread([&] {
    paid = send("POST", "/v1/payments", {{"Authorization", kAcme}, {"Idempotency-Key", "er-1"}},
                json{{"amount", 1200},
                     {"currency", "EUR"},
                     {"customer_id", "c-1"},
                     {"order_id", "o-early"}}
                    .dump());
  });
  ASSERT_TRUE(converge::testing::WaitUntil(
      [&] { return paused("payments.after_charge_before_commit") == 1; }));
  // The provider has charged; the service has not recorded the charge.
  std::string payment_id;
  ASSERT_TRUE((*db)->Read([&](converge::Tx& tx) -> converge::Status {
                   CONVERGE_ASSIGN_OR_RETURN(
                       converge::Rows rows,
                       tx.Query("SELECT id FROM payments WHERE order_id = 'o-early'"));
                   if (!rows.empty()) payment_id = rows[0].Text(0);
                   return converge::OkStatus();
                 }).ok());
  ASSERT_FALSE(payment_id.empty());
  auto charges = client.Send({.url = "http://127.0.0.1:" + std::to_string(psp.port()) +
                                     "/v1/charges?reference=" + payment_id});
  ASSERT_TRUE(charges);
  const std::string charge_id = json::parse(charges->body)["charges"][0]["id"];
  const std::string body =
      json{{"type", "charge.refunded"},
           {"data", {{"charge_id", charge_id}, {"amount", 1200}, {"currency", "EUR"}}}}
          .dump();
  const int64_t ts = converge::Clock::System()->NowMillis() / 1000;
  auto sig = converge::webhook::Sign(secret, "msg_early_refund", ts, body);
  ASSERT_TRUE(sig);
  EXPECT_EQ(send("POST", "/webhooks/psp",
                 {{"webhook-id", "msg_early_refund"},
                  {"webhook-timestamp", std::to_string(ts)},
                  {"webhook-signature", *sig}},
                 body)
                .status,
            204);
  // The refund was tried once, found nothing to refund yet, and its retry was committed;
  // its consumer is held before it fetches again.
  ASSERT_TRUE(converge::testing::WaitUntil(
      [&] { return paused("consumer.after_commit_before_ack") == 1; }));
  EXPECT_EQ(count("SELECT count(*) FROM queue_messages WHERE queue = 'psp-webhooks' "
                  "AND event_id = 'msg_early_refund' AND attempts = 1 "
                  "AND last_error IS NOT NULL"),
            1);
  Response released =
      admin("POST", "/admin/failpoints/payments.after_charge_before_commit/release", "");
  EXPECT_EQ(json::parse(released.body).value("released", 0), 1);
  payer.join();
  ASSERT_EQ(paid.status, 201) << paid.body;
  released = admin("POST", "/admin/failpoints/consumer.after_commit_before_ack/release", "");
  EXPECT_EQ(json::parse(released.body).value("released", 0), 1);
  EXPECT_TRUE(converge::testing::WaitUntil([&] {
    return count("SELECT count(*) FROM payments WHERE id = '" + payment_id +
                 "' AND status = 'refunded'") == 1;
  }));
  EXPECT_EQ(count("SELECT count(*) FROM dead_letters WHERE event_id = 'msg_early_refund'"), 0);
  EXPECT_EQ(count("SELECT count(*) FROM queue_messages WHERE event_id = 'msg_early_refund'"), 0);
  EXPECT_EQ(admin("PUT", "/admin/failpoints", "").status, 200);
}

// The clock hook is for chaos runs: off unless the config asks for it.
TEST_F(ServiceE2E, ClockHookIsServedOnlyWhenConfigured) {
  Response r = Send("GET", "/admin/clock", {{"Authorization", "Bearer e2e-admin-token"}});
  EXPECT_EQ(r.status, 404) << r.body;
}

// With `[admin] clock = true` the whole service reads the shifted clock: moved past the
// key TTL, the same key and body is a new request (a second payment); moved back, the
// hook says so; a malformed offset is refused.
TEST(ServiceClockHook, ShiftsTheClockEveryComponentReads) {
  converge::testing::TempDir dir;
  converge::harness::FakePsp psp({.db_path = dir.File("psp.db")});
  converge::harness::FakeMail mail({.db_path = dir.File("mail.db")});
  ASSERT_TRUE(psp.Start().ok());
  ASSERT_TRUE(mail.Start().ok());
  ServiceConfig c;
  c.port = 0;
  c.db = "sqlite:" + dir.File("service.db");
  c.admin_token = "e2e-admin-token";
  c.api_keys = {{"sk_test_acme", "acme"}};
  c.psp_url = "http://127.0.0.1:" + std::to_string(psp.port());
  c.mail_url = "http://127.0.0.1:" + std::to_string(mail.port());
  c.webhook_secrets = {converge::webhook::NewSecret()};
  // Nothing here needs short waits: a provider call past a 1 s timeout on a loaded host
  // made the first request a 503 (audit, session 44).
  c.key_ttl = std::chrono::seconds(60);
  c.lease = std::chrono::seconds(30);
  c.psp_timeout = std::chrono::seconds(20);
  c.admin_clock = true;
  Service service(c);
  ASSERT_TRUE(service.Start().ok());
  Client client;
  auto send = [&](const std::string& method, const std::string& path, const std::string& body,
                  const char* auth, const std::string& key = "") {
    Headers h = {{"Authorization", auth}};
    if (!key.empty()) h.push_back({"Idempotency-Key", key});
    auto r = client.Send({.method = method,
                          .url = "http://127.0.0.1:" + std::to_string(service.port()) + path,
                          .headers = h,
                          .body = body,
                          .timeout = std::chrono::seconds(60)});
    EXPECT_TRUE(r) << r.error().ToString();
    return r ? *r : Response{0, {}, {}};
  };
  const char* admin = "Bearer e2e-admin-token";
  const std::string body =
      json{{"amount", 500}, {"currency", "EUR"}, {"customer_id", "c-1"}, {"order_id", "o-1"}}
          .dump();
  Response first = send("POST", "/v1/payments", body, kAcme, "clock-1");
  ASSERT_EQ(first.status, 201) << first.body;
  Response replay = send("POST", "/v1/payments", body, kAcme, "clock-1");
  EXPECT_EQ(replay.body, first.body);

  Response moved = send("PUT", "/admin/clock", R"({"offset_ms": 61000})", admin);
  ASSERT_EQ(moved.status, 200) << moved.body;
  EXPECT_EQ(json::parse(moved.body).value("offset_ms", 0), 61000);
  Response fresh = send("POST", "/v1/payments", body, kAcme, "clock-1");
  ASSERT_EQ(fresh.status, 201) << fresh.body;
  EXPECT_EQ(fresh.Header("Idempotent-Replayed"), nullptr);
  EXPECT_NE(json::parse(fresh.body)["id"], json::parse(first.body)["id"]);

  ASSERT_EQ(send("PUT", "/admin/clock", R"({"offset_ms": -3000})", admin).status, 200);
  Response shown = send("GET", "/admin/clock", "", admin);
  EXPECT_EQ(json::parse(shown.body).value("offset_ms", 0), -3000);
  const int64_t now = json::parse(shown.body).value("now_ms", int64_t{0});
  EXPECT_LT(now, converge::Clock::System()->NowMillis() - 2000);
  EXPECT_EQ(send("PUT", "/admin/clock", R"({"offset_ms": "soon"})", admin).status, 400);
  EXPECT_EQ(send("PUT", "/admin/clock", R"({"offset_ms": 86400001})", admin).status, 400);
  EXPECT_EQ(send("GET", "/admin/clock", "", kAcme).status, 401);
  service.Stop();
}

}  // namespace
}  // namespace payments
