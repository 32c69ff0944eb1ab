#include "converge/worker.h"

#include "src/core/thread_name.h"

namespace converge {

PollingWorker::PollingWorker(std::string name, Millis poll, Pass pass, Wakeup* wakeup)
    : name_(std::move(name)),
      poll_(poll),
      pass_(std::move(pass)),
      wakeup_(wakeup ? wakeup : &own_wakeup_) {}

PollingWorker::~PollingWorker() { Stop(); }

void PollingWorker::Start() {
  if (running_.exchange(true)) return;
  thread_ = std::thread([this] {
    internal::NameThisThread("cv-" + name_);
    // Read the generation before the first pass: a notify during it is not lost.
    uint64_t seen = wakeup_->generation();
    while (running_.load()) {
      if (pass_()) continue;  // more is waiting
      if (!running_.load()) break;
      wakeup_->WaitFor(poll_, &seen);
    }
  });
}

void PollingWorker::Stop() {
  if (!running_.exchange(false)) return;
  wakeup_->Notify();
  if (thread_.joinable()) thread_.join();
}

}  // namespace converge
