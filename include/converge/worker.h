// PollingWorker: the one background loop under every converge worker (relay, consumers,
// effect runners, completer, sweeper).
//
// A worker runs passes on its own thread: a pass that reports more work waiting is
// followed at once by the next; otherwise the thread sleeps until its Wakeup is notified
// (a commit hook, a LISTEN/NOTIFY callback) or `poll` passes, the safety net when no
// wake-up comes. Stop() lets the pass under way finish, then joins.
//
// Thread safety: Start and Stop from one owner thread; the pass runs on the worker's
// thread only.
#ifndef CONVERGE_WORKER_H_
#define CONVERGE_WORKER_H_

#include <atomic>
#include <functional>
#include <string>
#include <thread>

#include "converge/clock.h"

namespace converge {

class PollingWorker {
 public:
  // Runs one pass; returns true when more work is waiting.
  using Pass = std::function<bool()>;

  // `wakeup` (may be null: the worker then has its own) must outlive the worker.
  PollingWorker(std::string name, Millis poll, Pass pass, Wakeup* wakeup = nullptr);
  ~PollingWorker();  // Stop()s
  PollingWorker(const PollingWorker&) = delete;
  PollingWorker& operator=(const PollingWorker&) = delete;

  // Starts the thread; a second Start while running does nothing.
  void Start();
  // Finishes the pass under way and joins the thread. Idempotent.
  void Stop();
  // Runs the next pass now instead of at the next poll.
  void Wake() { wakeup_->Notify(); }
  bool running() const { return running_.load(); }
  const std::string& name() const { return name_; }

 private:
  const std::string name_;
  const Millis poll_;
  Pass pass_;
  Wakeup own_wakeup_;
  Wakeup* wakeup_;
  std::atomic<bool> running_{false};
  std::thread thread_;
};

}  // namespace converge

#endif  // CONVERGE_WORKER_H_
