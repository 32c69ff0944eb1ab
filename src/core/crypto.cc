#include "src/core/crypto.h"

#include <pthread.h>
#include <sys/mman.h>

#include <atomic>
#include <cstring>
#include <stdexcept>

#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/rand.h>

namespace converge::internal {
namespace {

std::string Hex(const unsigned char* p, size_t n) {
  static const char kDigits[] = "0123456789abcdef";
  std::string out(n * 2, '0');
  for (size_t i = 0; i < n; ++i) {
    out[2 * i] = kDigits[p[i] >> 4];
    out[2 * i + 1] = kDigits[p[i] & 0xf];
  }
  return out;
}

void RandomBytes(unsigned char* p, size_t n) {
  // RAND_bytes fails only when the OS entropy source is broken; nothing sane can go on.
  if (RAND_bytes(p, static_cast<int>(n)) != 1) throw std::runtime_error("RAND_bytes failed");
}

// OpenSSL 3 finds an algorithm by name in its provider tables, under a lock, whenever a
// call is handed a name or a legacy EVP_sha256(): once per request on the hot paths (the
// request fingerprint, the API key lookup). Fetched once here, for the process's life.
const EVP_MD* Sha256() {
  static EVP_MD* const md = EVP_MD_fetch(nullptr, "SHA256", nullptr);
  if (md == nullptr) throw std::runtime_error("OpenSSL has no SHA256");
  return md;
}

EVP_MAC* Hmac() {
  static EVP_MAC* const mac = EVP_MAC_fetch(nullptr, "HMAC", nullptr);
  if (mac == nullptr) throw std::runtime_error("OpenSSL has no HMAC");
  return mac;
}

EVP_MAC_CTX* NewHmacSha256(std::string_view key) {
  EVP_MAC_CTX* ctx = EVP_MAC_CTX_new(Hmac());
  char digest[] = "SHA256";
  OSSL_PARAM params[] = {OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest, 0),
                         OSSL_PARAM_construct_end()};
  if (ctx == nullptr ||
      EVP_MAC_init(ctx, reinterpret_cast<const unsigned char*>(key.data()), key.size(),
                   params) != 1) {
    EVP_MAC_CTX_free(ctx);
    throw std::runtime_error("HMAC-SHA256 init failed");
  }
  return ctx;
}

// Consumes `ctx` (keyed, nothing fed yet).
std::string FinishHmac(EVP_MAC_CTX* ctx, std::string_view data) {
  unsigned char md[EVP_MAX_MD_SIZE];
  size_t len = 0;
  const bool ok =
      ctx != nullptr &&
      EVP_MAC_update(ctx, reinterpret_cast<const unsigned char*>(data.data()), data.size()) ==
          1 &&
      EVP_MAC_final(ctx, md, &len, sizeof md) == 1;
  EVP_MAC_CTX_free(ctx);
  if (!ok) throw std::runtime_error("HMAC-SHA256 failed");
  return std::string(reinterpret_cast<const char*>(md), len);
}

}  // namespace

std::string Sha256Hex(std::string_view data) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_Digest(data.data(), data.size(), md, &len, Sha256(), nullptr);
  return Hex(md, len);
}

std::string HmacSha256(std::string_view key, std::string_view data) {
  return FinishHmac(NewHmacSha256(key), data);
}

HmacSha256Key::HmacSha256Key(std::string_view key) : keyed_(NewHmacSha256(key)) {}
HmacSha256Key::~HmacSha256Key() { EVP_MAC_CTX_free(keyed_); }

std::string HmacSha256Key::Sign(std::string_view data) const {
  // The copy carries the key's inner and outer states; keyed_ itself is only read.
  return FinishHmac(EVP_MAC_CTX_dup(keyed_), data);
}

std::string RandomHex(size_t n) {
  std::string buf(n, '\0');
  RandomBytes(reinterpret_cast<unsigned char*>(buf.data()), n);
  return Hex(reinterpret_cast<const unsigned char*>(buf.data()), n);
}

