// The chaos campaign: the payments service shape (one or more `converge serve` children on
// one store, the stand-in payment and mail providers in this process), client load that
// records every exchange in a History, and a seeded schedule of faults: SIGKILLs at random
// instants and at enabled failpoints (then restarts), stalls longer than the lease at phase
// boundaries, provider faults and mail outages, refunds racing the capture, duplicate and
// poison webhooks, checkout orders with carrier faults and refused refunds, jumps of the
// service's clock, stalls past the key TTL and, on PostgreSQL, database restarts. With
// `broker` "nats" the campaign also starts a nats-server, a `converge relay` and one
// `converge worker` per consumer, and adds their faults: SIGKILLs of the relay and the
// workers (at random instants and at failpoints), SIGKILL and restart of nats-server, and
// workers stopped (SIGSTOP) for longer than the consumers' AckWait. When
// the schedule is done the faults stop, every key still in its resend window is retried
// once more, the system drains, and CheckHistory() compares the history with the stores.
// docs/design/chaos.md describes all of it.
//
// The schedule (which fault, where, after how long) is a function of the seed alone; the
// threads' timing is not, so a replay with the same seed runs the same faults against a
// similar, not an identical, interleaving.
//
// Thread safety: RunChaos() is one blocking call; `on_progress` runs on its thread.
#ifndef CONVERGE_HARNESS_CHAOS_H_
#define CONVERGE_HARNESS_CHAOS_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "converge/status.h"
#include "harness/chaos_check.h"

namespace converge::harness {

struct ChaosOptions {
  std::string binary;  // the converge executable to run as the service
  // "sqlite" (a file in the run's directory) or a postgresql:// URI of a running server on
  // which the campaign creates, and afterwards drops, a database of its own.
  std::string store = "sqlite";
  int kills = 60;                       // stop after this many SIGKILLs...
  std::chrono::seconds duration{0};     // ...or, when > 0, after this long
  uint64_t seed = 1;
  int clients = 8;
  int instances = 0;  // service processes on the store; 0: 1 on SQLite, 2 on PostgreSQL
  bool keep = false;  // keep the run's directory (and database); kept anyway on a violation
  // "" (events through the store's SQL queue) or "nats": a nats-server of the campaign's
  // own (on PATH), a relay and workers as processes of their own (docs/design/chaos.md).
  std::string broker;
  // With NATS: 1 (one nats-server) or a cluster of 3 or 5 nodes, the stream and its
  // consumers replicated on each; a kill of nats-server then kills one node.
  int nats_nodes = 1;
  // Without a broker: the service puts events on the store's queue in the transactions
  // that write them (store.publish_in_transaction), not in relay passes.
  bool publish_in_transaction = false;
  // PostgreSQL only, all three or none: the server's binaries, data directory and the
  // command prefix to run pg_ctl as (scripts/with-postgres.sh exports them), for database
  // restarts mid-load.
  std::string pg_bin, pg_data, pg_run_as;
  // Now and then: kills done and a one-line status (phase, requests, violations so far).
  std::function<void(int64_t kills, const std::string& status)> on_progress;
};

struct ChaosCounts {
  int64_t kills = 0, kills_at_failpoint = 0, failpoints_not_reached = 0, restarts = 0;
  int64_t stalls = 0, psp_faults = 0, mail_outages = 0, refunds = 0, duplicate_webhooks = 0;
  int64_t poison_webhooks = 0, db_restarts = 0;
  // With NATS. Of `kills`, those of the relay, the workers and nats-server (each then
  // restarted); the rest are the service's.
  int64_t relay_kills = 0, worker_kills = 0, nats_kills = 0;
  int64_t worker_stalls = 0;  // workers stopped (SIGSTOP) for longer than AckWait
  // Deliveries beyond the first of each event, summed over the durable consumers, from
  // the server's consumer state at the end (at least: a killed server may forget some).
  int64_t redeliveries = 0;
  // Publishes the stream reported as duplicates (Nats-Msg-Id), from the service's
  // /metrics before each kill and the relays' graceful stops (at least).
  int64_t broker_duplicates = 0;
  // Ledger entries of a payment booked out of event order: a violation with the SQL
  // queue; with NATS (no per-aggregate order, docs/design/nats.md) not checked, counted.
  int64_t out_of_order = 0;
  int64_t ttl_stalls = 0, shipping_faults = 0, refused_refunds = 0, clock_jumps = 0;
  int64_t requests = 0, keys = 0, duplicates = 0, concurrent = 0, mismatches = 0,
          give_ups = 0;
  int64_t order_keys = 0;       // of the keys, checkout orders
  int64_t resend_cutoffs = 0;   // retries not sent: the key's resend window had passed
  int64_t final_pass_keys = 0;  // keys still resendable at the final pass
  std::map<int, int64_t> by_status;  // 0: no answer
  int64_t replays = 0;
  int64_t takeovers = 0;            // idempotency_resumed_total, summed over process lives
  int64_t completer_finishes = 0;   // "event=completed_abandoned" in the service logs
  int64_t payments = 0, charges = 0, refunded = 0;
  int64_t orders = 0;                          // in the store
  std::map<std::string, int64_t> orders_by_state;  // their sagas' states
  int64_t order_captured = 0, order_refunded = 0, order_shipped = 0;  // money of orders
  double seconds = 0;
};

struct ChaosResult {
  ChaosCounts counts;
  std::vector<std::string> schedule;  // every fault that ran: "t=…ms kill instance 0 …"
  std::vector<Violation> violations;
  std::vector<Op> history;
  std::string dir;  // the run's directory
  // Whether `dir` (and on PostgreSQL the run's database) was left in place: with `keep`,
  // and always when there are violations, so that the service logs of a failure that is
  // seen once are there to read.
  bool kept = false;
};

// Runs a whole campaign. An error Status when the shape could not be set up or a store
// could not be read; violations are in the result.
Result<ChaosResult> RunChaos(const ChaosOptions& options);

// The first `steps` steps of the schedule `seed` draws (the same ones RunChaos() injects
// with that seed and instance count; what each did is in ChaosResult::schedule).
// `nats_nodes`: 0 without a broker; with `broker` "nats" its `nats_nodes`, where some kills
// and stalls go to the relay, the workers and nats-server (a node of it) instead (the same
// gaps and faults otherwise).
std::vector<std::string> PlannedSchedule(uint64_t seed, int steps, int instances,
                                         bool db_restarts, int nats_nodes = 0);

// The violation report: seed, schedule, and per violation the shortest history excerpt.
std::string FormatViolations(const ChaosOptions& options, const ChaosResult& result);

}  // namespace converge::harness

#endif  // CONVERGE_HARNESS_CHAOS_H_
