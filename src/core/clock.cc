#include "converge/clock.h"

#include <cstdio>
#include <ctime>

namespace converge {
namespace {

class SystemClock : public Clock {
 public:
  int64_t NowMillis() override {
    return std::chrono::duration_cast<Millis>(
               std::chrono::system_clock::now().time_since_epoch())
        .count();
  }
};

}  // namespace

std::string FormatRfc3339(int64_t millis) {
  // Floored, not truncated: before 1970 the remainder is negative, and -500 ms is 23:59:59.500
  // of the day before, not ".-500" of 00:00:00 (found by fuzz/envelope_fuzz.cc).
  int64_t secs = millis / 1000;
  int64_t ms = millis % 1000;
  if (ms < 0) {
    ms += 1000;
    --secs;
  }
  const std::time_t t = static_cast<std::time_t>(secs);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[96];
  std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
                tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                static_cast<int>(ms));
  return buf;
}

Clock* Clock::System() {
  static SystemClock* clock = new SystemClock();  // never destroyed: safe at exit
  return clock;
}

}  // namespace converge
