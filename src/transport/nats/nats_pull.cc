#include "src/transport/nats/nats_pull.h"

#include <algorithm>
#include <charconv>
#include <string_view>

#include "converge/failpoint.h"

namespace converge::internal {
namespace {

using std::chrono::duration_cast;
using std::chrono::nanoseconds;

// A request expiring with the caller's wait would be answered (408) just after the caller
// stopped listening, so it expires a little earlier, as cnats's own requests do.
constexpr Millis kExpiryMargin{10};

// The request number in a reply subject `<inbox>.<n>`; 0 when it is not one of ours.
uint64_t RequestOf(std::string_view subject, std::string_view inbox) {
  if (subject.size() <= inbox.size() + 1 || subject.substr(0, inbox.size()) != inbox ||
      subject[inbox.size()] != '.') {
    return 0;
  }
  std::string_view digits = subject.substr(inbox.size() + 1);
  uint64_t n = 0;
  auto [p, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), n);
  return ec == std::errc() && p == digits.data() + digits.size() ? n : 0;
}

}  // namespace

Status FromNats(natsStatus s, std::string_view what, jsErrCode js) {
  if (s == NATS_OK) return OkStatus();
  std::string msg = std::string(what) + ": " + natsStatus_GetText(s);
  // cnats keeps a thread's last error text until the next error that sets one: a timeout
  // or a "not found" does not, and would show an earlier call's text. Only a text set
  // with this very status is this call's.
  natsStatus last_status = NATS_OK;
  const char* last = nats_GetLastError(&last_status);
  if (last != nullptr && *last != '\0' && last_status == s) {
    msg += std::string(" (") + last + ")";
  }
  if (js != 0) msg += " [jetstream error " + std::to_string(static_cast<int>(js)) + "]";
  switch (s) {
    case NATS_TIMEOUT:
      return DeadlineExceededError(msg);
    case NATS_INVALID_ARG:
    case NATS_INVALID_SUBJECT:
    case NATS_MAX_PAYLOAD:  // larger than the server's max_payload: refused for good
      return InvalidArgumentError(msg);
    case NATS_NOT_FOUND:
      return NotFoundError(msg);
    default:
      return UnavailableError(msg);
  }
}

Result<std::unique_ptr<NatsPull>> NatsPull::Open(natsConnection* nc, const std::string& stream,
                                                 const std::string& consumer) {
  natsInbox* raw = nullptr;
  natsStatus s = natsInbox_Create(&raw);
  if (s != NATS_OK) return tl::unexpected(FromNats(s, "NATS: creating an inbox"));
  std::string inbox = raw;
  natsInbox_Destroy(raw);
  natsSubscription* sub = nullptr;
  s = natsConnection_SubscribeSync(&sub, nc, (inbox + ".*").c_str());
  if (s != NATS_OK) {
    return tl::unexpected(FromNats(s, "NATS: subscribing to the pull inbox of '" + consumer + "'"));
  }
  // Every delivery is a message the server counts as sent: never drop one for a limit.
  natsSubscription_SetPendingLimits(sub, -1, -1);
  return std::unique_ptr<NatsPull>(new NatsPull(
      nc, std::move(inbox), "$JS.API.CONSUMER.MSG.NEXT." + stream + "." + consumer, sub));
}

NatsPull::NatsPull(natsConnection* nc, std::string inbox, std::string next_subject,
                   natsSubscription* sub)
    : nc_(nc), inbox_(std::move(inbox)), next_subject_(std::move(next_subject)), sub_(sub) {}

NatsPull::~NatsPull() { natsSubscription_Destroy(sub_); }

void NatsPull::Take(natsMsg* msg, std::vector<natsMsg*>* out, Status* error) {
  const char* subject = natsMsg_GetSubject(msg);
  const uint64_t request = RequestOf(subject != nullptr ? subject : "", inbox_);
  // A status has no body and no reply subject; every delivery has its ack subject, so a
  // stored message with an empty body and a `Status` header of its own is still one.
  const char* reply = natsMsg_GetReply(msg);
  const char* status = nullptr;
  const bool is_status = natsMsg_GetDataLength(msg) == 0 && (reply == nullptr || *reply == '\0') &&
                         natsMsgHeader_Get(msg, "Status", &status) == NATS_OK && status != nullptr;
  if (!is_status) {
    out->push_back(msg);  // a delivery, whichever request it answers
    // It carries its message's own subject, not the request's reply subject, so it counts
    // against the open request: one answered in full is over, and the server says nothing
    // more about it. (One answering an earlier request ends the open one early at worst:
    // a request too many, whose deliveries wait here for the next Fetch.)
    if (open_ != 0 && --open_remaining_ <= 0) open_ = 0;
    return;
  }
  if (request != 0 && request == open_) {
    std::string_view code(status);
    if (code.substr(0, 3) != "100") {  // 100: an idle heartbeat or flow control
      open_ = 0;
      // 404 (nothing to deliver) and 408 (expired) end a request; anything else refuses
      // it (409: consumer deleted, too many waiting requests, leadership change...).
      if (code.substr(0, 3) != "404" && code.substr(0, 3) != "408") {
        const char* desc = nullptr;
        natsMsgHeader_Get(msg, "Description", &desc);
        *error = UnavailableError("NATS pull from " + next_subject_ + ": " + std::string(code) +
                                  (desc != nullptr ? std::string(" ") + desc : std::string()));
      }
    }
  }  // else: the end of an earlier request, already given up on
  natsMsg_Destroy(msg);
}

