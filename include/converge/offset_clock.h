// A clock shifted by an offset that may change at any time, forward or back: how a chaos
// campaign jumps a live service's clock (docs/design/chaos.md, "Clock jumps"). The
// payments service builds one only when its config asks for `[admin] clock = true`; the
// admin API's /admin/clock hook moves it.
//
// Thread safety: safe to use from many threads.
#ifndef CONVERGE_OFFSET_CLOCK_H_
#define CONVERGE_OFFSET_CLOCK_H_

#include <atomic>
#include <cstdint>

#include "converge/clock.h"

namespace converge {

class OffsetClock : public Clock {
 public:
  // `base` (nullptr: Clock::System()) must outlive this clock.
  explicit OffsetClock(Clock* base = nullptr) : base_(base ? base : Clock::System()) {}
  int64_t NowMillis() override { return base_->NowMillis() + offset_.load(); }
  void SetOffset(Millis offset) { offset_ = offset.count(); }
  Millis offset() const { return Millis(offset_.load()); }

 private:
  Clock* const base_;
  std::atomic<int64_t> offset_{0};
};

}  // namespace converge

#endif  // CONVERGE_OFFSET_CLOCK_H_
