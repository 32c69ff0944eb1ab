#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <map>
#include <set>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "converge/consumer.h"
#include "converge/failpoint.h"
#include "converge/outbox.h"
#include "converge/relay.h"
#include "converge/sql_queue.h"
#include "src/core/relay_internal.h"
#include "tests/unit/test_util.h"

namespace converge {
namespace {

using testing::OpenSqlite;
using testing::QueryInt;
using testing::TempDir;

Event MakeEvent(const std::string& subject, const std::string& type = "thing.happened",
                const std::string& data = "{}") {
  Event e;
  e.type = type;
  e.subject = subject;
  e.data = data;
  return e;
}

// A publisher that records what it sent, and can fail chosen events once. It never shares
// the outbox database, so the relay publishes and marks in two steps.
class RecordingPublisher : public PublisherWrapper {
 public:
  explicit RecordingPublisher(Publisher* target) : PublisherWrapper(target) {}
  Status Publish(const Event& e) override {
    if (fail_once_.erase(e.id)) return UnavailableError("broker hiccup");
    sent_.push_back(e);
    return target_->Publish(e);
  }
  std::set<std::string> fail_once_;
  std::vector<Event> sent_;
};

class OutboxRelayTest : public ::testing::Test {
 protected:
  void SetUp() override {
    db_ = OpenSqlite(dir_.File("db.sqlite"));
    ASSERT_NE(db_, nullptr);
    queue_ = std::make_unique<SqlQueue>(*db_);
    ASSERT_TRUE(queue_->Subscribe("all", "*").ok());
  }

  std::string Enqueue(Event e) {
    std::string id;
    Status st = db_->Transact([&](Tx& tx) -> Status {
      CONVERGE_ASSIGN_OR_RETURN(id, outbox_.Enqueue(tx, e));
      return OkStatus();
    });
    EXPECT_TRUE(st.ok()) << st.ToString();
    return id;
  }

  TempDir dir_;
  std::unique_ptr<Database> db_;
  Outbox outbox_;
  std::unique_ptr<SqlQueue> queue_;
};

TEST_F(OutboxRelayTest, EnqueueWritesACloudEventsEnvelope) {
  Event e = MakeEvent("agg-1", "payment.captured", R"({"amount":5})");
  e.traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
  std::string id = Enqueue(e);
  Rows rows;
  ASSERT_TRUE(db_->Read([&](Tx& tx) -> Status {
                   CONVERGE_ASSIGN_OR_RETURN(
                       rows, tx.Query("SELECT payload, aggregate_type FROM outbox_events"));
                   return OkStatus();
                 })
                  .ok());
  ASSERT_EQ(rows.size(), 1u);
  EXPECT_EQ(rows[0].Text(1), "payment");
  auto decoded = DecodeEnvelope(rows[0].Text(0));
  ASSERT_TRUE(decoded) << decoded.error().ToString();
  EXPECT_EQ(decoded->id, id);
  EXPECT_EQ(decoded->source, "urn:converge");
  EXPECT_EQ(decoded->type, "payment.captured");
  EXPECT_EQ(decoded->subject, "agg-1");
  EXPECT_EQ(decoded->data, R"({"amount":5})");
  EXPECT_EQ(decoded->traceparent, e.traceparent);
  EXPECT_GT(decoded->time, 0);
}

// An id or source a consumer could not key its inbox row by (over 255 bytes, or a NUL,
// as "\u0000" decodes to), or a NUL in the type, does not decode; at the bound it does.
TEST(Envelope, NamesAConsumerCouldNotKeyAreRefused) {
  auto envelope = [](const std::string& id, const std::string& source, const std::string& type) {
    return R"({"specversion":"1.0","id":")" + id + R"(","source":")" + source +
           R"(","type":")" + type + R"("})";
  };
  const std::string bound(255, 'x');
  auto ok = DecodeEnvelope(envelope(bound, bound, std::string(1000, 't')));
  ASSERT_TRUE(ok.has_value()) << ok.error().ToString();
  EXPECT_EQ(ok->id, bound);
  for (const std::string& bad :
       {envelope(bound + "x", "s", "t"), envelope("e", bound + "x", "s"),
        envelope("a\\u0000b", "s", "t"), envelope("e", "s\\u0000", "t"),
        envelope("e", "s", "t\\u0000")}) {
    auto refused = DecodeEnvelope(bad);
    ASSERT_FALSE(refused.has_value()) << bad;
    EXPECT_EQ(refused.error().code(), StatusCode::kInvalidArgument) << bad;
  }
}

