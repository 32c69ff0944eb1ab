// The orders-lite example service (examples/orders-lite) as a process for
// bench/http_bench.sh: its POST /v1/orders is a single-phase idempotent create (key row,
// order row and outbox event in one transaction, no provider call), with the relay and
// the stock consumer running behind it as in any deployment, or (--route-only) without
// them. Writes the port it listens on to --port-file and serves until SIGINT or SIGTERM.
//
//   converge_orders_server --db URI --port-file FILE [--workers N] [--io-threads N] [--route-only]
//                          [--snapshot-first always|adaptive] [--create async|sync]
#include <csignal>
#include <cstdio>
#include <fstream>

#include <CLI/CLI.hpp>

#include "converge/database.h"
#include "examples/orders-lite/orders.h"

int main(int argc, char** argv) {
  // Before any thread uses SQLite (database.h).
  (void)converge::DisableSqliteMemoryAccounting();
  CLI::App app{"orders-lite as a benchmark target"};
  orders_lite::Options options;
  std::string port_file;
  app.add_option("--db", options.db, "Store URI")->required();
  app.add_option("--port-file", port_file, "Where to write the port")->required();
  app.add_option("--workers", options.worker_threads, "Handler threads (16)")
      ->check(CLI::Range(1, 1024));
  app.add_option("--io-threads", options.io_threads, "I/O threads (1)")
      ->check(CLI::Range(1, 256));
  bool route_only = false;
  app.add_flag("--route-only", route_only,
               "Run neither the relay nor the stock consumer: the create route alone");
  std::string snapshot_first = "adaptive";
  app.add_option("--snapshot-first", snapshot_first,
                 "Read a key before preparing its create: always, or adaptive (the default: "
                 "only while replays come; IdempotencyOptions::snapshot_first)")
      ->check(CLI::IsMember({"always", "adaptive"}));
  std::string create = "async";
  app.add_option("--create", create,
                 "How POST /v1/orders waits for its commit: async (the default: answered "
                 "from the commit, Options::async_create) or sync (a worker waits)")
      ->check(CLI::IsMember({"async", "sync"}));
  CLI11_PARSE(app, argc, argv);
  options.async_create = create == "async";
  options.keys.snapshot_first = snapshot_first == "always"
                                    ? converge::IdempotencyOptions::SnapshotFirst::kAlways
                                    : converge::IdempotencyOptions::SnapshotFirst::kAdaptive;
  options.relay_and_consumer = !route_only;
  options.api_keys = {{"sk_bench", "bench"}};

  // Block the stop signals before any thread starts, so sigwait below receives them.
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGINT);
  sigaddset(&stop, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop, nullptr);

  orders_lite::OrdersService service(options);
  if (converge::Status st = service.Start(); !st.ok()) {
    std::fprintf(stderr, "converge_orders_server: %s\n", st.ToString().c_str());
    return 1;
  }
  {
    std::ofstream out(port_file);
    out << service.port() << "\n";
    if (!out) {
      std::fprintf(stderr, "converge_orders_server: cannot write %s\n", port_file.c_str());
      return 1;
    }
  }
  int sig = 0;
  sigwait(&stop, &sig);
  service.Stop();
  return 0;
}
