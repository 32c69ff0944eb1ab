// The relay's claim, shared with the tests that check how each store plans it, and the
// per-aggregate lock that producers and the relay's requeue take alike.
#ifndef CONVERGE_SRC_CORE_RELAY_INTERNAL_H_
#define CONVERGE_SRC_CORE_RELAY_INTERNAL_H_

#include <cstddef>
#include <string>
#include <string_view>

namespace converge::internal {

// The claim: unpublished events by seq, $1 at most; with `filter`, only those of the
// `partitions` partitions bound as $2, $3, ... (relay.cc says when a relay filters).
std::string RelayClaimSql(size_t partitions, bool filter);

// The lock (Tx::LockUntilCommit) that orders one aggregate's producers: Outbox::Enqueue
// holds it until commit, and so does a requeue of one of its events.
inline std::string OutboxLockKey(std::string_view aggregate) {
  return "converge.outbox:" + std::string(aggregate);
}

}  // namespace converge::internal

#endif  // CONVERGE_SRC_CORE_RELAY_INTERNAL_H_
