// Completer: finishes multi-phase requests whose client went away.
//
// A multi-phase request (idempotency.h) that stopped after an external call — the client
// saw a 503 or a dropped connection and never retried — would otherwise stay in progress
// until someone retries its key: the provider charged, yet no event, no ledger entry, no
// receipt. The completer looks for in-progress keys whose lease lapsed more than `grace`
// ago (the client's own retry gets that long to come back first), takes each over with
// the same conditional statement Begin uses (in progress, lease lapsed, fence unchanged;
// a new fence from the store-wide sequence), and runs the resume function registered for
// its recovery point on the lease it took. That function drives the request to its end
// exactly as a retry would (same downstream keys, so the external effect converges) and
// stores the outcome; a late retry then gets the stored response.
//
// Several completers (one per process) may run against one store: the conditional
// takeover lets exactly one of them, or a client's retry, win each request; the fence
// keeps a loser from writing. Recovery points with no registered function are left alone
// (and a key that never got past "started" expires normally).
//
// Thread safety: register with On() before Start() or the first RunOnce(); RunOnce must
// not run concurrently with itself on one Completer; stats() is safe from any thread.
#ifndef CONVERGE_COMPLETER_H_
#define CONVERGE_COMPLETER_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>

#include "converge/clock.h"
#include "converge/database.h"
#include "converge/idempotency.h"
#include "converge/worker.h"

namespace converge {

struct CompleterOptions {
  // How long after a lease lapsed the client's own retry has to come back before the
  // completer takes the request over.
  Millis grace = std::chrono::seconds(30);
  Millis poll = std::chrono::seconds(5);  // how often to look for abandoned requests
  size_t batch = 16;                      // requests taken per pass
};

struct CompleterStats {
  int64_t finished = 0;  // resumed and driven to a stored outcome
  int64_t failed = 0;    // resume returned an error; the lease was given back
  int64_t lost = 0;      // another completer or a retry took the request first
  std::string last_error;
};

class Completer {
 public:
  // Runs on a lease the completer just took over, from lease.recovery_point. Must drive
  // the request to its end through IdempotencyKeys::Advance/Complete and return OK once
  // the outcome is stored. An error means "not now": the lease is given back and a later
  // pass (after the grace period) or the client's retry resumes the request.
  using Resume = std::function<Status(KeyLease& lease)>;

  // Everything passed must outlive the completer. clock nullptr = Clock::System().
  Completer(Database& db, IdempotencyKeys& keys, CompleterOptions options = {},
            Clock* clock = nullptr);
  ~Completer();  // stops the background thread if running

  // Resumes requests stopped at `recovery_point` with `resume`.
  void On(std::string recovery_point, Resume resume);

  // One pass: takes over and resumes up to `batch` abandoned requests. Returns how many
  // it took over.
  Result<size_t> RunOnce();

  // Runs passes on a background thread every `poll` until Stop().
  void Start();
  void Stop();

  CompleterStats stats() const;

 private:
  Database& db_;
  IdempotencyKeys& keys_;
  const CompleterOptions options_;
  Clock* clock_;
  std::map<std::string, Resume, std::less<>> resumes_;
  PollingWorker worker_;
  mutable std::mutex stats_mu_;
  CompleterStats stats_;
};

}  // namespace converge

#endif  // CONVERGE_COMPLETER_H_
