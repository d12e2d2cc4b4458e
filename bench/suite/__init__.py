"""The benchmark suite behind ``make bench``: every scenario, one run, one machine, ratios from the same run.

The servers run on core 0 and the load generator on core 1 (``taskset``), with onnxruntime's
threads matched to the server's cores. In order:

1. start-up: normserve with the default models, started ``startups`` times, timed to ready;
2. memory: its RSS once ready, and again after 100,000 tiny-model requests;
3. the tiny model (cnn-bn), JSON then binary: concurrency 1, 16 and 64, then fixed rates from a
   quarter of the saturated throughput to past it (open loop);
4. the large model (resnet18-bn), binary at concurrency 1, 8 and 32 with batching on, then off
   (a second server), and JSON at concurrency 8 (the server's CPU outside onnxruntime, JSON vs binary);
5. baselines on the same core: the naive FastAPI app and the bare ASGI app, concurrency 1, 16, 64;
6. ceilings and graphs: in-process onnxruntime at every batch size, folded vs unfolded graphs with
   onnxruntime's optimizations off and on;
7. a py-spy profile of normserve at the tiny model's concurrency 64, and, where ``wrk`` is
   installed, a cross-check of the two HTTP ceilings with it.

It writes ``docs/benchmarks.md`` (between its markers; the text around them is kept), the plots
and ``docs/bench/suite.json``.

    make bench                                   # about 8 minutes
    python -m bench.suite --smoke --repository R --tiny tiny-cnn-bn --large tiny-cnn-bn \\
        --artifacts A --doc /tmp/bench.md        # seconds: the test suite runs this

The package: ``plan`` (what runs, for how long), ``servers`` (start a server, wait until ready, read its
/metrics: shared with the tests), ``scenarios`` (each measurement), ``judging`` (the targets),
``writing`` (tables, plots and the document), ``__main__`` (the command line). Nothing is imported here,
so that the tests can use ``servers`` without the load generator's dependencies.
"""
