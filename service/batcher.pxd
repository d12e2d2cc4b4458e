# Cython's declarations for batcher.py (service/compile.py): the batcher as an extension type, whose attributes
# compiled code reads as struct fields rather than through a dictionary lookup. From source, the same class.
cdef class Batcher:
    cdef public object name, limit_setting, max_requests, max_batch_size, max_queue_delay_s, queue_limit
    cdef public object _run, _estimate, _loop_budget_s, _metrics, _queue, _queued, _queued_rows, _running_rows
    cdef public object _last_batch_rows, _arrivals, _waiting, _full, _expiry, _expiry_at, _task, _thread, _closing
    cdef public object _row_s, _last_take, _last_rows, _mean_rows, intake_batches, intake, _loop
    cdef public object _pending_changed, _pending_source, idle_spin_s, _spin_pays, _last_requests, _idle, _last_arrival

cdef class _Request:
    cdef public object deadline, enqueued, feeds, future, phase, rows
