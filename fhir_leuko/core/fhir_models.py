"""The one module that imports the full FHIR models (``fhir.resources``).

fhir.resources 7+ has no plain R4 package: R4 content lives in ``fhir.resources.R4B`` (its README;
R4B changed no element fhir-leuko writes). Every resource fhir-leuko *writes* is checked here before
it leaves the process. Input is not read through these models (see ``fhirjson``), and they do not
check coded values (fhir.resources README, "ENUM Validator"): the rule core checks those itself.
"""

from __future__ import annotations

from typing import Any

import pydantic
from fhir.resources.R4B import get_fhir_model_class

__all__ = ["InvalidResourceError", "check_resource"]


class InvalidResourceError(ValueError):
    """A resource fhir-leuko built does not conform to FHIR R4 (a bug, never user input)."""


def check_resource(resource: dict[str, Any]) -> dict[str, Any]:
    """Validate a resource against the FHIR R4 (R4B) model of its type and return it unchanged.

    Raises:
        InvalidResourceError: naming the resource type and the first error.
    """
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str):
        raise InvalidResourceError("resource without resourceType")
    model = get_fhir_model_class(rtype)
    try:
        model.model_validate(resource)
    except pydantic.ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidResourceError(f"{rtype}: {where}: {first['msg']}") from None
    return resource
