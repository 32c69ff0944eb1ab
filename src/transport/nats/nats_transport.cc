// Method: one cnats connection per NatsBroker, one long-lived JetStream context on it
// whose asynchronous-publish ack handler is the broker's. PublishBatch registers each
// message (by its natsMsg address, unique while in flight) with the batch it belongs to,
// publishes it with js_PublishMsgAsync (which blocks once max_in_flight are pending), and
// waits on the batch's condition variable until every message has its answer or
// publish_timeout passed; the handler files each answer with its batch. A message still
// unanswered at the deadline is unregistered and reported kDeadlineExceeded; its late
// answer (or cnats's own MaxWait timeout) then finds no registration and is dropped.
//
// A subscriber pulls from a durable consumer it created or updated, with a NatsPull (the
// pull protocol spoken directly: nats_pull.h says why not natsSubscription_Fetch), and
// settles by publishing to each message's ack subject. Each fetched message is held in a
// shared Held (the natsMsg and whether it was settled), which the delivery's handle
// carries; a ticker thread sends in-progress acks for held, unsettled messages every
// third of the shortest wait for an ack (AckWait, or a BackOff step where the consumer
// has them) until the visibility the consumer asked for runs out. Settle and the
// ticker take the Held's lock, so no in-progress ack follows an ack.
#include <nats/nats.h>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <condition_variable>
#include <future>
#include <list>
#include <map>
#include <mutex>
#include <set>
#include <string_view>
#include <thread>
#include <unordered_map>

#include <nlohmann/json.hpp>

#include "converge/failpoint.h"
#include "converge/nats.h"
#include "src/core/crypto.h"
#include "src/core/thread_name.h"
#include "src/transport/nats/nats_pull.h"

namespace converge {
namespace {

using std::chrono::duration_cast;
using std::chrono::nanoseconds;
using SteadyTime = std::chrono::steady_clock::time_point;

constexpr const char* kMsgIdHeader = "Nats-Msg-Id";
constexpr const char* kContentType = "application/cloudevents+json";

using internal::FromNats;
using internal::NatsPull;

tl::unexpected<Status> Fail(Status s) { return tl::unexpected<Status>(std::move(s)); }

int64_t Nanos(Millis m) { return duration_cast<nanoseconds>(m).count(); }

// A subject token or durable name: no whitespace, wildcards or separators beyond '.'.
bool ValidTokens(std::string_view s, bool dots_allowed) {
  if (s.empty() || s.front() == '.' || s.back() == '.') return false;
  for (size_t i = 0; i < s.size(); ++i) {
    char c = s[i];
    if (c <= ' ' || c == '*' || c == '>' || c == 127) return false;
    if (c == '.' && (!dots_allowed || (i > 0 && s[i - 1] == '.'))) return false;
  }
  return true;
}

// NatsOptions::startup_wait's bound: past it, a deadline's arithmetic would overflow long
// before anyone would wait so long for a cluster.
constexpr Millis kMaxStartupWait = std::chrono::hours(24);

template <class T>
bool ParseInt(std::string_view s, T* out) {
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), *out);
  return ec == std::errc() && p == s.data() + s.size();
}

struct NatsOptionsDeleter {
  void operator()(natsOptions* o) const { natsOptions_Destroy(o); }
};

}  // namespace

Result<NatsOptions> ParseNatsUri(std::string_view uri) {
  constexpr std::string_view kScheme = "nats://";
  if (uri.substr(0, kScheme.size()) != kScheme) {
    return Fail(
        InvalidArgumentError("a NATS URI starts with nats://, got '" + std::string(uri) + "'"));
  }
  NatsOptions o;
  std::string_view rest = uri.substr(kScheme.size());
  std::string_view query;
  if (size_t q = rest.find('?'); q != std::string_view::npos) {
    query = rest.substr(q + 1);
    rest = rest.substr(0, q);
  }
  while (!rest.empty()) {
    size_t comma = rest.find(',');
    std::string_view host = rest.substr(0, comma);
    if (host.substr(0, kScheme.size()) == kScheme) host = host.substr(kScheme.size());
    if (host.empty() || host.find_first_of("/ ") != std::string_view::npos) {
      return Fail(InvalidArgumentError("NATS URI '" + std::string(uri) + "': bad server '" +
                                       std::string(host) + "'"));
    }
    o.servers.push_back("nats://" + std::string(host));
    if (comma == std::string_view::npos) break;
    rest = rest.substr(comma + 1);
  }
  if (o.servers.empty())
    return Fail(InvalidArgumentError("NATS URI '" + std::string(uri) + "': no server"));
  while (!query.empty()) {
    size_t amp = query.find('&');
    std::string_view kv = query.substr(0, amp);
    query = amp == std::string_view::npos ? std::string_view() : query.substr(amp + 1);
    size_t eq = kv.find('=');
    std::string_view k = kv.substr(0, eq);
    std::string_view v = eq == std::string_view::npos ? std::string_view() : kv.substr(eq + 1);
    int64_t n = 0;
    bool num = ParseInt(v, &n) && n > 0;
    auto bad = [&] {
      return InvalidArgumentError("NATS URI: bad value '" + std::string(v) + "' for '" +
                                  std::string(k) + "'");
    };
    if (k == "stream") {
      if (!ValidTokens(v, false)) return Fail(bad());
      o.stream = v;
    } else if (k == "prefix") {
      if (!ValidTokens(v, true)) return Fail(bad());
      o.subject_prefix = v;
    } else if (k == "replicas") {
      if (!num || n > 5) return Fail(bad());
      o.replicas = static_cast<int>(n);
    } else if (k == "duplicate_window_ms") {
      if (!num) return Fail(bad());
      o.duplicate_window = Millis(n);
    } else if (k == "in_flight") {
      if (!num) return Fail(bad());
      o.max_in_flight = n;
    } else if (k == "publish_timeout_ms") {
      if (!num) return Fail(bad());
      o.publish_timeout = Millis(n);
    } else if (k == "startup_wait_ms") {
      if (!ParseInt(v, &n) || n < 0 || Millis(n) > kMaxStartupWait) return Fail(bad());
      o.startup_wait = Millis(n);
    } else {
      return Fail(InvalidArgumentError("NATS URI: unknown setting '" + std::string(k) +
                                       "' (stream, prefix, replicas, duplicate_window_ms, "
                                       "in_flight, publish_timeout_ms, startup_wait_ms)"));
    }
  }
  return o;
}

Millis NatsAckWaitOf(const NatsSubscription& sub, int64_t delivery) {
  if (sub.backoff.empty()) return sub.ack_wait;
  // NATS: delivery n (1-based) waits BackOff[n - 1], the last step repeating.
  return sub.backoff[std::min<size_t>(static_cast<size_t>(delivery - 1), sub.backoff.size() - 1)];
}

