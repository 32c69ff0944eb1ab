// converge demo: the payments service, its payment provider and its mail provider, driven
// through named scenarios and a load phase, then checked for convergence.
//
// The provider stand-ins run in this process. The service runs as a child process
// (`converge serve`), because the crash scenarios really crash it: they restart it with a
// failpoint that SIGKILLs it at the named point, then restart it clean and check that the
// retry or the redelivery converged.
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "apps/converge/commands.h"
#include "apps/converge/progress.h"
#include "converge/database.h"
#include "converge/http.h"
#include "converge/webhook.h"
#include "harness/providers.h"
#include "harness/serve_process.h"


namespace converge::cli {
namespace {

using json = nlohmann::json;
using SteadyClock = std::chrono::steady_clock;

using harness::FreePort;
using harness::ServeProcess;

// --- the demo's client and its checks ---------------------------------------------------

struct Demo {
  std::string dir;
  std::string secret;
  std::string admin = "demo-admin-token";
  uint16_t psp_port = 0, mail_port = 0;
  std::unique_ptr<ServeProcess> svc;
  std::unique_ptr<Database> db;  // the service's file, read-only use
  http::Client client;
  int failures = 0;
  std::string paid2, charge2;  // scenario 2's payment, refunded in 8, checked in 10
  std::mt19937_64 rng{std::random_device{}()};

  std::string Psp(const std::string& p) const {
    return "http://127.0.0.1:" + std::to_string(psp_port) + p;
  }
  std::string Mail(const std::string& p) const {
    return "http://127.0.0.1:" + std::to_string(mail_port) + p;
  }

  Result<http::Response> Pay(const std::string& api_key, const std::string& idem_key,
                             const std::string& body) {
    return client.Send({.method = "POST",
                        .url = svc->Url("/v1/payments"),
                        .headers = {{"Authorization", "Bearer " + api_key},
                                    {"Idempotency-Key", idem_key},
                                    {"Content-Type", "application/json"}},
                        .body = body,
                        .timeout = std::chrono::seconds(15)});
  }

  // Sends until the answer is final (not 409/503, not a dropped connection), honouring
  // Retry-After. Counts what it saw.
  Result<http::Response> PayUntilFinal(const std::string& api_key, const std::string& key,
                                       const std::string& body, int* retries = nullptr) {
    for (int attempt = 0; attempt < 100; ++attempt) {
      auto r = Pay(api_key, key, body);
      if (r && r->status != 409 && r->status != 503) return r;
      if (retries) ++*retries;
      int64_t wait_ms = 100;
      if (r && r->Header("Retry-After"))
        wait_ms = 1000 * std::atoll(r->Header("Retry-After")->c_str());
      std::this_thread::sleep_for(std::chrono::milliseconds(std::min<int64_t>(wait_ms, 1000)));
    }
    return tl::unexpected(DeadlineExceededError("no final answer for key " + key));
  }

  json GetJson(const std::string& url, bool admin_auth = false) {
    http::Headers h;
    if (admin_auth) h.emplace_back("Authorization", "Bearer " + admin);
    auto r = client.Send({.url = url, .headers = h});
    if (!r || r->status != 200) return json();
    return json::parse(r->body, nullptr, false);
  }

  // An admin call on the service; true on a 2xx.
  bool Admin(const std::string& method, const std::string& path, const std::string& body) {
    auto r = client.Send({.method = method,
                          .url = svc->Url(path),
                          .headers = {{"Authorization", "Bearer " + admin}},
                          .body = body});
    return r && r->status / 100 == 2;
  }

