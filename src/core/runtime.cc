#include "converge/runtime.h"

#include "converge/tx_publisher.h"

namespace converge {

Runtime::Runtime(Database& db, RuntimeOptions options, Clock* clock)
    : db_(db),
      options_(std::move(options)),
      clock_(clock ? clock : Clock::System()),
      keys_(db_, options_.keys, clock_),
      outbox_(options_.outbox, clock_),
      completer_(db_, keys_, options_.completer, clock_),
      sweeper_(db_, options_.sweep, clock_),
      sweep_worker_("sweeper", options_.sweep_interval, [this] { return SweepPass(); }) {}

Runtime::~Runtime() { Stop(); }

Relay& Runtime::AddRelay(Publisher& publisher, RelayOptions options) {
  relays_.push_back(std::make_unique<Relay>(db_, outbox_, publisher, std::move(options), clock_));
  relay_publishers_.push_back(&publisher);
  return *relays_.back();
}

Consumer& Runtime::AddConsumer(Subscriber& subscriber, ConsumerOptions options) {
  consumers_.push_back(std::make_unique<Consumer>(db_, subscriber, std::move(options), clock_));
  return *consumers_.back();
}

EffectRunner& Runtime::AddEffectRunner(EffectRunnerOptions options,
                                       EffectRunner::Executor executor) {
  effects_.push_back(
      std::make_unique<EffectRunner>(db_, std::move(options), std::move(executor), clock_));
  return *effects_.back();
}

SagaRunner& Runtime::AddSaga(SagaDefinition definition, SagaRunnerOptions options) {
  sagas_.push_back(std::make_unique<SagaRunner>(db_, std::move(definition), options, clock_));
  return *sagas_.back();
}

Status Runtime::Validate() const {
  CONVERGE_RETURN_IF_ERROR(IdempotencyKeys::ValidateOptions(options_.keys));
  for (const auto& c : consumers_) CONVERGE_RETURN_IF_ERROR(c->Validate());
  for (const auto& s : sagas_) CONVERGE_RETURN_IF_ERROR(s->Validate());
  CONVERGE_RETURN_IF_ERROR(Sweeper::ValidateOptions(options_.sweep));
  if (options_.sweep_interval < Millis(0)) {
    return InvalidArgumentError("sweep interval must not be negative");
  }
  if (options_.publish_in_transaction) {
    CONVERGE_RETURN_IF_ERROR(StatusOf(InTransactionPublisher()));
  }
  return OkStatus();
}

Result<TxPublisher*> Runtime::InTransactionPublisher() const {
  // Every relay must publish where the producers publish: an event published in its
  // producer's transaction is never seen by a relay, so a relay to another transport
  // (NATS beside the SQL queue) would never get it.
  TxPublisher* target = nullptr;
  for (Publisher* p : relay_publishers_) {
    TxPublisher* tp = p->tx_publisher();
    if (tp == nullptr || tp->database() != &db_) {
      return tl::unexpected(InvalidArgumentError(
          "publish_in_transaction: a relay publishes to a transport outside this store's "
          "database; only a transport in it (the SQL queue) can publish in a producer's "
          "transaction"));
    }
    if (target != nullptr && tp != target) {
      return tl::unexpected(InvalidArgumentError(
          "publish_in_transaction: the relays publish through different transport objects; "
          "an event published in its producer's transaction goes through one, so give "
          "every relay the same"));
    }
    target = tp;
  }
  if (target == nullptr) {
    return tl::unexpected(InvalidArgumentError(
        "publish_in_transaction: no relay, so no transport to publish to (AddRelay first)"));
  }
  return target;
}

Status Runtime::Start() {
  if (started_) return OkStatus();
  CONVERGE_RETURN_IF_ERROR(Validate());
  for (auto& r : relays_) r->Start();
  for (auto& c : consumers_) CONVERGE_RETURN_IF_ERROR(c->Start());  // validated above
  for (auto& e : effects_) e->Start();
  for (auto& s : sagas_) s->Start();
  completer_.Start();
  if (options_.sweep_interval > Millis(0)) sweep_worker_.Start();
  // Last, once everything started (validated above).
  if (options_.publish_in_transaction) outbox_.PublishInTransaction(*InTransactionPublisher());
  started_ = true;
  return OkStatus();
}

void Runtime::Stop() {
  if (!started_) return;
  started_ = false;
  sweep_worker_.Stop();
  completer_.Stop();
  for (auto it = sagas_.rbegin(); it != sagas_.rend(); ++it) (*it)->Stop();
  for (auto it = effects_.rbegin(); it != effects_.rend(); ++it) (*it)->Stop();
  for (auto it = consumers_.rbegin(); it != consumers_.rend(); ++it) (*it)->Stop();
  for (auto it = relays_.rbegin(); it != relays_.rend(); ++it) (*it)->Stop();
}

bool Runtime::SweepPass() {
  auto swept = sweeper_.RunOnce();
  std::lock_guard<std::mutex> l(stats_mu_);
  if (!swept) {
    stats_.last_sweep_error = swept.error().ToString();
    return false;
  }
  stats_.swept += swept->total();
  // A full batch in a table, or a walk in key order behind its schedule: sweep again at
  // once.
  return swept->more;
}

RuntimeStats Runtime::stats() const {
  std::lock_guard<std::mutex> l(stats_mu_);
  return stats_;
}

}  // namespace converge
