// The HTTP server: Boost.Beast's HTTP/1.1 parser under a read loop of our own, on Asio I/O
// threads; handlers on a worker pool. This is the only translation unit that includes Beast
// (2 cores build this project).
//
// Method: the server is the edge of the system, so every byte that arrives is untrusted
// and every resource a connection can make us hold has a bound (docs/design/http-server.md).
//
//  - Memory. Each connection reads into one `flat_buffer` whose maximum size is
//    `header_limit`; Beast's `basic_parser` is fed from it directly (`put`), and our own
//    `RequestParser` (a `basic_parser` subclass) copies what it parses into a `Request`.
//    Beast 1.74 bounds the header by `header_limit` and the body by `body_limit`, but not a
//    chunk line (size plus extensions) or the trailer section: it waits for their line
//    ends in our buffer. So the buffer's own maximum is what bounds them; when it is full
//    and the parser still needs more, the request is rejected (`Overflow`). Trailer fields
//    are parsed and dropped, never merged into the headers. Header fields are counted
//    (`max_header_fields`). While a handler runs nothing is read, so a pipelined backlog
//    stays in the kernel's socket buffers, not in ours.
//  - Framing. After the header and before the body, `CheckHeader` rejects what two HTTP
//    implementations could frame differently (request smuggling): any Transfer-Encoding
//    other than exactly `chunked` (Beast would read such a body as empty and run it as the
//    next request), Transfer-Encoding in HTTP/1.0, obsolete line folding (detected in
//    `on_field_impl`: Beast unfolds into a side buffer, so a folded value does not point
//    into our input), a missing or repeated Host, a repeated security header. Every
//    rejection writes its answer and closes the connection, since the rest of the stream
//    cannot be trusted to start at a request boundary.
//  - Identity. Only origin-form targets with a canonical path reach the router (no empty
//    or dot segments, no trailing slash, no percent-encoded unreserved characters or
//    slashes): a proxy's path rules in front and our routes then see the same path.
//  - Connections. The acceptor runs on its own strand. At `max_connections` open sessions
//    it stops calling accept; the session that closes below the cap resumes it. An accept
//    that fails for lack of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) leaves
//    the connection queued and would fail again at once, so it is retried after a backoff
//    (10 ms doubling to 1 s) instead of spinning.
#include <strings.h>
#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <charconv>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <future>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include "converge/http.h"
#include "src/core/thread_name.h"

namespace converge::http {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;

using tcp = asio::ip::tcp;
using SteadyClock = std::chrono::steady_clock;

// The worker pool's threads are asio's: each names itself when it first runs a task.
void NameWorkerThread() {
  thread_local bool named = false;
  if (!named) {
    converge::internal::NameThisThread("cv-http-work");
    named = true;
  }
}

constexpr std::string_view kOtherMethod = "other";
constexpr Millis kFirstAcceptBackoff{10};
constexpr Millis kMaxAcceptBackoff{1000};

struct RouteEntry {
  std::string method;
  std::vector<std::string> segments;
  std::string pattern;
  Server::Handler handler;             // one of the two
  Server::AsyncHandler async_handler;
};

std::vector<std::string> Split(std::string_view path) {
  std::vector<std::string> out;
  size_t i = 0;
  while (i < path.size()) {
    if (path[i] == '/') {
      ++i;
      continue;
    }
    size_t j = path.find('/', i);
    if (j == std::string_view::npos) j = path.size();
    out.emplace_back(path.substr(i, j - i));
    i = j;
  }
  return out;
}

bool MatchRoute(const RouteEntry& r, const std::vector<std::string>& segs,
                std::map<std::string, std::string>* params) {
  if (r.segments.size() != segs.size()) return false;
  std::map<std::string, std::string> p;
  for (size_t i = 0; i < segs.size(); ++i) {
    const std::string& s = r.segments[i];
    if (s.size() > 2 && s.front() == '{' && s.back() == '}') {
      if (segs[i].empty()) return false;
      p[s.substr(1, s.size() - 2)] = segs[i];
    } else if (s != segs[i]) {
      return false;
    }
  }
  *params = std::move(p);
  return true;
}

bool IEquals(std::string_view a, std::string_view b) {
  return a.size() == b.size() && strncasecmp(a.data(), b.data(), a.size()) == 0;
}

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

bool Unreserved(unsigned char c) {
  return std::isalnum(c) || c == '-' || c == '.' || c == '_' || c == '~';
}

// Splits an origin-form request target into path and query. Returns nullptr when the path
// is canonical, else why it is not: a proxy in front that matches rules on one spelling
// must not be bypassed by another spelling that reaches the same handler here.
const char* SplitTarget(std::string_view target, std::string* path, std::string* query) {
  if (target.empty() || target.front() != '/') {
    return "the request target must be an absolute path (origin-form)";
  }
  if (target.find('#') != std::string_view::npos) return "a request target has no fragment";
  const size_t q = target.find('?');
  const std::string_view p = target.substr(0, q);
  if (p.size() > 1 && p.back() == '/') return "the path has a trailing slash";
  size_t start = 1;
  while (start <= p.size()) {
    size_t end = p.find('/', start);
    if (end == std::string_view::npos) end = p.size();
    const std::string_view seg = p.substr(start, end - start);
    if (seg.empty() && p.size() > 1) return "the path has an empty segment";
    if (seg == "." || seg == "..") return "the path has a dot segment";
    start = end + 1;
  }
  for (size_t i = 0; i < p.size(); ++i) {
    if (p[i] == '\\') return "the path contains a backslash";
    if (p[i] != '%') continue;
    if (i + 2 >= p.size() || HexValue(p[i + 1]) < 0 || HexValue(p[i + 2]) < 0) {
      return "the path has a malformed percent-encoding";
    }
    const auto c = static_cast<unsigned char>(HexValue(p[i + 1]) * 16 + HexValue(p[i + 2]));
    if (Unreserved(c) || c == '/' || c == '\\') {
      return "the path percent-encodes a character that must be sent as is";
    }
  }
  *path = std::string(p);
  *query = q == std::string_view::npos ? std::string() : std::string(target.substr(q + 1));
  return nullptr;
}

// RFC 9112 §3.2: a Host value is a uri-host with an optional port (empty is allowed).
bool ValidHost(std::string_view host) {
  for (unsigned char c : host) {
    if (c == '\0' || !(Unreserved(c) || std::strchr("!$&'()*+,;=:%[]", c) != nullptr)) {
      return false;
    }
  }
  return true;
}

// Splits a list-valued field on commas, trimming optional whitespace; empty elements are
// kept so that "chunked," is not mistaken for "chunked".
void AppendList(std::string_view value, std::vector<std::string_view>* out) {
  size_t i = 0;
  while (i <= value.size()) {
    size_t j = value.find(',', i);
    if (j == std::string_view::npos) j = value.size();
    std::string_view item = value.substr(i, j - i);
    while (!item.empty() && (item.front() == ' ' || item.front() == '\t')) item.remove_prefix(1);
    while (!item.empty() && (item.back() == ' ' || item.back() == '\t')) item.remove_suffix(1);
    out->push_back(item);
    i = j + 1;
  }
}

// Beast's parser with our limits, writing straight into a Request (no beast::http::fields
// in between, and no trailer field ever reaches the headers).
class RequestParser final : public bhttp::basic_parser<true> {
 public:
  explicit RequestParser(const ServerOptions& o) : max_fields_(o.max_header_fields) {
    header_limit(static_cast<uint32_t>(std::min<size_t>(o.header_limit, UINT32_MAX)));
    body_limit(o.body_limit);
    body_reserve_limit_ = o.body_limit;
  }

