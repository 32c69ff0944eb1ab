// How SQLite's writer hands a finished call back to the thread waiting for it. Internal
// to converge.
#ifndef CONVERGE_STORE_SQLITE_HANDOFF_H_
#define CONVERGE_STORE_SQLITE_HANDOFF_H_

#include <semaphore.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cassert>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>

#include "src/store/sqlite/arrival_poll.h"

namespace converge::internal {

// One waiter's wake-up, in up to two steps. The writer may wake the waiter early, before
// the batch's COMMIT (WakeEarly): on a virtual machine a thread woken on an idle CPU runs
// only once the hypervisor has woken that CPU, tens of µs later, and a commit's fsync
// outlasts that; the waiter then spins until the result is in (Done) and goes on within a
// µs of it, instead of taking that wake-up after the commit. A waiter that spins for
// longer than its limit sleeps again, and Done wakes it.
//
// Each sem_post is consumed by exactly one of the waiter's sem_waits, and the waiter
// returns only once it has consumed every post made to it: so the Handoff (on the
// waiter's stack) may be destroyed as soon as Wait returns, and nobody touches it after
// (glibc's sem_post may still be returning from the post that woke it: it guarantees
// that, since 2.21). WakeEarly must not be called after Done.
class Handoff {
 public:
  Handoff() : ready_(sem_init(&sem_, 0, 0) == 0) {}
  ~Handoff() {
    if (!ready_) return;
    assert(PostsPending() == 0 && "a post made to a Handoff was never waited for");
    sem_destroy(&sem_);
  }
  Handoff(const Handoff&) = delete;
  Handoff& operator=(const Handoff&) = delete;

  // False when no semaphore could be made: the Handoff must not be used.
  bool ready() const { return ready_; }

  // Posts made and not yet waited for: 0 once Wait has returned (and whenever the waiter
  // sleeps, or spins after taking its early wake-up).
  int PostsPending() const {
    int n = 0;
    sem_getvalue(const_cast<sem_t*>(&sem_), &n);
    return n;
  }

  // Wakes the waiter ahead of Done, unless it was already woken.
  void WakeEarly() {
    int expected = kAsleep;
    if (state_.compare_exchange_strong(expected, kWokenEarly, std::memory_order_acq_rel)) {
      Post();
    }
  }

  // The result is in: what was written before this call is visible to the waiter once
  // Wait returns. The waiter may return (and destroy this) at once.
  void Done() {
    const int before = state_.exchange(kDone, std::memory_order_acq_rel);
    if (before == kAsleep || before == kAsleepAgain) Post();
  }

  // Returns once Done was called. Woken early, spins for up to `spin` (yielding its CPU
  // to any other thread that may run there) before it sleeps again.
  void Wait(std::chrono::nanoseconds spin) {
    SemWait();
    int s = state_.load(std::memory_order_acquire);
    if (s == kDone) return;
    // Woken early. Done may come at any moment now, and then posts nothing more.
    if (!state_.compare_exchange_strong(s, kSpinning, std::memory_order_acq_rel)) return;
    const auto until = std::chrono::steady_clock::now() + spin;
    for (;;) {
      for (int i = 0; i < kRelaxesPerLook; ++i) {
        if (state_.load(std::memory_order_acquire) != kSpinning) return;
        CpuRelax();
      }
      if (state_.load(std::memory_order_acquire) != kSpinning) return;
      if (std::chrono::steady_clock::now() >= until) break;
      sched_yield();
    }
    int expected = kSpinning;
    if (!state_.compare_exchange_strong(expected, kAsleepAgain, std::memory_order_acq_rel)) {
      return;  // Done came meanwhile
    }
    SemWait();
  }

 private:
  enum State : int {
    kAsleep,       // asleep in its first sem_wait (or about to be), not woken
    kWokenEarly,   // WakeEarly posted
    kSpinning,     // woken early, spinning until Done
    kAsleepAgain,  // spun for its limit, asleep in its second sem_wait
    kDone,
  };
  static constexpr int kRelaxesPerLook = 64;

  void Post() { sem_post(&sem_); }

  void SemWait() {
    while (sem_wait(&sem_) != 0) {
      if (errno != EINTR) {
        std::perror("converge sqlite: sem_wait");
        std::abort();  // the writer has the call: returning would free it under the writer
      }
    }
  }

  std::atomic<int> state_{kAsleep};
  sem_t sem_;
  const bool ready_;
};

// When the writer wakes a batch's first caller early (Handoff::WakeEarly): when the
// batch has several callers (a lone caller woken early made serial creates slower: the
// writer's own wake-up after its fsync then found the caller spinning on the CPU it
// would have run on), with a CPU to spare for it to spin on (as ArrivalPoll), and while
// the wait from a commit's start to the first caller's Done takes at most half the time
// a caller woken early spins for (`spin`; 0: never): one that slept again would take a
// second wake-up, after spinning for nothing. The writer thread's own state: not
// thread-safe. Also what the benchmark's r3 follows (bench/idempotency_bench.cc).
class EarlyWake {
 public:
  EarlyWake(int cpus, std::chrono::nanoseconds spin)
      : on_(cpus >= 2 && spin.count() > 0), spin_seconds_(spin.count() * 1e-9) {}

  // Whether to wake the first of a batch of `callers` early.
  bool ShouldWake(size_t callers) const {
    return on_ && callers >= 2 && waited_seconds_ <= spin_seconds_ / 2;
  }

  // From a commit's start to its first caller's Done took `seconds`: a moving average of
  // the last few, each counted as at most twice the spin (a checkpoint inside one commit
  // should not turn early wake-ups off for the next dozens).
  void Waited(double seconds) {
    waited_seconds_ += (std::min(seconds, 2 * spin_seconds_) - waited_seconds_) / 8;
  }

 private:
  const bool on_;
  const double spin_seconds_;
  double waited_seconds_ = 0;
};

}  // namespace converge::internal

#endif  // CONVERGE_STORE_SQLITE_HANDOFF_H_
