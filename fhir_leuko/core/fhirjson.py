"""Lean, partial FHIR R4 structures for reading input fast.

Validating every input Observation through the full ``fhir.resources`` models runs at about 3k
Observations/s; decoding only the elements fhir-leuko uses, with msgspec, runs faster than merely
parsing the same bytes with orjson (unknown elements are skipped without building objects). The
rule core then checks what it uses itself: statuses, units, values (fhir.resources would not check
coded values anyway, see its README "ENUM Validator").

Only the resource types fhir-leuko reads are declared. Anything else decodes to ``None`` (ignored).
Elements are declared with their R4 JSON types (https://hl7.org/fhir/R4/json.html); an element with a
wrong JSON type makes the whole resource malformed, which the caller reports by resource and reason.
Elements fhir-leuko does not use (``category``, ``text`` …) are not declared, so real-world shape
variations there (e.g. ``category`` sent as an object) do no harm.

:func:`iter_document` turns one JSON document (a resource, or a Bundle flattened) into resources,
each with the :class:`Origin` it was read from. The bytes come from an edge (a file, a FHIR server
response, a CDS Hooks prefetch); nothing here does I/O.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any, NamedTuple, TypeVar

import msgspec
import orjson

from .model import Problem

__all__ = [
    "INPUT_TYPES",
    "R4_RESOURCE_TYPES",
    "RESOURCE_DECODER",
    "TOO_DEEP",
    "Bundle",
    "CodeableConcept",
    "Coding",
    "Component",
    "Condition",
    "DetectedIssue",
    "DiagnosticReport",
    "Flag",
    "MalformedResourceError",
    "Medication",
    "MedicationAdministration",
    "MedicationDispense",
    "MedicationRecord",
    "MedicationRequest",
    "MedicationStatement",
    "Meta",
    "Observation",
    "Origin",
    "Patient",
    "Period",
    "Quantity",
    "Reference",
    "Resource",
    "Sourced",
    "Unread",
    "bundle_entries",
    "convert_resource",
    "decode_any",
    "decode_json",
    "decode_resource",
    "iter_document",
    "malformed_document",
    "server_base",
]


class _Element(msgspec.Struct, omit_defaults=True, gc=False):
    """Base of datatypes: unknown JSON members are ignored."""


class Coding(_Element):
    system: str | None = None
    code: str | None = None
    display: str | None = None


class CodeableConcept(_Element):
    coding: list[Coding] = []
    text: str | None = None


class Quantity(_Element):
    # `system` is not declared: only UCUM codes are read, matched on the code itself.
    value: float | None = None
    comparator: str | None = None
    unit: str | None = None
    code: str | None = None


class Identifier(_Element):
    system: str | None = None
    value: str | None = None


class Reference(_Element):
    reference: str | None = None
    type: str | None = None
    # A logical reference (a subject given only by identifier): normalise/identity.py.
    identifier: Identifier | None = None
    display: str | None = None


class Period(_Element):
    start: str | None = None
    end: str | None = None


class Meta(_Element):
    versionId: str | None = None
    lastUpdated: str | None = None


class CodeOnly(_Element):
    """A Coding without its display: what an Observation's code and range type are matched on.

    Observations are read by the million, and the displays they carry (never used: matching is
    on the code, clinical.md §1) would each be a string to build.
    """

    system: str | None = None
    code: str | None = None


class CodedOnly(_Element):
    coding: list[CodeOnly] = []


class Range(_Element):
    low: Quantity | None = None
    high: Quantity | None = None


class ReferenceRange(_Element):
    # Only the low end is ever used (a low count is the question); `high` is skipped. `appliesTo`,
    # `age` and `text` choose the entry that applies to the patient (normalise, issue 13 §3).
    low: Quantity | None = None
    type: CodedOnly | None = None
    appliesTo: list[CodeableConcept] = []
    age: Range | None = None
    text: str | None = None


class TimingRepeat(_Element):
    boundsPeriod: Period | None = None


class Timing(_Element):
    repeat: TimingRepeat | None = None


class Dosage(_Element):
    timing: Timing | None = None


# A dispense's dose and frequency, declared apart from `Dosage` so that a MedicationRequest whose
# dose elements are oddly shaped is not made malformed by elements only dispenses use.
class DoseRepeat(_Element):
    # positiveInt in R4, read as a number: "2.0" must not make the dispense malformed.
    frequency: float | None = None
    period: float | None = None
    periodUnit: str | None = None


class DoseTiming(_Element):
    repeat: DoseRepeat | None = None


class DoseAndRate(_Element):
    doseQuantity: Quantity | None = None


class DispenseDosage(_Element):
    timing: DoseTiming | None = None
    # 0..* in R4; some systems send one object (as CDS Hooks sandboxes do): read both.
    doseAndRate: list[DoseAndRate] | DoseAndRate = []


class DispenseRequest(_Element):
    validityPeriod: Period | None = None


class Ingredient(_Element):
    itemCodeableConcept: CodeableConcept | None = None
    itemReference: Reference | None = None


class BundleLink(_Element):
    relation: str | None = None
    url: str | None = None


class BundleEntry(_Element):
    fullUrl: str | None = None
    # Kept raw: entries are decoded one by one, so one malformed entry loses only itself.
    resource: msgspec.Raw = msgspec.Raw()


class _Resource(_Element, tag_field="resourceType"):
    id: str | None = None
    meta: Meta | None = None
    # Kept raw for the same reason as Bundle entries; decoded on demand by the reader.
    contained: list[msgspec.Raw] = []


class Component(_Element):
    """An ``Observation.component``: a result of its own (a CBC sent as one Observation with WBC,
    ANC and the differential as components), with the Observation's subject, time, status and
    specimen. The elements a result reads are named as on Observation."""

    code: CodedOnly | None = None
    valueQuantity: Quantity | None = None
    valueString: str | None = None
    dataAbsentReason: CodeableConcept | None = None
    referenceRange: list[ReferenceRange] = []


class Observation(_Resource, tag="Observation"):
    status: str | None = None
    code: CodedOnly | None = None
    subject: Reference | None = None
    effectiveDateTime: str | None = None
    effectivePeriod: Period | None = None
    effectiveInstant: str | None = None
    valueQuantity: Quantity | None = None
    valueString: str | None = None
    dataAbsentReason: CodeableConcept | None = None
    referenceRange: list[ReferenceRange] = []
    specimen: Reference | None = None
    hasMember: list[Reference] = []
    component: list[Component] = []


class PatientLink(_Element):
    other: Reference | None = None
    type: str | None = None


class Patient(_Resource, tag="Patient"):
    identifier: list[Identifier] = []
    gender: str | None = None
    birthDate: str | None = None
    deceasedBoolean: bool | None = None
    deceasedDateTime: str | None = None
    link: list[PatientLink] = []


class Medication(_Resource, tag="Medication"):
    code: CodeableConcept | None = None
    ingredient: list[Ingredient] = []


class MedicationRequest(_Resource, tag="MedicationRequest"):
    status: str | None = None
    intent: str | None = None
    doNotPerform: bool | None = None
    medicationCodeableConcept: CodeableConcept | None = None
    medicationReference: Reference | None = None
    subject: Reference | None = None
    authoredOn: str | None = None
    dosageInstruction: list[Dosage] = []
    dispenseRequest: DispenseRequest | None = None


class MedicationStatement(_Resource, tag="MedicationStatement"):
    status: str | None = None
    medicationCodeableConcept: CodeableConcept | None = None
    medicationReference: Reference | None = None
    subject: Reference | None = None
    effectiveDateTime: str | None = None
    effectivePeriod: Period | None = None
    dateAsserted: str | None = None


class MedicationAdministration(_Resource, tag="MedicationAdministration"):
    status: str | None = None
    medicationCodeableConcept: CodeableConcept | None = None
    medicationReference: Reference | None = None
    subject: Reference | None = None
    effectiveDateTime: str | None = None
    effectivePeriod: Period | None = None


class MedicationDispense(_Resource, tag="MedicationDispense"):
    status: str | None = None
    medicationCodeableConcept: CodeableConcept | None = None
    medicationReference: Reference | None = None
    subject: Reference | None = None
    quantity: Quantity | None = None
    daysSupply: Quantity | None = None
    whenPrepared: str | None = None
    whenHandedOver: str | None = None
    dosageInstruction: list[DispenseDosage] = []


MedicationRecord = (
    MedicationRequest | MedicationStatement | MedicationAdministration | MedicationDispense
)
"""The medication records that can expose a patient to a drug."""


class DiagnosticReport(_Resource, tag="DiagnosticReport"):
    status: str | None = None
    code: CodeableConcept | None = None
    subject: Reference | None = None
    effectiveDateTime: str | None = None
    effectivePeriod: Period | None = None
    issued: str | None = None
    result: list[Reference] = []
    specimen: list[Reference] = []


class Condition(_Resource, tag="Condition"):
    clinicalStatus: CodeableConcept | None = None
    verificationStatus: CodeableConcept | None = None
    code: CodeableConcept | None = None
    subject: Reference | None = None
    onsetDateTime: str | None = None
    onsetPeriod: Period | None = None
    abatementDateTime: str | None = None
    recordedDate: str | None = None


class Flag(_Resource, tag="Flag"):
    status: str | None = None
    code: CodeableConcept | None = None
    subject: Reference | None = None
    period: Period | None = None


class DetectedIssue(_Resource, tag="DetectedIssue"):
    """Read back from a server by the scheduled job (its own earlier output)."""

    status: str | None = None
    identifier: list[Identifier] = []
    patient: Reference | None = None


class Bundle(_Resource, tag="Bundle"):
    type: str | None = None
    entry: list[BundleEntry] = []
    link: list[BundleLink] = []


Resource = (
    Observation
    | Patient
    | Medication
    | MedicationRequest
    | MedicationStatement
    | MedicationAdministration
    | MedicationDispense
    | DiagnosticReport
    | Condition
    | Flag
    | DetectedIssue
    | Bundle
)

INPUT_TYPES: tuple[str, ...] = (
    "Patient",
    "Observation",
    "DiagnosticReport",
    "MedicationStatement",
    "MedicationRequest",
    "MedicationAdministration",
    "MedicationDispense",
    "Medication",
    "Condition",
    "Flag",
)
"""Every resource type the profiles need, in one place: what a patient's evaluation reads.

