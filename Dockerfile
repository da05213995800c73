# mcp-authproxy in a container. Build: docker build -t mcp-authproxy .
# (or scripts/build-image: buildah, no daemon, no registry needed). Run:
#   docker run -p 8080:8080 -e MCP_TOKEN mcp-authproxy --target-url https://mcp.example.com/mcp \
#       --bearer-token-env MCP_TOKEN --allowed-host <the name clients use>
# The proxy binds 0.0.0.0:8080 inside; the admin port (9090) binds 127.0.0.1 and serves
# the HEALTHCHECK. Build with --format docker: the OCI image format drops HEALTHCHECK.

# Any Debian-like base with python3 (3.11+) and its venv module: a registry's python
# image, or a local one (scripts/build-image makes one with debootstrap).
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY proxy ./proxy
# A venv: a distribution's Python refuses a system-wide pip install (PEP 668). The same
# install as the README's path: pinned by constraints.txt, with the uvloop extra and the
# redis extra (replicas: --store redis:// works in the stock image).
# The optional secret "pip-ca" is a CA bundle for pip behind a TLS-intercepting proxy
# (scripts/build-image passes the caller's $PIP_CERT); a secret leaves no trace in the image.
RUN --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && python3 -m venv /opt/mcp-authproxy \
 && /opt/mcp-authproxy/bin/pip install --no-cache-dir --disable-pip-version-check \
        --progress-bar off -c constraints.txt '.[uvloop,redis]'

FROM ${BASE}
COPY --from=build /opt/mcp-authproxy /opt/mcp-authproxy
# Not "proxy": Debian's base-passwd already defines a user of that name (uid 13).
RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin mcpproxy
# Numeric, so a runtime can check runAsNonRoot without reading /etc/passwd.
USER 10001:10001
WORKDIR /home/mcpproxy
ENV PATH=/opt/mcp-authproxy/bin:$PATH \
    MCP_AUTHPROXY_HOST=0.0.0.0 \
    MCP_AUTHPROXY_PORT=8080 \
    MCP_AUTHPROXY_STATE_DIR=/home/mcpproxy/state
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s --start-period=5s --retries=3 \
  CMD ["/opt/mcp-authproxy/bin/python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["/opt/mcp-authproxy/bin/mcp-authproxy", "run", "--admin-host", "127.0.0.1", "--admin-port", "9090"]
