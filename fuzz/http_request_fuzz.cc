// Fuzz target: the HTTP server's request parsing (request line, header fields, framing,
// chunked bodies, trailers) and its limits, through a real converge::http::Server. The
// whole input is what a client sends on one connection (any number of pipelined
// requests); the target half-closes after it and reads until the server closes.
//
// The server runs once per process on 127.0.0.1, port 0, with small limits (a 1 KiB header
// and buffer, a 512-byte body, 16 fields) so that inputs of a few KiB reach every bound,
// and two routes whose handlers check what reached them.
//
// Properties:
//  - the server answers and closes, or closes, within the deadline; never a reset;
//  - what arrives parses as a sequence of HTTP/1.x responses, each with one Content-Length
//    (no body after HEAD), with nothing left over, and it is exactly what the server reports
//    having written (OnExchange), status by status: nothing is answered twice or unseen;
//  - no status is 5xx, except 501 for a method or transfer coding it does not implement;
//  - every handler run is answered;
//  - what reaches a handler is within the limits and unambiguous: a canonical path, a
//    body within body_limit and of its Content-Length (every value of it), at most
//    max_header_fields fields, one Host, no field twice that must be single,
//    Transfer-Encoding only as `chunked` and never with Content-Length, no CR, LF or NUL in
//    a field;
//  - the server's connection count and in-flight count return to 0 after the close.
#include <algorithm>
#include <atomic>
#include <cctype>
#include <charconv>
#include <cstdlib>
#include <cstdint>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <strings.h>

#include "converge/http.h"
#include "fuzz/fuzz_support.h"

namespace converge::fuzz {
namespace {

using http::Request;
using http::Response;

constexpr size_t kHeaderLimit = 1024;
constexpr size_t kBodyLimit = 512;
constexpr size_t kMaxFields = 16;
constexpr std::chrono::seconds kDeadline{10};

bool IEquals(std::string_view a, std::string_view b) {
  return a.size() == b.size() && strncasecmp(a.data(), b.data(), a.size()) == 0;
}

bool TokenChar(unsigned char c) {
  return std::isalnum(c) ||
         std::string_view("!#$%&'*+-.^_`|~").find(static_cast<char>(c)) != std::string_view::npos;
}

// What a handler may be given, whatever the client sent.
void CheckRequest(const Request& req, const http::ServerOptions& o) {
  const std::string what = req.method + " " + Quote(req.target);
  FUZZ_CHECK(std::find(o.methods.begin(), o.methods.end(), req.method) != o.methods.end(),
             "a handler got method " + what);
  const std::string& p = req.path;
  FUZZ_CHECK(!p.empty() && p.front() == '/' && p.find("//") == std::string::npos &&
                 (p.size() == 1 || p.back() != '/') && p.find("/./") == std::string::npos &&
                 p.find("/../") == std::string::npos && p.find('\\') == std::string::npos,
             "a handler got a non-canonical path " + Quote(p));
  FUZZ_CHECK(req.body.size() <= o.body_limit,
             "a handler got a body of " + std::to_string(req.body.size()) + " bytes");
  FUZZ_CHECK(req.headers.size() <= o.max_header_fields,
             "a handler got " + std::to_string(req.headers.size()) + " fields");
  size_t hosts = 0, lengths = 0, codings = 0;
  std::vector<size_t> seen(o.single_headers.size(), 0);
  for (const auto& [name, value] : req.headers) {
    FUZZ_CHECK(
        !name.empty() && std::all_of(name.begin(), name.end(), [](char c) { return TokenChar(c); }),
        "a handler got the field name " + Quote(name));
    FUZZ_CHECK(value.find_first_of(std::string_view("\r\n\0", 3)) == std::string::npos,
               "a handler got the field value " + Quote(value));
    for (size_t i = 0; i < o.single_headers.size(); ++i) {
      if (IEquals(name, o.single_headers[i])) ++seen[i];
    }
    if (IEquals(name, "Host")) ++hosts;
    if (IEquals(name, "Content-Length")) {
      // RFC 9112 §6.3 lets a recipient take a list of identical values (or identical
      // fields) as that one value; anything else must not reach a handler.
      ++lengths;
      std::string_view rest = value;
      while (true) {
        const size_t comma = rest.find(',');
        std::string_view item = rest.substr(0, comma);
        while (!item.empty() && (item.front() == ' ' || item.front() == '\t')) {
          item.remove_prefix(1);
        }
        while (!item.empty() && (item.back() == ' ' || item.back() == '\t')) {
          item.remove_suffix(1);
        }
        uint64_t n = 0;
        auto r = std::from_chars(item.data(), item.data() + item.size(), n);
        FUZZ_CHECK(!item.empty() && r.ec == std::errc() && r.ptr == item.data() + item.size() &&
                       n == req.body.size(),
                   "Content-Length " + Quote(value) + " with a body of " +
                       std::to_string(req.body.size()) + " bytes");
        if (comma == std::string_view::npos) break;
        rest.remove_prefix(comma + 1);
      }
    }
    if (IEquals(name, "Transfer-Encoding")) {
      ++codings;
      FUZZ_CHECK(IEquals(value, "chunked"), "a handler got Transfer-Encoding " + Quote(value));
    }
  }
  FUZZ_CHECK(hosts <= 1 && codings <= 1 && !(lengths > 0 && codings > 0),
             "ambiguous framing or host reached a handler: " + what);
  for (size_t n : seen) FUZZ_CHECK(n <= 1, "a single field twice reached a handler: " + what);
}

struct Seen {
  int status;
  std::string route;
  bool head;  // a HEAD request that was read whole: its answer has no body
};

class Harness {
 public:
  Harness() {
    options_.port = 0;
    options_.io_threads = 1;
    options_.worker_threads = 2;
    options_.header_limit = kHeaderLimit;
    options_.body_limit = kBodyLimit;
    options_.max_header_fields = kMaxFields;
    options_.max_connections = 8;
    options_.raise_fd_limit = false;
    options_.header_timeout = std::chrono::seconds(5);
    options_.body_timeout = std::chrono::seconds(5);
    server_ = new http::Server(options_);
    auto handler = [this](Request& req) {
      CheckRequest(req, options_);
      ++handler_runs_;
      return http::Json(200, "{\"bytes\":" + std::to_string(req.body.size()) + "}");
    };
    server_->Route("POST", "/echo", handler);
    server_->Route("GET", "/items/{id}", handler);
    server_->OnExchange([this](const http::Exchange& x) {
      std::lock_guard<std::mutex> l(mu_);
      seen_.push_back(Seen{x.status, x.route, x.request != nullptr && x.request->method == "HEAD"});
    });
    const Status st = server_->Start();
    FUZZ_CHECK(st.ok(), "cannot start the server: " + st.ToString());
  }

