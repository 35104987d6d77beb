# syntax=docker/dockerfile:1
# fhir-leuko's container image: the CDS Hooks service (default command) and the scheduled job.
#   docker build -t fhir-leuko:0.1.0 .
#   docker run --rm -p 8080:8080 -v "$PWD/service.toml:/etc/fhir-leuko/service.toml:ro" \
#       fhir-leuko:0.1.0 serve --config /etc/fhir-leuko/service.toml --host 0.0.0.0
#   docker run --rm -v fhir-leuko-state:/var/lib/fhir-leuko fhir-leuko:0.1.0 run --server URL
# docs/deployment.md says more (image size, configuration, the Kubernetes examples).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: the wheel, and a venv with fhir-leuko and its service dependencies --------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE CHANGELOG.md ./
COPY fhir_leuko ./fhir_leuko
COPY profiles ./profiles
COPY container/install.sh /usr/local/bin/fhir-leuko-install
# pip builds the wheel in an isolated environment (hatchling), which stays in this stage.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist /src \
 && fhir-leuko-install /opt/fhir-leuko /dist/fhir_leuko-*.whl service,postgres

# --- final: the venv only; no compiler, no pip, no build backend; a user without a login ----------
FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 fhir-leuko \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/fhir-leuko --no-create-home \
      --shell /usr/sbin/nologin fhir-leuko \
 && mkdir -p /var/lib/fhir-leuko /etc/fhir-leuko \
 && chown 10001:10001 /var/lib/fhir-leuko
COPY --from=build /opt/fhir-leuko /opt/fhir-leuko
COPY container/healthcheck.py /opt/fhir-leuko/healthcheck.py
ENV PATH=/opt/fhir-leuko/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FHIR_LEUKO_STATE_DIR=/var/lib/fhir-leuko
USER 10001:10001
WORKDIR /var/lib/fhir-leuko
VOLUME ["/var/lib/fhir-leuko"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "/opt/fhir-leuko/healthcheck.py"]
ENTRYPOINT ["fhir-leuko"]
CMD ["serve", "--host", "0.0.0.0", "--log-format", "json"]
