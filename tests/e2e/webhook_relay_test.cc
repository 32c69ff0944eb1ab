// `converge relay --broker http://...`: the library's outbox delivered to an HTTP endpoint
// written in Python (tests/gateway/peer.py, which verifies the Standard Webhooks signature
// independently), both real processes. Every event arrives, signed, under its own id as
// webhook-id, in order per aggregate, through an endpoint that answers 503 with
// Retry-After and a relay killed between its POSTs and its mark; bad flags are refused
// with a clear message before anything runs.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "converge/database.h"
#include "converge/event.h"
#include "converge/http.h"
#include "converge/outbox.h"
#include "converge/webhook.h"
#include "harness/serve_process.h"
#include "tests/e2e/support.h"
#include "tests/unit/test_util.h"

namespace converge {
namespace {

using harness::ServeProcess;
using json = nlohmann::json;

constexpr const char* kPeer = CONVERGE_SOURCE_DIR "/tests/gateway/peer.py";

class WebhookRelayE2E : public ::testing::Test {
 protected:
  void SetUp() override {
    endpoint_ = std::make_unique<testing::PythonPeer>(
        dir_.path(), "endpoint", kPeer,
        std::vector<std::string>{"target", "{port_file}", secret_});
    ASSERT_TRUE(endpoint_->WaitReady()) << "the Python endpoint did not start";
    std::ofstream(dir_.File("signing.secret")) << secret_ << "\n";
    auto db = Database::Open(uri_);
    ASSERT_TRUE(db.has_value()) << db.error().ToString();
    db_ = std::move(*db);
  }

  ServeProcess::Options RelayOptions(const std::string& name) {
    return {.binary = CONVERGE_BIN_PATH, .command = "relay", .dir = dir_.path(), .name = name,
            .log_level = "info", .ready_line = "event=relay_started",
            .args = {"--db", uri_, "--broker", endpoint_->Url("/hooks/out"), "--secret-file",
                     dir_.File("signing.secret"), "--name", name, "--timeout-ms", "3000"}};
  }

  json Stats() {
    auto r = client_.Send({.url = endpoint_->Url("/stats")});
    return r && r->status == 200 ? json::parse(r->body) : json::object();
  }
  void Fault(const json& f) {
    auto r = client_.Send({.method = "POST", .url = endpoint_->Url("/faults"), .body = f.dump()});
    ASSERT_TRUE(r && r->status == 200);
  }
  int64_t Unpublished() {
    return testing::QueryInt(*db_, "SELECT count(*) FROM outbox_events WHERE published_at IS NULL");
  }

  // `converge relay ARGS` run to its end: its exit status, its output in *out.
  int RunRelayCommand(const std::string& args, std::string* out) {
    const std::string log = dir_.File("command.log");
    const int rc = std::system((std::string(CONVERGE_BIN_PATH) + " relay " + args + " > " +
                                log + " 2>&1")
                                   .c_str());
    std::ifstream f(log);
    out->assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
  }

