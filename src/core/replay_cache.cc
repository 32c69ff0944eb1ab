#include "src/core/replay_cache.h"

#include <algorithm>
#include <functional>

namespace converge::internal {
namespace {

// What an entry costs beyond its strings: the list node, the index slot, the shared
// block, the strings' and vectors' own headers. An estimate; it keeps many tiny entries
// from passing for free.
constexpr size_t kOverhead = 256;

size_t CostOf(const std::string& id, const CachedReplay& e) {
  size_t n = kOverhead + 2 * id.size() + e.request_hash.size() + e.response.body.size();
  for (const auto& [name, value] : e.response.headers) n += 64 + name.size() + value.size();
  return n;
}

}  // namespace

ReplayCache::ReplayCache(size_t max_bytes, size_t max_entries)
    : shard_bytes_(max_bytes / kShards), shard_entries_(max_entries / kShards) {}

std::string ReplayCache::Id(std::string_view scope, std::string_view key) {
  // Length-prefixed: no (scope, key) pair can spell another's id.
  std::string id = std::to_string(scope.size());
  id.push_back(':');
  id.append(scope);
  id.append(key);
  return id;
}

ReplayCache::Shard& ReplayCache::ShardOf(const std::string& id) {
  return shards_[std::hash<std::string>{}(id) % kShards];
}

void ReplayCache::Erase(Shard& s, std::list<Item>::iterator it) {
  s.bytes -= it->bytes;
  s.index.erase(std::string_view(it->id));
  s.lru.erase(it);
}

std::shared_ptr<const CachedReplay> ReplayCache::Find(std::string_view scope,
                                                      std::string_view key,
                                                      int64_t valid_after) {
  const std::string id = Id(scope, key);
  Shard& s = ShardOf(id);
  std::lock_guard<std::mutex> l(s.mu);
  auto found = s.index.find(std::string_view(id));
  if (found == s.index.end()) return nullptr;
  auto it = found->second;
  if (it->entry->expires_at <= valid_after) {
    Erase(s, it);
    return nullptr;
  }
  s.lru.splice(s.lru.begin(), s.lru, it);
  return it->entry;
}

void ReplayCache::Insert(std::string_view scope, std::string_view key,
                         std::shared_ptr<const CachedReplay> entry) {
  std::string id = Id(scope, key);
  const size_t bytes = CostOf(id, *entry);
  Shard& s = ShardOf(id);
  if (bytes > shard_bytes_ || shard_entries_ == 0) return;
  std::lock_guard<std::mutex> l(s.mu);
  if (auto found = s.index.find(std::string_view(id)); found != s.index.end()) {
    Erase(s, found->second);
  }
  while (!s.lru.empty() && (s.bytes + bytes > shard_bytes_ || s.lru.size() >= shard_entries_)) {
    Erase(s, std::prev(s.lru.end()));
  }
  s.lru.push_front(Item{std::move(id), std::move(entry), bytes});
  s.index.emplace(std::string_view(s.lru.front().id), s.lru.begin());
  s.bytes += bytes;
}

ReplayCacheStats ReplayCache::stats() const {
  ReplayCacheStats out;
  for (const Shard& s : shards_) {
    std::lock_guard<std::mutex> l(s.mu);
    out.entries += static_cast<int64_t>(s.lru.size());
    out.bytes += static_cast<int64_t>(s.bytes);
  }
  return out;
}

}  // namespace converge::internal