Millis NatsRedeliveryHorizon(const NatsSubscription& sub, const ConsumerOptions& consumer) {
  // Delivery n is held by in-progress acks for up to the consumer's visibility, and the
  // server starts its AckWait (or BackOff step) only from the last of them: visibility +
  // wait, not the larger of the two. Between deliveries, a nak may wait up to
  // backoff_max.
  Millis total{0};
  for (int64_t n = 1; n <= sub.max_deliver; ++n) {
    total += consumer.visibility + NatsAckWaitOf(sub, n);
  }
  return total + consumer.backoff_max * std::max<int64_t>(0, sub.max_deliver - 1);
}

Status ValidateNatsRetention(const NatsSubscription& sub, const ConsumerOptions& consumer) {
  if (sub.max_deliver <= consumer.max_attempts) {
    return InvalidArgumentError(
        "NATS consumer '" + sub.consumer + "': MaxDeliver " + std::to_string(sub.max_deliver) +
        " must exceed the consumer's max_attempts " + std::to_string(consumer.max_attempts) +
        ", or the server drops a message before the consumer dead-letters it");
  }
  Millis waits{0};
  for (int64_t n = 1; n <= sub.max_deliver; ++n) waits += NatsAckWaitOf(sub, n);
  const Millis horizon = NatsRedeliveryHorizon(sub, consumer);
  // The original message until it is applied or parked, the replay window, then the
  // replayed copy: it reaches every consumer of the subject (those that applied the event
  // long ago included) and is redelivered on the same schedule.
  const Millis needed = horizon + consumer.replay_window + horizon;
  if (consumer.inbox_ttl > needed) return OkStatus();
  auto ms = [](Millis m) { return std::to_string(m.count()) + " ms"; };
  return InvalidArgumentError(
      "NATS consumer '" + sub.consumer + "': inbox TTL " + ms(consumer.inbox_ttl) +
      " must exceed the redelivery horizon " + ms(horizon) + " (MaxDeliver " +
      std::to_string(sub.max_deliver) + " x visibility " + ms(consumer.visibility) +
      " + AckWait/BackOff waits " + ms(waits) + " (AckWait " + ms(sub.ack_wait) + ", " +
      std::to_string(sub.backoff.size()) + " BackOff steps) + " +
      std::to_string(std::max<int64_t>(0, sub.max_deliver - 1)) + " nak delays of up to " +
      ms(consumer.backoff_max) + ") + the dead-letter replay window " +
      ms(consumer.replay_window) + " + the replayed copy's horizon " + ms(horizon) + " = " +
      ms(needed) + ": a late redelivery would be applied again");
}

// ---------------------------------------------------------------------------------------

namespace {

// What one PublishBatch waits for.
struct Batch {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<Status> results;
  std::vector<bool> answered;
  size_t pending = 0;      // not answered yet
  size_t outstanding = 0;  // handed to cnats and not answered yet
};

struct Registration {
  std::shared_ptr<Batch> batch;
  size_t index = 0;
};

}  // namespace

struct NatsBroker::Impl {
  NatsOptions options;
  Metrics* metrics = nullptr;
  natsConnection* nc = nullptr;
  jsCtx* js = nullptr;
  natsSubscription* advisories = nullptr;

  std::mutex reg_mu;
  std::unordered_map<natsMsg*, Registration> registered;

  std::atomic<int64_t> published{0}, duplicates{0}, publish_errors{0}, max_deliveries{0},
      in_progress_sent{0}, terminated{0}, abandoned{0}, lost_notices{0},
      consumers_missing{0};

  // Set once the advisory subscription's delivery thread has returned from its last
  // OnAdvisory (OnAdvisoriesDone, which owns the promise).
  std::future<void> advisories_done;
  // Whether js_PublishMsgAsync ever accepted a message: until then cnats may have no list
  // of pending publishes (it is made at the first call, and dropped again when that call
  // fails to subscribe for the answers), and js_PublishAsyncGetPendingList crashes on a
  // missing list; once one call succeeded, the list stays.
  std::atomic<bool> published_async{false};

  // cnats runs OnAdvisory and OnAck on its own threads with this object as their closure,
  // and does not join those threads when a subscription or the connection closes: a
  // callback already running (or one whose message had just been taken off the queue)
  // would go on into freed memory. Each is waited out before anything is freed.
  ~Impl() {
    if (advisories != nullptr) {
      (void)natsSubscription_Unsubscribe(advisories);
      if (advisories_done.valid()) advisories_done.wait();
      natsSubscription_Destroy(advisories);
    }
    if (js != nullptr && published_async.load()) {
      // Publishes no ack came for (their batches gave up waiting) are taken back, so no
      // callback runs for them any more; cnats counts a callback as pending until it has
      // returned, so the wait below ends when the last one running has.
      natsMsgList unanswered{};
      if (js_PublishAsyncGetPendingList(&unanswered, js) == NATS_OK) {
        natsMsgList_Destroy(&unanswered);
      }
      (void)js_PublishAsyncComplete(js, nullptr);
    }
    if (nc != nullptr) {
      natsConnection_FlushTimeout(nc, 5000);
      natsConnection_Close(nc);
    }
    if (js != nullptr) jsCtx_Destroy(js);
    if (nc != nullptr) natsConnection_Destroy(nc);
  }

  void Count(const char* name, const std::string& help, double v = 1,
             const Metrics::Labels& labels = {}) {
    if (metrics == nullptr) return;
    metrics->Describe(name, "counter", help);
    metrics->Add(name, labels, v);
  }

  static void OnAck(jsCtx*, natsMsg* msg, jsPubAck* pa, jsPubAckErr* pae, void* closure) {
    auto* self = static_cast<Impl*>(closure);
    Registration reg;
    {
      std::lock_guard<std::mutex> l(self->reg_mu);
      auto it = self->registered.find(msg);
      if (it != self->registered.end()) {
        reg = std::move(it->second);
        self->registered.erase(it);
      }
    }
    Status st = OkStatus();
    // An ack that fails although the stream stored the message (its answer lost in a
    // leader election, say): tests force one here.
    Status injected = pa != nullptr ? failpoint::Hit("nats.ack_answer") : OkStatus();
    if (!injected.ok()) {
      self->publish_errors.fetch_add(1);
      st = std::move(injected);
    } else if (pa != nullptr) {
      self->published.fetch_add(1);
      if (pa->Duplicate) {
        self->duplicates.fetch_add(1);
        self->Count("converge_nats_publish_duplicates_total",
                    "Publishes the stream dropped as duplicates inside its window");
      }
    } else {
      self->publish_errors.fetch_add(1);
      st = FromNats(pae != nullptr ? pae->Err : NATS_ERR, "publish",
                    pae != nullptr ? pae->ErrCode : static_cast<jsErrCode>(0));
      if (st.code() == StatusCode::kInvalidArgument || st.code() == StatusCode::kNotFound) {
        st = UnavailableError(st.message());  // the stream refused: try again later
      }
      if (pae != nullptr && pae->ErrText != nullptr) {
        st = Status(st.code(), st.message() + ": " + pae->ErrText);
      }
    }
    natsMsg_Destroy(msg);
    if (reg.batch == nullptr) return;  // its batch gave up waiting
    std::lock_guard<std::mutex> l(reg.batch->mu);
    if (reg.batch->answered[reg.index]) return;
    reg.batch->results[reg.index] = std::move(st);
    reg.batch->answered[reg.index] = true;
    --reg.batch->outstanding;
    --reg.batch->pending;
    reg.batch->cv.notify_all();  // the end of the batch, or room in its window
  }

