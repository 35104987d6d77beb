"""A deterministic generator of realistic FHIR R4 bulk-export data for the benchmarks.

``python -m benchmarks.generate --observations N --out DIR`` writes what a FHIR Bulk Data export of a
haematology population looks like (one NDJSON file per resource type, Observations split into parts
of at most 250,000 lines as servers do):

* ``Patient.ndjson``: adults and some children, with birth dates;
* ``Observation.NNN.ndjson``: complete blood counts with a differential, 11 LOINC-coded Observations
  each (WBC 6690-2, neutrophils 751-8 and 770-8, lymphocytes 731-0/736-9, monocytes 742-7/5905-5,
  eosinophils 711-2/713-8, basophils 704-7/706-2), each about 1 KB like a real server's (meta, identifier,
  category, code with display and text, subject, encounter, effective, issued, performer,
  valueQuantity in UCUM, interpretation, referenceRange). One CBC in ten has no absolute neutrophil
  count (the ANC is then derived). Most counts are normal; some patients have a low series (a
  chemotherapy nadir, a clozapine dip, a mild drug-free low);
* ``DiagnosticReport.ndjson``: one CBC report (57021-8) per CBC, ``result`` naming its Observations;
* ``MedicationRequest.ndjson``: chemotherapy (RxNorm, ATC), clozapine, and everyday drugs that cause
  nothing (metformin, lisinopril ...), with statuses active/stopped/completed;
* ``Condition.ndjson``: cancers, HIV, hypertension ...; ``Flag.ndjson``: a few documented BEN flags.

The same ``--seed`` and size always give byte-identical files. Dates are relative to ``AS_OF`` so
``fhir-leuko evaluate DIR --as-of 2026-01-15`` finds the recent low series.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

__all__ = ["AS_OF", "GENERATOR_VERSION", "generate"]

GENERATOR_VERSION = "1"
AS_OF = "2026-01-15"
_AS_OF = datetime(2026, 1, 15, 23, 0, tzinfo=UTC)
OBSERVATIONS_PER_FILE = 250_000
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ATC = "http://www.whocc.no/atc"
BASE = "https://ehr.example.org/fhir"
BEN_SYSTEM = "https://fhir-leuko.github.io/fhir/CodeSystem/patient-flag"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"

# (loinc, display, analyte, percent?, adult reference low, high) in 10*3/uL or %.
_CBC = [
    ("6690-2", "Leukocytes [#/volume] in Blood by Automated count", "wbc", False, 4.0, 11.0),
    ("751-8", "Neutrophils [#/volume] in Blood by Automated count", "neut", False, 1.8, 7.7),
    ("770-8", "Neutrophils/100 leukocytes in Blood by Automated count", "neut", True, 40.0, 75.0),
    ("731-0", "Lymphocytes [#/volume] in Blood by Automated count", "lymph", False, 1.0, 4.8),
    ("736-9", "Lymphocytes/100 leukocytes in Blood by Automated count", "lymph", True, 20.0, 45.0),
    ("742-7", "Monocytes [#/volume] in Blood by Automated count", "mono", False, 0.2, 1.0),
    ("5905-5", "Monocytes/100 leukocytes in Blood by Automated count", "mono", True, 2.0, 10.0),
    ("711-2", "Eosinophils [#/volume] in Blood by Automated count", "eos", False, 0.0, 0.5),
    ("713-8", "Eosinophils/100 leukocytes in Blood by Automated count", "eos", True, 0.0, 6.0),
    ("704-7", "Basophils [#/volume] in Blood by Automated count", "baso", False, 0.0, 0.2),
    ("706-2", "Basophils/100 leukocytes in Blood by Automated count", "baso", True, 0.0, 2.0),
]
_OBS_PER_CBC = len(_CBC)

# (text, RxNorm code, ATC code) of the drugs orders name.
_CHEMO = [
    ("oxaliplatin 5 MG/ML Injectable Solution", "32592", "L01XA03"),
    ("DOCEtaxel 20 MG/ML Injectable Solution", "72962", "L01CD02"),
    ("Cisplatin 1 MG/ML Injectable Solution", "2555", "L01XA01"),
    ("Cyclophosphamide 500 MG Injection", "3002", "L01AA01"),
]
_CLOZAPINE = ("Clozapine 100 MG Oral Tablet", "2626", "N05AH02")
_EVERYDAY = [
    ("Metformin hydrochloride 500 MG Oral Tablet", "6809", "A10BA02"),
    ("Lisinopril 10 MG Oral Tablet", "29046", "C09AA03"),
    ("Atorvastatin 20 MG Oral Tablet", "83367", "C10AA05"),
    ("Amlodipine 5 MG Oral Tablet", "17767", "C08CA01"),
    ("Omeprazole 20 MG Delayed Release Oral Capsule", "7646", "A02BC01"),
]
_CONDITIONS = [
    ("254637007", "Non-small cell lung cancer (disorder)"),
    ("363406005", "Malignant tumor of colon (disorder)"),
    ("86406008", "Human immunodeficiency virus infection (disorder)"),
    ("38341003", "Hypertensive disorder, systemic arterial (disorder)"),
    ("44054006", "Diabetes mellitus type 2 (disorder)"),
]


@dataclass
class _Writer:
    """NDJSON files of one resource type, split into parts of ``per_file`` lines."""

    directory: Path
    rtype: str
    per_file: int | None = None
    count: int = 0
    _part: int = 0
    _handle: Any = None

    def write(self, resource: dict[str, Any]) -> None:
        if self._handle is None or (self.per_file and self.count % self.per_file == 0):
            self._next_file()
        self._handle.write(orjson.dumps(resource) + b"\n")
        self.count += 1

    def _next_file(self) -> None:
        if self._handle is not None:
            self._handle.close()
        name = (
            f"{self.rtype}.{self._part:03d}.ndjson" if self.per_file else f"{self.rtype}.ndjson"
        )
        self._part += 1
        self._handle = (self.directory / name).open("wb", buffering=1 << 20)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


def _instant(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S+00:00")


class _Generator:
    def __init__(self, seed: int, out: Path) -> None:
        self.rng = random.Random(seed)
        self.out = out
        self.writers = {
            "Patient": _Writer(out, "Patient"),
            "Observation": _Writer(out, "Observation", OBSERVATIONS_PER_FILE),
            "DiagnosticReport": _Writer(out, "DiagnosticReport"),
            "MedicationRequest": _Writer(out, "MedicationRequest"),
            "Condition": _Writer(out, "Condition"),
            "Flag": _Writer(out, "Flag"),
        }
        self.ids = 0

    def next_id(self, prefix: str) -> str:
        self.ids += 1
        return f"{prefix}-{self.ids:09d}"

    # -- one patient ----------------------------------------------------------------------------

    def patient(self, number: int, cbcs: int) -> int:
        """Write one patient with ``cbcs`` CBCs; returns the Observations written."""
        rng = self.rng
        pid = f"pat-{number:08d}"
        child = rng.random() < 0.08
        age_days = rng.randint(200, 17 * 365) if child else rng.randint(18 * 365, 90 * 365)
        birth = (_AS_OF - timedelta(days=age_days)).date()
        self.writers["Patient"].write(
            {
                "resourceType": "Patient",
                "id": pid,
                "meta": {"versionId": "1", "lastUpdated": "2026-01-10T08:00:00+00:00"},
                "identifier": [{"system": f"{BASE}/sid/mrn", "value": f"MRN{number:08d}"}],
                "active": True,
                "name": [{"family": f"Patient{number}", "given": ["Test"]}],
                "gender": rng.choice(["female", "male"]),
                "birthDate": birth.isoformat(),
            }
        )
        # What happens to this patient's counts: most stay normal.
        story = rng.choices(
            ["normal", "chemo", "clozapine", "mild", "recovered"], [80, 7, 4, 6, 3]
        )[0]
        first = _AS_OF - timedelta(days=rng.randint(60, 720))
        step = (_AS_OF - timedelta(days=2) - first) / max(cbcs, 1)
        chemo_start = None
        if story == "chemo":
            chemo_start = _AS_OF - timedelta(days=rng.randint(10, 40))
            drug = rng.choice(_CHEMO)
            self.medication(pid, drug, chemo_start, "active")
            self.condition(pid, rng.choice(_CONDITIONS[:2]), chemo_start - timedelta(days=30))
        elif story == "clozapine":
            self.medication(pid, _CLOZAPINE, first - timedelta(days=30), "active")
            if rng.random() < 0.3:
                self.flag(pid)
        for _ in range(rng.randint(0, 2)):
            status = rng.choice(["active", "active", "stopped", "completed"])
            self.medication(pid, rng.choice(_EVERYDAY), first - timedelta(days=90), status)
        if rng.random() < 0.2:
            self.condition(pid, rng.choice(_CONDITIONS[2:]), first - timedelta(days=400))
        written = 0
        for index in range(cbcs):
            when = first + step * index + timedelta(minutes=rng.randint(0, 600))
            last = index == cbcs - 1
            wbc = rng.uniform(4.5, 9.5)
            neut_pct = rng.uniform(45, 70)
            if story == "chemo" and chemo_start is not None and when > chemo_start:
                wbc = rng.uniform(0.4, 2.8)
                neut_pct = rng.uniform(15, 50)
            elif story == "clozapine" and last:
                wbc = rng.uniform(2.5, 4.0)
                neut_pct = rng.uniform(20, 45)
            elif story == "mild" and last:
                wbc = rng.uniform(3.5, 3.99)
            elif story == "recovered" and index == cbcs - 2:
                wbc = rng.uniform(2.0, 3.5)
            written += self.cbc(pid, when, wbc, neut_pct, with_anc=rng.random() >= 0.1)
        return written

    def cbc(self, pid: str, when: datetime, wbc: float, neut_pct: float, *, with_anc: bool) -> int:
        rng = self.rng
        lymph_pct = rng.uniform(18, 40)
        mono_pct = rng.uniform(3, 9)
        eos_pct = rng.uniform(0.5, 4)
        baso_pct = rng.uniform(0.2, 1.2)
        values = {
            "wbc": (wbc, None),
            "neut": (wbc * neut_pct / 100, neut_pct),
            "lymph": (wbc * lymph_pct / 100, lymph_pct),
            "mono": (wbc * mono_pct / 100, mono_pct),
            "eos": (wbc * eos_pct / 100, eos_pct),
            "baso": (wbc * baso_pct / 100, baso_pct),
        }
        report_id = self.next_id("dr")
        encounter = self.next_id("enc")
        effective = _instant(when)
        issued = _instant(when + timedelta(hours=2))
        results = []
        for code, display, analyte, percent, low, high in _CBC:
            if code == "751-8" and not with_anc:
                continue
            absolute, pct = values[analyte]
            value = pct if percent else absolute
            assert value is not None
            oid = self.next_id("obs")
            results.append({"reference": f"Observation/{oid}"})
            self.writers["Observation"].write(
                self.observation(
                    oid, pid, encounter, code, display, value, percent, low, high, effective, issued
                )
            )
        self.writers["DiagnosticReport"].write(
            {
                "resourceType": "DiagnosticReport",
                "id": report_id,
                "meta": {"versionId": "1", "lastUpdated": issued},
                "status": "final",
                "category": [
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                                "code": "HM",
                                "display": "Hematology",
                            }
                        ]
                    }
                ],
                "code": {
                    "coding": [
                        {
                            "system": LOINC,
                            "code": "57021-8",
                            "display": "CBC W Auto Differential panel - Blood",
                        }
                    ],
                    "text": "CBC with differential",
                },
                "subject": {"reference": f"Patient/{pid}"},
                "encounter": {"reference": f"Encounter/{encounter}"},
                "effectiveDateTime": effective,
                "issued": issued,
                "performer": [{"reference": "Organization/lab-1", "display": "Central Laboratory"}],
                "result": results,
            }
        )
        return len(results)

    def observation(
        self,
        oid: str,
        pid: str,
        encounter: str,
        code: str,
        display: str,
        value: float,
        percent: bool,
        low: float,
        high: float,
        effective: str,
        issued: str,
    ) -> dict[str, Any]:
        unit = "%" if percent else "10*3/uL"
        value = round(value, 1 if percent else 2)
        flag = ("L", "Low") if value < low else ("H", "High") if value > high else ("N", "Normal")
        return {
            "resourceType": "Observation",
            "id": oid,
            "meta": {
                "versionId": "1",
                "lastUpdated": issued,
                "profile": [
                    "http://hl7.org/fhir/us/core/StructureDefinition/us-core-observation-lab"
                ],
            },
            "identifier": [{"system": f"{BASE}/sid/lab-result", "value": oid}],
            "status": "final",
            "category": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                            "code": "laboratory",
                            "display": "Laboratory",
                        }
                    ],
                    "text": "Laboratory",
                }
            ],
            "code": {"coding": [{"system": LOINC, "code": code, "display": display}], "text": display},
            "subject": {"reference": f"Patient/{pid}"},
            "encounter": {"reference": f"Encounter/{encounter}"},
            "effectiveDateTime": effective,
            "issued": issued,
            "performer": [{"reference": "Organization/lab-1", "display": "Central Laboratory"}],
            "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
            "interpretation": [
                {"coding": [{"system": INTERPRETATION, "code": flag[0], "display": flag[1]}]}
            ],
            "referenceRange": [
                {
                    "low": {"value": low, "unit": unit, "system": UCUM, "code": unit},
                    "high": {"value": high, "unit": unit, "system": UCUM, "code": unit},
                    "text": f"{low}-{high} {unit}",
                }
            ],
        }

    def medication(
        self, pid: str, drug: tuple[str, str, str], start: datetime, status: str
    ) -> None:
        text, rxnorm, atc = drug
        rid = self.next_id("mr")
        resource: dict[str, Any] = {
            "resourceType": "MedicationRequest",
            "id": rid,
            "meta": {"versionId": "1", "lastUpdated": _instant(start)},
            "status": status,
            "intent": "order",
            "medicationCodeableConcept": {
                "coding": [
                    {"system": RXNORM, "code": rxnorm, "display": text},
                    {"system": ATC, "code": atc},
                ],
                "text": text,
            },
            "subject": {"reference": f"Patient/{pid}"},
            "authoredOn": _instant(start),
            "requester": {"reference": "Practitioner/dr-1", "display": "Dr. Example"},
        }
        if status != "active":
            end = start + timedelta(days=self.rng.randint(20, 200))
            resource["dosageInstruction"] = [
                {
                    "text": "as directed",
                    "timing": {
                        "repeat": {
                            "boundsPeriod": {"start": _instant(start), "end": _instant(end)}
                        }
                    },
                }
            ]
        self.writers["MedicationRequest"].write(resource)

    def condition(self, pid: str, concept: tuple[str, str], onset: datetime) -> None:
        code, display = concept
        self.writers["Condition"].write(
            {
                "resourceType": "Condition",
                "id": self.next_id("cond"),
                "clinicalStatus": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                            "code": "active",
                        }
                    ]
                },
                "verificationStatus": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                            "code": "confirmed",
                        }
                    ]
                },
                "code": {
                    "coding": [{"system": "http://snomed.info/sct", "code": code, "display": display}],
                    "text": display,
                },
                "subject": {"reference": f"Patient/{pid}"},
                "onsetDateTime": _instant(onset),
            }
        )

    def flag(self, pid: str) -> None:
        self.writers["Flag"].write(
            {
                "resourceType": "Flag",
                "id": self.next_id("flag"),
                "status": "active",
                "code": {
                    "coding": [{"system": BEN_SYSTEM, "code": "ben"}],
                    "text": "Benign ethnic neutropenia (documented)",
                },
                "subject": {"reference": f"Patient/{pid}"},
            }
        )

    def close(self) -> dict[str, int]:
        for writer in self.writers.values():
            writer.close()
        return {name: w.count for name, w in self.writers.items()}


def _cbc_counts(rng: random.Random, observations: int) -> Iterator[int]:
    """CBCs per patient (1-8) until the Observation budget is spent."""
    left = observations
    while left > 0:
        cbcs = min(rng.randint(1, 8), max(1, left // _OBS_PER_CBC))
        yield cbcs
        left -= cbcs * _OBS_PER_CBC


def generate(out: Path, observations: int = 1_000_000, seed: int = 2) -> dict[str, int]:
    """Write about ``observations`` Observations (and the rest) into ``out``; returns counts."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.ndjson"):
        old.unlink()
    gen = _Generator(seed, out)
    plan = random.Random(seed + 1)
    for number, cbcs in enumerate(_cbc_counts(plan, observations), start=1):
        gen.patient(number, cbcs)
    return gen.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.generate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--observations", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    counts = generate(args.out, args.observations, args.seed)
    print(", ".join(f"{n} {t}" for t, n in counts.items()), f"in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
