// converge relay --config FILE: publishes an application's own outbox table (written by a
// program in any language) to the SQL queue, NATS JetStream or an HTTP target as signed
// webhooks, at least once and in order per aggregate, with many relay processes sharing
// the work. docs/design/outbox-table-relay.md.
//
// The process: OutboxTable (outbox_table.h) copies new rows into converge's outbox and
// deletes or marks the published ones; the library's Relay publishes the outbox. It
// serves /metrics and /healthz, and stops cleanly on SIGTERM/SIGINT.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <spdlog/spdlog.h>
#include <toml++/toml.h>

#include "apps/converge/commands.h"
#include "apps/converge/process.h"
#include "converge/config_reader.h"
#include "converge/http.h"
#include "converge/http_service.h"
#include "converge/metrics.h"
#include "converge/outbox_table.h"
#include "converge/relay.h"
#include "converge/runtime.h"
#include "converge/sql_queue.h"
#include "converge/webhook.h"
#include "converge/webhook_publisher.h"
#include "converge/worker.h"
#if CONVERGE_WITH_NATS
#include "converge/nats.h"
#endif

namespace converge::cli {
namespace {

struct TableRelayConfig {
  std::string address = "127.0.0.1";
  uint16_t port = 8083;
  std::string store;
  std::string log_level = "info";
  RelayOptions relay;
  OutboxTableOptions table;
  std::string target;  // "http", "sql_queue" or "nats"
  WebhookTarget http;  // kind http
  std::string nats;    // kind nats: the broker URI
  std::string queue, pattern = "*";  // kind sql_queue
};

Status Bad(const std::string& what) { return InvalidArgumentError("config: " + what); }

Result<TableRelayConfig> LoadTableRelayConfig(const std::string& path) {
  TableRelayConfig c;
  CONVERGE_ASSIGN_OR_RETURN(toml::table root, ConfigReader::ParseFile(path));
  ConfigReader r(root);
  CONVERGE_RETURN_IF_ERROR(r.Known(
      {{"relay", {"store", "name", "listen", "log_level", "batch", "poll_ms", "lease_ms"}},
       {"outbox_table",
        {"table", "on_published", "source", "batch", "poll_ms", "id_column",
         "aggregatetype_column", "aggregateid_column", "type_column", "payload_column",
         "timestamp_column", "order_column", "published_column"}},
       {"target", {"kind", "url", "secret", "secret_env", "secret_file", "timeout_ms", "queue",
                   "pattern"}}}));
  std::string listen = "127.0.0.1:8083";
  CONVERGE_RETURN_IF_ERROR(r.String("relay", "listen", &listen));
  CONVERGE_RETURN_IF_ERROR(http::ParseHostPort(listen, &c.address, &c.port));
  CONVERGE_RETURN_IF_ERROR(r.String("relay", "store", &c.store));
  if (c.store.empty()) return tl::unexpected(Bad("relay.store (the application's database)"));
  CONVERGE_RETURN_IF_ERROR(r.String("relay", "name", &c.relay.name));
  CONVERGE_RETURN_IF_ERROR(r.String("relay", "log_level", &c.log_level));
  CONVERGE_RETURN_IF_ERROR(r.Int("relay", "batch", &c.relay.batch, 1, 100'000));
  CONVERGE_RETURN_IF_ERROR(r.Duration("relay", "poll_ms", &c.relay.poll, 1, 3'600'000));
  c.relay.lease = Millis(0);  // unset: chosen below, once the target is known
  CONVERGE_RETURN_IF_ERROR(r.Duration("relay", "lease_ms", &c.relay.lease, 100, 3'600'000));

  OutboxTableOptions& t = c.table;
  OutboxTableColumns& col = t.columns;
  CONVERGE_RETURN_IF_ERROR(r.String("outbox_table", "table", &t.table));
  CONVERGE_RETURN_IF_ERROR(r.String("outbox_table", "source", &t.source));
  CONVERGE_RETURN_IF_ERROR(r.Int("outbox_table", "batch", &t.batch, 1, 100'000));
  CONVERGE_RETURN_IF_ERROR(r.Duration("outbox_table", "poll_ms", &t.poll, 1, 3'600'000));
  CONVERGE_RETURN_IF_ERROR(r.String("outbox_table", "id_column", &col.id));
  CONVERGE_RETURN_IF_ERROR(r.String("outbox_table", "aggregatetype_column", &col.aggregate_type));
  CONVERGE_RETURN_IF_ERROR(r.String("outbox_table", "aggregateid_column", &col.aggregate_id));
  CONVERGE_RETURN_IF_ERROR(r.String("outbox_table", "type_column", &col.type));
  CONVERGE_RETURN_IF_ERROR(r.String("outbox_table", "payload_column", &col.payload));
  CONVERGE_RETURN_IF_ERROR(r.String("outbox_table", "timestamp_column", &col.timestamp));
  CONVERGE_RETURN_IF_ERROR(r.String("outbox_table", "order_column", &col.order));
  CONVERGE_RETURN_IF_ERROR(r.String("outbox_table", "published_column", &col.published));
  std::string on_published = "delete";
  CONVERGE_RETURN_IF_ERROR(r.String("outbox_table", "on_published", &on_published));
  if (on_published == "mark") {
    t.on_published = OnPublished::kMark;
    if (col.published.empty()) col.published = "published_at";
  } else if (on_published != "delete") {
    return tl::unexpected(Bad("outbox_table.on_published must be \"delete\" or \"mark\", not '" +
                              on_published + "'"));
  }

  CONVERGE_RETURN_IF_ERROR(r.String("target", "kind", &c.target));
  CONVERGE_RETURN_IF_ERROR(r.String("target", "url", &c.http.url));
  CONVERGE_RETURN_IF_ERROR(r.Secret("target", "secret", &c.http.secret));
  CONVERGE_RETURN_IF_ERROR(r.Duration("target", "timeout_ms", &c.http.timeout, 1, 600'000));
  CONVERGE_RETURN_IF_ERROR(r.String("target", "queue", &c.queue));
  CONVERGE_RETURN_IF_ERROR(r.String("target", "pattern", &c.pattern));
  c.http.name = "target";
  if (c.target == "http") {
    if (c.http.url.rfind("http", 0) != 0) return tl::unexpected(Bad("target.url: an http(s) URL"));
    if (!webhook::DecodeSecret(c.http.secret)) {
      return tl::unexpected(Bad("target.secret must be a whsec_<base64> secret (deliveries are "
                                "signed with it; `converge webhook` can make one)"));
    }
    // A batch's POSTs stop at half the lease (WebhookPublisher), and one POST may take
    // the whole timeout: it must fit in that half, or the partitions could lapse under it;
    // three timeouts leave half a timeout's room for the POSTs after the first.
    if (c.relay.lease == Millis(0)) {
      c.relay.lease = std::max<Millis>(RelayOptions{}.lease, 3 * c.http.timeout);
    } else if (c.relay.lease < 3 * c.http.timeout) {
      return tl::unexpected(Bad("relay.lease_ms (" + std::to_string(c.relay.lease.count()) +
                                ") must be at least three times target.timeout_ms (" +
                                std::to_string(c.http.timeout.count()) +
                                "): a pass sends for at most half the lease"));
    }
  } else if (c.target == "nats") {
    c.nats = c.http.url;
    if (c.nats.rfind("nats://", 0) != 0) return tl::unexpected(Bad("target.url: nats://..."));
  } else if (c.target == "sql_queue") {
    if (c.queue.empty()) return tl::unexpected(Bad("target.queue: the SQL queue to publish to"));
  } else {
    return tl::unexpected(Bad("target.kind must be \"http\", \"sql_queue\" or \"nats\", not '" +
                              c.target + "'"));
  }
  if (c.relay.lease == Millis(0)) c.relay.lease = RelayOptions{}.lease;
  return c;
}

// Opens the store, the table and the target, then runs until a stop signal.
int Run(const TableRelayConfig& cfg, const std::string& port_file) {
  sigset_t signals = BlockStopSignals();
  auto db = Database::Open(cfg.store);
  if (!db) {
    std::fprintf(stderr, "converge relay: %s\n", db.error().ToString().c_str());
    return 1;
  }
  Metrics metrics;
  std::unique_ptr<Publisher> publisher;  // before the runtime: its relay publishes to it
  std::unique_ptr<SqlQueue> queue;
  Runtime runtime(**db);
  auto table = OutboxTable::Open(**db, runtime.outbox(), cfg.table);
  if (!table) {
    std::fprintf(stderr, "converge relay: %s\n", table.error().message().c_str());
    return 2;
  }
  if (cfg.target == "http") {
    publisher = std::make_unique<WebhookPublisher>(cfg.http, cfg.relay.lease, &metrics);
  } else if (cfg.target == "sql_queue") {
    queue = std::make_unique<SqlQueue>(**db);
    Status st = queue->Subscribe(cfg.queue, cfg.pattern);
    if (!st.ok()) {
      std::fprintf(stderr, "converge relay: %s\n", st.ToString().c_str());
      return 2;
    }
  } else {
#if CONVERGE_WITH_NATS
    auto options = ParseNatsUri(cfg.nats);
    if (!options) {
      std::fprintf(stderr, "converge relay: target.url: %s\n", options.error().message().c_str());
      return 2;
    }
    auto broker = NatsBroker::Connect(std::move(*options), &metrics);
    if (!broker) {
      std::fprintf(stderr, "converge relay: %s\n", broker.error().ToString().c_str());
      return 1;
    }
    publisher = std::move(*broker);
#else
    std::fprintf(stderr, "converge relay: this build has no NATS transport\n");
    return 2;
#endif
  }
  Relay& relay = runtime.AddRelay(
      queue ? static_cast<Publisher&>(*queue) : *publisher, cfg.relay);

  metrics.Describe("outbox_table_ingested_total", "counter",
                   "Rows of the application's outbox table copied for publishing.");
  metrics.Describe("outbox_table_finalized_total", "counter",
                   "Published rows deleted or marked in the application's outbox table.");
  metrics.Describe("outbox_table_held_back", "gauge",
                   "Rows waiting behind a row of their aggregate that cannot be published.");
  OutboxTable& t = **table;
  std::string last_error;
  OutboxTableStats seen;
  PollingWorker ingest("outbox table " + cfg.table.table, cfg.table.poll, [&] {
    Result<bool> more = t.RunOnce();
    const OutboxTableStats s = t.stats();
    metrics.Add("outbox_table_ingested_total", {}, static_cast<double>(s.ingested - seen.ingested));
    metrics.Add("outbox_table_finalized_total", {},
                static_cast<double>(s.finalized - seen.finalized));
    metrics.Set("outbox_table_held_back", {}, static_cast<double>(s.held_back));
    seen = s;
    if (s.last_error != last_error) {
      if (!s.last_error.empty())
        spdlog::error("event=outbox_table_error error=\"{}\"", s.last_error);
      last_error = s.last_error;
    }
    return more && *more;
  });

  http::ServerOptions so;
  so.address = cfg.address;
  so.port = cfg.port;
  http::Server server(so);
  http::RegisterHealthRoutes(server, **db, nullptr);
  Status st = http::RegisterMetricsRoute(
      server, {.metrics = &metrics, .runtime = &runtime, .db = db->get()});
  if (st.ok()) st = runtime.Start();
  if (st.ok()) st = server.Start();
  if (!st.ok()) {
    std::fprintf(stderr, "converge relay: %s\n", st.ToString().c_str());
    return 1;
  }
  ingest.Start();
  if (!WritePortFile(port_file, server.port())) {
    std::fprintf(stderr, "converge relay: cannot write %s\n", port_file.c_str());
    return 1;
  }
  spdlog::info("event=relay_started name={} table={} target={} port={}", relay.name(),
               cfg.table.table, cfg.target, server.port());
  WaitForStopSignal(signals);
  ingest.Stop();
  runtime.Stop();  // the relay's pass under way publishes and marks
  server.Stop();
  const RelayStats rs = relay.stats();
  spdlog::info("event=relay_stopped published={} failures={}", rs.published,
               rs.publish_failures);
  return 0;
}

}  // namespace

int RunTableRelay(const ModeFlags& f, const std::string& outbox_table,
                  const std::string& name) {
  auto cfg = LoadTableRelayConfig(f.config);
  if (cfg && !outbox_table.empty()) cfg->table.table = outbox_table;
  if (cfg && !name.empty()) cfg->relay.name = name;
  if (cfg && cfg->table.table.empty()) {
    cfg = tl::unexpected(Bad("outbox_table.table (or --outbox-table): the table to publish"));
  }
  if (!ApplyModeFlags("relay", cfg ? OkStatus() : cfg.error(), f, cfg ? &cfg->address : nullptr,
                      cfg ? &cfg->port : nullptr, cfg ? &cfg->log_level : nullptr)) {
    return 2;
  }
  return Run(*cfg, f.port_file);
}

}  // namespace converge::cli
