# Cython's declarations for metrics.py (service/compile.py): what each request counts in, as extension types,
# whose attributes compiled code reads as struct fields rather than through a dictionary lookup. From
# source, the same classes.
cdef class Duration:
    cdef public object count, ns

cdef class Statistics:
    cdef public object batches, compute_infer, compute_input, compute_output, executions, fail, inferences
    cdef public object last_inference_ms, queue, success

cdef class ModelMetrics:
    cdef public object _metrics, name, version, success, request_seconds, success_grpc, request_seconds_grpc
    cdef public object inferences, executions, batch_size, queue_seconds, compute_seconds, pending
    cdef public object held_connections, statistics, _worker_inferences, _failures, _answered, _count_due
