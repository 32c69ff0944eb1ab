// A progress bar for long-running CLI commands. On a terminal it redraws one line; in a
// log (not a tty) it prints a line every 25% or every 2 seconds, whichever comes first.
#ifndef CONVERGE_APPS_CONVERGE_PROGRESS_H_
#define CONVERGE_APPS_CONVERGE_PROGRESS_H_

#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

namespace converge::cli {

class Progress {
 public:
  Progress(const char* label, int64_t total) : label_(label), total_(total), tty_(isatty(1)) {}

  void Show(int64_t done, const std::string& extra = "") {
    constexpr int kWidth = 30;
    int filled = total_ > 0 ? static_cast<int>(kWidth * done / total_) : kWidth;
    int pct = total_ > 0 ? static_cast<int>(100 * done / total_) : 100;
    auto now = std::chrono::steady_clock::now();
    if (!tty_ && pct < last_pct_ + 25 && now - last_print_ < std::chrono::seconds(2)) return;
    last_pct_ = pct;
    last_print_ = now;
    std::string bar(static_cast<size_t>(filled), '#');
    bar.resize(kWidth, '.');
    std::printf("%s  %-12s [%s] %3d%%  %lld/%lld %s%s", tty_ ? "\r" : "", label_, bar.c_str(),
                pct, static_cast<long long>(done), static_cast<long long>(total_),
                extra.c_str(), tty_ ? "   " : "\n");
    std::fflush(stdout);
  }
  void Done() {
    if (tty_) std::printf("\n");
  }

 private:
  const char* label_;
  const int64_t total_;
  const bool tty_;
  int last_pct_ = -100;
  std::chrono::steady_clock::time_point last_print_{};
};

}  // namespace converge::cli

#endif  // CONVERGE_APPS_CONVERGE_PROGRESS_H_
