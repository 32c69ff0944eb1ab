#include "examples/orders-lite/orders.h"

#include <nlohmann/json.hpp>

#include "converge/http.h"
#include "converge/http_idempotency.h"
#include "converge/http_service.h"
#include "converge/runtime.h"
#include "converge/sql_queue.h"

namespace orders_lite {

using converge::Status;
using converge::Tx;
using converge::http::Json;
using converge::http::Problem;
using converge::http::Request;
using converge::http::Response;
using json = nlohmann::json;

// Bodies of orders and restocks: {"sku": "...", "quantity": n >= 1}; a 400 problem if not.
static std::optional<Response> ValidateSkuQuantity(const std::string& body) {
  json b = json::parse(body, nullptr, false);
  if (!b.is_object() || !b["sku"].is_string() || b["sku"].get<std::string>().empty() ||
      !b["quantity"].is_number_integer() || b["quantity"].get<int64_t>() < 1) {
    return Problem(400, "Bad Request", "expected {\"sku\": string, \"quantity\": n >= 1}",
                   "invalid-request");
  }
  return std::nullopt;
}

struct OrdersService::Impl {
  Options options;
  std::unique_ptr<converge::Database> db;
  std::unique_ptr<converge::SqlQueue> queue;
  std::unique_ptr<converge::Subscriber> stock_feed;
  std::unique_ptr<converge::Runtime> runtime;
  std::unique_ptr<converge::http::ApiKeyIndex> keys;
  std::unique_ptr<converge::http::Server> server;

  // The customer whose API key `req` bears; nullptr when it bears none we know.
  const std::string* Customer(const Request& req) const {
    auto token = converge::http::BearerToken(req);
    return token ? keys->Find(*token) : nullptr;
  }

  // POST /v1/orders {"sku": "...", "quantity": n}. Everything that needs no transaction
  // runs here, on the handler's thread: the body's parse, the customer's key lookup, the
  // order's id (a UUIDv7 drawn ahead, so the event naming it is prepared here too) and the
  // answer. With async_create that thread is an I/O thread: none of it blocks. The
  // transaction (on SQLite, the one writer thread every create shares) then only inserts
  // the order and the prepared event.
  converge::Result<converge::http::PreparedTxFn> PrepareOrder(Request& req) {
    json body = json::parse(req.body);  // validated before the key was claimed
    const std::string* customer = Customer(req);
    if (customer == nullptr) return tl::unexpected(converge::UnauthenticatedError("no such key"));
    const std::string id = converge::NewUuidV7();
    json order = {{"id", id}, {"sku", body["sku"]}, {"quantity", body["quantity"]}};
    std::string text = order.dump();
    CONVERGE_ASSIGN_OR_RETURN(
        converge::PreparedEvent event,
        runtime->outbox().Prepare(
            {.type = "order.placed", .subject = "order-" + id, .data = text}));
    return converge::http::PreparedTxFn(
        [this, id, customer = *customer, sku = body["sku"].get<std::string>(),
         quantity = body["quantity"].get<int64_t>(), event = std::move(event),
         answer = Json(201, std::move(text))](Tx& tx) -> converge::Result<Response> {
          CONVERGE_RETURN_IF_ERROR(
              tx.Exec("INSERT INTO orders (id, customer, sku, quantity) VALUES ($1, $2, $3, $4)",
                      id, customer, sku, quantity));
          CONVERGE_RETURN_IF_ERROR(runtime->outbox().Enqueue(tx, event));
          return answer;
        });
  }

