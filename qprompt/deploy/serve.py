"""`qprompt serve EXPORT`: an HTTP endpoint for an export, with concurrent requests batched.

    POST /v1/completions   OpenAI-style: prompt, max_tokens, temperature, top_p, stop, seed, stream (SSE)
    POST /v1/classify      labels and their probabilities (classification exports)
    GET  /health           ready, and what is loaded
    GET  /metrics          request counts, tokens, batch sizes, latency percentiles

Starlette routes the requests and uvicorn serves them; one engine thread owns the ONNX session and
runs every forward pass. Requests that arrive while it is idle wait `batch_window_ms` for company,
then share one prefill; while a batch is generating, new requests join it between two steps
(`runtime.DecodeBatch`), and finished rows leave it. Needs no torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from .runtime import Continuation, DecodeBatch, ExportedModel, ExportError, Sampling, log_softmax

MAX_BODY_BYTES = 1 << 20  # a request body beyond 1 MiB is refused before it is parsed
# OpenAI completion fields this server does not implement, and the values that mean "off".
UNSUPPORTED = {"n": (1, None), "best_of": (1, None), "echo": (False, None), "logprobs": (None, 0),
               "suffix": (None, ""), "logit_bias": (None, {})}


@dataclass
class ServeOptions:
    """How the server batches and what it accepts."""

    max_batch: int = 16  # rows in one forward pass (1: one request at a time)
    batch_window_ms: float = 5.0  # how long an idle engine waits for more requests before a prefill
    max_tokens_limit: int = 1024  # the largest max_tokens a request may ask for
    max_prompts: int = 64  # prompts (or rows) in one request
    max_queue: int = 1024  # waiting rows beyond which requests get 503


class RequestError(Exception):
    """A bad request: answered with a 4xx JSON error naming the problem."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    """One prompt of a request, as the engine sees it; events go back to the request's event loop."""

    kind: str  # "generate" or "classify"
    ids: list[int]
    task: str  # the export's task this prompt is for
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    continuation: Continuation = None  # the decoding state (runtime.Continuation)
    cancelled: bool = False

    def emit(self, event: tuple) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Metrics:
    def __init__(self):
        self.started = time.time()
        self.requests: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.prompt_tokens = self.generated_tokens = 0
        self.forward_passes = self.rows_in_passes = self.largest_pass = 0
        self.latencies: deque[float] = deque(maxlen=2048)

    def count_pass(self, rows: int) -> None:
        self.forward_passes += 1
        self.rows_in_passes += rows
        self.largest_pass = max(self.largest_pass, rows)

    def to_dict(self, engine: Engine) -> dict:
        lat = sorted(self.latencies)

        def pct(q: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))], 4) if lat else None

        return {"uptime_s": round(time.time() - self.started, 1), "requests": self.requests, "errors": self.errors,
                "prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens,
                "forward_passes": self.forward_passes, "largest_pass_rows": self.largest_pass,
                "mean_pass_rows": round(self.rows_in_passes / self.forward_passes, 2) if self.forward_passes else 0,
                "latency_s": {"p50": pct(0.5), "p95": pct(0.95), "of_last": len(lat)},
                "queued_rows": len(engine.inbox), "active_rows": engine.active}


