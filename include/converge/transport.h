// Transports: how published events travel from the relay to consumers.
//
// A `Publisher` takes messages from the relay; a `Subscriber` hands deliveries to a
// consumer and takes their settlement (ack, nak with a delay, term). Delivery is at least
// once: a message may arrive again after a crash, a lost ack or an expired visibility
// timeout. Consumers make that harmless with the inbox (consumer.h).
//
// Backends: the SQL queue (sql_queue.h) in the same database as the outbox; NATS
// JetStream later. Tests wrap either with PublisherWrapper / SubscriberWrapper to fail the
// N-th call.
//
// Thread safety: implementations are safe to use from many threads unless they say not.
#ifndef CONVERGE_TRANSPORT_H_
#define CONVERGE_TRANSPORT_H_

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "converge/clock.h"
#include "converge/database.h"
#include "converge/status.h"

namespace converge {

// One event on the wire. (source, id) is its identity end to end.
struct Message {
  std::string id;        // CloudEvents id (also the broker dedupe id)
  std::string source;    // CloudEvents source
  std::string type;      // CloudEvents type: the topic subscriptions match
  std::string subject;   // CloudEvents subject: the aggregate id, the ordering key
  std::string envelope;  // the whole CloudEvents JSON document
};

class Publisher {
 public:
  virtual ~Publisher() = default;

  // Publishes one message and returns once the transport has it durably (or failed).
  // Transient codes (kUnavailable, kDeadlineExceeded) mean "try again later".
  virtual Status Publish(const Message& message) = 0;

  // Non-null when this publisher writes to `db` itself: the relay then publishes and
  // marks the outbox row in one local transaction through PublishInTx.
  virtual Database* SharedDatabase() { return nullptr; }
  virtual Status PublishInTx(Tx& tx, const Message& message) {
    (void)tx;
    return Publish(message);
  }
  // Publishes `batch` in order through `tx`; a transport may do it in fewer round trips.
  virtual Status PublishBatchInTx(Tx& tx, std::span<const Message> batch) {
    for (const Message& m : batch) CONVERGE_RETURN_IF_ERROR(PublishInTx(tx, m));
    return OkStatus();
  }
};

class PublisherWrapper : public Publisher {
 public:
  explicit PublisherWrapper(Publisher* target) : target_(target) {}
  Status Publish(const Message& m) override { return target_->Publish(m); }
  // A wrapper never shares the database: the relay publishes and marks in two steps, the
  // way it does with an external broker.

 protected:
  Publisher* target_;
};

struct Delivery {
  Message message;
  std::string queue;        // which subscription it came through
  int64_t attempts = 0;     // deliveries so far, this one included
  int64_t first_failure_at = 0;  // 0 if it never failed
  std::string last_error;
  // Transport-private handle (row id and claim token for the SQL queue).
  int64_t handle = 0;
  std::string token;
};

struct Settlement {
  enum class Kind {
    kAck,   // done (or dead-lettered): remove it
    kNak,   // failed transiently: deliver again after `delay`
  };
  Kind kind = Kind::kAck;
  Millis delay{0};
  std::string error;  // for kNak: why, kept for the dead letter if it ends there
};

class Subscriber {
 public:
  virtual ~Subscriber() = default;

  // Up to `max` deliveries, each hidden from other fetchers for `visibility`; an empty
  // vector when nothing is ready.
  virtual Result<std::vector<Delivery>> Fetch(size_t max, Millis visibility) = 0;

  // Settles deliveries (settlements[i] for deliveries[i]), all in one round trip where
  // the transport allows. A delivery whose visibility ran out and was fetched again by
  // someone else is not touched.
  virtual Status Settle(std::span<const Delivery> deliveries,
                        std::span<const Settlement> settlements) = 0;

  // Signalled when new messages may be ready; consumers sleep on it between polls.
  virtual Wakeup* wakeup() { return nullptr; }
};

class SubscriberWrapper : public Subscriber {
 public:
  explicit SubscriberWrapper(Subscriber* target) : target_(target) {}
  Result<std::vector<Delivery>> Fetch(size_t max, Millis visibility) override {
    return target_->Fetch(max, visibility);
  }
  Status Settle(std::span<const Delivery> d, std::span<const Settlement> s) override {
    return target_->Settle(d, s);
  }
  Wakeup* wakeup() override { return target_->wakeup(); }

 protected:
  Subscriber* target_;
};

}  // namespace converge

#endif  // CONVERGE_TRANSPORT_H_
