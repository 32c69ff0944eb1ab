// Shared by the e2e suites: the table snapshot that proves a request wrote nothing, a
// `converge serve` child process whose resources (RSS, CPU time, descriptors) can be read
// from /proc, and a raw-socket HTTP/1.1 connection that sends exactly the bytes a test
// gives it.
//
// Thread safety: none; each object belongs to one test thread.
#ifndef CONVERGE_TESTS_E2E_SUPPORT_H_
#define CONVERGE_TESTS_E2E_SUPPORT_H_

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "converge/database.h"

namespace converge::testing {

// Row counts of every table a payments-service request could write to, as one comparable
// snapshot (-1 for a table that cannot be read).
std::vector<int64_t> PaymentsFootprint(Database& db);

// One `converge serve` child process on 127.0.0.1, port 0. Under AddressSanitizer the child
// runs with a small quarantine, so that its RSS shows what the program holds rather than
// freed memory the sanitizer holds back (256 MB by default).
class ServeProcess {
 public:
  struct Options {
    std::string config_path;  // the TOML file to serve with
    std::string dir;          // for the port file and the log
    std::string name = "serve";
    // When set, RLIMIT_NOFILE (soft, hard) of the child before it execs.
    std::optional<std::pair<uint64_t, uint64_t>> nofile;
  };
  explicit ServeProcess(Options options);
  ~ServeProcess();  // Stop()s
  ServeProcess(const ServeProcess&) = delete;
  ServeProcess& operator=(const ServeProcess&) = delete;

  // Starts the child and waits (bounded) for its port file. False if it did not come up.
  bool Start();
  // SIGTERM, then SIGKILL when it has not exited within `grace`.
  void Stop(std::chrono::milliseconds grace = std::chrono::seconds(10));

  pid_t pid() const { return pid_; }
  uint16_t port() const { return port_; }
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
};

// A response as read off the wire.
struct RawResponse {
  int status = 0;    // 0: none arrived (the peer closed, or the wait ran out)
  std::string head;  // status line and header fields
  std::string body;
  std::string Header(std::string_view name) const;  // "" when absent
};

// A blocking TCP connection to 127.0.0.1 that speaks bytes, not HTTP: tests send what an
// attacker would and read what the server answers.
class RawConnection {
 public:
  explicit RawConnection(uint16_t port);  // connected, or !ok()
  ~RawConnection();
  RawConnection(const RawConnection&) = delete;
  RawConnection& operator=(const RawConnection&) = delete;

  bool ok() const { return fd_ >= 0; }
  int fd() const { return fd_; }
  // Sends every byte; false on error (e.g. the peer reset the connection).
  bool Send(std::string_view bytes);
  // Sends `filler` repeatedly until `total` bytes went out, the peer stops reading for
  // `stall` (or closes), or `deadline` passes. Returns the bytes sent.
  size_t SendUntilStalled(std::string_view filler, size_t total,
                          std::chrono::milliseconds stall = std::chrono::seconds(2),
                          std::chrono::milliseconds deadline = std::chrono::seconds(20));
  // Reads one response (its body by Content-Length; none when `head_request`).
  RawResponse Read(bool head_request = false,
                   std::chrono::milliseconds timeout = std::chrono::seconds(10));
  // True when the peer closes (EOF or reset) within `timeout` with no further response
  // bytes; false when it stays open or sends more (which is then kept for Read).
  bool ClosedByPeer(std::chrono::milliseconds timeout = std::chrono::seconds(10));
  void Close();

 private:
  // Waits for more bytes into in_; false on EOF, error or timeout (sets closed_ for the
  // first two).
  bool Fill(std::chrono::steady_clock::time_point deadline);

  int fd_ = -1;
  std::string in_;
  bool closed_ = false;
};

}  // namespace converge::testing

#endif  // CONVERGE_TESTS_E2E_SUPPORT_H_