  // The input the next put() parses from, to tell a folded field value (which Beast
  // assembles elsewhere) from one that lies in the input.
  void SetInput(const char* begin, size_t size) {
    input_begin_ = begin;
    input_end_ = begin + size;
  }

  Request& request() { return request_; }
  unsigned version() const { return version_; }
  bool obs_fold() const { return obs_fold_; }
  bool too_many_fields() const { return too_many_fields_; }

 private:
  void on_request_impl(bhttp::verb, beast::string_view method, beast::string_view target,
                       int version, beast::error_code&) override {
    request_.method.assign(method.data(), method.size());
    request_.target.assign(target.data(), target.size());
    version_ = static_cast<unsigned>(version);
  }

  void on_response_impl(int, beast::string_view, int, beast::error_code& ec) override {
    ec = bhttp::error::bad_method;  // never called for a request parser
  }

  void on_field_impl(bhttp::field, beast::string_view name, beast::string_view value,
                     beast::error_code& ec) override {
    if (Folded(name, value)) {
      obs_fold_ = true;
      ec = bhttp::error::bad_value;
      return;
    }
    // A trailer field: RFC 9110 §6.5.1 lets a recipient drop it, and merging it into the
    // headers would let a client add, say, an Authorization after the fact.
    if (is_header_done()) return;
    if (request_.headers.size() >= max_fields_) {
      too_many_fields_ = true;
      ec = bhttp::error::header_limit;
      return;
    }
    request_.headers.emplace_back(std::string(name.data(), name.size()),
                                  std::string(value.data(), value.size()));
  }

  void on_header_impl(beast::error_code&) override {}

  void on_body_init_impl(const boost::optional<uint64_t>& length, beast::error_code&) override {
    if (length) {
      request_.body.reserve(static_cast<size_t>(std::min<uint64_t>(*length, body_reserve_limit_)));
    }
  }

  size_t on_body_impl(beast::string_view body, beast::error_code&) override {
    request_.body.append(body.data(), body.size());
    return body.size();
  }

  void on_chunk_header_impl(uint64_t, beast::string_view, beast::error_code&) override {}

  size_t on_chunk_body_impl(uint64_t, beast::string_view body, beast::error_code&) override {
    request_.body.append(body.data(), body.size());
    return body.size();
  }

  void on_finish_impl(beast::error_code&) override {}

