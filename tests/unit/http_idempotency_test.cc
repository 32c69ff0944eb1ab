// The Idempotency-Key middleware (include/converge/http_idempotency.h): header parsing and
// the IETF draft's answers, with handlers called directly (no sockets).
#include "converge/http_idempotency.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <thread>

#include "src/core/crypto.h"
#include "tests/unit/test_util.h"

namespace converge::http {
namespace {

using json = nlohmann::json;

Request Post(std::string body, Headers headers) {
  Request r;
  r.method = "POST";
  r.path = "/v1/things";
  r.target = r.path;
  r.body = std::move(body);
  r.headers = std::move(headers);
  return r;
}

std::string Type(const Response& r) {
  json j = json::parse(r.body, nullptr, false);
  return j.is_object() ? j.value("type", "") : "";
}

TEST(ParseIdempotencyKey, BareAndStructuredFieldStrings) {
  auto key = [](std::string v) { return ParseIdempotencyKey(Post("", {{"Idempotency-Key", v}})); };
  EXPECT_EQ(**key("order-1"), "order-1");
  EXPECT_EQ(**key("\"order-1\""), "order-1");
  EXPECT_EQ(**key(R"("a\"b\\c")"), "a\"b\\c");
  EXPECT_EQ(**key(std::string(255, 'k')), std::string(255, 'k'));
  for (const std::string& bad :
       std::vector<std::string>{"", "\"\"", std::string(256, 'k'), "tab\there", "\"open",
                          "\"bad\\escape\"", "\"x\"trailing", "caf\xc3\xa9"}) {
    auto r = key(bad);
    ASSERT_FALSE(r) << bad;
    EXPECT_EQ(r.error().code(), StatusCode::kInvalidArgument) << bad;
  }
  EXPECT_FALSE(*ParseIdempotencyKey(Post("", {})));
  EXPECT_FALSE(ParseIdempotencyKey(Post("", {{"Idempotency-Key", "a"}, {"idempotency-key", "b"}})));
}

class IdempotencyRouteTest : public ::testing::Test {
 protected:
  void SetUp() override {
    db_ = testing::OpenSqlite(dir_.File("db.sqlite"));
    ASSERT_NE(db_, nullptr);
    testing::CreateEffectsTable(*db_);
    keys_ = std::make_unique<IdempotencyKeys>(
        *db_, IdempotencyOptions{.ttl = std::chrono::hours(1), .lease = std::chrono::seconds(30)});
  }
  IdempotencyRouteOptions Options() {
    IdempotencyRouteOptions o;
    o.scope = [](const Request& r) -> std::optional<std::string> {
      const std::string* t = r.Header("X-Tenant");
      return t ? std::optional<std::string>(*t) : std::nullopt;
    };
    o.validate = [](Request& r) -> std::optional<Response> {
      if (r.body.empty()) return Problem(400, "Bad Request", "empty body", "invalid-request");
      return std::nullopt;
    };
    o.metrics = &metrics_;
    return o;
  }
  int64_t Effects() { return testing::QueryInt(*db_, "SELECT count(*) FROM test_effects"); }
  // A prepared route's transaction body: one effect row, prepared as `row`; a 201 naming it.
  PreparedTxFn InsertEffect(std::string row) {
    return [this, row = std::move(row)](Tx& tx) -> Result<Response> {
      ++runs_;
      CONVERGE_RETURN_IF_ERROR(tx.Exec("INSERT INTO test_effects (id) VALUES ($1)", row));
      return Json(201, "{\"id\":\"" + row + "\"}");
    };
  }
  int64_t Keys() { return testing::QueryInt(*db_, "SELECT count(*) FROM idempotency_keys"); }

