# Cython's declarations for protocol.py (service/compile.py): the checked request as an extension type, whose
# attributes compiled code reads as struct fields rather than through a dictionary lookup. From source, the
# same class.
cdef class InferRequest:
    cdef public object feeds, id, outputs, rows, timeout_s

cdef class RequestedOutput:
    cdef public object binary, classification, name
