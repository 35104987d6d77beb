"""The CDS Hooks 2.0 service of fhir-leuko (``fhir-leuko serve``): patient-view, order-select,
order-sign and feedback on the same rule core as the scheduled job.

Needs the ``service`` extra (``pip install 'fhir-leuko[service]'``). It may import
:mod:`fhir_leuko.core`, :mod:`fhir_leuko.files`, :mod:`fhir_leuko.fhir`,
:mod:`fhir_leuko.configfile` and :mod:`fhir_leuko.errors`; it must not import the job or the CLI,
and nothing but the CLI imports it. Documentation: docs/cds-hooks.md.

Example::

    from fhir_leuko.service import create_app, load_settings
    app = create_app(load_settings(Path("service.toml")))   # an ASGI app: uvicorn.run(app)
"""

from .app import create_app
from .settings import ServiceSettings, load_settings

__all__ = ["ServiceSettings", "create_app", "load_settings"]
