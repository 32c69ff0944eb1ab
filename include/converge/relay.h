// The outbox relay: publishes committed outbox events at least once, in order per
// aggregate (event subject). See docs/design/outbox-relay.md.
//
// Each pass claims the oldest unpublished events by `seq` ("published_at IS NULL", never
// "seq greater than the last seen": a transaction that took a lower seq but committed
// later is still picked up), publishes them, then marks them published. A failed publish
// stops its aggregate for this pass (later events of that aggregate wait, so order holds)
// while other aggregates go on. A crash between publish and mark publishes again: the
// at-least-once contract, absorbed by broker dedupe ids and consumer inboxes. When the
// publisher has a transactional face on the outbox's own database (a TxPublisher,
// tx_publisher.h: the SQL queue), publish and mark are one local transaction and the
// window does not exist.
//
// An event the broker refuses for good (a permanent error: NATS refuses a type that is not
// a valid subject, or a message over its max_payload) is parked in dead_letters (consumer
// "relay", queue kRelayDeadLetterQueue, error class "refused") in the transaction that
// marks the batch, and its row is marked done, so it no longer heads every claim. Like a
// message a consumer parks, it does not hold its aggregate back: the aggregate's later
// events go on (docs/design/outbox-relay.md, "Events the broker refuses"). Replaying the
// letter (OutboxRequeuer) makes the row unpublished again, so the relay publishes it once
// more. Transient failures keep stopping their aggregate, as above.
//
// Several relays may share one outbox (several processes on PostgreSQL). Events are
// spread over kOutboxPartitions partitions by a stable hash of their subject; each
// partition has one owner at a time, recorded in relay_partitions with a lease and a
// fencing token. Each Acquire (every pass, or every acquire_interval: RelayOptions) renews
// the leases it holds, takes free or expired partitions up to a fair share (partitions /
// live relays), and hands back any excess; an owner that dies loses its partitions when
// its lease runs out, and the taker raises the fence.
// Marks (and, with a shared database, the publish itself) commit only in a transaction
// that still holds the partition at the same fence, so a relay that lost its partition
// cannot mark what the new owner is publishing. See docs/design/postgresql.md.
//
// Thread safety: RunOnce must not run concurrently with itself; Start/Stop are for one
// owner thread; stats() is safe from any thread.
#ifndef CONVERGE_RELAY_H_
#define CONVERGE_RELAY_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>

#include "converge/clock.h"
#include "converge/database.h"
#include "converge/dead_letters.h"
#include "converge/outbox.h"
#include "converge/transport.h"
#include "converge/worker.h"
#include "converge/tx_publisher.h"

namespace converge {

// The queue of the dead letters the relay parks (events the broker refused for good).
inline constexpr std::string_view kRelayDeadLetterQueue = "relay:outbox";

// Replays a letter the relay parked: its outbox row becomes unpublished again, in the
// replay's transaction, and the relay publishes it on a later pass. kNotFound when the
// row is gone (swept after the published retention). Route it in DeadLetters for
// kRelayDeadLetterQueue.
class OutboxRequeuer : public Requeuer {
 public:
  Status Requeue(Tx& tx, const DeadLetter& letter) override;
};

struct RelayOptions {
  size_t batch = 256;                           // events claimed per pass
  Millis poll = std::chrono::milliseconds(500);  // safety net when no wake-up comes
  Millis lease = std::chrono::seconds(10);       // partition ownership
  // A pass reuses the partitions it holds when the last Acquire (which reads every
  // partition's row, renews its own, takes and sheds) is younger than this, measured on
  // the relay's clock; the pass renews only the partitions it publishes from. The mark
  // (and a shared-database publish) still commits only under each partition's fence, so
  // ownership stays proven; a new relay gets its share, and a superseded incarnation
  // learns it, up to this much later. Meanwhile a superseded incarnation publishing
  // inside its transactions publishes nothing (the pass renews under the fences before
  // it publishes); one publishing to an external broker may publish the head of the
  // backlog again, unmarked, until then (at least once; the broker's or the inbox's
  // dedupe drops it). 0: every pass acquires. Unset: lease / 10 when the relay publishes
  // inside its transactions (on a busy embedded store, the Acquire of every pass was 11%
  // of the process's time end to end: docs/benchmarks.md), every pass otherwise.
  // A longer one is cut to lease / 2 less the idle wait (min(poll, lease / 3)), so that
  // the partitions a pass does not publish from are renewed in time. Passes must also stay
  // well within that half lease: longer ones let those leases lapse, and other relays
  // take them over (needless takeovers; the fences still hold).
  std::optional<Millis> acquire_interval;
  // This relay's owner id: unique among live relays. A restarted relay that reuses its
  // name takes its partitions back at once, raising their fences; the previous
  // incarnation, if still alive, can no longer mark (nor publish inside its transactions),
  // and from its next Acquire on owns nothing (RunOnce answers kFailedPrecondition:
  // superseded). A new name waits for the old leases to lapse.
  // Empty: a random one.
  std::string name;
};

struct RelayStats {
  int64_t partitions_owned = 0;
  int64_t published = 0;
  int64_t publish_failures = 0;
  int64_t refused = 0;  // refused by the broker for good: parked as dead letters
  int64_t passes = 0;
  std::string last_error;
};

class Relay {
 public:
  // Everything passed must outlive the relay. clock nullptr = Clock::System(). When
  // publisher.tx_publisher() writes to `db`, the relay publishes through it inside its
  // own transactions; otherwise it publishes with Publisher::Publish, then marks.
  Relay(Database& db, Outbox& outbox, Publisher& publisher, RelayOptions options = {},
        Clock* clock = nullptr);
  ~Relay();  // stops the background thread if running

