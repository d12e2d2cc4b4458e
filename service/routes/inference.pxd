# Cython's declarations for inference.py (service/compile.py): extension types, whose attributes compiled code
# reads as struct fields rather than through a dictionary lookup. From source, the same classes.
cdef class BodyReader:
    cdef public object chunks, limit, reservation, size

cdef class InferenceCall:
    cdef public object encoding, headers, model, reader, request, reservation, served, started, state, version

cdef class RequestHeaders:
    cdef public object content_encoding, content_length, content_type, header_length, request_id
