# Cython's declarations for protocol.py (service/compile.py): the checked request as an extension type, whose
# attributes compiled code reads as struct fields rather than through a dictionary lookup. From source, the
# same class.
cimport cython

cdef class InferRequest:
    cdef public object feeds, id, outputs, rows, timeout_s

cdef class RequestedOutput:
    cdef public object binary, classification, name

# The flat FP32 path's loop in C: each item read as a double, checked and stored straight into the array.
@cython.locals(n=Py_ssize_t, i=Py_ssize_t, x=double, limit=double, view=float[::1])
cpdef object _fp32_flat(list data, list shape)

# The binary FP32 path's finiteness check in C, over the tensor's memory (read-only: the request's bytes).
@cython.locals(i=Py_ssize_t, x=float, limit=float)
cpdef bint _fp32_finite(const float[::1] values)
