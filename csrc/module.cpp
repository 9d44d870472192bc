// The Python module ddpm_fast._C: importing it runs the static TORCH_LIBRARY_FRAGMENT /
// TORCH_LIBRARY_IMPL registrations of every op file linked into it (csrc/*_ops.cpp).
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
