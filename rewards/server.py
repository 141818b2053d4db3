"""Rewards behind an HTTP server: for rewards that need their own environment, or a GPU elsewhere.

Server: ``flowcoach serve-rewards --port 8000`` serves every registered reward (or only those named
with ``--rewards``) at ``POST /<reward-name>``, and ``GET /health``. Requests that arrive together
for the same reward are merged into one call of the reward (up to ``max_batch`` objects, waiting at
most ``max_wait_ms`` for more), so the processes of a distributed run share the reward's batches.

Client: a reward whose name is a URL, ``--rewards http://HOST:PORT/NAME=WEIGHT``, is scored by the
server. Options go in the URL's query: ``?timeout=120&retries=3&backoff=0.5`` (read timeout in
seconds, attempts after the first, first pause in seconds, doubled each attempt). The client checks
``/health`` when it is built, so a run fails at start, with one line, when the server is down.

Wire format (``flowcoach-wire/1``, both directions): an 8-byte little-endian header length, a JSON
header, then raw buffers. It never unpickles: it carries JSON values, tuples, bytes, torch tensors
(any dtype), numpy arrays and scalars, RDKit molecules (RDKit's own binary), pymatgen core objects
(``as_dict``/``from_dict``) and dataclasses of trusted modules (``flowcoach.*``, plus prefixes in
$FLOWCOACH_WIRE_MODULES, comma-separated), rebuilt field by field without running any code of theirs.
A decoder only imports those modules. Bind to 127.0.0.1 (the default) or a private network; set
$FLOWCOACH_REWARD_TOKEN on both sides to require a shared token.
"""

from __future__ import annotations

import dataclasses
import http.client
import importlib
import json
import os
import queue
import struct
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import torch

from flowcoach.core.registry import REWARDS, FlowcoachError, normalize_name

WIRE_VERSION = "flowcoach-wire/1"
CONTENT_TYPE = "application/x-flowcoach-wire"
TOKEN_ENV = "FLOWCOACH_REWARD_TOKEN"
MAX_BODY = 1 << 30  # bytes a server reads from one request


class WireError(FlowcoachError):
    """A payload that cannot be encoded or decoded."""


class RemoteRewardError(RuntimeError):
    """The server reached the reward, and the reward failed (not retried: it would fail again)."""


# ----------------------------------------------------------------------------- wire format
def trusted_prefixes() -> tuple[str, ...]:
    extra = [p.strip() for p in os.environ.get("FLOWCOACH_WIRE_MODULES", "").split(",") if p.strip()]
    return ("flowcoach.", *extra)


def _qualname(obj) -> str:
    cls = type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


def _is_rdkit_mol(obj) -> bool:
    return type(obj).__module__.startswith("rdkit.") and type(obj).__name__ in ("Mol", "RWMol", "EditableMol")


def _is_pymatgen(obj) -> bool:
    return type(obj).__module__.startswith("pymatgen.core.") and hasattr(obj, "as_dict") and hasattr(type(obj), "from_dict")