  // Beast 1.74 accepts obsolete line folding: it joins the lines in a buffer of its own
  // (so the value does not point into the input), or, when the first line is empty, hands
  // over the value of the next line (so a line break lies between name and value).
  bool Folded(beast::string_view name, beast::string_view value) const {
    std::less_equal<const char*> le;
    const char* v = value.data();
    const char* name_end = name.data() + name.size();
    if (!(le(input_begin_, v) && le(v, input_end_)) || !le(name_end, v)) return true;
    return std::string_view(name_end, static_cast<size_t>(v - name_end)).find('\n') !=
           std::string_view::npos;
  }

  const size_t max_fields_;
  size_t body_reserve_limit_ = 0;
  const char* input_begin_ = nullptr;
  const char* input_end_ = nullptr;
  Request request_;
  unsigned version_ = 11;
  bool obs_fold_ = false;
  bool too_many_fields_ = false;
};

// The length a handler's answer gives in its one Content-Length field, if it is a number.
std::optional<uint64_t> GivenLength(const bhttp::response<bhttp::string_body>& res) {
  auto [first, last] = res.equal_range(bhttp::field::content_length);
  if (first == last || std::next(first) != last) return std::nullopt;
  const beast::string_view v = first->value();
  uint64_t n = 0;
  auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), n);
  if (v.empty() || ec != std::errc() || end != v.data() + v.size()) return std::nullopt;
  return n;
}

}  // namespace

struct Responder::State {
  // Declared first, so destroyed last: after `answer` and `block`, and what they hold
  // (a session), are gone; Server::Stop may return once it has gone (Impl::Pending).
  std::shared_ptr<void> pending;
  std::function<void(Response)> answer;  // called at most once
  std::function<void(std::function<void()>)> block;
  std::atomic<bool> answered{false};
  // Answers, once; what `answer` holds (a session) goes with it, on this thread.
  void Answer(Response response) {
    if (answered.exchange(true)) return;
    std::function<void(Response)> a = std::move(answer);
    if (a) a(std::move(response));
  }
  ~State() {
    try {
      Answer(Problem(500, "Internal Server Error", "the handler did not answer"));
    } catch (...) {
      // Out of memory while answering: the connection is dropped with the session.
    }
  }
};

void Responder::operator()(Response response) const {
  if (state_ != nullptr) state_->Answer(std::move(response));
}

void Responder::Block(std::function<void()> work) const {
  if (state_ == nullptr) return;
  // A thread pool's handler must not throw (asio would terminate the process): work that
  // throws before answering gets 500, as a handler that throws does.
  state_->block([work = std::move(work), respond = *this] {
    try {
      work();
    } catch (...) {
      respond(Problem(500, "Internal Server Error", "the handler failed unexpectedly"));
    }
  });
}

class Server::Impl {
 public:
  explicit Impl(ServerOptions o)
      : options_(std::move(o)),
        accept_strand_(asio::make_strand(ioc_)),
        acceptor_(accept_strand_),
        accept_timer_(accept_strand_),
        workers_(std::max(1, options_.worker_threads)),
        work_(asio::make_work_guard(ioc_)) {}

  ~Impl() { Stop(Millis(0)); }

  // Declared before ioc_, which outlives them otherwise: sessions the io_context destroys
  // at the very end still count themselves out through these.
  ServerOptions options_;
  std::atomic<bool> stopping_{false};
  std::atomic<int64_t> connections_{0};
  std::atomic<int64_t> accepted_{0};
  std::atomic<int64_t> accept_errors_{0};
  std::atomic<int64_t> accept_pauses_{0};
  std::atomic<bool> accept_paused_{false};
  int64_t fd_limit_ = 0;

  asio::io_context ioc_;
  asio::strand<asio::io_context::executor_type> accept_strand_;
  tcp::acceptor acceptor_;
  asio::steady_timer accept_timer_;
  Millis accept_backoff_{0};  // on accept_strand_
  asio::thread_pool workers_;
  // Keeps the I/O threads running while a request sits on the worker pool with no I/O
  // pending, so its response can still be written during a drain.
  asio::executor_work_guard<asio::io_context::executor_type> work_;
  std::vector<std::thread> io_threads_;
  std::vector<RouteEntry> routes_;
  Handler fallback_;
  std::vector<std::function<void(const Exchange&)>> observers_;
  std::atomic<int64_t> in_flight_{0};
  std::mutex drain_mu_;
  std::condition_variable drain_cv_;
  bool stopped_ = false;
  uint16_t port_ = 0;

  class Session;

  // Asynchronous requests in flight: each Responder::State holds a token that counts it
  // until the state is gone and its answer written. Their answers come from threads the
  // server does not own (a store's writer), so Stop, past its drain deadline, refuses new
  // ones (503) and waits for these, as it waits for blocking handlers on the workers; so
  // no answer, and no work for the pool, can come once Stop has returned. (A
  // token let go of on an I/O thread may be the last: Stop joins those threads before the
  // server goes, so what that thread still does with its session is safe.)
  struct Pending {
    std::mutex mu;
    std::condition_variable cv;
    int64_t count = 0;
    bool open = true;
  };
  std::shared_ptr<Pending> pending_ = std::make_shared<Pending>();
  // A token for a new asynchronous request, or nullptr once Stop closed.
  std::shared_ptr<void> PendingToken() {
    std::shared_ptr<Pending> p = pending_;
    std::lock_guard<std::mutex> l(p->mu);
    if (!p->open) return nullptr;
    ++p->count;
    return std::shared_ptr<void>(p.get(), [p](void*) {
      std::lock_guard<std::mutex> l(p->mu);
      if (--p->count == 0) p->cv.notify_all();
    });
  }
  // Refuses new asynchronous requests, then waits for those in flight.
  void CloseAndWaitForPending() {
    std::unique_lock<std::mutex> l(pending_->mu);
    pending_->open = false;
    pending_->cv.wait(l, [&] { return pending_->count == 0; });
  }

