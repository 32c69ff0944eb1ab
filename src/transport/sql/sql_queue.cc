#include "converge/sql_queue.h"

#include <algorithm>

#include "src/core/crypto.h"
#include "src/core/validate.h"

namespace converge {
namespace {

// What a delivery's handle holds: the row and the claim token of the fetch that handed
// it out. Settling checks both, so a delivery whose visibility ran out and that someone
// else fetched again is not touched.
struct RowClaim {
  int64_t id = 0;
  std::string token;
};

Status RequireEnvelope(const Event& e) {
  if (e.envelope.empty()) {
    return InvalidArgumentError("event '" + e.id + "' has no envelope to put on the queue");
  }
  return OkStatus();
}

// Settle's preconditions: one settlement per delivery, each handed out by this queue.
Status CheckSettlements(std::span<const Delivery> deliveries,
                        std::span<const Settlement> settlements) {
  if (deliveries.size() != settlements.size()) {
    return InvalidArgumentError("Settle: one settlement per delivery");
  }
  for (const Delivery& d : deliveries) {
    if (d.handle.As<RowClaim>() == nullptr) {
      return InvalidArgumentError("Settle: a delivery the SQL queue did not hand out");
    }
  }
  return OkStatus();
}

}  // namespace

bool SqlQueue::Matches(std::string_view pattern, std::string_view type) {
  if (pattern == "*" || pattern == type) return true;
  if (pattern.size() >= 2 && pattern.substr(pattern.size() - 2) == ".*") {
    std::string_view prefix = pattern.substr(0, pattern.size() - 1);  // keeps the '.'
    return type.size() > prefix.size() && type.substr(0, prefix.size()) == prefix;
  }
  return false;
}

class SqlQueue::QueueSubscriber : public Subscriber, public TxSettler {
 public:
  QueueSubscriber(SqlQueue* q, std::string queue) : q_(q), queue_(std::move(queue)) {}

  Result<std::vector<Delivery>> Fetch(size_t max, Millis visibility) override {
    std::vector<Delivery> out;
    Status st = q_->db_.Transact([&](Tx& tx) -> Status {
      CONVERGE_ASSIGN_OR_RETURN(out, FetchInTx(tx, max, visibility));
      return OkStatus();
    });
    if (!st.ok()) return tl::unexpected(st);
    return out;
  }

