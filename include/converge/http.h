// HTTP for converge services: an asynchronous server (Boost.Beast/Asio underneath, never
// visible here), a blocking client (libcurl), and RFC 9457 problem+json responses.
//
// Server model: I/O is asynchronous on `io_threads`; a handler (Route) runs on a separate
// worker pool, never on an I/O thread, because handlers block (database transactions,
// outbound HTTP). An asynchronous handler (RouteAsync) runs on the I/O thread and answers
// later through a Responder, from any thread (a store's writer, after its commit). Each
// connection reads a header under `header_timeout` (which also
// bounds keep-alive idle time) and a body under `body_timeout`, so slow clients cannot
// hold connections; a body over `body_limit` gets 413, an oversized header 431. Stop()
// stops accepting, lets in-flight requests finish (up to a deadline) and closes.
//
// The server is an edge: whatever bytes arrive, a connection holds at most about
// `header_limit` of unparsed input plus one request (`body_limit`), and at most
// `max_connections` connections are open. Requests whose framing or identity is ambiguous
// (a Transfer-Encoding other than `chunked`, obsolete line folding, HTTP/1.1 without Host,
// a security header sent twice, a non-canonical path) are answered 400 and the connection
// is closed; methods outside `methods` get 501. docs/design/http-server.md has the rules.
//
// Thread safety: register routes before Start(). Start/Stop from one owner thread.
// HttpClient is safe to use from many threads.
#ifndef CONVERGE_HTTP_H_
#define CONVERGE_HTTP_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "converge/clock.h"
#include "converge/status.h"

namespace converge::internal {
class HmacSha256Key;
}  // namespace converge::internal

namespace converge::http {

using Headers = std::vector<std::pair<std::string, std::string>>;

// The first header named `name` (case-insensitive), or nullptr.
const std::string* FindHeader(const Headers& headers, std::string_view name);

struct Request {
  std::string method;  // "GET", "POST", ...
  std::string target;  // as sent: path and query
  std::string path;
  std::string query;
  Headers headers;
  std::string body;
  std::string remote;  // peer address
  std::map<std::string, std::string> params;  // {name} segments of the matched route
  const std::string* Header(std::string_view name) const { return FindHeader(headers, name); }
};

struct Response {
  int status = 200;
  Headers headers;
  std::string body;
  const std::string* Header(std::string_view name) const { return FindHeader(headers, name); }
  Response& Set(std::string name, std::string value);
};

// True when `text` is UTF-8, and so can go into a JSON document as a string (a stored
// header, a forwarded body): nlohmann's dump(), which writes every converge document,
// decides.
bool IsUtf8(std::string_view text);

// RFC 9457: `{"type", "title", "status", "detail"}` as application/problem+json. `type` is
// "about:blank" when empty, else a URN naming the problem ("urn:converge:problem:<slug>").
// Bytes of `title` or `detail` that are not UTF-8 (a detail may quote the client's input)
// are written as U+FFFD; it never throws.
Response Problem(int status, std::string_view title, std::string_view detail,
                 std::string_view slug = {});
// A JSON body with Content-Type application/json.
Response Json(int status, std::string body);
// The class of an HTTP status for metric labels: "1xx" .. "5xx" (anything else "5xx").
std::string_view StatusClass(int status);
// The token of `Authorization: Bearer <token>`: the scheme is case-insensitive (RFC 9110
// §11.1), separated by one or more spaces; nullopt when the header is absent, names
// another scheme, or the token is empty or contains whitespace.
std::optional<std::string_view> BearerToken(const Request& request);

// Looks presented API keys up in time that does not depend on how much of a key matches:
// each key is indexed by HMAC-SHA256 under a random per-process secret, so the only
// comparisons made are between digests an attacker cannot steer. (A std::map keyed by the
// keys themselves answers faster the longer the matching prefix.)
//
// Thread safety: immutable after construction; Find is safe from many threads.
class ApiKeyIndex {
 public:
  // `keys` maps each API key to its principal (e.g. a tenant).
  explicit ApiKeyIndex(const std::map<std::string, std::string>& keys);
  // The principal of `presented`, or nullptr. The pointer lives as long as the index.
  const std::string* Find(std::string_view presented) const;
  size_t size() const { return by_digest_.size(); }