  void Accept();
  void OnAccept(beast::error_code ec, tcp::socket socket);
  // The route `req` matches (filling req.params and *route), or nullptr; then *allow lists
  // the methods of the routes matching its path.
  const RouteEntry* Match(Request& req, std::string* route, std::string* allow);
  // The answer for a request without an asynchronous route: its handler's, the fallback's,
  // 405 or 404. On a thread that may block.
  Response Answer(const RouteEntry* r, Request& req, const std::string& allow,
                  std::string* route);
  // Match and Answer; an asynchronous route's answer is waited for (Server::Handle).
  Response Dispatch(Request& req, std::string* route);

  // The metric label for `method`: the entry of options_.methods (which lives as long as
  // the server), or "other".
  std::string_view MethodLabel(std::string_view method) const {
    for (const std::string& m : options_.methods) {
      if (m == method) return m;
    }
    return kOtherMethod;
  }

  void Observe(const Exchange& x) {
    for (const auto& observer : observers_) observer(x);
  }

  // A session ended (any thread): resume a paused accept loop once below the cap.
  void ConnectionClosed() {
    const int64_t open = --connections_;
    if (accept_paused_.load() && open < options_.max_connections && !stopping_.load()) {
      asio::post(accept_strand_, [this] {
        if (accept_paused_.exchange(false) && !stopping_.load()) Accept();
      });
    }
  }

  void Finished() {
    std::lock_guard<std::mutex> l(drain_mu_);
    --in_flight_;
    drain_cv_.notify_all();
  }

  void Stop(Millis drain) {
    if (stopped_) return;
    stopped_ = true;
    stopping_ = true;
    // Closed before returning, not merely posted: ioc_.stop() below could otherwise win,
    // leaving a listening socket whose backlog nobody serves.
    auto close_acceptor = [this] {
      beast::error_code ec;
      acceptor_.close(ec);
      accept_timer_.cancel();
    };
    if (io_threads_.empty()) {
      close_acceptor();
    } else {
      std::promise<void> closed;
      asio::post(accept_strand_, [&] {
        close_acceptor();
        closed.set_value();
      });
      closed.get_future().wait();
    }
    {
      std::unique_lock<std::mutex> l(drain_mu_);
      drain_cv_.wait_for(l, drain, [&] { return in_flight_.load() == 0; });
    }
    CloseAndWaitForPending();
    workers_.join();
    work_.reset();
    ioc_.stop();
    for (auto& t : io_threads_) {
      if (t.joinable()) t.join();
    }
  }
};

class Server::Impl::Session : public std::enable_shared_from_this<Session> {
 public:
  Session(Impl* server, tcp::socket socket)
      : server_(server),
        stream_(std::move(socket)),
        buffer_(std::max<size_t>(server->options_.header_limit, 1024)) {
    ++server_->connections_;
  }
  ~Session() { server_->ConnectionClosed(); }

  void Run() {
    asio::dispatch(stream_.get_executor(),
                   beast::bind_front_handler(&Session::StartRequest, shared_from_this()));
  }

 private:
  void StartRequest() {
    parser_.emplace(server_->options_);
    header_checked_ = false;
    continue_ = false;
    stream_.expires_after(server_->options_.header_timeout);
    Parse();
  }

  // Feeds what is buffered to the parser until it needs more input, fails, or has a whole
  // request. Reads happen only here, so a connection never buffers more than buffer_ holds.
  void Parse() {
    for (;;) {
      if (buffer_.size() == 0) return Read();
      const auto data = buffer_.data();
      parser_->SetInput(static_cast<const char*>(data.data()), data.size());
      beast::error_code ec;
      const size_t used = parser_->put(data, ec);
      buffer_.consume(used);
      if (ec == bhttp::error::need_more) return Read();
      if (ec) return ParseError(ec);
      if (parser_->is_header_done() && !header_checked_) {
        header_checked_ = true;
        if (!CheckHeader()) return;
        stream_.expires_after(server_->options_.body_timeout);
        // The client waits for this before it sends the body (RFC 9110 §10.1.1); a body
        // already under way needs none.
        if (continue_ && !parser_->is_done() && buffer_.size() == 0) return SendContinue();
      }
      if (parser_->is_done()) return Dispatch();
    }
  }

  // Answers 100 (Continue), then reads the body.
  void SendContinue() {
    static constexpr std::string_view kContinue = "HTTP/1.1 100 Continue\r\n\r\n";
    auto self = shared_from_this();
    asio::async_write(stream_, asio::buffer(kContinue.data(), kContinue.size()),
                      [self](beast::error_code ec, size_t) {
                        if (ec) return self->Close();
                        self->Parse();
                      });
  }

