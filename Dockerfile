# edge-agent station daemon. Build: docker build -t edge-agent .
# Run:   docker run --rm -v /etc/edge-agent:/etc/edge-agent:ro -v edge-agent-state:/var/lib/edge-agent edge-agent
FROM python:3.11-slim

# libusb for NFC readers on USB (nfcpy); nothing is installed at run time.
RUN apt-get update && apt-get install -y --no-install-recommends libusb-1.0-0 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /var/lib/edge-agent --create-home edge-agent

WORKDIR /opt/edge-agent
COPY pyproject.toml README.md ./
COPY edge_agent ./edge_agent
COPY firmware_profiles ./firmware_profiles
COPY config ./config
# A default config that validates as shipped: profiles and keys beside it in /etc/edge-agent.
RUN pip install --no-cache-dir '.[nfc,opcua]' && mkdir -p /etc/edge-agent \
    && cp -r config/keys firmware_profiles /etc/edge-agent/ \
    && sed 's#\.\./firmware_profiles/#firmware_profiles/#' config/station.example.yaml > /etc/edge-agent/station.yaml \
    && echo 'health: {listen: 127.0.0.1:9410}' >> /etc/edge-agent/station.yaml \
    && edge-agent check-config -c /etc/edge-agent/station.yaml

USER edge-agent
ENV PYTHONUNBUFFERED=1
# The daemon's own verdict (GET /healthz): needs `health: {listen: 127.0.0.1:9410}` in the config
# (the image's default config has it; add it to yours).
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["edge-agent", "health", "--listen", "127.0.0.1:9410"]
# JSON logs on stdout/stderr for the container runtime.
ENTRYPOINT ["edge-agent"]
CMD ["run", "-c", "/etc/edge-agent/station.yaml", "--log-format", "json"]
