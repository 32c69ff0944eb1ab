// ReplayCache: completed idempotency keys' stored responses, kept in memory so that a
// replay is answered without a read (docs/design/idempotency.md, "The replay cache").
// It only stores and finds; IdempotencyKeys decides what may go in (committed, completed
// rows) and until when an entry may answer (its key's expiry less the clock skew).
//
// Bounded in bytes and in entries: the least recently used entries go first, and a
// response larger than a shard's share of the bytes is never kept.
//
// Thread safety: safe from many threads (sharded, a mutex per shard).
#ifndef CONVERGE_SRC_CORE_REPLAY_CACHE_H_
#define CONVERGE_SRC_CORE_REPLAY_CACHE_H_

#include <array>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>

#include "converge/idempotency.h"

namespace converge::internal {

// A completed key as the store holds it until expires_at.
struct CachedReplay {
  std::string request_hash;
  StoredResponse response;
  int64_t expires_at = 0;
};

class ReplayCache {
 public:
  ReplayCache(size_t max_bytes, size_t max_entries);
  ReplayCache(const ReplayCache&) = delete;
  ReplayCache& operator=(const ReplayCache&) = delete;

  // The entry for (scope, key) if it expires after `valid_after`; nullptr otherwise (an
  // entry that no longer qualifies is dropped).
  std::shared_ptr<const CachedReplay> Find(std::string_view scope, std::string_view key,
                                           int64_t valid_after);
  // Keeps `entry` for (scope, key), replacing any earlier one, unless it is too large.
  void Insert(std::string_view scope, std::string_view key,
              std::shared_ptr<const CachedReplay> entry);

  ReplayCacheStats stats() const;

 private:
  static constexpr size_t kShards = 16;
  struct Item {
    std::string id;
    std::shared_ptr<const CachedReplay> entry;
    size_t bytes = 0;
  };
  struct Shard {
    mutable std::mutex mu;
    std::list<Item> lru;  // most recently used first
    std::unordered_map<std::string_view, std::list<Item>::iterator> index;  // views of Item::id
    size_t bytes = 0;
  };

  static std::string Id(std::string_view scope, std::string_view key);
  Shard& ShardOf(const std::string& id);
  static void Erase(Shard& s, std::list<Item>::iterator it);

  const size_t shard_bytes_;
  const size_t shard_entries_;
  std::array<Shard, kShards> shards_;
};

}  // namespace converge::internal

#endif  // CONVERGE_SRC_CORE_REPLAY_CACHE_H_