  void Read() {
    const size_t n = beast::read_size(buffer_, 64 << 10);
    if (n == 0) return Overflow();
    auto self = shared_from_this();
    stream_.async_read_some(buffer_.prepare(n), [self](beast::error_code ec, size_t bytes) {
      self->buffer_.commit(bytes);
      // The peer went away (possibly mid-request), a timeout, or a socket error: there is
      // no one to answer.
      if (ec) return self->Close();
      self->Parse();
    });
  }

  // The buffer is full and the parser still waits for a line end.
  void Overflow() {
    const std::string limit = std::to_string(buffer_.max_size());
    if (!parser_->is_header_done()) {
      return Reject(431, "Request Header Fields Too Large",
                    "the request header exceeds " + limit + " bytes");
    }
    // Past the header the parser keeps unconsumed only the current chunk line (after the
    // CRLF that ended the chunk before it) or, once it has read a last chunk line, that
    // line and the trailer section: a complete line here can only be the last chunk's.
    const auto d = buffer_.data();
    std::string_view rest(static_cast<const char*>(d.data()), d.size());
    if (rest.substr(0, 2) == "\r\n") rest.remove_prefix(2);
    if (rest.find("\r\n") != std::string_view::npos) {
      return Reject(431, "Request Header Fields Too Large",
                    "the trailer section exceeds " + limit + " bytes");
    }
    Reject(400, "Bad Request", "a chunk line (size and extensions) exceeds " + limit + " bytes");
  }

  void ParseError(beast::error_code ec) {
    if (ec == bhttp::error::header_limit) {
      return Reject(431, "Request Header Fields Too Large",
                    parser_->too_many_fields()
                        ? "the request has more than " +
                              std::to_string(server_->options_.max_header_fields) + " header fields"
                        : "the request header exceeds " +
                              std::to_string(server_->options_.header_limit) + " bytes");
    }
    if (ec == bhttp::error::body_limit) {
      return Reject(
          413, "Content Too Large",
          "the request body exceeds " + std::to_string(server_->options_.body_limit) + " bytes");
    }
    if (parser_->obs_fold()) {
      return Reject(400, "Bad Request",
                    "obsolete line folding is not accepted (RFC 9112, section 5.2)");
    }
    if (ec == bhttp::error::bad_chunk || ec == bhttp::error::bad_chunk_extension) {
      return Reject(400, "Bad Request", "malformed chunked transfer coding");
    }
    if (ec == bhttp::error::bad_content_length || ec == bhttp::error::bad_transfer_encoding) {
      return Reject(400, "Bad Request",
                    "conflicting or malformed Content-Length / Transfer-Encoding");
    }
    Reject(400, "Bad Request", "the request could not be parsed as HTTP/1.1");
  }

  // The header is complete and the body not yet read: decides whether the request is
  // unambiguous enough to read on. False after answering it.
  bool CheckHeader() {
    Request& req = parser_->request();
    const ServerOptions& o = server_->options_;
    version_ = parser_->version();
    keep_alive_ = parser_->keep_alive();
    if (server_->MethodLabel(req.method) == kOtherMethod) {
      Reject(501, "Not Implemented", "the method is not implemented by this server");
      return false;
    }
    size_t hosts = 0;
    const std::string* host = nullptr;
    std::vector<std::string_view> codings;
    std::vector<std::string_view> expectations;
    bool has_length = false;
    std::vector<size_t> seen(o.single_headers.size(), 0);
    for (const auto& [name, value] : req.headers) {
      if (IEquals(name, "Host")) {
        ++hosts;
        host = &value;
      } else if (IEquals(name, "Transfer-Encoding")) {
        AppendList(value, &codings);
      } else if (IEquals(name, "Content-Length")) {
        has_length = true;
      } else if (IEquals(name, "Expect")) {
        AppendList(value, &expectations);
      }
      for (size_t i = 0; i < o.single_headers.size(); ++i) {
        if (IEquals(name, o.single_headers[i]) && ++seen[i] > 1) {
          Reject(400, "Bad Request",
                 "the header " + o.single_headers[i] + " appears more than once");
          return false;
        }
      }
    }
    if (hosts > 1 || (hosts == 0 && version_ >= 11) || (host && !ValidHost(*host))) {
      Reject(400, "Bad Request",
             hosts > 1    ? "more than one Host header"
             : hosts == 0 ? "an HTTP/1.1 request needs a Host header"
                          : "the Host header is malformed");
      return false;
    }
    if (!codings.empty()) {
      // RFC 9112 §6.1 and §6.3: only a final `chunked` frames a request body; anything
      // else leaves its length unknown, and with Content-Length too the two could each be
      // believed by a different hop.
      const bool chunked_last = IEquals(codings.back(), "chunked");
      const bool chunked_before = std::any_of(codings.begin(), codings.end() - 1,
                                              [](auto c) { return IEquals(c, "chunked"); });
      if (version_ < 11 || has_length || !chunked_last || chunked_before) {
        Reject(400, "Bad Request",
               version_ < 11 ? "Transfer-Encoding is not defined in HTTP/1.0"
               : has_length  ? "both Transfer-Encoding and Content-Length"
                             : "chunked must be the final transfer coding, applied once");
        return false;
      }
      if (codings.size() != 1 || !parser_->chunked()) {
        Reject(501, "Not Implemented", "only the chunked transfer coding is implemented");
        return false;
      }
    }
    if (const char* why = SplitTarget(req.target, &req.path, &req.query)) {
      Reject(400, "Bad Request", std::string(why) + "; send the canonical path");
      return false;
    }
    // RFC 9110 §10.1.1: an HTTP/1.0 request's expectations are ignored; 100-continue is
    // met (Parse answers 100 before it reads the body), any other cannot be.
    if (version_ >= 11) {
      for (std::string_view e : expectations) {
        if (e.empty()) continue;
        if (!IEquals(e, "100-continue")) {
          Reject(417, "Expectation Failed", "only the expectation 100-continue can be met");
          return false;
        }
        continue_ = true;
      }
    }
    return true;
  }

