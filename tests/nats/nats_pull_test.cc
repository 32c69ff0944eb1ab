// NatsPull, the pull protocol spoken directly (src/transport/nats/nats_pull.h), against a
// real nats-server: a Fetch never returns more than it asked for, whatever else arrives;
// the end of an earlier request never ends the current one; nothing is asked while the
// connection is down; a refusal is an error.
//
// The first test is the shape that made cnats 3.4.1's natsSubscription_Fetch write past
// its array (nats.c#749): nine messages already waiting, a batch of ten, and fifty more
// arriving for an earlier request. Run against natsSubscription_Fetch, the same steps
// return 59 messages for a batch of 10 (docs/design/chaos.md, Findings).
#include "src/transport/nats/nats_pull.h"

#include <gtest/gtest.h>
#include <nats/nats.h>

#include <set>
#include <string>
#include <thread>
#include <vector>

#include "converge/failpoint.h"
#include "tests/nats/nats_servers.h"

namespace converge::internal {
namespace {

using namespace std::chrono_literals;
using testing::NatsServers;

constexpr const char* kStream = "PULLT";
constexpr const char* kConsumer = "puller";
constexpr const char* kNext = "$JS.API.CONSUMER.MSG.NEXT.PULLT.puller";

class NatsPullTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(servers_.Start(1));
    natsOptions* o = nullptr;
    ASSERT_EQ(natsOptions_Create(&o), NATS_OK);
    const std::string url = servers_.urls();
    ASSERT_EQ(natsOptions_SetURL(o, url.c_str()), NATS_OK);
    ASSERT_EQ(natsOptions_SetMaxReconnect(o, -1), NATS_OK);
    ASSERT_EQ(natsOptions_SetReconnectWait(o, 100), NATS_OK);
    ASSERT_EQ(natsConnection_Connect(&nc_, o), NATS_OK);
    natsOptions_Destroy(o);
    ASSERT_EQ(natsConnection_JetStream(&js_, nc_, nullptr), NATS_OK);
    jsStreamConfig sc;
    jsStreamConfig_Init(&sc);
    const char* subjects[] = {"pt.>"};
    sc.Name = kStream;
    sc.Subjects = subjects;
    sc.SubjectsLen = 1;
    sc.Storage = js_FileStorage;
    ASSERT_EQ(js_AddStream(nullptr, js_, &sc, nullptr, nullptr), NATS_OK);
    jsConsumerConfig cc;
    jsConsumerConfig_Init(&cc);
    cc.Durable = kConsumer;
    cc.AckPolicy = js_AckExplicit;
    cc.AckWait = int64_t{60} * 1'000'000'000;
    ASSERT_EQ(js_AddConsumer(nullptr, js_, kStream, &cc, nullptr, nullptr), NATS_OK);
    auto pull = NatsPull::Open(nc_, kStream, kConsumer);
    ASSERT_TRUE(pull.has_value()) << pull.error().ToString();
    pull_ = std::move(*pull);
  }

  void TearDown() override {
    pull_.reset();
    if (js_ != nullptr) jsCtx_Destroy(js_);
    if (nc_ != nullptr) natsConnection_Destroy(nc_);
  }

  void Publish(int n, const std::string& tag) {
    for (int i = 0; i < n; ++i) {
      const std::string body = tag + "-" + std::to_string(i);
      ASSERT_EQ(js_Publish(nullptr, js_, "pt.x", body.data(), static_cast<int>(body.size()),
                           nullptr, nullptr),
                NATS_OK);
    }
  }

  // A pull request this NatsPull did not send, answered into its inbox as request `n`.
  void RawRequest(uint64_t n, const std::string& body) {
    const std::string reply = pull_->inbox() + "." + std::to_string(n);
    ASSERT_EQ(natsConnection_PublishRequestString(nc_, kNext, reply.c_str(), body.c_str()),
              NATS_OK);
    ASSERT_EQ(natsConnection_Flush(nc_), NATS_OK);
  }

