"""Talking to FHIR R4 servers: the REST client (paging, retries, ``Retry-After``, OperationOutcome
errors, conditional writes), its auth methods (basic, bearer, client credentials, SMART Backend
Services) and the R4 search parameters a request may send. A server's quirks are handled here, not
in the callers. It may import :mod:`fhir_leuko.core`, :mod:`fhir_leuko.files`,
:mod:`fhir_leuko.errors` and third-party libraries; it must not import the job, the service or the
CLI (they use it).
"""

from typing import TYPE_CHECKING

from ..lazyexports import lazy_exports

if TYPE_CHECKING:
    from .auth import BearerTokenAuth, ClientCredentialsAuth, SmartBackendAuth
    from .client import FhirClient, RetryPolicy, WriteResult
    from .r4search import check_search_params

# Imported when first used: fhir.privacy, which every command's logging uses, does not bring
# requests, PyJWT and cryptography with it (fhir_leuko/lazyexports.py).
__getattr__ = lazy_exports(
    __name__,
    {
        "BearerTokenAuth": "auth",
        "ClientCredentialsAuth": "auth",
        "SmartBackendAuth": "auth",
        "FhirClient": "client",
        "RetryPolicy": "client",
        "WriteResult": "client",
        "check_search_params": "r4search",
    },
)

__all__ = [
    "BearerTokenAuth",
    "ClientCredentialsAuth",
    "FhirClient",
    "RetryPolicy",
    "SmartBackendAuth",
    "WriteResult",
    "check_search_params",
]
