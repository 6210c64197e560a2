"""All server settings, read once from the environment (prefix ``RNNSERVE_``) or passed in."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RNNSERVE_", extra="ignore")

    model_repo: Path = Path("models")
    """Folder of models: ``<name>/<version>/model.onnx`` + ``card.json``."""
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int = Field(default=8001, ge=0, le=65535)
    """The Open Inference Protocol over gRPC (needs the ``grpc`` extra) on ``host``; 0 turns it off."""
    reload_interval_s: float = 0.0
    """Poll the model repository for new/removed versions this often; 0 turns polling off."""

    session_store: str = "memory"
    """``memory`` (one process), ``redis://host:port/db`` (shared by replicas) or
    ``redis-cluster://host:port[,host:port...]`` (a Redis Cluster, any of its nodes)."""
    redis_max_connections: int = Field(default=64, ge=1)
    """Redis operations in flight at once per replica (connections per Redis node); more
    wait for a turn instead of failing."""
    redis_pool_timeout_s: float = Field(default=30.0, gt=0)
    """How long an operation waits for a turn before answering 503 ``store_unavailable``."""
    redis_timeout_s: float = Field(default=1.5, gt=0)
    """Socket connect/read timeout for one Redis operation."""
    redis_cache_sessions: int = Field(default=10_000, ge=0)
    """Records this replica keeps from its last read or commit (LRU), so a step costs one
    round trip; a stale copy is caught by the commit's compare-and-set."""
    redis_poll_us: float = Field(default=1000.0, ge=0, le=10_000)
    """A step whose session is the only one with a request in progress (no stateless
    prediction either) waits up to this long for Redis's answer to its commit by polling
    the socket, holding the event loop, rather than sleeping: on a VM a sleeping thread
    takes 40-300 us more to wake. Only while Redis answers within it on average; 0 turns
    it off."""
    session_ttl_s: float = Field(default=1800.0, gt=0)
    """Idle time after which a session expires (reset by every use)."""
    max_sessions: int = Field(default=1_000_000, ge=1)
    """Total live sessions; creating one more is refused with 429 ``too_many_sessions``."""
    max_sessions_per_key: int = Field(default=100_000, ge=1)
    """Live sessions one API key may own (only enforced when API keys are set)."""

    max_steps_per_request: int = Field(default=10_000, ge=1)
    max_batch_sequences: int = Field(default=1024, ge=1)
    """Sequences in one predict request."""
    max_total_steps_per_predict: int = Field(default=200_000, ge=1)
    max_output_values: int = Field(default=4 * 1024 * 1024, ge=1)
    """Output values (steps x the model's output size) one request may answer, and one
    onnxruntime call may produce: 16 MiB as float32 by default. It bounds the memory a
    request, a batched call and a remembered answer (``seq``) can take, whatever the
    model's output size; a request over it is refused before it runs."""
    max_multiplex_items: int = Field(default=8192, ge=1)
    """Session steps in one multiplexed message (``POST /v1/steps``, ``/v1/stream``)."""
    mux_slice_items: int = Field(default=256, ge=1)
    """A multiplexed message's items go to onnxruntime in slices of at most this many
    (memory store), and in at least one slice per pool thread when that leaves 64 items
    or more a slice, so the server prepares the next slice while calls run and the slices
    of one message run at once."""
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    max_generate_steps: int = Field(default=10_000, ge=1)

    ort_threads: int = Field(default=1, ge=0)
    """onnxruntime intra-op threads per session (0 lets onnxruntime choose)."""
    ort_inter_threads: int = Field(default=1, ge=0)
    ort_graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    ort_execution_mode: Literal["sequential", "parallel"] = "sequential"

    batch_max_size: int = Field(default=256, ge=1)
    """Rows (sequences) in one onnxruntime call; 1 turns batching off."""
    batch_max_delay_ms: float = Field(default=0.0, ge=0)
    """0: adaptive (dispatch at once when the runtime is idle, gather while it is busy).
    >0: also wait up to this long after the first request for the batch to fill."""
    batch_inline_steps: int = Field(default=4, ge=0)
    """A call of at most this many steps (rows x steps) made while no other call runs is
    made on the event loop's thread instead of the pool: a lone stream skips two thread
    hand-offs. 0 always uses the pool."""
    batch_inline_block_ms: float = Field(default=5.0, ge=0)
    """A multiplexed message's block (a slice of its sessions) that starts while another
    call runs on the pool, with nothing else waiting, runs on the event loop's thread
    when this model's recent calls say it takes at most this long: the loop would
    otherwise wait idle for both, and the pool's thread hand-offs cost more than they
    save. The loop serves nothing else meanwhile, hence the bound. 0 never."""
    batch_crowds: bool = True
    """The single steps of many sessions that arrive in one event-loop
    turn (one per WebSocket stream or REST request) run as one block, rather than each as
    a job of its own: on the memory store gathered from and written back to the state
    slab in bulk, on Redis committed in one pipeline with the rest of their call (see
    ``Engine._join_crowd``). Off: each step is its own job (the batcher still shares calls)."""
    batch_max_inflight: int = Field(default=1, ge=1)
    """onnxruntime calls that may run at once per model version while more requests could
    still join the next one. A call that cannot grow by waiting (a full batch, or a
    multiplexed message's slice) may also start while these run, up to the pool's threads
    (``max(2, batch_max_inflight)``)."""
    max_queue: int = Field(default=4096, ge=1)
    """Queued step rows per model version before requests are refused with 429 ``overloaded``."""

    ws_max_message_bytes: int = Field(default=1024 * 1024, ge=64)
    ws_max_messages_per_s: float = Field(default=0.0, ge=0)
    """Per-connection message rate limit; 0 means unlimited."""
    max_connections: int = Field(default=10_000, ge=1)
    """Open HTTP and WebSocket connections (uvicorn's ``limit_concurrency``, and at most
    the open-file limit allows): past it a request on a new connection is answered 503 at
    once. It bounds the connections that requests and streams hold, with the answers of
    clients that never read them; requests that are never finished are not timed out
    (uvicorn has no header timeout: a proxy's timeouts are needed for that)."""

    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Comma-separated keys; when set, every route but health and metrics needs one."""

    gc_threshold: int = Field(default=50_000, ge=0)
    """The server process's cyclic garbage collector runs after this many net container
    allocations (Python's default is 700). A multiplexed message of thousands of items
    allocates tens of thousands of short-lived objects: at 700 they survive collections
    into the old generation and trigger full collections over every session record
    (about 15 ms per 4,096-item message). 0 keeps Python's default."""

    otel_telemetry: bool = False
    """FastAPI's own OpenTelemetry bridge (traces and metrics through an OpenTelemetry SDK
    the process configures). Off by default: the server's observability is its Prometheus
    metrics and JSON logs, and the bridge looks for a configured provider on every
    request and connection (3.3 us each) even when there is none."""

    log_level: str = "info"
    log_json: bool = True

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value