 private:
  // HMAC-SHA256 under the secret, keyed once (a key lookup is on every request's path).
  std::shared_ptr<const internal::HmacSha256Key> secret_;
  std::map<std::string, std::string> by_digest_;
};

// The HTTP status for a Status. Reasons first, as the IETF Idempotency-Key draft
// (draft-ietf-httpapi-idempotency-key-header) asks: reason::kFingerprintMismatch 422 (the
// key was used for a different request), reason::kInFlight 409 (the first request with
// the key is still running). Otherwise by code, as HttpStatusFor(StatusCode).
int HttpStatusFor(const Status& status);
// The HTTP status for a code alone (kInvalidArgument and kOutOfRange 400, kUnauthenticated
// 401, kPermissionDenied 403, kNotFound 404, kAlreadyExists, kFailedPrecondition and kAborted
// 409, kResourceExhausted 429, kCancelled 499, kUnimplemented 501, kUnavailable 503,
// kDeadlineExceeded 504, else 500). It cannot see reasons: given a Status, use the overload
// above, or an idempotency mismatch becomes 409 and an in-flight request 503.
int HttpStatusFor(StatusCode code);

// The whole problem+json response for a failed Status: HttpStatusFor(status), the status's
// standard reason phrase as title, `detail` (status.message() when empty; pass one when the
// message may carry internals that clients must not see, such as SQL errors) and `slug` as
// in Problem(). When a retry may succeed (status.transient()) and the answer is 409, 429 or
// 503, it carries Retry-After: status.retry_after_ms() rounded up to whole seconds, at
// least 1. REQUIRES: !status.ok().
Response ProblemFor(const Status& status, std::string_view slug = {},
                    std::string_view detail = {});

// "host:port" (e.g. a listen address) into its parts; kInvalidArgument naming what is
// wrong. The host is taken as written (a name, IPv4, or [IPv6]).
Status ParseHostPort(const std::string& listen, std::string* host, uint16_t* port);

struct ServerOptions {
  std::string address = "127.0.0.1";
  uint16_t port = 0;  // 0: any free port; see Server::port()
  int io_threads = 1;
  int worker_threads = 16;
  // Request body bytes (Content-Length or the sum of the chunks); more: 413.
  size_t body_limit = 1 << 20;
  // Bytes of the request line and header fields together (more: 431). The same bound
  // applies to each chunk line (size and extensions; more: 400) and to the trailer
  // section (more: 431), and it is all the unparsed input a connection buffers.
  size_t header_limit = 16 << 10;
  // Header fields in one request; more: 431.
  size_t max_header_fields = 100;
  Millis header_timeout = std::chrono::seconds(15);
  Millis body_timeout = std::chrono::seconds(30);
  // Open connections at most. At the cap the server stops accepting (new connections wait
  // in the kernel's listen backlog) until one closes; it never closes a connection to make
  // room. Keep it well below the file-descriptor limit, which the store, outbound HTTP and
  // logs share.
  int max_connections = 1024;
  // Start() raises the soft RLIMIT_NOFILE to the hard limit (a process-wide setting).
  bool raise_fd_limit = true;
  // Methods served (case-sensitive, RFC 9110 §9.1); any other gets 501. HEAD is served by
  // GET routes. The metric label of a method outside this set is "other".
  std::vector<std::string> methods = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE",
                                      "OPTIONS"};
  // Fields that must not appear twice (case-insensitive): a second copy gets 400, since a
  // proxy in front and this server could each pick a different one. Host always counts.
  std::vector<std::string> single_headers = {"Authorization", "Idempotency-Key",
                                             "Content-Type", "webhook-id",
                                             "webhook-timestamp", "webhook-signature"};
  std::string server_name = "converge";
};

// Called after each response is written: for metrics and access logs. Every field but
// `request` is from a bounded set, so it may be used as a metric label as it is.
struct Exchange {
  const Request* request;  // nullptr when the request was rejected before it was read whole
  int status;
  std::string route;  // the matched pattern, "fallback", "unmatched", or "rejected"
  double seconds;
  // The request's method when it is one of ServerOptions::methods, else "other".
  std::string_view method = "other";
};

// Counters of the accept loop and the connections, for tests and operations.
struct ServerStats {
  int64_t connections = 0;     // open right now
  int64_t accepted = 0;        // since Start
  int64_t accept_errors = 0;   // failed accept calls (EMFILE, ENFILE, ...)
  int64_t accept_pauses = 0;   // times accepting paused at max_connections
  int64_t fd_limit = 0;        // the soft RLIMIT_NOFILE after Start
};