// Found by fuzz/envelope_fuzz.cc: a time before 1970 was written as "...00.-500Z", which
// no decoder accepts, and the lenient parse took times that did not re-parse once encoded.
TEST(Envelope, TimesRoundTripBefore1970AndMalformedOnesAreRefused) {
  EXPECT_EQ(FormatRfc3339(-500), "1969-12-31T23:59:59.500Z");
  EXPECT_EQ(FormatRfc3339(-1000), "1969-12-31T23:59:59.000Z");
  EXPECT_EQ(FormatRfc3339(1500), "1970-01-01T00:00:01.500Z");
  auto envelope = [](const std::string& time) {
    return R"({"specversion":"1.0","id":"e","source":"s","type":"t","time":")" + time + "\"}";
  };
  for (const char* time : {"1969-12-31T23:59:59.5Z", "1588-05-01T12:00:01.123456Z",
                           "0000-01-01T00:00:00Z", "2024-02-29T23:59:59.999Z"}) {
    auto e = DecodeEnvelope(envelope(time));
    ASSERT_TRUE(e) << time << ": " << e.error().ToString();
    auto again = DecodeEnvelope(EncodeEnvelope(*e));
    ASSERT_TRUE(again) << time << ": " << again.error().ToString();
    EXPECT_EQ(again->time, e->time) << time;
  }
  EXPECT_EQ(DecodeEnvelope(envelope("1969-12-31T23:59:59.5Z"))->time, -500);
  for (const char* time : {"-123-01-01T00:00:00Z", " 2024-01-01T00:00:00Z",
                           "2024-1-01T00:00:00Z", "2024-13-01T00:00:00Z",
                           "2023-02-29T00:00:00Z", "2024-01-01T24:00:00Z",
                           "2024-01-01T00:00:60Z", "2024-01-01T00:00:00Z junk",
                           "2024-01-01T00:00:00.Z", "2024-01-01T00:00:00", "2024-01-01"}) {
    auto e = DecodeEnvelope(envelope(time));
    EXPECT_FALSE(e) << time;
  }
}

// json::dump() recurses once per level: data 100,000 levels deep overflowed the stack of
// the thread decoding it (a consumer would crash at every redelivery). Now refused, and
// parked like any undecodable message.
TEST(Envelope, DataNestedDeeperThan256LevelsIsRefusedNotACrash) {
  auto envelope = [](const std::string& data) {
    return R"({"specversion":"1.0","id":"e","source":"s","type":"t","data":)" + data + "}";
  };
  auto deep = DecodeEnvelope(envelope(std::string(100000, '[') + std::string(100000, ']')));
  ASSERT_FALSE(deep);
  EXPECT_EQ(deep.error().code(), StatusCode::kInvalidArgument);
  const std::string limit = std::string(256, '[') + "1" + std::string(256, ']');
  auto ok = DecodeEnvelope(envelope(limit));
  ASSERT_TRUE(ok) << ok.error().ToString();
  EXPECT_EQ(ok->data, limit);
  EXPECT_FALSE(DecodeEnvelope(envelope("[" + limit + "]")));
}

TEST_F(OutboxRelayTest, MalformedEventsAreRejectedAndWriteNothing) {
  std::vector<Event> bad = {MakeEvent("s", ""), MakeEvent("", "t.x"),
                            MakeEvent("s", "t.x", "{not json"),
                            MakeEvent(std::string(256, 's')), MakeEvent("s", "bad\ttype"),
                            MakeEvent("s", "t.x", std::string(300, '[') + std::string(300, ']'))};
  Event tp = MakeEvent("s");
  tp.traceparent = "01-xyz";
  bad.push_back(tp);
  for (const Event& e : bad) {
    Status st = db_->Transact([&](Tx& tx) { return StatusOf(outbox_.Enqueue(tx, e)); });
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << e.type << "/" << e.subject;
  }
  EXPECT_EQ(QueryInt(*db_, "SELECT count(*) FROM outbox_events"), 0);
}

