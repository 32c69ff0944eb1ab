// converge: the command-line tool and (later) daemon.
//
//   converge demo                         the service demo: scenarios, load, convergence table
//   converge library-demo                 the same ideas in-process, without HTTP
//   converge chaos                        seeded fault campaign + history checker
//   converge dlq list|show|replay|discard inspect and act on dead letters
//   converge migrate --db URI             create or upgrade a store's schema
//   converge sweep --db URI               delete what retention no longer needs
//   converge serve --config FILE          the payments reference service
//   converge relay --db URI --broker nats://...      the outbox relay alone
//   converge relay --config FILE          an application's own outbox table, published
//   converge proxy --config FILE          Idempotency-Key in front of any HTTP API
//   converge gateway --config FILE        webhooks in, delivered at least once
//   converge worker --db URI --broker nats://... --consumer NAME   consumers alone
//   converge fake-psp | fake-mail         stand-in providers (own store, own port)
//   converge webhook sign|verify          Standard Webhooks on the command line
#include <cstdio>
#include <string>

#include <CLI/CLI.hpp>

#include "apps/converge/commands.h"
#include "converge/database.h"
#include "converge/failpoint.h"
#include "converge/sweeper.h"

int main(int argc, char** argv) {
  // Before any thread uses SQLite (database.h).
  (void)converge::DisableSqliteMemoryAccounting();
  CLI::App app{"converge: effective-once processing on at-least-once delivery"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "converge 0.1.0");
  int exit_code = 0;

  converge::cli::DemoFlags demo;
  CLI::App* demo_cmd = app.add_subcommand(
      "library-demo", "The library without HTTP: producers, relay and consumer on a fresh "
                      "SQLite file with duplicates, lost acks and a poison message");
  demo_cmd->add_option("--db", demo.db,
                       "SQLite file to create (must not exist); default: a temp file");
  demo_cmd->add_option("--producers", demo.producers, "Concurrent producer threads")
      ->check(CLI::Range(1, 1024));
  demo_cmd->add_option("--payments", demo.payments, "Unique idempotency keys to send")
      ->check(CLI::Range(1, 10'000'000));
  demo_cmd->add_option("--duplicate-rate", demo.duplicate_rate,
                       "Share of keys sent more than once")
      ->check(CLI::Range(0.0, 1.0));
  demo_cmd->add_option("--ack-loss-rate", demo.ack_loss_rate,
                       "Share of consumer acks dropped, forcing redeliveries")
      ->check(CLI::Range(0.0, 0.9));
  demo_cmd->add_option("--transient-rate", demo.transient_rate,
                       "Share of consumer attempts failing transiently (retried with backoff)")
      ->check(CLI::Range(0.0, 0.3));
  demo_cmd->add_option("--seed", demo.seed, "Random seed (0: random)");
  demo_cmd->add_flag("--keep", demo.keep, "Keep the database file");
  demo_cmd->callback([&] { exit_code = converge::cli::RunDemo(demo); });

  converge::cli::ServiceDemoFlags sdemo;
  CLI::App* sdemo_cmd = app.add_subcommand(
      "demo", "Run the payments service, its payment and mail providers through named "
              "scenarios (double clicks, crashes, poison, duplicate webhooks) and a load "
              "phase; print the convergence table");
  sdemo_cmd->add_option("--clients", sdemo.clients, "Concurrent clients in the load phase")
      ->check(CLI::Range(1, 256));
  sdemo_cmd->add_option("--payments", sdemo.payments, "Unique payments in the load phase")
      ->check(CLI::Range(1, 1'000'000));
  sdemo_cmd->add_option("--duration", sdemo.duration_seconds,
                        "Run the load phase for this many seconds instead of --payments")
      ->check(CLI::Range(1, 86400));
  sdemo_cmd->add_option("--duplicate-rate", sdemo.duplicate_rate, "Share of payments sent twice")
      ->check(CLI::Range(0.0, 1.0));
  sdemo_cmd->add_option("--psp-failure-rate", sdemo.psp_failure_rate,
                        "Share of provider calls answered 503")
      ->check(CLI::Range(0.0, 0.5));
  sdemo_cmd->add_option("--mail-failure-rate", sdemo.mail_failure_rate,
                        "Share of mail sends answered 503")
      ->check(CLI::Range(0.0, 0.5));
  sdemo_cmd->add_flag("--keep", sdemo.keep, "Keep the temporary directory (stores, logs)");
  sdemo_cmd->callback([&] { exit_code = converge::cli::RunServiceDemo(sdemo); });

  std::string migrate_uri;
  CLI::App* migrate = app.add_subcommand("migrate", "Create or upgrade the schema of a store");
  // A PostgreSQL URI may hold a password: CONVERGE_DB (or libpq's PGPASSWORD / ~/.pgpass)
  // keeps it out of the process list.
  migrate->add_option("--db", migrate_uri, "Store URI, e.g. sqlite:app.db (or CONVERGE_DB)")
      ->required()
      ->envname("CONVERGE_DB");
  migrate->callback([&] {
    auto db = converge::Database::Open(migrate_uri);
    if (!db) {
      std::fprintf(stderr, "converge migrate: %s\n", db.error().ToString().c_str());
      exit_code = 1;
      return;
    }
    std::printf("%s: schema is current\n", migrate_uri.c_str());
  });

  std::string sweep_uri;
  int64_t sweep_batch = 1000;
  CLI::App* sweep = app.add_subcommand(
      "sweep", "Delete expired keys and inbox rows, old published outbox rows, finished "
               "effects and settled dead letters, in bounded batches");
  sweep->add_option("--db", sweep_uri, "Store URI, e.g. sqlite:app.db (or CONVERGE_DB)")
      ->required()
      ->envname("CONVERGE_DB");
  sweep->add_option("--batch", sweep_batch, "Rows per table per transaction")
      ->check(CLI::Range(int64_t{1}, int64_t{1'000'000}));
  sweep->callback([&] {
    auto db = converge::Database::Open(sweep_uri);
    if (!db) {
      std::fprintf(stderr, "converge sweep: %s\n", db.error().ToString().c_str());
      exit_code = 1;
      return;
    }
    converge::Sweeper sweeper(**db, {.batch = sweep_batch, .resume_walks = false});
    converge::SweepStats total;
    for (int pass = 1;; ++pass) {
      auto s = sweeper.RunOnce();
      if (!s) {
        std::fprintf(stderr, "converge sweep: %s\n", s.error().ToString().c_str());
        exit_code = 1;
        return;
      }
      total.keys += s->keys;
      total.inbox += s->inbox;
      total.outbox += s->outbox;
      total.effects += s->effects;
      total.dead_letters += s->dead_letters;
      total.partitions_created += s->partitions_created;
      total.partitions_dropped += s->partitions_dropped;
      std::printf("\r  pass %d: %lld rows deleted so far", pass,
                  static_cast<long long>(total.total()));
      std::fflush(stdout);
      // Until every table is swept through (and on SQLite, walked through once: sweeper.h).
      if (!s->more) break;
    }
    std::printf("\nswept: %lld idempotency keys, %lld inbox rows, %lld outbox events, "
                "%lld effects, %lld dead letters\n",
                static_cast<long long>(total.keys), static_cast<long long>(total.inbox),
                static_cast<long long>(total.outbox), static_cast<long long>(total.effects),
                static_cast<long long>(total.dead_letters));
    if (total.partitions_created + total.partitions_dropped > 0) {
      std::printf("time-partitioned store: %lld partitions created ahead, %lld dropped\n",
                  static_cast<long long>(total.partitions_created),
                  static_cast<long long>(total.partitions_dropped));
    }
  });

  converge::cli::AddDlqCommands(app, &exit_code);
  converge::cli::AddServiceCommands(app, &exit_code);
  converge::cli::AddProxyCommand(app, &exit_code);
  converge::cli::AddGatewayCommand(app, &exit_code);
  converge::cli::AddBrokerCommands(app, &exit_code);
  converge::cli::AddChaosCommand(app, &exit_code);

  converge::Status fp = converge::failpoint::ConfigureFromEnv();
  if (!fp.ok()) {
    std::fprintf(stderr, "converge: %s\n", fp.ToString().c_str());
    return 2;
  }
  CLI11_PARSE(app, argc, argv);
  return exit_code;
}
