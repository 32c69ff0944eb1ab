// converge chaos: the seeded, randomized fault campaign with its history checker
// (harness/chaos.h; docs/design/chaos.md, "The campaign"). Exit 0 only with no violation.
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>

#include <CLI/CLI.hpp>

#include "apps/converge/commands.h"
#include "apps/converge/progress.h"
#include "harness/chaos.h"

namespace converge::cli {
namespace {

// "90", "90s", "15m", "1h" -> seconds; -1 when malformed.
int64_t ParseDuration(const std::string& s) {
  if (s.empty()) return -1;
  size_t used = 0;
  int64_t n = 0;
  try {
    n = std::stoll(s, &used);
  } catch (...) {
    return -1;
  }
  const std::string unit = s.substr(used);
  const int64_t mult = unit.empty() || unit == "s" ? 1 : unit == "m" ? 60 : unit == "h" ? 3600 : 0;
  return mult == 0 || n <= 0 ? -1 : n * mult;
}

int RunChaos(harness::ChaosOptions o, const std::string& duration) {
  if (!duration.empty()) {
    const int64_t secs = ParseDuration(duration);
    if (secs < 0) {
      std::fprintf(stderr, "converge chaos: --duration '%s' is not like 90s, 15m or 1h\n",
                   duration.c_str());
      return 2;
    }
    o.duration = std::chrono::seconds(secs);
  }
  o.binary = "/proc/self/exe";
  std::printf("converge chaos: store %s, broker %s, %s, seed %llu, %d clients\n",
              o.store.substr(0, o.store.find(':')).c_str(),  // never a URI's password
              o.broker.empty() ? (o.publish_in_transaction
                                      ? "the store's queue, published in the transaction"
                                      : "the store's queue")
              : o.nats_nodes > 1 ? ("nats, a cluster of " + std::to_string(o.nats_nodes) +
                                    " nodes").c_str()
                                 : o.broker.c_str(),
              o.duration.count() > 0 ? (std::to_string(o.duration.count()) + " s").c_str()
                                     : (std::to_string(o.kills) + " kills").c_str(),
              static_cast<unsigned long long>(o.seed), o.clients);
  Progress bar("kills", o.duration.count() > 0 ? 0 : o.kills);
  o.on_progress = [&](int64_t kills, const std::string& status) { bar.Show(kills, status); };
  auto r = harness::RunChaos(o);
  bar.Done();
  if (!r) {
    std::fprintf(stderr, "converge chaos: %s\n", r.error().ToString().c_str());
    return 1;
  }
  const harness::ChaosCounts& n = r->counts;
  auto row = [](const char* what, int64_t v) {
    std::printf("  %-52s %10lld\n", what, static_cast<long long>(v));
  };
  std::printf("\n");
  row("kills (SIGKILL, then restart)", n.kills);
  row("  of them at an armed failpoint", n.kills_at_failpoint);
  row("  failpoint not reached in 3 s, killed anyway", n.failpoints_not_reached);
  if (!o.broker.empty()) {
    row("  of the service", n.kills - n.relay_kills - n.worker_kills - n.nats_kills);
    row("  of the relay", n.relay_kills);
    row("  of a worker", n.worker_kills);
    row(o.nats_nodes > 1 ? "  of a nats-server node" : "  of nats-server", n.nats_kills);
    row("workers stopped (SIGSTOP) past AckWait", n.worker_stalls);
  }
  row("stalls past the lease", n.stalls);
  row("stalls past the key TTL", n.ttl_stalls);
  row("clock jumps", n.clock_jumps);
  row("provider faults (5xx, timeout, slow, decline, 409)", n.psp_faults);
  row("mail outages", n.mail_outages);
  row("refunds at the provider (racing the capture)", n.refunds);
  row("duplicate webhooks", n.duplicate_webhooks);
  row("poison webhooks", n.poison_webhooks);
  row("database restarts", n.db_restarts);
  row("carrier faults (shipping down or refusing)", n.shipping_faults);
  row("refunds the provider refuses (once each)", n.refused_refunds);
  row("requests", n.requests);
  row("idempotency keys", n.keys);
  row("  sent again later (same body)", n.duplicates);
  row("  sent concurrently (2-4 at once)", n.concurrent);
  row("  reused with another body", n.mismatches);
  row("  given up after one short try", n.give_ups);
  row("  of them checkout orders", n.order_keys);
  row("retries not sent (key past its resend window)", n.resend_cutoffs);
  row("keys sent again in the final pass", n.final_pass_keys);
  row("answers replayed (Idempotent-Replayed)", n.replays);
  for (const auto& [status, count] : n.by_status) {
    const std::string what = status == 0 ? std::string("no answer (killed, timed out)")
                                          : "answered " + std::to_string(status);
    row(what.c_str(), count);
  }
  row("requests resumed by a retry (takeovers; at least)", n.takeovers);
  row("requests finished by the completer (at least)", n.completer_finishes);
  row("payments", n.payments);
  row("provider charges (refunded ones included)", n.charges);
  row("  refunded", n.refunded);
  row("orders", n.orders);
  for (const auto& [state, count] : n.orders_by_state) {
    row(("  " + state).c_str(), count);
  }
  row("order money captured", n.order_captured);
  row("  for shipped orders", n.order_shipped);
  row("  refunded", n.order_refunded);
  if (!o.broker.empty()) {
    row("redeliveries by the broker (at least)", n.redeliveries);
    row("publishes the broker dropped as duplicates (at least)", n.broker_duplicates);
    row("ledger bookings out of event order (not checked)", n.out_of_order);
  }
  std::printf("  %-52s %10.0f\n", "seconds", n.seconds);
  if (!o.broker.empty()) {
    std::printf("\nnot checked: per-aggregate event order (NATS gives none: "
                "docs/design/nats.md)\n");
  }
  if (!r->violations.empty()) {
    std::printf("\n%s", harness::FormatViolations(o, *r).c_str());
    if (r->kept) std::printf("\nkept: %s\n", r->dir.c_str());
    std::printf("\nverdict: VIOLATED\n");
    return 1;
  }
  if (r->kept) std::printf("\nkept: %s\n", r->dir.c_str());
  std::printf("\nverdict: 0 violations\n");
  return 0;
}

}  // namespace

void AddChaosCommand(CLI::App& app, int* exit_code) {
  auto o = std::make_shared<harness::ChaosOptions>();
  auto duration = std::make_shared<std::string>();
  o->seed = std::random_device{}() % 1000000;
  CLI::App* cmd = app.add_subcommand(
      "chaos", "A seeded, randomized fault campaign against the payments service shape "
               "(kills, stalls past the lease, provider faults, duplicate and out-of-order "
               "requests and webhooks), then a history checker; exit 0 only with no violation");
  cmd->add_option("--store", o->store,
                  "sqlite (a fresh file) or the postgresql:// URI of a running server (the "
                  "campaign creates and drops a database of its own there)");
  cmd->add_option("--kills", o->kills, "Stop after this many SIGKILLs")
      ->check(CLI::Range(1, 1'000'000));
  cmd->add_option("--duration", *duration, "Or run this long instead: 90s, 15m, 1h");
  cmd->add_option("--seed", o->seed, "The schedule's seed (default: random, printed)");
  cmd->add_option("--clients", o->clients, "Concurrent clients")->check(CLI::Range(1, 256));
  cmd->add_option("--instances", o->instances,
                  "Service processes on the store (default: 1 on SQLite, 2 on PostgreSQL)")
      ->check(CLI::Range(1, 8));
  cmd->add_option("--broker", o->broker,
                  "nats: events through a nats-server the campaign starts (on PATH), with a "
                  "relay and workers of their own; default: the store's queue")
      ->check(CLI::IsMember({"nats"}));
  cmd->add_option("--nats-nodes", o->nats_nodes,
                  "With --broker nats: 1 nats-server (default), or a cluster of 3 or 5 "
                  "nodes with the stream replicated on each; its kills then kill one node")
      ->check(CLI::IsMember({1, 3, 5}));
  cmd->add_flag("--publish-in-transaction", o->publish_in_transaction,
                "Without --broker: the service puts events on the store's queue in the "
                "transactions that write them (store.publish_in_transaction)");
  cmd->add_flag("--keep", o->keep,
                "Keep the run's directory (stores, logs) and database (kept anyway on a "
                "violation)");
  cmd->add_option("--pg-bin", o->pg_bin,
                  "PostgreSQL's bin directory, for database restarts mid-load (with --pg-data)")
      ->envname("CONVERGE_TEST_PG_BIN");
  cmd->add_option("--pg-data", o->pg_data, "The server's data directory (pg_ctl -D)")
      ->envname("CONVERGE_TEST_PG_DATA");
  cmd->add_option("--pg-run-as", o->pg_run_as, "Command prefix to run pg_ctl as another user")
      ->envname("CONVERGE_TEST_PG_RUN_AS");
  cmd->callback([o, duration, exit_code] { *exit_code = RunChaos(*o, *duration); });
}

}  // namespace converge::cli
