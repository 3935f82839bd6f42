"""The prediction service: a Starlette app on uvicorn around one fitted model, loaded once.

    POST /predict         one image (raw body, or multipart field `image`), optional `text`, `top`
    POST /predict/batch   several multipart `image` fields (and `text` fields, in the same order)
    POST /explain         PNG: the attention map over the image (methods with attention), `target`
    GET  /                the web page (page.html/js/css beside this file; no external assets)
    GET  /healthz  /model  /metrics (Prometheus text)

Every answer is `Prediction.to_dict()` (methods/decision.py): the decision of each task and the
top scores as Hugging Face's `[{"label", "score"}]`. Images are decoded in a thread pool and run
through the micro-batcher (batching.py). Limits: request body bytes (413), image pixels read
from the header before anything is decoded (413), images per batch call, a request timeout
(504), a bounded queue (503), a limit on requests in progress (503), a Host check (400).
Every error is one JSON line `{"code", "message", "detail"}`: a stable code for programs, a short
message for people (the page shows it), the technical detail for logs; never a traceback. A client
gone mid-request is logged as 499, never as a 500. Connection limits (idle sockets, header-read
timeout, draining at SIGTERM) live in protocol.py. Images only ever come from the request:
nothing a client sends is used as a file path.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import ipaddress
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, ExceptionHandler, Message, Receive, Scope, Send

from ..context import RunContext
from ..data.decoder import decode
from ..data.items import Dataset, Item
from ..data.source import BytesSource
from ..errors import ConfigError, DataError, VLClassifyError
from ..features import FeatureCache
from ..methods.base import TEXT, Method
from ..onnx_predict import OnnxModel
from .batching import BatchConfig, MicroBatcher, QueueFull
from .protocol import ConnectionLimits, error_body

log = logging.getLogger("vlclassify.serve")
TOKEN_COOKIE = "vlclassify_token"
ROUTES = (
    "/",
    "/page.js",
    "/page.css",
    "/favicon.svg",
    "/healthz",
    "/model",
    "/metrics",
    "/predict",
    "/predict/batch",
    "/explain",
)
# answered without the token (the sign-in page uses the style and icon), outside the requests limit
OPEN_ROUTES = ("/healthz", "/page.css", "/favicon.svg")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@dataclass
class ServeConfig:
    """The service's limits and access token (`vlclassify serve` options); batching: see BatchConfig."""

    token: str | None = None  # bearer token every route but /healthz requires (None: open)
    max_bytes: int = 20 * 2**20  # largest request body (413)
    max_pixels: int = 40_000_000  # largest image, width x height from its header (413, never decoded)
    max_aspect: float = 20.0  # longest side / shortest side (413): the model resizes the shorter side
    pixels_in_flight: int = 80_000_000  # pixels being decoded at once (header sizes), all requests together
    max_images: int = 32  # images in one /predict/batch call
    timeout: float = 30.0  # seconds a request may take, upload included (504)
    top: int = 5  # scores per answer unless the request asks for `top`
    decode_workers: int = 2  # threads decoding uploads
    max_requests: int = 256  # requests in progress (not sockets); more get 503 + Retry-After
    allowed_hosts: tuple[str, ...] = LOOPBACK_NAMES  # Host header names answered ("*": any)
    batching: BatchConfig = field(default_factory=BatchConfig)
    precision: str = "fp32"  # an exported model answers from its ONNX graph: fp32, or int8 (its trunk quantised)
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)

    def __post_init__(self) -> None:
        if (
            min(self.max_bytes, self.max_pixels, self.max_images, self.top, self.decode_workers, self.max_requests) < 1
            or self.timeout <= 0
        ):
            raise ConfigError("serve: limits, top and decode workers must be >= 1 and the timeout > 0")
        if self.pixels_in_flight < self.max_pixels or self.max_aspect < 1:
            raise ConfigError(
                f"serve: pixels in flight ({self.pixels_in_flight}) must hold one image of --max-pixels "
                f"({self.max_pixels}), and --max-aspect ({self.max_aspect:g}) must be >= 1"
            )
        if not self.allowed_hosts:
            raise ConfigError("serve: --allowed-hosts is empty (give host names, or '*' for any)")


def default_hosts(host: str) -> tuple[str, ...]:
    """The Host names answered by default: the bound address and the loopback names; any name when
    bound to every interface (0.0.0.0, ::), where clients reach the server under names it cannot
    know and the token (required there) is the guard."""
    if host in ("0.0.0.0", "::", ""):
        return ("*",)
    return tuple(dict.fromkeys((host, *LOOPBACK_NAMES)))