  // Fetches until `want` distinct messages were taken (each acked) or `rounds` Fetches
  // came back empty; every Fetch must return at most `max`.
  std::set<std::string> TakeAll(size_t max, size_t want) {
    std::set<std::string> seen;
    int empty = 0;
    while (seen.size() < want && empty < 20) {
      std::vector<natsMsg*> msgs;
      Status st = pull_->Fetch(max, 200ms, false, &msgs);
      EXPECT_TRUE(st.ok()) << st.ToString();
      EXPECT_LE(msgs.size(), max);
      if (msgs.empty()) ++empty;
      for (natsMsg* m : msgs) {
        std::string body(natsMsg_GetData(m), static_cast<size_t>(natsMsg_GetDataLength(m)));
        EXPECT_TRUE(seen.insert(body).second) << "taken twice: " << body;
        EXPECT_TRUE(NatsPull::Reply(nc_, m, "+ACK").ok());
        natsMsg_Destroy(m);
      }
    }
    return seen;
  }

  NatsServers servers_;
  natsConnection* nc_ = nullptr;
  jsCtx* js_ = nullptr;
  std::unique_ptr<NatsPull> pull_;
};

TEST_F(NatsPullTest, AFetchNeverReturnsMoreThanItAskedForWhateverElseArrives) {
  Publish(9, "early");
  RawRequest(1000, R"({"batch":9})");  // nine answers already waiting
  RawRequest(1001, R"({"batch":50,"expires":5000000000})");  // an earlier request, open
  std::this_thread::sleep_for(300ms);
  std::thread late([&] {
    std::this_thread::sleep_for(200ms);
    Publish(50, "late");
  });
  std::vector<natsMsg*> msgs;
  Status st = pull_->Fetch(10, 2s, false, &msgs);
  late.join();
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_GE(msgs.size(), 1u);
  EXPECT_LE(msgs.size(), 10u);
  std::set<std::string> seen;
  for (natsMsg* m : msgs) {
    seen.insert(std::string(natsMsg_GetData(m), static_cast<size_t>(natsMsg_GetDataLength(m))));
    EXPECT_TRUE(NatsPull::Reply(nc_, m, "+ACK").ok());
    natsMsg_Destroy(m);
  }
  // The rest come with later Fetches, each message once.
  std::set<std::string> rest = TakeAll(10, 59 - seen.size());
  for (const std::string& b : rest) EXPECT_TRUE(seen.insert(b).second) << b;
  EXPECT_EQ(seen.size(), 59u);
}

TEST_F(NatsPullTest, TheEndOfAnEarlierRequestDoesNotEndTheCurrentOne) {
  // An earlier request that ends (408) while the Fetch waits, before anything arrives.
  RawRequest(2000, R"({"batch":1,"expires":300000000})");
  std::thread later([&] {
    std::this_thread::sleep_for(800ms);
    Publish(1, "one");
  });
  std::vector<natsMsg*> msgs;
  const auto start = std::chrono::steady_clock::now();
  Status st = pull_->Fetch(5, 3s, false, &msgs);
  later.join();
  ASSERT_TRUE(st.ok()) << st.ToString();
  ASSERT_EQ(msgs.size(), 1u) << "after "
                             << std::chrono::duration_cast<std::chrono::milliseconds>(
                                    std::chrono::steady_clock::now() - start)
                                    .count()
                             << " ms";
  natsMsg_Destroy(msgs[0]);
}

TEST_F(NatsPullTest, ANoWaitFetchOfAnEmptyConsumerEndsAtOnce) {
  std::vector<natsMsg*> msgs;
  const auto start = std::chrono::steady_clock::now();
  Status st = pull_->Fetch(5, 5s, /*no_wait=*/true, &msgs);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_TRUE(msgs.empty());
  EXPECT_LT(std::chrono::steady_clock::now() - start, 4s);  // the 404, not the wait
}