// Issue #10: the event is completed, checked and encoded before the transaction (on the
// caller's thread); inside it only the insert runs.
TEST_F(OutboxRelayTest, PreparedEventIsWrittenAsPreparedAndBadOnesFailBeforeTheTransaction) {
  auto prepared = outbox_.Prepare(MakeEvent("agg-9", "order.placed", R"({"n":1})"));
  ASSERT_TRUE(prepared) << prepared.error().ToString();
  const Event& e = prepared->event();
  EXPECT_EQ(e.source, "urn:converge");
  EXPECT_EQ(e.aggregate_type, "order");
  EXPECT_GT(e.time, 0);
  ASSERT_EQ(e.id.size(), 36u);
  std::string id;
  ASSERT_TRUE(db_->Transact([&](Tx& tx) -> Status {
                   CONVERGE_ASSIGN_OR_RETURN(id, outbox_.Enqueue(tx, *prepared));
                   return OkStatus();
                 }).ok());
  EXPECT_EQ(id, e.id);
  Rows rows;
  ASSERT_TRUE(db_->Read([&](Tx& tx) -> Status {
                   CONVERGE_ASSIGN_OR_RETURN(
                       rows, tx.Query("SELECT payload, partition_no FROM outbox_events"));
                   return OkStatus();
                 }).ok());
  ASSERT_EQ(rows.size(), 1u);
  EXPECT_EQ(rows[0].Text(0), e.envelope);
  EXPECT_EQ(rows[0].Int(1), OutboxPartition("agg-9"));
  auto decoded = DecodeEnvelope(rows[0].Text(0));
  ASSERT_TRUE(decoded) << decoded.error().ToString();
  EXPECT_EQ(decoded->data, R"({"n":1})");
  // Its id is fixed: a second committed enqueue is a duplicate, not a second event.
  Status again = db_->Transact([&](Tx& tx) { return StatusOf(outbox_.Enqueue(tx, *prepared)); });
  EXPECT_EQ(again.code(), StatusCode::kAlreadyExists) << again.ToString();
  auto bad = outbox_.Prepare(MakeEvent("s", "t.x", "{not json"));
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(QueryInt(*db_, "SELECT count(*) FROM outbox_events"), 1);
}

TEST_F(OutboxRelayTest, EventRollsBackWithTheBusinessTransaction) {
  Status st = db_->Transact([&](Tx& tx) -> Status {
    CONVERGE_RETURN_IF_ERROR(outbox_.Enqueue(tx, MakeEvent("a")));
    return FailedPreconditionError("business rule failed");
  });
  EXPECT_FALSE(st.ok());
  EXPECT_EQ(QueryInt(*db_, "SELECT count(*) FROM outbox_events"), 0);
}

TEST_F(OutboxRelayTest, SharedDatabaseRelayPublishesAndMarksInOneTransaction) {
  for (int i = 0; i < 5; ++i) Enqueue(MakeEvent("a"));
  Relay relay(*db_, outbox_, *queue_);
  auto n = relay.RunOnce();
  ASSERT_TRUE(n) << n.error().ToString();
  EXPECT_EQ(*n, 5u);
  EXPECT_EQ(QueryInt(*db_, "SELECT count(*) FROM outbox_events WHERE published_at IS NULL"), 0);
  EXPECT_EQ(*queue_->Depth("all"), 5);
  EXPECT_EQ(*relay.RunOnce(), 0u);
}