class Engine:
    """The one thread that runs the graph: classify groups, prefills, and decode steps of the running batch."""

    def __init__(self, model: ExportedModel, options: ServeOptions, metrics: Metrics):
        self.model, self.options, self.metrics = model, options, metrics
        self.inbox: deque[Job] = deque()
        self.wake = threading.Condition()
        self.active = 0
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="qprompt-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join(timeout=10)

    def submit(self, jobs: list[Job]) -> None:
        with self.wake:
            if len(self.inbox) + len(jobs) > self.options.max_queue:
                raise RequestError(f"the server is busy ({len(self.inbox)} rows waiting); retry shortly", 503)
            self.inbox.extend(jobs)
            self.wake.notify()

    # ------------------------------------------------------------------------------------------ the loop
    def _run(self) -> None:
        batch, rows = DecodeBatch(self.model), []  # rows[i]: the job that row i of the batch continues
        logits = None
        while True:
            with self.wake:
                while not self.inbox and not rows and not self.stopping:
                    self.wake.wait()
                if self.stopping:
                    break
                idle = not rows
            if idle and self.options.batch_window_ms > 0:
                time.sleep(self.options.batch_window_ms / 1000)  # let concurrent requests arrive together
            new: list[Job] = []
            try:
                self._classify_waiting()
                new = self._take("generate", self.options.max_batch - len(rows))
                if new:
                    self.metrics.count_pass(len(new))
                    joined = batch.join([j.ids for j in new], self.model.task_ids([j.task for j in new], len(new)))
                    rows += new
                    logits = joined if logits is None else np.concatenate([logits, joined])
                    new = []
                if rows:
                    logits, rows = self._advance(batch, rows, logits)
            except Exception as exc:  # never let one bad batch stop the server: fail its requests, go on
                message = f"the model could not run this request ({(str(exc).splitlines() or [''])[0][:200]})"
                for job in rows + new:
                    job.emit(("error", message, 500))
                batch, rows, logits = DecodeBatch(self.model), [], None
            self.active = len(rows)

    def _take(self, kind: str, limit: int) -> list[Job]:
        """Up to `limit` waiting jobs of `kind`, oldest first; cancelled ones are dropped."""
        taken: list[Job] = []
        with self.wake:
            kept = deque()
            while self.inbox:
                job = self.inbox.popleft()
                if job.cancelled:
                    continue
                if job.kind == kind and len(taken) < limit:
                    taken.append(job)
                else:
                    kept.append(job)
            self.inbox = kept
        return taken

    def _classify_waiting(self) -> None:
        jobs = self._take("classify", self.options.max_queue)
        by_task: dict[str, list[Job]] = {}  # each task scores its own labels
        for job in jobs:
            by_task.setdefault(job.task, []).append(job)
        chunks = [group[i : i + self.options.max_batch] for group in by_task.values()
                  for i in range(0, len(group), self.options.max_batch)]
        for chunk in chunks:
            task = chunk[0].task
            try:
                scores = self.model.label_scores([j.ids for j in chunk], batch_size=len(chunk), task=task)
            except Exception as exc:
                for job in chunk:
                    job.emit(("error", f"the model could not score this input ({str(exc).splitlines()[0]})", 500))
                continue
            self.metrics.count_pass(len(chunk))
            probs = np.exp(log_softmax(scores))  # over the labels: the sequence scores, normalised
            for job, p in zip(chunk, probs):
                job.emit(("labels", dict(zip(self.model.label_ids(task), (float(x) for x in p)))))

    def _advance(self, batch: DecodeBatch, rows: list[Job], logits: np.ndarray) -> tuple[np.ndarray | None, list]:
        """Pick each row's next token from `logits` (runtime.Continuation: the runtime's own rule), send the new text,
        drop finished rows, run one decode step."""
        tokens, going = [], []
        for r, job in enumerate(rows):
            if job.cancelled:
                continue
            c = job.continuation
            added_before = len(c.out)
            new = c.advance(self.model, logits[r])
            self.metrics.generated_tokens += len(c.out) - added_before
            if new:
                job.emit(("text", new))
            if c.reason:
                job.emit(("done", c.reason, len(c.out)))
                continue
            tokens.append(c.out[-1])
            going.append(r)
        if len(going) < len(rows):
            batch.keep(going)
            rows = [rows[r] for r in going]
        if not rows:
            return None, []
        self.metrics.count_pass(len(rows))
        return batch.step(np.array(tokens)), rows


