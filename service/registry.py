"""The models being served: load the repository, warm each version, swap on reload, drain on unload.

Each model version gets its own onnxruntime session and batcher; a BatchNorm model's version also
gets its batch-statistics graph, with a batcher that runs each request as its own batch (its answer
depends on the batch), for the batchnorm endpoint. A model without a batch dimension (max_batch_size
0) has nothing to batch: its batcher runs each request alone, as one row. Every graph must take and
give what config.json declares (names, datatypes, shapes, checked against the graph and again on what
its warm-up answers) or its version is not served. A model that fails to load is
kept as UNAVAILABLE with the reason, and never stops the others. A reload builds and warms the new
sessions off the event loop, swaps them in at once, and lets the old batchers finish what they
had accepted: no request is lost.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from repository import (
    BN_STATS_FILE,
    DTYPES,
    NAME_PATTERN,
    BatchNormStats,
    ModelConfig,
    ModelVersion,
    TensorSpec,
    list_versions,
    load_bn_stats,
    load_config,
    load_version,
)
from service.batcher import Batcher
from service.config import BatchingSettings, Settings
from service.errors import InvalidInput, ModelNotFound, NotReady, ServeError
from service.machine import available_cores
from service.metrics import Metrics, ModelMetrics, ModelState, ModelStates
from service.runtime import CUDA, GraphTensor, Runtime

__all__ = ["BatchStatsGraph", "Readiness", "Registry", "ServedVersion", "VersionEntry"]

log = logging.getLogger(__name__)


class Readiness(enum.StrEnum):
    """Where a model or a version stands, as the repository extension's index says it."""

    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass
class BatchStatsGraph:
    """A BatchNorm model version's batch-statistics graph: never batched with other requests. The batchnorm
    endpoint runs its batch through this graph and, for the running-statistics answer, through the served
    graph on a queue of its own (``running``): it never takes a place in infer's queue."""

    runtime: Runtime
    batcher: Batcher  # max_requests=1: each request is one batch
    stats: BatchNormStats
    metrics: ModelMetrics
    running: Batcher  # the served graph, for the endpoint alone; max_requests=1


@dataclass
class ServedVersion:
    """One model version that serves: its session, its batcher and its metric children."""

    version: ModelVersion
    runtime: Runtime
    batcher: Batcher
    batching: BatchingSettings
    metrics: ModelMetrics
    batch_stats: BatchStatsGraph | None = None  # BatchNorm models exported with one

    @property
    def batchers(self) -> list[Batcher]:
        return [self.batcher] + ([self.batch_stats.batcher, self.batch_stats.running] if self.batch_stats else [])

    @property
    def config(self) -> ModelConfig:
        return self.version.config

    @functools.cached_property
    def output_datatypes(self) -> dict[str, str]:
        return {name: spec.datatype for name, spec in self.version.config.output_specs.items()}


@dataclass
class VersionEntry:
    """A version the repository holds, served or not; ``reason`` says why it is not."""

    version: str
    readiness: Readiness
    reason: str = ""
    served: ServedVersion | None = None


@dataclass
class ModelEntry:
    name: str
    config: ModelConfig | None = None
    versions: dict[str, VersionEntry] = field(default_factory=dict)
    readiness: Readiness = Readiness.UNAVAILABLE  # of the model as a whole, while it has no versions
    reason: str = ""  # why the model as a whole is unavailable (bad config, no versions) or still loading

    def version(self, version: str) -> VersionEntry:
        """One version of the model, served or not; 404 when the repository has no such version."""
        held = self.versions.get(version)
        if held is None:
            known = ", ".join(sorted(self.versions, key=int)) or "none"
            raise ModelNotFound(f"model {self.name!r} has no version {version!r}; it has: {known}")
        return held

    def latest_ready(self) -> ServedVersion | None:
        if len(self.versions) == 1:  # most models have one version: every request asks this
            for only in self.versions.values():
                return only.served
        ready = [v for v in self.versions.values() if v.served is not None]
        return max(ready, key=lambda v: int(v.version)).served if ready else None


