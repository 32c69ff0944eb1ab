// Dead letters: messages a consumer gave up on (a permanent error, a decode error, no
// handler, or transient errors past max attempts) and effects that failed for good,
// parked with their envelope and error so a person can inspect, replay or discard them.
// Nothing is ever retried forever and nothing is silently dropped. See
// docs/design/consumer-inbox.md.
//
// Replay puts the letter back where it came from through a Requeuer chosen by the
// letter's queue: a transport's (the SQL queue enqueues a fresh delivery) or the effects
// journal's (it re-opens the intent; effects.h). DeadLetters knows no transport's or
// journal's tables. A replayed message goes through the consumer's inbox again (inbox.h):
// replay lifts its dead-lettered mark, so a message that had in fact been applied is
// absorbed, not applied twice.
//
// Invariant: a letter leaves `parked` once. Replay and Discard change its state with one
// statement conditional on `parked` before they do anything else, so of two concurrent
// transitions (two replays, a replay and a discard, from two processes) exactly one wins
// and the other fails with kFailedPrecondition, reason::kNotParked; a replay puts exactly
// one copy back. Failpoint: dead_letters.after_claim (a transition that has changed the
// state and not yet committed).
//
// Thread safety: DeadLetters is safe to use from many threads; its routes are fixed at
// construction. Requeuers must be safe to call from many threads.
#ifndef CONVERGE_DEAD_LETTERS_H_
#define CONVERGE_DEAD_LETTERS_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "converge/clock.h"
#include "converge/database.h"
#include "converge/inbox.h"
#include "converge/status.h"

namespace converge {

struct DeadLetter {
  int64_t id = 0;
  std::string consumer;
  std::string queue;
  std::string event_id;
  std::string source;
  std::string type;
  std::string envelope;
  std::string error_class;  // "permanent", "exhausted", "decode", "no_handler", "unsettled"
  std::string error_code;   // StatusCodeName of the last error
  std::string error;        // its message
  int64_t attempts = 0;
  int64_t first_failure_at = 0;
  int64_t last_failure_at = 0;
  std::string state;  // "parked", "replayed", "discarded"
  int64_t replay_count = 0;
  int64_t updated_at = 0;
};

struct DeadLetterFilter {
  std::string state = "parked";  // empty: any state
  std::string consumer;          // empty: any consumer
  int64_t after_id = 0;          // page on: ids greater than this
  int64_t limit = 100;
};

// Puts a replayed dead letter back where it came from. Called by DeadLetters::Replay
// inside the replay's transaction, after the letter was claimed: what it writes through
// `tx` commits with the letter's `replayed` state or not at all.
class Requeuer {
 public:
  virtual ~Requeuer() = default;
  // `letter` is the row as the replay left it (state "replayed"). Errors roll the replay
  // back; the letter stays parked. It may run more than once for one replay
  // (Database::Transact): what it sends outside `tx` may then go twice, and must be
  // deduplicated where it lands (a NATS requeue is, by the consumer's inbox).
  virtual Status Requeue(Tx& tx, const DeadLetter& letter) = 0;
};

// Replays of letters whose queue starts with `queue_prefix` go to `target`. The longest
// matching prefix wins; "" matches every queue.
struct ReplayRoute {
  std::string queue_prefix;
  Requeuer* target = nullptr;
};

class DeadLetters {
 public:
  // `db`, every route's target and `clock` must outlive this object. Without a route
  // for its queue a letter can be listed and discarded, not replayed.
  explicit DeadLetters(Database& db, std::vector<ReplayRoute> routes = {},
                       Clock* clock = nullptr);

  // Parks `letter` through `tx` (the consumer does this in its batch transaction).
  // Returns the new id.
  static Result<int64_t> Park(Tx& tx, const DeadLetter& letter);

  Result<std::vector<DeadLetter>> List(const DeadLetterFilter& filter = {});
  // kNotFound when there is no such id.
  Result<DeadLetter> Get(int64_t id);
  // Marks a parked letter replayed, lifts its dead-lettered mark in its consumer's inbox
  // and hands it to the Requeuer routed for its queue, in one transaction.
  // kNotFound: no such id. kFailedPrecondition with reason::kNotParked: the letter is not
  // parked (already replayed or discarded, perhaps by a concurrent call that won).
  // kFailedPrecondition without a reason: no route for the letter's queue (it stays
  // parked). Otherwise the Requeuer's or the store's errors (it stays parked).
  Status Replay(int64_t id);
  // Marks a parked letter discarded (kept for audit until swept). Same errors as Replay
  // but the route's.
  Status Discard(int64_t id);
  // How many letters are in `state` ("" = all).
  Result<int64_t> Count(const std::string& state = "parked");

 private:
  Status Transition(int64_t id, bool replay);
  // The target of the longest route matching `queue`, or nullptr.
  Requeuer* RouteFor(std::string_view queue) const;

  Database& db_;
  const std::vector<ReplayRoute> routes_;
  Clock* clock_;
  const Inbox inbox_;
};

}  // namespace converge

#endif  // CONVERGE_DEAD_LETTERS_H_
