#include "tests/e2e/support.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <strings.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

#include "tests/unit/test_util.h"

namespace converge::testing {

using Steady = std::chrono::steady_clock;

std::vector<int64_t> PaymentsFootprint(Database& db) {
  std::vector<int64_t> out;
  for (const char* table : {"payments", "idempotency_keys", "outbox_events", "consumer_inbox",
                            "queue_messages", "dead_letters", "ledger_entries", "effects"}) {
    out.push_back(QueryInt(db, std::string("SELECT count(*) FROM ") + table));
  }
  return out;
}

// --- RawConnection ---------------------------------------------------------------------

std::string RawResponse::Header(std::string_view name) const {
  std::istringstream in(head);
  std::string line;
  std::getline(in, line);  // status line
  while (std::getline(in, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    const size_t colon = line.find(':');
    if (colon == name.size() && strncasecmp(line.data(), name.data(), colon) == 0) {
      size_t v = colon + 1;
      while (v < line.size() && line[v] == ' ') ++v;
      return line.substr(v);
    }
  }
  return "";
}

RawConnection::RawConnection(uint16_t port) {
  fd_ = socket(AF_INET, SOCK_STREAM, 0);
  if (fd_ < 0) return;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
  if (connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) Close();
}

RawConnection::~RawConnection() { Close(); }

void RawConnection::Close() {
  if (fd_ >= 0) close(fd_);
  fd_ = -1;
}

bool RawConnection::Send(std::string_view bytes) {
  while (!bytes.empty()) {
    const ssize_t n = send(fd_, bytes.data(), bytes.size(), MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    bytes.remove_prefix(static_cast<size_t>(n));
  }
  return true;
}

size_t RawConnection::SendUntilStalled(std::string_view filler, size_t total,
                                       std::chrono::milliseconds stall,
                                       std::chrono::milliseconds deadline) {
  std::string block;
  while (block.size() < (64 << 10)) block.append(filler);
  const int flags = fcntl(fd_, F_GETFL);
  fcntl(fd_, F_SETFL, flags | O_NONBLOCK);
  const auto end = Steady::now() + deadline;
  size_t sent = 0;
  while (sent < total && Steady::now() < end) {
    pollfd p{fd_, POLLOUT, 0};
    const int r = poll(&p, 1, static_cast<int>(stall.count()));
    if (r == 0) break;  // the peer stopped reading
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 || (p.revents & (POLLERR | POLLHUP))) break;
    const size_t n = std::min(block.size(), total - sent);
    const ssize_t w = send(fd_, block.data(), n, MSG_NOSIGNAL);
    if (w < 0 && (errno == EAGAIN || errno == EINTR)) continue;
    if (w <= 0) break;  // reset or closed
    sent += static_cast<size_t>(w);
  }
  fcntl(fd_, F_SETFL, flags);
  return sent;
}

bool RawConnection::Fill(Steady::time_point deadline) {
  for (;;) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Steady::now()).count();
    if (left <= 0) return false;
    pollfd p{fd_, POLLIN, 0};
    const int r = poll(&p, 1, static_cast<int>(left));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    char buf[64 << 10];
    const ssize_t n = recv(fd_, buf, sizeof buf, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      closed_ = true;  // EOF, or reset
      return false;
    }
    in_.append(buf, static_cast<size_t>(n));
    return true;
  }
}

RawResponse RawConnection::Read(bool head_request, std::chrono::milliseconds timeout) {
  RawResponse r;
  const auto deadline = Steady::now() + timeout;
  size_t end;
  while ((end = in_.find("\r\n\r\n")) == std::string::npos) {
    if (!Fill(deadline)) return r;
  }
  r.head = in_.substr(0, end + 2);
  if (r.head.rfind("HTTP/1.", 0) == 0 && r.head.size() > 12) {
    r.status = std::atoi(r.head.c_str() + 9);
  }
  const std::string length = r.Header("Content-Length");
  const size_t n = head_request || length.empty() ? 0 : std::strtoull(length.c_str(), nullptr, 10);
  while (in_.size() < end + 4 + n) {
    if (!Fill(deadline)) break;
  }
  r.body = in_.substr(end + 4, n);
  in_.erase(0, std::min(in_.size(), end + 4 + n));
  return r;
}

bool RawConnection::ClosedByPeer(std::chrono::milliseconds timeout) {
  if (!in_.empty()) return false;
  if (closed_) return true;
  if (Fill(Steady::now() + timeout)) return false;
  return closed_;
}

PythonPeer::PythonPeer(const std::string& dir, const std::string& name,
                       const std::string& script, std::vector<std::string> args)
    : port_file_(dir + "/" + name + ".port") {
  const std::string log = dir + "/" + name + ".log";
  std::vector<std::string> argv_strings = {"python3", script};
  for (std::string& a : args) argv_strings.push_back(a == "{port_file}" ? port_file_ : a);
  std::vector<char*> argv;
  for (std::string& a : argv_strings) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_ = fork();
  if (pid_ == 0) {
    const int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    dup2(fd, 1);
    dup2(fd, 2);
    execvp("python3", argv.data());
    _exit(127);
  }
}

PythonPeer::~PythonPeer() {
  if (pid_ > 0) {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
}

bool PythonPeer::WaitReady() {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (std::chrono::steady_clock::now() < deadline) {
    std::ifstream f(port_file_);
    if (f >> port_) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return false;
}

std::string PythonPeer::Url(const std::string& path) const {
  return "http://127.0.0.1:" + std::to_string(port_) + path;
}

std::pair<int, std::string> Shell(const std::string& cmd) {
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  if (p == nullptr) return {-1, ""};
  std::string out;
  char buf[4096];
  for (size_t n; (n = std::fread(buf, 1, sizeof buf, p)) > 0;) out.append(buf, n);
  const int status = pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

bool ScratchPgDatabase::Available() { return std::getenv("CONVERGE_TEST_PG_DSN") != nullptr; }

ScratchPgDatabase::ScratchPgDatabase(const std::string& prefix) {
  const char* dsn = std::getenv("CONVERGE_TEST_PG_DSN");
  if (dsn == nullptr) {
    error_ = "needs CONVERGE_TEST_PG_DSN (scripts/with-postgres.sh)";
    return;
  }
  const char* bin = std::getenv("CONVERGE_TEST_PG_BIN");
  psql_ = std::string(bin != nullptr ? std::string(bin) + "/psql" : "psql") +
          " -X -q -v ON_ERROR_STOP=1 ";
  admin_ = dsn;
  name_ = prefix + std::to_string(std::random_device{}() % 1000000000);
  auto [code, out] = Shell(psql_ + "'" + admin_ + "' -c 'CREATE DATABASE " + name_ + "'");
  if (code != 0) {
    error_ = "CREATE DATABASE " + name_ + ": " + out;
    name_.clear();
    return;
  }
  uri_ = admin_.substr(0, admin_.rfind('/') + 1) + name_;
}

ScratchPgDatabase::~ScratchPgDatabase() {
  if (!name_.empty()) {
    (void)Shell(psql_ + "'" + admin_ + "' -c 'DROP DATABASE IF EXISTS " + name_ +
                " WITH (FORCE)'");
  }
}

std::pair<int, std::string> ScratchPgDatabase::Psql(const std::string& sql) const {
  return Shell(psql_ + "-At '" + uri_ + "' -c \"" + sql + "\"");
}

}  // namespace converge::testing
