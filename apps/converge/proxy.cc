// converge proxy: the Idempotency-Key middleware in front of any HTTP API (http_proxy.h).
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <spdlog/spdlog.h>
#include <toml++/toml.h>

#include "apps/converge/commands.h"
#include "apps/converge/process.h"
#include "converge/config_reader.h"
#include "converge/database.h"
#include "converge/http.h"
#include "converge/http_proxy.h"
#include "converge/http_service.h"
#include "converge/metrics.h"
#include "converge/runtime.h"

namespace converge::cli {
namespace {

struct ProxyConfig {
  std::string address = "127.0.0.1";
  uint16_t port = 8081;
  std::string store = "sqlite:converge-proxy.db";
  std::string scope = "bearer";  // "bearer" or "header:<Name>"
  std::string log_level = "info";
  http::IdempotencyProxyOptions proxy;
  IdempotencyOptions keys;
  http::ServerOptions server;
};

// Loads and checks `path` (docs/design/proxy.md lists every key).
Result<ProxyConfig> LoadProxyConfig(const std::string& path) {
  ProxyConfig c;
  CONVERGE_ASSIGN_OR_RETURN(toml::table root, ConfigReader::ParseFile(path));
  ConfigReader r(root);
  CONVERGE_RETURN_IF_ERROR(r.Known(
      {{"proxy",
        {"listen", "upstream", "store", "scope", "log_level", "upstream_timeout_ms",
         "forward_key_header", "stored_statuses", "replay_headers", "max_stored_body",
         "max_upstream_body", "max_in_flight_per_scope"}},
       {"keys", {"ttl_seconds", "lease_seconds"}},
       {"server", {"body_limit", "header_limit", "max_connections", "worker_threads"}},
       {"route", {"method", "path", "key"}}}));
  std::string listen = "127.0.0.1:8081";
  CONVERGE_RETURN_IF_ERROR(r.String("proxy", "listen", &listen));
  CONVERGE_RETURN_IF_ERROR(http::ParseHostPort(listen, &c.address, &c.port));
  CONVERGE_RETURN_IF_ERROR(r.String("proxy", "upstream", &c.proxy.upstream));
  if (c.proxy.upstream.empty()) {
    return tl::unexpected(InvalidArgumentError("config: proxy.upstream is required"));
  }
  CONVERGE_RETURN_IF_ERROR(r.String("proxy", "store", &c.store));
  CONVERGE_RETURN_IF_ERROR(r.String("proxy", "scope", &c.scope));
  if (c.scope != "bearer" && (c.scope.rfind("header:", 0) != 0 || c.scope.size() == 7)) {
    return tl::unexpected(InvalidArgumentError(
        "config: proxy.scope must be \"bearer\" or \"header:<Name>\", not '" + c.scope + "'"));
  }
  CONVERGE_RETURN_IF_ERROR(r.String("proxy", "log_level", &c.log_level));
  CONVERGE_RETURN_IF_ERROR(
      r.Duration("proxy", "upstream_timeout_ms", &c.proxy.upstream_timeout, 1, 600'000));
  CONVERGE_RETURN_IF_ERROR(r.String("proxy", "forward_key_header", &c.proxy.forward_key_header));
  CONVERGE_RETURN_IF_ERROR(r.Ints("proxy", "stored_statuses", &c.proxy.stored_statuses, 300, 499));
  CONVERGE_RETURN_IF_ERROR(r.Strings("proxy", "replay_headers", &c.proxy.replay_headers));
  CONVERGE_RETURN_IF_ERROR(
      r.Int("proxy", "max_stored_body", &c.proxy.max_stored_body, 0, int64_t{64} << 20));
  CONVERGE_RETURN_IF_ERROR(
      r.Int("proxy", "max_upstream_body", &c.proxy.max_upstream_body, 1, int64_t{1} << 30));
  CONVERGE_RETURN_IF_ERROR(
      r.Int("proxy", "max_in_flight_per_scope", &c.proxy.max_in_flight_per_scope, 1, 100'000));
  int64_t ttl_s = 24 * 3600, lease_s = 30;
  CONVERGE_RETURN_IF_ERROR(r.Int("keys", "ttl_seconds", &ttl_s, 1, int64_t{400} * 86400));
  CONVERGE_RETURN_IF_ERROR(r.Int("keys", "lease_seconds", &lease_s, 1, 86400));
  c.keys.ttl = std::chrono::seconds(ttl_s);
  c.keys.lease = std::chrono::seconds(lease_s);
  CONVERGE_RETURN_IF_ERROR(r.Int("server", "body_limit", &c.server.body_limit, 0, 1 << 30));
  CONVERGE_RETURN_IF_ERROR(
      r.Int("server", "header_limit", &c.server.header_limit, 1024, 1 << 20));
  CONVERGE_RETURN_IF_ERROR(
      r.Int("server", "max_connections", &c.server.max_connections, 1, 1'000'000));
  CONVERGE_RETURN_IF_ERROR(r.Int("server", "worker_threads", &c.server.worker_threads, 1, 1024));
  CONVERGE_RETURN_IF_ERROR(
      ConfigReader::ForEachTable(root, "route", [&](ConfigReader rr) -> Status {
        http::ProxyRoute route;
        std::string key = "required";
        CONVERGE_RETURN_IF_ERROR(rr.String("route", "method", &route.method));
        CONVERGE_RETURN_IF_ERROR(rr.String("route", "path", &route.pattern));
        CONVERGE_RETURN_IF_ERROR(rr.String("route", "key", &key));
        if (key != "required" && key != "optional") {
          return InvalidArgumentError(
              "config: route.key must be \"required\" or \"optional\", "
              "not '" +
              key + "'");
        }
        route.key_required = key == "required";
        c.proxy.routes.push_back(std::move(route));
        return OkStatus();
      }));
  if (c.proxy.routes.empty()) {
    return tl::unexpected(InvalidArgumentError(
        "config: no [[route]]: name at least one method and path that takes an "
        "Idempotency-Key"));
  }
  return c;
}

int RunProxy(const ModeFlags& f) {
  auto cfg = LoadProxyConfig(f.config);
  if (!ApplyModeFlags("proxy", cfg ? OkStatus() : cfg.error(), f, cfg ? &cfg->address : nullptr,
                      cfg ? &cfg->port : nullptr, cfg ? &cfg->log_level : nullptr)) {
    return 2;
  }
  cfg->proxy.scope = cfg->scope == "bearer" ? http::ScopeFromBearer
                                            : http::ScopeFromHeader(cfg->scope.substr(7));
  if (Status st = http::ValidateIdempotencyProxyOptions(cfg->proxy, cfg->keys); !st.ok()) {
    std::fprintf(stderr, "converge proxy: %s\n", st.message().c_str());
    return 2;
  }
  sigset_t signals = BlockStopSignals();
  auto db = Database::Open(cfg->store);
  if (!db) {
    std::fprintf(stderr, "converge proxy: %s\n", db.error().ToString().c_str());
    return 1;
  }
  Runtime runtime(**db, RuntimeOptions{.keys = cfg->keys});
  Metrics metrics;
  cfg->proxy.metrics = &metrics;
  cfg->server.address = cfg->address;
  cfg->server.port = cfg->port;
  http::Server server(cfg->server);
  // The proxy's own endpoints take precedence over the upstream's paths of the same name.
  http::RegisterHealthRoutes(server, **db, nullptr);
  Status st = http::RegisterMetricsRoute(
      server, {.metrics = &metrics, .runtime = &runtime, .db = db->get()});
  if (st.ok()) st = http::RegisterIdempotencyProxy(server, runtime.keys(), cfg->proxy);
  if (st.ok()) st = runtime.Start();
  if (st.ok()) st = server.Start();
  if (!st.ok()) {
    std::fprintf(stderr, "converge proxy: %s\n", st.ToString().c_str());
    return st.code() == StatusCode::kInvalidArgument ? 2 : 1;
  }
  if (!WritePortFile(f.port_file, server.port())) {
    std::fprintf(stderr, "converge proxy: cannot write %s\n", f.port_file.c_str());
    return 1;
  }
  spdlog::info("event=listening mode=proxy address={}:{} upstream={} routes={} store={}",
               cfg->address, server.port(), cfg->proxy.upstream, cfg->proxy.routes.size(),
               cfg->store.substr(0, cfg->store.find(':')));
  WaitForStopSignal(signals);
  server.Stop();
  runtime.Stop();
  return 0;
}

}  // namespace

void AddProxyCommand(CLI::App& app, int* exit_code) {
  auto f = std::make_shared<ModeFlags>();
  CLI::App* c = app.add_subcommand(
      "proxy", "An Idempotency-Key reverse proxy in front of any HTTP API (docs/design/proxy.md)");
  AddModeFlags(c, f.get(), "TOML file: upstream, routes, scope, limits");
  c->callback([f, exit_code] { *exit_code = RunProxy(*f); });
}

}  // namespace converge::cli
