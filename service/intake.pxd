# Cython's declarations for intake.py (service/compile.py): extension types, whose attributes compiled code
# reads as struct fields rather than through a dictionary lookup. From source, the same classes.
cdef class Expectation:
    cdef public object connection, intake, lapse_at, open

cdef class Intake:
    cdef public object limit, changed, in_flight, expected, held, _expectations, _lapse_timer, closed