  void Dispatch() {
    stream_.expires_never();
    auto req = std::make_shared<Request>(std::move(parser_->request()));
    parser_.reset();
    beast::error_code ep_ec;
    auto ep = stream_.socket().remote_endpoint(ep_ec);
    if (!ep_ec) req->remote = ep.address().to_string();
    started_ = SteadyClock::now();

    ++server_->in_flight_;
    auto self = shared_from_this();
    std::string route;
    std::string allow;
    const RouteEntry* r = server_->Match(*req, &route, &allow);
    if (r != nullptr && r->async_handler) return DispatchAsync(*r, req, std::move(route));
    asio::post(server_->workers_, [self, req, r, route = std::move(route),
                                   allow = std::move(allow)]() mutable {
      NameWorkerThread();
      Response resp = self->server_->Answer(r, *req, allow, &route);
      asio::post(self->stream_.get_executor(),
                 [self, req, resp = std::move(resp), route]() mutable {
                   self->Write(req, std::move(resp), std::move(route));
                 });
    });
  }

  // Runs an asynchronous route's handler here, on the I/O thread; its answer, from any
  // thread, is written here.
  void DispatchAsync(const RouteEntry& r, std::shared_ptr<Request> req, std::string route) {
    std::shared_ptr<void> token = server_->PendingToken();
    if (token == nullptr) {
      Response closing = Problem(503, "Service Unavailable", "the server is stopping");
      closing.Set("Retry-After", "1");
      return Write(req, std::move(closing), std::move(route));
    }
    auto state = std::make_shared<Responder::State>();
    // The token goes with the answer until it is written (Write), so that Stop waits for
    // the write too: the io_context runs until then.
    state->answer = [self = shared_from_this(), req, route, token](Response resp) {
      asio::post(self->stream_.get_executor(),
                 [self, req, resp = std::move(resp), route, token]() mutable {
                   self->Write(req, std::move(resp), std::move(route), std::move(token));
                 });
    };
    state->pending = std::move(token);
    state->block = [server = server_](std::function<void()> work) {
      asio::post(server->workers_, [work = std::move(work)] {
        NameWorkerThread();
        work();
      });
    };
    Responder respond(std::move(state));
    try {
      r.async_handler(*req, respond);
    } catch (...) {
      respond(Problem(500, "Internal Server Error", "the handler failed unexpectedly"));
    }
  }

  // `hold` (an asynchronous request's pending token) is let go of once the answer is
  // written or the write failed.
  void Write(std::shared_ptr<Request> req, Response resp, std::string route,
             std::shared_ptr<void> hold = nullptr) {
    auto res = std::make_shared<bhttp::response<bhttp::string_body>>();
    res->version(version_);
    if (resp.status < 100 || resp.status > 599) resp.status = 500;
    res->result(static_cast<unsigned>(resp.status));
    res->set(bhttp::field::server, server_->options_.server_name);
    for (auto& [k, v] : resp.headers) res->insert(k, v);
    res->body() = std::move(resp.body);
    // 1xx, 204 and 304 have no body (RFC 9110 §15): one from a handler is dropped (Beast's
    // prepare_payload throws on it, and nothing here would catch that).
    const bool bodiless = resp.status < 200 || resp.status == 204 || resp.status == 304;
    if (bodiless) res->body().clear();
    bool close = !keep_alive_ || server_->stopping_.load();
    res->keep_alive(!close);
    // HEAD: the Content-Length of the GET answer, no body (RFC 9110 §9.3.2). A handler that
    // knows that length without the body (the proxy passing an upstream's HEAD answer on)
    // gives it as a Content-Length field beside an empty body; an empty body without one
    // is a length not known without the body (an upstream's answer sent in chunks), and
    // the answer says none (§9.3.2 lets it omit a field only the content determines),
    // where it said 0 before.
    const bool head = req->method == "HEAD";
    const bool head_unsized = head && !bodiless && res->body().empty();
    std::optional<uint64_t> head_length;
    if (head_unsized) head_length = GivenLength(*res);
    // A 304's Content-Length is the 200 answer's length, so only one a handler gives; 1xx
    // and 204 have none (RFC 9110 §8.6). Beast's prepare_payload writes 0 on each.
    const std::optional<uint64_t> given_304 =
        resp.status == 304 ? GivenLength(*res) : std::nullopt;
    res->prepare_payload();
    if (head) {
      res->body().clear();
      if (head_unsized) {
        res->content_length(head_length ? boost::optional<uint64_t>(*head_length)
                                        : boost::none);
      }
    }
    if (bodiless) {
      res->content_length(given_304 ? boost::optional<uint64_t>(*given_304) : boost::none);
    }
    stream_.expires_after(server_->options_.body_timeout);
    double secs = std::chrono::duration<double>(SteadyClock::now() - started_).count();
    auto self = shared_from_this();
    bhttp::async_write(stream_, *res,
                       [self, res, req, route = std::move(route), close, secs,
                        status = resp.status, hold = std::move(hold)](beast::error_code ec,
                                                                      size_t) {
                         self->server_->Observe(Exchange{req.get(), status, route, secs,
                                                         self->server_->MethodLabel(req->method)});
                         self->server_->Finished();
                         if (ec || close) return self->Close();
                         self->StartRequest();
                       });
  }