  // Polls `cond` every 50 ms until it holds or `limit` passes.
  static bool WaitFor(std::chrono::seconds limit, const std::function<bool()>& cond) {
    auto deadline = SteadyClock::now() + limit;
    while (!cond()) {
      if (SteadyClock::now() >= deadline) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return true;
  }

  void Post(const std::string& url, const json& body) {
    (void)client.Send({.method = "POST",
                       .url = url,
                       .headers = {{"Content-Type", "application/json"}},
                       .body = body.dump()});
  }

  int64_t Count(const std::string& sql, const std::string& arg = "") {
    int64_t n = -1;
    Status st = db->Read([&](Tx& tx) -> Status {
      CONVERGE_ASSIGN_OR_RETURN(Rows rows, arg.empty() ? tx.Query(sql) : tx.Query(sql, arg));
      n = rows.empty() ? 0 : rows[0].Int(0);
      return OkStatus();
    });
    return st.ok() ? n : -1;
  }

  int64_t ChargesFor(const std::string& payment_id) {
    json j = GetJson(Psp("/v1/charges?reference=" + payment_id));
    return j.is_object() ? j.value("count", int64_t{-1}) : -1;
  }
  int64_t MailsFor(const std::string& key) {
    json j = GetJson(Mail("/v1/messages?key=" + key));
    return j.is_object() ? j.value("count", int64_t{-1}) : -1;
  }

  // Waits until outbox, queues, effects and the provider's webhooks are all drained.
  bool Converge(std::chrono::seconds limit) {
    auto deadline = SteadyClock::now() + limit;
    while (SteadyClock::now() < deadline) {
      json s = GetJson(svc->Url("/admin/stats"), true);
      json p = GetJson(Psp("/v1/stats"));
      bool queues_empty = s.is_object() && s["queues"].is_object();
      if (queues_empty) {
        for (auto& [q, n] : s["queues"].items())
          queues_empty = queues_empty && n.get<int64_t>() == 0;
      }
      // Sagas settled too: none running or compensating.
      const bool sagas_settled = !s.is_object() || !s.contains("orders") ||
                                 (s["orders"]["running"] == 0 && s["orders"]["compensating"] == 0);
      if (queues_empty && s["outbox"]["backlog"] == 0 && s["effects"]["pending"] == 0 &&
          sagas_settled && p.is_object() && p["webhooks"]["pending"] == 0) {
        return true;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return false;
  }

  void Check(bool ok, const std::string& what) {
    std::printf("    [%s] %s\n", ok ? " ok " : "FAIL", what.c_str());
    if (!ok) ++failures;
  }

  std::string Body(int64_t amount, const std::string& order, const std::string& currency = "EUR") {
    return json{{"amount", amount}, {"currency", currency}, {"customer_id", "cust-" + order},
                {"order_id", order}}
        .dump();
  }

  Status Restart(const std::string& failpoints) {
    svc->Stop(std::chrono::seconds(15));
    return svc->Start(failpoints);
  }

  struct CrashRun {
    bool crashed = false;       // a failpoint SIGKILLed the service
    bool first_failed = false;  // the request in flight got no answer
    Result<http::Response> retry = tl::unexpected(UnknownError("not run"));
  };
  // Restarts the service with `failpoint` armed, sends one payment, waits for the crash,
  // restarts it clean and retries the same key until a final answer.
  CrashRun CrashThenRetry(const std::string& failpoint, const std::string& key,
                          const std::string& body, int* retries = nullptr) {
    CrashRun run;
    Status st = Restart(failpoint + "=crash");
    if (!st.ok()) {
      Check(false, "restart with " + failpoint + ": " + st.ToString());
      return run;
    }
    run.first_failed = !Pay("sk_test_acme", key, body);
    run.crashed = svc->KilledWithin(std::chrono::seconds(10));
    st = svc->Start("");
    if (!st.ok()) {
      Check(false, "restart after the crash: " + st.ToString());
      return run;
    }
    run.retry = PayUntilFinal("sk_test_acme", key, body, retries);
    return run;
  }

  http::Response SignedWebhook(const std::string& id, const json& body) {
    const int64_t ts = Clock::System()->NowMillis() / 1000;
    std::string b = body.dump();
    auto sig = webhook::Sign(secret, id, ts, b);
    auto r = client.Send({.method = "POST",
                          .url = svc->Url("/webhooks/psp"),
                          .headers = {{"webhook-id", id},
                                      {"webhook-timestamp", std::to_string(ts)},
                                      {"webhook-signature", sig ? *sig : ""}},
                          .body = b});
    return r ? *r : http::Response{0, {}, r.error().ToString()};
  }

  // --- the checkout saga (POST /v1/orders) ---
  static std::string OrderBody(const std::string& sku, int64_t qty, int64_t amount) {
    return json{{"customer_id", "cust-" + sku}, {"sku", sku}, {"qty", qty},
                {"amount", amount}, {"currency", "EUR"}}
        .dump();
  }
  // POSTs an order until a final answer; returns its id ("" when none came).
  std::string PlaceOrder(const std::string& key, const std::string& body) {
    for (int attempt = 0; attempt < 100; ++attempt) {
      auto r = client.Send({.method = "POST",
                            .url = svc->Url("/v1/orders"),
                            .headers = {{"Authorization", "Bearer sk_test_acme"},
                                        {"Idempotency-Key", key},
                                        {"Content-Type", "application/json"}},
                            .body = body,
                            .timeout = std::chrono::seconds(15)});
      if (r && r->status == 202) {
        json j = json::parse(r->body, nullptr, false);
        return j.is_object() ? j.value("id", "") : "";
      }
      if (r && r->status != 409 && r->status != 503) return "";
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return "";
  }
  // Waits until the order's saga settled; returns GET /v1/orders/{id} (null on timeout).
  json AwaitOrder(const std::string& id) {
    json o;
    const bool settled = WaitFor(std::chrono::seconds(30), [&] {
      auto r = client.Send({.url = svc->Url("/v1/orders/" + id),
                            .headers = {{"Authorization", "Bearer sk_test_acme"}}});
      o = r && r->status == 200 ? json::parse(r->body, nullptr, false) : json();
      const std::string state = o.is_object() ? o.value("state", "") : "";
      return state == "completed" || state == "compensated" || state == "failed_to_compensate";
    });
    return settled ? o : json();
  }
  // "phase step outcome" for each row of the order's step log.
  static std::string Steps(const json& order) {
    std::string out;
    if (!order.is_object()) return out;
    for (const json& h : order["saga"]["history"]) {
      out += (out.empty() ? "" : ", ") + h["phase"].get<std::string>() + " " +
             h["step"].get<std::string>() + " " + h["outcome"].get<std::string>();
    }
    return out;
  }
  int64_t Available(const std::string& sku) {
    return Count("SELECT available FROM inventory WHERE sku = $1", sku);
  }
};

bool Replayed(const http::Response& r) {
  return r.Header("Idempotent-Replayed") && *r.Header("Idempotent-Replayed") == "true";
}

std::string PaymentId(const http::Response& r) {
  json j = json::parse(r.body, nullptr, false);
  return j.is_object() ? j.value("id", "") : "";
}

// --- the scenarios: each prints what happened and checks its invariant ------------------

constexpr const char* kAcme = "sk_test_acme";
constexpr const char* kGlobex = "sk_test_globex";

void DoubleClick(Demo& d) {
  std::vector<std::thread> ts;
  std::mutex mu;
  int fresh = 0, replays = 0, conflicts = 0, other = 0;
  std::string id;
  for (int i = 0; i < 8; ++i) {
    ts.emplace_back([&] {
      auto r = d.Pay(kAcme, "dc-1", d.Body(1999, "order-dc"));
      std::lock_guard<std::mutex> l(mu);
      if (r && r->status == 201 && !Replayed(*r)) ++fresh, id = PaymentId(*r);
      else if (r && r->status == 201) ++replays;
      else if (r && r->status == 409) ++conflicts;
      else ++other;
    });
  }
  for (auto& t : ts) t.join();
  auto after = d.PayUntilFinal(kAcme, "dc-1", d.Body(1999, "order-dc"));
  std::printf("     one ran (%d), %d replayed, %d told 409 + Retry-After while it ran\n", fresh,
              replays, conflicts);
  d.Check(fresh == 1 && other == 0, "exactly one request ran the payment");
  d.Check(after && Replayed(*after) && PaymentId(*after) == id, "a later retry replays it");
  d.Check(d.ChargesFor(id) == 1, "one charge at the provider");
}

void RetryAfterLostResponse(Demo& d) {
    {
    auto first = d.Pay(kAcme, "retry-2", d.Body(2500, "order-2"));  // the client never reads it
    auto retry = d.Pay(kAcme, "retry-2", d.Body(2500, "order-2"));
    d.paid2 = first ? PaymentId(*first) : "";
    json j = retry ? json::parse(retry->body, nullptr, false) : json();
    d.charge2 = j.is_object() ? j.value("charge_id", "") : "";
    d.Check(
        first && retry && retry->status == 201 && Replayed(*retry) && retry->body == first->body,
        "the retry gets the stored response byte for byte, marked Idempotent-Replayed");
  }
}

void SameKeyOtherPayload(Demo& d) {
  auto r = d.Pay(kAcme, "retry-2", d.Body(9999, "order-2"));
  d.Check(r && r->status == 422 && *r->Header("Content-Type") == "application/problem+json",
          "422 problem+json, nothing applied");
}

void CrashAfterCharge(Demo& d) {
  int retries = 0;
  auto run = d.CrashThenRetry("payments.after_charge_before_commit", "crash-4",
                              d.Body(4000, "order-4"), &retries);
  const auto& retry = run.retry;
  std::string id = retry ? PaymentId(*retry) : "";
  std::printf(
      "     the service was SIGKILLed at the failpoint; the retry waited %d time(s) for the "
      "lease\n",
      retries);
  d.Check(run.crashed && run.first_failed, "the process really died mid-request");
  d.Check(retry && retry->status == 201, "the retry resumed from the recovery point and completed");
  d.Check(d.ChargesFor(id) == 1, "exactly one charge at the provider (same downstream key)");
}

void RelayCrash(Demo& d) {
  auto run =
      d.CrashThenRetry("relay.after_publish_before_mark", "relay-5", d.Body(5000, "order-5"));
  const auto& retry = run.retry;
  std::string id = retry ? PaymentId(*retry) : "";
  bool drained = d.Converge(std::chrono::seconds(30));
  d.Check(run.crashed, "the relay crashed at the failpoint");
  d.Check(retry && retry->status == 201 && drained, "after restart the event was published");
  d.Check(d.Count("SELECT count(*) FROM ledger_entries WHERE payment_id = $1 AND kind = 'capture'",
                  id) == 2,
          "booked once in the ledger (publish and mark share one transaction here)");
}

void ConsumerCrash(Demo& d) {
  auto run =
      d.CrashThenRetry("consumer.after_commit_before_ack", "consumer-6", d.Body(6000, "order-6"));
  const auto& retry = run.retry;
  std::string id = retry ? PaymentId(*retry) : "";
  bool drained = d.Converge(std::chrono::seconds(30));
  d.Check(run.crashed, "a consumer crashed right after its commit");
  d.Check(drained,
          "nothing was left stuck: the SQL queue's ack committed with the effect (an external "
          "broker would redeliver it, and the inbox absorb it)");
  d.Check(d.Count("SELECT count(*) FROM ledger_entries WHERE payment_id = $1 AND kind = 'capture'",
                  id) == 2,
          "the redelivery was absorbed by the inbox: two ledger entries, not four");
  d.Check(d.MailsFor("receipt:" + id) == 1, "one receipt email");
}

void PoisonAndDeadLetters(Demo& d) {
  auto poison = d.SignedWebhook(
      "msg_demo_poison",
      {{"type", "charge.refunded"},
       {"data", {{"charge_id", "ch_does_not_exist"}, {"amount", 1}, {"currency", "EUR"}}}});
  d.Post(d.Mail("/faults"), {{"fail_next", 1000}});
  auto r = d.PayUntilFinal(kAcme, "outage-7", d.Body(7000, "order-7"));
  std::string id = r ? PaymentId(*r) : "";
  int64_t parked_effect = 0, parked_poison = 0, letter_id = 0;
  for (int i = 0; i < 300 && (parked_effect == 0 || parked_poison == 0); ++i) {
    json l = d.GetJson(d.svc->Url("/admin/dead-letters"), true);
    parked_effect = parked_poison = 0;
    if (l.is_object()) {
      for (auto& x : l["dead_letters"]) {
        if (x["queue"] == "effect:email.receipt" && x["event_id"] == "receipt:" + id) {
          parked_effect = 1;
          letter_id = x["id"];
        }
        if (x["event_id"] == "msg_demo_poison") parked_poison = 1;
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  d.Check(poison.status == 204, "the poison webhook was accepted (signed, well-formed)");
  d.Check(parked_poison == 1,
          "its staged work was retried with backoff (the charge may just not be recorded "
          "yet), then parked when its attempts ran out, not retried forever");
  d.Check(parked_effect == 1,
          "the receipt exhausted its attempts during the outage and was parked");
  d.Post(d.Mail("/faults"), {{"fail_next", 0}});
  auto replay = d.client.Send(
      {.method = "POST",
       .url = d.svc->Url("/admin/dead-letters/" + std::to_string(letter_id) + "/replay"),
       .headers = {{"Authorization", "Bearer " + d.admin}}});
  bool drained = d.Converge(std::chrono::seconds(30));
  d.Check(replay && replay->status == 200 && drained,
          "after the outage, the admin API replayed it");
  d.Check(d.MailsFor("receipt:" + id) == 1, "and the receipt was sent exactly once");
}

void DuplicateWebhook(Demo& d) {
  json body = {{"type", "charge.refunded"},
               {"data", {{"charge_id", d.charge2}, {"amount", 2500}, {"currency", "EUR"}}}};
  auto a = d.SignedWebhook("msg_demo_refund", body);
  auto b = d.SignedWebhook("msg_demo_refund", body);
  bool drained = d.Converge(std::chrono::seconds(30));
  d.Check(a.status == 204 && b.status == 204, "both deliveries answered 204");
  d.Check(
      drained &&
          d.Count("SELECT count(*) FROM ledger_entries WHERE payment_id = $1 AND kind = 'refund'",
                  d.paid2) == 2,
      "one refund booked (one pair of entries)");
  d.Check(
      d.Count("SELECT count(*) FROM payments WHERE id = $1 AND status = 'refunded'", d.paid2) == 1,
      "the payment is refunded");
}

void AnotherTenantReusesTheKey(Demo& d) {
  auto r = d.Pay(kGlobex, "retry-2", d.Body(2500, "order-2"));
  d.Check(r && r->status == 201 && !Replayed(*r) && PaymentId(*r) != d.paid2,
          "globex gets its own fresh payment, never acme's response");
}

void PaymentKeyVersusEmailKey(Demo& d) {
  d.Check(d.ChargesFor(d.paid2) == 1 && d.MailsFor("receipt:" + d.paid2) == 1,
          "the client's Idempotency-Key guards the charge; receipt:<payment_id> guards the email");
}

void ClientGivesUpAfterCharge(Demo& d) {
  // Through the test hook, the next request fails right after the provider charged; the
  // client sees a 503 and never retries. Nobody but the completer is left to finish it.
  const bool armed = d.Admin("PUT", "/admin/failpoints",
                             "payments.after_charge_before_commit=error(unavailable)*1");
  auto first = d.Pay(kAcme, "gave-up-11", d.Body(1100, "order-11"));
  d.Check(armed && first && first->status == 503,
          "the client got a 503 after the provider charged, and went away");
  const bool finished = Demo::WaitFor(std::chrono::seconds(20), [&] {
    return d.Count("SELECT count(*) FROM payments WHERE order_id = $1 AND status = 'captured'",
                   "order-11") == 1;
  });
  std::printf("     the completer took the request over once its lease and grace period ran out\n");
  d.Check(finished, "the completer finished the payment, with no retry from the client");
  auto late = d.Pay(kAcme, "gave-up-11", d.Body(1100, "order-11"));
  const std::string id = late ? PaymentId(*late) : "";
  d.Check(late && late->status == 201 && Replayed(*late),
          "the late retry gets the stored 201, marked Idempotent-Replayed");
  d.Check(d.ChargesFor(id) == 1, "exactly one charge at the provider");
  (void)d.Admin("PUT", "/admin/failpoints", "");
}

void OutOfStock(Demo& d) {
  d.Check(d.Admin("PUT", "/admin/inventory/sku-oos", R"({"available":1})"), "stocked 1 unit");
  json o = d.AwaitOrder(d.PlaceOrder("order-oos", Demo::OrderBody("sku-oos", 2, 3000)));
  std::printf("     saga: %s\n", Demo::Steps(o).c_str());
  d.Check(o.is_object() && o["state"] == "compensated" && o["captured"] == 0,
          "two units asked, one in stock: the reserve step failed, nothing to undo, no charge");
  d.Check(d.Available("sku-oos") == 1, "the unit is still available");
}

void ShippingFailure(Demo& d) {
  d.Check(d.Admin("PUT", "/admin/inventory/sku-ship", R"({"available":1})") &&
              d.Admin("POST", "/admin/shipping/faults", R"({"reject_next":1})"),
          "stocked 1 unit; the carrier will refuse the next shipment");
  json o = d.AwaitOrder(d.PlaceOrder("order-ship", Demo::OrderBody("sku-ship", 1, 3100)));
  std::printf("     saga: %s\n", Demo::Steps(o).c_str());
  const std::string pay = o.is_object() ? "pay_" + o["id"].get<std::string>().substr(4) : "";
  json charges = d.GetJson(d.Psp("/v1/charges?reference=" + pay));
  d.Check(o.is_object() && o["state"] == "compensated" && o["captured"] == 3100 &&
              o["refunded"] == 3100,
          "captured, then refunded at the provider (compensations in reverse order)");
  d.Check(charges.is_object() && charges["count"] == 1 &&
              charges["charges"][0]["status"] == "refunded",
          "the provider holds one charge for it, refunded");
  d.Check(d.Available("sku-ship") == 1, "the reservation was released");
}

void CrashMidSaga(Demo& d) {
  d.Check(d.Admin("PUT", "/admin/inventory/sku-crash", R"({"available":1})"), "stocked 1 unit");
  // Killed after the provider captured, before the step was recorded.
  Status st = d.Restart("saga.after_call_before_record=crash");
  const std::string body = Demo::OrderBody("sku-crash", 1, 3200);
  (void)d.client.Send({.method = "POST",
                       .url = d.svc->Url("/v1/orders"),
                       .headers = {{"Authorization", "Bearer sk_test_acme"},
                                   {"Idempotency-Key", "order-crash"}},
                       .body = body});
  const bool crashed = st.ok() && d.svc->KilledWithin(std::chrono::seconds(10));
  st = d.svc->Start("");
  const std::string id = st.ok() ? d.PlaceOrder("order-crash", body) : "";
  json o = d.AwaitOrder(id);
  std::printf("     saga: %s\n", Demo::Steps(o).c_str());
  d.Check(crashed, "the service was SIGKILLed between the capture call and its record");
  d.Check(o.is_object() && o["state"] == "completed",
          "the restarted service resumed the saga from the store and completed it");
  d.Check(d.ChargesFor("pay_" + id.substr(std::min<size_t>(4, id.size()))) == 1,
          "one charge at the provider: the re-run capture sent the same key");
}

struct Scenario {
  const char* name;
  void (*run)(Demo&);
};

const std::vector<Scenario> kScenarios = {
    {"double click: 8 concurrent POSTs with one Idempotency-Key", DoubleClick},
    {"client retry after a lost response", RetryAfterLostResponse},
    {"same key, different payload", SameKeyOtherPayload},
    {"crash after the provider charged, before the commit", CrashAfterCharge},
    {"relay crash after publish, before mark", RelayCrash},
    {"consumer crash right after its commit", ConsumerCrash},
    {"poison and dead letters: a refund webhook for an unknown charge; a mail outage",
     PoisonAndDeadLetters},
    {"duplicate webhook", DuplicateWebhook},
    {"another tenant reuses the key", AnotherTenantReusesTheKey},
    {"payment key vs email key", PaymentKeyVersusEmailKey},
    {"the client gives up after the provider charged", ClientGivesUpAfterCharge},
    {"checkout saga: out of stock -> compensation", OutOfStock},
    {"checkout saga: the carrier refuses -> refund + release", ShippingFailure},
    {"checkout saga: crash mid-saga -> resumed", CrashMidSaga},
};

}  // namespace

int RunServiceDemo(const ServiceDemoFlags& f) {
  Demo d;
  const char* base = std::getenv("TMPDIR");
  std::string tmpl = std::string(base && *base ? base : "/tmp") + "/converge-demo-XXXXXX";
  if (mkdtemp(tmpl.data()) == nullptr) {
    std::perror("converge demo: mkdtemp");
    return 1;
  }
  d.dir = tmpl;
  struct Cleanup {
    std::string dir;
    bool keep;
    ~Cleanup() {
      std::error_code ec;
      if (!keep) std::filesystem::remove_all(dir, ec);
    }
  } cleanup{d.dir, f.keep};
  const auto t0 = SteadyClock::now();

  d.secret = webhook::NewSecret();
  const uint16_t svc_port = FreePort();
  harness::FakePsp psp(
      {.db_path = d.dir + "/psp.db",
       .webhook_url = "http://127.0.0.1:" + std::to_string(svc_port) + "/webhooks/psp",
       .webhook_secret = d.secret});
  harness::FakeMail mail({.db_path = d.dir + "/mail.db"});
  Status st = psp.Start();
  if (st.ok()) st = mail.Start();
  if (!st.ok() || svc_port == 0) {
    std::fprintf(stderr, "converge demo: cannot start the providers: %s\n", st.ToString().c_str());
    return 1;
  }
  d.psp_port = psp.port();
  d.mail_port = mail.port();
  const std::string db_path = d.dir + "/service.db";
  const std::string config = d.dir + "/service.toml";
  {
    std::ofstream c(config);
    c << "[store]\nuri = \"sqlite:" << db_path << "\"\n"
      << "[idempotency]\nlease_ms = 1500\ncompleter_grace_ms = 1500\n"
      << "[admin]\nfailpoints = true\n"
      << "[auth]\nadmin_token = \"" << d.admin << "\"\n"
      << "api_keys = { \"sk_test_acme\" = \"acme\", \"sk_test_globex\" = \"globex\" }\n"
      << "[psp]\nurl = \"http://127.0.0.1:" << d.psp_port << "\"\ntimeout_ms = 1000\n"
      << "webhook_secrets = [\"" << d.secret << "\"]\n"
      << "[mail]\nurl = \"http://127.0.0.1:" << d.mail_port << "\"\ntimeout_ms = 1000\n"
      << "[consumers]\nvisibility_ms = 1000\nmax_attempts = 6\nbackoff_initial_ms = "
         "20\nbackoff_max_ms = 200\n"
      // 8 attempts: the load phase's 5% mail faults (or a few seconds of mail timeouts on a
      // busy machine) must not park a receipt; with 4, one run in CI did. The outage of
      // scenario 7 fails every call at once, so the receipt still parks within a second.
      << "[effects]\nmax_attempts = 8\nlease_ms = 2000\n";
  }
  std::printf("converge demo: payments service (child process, sqlite:%s),\n"
              "  payment provider :%u and mail provider :%u in this process\n\n",
              db_path.c_str(), d.psp_port, d.mail_port);
  d.svc = std::make_unique<ServeProcess>(
      ServeProcess::Options{.binary = "/proc/self/exe",
                            .config_path = config,
                            .dir = d.dir,
                            .name = "service",
                            .listen = "127.0.0.1:" + std::to_string(svc_port)});
  st = d.svc->Start("");
  if (!st.ok()) {
    std::fprintf(stderr, "converge demo: %s\n", st.ToString().c_str());
    return 1;
  }
  auto opened = Database::Open("sqlite:" + db_path);
  if (!opened) {
    std::fprintf(stderr, "converge demo: %s\n", opened.error().ToString().c_str());
    return 1;
  }
  d.db = std::move(*opened);
  for (size_t i = 0; i < kScenarios.size(); ++i) {
    std::printf("%3zu. %s\n", i + 1, kScenarios[i].name);
    kScenarios[i].run(d);
  }

  // Load ----------------------------------------------------------------------------------
  std::printf(
      "\n  load: %d clients, %s, %.0f%% sent again, provider fails %.0f%%, mail fails %.0f%%\n",
      f.clients,
      f.duration_seconds > 0 ? (std::to_string(f.duration_seconds) + " seconds").c_str()
                             : (std::to_string(f.payments) + " payments").c_str(),
      f.duplicate_rate * 100, f.psp_failure_rate * 100, f.mail_failure_rate * 100);
  d.Post(d.Psp("/faults"), {{"transient_rate", f.psp_failure_rate}});
  d.Post(d.Mail("/faults"), {{"transient_rate", f.mail_failure_rate}});
  // Each key is sent once; a share of keys is sent again, some at once (a double click)
  // and some later (a retry). With --duration the phase runs for that long instead.
  std::vector<int> plan;
  if (f.duration_seconds <= 0) {
    for (int k = 0; k < f.payments; ++k) {
      plan.push_back(k);
      if (std::uniform_real_distribution<double>(0, 1)(d.rng) < f.duplicate_rate) plan.push_back(k);
    }
    std::shuffle(plan.begin(), plan.end(), d.rng);
  }
  std::atomic<size_t> next{0};
  std::atomic<int> next_key{0};
  std::atomic<int64_t> sent{0}, replays{0}, retried{0}, errors{0}, done_keys{0};
  std::vector<std::thread> clients;
  const auto load_start = SteadyClock::now();
  const auto load_end = load_start + std::chrono::seconds(f.duration_seconds);
  auto send_key = [&](int k) {
    int retries = 0;
    auto r = d.PayUntilFinal(kAcme, "load-" + std::to_string(k),
                             d.Body(100 + k, "load-" + std::to_string(k)), &retries);
    sent += 1 + retries;
    retried += retries;
    if (!r || r->status != 201) ++errors;
    else if (Replayed(*r)) ++replays;
  };
  for (int c = 0; c < f.clients; ++c) {
    clients.emplace_back([&, c] {
      if (f.duration_seconds <= 0) {
        for (size_t i; (i = next.fetch_add(1)) < plan.size();) send_key(plan[i]);
        return;
      }
      std::mt19937_64 rng(d.rng() + c);
      while (SteadyClock::now() < load_end) {
        int k = next_key.fetch_add(1);
        send_key(k);
        if (std::uniform_real_distribution<double>(0, 1)(rng) < f.duplicate_rate) send_key(k);
        ++done_keys;
      }
    });
  }
  if (f.duration_seconds <= 0) {
    Progress bar("requests", static_cast<int64_t>(plan.size()));
    while (next.load() < plan.size()) {
      bar.Show(static_cast<int64_t>(std::min(next.load(), plan.size())));
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    for (auto& t : clients) t.join();
    bar.Show(static_cast<int64_t>(plan.size()));
    bar.Done();
  } else {
    Progress bar("seconds", f.duration_seconds);
    while (SteadyClock::now() < load_end) {
      bar.Show(std::chrono::duration_cast<std::chrono::seconds>(SteadyClock::now() - load_start)
                   .count());
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    for (auto& t : clients) t.join();
    bar.Show(f.duration_seconds);
    bar.Done();
  }
  const int64_t unique_keys = f.duration_seconds > 0 ? next_key.load() : f.payments;
  const double load_secs = std::chrono::duration<double>(SteadyClock::now() - load_start).count();

  // Orders: more than the stock of three SKUs, the carrier failing now and then (some
  // transiently, some for good), the provider's transient faults still on.
  const int orders = std::max(20, f.payments / 5);
  const int64_t stock_per_sku = orders / 4;
  for (const char* sku : {"sku-a", "sku-b", "sku-c"}) {
    (void)d.Admin("PUT", std::string("/admin/inventory/") + sku,
                  json{{"available", stock_per_sku}}.dump());
  }
  (void)d.Admin("POST", "/admin/shipping/faults", R"({"fail_next":5,"reject_next":3})");
  std::printf("  orders: %d checkouts for 3 SKUs of %lld units each\n", orders,
              static_cast<long long>(stock_per_sku));
  std::atomic<int> next_order{0};
  std::atomic<int64_t> order_errors{0};
  std::vector<std::thread> buyers;
  for (int c = 0; c < f.clients; ++c) {
    buyers.emplace_back([&] {
      for (int k; (k = next_order.fetch_add(1)) < orders;) {
        const std::string sku = std::string("sku-") + static_cast<char>('a' + k % 3);
        if (d.PlaceOrder("load-order-" + std::to_string(k),
                         Demo::OrderBody(sku, 1, 200 + k)).empty()) {
          ++order_errors;
        }
      }
    });
  }
  {
    Progress bar("orders", orders);
    while (next_order.load() < orders) {
      bar.Show(std::min(next_order.load(), orders));
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    for (auto& t : buyers) t.join();
    bar.Show(orders);
    bar.Done();
  }
  d.Post(d.Psp("/faults"), {{"transient_rate", 0}});
  d.Post(d.Mail("/faults"), {{"transient_rate", 0}});
  const bool converged = d.Converge(std::chrono::seconds(60));

  // The table ------------------------------------------------------------------------------
  json pst = d.GetJson(d.Psp("/v1/stats"));
  json mst = d.GetJson(d.Mail("/v1/stats"));
  std::string metrics;
  if (auto m = d.client.Send({.url = d.svc->Url("/metrics")})) metrics = m->body;
  auto metric = [&](const std::string& name) {
    double sum = 0;
    size_t pos = 0;
    while ((pos = metrics.find("\n" + name, pos)) != std::string::npos) {
      size_t sp = metrics.find(' ', pos + 1);
      size_t nl = metrics.find('\n', sp);
      if (metrics[pos + 1 + name.size()] == ' ' || metrics[pos + 1 + name.size()] == '{') {
        sum += std::atof(metrics.substr(sp + 1, nl - sp - 1).c_str());
      }
      pos = nl;
    }
    return static_cast<int64_t>(sum);
  };
  d.svc->Stop();
  const int64_t payments = d.Count("SELECT count(*) FROM payments");
  // Payments the checkout saga captured have an order, not a 201 of their own.
  const int64_t order_payments =
      d.Count("SELECT count(*) FROM payments p JOIN orders o ON p.order_id = o.id");
  const int64_t keys_done = d.Count(
      "SELECT count(*) FROM idempotency_keys WHERE status = 'completed' AND response_status = 201");
  auto saga_count = [&](const char* state) {
    return d.Count("SELECT count(*) FROM saga_instances WHERE type = 'checkout' AND state = $1",
                   state);
  };
  const int64_t orders_completed = saga_count("completed");
  const int64_t orders_compensated = saga_count("compensated");
  const int64_t orders_parked = saga_count("failed_to_compensate");
  const int64_t orders_unsettled = saga_count("running") + saga_count("compensating");
  const int64_t money_captured = d.Count("SELECT coalesce(sum(captured), 0) FROM orders");
  const int64_t money_refunded = d.Count("SELECT coalesce(sum(refunded), 0) FROM orders");
  const int64_t money_shipped =
      d.Count("SELECT coalesce(sum(amount), 0) FROM orders WHERE shipped = 1");
  const int64_t stock_negative = d.Count("SELECT count(*) FROM inventory WHERE available < 0");
  const int64_t compensated_holding = d.Count(
      "SELECT count(*) FROM orders o JOIN saga_instances s ON s.saga_id = o.id WHERE "
      "s.state = 'compensated' AND (o.captured <> o.refunded OR o.shipped = 1 OR EXISTS "
      "(SELECT 1 FROM reservations r WHERE r.order_id = o.id AND r.state = 'reserved'))");
  const int64_t bad_capture = d.Count(
      "SELECT count(*) FROM payments p WHERE (SELECT count(*) FROM ledger_entries l WHERE "
      "l.payment_id = p.id AND l.kind = 'capture') != 2");
  const int64_t bad_refund = d.Count(
      "SELECT count(*) FROM payments p WHERE (SELECT count(*) FROM ledger_entries l WHERE "
      "l.payment_id = p.id AND l.kind = 'refund') != (CASE WHEN p.status = 'refunded' THEN 2 ELSE "
      "0 END)");
  const int64_t unbalanced = d.Count(
      "SELECT count(*) FROM (SELECT payment_id FROM ledger_entries GROUP BY payment_id, kind "
      "HAVING sum(amount) != 0)");
  const int64_t entries = d.Count("SELECT count(*) FROM ledger_entries");
  const int64_t parked = d.Count("SELECT count(*) FROM dead_letters WHERE state = 'parked'");
  const int64_t charges = pst.is_object() ? pst["charges"]["succeeded"].get<int64_t>() +
                                                pst["charges"]["refunded"].get<int64_t>()
                                          : -1;
  const int64_t charged_twice =
      pst.is_object() ? pst["references_charged_twice"].get<int64_t>() : -1;
  const int64_t emails = mst.is_object() ? mst["messages"].get<int64_t>() : -1;
  // What the provider still holds for orders (charges not refunded).
  int64_t psp_kept_for_orders = 0;
  {
    std::set<std::string> order_payment_ids;
    (void)d.db->Read([&](Tx& tx) -> Status {
      CONVERGE_ASSIGN_OR_RETURN(Rows rows, tx.Query("SELECT id FROM orders"));
      for (const Row& r : rows) order_payment_ids.insert("pay_" + r.Text(0).substr(4));
      return OkStatus();
    });
    const json all = d.GetJson(d.Psp("/v1/charges"));
    if (all.is_object()) {
      for (const json& c : all["charges"]) {
        if (c.value("status", "") == "succeeded" &&
            order_payment_ids.count(c.value("reference", ""))) {
          psp_kept_for_orders += c.value("amount", int64_t{0});
        }
      }
    }
  }

  std::printf("\n  %-46s %10s\n", "", "count");
  auto row = [](const std::string& what, int64_t n) {
    std::printf("  %-46s %10lld\n", what.c_str(), static_cast<long long>(n));
  };
  row("load: requests sent (retries included)", sent);
  row("load: unique idempotency keys", unique_keys);
  row("load: client retries after 409/503", retried);
  row("load: answered from the stored response", replays);
  row("payments (all phases)", payments);
  row("provider charges", charges);
  row("provider references charged twice", charged_twice);
  row("ledger entries", entries);
  row("emails sent by the mail provider", emails);
  row("webhooks received (service, last run)", metric("webhooks_received_total"));
  row("redeliveries absorbed by inboxes (last run)", metric("consumer_duplicates_total"));
  row("consumer retries (last run)", metric("consumer_retries_total"));
  row("effect retries (last run)", metric("effects_retries_total"));
  row("dead letters parked", parked);
  row("orders completed (shipped)", orders_completed);
  row("orders compensated", orders_compensated);
  row("orders parked (failed to compensate)", orders_parked);
  row("orders money captured", money_captured);
  row("orders money refunded", money_refunded);
  row("orders money of shipped orders", money_shipped);
  row("provider money kept for orders", psp_kept_for_orders);
  std::printf("  load phase: %.1fs (%.0f requests/s); whole demo %.1fs\n\n", load_secs,
              static_cast<double>(sent.load()) / load_secs,
              std::chrono::duration<double>(SteadyClock::now() - t0).count());

  std::printf("  invariants\n");
  d.Check(errors == 0, "every load request ended in 201");
  d.Check(converged, "outbox, queues, effects and provider webhooks drained");
  d.Check(payments - order_payments == keys_done, "one payment per completed idempotency key");
  d.Check(order_errors == 0, "every order was accepted (202)");
  d.Check(orders_unsettled == 0 && orders_parked == 0,
          "every checkout saga settled: completed or compensated, none parked");
  d.Check(money_captured == money_shipped + money_refunded &&
              psp_kept_for_orders == money_shipped,
          "money captured = shipped orders + refunds; the provider keeps only shipped orders'");
  d.Check(stock_negative == 0 && compensated_holding == 0,
          "stock never negative; no compensated order holds stock or money");
  d.Check(charges == payments && charged_twice == 0, "one provider charge per payment, none twice");
  d.Check(bad_capture == 0 && bad_refund == 0 && unbalanced == 0,
          "two balanced capture entries per payment, two refund entries per refund");
  d.Check(emails == payments, "one receipt email per payment");
  d.Check(parked == 1, "the poison webhook is the only dead letter left parked");
  if (f.keep) std::printf("\n  kept: %s\n", d.dir.c_str());
  std::printf("\nverdict: %s\n", d.failures == 0 ? "CONVERGED (every effect applied exactly once)"
                                                 : "VIOLATED");
  return d.failures == 0 ? 0 : 1;
}

}  // namespace converge::cli
