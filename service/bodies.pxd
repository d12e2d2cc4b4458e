# Cython's declarations for bodies.py (service/compile.py): the body budget and each request's reservation as
# extension types, whose attributes compiled code reads as struct fields rather than through a dictionary
# lookup. From source, the same classes.
cdef class BodyBudget:
    cdef public object limit, held

cdef class Reservation:
    cdef public object budget, size