// SQLite keeps no index of unpublished events by partition (SqliteDialect::
// DropOutboxPartitionIndex): a claim of some partitions walks outbox_unpublished in seq
// order and stops at its LIMIT, where through that index SQLite read every unpublished
// row of two or more partitions and sorted them. Before and after ANALYZE, on a table
// whose rows are mostly published, as a relay keeps it.
TEST_F(OutboxRelayTest, OnSqliteAFilteredClaimWalksTheUnpublishedIndexInOrder) {
  for (int i = 0; i < 1000; ++i) Enqueue(MakeEvent("order-" + std::to_string(i)));
  ASSERT_TRUE(db_->Transact([](Tx& tx) {
                   return StatusOf(
                       tx.Exec("UPDATE outbox_events SET published_at = 1 WHERE seq <= 900"));
                 }).ok());
  auto plan = [&](size_t partitions) {
    std::vector<Value> params = {Value(int64_t{100})};
    for (size_t p = 0; p < partitions; ++p) params.emplace_back(static_cast<int64_t>(p));
    std::string detail;
    Status st = db_->Read([&](Tx& tx) -> Status {
      CONVERGE_ASSIGN_OR_RETURN(
          Rows rows, tx.QueryParams("EXPLAIN QUERY PLAN " +
                                        internal::RelayClaimSql(partitions, true),
                                    params));
      for (const Row& r : rows) detail += r.Text(3) + "\n";
      return OkStatus();
    });
    EXPECT_TRUE(st.ok()) << st.ToString();
    return detail;
  };
  for (bool analyzed : {false, true}) {
    if (analyzed) {
      ASSERT_TRUE(db_->Transact([](Tx& tx) { return StatusOf(tx.Exec("ANALYZE")); }).ok());
    }
    for (size_t partitions : {1, 2, 32, 63}) {
      const std::string p = plan(partitions);
      EXPECT_NE(p.find("USING INDEX outbox_unpublished"), std::string::npos) << p;
      EXPECT_EQ(p.find("outbox_unpublished_partition"), std::string::npos) << p;
      EXPECT_EQ(p.find("TEMP B-TREE"), std::string::npos) << p;
    }
  }
  EXPECT_EQ(QueryInt(*db_, "SELECT count(*) FROM sqlite_master WHERE name = "
                           "'outbox_unpublished_partition'"),
            0);
}

// Issue 10: with the queue in the outbox's database, a pass renews its partitions in the
// transaction that publishes: one durable commit per pass on the path of every event
// (the first pass acquires apart, drawing the relay's incarnation). Every pass acquiring
// here (between Acquires a pass renews only what it publishes from, in that transaction
// too: Races/*.ASupersededRelayBetweenItsAcquiresPublishesNothing).
TEST_F(OutboxRelayTest, SharedDatabasePassIsOneTransactionPartitionsIncluded) {
  Relay relay(*db_, outbox_, *queue_,
              RelayOptions{.acquire_interval = Millis(0), .name = "relay-1"});
  ASSERT_TRUE(relay.RunOnce());  // the first pass: acquires on its own
  for (int round = 0; round < 3; ++round) {
    Enqueue(MakeEvent("a"));
    const int64_t before = db_->stats().transactions;
    auto n = relay.RunOnce();
    ASSERT_TRUE(n) << n.error().ToString();
    EXPECT_EQ(*n, 1u);
    EXPECT_EQ(db_->stats().transactions - before, 1);
  }
  // The leases were renewed by those passes (lease_until moved on), and are held.
  EXPECT_EQ(QueryInt(*db_, "SELECT count(*) FROM relay_partitions WHERE owner = 'relay-1'"),
            kOutboxPartitions);
  EXPECT_EQ(relay.stats().partitions_owned, kOutboxPartitions);
  EXPECT_EQ(*queue_->Depth("all"), 3);
}

// A publish that fails inside the shared transaction rolls the partition renewal back
// with it; the relay keeps what it held and the next pass publishes (a pass that
// acquires: a failure must not lose what it held).
TEST_F(OutboxRelayTest, SharedPassThatFailsKeepsItsPartitionsForTheNextPass) {
  Relay relay(*db_, outbox_, *queue_,
              RelayOptions{.acquire_interval = Millis(0), .name = "relay-1"});
  ASSERT_TRUE(relay.RunOnce());
  Enqueue(MakeEvent("a"));
  ASSERT_TRUE(failpoint::Configure("relay.after_publish_before_mark=error(unavailable)").ok());
  EXPECT_FALSE(relay.RunOnce());
  ASSERT_TRUE(failpoint::Configure("").ok());
  EXPECT_EQ(*queue_->Depth("all"), 0);
  EXPECT_EQ(*relay.RunOnce(), 1u);
  EXPECT_EQ(*queue_->Depth("all"), 1);
  EXPECT_EQ(relay.stats().partitions_owned, kOutboxPartitions);
}

TEST_F(OutboxRelayTest, BackgroundRelayIsWokenByCommit) {
  Relay relay(*db_, outbox_, *queue_, RelayOptions{.batch = 16, .poll = std::chrono::hours(1)});
  relay.Start();
  Enqueue(MakeEvent("a"));
  EXPECT_TRUE(testing::WaitUntil([&] { return *queue_->Depth("all") == 1; }));
  relay.Stop();
}

