// Shared by the fuzz targets (fuzz/*_fuzz.cc): the property check, splitting an input into
// fields, a throwaway directory, and one raw HTTP exchange over a loopback socket.
//
// A target checks properties, not only "no crash": FUZZ_CHECK prints which property failed
// and on what, then aborts, which libFuzzer records as a crash with the input that caused
// it (and the regression run under g++ reports as a failed test).
//
// Thread safety: FUZZ_CHECK and the free functions may be called from any thread.
#ifndef CONVERGE_FUZZ_FUZZ_SUPPORT_H_
#define CONVERGE_FUZZ_FUZZ_SUPPORT_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace converge::fuzz {

// Prints "fuzz property failed: <condition> (<file>:<line>): <detail>" and aborts.
[[noreturn]] void Fail(const char* condition, const char* file, int line,
                       const std::string& detail);

// `detail` (a std::string expression) is evaluated only when `condition` is false.
#define FUZZ_CHECK(condition, detail)                                   \
  do {                                                                  \
    if (!(condition)) {                                                 \
      ::converge::fuzz::Fail(#condition, __FILE__, __LINE__, (detail)); \
    }                                                                   \
  } while (0)

// `bytes` as a C-escaped string literal, cut after `max` characters: for FUZZ_CHECK details.
std::string Quote(std::string_view bytes, size_t max = 240);

// The input as text.
inline std::string_view AsText(const uint8_t* data, size_t size) {
  return std::string_view(reinterpret_cast<const char*>(data), size);
}

// Splits `input` at its first `count - 1` newlines into `count` fields; the last field keeps
// the rest (newlines included), and missing fields are empty. Seed files are then readable
// one field per line.
std::vector<std::string_view> SplitFields(std::string_view input, size_t count);

// A fresh directory under $TMPDIR (or /tmp), removed with its contents on destruction.
class TempDir {
 public:
  TempDir() : TempDir(false) {}
  // in_memory: under /dev/shm when that is a writable directory (a tmpfs: a store there
  // never waits for a disk, which is not what a fuzz target is about), else as TempDir().
  explicit TempDir(bool in_memory);
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string File(std::string_view name) const { return path_ + "/" + std::string(name); }

 private:
  std::string path_;
};

// What came back from one connection.
struct RawExchange {
  std::string received;    // every byte the server sent before it closed
  bool reset = false;      // the connection ended with a reset rather than a close
  bool timed_out = false;  // the server neither closed nor reset before the deadline
};

// Connects to 127.0.0.1:port, writes `request` while reading whatever comes back (so a
// server that answers while the client still sends never deadlocks with it), half-closes
// once everything is written, and reads until the server closes. Aborts (FUZZ_CHECK) when
// it cannot connect: the server under test is in this process and must be listening.
RawExchange ExchangeBytes(uint16_t port, std::string_view request,
                          std::chrono::milliseconds deadline);

}  // namespace converge::fuzz

#endif  // CONVERGE_FUZZ_FUZZ_SUPPORT_H_