  testing::TempDir dir_;
  std::unique_ptr<Database> db_;
  std::unique_ptr<IdempotencyKeys> keys_;
  Metrics metrics_;
  int runs_ = 0;
};

TEST_F(IdempotencyRouteTest, SinglePhaseStoresReplaysAndRejectsAnotherBody) {
  auto place = [&](Tx& tx, Request& r) -> Result<Response> {
    ++runs_;
    CONVERGE_RETURN_IF_ERROR(
        tx.Exec("INSERT INTO test_effects (id) VALUES ($1)", *r.Header("X-Tenant") + ":" + r.body));
    Response out = Json(201, "{\"id\":\"" + r.body + "\"}");
    out.Set("Location", "/v1/things/" + r.body);
    return out;
  };
  Server::Handler h = SinglePhaseRoute(*keys_, Options(), place);
  Headers acme = {{"X-Tenant", "acme"}, {"Idempotency-Key", "k1"}};
  Request first = Post("t1", acme);
  Response a = h(first);
  EXPECT_EQ(a.status, 201);
  EXPECT_EQ(a.Header("Idempotent-Replayed"), nullptr);
  Request again = Post("t1", acme);
  Response b = h(again);
  EXPECT_EQ(b.status, 201);
  EXPECT_EQ(b.body, a.body);
  EXPECT_EQ(*b.Header("Location"), "/v1/things/t1");
  EXPECT_EQ(*b.Header("Idempotent-Replayed"), "true");
  Request other = Post("t2", acme);
  Response c = h(other);
  EXPECT_EQ(c.status, 422);
  EXPECT_EQ(Type(c), "urn:converge:problem:idempotency-key-reused");
  Request globex = Post("t1", {{"X-Tenant", "globex"}, {"Idempotency-Key", "k1"}});
  EXPECT_EQ(h(globex).Header("Idempotent-Replayed"), nullptr);  // scopes never share keys
  EXPECT_EQ(runs_, 2);
  EXPECT_EQ(Effects(), 2);
}

// Found by review: the fingerprint hashed the path without its query, so the same key with
// `?amount=500` replayed the answer to `?amount=5` instead of 422.
TEST_F(IdempotencyRouteTest, TheQueryIsPartOfTheRequest) {
  auto place = [&](Tx& tx, Request& r) -> Result<Response> {
    ++runs_;
    CONVERGE_RETURN_IF_ERROR(tx.Exec("INSERT INTO test_effects (id) VALUES ($1)", r.query));
    return Json(201, "{\"query\":\"" + r.query + "\"}");
  };
  Server::Handler h = SinglePhaseRoute(*keys_, Options(), place);
  auto with_query = [](std::string query) {
    Request r = Post("{}", {{"X-Tenant", "acme"}, {"Idempotency-Key", "k1"}});
    r.query = query;
    r.target = r.path + "?" + query;
    return r;
  };
  Request five = with_query("amount=5");
  EXPECT_EQ(h(five).status, 201);
  Request again = with_query("amount=5");
  Response replay = h(again);
  EXPECT_EQ(replay.status, 201);
  EXPECT_EQ(*replay.Header("Idempotent-Replayed"), "true");
  Request more = with_query("amount=500");
  Response c = h(more);
  EXPECT_EQ(c.status, 422);
  EXPECT_EQ(Type(c), "urn:converge:problem:idempotency-key-reused");
  Request none = Post("{}", {{"X-Tenant", "acme"}, {"Idempotency-Key", "k1"}});
  EXPECT_EQ(h(none).status, 422);
  EXPECT_EQ(runs_, 1);
  EXPECT_EQ(Effects(), 1);
  // Without a query, the fingerprint is the one keys stored before queries counted.
  Request plain = Post("{}", {{"X-Tenant", "acme"}, {"Idempotency-Key", "k2"}});
  EXPECT_EQ(h(plain).status, 201);
  EXPECT_EQ(testing::QueryInt(*db_, "SELECT count(*) FROM idempotency_keys WHERE key = 'k2' "
                                    "AND request_hash = '" +
                                        internal::Sha256Hex(RequestFingerprint(
                                            "POST", "/v1/things", "{}")) +
                                        "'"),
            1);
}

TEST_F(IdempotencyRouteTest, EarlyAnswersClaimNothing) {
  Server::Handler h = SinglePhaseRoute(*keys_, Options(), [&](Tx&, Request&) -> Result<Response> {
    ++runs_;
    return Json(200, "{}");
  });
  Request anonymous = Post("x", {{"Idempotency-Key", "k"}});
  Response r = h(anonymous);
  EXPECT_EQ(r.status, 401);
  EXPECT_NE(r.Header("WWW-Authenticate"), nullptr);
  Request missing = Post("x", {{"X-Tenant", "acme"}});
  EXPECT_EQ(Type(h(missing)), "urn:converge:problem:idempotency-key-missing");
  Request malformed = Post("x", {{"X-Tenant", "acme"}, {"Idempotency-Key", "\"open"}});
  Response m = h(malformed);
  EXPECT_EQ(m.status, 400);
  EXPECT_EQ(Type(m), "urn:converge:problem:idempotency-key-malformed");
  Request invalid = Post("", {{"X-Tenant", "acme"}, {"Idempotency-Key", "k"}});
  EXPECT_EQ(h(invalid).status, 400);
  EXPECT_EQ(runs_, 0);
  EXPECT_EQ(Keys(), 0);
}

TEST_F(IdempotencyRouteTest, AHandlerErrorStoresNothingSoTheRetryRunsAgain) {
  bool fail = true;
  Server::Handler h = SinglePhaseRoute(*keys_, Options(), [&](Tx&, Request&) -> Result<Response> {
    ++runs_;
    if (fail) return tl::unexpected(UnavailableError("downstream is down"));
    return Json(201, "{}");
  });
  Headers hd = {{"X-Tenant", "acme"}, {"Idempotency-Key", "k"}};
  Request a = Post("x", hd);
  Response r = h(a);
  EXPECT_EQ(r.status, 503);
  EXPECT_NE(r.Header("Retry-After"), nullptr);
  // The handler's error, not the store's: the answer does not blame the store.
  EXPECT_EQ(r.body.find("the store"), std::string::npos) << r.body;
  EXPECT_NE(r.body.find("nothing was stored"), std::string::npos) << r.body;
  fail = false;
  Request b = Post("x", hd);
  EXPECT_EQ(h(b).status, 201);
  EXPECT_EQ(runs_, 2);
}

// The prepared shape: prepare runs on the handler's thread before the transaction (on
// SQLite the body then runs on the writer), not at all for a completed key while the read
// before it is on (it is, for the first IdempotencyKeys::kSnapshotWindow requests); its
// error is answered and claims nothing, so the corrected retry runs; an empty body is a 500
// that stores nothing.
TEST_F(IdempotencyRouteTest, APreparedRouteWorksOffTheTransactionAndNotForCompletedKeys) {
  int prepares = 0;
  bool refuse = false, empty = false;
  std::thread::id prepared_on, committed_on;
  Server::Handler h = SinglePhaseRoute(
      *keys_, Options(), [&](Request& r) -> Result<PreparedTxFn> {
        ++prepares;
        prepared_on = std::this_thread::get_id();
        if (refuse) return tl::unexpected(InvalidArgumentError("no such sku"));
        if (empty) return PreparedTxFn();
        std::string row = *r.Header("X-Tenant") + ":" + r.body;  // made here, used there
        return PreparedTxFn([&, row](Tx& tx) -> Result<Response> {
          ++runs_;
          committed_on = std::this_thread::get_id();
          CONVERGE_RETURN_IF_ERROR(tx.Exec("INSERT INTO test_effects (id) VALUES ($1)", row));
          return Json(201, "{\"id\":\"" + row + "\"}");
        });
      });
  Headers k1 = {{"X-Tenant", "acme"}, {"Idempotency-Key", "k1"}};
  Request first = Post("t1", k1);
  Response a = h(first);
  EXPECT_EQ(a.status, 201);
  EXPECT_EQ(a.body, "{\"id\":\"acme:t1\"}");
  EXPECT_EQ(prepared_on, std::this_thread::get_id());
  EXPECT_NE(committed_on, std::this_thread::get_id());  // SQLite's writer thread
  // The first replay is answered from a read snapshot, which caches the key; the next
  // ones from the cache. None of them prepares anything.
  for (int i = 0; i < 3; ++i) {
    Request again = Post("t1", k1);
    Response b = h(again);
    EXPECT_EQ(b.body, a.body);
    EXPECT_EQ(*b.Header("Idempotent-Replayed"), "true");
  }
  EXPECT_EQ(prepares, 1);
  EXPECT_EQ(keys_->replay_cache_stats().hits, 2);
  EXPECT_EQ(runs_, 1);

  Headers k2 = {{"X-Tenant", "acme"}, {"Idempotency-Key", "k2"}};
  refuse = true;
  Request refused = Post("t2", k2);
  Response c = h(refused);
  EXPECT_EQ(c.status, 400);
  EXPECT_EQ(Type(c), "urn:converge:problem:invalid-request");
  EXPECT_EQ(Keys(), 1);  // k2 not claimed
  refuse = false;
  empty = true;
  Request hollow = Post("t2", k2);
  EXPECT_EQ(h(hollow).status, 500);
  EXPECT_EQ(Keys(), 1);
  empty = false;
  Request corrected = Post("t2", k2);
  EXPECT_EQ(h(corrected).status, 201);
  EXPECT_EQ(prepares, 4);
  EXPECT_EQ(runs_, 2);
  EXPECT_EQ(Effects(), 2);
}

// Session 9 review: prepare ran before the store was asked about the key (only the replay
// cache was). The first retry of a completed request misses the cache, so when prepare
// then failed (a dependency down, state moved on) the client got prepare's error instead
// of the stored 201 (and might give up on an order that exists), and a key reused with
// another body got prepare's error instead of the 422. A completed key is now answered
// from a read snapshot before prepare runs.
TEST_F(IdempotencyRouteTest, PrepareFailingNeverHidesAStoredAnswer) {
  Status refuse = OkStatus();
  Server::Handler h = SinglePhaseRoute(
      *keys_, Options(), [&](Request& r) -> Result<PreparedTxFn> {
        if (!refuse.ok()) return tl::unexpected(refuse);
        return InsertEffect(*r.Header("X-Tenant") + ":" + r.body);
      });
  Headers k1 = {{"X-Tenant", "acme"}, {"Idempotency-Key", "k1"}};
  Request first = Post("t1", k1);
  Response a = h(first);
  ASSERT_EQ(a.status, 201);
  for (Status st : {InvalidArgumentError("sku discontinued"),
                    UnavailableError("pricing service down")}) {
    refuse = st;
    Request retry = Post("t1", k1);
    Response b = h(retry);
    EXPECT_EQ(b.status, 201) << st.ToString() << " answered a replay: " << b.body;
    EXPECT_EQ(b.body, a.body) << st.ToString();
    Request reused = Post("t2", k1);
    EXPECT_EQ(h(reused).status, 422) << st.ToString();
  }
  EXPECT_EQ(runs_, 1);
}

// The key changes while prepare runs: completed by the first request (here from inside
// prepare itself, deterministically) or held by an attempt in flight. prepare then fails;
// the answer is the key's (the stored 201, the 409), not prepare's error.
TEST_F(IdempotencyRouteTest, AKeyThatChangedWhilePrepareRanIsAnsweredNotPreparesError) {
  Server::Handler* self = nullptr;
  bool complete_first = true;
  Server::Handler h = SinglePhaseRoute(
      *keys_, Options(), [&](Request& r) -> Result<PreparedTxFn> {
        if (complete_first) {
          complete_first = false;  // the first request, racing in, completes the key
          Request first = Post(r.body, {{"X-Tenant", "acme"}, {"Idempotency-Key", "k1"}});
          EXPECT_EQ((*self)(first).status, 201);
          return tl::unexpected(UnavailableError("pricing service down"));
        }
        return InsertEffect(*r.Header("X-Tenant") + ":" + r.body);
      });
  self = &h;
  Request second = Post("t1", {{"X-Tenant", "acme"}, {"Idempotency-Key", "k1"}});
  Response b = h(second);
  EXPECT_EQ(b.status, 201) << b.body;
  EXPECT_EQ(b.body, "{\"id\":\"acme:t1\"}");
  EXPECT_EQ(*b.Header("Idempotent-Replayed"), "true");
  EXPECT_EQ(runs_, 1);

  // An attempt in flight (a multi-phase Begin on the same keys holds k2's lease).
  auto held = keys_->Begin({"acme", "k2", RequestFingerprint("POST", "/v1/things", "t2")});
  ASSERT_TRUE(held.has_value()) << held.error().ToString();
  ASSERT_EQ(held->kind, Begun::Kind::kStarted);
  Server::Handler refusing = SinglePhaseRoute(
      *keys_, Options(), [&](Request&) -> Result<PreparedTxFn> {
        return tl::unexpected(InvalidArgumentError("no such sku"));
      });
  Request during = Post("t2", {{"X-Tenant", "acme"}, {"Idempotency-Key", "k2"}});
  Response c = refusing(during);
  EXPECT_EQ(c.status, 409) << c.body;
  EXPECT_NE(c.Header("Retry-After"), nullptr);
  Request other = Post("t3", {{"X-Tenant", "acme"}, {"Idempotency-Key", "k2"}});
  EXPECT_EQ(refusing(other).status, 422);
}

// The prepared route answered from its commit (SinglePhaseAsyncRoute, through a Server's
// Handle), once a window of new keys turned the read first off: the same answers as the
// blocking route, for a create, its replays, another body, and prepare's errors.
TEST_F(IdempotencyRouteTest, TheAsyncPreparedRouteAnswersAsTheBlockingOne) {
  Status refuse = OkStatus();
  Server server(ServerOptions{});
  server.RouteAsync(
      "POST", "/v1/things",
      SinglePhaseAsyncRoute(*keys_, Options(), [&](Request& r) -> Result<PreparedTxFn> {
        if (!refuse.ok()) return tl::unexpected(refuse);
        return InsertEffect(*r.Header("X-Tenant") + ":" + r.body);
      }));
  auto post = [&](std::string body, std::string key) {
    Request r = Post(std::move(body), {{"X-Tenant", "acme"}, {"Idempotency-Key", key}});
    return server.Handle(r);
  };
  for (int64_t i = 0; i < IdempotencyKeys::kSnapshotWindow; ++i) {
    ASSERT_EQ(post("w" + std::to_string(i), "w" + std::to_string(i)).status, 201);
  }
  ASSERT_FALSE(keys_->snapshot_first());
  const int runs = runs_;
  Response a = post("t1", "k1");
  EXPECT_EQ(a.status, 201);
  EXPECT_EQ(a.body, "{\"id\":\"acme:t1\"}");
  EXPECT_EQ(a.Header("Idempotent-Replayed"), nullptr);
  for (int i = 0; i < 2; ++i) {  // from the write path, then from the cache
    Response b = post("t1", "k1");
    EXPECT_EQ(b.body, a.body);
    ASSERT_NE(b.Header("Idempotent-Replayed"), nullptr);
    EXPECT_EQ(*b.Header("Idempotent-Replayed"), "true");
  }
  Response c = post("t2", "k1");
  EXPECT_EQ(c.status, 422);
  EXPECT_EQ(Type(c), "urn:converge:problem:idempotency-key-reused");
  refuse = InvalidArgumentError("no such sku");
  Response d = post("t3", "k2");
  EXPECT_EQ(d.status, 400);
  EXPECT_EQ(Type(d), "urn:converge:problem:invalid-request");
  refuse = UnavailableError("pricing service down");
  Response e = post("t3", "k2");
  EXPECT_EQ(e.status, 503);
  EXPECT_NE(e.body.find("nothing was stored"), std::string::npos) << e.body;
  Response f = post("t1", "k1");  // a stored answer beats prepare's error
  EXPECT_EQ(f.status, 201);
  refuse = OkStatus();
  EXPECT_EQ(post("t3", "k2").status, 201);
  EXPECT_EQ(runs_, runs + 2);
  EXPECT_EQ(Keys(), IdempotencyKeys::kSnapshotWindow + 2);
}

TEST_F(IdempotencyRouteTest, MultiPhaseInFlightIs409WithALowRetryAfter) {
  Server::Handler h = MultiPhaseRoute(*keys_, Options(),
                                      [&](KeyLease& lease, Begun::Kind kind, Request&) -> Response {
    ++runs_;
    EXPECT_EQ(kind, Begun::Kind::kStarted);
    EXPECT_EQ(lease.recovery_point, "started");
    return Json(202, "{}");  // did not Complete: the request stays in flight
  });
  Headers hd = {{"X-Tenant", "acme"}, {"Idempotency-Key", "k"}};
  Request a = Post("x", hd);
  EXPECT_EQ(h(a).status, 202);
  Request b = Post("x", hd);
  Response r = h(b);
  EXPECT_EQ(r.status, 409);
  EXPECT_EQ(Type(r), "urn:converge:problem:request-in-progress");
  ASSERT_NE(r.Header("Retry-After"), nullptr);
  EXPECT_EQ(*r.Header("Retry-After"), "2");  // the remaining lease is 30 s; the hint is low
  EXPECT_EQ(runs_, 1);
}

}  // namespace
}  // namespace converge::http
