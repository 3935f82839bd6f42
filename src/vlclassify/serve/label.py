"""`vlclassify label`: a page that shows the next image worth labelling and records the answer.

    GET  /                  the page (label.html/js/css beside this file; no external assets)
    GET  /state             classes, progress (labelled / budget, per-class counts), the model's status
    GET  /model             the model the suggestions follow: method, examples it learnt, refreshes
    POST /next   {tab}      the next image for this tab (leased to it), its classes ordered by the model
    POST /answer {tab, id, labels}   one answer: a row appended to labels.csv at once (flushed, fsync)
    POST /skip   {tab, id}  not this one (asked again only in a later session)
    POST /undo   {tab}      take back this tab's last answer (its row leaves labels.csv)
    GET  /image/{id}        the pool image `id` (an index into the pool: no client text is a path)
    GET  /healthz

labels.csv is the only record: `image,label` (or `image,labels` for multi-label, names joined by
`;`), the manifest `fit --data labels.csv` reads as it is. Reopening the page on the same file
resumes: what it holds is never asked again. An image shown to a tab is leased to it
(LEASE_SECONDS), so two tabs never get the same one. Every `refresh_every` answers the model is
refreshed in a background thread — the model loaded from --model, then `update` with every label
so far (methods tagged `update` add the examples; the others refit on them) — and the queue of
suggestions is recomputed with its scores. The token and limits are `vlclassify serve`'s (app.py).
"""

from __future__ import annotations

import csv
import dataclasses
import hmac
import io
import logging
import os
import threading
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from ..context import RunContext
from ..data.items import Dataset, Item
from ..data.source import FileSource
from ..errors import ConfigError, DataError, VLClassifyError
from ..features import FeatureCache
from ..suggest import auto_strategy, choose, item_name, labelled_by_model, model_scores, pool_embeddings
from ..utils import atomic_path
from .app import PAGE_CSP, TOKEN_COOKIE, Guard, Metrics, ServeConfig, _http_error, _refused, check_bind

if TYPE_CHECKING:
    from ..backbones.base import Backbone
    from ..methods.base import Method

log = logging.getLogger("vlclassify.label")
LEASE_SECONDS = 600.0  # an image shown to a tab is kept from the others this long (or until answered)
QUEUE = 20  # suggestions computed at once (more when refresh_every is larger)
IMAGE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".bmp": "image/bmp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
}