  testing::TempDir dir_;
  const std::string uri_ = "sqlite:" + dir_.File("service.db");
  const std::string secret_ = webhook::NewSecret();
  std::unique_ptr<testing::PythonPeer> endpoint_;
  std::unique_ptr<Database> db_;
  http::Client client_;
};

TEST_F(WebhookRelayE2E, EveryEventArrivesSignedInOrderPerAggregateThroughFaultsAndACrash) {
  // Three aggregates of ten events each, interleaved.
  Outbox outbox;
  std::map<std::string, std::vector<std::string>> ids;  // aggregate -> ids, in order
  std::set<std::string> all;
  for (int i = 0; i < 30; ++i) {
    const std::string aggregate = "order-" + std::to_string(i % 3);
    ASSERT_TRUE(db_->Transact([&](Tx& tx) -> Status {
                     Event e;
                     e.type = "order.changed";
                     e.subject = aggregate;
                     e.data = json{{"step", i}}.dump();
                     CONVERGE_ASSIGN_OR_RETURN(std::string id, outbox.Enqueue(tx, e));
                     ids[aggregate].push_back(id);
                     all.insert(id);
                     return OkStatus();
                   }).ok());
  }
  // The endpoint first answers 503 with Retry-After; then, past it, the relay dies after
  // its first POSTs and before marking them (so it sends them again once restarted).
  ASSERT_NO_FATAL_FAILURE(Fault({{"status", 503}, {"times", 1}, {"retry_after", 1}}));
  ServeProcess relay(RelayOptions("r1"));
  const Status started = relay.Start("relay.after_publish_before_mark=crash*1");
  ASSERT_TRUE((started.ok() && relay.KilledWithin(std::chrono::seconds(30))) ||
              (!started.ok() && relay.killed_at_start()))
      << "the relay did not die at its failpoint; see " << relay.log_path();
  ASSERT_TRUE(relay.Start("").ok()) << "see " << relay.log_path();
  ASSERT_TRUE(testing::WaitUntil([&] { return Unpublished() == 0; }, std::chrono::seconds(60)))
      << Unpublished() << " events unpublished; see " << relay.log_path();

  const json stats = Stats();
  EXPECT_EQ(stats["bad_signatures"], 0);
  // Every event arrived under its own id, some twice (sent again after the crash), none
  // that was not enqueued.
  std::set<std::string> delivered;
  int64_t again = 0;
  for (const auto& [id, n] : stats["deliveries"].items()) {
    delivered.insert(id);
    again += n.get<int64_t>() - 1;
  }
  EXPECT_EQ(delivered, all);
  EXPECT_GT(again, 0) << "the crash after the POSTs sent nothing again";
  // The 503 came first, then the rest; each aggregate's events first arrived in order.
  const json& attempts = stats["attempts"];
  ASSERT_FALSE(attempts.empty());
  EXPECT_EQ(attempts[0][2], 503);
  std::map<std::string, std::vector<std::string>> arrived;
  std::set<std::string> seen;
  std::map<std::string, std::string> aggregate_of;
  for (const auto& [aggregate, list] : ids) {
    for (const std::string& id : list) aggregate_of[id] = aggregate;
  }
  for (const json& a : attempts) {
    const std::string id = a[1];
    if (a[2] != 200 || !seen.insert(id).second) continue;
    arrived[aggregate_of[id]].push_back(id);
  }
  EXPECT_EQ(arrived, ids);
  // The body is the event's CloudEvents envelope.
  const json last = json::parse(stats["last"]["body"].get<std::string>());
  EXPECT_EQ(last["type"], "order.changed");
  EXPECT_TRUE(all.count(last["id"].get<std::string>()));
  EXPECT_EQ(stats["last"]["path"], "/hooks/out");
}

TEST_F(WebhookRelayE2E, BadFlagsAreRefusedWithTheReason) {
  const std::string db = "--db " + uri_ + " ";
  const std::string url = endpoint_->Url("/hooks/out");
  std::string out;
  ASSERT_EQ(unsetenv("CONVERGE_WEBHOOK_SECRET"), 0);
  EXPECT_EQ(RunRelayCommand(db + "--broker " + url, &out), 2);
  EXPECT_NE(out.find("needs the secret"), std::string::npos) << out;
  std::ofstream(dir_.File("bad.secret")) << "not-a-whsec-secret\n";
  EXPECT_EQ(RunRelayCommand(db + "--broker " + url + " --secret-file " + dir_.File("bad.secret"),
                            &out),
            2);
  EXPECT_NE(out.find("whsec_<base64>"), std::string::npos) << out;
  EXPECT_EQ(out.find("not-a-whsec-secret"), std::string::npos) << "the secret was shown";
  EXPECT_EQ(RunRelayCommand(db + "--broker " + url + " --secret-file " + dir_.File("none"), &out),
            2);
  EXPECT_NE(out.find("No such file"), std::string::npos) << out;
  EXPECT_EQ(RunRelayCommand(db + "--broker http:///x --secret-file " +
                                dir_.File("signing.secret"),
                            &out),
            2);
  EXPECT_NE(out.find("names no host"), std::string::npos) << out;
  EXPECT_EQ(RunRelayCommand(db + "--broker nats://127.0.0.1:1 --secret-file " +
                                dir_.File("signing.secret"),
                            &out),
            2);
  EXPECT_NE(out.find("goes with an http(s) --broker"), std::string::npos) << out;
  EXPECT_EQ(Stats()["attempts"].size(), 0u);  // nothing was sent
}

}  // namespace
}  // namespace converge
