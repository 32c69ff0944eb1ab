#include "converge/outbox.h"

#include <nlohmann/json.hpp>

#include "converge/tx_publisher.h"
#include "src/core/crypto.h"
#include "src/core/envelope.h"
#include "src/core/relay_internal.h"
#include "src/core/validate.h"

namespace converge {
namespace {

using json = nlohmann::json;

bool IsLowerHex(std::string_view s) {
  for (char c : s) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

// W3C Trace Context: 00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>
bool ValidTraceparent(std::string_view t) {
  return t.size() == 55 && t[2] == '-' && t[35] == '-' && t[52] == '-' &&
         IsLowerHex(t.substr(0, 2)) && IsLowerHex(t.substr(3, 32)) &&
         IsLowerHex(t.substr(36, 16)) && IsLowerHex(t.substr(53, 2));
}

Status ValidateEvent(const Event& e) {
  CONVERGE_RETURN_IF_ERROR(internal::ValidateToken("event id", e.id, 255));
  CONVERGE_RETURN_IF_ERROR(internal::ValidateToken("event source", e.source, 255));
  CONVERGE_RETURN_IF_ERROR(internal::ValidateToken("event type", e.type, 255));
  CONVERGE_RETURN_IF_ERROR(internal::ValidateToken("event subject", e.subject, 255));
  CONVERGE_RETURN_IF_ERROR(internal::ValidateToken("event aggregate type", e.aggregate_type, 255));
  if (!e.traceparent.empty() && !ValidTraceparent(e.traceparent)) {
    return InvalidArgumentError("event traceparent '" + e.traceparent +
                                "' is not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)");
  }
  return OkStatus();
}

}  // namespace

int64_t OutboxPartition(std::string_view subject) {
  uint32_t h = 2166136261u;
  for (unsigned char c : subject) {
    h ^= c;
    h *= 16777619u;
  }
  return static_cast<int64_t>(h % static_cast<uint32_t>(kOutboxPartitions));
}

Outbox::Outbox(OutboxOptions options, Clock* clock)
    : options_(std::move(options)), clock_(clock ? clock : Clock::System()) {}

Result<PreparedEvent> Outbox::Prepare(Event e) const {
  const int64_t now = clock_->NowMillis();
  if (e.id.empty()) e.id = internal::NewUuidV7(now);
  if (e.source.empty()) e.source = options_.source;
  if (e.time == 0) e.time = now;
  if (e.aggregate_type.empty()) e.aggregate_type = e.type.substr(0, e.type.find('.'));
  CONVERGE_RETURN_IF_ERROR(ValidateEvent(e));
  CONVERGE_ASSIGN_OR_RETURN(const json data, internal::ParseEventData(e.data));
  PreparedEvent p;
  p.headers_ = "{}";
  try {
    if (!e.traceparent.empty()) p.headers_ = json{{"traceparent", e.traceparent}}.dump();
    e.envelope = internal::EncodeEnvelope(e, data);
  } catch (const json::exception&) {
    // dump() refuses text that is not UTF-8; the data was checked above, so a field was.
    return tl::unexpected(InvalidArgumentError(
        "an event field (id, source, type, subject, aggregate type or traceparent) is not "
        "UTF-8"));
  }
  p.partition_ = OutboxPartition(e.subject);
  p.lock_key_ = internal::OutboxLockKey(e.subject);
  p.event_ = std::move(e);
  return p;
}

Result<std::string> Outbox::Enqueue(Tx& tx, Event e) {
  CONVERGE_ASSIGN_OR_RETURN(PreparedEvent p, Prepare(std::move(e)));
  return Enqueue(tx, p);
}

Result<std::string> Outbox::Enqueue(Tx& tx, const PreparedEvent& p) {
  const Event& e = p.event_;
  // Per-aggregate order under concurrent producers: `seq` is drawn at insert, so two
  // transactions enqueueing for one aggregate could commit in the opposite order of their
  // seqs, and the relay would publish the later event first. Holding a per-aggregate lock
  // until commit makes the second producer draw its seq only after the first committed.
  CONVERGE_RETURN_IF_ERROR(tx.LockUntilCommit(p.lock_key_));
  if (TxPublisher* direct = direct_.load(std::memory_order_acquire); direct != nullptr) {
    // Published here only if no event waits for a relay. Read after the lock: every
    // earlier producer of this aggregate has committed by then, so its event is either
    // still unpublished (and seen here) or on the queue already, ahead of this one. On
    // PostgreSQL a relay's transaction that has not committed yet leaves its events
    // unpublished to this read, so they are seen too. Any aggregate's waiting event sends
    // this one the relay's way: the partial index answers "any?" at once, and a per-
    // aggregate answer would need the index by partition that SQLite stores do without.
    CONVERGE_ASSIGN_OR_RETURN(
        Rows waiting,
        tx.Query("SELECT seq FROM outbox_events WHERE published_at IS NULL LIMIT 1"));
    if (waiting.empty()) {
      const int64_t now = clock_->NowMillis();
      CONVERGE_RETURN_IF_ERROR(tx.ExecDeferred(
          DeferredCheck::None(),
          "INSERT INTO outbox_events (event_id, source, aggregate_type, aggregate_id, "
          "type, payload, headers, created_at, partition_no, published_at, "
          "publish_attempts) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $8, 1)",
          e.id, e.source, e.aggregate_type, e.subject, e.type, e.envelope, p.headers_, now,
          p.partition_));
      CONVERGE_RETURN_IF_ERROR(direct->PublishInTx(tx, std::span<const Event>(&e, 1)));
      tx.OnCommit([this] { in_transaction_.fetch_add(1, std::memory_order_relaxed); });
      return e.id;
    }
  }
  // Deferred (Tx::ExecDeferred), like the lock: a duplicate event id still fails the
  // transaction with kAlreadyExists, at the latest from its commit.
  CONVERGE_RETURN_IF_ERROR(tx.ExecDeferred(
      DeferredCheck::None(),
      "INSERT INTO outbox_events (event_id, source, aggregate_type, aggregate_id, "
      "type, payload, headers, created_at, partition_no) "
      "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
      e.id, e.source, e.aggregate_type, e.subject, e.type, e.envelope, p.headers_,
      clock_->NowMillis(), p.partition_));
  tx.OnCommit([this] {
    for_relay_.fetch_add(1, std::memory_order_relaxed);
    wakeup_.Notify();
  });
  CONVERGE_RETURN_IF_ERROR(tx.Notify(kOutboxChannel));
  return e.id;
}

}  // namespace converge
