# The Discord bot on Debian bookworm with the CPU build of PyTorch (see README, "Docker").
#
#   docker build -t discord-chatbot .                                   # the bot (python -m bot)
#   docker build -t discord-chatbot:serve --build-arg WITH_SERVE=1 .    # plus Ray Serve, for python -m bot.serve
#
# No BuildKit feature is used, so the classic builder (docker without buildx) builds it too.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

# tini runs as PID 1: it hands SIGTERM (docker stop) to the bot, which then stops cleanly with exit
# code 0, and it reaps the processes Ray leaves behind in the model server.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates python3 python3-venv tini \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb

# Where PyTorch comes from: its CPU build by default (about 750 MB installed; the wheel PyPI serves on
# Linux is the CUDA one, which pulls several GB of NVIDIA libraries). TORCH_FIND_LINKS, when set, is a
# page listing the wheel instead, such as a local wheel directory served over HTTP
# (`python3 -m http.server -d /opt/wheels` and `--network host --build-arg TORCH_FIND_LINKS=http://127.0.0.1:8000/`).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_FIND_LINKS=
# The index for every other package: PyPI unless set (a mirror), and extra indexes (space-separated);
# used by the build only.
ARG INDEX_URL=
ARG EXTRA_INDEX_URL=
# A CA bundle (its URL) for pip to trust during the build, on a network that inspects TLS; not kept.
ARG PIP_CERT_URL=
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY requirements.txt requirements-serve.txt /tmp/requirements/
# pip's settings for the build (not kept in the image): the indexes, and the CA bundle when one is given.
# torch first and alone (--no-deps: a wheel directory holds torch only), then the bot's runtime
# requirements (requirements.txt above its "# Tests and benchmarks" section), which also bring torch's
# own dependencies; the installed +cpu build already satisfies torch==2.13.0. `pip check` proves
# nothing is missing.
RUN set -eu; \
    python3 -m venv /opt/venv; \
    index="${INDEX_URL:+--index-url $INDEX_URL}"; \
    for url in $EXTRA_INDEX_URL; do index="$index --extra-index-url $url"; done; \
    if [ -n "$PIP_CERT_URL" ]; then \
        python -c "import sys, urllib.request; urllib.request.urlretrieve(*sys.argv[1:])" "$PIP_CERT_URL" /tmp/pip-ca.pem; \
        export PIP_CERT=/tmp/pip-ca.pem; \
    fi; \
    if [ -n "$TORCH_FIND_LINKS" ]; then \
        pip install --no-deps --no-index --find-links "$TORCH_FIND_LINKS" "torch==$TORCH_VERSION"; \
    else \
        pip install --no-deps --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"; \
    fi; \
    sed '/^# Tests and benchmarks/,$d' /tmp/requirements/requirements.txt > /tmp/requirements/runtime.txt; \
    pip install $index -r /tmp/requirements/runtime.txt; \
    pip check; \
    python -c "import torch; assert not torch.version.cuda, 'not the CPU build of torch'"; \
    rm -f /tmp/pip-ca.pem

# 1: also install requirements-serve.txt (Ray Serve, FastAPI) for the model server, python -m bot.serve.
# Declared here, so that both images share the layers above.
ARG WITH_SERVE=0
RUN set -eu; \
    if [ "$WITH_SERVE" = 1 ]; then \
        index="${INDEX_URL:+--index-url $INDEX_URL}"; \
        for url in $EXTRA_INDEX_URL; do index="$index --extra-index-url $url"; done; \
        if [ -n "$PIP_CERT_URL" ]; then \
            python -c "import sys, urllib.request; urllib.request.urlretrieve(*sys.argv[1:])" "$PIP_CERT_URL" /tmp/pip-ca.pem; \
            export PIP_CERT=/tmp/pip-ca.pem; \
        fi; \
        pip install $index -r /tmp/requirements/requirements-serve.txt; \
        pip check; \
        rm -f /tmp/pip-ca.pem; \
    fi; \
    rm -rf /tmp/requirements

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin bot \
    && mkdir -p /app/data /app/cache/huggingface \
    && chown -R bot:bot /app/data /app/cache

WORKDIR /app
COPY bot/ bot/
COPY cogs/ cogs/
COPY config/ config/
COPY serve.yaml ./

USER bot
# The history (HISTORY_DB's default, data/history.sqlite3, is /app/data/history.sqlite3 here) and the
# models downloaded on first start (about 1.5 GB for the default) outlive the container.
ENV HF_HOME=/app/cache/huggingface
VOLUME ["/app/data", "/app/cache/huggingface"]

# Liveness on /health when METRICS_PORT is set (in the environment or /app/.env, as the bot reads
# them); without it there is nothing to ask, and the check passes.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import os, urllib.request; from dotenv import dotenv_values; \
s = {**dotenv_values('.env'), **os.environ}; port = s.get('METRICS_PORT'); \
host = s.get('METRICS_HOST') or '127.0.0.1'; host = '127.0.0.1' if host == '0.0.0.0' else host; \
port and urllib.request.urlopen(f'http://{host}:{port}/health', timeout=4)"

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["python", "-m", "bot"]
