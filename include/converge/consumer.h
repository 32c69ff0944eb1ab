// Consumer: applies each delivered event once in effect, however often it is delivered.
// See docs/design/consumer-inbox.md.
//
// Per batch of deliveries, one transaction; per delivery, one savepoint in it:
//   claim (consumer, source, id) in the inbox (inbox.h) -- a duplicate: ack it, no
//   effect, count it -- then run the handler with the same Tx. Commit. Only then settle
// with the transport (acks always follow the commit). A crash anywhere before the commit
// leaves nothing behind and the transport redelivers; a crash after the commit and before
// the ack redelivers a message whose inbox row exists, which is absorbed. A transport in
// the consumer's own database (the SQL queue: Subscriber::tx_settler(), tx_publisher.h)
// is settled inside that same transaction instead: the acks commit with the effects or
// not at all, the window between them does not exist, and the batch costs one
// transaction less. That transaction also claims the next batch (TxSettler::FetchInTx),
// which runs as soon as it commits, without a claim transaction of its own; a consumer
// that stops gives back what it claimed ahead and did not start, and one whose process
// dies leaves it to come back after its visibility, one of its attempts spent (as the
// neighbours of a message that kills the process spend one). Not with max_attempts = 1,
// not ahead of suspects, and not by a batch with a retry (docs/design/consumer-inbox.md).
//
// The handler's Status decides what happens to a failed delivery:
//   transient (IsTransient) and attempts left  -> nak with exponential backoff, full jitter
//   permanent, or attempts exhausted, or the
//   envelope cannot be decoded, or no handler   -> parked in dead_letters (same
//                                                   transaction), then acked
// Never an infinite poison loop: a redelivered message (it came back unsettled: its
// handler failed, its transaction failed, or it killed the process) runs alone in its
// own transaction (one such suspect at a time per process), after its handler start was
// counted in a committed row; one whose handler ran max_attempts times without settling
// is parked before it runs again (error class "unsettled"). For suspects, retries of
// transient failures are counted in handler runs too, not in deliveries. A batch whose
// transaction fails is retried one delivery at a time at once, so one bad message never
// holds its neighbours back. A delivery whose own transaction then fails transiently
// (the store is down) is held: extended with the transport (Subscriber::Extend) and
// retried on the next pass before anything new is fetched, so an outage does not burn
// the transport's redeliveries. A notice that the transport abandoned a message
// (Delivery::abandoned) parks it unrun (error class "abandoned"). A handler must keep its
// effects inside the Tx; an external effect (email, payment) must be called with a
// deterministic key derived from the event so its provider dedupes it. A handler may run
// more than once for one delivery, a successful run included: it runs inside
// Database::Transact, whose function may run again (there); only the run whose
// transaction commits counts. Count in Tx::OnCommit, never in the handler.
//
// Retention: the inbox row must outlive every redelivery, so Validate() refuses an
// inbox_ttl shorter than visibility x max_attempts + all backoff + the dead-letter replay
// window.
//
// Thread safety: register handlers with On() before Start() or the first RunOnce();
// RunOnce must not run concurrently with itself or with Stop on one Consumer (run several
// Consumer objects for parallelism), nor Stop with Stop; stats() is safe from any thread.
#ifndef CONVERGE_CONSUMER_H_
#define CONVERGE_CONSUMER_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "converge/clock.h"
#include "converge/database.h"
#include "converge/event.h"
#include "converge/inbox.h"
#include "converge/transport.h"
#include "converge/worker.h"

namespace converge {

using namespace std::chrono_literals;

struct ConsumerOptions {
  std::string name;             // required: the inbox and dead letters are per consumer
  int max_attempts = 8;         // deliveries before a transient failure is dead-lettered
  Millis backoff_initial = 200ms;
  Millis backoff_max = 60s;
  Millis visibility = 30s;      // how long a fetched delivery stays hidden
  size_t batch = 32;            // deliveries per transaction
  Millis poll = 1s;             // safety net when no wake-up comes
  Millis inbox_ttl = 24h * 14;  // how long a dedupe row lives
  // How long after parking a dead letter may be replayed with its inbox row still there to
  // absorb it, were the message in fact applied (inbox_ttl must cover it: Validate). A
  // later replay is not refused; it is deduplicated only while that row lives.
  Millis replay_window = 24h * 7;
};

struct ConsumerStats {
  int64_t processed = 0;      // handler ran and committed
  int64_t duplicates = 0;     // absorbed by the inbox
  int64_t retries = 0;        // nakked for a later attempt
  int64_t dead_lettered = 0;  // parked
  int64_t batches = 0;
  int64_t fetch_errors = 0;   // Fetches the transport failed (unreachable, consumer gone)
  std::string last_error;
};

class Consumer {
 public:
  using Handler = std::function<Status(Tx&, const Event&)>;