  ~Harness() { delete server_; }

  void Run(std::string_view input) {
    {
      std::lock_guard<std::mutex> l(mu_);
      seen_.clear();
    }
    handler_runs_ = 0;
    const RawExchange x = ExchangeBytes(server_->port(), input, kDeadline);
    FUZZ_CHECK(!x.timed_out, "no close within the deadline for " + Quote(input));
    FUZZ_CHECK(!x.reset, "the server reset the connection for " + Quote(input));
    WaitIdle(input);
    std::vector<Seen> seen;
    {
      std::lock_guard<std::mutex> l(mu_);
      seen = seen_;
    }
    CheckResponses(x.received, seen, input);
    int64_t routed = 0;
    for (const Seen& s : seen) routed += s.route == "/echo" || s.route == "/items/{id}";
    FUZZ_CHECK(routed == handler_runs_.load(), std::to_string(handler_runs_.load()) +
                                                   " handler runs, " + std::to_string(routed) +
                                                   " answered, for " + Quote(input));
  }

 private:
  // The session may end a moment after the close the client saw.
  void WaitIdle(std::string_view input) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (server_->stats().connections != 0 || server_->in_flight() != 0) {
      FUZZ_CHECK(std::chrono::steady_clock::now() < until,
                 std::to_string(server_->stats().connections) + " connections, " +
                     std::to_string(server_->in_flight()) + " in flight after " + Quote(input));
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

  static void CheckResponses(std::string_view received, const std::vector<Seen>& seen,
                             std::string_view input) {
    const std::string context = " in " + Quote(received) + " for " + Quote(input);
    size_t pos = 0;
    for (size_t i = 0; i < seen.size(); ++i) {
      const size_t head_end = received.find("\r\n\r\n", pos);
      FUZZ_CHECK(head_end != std::string_view::npos, "response " + std::to_string(i) + " of " +
                                                         std::to_string(seen.size()) +
                                                         " is missing" + context);
      const std::string_view head = received.substr(pos, head_end + 2 - pos);
      FUZZ_CHECK(head.substr(0, 7) == "HTTP/1." && head.size() > 12 && head[8] == ' ',
                 "malformed status line" + context);
      int status = 0;
      std::from_chars(head.data() + 9, head.data() + 12, status);
      FUZZ_CHECK(status == seen[i].status, "status " + std::to_string(status) + " arrived, " +
                                               std::to_string(seen[i].status) + " was written" +
                                               context);
      FUZZ_CHECK(status < 500 || status == 501, "answered " + std::to_string(status) + context);
      // One Content-Length; the response's fields are the server's own, one per line.
      size_t length = 0, lengths = 0;
      size_t line = head.find("\r\n") + 2;
      while (line < head.size()) {
        const size_t end = head.find("\r\n", line);
        const std::string_view field = head.substr(line, end - line);
        if (field.size() > 15 && IEquals(field.substr(0, 15), "Content-Length:")) {
          ++lengths;
          std::string_view v = field.substr(15);
          while (!v.empty() && v.front() == ' ') v.remove_prefix(1);
          auto r = std::from_chars(v.data(), v.data() + v.size(), length);
          FUZZ_CHECK(r.ec == std::errc() && r.ptr == v.data() + v.size(),
                     "bad Content-Length" + context);
        }
        line = end + 2;
      }
      FUZZ_CHECK(lengths == 1, "a response without one Content-Length" + context);
      pos = head_end + 4 + (seen[i].head ? 0 : length);
      FUZZ_CHECK(pos <= received.size(), "a response body is cut short" + context);
    }
    FUZZ_CHECK(pos == received.size(),
               "bytes after the last of " + std::to_string(seen.size()) + " responses" + context);
  }

  http::ServerOptions options_;
  http::Server* server_;  // stopped and destroyed at exit, with the harness
  std::atomic<int64_t> handler_runs_{0};
  std::mutex mu_;
  std::vector<Seen> seen_;
};

}  // namespace
}  // namespace converge::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static converge::fuzz::Harness* harness = [] {
    auto* h = new converge::fuzz::Harness();
    // Stops the server's threads before the process's statics are destroyed; registered
    // after their construction, so it runs before their destructors.
    std::atexit([] { delete harness; });
    return h;
  }();
  harness->Run(converge::fuzz::AsText(data, size));
  return 0;
}
