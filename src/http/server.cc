// The HTTP server: Boost.Beast sessions on Asio I/O threads, handlers on a worker pool.
// This is the only translation unit that includes Beast (2 cores build this project).
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <thread>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include "converge/http.h"

namespace converge::http {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
using tcp = asio::ip::tcp;
using SteadyClock = std::chrono::steady_clock;

struct RouteEntry {
  std::string method;
  std::vector<std::string> segments;
  std::string pattern;
  Server::Handler handler;
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

}  // namespace

class Server::Impl {
 public:
  explicit Impl(ServerOptions o)
      : options_(std::move(o)),
        acceptor_(ioc_),
        workers_(std::max(1, options_.worker_threads)),
        work_(asio::make_work_guard(ioc_)) {}

  ~Impl() { Stop(Millis(0)); }

  ServerOptions options_;
  asio::io_context ioc_;
  tcp::acceptor acceptor_;
  asio::thread_pool workers_;
  // Keeps the I/O threads running while a request sits on the worker pool with no I/O
  // pending, so its response can still be written during a drain.
  asio::executor_work_guard<asio::io_context::executor_type> work_;
  std::vector<std::thread> io_threads_;
  std::vector<RouteEntry> routes_;
  std::function<void(const Exchange&)> observer_;
  std::atomic<bool> stopping_{false};
  std::atomic<int64_t> in_flight_{0};
  std::mutex drain_mu_;
  std::condition_variable drain_cv_;
  bool stopped_ = false;
  uint16_t port_ = 0;

  class Session;

  void Accept();
  Response Dispatch(Request& req, std::string* route);

  void Finished() {
    std::lock_guard<std::mutex> l(drain_mu_);
    --in_flight_;
    drain_cv_.notify_all();
  }

