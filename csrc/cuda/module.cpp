// The Python module adpo_kernels._C_cuda.  Importing it loads the shared library, whose
// static initialisers register the CUDA kernels of the adpo:: ops (ops_cuda.cpp).  It
// imports on machines without a GPU; its kernels run only on one.
#include <Python.h>

static struct PyModuleDef adpo_cuda_module = {PyModuleDef_HEAD_INIT, "_C_cuda",
                                              "CUDA kernels of the adpo:: ops (registered on import).", -1,
                                              nullptr};

PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&adpo_cuda_module); }
