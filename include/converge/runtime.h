// Runtime: one object that owns a service's background machinery over one Database: the
// idempotency keys and their completer, the outbox and its relays, consumers, effect
// runners, saga runners and the retention sweeper. It checks their options together,
// starts them together and stops them together (each finishes the pass under way), so a
// service's main() is: open the store, build a Runtime, register, Start(), serve, Stop().
//
//   auto db = Database::Open("sqlite:app.db");
//   Runtime rt(**db, {.keys = {.ttl = 24h, .lease = 30s}});
//   SqlQueue queue(**db);
//   rt.AddRelay(queue);
//   auto sub = queue.OpenSubscriber("ledger");
//   rt.AddConsumer(*sub, {.name = "ledger"}).On("payment.captured", Book);
//   CONVERGE_RETURN_IF_ERROR(rt.Start());
//
// Thread safety: register (Add*, On, completer().On) before Start(); Start and Stop from
// one owner thread; the accessors are safe from any thread once started.
#ifndef CONVERGE_RUNTIME_H_
#define CONVERGE_RUNTIME_H_

#include <chrono>
#include <memory>
#include <vector>

#include "converge/clock.h"
#include "converge/completer.h"
#include "converge/consumer.h"
#include "converge/database.h"
#include "converge/effects.h"
#include "converge/idempotency.h"
#include "converge/outbox.h"
#include "converge/relay.h"
#include "converge/saga.h"
#include "converge/sweeper.h"
#include "converge/transport.h"
#include "converge/worker.h"

namespace converge {

struct RuntimeOptions {
  IdempotencyOptions keys;
  OutboxOptions outbox;
  CompleterOptions completer;
  SweepOptions sweep;
  // How often the sweeper runs when it found nothing to do; 0 runs no sweeper.
  Millis sweep_interval = std::chrono::seconds(60);
  // Once started, the outbox publishes each event in its producer's transaction
  // (Outbox::PublishInTransaction) instead of leaving it to a relay pass: one durable
  // commit less between a producer's commit and its consumers. The relays stay, to
  // publish what waits in the outbox (events of before, of other processes). Requires
  // that every relay publish to one transport in this runtime's database (the SQL queue
  // in the store): Validate says kInvalidArgument otherwise. Off by default.
  bool publish_in_transaction = false;
};

struct RuntimeStats {
  int64_t swept = 0;  // rows the sweeper deleted since Start
  std::string last_sweep_error;
};

class Runtime {
 public:
  // `db` (and `clock`; nullptr = Clock::System()) must outlive the runtime.
  explicit Runtime(Database& db, RuntimeOptions options = {}, Clock* clock = nullptr);
  ~Runtime();  // Stop()s
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  Database& db() { return db_; }
  Clock* clock() { return clock_; }
  IdempotencyKeys& keys() { return keys_; }
  Outbox& outbox() { return outbox_; }
  Completer& completer() { return completer_; }

  // Workers, owned by the runtime; the references live as long as it does. `publisher`
  // and `subscriber` must outlive the runtime. REQUIRES: not started.
  Relay& AddRelay(Publisher& publisher, RelayOptions options = {});
  Consumer& AddConsumer(Subscriber& subscriber, ConsumerOptions options);
  EffectRunner& AddEffectRunner(EffectRunnerOptions options, EffectRunner::Executor executor);
  SagaRunner& AddSaga(SagaDefinition definition, SagaRunnerOptions options = {});

  // kInvalidArgument naming the first unsafe option: the keys' ttl and lease, a consumer
  // whose inbox does not outlive redelivery, an effect runner without a kind, a saga
  // definition SagaRunner::Validate refuses, publish_in_transaction without one
  // transactional publisher in this database behind every relay.
  Status Validate() const;
  // Validates, then starts every worker; on an error starts nothing.
  Status Start();
  // Stops every worker (each finishes its pass), in the reverse order of Start. Idempotent.
  void Stop();

  const std::vector<std::unique_ptr<Relay>>& relays() const { return relays_; }
  const std::vector<std::unique_ptr<Consumer>>& consumers() const { return consumers_; }
  const std::vector<std::unique_ptr<EffectRunner>>& effect_runners() const { return effects_; }
  const std::vector<std::unique_ptr<SagaRunner>>& saga_runners() const { return sagas_; }
  RuntimeStats stats() const;

 private:
  bool SweepPass();
  // The one transactional publisher behind every relay, for publish_in_transaction.
  Result<TxPublisher*> InTransactionPublisher() const;

  Database& db_;
  const RuntimeOptions options_;
  Clock* clock_;
  IdempotencyKeys keys_;
  Outbox outbox_;
  Completer completer_;
  Sweeper sweeper_;
  PollingWorker sweep_worker_;
  std::vector<std::unique_ptr<Relay>> relays_;
  std::vector<Publisher*> relay_publishers_;  // relays_[i] publishes to [i]
  std::vector<std::unique_ptr<Consumer>> consumers_;
  std::vector<std::unique_ptr<EffectRunner>> effects_;
  std::vector<std::unique_ptr<SagaRunner>> sagas_;
  bool started_ = false;
  mutable std::mutex stats_mu_;
  RuntimeStats stats_;
};

}  // namespace converge

#endif  // CONVERGE_RUNTIME_H_
