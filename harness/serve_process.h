// ServeProcess: one `converge serve` (or `converge proxy`) child process, as the demo, the
// e2e and PostgreSQL tests (and the chaos campaign) run it: really a process, so a
// failpoint can SIGKILL it and a test can read its memory, CPU time and descriptors from
// /proc. With `ready_line` set it runs a mode that does not listen (`converge relay`,
// `converge worker`) with the given arguments instead, and waits for that log line.
//
// Thread safety: none; a ServeProcess belongs to one thread.
#ifndef CONVERGE_HARNESS_SERVE_PROCESS_H_
#define CONVERGE_HARNESS_SERVE_PROCESS_H_

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "converge/status.h"

namespace converge::harness {

// Stops child `pid`: SIGTERM (and SIGCONT, so a stopped child acts on it), then SIGKILL if
// it has not exited within `grace`; reaps it.
void StopChild(pid_t pid, std::chrono::milliseconds grace);

class ServeProcess {
 public:
  struct Options {
    std::string binary;       // the converge executable; empty: $CONVERGE_BIN
    std::string command = "serve";  // or another mode with the same flags, e.g. "proxy"
    std::string config_path;  // the TOML file to serve with
    std::string dir;          // for the port file and the log
    std::string name = "serve";
    std::string listen = "127.0.0.1:0";  // a fixed port when others must know it first
    std::string log_level = "warn";
    // When set, RLIMIT_NOFILE (soft, hard) of the child before it execs.
    std::optional<std::pair<uint64_t, uint64_t>> nofile;
    // A mode that does not listen: when set, the child runs `converge <command> <args...>
    // --log-level <log_level>` (no --config, --listen or --port-file) and Start() waits
    // until this text appears in the lines its log gains, e.g. "event=worker_started".
    std::string ready_line;
    std::vector<std::string> args;
  };
  explicit ServeProcess(Options options);
  ~ServeProcess();  // Stop()s
  ServeProcess(const ServeProcess&) = delete;
  ServeProcess& operator=(const ServeProcess&) = delete;

  // Starts the child with CONVERGE_FAILPOINTS=`failpoints` (none when empty; an inherited
  // spec is dropped) and waits, bounded, until it listens (its port file). Under
  // AddressSanitizer the child runs with a small quarantine, so its RSS shows what the
  // program holds. kUnavailable naming the log when it exited or did not come up.
  Status Start(const std::string& failpoints = "");
  // SIGTERM, then SIGKILL when it has not exited within `grace`.
  void Stop(std::chrono::milliseconds grace = std::chrono::seconds(10));
  // Sends `signal` and reaps the child.
  void Kill(int signal);
  // Sends `signal` and does not wait (SIGSTOP, SIGCONT).
  void Signal(int signal) const;
  // Waits up to `wait` for the child to die; true if a SIGKILL (a crash failpoint) did it.
  bool KilledWithin(std::chrono::milliseconds wait);
  // Whether the child of the last Start() has ended although nothing here stopped or
  // killed it: then it is reaped and the answer says how it ended ("exited with status 1",
  // "killed by signal 11 (Segmentation fault)"); nullopt while it runs or when there is
  // none. A campaign asks before it touches a process, since Kill() and Stop() would reap
  // such a child silently.
  std::optional<std::string> EndedOnItsOwn();

  // Whether the child of the last Start() that failed died of SIGKILL before it was ready
  // (a crash failpoint armed by that Start hit early).
  bool killed_at_start() const { return killed_at_start_; }
  bool alive() const { return pid_ > 0; }
  pid_t pid() const { return pid_; }
  uint16_t port() const { return port_; }
  std::string Url(const std::string& path) const;
  std::string log_path() const { return options_.dir + "/" + options_.name + ".log"; }
  // From /proc/<pid>: resident set (bytes), user+system CPU time (seconds), descriptors
  // open, and the "Max open files" soft and hard limits. -1 when unreadable.
  int64_t RssBytes() const;
  double CpuSeconds() const;
  int64_t OpenFds() const;
  std::pair<int64_t, int64_t> FdLimits() const;

 private:
  Options options_;
  pid_t pid_ = -1;
  uint16_t port_ = 0;
  bool killed_at_start_ = false;
};

// How a child ended, from its waitpid status: "exited with status N", "killed by signal N
// (name)".
std::string DescribeExit(int status);

// A port that was free a moment ago on 127.0.0.1 (bound and released): for a child that
// must listen where others already expect it, across restarts. Drawn below the kernel's
// ephemeral ports where the system leaves room, so that while the child is down no other
// process's bind to port 0 or outgoing connection takes it. 0 when none was found.
uint16_t FreePort();

}  // namespace converge::harness

#endif  // CONVERGE_HARNESS_SERVE_PROCESS_H_
