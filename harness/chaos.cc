// Method: the client threads and this one share nothing but the History, a few atomic
// counters and the service ports (fixed for the whole run, so a restarted process is found
// where the clients and the provider's webhooks expect it).
//  - Client threads make up payments and checkout orders from their own seeded
//    generators and send them through Until() -> Send(), which records every exchange and
//    retries unknown outcomes (no answer, 409, 5xx other than a stored 502) the way a
//    careful client does, but never once the key's resend window (shorter than its TTL)
//    has passed.
//  - This thread draws each step of the fault schedule from the seed (a fixed number of
//    draws per step, so the schedule does not depend on timing), waits the step's gap and
//    injects it: through SIGKILL and restart (ServeProcess), the service's
//    /admin/failpoints, /admin/clock and /admin/shipping/faults hooks, the providers'
//    /faults, the providers' stores, signed webhooks, or pg_ctl.
//  - At the end the clients stop, the faults are cleared, every key still in its resend
//    window is retried once more, the stores drain, and CheckHistory() runs.
#include "harness/chaos.h"

#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <deque>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "converge/database.h"
#include "converge/http.h"
#include "converge/webhook.h"
#include "harness/nats_server.h"
#include "harness/providers.h"
#include "harness/serve_process.h"

#if CONVERGE_WITH_POSTGRES
#include <libpq-fe.h>
#endif

namespace converge::harness {
namespace {

using json = nlohmann::json;
using Steady = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr const char* kAdminToken = "chaos-admin-token";
constexpr int64_t kLeaseMs = 1500;
constexpr int64_t kPspTimeoutMs = 1000;
// Short key TTLs, so that stalls outlive them and the sweeper (every 500 ms) runs while a
// request is paused mid-phase.
constexpr int64_t kKeyTtlMs = 20000;
// Clock jumps set a service's clock this far from the true time, back or forward.
constexpr int64_t kClockMinMs = -1500, kClockMaxMs = 2500;
// One request's client timeout.
constexpr int64_t kRequestTimeoutMs = 3000;
// A key is sent again (retries, duplicates, the final pass) only this long after it was
// first sent: past it, its row might have expired even with the clocks at their extremes
// and a request that waited out its timeout, and a resend would rightly be a new request.
constexpr int64_t kResendWindowMs =
    kKeyTtlMs - (kClockMaxMs - kClockMinMs) - kRequestTimeoutMs - 2000;
static_assert(kResendWindowMs >= 8000, "keys must be resendable for a while");
// Checkout orders: one SKU with plenty of stock, two scarce ones (out of stock happens).
const std::pair<const char*, int64_t> kStock[] = {
    {"sku-plenty", 1000000}, {"sku-scarce-0", 60}, {"sku-scarce-1", 60}};
const std::pair<const char*, const char*> kTenants[] = {{"sk_test_acme", "acme"},
                                                         {"sk_test_globex", "globex"}};

// Where a SIGKILL lands: every failpoint on the payment's path and the workers' paths.
const std::vector<std::string> kCrashPoints = {
    "payments.after_charge_before_commit", "idempotency.after_phase",
    "idempotency.before_phase_commit",     "idempotency.after_effect_before_response",
    "idempotency.before_takeover",         "relay.after_publish_before_mark",
    "consumer.before_commit",              "consumer.after_commit_before_ack",
    "effects.before_call",                 "effects.after_call_before_record",
    "completer.before_takeover",           "completer.after_takeover",
    "saga.before_call",                    "saga.after_call_before_record",
    "saga.after_step"};
// Where a stall longer than the lease lets a retry or the completer take over.
const std::vector<std::string> kStallPoints = {
    "payments.after_charge_before_commit", "idempotency.after_phase",
    "idempotency.before_phase_commit",     "completer.after_takeover",
    "consumer.before_commit",              "effects.before_call",
    "saga.after_call_before_record"};
// Where a stall longer than the key TTL lets the sweeper run while a request is paused
// between phases: after a phase committed, and after the provider charged (the row is
// past its first phase and must never be forgotten). Not inside a phase's transaction
// (idempotency.before_phase_commit): held for longer than the TTL, it holds the store
// (SQLite's writer, PostgreSQL's row lock and, through the requests queued behind it, the
// pool), so other requests begin later than the resend window allows
// (docs/design/chaos.md, "Findings").
const std::vector<std::string> kTtlStallPoints = {"idempotency.after_phase",
                                                  "payments.after_charge_before_commit"};

// With NATS: one `converge worker` per consumer of the payments service, and where a
// SIGKILL of a worker or of the relay lands.
const std::vector<std::string> kWorkerConsumers = {"ledger", "email", "psp-webhooks"};
const std::vector<std::string> kWorkerCrashPoints = {
    "consumer.before_commit", "consumer.after_commit_before_ack", "effects.before_call",
    "effects.after_call_before_record"};
const std::vector<std::string> kRelayCrashPoints = {"relay.after_publish_before_mark"};
// The consumers' visibility; their AckWait on NATS is min(visibility, 10 s)
// (examples/payments/service.cc), so 1 s: a worker stopped longer has its messages
// redelivered to another process.
constexpr int64_t kVisibilityMs = 1000;

enum class Fault {
  kKill, kKillAtFailpoint, kStall, kPspFault, kMailOutage, kRefund, kDuplicateWebhook,
  kPoisonWebhook, kDbRestart, kTtlStall, kShippingFault, kRefuseRefund, kClockJump,
  // With NATS only.
  kKillRelay, kKillRelayAtFailpoint, kKillWorker, kKillWorkerAtFailpoint, kKillNats,
  kStallWorker
};
const char* Name(Fault f) {
  switch (f) {
    case Fault::kKill: return "kill";
    case Fault::kKillAtFailpoint: return "kill-at-failpoint";
    case Fault::kStall: return "stall";
    case Fault::kPspFault: return "psp-fault";
    case Fault::kMailOutage: return "mail-outage";
    case Fault::kRefund: return "refund";
    case Fault::kDuplicateWebhook: return "duplicate-webhook";
    case Fault::kPoisonWebhook: return "poison-webhook";
    case Fault::kDbRestart: return "db-restart";
    case Fault::kTtlStall: return "ttl-stall";
    case Fault::kShippingFault: return "shipping-fault";
    case Fault::kRefuseRefund: return "refuse-refund";
    case Fault::kClockJump: return "clock-jump";
    case Fault::kKillRelay: return "kill-relay";
    case Fault::kKillRelayAtFailpoint: return "kill-relay-at-failpoint";
    case Fault::kKillWorker: return "kill-worker";
    case Fault::kKillWorkerAtFailpoint: return "kill-worker-at-failpoint";
    case Fault::kKillNats: return "kill-nats-server";
    case Fault::kStallWorker: return "stall-worker";
  }
  return "?";
}

// One step of the schedule: always five draws from the schedule's generator.
struct Step {
  int64_t gap_ms;
  Fault fault;
  int instance;
  uint64_t a, b;
  int nats_node = 0;  // the nats-server node a kill-nats-server kills; -1: the only one
};

// `nats_nodes`: 0 without NATS, else the nats-server nodes.
Step Draw(std::mt19937_64& rng, int instances, bool db_restarts, int nats_nodes) {
  Step s;
  s.gap_ms = 100 + static_cast<int64_t>(rng() % 300);
  const uint64_t w = rng() % 100;
  // Weights in percent; a database restart only where the campaign can restart it.
  s.fault = w < 22   ? Fault::kKill
            : w < 44 ? Fault::kKillAtFailpoint
            : w < 55 ? Fault::kStall
            : w < 58 ? Fault::kTtlStall
            : w < 68 ? Fault::kPspFault
            : w < 72 ? Fault::kMailOutage
            : w < 79 ? Fault::kRefund
            : w < 84 ? Fault::kDuplicateWebhook
            : w < 85 ? Fault::kPoisonWebhook
            : w < 90 ? Fault::kShippingFault
            : w < 92 ? Fault::kRefuseRefund
            : w < 98 ? Fault::kClockJump
                     : (db_restarts ? Fault::kDbRestart : Fault::kKill);
  s.instance = static_cast<int>(rng() % static_cast<uint64_t>(instances));
  s.a = rng();
  s.b = rng();
  if (nats_nodes > 0) {
    // Some of the kills and stalls go to the NATS shape's other processes, chosen by bits
    // of `a` that no other choice reads (so the step still makes five draws); the node
    // of a cluster that a kill goes to, by the high bits of `b`.
    const uint64_t t = (s.a >> 40) % 8;
    if (s.fault == Fault::kKill) {
      s.fault = t < 2 ? Fault::kKill : t < 4 ? Fault::kKillRelay
                : t < 6 ? Fault::kKillWorker : Fault::kKillNats;
    } else if (s.fault == Fault::kKillAtFailpoint) {
      s.fault = t < 3 ? Fault::kKillAtFailpoint : t < 5 ? Fault::kKillRelayAtFailpoint
                                                        : Fault::kKillWorkerAtFailpoint;
    } else if (s.fault == Fault::kStall && t >= 4) {
      s.fault = Fault::kStallWorker;
    }
    s.nats_node = nats_nodes == 1 ? -1 : static_cast<int>((s.b >> 40) % nats_nodes);
  }
  return s;
}

// What a step injects, derived from its draws alone (the plan, not the outcome).
std::string CrashPoint(const Step& s) { return kCrashPoints[s.a % kCrashPoints.size()]; }
size_t WorkerOf(const Step& s) { return s.b % kWorkerConsumers.size(); }
std::string WorkerCrashPoint(const Step& s) {
  return kWorkerCrashPoints[s.a % kWorkerCrashPoints.size()];
}
std::string RelayCrashPoint(const Step& s) {
  return kRelayCrashPoints[s.a % kRelayCrashPoints.size()];
}
// A stopped worker sends no in-progress acks: past AckWait the server redelivers.
int64_t WorkerStallMs(const Step& s) { return kVisibilityMs + 200 + (s.b >> 8) % 1800; }
// How long nats-server stays down.
int64_t NatsDownMs(const Step& s) { return 200 + static_cast<int64_t>(s.b % 800); }
std::string StallSpec(const Step& s) {
  const int64_t ms = kLeaseMs + 300 + static_cast<int64_t>(s.b % 1000);
  return kStallPoints[s.a % kStallPoints.size()] + "=delay(" + std::to_string(ms) + ")*" +
         std::to_string(1 + s.b % 3);
}
std::string TtlStallSpec(const Step& s) {
  const int64_t ms = kKeyTtlMs + 500 + static_cast<int64_t>(s.b % 1500);
  return kTtlStallPoints[s.a % kTtlStallPoints.size()] + "=delay(" + std::to_string(ms) + ")*1";
}
json ShippingFaults(const Step& s) {
  // Mostly a carrier that is down for a while (retried); now and then one that refuses
  // (the order is compensated: refund, release).
  if (s.a % 3 == 0) return {{"reject_next", 1 + static_cast<int64_t>(s.b % 2)}};
  return {{"fail_next", 1 + static_cast<int64_t>(s.b % 4)}};
}
int64_t ClockOffset(const Step& s) {
  return kClockMinMs + static_cast<int64_t>(s.b % (kClockMaxMs - kClockMinMs + 1));
}
const char* PspFaultName(const Step& s) {
  static const char* kinds[] = {"5xx", "timeout after charging", "slow answer", "decline",
                                "409 in use after charging"};
  return kinds[s.a % 5];
}
json PspFaults(const Step& s) {
  const uint64_t k = s.a % 5;
  json f = {{"timeout_ms", k == 2 ? kPspTimeoutMs / 2 : kPspTimeoutMs + 300}};
  if (k == 0) f["fail_next"] = 1 + static_cast<int64_t>(s.b % 5);
  if (k == 1 || k == 2) f["timeout_next"] = 1;
  if (k == 3) f["decline_next"] = 1;
  if (k == 4) f["in_use_next"] = 1;
  return f;
}
json MailFaults(const Step& s) { return {{"fail_next", 1 + static_cast<int64_t>(s.b % 10)}}; }

std::string Describe(const Step& s) {
  const std::string after = "after " + std::to_string(s.gap_ms) + " ms: ";
  std::string d = after + Name(s.fault) + " instance " + std::to_string(s.instance);
  switch (s.fault) {
    case Fault::kKillAtFailpoint: return d + " at " + CrashPoint(s);
    case Fault::kStall: return d + " " + StallSpec(s);
    case Fault::kPspFault: return d + " " + PspFaultName(s) + " " + PspFaults(s).dump();
    case Fault::kMailOutage: return d + " " + MailFaults(s).dump();
    case Fault::kTtlStall: return d + " " + TtlStallSpec(s);
    case Fault::kShippingFault: return d + " " + ShippingFaults(s).dump();
    case Fault::kClockJump: return d + " to " + std::to_string(ClockOffset(s)) + " ms";
    case Fault::kKillRelay: return after + "kill-relay at a random instant";
    case Fault::kKillRelayAtFailpoint:
      return after + "kill-relay-at-failpoint at " + RelayCrashPoint(s);
    case Fault::kKillWorker: return after + "kill-worker " + kWorkerConsumers[WorkerOf(s)];
    case Fault::kKillWorkerAtFailpoint:
      return after + "kill-worker-at-failpoint " + kWorkerConsumers[WorkerOf(s)] + " at " +
             WorkerCrashPoint(s);
    case Fault::kKillNats:
      return after + "kill-nats-server" +
             (s.nats_node < 0 ? "" : " node " + std::to_string(s.nats_node + 1)) + ", down " +
             std::to_string(NatsDownMs(s)) + " ms";
    case Fault::kStallWorker:
      return after + "stall-worker " + kWorkerConsumers[WorkerOf(s)] + " (SIGSTOP) " +
             std::to_string(WorkerStallMs(s)) + " ms";
    default: return d;
  }
}

std::string Body(int64_t amount, const std::string& order) {
  return json{{"amount", amount}, {"currency", "EUR"}, {"customer_id", "cust-" + order},
              {"order_id", order}}
      .dump();
}

// A checkout order; the customer id is the key, so the checker finds the order by key.
std::string OrderBody(const std::string& key, const std::string& sku, int64_t qty,
                      int64_t amount) {
  return json{{"customer_id", key}, {"sku", sku}, {"qty", qty}, {"amount", amount},
              {"currency", "EUR"}}
      .dump();
}

const char* ApiKeyOf(const std::string& tenant) {
  return tenant == kTenants[0].second ? kTenants[0].first : kTenants[1].first;
}

// The last `n` lines of a log file.
std::string LogTail(const std::string& path, size_t n) {
  std::ifstream f(path);
  std::deque<std::string> lines;
  for (std::string line; std::getline(f, line);) {
    lines.push_back(std::move(line));
    if (lines.size() > n) lines.pop_front();
  }
  std::string out;
  for (const std::string& l : lines) out += "    " + l + "\n";
  return out;
}

bool Final(int status) {
  // No answer, "in progress" and the unknown outcomes are retried; a stored decision
  // (201, 402, 422, a 502 the provider's refusal) is final.
  return !(status == 0 || status == 409 || status == 429 || status == 500 || status == 503 ||
           status == 504);
}

class Campaign {
 public:
  explicit Campaign(const ChaosOptions& o) : o_(o), sched_(o.seed) {}
  ~Campaign() { TearDown(); }

