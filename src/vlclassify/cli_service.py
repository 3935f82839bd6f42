"""The service and the labelling loop (`vlclassify serve`, `suggest`, `label`): many operator options,
none of the workflow, kept apart from cli.py so that the library's commands stay short. Registered
on the main app by `register`; their modules are imported only when a command runs (cold start)."""

from __future__ import annotations

from pathlib import Path

import typer

from .cli_options import BACKBONE_OPT, CACHE_OPT, _backbone, _cache, console


def serve(
    model_dir: Path = typer.Argument(..., help="A folder written by `vlclassify fit`."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; beyond loopback a --token is required."),
    port: int = typer.Option(8000, help="TCP port."),
    token: str | None = typer.Option(
        None, envvar="VLCLASSIFY_TOKEN", help="Require 'Authorization: Bearer TOKEN' on every route but /healthz."
    ),
    insecure: bool = typer.Option(False, "--insecure", help="Allow a non-loopback --host without a token."),
    max_batch: int = typer.Option(32, min=1, help="Most images in one forward pass (1 = no micro-batching)."),
    max_wait_ms: float = typer.Option(5.0, min=0, help="How long a batch waits for more requests (ms)."),
    queue_size: int = typer.Option(128, min=1, help="Images waiting at most; more are refused with 503."),
    max_bytes: int = typer.Option(20 * 2**20, min=1, help="Largest request body in bytes (413)."),
    max_pixels: int = typer.Option(40_000_000, min=1, help="Largest image, width x height (413, never decoded)."),
    max_images: int = typer.Option(32, min=1, help="Images in one /predict/batch call."),
    timeout: float = typer.Option(30.0, min=0.001, help="Seconds a request may take, upload included (504)."),
    decode_workers: int = typer.Option(2, min=1, help="Threads decoding uploaded images."),
    workers: int | None = typer.Option(
        None, min=1, help="Processes serving the model, sharing the port and the cores (default: the cores)."
    ),
    allowed_hosts: str | None = typer.Option(
        None,
        help="Comma-separated Host header names answered, '*' for any "
        "(default: the --host address, localhost, 127.0.0.1, ::1; any for 0.0.0.0 / ::).",
    ),
    max_aspect: float = typer.Option(20.0, min=1, help="Largest side ratio of an image (413)."),
    pixels_in_flight: int = typer.Option(
        80_000_000, min=1, help="Pixels being decoded at once, all requests together (more wait their turn)."
    ),
    max_requests: int = typer.Option(256, min=1, help="Requests in progress at once; more get 503 + Retry-After."),
    max_connections: int = typer.Option(1000, min=1, help="Open sockets per worker; more get 503 and are closed."),
    header_timeout: float = typer.Option(
        10.0, min=0.001, help="Seconds a connection has to send a request's headers (then it is closed)."
    ),
    log_level: str = typer.Option("info", help="uvicorn and service log level."),
    precision: str = typer.Option(
        "fp32", help="fp32, or int8: an exported model's trunk quantised (see docs/benchmarks.md for when it pays)."
    ),
) -> None:
    """Serve a fitted model over HTTP: /predict, /predict/batch, /explain, a web page at /, /metrics."""
    from .features.runtime import cpu_count
    from .serve import BatchConfig, ServeConfig
    from .serve import serve as run_server
    from .serve.app import default_hosts
    from .serve.protocol import ConnectionLimits

    hosts = tuple(h.strip().lower() for h in allowed_hosts.split(",") if h.strip()) if allowed_hosts else None
    config = ServeConfig(
        token=token or None,
        max_bytes=max_bytes,
        max_pixels=max_pixels,
        max_images=max_images,
        timeout=timeout,
        decode_workers=decode_workers,
        max_aspect=max_aspect,
        pixels_in_flight=pixels_in_flight,
        max_requests=max_requests,
        allowed_hosts=hosts if hosts is not None else default_hosts(host),
        batching=BatchConfig(max_batch=max_batch, max_wait_ms=max_wait_ms, queue_size=queue_size),
        connections=ConnectionLimits(header_timeout=header_timeout, max_connections=max_connections),
        precision=precision,
    )
    run_server(
        str(model_dir),
        host=host,
        port=port,
        config=config,
        insecure=insecure,
        log_level=log_level,
        workers=workers or cpu_count(),
    )


def label(
    pool: str = typer.Option(..., "--pool", help="Unlabelled images: a folder or any data spec of image files."),
    classes: str = typer.Option(..., "--classes", help="Classes as 'a,b,c' or a file with one a line."),
    labels: Path = typer.Option(
        ..., "--labels", help="labels.csv: each answer is appended at once; reopening resumes."
    ),
    model: Path | None = typer.Option(
        None, "--model", help="A fitted model: orders the buttons, refreshed as you label."
    ),
    refresh_every: int = typer.Option(10, min=1, help="Refresh the model (update, else refit) every K labels."),
    budget: int | None = typer.Option(None, min=1, help="Labels to collect (default: the whole pool)."),
    multilabel: bool = typer.Option(
        False, "--multi-label", help="Several classes per image (toggles); default: the model's."
    ),
    strategy: str = typer.Option(
        "auto", help="Which image next: auto | typical | margin | entropy | coreset | random."
    ),
    seed: int = typer.Option(1, help="Seed of the suggestions."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; beyond loopback a --token is required."),
    port: int = typer.Option(8001, help="TCP port."),
    token: str | None = typer.Option(None, envvar="VLCLASSIFY_TOKEN", help="Require this token (as `serve`)."),
    insecure: bool = typer.Option(False, "--insecure", help="Allow a non-loopback --host without a token."),
    cache_dir: Path | None = CACHE_OPT,
) -> None:
    """A labelling page: the next image worth labelling, the classes as buttons; answers go to --labels."""
    from .context import RunContext
    from .data.classes import parse_classes
    from .serve import ServeConfig
    from .serve.app import default_hosts
    from .serve.label import LabelSession
    from .serve.label import label as run_page
    from .suggest import load_pool

    session = LabelSession(
        load_pool(pool),
        parse_classes(classes)[0],
        labels,
        model_dir=model,
        multilabel=multilabel or None,
        refresh_every=refresh_every,
        budget=budget,
        strategy=strategy,
        seed=seed,
        ctx=RunContext(cache=_cache(cache_dir)),
    )
    config = ServeConfig(token=token or None, allowed_hosts=default_hosts(host))  # `serve`'s Host rule
    run_page(session, host=host, port=port, config=config, insecure=insecure)


def suggest(
    pool: str = typer.Option(..., "--pool", help="Unlabelled images: a folder or any data spec (labels ignored)."),
    n: int = typer.Option(..., "-n", min=1, help="How many images to suggest."),
    out: Path = typer.Option(..., "--out", "-o", help="CSV to write: image (then guess, score), best first."),
    model: Path | None = typer.Option(None, "--model", help="A fitted model: ranks by its doubt, guesses a class."),
    strategy: str = typer.Option("auto", help="auto | typical | margin | entropy | coreset | random."),
    seed: int = typer.Option(1, help="Seed (the same seed gives the same list)."),
    exclude: Path | None = typer.Option(None, "--exclude", help="A labels CSV: its images are never suggested."),
    backbone: str = BACKBONE_OPT,
    cache_dir: Path | None = CACHE_OPT,
) -> None:
    """Which images to label next (docs/labelling.md); the model's training images are never suggested."""
    from .context import RunContext
    from .suggest import suggest_to_csv

    bb = None if model else _backbone(backbone, [])
    rows = suggest_to_csv(
        pool,
        n,
        out,
        model_dir=model,
        exclude=exclude,
        strategy=strategy,
        seed=seed,
        ctx=RunContext(cache=_cache(cache_dir)),
        backbone=bb,
    )
    console.print(f"{len(rows)} image(s) to label ({rows[0].strategy if rows else strategy}) -> {out}", markup=False)


def register(app: typer.Typer) -> None:
    """Add the service's commands to the `vlclassify` app."""
    app.command()(serve)
    app.command()(suggest)
    app.command()(label)