The scheduled job's searches, the CDS service's prefetch keys and (to come) a Bulk Data export's
``_type`` list are built to cover exactly these; tests check that they do. (``DetectedIssue`` is
read back by the job as its own output, ``Bundle`` is a container: neither is patient data.)
"""

_DECODER: msgspec.json.Decoder[Resource] = msgspec.json.Decoder(Resource)
RESOURCE_DECODER = _DECODER
"""The decoder of :func:`decode_any`, for a hot loop that calls its ``decode`` directly and
hands only a line that fails to :func:`decode_any` (which says why)."""
_UNKNOWN_TYPE = re.compile(r"^Invalid value '([^']*)' - at `\$\.resourceType`$")

_R4_NAMES = """
    Account ActivityDefinition AdverseEvent AllergyIntolerance Appointment AppointmentResponse
    AuditEvent Basic Binary BiologicallyDerivedProduct BodyStructure Bundle CapabilityStatement
    CarePlan CareTeam CatalogEntry ChargeItem ChargeItemDefinition Claim ClaimResponse
    ClinicalImpression CodeSystem Communication CommunicationRequest CompartmentDefinition
    Composition ConceptMap Condition Consent Contract Coverage CoverageEligibilityRequest
    CoverageEligibilityResponse DetectedIssue Device DeviceDefinition DeviceMetric DeviceRequest
    DeviceUseStatement DiagnosticReport DocumentManifest DocumentReference
    EffectEvidenceSynthesis Encounter Endpoint EnrollmentRequest EnrollmentResponse
    EpisodeOfCare EventDefinition Evidence EvidenceVariable ExampleScenario ExplanationOfBenefit
    FamilyMemberHistory Flag Goal GraphDefinition Group GuidanceResponse HealthcareService
    ImagingStudy Immunization ImmunizationEvaluation ImmunizationRecommendation
    ImplementationGuide InsurancePlan Invoice Library Linkage List Location Measure
    MeasureReport Media Medication MedicationAdministration MedicationDispense
    MedicationKnowledge MedicationRequest MedicationStatement MedicinalProduct
    MedicinalProductAuthorization MedicinalProductContraindication MedicinalProductIndication
    MedicinalProductIngredient MedicinalProductInteraction MedicinalProductManufactured
    MedicinalProductPackaged MedicinalProductPharmaceutical MedicinalProductUndesirableEffect
    MessageDefinition MessageHeader MolecularSequence NamingSystem NutritionOrder Observation
    ObservationDefinition OperationDefinition OperationOutcome Organization
    OrganizationAffiliation Parameters Patient PaymentNotice PaymentReconciliation Person
    PlanDefinition Practitioner PractitionerRole Procedure Provenance Questionnaire
    QuestionnaireResponse RelatedPerson RequestGroup ResearchDefinition
    ResearchElementDefinition ResearchStudy ResearchSubject RiskAssessment RiskEvidenceSynthesis
    Schedule SearchParameter ServiceRequest Slot Specimen SpecimenDefinition StructureDefinition
    StructureMap Subscription Substance SubstanceNucleicAcid SubstancePolymer SubstanceProtein
    SubstanceReferenceInformation SubstanceSourceMaterial SubstanceSpecification SupplyDelivery
    SupplyRequest Task TerminologyCapabilities TestReport TestScript ValueSet VerificationResult
    VisionPrescription