class LabelSession:
    """One labelling job: the pool and its embeddings, the classes, labels.csv, the leases and the model."""

    def __init__(
        self,
        pool: Dataset,
        classes: Sequence[str],
        labels_path: str | os.PathLike[str],
        *,
        model_dir: str | os.PathLike[str] | None = None,
        multilabel: bool | None = None,
        refresh_every: int = 10,
        budget: int | None = None,
        strategy: str = "auto",
        seed: int = 1,
        ctx: RunContext | None = None,
        backbone: Backbone | None = None,
    ) -> None:
        from ..methods import load_method

        not_files = [it for it in pool.items if not isinstance(it.image, FileSource)]
        if not_files:
            raise DataError(
                f"{pool.name}: item {not_files[0].key} is not an image file; the page labels files "
                "(write the data out first: vlclassify data export)"
            )
        if len(set(classes)) < 2:
            raise DataError(f"label: need at least 2 classes, got {list(classes)}")
        if refresh_every < 1:
            raise ConfigError(f"--refresh-every must be at least 1, got {refresh_every}")
        self.pool, self.classes = pool, list(classes)
        self.path = Path(labels_path)
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.ctx = ctx or RunContext()
        self.method: Method | None = load_method(self.model_dir) if self.model_dir else None
        if self.method is not None:
            missing = [c for c in self.classes if c not in self.method.classnames]
            if missing:  # the page's classes the model lacks join it by name (update), as new classes do
                self.method.update(classes=missing, ctx=self._quiet())
        self.multilabel = bool(self.method.multilabel) if multilabel is None and self.method else bool(multilabel)
        self.refresh_every, self.strategy, self.seed = refresh_every, strategy, seed
        self.budget = budget or len(pool)
        self.names = [item_name(it) for it in pool.items]
        self.index = {nm: i for i, nm in enumerate(self.names)}
        self.pretrained = labelled_by_model(self.model_dir) if self.model_dir else set()
        self.lock = threading.RLock()
        self.rows: list[tuple[str, list[str]]] = self._read_labels()
        self.labelled = np.array([nm in self.pretrained for nm in self.names], dtype=bool)
        for nm, _ in self.rows:
            if nm in self.index:
                self.labelled[self.index[nm]] = True
        self.skipped = np.zeros(len(pool), dtype=bool)
        self.leases: dict[int, tuple[str, float]] = {}  # pool row -> (tab, expiry)
        self.undo: dict[str, list[str]] = {}  # tab -> the images it answered, last last
        self.queue: list[int] = []
        self.rounds = 0
        self.since_refresh = 0
        self.refreshing = False
        self.model_status: dict[str, Any] = {"examples": 0, "refreshes": 0, "how": "as loaded", "error": None}
        self.emb = pool_embeddings(
            backbone or (self.method.backbone if self.method else _default_backbone()), pool, self.ctx
        )
        self.probs = model_scores(self.method, pool, self._quiet()) if self.method else None
        self._fill_queue()
        self.pending = False  # labels came in during a refresh: refresh again when it ends
        if self.rows:  # a resumed session: the model catches up with labels.csv
            self._request_refresh()

    def _quiet(self, own_store: bool = False) -> RunContext:
        """The session's run options without progress bars (model calls behind the page); own_store:
        a store opened anew, for another thread (the store's SQLite index belongs to its opener's)."""
        cache = self.ctx.cache
        if own_store:
            cache = FeatureCache(cache.root, cache.enabled) if cache is not None else FeatureCache()
        return dataclasses.replace(self.ctx, progress=False, cache=cache)

    # ---- labels.csv ------------------------------------------------------------------------------
    @property
    def column(self) -> str:
        """The manifest's label column: `labels` (several per image) or `label`."""
        return "labels" if self.multilabel else "label"

    def _read_labels(self) -> list[tuple[str, list[str]]]:
        """The rows of an existing labels.csv (a torn last line, from a crash mid-write, is dropped)."""
        if not self.path.exists():
            with atomic_path(self.path) as tmp:
                tmp.write_text(f"image,{self.column}\n", encoding="utf-8")
            return []
        raw = self.path.read_bytes()
        if raw and not raw.endswith(b"\n"):
            keep = raw[: raw.rfind(b"\n") + 1]
            with atomic_path(self.path) as tmp:
                tmp.write_bytes(keep)
            log.warning("%s: dropped a torn last line (an answer cut off mid-write)", self.path)
            raw = keep
        reader = csv.DictReader(io.StringIO(raw.decode("utf-8")))
        if reader.fieldnames != ["image", self.column]:
            raise DataError(
                f"{self.path}: expected the columns image,{self.column}, found {','.join(reader.fieldnames or [])}"
            )
        rows = []
        for line, r in enumerate(reader, start=2):
            names = [n.strip() for n in (r[self.column] or "").split(";") if n.strip()]
            unknown = [n for n in names if n not in self.classes]
            if unknown or not names:
                raise DataError(
                    f"{self.path}:{line}: label {unknown[0] if unknown else ''!r} is not one of the classes"
                )
            rows.append((os.path.abspath(r["image"]), names))
        return rows

    def _append(self, name: str, labels: list[str]) -> None:
        """One row, on disk before the answer is acknowledged."""
        value = ";".join(labels) + (";" if self.multilabel and len(labels) == 1 else "")  # "a;" stays one name
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow([name, value])
        with open(self.path, "a", encoding="utf-8", newline="") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())

    def _rewrite(self) -> None:
        with atomic_path(self.path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["image", self.column])
            for name, labels in self.rows:
                w.writerow([name, ";".join(labels) + (";" if self.multilabel and len(labels) == 1 else "")])

    # ---- suggestions ------------------------------------------------------------------------------
    def _fill_queue(self) -> None:
        """The next suggestions, from the current model's scores; leased and skipped rows are left out."""
        taken = self.labelled | self.skipped
        for i in self.leases:
            taken[i] = True
        learnt = self.method is not None and self.method.trains_on_images
        strategy = self.strategy
        if strategy == "auto":
            strategy = auto_strategy(int(self.labelled.sum()), len(self.classes), learnt)
        if strategy in ("margin", "entropy") and self.probs is None:
            strategy = "typical"
        n = max(QUEUE, self.refresh_every)
        self.queue = choose(self.emb, taken, n, strategy, self.probs, self.seed * 1000 + self.rounds, self.multilabel)
        self.rounds += 1

    def _order(self, i: int) -> tuple[list[str], str | None]:
        """The classes, the model's likeliest first (as given without a model), and its guess."""
        if self.probs is None or self.method is None:
            return list(self.classes), None
        p = dict(zip(self.method.classnames, self.probs[i].tolist()))
        order = sorted(self.classes, key=lambda c: -p.get(c, 0.0))
        return order, order[0]

    def progress_info(self) -> dict[str, Any]:
        """Labelled / budget and the count of each class (this labels.csv)."""
        counts = {c: 0 for c in self.classes}
        for _, labels in self.rows:
            for c in labels:
                counts[c] += 1
        return {"labelled": len(self.rows), "budget": self.budget, "counts": counts, "pool": len(self.pool)}

    def next(self, tab: str) -> dict[str, Any]:
        """The image this tab should label now: the one it holds, else the next free suggestion."""
        with self.lock:
            now = time.monotonic()
            self.leases = {i: (t, exp) for i, (t, exp) in self.leases.items() if exp > now}
            if len(self.rows) >= self.budget:
                return {"done": True, "progress": self.progress_info()}
            held = [i for i, (t, _) in self.leases.items() if t == tab]
            i = held[0] if held else self._free()
            if i is None:
                return {"done": True, "progress": self.progress_info()}
            self.leases[i] = (tab, now + LEASE_SECONDS)
            order, guess = self._order(i)
            return {
                "id": i,
                "image": f"/image/{i}",
                "name": os.path.basename(self.names[i]),
                "classes": order,
                "guess": guess,
                "multilabel": self.multilabel,
                "progress": self.progress_info(),
            }

    def _free(self) -> int | None:
        for _ in range(2):  # the queue, then once more after recomputing it
            for i in self.queue:
                if not (self.labelled[i] or self.skipped[i] or i in self.leases):
                    return i
            self._fill_queue()
        return None

    def _check_lease(self, tab: str, i: int) -> None:
        if not 0 <= i < len(self.pool):
            raise DataError(f"id {i} is not a pool image (0..{len(self.pool) - 1})")
        holder = self.leases.get(i)
        if holder is None or holder[0] != tab:
            raise DataError(f"image {i} is not leased to this tab (expired, or answered elsewhere): ask for the next")

    def answer(self, tab: str, i: int, labels: Sequence[str]) -> dict[str, Any]:
        """Record labels for image `i` (leased to `tab`): its row is on disk when this returns."""
        labels = list(dict.fromkeys(labels))
        unknown = [c for c in labels if c not in self.classes]
        if unknown:
            raise DataError(f"label {unknown[0]!r} is not one of the classes")
        if not labels or (not self.multilabel and len(labels) != 1):
            raise DataError(f"give {'one or more labels' if self.multilabel else 'exactly one label'}, got {labels}")
        with self.lock:
            self._check_lease(tab, i)
            name = self.names[i]
            self._append(name, labels)
            self.rows.append((name, labels))
            self.labelled[i] = True
            del self.leases[i]
            self.undo.setdefault(tab, []).append(name)
            self.since_refresh += 1
            if self.since_refresh >= self.refresh_every:
                self.since_refresh = 0
                self._request_refresh()
            return {"ok": True, "progress": self.progress_info()}

    def skip(self, tab: str, i: int) -> dict[str, Any]:
        """Not this image, this session."""
        with self.lock:
            self._check_lease(tab, i)
            self.skipped[i] = True
            del self.leases[i]
            return {"ok": True}

    def take_back(self, tab: str) -> dict[str, Any]:
        """Undo this tab's last answer: its row leaves labels.csv and the image is this tab's next."""
        with self.lock:
            names = self.undo.get(tab) or []
            if not names:
                raise DataError("nothing to undo in this tab")
            name = names.pop()
            last = max(k for k, (nm, _) in enumerate(self.rows) if nm == name)
            del self.rows[last]
            self._rewrite()
            i = self.index[name]
            self.labelled[i] = False
            for j, (t, _) in list(self.leases.items()):
                if t == tab:
                    del self.leases[j]
            self.leases[i] = (tab, time.monotonic() + LEASE_SECONDS)
            self.since_refresh = max(0, self.since_refresh - 1)
            return {"ok": True, "id": i}

    # ---- the model ----------------------------------------------------------------------------
    def labelled_dataset(self) -> Dataset:
        """Every answer so far as a Dataset over the page's classes (pool items keep their keys)."""
        from ..data.source import file_key

        cidx = {c: k for k, c in enumerate(self.classes)}
        items = []
        for name, labels in self.rows:
            base = self.pool.items[self.index[name]] if name in self.index else None
            if base is None:
                if not os.path.isfile(name):
                    continue  # a row of an earlier pool whose file is gone: it cannot teach the model
                base = Item(image=name, key=file_key(name), origin=str(self.path))
            ids = [cidx[c] for c in labels]
            items.append(
                dataclasses.replace(base, labels=tuple(ids))
                if self.multilabel
                else dataclasses.replace(base, label=ids[0])
            )
        return Dataset(items=items, classnames=list(self.classes), name=self.path.name, multilabel=self.multilabel)

    def _request_refresh(self) -> None:
        """Refresh the model in the background (once more after the running refresh, if one runs)."""
        if self.model_dir is None:
            return
        if self.refreshing:
            self.pending = True
            return
        self.refreshing = True
        threading.Thread(target=self._refresh_loop, name="vlclassify-refresh", daemon=True).start()

    def _refresh_loop(self) -> None:
        while True:
            self.refresh()
            with self.lock:
                if not self.pending:
                    self.refreshing = False
                    return
                self.pending = False

    def refresh(self) -> None:
        """The --model, updated with every label so far; then new scores and a new queue (a failure
        keeps the previous model and is reported by /model)."""
        from ..methods import load_method

        assert self.model_dir is not None
        ctx = self._quiet(own_store=True)
        try:
            with self.lock:
                data = self.labelled_dataset()
            m = load_method(self.model_dir)
            t0 = time.perf_counter()
            m.update(data, classes=self.classes, ctx=ctx)
            probs = model_scores(m, self.pool, ctx)
            with self.lock:
                self.method, self.probs = m, probs
                self.model_status = {
                    "examples": len(data),
                    "refreshes": self.model_status["refreshes"] + 1,
                    "how": m.fit_info.get("update", {}).get("how", "updated"),
                    "seconds": round(time.perf_counter() - t0, 2),
                    "error": None,
                }
                self._fill_queue()
        except Exception as e:  # noqa: BLE001 - a background thread: logged, and reported by /model
            if isinstance(e, VLClassifyError):
                log.warning("model refresh failed: %s", e)
            else:
                log.exception("model refresh failed")
            with self.lock:
                self.model_status = {**self.model_status, "error": str(e).splitlines()[0]}

    def model_info(self) -> dict[str, Any]:
        """What /model answers: the model the suggestions follow and what it learnt from this page."""
        with self.lock:
            m = self.method
            return {
                "method": m.name if m else None,
                "classes": m.classnames if m else self.classes,
                "refreshing": self.refreshing,
                "refresh_every": self.refresh_every,
                **self.model_status,
            }


