// converge demo: the whole effective-once path on one SQLite file, with the faults that
// at-least-once delivery brings, and a check that everything converged.
//
// Producers send idempotent "create payment" requests, a share of them more than once
// (concurrent double clicks and later retries) and one with the same key but a different
// payload. Each fresh request writes the payment and a payment.captured outbox event in
// one transaction. The relay publishes to the SQL queue; the ledger consumer books two
// entries per payment. The demo drops a share of the consumer's acks, so messages come
// back after their visibility timeout, and one payment uses a currency the ledger refuses
// (a poison message). At the end the database must show: one payment per key, every event
// published and consumed, two ledger entries per booked payment, and exactly the poison
// message in the dead letters.
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "apps/converge/commands.h"
#include "apps/converge/progress.h"
#include "converge/consumer.h"
#include "converge/database.h"
#include "converge/dead_letters.h"
#include "converge/idempotency.h"
#include "converge/inbox.h"
#include "converge/outbox.h"
#include "converge/relay.h"
#include "converge/sql_queue.h"

namespace converge::cli {
namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

constexpr const char* kPoisonCurrency = "XTS";  // ISO 4217's code "for testing"

// Drops a share of acks on their way to the queue, as a network or a crashed consumer
// would: the message stays claimed until its visibility timeout and is delivered again.
class LossyAcks : public SubscriberWrapper {
 public:
  LossyAcks(Subscriber* target, double rate, uint64_t seed)
      : SubscriberWrapper(target), rate_(rate), rng_(seed) {}

  // Remembers which delivery of each event was handed out last, for the ledger's fault
  // injection (FaultForDelivery).
  Result<std::vector<Delivery>> Fetch(size_t max, Millis visibility) override {
    Result<std::vector<Delivery>> r = target_->Fetch(max, visibility);
    if (r) {
      std::lock_guard<std::mutex> l(mu_);
      for (const Delivery& d : *r) attempts_[d.event.id] = d.attempts;
    }
    return r;
  }
  int64_t AttemptsOf(const std::string& event_id) {
    std::lock_guard<std::mutex> l(mu_);
    auto it = attempts_.find(event_id);
    return it == attempts_.end() ? 0 : it->second;
  }

  Status Settle(std::span<const Delivery> d, std::span<const Settlement> s) override {
    std::vector<Delivery> keep_d;
    std::vector<Settlement> keep_s;
    {
      std::lock_guard<std::mutex> l(mu_);
      for (size_t i = 0; i < d.size(); ++i) {
        if (s[i].kind != Settlement::Kind::kNak &&
            std::uniform_real_distribution<double>(0, 1)(rng_) < rate_) {
          ++dropped_;
          continue;
        }
        keep_d.push_back(d[i]);
        keep_s.push_back(s[i]);
      }
    }
    return target_->Settle(keep_d, keep_s);
  }
  int64_t dropped() {
    std::lock_guard<std::mutex> l(mu_);
    return dropped_;
  }

 private:
  const double rate_;
  std::mutex mu_;
  std::mt19937_64 rng_;
  int64_t dropped_ = 0;
  std::map<std::string, int64_t> attempts_;
};

// The ledger's injected transient failures. A handler runs in its consumer's transaction,
// and a transaction may run again (a neighbour in its SQLite batch failed): the run that
// counts is the one that commits. So whether a delivery fails is drawn from the event and
// the delivery's number, the same in every run of it, and the faults are counted once
// per delivery.
class FaultForDelivery {
 public:
  FaultForDelivery(double rate, uint64_t seed) : rate_(rate), seed_(seed) {}

  bool Inject(const std::string& event_id, int64_t attempts) {
    uint64_t h = seed_ ^ 0xcbf29ce484222325ULL;
    for (unsigned char c : event_id) h = (h ^ c) * 0x100000001b3ULL;
    h ^= static_cast<uint64_t>(attempts) * 0x9e3779b97f4a7c15ULL;
    std::mt19937_64 draw(h);
    if (std::uniform_real_distribution<double>(0, 1)(draw) >= rate_) return false;
    std::lock_guard<std::mutex> l(mu_);
    injected_.emplace(event_id, attempts);
    return true;
  }
  int64_t injected() {
    std::lock_guard<std::mutex> l(mu_);
    return static_cast<int64_t>(injected_.size());
  }