"""
R4_RESOURCE_TYPES = frozenset(_R4_NAMES.split())
"""Every resource type of FHIR R4 (https://hl7.org/fhir/R4/resourcelist.html), as the R4 JSON
schema's ``discriminator`` lists them."""

class Unread(NamedTuple):
    """A resource fhir-leuko does not read that may hold what must not be lost without a word:
    its type is no FHIR R4 type (``observation``: FHIR type names are case-sensitive; a misspelt
    or local type). The rule core looks inside (an analyte's LOINC code, a medication) and names
    it as a problem when it finds one. An R4 type fhir-leuko does not read (Encounter, Claim …)
    holds nothing it needs (every medication record type is read) and is skipped as before."""

    resource_type: str
    data: bytes

    @property
    def id(self) -> str | None:
        """The resource's id, when it has one (read only for the problem line)."""
        try:
            obj = orjson.loads(self.data)
        except orjson.JSONDecodeError:
            return None
        rid = obj.get("id") if isinstance(obj, dict) else None
        return rid if isinstance(rid, str) else None

TOO_DEEP = "JSON nested too deeply"
"""The reason given for JSON nested deeper than can be decoded (see :func:`decode_json`)."""

_T = TypeVar("_T")


def decode_json(decoder: msgspec.json.Decoder[_T], data: bytes | msgspec.Raw) -> _T:
    """``decoder.decode(data)``: the one place where JSON bytes become typed values.

    msgspec decodes (and skips unknown members) recursively and raises ``RecursionError`` for JSON
    nested about 1,000 levels deep, wherever it is (even in an ``extension`` nobody reads), and at
    a depth that depends on the caller's own stack. (orjson stops at 1,024 levels with its own
    ``JSONDecodeError``.) Here that becomes a :class:`msgspec.DecodeError` like any other invalid
    JSON, so every caller's handling of malformed input covers it: FHIR resources and Bundles, server
    pages, CDS Hooks requests.

    Raises:
        msgspec.DecodeError: invalid JSON, or nested too deeply (``TOO_DEEP``).
        msgspec.ValidationError: valid JSON of the wrong shape.
    """
    try:
        return decoder.decode(data)
    except RecursionError:
        raise msgspec.DecodeError(TOO_DEEP) from None


class MalformedResourceError(ValueError):
    """A resource could not be decoded. ``label`` names it as well as it can be named."""

    def __init__(self, label: str, reason: str) -> None:
        self.label = label
        self.reason = reason
        super().__init__(f"{label}: {reason}" if label else reason)


# JSON tokens that matter for finding a document's top-level members: strings and punctuation.
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[{}\[\]:,]')
_LABEL_SCAN = 1 << 16
"""How far into a document too deep to parse the label is looked for (an error path only)."""


def _scan_label(data: bytes) -> str:
    """``Type/id`` from the top-level members of a document too deep to parse, by scanning its
    first bytes (FHIR JSON puts ``resourceType`` and ``id`` first) without recursion."""
    depth = 0
    key: bytes | None = None
    member = False
    found: dict[bytes, str] = {}
    for match in _TOKEN.finditer(data, 0, _LABEL_SCAN):
        token = match.group()
        if token in (b"{", b"["):
            depth += 1
        elif token in (b"}", b"]"):
            depth -= 1
        elif depth != 1:
            continue
        elif token == b":":
            member = True
        elif token == b",":
            key, member = None, False
        elif not member:
            key = token
        elif key in (b'"resourceType"', b'"id"'):
            with contextlib.suppress(orjson.JSONDecodeError):
                found[key] = orjson.loads(token)
            if len(found) == 2:
                break
    rtype, rid = found.get(b'"resourceType"'), found.get(b'"id"')
    if rtype and rid:
        return f"{rtype}/{rid}"
    return rtype or ""


def _label_of(data: bytes | Any) -> str:
    """Best-effort ``Type/id`` of a resource that failed typed decoding, for the problem report."""
    obj: Any = data
    if isinstance(data, bytes | bytearray | memoryview):
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return _scan_label(bytes(data))
    if not isinstance(obj, dict):
        return ""
    rtype = obj.get("resourceType")
    rid = obj.get("id")
    if isinstance(rtype, str) and isinstance(rid, str):
        return f"{rtype}/{rid}"
    return rtype if isinstance(rtype, str) else ""


def _reason(exc: Exception) -> str:
    text = str(exc)
    if text == TOO_DEEP:
        return f"{TOO_DEEP} to read (about 1,000 levels or more)"
    # msgspec.ValidationError subclasses DecodeError: valid JSON with a wrongly typed element is
    # "malformed", not "not valid JSON".
    if isinstance(exc, msgspec.DecodeError) and not isinstance(exc, msgspec.ValidationError):
        return f"not valid JSON ({text})"
    if text.startswith("Object missing required field `resourceType`"):
        return "no resourceType"
    return f"malformed ({text})"


def decode_resource(data: bytes | msgspec.Raw) -> Resource | None:
    """Decode one resource's JSON bytes.

    Returns ``None`` for resource types fhir-leuko does not read.

    Raises:
        MalformedResourceError: invalid JSON (nested too deeply included), or an element
            fhir-leuko uses has the wrong type.
    """
    found = decode_any(data)
    return None if isinstance(found, Unread) else found


def decode_any(data: bytes | msgspec.Raw) -> Resource | Unread | None:
    """:func:`decode_resource`, and :class:`Unread` for a resource that is not read but must be
    looked into (the edges that read input for the rule core use this one).

    Raises:
        MalformedResourceError: as :func:`decode_resource`.
    """
    try:
        # _DECODER.decode, not decode_json: this runs once per line of a bulk export, where a
        # call more costs measurably; RecursionError is handled the same way here.
        return _DECODER.decode(data)
    except RecursionError:
        too_deep = _reason(msgspec.DecodeError(TOO_DEEP))
        raise MalformedResourceError(_label_of(bytes(data)), too_deep) from None
    except msgspec.ValidationError as exc:
        unknown = _UNKNOWN_TYPE.match(str(exc))
        if unknown:
            rtype = unknown.group(1)
            if rtype in R4_RESOURCE_TYPES:
                return None
            return Unread(rtype, bytes(data))
        raise MalformedResourceError(_label_of(bytes(data)), _reason(exc)) from None
    except msgspec.DecodeError as exc:
        raise MalformedResourceError("", _reason(exc)) from None


def convert_resource(obj: Any) -> Resource | None:
    """Like :func:`decode_resource`, for a resource already parsed into Python objects.

    It goes through JSON bytes on purpose: one decoding path, including the raw ``contained``
    and Bundle entries, whatever the source (a file, a server response, a CDS Hooks prefetch).
    """
    try:
        data = orjson.dumps(obj)
    except orjson.JSONEncodeError as exc:  # nested deeper than orjson's 1,024 levels, or not JSON
        raise MalformedResourceError(_label_of(obj), f"not valid JSON ({exc})") from None
    return decode_resource(data)


class Origin(NamedTuple):
    """Where a resource was read: a file (or URL, or prefetch key) and a position in it.

    A NamedTuple (immutable, like a frozen dataclass) because one is made per resource read, and a
    frozen dataclass costs twice as much to construct.
    """

    source: str
    position: str = ""
    full_url: str | None = None
    input: str | None = None
    """The input this was read from when the edge reads several sources (files: the directory,
    or the file given alone, as the user named it): a resource's identity includes its source
    (``normalise/sources.py``). ``None`` when everything read is one source (a FHIR server's
    searches, a CDS Hooks prefetch, ``evaluate --same-source``)."""


Sourced = tuple[Resource | Unread, Origin]
"""A resource read (or one not read that the rule core must look into), and where."""

# A RESTful fullUrl: [base]/[type]/[id], optionally versioned (https://hl7.org/fhir/R4/bundle.html
# #bundle-unique, https://hl7.org/fhir/R4/references.html#literal). Ids: [A-Za-z0-9\-\.]{1,64}.
_RESTFUL_URL = re.compile(
    r"^(https?://[^\s]+?)/[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}(?:/_history/[A-Za-z0-9\-.]{1,64})?$"
)


def server_base(full_url: str | None) -> str | None:
    """The server base of a RESTful fullUrl (``https://ehr.example.org/fhir`` of
    ``https://ehr.example.org/fhir/Observation/1``); ``None`` for ``urn:uuid:`` and other URIs."""
    if not full_url or not full_url.startswith(("http://", "https://")):
        return None
    found = _RESTFUL_URL.match(full_url)
    return found.group(1) if found else None


def iter_document(
    data: bytes, source: str, position: str = "", input: str | None = None
) -> Iterator[Sourced | Problem]:
    """Resources in one JSON document: a single resource, or a Bundle flattened (nested ones
    too). ``input`` goes into each :class:`Origin` (see :attr:`Origin.input`)."""
    try:
        resource = decode_any(data)
    except MalformedResourceError as exc:
        yield from malformed_document(exc, data, source, position, input)
        return
    if resource is None:
        return
    if isinstance(resource, Bundle):
        yield from bundle_entries(resource, source, position, input)
    else:
        yield resource, Origin(source, position, None, input)


def malformed_document(
    exc: MalformedResourceError,
    data: bytes,
    source: str,
    position: str,
    input: str | None = None,
) -> Iterator[Sourced | Problem]:
    """What a document that failed to decode still gives: a problem, or, for a Bundle that is
    too deep only because of some of its entries (a Bundle is as deep as its deepest entry), the
    other entries and a problem for each deep one."""
    if TOO_DEEP not in exc.reason or exc.label.split("/", 1)[0] != "Bundle":
        yield Problem(source, exc.reason, exc.label, position)
        return
    entries = _child(data, b'"entry"')
    if entries is None:
        yield Problem(source, exc.reason, exc.label, position)
        return
    prefix = f"{position} " if position else ""
    for index, raw in enumerate(_children(entries)):
        where = f"{prefix}entry[{index}]"
        try:
            entry = decode_json(_ENTRY, raw)
        except msgspec.DecodeError as entry_exc:
            resource = _child(raw, b'"resource"') if str(entry_exc) == TOO_DEEP else None
            if resource is None:
                yield Problem(source, _reason(entry_exc), "", where)
                continue
            try:
                decode_resource(resource)
            except MalformedResourceError as inner:
                yield from malformed_document(inner, resource, source, where, input)
            continue
        yield from _entry_items(entry, source, where, input)


_ENTRY: msgspec.json.Decoder[BundleEntry] = msgspec.json.Decoder(BundleEntry)


def _children(data: bytes) -> Iterator[bytes]:
    """The object and array values directly inside a JSON object or array, found by scanning its
    tokens without recursion (any depth): used only for documents too deep to decode."""
    yield from (raw for _, raw in _scan_children(data))


def _child(data: bytes, key: bytes) -> bytes | None:
    """The raw object or array value of the member ``key`` (quoted) of a JSON object."""
    return next((raw for name, raw in _scan_children(data) if name == key), None)


def _scan_children(data: bytes) -> Iterator[tuple[bytes | None, bytes]]:
    depth = 0
    key: bytes | None = None
    member = False
    start = 0
    for match in _TOKEN.finditer(data):
        token = match.group()
        if token in (b"{", b"["):
            depth += 1
            if depth == 2:
                start = match.start()
        elif token in (b"}", b"]"):
            depth -= 1
            if depth == 1:
                yield (key if member else None), data[start : match.end()]
            if depth == 0:
                return
        elif depth != 1:
            continue
        elif token == b":":
            member = True
        elif token == b",":
            key, member = None, False
        elif not member:
            key = token


def bundle_entries(
    bundle: Bundle, source: str, position: str, input: str | None = None
) -> Iterator[Sourced | Problem]:
    """The resources of a Bundle's entries (nested Bundles flattened), each decoded on its own so
    one malformed entry loses only itself."""
    prefix = f"{position} " if position else ""
    for index, entry in enumerate(bundle.entry):
        yield from _entry_items(entry, source, f"{prefix}entry[{index}]", input)


def _entry_items(
    entry: BundleEntry, source: str, where: str, input: str | None
) -> Iterator[Sourced | Problem]:
    if not entry.resource:
        # Transaction responses and deletes carry no resource: nothing to read.
        return
    try:
        resource = decode_any(entry.resource)
    except MalformedResourceError as exc:
        yield Problem(source, exc.reason, exc.label or (entry.fullUrl or ""), where)
        return
    if resource is None:
        return
    if isinstance(resource, Bundle):
        yield from bundle_entries(resource, source, where, input)
    else:
        yield resource, Origin(source, where, entry.fullUrl, input)
