#include "converge/transport.h"

#include <set>

namespace converge {

std::vector<Status> Publisher::PublishBatch(std::span<const Event> batch) {
  std::vector<Status> results;
  results.reserve(batch.size());
  std::set<std::string_view> stopped;  // subjects whose batch ended at a failure
  for (const Event& e : batch) {
    if (stopped.count(e.subject)) {
      results.push_back(AbortedError("not published: an earlier event of subject '" + e.subject +
                                     "' failed in this batch"));
      continue;
    }
    results.push_back(Publish(e));
    if (!results.back().ok()) stopped.insert(e.subject);
  }
  return results;
}

}  // namespace converge