def _example(config: ModelConfig) -> dict[str, np.ndarray]:
    """One row of zeros for every input (every input whole, for a model without a batch dimension), to warm
    the session with."""
    return {s.name: np.zeros([1 if d == -1 else d for d in s.shape], dtype=DTYPES[s.datatype]) for s in config.inputs}


def _batcher_shape(config: ModelConfig, batching: BatchingSettings) -> tuple[int, int | None]:
    """The batcher's max_batch_size and max_requests. A model without a batch dimension runs each request
    alone, and a request counts as one row of a batch of one."""
    return (batching.max_batch_size, None) if config.batched else (1, 1)


class Registry:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.models: dict[str, ModelEntry] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._reported_fallbacks: set[str] = set()
        self.cores = available_cores()
        self._prepared: dict[str, ModelEntry] = {}
        metrics.register_states(ModelStates(self.states, settings.require_gpu))

    # -- lookups (the hot path) --

    def get(self, name: str, version: str | None = None) -> ServedVersion:
        """The served version to run a request on: ``version``, or the newest that is ready."""
        entry = self.entry(name)
        if version is None:
            served = entry.latest_ready()
            if served is None:
                raise NotReady(f"model {name!r} is not ready: {self.reason(entry)}")
            return served
        held = entry.version(version)
        if held.served is None:
            raise NotReady(f"model {name!r} version {version} is not ready: {held.readiness} {held.reason}".rstrip())
        return held.served

    def entry(self, name: str) -> ModelEntry:
        """The model's entry, served or not; 404 when the server does not have it."""
        entry = self.models.get(name)
        if entry is None:
            # The model asked for, and where to look: never the list of every model (or a server path).
            raise ModelNotFound(f"unknown model {name!r}; POST /v2/repository/index lists the models served")
        return entry

    @staticmethod
    def reason(entry: ModelEntry) -> str:
        if entry.reason:
            return entry.reason
        reasons = [f"version {v.version}: {v.readiness} {v.reason}".rstrip() for v in entry.versions.values()]
        return "; ".join(reasons) or "no versions"

    def not_ready_reasons(self, required: list[str] | None = None) -> list[str]:
        """Why the server is not ready, if it is not: a repository with models but none served, a required
        model that is not served, and with NORMSERVE_REQUIRE_GPU every model on CPU."""
        reasons = []
        serving = {name for name, entry in self.models.items() if entry.latest_ready() is not None}
        if not serving and (in_repository := self.repository_names()):
            reasons.append(f"no model is loaded and ready, of the {len(in_repository)} in the repository")
        for name in required or []:
            if name not in serving:
                entry = self.models.get(name)
                why = "not loaded" if entry is None else self.reason(entry)
                reasons.append(f"required model {name!r} (NORMSERVE_REQUIRED_MODELS) is not ready: {why}")
        if self.settings.require_gpu:
            for entry in self.models.values():
                for held in entry.versions.values():
                    if held.served is not None and held.served.runtime.provider.active != CUDA:
                        status = held.served.runtime.provider
                        reasons.append(
                            f"{entry.name} version {held.version} runs on {status.active}, and "
                            f"NORMSERVE_REQUIRE_GPU is set: {status.fallback or 'CUDA was not requested'}"
                        )
        return reasons

    # -- loading --

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def load_all(self, only: list[str] | None = None) -> None:
        """Load every model in the repository, one after the other; ``only``: those of them (a restarted
        worker's, what the others serve)."""
        root = self.settings.repository
        if not root.is_dir():
            log.error("model repository %s is not a folder: serving no models", root)
            return
        for name in self.settings.models:
            if not (root / name).is_dir():
                log.warning("NORMSERVE_MODELS configures %r, which is not in %s", name, root)
        names = []
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if only is not None and folder.name not in only:
                continue
            if _valid_name(folder.name):
                names.append(folder.name)
            else:  # lost+found, __pycache__: not a model, and not a reason to stop loading the others
                log.warning("skipping %s: a model's folder name is letters, digits and . _ -", folder)
        for name in names:  # known from the start: a request for a model not loaded yet gets 503, not 404
            self.models.setdefault(name, ModelEntry(name, readiness=Readiness.LOADING, reason="waiting to load"))
        for name in names:
            if name not in self.models:
                continue  # unloaded before its turn came
            try:
                await self.load(name)
            except ServeError as e:  # the folder went away meanwhile
                self.models.pop(name, None)
                log.error("cannot load %s: %s", name, e.message)

    def repository_names(self) -> list[str]:
        root = self.settings.repository
        on_disk = {p.name for p in root.iterdir() if p.is_dir() and _valid_name(p.name)} if root.is_dir() else set()
        return sorted(on_disk | set(self.models))

    async def load(self, name: str) -> ModelEntry:
        """Load (or reload) one model from the repository; swap it in once every version is warm.

        Returns the entry as loaded. When a reload loads no version at all, the versions already
        serving stay, and the returned entry (not swapped in) says why the reload failed.
        """
        async with self._lock(name):
            return await self._swap(name, await self._build_entry(name))

    async def prepare(self, name: str) -> ModelEntry:
        """The first half of ``load``, for a load every worker makes (``service.peers``): build and warm the
        model, and hold it for ``commit`` (or ``discard``) without serving it yet."""
        async with self._lock(name):
            new = self._prepared[name] = await self._build_entry(name)
        return new

    async def commit(self, name: str) -> ModelEntry:
        """Swap in what ``prepare`` built."""
        async with self._lock(name):
            new = self._prepared.pop(name, None)
            if new is None:
                raise NotReady(f"model {name!r} has nothing prepared to swap in: load it again")
            return await self._swap(name, new)

    async def discard(self, name: str) -> None:
        """Drop what ``prepare`` built: what was served before stays as it was."""
        async with self._lock(name):
            self._prepared.pop(name, None)
            entry = self.models.get(name)
            if entry is not None and entry.readiness is Readiness.LOADING and not entry.versions:
                self.models.pop(name)  # the placeholder of a model that was not served

    async def _build_entry(self, name: str) -> ModelEntry:
        """Build every version of the model (its lock held); a model not served yet shows as loading."""
        if not _valid_name(name):
            raise InvalidInput(f"{name!r} is not a model name; expected letters, digits and . _ - (a folder name)")
        model_dir = self.settings.repository / name
        if not model_dir.is_dir():
            raise ModelNotFound(f"the model repository has no model {name!r}")
        old = self.models.get(name)
        if old is None or not old.versions:
            self.models[name] = ModelEntry(name, readiness=Readiness.LOADING, reason="loading")
        return await asyncio.to_thread(self._build, model_dir)

    async def _swap(self, name: str, new: ModelEntry) -> ModelEntry:
        old = self.models.get(name)
        if old is None or not old.versions:
            old = None  # nothing served yet: nothing to retire
        if old is not None and old.latest_ready() is not None and new.latest_ready() is None:
            # As Triton does: a reload that loads nothing leaves the versions that serve in place.
            log.error("reloading %s failed, its loaded versions keep serving: %s", name, self.reason(new))
            return new
        for held in new.versions.values():
            if held.served is not None:
                for batcher in held.served.batchers:
                    batcher.start()
        self.models[name] = new  # the swap: new requests go to the new sessions from here on
        if old is not None:
            await self._retire(old, keep=new)
        self._log_loaded(new)
        return new

    def _log_loaded(self, entry: ModelEntry) -> None:
        served = [v.served for v in entry.versions.values() if v.served is not None]
        if not served:
            log.error("model %s is not available: %s", entry.name, self.reason(entry))
        for s in served:
            status = s.runtime.provider
            if status.fallback and status.fallback not in self._reported_fallbacks:
                self._reported_fallbacks.add(status.fallback)
                log.warning(
                    "NORMSERVE_PROVIDER=%s, but models run on %s: %s",
                    status.requested,
                    status.active,
                    status.fallback,
                )
            batching = (
                f"max batch {s.batching.max_batch_size}, max queue delay {s.batching.max_queue_delay_s * 1000:.1f} ms"
                if s.config.batched
                else "no batch dimension: each request runs alone"
            )
            log.info("loaded %s version %s on %s (%s)", entry.name, s.version.number, status.active, batching)

    async def unload(self, name: str) -> None:
        """Stop serving a model: new requests get 404, those it accepted still finish."""
        self.entry(name)  # 404 for a model this server does not have
        async with self._lock(name):
            entry = self.models.pop(name, None)
            if entry is None:  # unloaded while this call waited for the lock
                raise ModelNotFound(f"model {name!r} is already unloaded")
            await self._retire(entry)
        log.info("unloaded %s", name)

    async def close(self) -> None:
        """Drain every batcher: all accepted requests finish."""
        for name in list(self.models):
            entry = self.models.pop(name)
            await self._retire(entry)

    async def _retire(self, entry: ModelEntry, keep: ModelEntry | None = None) -> None:
        """Stop the entry's batchers (every request they accepted finishes); a version that ``keep`` (the entry
        swapped in) does not serve leaves the metrics' gauges."""
        for held in entry.versions.values():
            if held.served is None:
                continue
            for batcher in held.served.batchers:
                await batcher.stop()
            successor = keep.versions.get(held.version) if keep is not None else None
            if successor is None or successor.served is None:  # its successor's metric children are the same ones
                held.served.metrics.forget()
                if held.served.batch_stats is not None:
                    held.served.batch_stats.metrics.forget()

    def states(self) -> Iterator[ModelState]:
        """What each version in the repository is now, for the metrics (``service.metrics.ModelStates``): a
        version that serves, for each graph it serves (infer's, the batchnorm endpoint's), and a version that
        failed to load (not ready, on infer's only). An unloaded model has none."""
        for entry in list(self.models.values()):
            for held in entry.versions.values():
                served = held.served
                if served is None:
                    yield ModelState("", entry.name, held.version, False, None, None)
                    continue
                yield ModelState(
                    "", entry.name, held.version, True, served.runtime.provider.active, served.batching.queue_limit
                )
                if served.batch_stats is not None:
                    graph = served.batch_stats
                    yield ModelState(
                        "batchnorm",
                        entry.name,
                        held.version,
                        True,
                        graph.runtime.provider.active,
                        graph.batcher.queue_limit,
                    )

    def _build(self, model_dir: Path) -> ModelEntry:
        """Read, create and warm every version of one model (blocking: runs in a thread)."""
        name = model_dir.name
        entry = ModelEntry(name)
        try:
            entry.config = load_config(model_dir)
            versions = list_versions(model_dir)
        except Exception as e:  # a broken model is reported, never fatal to the others
            log.error("cannot load %s: %s", name, e)
            entry.reason = self._public(str(e))
            return entry
        if not versions:
            entry.reason = f"model {name!r} has no version folders (1, 2, ...)"
        for version in versions:
            entry.versions[version] = self._build_version(model_dir, entry.config, version)
        return entry

    def _public(self, message: str) -> str:
        """A reason as clients read it: paths relative to the repository, never the server's own folders
        (the log keeps the full message)."""
        roots = {str(self.settings.repository.resolve()), str(self.settings.repository)}
        for root in sorted(roots, key=len, reverse=True):
            message = message.replace(root + os.sep, "").replace(root, "the model repository")
        return message

    def _build_version(self, model_dir: Path, config: ModelConfig, version: str) -> VersionEntry:
        name = config.name
        try:
            loaded = load_version(model_dir, version, config)
            runtime = Runtime(loaded.model_file, self.settings.provider, self.settings.intra_op_threads)
            _check_graph(runtime, config)
            batching = self.settings.batching(name, config.max_batch_size)
            _check_outputs(runtime, config, _warm(runtime, config, batching))
            batch_stats = self._build_batch_stats(loaded, runtime, batching) if loaded.has_batch_stats else None
        except Exception as e:  # corrupt file, bad report, onnxruntime refusing the graph, a graph unlike its config
            log.exception("cannot load %s version %s", name, version)
            return VersionEntry(version, Readiness.UNAVAILABLE, self._public(str(e).strip()))
        if not config.batched and (override := self.settings.models.get(name)) and override.max_batch_size:
            log.warning("NORMSERVE_MODELS sets a max_batch_size for %s, which has no batch dimension: ignored", name)
        metrics = self.metrics.model(name, version)
        max_batch_size, max_requests = _batcher_shape(config, batching)
        batcher = Batcher(
            f"{name} version {version}",
            runtime.run,
            runtime.estimate,
            max_batch_size,
            batching.max_queue_delay_s,
            batching.queue_limit,
            metrics,
            self.cores,
            max_requests=max_requests,
            intake_batches=batching.intake_batches,
            idle_spin_s=batching.idle_spin_s,
        )
        return VersionEntry(
            version, Readiness.READY, served=ServedVersion(loaded, runtime, batcher, batching, metrics, batch_stats)
        )

    def _build_batch_stats(self, loaded: ModelVersion, served: Runtime, batching: BatchingSettings) -> BatchStatsGraph:
        """The version's batch-statistics graph, checked against its statistics file and the served graph
        (whose logits it is compared with), and warmed."""
        config = loaded.config
        stats = load_bn_stats(loaded)
        compared = config.output_specs.get(stats.logits_output)
        if compared is None:
            raise ValueError(
                f"{BN_STATS_FILE} compares output {stats.logits_output!r}, which model.onnx does not have "
                f"(it has {served.output_names})"
            )
        if len(compared.shape) != 2:
            raise ValueError(
                f"{BN_STATS_FILE} compares output {compared.text}; the batchnorm endpoint compares a 2-D output "
                "(rows, scores)"
            )
        runtime = Runtime(loaded.batch_stats_file, self.settings.provider, self.settings.intra_op_threads)
        statistics = [name for layer in stats.layers for name in (layer.mean_output, layer.var_output)]
        graph = loaded.batch_stats_file.name
        _check_graph(runtime, config, [stats.logits_output, *statistics], graph, f"config.json and {BN_STATS_FILE}")
        warmed = _warm(runtime, config, batching, graph)
        _check_outputs(runtime, config, warmed, graph)
        for outputs in warmed.values():
            by_name = dict(zip(runtime.output_names, outputs, strict=True))
            for layer in stats.layers:
                for name in (layer.mean_output, layer.var_output):
                    if by_name[name].shape != (layer.channels,):
                        raise ValueError(
                            f"{graph} answers {name} of shape {list(by_name[name].shape)}; {BN_STATS_FILE} expects "
                            f"layer {layer.name}'s statistics there, one per channel: [{layer.channels}]"
                        )
        if self.metrics.batchnorm is None:
            raise RuntimeError("the registry's metrics have no batchnorm families")
        metrics = self.metrics.batchnorm.model(config.name, loaded.number)
        rows = _batcher_shape(config, batching)[0]
        limit = self.settings.batchnorm_queue_limit

        def one_at_a_time(what: str, graph: Runtime, counted_in: ModelMetrics) -> Batcher:
            # Nothing may join a batch, so there is nothing to wait for.
            name = f"{config.name} version {loaded.number} ({what})"
            return Batcher(
                name,
                graph.run,
                graph.estimate,
                rows,
                0.0,
                limit,
                counted_in,
                self.cores,
                max_requests=1,
                limit_setting="NORMSERVE_BATCHNORM_QUEUE_LIMIT",
            )

        # The running-statistics half runs on the served graph, so its rows count with infer's.
        running_metrics = self.metrics.model(config.name, loaded.number)
        running = one_at_a_time("running statistics, batchnorm endpoint", served, running_metrics)
        return BatchStatsGraph(runtime, one_at_a_time("batch statistics", runtime, metrics), stats, metrics, running)