  // Answers a request that was not read whole (or must not be), then closes: the rest of
  // the stream cannot be trusted to begin at a request boundary.
  void Reject(int status, const char* title, const std::string& detail) {
    const std::string_view method =
        parser_ ? server_->MethodLabel(parser_->request().method) : kOtherMethod;
    parser_.reset();
    auto res = std::make_shared<bhttp::response<bhttp::string_body>>();
    Response p = Problem(status, title, detail);
    res->version(11);
    res->result(static_cast<unsigned>(status));
    res->set(bhttp::field::server, server_->options_.server_name);
    for (auto& [k, v] : p.headers) res->insert(k, v);
    res->body() = p.body;
    res->keep_alive(false);
    res->prepare_payload();
    stream_.expires_after(server_->options_.body_timeout);
    auto self = shared_from_this();
    bhttp::async_write(stream_, *res, [self, res, status, method](beast::error_code, size_t) {
      self->server_->Observe(Exchange{nullptr, status, "rejected", 0, method});
      // Closing with unread request bytes would make the kernel send RST, and the client
      // could lose the response: half-close, then discard what still arrives (bounded in
      // time; the buffer is given back first).
      self->buffer_.clear();
      self->buffer_.shrink_to_fit();
      beast::error_code ec;
      self->stream_.socket().shutdown(tcp::socket::shutdown_send, ec);
      self->stream_.expires_after(std::chrono::seconds(2));
      self->Drain();
    });
  }

  void Drain() {
    auto self = shared_from_this();
    drain_buf_.resize(16 << 10);
    stream_.async_read_some(asio::buffer(drain_buf_), [self](beast::error_code ec, size_t) {
      if (ec) return self->Close();
      self->Drain();
    });
  }

  void Close() {
    beast::error_code ec;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ec);
    stream_.close();
  }

  Impl* server_;
  beast::tcp_stream stream_;
  // Unparsed input; its maximum size is the per-connection bound on buffered bytes.
  beast::flat_buffer buffer_;
  std::optional<RequestParser> parser_;
  bool header_checked_ = false;
  bool continue_ = false;  // the request expects 100 (Continue) before it sends its body
  bool keep_alive_ = false;
  unsigned version_ = 11;
  std::vector<char> drain_buf_;
  SteadyClock::time_point started_;
};

// On accept_strand_.
void Server::Impl::Accept() {
  if (stopping_.load()) return;
  if (connections_.load() >= options_.max_connections) {
    accept_paused_ = true;
    ++accept_pauses_;
    // A session may have closed between the check and the flag without seeing the flag.
    if (connections_.load() >= options_.max_connections || !accept_paused_.exchange(false)) {
      return;
    }
  }
  acceptor_.async_accept(asio::make_strand(ioc_), [this](beast::error_code ec, tcp::socket s) {
    OnAccept(ec, std::move(s));
  });
}

// On accept_strand_.
void Server::Impl::OnAccept(beast::error_code ec, tcp::socket socket) {
  if (stopping_.load() || ec == asio::error::operation_aborted) return;
  if (ec) {
    ++accept_errors_;
    // One connection's trouble (reset while queued): the next one may be fine.
    if (ec == asio::error::connection_aborted) return Accept();
    // Out of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) or anything else: the
    // connection stays queued and accept would fail again at once. Back off and let
    // sessions close.
    accept_backoff_ = accept_backoff_.count() == 0
                          ? kFirstAcceptBackoff
                          : std::min(kMaxAcceptBackoff, accept_backoff_ * 2);
    accept_timer_.expires_after(accept_backoff_);
    accept_timer_.async_wait([this](beast::error_code wait_ec) {
      if (!wait_ec) Accept();
    });
    return;
  }
  accept_backoff_ = Millis(0);
  ++accepted_;
  std::make_shared<Session>(this, std::move(socket))->Run();
  Accept();
}

