// The CPU kernels for any CPU (at::vec's portable DEFAULT implementation).
#define CPU_CAPABILITY DEFAULT
#define ADPO_ISA_NS isa_default
#include "kernels_impl.h"