  Result<ChaosResult> Run();

 private:
  Status SetUp();
  void TearDown();
  Status CreateDatabase();
  void Client(int c);
  int Send(std::mt19937_64& rng, const std::string& api, const std::string& tenant,
           const std::string& key, const std::string& body, const std::string& kind,
           milliseconds timeout);
  // Sends until a final answer, at most while the key is resendable (kResendWindowMs
  // after `first_sent`); then returns 0 and counts a cut-off.
  int Until(std::mt19937_64& rng, const std::string& api, const std::string& tenant,
            const std::string& key, const std::string& body, std::string kind,
            Steady::time_point first_sent);
  bool Resendable(Steady::time_point first_sent) const {
    return Steady::now() < first_sent + milliseconds(kResendWindowMs);
  }
  Status SetStock();
  bool Admin(int i, const std::string& method, const std::string& path, const std::string& body);
  Status Inject(const Step& s);
  Status Restart(int i);
  Status KillAndRestart(int i, const std::string& point);
  // The NATS shape's relay or worker `p`: SIGKILL at a random instant (`point` empty)
  // or at `point` (a graceful stop, then a start with that point armed to crash), then a
  // clean start. `kind` counts it.
  Status KillAndRestartProcess(ServeProcess& p, const std::string& what,
                               const std::string& point, int64_t* kind);
  // Starts `p` with `failpoints`, retrying for up to 10 s.
  Status StartProcess(ServeProcess& p, const std::string& failpoints);
  Status KillNats(const Step& s);
  // Starts every nats-server node that is down, trying for about 5 s.
  Status StartNats();
  Status StartNatsShape();
  void CountNatsFigures();
  // nats-server node `node`'s /jsz with its streams and consumers.
  Result<json> Jsz(int node);
  // On a cluster, waits (up to 30 s) until node `node`, started again, holds every event
  // the stream's leader held when it came back.
  void WaitCaughtUp(int node);
  // The durable consumers of the event stream, from nats-server's /jsz.
  Result<json> StreamConsumers();
  // What the durable consumers have not acked yet ("" when nothing).
  std::string NatsUndrained();
  bool SetFailpoints(int i, const std::string& spec);
  void ScrapeTakeovers(int i);
  void Note(const std::string& what);
  // Every service, relay and worker process that ended although the campaign did not stop
  // or kill it: a `process-ended` violation each (with the end of its log), and, while the
  // schedule runs, a restart. Without this a dead service showed only as webhooks nobody
  // answered (docs/design/chaos.md, Findings).
  Status CheckProcesses(bool restart);
  void Progress(const std::string& phase);
  Status FinalPass();
  Status Drain();
  CheckStores Stores() const {
    CheckStores st{db_.get(), psp_db_.get(), mail_db_.get(), poison_};
    for (const auto& [sku, units] : kStock) st.initial_stock[sku] = units;
    st.keys_may_expire = true;
    return st;
  }

