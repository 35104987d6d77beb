"""The container's HEALTHCHECK: GET /healthz of the service in this container (exit 0 if 200).

Standard library only. The port is FHIR_LEUKO_SERVICE_PORT (default 8080), as ``serve`` reads it.
Kubernetes ignores HEALTHCHECK and uses the Deployment's probes (examples/deploy/kubernetes/).
"""

import os
import sys
import urllib.request

port = os.environ.get("FHIR_LEUKO_SERVICE_PORT", "8080")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as response:  # noqa: S310
        sys.exit(0 if response.status == 200 else 1)
except OSError as exc:
    print(f"healthcheck: {exc}", file=sys.stderr)  # noqa: T201
    sys.exit(1)
