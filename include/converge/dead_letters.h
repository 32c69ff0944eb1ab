// Dead letters: messages a consumer gave up on (a permanent error, a decode error, no
// handler, or transient errors past max attempts), parked with their envelope and error
// so a person can inspect, replay or discard them. Nothing is ever retried forever and
// nothing is silently dropped. See docs/design/consumer-inbox.md.
//
// Replay puts the message back on its queue (SQL queue) as a fresh delivery. It goes
// through the consumer's inbox again (inbox.h): replay lifts its dead-lettered mark, so a
// message that had in fact been applied is absorbed, not applied twice.
//
// Invariant: a letter leaves `parked` once. Replay and Discard change its state with one
// statement conditional on `parked` before they do anything else, so of two concurrent
// transitions (two replays, a replay and a discard, from two processes) exactly one wins
// and the other fails with kFailedPrecondition, reason::kNotParked; a replay puts exactly
// one copy on the queue. Failpoint: dead_letters.after_claim (a transition that has
// changed the state and not yet committed).
//
// Thread safety: DeadLetters is safe to use from many threads.
#ifndef CONVERGE_DEAD_LETTERS_H_
#define CONVERGE_DEAD_LETTERS_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "converge/clock.h"
#include "converge/database.h"
#include "converge/inbox.h"
#include "converge/sql_queue.h"
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
  std::string error_class;  // "permanent", "exhausted", "decode", "no_handler"
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

class DeadLetters {
 public:
  // `db`, `queue` and `clock` must outlive this object. Replays go to `queue`; nullptr: a
  // queue of this object's own on `db` (its consumers then see replays on their next poll
  // rather than at once).
  explicit DeadLetters(Database& db, SqlQueue* queue = nullptr, Clock* clock = nullptr);

  // Parks `letter` through `tx` (the consumer does this in its batch transaction).
  // Returns the new id.
  static Result<int64_t> Park(Tx& tx, const DeadLetter& letter);

  Result<std::vector<DeadLetter>> List(const DeadLetterFilter& filter = {});
  // kNotFound when there is no such id.
  Result<DeadLetter> Get(int64_t id);
  // Marks a parked letter replayed and re-enqueues it on its queue (re-opens the intent
  // for an effect's letter), in one transaction.
  // kNotFound: no such id. kFailedPrecondition with reason::kNotParked: the letter is not
  // parked (already replayed or discarded, perhaps by a concurrent call that won).
  Status Replay(int64_t id);
  // Marks a parked letter discarded (kept for audit until swept). Same errors as Replay.
  Status Discard(int64_t id);
  // How many letters are in `state` ("" = all).
  Result<int64_t> Count(const std::string& state = "parked");

 private:
  Status Transition(int64_t id, bool replay);

  Database& db_;
  std::unique_ptr<SqlQueue> own_queue_;
  SqlQueue* queue_;
  Clock* clock_;
  const Inbox inbox_;
};

}  // namespace converge

#endif  // CONVERGE_DEAD_LETTERS_H_