TEST(SqlQueueRouting, PatternsMatchExactPrefixAndAll) {
  EXPECT_TRUE(SqlQueue::Matches("*", "a.b"));
  EXPECT_TRUE(SqlQueue::Matches("a.b", "a.b"));
  EXPECT_TRUE(SqlQueue::Matches("a.*", "a.b"));
  EXPECT_FALSE(SqlQueue::Matches("a.*", "a"));
  EXPECT_FALSE(SqlQueue::Matches("a.*", "ab.c"));
  EXPECT_FALSE(SqlQueue::Matches("a.b", "a.c"));
}

TEST_F(OutboxRelayTest, SubscribeRejectsBadPatterns) {
  EXPECT_EQ(queue_->Subscribe("", "x").code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(queue_->Subscribe("q", "a*b").code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(queue_->Subscribe("q", "*.a").code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(queue_->Subscribe("q", "payment.*").ok());
  EXPECT_TRUE(queue_->Subscribe("q", "payment.*").ok());  // idempotent
}

// --- event.h, transport.h, tx_publisher.h -------------------------------------------------

TEST(EventEnvelope, DecodingKeepsTheEncodedForm) {
  Event e = MakeEvent("agg-1", "payment.captured", R"({"amount":5})");
  e.id = "e1";
  e.source = "urn:test";
  e.aggregate_type = "payment";
  e.time = 1'700'000'000'000;
  const std::string encoded = EncodeEnvelope(e);
  auto decoded = DecodeEnvelope(encoded);
  ASSERT_TRUE(decoded) << decoded.error().ToString();
  EXPECT_EQ(decoded->envelope, encoded);
  EXPECT_EQ(decoded->identity().source, "urn:test");
  EXPECT_EQ(decoded->identity().id, "e1");
  e.envelope = "ignored by the encoder";
  EXPECT_EQ(EncodeEnvelope(e), encoded);
}

// The envelope is written member by member (src/core/event.cc), no longer as an nlohmann
// object dumped: the bytes are the same, escapes, UTF-8 and member order included, and text
// that is not UTF-8 is still refused.
TEST(EventEnvelope, IsByteForByteWhatTheJsonObjectWrote) {
  auto reference = [](const Event& e) {
    nlohmann::json j = {
        {"specversion", "1.0"},
        {"id", e.id},
        {"source", e.source},
        {"type", e.type},
        {"subject", e.subject},
        {"time", FormatRfc3339(e.time)},
        {"datacontenttype", "application/json"},
        {"aggregatetype", e.aggregate_type},
        {"data", nlohmann::json::parse(e.data, nullptr, false)},
    };
    if (!e.traceparent.empty()) j["traceparent"] = e.traceparent;
    return j.dump();
  };
  const std::vector<std::string> texts = {
      "plain",        "with \"quotes\"", "back\\slash", "tab\tand\nnewline", "ctl\x01\x1f",
      "del\x7f",      "caf\xc3\xa9",     "\xe2\x82\xac 5", "slash/es",        ""};
  const std::vector<std::string> datas = {
      "{}", R"({"amount":5})", " { \"a\" : [1, 2.50, 1e3, -0, true, null] } ",
      R"("\u00e9\u20ac\n")", "12345678901234567890", R"({"b":1,"a":{"c":"\"q\""}})",
      "{not json"};  // EncodeEnvelope's caller must check it first; then as it always was
  int compared = 0;
  for (const std::string& text : texts) {
    for (const std::string& data : datas) {
      for (bool trace : {false, true}) {
        Event e;
        e.id = "id-" + text;
        e.source = "urn:" + text;
        e.type = text + ".happened";
        e.subject = text;
        e.aggregate_type = text;
        e.time = 1'700'000'000'123 + compared;
        e.data = data;
        if (trace) e.traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        ASSERT_EQ(EncodeEnvelope(e), reference(e)) << text << " " << data;
        ++compared;
      }
    }
  }
  EXPECT_EQ(compared, 140);
  // What Outbox::Prepare writes is the same envelope.
  Event e = MakeEvent("agg \"1\"", "payment.captured", R"( {"amount": 5.0} )");
  e.traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
  auto prepared = Outbox().Prepare(e);
  ASSERT_TRUE(prepared) << prepared.error().ToString();
  EXPECT_EQ(prepared->event().envelope, reference(prepared->event()));
  // A field that is not UTF-8 is refused, as the object's dump refused it.
  Event bad = MakeEvent("agg-\xff");
  bad.id = "e1";
  bad.source = "urn:test";
  bad.aggregate_type = "thing";
  EXPECT_THROW(EncodeEnvelope(bad), nlohmann::json::exception);
  auto refused = Outbox().Prepare(MakeEvent("agg", "thing.\xc3"));
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code(), StatusCode::kInvalidArgument);
}

