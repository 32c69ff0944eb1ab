// NATS benchmarks (bench/nats_bench.sh starts PostgreSQL and nats-server), three rates
// measured in one run on the same servers, with their ratios:
//
//   relay     --events outbox events pre-loaded in PostgreSQL, drained by one Relay into
//             JetStream (claim, asynchronous publish with Nats-Msg-Id, wait for the acks,
//             mark), --batch events a pass
//   publish   ceiling 1: the same envelopes published asynchronously to a second stream,
//             no database (NatsBroker::PublishBatch, --batch a call)
//   skiplock  ceiling 2: the same rows fetched with FOR UPDATE SKIP LOCKED and marked,
//             --batch a transaction, no broker
//   consume   --consume events plus 10% duplicate deliveries (the same event ids under
//             other message ids, so the stream keeps them and the inbox must absorb
//             them) through Consumer: inbox claim + one business row per event
//
//   converge_nats_bench --uri postgresql://... --nats nats://... [--events N] [--batch N]
#include <CLI/CLI.hpp>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "converge/consumer.h"
#include "converge/database.h"
#include "converge/nats.h"
#include "converge/outbox.h"
#include "converge/relay.h"

namespace {

using converge::Event;
using converge::Status;
using converge::Tx;
using Steady = std::chrono::steady_clock;

double Seconds(Steady::time_point since) {
  return std::chrono::duration<double>(Steady::now() - since).count();
}

void Progress(const char* label, int64_t done, int64_t total) {
  std::fprintf(stderr, "\r  %-9s %lld / %lld", label, static_cast<long long>(done),
               static_cast<long long>(total));
  if (done >= total) std::fprintf(stderr, "\n");
}

bool Check(const Status& st, const char* what) {
  if (st.ok()) return true;
  std::fprintf(stderr, "%s: %s\n", what, st.ToString().c_str());
  return false;
}

converge::Result<std::unique_ptr<converge::NatsBroker>> Broker(const std::string& uri,
                                                               const std::string& stream) {
  auto o = converge::ParseNatsUri(uri);
  if (!o) return tl::unexpected(o.error());
  o->stream = stream;
  o->subject_prefix = "bench_" + stream;
  return converge::NatsBroker::Connect(std::move(*o));
}

Event BenchEvent(int64_t i) {
  Event e;
  e.type = "payment.captured";
  e.subject = "pay_" + std::to_string(i % 1000);
  e.data = R"({"payment_id":"pay_)" + std::to_string(i) + R"(","amount":1234,"currency":"EUR"})";
  return e;
}

int Run(const std::string& pg, const std::string& nats, int64_t events, int64_t batch,
        int64_t consume) {
  auto db = converge::Database::Open(pg);
  if (!db) return Check(db.error(), "open"), 1;
  if (!Check((*db)->Transact(
                 [](Tx& tx) { return converge::StatusOf(tx.Exec("TRUNCATE outbox_events")); }),
             "truncate")) {
    return 1;
  }
  converge::Outbox outbox;
  for (int64_t i = 0; i < events;) {
    const int64_t n = std::min<int64_t>(1000, events - i);
    Status st = (*db)->Transact([&](Tx& tx) -> Status {
      for (int64_t k = 0; k < n; ++k) {
        CONVERGE_RETURN_IF_ERROR(converge::StatusOf(outbox.Enqueue(tx, BenchEvent(i + k))));
      }
      return converge::OkStatus();
    });
    if (!Check(st, "preload")) return 1;
    i += n;
    Progress("preload", i, events);
  }

  // relay: outbox -> JetStream.
  auto relay_broker = Broker(nats, "BENCH_RELAY");
  if (!relay_broker) return Check(relay_broker.error(), "nats"), 1;
  converge::RelayOptions ro;
  ro.batch = static_cast<size_t>(batch);
  ro.acquire_interval = ro.lease / 3;  // as `converge relay` runs it
  converge::Relay relay(**db, outbox, **relay_broker, ro);
  int64_t drained = 0;
  auto t0 = Steady::now();
  while (drained < events) {
    auto n = relay.RunOnce();
    if (!n) return Check(n.error(), "relay"), 1;
    if (*n == 0) break;
    drained += static_cast<int64_t>(*n);
    Progress("relay", drained, events);
  }
  const double relay_rate = static_cast<double>(drained) / Seconds(t0);

  // Ceiling 2: fetch and mark the same rows, no broker.
  if (!Check((*db)->Transact([](Tx& tx) {
        return converge::StatusOf(tx.Exec("UPDATE outbox_events SET published_at = NULL"));
      }),
             "reset")) {
    return 1;
  }
  int64_t marked = 0;
  std::vector<Event> envelopes;  // for ceiling 1: the very messages the relay sent
  envelopes.reserve(static_cast<size_t>(events));
  t0 = Steady::now();
  while (marked < events) {
    int64_t n = 0;
    Status st = (*db)->Transact([&](Tx& tx) -> Status {
      CONVERGE_ASSIGN_OR_RETURN(
          converge::Rows rows,
          tx.Query("SELECT seq, event_id, type, aggregate_id, payload FROM outbox_events "
                   "WHERE published_at IS NULL ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED",
                   batch));
      n = static_cast<int64_t>(rows.size());
      if (n == 0) return converge::OkStatus();
      for (size_t r = 0; r < rows.size(); ++r) {
        Event e;
        e.id = rows[r].Text(1);
        e.type = rows[r].Text(2);
        e.subject = rows[r].Text(3);
        e.envelope = rows[r].Text(4);
        envelopes.push_back(std::move(e));
      }
      return converge::StatusOf(
          tx.Exec("UPDATE outbox_events SET published_at = 1 WHERE seq >= $1 AND seq <= $2 "
                  "AND published_at IS NULL",
                  rows.front().Int(0), rows.back().Int(0)));
    });
    if (!Check(st, "skiplock")) return 1;
    if (n == 0) break;
    marked += n;
    Progress("skiplock", marked, events);
  }
  const double skiplock_rate = static_cast<double>(marked) / Seconds(t0);

  // Ceiling 1: publish the same envelopes, no database.
  auto raw = Broker(nats, "BENCH_RAW");
  if (!raw) return Check(raw.error(), "nats"), 1;
  t0 = Steady::now();
  for (size_t i = 0; i < envelopes.size();) {
    const size_t n = std::min<size_t>(static_cast<size_t>(batch), envelopes.size() - i);
    for (const Status& st : (*raw)->PublishBatch(std::span(envelopes).subspan(i, n))) {
      if (!Check(st, "publish")) return 1;
    }
    i += n;
    Progress("publish", static_cast<int64_t>(i), static_cast<int64_t>(envelopes.size()));
  }
  const double publish_rate = static_cast<double>(envelopes.size()) / Seconds(t0);

  // consume: `consume` events and 10% duplicates, inbox + one business row each.
  if (!Check((*db)->Transact([](Tx& tx) {
        return converge::StatusOf(
            tx.Exec("CREATE TABLE IF NOT EXISTS bench_effects (event_id TEXT NOT NULL)"));
      }),
             "setup")) {
    return 1;
  }
  auto cb = Broker(nats, "BENCH_CONSUME");
  if (!cb) return Check(cb.error(), "nats"), 1;
  std::vector<Event> stream;
  for (int64_t i = 0; i < consume && i < static_cast<int64_t>(envelopes.size()); ++i) {
    stream.push_back(envelopes[static_cast<size_t>(i)]);
    if (i % 10 == 9) {  // a second copy under another message id: the inbox's job
      Event dup = envelopes[static_cast<size_t>(i)];
      dup.id += "-redelivered";
      stream.push_back(std::move(dup));
    }
  }
  for (size_t i = 0; i < stream.size(); i += 1000) {
    const size_t n = std::min<size_t>(1000, stream.size() - i);
    for (const Status& st : (*cb)->PublishBatch(std::span(stream).subspan(i, n))) {
      if (!Check(st, "consume preload")) return 1;
    }
  }
  converge::NatsSubscription ns;
  ns.consumer = "bench";
  auto sub = (*cb)->Subscribe(ns);
  if (!sub) return Check(sub.error(), "subscribe"), 1;
  converge::ConsumerOptions co;
  co.name = "bench";
  co.batch = 256;
  converge::Consumer consumer(**db, **sub, co);
  consumer.On("payment.captured", [](Tx& tx, const Event& e) {
    return converge::StatusOf(tx.Exec("INSERT INTO bench_effects(event_id) VALUES ($1)", e.id));
  });
  const int64_t deliveries = static_cast<int64_t>(stream.size());
  t0 = Steady::now();
  for (int64_t settled = 0; settled < deliveries;) {
    auto n = consumer.RunOnce();
    if (!n) return Check(n.error(), "consume"), 1;
    settled += static_cast<int64_t>(*n);
    Progress("consume", settled, deliveries);
  }
  const double consume_rate = static_cast<double>(deliveries) / Seconds(t0);
  const converge::ConsumerStats cs = consumer.stats();

  const double slower = std::min(publish_rate, skiplock_rate);
  std::printf("relay drain PostgreSQL -> NATS, %lld events, batch %lld:\n",
              static_cast<long long>(events), static_cast<long long>(batch));
  std::printf("  relay     %10.0f events/s\n", relay_rate);
  std::printf("  publish   %10.0f events/s   (ceiling: async JetStream publish, no database)\n",
              publish_rate);
  std::printf("  skiplock  %10.0f events/s   (ceiling: FOR UPDATE SKIP LOCKED fetch + mark)\n",
              skiplock_rate);
  std::printf("  relay / slower ceiling = %.2f (target >= 0.50)\n", relay_rate / slower);
  std::printf("consumer, %lld deliveries (10%% duplicates), batch %zu:\n",
              static_cast<long long>(deliveries), co.batch);
  std::printf("  consume   %10.0f deliveries/s   processed %lld, duplicates absorbed %lld\n",
              consume_rate, static_cast<long long>(cs.processed),
              static_cast<long long>(cs.duplicates));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"NATS benchmarks: relay drain with its two ceilings, consumer throughput"};
  std::string pg, nats;
  int64_t events = 200'000, batch = 1000, consume = 50'000;
  app.add_option("--uri", pg, "postgresql://... (a database it may truncate)")->required();
  app.add_option("--nats", nats, "nats://host:port")->required();
  app.add_option("--events", events, "Outbox events pre-loaded")->check(CLI::Range(1, 10'000'000));
  app.add_option("--batch", batch, "Events a relay pass / ceiling step")
      ->check(CLI::Range(1, 100'000));
  app.add_option("--consume", consume, "Events for the consumer run (plus 10% duplicates)")
      ->check(CLI::Range(1, 10'000'000));
  CLI11_PARSE(app, argc, argv);
  return Run(pg, nats, events, batch, consume);
}
