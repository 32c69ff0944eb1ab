#include "converge/completer.h"

#include <vector>

#include "converge/failpoint.h"
#include "src/core/idempotency_internal.h"

namespace converge {

Completer::Completer(Database& db, IdempotencyKeys& keys, CompleterOptions options,
                     Clock* clock)
    : db_(db),
      keys_(keys),
      options_(options),
      clock_(clock ? clock : Clock::System()),
      worker_("completer", options_.poll, [this] {
        Result<size_t> r = RunOnce();
        return r && *r >= options_.batch;
      }) {}

Completer::~Completer() { Stop(); }

void Completer::On(std::string recovery_point, Resume resume) {
  resumes_[std::move(recovery_point)] = std::move(resume);
}

Result<size_t> Completer::RunOnce() {
  if (resumes_.empty()) return size_t{0};
  if (options_.batch < 1 || options_.grace < Millis(0)) {
    return tl::unexpected(InvalidArgumentError("completer: batch must be >= 1, grace >= 0"));
  }
  struct Candidate {
    std::string scope, key;
    int64_t fence;
  };
  std::vector<Candidate> candidates;
  const int64_t cutoff = clock_->NowMillis() - options_.grace.count();
  CONVERGE_RETURN_IF_ERROR(db_.Read([&](Tx& tx) -> Status {
    std::string sql =
        "SELECT scope, key, fence FROM idempotency_keys WHERE status = 'in_progress' "
        "AND lease_until <= $1 AND recovery_point IN (";
    std::vector<Value> params = {Value(cutoff), Value(static_cast<int64_t>(options_.batch))};
    for (const auto& [point, fn] : resumes_) {
      sql += (params.size() > 2 ? ", $" : "$") + std::to_string(params.size() + 1);
      params.emplace_back(point);
    }
    CONVERGE_ASSIGN_OR_RETURN(Rows rows,
                              tx.QueryParams(sql + ") ORDER BY lease_until LIMIT $2", params));
    candidates.clear();
    for (const Row& r : rows) candidates.push_back({r.Text(0), r.Text(1), r.Int(2)});
    return OkStatus();
  }));
  size_t taken = 0;
  for (const Candidate& c : candidates) {
    // Failpoint: between the read and the takeover, a retry or another completer may win.
    Status fp = failpoint::Hit("completer.before_takeover");
    if (!fp.ok()) return tl::unexpected(fp);
    std::optional<KeyLease> lease;
    Status st = db_.Transact([&](Tx& tx) -> Status {
      const int64_t now = clock_->NowMillis();
      CONVERGE_ASSIGN_OR_RETURN(
          lease, internal::TakeOver(tx, c.scope, c.key, c.fence,
                                    now - options_.grace.count(),
                                    now + keys_.options().lease.count(), now));
      return OkStatus();
    });
    if (!st.ok()) {
      std::lock_guard<std::mutex> l(stats_mu_);
      stats_.last_error = st.ToString();
      continue;
    }
    if (!lease) {
      std::lock_guard<std::mutex> l(stats_mu_);
      ++stats_.lost;
      continue;
    }
    ++taken;
    // Failpoint: the completer holds the request; a stall here outlives its lease.
    Status resumed = failpoint::Hit("completer.after_takeover");
    if (resumed.ok()) {
      auto it = resumes_.find(lease->recovery_point);
      try {
        resumed = it == resumes_.end()
                      ? InternalError("no resume for '" + lease->recovery_point + "'")
                      : it->second(*lease);
      } catch (const std::exception& e) {
        resumed = InternalError(std::string("completer resume threw: ") + e.what());
      }
    }
    if (!resumed.ok()) (void)keys_.Release(*lease);  // fenced already: nothing to give back
    std::lock_guard<std::mutex> l(stats_mu_);
    if (resumed.ok()) {
      ++stats_.finished;
    } else {
      ++stats_.failed;
      stats_.last_error = resumed.ToString();
    }
  }
  return taken;
}

void Completer::Start() { worker_.Start(); }

void Completer::Stop() { worker_.Stop(); }

CompleterStats Completer::stats() const {
  std::lock_guard<std::mutex> l(stats_mu_);
  return stats_;
}

}  // namespace converge