TEST_F(NatsPullTest, NothingIsAskedWhileTheConnectionIsDownAndDeliveriesFollowTheReturn) {
  Publish(3, "before");
  EXPECT_EQ(TakeAll(10, 3).size(), 3u);
  const uint64_t sent = pull_->requests_sent();
  ASSERT_TRUE(servers_.Kill(1));
  // cnats's reader sees the closed socket (a sanitizer build on a loaded host: slowly).
  for (int i = 0; i < 200 && natsConnection_Status(nc_) == NATS_CONN_STATUS_CONNECTED; ++i) {
    std::this_thread::sleep_for(100ms);
  }
  ASSERT_NE(natsConnection_Status(nc_), NATS_CONN_STATUS_CONNECTED);
  for (int i = 0; i < 5; ++i) {
    std::vector<natsMsg*> msgs;
    (void)pull_->Fetch(10, 100ms, false, &msgs);
    EXPECT_TRUE(msgs.empty());
  }
  // None is sent during the outage (it would wait in the reconnect buffer).
  EXPECT_EQ(pull_->requests_sent(), sent);
  ASSERT_TRUE(servers_.Restart(1));
  for (int i = 0; i < 100 && natsConnection_Status(nc_) != NATS_CONN_STATUS_CONNECTED; ++i) {
    std::this_thread::sleep_for(100ms);
  }
  ASSERT_EQ(natsConnection_Status(nc_), NATS_CONN_STATUS_CONNECTED);
  Publish(25, "after");
  // A "before" message may come again: its ack, sent just before the kill, or the
  // consumer's state for it may not have reached the server's disk (at least once).
  // Every "after" message must come, and nothing else.
  size_t after = 0;
  for (const std::string& body : TakeAll(10, 25 + 3)) {
    if (body.rfind("after-", 0) == 0) {
      ++after;
    } else {
      EXPECT_EQ(body.rfind("before-", 0), 0u) << body;
    }
  }
  EXPECT_EQ(after, 25u);
}

// A delivery's subject is the message's own (`pt.x`), not the request's reply subject, so
// a request is over once its batch arrived in full: the server ends it silently (no 404 or
// 408 follows). The next Fetch must ask again at once, not wait the old request out.
TEST_F(NatsPullTest, ARequestAnsweredInFullIsOverAndTheNextFetchAsksAgain) {
  Publish(30, "m");
  std::set<std::string> seen;
  while (seen.size() < 30) {
    std::vector<natsMsg*> msgs;
    const auto start = std::chrono::steady_clock::now();
    Status st = pull_->Fetch(10, 5s, false, &msgs);
    ASSERT_TRUE(st.ok()) << st.ToString();
    // With 30 - seen.size() messages in the stream, every Fetch gets some.
    ASSERT_FALSE(msgs.empty()) << "after " << seen.size() << " taken, " << pull_->requests_sent()
                               << " requests sent, a Fetch came back empty after "
                               << std::chrono::duration_cast<std::chrono::milliseconds>(
                                      std::chrono::steady_clock::now() - start)
                                      .count()
                               << " ms";
    EXPECT_LE(msgs.size(), 10u);
    for (natsMsg* m : msgs) {
      std::string body(natsMsg_GetData(m), static_cast<size_t>(natsMsg_GetDataLength(m)));
      EXPECT_TRUE(seen.insert(body).second) << "taken twice: " << body;
      EXPECT_TRUE(NatsPull::Reply(nc_, m, "+ACK").ok());
      natsMsg_Destroy(m);
    }
  }
  EXPECT_EQ(pull_->requests_sent(), 3u);  // one per batch of ten, each answered in full
}