// Ids draw their random bits from a per-thread pool (src/core/crypto.cc). They are
// UUIDv7s, distinct, and a forked child does not hand out the ids its parent's pool still
// holds: each process would write "one" event id for two events.
TEST(EventIds, AreDistinctVersion7UuidsInAForkedChildToo) {
  std::set<std::string> seen;
  for (int i = 0; i < 10000; ++i) {
    const std::string id = NewUuidV7();
    ASSERT_EQ(id.size(), 36u) << id;
    for (size_t c : {8u, 13u, 18u, 23u}) ASSERT_EQ(id[c], '-') << id;
    ASSERT_EQ(id[14], '7') << id;
    ASSERT_NE(std::string("89ab").find(id[19]), std::string::npos) << id;
    ASSERT_TRUE(seen.insert(id).second) << id;
  }
  // The random part (after the version digit), which the pool supplies.
  auto random_part = [](const std::string& id) { return id.substr(15); };
  constexpr int kIds = 40;
  // Forked from a thread of its own that drew one id first: its pool holds 50 more at the
  // fork, whatever other tests drew on theirs.
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  pid_t child = -1;
  std::set<std::string> parent;
  std::thread forker([&] {
    (void)NewUuidV7();
    child = fork();
    if (child == 0) {
      int code = 0;
      try {
        close(fds[0]);
        std::string out;
        for (int i = 0; i < kIds; ++i) out += random_part(NewUuidV7()) + "\n";
        code = write(fds[1], out.data(), out.size()) == static_cast<ssize_t>(out.size()) ? 0 : 1;
      } catch (...) {
        code = 2;
      }
      _exit(code);
    }
    for (int i = 0; i < kIds; ++i) parent.insert(random_part(NewUuidV7()));
  });
  forker.join();
  ASSERT_GE(child, 0);
  close(fds[1]);
  std::string got;
  char buf[4096];
  for (ssize_t n; (n = read(fds[0], buf, sizeof buf)) > 0;) got.append(buf, static_cast<size_t>(n));
  close(fds[0]);
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  int lines = 0, shared = 0;
  for (size_t at = 0, end; (end = got.find('\n', at)) != std::string::npos; at = end + 1) {
    ++lines;
    shared += parent.count(got.substr(at, end - at)) > 0;
  }
  EXPECT_EQ(lines, kIds);
  EXPECT_EQ(shared, 0);
}

TEST(DeliveryHandle, ReadsBackOnlyWhatItsTransportPutIn) {
  struct Mine {
    int64_t row;
  };
  struct Theirs {
    int64_t row;
  };
  const DeliveryHandle h(Mine{7});
  ASSERT_NE(h.As<Mine>(), nullptr);
  EXPECT_EQ(h.As<Mine>()->row, 7);
  EXPECT_EQ(h.As<Theirs>(), nullptr);
  const DeliveryHandle copy = h;  // deliveries are values
  EXPECT_EQ(copy.As<Mine>()->row, 7);
  EXPECT_TRUE(DeliveryHandle().empty());
  EXPECT_EQ(DeliveryHandle().As<Mine>(), nullptr);
}