  static void OnAdvisory(natsConnection*, natsSubscription*, natsMsg* msg, void* closure) {
    auto* self = static_cast<Impl*>(closure);
    // A broker destroyed while this runs waits for it (tests/nats pause here).
    (void)failpoint::Hit("nats.on_advisory");
    self->max_deliveries.fetch_add(1);
    // $JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<consumer>
    std::string subject = natsMsg_GetSubject(msg);
    std::string consumer = subject.substr(subject.rfind('.') + 1);
    self->Count("converge_nats_max_deliveries_total",
                "Messages the server stopped redelivering (MAX_DELIVERIES advisories)", 1,
                {{"consumer", consumer}});
    natsMsg_Destroy(msg);
  }

  // Called by cnats once the advisory subscription is closed and its last OnAdvisory has
  // returned; `closure` is a std::promise<void> of its own.
  static void OnAdvisoriesDone(void* closure) {
    auto* done = static_cast<std::promise<void>*>(closure);
    done->set_value();
    delete done;
  }

  // The stream that keeps the MAX_DELIVERIES advisories of the event stream's consumers:
  // an advisory is a plain NATS message, lost when no subscriber listens at that moment;
  // stored, it waits for the consumer that must park the abandoned message.
  std::string AdvisoryStream() const { return options.stream + "_ADVISORIES"; }
  std::string AdvisorySubject(const std::string& consumer) const {
    return "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES." + options.stream + "." + consumer;
  }

  // An add answered with an overlap of subjects or "not found", or a request not
  // answered in time, is tried this many times, waiting a growing multiple of the wait
  // between tries (ProvisionStream): 1.5 s of waits in all, plus each request's own (up
  // to the JetStream context's 10 s, twice where an add is followed by an update).
  static constexpr int kProvisionAttempts = 6;
  // For a stream another process is adding (ProvisionStream): 4.5 s of waits in all, as
  // a busy host may take seconds to set it up (1.5 s were too few, audit, session 44).
  static constexpr int kOverlapAttempts = 10;
  static constexpr Millis kProvisionRetryWait = Millis(100);

  // While its cluster forms (the nodes start together with the services, or come back
  // after most of them were down), JetStream answers "temporarily unavailable" (10008:
  // no meta leader; nats-server 2.9.10 answers so once a node has been without one for
  // 10 s, and before that leaves requests unanswered, to time out), and the add of a
  // stream with more replicas than nodes up "no suitable peers for placement" (10005). A
  // request so answered is made again every kFormingWait until `deadline` (Connect's or
  // Subscribe's start plus options.startup_wait), and its last answer returned. Sets
  // `*err` as the request does.
  static constexpr Millis kFormingWait = Millis(250);
  template <typename Request>
  static natsStatus WhileClusterForms(SteadyTime deadline, jsErrCode* err, Request request) {
    for (;;) {
      *err = static_cast<jsErrCode>(0);
      const natsStatus s = request();
      if (s == NATS_OK || (*err != JSClusterNotAvailErr && *err != JSClusterNoPeersErr) ||
          std::chrono::steady_clock::now() + kFormingWait > deadline) {
        return s;
      }
      std::this_thread::sleep_for(kFormingWait);
    }
  }

  // The error of a request still answered 10008 or 10005 after the startup wait, saying
  // so; any other error `st` as it is.
  Status AfterForming(Status st, jsErrCode err) const {
    const std::string waited = "; still so after startup_wait_ms=" +
                               std::to_string(options.startup_wait.count());
    if (err == JSClusterNotAvailErr) {
      return UnavailableError(st.message() + waited + " (are most of the cluster's nodes up?)");
    }
    if (err == JSClusterNoPeersErr) {
      return FailedPreconditionError(st.message() + waited + " (are " +
                                     std::to_string(options.replicas) + " nodes up?)");
    }
    return st;
  }

  // Adds the durable consumer `cfg` to `stream`, or updates it when one of that name is
  // there (another process of the same consumer added it first, or with other settings).
  // A request not answered in time is made again, kProvisionAttempts tries in all (adding
  // a consumer with the settings it has succeeds, so a try whose answer was lost does no
  // harm); each waits out a forming cluster until `deadline`.
  Status AddConsumer(const std::string& stream, jsConsumerConfig& cfg, SteadyTime deadline,
                     const std::string& what) {
    natsStatus s = NATS_OK;
    jsErrCode err = static_cast<jsErrCode>(0);
    for (int attempt = 1;; ++attempt) {
      jsConsumerInfo* ci = nullptr;
      s = WhileClusterForms(deadline, &err, [&] {
        return js_AddConsumer(&ci, js, stream.c_str(), &cfg, nullptr, &err);
      });
      if (s != NATS_OK && err == JSConsumerNameExistErr) {
        s = WhileClusterForms(deadline, &err, [&] {
          return js_UpdateConsumer(&ci, js, stream.c_str(), &cfg, nullptr, &err);
        });
      }
      if (ci != nullptr) jsConsumerInfo_Destroy(ci);
      if (s == NATS_OK) return OkStatus();
      if (s != NATS_TIMEOUT || attempt == kProvisionAttempts) break;
      std::this_thread::sleep_for(kProvisionRetryWait * attempt);
    }
    return AfterForming(FromNats(s, what, err), err);
  }

  Status ProvisionStreams() {
    const SteadyTime deadline = std::chrono::steady_clock::now() + options.startup_wait;
    CONVERGE_RETURN_IF_ERROR(ProvisionStream(options.stream, options.subject_prefix + ".>",
                                             options.duplicate_window, deadline));
    return ProvisionStream(AdvisoryStream(), AdvisorySubject("*"), options.duplicate_window,
                           deadline);
  }

