// The NATS JetStream transport: the broker of the distributed deployment (PostgreSQL +
// a JetStream cluster + many converge processes). See docs/design/nats.md.
//
// NatsBroker connects to nats-server (cnats), provisions one stream that holds every
// event (subjects `<prefix>.<event type>`, file storage, a duplicate window, replicas),
// and is the relay's Publisher: a batch goes out as asynchronous publishes, at most
// `max_in_flight` awaiting their acks, each with `Nats-Msg-Id` = the event id, so the
// stream drops a re-publish inside the duplicate window (counted as a duplicate). The
// relay marks an event published only after its ack (relay.h).
//
// On the wire an event is its CloudEvents 1.0 JSON envelope in structured mode: the
// message body is the envelope (event.h), with `Content-Type: application/cloudevents+json`
// and `Nats-Msg-Id`. Any NATS client can read what the relay publishes and publish what a
// converge consumer reads.
//
// Subscribe() opens a durable pull consumer per converge consumer name (AckWait,
// MaxDeliver, backoff) as a Subscriber for Consumer (consumer.h): settlements map to Ack
// (after the consumer's commit), NakWithDelay (transient failure), Term (dead-lettered);
// while a delivery is held, the subscriber sends in-progress acks so a long handler keeps
// it, up to the visibility the consumer asked for (Extend holds it longer: a consumer
// whose store is down keeps what it fetched). MAX_DELIVERIES advisories (the server gave
// up on a message) are counted per consumer and stored in a stream of their own
// (`<stream>_ADVISORIES`); the consumer's subscriber hands each out as a notice
// (Delivery::abandoned) with the abandoned message read back from the stream, and the
// consumer parks it as a dead letter: nothing the server gives up on is lost silently.
//
// Thread safety: NatsBroker and its subscribers are safe to use from many threads.
// Ownership: a subscriber (and every delivery it handed out) must be destroyed before the
// broker that opened it.
#ifndef CONVERGE_NATS_H_
#define CONVERGE_NATS_H_

#include <chrono>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "converge/clock.h"
#include "converge/consumer.h"
#include "converge/dead_letters.h"
#include "converge/event.h"
#include "converge/metrics.h"
#include "converge/status.h"
#include "converge/transport.h"

namespace converge {

// The queue of a NATS consumer's dead letters is this prefix and the consumer's name; the
// broker replays them (NatsBroker, a Requeuer).
inline constexpr std::string_view kNatsQueuePrefix = "nats:";

struct NatsOptions {
  std::vector<std::string> servers;  // nats://host:port, one or more
  std::string stream = "CONVERGE";   // the stream holding every event
  std::string subject_prefix = "converge";
  Millis duplicate_window = std::chrono::minutes(2);
  int replicas = 1;                                   // 3 on a cluster (docs/design/nats.md)
  int64_t max_in_flight = 1024;                       // asynchronous publishes awaiting their ack
  Millis publish_timeout = std::chrono::seconds(10);  // for each publish's ack
  // How long Connect and Subscribe keep asking a cluster that is forming: it answers
  // "temporarily unavailable" while it has no meta leader (its nodes starting, or most of
  // them down; then kUnavailable) and "no suitable peers" while fewer than `replicas`
  // nodes are up (then kFailedPrecondition). At most a day.
  Millis startup_wait = std::chrono::seconds(15);
};

// Parses "nats://h1:p1[,h2:p2...][?stream=S&prefix=P&replicas=N&duplicate_window_ms=N
// &in_flight=N&publish_timeout_ms=N&startup_wait_ms=N]". kInvalidArgument names what is
// wrong.
Result<NatsOptions> ParseNatsUri(std::string_view uri);

// One durable pull consumer.
struct NatsSubscription {
  std::string consumer;       // the durable's name: the converge consumer's name
  std::string pattern = "*";  // event types: "*", "payment.*" or "payment.captured"
  Millis ack_wait = std::chrono::seconds(30);
  // Deliveries before the server gives up. Must exceed the consumer's max_attempts, so
  // that the consumer dead-letters a message before the server drops it.
  int64_t max_deliver = 12;
  std::vector<Millis> backoff;  // redelivery delays after AckWait expiries (NATS BackOff)
  Millis fetch_wait = std::chrono::milliseconds(250);  // a Fetch waits this for a message
};

// How long delivery `delivery` (1-based) of `sub` waits for an ack: its BackOff step (the
// last repeating) when BackOff is set, else AckWait.
Millis NatsAckWaitOf(const NatsSubscription& sub, int64_t delivery);

// The longest one message of `sub` can keep coming back to `consumer`: each of
// max_deliver deliveries held by in-progress acks for up to the consumer's visibility and
// then for its AckWait (or BackOff step), which the server counts from the last
// in-progress ack; plus the consumer's largest nak delay between deliveries.
Millis NatsRedeliveryHorizon(const NatsSubscription& sub, const ConsumerOptions& consumer);

// The startup check: kInvalidArgument, naming the numbers, when consumer.inbox_ttl does
// not exceed NatsRedeliveryHorizon + consumer.replay_window + NatsRedeliveryHorizon again
// (a dead letter of any consumer of the subject, replayed at the end of the window, is a
// new message that reaches this consumer too and is redelivered on the same schedule: a
// late copy would find no inbox row and be applied again), or max_deliver does not
// exceed max_attempts. Assumes the other consumers of the subject have no longer horizon.
Status ValidateNatsRetention(const NatsSubscription& sub, const ConsumerOptions& consumer);

struct NatsStats {
  int64_t published = 0;         // acked by the stream, duplicates included
  int64_t duplicates = 0;        // the stream reported a duplicate (jsPubAck.Duplicate)
  int64_t publish_errors = 0;    // refused or unacknowledged in time
  int64_t max_deliveries = 0;    // MAX_DELIVERIES advisories received
  int64_t in_progress_sent = 0;  // in-progress acks sent for long handlers
  int64_t terminated = 0;        // Term sent for dead-lettered messages
  int64_t abandoned = 0;         // notices of messages the server gave up on, handed out
  int64_t abandoned_gone = 0;    // such notices whose message had left the stream
  int64_t consumers_missing = 0;  // Fetches that found their durable consumer deleted
};

class NatsBroker : public Publisher, public Requeuer {
 public:
  // Connects, provisions the stream (created, or updated to these settings) and
  // subscribes to the MAX_DELIVERIES advisories. `metrics` (may be null) must outlive
  // the broker: it gets converge_nats_* counters. kUnavailable: no server reachable, or
  // JetStream still "temporarily unavailable" after `startup_wait`; kInvalidArgument: bad
  // options; kFailedPrecondition: the server refused the stream.
  static Result<std::unique_ptr<NatsBroker>> Connect(NatsOptions options,
                                                     Metrics* metrics = nullptr);
  ~NatsBroker() override;  // flushes what is buffered (acks), then closes
  NatsBroker(const NatsBroker&) = delete;
  NatsBroker& operator=(const NatsBroker&) = delete;