// A stored message with an empty body and a `Status` header of its own (any publisher may
// send one) is still a delivery: it has an ack subject, which no status has. Taken for a
// status, it would be destroyed unsettled, come back after every AckWait, and never reach
// the consumer.
TEST_F(NatsPullTest, AStoredMessageThatLooksLikeAStatusIsStillADelivery) {
  natsMsg* m = nullptr;
  ASSERT_EQ(natsMsg_Create(&m, "pt.x", nullptr, nullptr, 0), NATS_OK);
  ASSERT_EQ(natsMsgHeader_Set(m, "Status", "404"), NATS_OK);
  ASSERT_EQ(js_PublishMsg(nullptr, js_, m, nullptr, nullptr), NATS_OK);
  natsMsg_Destroy(m);
  Publish(1, "after");
  std::vector<natsMsg*> msgs;
  for (int i = 0; i < 10 && msgs.size() < 2; ++i) {
    Status st = pull_->Fetch(10, 1s, false, &msgs);
    ASSERT_TRUE(st.ok()) << st.ToString();
  }
  ASSERT_EQ(msgs.size(), 2u);
  EXPECT_EQ(natsMsg_GetDataLength(msgs[0]), 0);
  for (natsMsg* taken : msgs) {
    EXPECT_TRUE(NatsPull::Reply(nc_, taken, "+ACK").ok());
    natsMsg_Destroy(taken);
  }
}

// The consumer is deleted once the server holds the request (nats.pull_answer_late, off,
// counts it as sent; the consumer's num_waiting shows it held): deleted before it, the
// server would not answer it at all (the test below). The 409 ends the wait early.
TEST_F(NatsPullTest, ARefusedRequestIsAnError) {
  ASSERT_TRUE(failpoint::Configure("nats.pull_answer_late=off").ok());
  std::thread drop([&] {
    for (int i = 0; i < 3000 && failpoint::Hits("nats.pull_answer_late") < 1; ++i) {
      std::this_thread::sleep_for(10ms);
    }
    for (int i = 0; i < 300; ++i) {
      jsConsumerInfo* ci = nullptr;
      const bool waiting = js_GetConsumerInfo(&ci, js_, kStream, kConsumer, nullptr, nullptr) ==
                               NATS_OK &&
                           ci->NumWaiting >= 1;
      if (ci != nullptr) jsConsumerInfo_Destroy(ci);
      if (waiting) break;
      std::this_thread::sleep_for(100ms);
    }
    EXPECT_EQ(js_DeleteConsumer(js_, kStream, kConsumer, nullptr, nullptr), NATS_OK);
  });
  std::vector<natsMsg*> msgs;
  Status st = pull_->Fetch(5, 30s, false, &msgs);
  drop.join();
  ASSERT_TRUE(failpoint::Configure("").ok());
  EXPECT_TRUE(msgs.empty());
  EXPECT_EQ(st.code(), StatusCode::kUnavailable) << st.ToString();
  EXPECT_NE(st.message().find("409"), std::string::npos) << st.ToString();
}

// A request to a consumer that no longer exists gets no answer from nats-server 2.9 (no
// 409, no 503 either): each Fetch sends one request and waits its wait, so a consumer
// polling a deleted consumer does not spin. (Deleted while a request waits: the 409 above.
// The subscriber above NatsPull notices the silence: NatsTransport.AConsumerDeleted...)
TEST_F(NatsPullTest, AFetchFromADeletedConsumerWaitsItsWaitWithOneRequest) {
  ASSERT_EQ(js_DeleteConsumer(js_, kStream, kConsumer, nullptr, nullptr), NATS_OK);
  for (int i = 0; i < 3; ++i) {
    const uint64_t sent = pull_->requests_sent();
    std::vector<natsMsg*> msgs;
    const auto start = std::chrono::steady_clock::now();
    Status st = pull_->Fetch(5, 300ms, false, &msgs);
    const auto took = std::chrono::steady_clock::now() - start;
    EXPECT_TRUE(msgs.empty());
    EXPECT_LE(pull_->requests_sent(), sent + 1);
    // Either no answer (the wait) or a refusal; never an immediate empty success.
    if (st.ok()) {
      EXPECT_GE(took, 250ms) << "an empty Fetch that did not wait";
    }
  }
}

}  // namespace
}  // namespace converge::internal
