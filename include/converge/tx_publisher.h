// TxPublisher and TxSettler: publishing and settling inside a store transaction, for
// transports that live in the database itself (the SQL queue). When the relay's outbox is
// in that same database, it claims, publishes and marks a batch in one local transaction,
// and the window between "published" and "marked" that an external broker has does not
// exist (docs/design/outbox-relay.md); a consumer in it settles in its effects' transaction.
//
// A transport offers this next to its Publisher (Publisher::tx_publisher()); a broker
// outside the database (NATS) does not, and the relay publishes to it in two steps.
//
// Thread safety: implementations are safe to use from many threads; a Tx is used only by
// the thread it was handed to.
#ifndef CONVERGE_TX_PUBLISHER_H_
#define CONVERGE_TX_PUBLISHER_H_

#include <span>
#include <vector>

#include "converge/database.h"
#include "converge/event.h"
#include "converge/status.h"
#include "converge/transport.h"

namespace converge {

class TxPublisher {
 public:
  virtual ~TxPublisher() = default;

  // The database whose transactions PublishInTx writes through. The relay uses this
  // publisher only when it is the outbox's own database.
  virtual Database* database() = 0;

  // Publishes `batch` in order through `tx`: subscribers see it when tx commits, and
  // never if it rolls back. REQUIRES: tx belongs to database(); every event's envelope
  // is set. Errors: the store's.
  virtual Status PublishInTx(Tx& tx, std::span<const Event> batch) = 0;
};

// The transactional face of a subscriber whose queue lives in the database (the SQL
// queue): a consumer on that same database settles its deliveries inside the transaction
// that commits their inbox rows and effects, so the ack commits with the effect or not at
// all, and costs no transaction of its own (docs/design/consumer-inbox.md).
class TxSettler {
 public:
  virtual ~TxSettler() = default;
  // The database whose transactions SettleInTx writes through.
  virtual Database* database() = 0;
  // Subscriber::Settle, through `tx`: it takes effect when tx commits, never if it rolls
  // back. REQUIRES: tx belongs to database(). kInvalidArgument as Settle; else the store's.
  virtual Status SettleInTx(Tx& tx, std::span<const Delivery> deliveries,
                            std::span<const Settlement> settlements) = 0;

  // Subscriber::Fetch, through `tx`: the claims take effect when tx commits, never if it
  // rolls back, and the deliveries must not be started before then. A consumer claims its
  // next batch in the transaction that commits the current one's effects, so that a batch
  // costs one transaction, not two. The default claims nothing (the consumer then
  // fetches). REQUIRES: tx belongs to database().
  virtual Result<std::vector<Delivery>> FetchInTx(Tx& tx, size_t max, Millis visibility) {
    (void)tx;
    (void)max;
    (void)visibility;
    return std::vector<Delivery>{};
  }
  // Gives back deliveries claimed by FetchInTx and never started (their consumer stops):
  // ready again at once, their delivery not counted. Only those still under that claim.
  virtual Status ReleaseInTx(Tx& tx, std::span<const Delivery> deliveries) {
    (void)tx;
    (void)deliveries;
    return OkStatus();
  }
};

}  // namespace converge

#endif  // CONVERGE_TX_PUBLISHER_H_
