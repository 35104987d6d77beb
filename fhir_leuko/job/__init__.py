"""The scheduled job (``fhir-leuko run`` and ``watch``): one pass finds the patients whose labs or
medications changed on a FHIR server, fetches what the profiles need, evaluates them with the rule
core and writes DetectedIssues back exactly once; its configuration (``[fhir]``, ``[auth]``,
``[run]``, ``[state]``) and its SQLite state (watermark, ledgers, lock). It may import
:mod:`fhir_leuko.core`, :mod:`fhir_leuko.files`, :mod:`fhir_leuko.fhir`,
:mod:`fhir_leuko.configfile` and :mod:`fhir_leuko.errors`; it must not import the service or the
CLI. Documentation: docs/scheduled-job.md.
"""

from .config import JobConfig, build_auth, load_job_config
from .runner import Job, JobOptions, Mode, PassReport
from .state import State, default_state_path

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
