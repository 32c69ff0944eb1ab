// Secrets that a configuration key names instead of holding: read from the environment or
// from a file (ConfigReader::Secret and Secrets, include/converge/config_reader.h). No
// error shows a secret: a value that does not look like what its key names (a variable's
// name, a path) may be the secret itself, put under the wrong key.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>

#include "converge/config_reader.h"

namespace converge::internal {
namespace {

constexpr size_t kMaxSecret = 64 << 10;

// A name a shell can export.
bool EnvName(std::string_view name) {
  if (name.empty() || name.size() > 255 || std::isdigit(static_cast<unsigned char>(name[0]))) {
    return false;
  }
  for (char c : name) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '_') return false;
  }
  return true;
}

// `name` as errors show it: names in upper case are; one with lower-case letters could be
// the secret itself (one without '+', '/' or '=' is a valid name).
std::string ShownName(const std::string& name) {
  for (char c : name) {
    if (std::islower(static_cast<unsigned char>(c))) {
      return "the environment variable named (not shown: a name with lower-case letters may "
             "be the secret itself)";
    }
  }
  return "the environment variable '" + name + "'";
}

// `path` as errors show it: absolute and ./ or ../ paths are; any other could be the
// secret itself.
std::string Shown(const std::string& path) {
  if (!path.empty() && (path[0] == '/' || path[0] == '.')) return "'" + path + "'";
  return "the file named (not shown: a path that begins with neither '/' nor '.' may be "
         "the secret itself)";
}

// What was read is refused when it is likely not the secret meant: a byte-order mark, a
// control character (a line end inside: two secrets in one place, or a Windows line end;
// a NUL), or a space around it.
Status CheckText(const std::string& where, std::string_view text) {
  std::string_view why;
  if (text.substr(0, 3) == "\xEF\xBB\xBF") {
    why = "begins with a byte-order mark";
  } else if (text.front() == ' ' || text.back() == ' ') {
    why = "begins or ends with a space";
  } else {
    for (char c : text) {
      const auto u = static_cast<unsigned char>(c);
      if (u < 0x20 || u == 0x7f) {
        why = "holds a control character (a line end, a tab, a NUL): one secret each, on "
              "one line";
        break;
      }
    }
  }
  if (why.empty()) return OkStatus();
  return InvalidArgumentError(where + " " + std::string(why) + " (the secret is not shown)");
}

}  // namespace

Status SecretFromEnv(const std::string& where, const std::string& name, std::string* out) {
  if (!EnvName(name)) {
    return InvalidArgumentError(where + " must name an environment variable (letters, digits "
                                        "and '_', not first a digit); what it holds is not "
                                        "shown, in case it is the secret itself");
  }
  const char* v = std::getenv(name.c_str());
  const std::string variable = where + ": " + ShownName(name);
  if (v == nullptr || *v == '\0') {
    return InvalidArgumentError(variable + " is " + (v == nullptr ? "not set" : "empty"));
  }
  CONVERGE_RETURN_IF_ERROR(CheckText(variable, v));
  *out = v;
  return OkStatus();
}

Status SecretFromFile(const std::string& where, const std::string& path, std::string* out) {
  const std::string file = where + ": " + Shown(path);
  // Not blocking on a FIFO (or a terminal) named by mistake: it is refused below.
  const int fd = open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) return InvalidArgumentError(file + ": " + std::strerror(errno));
  struct stat st {};
  std::string data;
  Status result = OkStatus();
  if (fstat(fd, &st) != 0) {
    result = InvalidArgumentError(file + ": " + std::strerror(errno));
  } else if (!S_ISREG(st.st_mode)) {
    result = InvalidArgumentError(file + " is not a regular file (a directory, a pipe or a "
                                         "device?)");
  } else {
    data.resize(kMaxSecret + 1);
    size_t got = 0;
    while (got < data.size()) {
      const ssize_t n = read(fd, data.data() + got, data.size() - got);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        result = InvalidArgumentError(file + ": " + std::strerror(errno));
        break;
      }
      if (n == 0) break;
      got += static_cast<size_t>(n);
    }
    data.resize(got);
  }
  close(fd);
  CONVERGE_RETURN_IF_ERROR(result);
  if (data.size() > kMaxSecret) {
    return InvalidArgumentError(file + " holds more than 64 KiB: not a secret");
  }
  if (!data.empty() && data.back() == '\n') data.pop_back();
  if (!data.empty() && data.back() == '\r') data.pop_back();
  if (data.empty()) return InvalidArgumentError(file + " is empty");
  CONVERGE_RETURN_IF_ERROR(CheckText(file, data));
  *out = std::move(data);
  return OkStatus();
}

}  // namespace converge::internal