# ---------------------------------------------------------------------------------------------- requests
def _number(body: dict, key: str, default: float, low: float, high: float, integer: bool = False) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or (isinstance(value, float) and math.isnan(value)):
        raise RequestError(f"'{key}' must be {'an integer' if integer else 'a number'}, not {json.dumps(value)}")
    if not low <= value <= high:
        raise RequestError(f"'{key}' must be between {low:g} and {high:g}; got {value}")
    return value


class Server:
    """The request handlers: validate, turn each prompt into a Job, wait for the engine's events."""

    def __init__(self, model: ExportedModel, options: ServeOptions, name: str):
        self.model, self.options, self.name = model, options, name
        self.metrics = Metrics()
        self.engine = Engine(model, options, self.metrics)
        self.limit = model.manifest.max_positions

    def task(self, body: dict) -> str:
        """The request's task: its "task" field, or the export's only task."""
        name = body.get("task")
        if name is not None and not isinstance(name, str):
            raise RequestError("'task' must be a task name (text)")
        try:
            return self.model.task(name).name
        except ExportError as exc:
            raise RequestError(str(exc)) from None

    def prompt_ids(self, item: Any, raw: bool, task: str) -> list[int]:
        if raw:
            if not isinstance(item, str):
                raise RequestError("with 'raw': true each prompt must be a string")
            ids = self.model.encode(item)
        elif isinstance(item, (str, dict)):
            try:
                ids = self.model.prompt_ids(item, task=task)
            except ExportError as exc:
                raise RequestError(str(exc)) from None
            except (KeyError, IndexError, ValueError) as exc:  # str.format on a row's odd values
                raise RequestError(f"the input does not fit the template ({exc})") from None
        else:
            raise RequestError(f"a prompt must be a string or an object of the template's fields "
                               f"({', '.join(self.model.fields(task))}); got {type(item).__name__}")
        if not ids or (isinstance(item, str) and not item.strip()):
            raise RequestError("a prompt is empty: give some text")
        return ids

    def prompts(self, body: dict, key: str, task: str) -> list[list[int]]:
        if key not in body:
            raise RequestError(f"the request has no '{key}'")
        items = body[key] if isinstance(body[key], list) else [body[key]]
        if not items:
            raise RequestError(f"'{key}' is an empty list")
        if len(items) > self.options.max_prompts:
            raise RequestError(f"'{key}' has {len(items)} entries; at most {self.options.max_prompts} per request")
        raw = body.get("raw", False)
        if not isinstance(raw, bool):
            raise RequestError("'raw' must be true or false")
        return [self.prompt_ids(item, raw, task) for item in items]

    def sampling(self, body: dict, longest: int) -> Sampling:
        room = self.limit - longest
        max_tokens = _number(body, "max_tokens", 16, 1, self.options.max_tokens_limit, integer=True)
        if max_tokens > room:
            raise RequestError(f"prompt ({longest} tokens) + max_tokens ({max_tokens}) is more than this export's "
                               f"{self.limit} positions; ask for at most {room} tokens or shorten the prompt")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(x, str) and x for x in stop):
            raise RequestError("'stop' must be a string or a list of at most 4 non-empty strings")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise RequestError("'seed' must be a non-negative integer")
        for key, allowed in UNSUPPORTED.items():
            if key in body and body[key] not in allowed:
                raise RequestError(f"'{key}' is not supported by this server (leave it out)")
        return Sampling(max_new_tokens=max_tokens, temperature=float(_number(body, "temperature", 0.0, 0, 2)),
                        top_k=_number(body, "top_k", 0, 0, 10**6, integer=True),
                        top_p=float(_number(body, "top_p", 1.0, 0, 1)), seed=seed, stop=tuple(stop))

    def jobs(self, kind: str, prompts: list[list[int]], sampling: Sampling, task: str) -> list[Job]:
        loop = asyncio.get_running_loop()
        jobs = []
        for i, ids in enumerate(prompts):  # prompt i draws with seed + i, as ExportedModel.generate does
            jobs.append(Job(kind, ids, task, sampling, loop, asyncio.Queue(), Continuation.of(sampling, i)))
        self.engine.submit(jobs)
        return jobs

    async def complete(self, body: dict):
        task = self.task(body)
        if task in self.model.ensembles:
            raise RequestError(f"{task!r} is an ensemble of {', '.join(self.model.ensembles[task])}: it classifies "
                               "(/v1/classify); to generate, name one of its members")
        prompts = self.prompts(body, "prompt", task)
        if any(len(p) >= self.limit for p in prompts):
            longest = max(len(p) for p in prompts)
            raise RequestError(f"a prompt has {longest} tokens; this export takes at most {self.limit - 1} "
                               "(one position is left for the answer)")
        sampling = self.sampling(body, max(len(p) for p in prompts))
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError("'stream' must be true or false")
        jobs = self.jobs("generate", prompts, sampling, task)
        self.metrics.prompt_tokens += sum(len(p) for p in prompts)
        head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": self.name}
        if stream:
            return self.stream(jobs, head)
        texts, reasons = await asyncio.gather(*(self.collect(j) for j in jobs)), []
        choices = []
        for i, (text, reason) in enumerate(texts):
            choices.append({"index": i, "text": text, "finish_reason": reason, "logprobs": None})
            reasons.append(reason)
        used = sum(len(j.continuation.out) for j in jobs)
        prompt_tokens = sum(len(p) for p in prompts)
        return {**head, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": used,
                          "total_tokens": prompt_tokens + used}}

    async def collect(self, job: Job) -> tuple[str, str]:
        parts = []
        try:
            while True:
                event = await job.events.get()
                if event[0] == "text":
                    parts.append(event[1])
                elif event[0] == "done":
                    return "".join(parts), event[1]
                else:
                    raise RequestError(event[1], event[2])
        finally:
            job.cancelled = True  # a client that went away frees its row at the next step

    async def stream(self, jobs: list[Job], head: dict):
        """Server-sent events: one chunk per piece of text, a last chunk with the finish reason, then [DONE]."""
        merged: asyncio.Queue = asyncio.Queue()

        async def forward(i: int, job: Job):
            while True:
                event = await job.events.get()
                await merged.put((i, event))
                if event[0] != "text":
                    return

        tasks = [asyncio.create_task(forward(i, j)) for i, j in enumerate(jobs)]
        open_jobs = len(jobs)
        try:
            while open_jobs:
                i, event = await merged.get()
                if event[0] == "error":
                    yield f"data: {json.dumps({'error': {'message': event[1], 'type': 'server_error'}})}\n\n"
                    return
                text, reason = (event[1], None) if event[0] == "text" else ("", event[1])
                open_jobs -= reason is not None
                choice = {"index": i, "text": text, "finish_reason": reason, "logprobs": None}
                yield f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for job, task in zip(jobs, tasks):
                job.cancelled = True
                task.cancel()

    async def classify(self, body: dict) -> dict:
        task = self.task(body)
        if not self.model.label_ids(task):
            raise RequestError(f"task {task!r} comes from a generation recipe: use /v1/completions", 404)
        prompts = self.prompts(body, "input", task)
        if any(len(p) >= self.limit for p in prompts):
            raise RequestError(f"an input has {max(len(p) for p in prompts)} tokens; this export takes at most "
                               f"{self.limit - 1}")
        jobs = self.jobs("classify", prompts, Sampling(), task)
        self.metrics.prompt_tokens += sum(len(p) for p in prompts)
        results = []
        for job in jobs:
            event = await job.events.get()
            if event[0] == "error":
                raise RequestError(event[1], event[2])
            probs = event[1]
            results.append({"label": max(probs, key=probs.get), "probabilities": probs})
        return {"object": "classification", "model": self.name, "data": results}


