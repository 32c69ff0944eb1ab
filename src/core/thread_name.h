// Names for converge's own threads. Internal to converge.
#ifndef CONVERGE_CORE_THREAD_NAME_H_
#define CONVERGE_CORE_THREAD_NAME_H_

#include <pthread.h>

#include <string>
#include <string_view>

namespace converge::internal {

// Names the calling thread as `top -H`, `perf report --sort comm`, gdb and
// /proc/PID/task/TID/comm show it. Linux keeps 15 bytes of a name; the rest is cut.
// Every name converge gives starts with "cv-".
inline void NameThisThread(std::string_view name) {
  const std::string cut(name.substr(0, 15));
  pthread_setname_np(pthread_self(), cut.c_str());
}

}  // namespace converge::internal

#endif  // CONVERGE_CORE_THREAD_NAME_H_