const RouteEntry* Server::Impl::Match(Request& req, std::string* route, std::string* allow) {
  std::vector<std::string> segs = Split(req.path);
  const bool head = req.method == "HEAD";
  for (const RouteEntry& r : routes_) {
    std::map<std::string, std::string> params;
    if (!MatchRoute(r, segs, &params)) continue;
    if (r.method != req.method && !(head && r.method == "GET")) {
      if (!allow->empty()) *allow += ", ";
      *allow += r.method;
      if (r.method == "GET") *allow += ", HEAD";
      continue;
    }
    *route = r.pattern;
    req.params = std::move(params);
    return &r;
  }
  return nullptr;
}

Response Server::Impl::Dispatch(Request& req, std::string* route) {
  std::string allow;
  const RouteEntry* r = Match(req, route, &allow);
  if (r == nullptr || !r->async_handler) return Answer(r, req, allow, route);
  auto answer = std::make_shared<std::promise<Response>>();
  std::future<Response> answered = answer->get_future();
  auto state = std::make_shared<Responder::State>();
  state->answer = [answer](Response resp) { answer->set_value(std::move(resp)); };
  state->block = [](std::function<void()> work) { work(); };
  {
    Responder respond(std::move(state));
    try {
      r->async_handler(req, respond);
    } catch (...) {
      respond(Problem(500, "Internal Server Error", "the handler failed unexpectedly"));
    }
  }
  return answered.get();
}

Response Server::Impl::Answer(const RouteEntry* r, Request& req, const std::string& allow,
                              std::string* route) {
  if (r != nullptr) {
    try {
      return r->handler(req);
    } catch (...) {
      return Problem(500, "Internal Server Error", "the handler failed unexpectedly");
    }
  }
  if (fallback_) {
    *route = "fallback";
    try {
      return fallback_(req);
    } catch (...) {
      return Problem(500, "Internal Server Error", "the handler failed unexpectedly");
    }
  }
  *route = "unmatched";
  if (!allow.empty()) {
    Response r = Problem(405, "Method Not Allowed",
                         req.method + " is not allowed on " + req.path + "; allowed: " + allow);
    r.Set("Allow", allow);
    return r;
  }
  return Problem(404, "Not Found", "no route for " + req.path);
}

Server::Server(ServerOptions options) : impl_(std::make_unique<Impl>(std::move(options))) {}
Server::~Server() { Stop(Millis(0)); }

void Server::Route(std::string method, std::string pattern, Handler handler) {
  impl_->routes_.push_back(
      RouteEntry{std::move(method), Split(pattern), pattern, std::move(handler)});
}

void Server::RouteAsync(std::string method, std::string pattern, AsyncHandler handler) {
  impl_->routes_.push_back(
      RouteEntry{std::move(method), Split(pattern), pattern, nullptr, std::move(handler)});
}

void Server::Fallback(Handler handler) { impl_->fallback_ = std::move(handler); }

Response Server::Handle(Request& request) {
  std::string route;
  return impl_->Dispatch(request, &route);
}

void Server::OnExchange(std::function<void(const Exchange&)> observer) {
  impl_->observers_.push_back(std::move(observer));
}

Status Server::Start() {
  const ServerOptions& o = impl_->options_;
  if (o.max_connections < 1) return InvalidArgumentError("max_connections must be at least 1");
  if (o.header_limit < 1024) return InvalidArgumentError("header_limit must be at least 1024");
  if (o.max_header_fields < 1) return InvalidArgumentError("max_header_fields must be at least 1");
  if (o.methods.empty()) return InvalidArgumentError("methods must not be empty");
  // Every connection is a descriptor: let the process use what the administrator allows.
  rlimit rl{};
  if (o.raise_fd_limit && getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    (void)setrlimit(RLIMIT_NOFILE, &rl);
  }
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
    impl_->fd_limit_ = rl.rlim_cur == RLIM_INFINITY ? INT64_MAX : static_cast<int64_t>(rl.rlim_cur);
  }
  beast::error_code ec;
  auto addr = asio::ip::make_address(o.address, ec);
  if (ec) return InvalidArgumentError("bad listen address '" + o.address + "'");
  tcp::endpoint ep(addr, o.port);
  auto& acc = impl_->acceptor_;
  acc.open(ep.protocol(), ec);
  if (!ec) acc.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) acc.bind(ep, ec);
  if (!ec) acc.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    return UnavailableError("cannot listen on " + o.address + ":" + std::to_string(o.port) + ": " +
                            ec.message());
  }
  impl_->port_ = acc.local_endpoint().port();
  asio::post(impl_->accept_strand_, [this] { impl_->Accept(); });
  for (int i = 0; i < std::max(1, o.io_threads); ++i) {
    impl_->io_threads_.emplace_back([this] {
      converge::internal::NameThisThread("cv-http-io");
      impl_->ioc_.run();
    });
  }
  return OkStatus();
}

uint16_t Server::port() const { return impl_->port_; }
void Server::Stop(Millis drain) { impl_->Stop(drain); }
int64_t Server::in_flight() const { return impl_->in_flight_.load(); }

ServerStats Server::stats() const {
  return ServerStats{impl_->connections_.load(), impl_->accepted_.load(),
                     impl_->accept_errors_.load(), impl_->accept_pauses_.load(), impl_->fd_limit_};
}

}  // namespace converge::http