def _default_backbone() -> Backbone:
    from ..backbones import create_backbone

    return create_backbone("effnet-minilm")


# ---- the app ------------------------------------------------------------------------------------
def create_label_app(session: LabelSession, config: ServeConfig | None = None) -> Starlette:
    """The ASGI app of a labelling session (routes: the module docstring); the Guard of `serve`."""
    from starlette.middleware import Middleware

    config = config or ServeConfig()
    assets = {
        name: (resources.files(__package__).joinpath(name).read_bytes(), kind)
        for name, kind in (
            ("label.html", "text/html; charset=utf-8"),
            ("label.js", "text/javascript; charset=utf-8"),
            ("label.css", "text/css; charset=utf-8"),
        )
    }

    def asset(name: str) -> Response:
        body, kind = assets[name]
        return Response(
            body, media_type=kind, headers={"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff"}
        )

    def page(request: Request) -> Response:
        if "token" in request.query_params:  # the sign-in, as `serve`'s page: a cookie, then the bare URL
            given, token = request.query_params["token"], config.token
            resp = RedirectResponse("/", status_code=303)
            if token and hmac.compare_digest(given.encode(), token.encode()):
                resp.set_cookie(TOKEN_COOKIE, given, httponly=True, samesite="strict")
            return resp
        return asset("label.html")

    async def body(request: Request) -> dict[str, Any]:
        try:
            data = await request.json()
        except ValueError:
            raise DataError("the request body must be a JSON object") from None
        if not isinstance(data, dict) or not isinstance(data.get("tab"), str) or not data["tab"]:
            raise DataError("the request body must be a JSON object with a 'tab' string")
        return data

    def ident(data: dict[str, Any]) -> int:
        if not isinstance(data.get("id"), int):
            raise DataError("'id' must be an integer (the image's pool index)")
        return int(data["id"])

    async def next_(request: Request) -> Response:
        data = await body(request)
        return JSONResponse(session.next(data["tab"]))

    async def answer(request: Request) -> Response:
        data = await body(request)
        labels = data.get("labels")
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise DataError("'labels' must be a list of class names")
        return JSONResponse(session.answer(data["tab"], ident(data), labels))

    async def skip(request: Request) -> Response:
        data = await body(request)
        return JSONResponse(session.skip(data["tab"], ident(data)))

    async def undo(request: Request) -> Response:
        data = await body(request)
        return JSONResponse(session.take_back(data["tab"]))

    def image(request: Request) -> Response:
        i = request.path_params["id"]
        if not 0 <= i < len(session.pool):
            raise HTTPException(404, f"no pool image {i}")
        source = session.pool.items[i].image
        assert isinstance(source, FileSource)  # the session takes image files only
        path = source.path
        kind = IMAGE_TYPES.get(Path(path).suffix.lower(), "application/octet-stream")
        return FileResponse(path, media_type=kind, headers={"X-Content-Type-Options": "nosniff"})

    def state(request: Request) -> Response:
        with session.lock:
            return JSONResponse(
                {
                    "classes": session.classes,
                    "multilabel": session.multilabel,
                    "labels_file": str(session.path),
                    "progress": session.progress_info(),
                    "model": session.model_info(),
                }
            )

    routes = [
        Route("/", page, methods=["GET"]),
        Route("/label.js", lambda r: asset("label.js"), methods=["GET"]),
        Route("/label.css", lambda r: asset("label.css"), methods=["GET"]),
        Route("/healthz", lambda r: JSONResponse({"status": "ok"}), methods=["GET"]),
        Route("/state", state, methods=["GET"]),
        Route("/model", lambda r: JSONResponse(session.model_info()), methods=["GET"]),
        Route("/image/{id:int}", image, methods=["GET"]),
        Route("/next", next_, methods=["POST"]),
        Route("/answer", answer, methods=["POST"]),
        Route("/skip", skip, methods=["POST"]),
        Route("/undo", undo, methods=["POST"]),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(Guard, config=config, metrics=Metrics())],
        # `serve`'s error shape: one JSON line {code, message, detail}
        exception_handlers={VLClassifyError: _refused, HTTPException: _http_error},  # type: ignore[dict-item]
    )


def label(
    session: LabelSession,
    host: str = "127.0.0.1",
    port: int = 8001,
    config: ServeConfig | None = None,
    insecure: bool = False,
    log_level: str = "info",
) -> None:
    """Serve the labelling page with uvicorn until interrupted (a token beyond loopback, as `serve`)."""
    import uvicorn

    config = config or ServeConfig()
    check_bind(host, config.token, insecure)
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), format="%(message)s")
    log.info(
        "labelling %d images into %s on http://%s:%d%s",
        len(session.pool),
        session.path,
        host,
        port,
        " (token required)" if config.token else "",
    )
    uvicorn.run(
        create_label_app(session, config),
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        timeout_keep_alive=5,
    )