Result<natsMsg*> NatsPull::Next(int64_t timeout_ms) {
  for (;;) {
    natsMsg* msg = nullptr;
    natsStatus s = natsSubscription_NextMsg(&msg, sub_, timeout_ms);
    if (s == NATS_OK) return msg;
    if (s == NATS_TIMEOUT) return nullptr;
    if (s == NATS_SLOW_CONSUMER) continue;  // reported once; nothing is dropped (no limits)
    if (s == NATS_NO_RESPONDERS) {
      open_ = 0;
      return tl::unexpected(
          UnavailableError("NATS pull from " + next_subject_ + ": no responders (JetStream)"));
    }
    return tl::unexpected(FromNats(s, "NATS pull"));
  }
}

Status NatsPull::Drain(size_t max, std::vector<natsMsg*>* out) {
  Status error = OkStatus();
  while (out->size() < max) {
    CONVERGE_ASSIGN_OR_RETURN(natsMsg * msg, Next(0));
    if (msg == nullptr) break;  // nothing more has arrived
    Take(msg, out, &error);
  }
  return error;
}

Status NatsPull::Fetch(size_t max, Millis wait, bool no_wait, std::vector<natsMsg*>* out) {
  max = std::max<size_t>(max, 1);
  const size_t first = out->size();
  const size_t limit = first + max;
  Status st = Drain(limit, out);
  if (out->size() > first) return OkStatus();  // a refusal read with them: asked again next
  if (!st.ok()) return st;

  const SteadyTime now = std::chrono::steady_clock::now();
  const SteadyTime deadline = now + wait;
  if (open_ != 0 && now >= open_until_) open_ = 0;  // its answer was lost (a restart)
  if (open_ == 0 && natsConnection_Status(nc_) == NATS_CONN_STATUS_CONNECTED) {
    const Millis expires = wait >= 2 * kExpiryMargin ? wait - kExpiryMargin : wait;
    // A no-wait request carries no expiry: with one, nats-server 2.9 waits it out.
    std::string body = "{\"batch\":" + std::to_string(max);
    body += no_wait ? std::string(",\"no_wait\":true")
                    : ",\"expires\":" + std::to_string(duration_cast<nanoseconds>(expires).count());
    body += "}";
    const uint64_t n = next_request_++;
    const std::string reply = inbox_ + "." + std::to_string(n);
    natsStatus s = natsConnection_PublishRequest(nc_, next_subject_.c_str(), reply.c_str(),
                                                 body.data(), static_cast<int>(body.size()));
    if (s != NATS_OK) return FromNats(s, "NATS pull request to " + next_subject_);
    open_ = n;
    open_remaining_ = static_cast<int64_t>(max);
    open_until_ = now + wait;
    // A test's stand-in for an answer slower than `wait` (a loaded host): the request
    // stays open and its answer waits on the subscription for a later Fetch.
    if (!failpoint::Hit("nats.pull_answer_late").ok()) return OkStatus();
  }
  // Until the first message, the end of our request, or the wait: a request left open
  // (the connection was down) still answers into this inbox.
  Status error = OkStatus();
  while (out->size() == first) {
    const auto left = duration_cast<Millis>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) break;
    CONVERGE_ASSIGN_OR_RETURN(natsMsg * msg, Next(left.count()));
    if (msg == nullptr) break;
    Take(msg, out, &error);
    if (!error.ok() && out->size() == first) return error;
    if (open_ == 0 && out->size() == first) break;  // our request ended empty
  }
  if (out->size() == first) return error;
  // What arrived with the first message (a refusal read with them: asked again next time).
  (void)Drain(limit, out);
  return OkStatus();
}

Status NatsPull::Reply(natsConnection* nc, natsMsg* msg, const std::string& body) {
  const char* reply = natsMsg_GetReply(msg);
  if (reply == nullptr || *reply == '\0') {
    return FailedPreconditionError("NATS: a message without an ack subject");
  }
  return FromNats(natsConnection_PublishString(nc, reply, body.c_str()), "NATS settle");
}

}  // namespace converge::internal
