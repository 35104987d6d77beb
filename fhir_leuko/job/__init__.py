"""The scheduled job (``fhir-leuko run`` and ``watch``): one pass finds the patients whose labs or
medications changed on a FHIR server, fetches what the profiles need, evaluates them with the rule
core and writes DetectedIssues back exactly once; its configuration (``[fhir]``, ``[auth]``,
``[run]``, ``[state]``) and its SQLite state (watermark, ledgers, lock). It may import
:mod:`fhir_leuko.core`, :mod:`fhir_leuko.files`, :mod:`fhir_leuko.fhir`,
:mod:`fhir_leuko.configfile` and :mod:`fhir_leuko.errors`; it must not import the service or the
CLI. Documentation: docs/scheduled-job.md.
"""

from typing import TYPE_CHECKING

from ..lazyexports import lazy_exports

if TYPE_CHECKING:
    from .config import JobConfig, build_auth, load_job_config
    from .runner import Job, JobOptions, Mode, PassReport
    from .state import State, default_state_path

# Imported when first used: `evaluate` reads the configuration ([scale]) without the runner and
# the FHIR client it brings (fhir_leuko/lazyexports.py).
__getattr__ = lazy_exports(
    __name__,
    {
        "JobConfig": "config",
        "build_auth": "config",
        "load_job_config": "config",
        "Job": "runner",
        "JobOptions": "runner",
        "Mode": "runner",
        "PassReport": "runner",
        "State": "state",
        "default_state_path": "state",
    },
)

__all__ = [
    "Job",
    "JobConfig",
    "JobOptions",
    "Mode",
    "PassReport",
    "State",
    "build_auth",
    "default_state_path",
    "load_job_config",
]
