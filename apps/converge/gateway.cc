// converge gateway: webhooks in from providers (Standard Webhooks, Stripe, GitHub),
// verified and stored before the 2xx, then delivered at least once to internal HTTP
// targets, signed with the gateway's own Standard Webhooks secret. docs/design/gateway.md.
#include <atomic>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>
#include <toml++/toml.h>

#include "apps/converge/commands.h"
#include "apps/converge/process.h"
#include "converge/config_reader.h"
#include "converge/dead_letters.h"
#include "converge/effects.h"
#include "converge/http.h"
#include "converge/http_idempotency.h"
#include "converge/http_service.h"
#include "converge/metrics.h"
#include "converge/runtime.h"
#include "converge/webhook.h"
#include "converge/webhook_publisher.h"

namespace converge::cli {
namespace {

using json = nlohmann::json;

struct Endpoint {
  std::string name, path;
  http::WebhookScheme scheme = http::WebhookScheme::kStandard;
  std::vector<std::string> secrets, targets;
  Millis tolerance = std::chrono::minutes(5);
  // Where a delivery's subject is in the body (RFC 6901 JSON pointer), for targets that
  // deliver in order per subject; empty: the whole endpoint is one subject.
  std::optional<json::json_pointer> subject;
};

struct Target {
  std::string name, url, secret;
  Millis timeout = std::chrono::seconds(10);
  bool ordered = false;  // in order per subject, a failing delivery holding later ones back
  int concurrency = 4;   // deliveries to this target at once (each subject one at a time)
  EffectRunnerOptions runner;
};

struct GatewayConfig {
  std::string address = "127.0.0.1";
  uint16_t port = 8082;
  std::string store = "sqlite:converge-gateway.db";
  std::string admin_token;
  std::string log_level = "info";
  Millis dedupe_ttl = std::chrono::hours(24 * 30);
  std::vector<Endpoint> endpoints;
  std::vector<Target> targets;
};

Status Bad(const std::string& what) { return InvalidArgumentError("config: " + what); }

// Target and endpoint names go into effect keys and metric labels, ':'-separated.
bool GoodName(const std::string& name) {
  if (name.empty() || name.size() > 64) return false;
  for (char ch : name) {
    if (!std::isalnum(static_cast<unsigned char>(ch)) && ch != '-' && ch != '_' && ch != '.') {
      return false;
    }
  }
  return true;
}

Result<GatewayConfig> LoadGatewayConfig(const std::string& path) {
  GatewayConfig c;
  CONVERGE_ASSIGN_OR_RETURN(toml::table root, ConfigReader::ParseFile(path));
  ConfigReader r(root);
  CONVERGE_RETURN_IF_ERROR(
      r.Known({{"gateway", {"listen", "store", "admin_token", "admin_token_env",
                            "admin_token_file", "log_level", "dedupe_ttl_hours"}},
               {"endpoint", {"name", "path", "scheme", "secrets", "secrets_env", "secrets_file",
                             "tolerance_seconds", "targets", "subject"}},
               {"target", {"name", "url", "secret", "secret_env", "secret_file", "timeout_ms",
                           "max_attempts", "backoff_initial_ms", "backoff_max_ms", "lease_ms",
                           "ordered", "concurrency"}}}));
  std::string listen = "127.0.0.1:8082";
  CONVERGE_RETURN_IF_ERROR(r.String("gateway", "listen", &listen));
  CONVERGE_RETURN_IF_ERROR(http::ParseHostPort(listen, &c.address, &c.port));
  CONVERGE_RETURN_IF_ERROR(r.String("gateway", "store", &c.store));
  CONVERGE_RETURN_IF_ERROR(r.Secret("gateway", "admin_token", &c.admin_token));
  if (const char* env = std::getenv("CONVERGE_ADMIN_TOKEN"); env != nullptr && *env != '\0') {
    c.admin_token = env;
  }
  if (c.admin_token.size() < 8) {
    return tl::unexpected(
        Bad("gateway.admin_token (or CONVERGE_ADMIN_TOKEN) must be at least "
            "8 characters: the dead-letter API needs it"));
  }
  CONVERGE_RETURN_IF_ERROR(r.String("gateway", "log_level", &c.log_level));
  int64_t ttl_h = 24 * 30;
  CONVERGE_RETURN_IF_ERROR(r.Int("gateway", "dedupe_ttl_hours", &ttl_h, 1, 24 * 400));
  c.dedupe_ttl = std::chrono::hours(ttl_h);

  CONVERGE_RETURN_IF_ERROR(
      ConfigReader::ForEachTable(root, "target", [&](ConfigReader t) -> Status {
        Target target;
        CONVERGE_RETURN_IF_ERROR(t.String("target", "name", &target.name));
        CONVERGE_RETURN_IF_ERROR(t.String("target", "url", &target.url));
        CONVERGE_RETURN_IF_ERROR(t.Secret("target", "secret", &target.secret));
        CONVERGE_RETURN_IF_ERROR(t.Duration("target", "timeout_ms", &target.timeout, 1, 600'000));
        CONVERGE_RETURN_IF_ERROR(t.Bool("target", "ordered", &target.ordered));
        CONVERGE_RETURN_IF_ERROR(t.Int("target", "concurrency", &target.concurrency, 1, 64));
        target.runner.max_attempts = 8;
        target.runner.backoff_initial = std::chrono::seconds(1);
        target.runner.backoff_max = std::chrono::minutes(10);
        CONVERGE_RETURN_IF_ERROR(
            t.Int("target", "max_attempts", &target.runner.max_attempts, 1, 1000));
        CONVERGE_RETURN_IF_ERROR(t.Duration("target", "backoff_initial_ms",
                                            &target.runner.backoff_initial, 1, 3'600'000));
        CONVERGE_RETURN_IF_ERROR(
            t.Duration("target", "backoff_max_ms", &target.runner.backoff_max, 1, 86'400'000));
        if (target.name.empty() || target.url.rfind("http", 0) != 0) {
          return Bad("each [[target]] needs a name and an http(s) url");
        }
        if (!GoodName(target.name)) {
          return Bad("target name '" + target.name +
                     "' must be 1-64 letters, digits, '-', '_' or '.'");
        }
        if (!webhook::DecodeSecret(target.secret)) {
          return Bad("target '" + target.name +
                     "': secret must be a whsec_<base64> secret (the "
                     "gateway signs deliveries with it; `converge webhook` can make one)");
        }
        target.runner.kind = "gateway.deliver:" + target.name;
        // One delivery per claim: a runner holds no backlog the target's other runners
        // could be delivering meanwhile (`concurrency`).
        target.runner.batch = 1;
        // How long a claimed delivery waits before another attempt may take it (after a crash
        // mid-call): it must outlive the call.
        target.runner.lease = std::max<Millis>(std::chrono::seconds(30), target.timeout * 3);
        CONVERGE_RETURN_IF_ERROR(
            t.Duration("target", "lease_ms", &target.runner.lease, 1, 86'400'000));
        if (target.runner.lease <= target.timeout) {
          return Bad("target '" + target.name + "': lease_ms must exceed timeout_ms");
        }
        c.targets.push_back(std::move(target));
        return OkStatus();
      }));
  CONVERGE_RETURN_IF_ERROR(
      ConfigReader::ForEachTable(root, "endpoint", [&](ConfigReader e) -> Status {
        Endpoint ep;
        std::string scheme = "standard";
        int64_t tolerance_s = 300;
        CONVERGE_RETURN_IF_ERROR(e.String("endpoint", "name", &ep.name));
        CONVERGE_RETURN_IF_ERROR(e.String("endpoint", "path", &ep.path));
        CONVERGE_RETURN_IF_ERROR(e.String("endpoint", "scheme", &scheme));
        CONVERGE_RETURN_IF_ERROR(e.Secrets("endpoint", "secrets", &ep.secrets));
        CONVERGE_RETURN_IF_ERROR(e.Strings("endpoint", "targets", &ep.targets));
        CONVERGE_RETURN_IF_ERROR(e.Int("endpoint", "tolerance_seconds", &tolerance_s, 1, 86400));
        std::string subject;
        CONVERGE_RETURN_IF_ERROR(e.String("endpoint", "subject", &subject));
        if (!subject.empty()) {
          try {
            ep.subject = json::json_pointer(subject);
          } catch (const json::exception&) {
            return Bad("endpoint.subject must be a JSON pointer such as \"/data/object/id\", "
                       "not '" + subject + "'");
          }
        }
        ep.tolerance = std::chrono::seconds(tolerance_s);
        if (scheme == "stripe") {
          ep.scheme = http::WebhookScheme::kStripe;
        } else if (scheme == "github") {
          ep.scheme = http::WebhookScheme::kGitHub;
        } else if (scheme != "standard") {
          return Bad("endpoint.scheme must be \"standard\", \"stripe\" or \"github\", not '" +
                     scheme + "'");
        }
        if (ep.name.empty() || ep.path.empty() || ep.path.front() != '/') {
          return Bad("each [[endpoint]] needs a name and a path starting with '/'");
        }
        if (!GoodName(ep.name)) {
          return Bad("endpoint name '" + ep.name +
                     "' must be 1-64 letters, digits, '-', '_' or '.'");
        }
        if (ep.secrets.empty()) return Bad("endpoint '" + ep.name + "' has no secrets");
        // A signed delivery verifies from its timestamp - tolerance to + tolerance: a copy
        // replayed inside that window after its dedupe row is swept would be forwarded
        // again. (GitHub's signature has no timestamp: the TTL alone bounds a replay.)
        if (ep.scheme != http::WebhookScheme::kGitHub && c.dedupe_ttl <= 2 * ep.tolerance) {
          return Bad("endpoint '" + ep.name + "': gateway.dedupe_ttl_hours (" +
                     std::to_string(ttl_h) + " h) must exceed twice tolerance_seconds (" +
                     std::to_string(tolerance_s) +
                     " s), the span in which a captured delivery still verifies");
        }
        // A Standard Webhooks verifier decodes every secret of the list before it compares
        // one: a bad one, kept to the first delivery, would refuse every delivery (401),
        // those signed with a good secret too.
        for (size_t i = 0; i < ep.secrets.size(); ++i) {
          if (ep.scheme != http::WebhookScheme::kStandard) break;
          if (Result<std::string> k = webhook::DecodeSecret(ep.secrets[i]); !k) {
            return Bad("endpoint '" + ep.name + "': secret " + std::to_string(i + 1) + " of " +
                       std::to_string(ep.secrets.size()) + ": " + k.error().message());
          }
        }
        if (ep.targets.empty()) return Bad("endpoint '" + ep.name + "' has no targets");
        for (const std::string& t : ep.targets) {
          bool known = false;
          for (const Target& target : c.targets) known = known || target.name == t;
          if (!known) return Bad("endpoint '" + ep.name + "' names unknown target '" + t + "'");
        }
        c.endpoints.push_back(std::move(ep));
        return OkStatus();
      }));
  if (c.endpoints.empty()) return tl::unexpected(Bad("no [[endpoint]]"));
  return c;
}

class Gateway {
 public:
  explicit Gateway(GatewayConfig config) : cfg_(std::move(config)) {}

  int Run(const std::string& port_file) {
    sigset_t signals = BlockStopSignals();
    auto db = Database::Open(cfg_.store);
    if (!db) {
      std::fprintf(stderr, "converge gateway: %s\n", db.error().ToString().c_str());
      return 1;
    }
    db_ = std::move(*db);
    Status st = db_->Transact([](Tx& tx) {
      return StatusOf(tx.Exec("CREATE TABLE IF NOT EXISTS gateway_targets (name TEXT PRIMARY "
                              "KEY, disabled_at BIGINT, reason TEXT)"));
    });
    Runtime runtime(*db_);
    metrics_.Describe("gateway_delivery_seconds", "histogram",
                      "Time a delivery to a target took, by target and status class.");
    metrics_.Describe("gateway_targets_disabled_total", "counter",
                      "Targets disabled because they answered 410 Gone.");
    for (const Target& t : cfg_.targets) {
      targets_[t.name] = &t;
      // Runners of one kind claim disjoint intents (effects.h), each calling one at a time.
      for (int i = 0; i < t.concurrency; ++i) {
        runners_[t.name].push_back(&runtime.AddEffectRunner(
            t.runner, [this, &t](const std::string& key, const std::string& payload) {
              return Deliver(t, key, payload);
            }));
      }
    }
    DeadLetters dead_letters(*db_, {{std::string(kEffectQueuePrefix), &requeuer_}});
    http::ServerOptions so;
    so.address = cfg_.address;
    so.port = cfg_.port;
    http::Server server(so);
    for (const Endpoint& ep : cfg_.endpoints) {
      http::WebhookIntakeOptions o{.scheme = ep.scheme,
                                   .consumer = "gateway:" + ep.name,
                                   .source = "urn:converge:gateway:" + ep.name,
                                   .secrets = ep.secrets,
                                   .tolerance = ep.tolerance,
                                   .dedupe_ttl = cfg_.dedupe_ttl,
                                   .metrics = &metrics_,
                                   .endpoint = ep.name};
      // Verified, but not forwardable: 400 and nothing stored, where the staging would
      // throw and answer 500 to every retry of the sender.
      o.validate = [](const http::VerifiedWebhook& h) -> std::optional<http::Response> {
        if (http::IsUtf8(h.body) && http::IsUtf8(h.id)) return std::nullopt;
        return http::Problem(400, "Bad Request",
                             "the delivery's body or id is not UTF-8 text; the gateway "
                             "forwards deliveries inside a JSON document",
                             "invalid-webhook");
      };
      server.Route("POST", ep.path,
                   http::WebhookIntakeRoute(*db_, std::move(o),
                                            [this, &ep](Tx& tx, const http::VerifiedWebhook& h) {
                                              return Stage(tx, ep, h);
                                            }));
    }
    http::RegisterHealthRoutes(server, *db_, nullptr);
    if (st.ok()) {
      st = http::RegisterMetricsRoute(server,
                                      {.metrics = &metrics_, .runtime = &runtime, .db = db_.get()});
    }
    if (st.ok()) {
      st = http::RegisterAdminRoutes(
          server, {.token = cfg_.admin_token,
                   .db = db_.get(),
                   .dead_letters = &dead_letters,
                   .on_replay = [this](const DeadLetter& d) { WakeFor(d.queue); }});
    }
    RegisterTargetRoutes(server);
    if (st.ok()) st = runtime.Start();
    if (st.ok()) st = server.Start();
    if (!st.ok()) {
      std::fprintf(stderr, "converge gateway: %s\n", st.ToString().c_str());
      return st.code() == StatusCode::kInvalidArgument ? 2 : 1;
    }
    if (!WritePortFile(port_file, server.port())) {
      std::fprintf(stderr, "converge gateway: cannot write %s\n", port_file.c_str());
      return 1;
    }
    spdlog::info("event=listening mode=gateway address={}:{} endpoints={} targets={} store={}",
                 cfg_.address, server.port(), cfg_.endpoints.size(), cfg_.targets.size(),
                 cfg_.store.substr(0, cfg_.store.find(':')));
    WaitForStopSignal(signals);
    server.Stop();
    runtime.Stop();
    return 0;
  }

 private:
  // In the intake's transaction: one delivery intent per target of the endpoint.
  Status Stage(Tx& tx, const Endpoint& ep, const http::VerifiedWebhook& hook) {
    json payload = {{"endpoint", ep.name}, {"id", hook.id}, {"body", hook.body}};
    std::string subject;  // computed once, for the ordered targets only
    for (const std::string& name : ep.targets) {
      const Target& target = *targets_.at(name);
      // Read-only lookups: handler threads share these maps, filled before Start.
      const std::vector<EffectRunner*>& runners = runners_.at(name);
      // The effect key: the delivery's identity per target (effect keys are one namespace
      // across kinds). The provider's id is at most 255 bytes, so a long one is hashed into
      // the key (the payload keeps it whole).
      std::string key = name + ":" + ep.name + ":" + hook.id;
      if (key.size() > 200) {
        key = name + ":" + ep.name + ":hmac:" + webhook::HmacSha256Hex(ep.name, hook.id);
      }
      if (target.ordered && subject.empty()) subject = SubjectOf(ep, hook.body);
      CONVERGE_RETURN_IF_ERROR(
          runners.front()->Record(tx, key, payload.dump(), target.ordered ? subject : ""));
      // Record wakes the runner it was called on; the others would wait for their poll.
      tx.OnCommit([&runners] {
        for (EffectRunner* r : runners) r->wakeup().Notify();
      });
    }
    return OkStatus();
  }

  // The subject a delivery is ordered by: the endpoint's name and the value at its subject
  // pointer (hashed when long). A body without it, or not JSON, goes in the endpoint's own
  // lane, in order with the other such deliveries.
  static std::string SubjectOf(const Endpoint& ep, const std::string& body) {
    std::string value;
    if (ep.subject) {
      json doc = json::parse(body, nullptr, /*allow_exceptions=*/false);
      try {
        if (!doc.is_discarded() && doc.contains(*ep.subject)) {
          const json& v = doc.at(*ep.subject);
          value = v.is_string() ? v.get<std::string>() : v.dump();
        }
      } catch (const json::exception&) {  // e.g. "/items/x" into an array: no subject
        value.clear();
      }
    }
    if (value.size() > 200) value = "hmac:" + webhook::HmacSha256Hex(ep.name, value);
    return ep.name + ":" + value;
  }

  // One delivery attempt to `t`: signed as Standard Webhooks with the provider's delivery
  // id as webhook-id, so the target can dedupe redeliveries.
  Result<std::string> Deliver(const Target& t, const std::string&, const std::string& payload) {
    if (Disabled(t.name)) {
      return tl::unexpected(FailedPreconditionError(
          "target " + t.name + " is disabled (it answered 410 Gone); enable it with POST "
          "/admin/targets/" + t.name + "/enable, then replay"));
    }
    const json p = json::parse(payload);
    const WebhookOutcome out = PostSignedWebhook(
        client_, {.name = t.name, .url = t.url, .secret = t.secret, .timeout = t.timeout},
        p["id"], p["body"],
        {{"Content-Type", "application/json"}, {"X-Converge-Endpoint", p["endpoint"]}});
    metrics_.Observe("gateway_delivery_seconds",
                     {{"target", t.name},
                      {"status", out.http_status > 0
                                     ? std::string(http::StatusClass(out.http_status))
                                     : "error"}},
                     out.seconds, {0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30});
    if (out.http_status == 410) {
      Disable(t.name);
      return tl::unexpected(
          FailedPreconditionError(t.name + " answered 410 Gone: the target is disabled"));
    }
    if (!out.status.ok()) return tl::unexpected(out.status);
    return std::to_string(out.http_status);
  }

  bool Disabled(const std::string& target) {
    bool disabled = false;
    (void)db_->Read([&](Tx& tx) -> Status {
      CONVERGE_ASSIGN_OR_RETURN(
          Rows rows, tx.Query("SELECT count(*) FROM gateway_targets WHERE name = $1 AND "
                              "disabled_at IS NOT NULL",
                              target));
      disabled = rows[0].Int(0) > 0;
      return OkStatus();
    });
    return disabled;
  }

  void Disable(const std::string& target) {
    metrics_.Add("gateway_targets_disabled_total", {{"target", target}});
    spdlog::warn("event=target_disabled target={} reason=\"410 Gone\"", target);
    (void)db_->Transact([&](Tx& tx) {
      return StatusOf(tx.Exec(
          "INSERT INTO gateway_targets (name, disabled_at, reason) VALUES ($1, $2, '410 Gone') "
          "ON CONFLICT (name) DO UPDATE SET disabled_at = $2, reason = '410 Gone'",
          target, Clock::System()->NowMillis()));
    });
  }

  void WakeFor(const std::string& queue) {
    for (auto& [name, runners] : runners_) {
      for (EffectRunner* runner : runners) {
        if (queue == std::string(kEffectQueuePrefix) + runner->kind()) runner->wakeup().Notify();
      }
    }
  }

  // GET /admin/targets and POST /admin/targets/{name}/enable, behind the admin token.
  void RegisterTargetRoutes(http::Server& server) {
    auto authorized = [this](const http::Request& req) {
      auto token = http::BearerToken(req);
      if (!token || token->size() != cfg_.admin_token.size()) return false;
      unsigned char diff = 0;  // constant time in the token's content
      for (size_t i = 0; i < token->size(); ++i) diff |= (*token)[i] ^ cfg_.admin_token[i];
      return diff == 0;
    };
    server.Route("GET", "/admin/targets", [this, authorized](http::Request& req) {
      if (!authorized(req)) return http::Problem(401, "Unauthorized", "admin token required");
      json out = json::array();
      for (const Target& t : cfg_.targets) {
        out.push_back({{"name", t.name}, {"url", t.url}, {"disabled", Disabled(t.name)}});
      }
      return http::Json(200, json{{"targets", out}}.dump());
    });
    server.Route("POST", "/admin/targets/{name}/enable", [this, authorized](http::Request& req) {
      if (!authorized(req)) return http::Problem(401, "Unauthorized", "admin token required");
      const std::string name = req.params["name"];
      if (runners_.count(name) == 0) return http::Problem(404, "Not Found", "no such target");
      Status st = db_->Transact([&](Tx& tx) {
        return StatusOf(
            tx.Exec("UPDATE gateway_targets SET disabled_at = NULL WHERE name = $1", name));
      });
      if (!st.ok()) return http::StoreProblem(st);
      return http::Json(200, json{{"name", name}, {"disabled", false}}.dump());
    });
  }

  GatewayConfig cfg_;
  std::unique_ptr<Database> db_;
  Metrics metrics_;
  http::Client client_;
  EffectRequeuer requeuer_;
  std::map<std::string, std::vector<EffectRunner*>> runners_;
  std::map<std::string, const Target*> targets_;
};

int RunGateway(const ModeFlags& f) {
  auto cfg = LoadGatewayConfig(f.config);
  if (!ApplyModeFlags("gateway", cfg ? OkStatus() : cfg.error(), f, cfg ? &cfg->address : nullptr,
                      cfg ? &cfg->port : nullptr, cfg ? &cfg->log_level : nullptr)) {
    return 2;
  }
  return Gateway(std::move(*cfg)).Run(f.port_file);
}

}  // namespace

void AddGatewayCommand(CLI::App& app, int* exit_code) {
  auto f = std::make_shared<ModeFlags>();
  CLI::App* c = app.add_subcommand(
      "gateway", "Webhooks in (Standard Webhooks, Stripe, GitHub), delivered at least once "
                 "to internal targets (docs/design/gateway.md)");
  AddModeFlags(c, f.get(), "TOML file: endpoints, targets, store");
  c->callback([f, exit_code] { *exit_code = RunGateway(*f); });
}

}  // namespace converge::cli
