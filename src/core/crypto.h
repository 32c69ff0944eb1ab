// Hashing, identifiers and time formatting shared by core components (OpenSSL-backed).
// Internal to converge.
#ifndef CONVERGE_CORE_CRYPTO_H_
#define CONVERGE_CORE_CRYPTO_H_

#include <cstdint>
#include <string>
#include <string_view>

namespace converge::internal {

// Lower-case hex SHA-256 of `data`.
std::string Sha256Hex(std::string_view data);
// The raw 32-byte HMAC-SHA256 of `data` under `key`.
std::string HmacSha256(std::string_view key, std::string_view data);
// `n` cryptographically random bytes as lower-case hex.
std::string RandomHex(size_t n);
// A UUIDv7 (time-ordered, RFC 9562) for `now_millis`.
std::string NewUuidV7(int64_t now_millis);

}  // namespace converge::internal

#endif  // CONVERGE_CORE_CRYPTO_H_
