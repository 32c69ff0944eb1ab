// Exponential backoff with full jitter, shared by consumers and effect runners.
// Internal to converge.
#ifndef CONVERGE_CORE_BACKOFF_H_
#define CONVERGE_CORE_BACKOFF_H_

#include <cstdint>
#include <random>

#include "converge/clock.h"

namespace converge::internal {

// Uniform in [0, min(max, initial * 2^(attempts-1))] milliseconds.
inline Millis FullJitterBackoff(int64_t attempts, Millis initial, Millis max) {
  int64_t cap = initial.count();
  for (int64_t i = 1; i < attempts && cap < max.count(); ++i) cap *= 2;
  if (cap > max.count()) cap = max.count();
  if (cap <= 0) return Millis(0);
  thread_local std::mt19937_64 rng(std::random_device{}());
  return Millis(std::uniform_int_distribution<int64_t>(0, cap)(rng));
}

}  // namespace converge::internal

#endif  // CONVERGE_CORE_BACKOFF_H_