  std::string Url(int i, const std::string& path) const {
    return "http://127.0.0.1:" + std::to_string(ports_[static_cast<size_t>(i)]) + path;
  }

  const ChaosOptions& o_;
  std::mt19937_64 sched_;
  std::string dir_, uri_, pg_admin_, pg_name_, secret_;
  bool pg_ = false;
  int instances_ = 1;
  std::vector<uint16_t> ports_;
  std::unique_ptr<FakePsp> psp_;
  std::unique_ptr<FakeMail> mail_;
  std::vector<std::unique_ptr<ServeProcess>> svc_;
  // With NATS: the server, the relay and one worker per kWorkerConsumers entry.
  bool nats_ = false;
  std::unique_ptr<NatsServer> nats_server_;
  std::string broker_uri_;  // the nodes' URLs, and on a cluster its replicas
  std::unique_ptr<ServeProcess> relay_;
  std::vector<std::unique_ptr<ServeProcess>> workers_;
  std::unique_ptr<Database> db_, psp_db_, mail_db_;
  http::Client http_;
  History history_;
  std::atomic<bool> stop_clients_{false};
  std::atomic<int64_t> requests_{0}, keys_{0}, duplicates_{0}, concurrent_{0}, mismatches_{0},
      give_ups_{0}, replays_{0}, order_keys_{0}, cutoffs_{0};
  // Every key: its api and when it was first sent (the final pass, the resend window).
  struct KeyInfo {
    std::string api;
    Steady::time_point first_sent;
  };
  std::mutex keys_mu_;
  std::map<std::pair<std::string, std::string>, KeyInfo> key_info_;
  std::mutex status_mu_;
  std::map<int, int64_t> by_status_;
  ChaosResult result_;
  bool keep_ = false;  // TearDown leaves the directory and database (keep, or violations)
  std::set<std::string> poison_;
  Steady::time_point t0_ = Steady::now();
  Steady::time_point last_progress_{};
};

Status Campaign::SetUp() {
  const char* base = std::getenv("TMPDIR");
  std::string tmpl = std::string(base && *base ? base : "/tmp") + "/converge-chaos-XXXXXX";
  if (mkdtemp(tmpl.data()) == nullptr) return UnavailableError("mkdtemp failed");
  dir_ = tmpl;
  result_.dir = dir_;
  pg_ = o_.store.rfind("postgresql://", 0) == 0 || o_.store.rfind("postgres://", 0) == 0;
  if (!pg_ && o_.store != "sqlite") {
    return InvalidArgumentError("--store must be sqlite or a postgresql:// URI, not '" +
                                o_.store + "'");
  }
  instances_ = o_.instances > 0 ? o_.instances : (pg_ ? 2 : 1);
  if (!pg_ && instances_ != 1) {
    return InvalidArgumentError("SQLite has one writer process: one instance only");
  }
  if (!o_.broker.empty() && o_.broker != "nats") {
    return InvalidArgumentError("--broker must be nats (or absent), not '" + o_.broker + "'");
  }
  nats_ = o_.broker == "nats";
  if (nats_ && o_.publish_in_transaction) {
    return InvalidArgumentError(
        "--publish-in-transaction puts events on the store's queue; with --broker they go "
        "to the broker");
  }
  if (o_.nats_nodes != 1 && !nats_) {
    return InvalidArgumentError("--nats-nodes needs --broker nats");
  }
  if (o_.nats_nodes < 1 || o_.nats_nodes % 2 == 0 || o_.nats_nodes > 5) {
    return InvalidArgumentError(
        "--nats-nodes is 1, 3 or 5 (a cluster of an even number of nodes loses its quorum "
        "when half of them are down), not " + std::to_string(o_.nats_nodes));
  }
  if (nats_) {
    nats_server_ = std::make_unique<NatsServer>(dir_, o_.nats_nodes);
    CONVERGE_RETURN_IF_ERROR(nats_server_->Start());
    // On a cluster every node holds the stream and its consumers: a node killed loses
    // none of them (docs/design/nats.md, "Durability").
    broker_uri_ = nats_server_->url();
    if (o_.nats_nodes > 1) broker_uri_ += "?replicas=" + std::to_string(o_.nats_nodes);
  }
  if (pg_) {
    CONVERGE_RETURN_IF_ERROR(CreateDatabase());
  } else {
    uri_ = "sqlite:" + dir_ + "/service.db";
  }
  for (int i = 0; i < instances_; ++i) {
    const uint16_t p = FreePort();
    if (p == 0) return UnavailableError("no free port");
    ports_.push_back(p);
  }
  secret_ = webhook::NewSecret();
  psp_ = std::make_unique<FakePsp>(ProviderOptions{
      .db_path = dir_ + "/psp.db", .webhook_url = Url(0, "/webhooks/psp"),
      .webhook_secret = secret_});
  mail_ = std::make_unique<FakeMail>(ProviderOptions{.db_path = dir_ + "/mail.db"});
  CONVERGE_RETURN_IF_ERROR(psp_->Start());
  CONVERGE_RETURN_IF_ERROR(mail_->Start());
  const std::string config = dir_ + "/service.toml";
  {
    std::ofstream c(config);
    c << "[store]\nuri = \"" << uri_ << "\"\n";
    if (nats_) c << "broker = \"" << broker_uri_ << "\"\n";
    if (o_.publish_in_transaction) c << "publish_in_transaction = true\n";
    c
      << "[idempotency]\nlease_ms = " << kLeaseMs << "\ncompleter_grace_ms = 1000\n"
      << "ttl_seconds = " << kKeyTtlMs / 1000 << "\n"
      // A walk of the SQLite sweeper every 2 s: expired keys go while stalls last.
      << "[retention]\nsweep_interval_ms = 500\nsweep_pass_ms = 2000\n"
      << "inbox_sweep_pass_ms = 2000\n"
      << "[admin]\nfailpoints = true\nclock = true\n"
      << "[auth]\nadmin_token = \"" << kAdminToken << "\"\napi_keys = { ";
    for (const auto& [k, t] : kTenants) c << "\"" << k << "\" = \"" << t << "\", ";
    c.seekp(-2, std::ios_base::cur);
    c << " }\n"
      << "[psp]\nurl = \"http://127.0.0.1:" << psp_->port() << "\"\ntimeout_ms = "
      << kPspTimeoutMs << "\nwebhook_secrets = [\"" << secret_ << "\"]\n"
      << "[mail]\nurl = \"http://127.0.0.1:" << mail_->port() << "\"\ntimeout_ms = 1000\n"
      // Generous attempts: a refund racing its capture, or a charge.succeeded webhook
      // racing the saga step that records the payment it names, waits out kills and
      // stalls. The campaign may stall one point three times running (about 8 s) and kill
      // the process around it; with 500 ms between tries the 30 attempts lasted about
      // 8 s, and on a loaded machine such a webhook was parked (exhausted) 0.1 s before
      // its payment committed. 2 s between tries: about 45 s.
      << "[consumers]\nvisibility_ms = " << kVisibilityMs
      << "\nmax_attempts = 30\nbackoff_initial_ms = 20\n"
      << "backoff_max_ms = 2000\n"
      << "[effects]\nmax_attempts = 20\nlease_ms = 1500\n";
  }
  for (int i = 0; i < instances_; ++i) {
    svc_.push_back(std::make_unique<ServeProcess>(ServeProcess::Options{
        .binary = o_.binary, .config_path = config, .dir = dir_,
        .name = "service" + std::to_string(i),
        .listen = "127.0.0.1:" + std::to_string(ports_[static_cast<size_t>(i)]),
        .log_level = "info"}));
    CONVERGE_RETURN_IF_ERROR(svc_.back()->Start(""));
  }
  if (nats_) CONVERGE_RETURN_IF_ERROR(StartNatsShape());
  auto open = [](const std::string& uri, std::unique_ptr<Database>* out) -> Status {
    auto db = Database::Open(uri);
    if (!db) return db.error();
    *out = std::move(*db);
    return OkStatus();
  };
  CONVERGE_RETURN_IF_ERROR(open(uri_, &db_));
  CONVERGE_RETURN_IF_ERROR(open("sqlite:" + dir_ + "/psp.db", &psp_db_));
  CONVERGE_RETURN_IF_ERROR(open("sqlite:" + dir_ + "/mail.db", &mail_db_));
  return SetStock();
}

bool Campaign::Admin(int i, const std::string& method, const std::string& path,
                     const std::string& body) {
  auto r = http_.Send({.method = method,
                       .url = Url(i, path),
                       .headers = {{"Authorization", std::string("Bearer ") + kAdminToken}},
                       .body = body,
                       .timeout = std::chrono::seconds(5)});
  return r && r->status / 100 == 2;
}

Status Campaign::SetStock() {
  // Before any order, so the initial stock is known; a fresh process may still be busy.
  for (const auto& [sku, units] : kStock) {
    bool ok = false;
    for (int attempt = 0; attempt < 50 && !ok; ++attempt) {
      ok = Admin(0, "PUT", std::string("/admin/inventory/") + sku,
                 json{{"available", units}}.dump());
      if (!ok) std::this_thread::sleep_for(milliseconds(100));
    }
    if (!ok) return UnavailableError(std::string("cannot stock ") + sku);
  }
  return OkStatus();
}

Status Campaign::CreateDatabase() {
#if CONVERGE_WITH_POSTGRES
  pg_admin_ = o_.store;
  pg_name_ = "converge_chaos_" + std::to_string(o_.seed % 1000000) + "_" +
             std::to_string(getpid());
  const size_t slash = pg_admin_.rfind('/');
  if (slash == std::string::npos || slash < std::string("postgresql://").size()) {
    return InvalidArgumentError("--store: no database in '" + o_.store + "'");
  }
  const size_t query = pg_admin_.find('?', slash);
  uri_ = pg_admin_.substr(0, slash + 1) + pg_name_ +
         (query == std::string::npos ? "" : pg_admin_.substr(query));
  PGconn* c = PQconnectdb(pg_admin_.c_str());
  PGresult* r = PQexec(c, ("CREATE DATABASE " + pg_name_).c_str());
  const bool ok = PQresultStatus(r) == PGRES_COMMAND_OK;
  std::string err = PQerrorMessage(c);
  PQclear(r);
  PQfinish(c);
  if (!ok) return UnavailableError("cannot create database " + pg_name_ + ": " + err);
  return OkStatus();
#else
  return InvalidArgumentError("this build has no PostgreSQL backend");
#endif
}

void Campaign::TearDown() {
  stop_clients_ = true;
  for (auto& w : workers_) w->Stop(milliseconds(5000));
  workers_.clear();
  if (relay_) relay_->Stop(milliseconds(5000));
  relay_.reset();
  for (auto& s : svc_) s->Stop(milliseconds(5000));
  svc_.clear();
  nats_server_.reset();
  db_.reset();
  psp_db_.reset();
  mail_db_.reset();
  if (psp_) psp_->Stop();
  if (mail_) mail_->Stop();
#if CONVERGE_WITH_POSTGRES
  if (!pg_name_.empty() && !keep_) {
    PGconn* c = PQconnectdb(pg_admin_.c_str());
    PQclear(PQexec(c, ("DROP DATABASE IF EXISTS " + pg_name_ + " WITH (FORCE)").c_str()));
    PQfinish(c);
    pg_name_.clear();
  }
#endif
  if (!dir_.empty() && !keep_) {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
    dir_.clear();
  }
}

int Campaign::Send(std::mt19937_64& rng, const std::string& api, const std::string& tenant,
                   const std::string& key, const std::string& body, const std::string& kind,
                   milliseconds timeout) {
  const int i = static_cast<int>(rng() % static_cast<uint64_t>(instances_));
  auto r = http_.Send({.method = "POST",
                       .url = Url(i, "/v1/" + api),
                       .headers = {{"Authorization", std::string("Bearer ") + ApiKeyOf(tenant)},
                                   {"Idempotency-Key", key},
                                   {"Content-Type", "application/json"}},
                       .body = body,
                       .timeout = timeout});
  Op op{.tenant = tenant, .key = key, .kind = kind, .request = body, .api = api};
  if (r) {
    op.status = r->status;
    op.response = r->body;
    const std::string* rp = r->Header("Idempotent-Replayed");
    op.replayed = rp != nullptr && *rp == "true";
  } else {
    op.response = r.error().ToString();
  }
  ++requests_;
  if (op.replayed) ++replays_;
  {
    std::lock_guard<std::mutex> l(status_mu_);
    ++by_status_[op.status];
  }
  const int status = op.status;
  history_.Add(std::move(op));
  return status;
}

int Campaign::Until(std::mt19937_64& rng, const std::string& api, const std::string& tenant,
                    const std::string& key, const std::string& body, std::string kind,
                    Steady::time_point first_sent) {
  int status = 0;
  for (;;) {
    if (!Resendable(first_sent)) {
      ++cutoffs_;
      return 0;
    }
    status = Send(rng, api, tenant, key, body, kind, milliseconds(kRequestTimeoutMs));
    if (Final(status)) return status;
    kind = "retry";
    // Retry-After is 1 s; a client in a hurry comes back sooner, with jitter.
    std::this_thread::sleep_for(milliseconds(50 + static_cast<int64_t>(rng() % 250)));
  }
  return status;
}

void Campaign::Client(int c) {
  std::mt19937_64 rng(o_.seed * 1000003 + static_cast<uint64_t>(c));
  std::uniform_real_distribution<double> u(0, 1);
  for (int n = 0; !stop_clients_.load(); ++n) {
    const std::string tenant = kTenants[rng() % 4 == 0 ? 1 : 0].second;
    // One request in four is a checkout order, the rest payments.
    const bool order = u(rng) < 0.25;
    const std::string api = order ? "orders" : "payments";
    const std::string key = (order ? "o" : "c") + std::to_string(c) + "-" + std::to_string(n);
    const int64_t amount = 100 + static_cast<int64_t>(rng() % 10000);
    const uint64_t pick = rng();
    const std::string sku = kStock[pick % 10 < 6 ? 0 : 1 + pick % 2].first;
    const int64_t qty = 1 + static_cast<int64_t>(rng() % 3);
    auto body_for = [&](int64_t a) {
      return order ? OrderBody(key, sku, qty, a) : Body(a, key);
    };
    const std::string body = body_for(amount);
    history_.SetOriginal(tenant, key, body);
    const Steady::time_point first_sent = Steady::now();
    {
      std::lock_guard<std::mutex> l(keys_mu_);
      key_info_[{tenant, key}] = {api, first_sent};
    }
    ++keys_;
    if (order) ++order_keys_;
    const double r = u(rng);
    if (r < 0.07) {
      // Gives up: one try with a short timeout, never a retry (the completer's case).
      ++give_ups_;
      (void)Send(rng, api, tenant, key, body, "give-up",
                 milliseconds(20 + static_cast<int64_t>(rng() % 400)));
      continue;
    }
    int status = 0;
    if (r < 0.17) {
      // Concurrent duplicates: a double (or triple, quadruple) click.
      ++concurrent_;
      std::vector<std::thread> ts;
      std::atomic<int> last{0};
      const int k = 2 + static_cast<int>(rng() % 3);
      for (int j = 0; j < k; ++j) {
        ts.emplace_back([&, seed = rng()] {
          std::mt19937_64 r2(seed);
          if (int got = Until(r2, api, tenant, key, body, "concurrent", first_sent)) last = got;
        });
      }
      for (auto& t : ts) t.join();
      status = last;
    } else {
      status = Until(rng, api, tenant, key, body, "first", first_sent);
    }
    // Sent again only after a decision: before it, another body could begin the key.
    if (status == 0) continue;
    if (u(rng) < 0.15) {
      ++duplicates_;
      Until(rng, api, tenant, key, body, "duplicate", first_sent);
    }
    if (u(rng) < 0.05) {
      ++mismatches_;
      Until(rng, api, tenant, key, body_for(amount + 1), "mismatch", first_sent);
    }
  }
}

void Campaign::Note(const std::string& what) {
  const auto ms = std::chrono::duration_cast<milliseconds>(Steady::now() - t0_).count();
  result_.schedule.push_back("t=" + std::to_string(ms) + "ms " + what);
}

bool Campaign::SetFailpoints(int i, const std::string& spec) {
  return Admin(i, "PUT", "/admin/failpoints", spec);
}

int64_t MetricValue(const std::string& text, const std::string& name) {
  size_t pos = 0;
  while ((pos = text.find(name, pos)) != std::string::npos) {
    const bool line_start = pos == 0 || text[pos - 1] == '\n';
    const size_t after = pos + name.size();
    if (line_start && after < text.size() && text[after] == ' ') {
      return std::atoll(text.c_str() + after + 1);
    }
    pos = after;
  }
  return 0;
}

void Campaign::ScrapeTakeovers(int i) {
  auto r = http_.Send({.url = Url(i, "/metrics"), .timeout = std::chrono::seconds(2)});
  if (r && r->status == 200) {
    result_.counts.takeovers += MetricValue(r->body, "idempotency_resumed_total");
    result_.counts.broker_duplicates +=
        MetricValue(r->body, "converge_nats_publish_duplicates_total");
  }
}

Status Campaign::Restart(int i) {
  CONVERGE_RETURN_IF_ERROR(StartProcess(*svc_[static_cast<size_t>(i)], ""));
  ++result_.counts.restarts;
  return OkStatus();
}

Status Campaign::KillAndRestart(int i, const std::string& point) {
  ServeProcess& s = *svc_[static_cast<size_t>(i)];
  ScrapeTakeovers(i);
  if (!point.empty() && SetFailpoints(i, point + "=crash*1") &&
      s.KilledWithin(std::chrono::seconds(3))) {
    ++result_.counts.kills_at_failpoint;
    Note("kill instance " + std::to_string(i) + " at " + point);
  } else {
    if (!point.empty()) {
      ++result_.counts.failpoints_not_reached;
      Note("kill instance " + std::to_string(i) + " (" + point + " not reached in 3 s)");
    } else {
      Note("kill instance " + std::to_string(i) + " at a random instant");
    }
    s.Kill(SIGKILL);
  }
  ++result_.counts.kills;
  return Restart(i);
}

Status Campaign::CheckProcesses(bool restart) {
  auto ended = [&](const std::string& what, const std::string& how, const std::string& log) {
    Note(what + " " + how + " (not killed by the campaign)");
    result_.violations.push_back(
        {"process-ended", what + " " + how + " although the campaign did not stop it; the " +
                              "end of " + log + ":\n" + LogTail(log, 10)});
  };
  // nats-server first: the relay and the workers connect to it as they start.
  std::vector<int> nats_ended;
  for (int node = 0; nats_server_ && node < nats_server_->nodes(); ++node) {
    const std::optional<std::string> how = nats_server_->EndedOnItsOwn(node);
    if (!how) continue;
    ended("nats-server " + nats_server_->name(node), *how, nats_server_->log_path(node));
    nats_ended.push_back(node);
  }
  if (restart && !nats_ended.empty()) {
    CONVERGE_RETURN_IF_ERROR(StartNats());
    for (int node : nats_ended) {
      if (nats_server_->nodes() > 1) WaitCaughtUp(node);
      ++result_.counts.restarts;
    }
  }
  std::vector<std::pair<std::string, ServeProcess*>> all;
  for (int i = 0; i < instances_; ++i) {
    all.emplace_back("instance " + std::to_string(i), svc_[static_cast<size_t>(i)].get());
  }
  if (relay_) all.emplace_back("relay", relay_.get());
  for (size_t w = 0; w < workers_.size(); ++w) {
    all.emplace_back("worker " + kWorkerConsumers[w], workers_[w].get());
  }
  for (auto& [what, p] : all) {
    const std::optional<std::string> how = p->EndedOnItsOwn();
    if (!how) continue;
    ended(what, *how, p->log_path());
    if (restart) {
      CONVERGE_RETURN_IF_ERROR(StartProcess(*p, ""));
      ++result_.counts.restarts;
    }
  }
  return OkStatus();
}

Status Campaign::StartNatsShape() {
  // The service instances created the stream; the relay shares the outbox with their
  // relays (partition leases), each worker the durable consumer of its name with theirs.
  relay_ = std::make_unique<ServeProcess>(ServeProcess::Options{
      .binary = o_.binary, .command = "relay", .dir = dir_, .name = "relay",
      .log_level = "info", .ready_line = "event=relay_started",
      .args = {"--db", uri_, "--broker", broker_uri_, "--name", "chaos-relay"}});
  CONVERGE_RETURN_IF_ERROR(relay_->Start(""));
  for (const std::string& consumer : kWorkerConsumers) {
    workers_.push_back(std::make_unique<ServeProcess>(ServeProcess::Options{
        .binary = o_.binary, .command = "worker", .dir = dir_, .name = "worker-" + consumer,
        .log_level = "info", .ready_line = "event=worker_started",
        .args = {"--db", uri_, "--broker", broker_uri_, "--consumer", consumer,
                 "--config", dir_ + "/service.toml"}}));
    CONVERGE_RETURN_IF_ERROR(workers_.back()->Start(""));
  }
  return OkStatus();
}

Status Campaign::StartProcess(ServeProcess& p, const std::string& failpoints) {
  // The database (or nats-server) may be restarting too: try for a while.
  Status st;
  for (int attempt = 0; attempt < 20; ++attempt) {
    st = p.Start(failpoints);
    if (st.ok()) return st;
    std::this_thread::sleep_for(milliseconds(500));
  }
  return st;
}

Status Campaign::KillAndRestartProcess(ServeProcess& p, const std::string& what,
                                       const std::string& point, int64_t* kind) {
  if (point.empty()) {
    p.Kill(SIGKILL);
    Note("kill " + what + " at a random instant");
  } else {
    // No admin endpoint in a relay or worker: stop it (gracefully; not a kill) and start
    // it again with the point armed. A crash before it reported ready counts too.
    p.Stop(milliseconds(5000));
    const Status started = p.Start(point + "=crash*1");
    if ((started.ok() && p.KilledWithin(std::chrono::seconds(3))) ||
        (!started.ok() && p.killed_at_start())) {
      ++result_.counts.kills_at_failpoint;
      Note("kill " + what + " at " + point);
    } else {
      ++result_.counts.failpoints_not_reached;
      Note("kill " + what + " (" + point + " not reached in 3 s)");
      p.Kill(SIGKILL);
    }
  }
  ++result_.counts.kills;
  ++*kind;
  CONVERGE_RETURN_IF_ERROR(StartProcess(p, ""));
  ++result_.counts.restarts;
  return OkStatus();
}

Status Campaign::StartNats() {
  // A node's ports may still be held a moment after its end: try for a while.
  Status st;
  for (int attempt = 0; attempt < 10; ++attempt) {
    st = nats_server_->Start();
    if (st.ok()) break;
    std::this_thread::sleep_for(milliseconds(500));
  }
  return st;
}

Status Campaign::KillNats(const Step& s) {
  // SIGKILL: a crash of the server process, not of its machine. nats-server 2.9 has
  // written an acknowledged message to its file (the page cache) before the ack, so a
  // process crash must lose nothing: a lost event shows as a missing ledger entry or
  // receipt, a violation (docs/design/chaos.md, "With NATS"). On a cluster one node goes
  // down at a time, and is back before the next step.
  const int node = std::max(s.nats_node, 0);
  nats_server_->Kill(node);
  Note("kill nats-server" +
       (s.nats_node < 0 ? std::string() : " " + nats_server_->name(node)) + ", down " +
       std::to_string(NatsDownMs(s)) + " ms");
  std::this_thread::sleep_for(milliseconds(NatsDownMs(s)));
  CONVERGE_RETURN_IF_ERROR(StartNats());
  if (s.nats_node >= 0) WaitCaughtUp(node);
  ++result_.counts.kills;
  ++result_.counts.nats_kills;
  ++result_.counts.restarts;
  return OkStatus();
}

void Campaign::CountNatsFigures() {
  ChaosCounts& n = result_.counts;
  // The relays' own duplicate counts, from their graceful stops (a killed life's is lost).
  if (relay_) relay_->Stop(milliseconds(5000));
  std::ifstream log(dir_ + "/relay.log");
  for (std::string line; std::getline(log, line);) {
    const size_t at = line.find("event=relay_stopped");
    const size_t d = line.find(" duplicates=", at == std::string::npos ? line.size() : at);
    if (at != std::string::npos && d != std::string::npos) {
      n.broker_duplicates += std::atoll(line.c_str() + d + 12);
    }
  }
  // Redeliveries: each durable consumer's deliveries (its consumer sequence, which counts
  // every delivery) less the events its filter matches (each stored once: Nats-Msg-Id).
  auto consumers = StreamConsumers();
  if (!consumers) return;
  std::map<std::string, int64_t> delivered;
  for (const json& c : *consumers) {
    delivered[c.value("name", "")] +=
        c.value("delivered", json::object()).value("consumer_seq", int64_t{0});
  }
  int64_t payment_events = 0, captured_events = 0;
  (void)db_->Read([&](Tx& tx) -> Status {
    CONVERGE_ASSIGN_OR_RETURN(
        Rows rows, tx.Query("SELECT count(*), coalesce(sum(CASE WHEN type = "
                            "'payment.captured' THEN 1 ELSE 0 END), 0) FROM outbox_events "
                            "WHERE type LIKE 'payment.%'"));
    payment_events = rows[0].Int(0);
    captured_events = rows[0].Int(1);
    return OkStatus();
  });
  n.redeliveries = std::max<int64_t>(0, delivered["ledger"] - payment_events) +
                   std::max<int64_t>(0, delivered["email"] - captured_events);
}

Status Campaign::Inject(const Step& s) {
  const std::string inst = " instance " + std::to_string(s.instance);
  switch (s.fault) {
    case Fault::kKill:
      return KillAndRestart(s.instance, "");
    case Fault::kKillAtFailpoint:
      return KillAndRestart(s.instance, CrashPoint(s));
    case Fault::kStall: {
      const std::string spec = StallSpec(s);
      if (SetFailpoints(s.instance, spec)) ++result_.counts.stalls;
      Note("stall" + inst + " " + spec);
      return OkStatus();
    }
    case Fault::kTtlStall: {
      const std::string spec = TtlStallSpec(s);
      if (SetFailpoints(s.instance, spec)) ++result_.counts.ttl_stalls;
      Note("stall past the key TTL" + inst + " " + spec);
      return OkStatus();
    }
    case Fault::kShippingFault: {
      const json f = ShippingFaults(s);
      if (Admin(s.instance, "POST", "/admin/shipping/faults", f.dump())) {
        ++result_.counts.shipping_faults;
      }
      Note("shipping" + inst + " " + f.dump());
      return OkStatus();
    }
    case Fault::kRefuseRefund: {
      (void)http_.Send({.method = "POST",
                        .url = "http://127.0.0.1:" + std::to_string(psp_->port()) + "/faults",
                        .body = R"({"refuse_refund_next":1})"});
      ++result_.counts.refused_refunds;
      Note("provider refuses the next refund");
      return OkStatus();
    }
    case Fault::kClockJump: {
      const int64_t offset = ClockOffset(s);
      if (Admin(s.instance, "PUT", "/admin/clock", json{{"offset_ms", offset}}.dump())) {
        ++result_.counts.clock_jumps;
      }
      Note("clock" + inst + " to " + std::to_string(offset) + " ms");
      return OkStatus();
    }
    case Fault::kPspFault: {
      const json f = PspFaults(s);
      (void)http_.Send({.method = "POST",
                        .url = "http://127.0.0.1:" + std::to_string(psp_->port()) + "/faults",
                        .body = f.dump()});
      ++result_.counts.psp_faults;
      Note(std::string("provider ") + PspFaultName(s) + " " + f.dump());
      return OkStatus();
    }
    case Fault::kMailOutage: {
      const json f = MailFaults(s);
      (void)http_.Send({.method = "POST",
                        .url = "http://127.0.0.1:" + std::to_string(mail_->port()) + "/faults",
                        .body = f.dump()});
      ++result_.counts.mail_outages;
      Note("mail outage " + f.dump());
      return OkStatus();
    }
    case Fault::kRefund: {
      // One of the newest charges: often its capture is not committed yet, so the
      // refund webhook overtakes it.
      Rows rows;
      (void)psp_db_->Read([&](Tx& tx) -> Status {
        // Not an order's charge: its saga owns it (a refund from outside would make its
        // money not balance, by design of the check).
        CONVERGE_ASSIGN_OR_RETURN(
            rows, tx.Query("SELECT id FROM charges WHERE status = 'succeeded' AND "
                           "idempotency_key NOT LIKE 'checkout:%' ORDER BY created_at DESC "
                           "LIMIT 8"));
        return OkStatus();
      });
      if (rows.empty()) return OkStatus();
      const std::string id = rows[s.b % rows.size()].Text(0);
      auto r = http_.Send(
          {.method = "POST",
           .url = "http://127.0.0.1:" + std::to_string(psp_->port()) + "/v1/charges/" + id +
                  "/refund"});
      if (r && r->status == 200) ++result_.counts.refunds;
      Note("refund " + id + " at the provider");
      return OkStatus();
    }
    case Fault::kDuplicateWebhook:
    case Fault::kPoisonWebhook: {
      std::string id, body;
      if (s.fault == Fault::kPoisonWebhook) {
        id = "msg_chaos_poison_" + std::to_string(s.b % 1000000);
        body = json{{"type", "charge.refunded"},
                    {"data", {{"charge_id", "ch_chaos_unknown_" + id}, {"amount", 1},
                              {"currency", "EUR"}}}}
                   .dump();
        poison_.insert(id);
        ++result_.counts.poison_webhooks;
      } else {
        Rows rows;
        (void)psp_db_->Read([&](Tx& tx) -> Status {
          CONVERGE_ASSIGN_OR_RETURN(
              rows, tx.Query("SELECT msg_id, body FROM webhook_deliveries WHERE state = "
                             "'delivered' ORDER BY id DESC LIMIT 16"));
          return OkStatus();
        });
        if (rows.empty()) return OkStatus();
        id = rows[s.b % rows.size()].Text(0);
        body = rows[s.b % rows.size()].Text(1);
        ++result_.counts.duplicate_webhooks;
      }
      const int64_t ts = Clock::System()->NowMillis() / 1000;
      auto sig = webhook::Sign(secret_, id, ts, body);
      (void)http_.Send({.method = "POST",
                        .url = Url(s.instance, "/webhooks/psp"),
                        .headers = {{"webhook-id", id},
                                    {"webhook-timestamp", std::to_string(ts)},
                                    {"webhook-signature", sig ? *sig : ""}},
                        .body = body});
      Note(std::string(Name(s.fault)) + " " + id + " to" + inst);
      return OkStatus();
    }
    case Fault::kKillRelay:
      return KillAndRestartProcess(*relay_, "relay", "", &result_.counts.relay_kills);
    case Fault::kKillRelayAtFailpoint:
      return KillAndRestartProcess(*relay_, "relay", RelayCrashPoint(s),
                                   &result_.counts.relay_kills);
    case Fault::kKillWorker:
      return KillAndRestartProcess(*workers_[WorkerOf(s)],
                                   "worker " + kWorkerConsumers[WorkerOf(s)], "",
                                   &result_.counts.worker_kills);
    case Fault::kKillWorkerAtFailpoint:
      return KillAndRestartProcess(*workers_[WorkerOf(s)],
                                   "worker " + kWorkerConsumers[WorkerOf(s)],
                                   WorkerCrashPoint(s), &result_.counts.worker_kills);
    case Fault::kKillNats:
      return KillNats(s);
    case Fault::kStallWorker: {
      ServeProcess& w = *workers_[WorkerOf(s)];
      Note("stall worker " + kWorkerConsumers[WorkerOf(s)] + " (SIGSTOP) " +
           std::to_string(WorkerStallMs(s)) + " ms");
      w.Signal(SIGSTOP);
      std::this_thread::sleep_for(milliseconds(WorkerStallMs(s)));
      w.Signal(SIGCONT);
      ++result_.counts.worker_stalls;
      return OkStatus();
    }
    case Fault::kDbRestart: {
      const std::string prefix = o_.pg_run_as.empty() ? "" : o_.pg_run_as + " ";
      const std::string ctl = prefix + o_.pg_bin + "/pg_ctl -D " + o_.pg_data;
      Note("database restart");
      if (std::system((ctl + " -m fast -w stop > /dev/null 2>&1").c_str()) != 0) {
        return UnavailableError("pg_ctl stop failed");
      }
      std::this_thread::sleep_for(milliseconds(200 + static_cast<int64_t>(s.b % 800)));
      // The log beside the data directory: pg_ctl may run as another user (pg_run_as).
      const std::string log = o_.pg_data + "/../chaos-restart.log";
      if (std::system((ctl + " -w -l " + log + " start > /dev/null 2>&1").c_str()) != 0) {
        return UnavailableError("pg_ctl start failed; see " + log);
      }
      ++result_.counts.db_restarts;
      return OkStatus();
    }
  }
  return OkStatus();
}

void Campaign::Progress(const std::string& phase) {
  if (!o_.on_progress) return;
  const auto now = Steady::now();
  if (now - last_progress_ < milliseconds(500)) return;
  last_progress_ = now;
  std::ostringstream s;
  s << phase << " requests " << requests_.load() << ", violations "
    << history_.live_violations();
  o_.on_progress(result_.counts.kills, s.str());
}

Status Campaign::FinalPass() {
  // Every key still resendable once more, with the body it was first sent with: a
  // given-up key gets the completer's answer, every other key its stored one. Older keys
  // may have expired (the checker reads their outcome from the stores instead).
  auto originals = history_.originals();
  std::vector<std::tuple<std::pair<std::string, std::string>, std::string, KeyInfo>> work;
  {
    std::lock_guard<std::mutex> l(keys_mu_);
    for (const auto& [id, body] : originals) {
      auto info = key_info_.find(id);
      if (info != key_info_.end() && Resendable(info->second.first_sent)) {
        work.emplace_back(id, body, info->second);
      }
    }
  }
  std::atomic<size_t> next{0};
  std::vector<std::thread> ts;
  for (int c = 0; c < o_.clients; ++c) {
    ts.emplace_back([&, c] {
      std::mt19937_64 rng(o_.seed + static_cast<uint64_t>(c) * 7919);
      for (size_t i; (i = next.fetch_add(1)) < work.size();) {
        const auto& [id, body, info] = work[i];
        Until(rng, info.api, id.first, id.second, body, "final", info.first_sent);
      }
    });
  }
  while (next.load() < work.size()) {
    Progress("final pass " + std::to_string(std::min(next.load(), work.size())) + "/" +
             std::to_string(work.size()) + " keys;");
    std::this_thread::sleep_for(milliseconds(200));
  }
  for (auto& t : ts) t.join();
  result_.counts.final_pass_keys = static_cast<int64_t>(work.size());
  return OkStatus();
}

Status Campaign::Drain() {
  const CheckStores stores = Stores();
  const auto deadline = Steady::now() + std::chrono::seconds(180);
  std::string left;
  bool clean = false;
  Steady::time_point clean_since;
  while (Steady::now() < deadline) {
    auto u = Undrained(stores);
    // With NATS the stores can look drained while the stream still holds events a
    // consumer has not acked: wait for those too (then their effects show in the stores).
    const std::string broker = nats_ ? NatsUndrained() : "";
    if (u && u->empty() && broker.empty()) {
      // Drained when it stays so for a second: a reading between a delivery's fetch and
      // its commit on a node whose view lags must not end the drain.
      if (!clean) clean_since = Steady::now();
      clean = true;
      if (!nats_ || Steady::now() - clean_since >= std::chrono::seconds(1)) return OkStatus();
      std::this_thread::sleep_for(milliseconds(250));
      continue;
    }
    clean = false;
    left = u ? *u : u.error().ToString();
    if (!broker.empty()) left += (left.empty() ? "" : ", ") + broker;
    Progress("draining (" + left + ");");
    std::this_thread::sleep_for(milliseconds(250));
  }
  Note("not drained after 180 s: " + left);
  return OkStatus();  // the checker reports what is left
}

Result<json> Campaign::Jsz(int node) {
  auto r = http_.Send({.url = nats_server_->MonitorUrl(
                           node, "/jsz?accounts=true&streams=true&consumers=true"),
                       .timeout = std::chrono::seconds(5)});
  if (!r) return tl::unexpected(r.error());
  json jsz = json::parse(r->body, nullptr, false);
  if (r->status != 200 || !jsz.is_object()) {
    return tl::unexpected(UnavailableError("nats-server " + nats_server_->name(node) +
                                           " /jsz: " + std::to_string(r->status)));
  }
  return jsz;
}

namespace {
// The stream `name` in a /jsz answer, or null.
const json* StreamIn(const json& jsz, const std::string& name) {
  auto accounts = jsz.find("account_details");
  if (accounts == jsz.end() || !accounts->is_array()) return nullptr;
  for (const json& account : *accounts) {
    auto streams = account.find("stream_detail");
    if (streams == account.end() || !streams->is_array()) continue;
    for (const json& stream : *streams) {
      if (stream.value("name", "") == name) return &stream;
    }
  }
  return nullptr;
}
int64_t LastSeq(const json& stream) {
  return stream.value("state", json::object()).value("last_seq", int64_t{0});
}
std::string LeaderOf(const json& detail) {
  const json cluster = detail.value("cluster", json::object());
  return cluster.is_object() ? cluster.value("leader", "") : "";
}
}  // namespace

void Campaign::WaitCaughtUp(int node) {
  const auto deadline = Steady::now() + std::chrono::seconds(30);
  int64_t target = -1;  // the leader's last_seq when first read
  while (Steady::now() < deadline) {
    for (int other = 0; target < 0 && other < nats_server_->nodes(); ++other) {
      if (other == node || !nats_server_->alive(other)) continue;
      auto jsz = Jsz(other);
      const json* stream = jsz ? StreamIn(*jsz, "CONVERGE") : nullptr;
      if (stream != nullptr && LeaderOf(*stream) == nats_server_->name(other)) {
        target = LastSeq(*stream);
      }
    }
    if (target >= 0) {
      auto jsz = Jsz(node);
      const json* stream = jsz ? StreamIn(*jsz, "CONVERGE") : nullptr;
      if (stream != nullptr && LastSeq(*stream) >= target) return;
    }
    std::this_thread::sleep_for(milliseconds(100));
  }
  Note("nats-server " + nats_server_->name(node) + " not caught up within 30 s; going on");
}

// Each consumer as its leader sees it: on a cluster a follower's view lags (its stream
// may not hold the newest events yet, so its pending count can read 0 too early).
Result<json> Campaign::StreamConsumers() {
  json consumers = json::array();
  std::set<std::string> seen, led;
  Status last = UnavailableError("no nats-server node is up");
  int answered = 0;
  for (int node = 0; node < nats_server_->nodes(); ++node) {
    if (!nats_server_->alive(node)) continue;
    auto jsz = Jsz(node);
    if (!jsz) {
      last = jsz.error();
      continue;
    }
    ++answered;
    const json* stream = StreamIn(*jsz, "CONVERGE");
    if (stream == nullptr) continue;
    for (const json& c : stream->value("consumer_detail", json::array())) {
      const std::string name = c.value("name", "?");
      seen.insert(name);
      const bool leader =
          nats_server_->nodes() == 1 || LeaderOf(c) == nats_server_->name(node);
      if (leader && led.insert(name).second) consumers.push_back(c);
    }
  }
  if (answered == 0) return tl::unexpected(last);
  for (const std::string& name : seen) {
    if (led.count(name) == 0) {
      return tl::unexpected(UnavailableError("NATS consumer " + name + " has no leader up"));
    }
  }
  return consumers;
}

std::string Campaign::NatsUndrained() {
  if (nats_server_->nodes() > 1) {
    // Every node up and holding every event, so that each consumer's leader counts them
    // all (a leader whose copy of the stream lags reads 0 pending too early).
    std::string seqs;
    std::set<int64_t> distinct;
    for (int node = 0; node < nats_server_->nodes(); ++node) {
      if (!nats_server_->alive(node)) return "nats-server " + nats_server_->name(node) + " down";
      auto jsz = Jsz(node);
      if (!jsz) return "nats-server not answering (" + jsz.error().ToString() + ")";
      const json* stream = StreamIn(*jsz, "CONVERGE");
      const int64_t seq = stream != nullptr ? LastSeq(*stream) : -1;
      distinct.insert(seq);
      seqs += (seqs.empty() ? "" : "/") + std::to_string(seq);
    }
    if (distinct.size() > 1) return "nats-server nodes not caught up (last_seq " + seqs + ")";
  }
  auto consumers = StreamConsumers();
  if (!consumers) return "nats-server not answering (" + consumers.error().ToString() + ")";
  if (consumers->empty()) return "no NATS consumer listed yet";
  std::string left;
  for (const json& c : *consumers) {
    const int64_t n =
        c.value("num_pending", int64_t{0}) + c.value("num_ack_pending", int64_t{0});
    if (n > 0) {
      left += (left.empty() ? "" : ", ") + std::to_string(n) +
              " events not yet acked by NATS consumer " + c.value("name", "?");
    }
  }
  return left;
}

Result<ChaosResult> Campaign::Run() {
  CONVERGE_RETURN_IF_ERROR(SetUp());
  const bool db_restarts = pg_ && !o_.pg_bin.empty() && !o_.pg_data.empty();
  std::vector<std::thread> clients;
  for (int c = 0; c < o_.clients; ++c) clients.emplace_back([this, c] { Client(c); });
  const auto end = t0_ + o_.duration;
  Status st;
  while (st.ok() && (o_.duration.count() > 0 ? Steady::now() < end
                                              : result_.counts.kills < o_.kills)) {
    const Step s = Draw(sched_, instances_, db_restarts, nats_ ? o_.nats_nodes : 0);
    const auto until = Steady::now() + milliseconds(s.gap_ms);
    while (Steady::now() < until) {
      Progress("campaign:");
      std::this_thread::sleep_for(milliseconds(20));
    }
    st = CheckProcesses(/*restart=*/true);
    if (st.ok()) st = Inject(s);
  }
  stop_clients_ = true;
  for (auto& t : clients) t.join();
  if (!st.ok()) return tl::unexpected(st);
  // The faults stop: no armed failpoints, no pending provider or carrier faults, true
  // clocks.
  for (int i = 0; i < instances_; ++i) {
    (void)SetFailpoints(i, "");
    (void)Admin(i, "POST", "/admin/shipping/faults", R"({"fail_next":0,"reject_next":0})");
    (void)Admin(i, "PUT", "/admin/clock", R"({"offset_ms":0})");
  }
  (void)http_.Send({.method = "POST",
                    .url = "http://127.0.0.1:" + std::to_string(psp_->port()) + "/faults",
                    .body = R"({"fail_next":0,"timeout_next":0,"decline_next":0,)"
                            R"("in_use_next":0,"refuse_refund_next":0})"});
  (void)http_.Send({.method = "POST",
                    .url = "http://127.0.0.1:" + std::to_string(mail_->port()) + "/faults",
                    .body = R"({"fail_next":0})"});
  CONVERGE_RETURN_IF_ERROR(CheckProcesses(/*restart=*/true));
  CONVERGE_RETURN_IF_ERROR(FinalPass());
  CONVERGE_RETURN_IF_ERROR(Drain());
  CONVERGE_RETURN_IF_ERROR(CheckProcesses(/*restart=*/false));
  for (int i = 0; i < instances_; ++i) ScrapeTakeovers(i);
  std::string broker_left;
  if (nats_) {
    broker_left = NatsUndrained();
    CountNatsFigures();
  }

  ChaosCounts& n = result_.counts;
  n.requests = requests_;
  n.keys = keys_;
  n.duplicates = duplicates_;
  n.concurrent = concurrent_;
  n.mismatches = mismatches_;
  n.give_ups = give_ups_;
  n.replays = replays_;
  n.order_keys = order_keys_;
  n.resend_cutoffs = cutoffs_;
  n.by_status = by_status_;
  // Every process that runs a completer: the service instances and, with NATS, the workers.
  std::vector<std::string> logs;
  for (const auto& svc : svc_) logs.push_back(svc->log_path());
  for (const auto& w : workers_) logs.push_back(w->log_path());
  for (const std::string& path : logs) {
    std::ifstream log(path);
    for (std::string line; std::getline(log, line);) {
      if (line.find("event=completed_abandoned") != std::string::npos) ++n.completer_finishes;
    }
  }
  CONVERGE_RETURN_IF_ERROR(db_->Read([&](Tx& tx) -> Status {
    CONVERGE_ASSIGN_OR_RETURN(Rows r, tx.Query("SELECT count(*) FROM payments"));
    n.payments = r[0].Int(0);
    CONVERGE_ASSIGN_OR_RETURN(
        Rows sg, tx.Query("SELECT state, count(*) FROM saga_instances WHERE type = 'checkout' "
                          "GROUP BY state"));
    for (const auto& row : sg) n.orders_by_state[row.Text(0)] = row.Int(1);
    CONVERGE_ASSIGN_OR_RETURN(
        Rows m, tx.Query("SELECT count(*), coalesce(sum(captured), 0), "
                         "coalesce(sum(refunded), 0), "
                         "coalesce(sum(CASE WHEN shipped = 1 THEN amount ELSE 0 END), 0) "
                         "FROM orders"));
    n.orders = m[0].Int(0);
    n.order_captured = m[0].Int(1);
    n.order_refunded = m[0].Int(2);
    n.order_shipped = m[0].Int(3);
    return OkStatus();
  }));
  CONVERGE_RETURN_IF_ERROR(psp_db_->Read([&](Tx& tx) -> Status {
    CONVERGE_ASSIGN_OR_RETURN(
        Rows r, tx.Query("SELECT count(*), coalesce(sum(CASE WHEN status = 'refunded' THEN 1 "
                         "ELSE 0 END), 0) FROM charges WHERE status <> 'declined'"));
    n.charges = r[0].Int(0);
    n.refunded = r[0].Int(1);
    return OkStatus();
  }));
  result_.history = history_.ops();
  auto v = CheckHistory(result_.history, history_.originals(), Stores());
  if (!v) return tl::unexpected(v.error());
  if (!broker_left.empty()) result_.violations.push_back({"not-drained", broker_left});
  for (Violation& violation : *v) {
    // NATS gives no per-aggregate order (docs/design/nats.md): counted, not a violation.
    if (nats_ && violation.check == kEventOrderCheck) {
      ++n.out_of_order;
    } else {
      result_.violations.push_back(std::move(violation));
    }
  }
  n.seconds = std::chrono::duration<double>(Steady::now() - t0_).count();
  keep_ = o_.keep || !result_.violations.empty();
  result_.kept = keep_;
  return std::move(result_);
}

}  // namespace

std::vector<std::string> PlannedSchedule(uint64_t seed, int steps, int instances,
                                         bool db_restarts, int nats_nodes) {
  std::mt19937_64 rng(seed);
  std::vector<std::string> out;
  for (int i = 0; i < steps; ++i) {
    out.push_back(Describe(Draw(rng, instances, db_restarts, nats_nodes)));
  }
  return out;
}

Result<ChaosResult> RunChaos(const ChaosOptions& options) {
  if (options.kills < 1 && options.duration.count() <= 0) {
    return tl::unexpected(InvalidArgumentError("--kills must be at least 1"));
  }
  if (options.clients < 1 || options.clients > 256) {
    return tl::unexpected(InvalidArgumentError("--clients must be between 1 and 256"));
  }
  Campaign c(options);
  return c.Run();
}

std::string FormatViolations(const ChaosOptions& o, const ChaosResult& r) {
  std::ostringstream s;
  s << r.violations.size() << " violation(s); seed " << o.seed << " (replay: converge chaos --seed "
    << o.seed << " --store " << (o.store == "sqlite" ? "sqlite" : "<uri>")
    << (o.broker.empty() ? "" : " --broker " + o.broker)
    << (o.nats_nodes == 1 ? "" : " --nats-nodes " + std::to_string(o.nats_nodes))
    << (o.publish_in_transaction ? " --publish-in-transaction" : "") << " --kills "
    << o.kills << " --clients " << o.clients << ")\n\nschedule (" << r.schedule.size()
    << " faults):\n";
  for (size_t i = 0; i < r.schedule.size(); ++i) {
    if (r.schedule.size() > 120 && i == 60) {
      s << "  ... " << r.schedule.size() - 120 << " more ...\n";
      i = r.schedule.size() - 60;
    }
    s << "  " << r.schedule[i] << "\n";
  }
  for (const Violation& v : r.violations) {
    s << "\n[" << v.check << "] " << v.detail << "\n";
    const std::vector<Op> ops = Excerpt(r.history, v);
    std::string charge;
    for (const Op& op : ops) {
      s << "    " << FormatOp(op) << "\n";
      json j = json::parse(op.response, nullptr, false);
      if (op.status == 201 && j.is_object()) charge = j.value("charge_id", "");
    }
    // The faults near its requests (the final pass aside) or naming its charge.
    s << "  faults around it:\n";
    for (const std::string& f : r.schedule) {
      const int64_t t = std::atoll(f.c_str() + 2);  // "t=<ms>ms ..."
      bool near = !charge.empty() && f.find(charge) != std::string::npos;
      for (const Op& op : ops) {
        near = near || (op.kind != "final" && t > op.t_ms - 3000 && t < op.t_ms + 3000);
      }
      if (near) s << "    " << f << "\n";
    }
  }
  return s.str();
}

}  // namespace converge::harness