TEST_F(OutboxRelayTest, SqlQueueSettlesOnlyDeliveriesItHandedOut) {
  Event e = MakeEvent("a");
  e.id = "e1";
  e.source = "urn:test";
  e.envelope = "{}";
  ASSERT_TRUE(queue_->Publish(e).ok());
  auto sub = queue_->OpenSubscriber("all");
  auto fetched = sub->Fetch(10, std::chrono::seconds(30));
  ASSERT_TRUE(fetched);
  ASSERT_EQ(fetched->size(), 1u);
  EXPECT_EQ((*fetched)[0].event.id, "e1");
  EXPECT_EQ((*fetched)[0].event.envelope, "{}");
  Delivery forged = (*fetched)[0];
  forged.handle = DeliveryHandle(int64_t{1});  // right row id, not the queue's handle
  const std::vector<Delivery> mixed = {(*fetched)[0], forged};
  const std::vector<Settlement> acks(2);
  EXPECT_EQ(sub->Settle(mixed, acks).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(*queue_->Depth("all"), 1);  // nothing of the batch was settled
  ASSERT_TRUE(sub->Settle(*fetched, std::span(acks).first(1)).ok());
  EXPECT_EQ(*queue_->Depth("all"), 0);
}

TEST_F(OutboxRelayTest, SqlQueueRefusesAnEventWithoutAnEnvelope) {
  Event e = MakeEvent("a");
  e.id = "e1";
  e.source = "urn:test";
  EXPECT_EQ(queue_->Publish(e).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(db_->Transact([&](Tx& tx) { return queue_->EnqueueInTx(tx, "all", e); }).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(*queue_->Depth("all"), 0);
}

// A transport with a transactional face, counting which face the relay used; its
// in-transaction publish can be made to fail.
class TwoFacedPublisher : public Publisher, public TxPublisher {
 public:
  TwoFacedPublisher(Database* db, SqlQueue* target) : db_(db), target_(target) {}
  Status Publish(const Event& e) override {
    ++published;
    return target_->Publish(e);
  }
  TxPublisher* tx_publisher() override { return this; }
  Database* database() override { return db_; }
  Status PublishInTx(Tx& tx, std::span<const Event> batch) override {
    ++batches_in_tx;
    if (!fail_with.ok()) return fail_with;
    return target_->PublishInTx(tx, batch);
  }
  Status fail_with;
  int published = 0, batches_in_tx = 0;

 private:
  Database* db_;
  SqlQueue* target_;
};

TEST_F(OutboxRelayTest, RelayPublishesAndMarksInOneTransactionThroughATxPublisher) {
  for (int i = 0; i < 3; ++i) Enqueue(MakeEvent("a"));
  TwoFacedPublisher pub(db_.get(), queue_.get());
  pub.fail_with = InternalError("publish failed inside the transaction");
  Relay relay(*db_, outbox_, pub);
  EXPECT_FALSE(relay.RunOnce());
  EXPECT_EQ(pub.batches_in_tx, 1);
  EXPECT_EQ(pub.published, 0);
  // The claim and the marks rolled back with the publish.
  EXPECT_EQ(QueryInt(*db_, "SELECT count(*) FROM outbox_events WHERE published_at IS NULL"), 3);
  pub.fail_with = Status();
  EXPECT_EQ(*relay.RunOnce(), 3u);
  EXPECT_EQ(pub.batches_in_tx, 2);
  EXPECT_EQ(pub.published, 0);
  EXPECT_EQ(*queue_->Depth("all"), 3);
}

TEST_F(OutboxRelayTest, ATxPublisherOnAnotherDatabaseIsPublishedToInTwoSteps) {
  Enqueue(MakeEvent("a"));
  auto other = OpenSqlite(dir_.File("other.sqlite"));
  TwoFacedPublisher pub(other.get(), queue_.get());  // its transactions are not the outbox's
  Relay relay(*db_, outbox_, pub);
  EXPECT_EQ(*relay.RunOnce(), 1u);
  EXPECT_EQ(pub.batches_in_tx, 0);
  EXPECT_EQ(pub.published, 1);
  EXPECT_EQ(*queue_->Depth("all"), 1);
}

// A slow transport cuts its batch short (PublishWhile) so that a pass does not outlast the
// relay's lease: what it did not attempt is not a failure, and goes out, in order, on the
// next passes.
class CuttingPublisher : public PublisherWrapper {
 public:
  CuttingPublisher(Publisher* target, int per_batch)
      : PublisherWrapper(target), per_batch_(per_batch) {}
  std::vector<Status> PublishBatch(std::span<const Event> batch) override {
    int started = 1;  // PublishWhile starts the first event without asking
    return PublishWhile(batch, [&] { return started++ < per_batch_; });
  }
  Status Publish(const Event& e) override {
    if (failing.count(e.subject) || fail_once.erase(e.subject) > 0) {
      return UnavailableError("the target times out on it");
    }
    sent.push_back(e.subject + ":" + e.type);
    return target_->Publish(e);
  }
  std::vector<std::string> sent;
  std::set<std::string> failing;    // fails every time
  std::set<std::string> fail_once;  // fails the next time

 private:
  const int per_batch_;
};

TEST_F(OutboxRelayTest, EventsABatchDidNotAttemptGoOutNextPassAndAreNoFailure) {
  for (int i = 0; i < 3; ++i) {
    Enqueue(MakeEvent("a", "a" + std::to_string(i)));
    Enqueue(MakeEvent("b", "b" + std::to_string(i)));
  }
  CuttingPublisher pub(queue_.get(), 2);
  Relay relay(*db_, outbox_, pub);
  EXPECT_EQ(*relay.RunOnce(), 2u);
  EXPECT_EQ(*relay.RunOnce(), 2u);
  EXPECT_EQ(*relay.RunOnce(), 2u);
  EXPECT_EQ(*relay.RunOnce(), 0u);
  EXPECT_EQ(relay.stats().publish_failures, 0);
  EXPECT_EQ(relay.stats().last_error, "");
  // Per aggregate, in order and once each.
  std::vector<std::string> a, b;
  for (const std::string& s : pub.sent) (s[0] == 'a' ? a : b).push_back(s);
  EXPECT_EQ(a, (std::vector<std::string>{"a:a0", "a:a1", "a:a2"}));
  EXPECT_EQ(b, (std::vector<std::string>{"b:b0", "b:b1", "b:b2"}));
  EXPECT_EQ(*queue_->Depth("all"), 6);
  // One attempt each: the one that published it.
  EXPECT_EQ(QueryInt(*db_, "SELECT MAX(publish_attempts) FROM outbox_events"), 1);
  EXPECT_EQ(QueryInt(*db_, "SELECT MIN(publish_attempts) FROM outbox_events"), 1);
}

// Found by review: an aggregate whose head fails slowly (a target that times out on it)
// used each pass's whole time, and with the batch cut after it no other aggregate moved.
// An aggregate that failed goes after the others on the next pass.
TEST_F(OutboxRelayTest, AnAggregateThatKeepsFailingDoesNotStarveTheOthers) {
  Enqueue(MakeEvent("a", "a0"));
  for (int i = 0; i < 3; ++i) Enqueue(MakeEvent("b", "b" + std::to_string(i)));
  CuttingPublisher pub(queue_.get(), 1);  // time for one event a pass
  pub.failing.insert("a");
  Relay relay(*db_, outbox_, pub);
  for (int pass = 0; pass < 6; ++pass) (void)relay.RunOnce();
  EXPECT_EQ(pub.sent, (std::vector<std::string>{"b:b0", "b:b1", "b:b2"}));
  EXPECT_GE(relay.stats().publish_failures, 1);
  pub.failing.clear();
  EXPECT_EQ(*relay.RunOnce(), 1u);  // a's event goes once the target takes it
  EXPECT_EQ(pub.sent.back(), "a:a0");
}

// Found by the second review: an aggregate that failed once, behind an older one that
// fails every time, was kept among the failing while it was not even attempted, and the
// older one took every pass. Only what failed in a pass goes last in the next.
TEST_F(OutboxRelayTest, AnAggregateThatFailedOnceIsNotStarvedByOneThatAlwaysFails) {
  Enqueue(MakeEvent("a", "a0"));
  Enqueue(MakeEvent("b", "b0"));
  Enqueue(MakeEvent("c", "c0"));
  CuttingPublisher pub(queue_.get(), 1);  // time for one event a pass
  pub.failing.insert("a");
  pub.fail_once.insert("b");
  Relay relay(*db_, outbox_, pub);
  for (int pass = 0; pass < 8; ++pass) (void)relay.RunOnce();
  std::vector<std::string> sent = pub.sent;
  std::sort(sent.begin(), sent.end());
  EXPECT_EQ(sent, (std::vector<std::string>{"b:b0", "c:c0"}));
}

}  // namespace
}  // namespace converge
