// Shared by the e2e suites: the table snapshot that proves a request wrote nothing, and a
// raw-socket HTTP/1.1 connection that sends exactly the bytes a test gives it. The
// `converge serve` child process is harness/serve_process.h.
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
#include <utility>
#include <vector>

#include "converge/database.h"

namespace converge::testing {

// Row counts of every table a payments-service request could write to, as one comparable
// snapshot (-1 for a table that cannot be read).
std::vector<int64_t> PaymentsFootprint(Database& db);

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

// A peer written in Python (an upstream, a webhook target): `python3 SCRIPT ARGS...` as a
// child process whose output goes to DIR/NAME.log. The script writes its port to the file
// it is given (PortFile()) once it listens. Killed (SIGKILL) on destruction.
class PythonPeer {
 public:
  PythonPeer(const std::string& dir, const std::string& name, const std::string& script,
             std::vector<std::string> args);
  ~PythonPeer();
  PythonPeer(const PythonPeer&) = delete;
  PythonPeer& operator=(const PythonPeer&) = delete;
  std::string PortFile() const { return port_file_; }
  // Waits, bounded, until the port file exists; false if it never did.
  bool WaitReady();
  std::string Url(const std::string& path) const;

 private:
  std::string port_file_;
  pid_t pid_ = -1;
  int port_ = 0;
};

// Runs `cmd` through the shell; its exit status and what it wrote (stdout and stderr).
std::pair<int, std::string> Shell(const std::string& cmd);

// A database of its own on the PostgreSQL server scripts/with-postgres.sh started (in
// CONVERGE_TEST_PG_DSN), made with psql and dropped on destruction; !ok() without a
// server (the test then skips) or when it could not be made (error() says why).
class ScratchPgDatabase {
 public:
  explicit ScratchPgDatabase(const std::string& prefix);
  ~ScratchPgDatabase();
  ScratchPgDatabase(const ScratchPgDatabase&) = delete;
  ScratchPgDatabase& operator=(const ScratchPgDatabase&) = delete;

  static bool Available();
  bool ok() const { return !uri_.empty(); }
  const std::string& error() const { return error_; }
  const std::string& uri() const { return uri_; }  // postgresql://.../NAME
  const std::string& psql() const { return psql_; }  // "psql -X -q ... ": add a URI
  // Runs `sql` in the database with psql -At; its exit status and output.
  std::pair<int, std::string> Psql(const std::string& sql) const;

 private:
  std::string psql_, admin_, name_, uri_, error_;
};

}  // namespace converge::testing

#endif  // CONVERGE_TESTS_E2E_SUPPORT_H_
