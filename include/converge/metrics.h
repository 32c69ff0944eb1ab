// Metrics in the Prometheus text exposition format: counters, gauges and histograms with
// labels, rendered for GET /metrics.
//
// Thread safety: every method is safe to call from many threads.
#ifndef CONVERGE_METRICS_H_
#define CONVERGE_METRICS_H_

#include <map>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace converge {

class Metrics {
 public:
  using Labels = std::vector<std::pair<std::string, std::string>>;

  // Declares a family; `type` is "counter", "gauge" or "histogram"; `help` is one line
  // for # HELP. Optional: an undeclared family renders as "untyped" without # HELP.
  void Describe(const std::string& name, const std::string& type, const std::string& help);
  // counter += v
  void Add(const std::string& name, const Labels& labels = {}, double v = 1);
  // gauge = v
  void Set(const std::string& name, const Labels& labels, double v);
  // One histogram observation; `bounds` (ascending upper bounds) are fixed by the first
  // observation of the series.
  void Observe(const std::string& name, const Labels& labels, double v,
               const std::vector<double>& bounds);
  // Sets a histogram series whole, from figures kept elsewhere: `cumulative[i]` counts the
  // observations <= bounds[i] (ascending bounds), `count` all of them (the +Inf bucket).
  void SetHistogram(const std::string& name, const Labels& labels,
                    const std::vector<double>& bounds, const std::vector<uint64_t>& cumulative,
                    double sum, uint64_t count);
  // The current value of a counter or gauge series (0 if absent).
  double Value(const std::string& name, const Labels& labels = {}) const;

  std::string Render() const;

 private:
  struct Series {
    double value = 0;
    std::vector<double> bounds;
    std::vector<uint64_t> buckets;
    double sum = 0;
    uint64_t count = 0;
  };
  struct Family {
    std::string type = "untyped";
    std::string help;
    std::map<std::string, Series> series;  // by rendered label set
  };
  static std::string LabelKey(const Labels& labels);

  mutable std::mutex mu_;
  std::map<std::string, Family> families_;
};

}  // namespace converge

#endif  // CONVERGE_METRICS_H_