// How an asynchronous handler (Server::RouteAsync) answers its request. Copies answer the
// same request; the first answer counts and later ones are ignored (as are calls on a
// moved-from Responder). Safe to use from any thread. When the last copy goes away
// unanswered (a handler that lost it), the request is answered 500, so a connection never
// waits for an answer that cannot come. Server::Stop waits until every copy is gone:
// do not keep them once answered.
class Responder {
 public:
  struct State;  // the server's
  explicit Responder(std::shared_ptr<State> state) : state_(std::move(state)) {}
  // Answers the request; the connection's I/O thread writes it.
  void operator()(Response response) const;
  // Runs `work` where it may block: on the server's worker pool (in Server::Handle, on the
  // thread that calls Block, so call it from the handler's thread, not from a store's
  // writer). For the part of a request a handler cannot do without blocking; `work`
  // answers then. Work that throws before answering answers 500.
  void Block(std::function<void()> work) const;

 private:
  std::shared_ptr<State> state_;
};

class Server {
 public:
  using Handler = std::function<Response(Request&)>;
  // An asynchronous handler: see RouteAsync.
  using AsyncHandler = std::function<void(Request&, Responder)>;

  explicit Server(ServerOptions options);
  ~Server();  // Stop()s
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // `pattern` is a path whose segments may be `{name}`, e.g. "/v1/payments/{id}". An
  // unknown path answers 404, a known path with another method 405 with Allow. A GET
  // route also answers HEAD (the handler runs; the body is not sent, its length is). A
  // handler that knows that length without the body may answer HEAD with an empty body
  // and a Content-Length field; an empty HEAD answer without one is sent with no length
  // (not known without the body). Any other Content-Length is replaced by the body's.
  void Route(std::string method, std::string pattern, Handler handler);
  // A route whose handler answers later: it runs on the connection's I/O thread as soon as
  // the request is read, with no hop to the worker pool, and answers through its
  // Responder, then or later, from any thread (e.g. a store's writer, on commit:
  // IdempotencyKeys::ExecuteAsync). So it must not block: the I/O thread serves other
  // connections meanwhile. Blocking work goes through Responder::Block. The request lives
  // until it is answered. A handler that throws before answering gets 500. Paths, HEAD,
  // 404 and 405 as for Route. Past its drain deadline Stop refuses new ones (503) and
  // waits for every Responder of those in flight to go, as it waits for blocking handlers
  // to return.
  void RouteAsync(std::string method, std::string pattern, AsyncHandler handler);
  // Handles every request that no route matches (instead of 404 and 405), e.g. a proxy
  // passing the rest of an API through. Its exchanges are labelled route "fallback".
  void Fallback(Handler handler);
  // Adds an observer of every exchange (metrics, access logs); all run, in the order they
  // were added. REQUIRES: before Start().
  void OnExchange(std::function<void(const Exchange&)> observer);

  // Binds and starts serving. kUnavailable when the address cannot be bound;
  // kInvalidArgument for a bad address or option.
  Status Start();
  // The bound port (after Start).
  uint16_t port() const;
  // Stops accepting, waits up to `drain` for in-flight requests, then closes everything.
  // Handlers still running then are waited for whatever `drain` says: a blocking one until
  // it returns, an asynchronous one until every copy of its Responder is gone.
  void Stop(Millis drain = std::chrono::seconds(10));
  // Answers `request` as a worker would, on the calling thread and without a socket: the
  // route match (filling request.params), the handler, 404 or 405 when no route matches.
  // request.path and .query must be what the server splits off the target. No OnExchange
  // observer sees it, and in_flight() does not count it. For running routes in-process
  // (tests, fuzz targets); safe from several threads once the routes are registered,
  // with or without Start().
  Response Handle(Request& request);
  // Requests being handled right now.
  int64_t in_flight() const;
  ServerStats stats() const;

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

struct ClientRequest {
  std::string method = "GET";
  std::string url;
  Headers headers;
  std::string body;
  Millis timeout = std::chrono::seconds(10);
  // Response body bytes read at most (0: no bound). A longer body ends the call with
  // kResourceExhausted, its answer unread: the peer did answer, and may have acted.
  size_t max_response_body = 0;
};

// Blocking HTTP client. Errors: kDeadlineExceeded (timeout: the outcome is unknown),
// kUnavailable (cannot connect, connection reset), kInvalidArgument (malformed URL).
// Any HTTP status is a successful Response.
class Client {
 public:
  Client();
  Result<Response> Send(const ClientRequest& request);
};

}  // namespace converge::http

#endif  // CONVERGE_HTTP_H_
