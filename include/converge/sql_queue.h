// The SQL queue: a transport made of two tables in the application's own database, the
// embedded default. See docs/design/consumer-inbox.md.
//
// Subscriptions map a topic pattern to a named queue ("payment.captured", "payment.*"
// or "*"). Publishing writes one `queue_messages` row per subscribed queue; a message
// with no subscriber is dropped, as on any pub/sub broker. Fetch claims rows whose
// `visible_at` has come, hiding them for a visibility timeout under a fresh claim token;
// ack deletes the row, nak makes it visible again after a delay. A consumer that dies
// mid-batch simply lets the timeout run out, and the messages are delivered again.
//
// Besides a Publisher and Subscribers, the queue is a TxPublisher (tx_publisher.h): when
// the outbox lives in the same database, the relay publishes and marks in one
// transaction. And it is a Requeuer (dead_letters.h): a replayed dead letter goes back on
// its queue in the replay's transaction. A delivery's handle holds the row id and the
// claim token of its fetch; only this queue reads it.
//
// Thread safety: SqlQueue and its subscribers are safe to use from many threads.
#ifndef CONVERGE_SQL_QUEUE_H_
#define CONVERGE_SQL_QUEUE_H_

#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "converge/clock.h"
#include "converge/database.h"
#include "converge/dead_letters.h"
#include "converge/event.h"
#include "converge/transport.h"
#include "converge/tx_publisher.h"

namespace converge {

class SqlQueue : public Publisher, public TxPublisher, public Requeuer {
 public:
  // `db` and `clock` must outlive the queue and its subscribers.
  explicit SqlQueue(Database& db, Clock* clock = nullptr);
  ~SqlQueue() override;

  // The Tx::Notify channel publishing signals (other processes' consumers listen on it).
  static constexpr const char* kQueueChannel = "converge_queue";

  // Routes events whose type matches `pattern` to `queue` (idempotent).
  // kInvalidArgument for an empty or malformed name or pattern.
  Status Subscribe(std::string_view queue, std::string_view pattern);

  // Publisher: one transaction of its own. kInvalidArgument: no envelope.
  Status Publish(const Event& event) override;
  TxPublisher* tx_publisher() override { return this; }

  // TxPublisher: one subscription lookup and multi-row inserts for the whole batch.
  // kInvalidArgument: an event without an envelope (nothing of the batch is written).
  Database* database() override { return &db_; }
  Status PublishInTx(Tx& tx, std::span<const Event> batch) override;

  // Requeuer: the letter's envelope goes back on the letter's queue as a fresh delivery.
  Status Requeue(Tx& tx, const DeadLetter& letter) override;

  // Writes one event straight into `queue` through `tx`, whatever the subscriptions say
  // (a webhook intake stages its work this way). kInvalidArgument: no envelope.
  Status EnqueueInTx(Tx& tx, std::string_view queue, const Event& event);

  // A subscriber that fetches from `queue`.
  std::unique_ptr<Subscriber> OpenSubscriber(std::string queue);

  // Messages waiting (visible or not) in `queue`.
  Result<int64_t> Depth(std::string_view queue);

  Wakeup* wakeup() { return &wakeup_; }

  // True when a subscription `pattern` routes events of `type`.
  static bool Matches(std::string_view pattern, std::string_view type);

 private:
  class QueueSubscriber;

  Database& db_;
  Clock* clock_;
  Wakeup wakeup_;
  int64_t listener_ = 0;
};

}  // namespace converge

#endif  // CONVERGE_SQL_QUEUE_H_