def host_allowed(header: bytes, allowed: Sequence[str]) -> bool:
    """Whether a Host header (`name`, `name:port`, `[v6]:port`) names an allowed host. Rebinding
    a DNS name to 127.0.0.1 makes a browser send that name: refusing it keeps a web page from
    reaching an unauthenticated loopback server."""
    if "*" in allowed:
        return True
    host = header.decode("latin-1").strip().lower()
    if host.startswith("["):
        name = host[1:].partition("]")[0]
    else:
        name = host.rpartition(":")[0] if host.count(":") == 1 else host
    return bool(name) and name in allowed


def check_bind(host: str, token: str | None, insecure: bool) -> None:
    """Refuse to serve beyond this machine without a token, unless told so."""
    if token or insecure:
        return
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(
            f"--host {host} is reachable from other machines: give --token (or VLCLASSIFY_TOKEN), "
            "or --insecure to serve without one"
        )


# ---- metrics ---------------------------------------------------------------------------------
class Metrics:
    """Prometheus metrics in a registry of the app's own (several apps can live in one process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "vlclassify_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "vlclassify_request_seconds",
            "Request latency by route, upload included",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=r,
        )
        self.batch_size = Histogram(
            "vlclassify_batch_size", "Images per forward pass", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r
        )
        self.batch_seconds = Histogram(
            "vlclassify_batch_seconds",
            "Time of one batch's forward pass",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r,
        )
        self.queue_depth = Gauge("vlclassify_queue_depth", "Images waiting for a forward pass", registry=r)

    def text(self) -> bytes:
        """The `/metrics` body: every metric in Prometheus' text format."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# ---- the guard: host, token, limits, timeout, metrics, errors -----------------------------------
