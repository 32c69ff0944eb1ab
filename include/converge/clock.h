// Time and waiting: the injected clock every component reads, and the wake-up signal
// that lets a relay or consumer sleep until there is work.
//
// Components take a `Clock*` (nullptr = the system clock) so tests can move time forward
// instead of sleeping. Times are milliseconds since the Unix epoch, stored as integers
// in both backends.
//
// Thread safety: every class here is safe to use from many threads.
#ifndef CONVERGE_CLOCK_H_
#define CONVERGE_CLOCK_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>

namespace converge {

using Millis = std::chrono::milliseconds;

class Clock {
 public:
  virtual ~Clock() = default;
  // Milliseconds since the Unix epoch.
  virtual int64_t NowMillis() = 0;
  // The process-wide wall clock. Never null, never deleted.
  static Clock* System();
};

// "2026-11-28T15:50:28.123Z" for milliseconds since the epoch.
std::string FormatRfc3339(int64_t millis);

// A clock that moves only when told to. For tests and simulations.
class ManualClock : public Clock {
 public:
  explicit ManualClock(int64_t start_millis = 1'700'000'000'000) : now_(start_millis) {}
  int64_t NowMillis() override { return now_.load(); }
  void Advance(Millis d) { now_ += d.count(); }
  void Set(int64_t millis) { now_ = millis; }

 private:
  std::atomic<int64_t> now_;
};

// A wake-up signal for any number of waiters. Each waiter keeps the generation it has
// seen; Notify() starts a new generation, and WaitFor returns at once if one began since.
//
//   uint64_t seen = wakeup.generation();
//   for (;;) { DoWork(); wakeup.WaitFor(poll, &seen); }
//
// A Notify that lands while DoWork runs is not lost: the next WaitFor returns at once.
class Wakeup {
 public:
  void Notify() {
    {
      std::lock_guard<std::mutex> l(mu_);
      ++generation_;
    }
    cv_.notify_all();
  }
  uint64_t generation() {
    std::lock_guard<std::mutex> l(mu_);
    return generation_;
  }
  // Returns true when a generation newer than *seen began (and records it in *seen),
  // false when `timeout` passed first.
  bool WaitFor(Millis timeout, uint64_t* seen) {
    std::unique_lock<std::mutex> l(mu_);
    bool got = cv_.wait_for(l, timeout, [&] { return generation_ != *seen; });
    *seen = generation_;
    return got;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  uint64_t generation_ = 0;
};

}  // namespace converge

#endif  // CONVERGE_CLOCK_H_