  Result<std::vector<Delivery>> FetchInTx(Tx& tx, size_t max, Millis visibility) override {
    std::vector<Delivery> out;
    const int64_t now = q_->clock_->NowMillis();
    const std::string token = internal::RandomHex(8);
    // The outer visible_at condition repeats the inner one: after waiting on a row lock,
    // PostgreSQL re-checks only the outer WHERE (on SQLite it is the same test twice).
    // Order per aggregate: only the oldest message of a subject can be claimed. A later
    // one waits while an earlier one is in flight, waits out a retry's backoff or its
    // visibility timeout, and goes once that one is acked or parked (deleted). Without
    // this a redelivered "captured" came after the "refunded" of the same payment
    // (docs/design/chaos.md, "Findings"). Messages without a subject are not ordered.
    // The picked rows are a MATERIALIZED CTE: as a subquery, PostgreSQL may rescan the
    // LIMITed, locking SELECT once per row it updates, skip the rows this very statement
    // locked, and so claim every visible message whatever the LIMIT.
    // The claim walks queue_messages_order (queue, id) and stops after $5 rows; the
    // unary + keeps SQLite (which has no statistics here) from choosing the index on
    // visible_at instead, which yields every visible row to be sorted: 35 ms a claim
    // with 20,000 messages waiting, against 0.04 ms (docs/benchmarks.md, "End to end,
    // embedded"). In flight rows at the head are skipped one by one.
    const std::string sql =
        "WITH picked AS MATERIALIZED (SELECT m.id FROM "
        "queue_messages m WHERE m.queue = $3 AND +m.visible_at <= $4 AND (m.subject = '' OR "
        "NOT EXISTS (SELECT 1 FROM queue_messages e WHERE e.queue = m.queue AND "
        "e.subject = m.subject AND e.id < m.id)) ORDER BY m.id LIMIT $5" +
        std::string(tx.dialect().ForUpdateSkipLocked()) +
        ") UPDATE queue_messages SET visible_at = $1, attempts = attempts + 1, "
        "claim_token = $2 WHERE visible_at <= $4 AND id IN (SELECT id FROM picked) "
        "RETURNING id, event_id, source, type, subject, envelope, attempts, "
        "first_failure_at, last_error";
    CONVERGE_ASSIGN_OR_RETURN(Rows rows, tx.Query(sql, now + visibility.count(), token,
                                                  queue_, now, static_cast<int64_t>(max)));
    for (const Row& r : rows) {
      Delivery d;
      d.handle = DeliveryHandle(RowClaim{r.Int(0), token});
      // The routing copy; the consumer decodes the envelope for the rest.
      d.event.id = r.Text(1);
      d.event.source = r.Text(2);
      d.event.type = r.Text(3);
      d.event.subject = r.Text(4);
      d.event.data.clear();
      d.event.envelope = r.Text(5);
      d.attempts = r.Int(6);
      d.first_failure_at = r.Int(7);
      d.last_error = r.Text(8);
      d.queue = queue_;
      out.push_back(std::move(d));
    }
    // RETURNING has no order: hand deliveries out in queue order.
    std::sort(out.begin(), out.end(), [](const Delivery& a, const Delivery& b) {
      return a.handle.As<RowClaim>()->id < b.handle.As<RowClaim>()->id;
    });
    return out;
  }

  Status Settle(std::span<const Delivery> deliveries,
                std::span<const Settlement> settlements) override {
    CONVERGE_RETURN_IF_ERROR(CheckSettlements(deliveries, settlements));
    if (deliveries.empty()) return OkStatus();
    return q_->db_.Transact(
        [&](Tx& tx) -> Status { return SettleInTx(tx, deliveries, settlements); });
  }

  Database* database() override { return &q_->db_; }

  // Acks delete the row, naks make it visible again after their delay; either only if
  // the row still carries this fetch's claim token.
  Status SettleInTx(Tx& tx, std::span<const Delivery> deliveries,
                    std::span<const Settlement> settlements) override {
    CONVERGE_RETURN_IF_ERROR(CheckSettlements(deliveries, settlements));
    const int64_t now = q_->clock_->NowMillis();
    std::vector<std::vector<Value>> acks, naks;
    for (size_t i = 0; i < deliveries.size(); ++i) {
      const RowClaim& c = *deliveries[i].handle.As<RowClaim>();
      const Settlement& s = settlements[i];
      if (s.kind != Settlement::Kind::kNak) {  // kTerm: the row goes, as for kAck
        acks.push_back({Value(c.id), Value(c.token)});
      } else {
        naks.push_back({Value(now + s.delay.count()), Value(now), Value(s.error), Value(c.id),
                        Value(c.token)});
      }
    }
    CONVERGE_RETURN_IF_ERROR(
        tx.ExecMany("DELETE FROM queue_messages WHERE id = $1 AND claim_token = $2", acks));
    CONVERGE_RETURN_IF_ERROR(tx.ExecMany(
        "UPDATE queue_messages SET visible_at = $1, claim_token = NULL, "
        "first_failure_at = COALESCE(first_failure_at, $2), last_error = $3 "
        "WHERE id = $4 AND claim_token = $5",
        naks));
    if (!naks.empty()) tx.OnCommit([q = q_] { q->wakeup_.Notify(); });
    return OkStatus();
  }

