// The relay's claim, shared with the tests that check how each store plans it.
#ifndef CONVERGE_SRC_CORE_RELAY_INTERNAL_H_
#define CONVERGE_SRC_CORE_RELAY_INTERNAL_H_

#include <cstddef>
#include <string>

namespace converge::internal {

// The claim: unpublished events by seq, $1 at most; with `filter`, only those of the
// `partitions` partitions bound as $2, $3, ... (relay.cc says when a relay filters).
std::string RelayClaimSql(size_t partitions, bool filter);

}  // namespace converge::internal

#endif  // CONVERGE_SRC_CORE_RELAY_INTERNAL_H_
