# mcp-authproxy in a container: the proxy binds 0.0.0.0 inside, the admin port serves
# the health check. Build: docker build -t mcp-authproxy .
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY proxy ./proxy
RUN pip install --no-cache-dir -c constraints.txt . && useradd -m --uid 10001 proxy
USER proxy
ENV MCP_AUTHPROXY_HOST=0.0.0.0 MCP_AUTHPROXY_PORT=8080 \
    MCP_AUTHPROXY_STATE_DIR=/home/proxy/state
EXPOSE 8080 9090
HEALTHCHECK --interval=30s --timeout=3s \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2).status != 200)"
ENTRYPOINT ["mcp-authproxy", "run", "--admin-port", "9090"]
