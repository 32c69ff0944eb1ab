#include "converge/consumer.h"

#include <algorithm>

#include "converge/dead_letters.h"
#include "converge/failpoint.h"
#include "converge/tx_publisher.h"
#include "src/core/backoff.h"

namespace converge {
namespace {

// The subscriber's transactional face if it settles through `db`, else nullptr.
TxSettler* TxSettlerOn(Database& db, Subscriber& subscriber) {
  TxSettler* settler = subscriber.tx_settler();
  return settler != nullptr && settler->database() == &db ? settler : nullptr;
}

}  // namespace

Consumer::Consumer(Database& db, Subscriber& subscriber, ConsumerOptions options, Clock* clock)
    : db_(db),
      subscriber_(subscriber),
      tx_settler_(TxSettlerOn(db, subscriber)),
      options_(std::move(options)),
      clock_(clock ? clock : Clock::System()),
      inbox_(clock_),
      worker_("consumer " + options_.name, options_.poll,
              [this] {
                // Again at once while messages come: a transport that hands out one
                // message per aggregate at a time (the SQL queue) returns short batches
                // with more behind them.
                Result<size_t> r = RunOnce();
                return r && *r > 0;
              },
              subscriber_.wakeup()) {}

Consumer::~Consumer() { Stop(); }

void Consumer::On(std::string type, Handler handler) {
  handlers_[std::move(type)] = std::move(handler);
}

const Consumer::Handler* Consumer::FindHandler(const std::string& type) const {
  auto it = handlers_.find(type);
  if (it == handlers_.end()) it = handlers_.find("*");
  return it == handlers_.end() ? nullptr : &it->second;
}

Millis Consumer::RedeliveryHorizon() const {
  // Every attempt may hold the message for a full visibility timeout, and every retry
  // may wait up to backoff_max.
  return options_.visibility * options_.max_attempts +
         options_.backoff_max * std::max(0, options_.max_attempts - 1);
}

Status Consumer::Validate() const {
  if (options_.name.empty()) return InvalidArgumentError("consumer name is empty");
  if (options_.max_attempts < 1) return InvalidArgumentError("max_attempts must be >= 1");
  if (options_.batch < 1) return InvalidArgumentError("batch must be >= 1");
  if (options_.visibility <= Millis(0) || options_.backoff_initial < Millis(0) ||
      options_.backoff_max < options_.backoff_initial) {
    return InvalidArgumentError(
        "visibility must be positive and 0 <= backoff_initial <= backoff_max");
  }
  Millis needed = RedeliveryHorizon() + options_.replay_window;
  if (options_.inbox_ttl <= needed) {
    return InvalidArgumentError(
        "consumer '" + options_.name + "': inbox_ttl " +
        std::to_string(options_.inbox_ttl.count()) + " ms does not outlive redelivery (" +
        std::to_string(RedeliveryHorizon().count()) + " ms) plus the dead-letter replay window (" +
        std::to_string(options_.replay_window.count()) +
        " ms): a late duplicate would be applied again");
  }
  return OkStatus();
}

Millis Consumer::Backoff(int64_t attempts) const {
  return internal::FullJitterBackoff(attempts, options_.backoff_initial, options_.backoff_max);
}

// Parks the delivery and settles it in the inbox as dead-lettered, so a redelivery of
// the same message (a lost ack) is absorbed instead of parked twice. A replay removes
// that inbox row again.
Status Consumer::Park(Tx& tx, const Delivery& d, int64_t now, const char* error_class,
                      const Status& error, Decision* decision) {
  return Park(tx, d, now, error_class, error, decision, d.event.source, d.event.id);
}

Status Consumer::Park(Tx& tx, const Delivery& d, int64_t now, const char* error_class,
                      const Status& error, Decision* decision, const std::string& source,
                      const std::string& id) {
  CONVERGE_ASSIGN_OR_RETURN(
      InboxClaim claim, inbox_.MarkDeadLettered(tx, options_.name, {source, id},
                                                options_.inbox_ttl));
  // Its start count goes with it (RunAlone keys it by the transport's identity): a count
  // left behind would cut a replay's attempts short. An abandoned notice is parked in a
  // batch, after starts counted by earlier RunAlone tries (found by review).
  CONVERGE_RETURN_IF_ERROR(tx.Exec(
      "DELETE FROM consumer_starts WHERE consumer = $1 AND source = $2 AND event_id = $3",
      options_.name, d.event.source, d.event.id));
  decision->settlement = Settlement{Settlement::Kind::kAck, Millis(0), {}};
  if (claim == InboxClaim::kDuplicate) {
    decision->fate = Fate::kDuplicate;
    return OkStatus();
  }
  decision->fate = Fate::kDead;
  decision->settlement.kind = Settlement::Kind::kTerm;  // parked: never deliver it again
  DeadLetter letter;
  letter.consumer = options_.name;
  letter.queue = d.queue;
  letter.event_id = id;
  letter.source = source;
  letter.type = d.event.type;
  letter.envelope = d.event.envelope;
  letter.error_class = error_class;
  letter.error_code = std::string(StatusCodeName(error.code()));
  letter.error = error.message();
  letter.attempts = d.attempts;
  letter.first_failure_at = d.first_failure_at ? d.first_failure_at : now;
  letter.last_failure_at = now;
  return StatusOf(DeadLetters::Park(tx, letter));
}

Status Consumer::ProcessOne(Tx& tx, const Delivery& d, const Result<Event>& event,
                            int64_t runs, int64_t now, Decision* decision) {
  const std::string* source = &d.event.source;
  const std::string* id = &d.event.id;

  auto park = [&](const char* error_class, const Status& error) -> Status {
    return Park(tx, d, now, error_class, error, decision, *source, *id);
  };
  if (!event) return park("decode", event.error());
  // The envelope is the identity end to end; the transport's copy is only a fallback.
  source = &event->source;
  id = &event->id;
  if (d.abandoned) {
    // The transport gave up on it (NATS MaxDeliver): park it unrun, so it is not lost.
    return park("abandoned",
                AbortedError("the transport stopped delivering it after " +
                             std::to_string(d.attempts) + " deliveries (NATS MaxDeliver); "
                             "last error: " +
                             (d.last_error.empty() ? std::string("none recorded") : d.last_error)));
  }
  const Handler* handler = FindHandler(event->type);
  if (handler == nullptr) {
    return park("no_handler", FailedPreconditionError("consumer '" + options_.name +
                                                      "' has no handler for '" +
                                                      event->type + "'"));
  }

  Status handled = tx.Savepoint([&](Tx& inner) -> Status {
    CONVERGE_ASSIGN_OR_RETURN(
        InboxClaim claim,
        inbox_.Claim(inner, options_.name, event->identity(), options_.inbox_ttl));
    if (claim == InboxClaim::kDuplicate) {
      decision->fate = Fate::kDuplicate;
      return OkStatus();
    }
    decision->fate = Fate::kProcessed;
    try {
      return (*handler)(inner, *event);
    } catch (const std::exception& e) {
      return InternalError(std::string("handler threw: ") + e.what());
    }
  });
  if (handled.ok()) {
    decision->settlement = Settlement{Settlement::Kind::kAck, Millis(0), {}};
    return OkStatus();
  }
  if (handled.transient() && runs < options_.max_attempts) {
    decision->fate = Fate::kRetry;
    decision->settlement = Settlement{Settlement::Kind::kNak, Backoff(runs), handled.ToString()};
    return OkStatus();
  }
  return park(handled.transient() ? "exhausted" : "permanent", handled);
}

Result<size_t> Consumer::RunOnce() {
  CONVERGE_RETURN_IF_ERROR(Validate());
  // Deliveries held from an earlier pass (their transaction failed transiently: the
  // store may be down) are retried before anything new is fetched, each on its own,
  // after their hold is extended. A store outage therefore costs the transport no
  // redeliveries: with NATS, every redelivery counts against MaxDeliver, and a message
  // redelivered through a long outage would be dropped by the server.
  std::vector<Delivery> deliveries;
  std::vector<const Delivery*> fresh, suspects;
  if (!held_.empty()) {
    deliveries.swap(held_);
    if (!subscriber_.Extend(deliveries, options_.visibility).ok()) {
      deliveries.clear();  // the transport cannot hold them: they come back by themselves
    }
    for (const Delivery& d : deliveries) suspects.push_back(&d);
  }
  if (deliveries.empty()) {
    if (!claimed_ahead_.empty()) {
      deliveries.swap(claimed_ahead_);  // claimed by the last batch's transaction
    } else {
      Result<std::vector<Delivery>> fetched =
          subscriber_.Fetch(options_.batch, options_.visibility);
      if (!fetched) {
        std::lock_guard<std::mutex> l(stats_mu_);
        ++stats_.fetch_errors;
        stats_.last_error = fetched.error().ToString();
        return tl::unexpected(fetched.error());
      }
      deliveries = std::move(*fetched);
    }
    if (deliveries.empty()) return size_t{0};
    // First deliveries share one transaction. A redelivered message came back without
    // being settled: its handler may have failed, its transaction may fail every time, or
    // it may kill the process. Each such suspect runs alone, so it cannot take innocent
    // neighbours down with it, and its handler starts are counted durably. A notice of an
    // abandoned message only parks it.
    for (const Delivery& d : deliveries) {
      (d.attempts > 1 && !d.abandoned ? suspects : fresh).push_back(&d);
    }
  }
  Status first_error;
  size_t settled = 0;
  if (!fresh.empty()) {
    // The next batch is claimed ahead only when nothing runs after this one in this pass:
    // suspects run alone, slowly or fatally, and a batch claimed before them could
    // outlast its visibility unstarted, or be charged a run by their crash.
    Status st = RunBatch(fresh, /*claim_ahead=*/suspects.empty());
    if (st.ok()) {
      settled += fresh.size();
    } else {
      // Nothing of the batch committed. Retry its deliveries one at a time right away,
      // so one bad message cannot hold the others back.
      first_error = st;
      suspects.insert(suspects.begin(), fresh.begin(), fresh.end());
    }
  }
  std::vector<Delivery> hold;
  for (const Delivery* d : suspects) {
    Status st = RunAlone(*d);
    if (st.ok()) {
      ++settled;
      continue;
    }
    if (first_error.ok()) first_error = st;
    // Not even its start could be counted, or its transaction failed transiently: keep
    // it and try again next pass (each try that reaches the store counts a start, so a
    // message whose transaction fails while the store works is still parked in the end).
    if (st.transient()) hold.push_back(*d);
  }
  held_ = std::move(hold);
  if (!first_error.ok()) {
    std::lock_guard<std::mutex> l(stats_mu_);
    stats_.last_error = first_error.ToString();
    if (settled == 0) return tl::unexpected(first_error);
  }
  return settled;
}

namespace {
// A batch and its decisions in the shape a transport settles them (Decision is private to
// Consumer, hence deduced).
template <typename Decision>
void Unpack(const std::vector<const Delivery*>& batch, const std::vector<Decision>& decisions,
            std::vector<Delivery>* deliveries, std::vector<Settlement>* settlements) {
  deliveries->reserve(batch.size());
  settlements->reserve(batch.size());
  for (size_t i = 0; i < batch.size(); ++i) {
    deliveries->push_back(*batch[i]);
    settlements->push_back(decisions[i].settlement);
  }
}
}  // namespace

Status Consumer::RunBatch(const std::vector<const Delivery*>& batch, bool claim_ahead) {
  std::vector<Decision> decisions;
  std::vector<Delivery> next;
  // A process killed while a batch is claimed ahead costs that batch one of its attempts
  // (it comes back delivered once, unstarted, as a crashed batch's neighbours do): with
  // a single attempt it would be parked without ever running.
  claim_ahead = claim_ahead && tx_settler_ != nullptr && options_.max_attempts >= 2;
  // Decoded here, before the transaction: on SQLite its body runs on the one writer
  // thread, which every caller's transaction waits for (issue 10: the decode was a tenth
  // of that thread's time in the end-to-end benchmark).
  std::vector<Result<Event>> events;
  events.reserve(batch.size());
  for (const Delivery* d : batch) events.push_back(DecodeEnvelope(d->event.envelope));
  Status st = db_.Transact([&](Tx& tx) -> Status {
    decisions.assign(batch.size(), Decision{});
    next.clear();
    const int64_t now = clock_->NowMillis();
    for (size_t i = 0; i < batch.size(); ++i) {
      CONVERGE_RETURN_IF_ERROR(
          ProcessOne(tx, *batch[i], events[i], batch[i]->attempts, now, &decisions[i]));
    }
    CONVERGE_RETURN_IF_ERROR(SettleInTx(tx, batch, decisions));
    // The next batch, claimed in this transaction: durable with it (a handler that kills
    // the process is counted as before), and run at once after it, without a claim
    // transaction of its own. It sees this batch's acks, so an aggregate's next message
    // can come with it. A claim that fails leaves this batch alone: the consumer fetches.
    // Not after a retry: a nak whose backoff drew 0 would be claimed again by the very
    // transaction that nakked it (found in CI: ServiceEarlyRefund).
    const bool retried = std::any_of(decisions.begin(), decisions.end(), [](const Decision& d) {
      return d.fate == Fate::kRetry;
    });
    if (claim_ahead && !retried) {
      Status claimed = tx.Savepoint([&](Tx& inner) -> Status {
        CONVERGE_ASSIGN_OR_RETURN(
            next, tx_settler_->FetchInTx(inner, options_.batch, options_.visibility));
        return OkStatus();
      });
      if (!claimed.ok()) next.clear();
    }
    return failpoint::Hit("consumer.before_commit");
  });
  if (!st.ok()) {
    // Nothing committed, the claim ahead neither; unless the commit's outcome is unknown
    // (PostgreSQL: the connection broke after COMMIT was sent). What it claimed is given
    // back then, or it would wait out its visibility unstarted. Only rows still under
    // this claim are touched, so this is safe whichever way the commit went.
    if (!next.empty()) {
      (void)db_.Transact([&](Tx& tx) { return tx_settler_->ReleaseInTx(tx, next); });
    }
    return st;
  }
  claimed_ahead_ = std::move(next);
  Settle(batch, decisions);
  return OkStatus();
}

Status Consumer::SettleInTx(Tx& tx, const std::vector<const Delivery*>& batch,
                            const std::vector<Decision>& decisions) {
  if (tx_settler_ == nullptr) return OkStatus();
  std::vector<Delivery> deliveries;
  std::vector<Settlement> settlements;
  Unpack(batch, decisions, &deliveries, &settlements);
  return tx_settler_->SettleInTx(tx, deliveries, settlements);
}

namespace {
// One suspect at a time per process, across every consumer: a suspect that kills the
// process must not take another consumer's suspect down with it (their starts would be
// counted against a message that never failed). On SQLite this also keeps two suspects
// out of one group commit.
std::mutex g_suspect_mu;
}  // namespace

Status Consumer::RunAlone(const Delivery& d) {
  std::lock_guard<std::mutex> alone(g_suspect_mu);
  // Count this start in its own committed transaction first: if the handler kills the
  // process, the count survives and names the culprit (its neighbours, not started, keep
  // theirs).
  int64_t starts = 0;
  CONVERGE_RETURN_IF_ERROR(db_.Transact([&](Tx& tx) -> Status {
    CONVERGE_ASSIGN_OR_RETURN(
        Rows rows,
        tx.Query("INSERT INTO consumer_starts (consumer, source, event_id, starts) "
                 "VALUES ($1, $2, $3, 1) ON CONFLICT (consumer, source, event_id) "
                 "DO UPDATE SET starts = consumer_starts.starts + 1 RETURNING starts",
                 options_.name, d.event.source, d.event.id));
    starts = rows.empty() ? 1 : rows[0].Int(0);
    return OkStatus();
  }));
  std::vector<Decision> decision(1);
  const std::vector<const Delivery*> one = {&d};
  const Result<Event> decoded = DecodeEnvelope(d.event.envelope);
  Status st = db_.Transact([&](Tx& tx) -> Status {
    decision.assign(1, Decision{});
    const int64_t now = clock_->NowMillis();
    // Handler runs so far, this one included: the counted starts plus the first delivery,
    // which ran uncounted in a batch. The transport's delivery count is no measure here:
    // a message fetched alongside a killer is redelivered each time the process dies,
    // without its handler having run.
    const int64_t runs = starts + 1;
    if (runs > options_.max_attempts) {
      // Started max_attempts times and never settled: do not run it again. Parked under
      // the envelope's identity, as ProcessOne claims and parks (NATS's routing copy is
      // the message id, a replayed copy's suffixed), so that a redelivery of it (its
      // settlement lost) is absorbed by the inbox, not run again (found by review).
      CONVERGE_RETURN_IF_ERROR(Park(
          tx, d, now, "unsettled",
          AbortedError("handler started " + std::to_string(runs - 1) +
                       " times without settling (it may crash its process, or its "
                       "transaction fails every time); last error: " +
                       (d.last_error.empty() ? std::string("none recorded") : d.last_error)),
          &decision[0], decoded ? decoded->source : d.event.source,
          decoded ? decoded->id : d.event.id));
    } else {
      CONVERGE_RETURN_IF_ERROR(ProcessOne(tx, d, decoded, runs, now, &decision[0]));
    }
    // The count goes with the message's last settlement; a retry (nak) keeps counting.
    if (decision[0].fate != Fate::kRetry) {
      CONVERGE_RETURN_IF_ERROR(tx.Exec(
          "DELETE FROM consumer_starts WHERE consumer = $1 AND source = $2 AND event_id = $3",
          options_.name, d.event.source, d.event.id));
    }
    CONVERGE_RETURN_IF_ERROR(SettleInTx(tx, one, decision));
    return failpoint::Hit("consumer.before_commit");
  });
  if (!st.ok()) return st;  // the start stays counted; the delivery comes back
  Settle(one, decision);
  return OkStatus();
}

void Consumer::Settle(const std::vector<const Delivery*>& batch,
                      const std::vector<Decision>& decisions) {
  // Settled in the transaction that just committed (SettleInTx), or now, after it.
  Status settled = failpoint::Hit("consumer.after_commit_before_ack");
  if (settled.ok() && tx_settler_ == nullptr) {
    std::vector<Delivery> deliveries;
    std::vector<Settlement> settlements;
    Unpack(batch, decisions, &deliveries, &settlements);
    settled = subscriber_.Settle(deliveries, settlements);
  }
  std::lock_guard<std::mutex> l(stats_mu_);
  ++stats_.batches;
  for (const Decision& d : decisions) {
    switch (d.fate) {
      case Fate::kProcessed: ++stats_.processed; break;
      case Fate::kDuplicate: ++stats_.duplicates; break;
      case Fate::kRetry: ++stats_.retries; break;
      case Fate::kDead: ++stats_.dead_lettered; break;
    }
  }
  // Unsettled deliveries whose effects committed come back and hit the inbox.
  if (!settled.ok()) stats_.last_error = settled.ToString();
}

Status Consumer::Start() {
  CONVERGE_RETURN_IF_ERROR(Validate());
  worker_.Start();
  return OkStatus();
}

void Consumer::Stop() {
  worker_.Stop();
  if (claimed_ahead_.empty() || tx_settler_ == nullptr) return;
  // Given back, so that they do not wait out their visibility and come back as suspects
  // (run alone) when nothing of theirs ever ran.
  Status st = db_.Transact(
      [&](Tx& tx) { return tx_settler_->ReleaseInTx(tx, claimed_ahead_); });
  if (st.ok()) {
    claimed_ahead_.clear();
    return;
  }
  // Kept: a later Start or RunOnce runs them while their claim lasts.
  std::lock_guard<std::mutex> l(stats_mu_);
  stats_.last_error = "giving back deliveries claimed ahead: " + st.ToString();
}

ConsumerStats Consumer::stats() const {
  std::lock_guard<std::mutex> l(stats_mu_);
  return stats_;
}

}  // namespace converge
