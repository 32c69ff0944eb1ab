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
  std::time_t secs = static_cast<std::time_t>(millis / 1000);
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char buf[96];
  std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
                tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                static_cast<int>(millis % 1000));
  return buf;
}

Clock* Clock::System() {
  static SystemClock* clock = new SystemClock();  // never destroyed: safe at exit
  return clock;
}

}  // namespace converge
