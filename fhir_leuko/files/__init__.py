"""Reading from disk: FHIR R4 JSON files, NDJSON (also gzipped), directories and Bulk Data exports
into the rule core, and the profile and knowledge documents (shipped and site directories). Every
file problem becomes a :class:`~fhir_leuko.core.model.Problem` that names the file and the position,
and reading goes on. It may import :mod:`fhir_leuko.core`, :mod:`fhir_leuko.errors` and third-party
libraries; it must not import the job, the service or the CLI (they use it), nor talk to a server.
"""

from .bulkread import normalise_paths
from .documents import load_knowledge, load_profiles, shipped_profiles_dir, validate_profile_dir
from .reader import expand_paths, read_file, read_paths

__all__ = [
    "expand_paths",
    "load_knowledge",
    "load_profiles",
    "normalise_paths",
    "read_file",
    "read_paths",
    "shipped_profiles_dir",
    "validate_profile_dir",
]
