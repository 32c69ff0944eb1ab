// Pieces of the idempotency store shared with the completer and the sweeper.
#ifndef CONVERGE_SRC_CORE_IDEMPOTENCY_INTERNAL_H_
#define CONVERGE_SRC_CORE_IDEMPOTENCY_INTERNAL_H_

#include <optional>
#include <string>
#include <string_view>

#include "converge/database.h"
#include "converge/idempotency.h"

namespace converge::internal {

// SQL condition on idempotency_keys under which a row may be forgotten at time `now` (a
// placeholder such as "$1"): past expires_at, and finished, or never past its first phase
// and no longer leased. Unfinished work past its first phase is never forgotten: it may
// have acted outside the database, and only a resume from its recovery point converges.
std::string ForgettableKeyCondition(std::string_view now);
// Its negation: rows that must be kept at `now` (the Sweeper keeps a whole partition of a
// time-partitioned store while one of its rows satisfies this).
std::string UnforgettableKeyCondition(std::string_view now);

// Takes over an in-progress attempt whose lease lapsed at or before `lapsed_before`, if its
// fence is still `fence`: one conditional statement that draws a new fence and returns the
// recovery point it took over. nullopt when the attempt advanced, renewed or finished
// since `fence` was read, or another attempt took over first.
Result<std::optional<KeyLease>> TakeOver(Tx& tx, const std::string& scope,
                                         const std::string& key, int64_t fence,
                                         int64_t lapsed_before, int64_t lease_until,
                                         int64_t now);

}  // namespace converge::internal

#endif  // CONVERGE_SRC_CORE_IDEMPOTENCY_INTERNAL_H_
