# Cython's declarations for protocol.py (service/compile.py): the checked request as an extension type, whose
# attributes compiled code reads as struct fields rather than through a dictionary lookup. From source, the
# same class.
cimport cython

cdef class InferRequest:
    cdef public object feeds, id, outputs, plan, rows, timeout_s

cdef class RequestedOutput:
    cdef public object binary, classification, name

cdef class _Plan:
    cdef public object binary_outputs, config, id, max_batch_size, outputs, response, rows, timeout_s
    cdef public list inputs
    cdef public Py_ssize_t size

# The request's checks, called from one another as C functions rather than through Python calls.
cpdef object _json(object data, object what)
cpdef tuple _split_body(object body, object header_length)
cpdef list _check_shape(object name, object shape, object spec, object max_batch_size, object batched)
cpdef object _from_json(object name, object data, object shape, object datatype)
cpdef object _from_binary(object name, object size, object binary, object offset, object shape, object datatype)
cpdef list _requested_outputs(object doc, object parameters, object config)
cpdef list _every_output(object config, object binary)
cpdef object _timeout(object parameters)

# A planned request's reading (``_planned``, ``_planned_json``), its plan's fields read as struct fields.
@cython.locals(plan=_Plan, feeds=dict)
cpdef object _planned(bytes body, str header_length, object config, object max_batch_size)

@cython.locals(plan=_Plan, count=Py_ssize_t)
cpdef object _planned_json(bytes body, Py_ssize_t start, Py_ssize_t end, tuple key, object config)

# Where a JSON request's values start, found by C loops over its bytes.
@cython.locals(at=Py_ssize_t, i=Py_ssize_t)
cpdef Py_ssize_t _data_start(bytes body)

cpdef Py_ssize_t _past_space(bytes text, Py_ssize_t i)

# A planned JSON request's numbers read by a C loop over its bytes, each stored straight into the array.
@cython.locals(n=Py_ssize_t, length=Py_ssize_t, i=Py_ssize_t, k=Py_ssize_t, _j=Py_ssize_t, negative=bint,
               integral=bint, mantissa=cython.longlong, exact_mantissa=cython.longlong, most=cython.longlong,
               exponent=int, sign=int, power=int, x=double, first=double, second=double, low=float, near=double,
               limit=double)
cpdef Py_ssize_t _fp32_text(bytes text, Py_ssize_t start, float[::1] values)

@cython.locals(document=dict, fields=dict, feeds=dict)
cpdef object check_infer_document(object doc, object binary, object config, object max_batch_size)

# The flat FP32 path's loop in C: each item read as a double, checked and stored straight into the array.
@cython.locals(n=Py_ssize_t, i=Py_ssize_t, x=double, limit=double, view=float[::1])
cpdef object _fp32_flat(list data, list shape)

# What binary data may hold, checked for each binary input (``_from_binary``, ``_planned``) as a C call.
cpdef bint _binary_values_ok(object flat, object datatype)

# The binary FP32 path's finiteness check in C, over the tensor's memory (read-only: the request's bytes).
@cython.locals(i=Py_ssize_t, x=float, limit=float)
cpdef bint _fp32_finite(const float[::1] values)
