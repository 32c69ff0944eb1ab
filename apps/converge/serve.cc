// converge serve | fake-psp | fake-mail | webhook sign|verify
#include <signal.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <spdlog/spdlog.h>

#include "apps/converge/commands.h"
#include "apps/converge/process.h"
#include "converge/clock.h"
#include "converge/webhook.h"
#include "payments/config.h"
#include "harness/providers.h"
#include "payments/service.h"

namespace converge::cli {
namespace {

struct ServeFlags {
  std::string config, listen, db, port_file, log_level, broker;
};

int Serve(const ServeFlags& f) {
  auto cfg = payments::LoadServiceConfig(f.config);
  if (!cfg) {
    std::fprintf(stderr, "converge serve: %s\n", cfg.error().message().c_str());
    return 2;
  }
  if (!f.listen.empty()) {
    Status st = payments::ParseListen(f.listen, &cfg->address, &cfg->port);
    if (!st.ok()) {
      std::fprintf(stderr, "converge serve: %s\n", st.message().c_str());
      return 2;
    }
  }
  if (!f.db.empty()) cfg->db = f.db;
  if (!f.broker.empty()) cfg->broker = f.broker;
  if (!f.log_level.empty()) cfg->log_level = f.log_level;
  SetUpLogging(cfg->log_level);
  sigset_t signals = BlockStopSignals();
  payments::Service service(*cfg);
  Status st = service.Start();
  if (!st.ok()) {
    std::fprintf(stderr, "converge serve: %s\n", st.ToString().c_str());
    return 1;
  }
  if (!WritePortFile(f.port_file, service.port())) {
    std::fprintf(stderr, "converge serve: cannot write %s\n", f.port_file.c_str());
    return 1;
  }
  WaitForStopSignal(signals);
  service.Stop();
  return 0;
}

struct ProviderFlags {
  std::string db, listen = "127.0.0.1:0", port_file, webhook_url, webhook_secret;
  std::string webhook_secret_file;
};

template <class Provider>
int RunProvider(const char* name, const ProviderFlags& f) {
  converge::harness::ProviderOptions o;
  o.db_path = f.db;
  o.webhook_url = f.webhook_url;
  o.webhook_secret = f.webhook_secret;
  if (!f.webhook_secret_file.empty()) {
    auto secrets = ReadSecretFile(f.webhook_secret_file);
    if (!secrets) {
      std::fprintf(stderr, "converge %s: %s\n", name, secrets.error().message().c_str());
      return 2;
    }
    o.webhook_secret = secrets->front();
  }
  Status st = payments::ParseListen(f.listen, &o.address, &o.port);
  if (!st.ok()) {
    std::fprintf(stderr, "converge %s: %s\n", name, st.message().c_str());
    return 2;
  }
  sigset_t signals = BlockStopSignals();
  Provider p(o);
  st = p.Start();
  if (!st.ok()) {
    std::fprintf(stderr, "converge %s: %s\n", name, st.ToString().c_str());
    return 1;
  }
  spdlog::set_pattern("ts=%Y-%m-%dT%H:%M:%S.%eZ level=%l %v", spdlog::pattern_time_type::utc);
  spdlog::info("event=listening component={} address={}:{}", name, o.address, p.port());
  if (!WritePortFile(f.port_file, p.port())) return 1;
  WaitForStopSignal(signals);
  p.Stop();
  return 0;
}

struct WebhookFlags {
  std::vector<std::string> secrets;
  std::string secret_file, id, signature, body;
  int64_t timestamp = 0;
  bool body_set = false;
};

// --secret, else --secret-file, else CONVERGE_WEBHOOK_SECRET. False (after saying why)
// when there is none.
bool ResolveSecrets(WebhookFlags& f, const char* command) {
  if (!f.secrets.empty()) return true;
  if (!f.secret_file.empty()) {
    auto secrets = ReadSecretFile(f.secret_file);
    if (!secrets) {
      std::fprintf(stderr, "converge webhook %s: %s\n", command, secrets.error().message().c_str());
      return false;
    }
    f.secrets = *secrets;
    return true;
  }
  const char* env = std::getenv("CONVERGE_WEBHOOK_SECRET");
  if (env != nullptr && *env != '\0') {
    f.secrets = {env};
    return true;
  }
  std::fprintf(stderr,
               "converge webhook %s: a secret is needed: --secret-file FILE, the environment "
               "variable CONVERGE_WEBHOOK_SECRET, or --secret (visible in the process list)\n",
               command);
  return false;
}

std::string ReadBody(const WebhookFlags& f) {
  if (f.body_set) return f.body;
  return std::string(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
}

}  // namespace

void AddServiceCommands(CLI::App& app, int* exit_code) {
  auto sf = std::make_shared<ServeFlags>();
  CLI::App* serve = app.add_subcommand("serve", "Run the payments reference service");
  serve->add_option("--config", sf->config, "TOML configuration file")->check(CLI::ExistingFile);
  serve->add_option("--listen", sf->listen, "host:port to listen on (overrides the config)");
  serve->add_option("--db", sf->db, "Store URI (overrides the config), e.g. sqlite:app.db");
  serve->add_option("--port-file", sf->port_file, "Write the bound port to this file");
  serve->add_option("--log-level", sf->log_level, "trace, debug, info, warn, error");
  serve->add_option("--broker", sf->broker,
                    "nats://host:port[,...]: NATS JetStream instead of the store's queue");
  serve->callback([sf, exit_code] { *exit_code = Serve(*sf); });

  for (const char* name : {"fake-psp", "fake-mail"}) {
    auto pf = std::make_shared<ProviderFlags>();
    bool psp = std::string(name) == "fake-psp";
    CLI::App* c = app.add_subcommand(
        name, psp ? "Run the stand-in payment provider (own store, own port)"
                  : "Run the stand-in mail provider (own store, own port)");
    c->add_option("--db", pf->db, "Its SQLite file")->required();
    c->add_option("--listen", pf->listen, "host:port (port 0: any)");
    c->add_option("--port-file", pf->port_file, "Write the bound port to this file");
    if (psp) {
      c->add_option("--webhook-url", pf->webhook_url, "Where to send signed webhooks");
      c->add_option("--webhook-secret-file", pf->webhook_secret_file,
                    "File holding the whsec_... secret to sign them with")
          ->check(CLI::ExistingFile);
      c->add_option("--webhook-secret", pf->webhook_secret,
                    "The whsec_... secret itself (visible in the process list: prefer "
                    "--webhook-secret-file or the environment)")
          ->envname("CONVERGE_WEBHOOK_SECRET");
      c->callback([pf, exit_code] {
        *exit_code = RunProvider<converge::harness::FakePsp>("fake-psp", *pf);
      });
    } else {
      c->callback([pf, exit_code] {
        *exit_code = RunProvider<converge::harness::FakeMail>("fake-mail", *pf);
      });
    }
  }

  auto wf = std::make_shared<WebhookFlags>();
  CLI::App* wh = app.add_subcommand("webhook", "Sign or verify Standard Webhooks messages");
  wh->require_subcommand(1);
  CLI::App* sign =
      wh->add_subcommand("sign", "Print the webhook-* headers for a body (stdin or --body)");
  const char* secret_help =
      "whsec_... secret (visible in the process list: prefer --secret-file or "
      "CONVERGE_WEBHOOK_SECRET)";
  const char* secret_file_help = "File with the whsec_... secret(s), one per line";
  sign->add_option("--secret", wf->secrets, secret_help)->expected(1);
  sign->add_option("--secret-file", wf->secret_file, secret_file_help)->check(CLI::ExistingFile);
  sign->add_option("--id", wf->id, "webhook-id")->required();
  sign->add_option("--timestamp", wf->timestamp, "Seconds since the epoch (default: now)");
  sign->add_option("--body", wf->body, "The body (default: read stdin)")
      ->each([wf](const std::string&) { wf->body_set = true; });
  sign->callback([wf, exit_code] {
    if (!ResolveSecrets(*wf, "sign")) {
      *exit_code = 2;
      return;
    }
    int64_t ts = wf->timestamp ? wf->timestamp : Clock::System()->NowMillis() / 1000;
    auto sig = webhook::Sign(wf->secrets[0], wf->id, ts, ReadBody(*wf));
    if (!sig) {
      std::fprintf(stderr, "converge webhook sign: %s\n", sig.error().message().c_str());
      *exit_code = 2;
      return;
    }
    std::printf("webhook-id: %s\nwebhook-timestamp: %lld\nwebhook-signature: %s\n", wf->id.c_str(),
                static_cast<long long>(ts), sig->c_str());
  });
  CLI::App* verify =
      wh->add_subcommand("verify", "Verify a webhook; exit 0 when valid, 1 when not");
  verify->add_option("--secret", wf->secrets, "whsec_... secret, repeated for rotation (visible "
                     "in the process list: prefer --secret-file or CONVERGE_WEBHOOK_SECRET)");
  verify->add_option("--secret-file", wf->secret_file, secret_file_help)->check(CLI::ExistingFile);
  verify->add_option("--id", wf->id, "webhook-id")->required();
  verify->add_option("--timestamp", wf->timestamp, "webhook-timestamp")->required();
  verify->add_option("--signature", wf->signature, "webhook-signature")->required();
  verify->add_option("--body", wf->body, "The body (default: read stdin)")
      ->each([wf](const std::string&) { wf->body_set = true; });
  verify->callback([wf, exit_code] {
    if (!ResolveSecrets(*wf, "verify")) {
      *exit_code = 2;
      return;
    }
    Status st = webhook::Verify(wf->secrets, wf->id, std::to_string(wf->timestamp), wf->signature,
                                ReadBody(*wf), Clock::System()->NowMillis() / 1000);
    if (st.code() == StatusCode::kInvalidArgument) {
      std::fprintf(stderr, "converge webhook verify: %s\n", st.message().c_str());
      *exit_code = 2;
      return;
    }
    std::printf("%s\n", st.ok() ? "valid" : ("invalid: " + st.reason()).c_str());
    *exit_code = st.ok() ? 0 : 1;
  });
}

}  // namespace converge::cli
