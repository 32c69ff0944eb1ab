// Identifiers for the payments example and its provider stand-ins.
#ifndef CONVERGE_EXAMPLES_PAYMENTS_IDS_H_
#define CONVERGE_EXAMPLES_PAYMENTS_IDS_H_

#include <cstdio>
#include <random>
#include <string>

namespace payments {

// "<prefix><16 random hex digits>", e.g. "pay_3f9c0a1b2c3d4e5f".
inline std::string RandomId(const char* prefix) {
  thread_local std::mt19937_64 rng(std::random_device{}());
  char buf[48];
  std::snprintf(buf, sizeof buf, "%s%016llx", prefix, static_cast<unsigned long long>(rng()));
  return buf;
}

}  // namespace payments

#endif  // CONVERGE_EXAMPLES_PAYMENTS_IDS_H_
