"""Normalise FHIR resources into per-patient lab results, drug exposures, conditions and flags.

Pure: takes decoded resources (with their origin) and the compiled knowledge, returns data and the
problems found; no I/O, no clock. What it checks (fhir.resources would not check coded values):

* LOINC code -> analyte, keyed on the code, never the display (knowledge/loinc.toml).
* Observation.status against the R4 ObservationStatus codes; ``final``, ``amended``, ``corrected``
  and ``preliminary`` results are kept (profiles decide whether ``preliminary`` counts), the rest
  (``registered``, ``cancelled``, ``entered-in-error``, ``unknown``) are ignored.
* The unit: the UCUM ``code`` first, then the ``unit`` text (knowledge/units.toml). A count code needs
  a count unit and a fraction code a fraction unit: a mismatch is reported, never guessed.
* Plausibility for the declared unit (an ANC of 450 "10*3/uL" is reported, not graded).
* ``dataAbsentReason``, missing values, missing subject or time: reported, never a crash.

Observations without their own time or subject inherit them from the DiagnosticReport (``result``)
or panel Observation (``hasMember``) that lists them, as in the HL7 R4 CBC example (Bundle 101).
When a specimen has no absolute count, one is derived from WBC x percentage of the same specimen,
report or time (clozapine prescribing information §5.1; clinical.md §4.5).

The rooms, in the order a resource meets them (each module's docstring says more):

* :mod:`.normaliser` — the coordinator: one pass over the input (:meth:`Normaliser.feed`,
  :meth:`Normaliser.feed_lines`) hands each resource to its room as it is read, then
  :meth:`Normaliser.run` finishes the rooms in order. Nothing is read twice.
* :mod:`.results` — lab Observations: LOINC mapping, status, value, unit, plausibility, the usual
  single reference range, the newest version of each; a result is built as it is read (the hot
  path).
* :mod:`.ranges` — the reference range that applies to the patient, when an Observation gives
  several (by sex, by age), conditional ones or text; chosen once the patient is known.
* :mod:`.reports` — DiagnosticReport ``result`` and panel ``hasMember``: subject, time and grouping
  passed down to the results they list; a withdrawn or cancelled report takes its results out.
* :mod:`.identity` — which resource a reference names (fullUrl, ``Type/id``, versioned URLs) and
  which patient a subject reference is; Patient resources (birth date, sex, death).
* :mod:`.medications` — MedicationStatement, MedicationRequest, MedicationAdministration and
  MedicationDispense (and their Medications) into drug exposures; :func:`drugs_of` for a single
  record. :mod:`.exposure` decides, in one place, whether a record is an exposure and when.
* :mod:`.conditions` — Conditions into contributing causes, Conditions and Flags into patient flags.
* :mod:`.derivation` — absolute counts derived from WBC x fraction where a group has none.
* :mod:`.dataset` — the :class:`Dataset` built, and the problems found with where each was read.
"""

from .dataset import Dataset
from .medications import drugs_of
from .normaliser import Normaliser, normalise
from .results import OBSERVATION_STATUSES

__all__ = [
    "OBSERVATION_STATUSES",
    "Dataset",
    "Normaliser",
    "drugs_of",
    "normalise",
]
