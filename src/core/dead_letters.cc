#include "converge/dead_letters.h"

#include <optional>

#include "converge/failpoint.h"

namespace converge {
namespace {

constexpr std::string_view kColumns =
    "id, consumer, queue, event_id, source, type, envelope, error_class, error_code, error, "
    "attempts, first_failure_at, last_failure_at, state, replay_count, updated_at";

DeadLetter FromRow(const Row& r) {
  DeadLetter d;
  d.id = r.Int(0);
  d.consumer = r.Text(1);
  d.queue = r.Text(2);
  d.event_id = r.Text(3);
  d.source = r.Text(4);
  d.type = r.Text(5);
  d.envelope = r.Text(6);
  d.error_class = r.Text(7);
  d.error_code = r.Text(8);
  d.error = r.Text(9);
  d.attempts = r.Int(10);
  d.first_failure_at = r.Int(11);
  d.last_failure_at = r.Int(12);
  d.state = r.Text(13);
  d.replay_count = r.Int(14);
  d.updated_at = r.Int(15);
  return d;
}

}  // namespace

DeadLetters::DeadLetters(Database& db, std::vector<ReplayRoute> routes, Clock* clock)
    : db_(db), routes_(std::move(routes)), clock_(clock ? clock : Clock::System()),
      inbox_(clock_) {}

Requeuer* DeadLetters::RouteFor(std::string_view queue) const {
  const ReplayRoute* best = nullptr;
  for (const ReplayRoute& r : routes_) {
    if (queue.substr(0, r.queue_prefix.size()) != r.queue_prefix) continue;
    if (best == nullptr || r.queue_prefix.size() > best->queue_prefix.size()) best = &r;
  }
  return best ? best->target : nullptr;
}

Result<int64_t> DeadLetters::Park(Tx& tx, const DeadLetter& d) {
  CONVERGE_ASSIGN_OR_RETURN(
      Rows rows,
      tx.Query("INSERT INTO dead_letters (consumer, queue, event_id, source, type, envelope, "
               "error_class, error_code, error, attempts, first_failure_at, last_failure_at, "
               "state, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, "
               "'parked', $12) RETURNING id",
               d.consumer, d.queue, d.event_id, d.source, d.type, d.envelope, d.error_class,
               d.error_code, d.error, d.attempts, d.first_failure_at, d.last_failure_at));
  if (rows.empty()) return tl::unexpected(InternalError("INSERT ... RETURNING gave no id"));
  return rows[0].Int(0);
}

Result<std::vector<DeadLetter>> DeadLetters::List(const DeadLetterFilter& f) {
  if (f.limit < 1) return tl::unexpected(InvalidArgumentError("limit must be positive"));
  std::vector<DeadLetter> out;
  CONVERGE_RETURN_IF_ERROR(db_.Read([&](Tx& tx) -> Status {
    CONVERGE_ASSIGN_OR_RETURN(
        Rows rows,
        tx.Query("SELECT " + std::string(kColumns) +
                     " FROM dead_letters WHERE id > $1 AND ($2 = '' OR state = $2) "
                     "AND ($3 = '' OR consumer = $3) ORDER BY id LIMIT $4",
                 f.after_id, f.state, f.consumer, f.limit));
    for (const Row& r : rows) out.push_back(FromRow(r));
    return OkStatus();
  }));
  return out;
}

Result<DeadLetter> DeadLetters::Get(int64_t id) {
  std::optional<DeadLetter> out;
  CONVERGE_RETURN_IF_ERROR(db_.Read([&](Tx& tx) -> Status {
    CONVERGE_ASSIGN_OR_RETURN(
        Rows rows,
        tx.Query("SELECT " + std::string(kColumns) + " FROM dead_letters WHERE id = $1", id));
    if (!rows.empty()) out = FromRow(rows[0]);
    return OkStatus();
  }));
  if (!out) return tl::unexpected(NotFoundError("no dead letter " + std::to_string(id)));
  return *out;
}

Status DeadLetters::Transition(int64_t id, bool replay) {
  return db_.Transact([&](Tx& tx) -> Status {
    const int64_t now = clock_->NowMillis();
    // The state change comes first and is conditional on `parked`: it takes the row lock,
    // so a concurrent replay or discard of the same letter waits, then finds nothing left
    // to change and loses. A SELECT before an UPDATE would let both read `parked` under
    // READ COMMITTED, and both put the message back on its queue.
    CONVERGE_ASSIGN_OR_RETURN(
        Rows rows,
        tx.Query("UPDATE dead_letters SET state = $1, replay_count = replay_count + $2, "
                 "updated_at = $3 WHERE id = $4 AND state = 'parked' RETURNING " +
                     std::string(kColumns),
                 replay ? "replayed" : "discarded", replay ? 1 : 0, now, id));
    if (rows.empty()) {
      CONVERGE_ASSIGN_OR_RETURN(Rows found,
                                tx.Query("SELECT state FROM dead_letters WHERE id = $1", id));
      if (found.empty()) return NotFoundError("no dead letter " + std::to_string(id));
      return Status(StatusCode::kFailedPrecondition,
                    "dead letter " + std::to_string(id) + " is " + found[0].Text(0) +
                        ", not parked",
                    reason::kNotParked);
    }
    // A test holds a transition here, after its claim, to race another one against it.
    CONVERGE_RETURN_IF_ERROR(failpoint::Hit("dead_letters.after_claim"));
    if (!replay) return OkStatus();
    const DeadLetter d = FromRow(rows[0]);
    Requeuer* target = RouteFor(d.queue);
    if (target == nullptr) {
      return FailedPreconditionError("dead letter " + std::to_string(id) + ": nothing replays "
                                     "queue '" + d.queue + "' here");
    }
    // The consumer settled the message in its inbox as dead-lettered; lift that so the
    // replay is processed. A row for a message that was in fact applied stays, and the
    // replay is absorbed as a duplicate. (A letter no inbox marked, an effect's, has
    // nothing to lift.)
    CONVERGE_RETURN_IF_ERROR(inbox_.LiftDeadLettered(tx, d.consumer, {d.source, d.event_id}));
    return target->Requeue(tx, d);
  });
}

Status DeadLetters::Replay(int64_t id) { return Transition(id, true); }
Status DeadLetters::Discard(int64_t id) { return Transition(id, false); }

Result<int64_t> DeadLetters::Count(const std::string& state) {
  int64_t n = 0;
  CONVERGE_RETURN_IF_ERROR(db_.Read([&](Tx& tx) -> Status {
    CONVERGE_ASSIGN_OR_RETURN(
        Rows rows,
        tx.Query("SELECT count(*) FROM dead_letters WHERE $1 = '' OR state = $1", state));
    n = rows.empty() ? 0 : rows[0].Int(0);
    return OkStatus();
  }));
  return n;
}

}  // namespace converge
