// Interop: a second, independent client (the `nats` npm package on Node, see interop.cjs)
// reads what the relay publishes and publishes what a converge consumer reads. The npm
// package is installed, pinned, into the build tree on first use.
#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <string>
#include <vector>

#include "converge/consumer.h"
#include "converge/nats.h"
#include "converge/outbox.h"
#include "converge/relay.h"
#include "tests/nats/nats_servers.h"
#include "tests/unit/test_util.h"

namespace converge {
namespace {

using namespace std::chrono_literals;
using testing::NatsServers;
using testing::OpenSqlite;
using testing::QueryInt;
using testing::TempDir;
using testing::WaitUntil;

constexpr const char* kNpmPackage = "nats@2.29.3";

// Runs a shell command; returns its standard output, or nullopt when it failed.
std::optional<std::string> Run(const std::string& cmd) {
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) return std::nullopt;
  std::string out;
  std::array<char, 4096> buf;
  for (size_t n; (n = fread(buf.data(), 1, buf.size(), p)) > 0;) out.append(buf.data(), n);
  if (pclose(p) != 0) return std::nullopt;
  return out;
}

// `node interop.cjs ARGS` with the pinned npm client.
std::optional<std::string> Node(const std::string& args) {
  const std::string prefix = CONVERGE_BINARY_DIR "/npm";
  if (!Run("test -d '" + prefix +
           "/node_modules/nats' || npm install --no-audit --no-fund "
           "--prefix '" +
           prefix + "' " + kNpmPackage + " >&2")) {
    ADD_FAILURE() << "npm install " << kNpmPackage << " failed (is node/npm installed?)";
    return std::nullopt;
  }
  return Run("NODE_PATH='" + prefix +
             "/node_modules' node '" CONVERGE_SOURCE_DIR "/tests/nats/interop.cjs' " + args);
}

TEST(NatsInterop, ANodeClientReadsWhatTheRelayPublishesAndWritesWhatAConsumerReads) {
  NatsServers nats;
  ASSERT_TRUE(nats.Start(1));
  TempDir dir;
  auto db = OpenSqlite(dir.File("db.sqlite"));
  ASSERT_NE(db, nullptr);
  auto options = ParseNatsUri("nats://" + nats.urls());
  ASSERT_TRUE(options.has_value());
  auto broker = NatsBroker::Connect(*options);
  ASSERT_TRUE(broker.has_value()) << broker.error().ToString();

  // converge -> Node.
  Outbox outbox;
  std::vector<std::string> ids;
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(db->Transact([&](Tx& tx) -> Status {
                    Event e;
                    e.type = "payment.captured";
                    e.subject = "pay_" + std::to_string(i);
                    e.data = R"({"payment_id":"pay_)" + std::to_string(i) + R"(","amount":100})";
                    CONVERGE_ASSIGN_OR_RETURN(std::string id, outbox.Enqueue(tx, e));
                    ids.push_back(id);
                    return OkStatus();
                  }).ok());
  }
  Relay relay(*db, outbox, **broker);
  ASSERT_EQ(relay.RunOnce().value_or(0), 3u);
  auto read = Node("read '" + nats.urls() + "' CONVERGE 3");
  ASSERT_TRUE(read.has_value());
  for (size_t i = 0; i < ids.size(); ++i) {
    EXPECT_NE(read->find(R"("id":")" + ids[i] + "\""), std::string::npos) << *read;
    EXPECT_NE(read->find(R"("payment_id":"pay_)" + std::to_string(i) + "\""), std::string::npos);
  }

  // Node -> converge: the same CloudEvent twice under one Nats-Msg-Id; the stream keeps
  // one, and the consumer applies it once.
  auto wrote = Node("write '" + nats.urls() + "' converge.payment.captured node-evt-1");
  ASSERT_TRUE(wrote.has_value());
  EXPECT_NE(wrote->find(R"({"duplicates":[false,true]})"), std::string::npos) << *wrote;

  NatsSubscription s;
  s.consumer = "ledger";
  s.pattern = "payment.*";
  auto sub = (*broker)->Subscribe(s);
  ASSERT_TRUE(sub.has_value()) << sub.error().ToString();
  ConsumerOptions co;
  co.name = "ledger";
  Consumer consumer(*db, **sub, co);
  std::vector<Event> seen;
  consumer.On("payment.captured", [&](Tx&, const Event& e) {
    seen.push_back(e);
    return OkStatus();
  });
  ASSERT_TRUE(WaitUntil(
      [&] {
        (void)consumer.RunOnce();
        return seen.size() >= 4 && (*broker)->Unsettled("ledger").value_or(-1) == 0;
      },
      30s))
      << consumer.stats().last_error;
  ASSERT_EQ(seen.size(), 4u);
  const Event& from_node = seen.back();
  EXPECT_EQ(from_node.id, "node-evt-1");
  EXPECT_EQ(from_node.source, "urn:interop:node");
  EXPECT_EQ(from_node.subject, "pay_node");
  EXPECT_NE(from_node.data.find("\"amount\":250"), std::string::npos) << from_node.data;
  EXPECT_GT(from_node.time, 0);
  EXPECT_EQ(QueryInt(*db, "SELECT count(*) FROM consumer_inbox WHERE event_id = 'node-evt-1'"), 1);
}

}  // namespace
}  // namespace converge
