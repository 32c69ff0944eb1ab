// WebhookPublisher and PostSignedWebhook against an endpoint served in-process: what is
// sent (the envelope, signed as Standard Webhooks, the event id as webhook-id), what each
// answer means for the relay (OK, transient, refused), Retry-After honoured for the whole
// endpoint, and a batch that stops an aggregate at its failure.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "converge/event.h"
#include "converge/http.h"
#include "converge/webhook.h"
#include "converge/webhook_publisher.h"
#include "tests/unit/test_util.h"

namespace converge {
namespace {

using http::Request;
using http::Response;

// A loopback port nothing listens on (bound, read and closed).
uint16_t ClosedPort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  if (fd < 0 || bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    if (fd >= 0) close(fd);
    return 1;  // below 1024, where nothing of ours listens either
  }
  close(fd);
  return ntohs(addr.sin_port);
}

Event MakeEvent(const std::string& id, const std::string& subject) {
  Event e;
  e.id = id;
  e.source = "urn:test";
  e.type = "payment.captured";
  e.subject = subject;
  e.time = 1'700'000'000'000;
  e.data = R"({"amount":5})";
  e.envelope = EncodeEnvelope(e);
  return e;
}

// An endpoint whose next answers a test sets (status and Retry-After, in turn; then 204),
// and which keeps what it received.
class WebhookPublisherTest : public ::testing::Test {
 protected:
  struct Received {
    std::string id, timestamp, signature, content_type, body;
  };

  void SetUp() override {
    server_ = std::make_unique<http::Server>(http::ServerOptions{});
    server_->Route("POST", "/hook", [this](Request& r) {
      std::lock_guard<std::mutex> l(mu_);
      auto header = [&](const char* name) {
        const std::string* v = r.Header(name);
        return v != nullptr ? *v : std::string();
      };
      received_.push_back({header("webhook-id"), header("webhook-timestamp"),
                           header("webhook-signature"), header("content-type"), r.body});
      Response resp;
      resp.status = 204;
      if (!answers_.empty()) {
        resp = http::Json(answers_.front().first, "{}");
        if (answers_.front().second > 0) {
          resp.Set("Retry-After", std::to_string(answers_.front().second));
        }
        answers_.erase(answers_.begin());
      }
      return resp;
    });
    ASSERT_TRUE(server_->Start().ok());
    target_ = {.name = "hook",
               .url = "http://127.0.0.1:" + std::to_string(server_->port()) + "/hook",
               .secret = secret_,
               .timeout = std::chrono::seconds(5)};
  }

  void Answer(int status, int retry_after_seconds = 0) {
    std::lock_guard<std::mutex> l(mu_);
    answers_.emplace_back(status, retry_after_seconds);
  }
  std::vector<Received> received() {
    std::lock_guard<std::mutex> l(mu_);
    return received_;
  }

  const std::string secret_ = webhook::NewSecret();
  std::unique_ptr<http::Server> server_;
  WebhookTarget target_;
  std::mutex mu_;
  std::vector<std::pair<int, int>> answers_;
  std::vector<Received> received_;
};

TEST_F(WebhookPublisherTest, PostsTheEnvelopeSignedWithTheEventIdAsWebhookId) {
  WebhookPublisher publisher(target_, std::chrono::seconds(30));
  const Event e = MakeEvent("evt-1", "pay_1");
  ASSERT_TRUE(publisher.Publish(e).ok());
  const std::vector<Received> got = received();
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].id, "evt-1");
  EXPECT_EQ(got[0].body, e.envelope);
  EXPECT_EQ(got[0].content_type, "application/cloudevents+json");
  const std::vector<std::string> secrets = {secret_};
  const int64_t now = Clock::System()->NowMillis() / 1000;
  EXPECT_TRUE(webhook::Verify(secrets, got[0].id, got[0].timestamp, got[0].signature,
                              got[0].body, now)
                  .ok());
  // Another secret does not verify it.
  const std::vector<std::string> other = {webhook::NewSecret()};
  EXPECT_FALSE(
      webhook::Verify(other, got[0].id, got[0].timestamp, got[0].signature, got[0].body, now)
          .ok());
}