class Refused(Exception):
    """A request answered with an error: its status, a stable `code`, a short `message` for people
    (the page shows it) and the technical `detail` (names the file, field or value)."""

    def __init__(
        self, status: int, code: str, message: str, detail: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status, self.code, self.message, self.detail = status, code, message, detail
        self.headers = headers or {}

    def response(self) -> Response:
        """The one-line JSON answer."""
        body = error_body(self.status, self.code, self.message, self.detail)
        return Response(body, status_code=self.status, media_type="application/json", headers=self.headers)


BUSY = "The service is busy. Please try again in a moment."
HTTP_CODES = {  # status -> (code, message) of starlette's own errors (routing, the streamed body limit)
    404: ("not_found", "There is nothing at this address."),
    405: ("method_not_allowed", "This address does not take that kind of request."),
    413: ("too_large", "The file is too large to send."),
}


def _escape(path: str) -> str:
    """A request path for the log: percent-escaped, so `%0d%0a` cannot write a fake log line."""
    return urllib.parse.quote(path, safe="/:@!$&'()*+,;=-._~")


class Guard:
    """ASGI middleware in front of every route: the Host check, the bearer token (constant-time),
    the limit on requests in progress, the request body limit (Content-Length, then counted while
    it streams), the request timeout, one log line and the request metrics per request, 499 for a
    client gone mid-request, and a one-line 500 for anything unexpected."""

    def __init__(self, app: ASGIApp, config: ServeConfig, metrics: Metrics) -> None:
        self.app, self.config, self.metrics = app, config, metrics
        self.in_progress = 0  # requests past the checks, not yet answered (one event loop: no lock)

    def _authorized(self, scope: Scope) -> bool:
        token = self.config.token
        if not token or scope["path"] in OPEN_ROUTES:
            return True
        want = token.encode()
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer " and hmac.compare_digest(auth[7:].strip(), want):
            return True
        for part in headers.get(b"cookie", b"").split(b";"):
            name, _, value = part.strip().partition(b"=")
            if name == TOKEN_COOKIE.encode() and hmac.compare_digest(value, want):
                return True
        if scope["path"] == "/" and scope["method"] == "GET":  # the page's sign-in: GET /?token=T sets the cookie
            query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
            given = (query.get("token") or [""])[0].encode()
            return bool(given) and hmac.compare_digest(given, want)
        return False

    def _refusal(self, scope: Scope) -> Refused | Response | None:
        """Why the request is answered before any route runs (None: it goes on)."""
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"")
        if not host_allowed(host, self.config.allowed_hosts):
            return Refused(
                400,
                "bad_host",
                "This address is not served here.",
                f"Host {host.decode('latin-1')[:100]!r} is not in --allowed-hosts",
            )
        if not self._authorized(scope):
            if scope["path"] == "/" and b"text/html" in headers.get(b"accept", b""):
                return _sign_in_page()
            return Refused(
                401,
                "unauthorized",
                "Sign in first: open the address with ?token=... once.",
                "missing or wrong token (Authorization: Bearer <token>)",
                {"WWW-Authenticate": "Bearer"},
            )
        length = headers.get(b"content-length", b"0")
        if not length.isdigit():
            return Refused(400, "bad_request", "The request was not understood.", "bad Content-Length")
        if int(length) > self.config.max_bytes:
            return Refused(413, *HTTP_CODES[413], f"request body over the limit of {self.config.max_bytes} bytes")
        if scope["path"] not in OPEN_ROUTES and self.in_progress >= self.config.max_requests:
            return Refused(
                503,
                "busy",
                BUSY,
                f"{self.in_progress} requests in progress (the limit is {self.config.max_requests})",
                {"Retry-After": "1"},
            )
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in ROUTES else "other"
        start = time.perf_counter()
        state: dict[str, Any] = {"status": 500, "started": False, "received": 0}

        async def send_(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
            await send(message)

        limit = self.config.max_bytes

        async def receive_() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > limit:
                    raise HTTPException(413, f"request body over the limit of {limit} bytes")
            return message

        note = ""
        refusal = self._refusal(scope)
        try:
            if refusal is not None:
                answer = refusal.response() if isinstance(refusal, Refused) else refusal
                await answer(scope, receive, send_)
            else:
                self.in_progress += 1
                try:
                    await asyncio.wait_for(self.app(scope, receive_, send_), self.config.timeout)
                finally:
                    self.in_progress -= 1
        except ClientDisconnect:  # not the server's fault: its own status, no traceback, no 5xx alert
            state["status"], note = 499, " (the client closed the connection)"
        except TimeoutError:
            if not state["started"]:
                detail = f"the request took longer than {self.config.timeout:g} s"
                await Refused(504, "timeout", "The service took too long. Please try again.", detail).response()(
                    scope, receive, send
                )
                state["status"] = 504
        except Exception:  # noqa: BLE001 - logged here; the client gets one line, never a traceback
            log.exception("%s %s failed", scope["method"], _escape(scope["path"]))
            if not state["started"]:
                await Refused(
                    500, "internal", "Something went wrong on the server.", "internal error (logged by the server)"
                ).response()(scope, receive, send)
                state["status"] = 500
        finally:
            dt = time.perf_counter() - start
            self.metrics.requests.labels(route, str(state["status"])).inc()
            self.metrics.latency.labels(route).observe(dt)
            log.info("%s %s %d %.1f ms%s", scope["method"], _escape(scope["path"]), state["status"], 1000 * dt, note)


def _sign_in_page() -> Response:
    """What a browser gets at `/` with a token set and no cookie: how to sign in, not bare JSON."""
    return Response(
        SIGN_IN_HTML,
        status_code=401,
        media_type="text/html; charset=utf-8",
        headers={"WWW-Authenticate": "Bearer", "Content-Security-Policy": PAGE_CSP},
    )


SIGN_IN_HTML = (
    b'<!doctype html><html lang="en"><head><meta charset="utf-8">'
    b'<meta name="viewport" content="width=device-width, initial-scale=1"><title>vlclassify: sign in</title>'
    b'<link rel="icon" href="/favicon.svg"><link rel="stylesheet" href="/page.css"></head>'
    b'<body><header><h1>vlclassify</h1></header><main><section id="sign-in">'
    b"<h2>Sign in</h2><p>This service needs its access token. Open this address once with the token "
    b"added, as <code>/?token=YOUR-TOKEN</code>: the browser then keeps it (a cookie) and the token "
    b"leaves the address bar.</p><p>Ask whoever runs the service for the token.</p>"
    b"</section></main></body></html>"
)


# ---- decoding ----------------------------------------------------------------------------------
NOT_AN_IMAGE = "This file is not an image the service can read (JPEG, PNG, WebP, GIF, BMP, TIFF)."
TOO_MANY_PIXELS = "The image has too many pixels. Please send a smaller one."


def image_size(data: bytes, name: str, config: ServeConfig) -> tuple[int, int]:
    """(width, height) from the image's header (PIL's open is lazy), refused before anything is
    decoded: more pixels than `max_pixels` (a decompression bomb), or a side ratio beyond
    `max_aspect` (a 30000 x 4 strip is 120 k pixels, but resized to the model's shorter side it
    would be 1,680,000 x 224)."""
    if not data:
        raise Refused(400, "not_an_image", NOT_AN_IMAGE, f"{name}: empty image")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except Image.DecompressionBombError as e:
        raise Refused(413, "too_many_pixels", TOO_MANY_PIXELS, f"{name}: {e}") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for what is not an image
        raise Refused(
            400, "not_an_image", NOT_AN_IMAGE, f"{name}: not an image PIL can read ({type(e).__name__})"
        ) from None
    if w * h > config.max_pixels:
        detail = f"{name}: {w} x {h} = {w * h} pixels, over the limit of {config.max_pixels}"
        raise Refused(413, "too_many_pixels", TOO_MANY_PIXELS, detail)
    if max(w, h) > config.max_aspect * max(1, min(w, h)):
        raise Refused(
            413,
            "bad_aspect",
            "The image is too long and narrow. Please crop it.",
            f"{name}: {w} x {h} has a side ratio over the limit of {config.max_aspect:g}",
        )
    return w, h


def decode_image(data: bytes, name: str, size: int, config: ServeConfig) -> np.ndarray:
    """Bytes -> uint8 RGB array [H, W, 3] by the one decoder (`data.decoder`), as offline `predict`
    reads a file: EXIF-oriented, reduced towards the model's input side `size`, so a queued image
    costs about its model input, not its file's full size (its limits were checked by `image_size`)."""
    try:
        image = decode(BytesSource(data, name), size=size, max_pixels=config.max_pixels, max_aspect=config.max_aspect)
    except DataError as e:
        raise Refused(400, "not_an_image", NOT_AN_IMAGE, str(e)) from None
    return np.asarray(image, dtype=np.uint8)


class PixelBudget:
    """The pixels being decoded at once, all requests together: an image takes its header's
    width x height before it is decoded and gives them back once decoded (reduced towards the
    model's input), so 16 near-limit PNGs in one batch call are not all inflated at full size at
    the same moment. One event loop uses it: no lock; giving back is synchronous, so a cancelled
    request (its timeout) cannot leak its share."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self._waiters: list[asyncio.Future[None]] = []

    @asynccontextmanager
    async def hold(self, pixels: int) -> AsyncIterator[None]:
        """Wait until `pixels` fit in the budget, hold them for the block."""
        while self.used + pixels > self.limit:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)
        self.used += pixels
        try:
            yield
        finally:
            self.used -= pixels
            for fut in self._waiters:
                if not fut.done():
                    fut.set_result(None)
            self._waiters.clear()


def _display_name(filename: str | None, default: str) -> str:
    """A client's file name for display only (never opened): its last part, printable, short."""
    base = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if ch.isprintable())[:100]
    return base or default


