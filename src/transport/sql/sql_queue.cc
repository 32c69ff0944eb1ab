#include "converge/sql_queue.h"

#include <algorithm>

#include "src/core/crypto.h"
#include "src/core/validate.h"

namespace converge {

bool SqlQueue::Matches(std::string_view pattern, std::string_view type) {
  if (pattern == "*" || pattern == type) return true;
  if (pattern.size() >= 2 && pattern.substr(pattern.size() - 2) == ".*") {
    std::string_view prefix = pattern.substr(0, pattern.size() - 1);  // keeps the '.'
    return type.size() > prefix.size() && type.substr(0, prefix.size()) == prefix;
  }
  return false;
}

class SqlQueue::QueueSubscriber : public Subscriber {
 public:
  QueueSubscriber(SqlQueue* q, std::string queue) : q_(q), queue_(std::move(queue)) {}

  Result<std::vector<Delivery>> Fetch(size_t max, Millis visibility) override {
    std::vector<Delivery> out;
    Status st = q_->db_.Transact([&](Tx& tx) -> Status {
      out.clear();
      const int64_t now = q_->clock_->NowMillis();
      const std::string token = internal::RandomHex(8);
      // The outer visible_at condition repeats the inner one: after waiting on a row lock,
      // PostgreSQL re-checks only the outer WHERE (on SQLite it is the same test twice).
      const std::string sql =
          "UPDATE queue_messages SET visible_at = $1, attempts = attempts + 1, "
          "claim_token = $2 WHERE visible_at <= $4 AND id IN (SELECT id FROM queue_messages "
          "WHERE queue = $3 AND visible_at <= $4 ORDER BY id LIMIT $5" +
          std::string(tx.dialect().ForUpdateSkipLocked()) +
          ") RETURNING id, event_id, source, type, subject, envelope, attempts, "
          "first_failure_at, last_error";
      CONVERGE_ASSIGN_OR_RETURN(Rows rows, tx.Query(sql, now + visibility.count(), token,
                                                    queue_, now, static_cast<int64_t>(max)));
      for (const Row& r : rows) {
        Delivery d;
        d.handle = r.Int(0);
        d.message = Message{r.Text(1), r.Text(2), r.Text(3), r.Text(4), r.Text(5)};
        d.attempts = r.Int(6);
        d.first_failure_at = r.Int(7);
        d.last_error = r.Text(8);
        d.queue = queue_;
        d.token = token;
        out.push_back(std::move(d));
      }
      return OkStatus();
    });
    if (!st.ok()) return tl::unexpected(st);
    std::sort(out.begin(), out.end(),
              [](const Delivery& a, const Delivery& b) { return a.handle < b.handle; });
    return out;
  }

  Status Settle(std::span<const Delivery> deliveries,
                std::span<const Settlement> settlements) override {
    if (deliveries.size() != settlements.size()) {
      return InvalidArgumentError("Settle: one settlement per delivery");
    }
    if (deliveries.empty()) return OkStatus();
    bool requeued = false;
    Status st = q_->db_.Transact([&](Tx& tx) -> Status {
      const int64_t now = q_->clock_->NowMillis();
      std::vector<std::vector<Value>> acks, naks;
      for (size_t i = 0; i < deliveries.size(); ++i) {
        const Delivery& d = deliveries[i];
        const Settlement& s = settlements[i];
        if (s.kind == Settlement::Kind::kAck) {
          acks.push_back({Value(d.handle), Value(d.token)});
        } else {
          naks.push_back({Value(now + s.delay.count()), Value(now), Value(s.error),
                          Value(d.handle), Value(d.token)});
        }
      }
      requeued = !naks.empty();
      CONVERGE_RETURN_IF_ERROR(tx.ExecMany(
          "DELETE FROM queue_messages WHERE id = $1 AND claim_token = $2", acks));
      return StatusOf(tx.ExecMany(
          "UPDATE queue_messages SET visible_at = $1, claim_token = NULL, "
          "first_failure_at = COALESCE(first_failure_at, $2), last_error = $3 "
          "WHERE id = $4 AND claim_token = $5",
          naks));
    });
    if (st.ok() && requeued) q_->wakeup_.Notify();
    return st;
  }

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
  return db_.Transact([&](Tx& tx) -> Status {
    return StatusOf(
        tx.Exec("INSERT INTO queue_subscriptions (queue, pattern, created_at) VALUES ($1, $2, $3) "
                "ON CONFLICT (queue, pattern) DO NOTHING",
                queue, pattern, clock_->NowMillis()));
  });
}

Status SqlQueue::EnqueueInTx(Tx& tx, std::string_view queue, const Message& m) {
  const int64_t now = clock_->NowMillis();
  CONVERGE_RETURN_IF_ERROR(
      tx.Exec("INSERT INTO queue_messages (queue, event_id, source, type, subject, envelope, "
              "enqueued_at, visible_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
              queue, m.id, m.source, m.type, m.subject, m.envelope, now));
  tx.OnCommit([this] { wakeup_.Notify(); });
  return tx.Notify(kQueueChannel);
}

Status SqlQueue::PublishInTx(Tx& tx, const Message& m) {
  CONVERGE_ASSIGN_OR_RETURN(Rows subs,
                            tx.Query("SELECT queue, pattern FROM queue_subscriptions ORDER BY queue"));
  std::string last;
  for (const Row& s : subs) {
    std::string queue = s.Text(0);
    if (queue == last || !Matches(s.Text(1), m.type)) continue;  // rows come in queue order
    CONVERGE_RETURN_IF_ERROR(EnqueueInTx(tx, queue, m));
    last = std::move(queue);
  }
  return OkStatus();
}

Status SqlQueue::PublishBatchInTx(Tx& tx, std::span<const Message> batch) {
  if (batch.empty()) return OkStatus();
  CONVERGE_ASSIGN_OR_RETURN(Rows subs,
                            tx.Query("SELECT queue, pattern FROM queue_subscriptions ORDER BY queue"));
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
  for (const Message& m : batch) {
    std::string last;
    for (const Row& s : subs) {
      std::string queue = s.Text(0);
      if (queue == last || !Matches(s.Text(1), m.type)) continue;
      for (Value v : {Value(queue), Value(m.id), Value(m.source), Value(m.type), Value(m.subject),
                      Value(m.envelope), Value(now)}) {
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

Status SqlQueue::Publish(const Message& m) {
  return db_.Transact([&](Tx& tx) { return PublishInTx(tx, m); });
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
