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
(504), a bounded queue (503). Errors are one JSON line `{"error": ...}`, never a traceback.
Images only ever come from the request: nothing a client sends is used as a file path.
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
from typing import Any

import numpy as np
from PIL import Image
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, ExceptionHandler, Message, Receive, Scope, Send

from ..context import RunContext
from ..data.images import to_rgb
from ..data.items import Dataset, Item
from ..errors import ConfigError, DataError, VLClassifyError
from ..features import FeatureCache
from ..methods.base import TEXT, Method
from ..onnx_predict import OnnxModel
from .batching import BatchConfig, MicroBatcher, QueueFull

log = logging.getLogger("vlclassify.serve")
TOKEN_COOKIE = "vlclassify_token"
ROUTES = ("/", "/page.js", "/page.css", "/healthz", "/model", "/metrics", "/predict", "/predict/batch", "/explain")
OPEN_ROUTES = ("/healthz",)  # answered without the token
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
    max_images: int = 32  # images in one /predict/batch call
    timeout: float = 30.0  # seconds a request may take, upload included (504)
    top: int = 5  # scores per answer unless the request asks for `top`
    decode_workers: int = 2  # threads decoding uploads
    batching: BatchConfig = field(default_factory=BatchConfig)
    precision: str = "fp32"  # an exported model answers from its ONNX graph: fp32, or int8 (its trunk quantised)

    def __post_init__(self) -> None:
        if (
            min(self.max_bytes, self.max_pixels, self.max_images, self.top, self.decode_workers) < 1
            or self.timeout <= 0
        ):
            raise ConfigError("serve: limits, top and decode workers must be >= 1 and the timeout > 0")


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


def has_attention(method: Method) -> bool:
    """Whether the method can draw an attention map (`/explain`): it overrides `Method.explain`."""
    return type(method).explain is not Method.explain


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


# ---- the guard: token, body limit, timeout, metrics, errors ----------------------------------
def _json_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class Guard:
    """ASGI middleware in front of every route: the bearer token (constant-time), the request
    body limit (Content-Length, then counted while it streams), the request timeout, one log line
    and the request metrics per request, and a one-line 500 for anything unexpected."""

    def __init__(self, app: ASGIApp, config: ServeConfig, metrics: Metrics) -> None:
        self.app, self.config, self.metrics = app, config, metrics

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

        try:
            length = dict(scope["headers"]).get(b"content-length", b"0")
            if not self._authorized(scope):
                await _json_error(
                    401, "missing or wrong token (Authorization: Bearer <token>)", {"WWW-Authenticate": "Bearer"}
                )(scope, receive, send_)
            elif not length.isdigit() or int(length) > limit:
                msg = f"request body over the limit of {limit} bytes" if length.isdigit() else "bad Content-Length"
                await _json_error(413 if length.isdigit() else 400, msg)(scope, receive, send_)
            else:
                await asyncio.wait_for(self.app(scope, receive_, send_), self.config.timeout)
        except TimeoutError:
            if not state["started"]:
                await _json_error(504, f"the request took longer than {self.config.timeout:g} s")(scope, receive, send)
                state["status"] = 504
        except Exception:  # noqa: BLE001 - logged here; the client gets one line, never a traceback
            log.exception("%s %s failed", scope["method"], scope["path"])
            if not state["started"]:
                await _json_error(500, "internal error (logged by the server)")(scope, receive, send)
                state["status"] = 500
        finally:
            dt = time.perf_counter() - start
            self.metrics.requests.labels(route, str(state["status"])).inc()
            self.metrics.latency.labels(route).observe(dt)
            log.info("%s %s %d %.1f ms", scope["method"], scope["path"], state["status"], 1000 * dt)


# ---- decoding ----------------------------------------------------------------------------------
class TooLarge(Exception):
    """An image whose header declares more pixels than allowed."""