  // The claim undone: visible at once, the delivery it counted taken back.
  Status ReleaseInTx(Tx& tx, std::span<const Delivery> deliveries) override {
    const int64_t now = q_->clock_->NowMillis();
    std::vector<std::vector<Value>> rows;
    for (const Delivery& d : deliveries) {
      const RowClaim* c = d.handle.As<RowClaim>();
      if (c == nullptr) return InvalidArgumentError("a delivery of another transport");
      rows.push_back({Value(now), Value(c->id), Value(c->token)});
    }
    CONVERGE_RETURN_IF_ERROR(tx.ExecMany(
        "UPDATE queue_messages SET visible_at = $1, attempts = attempts - 1, "
        "claim_token = NULL WHERE id = $2 AND claim_token = $3",
        rows));
    if (!rows.empty()) tx.OnCommit([q = q_] { q->wakeup_.Notify(); });
    return OkStatus();
  }

  TxSettler* tx_settler() override { return this; }

  Wakeup* wakeup() override { return &q_->wakeup_; }

 private:
  SqlQueue* q_;
  std::string queue_;
};

SqlQueue::SqlQueue(Database& db, Clock* clock)
    : db_(db), clock_(clock ? clock : Clock::System()) {
  listener_ = db_.AddListener(kQueueChannel, [this] { wakeup_.Notify(); });
}

SqlQueue::~SqlQueue() { db_.RemoveListener(listener_); }

Status SqlQueue::Subscribe(std::string_view queue, std::string_view pattern) {
  CONVERGE_RETURN_IF_ERROR(internal::ValidateToken("queue name", queue, 255));
  CONVERGE_RETURN_IF_ERROR(internal::ValidateToken("subscription pattern", pattern, 255));
  size_t star = pattern.find('*');
  if (star != std::string_view::npos && pattern != "*" &&
      !(star == pattern.size() - 1 && pattern.size() >= 2 && pattern[star - 1] == '.')) {
    return InvalidArgumentError("subscription pattern '" + std::string(pattern) +
                                "': '*' only as the whole pattern or as a final '.*'");
  }
  // A subscription covers every event whose producer commits after Subscribe returns. A
  // producer publishing in its own transaction (Outbox::PublishInTransaction) reads the
  // subscriptions before it commits, so a new one waits for every transaction that has
  // read them, and holds off new readers until it commits (Dialect::LockAgainstReaders).
  // Only a new one: a subscription that exists (every restart) takes no lock.
  bool exists = false;
  CONVERGE_RETURN_IF_ERROR(db_.Read([&](Tx& tx) -> Status {
    CONVERGE_ASSIGN_OR_RETURN(
        Rows rows, tx.Query("SELECT 1 FROM queue_subscriptions WHERE queue = $1 AND pattern = $2",
                            queue, pattern));
    exists = !rows.empty();
    return OkStatus();
  }));
  if (exists) return OkStatus();
  return db_.Transact([&](Tx& tx) -> Status {
    if (std::string lock = tx.dialect().LockAgainstReaders("queue_subscriptions");
        !lock.empty()) {
      CONVERGE_RETURN_IF_ERROR(StatusOf(tx.Exec(lock)));
    }
    return StatusOf(
        tx.Exec("INSERT INTO queue_subscriptions (queue, pattern, created_at) VALUES ($1, $2, $3) "
                "ON CONFLICT (queue, pattern) DO NOTHING",
                queue, pattern, clock_->NowMillis()));
  });
}

Status SqlQueue::EnqueueInTx(Tx& tx, std::string_view queue, const Event& e) {
  CONVERGE_RETURN_IF_ERROR(RequireEnvelope(e));
  const int64_t now = clock_->NowMillis();
  CONVERGE_RETURN_IF_ERROR(
      tx.Exec("INSERT INTO queue_messages (queue, event_id, source, type, subject, envelope, "
              "enqueued_at, visible_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
              queue, e.id, e.source, e.type, e.subject, e.envelope, now));
  tx.OnCommit([this] { wakeup_.Notify(); });
  return tx.Notify(kQueueChannel);
}

Status SqlQueue::Requeue(Tx& tx, const DeadLetter& d) {
  // The queue row's subject orders the queue's deliveries per aggregate (one message of a
  // subject at a time, oldest first). It comes from the envelope; when the envelope has
  // none (or cannot be decoded), the letter's event id stands in: a subject of its own. A
  // replayed message is a new row, behind its aggregate's later messages: replay does not
  // restore its first place in the order.
  Event e;
  e.id = d.event_id;
  e.source = d.source;
  e.type = d.type;
  e.subject = d.event_id;
  e.envelope = d.envelope;
  if (auto decoded = DecodeEnvelope(d.envelope); decoded && !decoded->subject.empty()) {
    e.subject = decoded->subject;
  }
  // An undecodable envelope goes back as it is (the consumer parks it again, "decode");
  // an empty one is refused, and the letter stays parked.
  return EnqueueInTx(tx, d.queue, e);
}

Status SqlQueue::PublishInTx(Tx& tx, std::span<const Event> batch) {
  if (batch.empty()) return OkStatus();
  for (const Event& e : batch) CONVERGE_RETURN_IF_ERROR(RequireEnvelope(e));
  CONVERGE_ASSIGN_OR_RETURN(
      Rows subs, tx.Query("SELECT queue, pattern FROM queue_subscriptions ORDER BY queue"));
  const int64_t now = clock_->NowMillis();
  // Rows in batch order (so each queue receives the batch in outbox order), inserted a
  // chunk at a time: 7 parameters a row, well under every backend's limit.
  constexpr size_t kRowsPerInsert = 128;
  std::vector<Value> params;
  size_t rows = 0;
  auto flush = [&]() -> Status {
    if (rows == 0) return OkStatus();
    std::string sql =
        "INSERT INTO queue_messages (queue, event_id, source, type, subject, envelope, "
        "enqueued_at, visible_at) VALUES ";
    for (size_t r = 0; r < rows; ++r) {
      size_t b = r * 7;
      sql += (r ? ", ($" : "($") + std::to_string(b + 1);
      for (size_t c = 2; c <= 6; ++c) sql += ", $" + std::to_string(b + c);
      sql += ", $" + std::to_string(b + 7) + ", $" + std::to_string(b + 7) + ")";
    }
    CONVERGE_RETURN_IF_ERROR(tx.ExecParams(sql, params));
    params.clear();
    rows = 0;
    return OkStatus();
  };
  bool any = false;
  for (const Event& e : batch) {
    std::string last;
    for (const Row& s : subs) {
      std::string queue = s.Text(0);
      if (queue == last || !Matches(s.Text(1), e.type)) continue;  // rows in queue order
      for (Value v : {Value(queue), Value(e.id), Value(e.source), Value(e.type), Value(e.subject),
                      Value(e.envelope), Value(now)}) {
        params.push_back(std::move(v));
      }
      last = std::move(queue);
      any = true;
      if (++rows == kRowsPerInsert) CONVERGE_RETURN_IF_ERROR(flush());
    }
  }
  CONVERGE_RETURN_IF_ERROR(flush());
  if (!any) return OkStatus();
  tx.OnCommit([this] { wakeup_.Notify(); });
  return tx.Notify(kQueueChannel);
}

Status SqlQueue::Publish(const Event& e) {
  return db_.Transact([&](Tx& tx) { return PublishInTx(tx, std::span<const Event>(&e, 1)); });
}

std::unique_ptr<Subscriber> SqlQueue::OpenSubscriber(std::string queue) {
  return std::make_unique<QueueSubscriber>(this, std::move(queue));
}

Result<int64_t> SqlQueue::Depth(std::string_view queue) {
  int64_t n = 0;
  CONVERGE_RETURN_IF_ERROR(db_.Read([&](Tx& tx) -> Status {
    CONVERGE_ASSIGN_OR_RETURN(
        Rows rows, tx.Query("SELECT count(*) FROM queue_messages WHERE queue = $1", queue));
    n = rows.empty() ? 0 : rows[0].Int(0);
    return OkStatus();
  }));
  return n;
}

}  // namespace converge
