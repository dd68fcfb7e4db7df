// The Python module adpo_kernels._C.  Importing it loads the shared library, whose
// static initialisers register the CPU kernels of the adpo:: ops (ops_cpu.cpp); the only
// Python-visible function reports which instruction set the kernels run with.
#include <Python.h>

namespace adpo::cpu {
const char* cpu_isa();
}

static PyObject* adpo_cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(adpo::cpu::cpu_isa()); }

static PyMethodDef adpo_methods[] = {
    {"cpu_isa", adpo_cpu_isa, METH_NOARGS, "Instruction set of the CPU kernels: 'avx512', 'avx2' or 'default'."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef adpo_module = {PyModuleDef_HEAD_INIT, "_C",
                                         "C++ CPU kernels of the adpo:: ops (registered on import).", -1,
                                         adpo_methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&adpo_module); }
