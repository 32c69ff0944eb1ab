// Transports: how published events travel from the relay to consumers.
//
// A `Publisher` takes events from the relay; a `Subscriber` hands deliveries to a
// consumer and takes their settlement (ack, nak with a delay). Delivery is at least once:
// an event may arrive again after a crash, a lost ack or an expired visibility timeout.
// Consumers make that harmless with their inbox (inbox.h, consumer.h).
//
// The interface is neutral: it knows no tables and no transactions. What a transport
// needs to settle a delivery travels in an opaque DeliveryHandle only that transport
// reads. A store-backed transport that can also publish inside the business transaction
// offers that through the separate TxPublisher interface (tx_publisher.h), and one that
// can put a dead letter back on its queue implements Requeuer (dead_letters.h).
//
// Backends: the SQL queue (sql_queue.h) in the same database as the outbox; NATS
// JetStream later. Tests wrap either with PublisherWrapper / SubscriberWrapper to fail the
// N-th call.
//
// Thread safety: implementations are safe to use from many threads unless they say not.
// DeliveryHandle, Delivery and Settlement are values: copy them freely.
#ifndef CONVERGE_TRANSPORT_H_
#define CONVERGE_TRANSPORT_H_

#include <any>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "converge/clock.h"
#include "converge/event.h"
#include "converge/status.h"

namespace converge {

class TxPublisher;  // tx_publisher.h
class TxSettler;    // tx_publisher.h

class Publisher {
 public:
  virtual ~Publisher() = default;

  // Publishes `event` and returns once the transport has it durably (or failed).
  // REQUIRES: event.envelope holds its encoded envelope (the relay publishes the
  // outbox's). Transient codes (kUnavailable, kDeadlineExceeded) mean "try again later".
  virtual Status Publish(const Event& event) = 0;

  // Publishes `batch` in order and returns one Status per event (same index). A broker
  // that keeps several publishes in flight (NATS: a bounded window of asynchronous
  // publishes) overrides this; the default calls Publish one event at a time and does not
  // attempt an event whose subject (aggregate) already failed in this batch (kAborted), so
  // nothing of an aggregate goes out after a failure. An override may attempt them: the
  // relay marks, per subject, only what precedes the first failure. kAborted with reason
  // kNotAttempted means just that: the relay claims the event again on its next pass and
  // counts no failure.
  virtual std::vector<Status> PublishBatch(std::span<const Event> batch);

  // The transactional face of this publisher, when it has one (the SQL queue does); a
  // broker outside the database has none. The relay publishes through it, in its own
  // transaction, when it writes to the outbox's database (relay.h).
  virtual TxPublisher* tx_publisher() { return nullptr; }

 protected:
  // The default PublishBatch, cut short: before each event after the first,
  // `may_start()` is asked, and once it answers false the rest answer kAborted with
  // reason kNotAttempted. For a slow transport that must not outlast the relay's lease.
  std::vector<Status> PublishWhile(std::span<const Event> batch,
                                   const std::function<bool()>& may_start);
};

class PublisherWrapper : public Publisher {
 public:
  explicit PublisherWrapper(Publisher* target) : target_(target) {}
  Status Publish(const Event& e) override { return target_->Publish(e); }
  // A wrapper has no transactional face: the relay publishes and marks in two steps
  // through it, the way it does with an external broker. It keeps the default
  // PublishBatch, so an override of Publish sees every event.

 protected:
  Publisher* target_;
};

// What a transport needs to settle one delivery (the SQL queue: its row id and claim
// token). Opaque to everyone else: only the transport that made it reads it back, and a
// handle of another transport reads back as nullptr.
class DeliveryHandle {
 public:
  DeliveryHandle() = default;
  template <class T>
  explicit DeliveryHandle(T state) : state_(std::move(state)) {}

  // The state of type T this handle carries, or nullptr (empty, or not a T).
  template <class T>
  const T* As() const {
    return std::any_cast<T>(&state_);
  }
  bool empty() const { return !state_.has_value(); }

 private:
  std::any state_;
};

struct Delivery {
  // The event as the transport carries it: its routing copy of id, source, type and
  // subject, and `envelope`, which is the authority (the consumer decodes it).
  Event event;
  std::string queue;             // which subscription it came through
  int64_t attempts = 0;          // deliveries so far, this one included
  int64_t first_failure_at = 0;  // 0 if it never failed (or the transport cannot tell)
  std::string last_error;
  // The transport has stopped delivering this message for good (NATS: MaxDeliver was
  // reached and the server said so in an advisory): this is a notice, not a delivery to
  // run. The consumer parks it as a dead letter without running its handler, then
  // settles the notice (docs/design/nats.md).
  bool abandoned = false;
  DeliveryHandle handle;  // for Subscriber::Settle: the transport's own
};

struct Settlement {
  enum class Kind {
    kAck,   // done (or dead-lettered): remove it
    kNak,   // failed transiently: deliver again after `delay`
    kTerm,  // dead-lettered: never deliver again (a transport without the notion acks)
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
  // someone else is not touched. kInvalidArgument when the spans differ in length or a
  // delivery's handle is not this transport's (nothing is settled then).
  virtual Status Settle(std::span<const Delivery> deliveries,
                        std::span<const Settlement> settlements) = 0;

  // Keeps unsettled `deliveries` hidden from other fetchers for another `visibility` from
  // now, without counting a new delivery. A consumer whose store is down holds what it
  // fetched this way and retries it, instead of letting the transport redeliver it until
  // the transport gives up (NATS counts every redelivery against MaxDeliver).
  // kUnimplemented (the default): the transport cannot; the deliveries come back when
  // their visibility ends. Other errors: the transport's; the same.
  virtual Status Extend(std::span<const Delivery> deliveries, Millis visibility) {
    (void)deliveries;
    (void)visibility;
    return UnimplementedError("this transport cannot extend a delivery's visibility");
  }

  // Signalled when new messages may be ready; consumers sleep on it between polls.
  virtual Wakeup* wakeup() { return nullptr; }
  // The transactional face of this subscriber, when it has one (the SQL queue does): a
  // consumer on that database settles through it inside its own transaction.
  virtual TxSettler* tx_settler() { return nullptr; }
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
  Status Extend(std::span<const Delivery> d, Millis visibility) override {
    return target_->Extend(d, visibility);
  }
  Wakeup* wakeup() override { return target_->wakeup(); }
  // A wrapper has no transactional face: the consumer settles through Settle, after its
  // commit, the way it does with an external broker (so an override of Settle sees
  // every settlement).

 protected:
  Subscriber* target_;
};

}  // namespace converge

#endif  // CONVERGE_TRANSPORT_H_
