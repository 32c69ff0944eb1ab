#include "harness/chaos_check.h"

#include <algorithm>

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

int64_t History::NowMs() { return Clock::System()->NowMillis(); }

void History::Add(Op op) {
  std::lock_guard<std::mutex> l(mu_);
  op.seq = static_cast<int64_t>(ops_.size());
  op.t_ms = NowMs() - start_ms_;
  const KeyId id{op.tenant, op.key};
  if (op.status == 201) {
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
    return OkStatus();
  }));
  std::vector<Charge> charges;
  CONVERGE_RETURN_IF_ERROR(stores.psp->Read([&](Tx& tx) -> Status {
    CONVERGE_ASSIGN_OR_RETURN(Rows c, tx.Query("SELECT id, reference, status FROM charges"));
    for (const auto& r : c) charges.push_back({r.Text(0), r.Text(1), r.Text(2)});
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
    if (op.status != 201) continue;
    auto [it, fresh] = first_201.emplace(id, &op);
    if (fresh) {
      key_of_payment[PaymentIdOf(op.response)] = id;
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
    auto row = key_rows.find(id);
    if (row == key_rows.end() || row->second.first != "completed" ||
        row->second.second != op->response) {
      violate("stored-response",
              "the key's stored response is not the 201 the client got: " +
                  (row == key_rows.end() ? std::string("no key row")
                                         : row->second.first + " \"" +
                                               Clip(row->second.second) + "\""),
              id, pid);
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
      violate("event-order", "payment " + pid + ": the ledger consumer booked the refund "
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

  // --- what is left ------------------------------------------------------------------
  for (const auto& [queue, event_id] : dead_letters) {
    if (!stores.injected_dead_letters.count(event_id)) {
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
             Q{"failed effects", "SELECT count(*) FROM effects WHERE state = 'failed'"},
             // Past its first phase a request has effects to finish: the completer's job.
             Q{"requests in progress past their first phase",
               "SELECT count(*) FROM idempotency_keys WHERE status = 'in_progress' "
               "AND recovery_point <> 'started'"},
         }) {
      CONVERGE_ASSIGN_OR_RETURN(Rows r, tx.Query(q.sql));
      note(q.what, r.empty() ? 0 : r[0].Int(0));
    }
    return OkStatus();
  }));
  CONVERGE_RETURN_IF_ERROR(stores.psp->Read([&](Tx& tx) -> Status {
    CONVERGE_ASSIGN_OR_RETURN(
        Rows r, tx.Query("SELECT count(*) FROM webhook_deliveries WHERE state <> 'delivered'"));
    note("provider webhooks not delivered", r[0].Int(0));
    return OkStatus();
  }));
  return left;
}

std::vector<Op> Excerpt(const std::vector<Op>& ops, const Violation& v, size_t max_ops) {
  KeyId id{v.tenant, v.key};
  if (v.key.empty() && !v.payment_id.empty()) {
    for (const Op& op : ops) {
      if (op.status == 201 && PaymentIdOf(op.response) == v.payment_id) {
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