  Status ProvisionStream(const std::string& name, const std::string& subjects,
                         Millis duplicates, SteadyTime deadline) {
    const char* subject_list[] = {subjects.c_str()};
    jsStreamConfig cfg;
    jsStreamConfig_Init(&cfg);
    cfg.Name = name.c_str();
    cfg.Subjects = subject_list;
    cfg.SubjectsLen = 1;
    cfg.Storage = js_FileStorage;
    cfg.Duplicates = Nanos(duplicates);
    cfg.Replicas = options.replicas;
    // Processes that start together (a relay and its workers) add the same stream at
    // once. A single server may answer the one that loses with "subjects overlap with an
    // existing stream" (10065), the overlap being with that very stream (a worker of a
    // test exited on it, NatsProcesses, 2026-12-04), and a cluster with "stream not found"
    // (10059) while the winner's stream has no leader yet (nats-server before 2.10.2),
    // or not at all within the request's wait while it creates the others' streams
    // (eight replicated streams at once on two busy cores, NatsClusterStreams). Each is
    // tried again, as an add: once the other process's stream is there, adding
    // it with the same settings succeeds, and with others is "name already in use"
    // (10058), updated then. An update at the first answer could reach the stream while
    // the server still sets it up. An overlap still there after the tries is with a
    // stream of another name, and that is the error.
    natsStatus s = NATS_OK;
    jsErrCode err = static_cast<jsErrCode>(0);
    for (int attempt = 1;; ++attempt) {
      jsStreamInfo* si = nullptr;
      s = WhileClusterForms(deadline, &err,
                            [&] { return js_AddStream(&si, js, &cfg, nullptr, &err); });
      const jsErrCode add_err = err;
      if (s != NATS_OK && add_err == JSStreamNameExistErr) {
        s = WhileClusterForms(deadline, &err,
                              [&] { return js_UpdateStream(&si, js, &cfg, nullptr, &err); });
      }
      if (si != nullptr) jsStreamInfo_Destroy(si);
      if (s == NATS_OK) return OkStatus();
      const bool again = add_err == JSStreamSubjectOverlapErr || add_err == JSStreamNotFoundErr ||
                         s == NATS_TIMEOUT;
      const int limit = s == NATS_TIMEOUT ? kProvisionAttempts : kOverlapAttempts;
      if (!again || attempt >= limit) break;
      std::this_thread::sleep_for(kProvisionRetryWait * attempt);
    }
    Status st = FromNats(s, "provisioning stream '" + name + "'", err);
    if (err == JSClusterNotAvailErr || err == JSClusterNoPeersErr) return AfterForming(st, err);
    if (err != 0) return FailedPreconditionError(st.message());
    return st;
  }
};

