// converge relay / converge worker: the processes of the distributed deployment
// (PostgreSQL + NATS JetStream + many converge processes; docs/design/nats.md).
//
//   converge relay --db URI --broker nats://...            outbox -> broker, nothing else
//   converge relay --db URI --broker https://host/path     outbox -> an HTTP endpoint, each
//                  [--secret-file F]                       event one signed POST
//                                                          (webhook_publisher.h)
//   converge relay --config FILE [--outbox-table NAME]     an application's own outbox
//                                                          table (table_relay.cc)
//   converge worker --db URI --broker nats://... --consumer ledger   consumers, nothing else
//
// Both stop cleanly on SIGTERM/SIGINT: the pass or batch under way finishes, what
// committed is acked (the connection is flushed), and the process exits 0.
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "apps/converge/commands.h"
#include "apps/converge/process.h"
#include "converge/config_reader.h"
#include "converge/database.h"
#include "converge/outbox.h"
#include "converge/relay.h"
#include "converge/webhook.h"
#include "converge/webhook_publisher.h"
#if CONVERGE_WITH_NATS
#include "converge/nats.h"
#endif
#include "payments/config.h"
#include "payments/service.h"

namespace converge::cli {
namespace {

struct BrokerFlags {
  std::string db, broker, name, config, log_level = "info";
  std::string secret_file;   // relay to an HTTP endpoint
  int64_t timeout_ms = 10000;
  std::vector<std::string> consumers;
  ModeFlags table;  // relay --config: the outbox-table relay
  std::string outbox_table;
};

bool IsHttpUrl(const std::string& url) {
  return url.rfind("http://", 0) == 0 || url.rfind("https://", 0) == 0;
}

// scheme://host[:port] of `url`, without its path, query or user information: what the log
// may show of an endpoint whose URL could carry credentials.
std::string Origin(const std::string& url) {
  const size_t start = url.find("://") + 3;
  std::string authority = url.substr(start, url.find_first_of("/?#", start) - start);
  const size_t at = authority.rfind('@');
  if (at != std::string::npos) authority.erase(0, at + 1);
  return url.substr(0, start) + authority;
}

// The outbox to an HTTP endpoint: each event one POST, signed with the secret from
// --secret-file or CONVERGE_WEBHOOK_SECRET (docs/design/webhooks.md, "Outbound").
int RunWebhookRelay(const BrokerFlags& f) {
  if (Origin(f.broker).size() <= f.broker.find("://") + 3) {
    std::fprintf(stderr, "converge relay: --broker '%s' names no host\n", f.broker.c_str());
    return 2;
  }
  std::string secret;
  if (!f.secret_file.empty()) {
    const Status st = internal::SecretFromFile("--secret-file", f.secret_file, &secret);
    if (!st.ok()) {
      std::fprintf(stderr, "converge relay: %s\n", st.message().c_str());
      return 2;
    }
  } else if (const char* env = std::getenv("CONVERGE_WEBHOOK_SECRET"); env && *env) {
    secret = env;
  } else {
    std::fprintf(stderr, "converge relay: an HTTP --broker needs the secret that signs each "
                         "delivery: --secret-file FILE or CONVERGE_WEBHOOK_SECRET\n");
    return 2;
  }
  if (secret.rfind("whsec_", 0) != 0 || !webhook::DecodeSecret(secret)) {
    std::fprintf(stderr, "converge relay: the signing secret must be whsec_<base64> (as "
                         "`converge webhook sign` takes it)\n");
    return 2;
  }
  sigset_t signals = BlockStopSignals();
  auto db = Database::Open(f.db);
  if (!db) {
    std::fprintf(stderr, "converge relay: %s\n", db.error().ToString().c_str());
    return 1;
  }
  const Millis timeout(f.timeout_ms);
  RelayOptions ro{.name = f.name};
  // A pass sends one POST after another and stops at half the lease (WebhookPublisher).
  ro.lease = std::max(ro.lease, 3 * timeout);
  ro.acquire_interval = ro.lease / 3;
  WebhookPublisher publisher({.name = Origin(f.broker), .url = f.broker, .secret = secret,
                              .timeout = timeout},
                             ro.lease);
  Outbox outbox;
  Relay relay(**db, outbox, publisher, ro);
  relay.Start();
  spdlog::info("event=relay_started name={} target={}", f.name, Origin(f.broker));
  WaitForStopSignal(signals);
  relay.Stop();  // the pass under way finishes its POSTs and marks
  const RelayStats rs = relay.stats();
  spdlog::info("event=relay_stopped published={} failures={} refused={}", rs.published,
               rs.publish_failures, rs.refused);
  return 0;
}

int RunRelay(const BrokerFlags& f) {
  if (!f.table.config.empty()) return RunTableRelay(f.table, f.outbox_table, f.name);
  if (f.db.empty() || f.broker.empty() || !f.outbox_table.empty()) {
    std::fprintf(stderr, "converge relay: give --db and --broker (the library's outbox), or "
                         "--config (an application's outbox table)\n");
    return 2;
  }
  SetUpLogging(f.log_level);
  if (IsHttpUrl(f.broker)) return RunWebhookRelay(f);
  if (!f.secret_file.empty()) {
    std::fprintf(stderr, "converge relay: --secret-file goes with an http(s) --broker\n");
    return 2;
  }
#if CONVERGE_WITH_NATS
  auto options = ParseNatsUri(f.broker);
  if (!options) {
    std::fprintf(stderr, "converge relay: --broker: %s\n", options.error().ToString().c_str());
    return 2;
  }
  sigset_t signals = BlockStopSignals();
  auto db = Database::Open(f.db);
  if (!db) {
    std::fprintf(stderr, "converge relay: %s\n", db.error().ToString().c_str());
    return 1;
  }
  auto broker = NatsBroker::Connect(std::move(*options));
  if (!broker) {
    std::fprintf(stderr, "converge relay: %s\n", broker.error().ToString().c_str());
    return 1;
  }
  Outbox outbox;
  RelayOptions ro{.name = f.name};
  ro.acquire_interval = ro.lease / 3;  // one committed transaction less per pass
  Relay relay(**db, outbox, **broker, ro);
  relay.Start();
  spdlog::info("event=relay_started name={} stream={}", f.name, (*broker)->options().stream);
  WaitForStopSignal(signals);
  relay.Stop();  // the pass under way publishes, waits for its acks and marks
  const RelayStats rs = relay.stats();
  const NatsStats ns = (*broker)->stats();
  spdlog::info("event=relay_stopped published={} failures={} duplicates={}", rs.published,
               rs.publish_failures, ns.duplicates);
  return 0;
#else
  (void)f;
  std::fprintf(stderr, "converge relay: this build has no NATS transport (CONVERGE_WITH_NATS)\n");
  return 2;
#endif
}

int RunWorker(const BrokerFlags& f) {
  auto cfg = payments::LoadServiceConfig(f.config);
  if (!cfg) {
    std::fprintf(stderr, "converge worker: %s\n", cfg.error().message().c_str());
    return 2;
  }
  cfg->db = f.db;
  cfg->broker = f.broker;
  cfg->role = "worker";
  cfg->consumers = f.consumers;
  SetUpLogging(f.log_level);
  sigset_t signals = BlockStopSignals();
  payments::Service service(*cfg);
  Status st = service.Start();
  if (!st.ok()) {
    std::fprintf(stderr, "converge worker: %s\n", st.ToString().c_str());
    return 1;
  }
  WaitForStopSignal(signals);
  service.Stop();  // each consumer finishes its batch and acks what committed
  return 0;
}

}  // namespace

void AddBrokerCommands(CLI::App& app, int* exit_code) {
  auto rf = std::make_shared<BrokerFlags>();
  CLI::App* relay = app.add_subcommand(
      "relay", "Publish the outbox to a broker, alone (several may share one outbox)");
  relay->add_option("--db", rf->db, "Store URI (or CONVERGE_DB)")->envname("CONVERGE_DB");
  relay->add_option("--broker", rf->broker,
                    "nats://host:port[,host:port...][?replicas=3...], or an http(s):// URL: "
                    "each event one POST there, signed as Standard Webhooks");
  relay->add_option("--secret-file", rf->secret_file,
                    "With an http(s) --broker: a file holding the whsec_ secret that signs "
                    "the POSTs (else CONVERGE_WEBHOOK_SECRET)");
  relay->add_option("--timeout-ms", rf->timeout_ms, "With an http(s) --broker: each POST's timeout")
      ->check(CLI::Range(1, 600000));
  relay->add_option("--name", rf->name, "Relay name, unique among live relays (default: random)");
  CLI::Option* level =
      relay->add_option("--log-level", rf->log_level, "trace, debug, info, warn, error");
  // The outbox-table relay (docs/design/outbox-table-relay.md): --config instead of
  // --db/--broker; --log-level then overrides the file's.
  relay->add_option("--config", rf->table.config,
                    "TOML file: [relay], [outbox_table], [target] (an application's table)")
      ->check(CLI::ExistingFile);
  relay->add_option("--outbox-table", rf->outbox_table, "The table to publish (with --config)");
  relay->add_option("--listen", rf->table.listen, "host:port for /metrics (with --config)");
  relay->add_option("--port-file", rf->table.port_file, "Write the bound port here (--config)");
  relay->callback([rf, exit_code, level] {
    if (level->count() > 0) rf->table.log_level = rf->log_level;
    *exit_code = RunRelay(*rf);
  });

  auto wf = std::make_shared<BrokerFlags>();
  CLI::App* worker = app.add_subcommand(
      "worker", "Run the payments service's consumers alone, reading from a broker");
  worker->add_option("--db", wf->db, "Store URI (or CONVERGE_DB)")
      ->required()
      ->envname("CONVERGE_DB");
  worker->add_option("--broker", wf->broker, "nats://host:port[,...]; empty: the store's queue");
  worker
      ->add_option("--consumer", wf->consumers, "ledger, email, psp-webhooks (repeat; default all)")
      ->check(CLI::IsMember({"ledger", "email", "psp-webhooks"}));
  worker->add_option("--config", wf->config, "TOML configuration file (consumer settings)")
      ->check(CLI::ExistingFile);
  worker->add_option("--log-level", wf->log_level, "trace, debug, info, warn, error");
  worker->callback([wf, exit_code] { *exit_code = RunWorker(*wf); });
}

}  // namespace converge::cli