class _Encoder:
    def __init__(self):
        self.buffers: list[bytes] = []

    def blob(self, data: bytes) -> int:
        self.buffers.append(bytes(data))
        return len(self.buffers) - 1

    def encode(self, obj: Any) -> Any:
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, (int, float)) and type(obj) in (int, float):
            return obj
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            return {"__tensor__": self.blob(data), "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
        if isinstance(obj, np.ndarray):
            if obj.dtype.hasobject:
                return {"__objarray__": [self.encode(v) for v in obj.reshape(-1).tolist()], "shape": list(obj.shape)}
            a = np.ascontiguousarray(obj)  # (1-D for a 0-d array: the shape is the original's)
            return {"__ndarray__": self.blob(a.tobytes()), "dtype": a.dtype.str, "shape": list(obj.shape)}
        if isinstance(obj, np.generic):
            return {"__npscalar__": self.encode(np.asarray(obj))}
        if isinstance(obj, (bytes, bytearray)):
            return {"__bytes__": self.blob(obj)}
        if isinstance(obj, tuple):
            return {"__tuple__": [self.encode(v) for v in obj]}
        if isinstance(obj, list):
            return [self.encode(v) for v in obj]
        if isinstance(obj, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in obj):
                return {k: self.encode(v) for k, v in obj.items()}
            return {"__items__": [[self.encode(k), self.encode(v)] for k, v in obj.items()]}
        if _is_rdkit_mol(obj):
            from rdkit import Chem

            return {"__rdkit_mol__": self.blob(Chem.Mol(obj).ToBinary(Chem.PropertyPickleOptions.AllProps))}
        if _is_pymatgen(obj):
            return {"__pymatgen__": _qualname(obj), "data": self.encode(obj.as_dict())}
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            name = _qualname(obj)
            if not name.startswith(trusted_prefixes()):
                raise WireError(f"cannot send a {name}: only dataclasses of {', '.join(trusted_prefixes())} travel "
                                "(add a module prefix to $FLOWCOACH_WIRE_MODULES on both sides)")
            return {"__dataclass__": name,
                    "fields": {f.name: self.encode(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
        raise WireError(f"cannot send a {_qualname(obj)} to a reward server (tensors, arrays, JSON values, "
                        "RDKit molecules, pymatgen structures and flowcoach dataclasses travel)")


def encode(obj: Any) -> bytes:
    """obj -> flowcoach-wire bytes (see the module docstring for what travels)."""
    enc = _Encoder()
    body = enc.encode(obj)
    header = json.dumps({"version": WIRE_VERSION, "body": body,
                         "sizes": [len(b) for b in enc.buffers]}, separators=(",", ":")).encode()
    return b"".join([struct.pack("<Q", len(header)), header, *enc.buffers])


def _trusted_class(name: str, kind: str, prefixes: tuple[str, ...]):
    module, _, qual = name.partition(":")
    if not module.startswith(prefixes) or not qual:
        raise WireError(f"refusing to build a {name}: {kind} must come from {', '.join(prefixes)}")
    obj = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise WireError(f"'{module}' has no class '{qual}'")
    if not isinstance(obj, type):
        raise WireError(f"'{name}' is not a class")
    return obj


class _Decoder:
    def __init__(self, buffers: list[memoryview]):
        self.buffers = buffers

    def blob(self, index) -> memoryview:
        if not isinstance(index, int) or not 0 <= index < len(self.buffers):
            raise WireError(f"buffer index {index!r} out of range")
        return self.buffers[index]

    def decode(self, obj: Any) -> Any:
        if isinstance(obj, list):
            return [self.decode(v) for v in obj]
        if not isinstance(obj, dict):
            return obj
        if "__tensor__" in obj:
            dtype = getattr(torch, obj["dtype"], None)
            if not isinstance(dtype, torch.dtype):
                raise WireError(f"unknown tensor dtype '{obj['dtype']}'")
            shape = [int(s) for s in obj["shape"]]
            data = self.blob(obj["__tensor__"])
            if not len(data):
                return torch.empty(shape, dtype=dtype)
            return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)
        if "__ndarray__" in obj:
            return np.frombuffer(self.blob(obj["__ndarray__"]), dtype=np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
        if "__objarray__" in obj:
            out = np.empty(len(obj["__objarray__"]), dtype=object)
            out[:] = [self.decode(v) for v in obj["__objarray__"]] or []
            return out.reshape(obj["shape"])
        if "__npscalar__" in obj:
            return self.decode(obj["__npscalar__"])[()]
        if "__bytes__" in obj:
            return bytes(self.blob(obj["__bytes__"]))
        if "__tuple__" in obj:
            return tuple(self.decode(v) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {_hashable(self.decode(k)): self.decode(v) for k, v in obj["__items__"]}
        if "__rdkit_mol__" in obj:
            from rdkit import Chem

            return Chem.Mol(bytes(self.blob(obj["__rdkit_mol__"])))
        if "__pymatgen__" in obj:
            cls = _trusted_class(obj["__pymatgen__"], "pymatgen objects", ("pymatgen.core.",))
            return cls.from_dict(self.decode(obj["data"]))
        if "__dataclass__" in obj:
            cls = _trusted_class(obj["__dataclass__"], "dataclasses", trusted_prefixes())
            if not dataclasses.is_dataclass(cls):
                raise WireError(f"'{obj['__dataclass__']}' is not a dataclass")
            names = {f.name for f in dataclasses.fields(cls)}
            out = cls.__new__(cls)  # no __init__ / __post_init__: the fields as they were sent
            for key, value in obj["fields"].items():
                if key not in names:
                    raise WireError(f"'{obj['__dataclass__']}' has no field '{key}' (different versions on the two sides?)")
                object.__setattr__(out, key, self.decode(value))
            return out
        return {k: self.decode(v) for k, v in obj.items()}


def _hashable(key):
    return tuple(key) if isinstance(key, list) else key


def decode(data: bytes) -> Any:
    """flowcoach-wire bytes -> obj; a malformed payload raises WireError."""
    view = memoryview(data)
    if len(view) < 8:
        raise WireError("payload too short for a flowcoach-wire header")
    (n,) = struct.unpack("<Q", view[:8])
    if 8 + n > len(view):
        raise WireError("payload header runs past its end")
    try:
        header = json.loads(bytes(view[8:8 + n]))
    except ValueError as e:
        raise WireError(f"payload header is not JSON: {e}") from None
    if not isinstance(header, dict) or header.get("version") != WIRE_VERSION:
        raise WireError(f"payload is not {WIRE_VERSION} (got {header.get('version') if isinstance(header, dict) else None!r})")
    buffers, offset = [], 8 + n
    for size in header.get("sizes", []):
        if not isinstance(size, int) or size < 0 or offset + size > len(view):
            raise WireError("payload buffers run past its end")
        buffers.append(view[offset:offset + size])
        offset += size
    try:
        return _Decoder(buffers).decode(header.get("body"))
    except WireError:
        raise
    except Exception as e:  # noqa: BLE001 - any malformed field is the payload's fault
        raise WireError(f"malformed payload: {type(e).__name__}: {e}") from None


# ----------------------------------------------------------------------------- batching
def batch_signature(conditions) -> Any:
    """What conditions must share to be concatenated: their type, trailing shapes and dtypes."""
    if conditions is None:
        return None
    if isinstance(conditions, torch.Tensor):
        return ("tensor", tuple(conditions.shape[1:]), str(conditions.dtype))
    if isinstance(conditions, np.ndarray):
        return ("ndarray", conditions.shape[1:], conditions.dtype.str)
    if isinstance(conditions, dict):
        return ("dict", tuple((k, batch_signature(v)) for k, v in sorted(conditions.items())))
    if isinstance(conditions, (list, tuple)):
        return ("list",)
    return ("single", id(conditions))  # anything else is never merged


def concat_conditions(parts: list):
    """Concatenate the conditions of requests with the same signature, along the batch."""
    first = parts[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return torch.cat(parts, dim=0)
    if isinstance(first, np.ndarray):
        return np.concatenate(parts, axis=0)
    if isinstance(first, dict):
        return {k: concat_conditions([p[k] for p in parts]) for k in first}
    if isinstance(first, (list, tuple)):
        return [c for p in parts for c in p]
    if len(parts) == 1:
        return first
    raise ValueError(f"cannot merge conditions of type {type(first).__name__}")


def split_info(info: dict, counts: list[int]) -> list[dict]:
    """Per-request info: tensors/arrays/lists with one row per object are split; other values
    (counts over the merged batch) are given to every request as they are."""
    total = sum(counts)
    out: list[dict] = [{} for _ in counts]
    for key, value in info.items():
        rows = (isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim >= 1 and value.shape[0] == total) or (
            isinstance(value, list) and len(value) == total and len(counts) > 1)
        start = 0
        for k, n in enumerate(counts):
            out[k][key] = value[start:start + n] if rows else value
            start += n
    return out


@dataclass
class _Pending:
    objects: list
    conditions: Any
    done: threading.Event = field(default_factory=threading.Event)
    result: tuple | None = None
    error: BaseException | None = None


class RewardBatcher:
    """One worker thread per reward: merges queued requests (same condition signature) into one call
    of up to ``max_batch`` objects, waiting at most ``max_wait_s`` after the first for more. A request
    larger than ``max_batch`` is scored alone, whole."""

    def __init__(self, name: str, fn, max_batch: int, max_wait_s: float, stats: "ServerStats"):
        self.name, self.fn = name, fn
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.stats = stats
        self.queue: queue.Queue[_Pending | None] = queue.Queue()
        self.held: deque[_Pending] = deque()  # taken from the queue but not fitting the last batch
        self.thread = threading.Thread(target=self._run, name=f"reward-{name}", daemon=True)
        self.thread.start()

    def submit(self, objects: list, conditions) -> tuple[torch.Tensor, dict, int]:
        item = _Pending(list(objects), conditions)
        self.queue.put(item)
        item.done.wait()
        if item.error is not None:
            raise item.error
        return item.result

    def close(self) -> None:
        self.queue.put(None)

    def _next(self, timeout: float | None) -> _Pending | None:
        if self.held:
            return self.held.popleft()
        if timeout is None:
            return self.queue.get()
        return self.queue.get(timeout=timeout) if timeout > 0 else self.queue.get_nowait()

    def _collect(self, first: _Pending) -> list[_Pending]:
        batch, size, signature = [first], len(first.objects), batch_signature(first.conditions)
        deadline = time.monotonic() + self.max_wait_s
        skipped: list[_Pending] = []
        while size < self.max_batch:
            try:
                item = self._next(deadline - time.monotonic())
            except queue.Empty:
                break
            if item is None:  # closing: finish this batch first
                self.queue.put(None)
                break
            if size + len(item.objects) > self.max_batch or batch_signature(item.conditions) != signature:
                skipped.append(item)
                if size + len(item.objects) > self.max_batch:
                    break
                continue
            batch.append(item)
            size += len(item.objects)
        self.held.extendleft(reversed(skipped))
        return batch

    def _run(self) -> None:
        while True:
            first = self._next(None)
            if first is None:
                return
            batch = self._collect(first)
            counts = [len(p.objects) for p in batch]
            try:
                objects = [o for p in batch for o in p.objects]
                conditions = concat_conditions([p.conditions for p in batch])
                scores, info = self.fn(objects, conditions)
                scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
                if scores.shape[0] != len(objects):
                    raise RemoteRewardError(f"reward '{self.name}' returned {scores.shape[0]} scores for {len(objects)} objects")
                infos = split_info(dict(info or {}), counts)
                self.stats.record(self.name, len(batch), len(objects))
                start = 0
                for p, n, part in zip(batch, counts, infos):
                    p.result = (scores[start:start + n].clone(), part, len(objects))
                    start += n
            except BaseException as e:  # noqa: BLE001 - every waiting request gets the error
                for p in batch:
                    p.error = e
            finally:
                for p in batch:
                    p.done.set()


# ----------------------------------------------------------------------------- server
class ServerStats:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = 0
        self.batches = 0
        self.objects = 0
        self.batch_sizes: deque[tuple[str, int, int]] = deque(maxlen=1000)  # (reward, requests, objects)

    def record(self, name: str, requests: int, objects: int) -> None:
        with self.lock:
            self.batches += 1
            self.objects += objects
            self.batch_sizes.append((name, requests, objects))

    def count_request(self) -> None:
        with self.lock:
            self.requests += 1

    def snapshot(self) -> dict:
        with self.lock:
            return {"requests": self.requests, "batches": self.batches, "objects": self.objects,
                    "recent_batches": [list(b) for b in self.batch_sizes][-20:]}


class RewardServer(ThreadingHTTPServer):
    """HTTP server of rewards. ``rewards``: the names it serves (``module:attr`` allowed here);
    empty: any registered reward, by name only. ``delay_s`` sleeps before each batch (tests)."""

    daemon_threads = True
    allow_reuse_address = True
    handler_class: type = None  # _Handler, set below (tests subclass it)

    def __init__(self, host: str = "127.0.0.1", port: int = 8000, rewards: tuple[str, ...] | list[str] = (),
                 max_batch: int = 256, max_wait_ms: float = 5.0, token: str | None = None, verbose: bool = False):
        import flowcoach.rewards  # noqa: F401 - registers the built-in rewards

        if max_batch < 1:
            raise FlowcoachError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise FlowcoachError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.served = {self.route(n): n for n in rewards}
        for name in self.served.values():
            REWARDS.get(name)  # a wrong name fails now, with the list of what exists
        self.max_batch, self.max_wait_s = max_batch, max_wait_ms / 1000.0
        self.token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self.verbose = verbose
        self.stats = ServerStats()
        self.batchers: dict[str, RewardBatcher] = {}
        self.batchers_lock = threading.Lock()
        self.started = time.time()
        self._thread: threading.Thread | None = None
        super().__init__((host, port), self.handler_class)

    @staticmethod
    def route(name: str) -> str:
        return name.strip() if ":" in name else normalize_name(name)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def served_names(self) -> list[str]:
        return sorted(self.served) if self.served else REWARDS.names()

    def batcher(self, route: str) -> RewardBatcher:
        """The batcher of a route; unknown routes raise FlowcoachError (404)."""
        key = urllib.parse.unquote(route)
        if self.served:
            if key not in self.served and normalize_name(key) not in self.served:
                raise FlowcoachError(f"this server does not serve '{key}'; it serves: {', '.join(sorted(self.served))}")
            key = key if key in self.served else normalize_name(key)
            target = self.served[key]
        else:
            if ":" in key:
                raise FlowcoachError(f"'{key}': a server started without --rewards serves registered names only")
            key = normalize_name(key)
            target = key
        with self.batchers_lock:
            if key not in self.batchers:
                self.batchers[key] = RewardBatcher(key, REWARDS.get(target), self.max_batch, self.max_wait_s, self.stats)
            return self.batchers[key]

    def health(self) -> dict:
        return {"status": "ok", "version": WIRE_VERSION, "rewards": self.served_names(),
                "max_batch": self.max_batch, "max_wait_ms": self.max_wait_s * 1000.0,
                "uptime_s": round(time.time() - self.started, 3), **self.stats.snapshot()}

    def start(self) -> "RewardServer":
        """Serve from a daemon thread (tests, notebooks); returns self."""
        self._thread = threading.Thread(target=self.serve_forever, name="reward-server", daemon=True)
        self._thread.start()
        return self

    def handle_error(self, request, client_address) -> None:
        import sys

        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return  # the client stopped waiting (its timeout): it retries or reports it
        super().handle_error(request, client_address)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._serving = True
        super().serve_forever(poll_interval)

    def stop(self) -> None:
        if getattr(self, "_serving", False):  # shutdown() waits for a serve_forever loop that must exist
            self.shutdown()
        self.server_close()
        for b in list(self.batchers.values()):
            b.close()


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        if self.server.verbose:
            super().log_message(format, *args)

    def _reply(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, code: int, message: str) -> None:
        self.close_connection = True  # an unread body must not be taken for the next request
        self._reply(code, json.dumps({"error": message}).encode(), "application/json")

    def _authorised(self) -> bool:
        if not self.server.token:
            return True
        if self.headers.get("Authorization", "") == f"Bearer {self.server.token}":
            return True
        self._error(401, "missing or wrong token (set $FLOWCOACH_REWARD_TOKEN to the server's)")
        return False

    def do_GET(self):  # noqa: N802 - http.server's name
        path = urllib.parse.urlsplit(self.path).path.rstrip("/")
        if path in ("/health", ""):
            if not self._authorised():
                return
            self._reply(200, json.dumps(self.server.health()).encode(), "application/json")
        else:
            self._error(404, f"GET {path}: only /health; score with POST /<reward>")

    def do_POST(self):  # noqa: N802
        if not self._authorised():
            return
        route = urllib.parse.urlsplit(self.path).path.strip("/")
        try:
            length = int(self.headers.get("Content-Length", "-1"))
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY:
            self._error(411 if length < 0 else 413, f"need a Content-Length between 0 and {MAX_BODY} bytes")
            return
        body = self.rfile.read(length)
        try:
            batcher = self.server.batcher(route)
        except FlowcoachError as e:
            self._error(404, str(e))
            return
        try:
            payload = decode(body)
            objects, conditions = payload["objects"], payload.get("conditions")
            if not isinstance(objects, list):
                raise WireError("'objects' must be a list")
        except (WireError, KeyError, TypeError) as e:
            self._error(400, f"bad request: {e}")
            return
        self.server.stats.count_request()
        try:
            scores, info, batch = batcher.submit(objects, conditions)
            out = encode({"scores": scores, "info": info, "batch_objects": batch})
        except Exception as e:  # noqa: BLE001 - the reward's failure goes back to the client
            first = (str(e).strip().splitlines() or [""])[0]
            self._error(500, f"reward '{batcher.name}' failed: {type(e).__name__}: {first}")
            return
        self._reply(200, out, CONTENT_TYPE)


RewardServer.handler_class = _Handler


# ----------------------------------------------------------------------------- client
def is_remote(name: str) -> bool:
    return name.strip().lower().startswith(("http://", "https://"))


def split_weight(item: str) -> tuple[str, str]:
    """'http://h:1/r?timeout=5=0.5' -> ('http://h:1/r?timeout=5', '0.5'): a URL's weight follows its
    last '=' unless that '=' belongs to the query (then the weight is left empty)."""
    left, sep, right = item.rpartition("=")
    if not sep:
        return item, ""
    query = urllib.parse.urlsplit(left).query
    if query and not all("=" in part for part in query.split("&")):
        return item, ""
    return left, right


@dataclass
class RemoteOptions:
    timeout: float = 300.0
    """Seconds to wait for a connection or a reply."""
    retries: int = 3
    """Attempts after the first on connection errors, timeouts and 5xx (reward failures excepted)."""
    backoff: float = 0.5
    """Pause before the first retry; doubled each time, at most 30 s."""
    health: bool = True
    """Check /health when the reward is built."""


def parse_remote(url: str) -> tuple[str, str, RemoteOptions]:
    """'http://host:port/NAME?timeout=30' -> (base url, reward route, options)."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise FlowcoachError(f"'{url}' is not a reward URL; write http://HOST:PORT/REWARD")
    route = parts.path.strip("/")
    if not route or "/" in route:
        raise FlowcoachError(f"'{url}' names no reward; write http://HOST:PORT/REWARD (e.g. .../toy-mode)")
    opts = RemoteOptions()
    for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if key not in {f.name for f in dataclasses.fields(RemoteOptions)}:
            raise FlowcoachError(f"unknown option '{key}' in '{url}'; use timeout, retries, backoff or health")
        kind = type(getattr(opts, key))
        try:
            setattr(opts, key, value.lower() in ("1", "true", "yes") if kind is bool else kind(value))
        except ValueError:
            raise FlowcoachError(f"option {key}={value!r} in '{url}' is not a {kind.__name__}") from None
    if opts.timeout <= 0 or opts.retries < 0 or opts.backoff < 0:
        raise FlowcoachError(f"'{url}': timeout must be > 0, retries and backoff >= 0")
    return f"{parts.scheme}://{parts.netloc}", route, opts


class RemoteReward:
    """A reward scored by a reward server: ``RemoteReward("http://127.0.0.1:8000/toy-mode")``.

    Connection errors, timeouts and 5xx replies other than a reward's own failure are retried with
    exponential backoff; after the last attempt a FlowcoachError says, in one line, that the server
    is unreachable. The info of a merged batch reports ``server_batch`` (objects scored together);
    counts in it cover that whole batch.
    """

    def __init__(self, url: str, sleep=time.sleep):
        self.url = url.strip()
        self.base, self.route, self.options = parse_remote(self.url)
        self.endpoint = f"{self.base}/{urllib.parse.quote(self.route, safe=':-_.')}"
        self.sleep = sleep
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # direct: servers are near
        self.token = os.environ.get(TOKEN_ENV) or None
        if self.options.health:
            served = self.health().get("rewards", [])
            if self.route not in served and normalize_name(self.route) not in served:
                raise FlowcoachError(f"reward server {self.base} does not serve '{self.route}'; it serves: {', '.join(served)}")

    def _request(self, url: str, data: bytes | None = None) -> bytes:
        headers = {"Content-Type": CONTENT_TYPE} if data is not None else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        attempts, last = self.options.retries + 1, None
        for attempt in range(attempts):
            if attempt:
                self.sleep(min(self.options.backoff * 2 ** (attempt - 1), 30.0))
            try:
                with self.opener.open(urllib.request.Request(url, data=data, headers=headers),
                                      timeout=self.options.timeout) as reply:
                    return reply.read()
            except urllib.error.HTTPError as e:
                message = _error_message(e)
                if e.code == 500 and message.startswith("reward '"):
                    raise RemoteRewardError(f"{self.url}: {message}") from None
                if e.code < 500:
                    raise FlowcoachError(f"reward server {self.base} refused {url}: HTTP {e.code}: {message}") from None
                last = f"HTTP {e.code}: {message}"
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # refused, reset, DNS, timeout
                reason = getattr(e, "reason", e)
                last = f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
        raise FlowcoachError(f"reward server {self.base} unreachable after {attempts} attempt(s) "
                             f"(last: {last}); start it with `flowcoach serve-rewards` or fix the URL")

    def health(self) -> dict:
        return json.loads(self._request(f"{self.base}/health"))

    def __call__(self, objects: list, conditions) -> tuple[torch.Tensor, dict]:
        if not len(objects):
            return torch.zeros(0), {}
        body = encode({"objects": list(objects), "conditions": conditions})
        reply = decode(self._request(self.endpoint, body))
        info = dict(reply.get("info", {}))
        info["server_batch"] = int(reply.get("batch_objects", len(objects)))
        return torch.as_tensor(reply["scores"], dtype=torch.float32), info


def _error_message(e: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(e.read()).get("error", e.reason))
    except Exception:  # noqa: BLE001 - a proxy's HTML page, an empty body
        return str(e.reason)


# ----------------------------------------------------------------------------- CLI
@dataclass
class ServeArgs:
    """Serve rewards over HTTP: POST /<reward> scores a batch, GET /health answers."""

    host: str = "127.0.0.1"
    """Address to bind (0.0.0.0 exposes it to the network: trusted networks only)."""
    port: int = 8000
    rewards: tuple[str, ...] = ()
    """Rewards to serve (names or module:attr); default: every registered reward, by name."""
    max_batch: int = 256
    """Most objects scored in one call of a reward (merged from concurrent requests)."""
    max_wait_ms: float = 5.0
    """How long a batch waits after its first request for more to merge with."""
    verbose: bool = False
    """Log every request."""


def serve(args: ServeArgs, ready=print) -> None:
    server = RewardServer(args.host, args.port, args.rewards, args.max_batch, args.max_wait_ms, verbose=args.verbose)
    ready(f"serving rewards at {server.url} (GET /health, POST /<reward>): "
          f"{', '.join(server.served_names()) if args.rewards else 'every registered reward'}; "
          f"batches of up to {args.max_batch} objects, {args.max_wait_ms:g} ms wait", flush=True)
    try:
        server.serve_forever()
    finally:
        server.stop()