NatsBroker::NatsBroker(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
NatsBroker::~NatsBroker() = default;

Result<std::unique_ptr<NatsBroker>> NatsBroker::Connect(NatsOptions options, Metrics* metrics) {
  if (options.servers.empty()) return Fail(InvalidArgumentError("NATS: no server given"));
  if (!ValidTokens(options.stream, false) || !ValidTokens(options.subject_prefix, true)) {
    return Fail(InvalidArgumentError("NATS: stream '" + options.stream + "' or subject prefix '" +
                                     options.subject_prefix + "' is not a valid name"));
  }
  if (options.replicas < 1 || options.max_in_flight < 1 || options.publish_timeout <= Millis(0) ||
      options.duplicate_window <= Millis(0)) {
    return Fail(InvalidArgumentError(
        "NATS: replicas, in-flight window, publish timeout and duplicate window must be "
        "positive"));
  }
  if (options.startup_wait < Millis(0) || options.startup_wait > kMaxStartupWait) {
    return Fail(InvalidArgumentError("NATS: the startup wait must be 0 to a day"));
  }
  auto impl = std::make_unique<Impl>();
  impl->options = std::move(options);
  impl->metrics = metrics;

  natsOptions* raw = nullptr;
  if (natsOptions_Create(&raw) != NATS_OK) return Fail(UnavailableError("NATS: out of memory"));
  std::unique_ptr<natsOptions, NatsOptionsDeleter> opts(raw);
  std::vector<const char*> servers;
  for (const std::string& s : impl->options.servers) servers.push_back(s.c_str());
  natsStatus s =
      natsOptions_SetServers(opts.get(), servers.data(), static_cast<int>(servers.size()));
  // Reconnect for ever (a cluster node restarts; a single server comes back): publishes
  // and acks wait in the reconnect buffer, and what times out is retried by its caller.
  if (s == NATS_OK) s = natsOptions_SetMaxReconnect(opts.get(), -1);
  if (s == NATS_OK) s = natsOptions_SetReconnectWait(opts.get(), 200);
  if (s == NATS_OK) s = natsOptions_SetReconnectBufSize(opts.get(), 64 * 1024 * 1024);
  if (s == NATS_OK) s = natsOptions_SetTimeout(opts.get(), 5000);
  if (s != NATS_OK) return Fail(FromNats(s, "NATS options"));
  s = natsConnection_Connect(&impl->nc, opts.get());
  if (s != NATS_OK) {
    impl->nc = nullptr;
    return Fail(UnavailableError("NATS: cannot connect to " + impl->options.servers.front() + ": " +
                                 natsStatus_GetText(s)));
  }
  jsOptions jo;
  jsOptions_Init(&jo);
  jo.Wait = 10000;
  jo.PublishAsync.MaxPending = impl->options.max_in_flight;
  jo.PublishAsync.AckHandler = &Impl::OnAck;
  jo.PublishAsync.AckHandlerClosure = impl.get();
  jo.PublishAsync.StallWait = impl->options.publish_timeout.count();
  s = natsConnection_JetStream(&impl->js, impl->nc, &jo);
  if (s != NATS_OK) return Fail(FromNats(s, "NATS: JetStream context"));
  Status st = impl->ProvisionStreams();
  if (!st.ok()) return Fail(st);
  const std::string advisory =
      "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES." + impl->options.stream + ".*";
  s = natsConnection_Subscribe(&impl->advisories, impl->nc, advisory.c_str(), &Impl::OnAdvisory,
                               impl.get());
  if (s != NATS_OK) return Fail(FromNats(s, "NATS: subscribing to advisories"));
  // (Were the connection closed for good between the two calls, by a server error cnats
  // does not reconnect after, this fails and ~Impl cannot wait for an OnAdvisory running
  // then: a window of microseconds, left open.)
  auto done = std::make_unique<std::promise<void>>();
  std::future<void> advisories_done = done->get_future();
  s = natsSubscription_SetOnCompleteCB(impl->advisories, &Impl::OnAdvisoriesDone, done.get());
  if (s != NATS_OK) return Fail(FromNats(s, "NATS: subscribing to advisories"));
  (void)done.release();  // OnAdvisoriesDone deletes it
  impl->advisories_done = std::move(advisories_done);
  // cnats sends the SUB without waiting: an advisory published right after Connect
  // returned could reach the server before it and be dropped (CI, session 43, in a test
  // that publishes one). The round trip makes the server hold the subscription first.
  // A connection lost meanwhile resends the SUB first when it is back, as it did before
  // this flush: not a failure of Connect.
  s = natsConnection_FlushTimeout(impl->nc, jo.Wait);
  if (s != NATS_OK && s != NATS_CONNECTION_DISCONNECTED) {
    return Fail(FromNats(s, "NATS: subscribing to advisories"));
  }
  return std::unique_ptr<NatsBroker>(new NatsBroker(std::move(impl)));
}

std::string NatsBroker::SubjectFor(std::string_view type) const {
  return impl_->options.subject_prefix + "." + std::string(type);
}

const NatsOptions& NatsBroker::options() const { return impl_->options; }

NatsStats NatsBroker::stats() const {
  NatsStats s;
  s.published = impl_->published.load();
  s.duplicates = impl_->duplicates.load();
  s.publish_errors = impl_->publish_errors.load();
  s.max_deliveries = impl_->max_deliveries.load();
  s.in_progress_sent = impl_->in_progress_sent.load();
  s.terminated = impl_->terminated.load();
  s.abandoned = impl_->abandoned.load();
  s.abandoned_gone = impl_->lost_notices.load();
  s.consumers_missing = impl_->consumers_missing.load();
  return s;
}

Status NatsBroker::Flush(Millis timeout) {
  return FromNats(natsConnection_FlushTimeout(impl_->nc, timeout.count()), "NATS flush");
}

Result<int64_t> NatsBroker::Unsettled(const std::string& consumer) {
  jsConsumerInfo* ci = nullptr;
  jsErrCode err = static_cast<jsErrCode>(0);
  natsStatus s = js_GetConsumerInfo(&ci, impl_->js, impl_->options.stream.c_str(), consumer.c_str(),
                                    nullptr, &err);
  if (s != NATS_OK) return Fail(FromNats(s, "NATS: consumer info of '" + consumer + "'", err));
  const int64_t n = ci->NumAckPending + static_cast<int64_t>(ci->NumPending);
  jsConsumerInfo_Destroy(ci);
  return n;
}

Status NatsBroker::Requeue(Tx&, const DeadLetter& letter) {
  Event e;
  // A message id of its own for every replay attempt (docs/design/nats.md, "Replaying a
  // dead letter"): an attempt whose transaction fails after this publish leaves a copy
  // that every consumer absorbs (the letter's consumer too: its mark was not lifted), and
  // the next attempt must not be dropped by the stream as that copy's duplicate.
  e.id = letter.event_id + ":replay:" + std::to_string(letter.replay_count) + ":" +
         internal::RandomHex(8);
  e.type = letter.type;
  e.subject = letter.event_id;
  e.envelope = letter.envelope;
  return Publish(e);
}

Status NatsBroker::Publish(const Event& event) {
  return PublishBatch(std::span<const Event>(&event, 1)).front();
}

std::vector<Status> NatsBroker::PublishBatch(std::span<const Event> events) {
  auto batch = std::make_shared<Batch>();
  batch->results.assign(events.size(), OkStatus());
  batch->answered.assign(events.size(), false);
  batch->pending = events.size();
  auto answer = [&](size_t i, Status st) {
    std::lock_guard<std::mutex> l(batch->mu);
    batch->results[i] = std::move(st);
    batch->answered[i] = true;
    --batch->pending;
  };
  jsPubOptions po;
  jsPubOptions_Init(&po);
  po.MaxWait = impl_->options.publish_timeout.count();
  // Subjects (aggregates) an event of which could not be sent: their later events are not
  // sent either, or the stream would hold them before the one that failed, which the relay
  // publishes again next pass. (An event whose ack fails after a later one of its subject
  // was sent can still be overtaken: docs/design/nats.md, "Order per aggregate".)
  std::set<std::string_view> unsent;
  auto not_sent = [&](size_t i, Status st) {
    if (st.transient()) unsent.insert(events[i].subject);
    impl_->publish_errors.fetch_add(1);
    answer(i, std::move(st));
  };
  // The same for an earlier event sent in this batch whose failure has come back by the
  // time the next of its subject is sent. That next one waits first until the window has
  // room (cnats would block it there, and an ack that failed meanwhile would go unseen):
  // with max_in_flight = 1 and one batch at a time on the broker, an aggregate's next
  // event is sent only once its earlier one was acked.
  std::map<std::string_view, std::vector<size_t>> sent;
  auto an_earlier_one_failed = [&](std::string_view subject) {
    auto it = sent.find(subject);
    if (it == sent.end()) return false;
    std::unique_lock<std::mutex> l(batch->mu);
    // Past publish_timeout cnats answers every message itself (MaxWait).
    batch->cv.wait_for(l, impl_->options.publish_timeout + std::chrono::seconds(1), [&] {
      return batch->outstanding < static_cast<size_t>(impl_->options.max_in_flight);
    });
    for (size_t j : it->second) {
      if (batch->answered[j] && batch->results[j].transient()) return true;
    }
    return false;
  };
  for (size_t i = 0; i < events.size(); ++i) {
    const Event& e = events[i];
    if (!unsent.count(e.subject) && an_earlier_one_failed(e.subject)) unsent.insert(e.subject);
    if (unsent.count(e.subject)) {
      answer(i, Status(StatusCode::kAborted,
                       "not published: an earlier event of subject '" + e.subject +
                           "' failed in this batch",
                       reason::kNotAttempted));
      continue;
    }
    if (e.envelope.empty() || e.id.empty()) {
      answer(i, InvalidArgumentError("NATS publish: event without an id or envelope"));
      continue;
    }
    if (!ValidTokens(e.type, true)) {
      answer(i, InvalidArgumentError("NATS publish: event type '" + e.type +
                                     "' is not a valid subject (no spaces, '*' or '>')"));
      continue;
    }
    const std::string subject = SubjectFor(e.type);
    natsMsg* msg = nullptr;
    natsStatus s = natsMsg_Create(&msg, subject.c_str(), nullptr, e.envelope.data(),
                                  static_cast<int>(e.envelope.size()));
    if (s == NATS_OK) s = natsMsgHeader_Set(msg, "Content-Type", kContentType);
    if (s != NATS_OK) {
      natsMsg_Destroy(msg);
      not_sent(i, FromNats(s, "NATS publish"));
      continue;
    }
    // A send that fails (tests/nats/nats_transport_test.cc forces one here).
    if (Status injected = failpoint::Hit("nats.before_publish_async"); !injected.ok()) {
      natsMsg_Destroy(msg);
      not_sent(i, std::move(injected));
      continue;
    }
    po.MsgId = e.id.c_str();
    {
      std::lock_guard<std::mutex> l(impl_->reg_mu);
      impl_->registered[msg] = Registration{batch, i};
    }
    {
      std::lock_guard<std::mutex> l(batch->mu);
      ++batch->outstanding;  // before the send: its ack may come back before the call does
    }
    natsMsg* handed = msg;
    s = js_PublishMsgAsync(impl_->js, &handed, &po);
    if (s == NATS_OK) impl_->published_async.store(true);
    if (s != NATS_OK) {
      // Not sent: the message is still ours (handed is not cleared on failure).
      {
        std::lock_guard<std::mutex> l(impl_->reg_mu);
        impl_->registered.erase(msg);
      }
      {
        std::lock_guard<std::mutex> l(batch->mu);
        --batch->outstanding;
      }
      natsMsg_Destroy(handed);
      not_sent(i, FromNats(s, "NATS publish"));
      continue;
    }
    sent[e.subject].push_back(i);
  }
  std::unique_lock<std::mutex> l(batch->mu);
  // Past publish_timeout cnats answers the message itself (MaxWait); the margin covers
  // its timer's granularity.
  const auto deadline =
      std::chrono::steady_clock::now() + impl_->options.publish_timeout + std::chrono::seconds(1);
  batch->cv.wait_until(l, deadline, [&] { return batch->pending == 0; });
  if (batch->pending > 0) {
    l.unlock();
    {
      std::lock_guard<std::mutex> rl(impl_->reg_mu);
      for (auto it = impl_->registered.begin(); it != impl_->registered.end();) {
        it = it->second.batch == batch ? impl_->registered.erase(it) : std::next(it);
      }
    }
    l.lock();
    for (size_t i = 0; i < events.size(); ++i) {
      if (batch->answered[i]) continue;
      batch->results[i] =
          DeadlineExceededError("NATS publish: no ack within " +
                                std::to_string(impl_->options.publish_timeout.count()) + " ms");
      batch->answered[i] = true;
    }
    batch->pending = 0;
  }
  return batch->results;
}

// ---------------------------------------------------------------------------------------

namespace {

// A fetched message: settled once, kept alive by in-progress acks until then.
struct Held {
  std::mutex mu;
  natsMsg* msg = nullptr;
  bool settled = false;
  SteadyTime hold_until;
  ~Held() { natsMsg_Destroy(msg); }
};
using HeldPtr = std::shared_ptr<Held>;

class NatsSubscriber : public Subscriber {
 public:
  // `notices`: pulls this consumer's stored MAX_DELIVERIES advisories.
  NatsSubscriber(NatsBroker::Impl* broker, NatsSubscription sub, std::unique_ptr<NatsPull> pull,
                 std::unique_ptr<NatsPull> notices)
      : broker_(broker),
        sub_(std::move(sub)),
        pull_(std::move(pull)),
        notices_(std::move(notices)),
        queue_(std::string(kNatsQueuePrefix) + sub_.consumer) {
    ticker_ = std::thread([this] {
      converge::internal::NameThisThread("cv-nats-tick");
      Tick();
    });
  }

  ~NatsSubscriber() override {
    {
      std::lock_guard<std::mutex> l(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    ticker_.join();
  }

  Result<std::vector<Delivery>> Fetch(size_t max, Millis visibility) override {
    const SteadyTime now = std::chrono::steady_clock::now();
    const SteadyTime hold_until = now + visibility;
    std::vector<Delivery> out;
    // Notices of abandoned messages first, looked for at most once per kNoticePoll: the
    // server gives up on a message rarely, and it waits in its stream meanwhile. (Tests
    // that make the server give up turn the look off with an error at
    // nats.before_notice_look, so that the fetcher cannot take the notice itself.)
    {
      std::unique_lock<std::mutex> nl(notice_mu_, std::try_to_lock);
      if (nl.owns_lock() && now >= next_notice_poll_ &&
          failpoint::Hit("nats.before_notice_look").ok()) {
        next_notice_poll_ = now + kNoticePoll;
        TakeNotices(max, hold_until, &out);
      }
    }
    if (!out.empty()) return out;
    std::vector<natsMsg*> msgs;
    Status st;
    {
      std::lock_guard<std::mutex> fl(fetch_mu_);
      st = pull_->Fetch(max, sub_.fetch_wait, /*no_wait=*/false, &msgs);
      // Not even a 408 at the request's expiry: the consumer may be gone.
      if (st.ok() && msgs.empty() && pull_->answer_pending()) st = CheckConsumerExists(now);
      // A request that was waiting when the consumer was deleted is refused with a 409
      // instead: the same condition, asked about at once (it may have come back since).
      if (!st.ok() && msgs.empty() &&
          st.message().find("409 Consumer Deleted") != std::string::npos) {
        next_presence_check_ = SteadyTime{};
        Status gone = CheckConsumerExists(now);
        if (!gone.ok()) st = std::move(gone);
      }
    }
    if (msgs.empty()) {
      if (!st.ok()) return Fail(st);
      return out;
    }
    out.reserve(msgs.size());
    for (natsMsg* msg : msgs) {
      jsMsgMetaData* meta = nullptr;
      uint64_t stream_seq = 0;
      int64_t attempts = 1;
      if (natsMsg_GetMetaData(&meta, msg) == NATS_OK) {
        stream_seq = meta->Sequence.Stream;
        attempts = static_cast<int64_t>(meta->NumDelivered);
        jsMsgMetaData_Destroy(meta);
      }
      Delivery d = DeliveryOf(msg, stream_seq);
      d.attempts = attempts;
      d.handle = DeliveryHandle(Hold(msg, hold_until));
      out.push_back(std::move(d));
    }
    return out;
  }

  Status Extend(std::span<const Delivery> deliveries, Millis visibility) override {
    const SteadyTime hold_until = std::chrono::steady_clock::now() + visibility;
    std::vector<HeldPtr> again;
    for (const Delivery& d : deliveries) {
      const HeldPtr* held = d.handle.As<HeldPtr>();
      if (held == nullptr) {
        return InvalidArgumentError("Extend: a delivery this NATS subscriber did not hand out");
      }
      std::lock_guard<std::mutex> hl((*held)->mu);
      if ((*held)->settled) continue;
      (*held)->hold_until = hold_until;
      // At once, in case the ticker had let it go and its AckWait is running out.
      if (NatsPull::Reply(broker_->nc, (*held)->msg, "+WPI").ok()) {
        broker_->in_progress_sent.fetch_add(1);
      }
      again.push_back(*held);
    }
    std::lock_guard<std::mutex> l(mu_);
    for (HeldPtr& h : again) Track(std::move(h));
    return OkStatus();
  }

  Status Settle(std::span<const Delivery> deliveries,
                std::span<const Settlement> settlements) override {
    if (deliveries.size() != settlements.size()) {
      return InvalidArgumentError("Settle: deliveries and settlements differ in length");
    }
    for (const Delivery& d : deliveries) {
      if (d.handle.As<HeldPtr>() == nullptr) {
        return InvalidArgumentError("Settle: a delivery this NATS subscriber did not hand out");
      }
    }
    Status first = OkStatus();
    for (size_t i = 0; i < deliveries.size(); ++i) {
      const HeldPtr& held = *deliveries[i].handle.As<HeldPtr>();
      const Settlement& s = settlements[i];
      std::lock_guard<std::mutex> l(held->mu);
      if (held->settled) continue;
      std::string body;
      switch (s.kind) {
        case Settlement::Kind::kAck:
          body = "+ACK";
          break;
        case Settlement::Kind::kNak:
          body = s.delay.count() > 0 ? "-NAK {\"delay\":" + std::to_string(Nanos(s.delay)) + "}"
                                     : "-NAK";
          break;
        case Settlement::Kind::kTerm:
          body = "+TERM";
          break;
      }
      Status st = NatsPull::Reply(broker_->nc, held->msg, body);
      if (st.ok() && s.kind == Settlement::Kind::kTerm) broker_->terminated.fetch_add(1);
      held->settled = true;  // a failed ack is not retried: the redelivery is absorbed
      if (!st.ok() && first.ok()) first = st;
    }
    return first;
  }

 private:
  // Sends in-progress acks for held, unsettled messages until their visibility ends.
  void Tick() {
    // With BackOff, the server waits each delivery's step for an ack (NatsAckWaitOf), and
    // an in-progress ack restarts that wait: a third of AckWait alone let a step shorter
    // than it run out while the handler still ran, and the message was redelivered.
    Millis shortest = sub_.ack_wait;
    for (Millis step : sub_.backoff) shortest = std::min(shortest, step);
    const Millis period = std::max(Millis(20), shortest / 3);
    std::unique_lock<std::mutex> l(mu_);
    while (!stop_) {
      cv_.wait_for(l, period, [&] { return stop_; });
      if (stop_) break;
      std::vector<HeldPtr> live;
      live.swap(held_);
      l.unlock();
      const SteadyTime now = std::chrono::steady_clock::now();
      std::vector<HeldPtr> keep;
      for (HeldPtr& h : live) {
        std::lock_guard<std::mutex> hl(h->mu);
        if (h->settled || now >= h->hold_until) continue;
        if (NatsPull::Reply(broker_->nc, h->msg, "+WPI").ok()) {
          broker_->in_progress_sent.fetch_add(1);
        }
        keep.push_back(std::move(h));
      }
      l.lock();
      for (HeldPtr& h : keep) Track(std::move(h));
    }
  }

  static constexpr Millis kNoticePoll = std::chrono::seconds(2);
  static constexpr Millis kPresenceCheck = std::chrono::seconds(5);

  // REQUIRES: fetch_mu_ held. A request to a durable consumer that no longer exists (an
  // operator deleted it) gets no answer at all from nats-server, so this subscriber would
  // receive nothing, silently. After a request went unanswered, at most every
  // kPresenceCheck, asks the server whether the consumer is there: kFailedPrecondition
  // when it is not (nothing here recreates it: a new durable delivers the stream from its
  // start again). OK when it is there or the question found no answer.
  Status CheckConsumerExists(SteadyTime now) {
    if (now < next_presence_check_) return OkStatus();
    next_presence_check_ = now + kPresenceCheck;
    // A short wait: the Fetch (and a Stop behind it) waits for this answer, and a server
    // too slow to give it is not a missing consumer.
    jsOptions jo;
    jsOptions_Init(&jo);
    jo.Wait = 1000;
    jsConsumerInfo* ci = nullptr;
    jsErrCode err = static_cast<jsErrCode>(0);
    natsStatus s = js_GetConsumerInfo(&ci, broker_->js, broker_->options.stream.c_str(),
                                      sub_.consumer.c_str(), &jo, &err);
    if (ci != nullptr) jsConsumerInfo_Destroy(ci);
    if (s == NATS_OK || err != JSConsumerNotFoundErr) return OkStatus();
    broker_->consumers_missing.fetch_add(1);
    broker_->Count("converge_nats_consumer_missing_total",
                   "Fetches that found their durable consumer deleted from the stream", 1,
                   {{"consumer", sub_.consumer}});
    return FailedPreconditionError(
        "NATS: consumer '" + sub_.consumer + "' no longer exists on stream '" +
        broker_->options.stream +
        "' (deleted?): nothing is delivered to it. Restarting the worker creates it again, "
        "which delivers the stream from its start (the inbox absorbs what it remembers)");
  }

  // REQUIRES: mu_ held. Adds `h` to what the ticker keeps alive, once.
  void Track(HeldPtr h) {
    for (const HeldPtr& t : held_) {
      if (t == h) return;
    }
    held_.push_back(std::move(h));
  }

  // Holds `msg` (ours from now on) until settled or `hold_until`, in-progress acks going.
  HeldPtr Hold(natsMsg* msg, SteadyTime hold_until) {
    auto held = std::make_shared<Held>();
    held->msg = msg;
    held->hold_until = hold_until;
    std::lock_guard<std::mutex> l(mu_);
    held_.push_back(held);
    return held;
  }

  // The event `msg`, stored at `stream_seq`, carries (its envelope, Msg-Id and type),
  // without a handle. A message without a Msg-Id (a foreign publisher's) is named by its
  // place in the stream and its bytes instead: that copy is what a consumer parks a
  // message it cannot decode under, and two such messages must never share a name (the
  // second's park would be taken for a redelivery of the first and dropped).
  Delivery DeliveryOf(natsMsg* msg, uint64_t stream_seq) const {
    Delivery d;
    d.queue = queue_;
    const char* data = natsMsg_GetData(msg);
    d.event.envelope.assign(data != nullptr ? data : "",
                            static_cast<size_t>(natsMsg_GetDataLength(msg)));
    const char* id = nullptr;
    if (natsMsgHeader_Get(msg, kMsgIdHeader, &id) == NATS_OK && id != nullptr && *id != '\0') {
      d.event.id = id;
    } else {
      d.event.source = "nats:" + broker_->options.stream;
      d.event.id = "seq-" + std::to_string(stream_seq) + "-sha256-" +
                   internal::Sha256Hex(d.event.envelope).substr(0, 16);
    }
    std::string_view subject = natsMsg_GetSubject(msg) != nullptr ? natsMsg_GetSubject(msg) : "";
    const std::string& prefix = broker_->options.subject_prefix;
    if (subject.size() > prefix.size() + 1) d.event.type = subject.substr(prefix.size() + 1);
    return d;
  }

  // Turns stored MAX_DELIVERIES advisories of this consumer into notices: the abandoned
  // message, read back from the stream by its sequence, marked abandoned, whose handle
  // settles the advisory. An advisory whose message is no longer in the stream is acked
  // (nothing is left to park) and counted as an error.
  void TakeNotices(size_t max, SteadyTime hold_until, std::vector<Delivery>* out) {
    // A no-wait request is answered at once; the bound only caps what a slow answer costs
    // the Fetch (a late answer's notices come back on a later look).
    std::vector<natsMsg*> advisories;
    const Status st =
        notices_->Fetch(max, std::chrono::milliseconds(50), /*no_wait=*/true, &advisories);
    // An answer slower than that (a loaded host) is on its way: look again at the next
    // Fetch, not kNoticePoll later, or it waits here past the advisory consumer's AckWait
    // and the server hands the same notice out a second time.
    if (notices_->answer_pending()) next_notice_poll_ = std::chrono::steady_clock::now();
    if (!st.ok() && advisories.empty()) return;
    for (natsMsg* advisory : advisories) {
      uint64_t seq = 0;
      int64_t deliveries = 0;
      const char* data = natsMsg_GetData(advisory);
      auto doc = nlohmann::json::parse(
          std::string_view(data != nullptr ? data : "",
                           static_cast<size_t>(natsMsg_GetDataLength(advisory))),
          nullptr, /*allow_exceptions=*/false);
      if (doc.is_object()) {
        seq = doc.value("stream_seq", uint64_t{0});
        deliveries = doc.value("deliveries", int64_t{0});
      }
      natsMsg* original = nullptr;
      jsErrCode err = static_cast<jsErrCode>(0);
      natsStatus s = NATS_NOT_FOUND;
      if (seq != 0) {
        // A test's error here is JetStream's answer while it cannot serve the read.
        if (failpoint::Hit("nats.before_abandoned_read").ok()) {
          s = js_GetMsg(&original, broker_->js, broker_->options.stream.c_str(), seq, nullptr,
                        &err);
        } else {
          s = NATS_ERR;
          err = JSClusterNotAvailErr;
        }
      }
      if (s != NATS_OK) {
        // Acked only when the message is gone from the stream: nothing is left to park.
        // Any other failure (the server unreachable; JetStream without a meta leader or
        // the stream without one, answering with an error) leaves the advisory unacked,
        // to come back after its AckWait: acking it would lose the one record that the
        // server gave up on the message.
        if (s == NATS_NOT_FOUND || err == JSNoMessageFoundErr) {
          broker_->lost_notices.fetch_add(1);
          (void)NatsPull::Reply(broker_->nc, advisory, "+ACK");
        }
        natsMsg_Destroy(advisory);
        continue;
      }
      Delivery d = DeliveryOf(original, seq);
      natsMsg_Destroy(original);
      broker_->abandoned.fetch_add(1);
      d.attempts = deliveries;
      d.abandoned = true;
      d.handle = DeliveryHandle(Hold(advisory, hold_until));
      out->push_back(std::move(d));
    }
  }

  NatsBroker::Impl* broker_;
  const NatsSubscription sub_;
  const std::unique_ptr<NatsPull> pull_;
  const std::unique_ptr<NatsPull> notices_;
  const std::string queue_;
  std::mutex fetch_mu_;   // one Fetch pulls at a time
  std::mutex notice_mu_;  // one Fetch looks for notices at a time
  SteadyTime next_notice_poll_{};
  SteadyTime next_presence_check_{};  // guarded by fetch_mu_

  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::vector<HeldPtr> held_;
  std::thread ticker_;  // last: started once the rest is built
};

// "*" -> "<prefix>.>", "a.*" -> "<prefix>.a.>", "a.b" -> "<prefix>.a.b".
Result<std::string> FilterFor(const std::string& prefix, const std::string& pattern) {
  if (pattern == "*") return prefix + ".>";
  if (pattern.size() > 2 && pattern.ends_with(".*")) {
    std::string head = pattern.substr(0, pattern.size() - 2);
    if (ValidTokens(head, true)) return prefix + "." + head + ".>";
  } else if (ValidTokens(pattern, true)) {
    return prefix + "." + pattern;
  }
  return Fail(
      InvalidArgumentError("NATS: pattern '" + pattern + "' is not '*', '<type>' or '<prefix>.*'"));
}

}  // namespace

Result<std::unique_ptr<Subscriber>> NatsBroker::Subscribe(const NatsSubscription& sub) {
  if (!ValidTokens(sub.consumer, false)) {
    return Fail(InvalidArgumentError("NATS: consumer name '" + sub.consumer +
                                     "' must be non-empty, without spaces, '.', '*' or '>'"));
  }
  if (sub.ack_wait <= Millis(0) || sub.max_deliver < 1 || sub.fetch_wait <= Millis(0) ||
      sub.max_deliver <= static_cast<int64_t>(sub.backoff.size())) {
    return Fail(InvalidArgumentError(
        "NATS consumer '" + sub.consumer +
        "': AckWait and fetch wait must be positive, MaxDeliver >= 1 and above the number "
        "of backoff steps"));
  }
  CONVERGE_ASSIGN_OR_RETURN(std::string filter,
                            FilterFor(impl_->options.subject_prefix, sub.pattern));
  std::vector<int64_t> backoff;
  for (Millis b : sub.backoff) backoff.push_back(Nanos(b));
  jsConsumerConfig cc;
  jsConsumerConfig_Init(&cc);
  cc.Durable = sub.consumer.c_str();
  cc.AckPolicy = js_AckExplicit;
  cc.DeliverPolicy = js_DeliverAll;
  cc.AckWait = Nanos(sub.ack_wait);
  cc.MaxDeliver = sub.max_deliver;
  cc.BackOff = backoff.empty() ? nullptr : backoff.data();
  cc.BackOffLen = static_cast<int>(backoff.size());
  cc.FilterSubject = filter.c_str();
  // One wait for a forming cluster (NatsOptions::startup_wait) covers both consumers.
  const SteadyTime deadline = std::chrono::steady_clock::now() + impl_->options.startup_wait;
  CONVERGE_RETURN_IF_ERROR(impl_->AddConsumer(impl_->options.stream, cc, deadline,
                                              "NATS: creating consumer '" + sub.consumer + "'"));

  // Its MAX_DELIVERIES advisories, stored (Impl::AdvisoryStream): a durable of the same
  // name, never giving up (a notice that kills its process is parked unrun anyway).
  const std::string advisory_stream = impl_->AdvisoryStream();
  const std::string advisory_subject = impl_->AdvisorySubject(sub.consumer);
  jsConsumerConfig ac;
  jsConsumerConfig_Init(&ac);
  ac.Durable = sub.consumer.c_str();
  ac.AckPolicy = js_AckExplicit;
  ac.DeliverPolicy = js_DeliverAll;
  ac.AckWait = Nanos(sub.ack_wait);
  ac.MaxDeliver = -1;
  ac.FilterSubject = advisory_subject.c_str();
  CONVERGE_RETURN_IF_ERROR(
      impl_->AddConsumer(advisory_stream, ac, deadline,
                         "NATS: creating advisory consumer '" + sub.consumer + "'"));

  // Pulled with the protocol itself, not natsSubscription_Fetch (nats_pull.h says why).
  auto pull = NatsPull::Open(impl_->nc, impl_->options.stream, sub.consumer);
  if (!pull) return Fail(pull.error());
  auto notices = NatsPull::Open(impl_->nc, advisory_stream, sub.consumer);
  if (!notices) return Fail(notices.error());
  return std::unique_ptr<Subscriber>(
      new NatsSubscriber(impl_.get(), sub, std::move(*pull), std::move(*notices)));
}

}  // namespace converge