def _valid_name(name: str) -> bool:
    return re.fullmatch(NAME_PATTERN, name) is not None


def _check_graph(
    runtime: Runtime,
    config: ModelConfig,
    outputs: list[str] | None = None,
    graph: str = "model.onnx",
    declared_by: str = "config.json's tensors",
) -> None:
    """The graph's tensors must be the ones declared: config.json's inputs, and ``outputs`` (config.json's
    by default), by name; and every tensor config.json declares, by datatype and shape (a dimension the
    graph leaves open fits any size; a -1, the batch, only one the graph leaves open)."""
    declared_in = sorted(s.name for s in config.inputs)
    declared_out = sorted(outputs if outputs is not None else [s.name for s in config.outputs])
    if sorted(runtime.input_names) != declared_in or sorted(runtime.output_names) != declared_out:
        raise ValueError(
            f"{graph} has inputs {runtime.input_names} and outputs {runtime.output_names}, but {declared_by} "
            f"expect {declared_in} and {declared_out}"
        )
    unlike = [
        f"{kind} {tensor.text} is declared {spec.text}"
        for kind, tensors, specs in (
            ("input", runtime.inputs, config.input_specs),
            ("output", runtime.outputs, config.output_specs),
        )
        for tensor in tensors
        if (spec := specs.get(tensor.name)) is not None and not _fits(tensor, spec)
    ]
    if unlike:
        raise ValueError(f"{graph} does not take or give what config.json declares: its " + "; its ".join(unlike))


