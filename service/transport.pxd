# Cython's declarations for transport.py (service/compile.py): the request a connection answers itself as an
# extension type, whose attributes compiled code reads as struct fields rather than through a dictionary
# lookup. From source, the same class.
cdef class AnsweredHere:
    cdef public object call, context, disconnected, keep_alive, protocol, response_complete, response_started
    cdef public object submitted, waited