@dataclass
class Job:
    """One image waiting for the micro-batcher, with what its request asked for."""

    image: np.ndarray  # [H, W, 3] uint8
    text: str | None
    name: str
    top: int


@dataclass
class Upload:
    """What a request sent: images (bytes + display name), texts, and the fields."""

    images: list[tuple[bytes, str]]
    texts: list[str]
    fields: dict[str, str]


# ---- the app -----------------------------------------------------------------------------------
class Service:
    """The model, its batcher, the decode pool, and the route handlers."""

    def __init__(self, method: Method, config: ServeConfig, onnx: OnnxModel | None = None) -> None:
        # served images never touch the feature cache: it would grow with every upload, and its
        # entries are keyed by item names, which clients choose
        self.ctx = RunContext(cache=FeatureCache(enabled=False), progress=False)
        self.method, self.config = method, config
        self.onnx = onnx  # the model's ONNX export answers /predict when it has one (onnx_predict.py)
        self.metrics = Metrics()
        self.takes_text = TEXT in method.takes()
        self.batcher = MicroBatcher(
            self.run_batch,
            config.batching,
            on_batch=self.metrics.batch_size.observe,
            on_depth=self.metrics.queue_depth.set,
        )
        self.budget = PixelBudget(config.pixels_in_flight)
        self.decoder = ThreadPoolExecutor(max_workers=config.decode_workers, thread_name_prefix="vlclassify-decode")
        self.assets = {
            name: (resources.files(__package__).joinpath(name).read_bytes(), kind)
            for name, kind in (
                ("page.html", "text/html; charset=utf-8"),
                ("page.js", "text/javascript; charset=utf-8"),
                ("page.css", "text/css; charset=utf-8"),
                ("favicon.svg", "image/svg+xml"),
            )
        }

    # ---- model calls (in the model thread) -------------------------------------------------
    def run_batch(self, jobs: list[Job]) -> list[dict[str, Any]]:
        """One forward pass over the batch's images -> each job's Prediction dict (its own top)."""
        start = time.perf_counter()
        m = self.method
        items = [Item(image=j.image, text=j.text if self.takes_text else None, key=j.name) for j in jobs]
        top = max(j.top for j in jobs)
        if self.onnx is not None:
            preds = self.onnx.predict_results(items, top=top)
        else:
            preds = m.predict_results(
                Dataset(items=items, classnames=m.classnames, name="serve"), top=top, ctx=self.ctx
            )
        out = [_trim(p.to_dict(), j.top) for p, j in zip(preds, jobs, strict=True)]
        del preds, items
        _release_free_memory()
        self.metrics.batch_seconds.observe(time.perf_counter() - start)
        return out

    def warm_up(self) -> None:
        """One prediction at start-up: builds the runtime's session before the first request."""
        blank = np.full((64, 64, 3), 127, dtype=np.uint8)
        self.run_batch([Job(blank, "warm up" if self.takes_text else None, "warm-up", 1)])

    def explain_png(self, image: np.ndarray, text: str | None, name: str, target: str | None) -> tuple[bytes, str]:
        """(PNG of the attention map over `image`, the class or token it explains)."""
        m = self.method
        heat = m.explain(Item(image=image, text=text, key=name), target, ctx=self.ctx)
        label = (
            target
            or getattr(m, "explained_token", None)
            or m.predict_results([Item(image=image, key=name)], top=1, ctx=self.ctx)[0].scores[0][0]
        )
        from ..plots.heatmap import heatmap_overlay  # matplotlib: imported only when a map is drawn

        base = Image.fromarray(image)
        base.thumbnail((512, 512))  # the map is coarse: a smaller canvas keeps the answer small
        buf = io.BytesIO()
        heatmap_overlay(base, heat).save(buf, format="PNG")
        return buf.getvalue(), str(label)

    # ---- request parsing ----------------------------------------------------------------------
    async def read_upload(self, request: Request) -> Upload:
        """The request's images, texts and fields: multipart fields, or the raw body as one image."""
        fields = {k: v for k, v in request.query_params.items()}
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            n = self.config.max_images
            async with request.form(max_files=n, max_fields=n + 16) as form:
                images: list[tuple[bytes, str]] = []
                texts: list[str] = []
                for key, value in form.multi_items():
                    if key == "image":
                        if isinstance(value, str):
                            raise _bad_request("field 'image' must be a file upload, not a text field")
                        images.append((await value.read(), _display_name(value.filename, f"image-{len(images) + 1}")))
                    elif key == "text":
                        texts.append(
                            value if isinstance(value, str) else (await value.read()).decode("utf-8", "replace")
                        )
                    elif isinstance(value, str):
                        fields[key] = value
            return Upload(images, texts, fields)
        body = await request.body()
        texts = request.query_params.getlist("text")
        return Upload([(body, _display_name(fields.get("name"), "image"))] if body else [], texts, fields)

    def _top(self, fields: dict[str, str]) -> int:
        raw = fields.get("top")
        if raw is None:
            return self.config.top
        try:
            top = int(raw)
        except ValueError:
            raise _bad_request(f"top={raw!r} is not an integer") from None
        if not 1 <= top <= 1000:
            raise _bad_request(f"top={top} must be between 1 and 1000")
        return top

    def _texts(self, upload: Upload) -> Sequence[str | None]:
        n = len(upload.images)
        if upload.texts and len(upload.texts) != n:
            raise _bad_request(f"{len(upload.texts)} text field(s) for {n} image(s); give one per image")
        return [(t or "").strip() or None for t in upload.texts] or [None] * n

    async def decode(self, data: bytes, name: str) -> np.ndarray:
        """One upload decoded in the decode pool -> RGB array [H, W, 3]."""
        size = self.method.backbone.image_size
        return await asyncio.get_running_loop().run_in_executor(
            self.decoder, decode_image, data, name, size, self.config
        )

    async def answer(self, upload: Upload) -> list[dict[str, Any]]:
        """Each image's Prediction dict: every header checked first (nothing is decoded for a
        request that will be refused), then each image is decoded within the pixel budget and
        predicted."""
        texts, top = self._texts(upload), self._top(upload.fields)
        sizes = [image_size(data, name, self.config) for data, name in upload.images]

        async def one(i: int) -> dict[str, Any]:
            (data, name), (w, h) = upload.images[i], sizes[i]
            async with self.budget.hold(w * h):  # the full-size decode is the costly moment
                image = await self.decode(data, name)
            pred: dict[str, Any] = await self.batcher.submit(Job(image, texts[i], name, top))
            return pred

        tasks = [asyncio.ensure_future(one(i)) for i in range(len(upload.images))]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:  # one image refused (or the request's timeout): the others stop too
            for t in tasks:
                t.cancel()
            raise

    # ---- routes ------------------------------------------------------------------------------
    async def predict(self, request: Request) -> Response:
        """POST /predict: one image (and its text) -> one Prediction dict."""
        upload = await self.read_upload(request)
        if len(upload.images) != 1:
            raise _bad_request(
                "no image: send it as the request body or as a multipart field 'image'"
                if not upload.images
                else f"{len(upload.images)} images sent: /predict takes one (use /predict/batch)"
            )
        return JSONResponse((await self.answer(upload))[0])

    async def predict_batch(self, request: Request) -> Response:
        """POST /predict/batch: several images -> a list of Prediction dicts, in upload order."""
        upload = await self.read_upload(request)
        if not upload.images:
            raise _bad_request("no image: send multipart fields 'image' (one per image)")
        if len(upload.images) > self.config.max_images:
            raise _bad_request(f"{len(upload.images)} images in one call; the limit is {self.config.max_images}")
        room = self.config.batching.queue_size - self.batcher.depth
        if len(upload.images) > room:
            raise QueueFull(f"{len(upload.images)} images do not fit in the queue ({room} free places)")
        return JSONResponse(await self.answer(upload))

    async def explain(self, request: Request) -> Response:
        """POST /explain: the attention map as a PNG, what it explains in the X-Explained header."""
        m = self.method
        if not type(m).tags.explain:
            raise Refused(
                400,
                "no_attention",
                "This model cannot show where it looked.",
                f"{m.name} has no attention to explain (methods with attention: vt-clip, cma-clip, dicls)",
            )
        upload = await self.read_upload(request)
        if len(upload.images) != 1:
            raise _bad_request("send one image (request body or multipart field 'image')")
        ((data, name),) = upload.images
        w, h = image_size(data, name, self.config)
        text = self._texts(upload)[0]
        async with self.budget.hold(w * h):
            image = await self.decode(data, name)
        png, label = await self.batcher.call(self.explain_png, image, text, name, upload.fields.get("target") or None)
        return Response(png, media_type="image/png", headers={"X-Explained": urllib.parse.quote(label)})

    async def model_info(self, request: Request) -> Response:
        """GET /model: the classes, the decision, calibration and "unknown" rules, the backbone and
        the limits (what the page shows)."""
        m, c = self.method, self.config
        bb = m.backbone
        return JSONResponse(
            {
                "method": m.name,
                "classes": m.classnames,
                "tasks": {m.task_name(t): names for t, names in m.task_classes.items()},
                "multilabel": m.multilabel,
                "decisions": {m.task_name(t): {"rule": r.describe(), **r.to_dict()} for t, r in m.decisions.items()},
                "calibration": {
                    m.task_name(t): {"rule": c.describe(), **c.to_dict()} for t, c in m.trust.calibrations.items()
                },
                "unknown": {"rule": m.trust.open_set.describe(), **m.trust.open_set.to_dict()},
                "backbone": {"name": bb.name, "embed_dim": bb.embed_dim, "image_size": bb.image_size},
                "takes_text": self.takes_text,
                "runtime": f"onnx-{self.onnx.precision}" if self.onnx is not None else "torch",
                "explain": type(m).tags.explain,
                "limits": {
                    "max_bytes": c.max_bytes,
                    "max_pixels": c.max_pixels,
                    "max_images": c.max_images,
                    "max_aspect": c.max_aspect,
                    "timeout": c.timeout,
                },
                "batching": asdict(c.batching),
            }
        )

    async def healthz(self, request: Request) -> Response:
        """GET /healthz: liveness, answered without the token."""
        return JSONResponse({"status": "ok"})

    async def metrics_text(self, request: Request) -> Response:
        """GET /metrics: Prometheus text."""
        return Response(self.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def page(self, request: Request) -> Response:
        """GET /: the web page; `?token=T` signs in (a cookie) and redirects to the bare URL."""
        if "token" in request.query_params:  # the sign-in: keep a right token in a cookie, drop it from the URL
            given, token = request.query_params["token"], self.config.token
            resp = RedirectResponse("/", status_code=303)
            if token and hmac.compare_digest(given.encode(), token.encode()):
                resp.set_cookie(TOKEN_COOKIE, given, httponly=True, samesite="strict")
            return resp
        return self._asset("page.html")

    def _asset(self, name: str) -> Response:
        body, kind = self.assets[name]
        return Response(
            body, media_type=kind, headers={"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff"}
        )

    async def page_js(self, request: Request) -> Response:
        """GET /page.js: the page's script."""
        return self._asset("page.js")

    async def page_css(self, request: Request) -> Response:
        """GET /page.css: the page's style sheet."""
        return self._asset("page.css")

    async def favicon(self, request: Request) -> Response:
        """GET /favicon.svg: the page's icon (the page links it; browsers stop asking /favicon.ico)."""
        return self._asset("favicon.svg")


def _libc_trim() -> Any:
    """glibc's `malloc_trim`, or None elsewhere (musl, macOS: nothing to release this way)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


MALLOC_TRIM = _libc_trim()


def _release_free_memory() -> None:
    """Give the heap's free pages back to the system after a batch. Batches of varying size (and
    cma-clip's texts padded to each batch's longest) free blocks that glibc's arenas keep: served
    cma-clip under 16 clients with batching on went from 542 to 958 MB over 400 requests without
    this, 540 to 632 MB with it, at the same throughput (docs/serving.md, "Memory")."""
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)


def _trim(pred: dict[str, Any], top: int) -> dict[str, Any]:
    """A Prediction dict with `top` scores (the batch ran with its largest `top`)."""
    pred["scores"] = pred["scores"][:top]
    for t in (pred.get("tasks") or {}).values():
        t["scores"] = t["scores"][:top]
    return pred


def _bad_request(detail: str) -> Refused:
    return Refused(400, "bad_request", "The request was not understood.", detail)


async def _refused(request: Request, exc: Exception) -> Response:
    """Refused, QueueFull, and the library's errors raised while answering (a bad `top`, an
    unknown `target`) as one JSON line."""
    if isinstance(exc, Refused):
        return exc.response()
    if isinstance(exc, QueueFull):
        return Refused(503, "busy", BUSY, str(exc), {"Retry-After": "1"}).response()
    return _bad_request(str(exc).splitlines()[0] if str(exc) else type(exc).__name__).response()


async def _http_error(request: Request, exc: HTTPException) -> Response:
    code, message = HTTP_CODES.get(exc.status_code, ("bad_request", "The request was not understood."))
    return Refused(exc.status_code, code, message, str(exc.detail), dict(exc.headers or {})).response()


def create_app(method: Method, config: ServeConfig | None = None, onnx: OnnxModel | None = None) -> Starlette:
    """The ASGI app serving a fitted `method` (see the module docstring); the method's feature
    cache is switched off (served images must not grow it). `onnx`: its export, which then answers
    the predictions."""
    from starlette.middleware import Middleware

    config = config or ServeConfig()
    svc = Service(method, config, onnx)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await svc.batcher.start()
        await svc.batcher.call(svc.warm_up)
        log.info("ready: %s, %d classes", method.name, len(method.classnames))
        yield
        await svc.batcher.stop()
        svc.decoder.shutdown(wait=False)

    routes = [
        Route("/", svc.page, methods=["GET"]),
        Route("/page.js", svc.page_js, methods=["GET"]),
        Route("/page.css", svc.page_css, methods=["GET"]),
        Route("/favicon.svg", svc.favicon, methods=["GET"]),
        Route("/healthz", svc.healthz, methods=["GET"]),
        Route("/model", svc.model_info, methods=["GET"]),
        Route("/metrics", svc.metrics_text, methods=["GET"]),
        Route("/predict", svc.predict, methods=["POST"]),
        Route("/predict/batch", svc.predict_batch, methods=["POST"]),
        Route("/explain", svc.explain, methods=["POST"]),
    ]
    handlers: dict[Any, ExceptionHandler] = {
        VLClassifyError: _refused,
        Refused: _refused,
        QueueFull: _refused,
        # starlette types every handler as taking any Exception; it calls this one, registered for
        # HTTPException, only with an HTTPException
        HTTPException: _http_error,  # type: ignore[dict-item]
    }
    app = Starlette(
        routes=routes,
        middleware=[Middleware(Guard, config=config, metrics=svc.metrics)],
        exception_handlers=handlers,
        lifespan=lifespan,
    )
    app.state.service = svc
    return app


SERVE_ENV = "VLCLASSIFY_SERVE"  # the model folder and ServeConfig, JSON, for the --workers processes


def app_from_env() -> Starlette:
    """The app factory the `--workers` processes import (uvicorn needs an import string to start
    workers): the model folder and the ServeConfig come from the `VLCLASSIFY_SERVE` variable that
    `serve` sets, as JSON."""
    import json
    import os

    raw = os.environ.get(SERVE_ENV)
    if not raw:
        raise ConfigError(f"{SERVE_ENV} is not set: start the service with `vlclassify serve MODEL_DIR`")
    spec = json.loads(raw)
    try:
        return model_app(spec["model"], config_from_dict(spec["config"]))
    except VLClassifyError as e:  # one line, and uvicorn's start-up failure: the supervisor stops
        import sys

        from uvicorn.config import STARTUP_FAILURE

        log.error("error: %s", e)
        sys.exit(STARTUP_FAILURE)


def config_from_dict(d: dict[str, Any]) -> ServeConfig:
    """A ServeConfig from `dataclasses.asdict` of one (what travels in `VLCLASSIFY_SERVE`)."""
    return ServeConfig(
        **{
            **d,
            "allowed_hosts": tuple(d["allowed_hosts"]),
            "batching": BatchConfig(**d["batching"]),
            "connections": ConnectionLimits(**d["connections"]),
        }
    )


def serve(
    model_dir: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    config: ServeConfig | None = None,
    insecure: bool = False,
    log_level: str = "info",
    workers: int = 1,
) -> None:
    """Serve the model with uvicorn until SIGTERM / Ctrl-C, in `workers` processes sharing the
    port (each loads the model once and runs its forward passes on cores / workers threads)."""
    import json
    import os
    import signal
    import sys

    import uvicorn

    config = config or ServeConfig()
    check_bind(host, config.token, insecure)
    if workers < 1:
        raise ConfigError(f"--workers {workers}: must be >= 1")
    if not (Path(model_dir) / "config.json").is_file():  # said here, before any worker starts
        raise ConfigError(f"{model_dir}: not a model folder (no config.json)")
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), format="%(message)s")
    os.environ[SERVE_ENV] = json.dumps({"model": str(model_dir), "config": asdict(config)})
    # the cores are shared by the workers: features.runtime.cpu_count divides by this
    os.environ["LOCAL_WORLD_SIZE"] = str(workers)
    log.info(
        "serving %s on http://%s:%d with %d worker(s)%s",
        model_dir,
        host,
        port,
        workers,
        " (token required)" if config.token else "",
    )
    # one process: the model is loaded here, so a bad model folder is a one-line error before the
    # port opens; several: each worker loads it through the factory (uvicorn needs an import string)
    app: Starlette | str = model_app(model_dir, config) if workers == 1 else "vlclassify.serve.app:app_from_env"
    ucfg = uvicorn.Config(
        app,
        factory=workers > 1,
        host=host,
        port=port,
        workers=workers,
        http="vlclassify.serve.protocol:ServeProtocol",
        log_level=log_level,
        access_log=False,  # the guard logs each request, without its query string (the page's token)
        timeout_keep_alive=5,
        timeout_graceful_shutdown=max(1, round(config.timeout)),  # SIGTERM: answer what was received
        timeout_worker_healthcheck=60,  # a worker loading its model on a busy machine is not hung
    )
    ucfg.vlclassify_limits = config.connections  # type: ignore[attr-defined] # read by ServeProtocol
    if workers == 1:
        # uvicorn drains at SIGTERM, then raises the signal again for the handler it found: make
        # that a clean exit (0), which is what a drained stop is to systemd or Kubernetes
        signal.signal(signal.SIGTERM, lambda sig, frame: sys.exit(0))
        uvicorn.Server(ucfg).run()
        return
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    sock = ucfg.bind_socket()
    supervisor = Multiprocess(ucfg, sockets=[sock])
    try:
        supervisor.run()
    finally:
        sock.close()
    if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes):
        raise ConfigError(f"{model_dir}: the workers could not load the model (the reason is logged above)")


def model_app(model_dir: str, config: ServeConfig) -> Starlette:
    """The app for the model folder: the model loaded, and its ONNX export (made or re-made
    beside it when needed) answering the predictions where it has one."""
    from ..methods import load_method

    method = load_method(model_dir)
    return create_app(method, config, _export_of(method, model_dir, config.precision))


def _export_of(method: Method, model_dir: str, precision: str) -> OnnxModel | None:
    """The model's ONNX export, or None for a model that has none (it is served with torch; int8
    needs the export)."""
    from ..export import export_beside, onnx_problem

    why = onnx_problem(method)
    if why is None:
        with method.using(RunContext(cache=FeatureCache(enabled=False), progress=False)):
            export_beside(method, model_dir, precision)
        return OnnxModel(model_dir, precision)
    if precision != "fp32":
        raise ConfigError(f"serve --precision {precision} runs an ONNX export of the model, and {why}")
    log.info("serving with torch: %s", why)
    return None
