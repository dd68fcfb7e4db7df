// Shim of <cuda_runtime_api.h> for the CUDA-on-CPU harness: csrc/cuda compiles as C++ with this directory first on
// the include path (see ../cuda_emu.h).
#pragma once
#include "../cuda_emu.h"