namespace {

// A UUID's random bits come from a per-thread pool that RAND_bytes refills kIdPoolBytes at
// a time: RAND_bytes took about 1.6 us a call, most of an id's cost, whatever the length
// asked (docs/benchmarks.md). The bytes are as random; they only wait in the pool.
constexpr size_t kIdPoolBytes = 512;

// A child process starts with a copy of its parent's pools, and drawing from them would
// hand both processes the same ids (an event id twice: one of the two events deduplicated
// away). Two guards, where OpenSSL's own generator has one (it compares getpid(), a system
// call a draw here would not pay):
//  - each pool lives in a page of its own marked MADV_WIPEONFORK: the kernel hands any
//    child, however it was made (fork(), _Fork(), clone()), that page zeroed, which reads
//    as a pool with nothing left;
//  - where the page could not be so marked, fork_generation, bumped in the child of
//    every fork() that runs the atfork handlers, tells a pool filled before the fork.
std::atomic<uint64_t> fork_generation{0};
void CountFork() { fork_generation.fetch_add(1, std::memory_order_relaxed); }

struct IdPool {
  size_t left;  // bytes not drawn yet, at the end of `bytes`; 0 in a wiped page
  uint64_t generation;
  unsigned char bytes[kIdPoolBytes];
};
static_assert(sizeof(IdPool) <= 4096);

// This thread's pool, mapped at its first id and unmapped when the thread ends; nullptr
// when no page could be mapped (then every id calls RAND_bytes).
class IdPoolPage {
 public:
  IdPoolPage() {
    void* p = mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return;
    pool_ = static_cast<IdPool*>(p);  // zeroed: nothing left
    wiped_on_fork_ = madvise(p, 4096, MADV_WIPEONFORK) == 0;
  }
  ~IdPoolPage() {
    if (pool_ != nullptr) munmap(pool_, 4096);
  }
  IdPoolPage(const IdPoolPage&) = delete;
  IdPoolPage& operator=(const IdPoolPage&) = delete;
  IdPool* pool() const { return pool_; }
  bool wiped_on_fork() const { return wiped_on_fork_; }

 private:
  IdPool* pool_ = nullptr;
  bool wiped_on_fork_ = false;
};

void IdRandomBytes(unsigned char* p, size_t n) {
  // Registered before this process fills any pool, so every fork() after a fill counts.
  static const bool counting_forks = pthread_atfork(nullptr, nullptr, CountFork) == 0;
  thread_local IdPoolPage page;
  IdPool* pool = page.pool();
  if (pool == nullptr || (!page.wiped_on_fork() && !counting_forks)) {  // no guard: no pool
    RandomBytes(p, n);
    return;
  }
  const uint64_t generation = fork_generation.load(std::memory_order_relaxed);
  if (pool->left < n || pool->generation != generation) {
    RandomBytes(pool->bytes, kIdPoolBytes);
    pool->left = kIdPoolBytes;
    pool->generation = generation;
  }
  std::memcpy(p, pool->bytes + (kIdPoolBytes - pool->left), n);
  pool->left -= n;
}

}  // namespace

std::string NewUuidV7(int64_t now_millis) {
  unsigned char b[16];
  IdRandomBytes(b + 6, sizeof b - 6);
  auto ms = static_cast<uint64_t>(now_millis);
  for (int i = 0; i < 6; ++i) b[i] = static_cast<unsigned char>(ms >> (8 * (5 - i)));
  b[6] = static_cast<unsigned char>(0x70 | (b[6] & 0x0f));
  b[8] = static_cast<unsigned char>(0x80 | (b[8] & 0x3f));
  static const char kDigits[] = "0123456789abcdef";
  std::string out(36, '-');  // 8-4-4-4-12 hex digits
  for (size_t i = 0, o = 0; i < sizeof b; ++i) {
    if (o == 8 || o == 13 || o == 18 || o == 23) ++o;
    out[o++] = kDigits[b[i] >> 4];
    out[o++] = kDigits[b[i] & 0xf];
  }
  return out;
}

}  // namespace converge::internal
