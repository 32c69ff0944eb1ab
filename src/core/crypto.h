// Hashing, identifiers and time formatting shared by core components (OpenSSL-backed).
// Internal to converge.
#ifndef CONVERGE_CORE_CRYPTO_H_
#define CONVERGE_CORE_CRYPTO_H_

#include <cstdint>
#include <string>
#include <string_view>

typedef struct evp_mac_ctx_st EVP_MAC_CTX;

namespace converge::internal {

// Lower-case hex SHA-256 of `data`.
std::string Sha256Hex(std::string_view data);
// The raw 32-byte HMAC-SHA256 of `data` under `key`.
std::string HmacSha256(std::string_view key, std::string_view data);

// HMAC-SHA256 under one key, keyed once: Sign copies the keyed state instead of looking
// the algorithms up and hashing the key again (OpenSSL 3's one-shot HMAC() does both on
// every call). Thread safety: immutable after construction; Sign is safe from many threads.
class HmacSha256Key {
 public:
  explicit HmacSha256Key(std::string_view key);
  ~HmacSha256Key();
  HmacSha256Key(const HmacSha256Key&) = delete;
  HmacSha256Key& operator=(const HmacSha256Key&) = delete;
  // The raw 32-byte HMAC-SHA256 of `data`, as HmacSha256(key, data).
  std::string Sign(std::string_view data) const;

 private:
  EVP_MAC_CTX* keyed_;
};

// `n` cryptographically random bytes as lower-case hex.
std::string RandomHex(size_t n);
// A UUIDv7 (time-ordered, RFC 9562) for `now_millis`.
std::string NewUuidV7(int64_t now_millis);

}  // namespace converge::internal

#endif  // CONVERGE_CORE_CRYPTO_H_
