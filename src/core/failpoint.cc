#include "converge/failpoint.h"

#include <signal.h>
#include <unistd.h>

#include <charconv>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <thread>

namespace converge::failpoint {
namespace internal {
std::atomic<bool> g_armed{false};
}  // namespace internal

namespace {

enum class Action { kOff, kCrash, kError, kDelay, kPause };

struct Point {
  Action action = Action::kOff;
  StatusCode code = StatusCode::kUnavailable;
  std::string message;
  int64_t delay_ms = 0;
  int64_t first_hit = 1;  // fire from this hit on
  int64_t max_fires = -1;  // -1: unlimited
  int64_t hits = 0;
  int64_t fires = 0;
  uint64_t releases = 0;  // bumped by Release(): paused threads wait for it to change
};

std::mutex g_mu;
std::condition_variable g_cv;  // paused threads and WaitPaused() wait on it
// Bumped by Configure(): every paused thread goes on, whatever the new configuration.
uint64_t g_epoch = 0;
std::map<std::string, Point, std::less<>>* g_points =
    new std::map<std::string, Point, std::less<>>();
// Threads paused per point name; kept apart from g_points so Configure() cannot lose it.
std::map<std::string, int64_t, std::less<>>* g_paused =
    new std::map<std::string, int64_t, std::less<>>();

std::string_view Trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

bool ParseInt(std::string_view s, int64_t* out) {
  s = Trim(s);
  auto r = std::from_chars(s.data(), s.data() + s.size(), *out);
  return r.ec == std::errc() && r.ptr == s.data() + s.size();
}

Status ParseEntry(std::string_view entry, std::string* name, Point* p) {
  auto eq = entry.find('=');
  if (eq == std::string_view::npos) {
    return InvalidArgumentError("failpoint entry '" + std::string(entry) + "' has no '='");
  }
  *name = std::string(Trim(entry.substr(0, eq)));
  if (name->empty()) return InvalidArgumentError("failpoint entry has an empty name");
  std::string_view rest = Trim(entry.substr(eq + 1));
  // Suffixes: '*M' then '@N' may follow the action, in either order.
  for (;;) {
    auto star = rest.rfind('*');
    auto at = rest.rfind('@');
    auto close = rest.rfind(')');
    size_t cut = std::string_view::npos;
    if (star != std::string_view::npos && (close == std::string_view::npos || star > close))
      cut = star;
    if (at != std::string_view::npos && (close == std::string_view::npos || at > close) &&
        (cut == std::string_view::npos || at > cut)) {
      cut = at;
    }
    if (cut == std::string_view::npos) break;
    int64_t n = 0;
    if (!ParseInt(rest.substr(cut + 1), &n) || n < 1) {
      return InvalidArgumentError("failpoint '" + *name + "': bad count in '" +
                                  std::string(rest) + "'");
    }
    if (rest[cut] == '*') p->max_fires = n; else p->first_hit = n;
    rest = Trim(rest.substr(0, cut));
  }
  std::string_view arg;
  std::string_view verb = rest;
  auto open = rest.find('(');
  if (open != std::string_view::npos) {
    if (rest.back() != ')') {
      return InvalidArgumentError("failpoint '" + *name + "': missing ')' in '" +
                                  std::string(rest) + "'");
    }
    verb = Trim(rest.substr(0, open));
    arg = Trim(rest.substr(open + 1, rest.size() - open - 2));
  }
  if (verb == "crash" && arg.empty()) {
    p->action = Action::kCrash;
  } else if (verb == "pause" && arg.empty()) {
    p->action = Action::kPause;
  } else if (verb == "off" && arg.empty()) {
    p->action = Action::kOff;
  } else if (verb == "delay") {
    if (!ParseInt(arg, &p->delay_ms) || p->delay_ms < 0) {
      return InvalidArgumentError("failpoint '" + *name + "': delay needs milliseconds");
    }
    p->action = Action::kDelay;
  } else if (verb == "error") {
    std::string_view code = arg;
    auto comma = arg.find(',');
    if (comma != std::string_view::npos) {
      code = Trim(arg.substr(0, comma));
      p->message = std::string(Trim(arg.substr(comma + 1)));
    }
    if (!ParseStatusCode(code, &p->code) || p->code == StatusCode::kOk) {
      return InvalidArgumentError("failpoint '" + *name + "': unknown status code '" +
                                  std::string(code) + "'");
    }
    p->action = Action::kError;
  } else {
    return InvalidArgumentError("failpoint '" + *name + "': unknown action '" + std::string(rest) +
                                "' (crash, error(code), delay(ms), pause, off)");
  }
  return OkStatus();
}

}  // namespace

Status Configure(std::string_view spec) {
  std::map<std::string, Point, std::less<>> points;
  while (!spec.empty()) {
    auto semi = spec.find(';');
    std::string_view entry = Trim(spec.substr(0, semi));
    spec = semi == std::string_view::npos ? std::string_view() : spec.substr(semi + 1);
    if (entry.empty()) continue;
    std::string name;
    Point p;
    CONVERGE_RETURN_IF_ERROR(ParseEntry(entry, &name, &p));
    points[name] = p;
  }
  {
    std::lock_guard<std::mutex> l(g_mu);
    *g_points = std::move(points);
    ++g_epoch;
    internal::g_armed.store(!g_points->empty(), std::memory_order_relaxed);
  }
  g_cv.notify_all();
  return OkStatus();
}

Status ConfigureFromEnv() {
  const char* spec = std::getenv("CONVERGE_FAILPOINTS");
  if (spec == nullptr) return OkStatus();
  Status st = Configure(spec);
  if (!st.ok()) return Status(st.code(), "CONVERGE_FAILPOINTS: " + st.message());
  return st;
}

int64_t Hits(std::string_view name) {
  std::lock_guard<std::mutex> l(g_mu);
  auto it = g_points->find(name);
  return it == g_points->end() ? 0 : it->second.hits;
}

int64_t Paused(std::string_view name) {
  std::lock_guard<std::mutex> l(g_mu);
  auto it = g_paused->find(name);
  return it == g_paused->end() ? 0 : it->second;
}

bool WaitPaused(std::string_view name, std::chrono::milliseconds timeout, int64_t count) {
  std::unique_lock<std::mutex> l(g_mu);
  return g_cv.wait_for(l, timeout, [&] {
    auto it = g_paused->find(name);
    return it != g_paused->end() && it->second >= count;
  });
}

int64_t Release(std::string_view name) {
  int64_t released = 0;
  {
    std::lock_guard<std::mutex> l(g_mu);
    auto it = g_points->find(name);
    if (it != g_points->end()) ++it->second.releases;
    auto p = g_paused->find(name);
    released = p == g_paused->end() ? 0 : p->second;
  }
  g_cv.notify_all();
  return released;
}

namespace internal {

Status Evaluate(std::string_view name) {
  Point fire;
  {
    std::unique_lock<std::mutex> l(g_mu);
    auto it = g_points->find(name);
    if (it == g_points->end()) return OkStatus();
    Point& p = it->second;
    ++p.hits;
    if (p.action == Action::kOff || p.hits < p.first_hit) return OkStatus();
    if (p.max_fires >= 0 && p.fires >= p.max_fires) return OkStatus();
    ++p.fires;
    fire = p;
    if (p.action == Action::kPause) {
      // Wait for Release(name) or a new configuration. The point is looked up again on
      // every wake-up: Configure() may have replaced it.
      const uint64_t epoch = g_epoch, releases = p.releases;
      auto& paused = (*g_paused)[std::string(name)];
      ++paused;
      g_cv.notify_all();  // WaitPaused() callers
      g_cv.wait(l, [&] {
        if (g_epoch != epoch) return true;
        auto again = g_points->find(name);
        return again == g_points->end() || again->second.releases != releases;
      });
      --paused;
      return OkStatus();
    }
  }
  switch (fire.action) {
    case Action::kCrash:
      ::kill(::getpid(), SIGKILL);
      ::_exit(137);  // not reached
    case Action::kDelay:
      std::this_thread::sleep_for(std::chrono::milliseconds(fire.delay_ms));
      return OkStatus();
    case Action::kError:
      return Status(fire.code,
                    fire.message.empty() ? "failpoint " + std::string(name) : fire.message,
                    reason::kFailpoint);
    case Action::kOff:
    case Action::kPause:  // handled above, under the lock
      break;
  }
  return OkStatus();
}

}  // namespace internal
}  // namespace converge::failpoint
