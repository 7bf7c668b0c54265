# drover and a Python WSGI app in one image (docs/deployment.md, "Containers").
#
#   docker build -t drover-app .
#   docker run --rm -p 8000:8000 drover-app
#
# Stage "drover" builds drover with the toolchain the repository pins
# (rust-version); stage "wheel" builds the drover-worker package
# (workers/python); the final stage is a slim Python image with drover, a
# virtualenv holding the package, and the app. Replace
# workers/python/examples/example_app.py with your app (and install its
# dependencies into the same virtualenv) and deploy/container/drover.toml
# with your config.

ARG RUST_VERSION=1.95
ARG PYTHON_VERSION=3.12

FROM rust:${RUST_VERSION}-slim-bookworm AS drover
WORKDIR /src
# The context as .dockerignore leaves it: the workspace, build.rs, sources.
COPY . .
RUN cargo build --release --locked -p drover --bin drover \
    && install -m 0755 target/release/drover /usr/local/bin/drover

FROM python:${PYTHON_VERSION}-slim-bookworm AS wheel
WORKDIR /src
COPY workers/python ./
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:${PYTHON_VERSION}-slim-bookworm
# A read-only root file system has nowhere to write bytecode; unbuffered
# output reaches `docker logs` / `kubectl logs` at once.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=drover /usr/local/bin/drover /usr/local/bin/drover
COPY --from=wheel /wheels /wheels
# The same layout as the systemd kit: the app in /srv/app, its virtualenv in
# /srv/app/.venv (drover-worker has no dependencies: nothing else to fetch).
RUN python -m venv /srv/app/.venv \
    && /srv/app/.venv/bin/pip install --no-cache-dir --no-index /wheels/*.whl \
    && rm -rf /wheels
COPY workers/python/examples/example_app.py /srv/app/
COPY deploy/container/drover.toml /etc/drover/drover.toml
# An unprivileged user; /run/drover holds the control socket (`drover ctl`).
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent app \
    && mkdir -p /run/drover \
    && chown app:app /run/drover
USER 10001:10001
WORKDIR /srv/app
# The app, and drover's admin endpoint (/livez, /readyz, /metrics).
EXPOSE 8000 9100
# drover is PID 1 and receives the signals itself (exec form, no shell):
# SIGTERM is its graceful staged shutdown, and as PID 1 it reaps orphans
# (`subreaper` is on by default when drover is PID 1).
STOPSIGNAL SIGTERM
# Health is the master's own verdict, the one /readyz gives: enough slots
# have a ready worker, and drover is not paused or stopping. `drover ctl
# ready` asks it on the control socket (the image has no curl, and a worker
# answering / says nothing of the others). The start period covers
# boot_timeout (30s); ctl's own --timeout ends before Docker's.
HEALTHCHECK --interval=10s --timeout=5s --start-period=40s --retries=3 \
    CMD ["/usr/local/bin/drover", "ctl", "-c", "/etc/drover/drover.toml", "--timeout", "4s", "ready"]
ENTRYPOINT ["/usr/local/bin/drover", "-c", "/etc/drover/drover.toml"]
