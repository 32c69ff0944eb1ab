// NATS benchmarks (bench/nats_bench.sh starts PostgreSQL and nats-server), three rates
// measured in one run on the same servers, with their ratios. --events outbox events are
// pre-loaded in PostgreSQL; then three steps take turns, --batch events each, until the
// outbox is drained (each of relay and skiplock drains about half of the same backlog):
//
//   relay     one Relay pass into JetStream (claim, asynchronous publish with Nats-Msg-Id,
//             wait for the acks, mark)
//   skiplock  ceiling 2: the relay's columns fetched with FOR UPDATE SKIP LOCKED and
//             marked with the relay's SET list, one transaction, no broker
//   publish   ceiling 1: the envelopes that skiplock step fetched, published asynchronously
//             to a second stream (NatsBroker::PublishBatch), no database
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

  // The relay and its two ceilings, interleaved batch by batch on the same backlog: a
  // relay pass, a skiplock step, a publish step of what that step fetched, again until
  // the outbox is drained. Each drains about half the events; each is timed over its own
  // steps only. So all three see the same table (its dead rows and index entries) and the
  // same load on a shared machine, which moves between runs more than the relay does.
  auto relay_broker = Broker(nats, "BENCH_RELAY");
  if (!relay_broker) return Check(relay_broker.error(), "nats"), 1;
  auto raw = Broker(nats, "BENCH_RAW");
  if (!raw) return Check(raw.error(), "nats"), 1;
  converge::RelayOptions ro;
  ro.batch = static_cast<size_t>(batch);
  ro.acquire_interval = ro.lease / 3;  // as `converge relay` runs it
  converge::Relay relay(**db, outbox, **relay_broker, ro);
  int64_t drained = 0, marked = 0, published = 0;
  double relay_s = 0, skiplock_s = 0, publish_s = 0;
  std::vector<Event> envelopes;  // what the skiplock steps fetched: the publish ceiling's
  envelopes.reserve(static_cast<size_t>(events));
  for (bool more = true; more;) {
    more = false;
    // relay: claim, asynchronous publish with Nats-Msg-Id, wait for the acks, mark.
    auto t0 = Steady::now();
    auto n = relay.RunOnce();
    relay_s += Seconds(t0);
    if (!n) return Check(n.error(), "relay"), 1;
    drained += static_cast<int64_t>(*n);
    more = more || *n > 0;

    // Ceiling 2: fetch the columns the relay claims, FOR UPDATE SKIP LOCKED, and mark them
    // as the relay does (published_at, publish_attempts, last_error), no broker.
    const size_t first = envelopes.size();
    t0 = Steady::now();
    Status st = (*db)->Transact([&](Tx& tx) -> Status {
      envelopes.resize(first);
      CONVERGE_ASSIGN_OR_RETURN(
          converge::Rows rows,
          tx.Query("SELECT seq, event_id, source, type, aggregate_id, payload, partition_no, "
                   "aggregate_type FROM outbox_events WHERE published_at IS NULL ORDER BY seq "
                   "LIMIT $1 FOR UPDATE SKIP LOCKED",
                   batch));
      if (rows.empty()) return converge::OkStatus();
      for (const converge::Row& r : rows) {
        Event& e = envelopes.emplace_back();
        e.id = r.Text(1);
        e.source = r.Text(2);
        e.type = r.Text(3);
        e.subject = r.Text(4);
        e.envelope = r.Text(5);
        e.aggregate_type = r.Text(7);
      }
      return converge::StatusOf(
          tx.Exec("UPDATE outbox_events SET published_at = $1, "
                  "publish_attempts = publish_attempts + 1, last_error = NULL "
                  "WHERE seq >= $2 AND seq <= $3 AND published_at IS NULL",
                  int64_t{1}, rows.front().Int(0), rows.back().Int(0)));
    });
    skiplock_s += Seconds(t0);
    if (!Check(st, "skiplock")) return 1;
    const size_t fetched = envelopes.size() - first;
    marked += static_cast<int64_t>(fetched);
    more = more || fetched > 0;

    // Ceiling 1: publish those envelopes asynchronously to a second stream, no database.
    if (fetched > 0) {
      t0 = Steady::now();
      for (const Status& ps : (*raw)->PublishBatch(std::span(envelopes).subspan(first))) {
        if (!Check(ps, "publish")) return 1;
      }
      publish_s += Seconds(t0);
      published += static_cast<int64_t>(fetched);
    }
    Progress("drain", drained + marked, events);
  }
  const double relay_rate = static_cast<double>(drained) / relay_s;
  const double skiplock_rate = static_cast<double>(marked) / skiplock_s;
  const double publish_rate = static_cast<double>(published) / publish_s;

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
  const auto t0 = Steady::now();
  for (int64_t settled = 0; settled < deliveries;) {
    auto n = consumer.RunOnce();
    if (!n) return Check(n.error(), "consume"), 1;
    settled += static_cast<int64_t>(*n);
    Progress("consume", settled, deliveries);
  }
  const double consume_rate = static_cast<double>(deliveries) / Seconds(t0);
  const converge::ConsumerStats cs = consumer.stats();

  const double slower = std::min(publish_rate, skiplock_rate);
  std::printf("relay drain PostgreSQL -> NATS, %lld events, batch %lld, interleaved:\n",
              static_cast<long long>(events), static_cast<long long>(batch));
  std::printf("  relay     %10.0f events/s   (%lld events)\n", relay_rate,
              static_cast<long long>(drained));
  std::printf("  publish   %10.0f events/s   (%lld events; ceiling: async JetStream publish, "
              "no database)\n",
              publish_rate, static_cast<long long>(published));
  std::printf("  skiplock  %10.0f events/s   (%lld events; ceiling: FOR UPDATE SKIP LOCKED fetch "
              "+ mark)\n",
              skiplock_rate, static_cast<long long>(marked));
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