 private:
  const double rate_;
  const uint64_t seed_;
  std::mutex mu_;
  std::set<std::pair<std::string, int64_t>> injected_;
};

struct Attempt {
  int key;
};

std::string Body(int key, bool poison, int amount_offset = 0) {
  json b = {{"order_id", "order-" + std::to_string(key)},
            {"customer_id", "cust-" + std::to_string(key % 97)},
            {"amount", 100 + (key * 37) % 9900 + amount_offset},
            {"currency", poison ? kPoisonCurrency : "EUR"}};
  return b.dump();
}

int64_t Count(Database& db, const std::string& sql) {
  int64_t n = -1;
  Status st = db.Read([&](Tx& tx) -> Status {
    CONVERGE_ASSIGN_OR_RETURN(Rows rows, tx.Query(sql));
    n = rows.empty() ? 0 : rows[0].Int(0);
    return OkStatus();
  });
  if (!st.ok()) std::fprintf(stderr, "query failed: %s: %s\n", sql.c_str(), st.ToString().c_str());
  return n;
}

// Rows in every consumer's inbox: events settled so far.
int64_t InboxRows(Database& db) {
  int64_t n = 0;
  Status st = db.Read([&](Tx& tx) -> Status {
    CONVERGE_ASSIGN_OR_RETURN(auto counts, Inbox().CountByConsumer(tx));
    for (const auto& [consumer, rows] : counts) n += rows;
    return OkStatus();
  });
  if (!st.ok()) std::fprintf(stderr, "inbox count failed: %s\n", st.ToString().c_str());
  return st.ok() ? n : -1;
}

struct Check {
  std::string what;
  int64_t got;
  int64_t want;
};

}  // namespace

