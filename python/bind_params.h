// How python/ binds csrc/'s launch API (pcd_kernels/params.h): parameter structs, enums and
// launchers, each from the X list that declares it, so no field or name is spelled twice.
#pragma once

#include <pybind11/pybind11.h>

namespace pcd_kernels_bindings {

namespace py = pybind11;

// A parameter struct as a Python class whose instances start with every field 0; bind its
// fields with PCD_BIND_FIELD over the struct's X list, e.g.
//   auto cls = bind_struct<P>(m, "P", "...");
//   PCD_KERNELS_P_PARAMS(PCD_BIND_FIELD)
// Setting a name the struct lacks raises AttributeError, a value of the wrong type TypeError.
template <typename S>
py::class_<S> bind_struct(py::module_& m, const char* name, const char* doc) {
  py::class_<S> cls(m, name, doc);
  cls.def(py::init<>());
  return cls;
}
#define PCD_BIND_FIELD(field_type, field) cls.def_readwrite(#field, &decltype(cls)::type::field);

// An enum of an X(enumerator, Python name, number) list; Python ints convert to it implicitly
// (launchers refuse numbers outside the list), so Python can keep its own numbers.
//   auto e = bind_enum<E>(m, "E");
//   PCD_KERNELS_E_LIST(PCD_BIND_ENUMERATOR)
template <typename E>
py::enum_<E> bind_enum(py::module_& m, const char* name) {
  py::enum_<E> e(m, name);
  py::implicitly_convertible<py::int_, E>();
  return e;
}
#define PCD_BIND_ENUMERATOR(enumerator, name, number) e.value(#name, decltype(e)::type::enumerator);

// The launcher pcd_kernels::name as the function `name` of the module `m`, taking its op's
// parameter struct; the GIL is released while it enqueues the kernels.
#define PCD_BIND_LAUNCHER(name, doc) \
  m.def(#name, &pcd_kernels::name, py::arg("params"), doc, py::call_guard<py::gil_scoped_release>());

}  // namespace pcd_kernels_bindings
