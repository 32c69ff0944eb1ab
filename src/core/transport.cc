#include "converge/transport.h"

#include <set>

namespace converge {

std::vector<Status> Publisher::PublishBatch(std::span<const Event> batch) {
  return PublishWhile(batch, [] { return true; });
}

std::vector<Status> Publisher::PublishWhile(std::span<const Event> batch,
                                            const std::function<bool()>& may_start) {
  std::vector<Status> results;
  results.reserve(batch.size());
  std::set<std::string_view> stopped;  // subjects whose batch ended at a failure
  bool cut = false;
  for (const Event& e : batch) {
    if (stopped.count(e.subject)) {
      results.push_back(Status(StatusCode::kAborted,
                               "not published: an earlier event of subject '" + e.subject +
                                   "' failed in this batch",
                               reason::kNotAttempted));
      continue;
    }
    cut = cut || (!results.empty() && !may_start());
    if (cut) {
      results.push_back(Status(StatusCode::kAborted,
                               "not published in this batch: it was cut short",
                               reason::kNotAttempted));
      continue;
    }
    results.push_back(Publish(e));
    if (!results.back().ok()) stopped.insert(e.subject);
  }
  return results;
}

}  // namespace converge
