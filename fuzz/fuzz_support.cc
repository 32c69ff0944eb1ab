#include "fuzz/fuzz_support.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>

namespace converge::fuzz {

void Fail(const char* condition, const char* file, int line, const std::string& detail) {
  std::fprintf(stderr, "fuzz property failed: %s (%s:%d): %s\n", condition, file, line,
               detail.c_str());
  std::fflush(stderr);
  std::abort();
}

std::string Quote(std::string_view bytes, size_t max) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out = "\"";
  for (size_t i = 0; i < bytes.size(); ++i) {
    if (out.size() >= max) {
      out += "\"... (" + std::to_string(bytes.size()) + " bytes)";
      return out;
    }
    const auto c = static_cast<unsigned char>(bytes[i]);
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20 || c >= 0x7f) {
          out += "\\x";
          out += kHex[c >> 4];
          out += kHex[c & 0xf];
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}

std::vector<std::string_view> SplitFields(std::string_view input, size_t count) {
  std::vector<std::string_view> fields;
  fields.reserve(count);
  while (fields.size() + 1 < count) {
    const size_t nl = input.find('\n');
    if (nl == std::string_view::npos) break;
    fields.push_back(input.substr(0, nl));
    input.remove_prefix(nl + 1);
  }
  fields.push_back(input);
  fields.resize(count);
  return fields;
}

TempDir::TempDir(bool in_memory) {
  const char* base = std::getenv("TMPDIR");
  if (base == nullptr || *base == '\0') base = "/tmp";
  if (in_memory && ::access("/dev/shm", W_OK | X_OK) == 0) base = "/dev/shm";
  std::string pattern = std::string(base) + "/converge-fuzz-XXXXXX";
  FUZZ_CHECK(::mkdtemp(pattern.data()) != nullptr, std::string(std::strerror(errno)));
  path_ = pattern;
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

RawExchange ExchangeBytes(uint16_t port, std::string_view request,
                          std::chrono::milliseconds deadline) {
  using Clock = std::chrono::steady_clock;
  const Clock::time_point until = Clock::now() + deadline;
  RawExchange out;
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  FUZZ_CHECK(fd >= 0, "socket: " + std::string(std::strerror(errno)));
  const int one = 1;
  (void)::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  int err = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 ? 0 : errno;
  if (err == EINTR) {
    // Interrupted by a signal (libFuzzer's SIGALRM, which checks -timeout, on a loaded
    // machine): the connection goes on being made. Wait for it and read how it ended, as
    // connect(2) says; calling connect again would fail with EALREADY. (A run of this
    // target once stopped here, taking the interruption for the server's failure.)
    pollfd p{fd, POLLOUT, 0};
    int n;
    do {
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(until - Clock::now()).count();
      n = ::poll(&p, 1, static_cast<int>(std::max<int64_t>(left, 0)));
    } while (n < 0 && errno == EINTR);
    socklen_t len = sizeof err;
    if (n < 0) {
      err = errno;
    } else if (n == 0) {
      err = ETIMEDOUT;
    } else if (::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) {
      err = errno;
    }
  }
  FUZZ_CHECK(err == 0, "connect to the server under test: " + std::string(std::strerror(err)));
  // Non-blocking from here: the loop below writes and reads as the socket allows.
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
  size_t written = 0;
  bool write_closed = false;
  char buf[16 << 10];
  for (;;) {
    if (written == request.size() && !write_closed) {
      ::shutdown(fd, SHUT_WR);
      write_closed = true;
    }
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(until - Clock::now()).count();
    if (left <= 0) {
      out.timed_out = true;
      break;
    }
    pollfd p{fd, static_cast<short>(POLLIN | (write_closed ? 0 : POLLOUT)), 0};
    const int n = ::poll(&p, 1, static_cast<int>(left));
    if (n < 0 && errno == EINTR) continue;
    FUZZ_CHECK(n >= 0, "poll: " + std::string(std::strerror(errno)));
    if (n == 0) continue;
    if (!write_closed && (p.revents & POLLOUT) != 0) {
      const ssize_t w =
          ::send(fd, request.data() + written, request.size() - written, MSG_NOSIGNAL);
      if (w > 0) {
        written += static_cast<size_t>(w);
      } else if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
        // The server closed its side early (it rejected the request): stop sending, keep
        // reading what it answered.
        write_closed = true;
        (void)::shutdown(fd, SHUT_WR);
      }
    }
    if ((p.revents & (POLLIN | POLLHUP | POLLERR)) != 0) {
      const ssize_t r = ::recv(fd, buf, sizeof buf, 0);
      if (r > 0) {
        out.received.append(buf, static_cast<size_t>(r));
      } else if (r == 0) {
        break;
      } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
        out.reset = true;
        break;
      }
    }
  }
  // Closed with a reset, not a FIN: the exchange is over (the server has closed its side),
  // and a fuzzer's thousands of connections a second must not pile up in TIME_WAIT.
  const linger abort_on_close{1, 0};
  (void)::setsockopt(fd, SOL_SOCKET, SO_LINGER, &abort_on_close, sizeof abort_on_close);
  ::close(fd);
  return out;
}

}  // namespace converge::fuzz
