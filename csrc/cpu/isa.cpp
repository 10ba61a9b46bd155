// pyoptk::cpu_loop_isa(): which copy of the CPU loops runs (for build_info / `pyoptk info`).
#include "cpu_util.h"
#include "pyoptk/api.h"

namespace pyoptk {

const char* cpu_loop_isa() { return cpu::cpu_isa_name(); }

}  // namespace pyoptk
