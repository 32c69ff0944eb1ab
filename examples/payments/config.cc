#include "examples/payments/config.h"

#include <charconv>
#include <cstdlib>
#include <set>

#include <toml++/toml.h>

#include "converge/config_reader.h"
#include "converge/http.h"

namespace payments {
namespace {

using converge::InvalidArgumentError;
using converge::OkStatus;
using converge::Status;

const char* Env(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? v : nullptr;
}

}  // namespace

Status ParseListen(const std::string& listen, std::string* host, uint16_t* port) {
  return converge::http::ParseHostPort(listen, host, port);
}

converge::Result<ServiceConfig> LoadServiceConfig(const std::string& path) {
  ServiceConfig c;
  if (!path.empty()) {
    toml::table root;
    try {
      root = toml::parse_file(path);
    } catch (const toml::parse_error& e) {
      return tl::unexpected(InvalidArgumentError(
          "config " + path + ": " + std::string(e.description()) + " at line " +
          std::to_string(e.source().begin.line)));
    }
    converge::ConfigReader r(root);
    CONVERGE_RETURN_IF_ERROR(r.Known({
        {"server", {"listen", "instance_name", "io_threads", "worker_threads", "body_limit_bytes",
                    "header_limit_bytes", "max_header_fields", "max_connections",
                    "header_timeout_ms", "body_timeout_ms", "shutdown_drain_ms"}},
        {"store", {"uri", "synchronous", "notify", "broker", "publish_in_transaction"}},
        {"idempotency", {"ttl_seconds", "lease_ms", "completer_grace_ms", "replay_cache_mb",
                         "max_clock_skew_ms"}},
        {"auth", {"admin_token", "admin_token_env", "admin_token_file", "api_keys"}},
        {"psp", {"url", "timeout_ms", "webhook_secrets", "webhook_secrets_env",
                 "webhook_secrets_file", "webhook_tolerance_seconds"}},
        {"mail", {"url", "timeout_ms"}},
        {"consumers", {"visibility_ms", "max_attempts", "backoff_initial_ms", "backoff_max_ms"}},
        {"effects", {"max_attempts", "lease_ms"}},
        {"admin", {"failpoints", "clock"}},
        {"retention", {"sweep_interval_ms", "sweep_pass_ms", "inbox_sweep_pass_ms"}},
        {"log", {"level"}},
    }));
    std::string listen, sync;
    CONVERGE_RETURN_IF_ERROR(r.String("server", "listen", &listen));
    if (!listen.empty()) CONVERGE_RETURN_IF_ERROR(ParseListen(listen, &c.address, &c.port));
    CONVERGE_RETURN_IF_ERROR(r.String("server", "instance_name", &c.instance_name));
    CONVERGE_RETURN_IF_ERROR(r.Int("server", "io_threads", &c.io_threads, 1, 64));
    CONVERGE_RETURN_IF_ERROR(r.Int("server", "worker_threads", &c.worker_threads, 1, 1024));
    CONVERGE_RETURN_IF_ERROR(r.Int("server", "body_limit_bytes", &c.body_limit, 1024, 64 << 20));
    CONVERGE_RETURN_IF_ERROR(r.Int("server", "header_limit_bytes", &c.header_limit, 1024, 1 << 20));
    CONVERGE_RETURN_IF_ERROR(r.Int("server", "max_header_fields", &c.max_header_fields, 8, 10000));
    CONVERGE_RETURN_IF_ERROR(r.Int("server", "max_connections", &c.max_connections, 1, 1 << 20));
    CONVERGE_RETURN_IF_ERROR(
        r.Duration("server", "header_timeout_ms", &c.header_timeout, 100, 3600000));
    CONVERGE_RETURN_IF_ERROR(
        r.Duration("server", "body_timeout_ms", &c.body_timeout, 100, 3600000));
    CONVERGE_RETURN_IF_ERROR(
        r.Duration("server", "shutdown_drain_ms", &c.shutdown_drain, 0, 600000));
    CONVERGE_RETURN_IF_ERROR(r.String("store", "uri", &c.db));
    CONVERGE_RETURN_IF_ERROR(r.String("store", "broker", &c.broker));
    CONVERGE_RETURN_IF_ERROR(r.String("store", "synchronous", &sync));
    for (auto [name, out] : {std::pair{"notify", &c.notify},
                             std::pair{"publish_in_transaction", &c.publish_in_transaction}}) {
      if (auto n = root["store"][name]) {
        if (!n.is_boolean()) {
          return tl::unexpected(InvalidArgumentError("config: store." + std::string(name) +
                                                     " must be true or false"));
        }
        *out = *n.value<bool>();
      }
    }
    if (c.publish_in_transaction && !c.broker.empty()) {
      return tl::unexpected(InvalidArgumentError(
          "config: store.publish_in_transaction puts events on the SQL queue in the store; "
          "with store.broker they go to the broker, through the relay"));
    }
    if (!sync.empty()) {
      if (sync != "full" && sync != "normal") {
        return tl::unexpected(
            InvalidArgumentError("config: store.synchronous must be \"full\" or \"normal\""));
      }
      c.synchronous_full = sync == "full";
    }
    int64_t ttl_s = c.key_ttl.count() / 1000;
    CONVERGE_RETURN_IF_ERROR(r.Int("idempotency", "ttl_seconds", &ttl_s, 1, 365LL * 86400));
    c.key_ttl = Millis(ttl_s * 1000);
    CONVERGE_RETURN_IF_ERROR(r.Duration("idempotency", "lease_ms", &c.lease, 100, 3600000));
    CONVERGE_RETURN_IF_ERROR(
        r.Duration("idempotency", "completer_grace_ms", &c.completer_grace, 0, 86400000));
    CONVERGE_RETURN_IF_ERROR(
        r.Int("idempotency", "replay_cache_mb", &c.replay_cache_mb, 0, 1024 * 1024));
    CONVERGE_RETURN_IF_ERROR(
        r.Duration("idempotency", "max_clock_skew_ms", &c.max_clock_skew, 0, 86400000));
    for (auto [name, out] : {std::pair{"failpoints", &c.admin_failpoints},
                             std::pair{"clock", &c.admin_clock}}) {
      if (auto n = root["admin"][name]) {
        if (!n.is_boolean()) {
          return tl::unexpected(InvalidArgumentError("config: admin." + std::string(name) +
                                                     " must be true or false"));
        }
        *out = *n.value<bool>();
      }
    }
    CONVERGE_RETURN_IF_ERROR(
        r.Duration("retention", "sweep_interval_ms", &c.sweep_interval, 100, 86400000));
    CONVERGE_RETURN_IF_ERROR(
        r.Duration("retention", "sweep_pass_ms", &c.sweep_pass, 1000, 30LL * 86400000));
    CONVERGE_RETURN_IF_ERROR(r.Duration("retention", "inbox_sweep_pass_ms", &c.inbox_sweep_pass,
                                        1000, 365LL * 86400000));
    CONVERGE_RETURN_IF_ERROR(r.Secret("auth", "admin_token", &c.admin_token));
    CONVERGE_RETURN_IF_ERROR(r.StringMap("auth", "api_keys", &c.api_keys));
    CONVERGE_RETURN_IF_ERROR(r.String("psp", "url", &c.psp_url));
    CONVERGE_RETURN_IF_ERROR(r.Duration("psp", "timeout_ms", &c.psp_timeout, 10, 600000));
    CONVERGE_RETURN_IF_ERROR(r.Secrets("psp", "webhook_secrets", &c.webhook_secrets));
    int64_t tol_s = 300;
    CONVERGE_RETURN_IF_ERROR(r.Int("psp", "webhook_tolerance_seconds", &tol_s, 1, 86400));
    c.webhook_tolerance = Millis(tol_s * 1000);
    CONVERGE_RETURN_IF_ERROR(r.String("mail", "url", &c.mail_url));
    CONVERGE_RETURN_IF_ERROR(r.Duration("mail", "timeout_ms", &c.mail_timeout, 10, 600000));
    CONVERGE_RETURN_IF_ERROR(r.Duration("consumers", "visibility_ms", &c.visibility, 10, 86400000));
    CONVERGE_RETURN_IF_ERROR(r.Int("consumers", "max_attempts", &c.max_attempts, 1, 1000));
    CONVERGE_RETURN_IF_ERROR(
        r.Duration("consumers", "backoff_initial_ms", &c.backoff_initial, 0, 3600000));
    CONVERGE_RETURN_IF_ERROR(
        r.Duration("consumers", "backoff_max_ms", &c.backoff_max, 0, 86400000));
    CONVERGE_RETURN_IF_ERROR(r.Int("effects", "max_attempts", &c.effect_max_attempts, 1, 1000));
    CONVERGE_RETURN_IF_ERROR(r.Duration("effects", "lease_ms", &c.effect_lease, 10, 86400000));
    CONVERGE_RETURN_IF_ERROR(r.String("log", "level", &c.log_level));
  }
  if (const char* v = Env("CONVERGE_LISTEN")) {
    CONVERGE_RETURN_IF_ERROR(ParseListen(v, &c.address, &c.port));
  }
  if (const char* v = Env("CONVERGE_DB")) c.db = v;
  if (const char* v = Env("CONVERGE_ADMIN_TOKEN")) c.admin_token = v;
  if (const char* v = Env("CONVERGE_PSP_URL")) c.psp_url = v;
  if (const char* v = Env("CONVERGE_MAIL_URL")) c.mail_url = v;
  if (const char* v = Env("CONVERGE_LOG_LEVEL")) c.log_level = v;
  if (const char* v = Env("CONVERGE_WEBHOOK_SECRET")) c.webhook_secrets = {v};
  return c;
}

}  // namespace payments
