// The body of a provider webhook (POST /webhooks/psp), after its signature was verified,
// and the queued event its consumer reads back. Factored out of the service so that the
// route, the consumer and the fuzz target (fuzz/psp_event_fuzz.cc) share one parser.
//
// The rules: a JSON object, nesting at most 256 levels of arrays and objects
// (converge::ValidateEventData); `type` a string; `data` an object; in `data`,
// `charge_id`, `id` and `reference`, where present, strings. Other members are ignored.
//
// Thread safety: free functions without shared state.
#ifndef CONVERGE_EXAMPLES_PAYMENTS_PSP_EVENT_H_
#define CONVERGE_EXAMPLES_PAYMENTS_PSP_EVENT_H_

#include <cstdint>
#include <string>
#include <string_view>

#include "converge/event.h"
#include "converge/status.h"

namespace payments {

// The source of every provider event the service queues.
inline constexpr std::string_view kPspSource = "urn:converge:psp";

struct PspEvent {
  std::string type;  // the provider's, e.g. "charge.succeeded"
  std::string data;  // `data`, as compact JSON
  // From `data`; "" when absent.
  std::string charge_id, id, reference;

  // The aggregate the event is about: `charge_id`, else `id`, else "unknown".
  std::string Subject() const;
  bool operator==(const PspEvent&) const = default;
};

// The webhook body, validated by the rules above. kInvalidArgument with a message for the
// provider (it names the first rule the body breaks) for anything else.
converge::Result<PspEvent> ParsePspEvent(std::string_view body);

// The event the route queues for webhook `webhook_id` received at `time` (ms since the
// epoch), envelope included: type "psp.<type>", the subject above, `data` as is.
converge::Event PspQueueEvent(const PspEvent& p, const std::string& webhook_id, int64_t time);

// What the consumer reads back from a queued event: the PspEvent PspQueueEvent was made
// from. kInvalidArgument when `e` is not one (another type, data that breaks the rules).
converge::Result<PspEvent> ParsePspQueueEvent(const converge::Event& e);

}  // namespace payments

#endif  // CONVERGE_EXAMPLES_PAYMENTS_PSP_EVENT_H_