  // One event; same as PublishBatch of one.
  Status Publish(const Event& event) override;
  // Every event goes out asynchronously (at most max_in_flight unacknowledged); returns
  // once each has its ack or failed. Per event: OK (stored, or a duplicate inside the
  // window), kDeadlineExceeded (no ack within publish_timeout: outcome unknown),
  // kUnavailable (refused or not connected), kInvalidArgument (no envelope, or a type
  // that is not a valid subject token).
  std::vector<Status> PublishBatch(std::span<const Event> batch) override;

  // Requeuer, for letters of the queues "nats:<consumer>" (dead_letters.h): publishes the
  // letter's envelope again on its event type's subject under a Nats-Msg-Id new to every
  // attempt (`<event id>:replay:<replay count>:<random>`), so the stream drops neither
  // it nor a later attempt as a duplicate. Every consumer of that subject receives it;
  // those that applied (or parked) the event before absorb it in their inbox, and the
  // letter's own consumer, whose dead-lettered mark the replay lifted, applies it. The
  // publish cannot join the replay's transaction: if that transaction then fails, the
  // letter stays parked, its mark stays, the copy is absorbed everywhere, and the next
  // attempt publishes a copy of its own (docs/design/nats.md).
  Status Requeue(Tx& tx, const DeadLetter& letter) override;

  // Creates or updates the durable consumer (and its durable on the advisory stream) and
  // opens pull subscriptions on them, waiting out a forming cluster as Connect does.
  // kInvalidArgument: a bad name, pattern or setting; kUnavailable: the server (or no
  // meta leader after `startup_wait`); kFailedPrecondition: fewer than `replicas` nodes
  // up after it; kDeadlineExceeded: no answer in six tries.
  Result<std::unique_ptr<Subscriber>> Subscribe(const NatsSubscription& sub);

  // Messages of `consumer` not yet settled for good: waiting in the stream plus
  // delivered and awaiting their ack (what the server will still deliver).
  // kNotFound: no such consumer; kUnavailable: the server.
  Result<int64_t> Unsettled(const std::string& consumer);

  // Sends what the connection buffers (acks) and waits for the server's answer.
  Status Flush(Millis timeout);

  // `<prefix>.<type>`.
  std::string SubjectFor(std::string_view type) const;
  const NatsOptions& options() const;
  NatsStats stats() const;

  struct Impl;

 private:
  explicit NatsBroker(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace converge

#endif  // CONVERGE_NATS_H_
