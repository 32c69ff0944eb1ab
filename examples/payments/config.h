// Configuration of the payments reference service: a TOML file, then environment
// variables, then command-line flags, each overriding the one before. See
// examples/payments/converge.example.toml for every key.
#ifndef CONVERGE_EXAMPLES_PAYMENTS_CONFIG_H_
#define CONVERGE_EXAMPLES_PAYMENTS_CONFIG_H_

#include <chrono>
#include <map>
#include <string>
#include <vector>

#include "converge/clock.h"
#include "converge/status.h"
#include "converge/sweeper.h"

namespace payments {

using converge::Millis;
using namespace std::chrono_literals;

struct ServiceConfig {
  // [server]
  std::string address = "127.0.0.1";
  uint16_t port = 8080;
  int io_threads = 1;
  int worker_threads = 32;
  size_t body_limit = 64 << 10;
  size_t header_limit = 16 << 10;  // also each chunk line and the trailer section
  size_t max_header_fields = 100;
  int max_connections = 4096;      // beyond: accept pauses until one closes
  Millis header_timeout = 15s;
  Millis body_timeout = 30s;
  Millis shutdown_drain = 10s;
  // Unique among live instances sharing a store; names this instance's relay. Empty:
  // "<hostname>:<port>" when the port is fixed, else random.
  std::string instance_name;
  // Where events travel: empty = the SQL queue in the store; "nats://..." = NATS JetStream
  // (docs/design/nats.md): the relay publishes there and the ledger and email consumers
  // read there (staged webhook work stays in the store's queue).
  std::string broker;
  // What this process runs: "serve" (everything) or "worker" (only `consumers`, with no
  // HTTP server and no relay: `converge worker`).
  std::string role = "serve";
  std::vector<std::string> consumers;  // role "worker": which consumers; empty = all
  // [store]
  std::string db = "sqlite:converge.db";
  bool synchronous_full = true;
  bool notify = false;  // PostgreSQL LISTEN/NOTIFY wake-ups across processes
  // Events go on the SQL queue in their producer's transaction, not in a relay pass
  // (RuntimeOptions::publish_in_transaction); not with a broker.
  bool publish_in_transaction = false;
  // [idempotency]
  Millis key_ttl = 24h;
  Millis lease = 30s;
  // How long after a lease lapsed the client's retry has before the completer finishes
  // the request itself.
  Millis completer_grace = 30s;
  // Completed keys' responses kept in memory (IdempotencyOptions::replay_cache_bytes;
  // 0 = off), and how far the clocks of the processes sharing the store may disagree.
  int64_t replay_cache_mb = 16;
  Millis max_clock_skew = 5s;
  // [auth]
  std::string admin_token;
  std::map<std::string, std::string> api_keys;  // bearer key -> tenant
  // [psp]
  std::string psp_url = "http://127.0.0.1:8081";
  Millis psp_timeout = 5s;
  std::vector<std::string> webhook_secrets;
  Millis webhook_tolerance = 5min;
  // [mail]
  std::string mail_url = "http://127.0.0.1:8082";
  Millis mail_timeout = 5s;
  // [consumers]
  Millis visibility = 30s;
  int max_attempts = 8;
  Millis backoff_initial = 200ms;
  Millis backoff_max = 30s;
  // [effects]
  int effect_max_attempts = 8;
  Millis effect_lease = 30s;
  // [admin]
  // Serve /admin/failpoints (configure, inspect, release pausable failpoints): for tests,
  // the demo and chaos runs only, never in production.
  bool admin_failpoints = false;
  // Serve /admin/clock (shift the service's clock forward or back at runtime): chaos runs
  // only, never in production. The service then reads an OffsetClock over `clock`.
  bool admin_clock = false;
  // [retention]
  // How often the sweeper looks for expired keys, inbox rows and published outbox rows.
  Millis sweep_interval = 60s;
  // SQLite: how long one walk of the sweeper over the keys, and one over the inbox, takes
  // (SweepOptions::key_order_pass, inbox_key_order_pass). Longer: cheaper deletions,
  // larger tables.
  Millis sweep_pass = std::chrono::hours(6);
  Millis inbox_sweep_pass = converge::SweepOptions{}.inbox_key_order_pass;
  // [log]
  std::string log_level = "info";
  // Not from the file: what the service reads the time from (nullptr: the system clock).
  // Tests inject a ManualClock to step through leases and TTLs without waiting.
  converge::Clock* clock = nullptr;
};

// Reads `path` (empty: defaults only), then CONVERGE_* environment overrides. Unknown
// keys, wrong types and bad values are kInvalidArgument naming the key.
converge::Result<ServiceConfig> LoadServiceConfig(const std::string& path);

// Splits "host:port" (port 0 allowed). kInvalidArgument if malformed.
converge::Status ParseListen(const std::string& listen, std::string* host, uint16_t* port);

}  // namespace payments

#endif  // CONVERGE_EXAMPLES_PAYMENTS_CONFIG_H_
