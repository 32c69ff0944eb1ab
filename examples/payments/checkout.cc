#include "examples/payments/checkout.h"

#include <chrono>
#include <optional>

#include <nlohmann/json.hpp>

#include "converge/http_idempotency.h"
#include "converge/http_service.h"
#include "examples/payments/ids.h"
#include "examples/payments/rules.h"

namespace payments {
namespace {

using converge::Result;
using converge::Rows;
using converge::SagaStepContext;
using converge::Status;
using converge::Tx;
using converge::http::Json;
using converge::http::Problem;
using converge::http::Request;
using converge::http::Response;
using json = nlohmann::json;

constexpr int64_t kMaxQty = 1000;

// The saga's data: what every step needs, fixed when the order is created.
struct Order {
  std::string id, tenant, customer_id, sku, currency;
  int64_t qty = 0, amount = 0;
  std::string payment_id() const { return "pay_" + id.substr(4); }
  json ToJson() const {
    return {{"order_id", id}, {"tenant", tenant}, {"customer_id", customer_id}, {"sku", sku},
            {"qty", qty},     {"amount", amount}, {"currency", currency}};
  }
};

Result<Order> OrderOf(const std::string& data) {
  json j = json::parse(data, nullptr, false);
  if (!j.is_object() || !j["order_id"].is_string() || !j["sku"].is_string() ||
      !j["qty"].is_number_integer() || !j["amount"].is_number_integer() ||
      !j["currency"].is_string() || !j["tenant"].is_string() || !j["customer_id"].is_string()) {
    return tl::unexpected(converge::InvalidArgumentError("checkout saga data is malformed"));
  }
  return Order{j["order_id"], j["tenant"], j["customer_id"], j["sku"],
               j["currency"], j["qty"],    j["amount"]};
}

// The body of POST /v1/orders, validated.
Result<Order> ParseOrder(const std::string& body) {
  json j = json::parse(body, nullptr, false);
  auto bad = [](const std::string& m) { return tl::unexpected(converge::InvalidArgumentError(m)); };
  if (j.is_discarded()) return bad("body is not valid JSON");
  if (!j.is_object()) return bad("body must be a JSON object");
  Order o;
  for (auto [name, out] :
       {std::pair{"customer_id", &o.customer_id}, {"sku", &o.sku}, {"currency", &o.currency}}) {
    auto it = j.find(name);
    if (it == j.end() || !it->is_string()) return bad(std::string(name) + " must be a string");
    *out = it->get<std::string>();
  }
  if (!ValidId(o.customer_id) || !ValidId(o.sku)) {
    return bad("customer_id and sku must be 1-64 characters of [A-Za-z0-9_-]");
  }
  if (!kCurrencies.count(o.currency)) return bad("unknown currency '" + o.currency + "'");
  for (auto [name, out, max] :
       {std::tuple{"qty", &o.qty, kMaxQty}, std::tuple{"amount", &o.amount, kMaxAmount}}) {
    auto it = j.find(name);
    if (it == j.end() || !it->is_number_integer() ||
        (it->is_number_unsigned() && it->get<uint64_t>() > static_cast<uint64_t>(max)) ||
        it->get<int64_t>() < 1 || it->get<int64_t>() > max) {
      return bad(std::string(name) + " must be an integer between 1 and " + std::to_string(max));
    }
    *out = it->get<int64_t>();
  }
  return o;
}

// A provider answer that decides nothing (no answer, 5xx, "in use", "slow down") is an
// unknown outcome: transient, retried with the same key.
Status Undecided(const Result<converge::http::Response>& r, const std::string& what) {
  if (!r) return converge::UnavailableError(what + ": " + r.error().message());
  if (ProviderUndecided(r->status)) {
    return converge::UnavailableError(what + ": provider answered " + std::to_string(r->status));
  }
  return converge::OkStatus();
}

}  // namespace

Checkout::Checkout(CheckoutOptions options) : o_(std::move(options)) {
  if (o_.clock == nullptr) o_.clock = converge::Clock::System();
}

Status Checkout::CreateTables(converge::Database& db) {
  return db.Transact([](Tx& tx) -> Status {
    CONVERGE_RETURN_IF_ERROR(
        tx.Exec("CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, "
                "customer_id TEXT NOT NULL, sku TEXT NOT NULL, qty BIGINT NOT NULL, "
                "amount BIGINT NOT NULL, currency TEXT NOT NULL, charge_id TEXT, "
                "captured BIGINT NOT NULL DEFAULT 0, refunded BIGINT NOT NULL DEFAULT 0, "
                "shipped INTEGER NOT NULL DEFAULT 0, created_at BIGINT NOT NULL, "
                "updated_at BIGINT NOT NULL)"));
    CONVERGE_RETURN_IF_ERROR(
        tx.Exec("CREATE TABLE IF NOT EXISTS inventory (sku TEXT PRIMARY KEY, "
                "available BIGINT NOT NULL CHECK (available >= 0), "
                "reserved BIGINT NOT NULL DEFAULT 0 CHECK (reserved >= 0))"));
    CONVERGE_RETURN_IF_ERROR(tx.Exec(
        "CREATE TABLE IF NOT EXISTS reservations (order_id TEXT PRIMARY KEY, sku TEXT NOT NULL, "
        "qty BIGINT NOT NULL, state TEXT NOT NULL CHECK (state IN ('reserved', 'released')))"));
    return converge::StatusOf(tx.Exec(
        "CREATE TABLE IF NOT EXISTS shipments (order_id TEXT PRIMARY KEY, sku TEXT NOT NULL, "
        "qty BIGINT NOT NULL, state TEXT NOT NULL CHECK (state IN ('created', 'cancelled')), "
        "created_at BIGINT NOT NULL)"));
  });
}

converge::SagaDefinition Checkout::Definition() {
  converge::SagaStepPolicy policy;
  policy.max_attempts = 6;
  policy.backoff_initial = o_.backoff_initial;
  policy.backoff_max = o_.backoff_max;
  using converge::SagaStep;
  SagaStep reserve{
      "reserve",
      {.local = [this](Tx& tx, SagaStepContext& c, const std::string&) { return Reserve(tx, c); }},
      {.local = [this](Tx& tx, SagaStepContext& c, const std::string&) { return Release(tx, c); }},
      policy};
  SagaStep capture{"capture",
                   {.call = [this](const SagaStepContext& c) { return Charge(c); },
                    .local = [this](Tx& tx, SagaStepContext& c,
                                    const std::string& r) { return RecordCapture(tx, c, r); }},
                   {.call = [this](const SagaStepContext& c) { return Refund(c); },
                    .local = [this](Tx& tx, SagaStepContext& c,
                                    const std::string& r) { return RecordRefund(tx, c, r); }},
                   policy};
  SagaStep ship{
      "ship",
      {.local = [this](Tx& tx, SagaStepContext& c, const std::string&) { return Ship(tx, c); }},
      {.local = [this](Tx& tx, SagaStepContext& c,
                       const std::string&) { return CancelShipment(tx, c); }},
      policy};
  return {"checkout", {reserve, capture, ship}};
}

void Checkout::Register() {
  for (int i = 0; i < std::max(1, o_.runners); ++i) {
    converge::SagaRunner& r = o_.runtime->AddSaga(Definition(), {.lease = o_.lease});
    if (first_runner_ == nullptr) first_runner_ = &r;
  }
}

// --- steps ------------------------------------------------------------------------------

Status Checkout::Reserve(Tx& tx, SagaStepContext& ctx) {
  CONVERGE_ASSIGN_OR_RETURN(Order o, OrderOf(ctx.data));
  // The conditional decrement is the stock limit: two orders for the last unit cannot
  // both pass it, whatever their interleaving.
  CONVERGE_ASSIGN_OR_RETURN(int64_t n,
                            tx.Exec("UPDATE inventory SET available = available - $1, "
                                    "reserved = reserved + $1 WHERE sku = $2 AND available >= $1",
                                    o.qty, o.sku));
  if (n != 1) {
    CONVERGE_ASSIGN_OR_RETURN(Rows known,
                              tx.Query("SELECT 1 FROM inventory WHERE sku = $1", o.sku));
    return converge::FailedPreconditionError(known.empty() ? "unknown sku '" + o.sku + "'"
                                                           : "out of stock: fewer than " +
                                                                 std::to_string(o.qty) + " of '" +
                                                                 o.sku + "' available");
  }
  return converge::StatusOf(tx.Exec(
      "INSERT INTO reservations (order_id, sku, qty, state) VALUES ($1, $2, $3, 'reserved')", o.id,
      o.sku, o.qty));
}

Status Checkout::Release(Tx& tx, SagaStepContext& ctx) {
  CONVERGE_ASSIGN_OR_RETURN(Order o, OrderOf(ctx.data));
  // At most once: only a reservation still held gives its units back. None (the reserve
  // never committed) is nothing to undo.
  CONVERGE_ASSIGN_OR_RETURN(int64_t n, tx.Exec("UPDATE reservations SET state = 'released' "
                                               "WHERE order_id = $1 AND state = 'reserved'",
                                               o.id));
  if (n == 0) return converge::OkStatus();
  return converge::StatusOf(
      tx.Exec("UPDATE inventory SET available = available + $1, "
              "reserved = reserved - $1 WHERE sku = $2",
              o.qty, o.sku));
}

Result<std::string> Checkout::Charge(const SagaStepContext& ctx) {
  CONVERGE_ASSIGN_OR_RETURN(Order o, OrderOf(ctx.data));
  json body = {{"amount", o.amount}, {"currency", o.currency}, {"reference", o.payment_id()}};
  // The saga's key for this step: a repeat (retry, crash, takeover) gets the first charge.
  auto r = o_.client->Send(
      {.method = "POST",
       .url = o_.psp_url + "/v1/charges",
       .headers = {{"Content-Type", "application/json"}, {"Idempotency-Key", ctx.key}},
       .body = body.dump(),
       .timeout = o_.psp_timeout});
  CONVERGE_RETURN_IF_ERROR(Undecided(r, "charge"));
  if (r->status == 402) return tl::unexpected(converge::FailedPreconditionError("declined"));
  if (r->status >= 400) {
    return tl::unexpected(converge::InvalidArgumentError("the provider refused the charge: " +
                                                         std::to_string(r->status)));
  }
  json cj = json::parse(r->body, nullptr, false);
  if (!cj.is_object() || !cj["id"].is_string()) {
    return tl::unexpected(converge::UnavailableError("the provider answered nonsense"));
  }
  return cj["id"].get<std::string>();
}

Status Checkout::RecordCapture(Tx& tx, SagaStepContext& ctx, const std::string& charge_id) {
  CONVERGE_ASSIGN_OR_RETURN(Order o, OrderOf(ctx.data));
  const int64_t now = o_.clock->NowMillis();
  const std::string iso = converge::FormatRfc3339(now);
  // The payment joins the payments flow: its row, and payment.captured for the ledger and
  // the receipt; the provider's webhooks find it by charge id.
  CONVERGE_ASSIGN_OR_RETURN(
      int64_t inserted,
      tx.Exec("INSERT INTO payments (id, tenant, order_id, customer_id, amount, currency, "
              "status, psp_charge_id, created_at, updated_at) "
              "VALUES ($1, $2, $3, $4, $5, $6, 'captured', $7, $8, $8) "
              "ON CONFLICT (id) DO NOTHING",
              o.payment_id(), o.tenant, o.id, o.customer_id, o.amount, o.currency, charge_id, iso));
  if (inserted == 1) {
    converge::Event e;
    e.type = "payment.captured";
    e.subject = o.payment_id();
    e.data =
        json{{"payment_id", o.payment_id()}, {"tenant", o.tenant},           {"amount", o.amount},
             {"currency", o.currency},       {"customer_id", o.customer_id}, {"order_id", o.id},
             {"charge_id", charge_id}}
            .dump();
    CONVERGE_RETURN_IF_ERROR(o_.runtime->outbox().Enqueue(tx, e));
  }
  return converge::StatusOf(
      tx.Exec("UPDATE orders SET charge_id = $1, captured = amount, updated_at = $2 "
              "WHERE id = $3",
              charge_id, now, o.id));
}

Result<std::string> Checkout::Refund(const SagaStepContext& ctx) {
  CONVERGE_ASSIGN_OR_RETURN(Order o, OrderOf(ctx.data));
  // The charge may exist although the capture step never learnt its id (its outcome was
  // unknown): ask the provider by reference, and refund whatever succeeded; a charge the
  // provider shows refunded is counted, not refunded again. Each charge's refund has its
  // own key: this compensation may run again after a late charge (sagas.md, the lease
  // window), and a provider that remembers refund keys must see the new charge's refund
  // as a new one.
  //
  // The calls must end inside the runner's lease (ctx.lease_deadline), or another runner
  // could start the same refund while this one still calls (sagas.md, the lease window).
  // After the lookup and one refund, a refund that could end past the lease waits for the
  // next attempt, which finds this one's refunds done. (The lookup and the first refund
  // always go: an attempt always moves, and the service requires the lease to exceed one
  // call's timeout.)
  int calls = 0;  // refunds sent by this attempt
  auto list = o_.client->Send({.method = "GET",
                               .url = o_.psp_url + "/v1/charges?reference=" + o.payment_id(),
                               .timeout = o_.psp_timeout});
  CONVERGE_RETURN_IF_ERROR(Undecided(list, "charge lookup"));
  json lj = json::parse(list->body, nullptr, false);
  if (list->status != 200 || !lj.is_object() || !lj["charges"].is_array()) {
    return tl::unexpected(
        converge::UnavailableError("charge lookup answered " + std::to_string(list->status)));
  }
  int64_t refunded = 0;
  for (const json& c : lj["charges"]) {
    const std::string status = c.value("status", "");
    if (status == "refunded") {
      refunded += c.value("amount", int64_t{0});
      continue;
    }
    if (status != "succeeded") continue;
    const std::string id = c.value("id", "");
    if (calls > 0 && std::chrono::steady_clock::now() + o_.psp_timeout >= ctx.lease_deadline) {
      return tl::unexpected(converge::UnavailableError(
          "refund of " + id + " left for the next attempt: it could outlast the lease"));
    }
    ++calls;
    auto r = o_.client->Send({.method = "POST",
                              .url = o_.psp_url + "/v1/charges/" + id + "/refund",
                              .headers = {{"Idempotency-Key", ctx.key + ":" + id}},
                              .timeout = o_.psp_timeout});
    CONVERGE_RETURN_IF_ERROR(Undecided(r, "refund"));
    if (r->status >= 400) {
      return tl::unexpected(converge::FailedPreconditionError(
          "the provider refused the refund of " + id + ": " + std::to_string(r->status)));
    }
    refunded += c.value("amount", int64_t{0});
  }
  return std::to_string(refunded);
}

Status Checkout::RecordRefund(Tx& tx, SagaStepContext& ctx, const std::string& refunded) {
  CONVERGE_ASSIGN_OR_RETURN(Order o, OrderOf(ctx.data));
  // The payment row turns refunded through the provider's charge.refunded webhook (which
  // books the ledger); here the order records the money given back. A charge the capture
  // step never learnt of (its outcome was unknown) was captured all the same.
  return converge::StatusOf(
      tx.Exec("UPDATE orders SET refunded = $1, "
              "captured = CASE WHEN captured < $1 THEN $1 ELSE captured END, "
              "updated_at = $2 WHERE id = $3",
              std::stoll(refunded), o_.clock->NowMillis(), o.id));
}

Status Checkout::Ship(Tx& tx, SagaStepContext& ctx) {
  CONVERGE_ASSIGN_OR_RETURN(Order o, OrderOf(ctx.data));
  // The shipping component's configured faults: a carrier that is down (transient) or
  // refuses the parcel (permanent). One per attempt of the step, whatever runs it again.
  std::optional<bool> fault;
  {
    std::lock_guard<std::mutex> l(ship_faults_mu_);
    const auto attempt = std::make_pair(ctx.saga_id, ctx.attempt);
    if (auto it = ship_faults_.find(attempt); it != ship_faults_.end()) {
      fault = it->second;
    } else {
      for (auto [counter, transient] :
           {std::pair{&ship_fail_next_, true}, std::pair{&ship_reject_next_, false}}) {
        int64_t left = counter->load();
        while (left > 0 && !counter->compare_exchange_weak(left, left - 1)) {
        }
        if (left > 0) {
          fault = transient;
          ship_faults_[attempt] = transient;
          break;
        }
      }
    }
  }
  if (fault) {
    return *fault ? converge::UnavailableError("the carrier is unavailable")
                  : converge::FailedPreconditionError("the carrier refused the shipment");
  }
  const int64_t now = o_.clock->NowMillis();
  CONVERGE_RETURN_IF_ERROR(
      tx.Exec("INSERT INTO shipments (order_id, sku, qty, state, created_at) "
              "VALUES ($1, $2, $3, 'created', $4)",
              o.id, o.sku, o.qty, now));
  // The goods leave: the reservation is consumed.
  CONVERGE_RETURN_IF_ERROR(
      tx.Exec("UPDATE inventory SET reserved = reserved - $1 WHERE sku = $2", o.qty, o.sku));
  return converge::StatusOf(
      tx.Exec("UPDATE orders SET shipped = 1, updated_at = $1 WHERE id = $2", now, o.id));
}

Status Checkout::CancelShipment(Tx& tx, SagaStepContext& ctx) {
  CONVERGE_ASSIGN_OR_RETURN(Order o, OrderOf(ctx.data));
  // Runs only when the ship step ran out of attempts, whose transaction never committed:
  // there is normally nothing to cancel.
  return converge::StatusOf(tx.Exec(
      "UPDATE shipments SET state = 'cancelled' WHERE order_id = $1 AND state = 'created'", o.id));
}

// --- routes -----------------------------------------------------------------------------

converge::http::Server::Handler Checkout::CreateOrderRoute() {
  converge::http::IdempotencyRouteOptions ro;
  ro.scope = [this](const Request& req) -> std::optional<std::string> {
    const std::string* t = o_.tenant(req);
    return t ? std::optional<std::string>(*t) : std::nullopt;
  };
  ro.validate = [](Request& req) -> std::optional<Response> {
    auto parsed = ParseOrder(req.body);
    if (!parsed) return Problem(400, "Bad Request", parsed.error().message(), "invalid-request");
    return std::nullopt;
  };
  ro.metrics = o_.metrics;
  // One transaction: the key, the order row, the saga row and the stored 202. A retry
  // with the key replays the 202 and starts nothing.
  return converge::http::SinglePhaseRoute(
      o_.runtime->keys(), std::move(ro), [this](Tx& tx, Request& req) -> Result<Response> {
        Order o = *ParseOrder(req.body);
        o.id = RandomId("ord_");
        o.tenant = *o_.tenant(req);
        const int64_t now = o_.clock->NowMillis();
        CONVERGE_RETURN_IF_ERROR(
            tx.Exec("INSERT INTO orders (id, tenant, customer_id, sku, qty, amount, currency, "
                    "created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)",
                    o.id, o.tenant, o.customer_id, o.sku, o.qty, o.amount, o.currency, now));
        CONVERGE_RETURN_IF_ERROR(
            converge::StatusOf(first_runner_->Begin(tx, o.id, o.ToJson().dump())));
        json out = o.ToJson();
        out.erase("tenant");
        out["id"] = o.id;
        out["state"] = converge::saga_state::kRunning;
        Response r = Json(202, out.dump());
        r.Set("Location", "/v1/orders/" + o.id);
        // Counted once the order commits: this function may run again (its SQLite batch
        // rolled back for a failing neighbour), or roll back at the fence check.
        if (o_.metrics) tx.OnCommit([m = o_.metrics] { m->Add("orders_created_total"); });
        return r;
      });
}

Response Checkout::GetOrder(Request& req) {
  const std::string* tenant = o_.tenant(req);
  if (tenant == nullptr) {
    Response r = Problem(401, "Unauthorized", "a valid API key is required", "unauthorized");
    r.Set("WWW-Authenticate", "Bearer");
    return r;
  }
  std::optional<json> found;
  Status st = o_.db->Read([&](Tx& tx) -> Status {
    CONVERGE_ASSIGN_OR_RETURN(
        Rows rows, tx.Query("SELECT id, customer_id, sku, qty, amount, currency, charge_id, "
                            "captured, refunded, shipped FROM orders "
                            "WHERE id = $1 AND tenant = $2",
                            req.params["id"], *tenant));
    if (rows.empty()) return converge::OkStatus();
    const auto& r = rows[0];
    json o = {{"id", r.Text(0)},      {"customer_id", r.Text(1)}, {"sku", r.Text(2)},
              {"qty", r.Int(3)},      {"amount", r.Int(4)},       {"currency", r.Text(5)},
              {"captured", r.Int(7)}, {"refunded", r.Int(8)},     {"shipped", r.Int(9) == 1}};
    if (!r.IsNull(6)) o["charge_id"] = r.Text(6);
    CONVERGE_ASSIGN_OR_RETURN(auto saga, converge::SagaRunner::Load(tx, r.Text(0)));
    if (saga) {
      json s = json::parse(converge::http::SagaToJson(*saga));
      s.erase("data");  // the order's own fields say it
      o["state"] = s["state"];
      o["saga"] = std::move(s);
    }
    found = std::move(o);
    return converge::OkStatus();
  });
  if (!st.ok()) return converge::http::StoreProblem(st);
  if (!found) return Problem(404, "Not Found", "no such order", "not-found");
  return Json(200, found->dump());
}

Response Checkout::SetStock(Request& req) {
  if (!o_.is_admin(req)) return Problem(401, "Unauthorized", "the admin token is required");
  const std::string sku = req.params["sku"];
  if (!ValidId(sku)) {
    return Problem(400, "Bad Request", "sku must be 1-64 characters of [A-Za-z0-9_-]",
                   "invalid-request");
  }
  json j = json::parse(req.body, nullptr, false);
  if (!j.is_object() || !j["available"].is_number_integer() || j["available"].get<int64_t>() < 0 ||
      j["available"].get<int64_t>() > 1'000'000'000) {
    return Problem(400, "Bad Request", "body must be {\"available\": 0..1000000000}",
                   "invalid-request");
  }
  const int64_t available = j["available"];
  Status st = o_.db->Transact([&](Tx& tx) {
    return converge::StatusOf(
        tx.Exec("INSERT INTO inventory (sku, available) VALUES ($1, $2) "
                "ON CONFLICT (sku) DO UPDATE SET available = excluded.available",
                sku, available));
  });
  if (!st.ok()) return converge::http::StoreProblem(st);
  return Json(200, json{{"sku", sku}, {"available", available}}.dump());
}

Response Checkout::ListInventory(Request& req) {
  if (!o_.is_admin(req)) return Problem(401, "Unauthorized", "the admin token is required");
  json out = json::array();
  Status st = o_.db->Read([&](Tx& tx) -> Status {
    CONVERGE_ASSIGN_OR_RETURN(
        Rows rows, tx.Query("SELECT sku, available, reserved FROM inventory ORDER BY sku"));
    for (const auto& r : rows) {
      out.push_back({{"sku", r.Text(0)}, {"available", r.Int(1)}, {"reserved", r.Int(2)}});
    }
    return converge::OkStatus();
  });
  if (!st.ok()) return converge::http::StoreProblem(st);
  return Json(200, json{{"inventory", out}}.dump());
}

Response Checkout::ShippingFaults(Request& req) {
  if (!o_.is_admin(req)) return Problem(401, "Unauthorized", "the admin token is required");
  json j = json::parse(req.body, nullptr, false);
  if (!j.is_object()) return Problem(400, "Bad Request", "faults must be a JSON object");
  for (auto& [k, v] : j.items()) {
    if ((k != "fail_next" && k != "reject_next") || !v.is_number_integer() ||
        v.get<int64_t>() < 0) {
      return Problem(
          400, "Bad Request",
          "unknown or malformed fault '" + k + "' (fail_next, reject_next: non-negative integers)",
          "invalid-request");
    }
  }
  if (j.contains("fail_next")) ship_fail_next_ = j["fail_next"].get<int64_t>();
  if (j.contains("reject_next")) ship_reject_next_ = j["reject_next"].get<int64_t>();
  return Json(200,
              json{{"fail_next", ship_fail_next_.load()}, {"reject_next", ship_reject_next_.load()}}
                  .dump());
}

void Checkout::Routes(converge::http::Server& server) {
  auto route = [this, &server](const char* method, const char* path,
                               Response (Checkout::*fn)(Request&)) {
    server.Route(method, path, [this, fn](Request& r) { return (this->*fn)(r); });
  };
  server.Route("POST", "/v1/orders", CreateOrderRoute());
  route("GET", "/v1/orders/{id}", &Checkout::GetOrder);
  route("PUT", "/admin/inventory/{sku}", &Checkout::SetStock);
  route("GET", "/admin/inventory", &Checkout::ListInventory);
  route("POST", "/admin/shipping/faults", &Checkout::ShippingFaults);
  if (o_.metrics) o_.metrics->Describe("orders_created_total", "counter", "Orders accepted.");
}

Result<std::string> Checkout::Stats(Tx& tx) {
  json out;
  out["orders"] = {{"running", 0},
                   {"compensating", 0},
                   {"completed", 0},
                   {"compensated", 0},
                   {"failed_to_compensate", 0}};
  CONVERGE_ASSIGN_OR_RETURN(
      Rows s, tx.Query("SELECT state, count(*) FROM saga_instances WHERE type = 'checkout' "
                       "GROUP BY state"));
  for (const auto& r : s) out["orders"][r.Text(0)] = r.Int(1);
  CONVERGE_ASSIGN_OR_RETURN(
      Rows m, tx.Query("SELECT coalesce(sum(captured), 0), coalesce(sum(refunded), 0), "
                       "coalesce(sum(CASE WHEN shipped = 1 THEN amount ELSE 0 END), 0) "
                       "FROM orders"));
  out["order_money"] = {
      {"captured", m[0].Int(0)}, {"refunded", m[0].Int(1)}, {"shipped", m[0].Int(2)}};
  CONVERGE_ASSIGN_OR_RETURN(
      Rows inv, tx.Query("SELECT coalesce(min(available), 0), coalesce(sum(reserved), 0) "
                         "FROM inventory"));
  out["inventory"] = {{"min_available", inv[0].Int(0)}, {"reserved", inv[0].Int(1)}};
  return out.dump();
}

}  // namespace payments
