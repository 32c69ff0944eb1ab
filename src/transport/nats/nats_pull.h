// A pull session on one JetStream durable consumer, speaking the pull protocol itself
// (docs/design/nats.md, "Fetching"): pull requests to $JS.API.CONSUMER.MSG.NEXT with a
// reply subject of its own inbox, messages read from a plain subscription on that inbox.
//
// Why not natsSubscription_Fetch: in cnats 3.4.1 (Debian 12) it sizes its result array
// for the batch, takes what already waits on the subscription, then compares the count
// against the batch minus that (nats.c#749, fixed in 3.9.0). With more than half a batch
// waiting and more arriving than the new request asked for (answers to earlier requests,
// such as those a reconnect replays from its buffer), it writes past the array: heap
// corruption, seen as "double free or corruption" aborts after a nats-server restart.
//
// Here a Fetch never returns more than it was asked for: what arrives beyond that waits
// on the subscription for the next Fetch. Each request has a reply subject of its own
// (`<inbox>.<n>`), so a status that ends an earlier request (404, 408) never ends the
// current one; a message answering an earlier request is still a delivery and is taken.
// A delivery carries its message's own subject, not the reply subject, so deliveries count
// against the open request: one answered in full is over (the server says nothing more).
// At most one request is open at a time, and none is sent while the connection is down
// (it would wait in the reconnect buffer and be answered after the outage, on top of
// those sent since).
//
// Not thread-safe: one Fetch at a time. Settlement goes through Reply, which needs only
// the connection.
#ifndef CONVERGE_SRC_TRANSPORT_NATS_NATS_PULL_H_
#define CONVERGE_SRC_TRANSPORT_NATS_NATS_PULL_H_

#include <nats/nats.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "converge/clock.h"
#include "converge/status.h"

namespace converge::internal {

// natsStatus -> Status, at the edge only (STYLE.md); `js` adds a JetStream error code.
Status FromNats(natsStatus s, std::string_view what, jsErrCode js = static_cast<jsErrCode>(0));

class NatsPull {
 public:
  // Subscribes to a fresh inbox for the durable `consumer` of `stream` (which must exist).
  static Result<std::unique_ptr<NatsPull>> Open(natsConnection* nc, const std::string& stream,
                                                const std::string& consumer);
  ~NatsPull();
  NatsPull(const NatsPull&) = delete;
  NatsPull& operator=(const NatsPull&) = delete;

  // Appends at most `max` (>= 1) messages to `out`, each the caller's to destroy. Messages
  // that already arrived come first and are returned at once; otherwise one request for
  // `max` is sent (unless one is still open) and the call waits up to `wait` for the first
  // message, then takes what else arrived with it. `no_wait`: the server answers the
  // request at once (404 when it has nothing). An empty `out` with OK: nothing arrived.
  Status Fetch(size_t max, Millis wait, bool no_wait, std::vector<natsMsg*>* out);

  // Sends `body` ("+ACK", "-NAK {...}", "+TERM", "+WPI") to the message's ack subject.
  static Status Reply(natsConnection* nc, natsMsg* msg, const std::string& body);

  // The subject every request's reply subject extends (`<inbox>.<n>`); for tests.
  const std::string& inbox() const { return inbox_; }
  // Whether a request is still open: its answer (or its end) may still arrive, and what
  // arrives waits on the subscription, its AckWait running, until the next Fetch.
  bool answer_pending() const { return open_ != 0; }
  // Requests sent since Open; for tests.
  uint64_t requests_sent() const { return next_request_ - 1; }

 private:
  using SteadyTime = std::chrono::steady_clock::time_point;
  NatsPull(natsConnection* nc, std::string inbox, std::string next_subject,
           natsSubscription* sub);

  // Files one message read from the inbox: a delivery goes to `out`; a status of the
  // open request ends it (`*error` for a refusal). Destroys what it does not keep.
  void Take(natsMsg* msg, std::vector<natsMsg*>* out, Status* error);
  // One message from the inbox within `timeout_ms` (0: only one already there); nullptr
  // when none came.
  Result<natsMsg*> Next(int64_t timeout_ms);
  // Takes what already arrived, up to `max` in `out`, without waiting.
  Status Drain(size_t max, std::vector<natsMsg*>* out);

  natsConnection* nc_;
  const std::string inbox_;
  const std::string next_subject_;  // $JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>
  natsSubscription* sub_;           // on <inbox>.*
  uint64_t next_request_ = 1;
  uint64_t open_ = 0;  // the open request's number; 0 = none
  int64_t open_remaining_ = 0;
  SteadyTime open_until_{};
};

}  // namespace converge::internal

#endif  // CONVERGE_SRC_TRANSPORT_NATS_NATS_PULL_H_