def decode_image(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """Bytes -> uint8 RGB array [H, W, 3], as `load_image` decodes a file. The size is read from
    the header first (PIL's open is lazy): a decompression bomb is refused before decoding."""
    if not data:
        raise DataError(f"{name}: empty image")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise TooLarge(f"{name}: {e}") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for what is not an image
        raise DataError(f"{name}: not an image PIL can read ({type(e).__name__})") from None
    with im:
        w, h = im.size
        if w * h > max_pixels:
            raise TooLarge(f"{name}: {w} x {h} = {w * h} pixels, over the limit of {max_pixels}")
        try:
            im.load()
            rgb = to_rgb(im)
        except DataError as e:
            raise DataError(f"{name}: {e}") from None
        except Exception as e:  # noqa: BLE001 - truncated or corrupt data
            raise DataError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from None
    return np.asarray(rgb, dtype=np.uint8)


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
        self.decoder = ThreadPoolExecutor(max_workers=config.decode_workers, thread_name_prefix="vlclassify-decode")
        self.assets = {
            name: (resources.files(__package__).joinpath(name).read_bytes(), kind)
            for name, kind in (
                ("page.html", "text/html; charset=utf-8"),
                ("page.js", "text/javascript; charset=utf-8"),
                ("page.css", "text/css; charset=utf-8"),
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
        self.metrics.batch_seconds.observe(time.perf_counter() - start)
        return [_trim(p.to_dict(), j.top) for p, j in zip(preds, jobs, strict=True)]

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
                            raise DataError("field 'image' must be a file upload, not a text field")
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
            raise DataError(f"top={raw!r} is not an integer") from None
        if not 1 <= top <= 1000:
            raise DataError(f"top={top} must be between 1 and 1000")
        return top

    async def decode(self, upload: Upload) -> list[tuple[np.ndarray, str]]:
        """Every uploaded image decoded in the decode pool -> (RGB array [H, W, 3], display name)."""
        loop = asyncio.get_running_loop()
        mp = self.config.max_pixels
        arrays = await asyncio.gather(
            *(loop.run_in_executor(self.decoder, decode_image, data, name, mp) for data, name in upload.images)
        )
        return [(a, name) for a, (_, name) in zip(arrays, upload.images, strict=True)]

    def _jobs(self, upload: Upload, decoded: list[tuple[np.ndarray, str]]) -> list[Job]:
        if upload.texts and len(upload.texts) != len(decoded):
            raise DataError(f"{len(upload.texts)} text field(s) for {len(decoded)} image(s); give one per image")
        top = self._top(upload.fields)
        texts: Sequence[str | None] = upload.texts or [None] * len(decoded)
        return [Job(a, (t or "").strip() or None, name, top) for (a, name), t in zip(decoded, texts, strict=True)]

    # ---- routes ------------------------------------------------------------------------------
    async def predict(self, request: Request) -> Response:
        """POST /predict: one image (and its text) -> one Prediction dict."""
        upload = await self.read_upload(request)
        if len(upload.images) != 1:
            raise DataError(
                "no image: send it as the request body or as a multipart field 'image'"
                if not upload.images
                else f"{len(upload.images)} images sent: /predict takes one (use /predict/batch)"
            )
        jobs = self._jobs(upload, await self.decode(upload))
        return JSONResponse(await self._submit(jobs[0]))

    async def predict_batch(self, request: Request) -> Response:
        """POST /predict/batch: several images -> a list of Prediction dicts, in upload order."""
        upload = await self.read_upload(request)
        if not upload.images:
            raise DataError("no image: send multipart fields 'image' (one per image)")
        if len(upload.images) > self.config.max_images:
            raise DataError(f"{len(upload.images)} images in one call; the limit is {self.config.max_images}")
        jobs = self._jobs(upload, await self.decode(upload))
        room = self.config.batching.queue_size - self.batcher.depth
        if len(jobs) > room:
            raise QueueFull(f"{len(jobs)} images do not fit in the queue ({room} free places)")
        return JSONResponse(await asyncio.gather(*(self._submit(j) for j in jobs)))

    async def _submit(self, job: Job) -> dict[str, Any]:
        pred: dict[str, Any] = await self.batcher.submit(job)  # run_batch's result for this job
        return pred

    async def explain(self, request: Request) -> Response:
        """POST /explain: the attention map as a PNG, what it explains in the X-Explained header."""
        m = self.method
        if not has_attention(m):
            raise ConfigError(
                f"{m.name} has no attention to explain (methods with attention: vt-clip, cma-clip, dicls)"
            )
        upload = await self.read_upload(request)
        if len(upload.images) != 1:
            raise DataError("send one image (request body or multipart field 'image')")
        ((image, name),) = await self.decode(upload)
        text = (upload.texts[0] if upload.texts else "").strip() or None
        png, label = await self.batcher.call(self.explain_png, image, text, name, upload.fields.get("target") or None)
        return Response(png, media_type="image/png", headers={"X-Explained": urllib.parse.quote(label)})

    async def model_info(self, request: Request) -> Response:
        """GET /model: the classes, decision rules, backbone and limits (what the page shows)."""
        m, c = self.method, self.config
        bb = m.backbone
        return JSONResponse(
            {
                "method": m.name,
                "classes": m.classnames,
                "tasks": {m.task_name(t): names for t, names in m.task_classes.items()},
                "multilabel": m.multilabel,
                "decisions": {m.task_name(t): {"rule": r.describe(), **r.to_dict()} for t, r in m.decisions.items()},
                "backbone": {"name": bb.name, "embed_dim": bb.embed_dim, "image_size": bb.image_size},
                "takes_text": self.takes_text,
                "runtime": f"onnx-{self.onnx.precision}" if self.onnx is not None else "torch",
                "explain": has_attention(m),
                "limits": {
                    "max_bytes": c.max_bytes,
                    "max_pixels": c.max_pixels,
                    "max_images": c.max_images,
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


def _trim(pred: dict[str, Any], top: int) -> dict[str, Any]:
    """A Prediction dict with `top` scores (the batch ran with its largest `top`)."""
    pred["scores"] = pred["scores"][:top]
    for t in (pred.get("tasks") or {}).values():
        t["scores"] = t["scores"][:top]
    return pred


async def _user_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, TooLarge):
        return _json_error(413, str(exc))
    if isinstance(exc, QueueFull):
        return _json_error(503, f"busy: {exc}; retry later", {"Retry-After": "1"})
    return _json_error(400, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return _json_error(exc.status_code, str(exc.detail), dict(exc.headers or {}))


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
        Route("/healthz", svc.healthz, methods=["GET"]),
        Route("/model", svc.model_info, methods=["GET"]),
        Route("/metrics", svc.metrics_text, methods=["GET"]),
        Route("/predict", svc.predict, methods=["POST"]),
        Route("/predict/batch", svc.predict_batch, methods=["POST"]),
        Route("/explain", svc.explain, methods=["POST"]),
    ]
    handlers: dict[Any, ExceptionHandler] = {
        VLClassifyError: _user_error,
        TooLarge: _user_error,
        QueueFull: _user_error,
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


def serve(
    model_dir: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    config: ServeConfig | None = None,
    insecure: bool = False,
    log_level: str = "info",
) -> None:
    """Load the model once and serve it with uvicorn until interrupted."""
    import uvicorn

    from ..methods import load_method

    config = config or ServeConfig()
    check_bind(host, config.token, insecure)
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), format="%(message)s")
    method = load_method(model_dir)
    app = create_app(method, config, _export_of(method, model_dir, config.precision))
    log.info(
        "serving %s (%s) on http://%s:%d%s",
        model_dir,
        method.name,
        host,
        port,
        " (token required)" if config.token else "",
    )
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,  # the guard logs each request, without its query string (the page's token)
        limit_concurrency=config.batching.queue_size + 64,  # connections beyond this get uvicorn's 503
        timeout_keep_alive=5,
    )


def _export_of(method: Method, model_dir: str, precision: str) -> OnnxModel | None:
    """The model's ONNX export (made or re-made beside it when needed), or None for a model that
    has none (it is served with torch; int8 needs the export)."""
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
