// The history checker of the chaos campaign (docs/design/chaos.md, "The campaign").
//
// A History records every client-visible exchange with the payments service (payments
// and checkout orders): who asked
// (tenant, Idempotency-Key), with which body, what came back (status, body, replay mark)
// and when. After the system has drained, CheckHistory() compares that history with the
// stores: the service's own (payments, ledger, idempotency keys, outbox, queues, effects,
// dead letters, orders, sagas, inventory, reservations, shipments), the payment
// provider's (charges, refused refunds, webhook deliveries) and the mail provider's
// (messages). Every violation names the key, payment or order it concerns, so Excerpt()
// can print the shortest part of the history that shows it.
//
// Thread safety: History is safe to use from many threads; CheckHistory() reads a copy.
#ifndef CONVERGE_HARNESS_CHAOS_CHECK_H_
#define CONVERGE_HARNESS_CHAOS_CHECK_H_

#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "converge/database.h"

namespace converge::harness {

// One request and its answer, as the client saw it.
struct Op {
  int64_t seq = 0;
  int64_t t_ms = 0;      // since the campaign started
  std::string tenant;    // the scope of the key
  std::string key;       // Idempotency-Key
  std::string kind;      // "first", "retry", "duplicate", "concurrent", "mismatch",
                         // "give-up", "final"
  std::string request;   // the request body
  int status = 0;        // 0: no answer (connection lost, timed out, the process died)
  std::string response;  // the response body
  bool replayed = false;  // Idempotent-Replayed: true
  std::string api = "payments";  // "payments" (POST /v1/payments, 201) or "orders"
                                 // (POST /v1/orders, 202: a checkout saga)
};

// The status that accepts a request of `api`: 201 for a payment, 202 for an order.
int SuccessStatus(const std::string& api);

class History {
 public:
  // Appends `op` (its seq and t_ms are set here). Checks at once what the history alone
  // can tell: a 201 for a key whose earlier 201 had another body is a violation, counted
  // in live_violations() for the progress bar.
  void Add(Op op);
  // The body a key was first sent with: "same body" in every check means this one.
  void SetOriginal(const std::string& tenant, const std::string& key, const std::string& body);
  std::vector<Op> ops() const;
  std::map<std::pair<std::string, std::string>, std::string> originals() const;
  int64_t size() const;
  int64_t live_violations() const { return live_violations_.load(); }

 private:
  mutable std::mutex mu_;
  std::vector<Op> ops_;
  std::map<std::pair<std::string, std::string>, std::string> originals_;
  std::map<std::pair<std::string, std::string>, std::string> first_201_;
  std::atomic<int64_t> live_violations_{0};
  const int64_t start_ms_ = NowMs();
  static int64_t NowMs();
};

// The check of per-aggregate event order (a payment's refund booked before its capture).
inline constexpr char kEventOrderCheck[] = "event-order";

struct Violation {
  std::string check;   // which invariant, e.g. "charged-twice"
  std::string detail;  // what was found
  std::string tenant, key;    // the key it concerns (empty when none)
  std::string payment_id;     // the payment (or order) it concerns (empty when none)
};

// What the checker reads besides the history.
struct CheckStores {
  Database* service = nullptr;  // the service's store (SQLite or PostgreSQL)
  Database* psp = nullptr;      // the payment provider's SQLite file
  Database* mail = nullptr;     // the mail provider's SQLite file
  // Event ids of the dead letters the campaign caused on purpose (poison webhooks):
  // the only ones allowed.
  std::set<std::string> injected_dead_letters;
  // Checkout orders: each SKU's stock before the first order (the campaign sets it).
  std::map<std::string, int64_t> initial_stock;
  // Whether idempotency keys may have expired (a short TTL): then a key row may be gone.
  // The campaign never sends a key again once its TTL could have run out, so a second
  // payment or order for one key is still a violation.
  bool keys_may_expire = false;
};

// Every invariant of docs/design/chaos.md, "What the checker verifies". An error Status
// only when a store could not be read; violations are the result otherwise.
Result<std::vector<Violation>> CheckHistory(const std::vector<Op>& ops,
                                            const std::map<std::pair<std::string, std::string>,
                                                           std::string>& originals,
                                            const CheckStores& stores);

// What still runs or waits in the stores (for the drain loop): empty when drained, else a
// short description of what is left.
Result<std::string> Undrained(const CheckStores& stores);

// The ops of the violation's key (or of the key whose 201 named its payment), in order,
// at most `max_ops` of them (the first and the last ones when there are more).
std::vector<Op> Excerpt(const std::vector<Op>& ops, const Violation& v, size_t max_ops = 16);
std::string FormatOp(const Op& op);

}  // namespace converge::harness

#endif  // CONVERGE_HARNESS_CHAOS_CHECK_H_