def create_app(model: ExportedModel, options: ServeOptions | None = None, name: str | None = None):
    """The Starlette application serving `model`; its engine thread runs while the app is up."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    server = Server(model, options or ServeOptions(), name or model.folder.name)

    def error(status: int, message: str, endpoint: str) -> JSONResponse:
        server.metrics.errors[str(status)] = server.metrics.errors.get(str(status), 0) + 1
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse({"error": {"message": message, "type": kind, "endpoint": endpoint}}, status_code=status)

    def handler(endpoint: str, method):
        async def handle(request: Request):
            start = time.perf_counter()
            server.metrics.requests[endpoint] = server.metrics.requests.get(endpoint, 0) + 1
            try:
                raw = b""
                async for chunk in request.stream():
                    raw += chunk
                    if len(raw) > MAX_BODY_BYTES:
                        raise RequestError(f"the body is larger than {MAX_BODY_BYTES >> 20} MiB", 413)
                try:
                    body = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise RequestError(f"the body is not valid JSON ({exc})") from None
                except RecursionError:  # thousands of nested brackets: valid JSON, but no request has that shape
                    raise RequestError("the body nests too deeply to be a request; send a flat JSON object") from None
                if not isinstance(body, dict):
                    raise RequestError("the body must be a JSON object")
                result = await method(body)
            except RequestError as exc:
                return error(exc.status, str(exc), endpoint)
            except Exception as exc:  # a bug of ours: the request fails, the server stays up
                return error(500, f"internal error ({type(exc).__name__}: {str(exc)[:200]})", endpoint)
            if not isinstance(result, dict):  # a stream: its latency is the time to its first byte
                server.metrics.latencies.append(time.perf_counter() - start)
                return StreamingResponse(result, media_type="text/event-stream")
            server.metrics.latencies.append(time.perf_counter() - start)
            return JSONResponse(result)

        return handle

    async def health(request: Request):
        m = model.manifest
        tasks = [{"name": t.name, "kind": t.kind, "labels": list(t.label_targets), "fields": t.template.fields}
                 for t in m.tasks]
        ensembles = [{"name": name, "members": members} for name, members in m.ensembles.items()]
        return JSONResponse({"status": "ok", "model": server.name, "tasks": tasks, "ensembles": ensembles,
                             "max_positions": server.limit,
                             "quantization": m.quantization, "max_batch": server.options.max_batch})

    async def metrics(request: Request):
        return JSONResponse(server.metrics.to_dict(server.engine))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        try:
            yield
        finally:
            server.engine.stop()

    app = Starlette(routes=[
        Route("/v1/completions", handler("completions", server.complete), methods=["POST"]),
        Route("/v1/classify", handler("classify", server.classify), methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ], lifespan=lifespan)
    app.state.server = server
    return app


def bind(host: str, port: int):
    """The listening socket, opened before the model loads' work is wasted: a port in use is one clear error."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        import errno

        sock.close()
        if exc.errno == errno.EADDRNOTAVAIL:  # no interface of this machine has that address
            raise ExportError(f"cannot listen on {host}: this machine has no such address ({exc.strerror}); pass "
                              "--host 127.0.0.1, 0.0.0.0 or one of this machine's addresses") from None
        if exc.errno == errno.EADDRINUSE:
            raise ExportError(f"port {port} on {host} is in use; pass another --port or stop the other "
                              "server") from None
        raise ExportError(f"cannot listen on {host}:{port} ({exc.strerror}); pass another --host or --port (ports "
                          "below 1024 need privileges)") from None
    except (socket.gaierror, UnicodeError) as exc:
        sock.close()
        raise ExportError(f"cannot listen on {host!r}: not a host name or address this machine resolves ({exc}); "
                          "pass --host 127.0.0.1 or 0.0.0.0") from None
    sock.listen(2048)
    return sock


def serve(model: ExportedModel, sock, options: ServeOptions, log_level: str = "warning") -> None:
    """Serve `model` on the bound socket `sock` until interrupted."""
    import uvicorn

    config = uvicorn.Config(create_app(model, options), log_level=log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