  // The stock consumer: reserves the quantity, in the same transaction as its inbox row.
  static Status Reserve(Tx& tx, const converge::Event& e) {
    if (ValidateSkuQuantity(e.data)) return converge::InvalidArgumentError("malformed " + e.id);
    json order = json::parse(e.data);
    return converge::StatusOf(
        tx.Exec("INSERT INTO stock_reservations (sku, reserved) VALUES ($1, $2) "
                "ON CONFLICT (sku) DO UPDATE SET reserved = stock_reservations.reserved + $2",
                order["sku"].get<std::string>(), order["quantity"].get<int64_t>()));
  }
};

OrdersService::OrdersService(Options options)
    : impl_(new Impl{.options = std::move(options)}) {}
OrdersService::~OrdersService() { Stop(); }
uint16_t OrdersService::port() const { return impl_->server ? impl_->server->port() : 0; }

Status OrdersService::Start() {
  Impl& m = *impl_;
  auto db = converge::Database::Open(m.options.db);
  if (!db) return db.error();
  m.db = std::move(*db);
  const bool sqlite = m.options.db.rfind("sqlite:", 0) == 0;
  CONVERGE_RETURN_IF_ERROR(m.db->Transact([sqlite](Tx& tx) -> Status {
    // Order ids are UUIDv7 text, drawn before the transaction; earlier versions of this
    // example kept integer ids, which a store created by them still has.
    CONVERGE_ASSIGN_OR_RETURN(
        converge::Rows id_type,
        tx.Query(sqlite ? "SELECT upper(type) FROM pragma_table_info('orders') WHERE name = 'id'"
                        : "SELECT upper(data_type) FROM information_schema.columns WHERE "
                          "table_schema = current_schema() AND table_name = 'orders' AND "
                          "column_name = 'id'"));
    if (!id_type.empty() && id_type[0].Text(0) != "TEXT") {
      return converge::FailedPreconditionError(
          "this store's orders table has " + id_type[0].Text(0) +
          " ids (an earlier orders-lite); this version draws UUIDv7 text ids: use a new store");
    }
    for (const char* table : {"orders (id TEXT PRIMARY KEY, customer TEXT NOT NULL, "
                              "sku TEXT NOT NULL, quantity INTEGER NOT NULL)",
                              "stock_reservations (sku TEXT PRIMARY KEY, reserved INTEGER)",
                              "restocks (sku TEXT PRIMARY KEY, received INTEGER)"}) {
      CONVERGE_RETURN_IF_ERROR(tx.Exec(std::string("CREATE TABLE IF NOT EXISTS ") + table));
    }
    return converge::OkStatus();
  }));
  m.queue = std::make_unique<converge::SqlQueue>(*m.db);
  CONVERGE_RETURN_IF_ERROR(m.queue->Subscribe("stock", "order.placed"));
  m.stock_feed = m.queue->OpenSubscriber("stock");
  m.runtime = std::make_unique<converge::Runtime>(
      *m.db, converge::RuntimeOptions{.keys = m.options.keys,
                                      .outbox = {.source = "urn:converge:orders-lite"}});
  if (m.options.relay_and_consumer) {
    m.runtime->AddRelay(*m.queue);
    m.runtime->AddConsumer(*m.stock_feed, {.name = "stock"}).On("order.placed", &Impl::Reserve);
  }
  CONVERGE_RETURN_IF_ERROR(m.runtime->Start());

  m.keys = std::make_unique<converge::http::ApiKeyIndex>(m.options.api_keys);
  converge::http::ServerOptions so{.address = m.options.address, .port = m.options.port};
  so.worker_threads = m.options.worker_threads;
  so.io_threads = m.options.io_threads;
  m.server = std::make_unique<converge::http::Server>(so);
  converge::http::IdempotencyRouteOptions route;
  route.scope = [&m](const Request& req) -> std::optional<std::string> {
    const std::string* customer = m.Customer(req);
    return customer ? std::optional<std::string>(*customer) : std::nullopt;
  };
  route.validate = [](Request& req) { return ValidateSkuQuantity(req.body); };
  auto prepare = [&m](Request& req) { return m.PrepareOrder(req); };
  if (m.options.async_create) {
    m.server->RouteAsync(
        "POST", "/v1/orders",
        converge::http::SinglePhaseAsyncRoute(m.runtime->keys(), std::move(route), prepare));
  } else {
    m.server->Route("POST", "/v1/orders",
                    converge::http::SinglePhaseRoute(m.runtime->keys(), std::move(route),
                                                     prepare));
  }
  // Restocks from the warehouse, as Standard Webhooks: verified, deduped by webhook-id and
  // applied in one transaction before the 204, so a redelivery never counts twice.
  m.server->Route("POST", "/webhooks/warehouse",
                  converge::http::WebhookIntakeRoute(
                      *m.db,
                      {.consumer = "webhook:warehouse",
                       .source = "urn:orders-lite:warehouse",
                       .secrets = {m.options.warehouse_secret},
                       .validate = [](auto& hook) { return ValidateSkuQuantity(hook.body); }},
                      [](Tx& tx, const auto& hook) {
                        json b = json::parse(hook.body);
                        return converge::StatusOf(tx.Exec(
                            "INSERT INTO restocks (sku, received) VALUES ($1, $2) ON CONFLICT "
                            "(sku) DO UPDATE SET received = restocks.received + $2",
                            b["sku"].get<std::string>(), b["quantity"].get<int64_t>()));
                      }));
  m.server->Route("GET", "/v1/orders/{id}", [&m](Request& req) -> Response {
    const std::string* customer = m.Customer(req);
    if (customer == nullptr) return Problem(401, "Unauthorized", "an API key is required");
    json found;
    Status st = m.db->Read([&](Tx& tx) -> Status {
      CONVERGE_ASSIGN_OR_RETURN(
          converge::Rows rows, tx.Query("SELECT id, sku, quantity FROM orders WHERE id = $1 AND "
                                        "customer = $2", req.params["id"], *customer));
      if (!rows.empty()) {
        found = {{"id", rows[0].Text(0)}, {"sku", rows[0].Text(1)}, {"quantity", rows[0].Int(2)}};
      }
      return converge::OkStatus();
    });
    if (!st.ok()) return converge::http::StoreProblem(st);
    return found.is_null() ? Problem(404, "Not Found", "no such order") : Json(200, found.dump());
  });
  return m.server->Start();
}

void OrdersService::Stop() {
  if (impl_->server) impl_->server->Stop();
  if (impl_->runtime) impl_->runtime->Stop();
}

}  // namespace orders_lite
