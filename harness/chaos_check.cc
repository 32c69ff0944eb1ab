#include "harness/chaos_check.h"

#include <algorithm>
#include <set>

#include <nlohmann/json.hpp>

#include "converge/clock.h"

namespace converge::harness {
namespace {

using json = nlohmann::json;
using KeyId = std::pair<std::string, std::string>;

std::string PaymentIdOf(const std::string& body) {
  json j = json::parse(body, nullptr, false);
  return j.is_object() && j["id"].is_string() ? j["id"].get<std::string>() : "";
}

std::string Clip(const std::string& s, size_t n = 160) {
  return s.size() <= n ? s : s.substr(0, n) + "...";
}

struct OrderRow {
  std::string id, tenant, customer_id, sku;
  int64_t qty = 0, amount = 0, captured = 0, refunded = 0;
  bool shipped = false;
};

// The payment a checkout order's capture step creates (examples/payments/checkout.cc).
std::string OrderPaymentId(const std::string& order_id) {
  return order_id.size() > 4 ? "pay_" + order_id.substr(4) : "";
}

bool SagaSettled(const std::string& state) {
  return state == "completed" || state == "compensated" || state == "failed_to_compensate";
}

struct Payment {
  std::string id, tenant, order_id, status, charge_id;
  int64_t amount = 0;
};
struct Charge {
  std::string id, reference, status;
};
struct Entry {
  int64_t id = 0;
  std::string kind;
  int64_t amount = 0;
};

}  // namespace

int SuccessStatus(const std::string& api) { return api == "orders" ? 202 : 201; }

int64_t History::NowMs() { return Clock::System()->NowMillis(); }

void History::Add(Op op) {
  std::lock_guard<std::mutex> l(mu_);
  op.seq = static_cast<int64_t>(ops_.size());
  op.t_ms = NowMs() - start_ms_;
  const KeyId id{op.tenant, op.key};
  if (op.status == SuccessStatus(op.api)) {
    auto [it, fresh] = first_201_.emplace(id, op.response);
    if (!fresh && it->second != op.response) ++live_violations_;
  }
  ops_.push_back(std::move(op));
}

void History::SetOriginal(const std::string& tenant, const std::string& key,
                          const std::string& body) {
  std::lock_guard<std::mutex> l(mu_);
  originals_.emplace(KeyId{tenant, key}, body);
}

std::vector<Op> History::ops() const {
  std::lock_guard<std::mutex> l(mu_);
  return ops_;
}

std::map<KeyId, std::string> History::originals() const {
  std::lock_guard<std::mutex> l(mu_);
  return originals_;
}

int64_t History::size() const {
  std::lock_guard<std::mutex> l(mu_);
  return static_cast<int64_t>(ops_.size());
}

Result<std::vector<Violation>> CheckHistory(const std::vector<Op>& ops,
                                            const std::map<KeyId, std::string>& originals,
                                            const CheckStores& stores) {
  std::vector<Violation> out;
  auto violate = [&](std::string check, std::string detail, const KeyId& k = {},
                     std::string payment = "") {
    out.push_back({std::move(check), std::move(detail), k.first, k.second, std::move(payment)});
  };

  // --- read the stores ----------------------------------------------------------------
  std::map<std::string, Payment> payments;  // by id
  std::map<std::string, std::vector<Entry>> ledger;  // by payment id
  std::map<KeyId, std::pair<std::string, std::string>> key_rows;  // status, response body
  std::vector<std::pair<std::string, std::string>> dead_letters;  // queue, event id
  std::map<std::string, OrderRow> orders;                          // by id
  std::map<std::string, std::string> sagas;                        // checkout saga -> state
  std::map<std::string, std::pair<int64_t, int64_t>> inventory;    // sku -> available, reserved
  std::map<std::string, std::pair<std::string, int64_t>> reservations;  // order -> state, qty
  std::map<std::string, std::string> shipments;                    // order -> state
  CONVERGE_RETURN_IF_ERROR(stores.service->Read([&](Tx& tx) -> Status {
    CONVERGE_ASSIGN_OR_RETURN(Rows p, tx.Query("SELECT id, tenant, order_id, status, "
                                               "psp_charge_id, amount FROM payments"));
    for (const auto& r : p) {
      payments[r.Text(0)] = {r.Text(0), r.Text(1), r.Text(2), r.Text(3), r.Text(4), r.Int(5)};
    }
    CONVERGE_ASSIGN_OR_RETURN(
        Rows l, tx.Query("SELECT id, payment_id, kind, amount FROM ledger_entries ORDER BY id"));
    for (const auto& r : l) ledger[r.Text(1)].push_back({r.Int(0), r.Text(2), r.Int(3)});
    CONVERGE_ASSIGN_OR_RETURN(
        Rows k, tx.Query("SELECT scope, key, status, response_body FROM idempotency_keys"));
    for (const auto& r : k) key_rows[{r.Text(0), r.Text(1)}] = {r.Text(2), r.Text(3)};
    CONVERGE_ASSIGN_OR_RETURN(
        Rows d, tx.Query("SELECT queue, event_id FROM dead_letters WHERE state = 'parked'"));
    for (const auto& r : d) dead_letters.emplace_back(r.Text(0), r.Text(1));
    CONVERGE_ASSIGN_OR_RETURN(
        Rows o, tx.Query("SELECT id, tenant, customer_id, sku, qty, amount, captured, refunded, "
                         "shipped FROM orders"));
    for (const auto& r : o) {
      orders[r.Text(0)] = {r.Text(0), r.Text(1), r.Text(2), r.Text(3), r.Int(4),
                           r.Int(5),  r.Int(6),  r.Int(7),  r.Int(8) == 1};
    }
    CONVERGE_ASSIGN_OR_RETURN(
        Rows sg, tx.Query("SELECT saga_id, state FROM saga_instances WHERE type = 'checkout'"));
    for (const auto& r : sg) sagas[r.Text(0)] = r.Text(1);
    CONVERGE_ASSIGN_OR_RETURN(Rows inv,
                              tx.Query("SELECT sku, available, reserved FROM inventory"));
    for (const auto& r : inv) inventory[r.Text(0)] = {r.Int(1), r.Int(2)};
    CONVERGE_ASSIGN_OR_RETURN(Rows res,
                              tx.Query("SELECT order_id, state, qty FROM reservations"));
    for (const auto& r : res) reservations[r.Text(0)] = {r.Text(1), r.Int(2)};
    CONVERGE_ASSIGN_OR_RETURN(Rows sh, tx.Query("SELECT order_id, state FROM shipments"));
    for (const auto& r : sh) shipments[r.Text(0)] = r.Text(1);
    return OkStatus();
  }));
  std::vector<Charge> charges;
  std::set<std::string> refused_refunds;  // payment ids whose refund the provider refused
  CONVERGE_RETURN_IF_ERROR(stores.psp->Read([&](Tx& tx) -> Status {
    CONVERGE_ASSIGN_OR_RETURN(Rows c, tx.Query("SELECT id, reference, status FROM charges"));
    for (const auto& r : c) charges.push_back({r.Text(0), r.Text(1), r.Text(2)});
    CONVERGE_ASSIGN_OR_RETURN(Rows rr, tx.Query("SELECT reference FROM refused_refunds"));
    for (const auto& r : rr) refused_refunds.insert(r.Text(0));
    return OkStatus();
  }));
  std::map<std::string, int64_t> receipts;  // mail idempotency key -> messages
  CONVERGE_RETURN_IF_ERROR(stores.mail->Read([&](Tx& tx) -> Status {
    CONVERGE_ASSIGN_OR_RETURN(
        Rows m, tx.Query("SELECT idempotency_key, count(*) FROM messages GROUP BY "
                         "idempotency_key"));
    for (const auto& r : m) receipts[r.Text(0)] = r.Int(1);
    return OkStatus();
  }));

  // --- the history against itself and the keys ----------------------------------------
  std::map<KeyId, const Op*> first_201;
  std::map<std::string, KeyId> key_of_payment;
  for (const Op& op : ops) {
    const KeyId id{op.tenant, op.key};
    auto orig = originals.find(id);
    const bool same_body = orig != originals.end() && orig->second == op.request;
    if (op.status == 422 && same_body) {
      violate("422-same-body", "seq " + std::to_string(op.seq) +
                                   ": 422 for the body the key was first sent with", id);
    }
    if (!same_body && op.status >= 200 && op.status < 300) {
      violate("reused-key-accepted", "seq " + std::to_string(op.seq) + ": " +
                                         std::to_string(op.status) +
                                         " for a body other than the key's first", id);
    }
    if (op.status != SuccessStatus(op.api)) continue;
    auto [it, fresh] = first_201.emplace(id, &op);
    if (fresh) {
      if (op.api == "payments") key_of_payment[PaymentIdOf(op.response)] = id;
    } else if (it->second->response != op.response) {
      violate("replay-differs", "seq " + std::to_string(op.seq) + " got \"" +
                                    Clip(op.response) + "\", the first 201 (seq " +
                                    std::to_string(it->second->seq) + ") was \"" +
                                    Clip(it->second->response) + "\"",
              id);
    }
  }
  std::map<KeyId, int64_t> payments_per_key;  // order_id is the key in the campaign
  for (const auto& [pid, p] : payments) ++payments_per_key[{p.tenant, p.order_id}];
  for (const auto& [id, op] : first_201) {
    auto row = key_rows.find(id);
    // A key row may be gone only by expiry (the campaign sends nothing after it).
    if ((row == key_rows.end() && !stores.keys_may_expire) ||
        (row != key_rows.end() &&
         (row->second.first != "completed" || row->second.second != op->response))) {
      violate("stored-response",
              "the key's stored response is not the " + std::to_string(op->status) +
                  " the client got: " +
                  (row == key_rows.end() ? std::string("no key row")
                                         : row->second.first + " \"" +
                                               Clip(row->second.second) + "\""),
              id, PaymentIdOf(op->response));
    }
    if (op->api != "payments") continue;  // orders: below
    const std::string pid = PaymentIdOf(op->response);
    auto p = payments.find(pid);
    if (p == payments.end()) {
      violate("201-without-payment", "the 201 names payment '" + pid + "', not in the store",
              id, pid);
    } else if (p->second.status != "captured" && p->second.status != "refunded") {
      violate("201-payment-state", "payment " + pid + " is " + p->second.status, id, pid);
    }
    if (int64_t n = payments_per_key[id]; n != 1) {
      violate("payments-per-key", std::to_string(n) + " payments for a key with a 201", id, pid);
    }
  }
  for (const auto& [id, n] : payments_per_key) {
    if (n > 1 && !first_201.count(id)) {
      violate("payments-per-key", std::to_string(n) + " payments for one key", id);
    }
  }

  // --- money: charges against payments -------------------------------------------------
  std::map<std::string, std::vector<const Charge*>> money_by_ref;
  for (const Charge& c : charges) {
    if (c.status == "succeeded" || c.status == "refunded") money_by_ref[c.reference].push_back(&c);
  }
  for (const auto& [ref, cs] : money_by_ref) {
    const KeyId k = key_of_payment.count(ref) ? key_of_payment[ref] : KeyId{};
    if (cs.size() > 1) {
      violate("charged-twice", std::to_string(cs.size()) + " charges for payment " + ref, k, ref);
    }
    auto p = payments.find(ref);
    if (p == payments.end()) {
      violate("orphan-charge", "charge " + cs[0]->id + " for no payment '" + ref + "'", k, ref);
      continue;
    }
    const Payment& pay = p->second;
    if (pay.status != "captured" && pay.status != "refunded") {
      violate("orphan-charge", "charge " + cs[0]->id + " but payment " + ref + " is " +
                                   pay.status, k, ref);
    }
    if (pay.charge_id != cs[0]->id) {
      violate("charge-id", "payment " + ref + " records charge '" + pay.charge_id +
                               "', the provider has " + cs[0]->id, k, ref);
    }
    if ((cs[0]->status == "refunded") != (pay.status == "refunded")) {
      violate("refund-state", "charge " + cs[0]->id + " is " + cs[0]->status +
                                  ", payment " + ref + " is " + pay.status, k, ref);
    }
  }

  // --- per payment: a charge, the ledger, the receipt, the order ----------------------
  for (const auto& [pid, p] : payments) {
    const KeyId k{p.tenant, p.order_id};
    const bool captured = p.status == "captured" || p.status == "refunded";
    // Past its first phase a payment request is never forgotten: the completer ends it.
    if (p.status == "pending") {
      violate("payment-unfinished", "payment " + pid + " is still pending", k, pid);
    }
    if (captured && !money_by_ref.count(pid)) {
      violate("captured-without-charge", "payment " + pid + " is " + p.status +
                                             " without a provider charge", k, pid);
    }
    int64_t cap_n = 0, cap_sum = 0, ref_n = 0, ref_sum = 0, last_cap = 0, first_ref = INT64_MAX;
    for (const Entry& e : ledger[pid]) {
      if (e.kind == "capture") ++cap_n, cap_sum += e.amount, last_cap = std::max(last_cap, e.id);
      if (e.kind == "refund") ++ref_n, ref_sum += e.amount, first_ref = std::min(first_ref, e.id);
    }
    const int64_t want_cap = captured ? 2 : 0, want_ref = p.status == "refunded" ? 2 : 0;
    if (cap_n != want_cap || ref_n != want_ref || cap_sum != 0 || ref_sum != 0) {
      violate("ledger", "payment " + pid + " (" + p.status + "): " + std::to_string(cap_n) +
                            " capture entries (sum " + std::to_string(cap_sum) + "), " +
                            std::to_string(ref_n) + " refund entries (sum " +
                            std::to_string(ref_sum) + ")", k, pid);
    }
    if (ref_n > 0 && cap_n > 0 && first_ref < last_cap) {
      violate(kEventOrderCheck, "payment " + pid + ": the ledger consumer booked the refund "
                             "before the capture", k, pid);
    }
    auto rc = receipts.find("receipt:" + pid);
    const int64_t mails = rc == receipts.end() ? 0 : rc->second;
    if (mails != (captured ? 1 : 0)) {
      violate("receipts", "payment " + pid + " (" + p.status + "): " + std::to_string(mails) +
                              " receipt emails", k, pid);
    }
  }
  for (const auto& [key, n] : receipts) {
    if (key.rfind("receipt:", 0) == 0 && !payments.count(key.substr(8))) {
      violate("receipts", std::to_string(n) + " emails for unknown payment '" + key + "'");
    }
  }

  // --- orders: one saga per accepted key, settled, money and stock balanced ----------
  std::map<KeyId, int64_t> orders_per_key;  // customer_id is the key in the campaign
  for (const auto& [oid, o] : orders) ++orders_per_key[{o.tenant, o.customer_id}];
  for (const auto& [id, op] : first_201) {
    if (op->api != "orders") continue;
    const std::string oid = PaymentIdOf(op->response);
    auto o = orders.find(oid);
    if (o == orders.end() || o->second.tenant != id.first) {
      violate("202-without-order", "the 202 names order '" + oid + "', not in the store", id,
              oid);
    }
    if (int64_t n = orders_per_key[id]; n != 1) {
      violate("orders-per-key", std::to_string(n) + " orders for a key with a 202", id, oid);
    }
  }
  for (const auto& [id, n] : orders_per_key) {
    if (n > 1 && !first_201.count(id)) {
      violate("orders-per-key", std::to_string(n) + " orders for one key", id);
    }
  }
  // A saga may be parked only where the provider refused its refund (injected).
  auto parked_by_injection = [&](const std::string& oid) {
    return refused_refunds.count(OrderPaymentId(oid)) > 0;
  };
  std::map<std::string, int64_t> shipped_qty, held_qty;  // by sku
  for (const auto& [oid, o] : orders) {
    const KeyId k{o.tenant, o.customer_id};
    auto sg = sagas.find(oid);
    const std::string state = sg == sagas.end() ? "" : sg->second;
    if (sg == sagas.end()) {
      violate("saga-per-order", "order " + oid + " has no checkout saga", k, oid);
    } else if (!SagaSettled(state)) {
      violate("saga-not-final", "the saga of order " + oid + " is still " + state, k, oid);
    } else if (state == "failed_to_compensate" && !parked_by_injection(oid)) {
      violate("saga-parked", "the saga of order " + oid + " is parked, but no refund of its "
                             "was refused", k, oid);
    }
    if (o.shipped) shipped_qty[o.sku] += o.qty;
    auto res = reservations.find(oid);
    if (!o.shipped && res != reservations.end() && res->second.first == "reserved") {
      held_qty[o.sku] += res->second.second;
      if (state != "failed_to_compensate") {
        violate("stock", "order " + oid + " (" + state + ") still holds " +
                             std::to_string(res->second.second) + " of " + o.sku, k, oid);
      }
    }
    auto sh = shipments.find(oid);
    if (o.shipped != (sh != shipments.end() && sh->second == "created")) {
      violate("shipment", "order " + oid + " shipped=" + std::to_string(o.shipped) +
                              ", shipment " + (sh == shipments.end() ? "none" : sh->second), k,
              oid);
    }
    // Money: what was captured went out with the goods or came back, and the provider
    // agrees. A parked saga stopped before its refund: its money is the operator's.
    if (state == "failed_to_compensate") continue;
    const bool completed = state == "completed";
    auto charged = money_by_ref.find(OrderPaymentId(oid));
    const bool at_provider = charged != money_by_ref.end();
    const bool refunded_there = at_provider && charged->second[0]->status == "refunded";
    if (o.captured != (o.shipped ? o.amount : 0) + o.refunded ||
        o.captured != (at_provider ? o.amount : 0) ||
        o.refunded != (refunded_there ? o.amount : 0) || completed != o.shipped ||
        (completed && o.refunded != 0)) {
      violate("order-money",
              "order " + oid + " (" + state + ", amount " + std::to_string(o.amount) +
                  "): captured " + std::to_string(o.captured) + ", refunded " +
                  std::to_string(o.refunded) + ", shipped " + std::to_string(o.shipped) +
                  "; at the provider: " +
                  (at_provider ? charged->second[0]->status : std::string("no charge")),
              k, oid);
    }
  }
  for (const auto& [saga_id, state] : sagas) {
    if (!orders.count(saga_id)) {
      violate("saga-per-order", "checkout saga " + saga_id + " (" + state + ") has no order");
    }
  }
  for (const auto& [sku, inv] : inventory) {
    const auto [available, reserved] = inv;
    auto initial = stores.initial_stock.find(sku);
    if (available < 0 || reserved < 0 || reserved != held_qty[sku] ||
        (initial != stores.initial_stock.end() &&
         available + reserved + shipped_qty[sku] != initial->second)) {
      violate("stock", sku + ": available " + std::to_string(available) + ", reserved " +
                           std::to_string(reserved) + " (held by parked sagas: " +
                           std::to_string(held_qty[sku]) + "), shipped " +
                           std::to_string(shipped_qty[sku]) + ", initial " +
                           (initial == stores.initial_stock.end()
                                ? std::string("unknown")
                                : std::to_string(initial->second)));
    }
  }

  // --- what is left ------------------------------------------------------------------
  for (const auto& [queue, event_id] : dead_letters) {
    const bool injected_saga =
        queue.rfind("saga:", 0) == 0 && sagas.count(event_id) &&
        sagas[event_id] == "failed_to_compensate" && parked_by_injection(event_id);
    if (!stores.injected_dead_letters.count(event_id) && !injected_saga) {
      violate("dead-letter", "parked in " + queue + ": " + event_id + " (not injected)");
    }
  }
  CONVERGE_ASSIGN_OR_RETURN(std::string left, Undrained(stores));
  if (!left.empty()) violate("not-drained", left);
  return out;
}

Result<std::string> Undrained(const CheckStores& stores) {
  std::string left;
  auto note = [&](const char* what, int64_t n) {
    if (n > 0) left += (left.empty() ? "" : ", ") + std::to_string(n) + " " + what;
  };
  CONVERGE_RETURN_IF_ERROR(stores.service->Read([&](Tx& tx) -> Status {
    struct Q {
      const char* what;
      const char* sql;
    };
    for (const Q& q : {
             Q{"unpublished outbox events",
               "SELECT count(*) FROM outbox_events WHERE published_at IS NULL"},
             Q{"queued messages", "SELECT count(*) FROM queue_messages"},
             Q{"pending effects", "SELECT count(*) FROM effects WHERE state = 'pending'"},
             // A saga's journalled call that failed for good (a decline, a refused
             // refund) is settled: its saga compensated or parked (checked above).
             Q{"failed effects", "SELECT count(*) FROM effects WHERE state = 'failed' "
                                 "AND kind NOT LIKE 'saga:%'"},
             // Past its first phase a request has effects to finish: the completer's job.
             Q{"requests in progress past their first phase",
               "SELECT count(*) FROM idempotency_keys WHERE status = 'in_progress' "
               "AND recovery_point <> 'started'"},
             Q{"sagas not settled",
               "SELECT count(*) FROM saga_instances WHERE state IN ('running', "
               "'compensating')"},
         }) {
      CONVERGE_ASSIGN_OR_RETURN(Rows r, tx.Query(q.sql));
      note(q.what, r.empty() ? 0 : r[0].Int(0));
    }
    return OkStatus();
  }));
  CONVERGE_RETURN_IF_ERROR(stores.psp->Read([&](Tx& tx) -> Status {
    // By state and last answer, so a report says why (e.g. "1 failed after 401"); without
    // an answer, the last error of one of them ("Couldn't connect to server": nothing
    // listened; "Timeout was reached": something listened and did not answer).
    CONVERGE_ASSIGN_OR_RETURN(
        Rows r, tx.Query("SELECT state, coalesce(last_status, 0), count(*), max(attempts), "
                         "max(coalesce(last_error, '')) "
                         "FROM webhook_deliveries WHERE state <> 'delivered' "
                         "GROUP BY state, coalesce(last_status, 0)"));
    for (const auto& row : r) {
      const std::string error = row.Text(4);
      const std::string what = "provider webhooks not delivered (" + row.Text(0) +
                               ", last answer " + std::to_string(row.Int(1)) +
                               (error.empty() ? "" : ": " + error) + ", attempts " +
                               std::to_string(row.Int(3)) + ")";
      note(what.c_str(), row.Int(2));
    }
    return OkStatus();
  }));
  return left;
}

std::vector<Op> Excerpt(const std::vector<Op>& ops, const Violation& v, size_t max_ops) {
  KeyId id{v.tenant, v.key};
  if (v.key.empty() && !v.payment_id.empty()) {
    for (const Op& op : ops) {
      if (op.status == SuccessStatus(op.api) && PaymentIdOf(op.response) == v.payment_id) {
        id = {op.tenant, op.key};
        break;
      }
    }
  }
  std::vector<Op> mine;
  for (const Op& op : ops) {
    if (!id.second.empty() && op.tenant == id.first && op.key == id.second) mine.push_back(op);
  }
  if (mine.size() > max_ops) {
    mine.erase(mine.begin() + static_cast<std::ptrdiff_t>(max_ops / 2),
               mine.end() - static_cast<std::ptrdiff_t>(max_ops / 2));
  }
  return mine;
}

std::string FormatOp(const Op& op) {
  return "#" + std::to_string(op.seq) + " t=" + std::to_string(op.t_ms) + "ms " + op.tenant +
         "/" + op.key + " " + op.kind + " -> " + std::to_string(op.status) +
         (op.replayed ? " (replayed)" : "") + " req=" + Clip(op.request, 100) +
         " resp=" + Clip(op.response, 140);
}

}  // namespace converge::harness
