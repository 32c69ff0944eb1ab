// Subcommands of the converge CLI. Each returns the process exit code.
#ifndef CONVERGE_APPS_CONVERGE_COMMANDS_H_
#define CONVERGE_APPS_CONVERGE_COMMANDS_H_

#include <signal.h>

#include <cstdint>
#include <string>

namespace CLI {
class App;
}

namespace converge::cli {

struct DemoFlags {
  std::string db;            // empty: a fresh file in a new temporary directory
  int producers = 16;        // concurrent client threads
  int payments = 2000;       // unique idempotency keys
  double duplicate_rate = 0.3;  // share of keys sent more than once
  double ack_loss_rate = 0.05;  // share of consumer acks the demo drops (redeliveries)
  double transient_rate = 0.05;  // share of consumer attempts failing transiently
  bool keep = false;         // keep the database file afterwards
  uint64_t seed = 0;         // 0: random
};
int RunDemo(const DemoFlags& flags);

struct ServiceDemoFlags {
  int clients = 16;
  int payments = 1000;
  int duration_seconds = 0;  // > 0: run the load phase this long instead of `payments`
  double duplicate_rate = 0.3;
  double psp_failure_rate = 0.05;
  double mail_failure_rate = 0.05;
  bool keep = false;
};
int RunServiceDemo(const ServiceDemoFlags& flags);

// Adds `dlq list|show|replay|discard` to `app`; the chosen one runs at parse time's end
// through the callback and stores its exit code in *exit_code.
void AddDlqCommands(CLI::App& app, int* exit_code);
// chaos: the seeded fault campaign and its history checker.
void AddChaosCommand(CLI::App& app, int* exit_code);
// serve, fake-psp, fake-mail, webhook sign|verify.
void AddServiceCommands(CLI::App& app, int* exit_code);
// proxy: the Idempotency-Key reverse proxy.
void AddProxyCommand(CLI::App& app, int* exit_code);
// gateway: webhooks in, delivered at least once to internal targets.
void AddGatewayCommand(CLI::App& app, int* exit_code);
// relay and worker: the distributed deployment's separate processes (--broker nats://).
void AddBrokerCommands(CLI::App& app, int* exit_code);
struct ModeFlags;  // process.h
// relay --config: publishes an application's own outbox table (table_relay.cc);
// `outbox_table` and `name`, when not empty, override the file's table and relay name.
int RunTableRelay(const ModeFlags& flags, const std::string& outbox_table,
                  const std::string& name);

}  // namespace converge::cli

#endif  // CONVERGE_APPS_CONVERGE_COMMANDS_H_
