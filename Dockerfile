# One image for every Chorus process: the command picks the service.
#   docker run IMAGE agent run /app/shared/chorus/examples/agents/researcher.yaml
#   docker run IMAGE coordinator | orchestrator | gateway | schema | ...
# docker-compose.yml runs the whole system from it; see deploy/README.md.

# --- build: a virtualenv holding the project and its dependencies -----------------------
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# The venv gets no pip of its own (the base image's pip installs into it with --python):
# the runtime image needs neither pip nor setuptools.
RUN python -m venv --without-pip /opt/venv

WORKDIR /src

# Dependencies first, from pyproject.toml alone, so editing the code does not re-download them.
# The `otel` extra too: the image exports traces once OTEL_EXPORTER_OTLP_ENDPOINT is set.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['otel']))" > /tmp/requirements.txt \
    && pip --python /opt/venv/bin/python install -r /tmp/requirements.txt

COPY README.md ./
COPY shared/ shared/
COPY services/ services/
RUN pip --python /opt/venv/bin/python install --no-deps .

# --- runtime -----------------------------------------------------------------------------
FROM python:3.11-slim

# No bytecode written at run time (the build compiled it); logs reach `docker logs` at once.
# The gateway must listen on every interface to be reachable through a published port.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CHORUS_GATEWAY_HOST=0.0.0.0

# A fixed numeric uid/gid, so orchestrators can verify "not root" (runAsNonRoot) and
# mounted files can be owned to match. --no-log-init keeps a sparse lastlog out of the layer.
RUN groupadd --gid 10001 chorus \
    && useradd --uid 10001 --gid 10001 --no-log-init --create-home --shell /usr/sbin/nologin chorus

COPY --from=build /opt/venv /opt/venv

# The example agent specs, at the same relative path as in a checkout, so
# `chorus agent run shared/chorus/examples/agents/researcher.yaml` works in both.
# Code and specs stay root-owned: the service user can read them, not change them.
WORKDIR /app
COPY shared/chorus/examples/ shared/chorus/examples/

USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["chorus"]
CMD ["--help"]