  // One pass. Returns how many events were published and marked.
  Result<size_t> RunOnce();

  // Runs passes on a background thread: straight on while batches come back full, else
  // waiting for the outbox wake-up or the poll interval.
  void Start();
  // Finishes the current pass and joins the thread.
  void Stop();

  RelayStats stats() const;
  // Its name in relay_members (RelayOptions::name, or the random one it drew).
  const std::string& name() const { return name_; }

 private:
  // Renews, takes and sheds partition leases in a transaction of its own; returns
  // partition -> fence held.
  Result<std::map<int64_t, int64_t>> Acquire();
  // Acquire's work inside `tx`: *owned becomes partition -> fence held once tx commits.
  // kFailedPrecondition: this incarnation was superseded.
  Status AcquireIn(Tx& tx, std::map<int64_t, int64_t>* owned);
  // Records the outcome of an acquiring transaction (held_; cleared when superseded).
  Result<std::map<int64_t, int64_t>> Acquired(const Status& st,
                                              std::map<int64_t, int64_t> owned);
  // Renews the lease of `partition` if this relay still holds it at `fence`.
  Result<bool> StillOwns(Tx& tx, int64_t partition, int64_t fence, int64_t now);
  // StillOwns for every partition in `partitions` (held at owned.at(p)), in one statement
  // when all are still this relay's; returns those that are. Those found taken over
  // leave held_.
  Result<std::set<int64_t>> Renew(Tx& tx, const std::set<int64_t>& partitions,
                                  const std::map<int64_t, int64_t>& owned, int64_t now);
  // Claims, publishes and marks in one transaction; with `acquired`, acquires in it too
  // (AcquireIn) and claims in what it then holds, else in `held`.
  Result<size_t> RunShared(const std::map<int64_t, int64_t>& held,
                           std::map<int64_t, int64_t>* acquired);
  Result<size_t> RunSeparate(const std::map<int64_t, int64_t>& owned);
  void ReleaseAll();

  Database& db_;
  Outbox& outbox_;
  Publisher& publisher_;
  TxPublisher* const tx_publisher_;  // publisher_'s, on db_; or nullptr
  const RelayOptions options_;
  const Millis acquire_every_;  // options_.acquire_interval, or its default
  Clock* clock_;
  std::string name_;
  // Partition -> fence this incarnation acquired, and the incarnation's number from the
  // store-wide sequence (0 until the first pass); only the RunOnce thread uses them.
  std::map<int64_t, int64_t> held_;
  int64_t incarnation_ = 0;
  int64_t acquired_at_ = 0;  // clock millis of the last successful Acquire
  // Subjects whose publish failed in the last pass (RunSeparate puts them last); only the
  // RunOnce thread uses it.
  std::set<std::string> failing_subjects_;
  bool cut_short_ = false;  // the last RunSeparate left events unattempted: run again

  int64_t listener_ = 0;
  mutable std::mutex stats_mu_;
  RelayStats stats_;
  PollingWorker worker_;  // last: stopped and destroyed before what its passes use
};

}  // namespace converge

#endif  // CONVERGE_RELAY_H_
