# Cython's declarations for transport.py (service/compile.py): the request head's reader and the request a
# connection answers itself as extension types, whose attributes compiled code reads as struct fields rather
# than through a dictionary lookup. From source, the same classes.
cdef class HeadReader:
    cdef public bytes url
    cdef public list headers
    cdef public bint expect_100_continue
    cdef public Py_ssize_t header_bytes, max_head_bytes, max_header_count
    cdef public object protocol, on_headers_complete, on_body, on_message_complete

cdef class AnsweredHere:
    cdef public object call, context, disconnected, keep_alive, protocol, response_complete, response_started
    cdef public object inside, submitted, waited