def _fits(tensor: GraphTensor, spec: TensorSpec) -> bool:
    if tensor.datatype != spec.datatype:
        return False
    if tensor.shape is None:
        return True
    return len(tensor.shape) == len(spec.shape) and all(
        g is None or g == d for g, d in zip(tensor.shape, spec.shape, strict=True)
    )


def _warm(
    runtime: Runtime, config: ModelConfig, batching: BatchingSettings, graph: str = "model.onnx"
) -> dict[int, list[np.ndarray]]:
    """``runtime.warm`` on zeros of the declared shapes, which the graph must take."""
    try:
        return runtime.warm(_example(config), batching.max_batch_size)
    except ServeError as e:
        raise ValueError(f"{graph} fails its warm-up on zeros of config.json's input shapes: {e.message}") from None


def _check_outputs(
    runtime: Runtime, config: ModelConfig, warmed: dict[int, list[np.ndarray]], graph: str = "model.onnx"
) -> None:
    """What the graph answered at warm-up must be what config.json declares: each declared output of its
    datatype, and of its shape with the batch dimension as long as the batch (so that each caller's rows
    can be cut out of a batch's answer)."""
    for rows, outputs in warmed.items():
        for name, array in zip(runtime.output_names, outputs, strict=True):
            spec = config.output_specs.get(name)
            if spec is None:
                continue
            expected = [rows if d == -1 else d for d in spec.shape]
            if list(array.shape) != expected or array.dtype != DTYPES[spec.datatype]:
                batch = f"a batch of {rows} rows" if rows else "the example input"
                raise ValueError(
                    f"{graph} answers {batch} with {name} of {array.dtype} {list(array.shape)}; config.json declares "
                    f"{spec.text}, so expected {np.dtype(DTYPES[spec.datatype])} {expected}"
                )