  void Stop(Millis drain) {
    if (stopped_) return;
    stopped_ = true;
    stopping_ = true;
    asio::post(ioc_, [this] {
      beast::error_code ec;
      acceptor_.close(ec);
    });
    {
      std::unique_lock<std::mutex> l(drain_mu_);
      drain_cv_.wait_for(l, drain, [&] { return in_flight_.load() == 0; });
    }
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
  Session(Impl* server, tcp::socket socket) : server_(server), stream_(std::move(socket)) {}

  void Run() {
    asio::dispatch(stream_.get_executor(),
                   beast::bind_front_handler(&Session::ReadHeader, shared_from_this()));
  }

 private:
  void ReadHeader() {
    parser_.emplace();
    parser_->body_limit(server_->options_.body_limit);
    parser_->header_limit(static_cast<uint32_t>(server_->options_.header_limit));
    stream_.expires_after(server_->options_.header_timeout);
    bhttp::async_read_header(stream_, buffer_, *parser_,
                             beast::bind_front_handler(&Session::OnHeader, shared_from_this()));
  }

  void OnHeader(beast::error_code ec, size_t) {
    if (ec == bhttp::error::header_limit) return Reject(431, "Request Header Fields Too Large");
    // Beast checks Content-Length against the body limit while parsing the header.
    if (ec == bhttp::error::body_limit) return Reject(413, "Content Too Large");
    static const auto& kHttpErrors = beast::error_code(bhttp::error::end_of_stream).category();
    if (ec) {
      if (ec == bhttp::error::end_of_stream || ec.category() != kHttpErrors) {
        return Close();  // the peer went away, or a timeout / socket error
      }
      return Reject(400, "Bad Request");  // a malformed request line or header
    }
    const auto& h = parser_->get();
    if (h.has_content_length() && *parser_->content_length() > server_->options_.body_limit) {
      return Reject(413, "Content Too Large");
    }
    stream_.expires_after(server_->options_.body_timeout);
    bhttp::async_read(stream_, buffer_, *parser_,
                      beast::bind_front_handler(&Session::OnBody, shared_from_this()));
  }

  void OnBody(beast::error_code ec, size_t) {
    if (ec == bhttp::error::body_limit) return Reject(413, "Content Too Large");
    if (ec) return Close();
    stream_.expires_never();
    auto req = std::make_shared<Request>();
    auto& m = parser_->get();
    req->method = std::string(m.method_string());
    req->target = std::string(m.target());
    size_t q = req->target.find('?');
    req->path = req->target.substr(0, q);
    if (q != std::string::npos) req->query = req->target.substr(q + 1);
    for (const auto& f : m) req->headers.emplace_back(std::string(f.name_string()), std::string(f.value()));
    req->body = std::move(m.body());
    beast::error_code ep_ec;
    auto ep = stream_.socket().remote_endpoint(ep_ec);
    if (!ep_ec) req->remote = ep.address().to_string();
    keep_alive_ = m.keep_alive();
    version_ = m.version();
    started_ = SteadyClock::now();

    ++server_->in_flight_;
    auto self = shared_from_this();
    asio::post(server_->workers_, [self, req] {
      std::string route;
      Response resp = self->server_->Dispatch(*req, &route);
      asio::post(self->stream_.get_executor(), [self, req, resp = std::move(resp), route]() mutable {
        self->Write(req, std::move(resp), std::move(route));
      });
    });
  }

  void Write(std::shared_ptr<Request> req, Response resp, std::string route) {
    auto res = std::make_shared<bhttp::response<bhttp::string_body>>();
    res->version(version_);
    res->result(static_cast<unsigned>(resp.status));
    res->set(bhttp::field::server, server_->options_.server_name);
    for (auto& [k, v] : resp.headers) res->insert(k, v);
    res->body() = std::move(resp.body);
    bool close = !keep_alive_ || server_->stopping_.load();
    res->keep_alive(!close);
    res->prepare_payload();
    stream_.expires_after(server_->options_.body_timeout);
    double secs = std::chrono::duration<double>(SteadyClock::now() - started_).count();
    auto self = shared_from_this();
    bhttp::async_write(stream_, *res,
                       [self, res, req, route = std::move(route), close, secs,
                        status = resp.status](beast::error_code ec, size_t) {
                         if (self->server_->observer_) {
                           self->server_->observer_(Exchange{req.get(), status, route, secs});
                         }
                         self->server_->Finished();
                         if (ec || close) return self->Close();
                         self->ReadHeader();
                       });
  }

  // Answers a request that could not be read whole, then closes the connection.
  void Reject(int status, const char* title) {
    auto res = std::make_shared<bhttp::response<bhttp::string_body>>();
    Response p = Problem(status, title,
                         status == 413   ? "the request body exceeds " +
                                             std::to_string(server_->options_.body_limit) + " bytes"
                         : status == 431 ? "the request header is too large"
                                         : "the request could not be parsed as HTTP/1.1");
    res->version(11);
    res->result(static_cast<unsigned>(status));
    for (auto& [k, v] : p.headers) res->insert(k, v);
    res->body() = p.body;
    res->keep_alive(false);
    res->prepare_payload();
    stream_.expires_after(server_->options_.body_timeout);
    auto self = shared_from_this();
    bhttp::async_write(stream_, *res, [self, res, status](beast::error_code, size_t) {
      if (self->server_->observer_) self->server_->observer_(Exchange{nullptr, status, "rejected", 0});
      // Closing with unread request bytes would make the kernel send RST, and the client
      // could lose the response: half-close, then discard what still arrives (bounded).
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
  beast::flat_buffer buffer_;
  std::optional<bhttp::request_parser<bhttp::string_body>> parser_;
  bool keep_alive_ = false;
  unsigned version_ = 11;
  std::vector<char> drain_buf_;
  SteadyClock::time_point started_;
};

void Server::Impl::Accept() {
  acceptor_.async_accept(asio::make_strand(ioc_), [this](beast::error_code ec, tcp::socket s) {
    if (ec) {
      if (ec == asio::error::operation_aborted || stopping_.load()) return;
    } else if (!stopping_.load()) {
      std::make_shared<Session>(this, std::move(s))->Run();
    }
    if (!stopping_.load()) Accept();
  });
}

Response Server::Impl::Dispatch(Request& req, std::string* route) {
  std::vector<std::string> segs = Split(req.path);
  std::string allow;
  for (const RouteEntry& r : routes_) {
    std::map<std::string, std::string> params;
    if (!MatchRoute(r, segs, &params)) continue;
    if (r.method != req.method) {
      if (!allow.empty()) allow += ", ";
      allow += r.method;
      continue;
    }
    *route = r.pattern;
    req.params = std::move(params);
    try {
      return r.handler(req);
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

void Server::OnExchange(std::function<void(const Exchange&)> observer) {
  impl_->observer_ = std::move(observer);
}

Status Server::Start() {
  beast::error_code ec;
  auto addr = asio::ip::make_address(impl_->options_.address, ec);
  if (ec) return InvalidArgumentError("bad listen address '" + impl_->options_.address + "'");
  tcp::endpoint ep(addr, impl_->options_.port);
  auto& acc = impl_->acceptor_;
  acc.open(ep.protocol(), ec);
  if (!ec) acc.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) acc.bind(ep, ec);
  if (!ec) acc.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    return UnavailableError("cannot listen on " + impl_->options_.address + ":" +
                            std::to_string(impl_->options_.port) + ": " + ec.message());
  }
  impl_->port_ = acc.local_endpoint().port();
  impl_->Accept();
  for (int i = 0; i < std::max(1, impl_->options_.io_threads); ++i) {
    impl_->io_threads_.emplace_back([this] { impl_->ioc_.run(); });
  }
  return OkStatus();
}

uint16_t Server::port() const { return impl_->port_; }
void Server::Stop(Millis drain) { impl_->Stop(drain); }
int64_t Server::in_flight() const { return impl_->in_flight_.load(); }

}  // namespace converge::http