int RunDemo(const DemoFlags& f) {
  const uint64_t seed = f.seed ? f.seed : std::random_device{}();
  std::string path = f.db;
  std::string temp_dir;
  if (path.empty()) {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base && *base ? base : "/tmp") + "/converge-demo-XXXXXX";
    if (mkdtemp(tmpl.data()) == nullptr) {
      std::perror("converge demo: mkdtemp");
      return 1;
    }
    temp_dir = tmpl;
    path = temp_dir + "/demo.db";
  } else if (std::filesystem::exists(path)) {
    std::fprintf(stderr, "converge demo: %s exists; the demo needs a fresh file\n", path.c_str());
    return 2;
  }
  struct Cleanup {
    std::string dir;
    bool keep;
    ~Cleanup() {
      std::error_code ec;
      if (!keep && !dir.empty()) std::filesystem::remove_all(dir, ec);
    }
  } cleanup{temp_dir, f.keep};

  std::printf("converge demo: sqlite:%s (WAL, synchronous=FULL, group commit), seed %llu\n",
              path.c_str(), static_cast<unsigned long long>(seed));
  std::printf("  %d payments from %d producers, %.0f%% of keys sent again, %.0f%% of acks "
              "lost, %.0f%% transient consumer failures, 1 poison message\n",
              f.payments, f.producers, f.duplicate_rate * 100, f.ack_loss_rate * 100,
              f.transient_rate * 100);

  auto opened = Database::Open("sqlite:" + path);
  if (!opened) {
    std::fprintf(stderr, "converge demo: %s\n", opened.error().ToString().c_str());
    return 1;
  }
  Database& db = **opened;
  Status st = db.Transact([](Tx& tx) -> Status {
    CONVERGE_RETURN_IF_ERROR(tx.Exec(
        "CREATE TABLE payments (id TEXT PRIMARY KEY, order_id TEXT NOT NULL, "
        "customer_id TEXT NOT NULL, amount INTEGER NOT NULL, currency TEXT NOT NULL, "
        "status TEXT NOT NULL)"));
    // No unique constraint on purpose: only the inbox stands between a redelivery and a
    // second pair of entries, so the check below really tests it.
    return StatusOf(tx.Exec(
        "CREATE TABLE ledger_entries (id INTEGER PRIMARY KEY AUTOINCREMENT, "
        "payment_id TEXT NOT NULL, account TEXT NOT NULL, amount INTEGER NOT NULL)"));
  });
  SqlQueue queue(db);
  if (st.ok()) st = queue.Subscribe("ledger", "payment.*");
  if (!st.ok()) {
    std::fprintf(stderr, "converge demo: setup: %s\n", st.ToString().c_str());
    return 1;
  }

  Outbox outbox(OutboxOptions{.source = "urn:converge:demo"});
  IdempotencyKeys keys(db);
  Relay relay(db, outbox, queue);
  auto subscriber = queue.OpenSubscriber("ledger");
  LossyAcks lossy(subscriber.get(), f.ack_loss_rate, seed ^ 0x9e3779b97f4a7c15ULL);
  ConsumerOptions copts;
  copts.name = "ledger";
  copts.max_attempts = 12;  // at a 30% transient rate, 12 straight failures: ~5e-7
  copts.visibility = Millis(250);  // short, so lost acks come back within the demo
  copts.backoff_initial = Millis(20);
  copts.backoff_max = Millis(500);
  copts.batch = 64;
  Consumer ledger(db, lossy, copts);
  FaultForDelivery faults(f.transient_rate, seed ^ 0x5bd1e995ULL);
  ledger.On("payment.captured", [&](Tx& tx, const Event& e) -> Status {
    if (faults.Inject(e.id, lossy.AttemptsOf(e.id))) {
      return UnavailableError("ledger store briefly unavailable (injected)");
    }
    json d = json::parse(e.data, nullptr, false);
    if (!d.is_object() || !d["payment_id"].is_string() || !d["amount"].is_number_integer() ||
        !d["currency"].is_string()) {
      return InvalidArgumentError("payment.captured data is malformed");
    }
    std::string currency = d["currency"];
    if (currency != "EUR" && currency != "USD" && currency != "GBP") {
      return InvalidArgumentError("the ledger does not book currency " + currency);
    }
    std::string id = d["payment_id"];
    int64_t amount = d["amount"];
    CONVERGE_RETURN_IF_ERROR(tx.Exec(
        "INSERT INTO ledger_entries (payment_id, account, amount) VALUES ($1, 'customer', $2)",
        id, -amount));
    return StatusOf(tx.Exec(
        "INSERT INTO ledger_entries (payment_id, account, amount) VALUES ($1, 'merchant', $2)",
        id, amount));
  });
  relay.Start();
  if (Status cs = ledger.Start(); !cs.ok()) {
    std::fprintf(stderr, "converge demo: consumer: %s\n", cs.ToString().c_str());
    return 1;
  }

  // The plan: every key once, some keys 2-4 times, shuffled so duplicates arrive both
  // concurrently and as later retries.
  std::mt19937_64 rng(seed);
  const int poison_key = static_cast<int>(rng() % f.payments);
  std::vector<Attempt> plan;
  for (int k = 0; k < f.payments; ++k) {
    plan.push_back({k});
    if (std::uniform_real_distribution<double>(0, 1)(rng) < f.duplicate_rate) {
      int extra = 1 + static_cast<int>(rng() % 3);
      for (int i = 0; i < extra; ++i) plan.push_back({k});
    }
  }
  std::shuffle(plan.begin(), plan.end(), rng);

  std::atomic<size_t> next{0};
  std::atomic<int64_t> fresh{0}, replayed{0}, errors{0};
  std::mutex err_mu;
  std::string first_error;
  auto send = [&](int k, const std::string& body) -> Result<Outcome> {
    KeyRequest req{"demo-tenant", "order-" + std::to_string(k),
                   RequestFingerprint("POST", "/v1/payments", body)};
    return keys.Execute(req, [&](Tx& tx) -> Result<StoredResponse> {
      json b = json::parse(body);
      thread_local std::mt19937_64 id_rng(std::random_device{}());
      char id[32];
      std::snprintf(id, sizeof id, "pay_%016llx", static_cast<unsigned long long>(id_rng()));
      CONVERGE_RETURN_IF_ERROR(tx.Exec(
          "INSERT INTO payments (id, order_id, customer_id, amount, currency, status) "
          "VALUES ($1, $2, $3, $4, $5, 'captured')",
          id, b["order_id"].get<std::string>(), b["customer_id"].get<std::string>(),
          b["amount"].get<int64_t>(), b["currency"].get<std::string>()));
      json data = {{"payment_id", id}, {"amount", b["amount"]}, {"currency", b["currency"]}};
      Event e;
      e.type = "payment.captured";
      e.subject = id;
      e.data = data.dump();
      CONVERGE_RETURN_IF_ERROR(outbox.Enqueue(tx, e));
      json resp = {{"id", id}, {"status", "captured"}, {"amount", b["amount"]}};
      return StoredResponse{201, {{"Content-Type", "application/json"}}, resp.dump()};
    });
  };

  const auto t0 = Clock::now();
  std::vector<std::thread> producers;
  for (int p = 0; p < f.producers; ++p) {
    producers.emplace_back([&] {
      for (size_t i; (i = next.fetch_add(1)) < plan.size();) {
        int k = plan[i].key;
        auto r = send(k, Body(k, k == poison_key));
        if (!r) {
          ++errors;
          std::lock_guard<std::mutex> l(err_mu);
          if (first_error.empty()) first_error = r.error().ToString();
        } else if (r->replayed) {
          ++replayed;
        } else {
          ++fresh;
        }
      }
    });
  }
  Progress produce("producing", static_cast<int64_t>(plan.size()));
  while (next.load() < plan.size()) {
    produce.Show(static_cast<int64_t>(std::min(next.load(), plan.size())), "requests");
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  for (auto& t : producers) t.join();
  produce.Show(static_cast<int64_t>(plan.size()), "requests");
  produce.Done();
  const double produce_secs = std::chrono::duration<double>(Clock::now() - t0).count();

  // Same key, different payload: must be refused, never applied.
  auto mismatch = send(0, Body(0, poison_key == 0, /*amount_offset=*/1));
  const bool mismatch_refused =
      !mismatch && mismatch.error().reason() == converge::reason::kFingerprintMismatch;

  // Let the relay and the consumer drain, lost acks and retries included.
  Progress drain("converging", static_cast<int64_t>(f.payments));
  const auto deadline = Clock::now() + std::chrono::seconds(120);
  int64_t backlog = 0, depth = 0, consumed = 0;
  for (;;) {
    backlog = Count(db, "SELECT count(*) FROM outbox_events WHERE published_at IS NULL");
    depth = Count(db, "SELECT count(*) FROM queue_messages");
    consumed = InboxRows(db) + Count(db, "SELECT count(*) FROM dead_letters");
    drain.Show(std::min<int64_t>(consumed, f.payments),
               "events settled, outbox " + std::to_string(backlog) + ", queue " +
                   std::to_string(depth));
    if ((backlog == 0 && depth == 0) || Clock::now() > deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  drain.Done();
  relay.Stop();
  ledger.Stop();
  const double total_secs = std::chrono::duration<double>(Clock::now() - t0).count();

  const ConsumerStats cs = ledger.stats();
  const RelayStats rs = relay.stats();
  const DatabaseStats ds = db.stats();
  const int64_t payments = Count(db, "SELECT count(*) FROM payments");
  const int64_t keys_done =
      Count(db, "SELECT count(*) FROM idempotency_keys WHERE status = 'completed'");
  const int64_t events = Count(db, "SELECT count(*) FROM outbox_events");
  const int64_t entries = Count(db, "SELECT count(*) FROM ledger_entries");
  const int64_t unbalanced = Count(
      db, "SELECT count(*) FROM (SELECT payment_id FROM ledger_entries GROUP BY payment_id "
          "HAVING count(*) != 2 OR sum(amount) != 0)");
  const int64_t parked = Count(db, "SELECT count(*) FROM dead_letters WHERE state = 'parked'");
  const int64_t poison_parked = Count(
      db, "SELECT count(*) FROM dead_letters d JOIN outbox_events o ON o.event_id = d.event_id "
          "JOIN payments p ON p.id = o.aggregate_id WHERE p.currency = 'XTS'");
  const int64_t dup_keys = Count(
      db, "SELECT count(*) FROM (SELECT order_id FROM payments GROUP BY order_id "
          "HAVING count(*) > 1)");
  const int64_t attempts = static_cast<int64_t>(plan.size()) + 1;

  std::printf("\n  %-12s %-44s %10s\n", "layer", "", "count");
  auto row = [](const char* layer, const std::string& what, int64_t n) {
    std::printf("  %-12s %-44s %10lld\n", layer, what.c_str(), static_cast<long long>(n));
  };
  row("producer", "requests sent (attempts)", attempts);
  row("", "unique idempotency keys", f.payments);
  row("", "fresh executions", fresh);
  row("", "replays of the stored response (absorbed)", replayed);
  row("", "same key, different payload (refused)", mismatch_refused ? 1 : 0);
  row("", "errors", errors);
  row("store", "payments", payments);
  row("", "transactions (Transact calls)", ds.transactions);
  row("", "physical commits (group commit)", ds.commits);
  row("outbox", "events written", events);
  row("relay", "events published", rs.published);
  row("transport", "acks lost, forcing redelivery (injected)", lossy.dropped());
  row("consumer", "events applied", cs.processed);
  row("", "redeliveries absorbed by the inbox", cs.duplicates);
  row("", "transient failures (injected)", faults.injected());
  row("", "retries after backoff", cs.retries);
  row("", "dead letters (poison)", cs.dead_lettered);
  row("ledger", "entries (2 per applied payment)", entries);
  std::printf("  produced in %.2fs (%.0f requests/s); converged in %.2fs\n\n", produce_secs,
              static_cast<double>(attempts) / produce_secs, total_secs);

  std::vector<Check> checks = {
      {"no request failed", errors, 0},
      {"one payment per key", payments, f.payments},
      {"no key produced two payments", dup_keys, 0},
      {"every key completed once", keys_done, f.payments},
      {"fresh executions = unique keys", fresh, f.payments},
      {"replays = duplicate sends", replayed, static_cast<int64_t>(plan.size()) - f.payments},
      {"payload mismatch refused", mismatch_refused ? 1 : 0, 1},
      {"one event per payment", events, payments},
      {"outbox drained", backlog, 0},
      {"queue drained", depth, 0},
      {"two balanced entries per applied payment", unbalanced, 0},
      {"ledger entries", entries, 2 * (payments - 1)},
      {"every transient failure retried", cs.retries, faults.injected()},
      {"exactly the poison message dead-lettered", parked, 1},
      {"the dead letter is the poison payment", poison_parked, 1},
  };
  int failed = 0;
  for (const Check& c : checks) {
    bool ok = c.got == c.want;
    if (!ok) ++failed;
    std::printf("  [%s] %-44s %lld%s\n", ok ? " ok " : "FAIL", c.what.c_str(),
                static_cast<long long>(c.got),
                ok ? "" : (" (want " + std::to_string(c.want) + ")").c_str());
  }
  if (!first_error.empty()) std::printf("  first request error: %s\n", first_error.c_str());
  if (f.keep || !f.db.empty()) {
    std::printf("\n  inspect: converge dlq list --db sqlite:%s\n", path.c_str());
  }
  std::printf("\nverdict: %s\n", failed == 0 ? "CONVERGED (every effect applied exactly once)"
                                             : "VIOLATED");
  return failed == 0 ? 0 : 1;
}

}  // namespace converge::cli