TEST_F(WebhookPublisherTest, EachAnswerIsSuccessARetryOrARefusal) {
  http::Client client;
  auto post = [&] { return PostSignedWebhook(client, target_, "evt", "{}", {}); };
  Answer(200);
  EXPECT_TRUE(post().status.ok());
  for (int transient : {408, 425, 429, 500, 503}) {
    Answer(transient);
    const WebhookOutcome out = post();
    EXPECT_EQ(out.http_status, transient);
    EXPECT_EQ(out.status.code(), StatusCode::kUnavailable) << transient;
    EXPECT_TRUE(out.status.transient()) << transient;
  }
  for (int redirect : {301, 308}) {  // not followed: the URL is wrong, for every delivery
    Answer(redirect);
    const WebhookOutcome out = post();
    EXPECT_EQ(out.status.code(), StatusCode::kUnavailable) << redirect;
    EXPECT_NE(out.status.message().find("fix the URL"), std::string::npos) << redirect;
  }
  for (int refused : {400, 404, 410, 422}) {
    Answer(refused);
    const WebhookOutcome out = post();
    EXPECT_EQ(out.status.code(), StatusCode::kFailedPrecondition) << refused;
    EXPECT_FALSE(out.status.transient()) << refused;
  }
  Answer(429, 7);
  EXPECT_EQ(post().status.retry_after_ms(), 7000);
  // No answer at all: nothing listens there.
  WebhookTarget nowhere = target_;
  nowhere.url = "http://127.0.0.1:" + std::to_string(ClosedPort()) + "/hook";
  const WebhookOutcome none = PostSignedWebhook(client, nowhere, "evt", "{}", {});
  EXPECT_EQ(none.http_status, 0);
  EXPECT_EQ(none.status.code(), StatusCode::kUnavailable);
  // A secret that is not whsec_<base64> signs nothing, and nothing is sent.
  WebhookTarget unsigned_target = target_;
  unsigned_target.secret = "whsec_!!";
  const size_t before = received().size();
  EXPECT_EQ(PostSignedWebhook(client, unsigned_target, "evt", "{}", {}).status.code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(received().size(), before);
}

// An endpoint that answered with Retry-After is not called again before it has passed:
// the publishes meanwhile fail at once, transiently, with the answer that asked for it.
TEST_F(WebhookPublisherTest, NothingIsSentUntilRetryAfterHasPassed) {
  WebhookPublisher publisher(target_, std::chrono::seconds(30));
  Answer(503, 2);
  const auto asked = std::chrono::steady_clock::now();
  const Status first = publisher.Publish(MakeEvent("evt-1", "pay_1"));
  EXPECT_EQ(first.code(), StatusCode::kUnavailable);
  const Status quiet = publisher.Publish(MakeEvent("evt-2", "pay_2"));
  EXPECT_EQ(quiet.code(), StatusCode::kUnavailable);
  EXPECT_NE(quiet.message().find("answered 503"), std::string::npos) << quiet.message();
  EXPECT_NE(quiet.message().find("Retry-After"), std::string::npos) << quiet.message();
  EXPECT_GT(quiet.retry_after_ms(), 0);
  EXPECT_EQ(received().size(), 1u);
  ASSERT_TRUE(testing::WaitUntil([&] {
    return publisher.Publish(MakeEvent("evt-2", "pay_2")).ok();
  }));
  EXPECT_GE(std::chrono::steady_clock::now() - asked, std::chrono::milliseconds(1900));
  EXPECT_EQ(received().size(), 2u);  // the quiet publishes sent nothing
}

// A secret that cannot sign is a configuration error, the same for every event: held as
// a transient failure (the relay keeps the events), not refused one by one (parked).
TEST_F(WebhookPublisherTest, ASecretThatCannotSignHoldsTheEvents) {
  WebhookTarget bad = target_;
  bad.secret = "whsec_!!";
  WebhookPublisher publisher(bad, std::chrono::seconds(30));
  const Status st = publisher.Publish(MakeEvent("evt-1", "pay_1"));
  EXPECT_EQ(st.code(), StatusCode::kUnavailable);
  EXPECT_NE(st.message().find("cannot sign"), std::string::npos) << st.message();
  EXPECT_TRUE(received().empty());
}

// A batch sends one event after another; a failed one holds back its aggregate's later
// events (not attempted), and the other aggregates go on.
TEST_F(WebhookPublisherTest, AFailureHoldsBackOnlyItsAggregate) {
  WebhookPublisher publisher(target_, std::chrono::seconds(30));
  Answer(500);
  const std::vector<Event> batch = {MakeEvent("a1", "A"), MakeEvent("a2", "A"),
                                    MakeEvent("b1", "B")};
  const std::vector<Status> results = publisher.PublishBatch(batch);
  ASSERT_EQ(results.size(), 3u);
  EXPECT_EQ(results[0].code(), StatusCode::kUnavailable);
  EXPECT_EQ(results[1].code(), StatusCode::kAborted);
  EXPECT_TRUE(results[2].ok());
  const std::vector<Received> got = received();
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(got[0].id, "a1");
  EXPECT_EQ(got[1].id, "b1");
  EXPECT_EQ(publisher.Publish(Event{}).code(), StatusCode::kInvalidArgument);  // no envelope
}

}  // namespace
}  // namespace converge