  // Everything passed must outlive the consumer (its destructor calls Stop, which gives
  // back what it claimed ahead through the subscriber and db). clock nullptr =
  // Clock::System().
  Consumer(Database& db, Subscriber& subscriber, ConsumerOptions options,
           Clock* clock = nullptr);
  ~Consumer();  // stops the background thread if running

  // Handles events of `type` ("*" for any type without its own handler).
  void On(std::string type, Handler handler);

  // kInvalidArgument when the options are unsafe (empty name, no attempts, an inbox TTL
  // that does not outlive redelivery).
  Status Validate() const;

  // Fetches one batch and processes it. Returns how many deliveries it committed and
  // settled, or the first error when it settled none (unsettled deliveries come back).
  Result<size_t> RunOnce();

  // Runs batches on a background thread until Stop(). Refuses invalid options.
  Status Start();
  // Finishes the current batch and joins the thread.
  void Stop();

  ConsumerStats stats() const;
  const std::string& name() const { return options_.name; }

  // The longest time a message can keep being redelivered (visibility x attempts plus the
  // largest possible backoffs).
  Millis RedeliveryHorizon() const;

 private:
  enum class Fate { kProcessed, kDuplicate, kRetry, kDead };
  struct Decision {
    Fate fate = Fate::kProcessed;
    Settlement settlement;
  };

  // `runs`: how often the handler has run for this message, this run included; decides
  // between a retry and "exhausted". `event`: DecodeEnvelope of its envelope, decoded by
  // the caller before its transaction (on SQLite, off the one writer thread).
  Status ProcessOne(Tx& tx, const Delivery& d, const Result<Event>& event, int64_t runs,
                    int64_t now, Decision* decision);
  Status Park(Tx& tx, const Delivery& d, int64_t now, const char* error_class,
              const Status& error, Decision* decision);
  Status Park(Tx& tx, const Delivery& d, int64_t now, const char* error_class,
              const Status& error, Decision* decision, const std::string& source,
              const std::string& id);
  // First deliveries: one transaction, a savepoint each, then one settle.
  // `claim_ahead`: also claim the next batch in its transaction (claimed_ahead_).
  Status RunBatch(const std::vector<const Delivery*>& batch, bool claim_ahead);
  // A redelivered (or retried) delivery on its own, its handler start counted first.
  Status RunAlone(const Delivery& d);
  // With a subscriber that settles in the store (tx_settler_), settles the batch inside
  // `tx`, the transaction of its effects; otherwise does nothing.
  Status SettleInTx(Tx& tx, const std::vector<const Delivery*>& batch,
                    const std::vector<Decision>& decisions);
  // After the commit: acks or naks what committed, unless SettleInTx already did. A
  // failure only delays: those deliveries come back and the inbox absorbs them.
  void Settle(const std::vector<const Delivery*>& batch, const std::vector<Decision>& decisions);
  const Handler* FindHandler(const std::string& type) const;
  Millis Backoff(int64_t attempts) const;

  Database& db_;
  Subscriber& subscriber_;
  TxSettler* const tx_settler_;  // subscriber_'s, on db_; or nullptr
  const ConsumerOptions options_;
  Clock* clock_;
  const Inbox inbox_;
  std::map<std::string, Handler, std::less<>> handlers_;

  // Deliveries whose transaction failed transiently (the store may be down), held and
  // retried before the next Fetch; only RunOnce touches it.
  std::vector<Delivery> held_;
  // The next batch, claimed in the transaction that committed the last one's effects
  // (TxSettler::FetchInTx) and run next instead of a Fetch; only RunOnce touches it, and
  // Stop gives it back once the worker has stopped.
  std::vector<Delivery> claimed_ahead_;

  mutable std::mutex stats_mu_;
  ConsumerStats stats_;
  PollingWorker worker_;  // last: stopped and destroyed before what its passes use
};

}  // namespace converge

#endif  // CONVERGE_CONSUMER_H_
